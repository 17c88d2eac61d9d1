//! The fuzz targets: seeds (a miniature model and the files around it) and one entry per parser
//! of the crate. Shared by the fuzzer (examples/fuzz.rs) and the corpus replay
//! (tests/fuzz_corpus.rs). Include with `#[path = "support/fuzz_targets.rs"] mod fuzz_targets;`
//! next to `#[path = "common/gguf.rs"] mod gguf;` (paths from tests/).
#![allow(dead_code)]

use super::gguf;
use qlora_webgpu::model::llama::LlamaConfig;

// ---------------------------------------------------------------------------------------------
// Seeds: a miniature model and the files around it.

fn mini_llama() -> LlamaConfig {
    LlamaConfig { hidden: 8, intermediate: 16, layers: 1, heads: 2, kv_heads: 1, head_dim: 4, vocab: 16, rms_eps: 1e-5, rope_theta: 10000.0, tied: true, sliding_window: None }
}

const MINI_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
"num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
"max_position_embeddings": 64, "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": [1], "hidden_act": "silu"}"#;

fn values(n: usize, k: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + k * 13) % 17) as f32 / 17.0 - 0.5).collect()
}

fn mini_safetensors() -> Vec<u8> {
    use qlora_webgpu::model::config::ModelConfig;
    let cfg = ModelConfig::from_json("config.json", MINI_CONFIG.as_bytes()).expect("the mini config");
    let raw: Vec<qlora_webgpu::io::safetensors_write::RawTensor> = cfg
        .tensor_shapes()
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            qlora_webgpu::io::safetensors_write::RawTensor { name, dtype: safetensors::Dtype::F32, shape, data: values(n, k).iter().flat_map(|v| v.to_le_bytes()).collect() }
        })
        .collect();
    qlora_webgpu::io::safetensors_write::serialize_tensors(&raw, None).unwrap()
}

fn mini_gguf() -> Vec<u8> {
    use gguf::Val;
    let mut w = gguf::Writer::new();
    let tokens: Vec<String> = (0..16).map(|i| if i < 2 { ["<s>", "</s>"][i].to_string() } else if i == 15 { "ab".to_string() } else { ((b'a' + i as u8 - 2) as char).to_string() }).collect();
    w.kv("general.architecture", Val::Str("llama".into()))
        .kv("llama.block_count", Val::U32(1))
        .kv("llama.context_length", Val::U32(64))
        .kv("llama.embedding_length", Val::U32(8))
        .kv("llama.feed_forward_length", Val::U32(16))
        .kv("llama.attention.head_count", Val::U32(2))
        .kv("llama.attention.head_count_kv", Val::U32(1))
        .kv("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5))
        .kv("llama.rope.freq_base", Val::F32(10000.0))
        .kv("tokenizer.ggml.model", Val::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Val::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", Val::Strs(tokens))
        .kv("tokenizer.ggml.token_type", Val::I32s([3, 3].into_iter().chain(std::iter::repeat_n(1, 14)).collect()))
        .kv("tokenizer.ggml.merges", Val::Strs(vec!["a b".into()]))
        .kv("tokenizer.ggml.bos_token_id", Val::U32(0))
        .kv("tokenizer.ggml.eos_token_id", Val::U32(1))
        .kv("tokenizer.chat_template", Val::Str(CHAT_TEMPLATE.into()));
    let f32s = |n: usize, k: usize| values(n, k).iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let t: [(&str, &[usize]); 11] = [
        ("token_embd.weight", &[16, 8]),
        ("blk.0.attn_norm.weight", &[8]),
        ("blk.0.attn_q.weight", &[8, 8]),
        ("blk.0.attn_k.weight", &[4, 8]),
        ("blk.0.attn_v.weight", &[4, 8]),
        ("blk.0.attn_output.weight", &[8, 8]),
        ("blk.0.ffn_gate.weight", &[16, 8]),
        ("blk.0.ffn_up.weight", &[16, 8]),
        ("blk.0.ffn_down.weight", &[8, 16]),
        ("blk.0.ffn_norm.weight", &[8]),
        ("output_norm.weight", &[8]),
    ];
    for (k, (name, shape)) in t.iter().enumerate() {
        w.tensor(name, shape, gguf::F32, f32s(shape.iter().product(), k));
    }
    w.bytes()
}

const CHAT_TEMPLATE: &str = "{% for m in messages %}{% if loop.first and m.role != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const TOKENIZER_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},{"id":1,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":null,"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},"post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"vocab":{"<s>":0,"</s>":1,"a":2,"b":3,"ab":4,"Ġ":5,"Ġa":6},"merges":["a b","Ġ a"]}}"#;
const TOKENIZER_CONFIG: &str = r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}, "pad_token": null, "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}"#;

