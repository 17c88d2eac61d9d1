//! A minimal GGUF v3 writer for tests, and the tiny reference Llama (a Hugging Face folder with
//! bf16 weights and tokenizer.json) written as llama.cpp's converter writes it
//! (convert_hf_to_gguf.py with `--outtype bf16`): `llama.*` metadata, `tokenizer.ggml.*` from
//! tokenizer.json, llama.cpp tensor names, matrices in BF16 and norms in F32, and the rows of
//! `attn_q` / `attn_k` permuted as the converter's `permute` does. Written from the format's
//! description, independently of src/io/gguf/. Include with
//! `#[path = "common/gguf.rs"] mod gguf;`.
#![allow(dead_code)]

use std::path::Path;

/// A metadata value (the GGUF value types these tests need).
pub enum Val {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// An array of strings.
    Strs(Vec<String>),
    /// An array of i32.
    I32s(Vec<i32>),
}

impl Val {
    fn ty(&self) -> u32 {
        match self {
            Val::U32(_) => 4,
            Val::I32(_) => 5,
            Val::F32(_) => 6,
            Val::Bool(_) => 7,
            Val::Str(_) => 8,
            Val::Strs(_) | Val::I32s(_) => 9,
        }
    }
    fn put(&self, b: &mut Vec<u8>) {
        match self {
            Val::U32(v) => b.extend(v.to_le_bytes()),
            Val::I32(v) => b.extend(v.to_le_bytes()),
            Val::F32(v) => b.extend(v.to_le_bytes()),
            Val::Bool(v) => b.push(u8::from(*v)),
            Val::Str(s) => put_str(b, s),
            Val::Strs(v) => {
                b.extend(8u32.to_le_bytes());
                b.extend((v.len() as u64).to_le_bytes());
                for s in v {
                    put_str(b, s);
                }
            }
            Val::I32s(v) => {
                b.extend(5u32.to_le_bytes());
                b.extend((v.len() as u64).to_le_bytes());
                for x in v {
                    b.extend(x.to_le_bytes());
                }
            }
        }
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// ggml type ids.
pub const F32: u32 = 0;
pub const BF16: u32 = 30;

/// A GGUF v3 file under construction (default alignment 32).
#[derive(Default)]
pub struct Writer {
    kv: Vec<(String, Val)>,
    /// (name, ggml ne (innermost first), type, bytes)
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn kv(&mut self, k: &str, v: Val) -> &mut Self {
        self.kv.push((k.into(), v));
        self
    }
    /// A tensor; `shape` in PyTorch order (outermost first), `data` its bytes in that order.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), shape.iter().rev().map(|&d| d as u64).collect(), ty, data));
        self
    }
    pub fn bytes(&self) -> Vec<u8> {
        const AL: usize = 32;
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut b, k);
            b.extend(v.ty().to_le_bytes());
            v.put(&mut b);
        }
        let mut offset = 0usize;
        for (name, ne, ty, data) in &self.tensors {
            put_str(&mut b, name);
            b.extend((ne.len() as u32).to_le_bytes());
            for d in ne {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend((offset as u64).to_le_bytes());
            offset += data.len().div_ceil(AL) * AL;
        }
        b.resize(b.len().div_ceil(AL) * AL, 0);
        for (_, _, _, data) in &self.tensors {
            b.extend(data);
            b.resize(b.len().div_ceil(AL) * AL, 0);
        }
        b
    }
}

/// llama.cpp's converter `permute(w, n_head)`: `w.reshape(n_head, 2, rows/n_head/2, cols)
/// .swapaxes(1, 2)`, so written row (h, j, s) is original row (h, s, j); rows of `row_bytes`.
pub fn converter_permute_rows(w: &[u8], rows: usize, n_head: usize) -> Vec<u8> {
    let rb = w.len() / rows;
    let hd = rows / n_head;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for j in 0..hd / 2 {
            for s in 0..2 {
                let r = h * hd + s * hd / 2 + j;
                out.extend_from_slice(&w[r * rb..(r + 1) * rb]);
            }
        }
    }
    out
}

/// bf16 bytes -> f32 bytes (exact: bf16 is the top half of an f32).
fn bf16_to_f32_bytes(b: &[u8]) -> Vec<u8> {
    b.chunks_exact(2).flat_map(|c| f32::from_bits((u32::from(c[1]) << 24) | (u32::from(c[0]) << 16)).to_le_bytes()).collect()
}