const JSONL: &str = "{\"messages\": [{\"role\": \"user\", \"content\": \"ab a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"ab\"}]}\n";
const JSONL_OTHER: &str = "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"ab\", \"completion\": \" a\"}\n";
const TOML: &str = "model = \"m.gguf\"\ndata = \"d.jsonl\"\nr = 8\nlora_alpha = 16.0\nsteps = 60\nlr = 2e-4\nbatch_size = 4\nmax_len = 512\nqlora = true\ntarget_modules = \"q_proj,v_proj\"\n[extra]\nx = [1, 2, 3]\n";

fn mini_adapter() -> qlora_webgpu::lora::HostAdapter {
    use qlora_webgpu::lora::{HostAdapter, HostLora};
    let m = mini_llama();
    let mut layers: Vec<[Option<HostLora>; 7]> = vec![Default::default(); 1];
    for (mi, slot) in layers[0].iter_mut().enumerate() {
        if mi == 0 || mi == 2 {
            let (o, i) = m.proj_shape(mi);
            *slot = Some(HostLora { r: 2, in_features: i, out_features: o, a: values(2 * i, mi), b: values(2 * o, mi + 1), magnitude: None });
        }
    }
    let mut config = qlora_webgpu::lora::config::LoraConfig::new(2, 4.0);
    config.target_modules = qlora_webgpu::lora::config::TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]);
    HostAdapter { config, layers }
}