/// The GGUF of a Llama Hugging Face folder with bf16 weights and a byte-level BPE
/// tokenizer.json (the tiny reference model): what llama.cpp's converter writes with
/// `--outtype bf16` (matrices BF16, norms F32, q/k rows permuted), with tokenizer metadata
/// `gpt2` / `smollm`, tokens by id, type 3 (control) for the special added tokens and 1 for the
/// rest, merges as "a b", the special ids of tokenizer_config.json and the chat template of
/// chat_template.jinja.
pub fn llama_gguf_from_hf(dir: &Path) -> Vec<u8> {
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()));
    let cfg: serde_json::Value = serde_json::from_slice(&read("config.json")).unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap_or_else(|| panic!("config.json: {k}")) as usize;
    let (hidden, inter, layers, heads, kv, vocab) =
        (u("hidden_size"), u("intermediate_size"), u("num_hidden_layers"), u("num_attention_heads"), u("num_key_value_heads"), u("vocab_size"));
    let head_dim = cfg["head_dim"].as_u64().map_or(hidden / heads, |d| d as usize);
    let theta = cfg["rope_parameters"]["rope_theta"].as_f64().or(cfg["rope_theta"].as_f64()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], true, "this writer covers tied embeddings only");

    let tok: serde_json::Value = serde_json::from_slice(&read("tokenizer.json")).unwrap();
    let v = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); v.len()];
    for (t, id) in v {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    assert_eq!(tokens.len(), vocab);
    let mut types = vec![1i32; tokens.len()];
    let mut special_id = std::collections::HashMap::new();
    for a in tok["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        assert!(a["special"].as_bool().unwrap());
        types[id] = 3;
        special_id.insert(a["content"].as_str().unwrap().to_owned(), id as u32);
    }
    let merges: Vec<String> =
        tok["model"]["merges"].as_array().unwrap().iter().map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())).collect();
    let tc: serde_json::Value = serde_json::from_slice(&read("tokenizer_config.json")).unwrap();
    let id_of = |k: &str| special_id[tc[k].as_str().unwrap()];
    let template = String::from_utf8(read("chat_template.jinja")).unwrap();

    let mut w = Writer::new();
    w.kv("general.architecture", Val::Str("llama".into()))
        .kv("general.name", Val::Str("tiny-llama".into()))
        .kv("general.file_type", Val::U32(32)) // MOSTLY_BF16
        .kv("llama.block_count", Val::U32(layers as u32))
        .kv("llama.context_length", Val::U32(u("max_position_embeddings") as u32))
        .kv("llama.embedding_length", Val::U32(hidden as u32))
        .kv("llama.feed_forward_length", Val::U32(inter as u32))
        .kv("llama.attention.head_count", Val::U32(heads as u32))
        .kv("llama.attention.head_count_kv", Val::U32(kv as u32))
        .kv("llama.attention.key_length", Val::U32(head_dim as u32))
        .kv("llama.attention.value_length", Val::U32(head_dim as u32))
        .kv("llama.rope.freq_base", Val::F32(theta as f32))
        .kv("llama.rope.dimension_count", Val::U32(head_dim as u32))
        .kv("llama.attention.layer_norm_rms_epsilon", Val::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32))
        .kv("llama.vocab_size", Val::U32(vocab as u32))
        .kv("tokenizer.ggml.model", Val::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Val::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", Val::Strs(tokens))
        .kv("tokenizer.ggml.token_type", Val::I32s(types))
        .kv("tokenizer.ggml.merges", Val::Strs(merges))
        .kv("tokenizer.ggml.bos_token_id", Val::U32(id_of("bos_token")))
        .kv("tokenizer.ggml.eos_token_id", Val::U32(id_of("eos_token")))
        .kv("tokenizer.ggml.unknown_token_id", Val::U32(id_of("unk_token")))
        .kv("tokenizer.ggml.padding_token_id", Val::U32(id_of("pad_token")))
        .kv("tokenizer.ggml.add_bos_token", Val::Bool(false))
        .kv("tokenizer.ggml.add_space_prefix", Val::Bool(false))
        .kv("tokenizer.chat_template", Val::Str(template));

    let st_bytes = read("model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let get = |name: &str| -> (Vec<usize>, Vec<u8>) {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{name}");
        (t.shape().to_vec(), t.data().to_vec())
    };
    let (s, d) = get("model.embed_tokens.weight");
    w.tensor("token_embd.weight", &s, BF16, d);
    let proj = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    for l in 0..layers {
        let (s, d) = get(&format!("model.layers.{l}.input_layernorm.weight"));
        w.tensor(&format!("blk.{l}.attn_norm.weight"), &s, F32, bf16_to_f32_bytes(&d));
        for (hf, gg) in proj {
            let (s, mut d) = get(&format!("model.layers.{l}.{hf}.weight"));
            if gg == "attn_q" {
                d = converter_permute_rows(&d, s[0], heads);
            } else if gg == "attn_k" {
                d = converter_permute_rows(&d, s[0], kv);
            }
            w.tensor(&format!("blk.{l}.{gg}.weight"), &s, BF16, d);
        }
        let (s, d) = get(&format!("model.layers.{l}.post_attention_layernorm.weight"));
        w.tensor(&format!("blk.{l}.ffn_norm.weight"), &s, F32, bf16_to_f32_bytes(&d));
    }
    let (s, d) = get("model.norm.weight");
    w.tensor("output_norm.weight", &s, F32, bf16_to_f32_bytes(&d));
    w.bytes()
}