fn mini_checkpoint_files() -> Vec<(String, Vec<u8>)> {
    use qlora_webgpu::train::checkpoint::{Checkpoint, HostOptimizer, TrainState};
    use qlora_webgpu::train::DataPosition;
    let adapter = mini_adapter();
    let mut moments = std::collections::BTreeMap::new();
    for (mi, h) in adapter.layers[0].iter().enumerate() {
        let Some(h) = h else { continue };
        moments.insert(qlora_webgpu::lora::param_id(0, mi, false), (values(h.r * h.in_features, 1), values(h.r * h.in_features, 2), 3));
        moments.insert(qlora_webgpu::lora::param_id(0, mi, true), (values(h.r * h.out_features, 3), values(h.r * h.out_features, 4), 3));
    }
    let hp = qlora_webgpu::ops::adamw::AdamW { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let schedule = qlora_webgpu::train::Schedule::new(qlora_webgpu::train::ScheduleKind::Cosine, 2e-4, 1, 10);
    let ck = Checkpoint {
        adapter,
        optimizer: HostOptimizer { hp, steps: 3, moments },
        state: TrainState { step: 3, rng: qlora_webgpu::rng::SplitMix64::new(7), data: DataPosition { epoch: 1, index: 2 }, schedule, max_grad_norm: Some(1.0) },
    };
    ck.to_files(&mini_llama()).unwrap()
}

fn mini_bnb() -> Vec<u8> {
    let w = values(16 * 8, 5);
    let t = qlora_webgpu::quant::nf4::quantize_nf4(&w, &[16, 8], 64, true).unwrap();
    let mut raw = Vec::new();
    qlora_webgpu::io::bnb::write_bnb_nf4("model.layers.0.mlp.up_proj.weight", &t, &mut raw).unwrap();
    qlora_webgpu::io::safetensors_write::serialize_tensors(&raw, None).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Targets: (name, seeds, whether the input is text, run). A run returns Ok(true) when the
// parser accepted the input, Ok(false) when it refused it cleanly.

pub type Run = Box<dyn Fn(&[u8], usize) -> bool>;

pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    pub text: bool,
    pub run: Run,
}

pub fn targets() -> Vec<Target> {
    use qlora_webgpu::io::hf::load_hf;
    let st = mini_safetensors();
    let st2 = st.clone();
    let ad = mini_adapter();
    let (ad_cfg, ad_st) = qlora_webgpu::lora::peft::host_adapter_to_bytes(&ad, &mini_llama()).unwrap();
    let ck = mini_checkpoint_files();
    let mut t: Vec<Target> = Vec::new();
    t.push(Target {
        name: "safetensors",
        seeds: vec![st.clone(), mini_bnb(), ad_st.clone()],
        text: false,
        run: Box::new(move |b, _| {
            let Ok(f) = qlora_webgpu::io::SafeTensorsFile::parse("model.safetensors", b) else { return false };
            let converted = f.tensors().iter().all(|t| f.to_f32(&t.name).is_ok() || t.dtype.name() == "U8");
            let files = std::collections::BTreeMap::from([("config.json".to_string(), MINI_CONFIG.as_bytes().to_vec()), ("model.safetensors".to_string(), b.to_vec())]);
            let _ = load_hf(&files);
            converted
        }),
    });
    t.push(Target {
        name: "config.json",
        seeds: vec![MINI_CONFIG.as_bytes().to_vec()],
        text: true,
        run: Box::new(move |b, _| {
            let files = std::collections::BTreeMap::from([("config.json".to_string(), b.to_vec()), ("model.safetensors".to_string(), st2.clone())]);
            load_hf(&files).is_ok()
        }),
    });
    t.push(Target {
        name: "gguf",
        seeds: vec![mini_gguf()],
        text: false,
        run: Box::new(|b, _| match qlora_webgpu::session::ModelSource::from_gguf("m.gguf", b) {
            Ok(_) => true,
            Err(e) => {
                if std::env::var_os("FUZZ_DEBUG").is_some() {
                    eprintln!("{e}");
                }
                false
            }
        }),
    });
    t.push(Target {
        name: "tokenizer",
        seeds: vec![TOKENIZER_JSON.as_bytes().to_vec(), TOKENIZER_CONFIG.as_bytes().to_vec()],
        text: true,
        run: Box::new(|b, which| {
            let r = if which == 0 {
                qlora_webgpu::data::tokenizer::Tokenizer::from_hf_files(b, Some(TOKENIZER_CONFIG.as_bytes()))
            } else {
                qlora_webgpu::data::tokenizer::Tokenizer::from_hf_files(TOKENIZER_JSON.as_bytes(), Some(b))
            };
            let _ = qlora_webgpu::data::chat::ChatContext::from_tokenizer_config(b);
            match r {
                Ok(t) => t.encode("ab a <s>", true).is_ok(),
                Err(_) => false,
            }
        }),
    });
    t.push(Target {
        name: "chat_template",
        seeds: vec![CHAT_TEMPLATE.as_bytes().to_vec(), TOKENIZER_CONFIG.as_bytes().to_vec()],
        text: true,
        run: Box::new(|b, which| {
            use qlora_webgpu::data::chat::{ChatContext, ChatTemplate, Message};
            let t = if which == 0 {
                ChatTemplate::from_jinja_bytes(b).map(Some)
            } else {
                ChatTemplate::from_tokenizer_config(b)
            };
            let Ok(Some(t)) = t else { return false };
            let msgs = [Message::new("system", "s"), Message::new("user", "hi"), Message::new("assistant", "yo")];
            t.render(&msgs, true, &ChatContext::default()).is_ok()
        }),
    });
    t.push(Target {
        name: "jsonl",
        seeds: vec![JSONL.as_bytes().to_vec(), JSONL_OTHER.as_bytes().to_vec()],
        text: true,
        run: Box::new(|b, _| {
            use qlora_webgpu::data::dataset::{Dataset, Format};
            let Ok(d) = Dataset::from_jsonl("d.jsonl", b, Format::Auto) else { return false };
            let _ = d.len();
            true
        }),
    });
    t.push(Target {
        name: "toml",
        seeds: vec![TOML.as_bytes().to_vec()],
        text: true,
        run: Box::new(|b, _| {
            let Ok(s) = std::str::from_utf8(b) else { return false };
            match toml::from_str::<toml::Table>(s) {
                Ok(t) => serde_json::to_value(t).is_ok(),
                Err(e) => {
                    let _ = qlora_webgpu::error::quote(e.message());
                    false
                }
            }
        }),
    });
    let ad_st2 = ad_st.clone();
    let ad_cfg2 = ad_cfg.clone();
    t.push(Target {
        name: "peft_adapter",
        seeds: vec![ad_st.clone(), ad_cfg.as_bytes().to_vec()],
        text: false,
        run: Box::new(move |b, which| {
            let m = mini_llama();
            let r = if which == 0 {
                qlora_webgpu::lora::peft::host_adapter_from_bytes(&ad_cfg2, b, &m, "a")
            } else {
                let Ok(s) = std::str::from_utf8(b) else { return false };
                qlora_webgpu::lora::peft::host_adapter_from_bytes(s, &ad_st2, &m, "a")
            };
            r.is_ok()
        }),
    });
    t.push(Target {
        name: "bnb_4bit",
        seeds: vec![mini_bnb()],
        text: false,
        run: Box::new(|b, _| {
            let Ok(s) = safetensors::SafeTensors::deserialize(b) else { return false };
            qlora_webgpu::io::bnb::read_all_bnb_nf4("q.safetensors", &s).is_ok()
        }),
    });
    let ck2 = ck.clone();
    t.push(Target {
        name: "checkpoint",
        seeds: ck.iter().map(|(_, b)| b.clone()).collect(),
        text: false,
        run: Box::new(move |b, which| {
            let mut files = ck2.clone();
            files[which].1 = b.to_vec();
            let manifest = qlora_webgpu::train::checkpoint::manifest_bytes(&files, &serde_json::Value::Null);
            let _ = qlora_webgpu::train::checkpoint::verify_manifest(&files, &manifest, "ck");
            qlora_webgpu::train::checkpoint::Checkpoint::from_files(&files, &mini_llama(), "ck").is_ok()
        }),
    });
    t
}

