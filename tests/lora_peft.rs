//! LoRA adapters against PEFT's own files (tests/fixtures/tiny-llama/dev, written by PEFT 0.21.2
//! for a tiny Llama: hidden 64, intermediate 160, 2 layers, r 8, alpha 16, the seven
//! projections, init_lora_weights False):
//! - the reference adapter loads with the right shapes and bit-identical values, survives an
//!   upload / download round trip through the GPU, and is written back byte for byte;
//! - what we write for the reference's LoraConfig has PEFT's exact config fields and key set,
//!   shapes and dtypes;
//! - bad adapters and bad configs are errors that name the file and the key / field;
//! - PEFT's module matching (lists, regexes, rank/alpha patterns, excludes, layer filters);
//! - initialization distributions and seeded repeatability;
//! - merging (f64 oracle, NF4 base from bitsandbytes' files) and f16/bf16 round-to-nearest-even.

mod common;
use common::*;
use qlora_webgpu::gpu::block_on;
use qlora_webgpu::lora::kaiming_bound;
use qlora_webgpu::lora::regex::regex_matches;
use qlora_webgpu::lora::merge::{
    hf_weight_name, merge_adapter, merge_weight, merged_folder,
    to_safetensors, BaseTensor, HostTensor, OutDtype,
};
use qlora_webgpu::lora::peft::{self, config_from_json, config_to_json, host_adapter_from_bytes, host_adapter_to_bytes};
use qlora_webgpu::lora::{self, init_host_adapter, module_name, peft_key, HostAdapter, HostLora, InitLoraWeights, LoraConfig, TargetModules};
use qlora_webgpu::model::llama::TARGETS;
use qlora_webgpu::io::half::{bf16_to_f32, f16_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use qlora_webgpu::io::safetensors_write::{serialize_tensors, RawTensor};
use qlora_webgpu::io::bnb::read_bnb_nf4;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

fn text(rel: &str) -> String {
    String::from_utf8(tiny_llama_fixture(rel)).unwrap()
}

/// The reference run's LoraConfig: r 8, alpha 16, the seven projections, dropout 0,
/// init_lora_weights False.
fn reference_config() -> LoraConfig {
    LoraConfig { init_lora_weights: InitLoraWeights::NoInit, ..LoraConfig::new(8, 16.0) }
}

fn err_of<T>(r: qlora_webgpu::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn reference_raw() -> Vec<RawTensor> {
    let st = tiny_llama_fixture("dev/adapter_init/adapter_model.safetensors");
    let t = SafeTensors::deserialize(&st).unwrap();
    let mut v: Vec<RawTensor> = t
        .tensors()
        .into_iter()
        .map(|(name, view)| RawTensor { name, dtype: view.dtype(), shape: view.shape().to_vec(), data: view.data().to_vec() })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn load_reference() -> HostAdapter {
    host_adapter_from_bytes(
        &text("dev/adapter_init/adapter_config.json"),
        &tiny_llama_fixture("dev/adapter_init/adapter_model.safetensors"),
        &tiny_llama_config(),
        "dev/adapter_init",
    )
    .unwrap()
}

#[test]
fn reference_adapter_loads_with_peft_shapes_and_exact_values() {
    let h = load_reference();
    let c = &h.config;
    assert_eq!((c.r, c.lora_alpha, c.lora_dropout, c.use_rslora), (8, 16.0, 0.0, false));
    assert_eq!(c.init_lora_weights, InitLoraWeights::NoInit);
    assert_eq!(c.bias, "none");
    assert_eq!(c.task_type.as_deref(), Some("CAUSAL_LM"));
    let m = tiny_llama_config();
    assert_eq!(c.targets(&m).unwrap(), vec![[true; 7]; 2]);
    let st = tiny_llama_fixture("dev/adapter_init/adapter_model.safetensors");
    let file = SafeTensors::deserialize(&st).unwrap();
    assert_eq!(file.len(), 28);
    for l in 0..2 {
        for mi in 0..7 {
            let x = h.layers[l][mi].as_ref().unwrap();
            let (out, inp) = m.proj_shape(mi);
            assert_eq!((x.r, x.in_features, x.out_features), (8, inp, out), "{}", module_name(l, mi));
            for (b, got) in [(false, &x.a), (true, &x.b)] {
                let view = file.tensor(&peft_key(l, mi, b)).unwrap();
                assert_eq!(view.shape(), if b { vec![out, 8] } else { vec![8, inp] });
                let want = f32s(view.data());
                assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "{}", peft_key(l, mi, b));
            }
        }
    }
    // init_lora_weights=False: A ~ U(±1/√in), B ~ U(±1/√r) (torch's nn.Linear default), so the
    // reference values lie within those bounds and B is not zero.
    for l in 0..2 {
        for mi in 0..7 {
            let x = h.layers[l][mi].as_ref().unwrap();
            let (ba, bb) = (kaiming_bound(x.in_features) as f32, kaiming_bound(8) as f32);
            assert!(x.a.iter().all(|v| v.abs() <= ba) && x.b.iter().all(|v| v.abs() <= bb));
            assert!(x.b.iter().any(|&v| v != 0.0));
        }
    }
}

#[test]
fn reference_adapter_round_trips_through_the_gpu_byte_for_byte() {
    let ctx = gpu();
    let cfg_text = text("dev/adapter_init/adapter_config.json");
    let st = tiny_llama_fixture("dev/adapter_init/adapter_model.safetensors");
    let (cfg, set) = peft::adapter_from_bytes(&ctx, &cfg_text, &st, &tiny_llama_config(), "dev/adapter_init").unwrap();
    assert_eq!(set.params().len(), 28);
    let scale = set.layers[1][6].as_ref().unwrap().run.scale;
    assert_eq!(scale, 2.0, "alpha 16 / r 8");
    let (json, bytes) = block_on(peft::adapter_to_bytes(&ctx, &cfg, &tiny_llama_config(), &set)).unwrap();
    // Our file is PEFT's plus the per-tensor SHA-256 in the metadata (issue 12).
    assert!(bytes != st && peft::strip_checksum(&bytes) == st, "adapter_model.safetensors differs from PEFT's after load -> GPU -> save");
    // PEFT keeps target_modules as a set; the file's order comes back as read, so the text is
    // identical too.
    assert_eq!(json, cfg_text);
}

#[test]
fn written_config_has_pefts_fields_field_by_field() {
    let reference = text("dev/adapter_init/adapter_config.json");
    let want: Value = serde_json::from_str(&reference).unwrap();
    let ours = config_to_json(&reference_config());
    let got: Value = serde_json::from_str(&ours).unwrap();
    let (w, g) = (want.as_object().unwrap(), got.as_object().unwrap());
    assert_eq!(w.keys().collect::<Vec<_>>(), g.keys().collect::<Vec<_>>(), "field list");
    // Run-specific fields: base_model_name_or_path and revision (where the base model came from;
    // null in the reference, which built its model from a config, and null for ours); they are
    // compared too, being equal here. target_modules is a Python set in PEFT: compared as a set.
    for (k, v) in w {
        if k == "target_modules" {
            let set = |v: &Value| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect::<BTreeSet<_>>();
            assert_eq!(set(v), set(&g[k]), "target_modules");
            assert_eq!(set(v), TARGETS.iter().map(|s| s.to_string()).collect());
        } else {
            assert_eq!(v, &g[k], "field {k}");
        }
    }
    // Same bytes as PEFT (json.dumps(indent=2, sort_keys=True), no final newline) once the
    // target list is given in the reference's set order.
    let order = ["gate_proj", "v_proj", "o_proj", "k_proj", "up_proj", "down_proj", "q_proj"];
    let cfg = LoraConfig { target_modules: TargetModules::Names(order.iter().map(|s| s.to_string()).collect()), ..reference_config() };
    assert_eq!(config_to_json(&cfg), reference);
    // Reading the reference gives that config back.
    assert_eq!(config_from_json(&reference, "adapter_config.json").unwrap(), cfg);
}

#[test]
fn written_weights_have_pefts_keys_shapes_and_dtypes() {
    let h = init_host_adapter(&tiny_llama_config(), &reference_config(), 7).unwrap();
    let (_, bytes) = host_adapter_to_bytes(&h, &tiny_llama_config()).unwrap();
    let ours = SafeTensors::deserialize(&bytes).unwrap();
    let theirs = reference_raw();
    let mut names = ours.names();
    names.sort();
    assert_eq!(names, theirs.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
    for t in &theirs {
        let v = ours.tensor(&t.name).unwrap();
        assert_eq!((v.dtype(), v.shape()), (t.dtype, t.shape.as_slice()), "{}", t.name);
        assert_eq!(v.dtype(), Dtype::F32);
    }
    let bytes = peft::strip_checksum(&bytes);
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let (_, ref_meta) = SafeTensors::read_metadata(&tiny_llama_fixture("dev/adapter_init/adapter_model.safetensors")).unwrap();
    assert_eq!(meta.metadata(), ref_meta.metadata(), "__metadata__ ({{\"format\": \"pt\"}})");
}

#[test]
fn adapter_final_loads_and_half_precision_adapters_convert() {
    let fin = host_adapter_from_bytes(
        &text("dev/adapter_final/adapter_config.json"),
        &tiny_llama_fixture("dev/adapter_final/adapter_model.safetensors"),
        &tiny_llama_config(),
        "dev/adapter_final",
    )
    .unwrap();
    assert_ne!(fin.layers, load_reference().layers, "20 AdamW steps changed the adapter");
    // The same adapter stored as bf16 and as f16: read back as the exact f32 of each half value.
    for (dt, to, back) in [
        (Dtype::BF16, f32_to_bf16_bits as fn(f32) -> u16, bf16_to_f32 as fn(u16) -> f32),
        (Dtype::F16, f32_to_f16_bits, f16_to_f32),
    ] {
        let raw: Vec<RawTensor> = reference_raw()
            .into_iter()
            .map(|t| RawTensor { dtype: dt, data: f32s(&t.data).iter().flat_map(|&v| to(v).to_le_bytes()).collect(), ..t })
            .collect();
        let st = serialize_tensors(&raw, None).unwrap();
        let h = host_adapter_from_bytes(&text("dev/adapter_init/adapter_config.json"), &st, &tiny_llama_config(), "half").unwrap();
        let r = load_reference();
        for l in 0..2 {
            for mi in 0..7 {
                let (g, w) = (h.layers[l][mi].as_ref().unwrap(), r.layers[l][mi].as_ref().unwrap());
                for (gv, wv) in g.a.iter().chain(&g.b).zip(w.a.iter().chain(&w.b)) {
                    assert_eq!(gv.to_bits(), back(to(*wv)).to_bits(), "{dt:?}");
                }
            }
        }
    }
}

fn with_raw(edit: impl FnOnce(&mut Vec<RawTensor>)) -> Vec<u8> {
    let mut raw = reference_raw();
    edit(&mut raw);
    serialize_tensors(&raw, None).unwrap()
}

#[test]
fn bad_adapters_are_errors_naming_file_and_key() {
    let cfg = text("dev/adapter_init/adapter_config.json");
    let model = tiny_llama_config();
    let load = |st: &[u8]| err_of(host_adapter_from_bytes(&cfg, st, &model, "dev/adapter_init"));
    let file = "dev/adapter_init/adapter_model.safetensors";
    let key = peft_key(1, 2, false);

    let e = load(&with_raw(|r| r.retain(|t| t.name != key)));
    assert!(e.contains(file) && e.contains(&key) && e.contains("missing"), "{e}");

    let e = load(&with_raw(|r| {
        let t = r.iter_mut().find(|t| t.name == key).unwrap();
        t.shape = vec![64, 8];
    }));
    assert!(e.contains(file) && e.contains(&key) && e.contains("[64, 8]") && e.contains("[8, 64]"), "{e}");

    let e = load(&with_raw(|r| {
        let t = r.iter_mut().find(|t| t.name == key).unwrap();
        t.dtype = Dtype::I32;
    }));
    assert!(e.contains(file) && e.contains(&key) && e.contains("I32"), "{e}");

    let extra = "base_model.model.lm_head.lora_A.weight";
    let e = load(&with_raw(|r| r.push(RawTensor { name: extra.into(), dtype: Dtype::F32, shape: vec![1], data: vec![0; 4] })));
    assert!(e.contains(file) && e.contains(extra) && e.contains("unexpected"), "{e}");

    // A layer the model does not have.
    let beyond = peft_key(2, 0, false);
    let e = load(&with_raw(|r| r.push(RawTensor { name: beyond.clone(), dtype: Dtype::F32, shape: vec![8, 64], data: vec![0; 2048] })));
    assert!(e.contains(file) && e.contains(&beyond), "{e}");

    assert!(load(b"not a safetensors file").contains(file));

    // An unknown module in the config: the error names the config file, the module, and lists
    // the model's modules.
    let bad = cfg.replace("\"q_proj\"", "\"qkv_proj\"");
    let e = err_of(host_adapter_from_bytes(&bad, &tiny_llama_fixture("dev/adapter_init/adapter_model.safetensors"), &model, "dev/adapter_init"));
    assert!(e.contains("dev/adapter_init/adapter_config.json") && e.contains("qkv_proj") && e.contains("gate_proj, up_proj, down_proj"), "{e}");

    // Features we do not implement are refused, naming the field.
    // use_dora with a plain LoRA weights file: the missing magnitude is named.
    let dora = cfg.replace("\"use_dora\": false", "\"use_dora\": true");
    assert_ne!(dora, cfg);
    let e = err_of(host_adapter_from_bytes(&dora, &tiny_llama_fixture("dev/adapter_init/adapter_model.safetensors"), &model, "dev/adapter_init"));
    assert!(e.contains("lora_magnitude_vector") && e.contains("use_dora"), "{e}");
    for (field, value) in [("fan_in_fan_out", "true"), ("lora_bias", "true"), ("init_lora_weights", "\"pissa\"")] {
        let pat = format!("\"{field}\": ");
        let start = cfg.find(&pat).unwrap() + pat.len();
        let end = start + cfg[start..].find(',').unwrap();
        let bad = format!("{}{value}{}", &cfg[..start], &cfg[end..]);
        let e = err_of(config_from_json(&bad, "x/adapter_config.json"));
        assert!(e.contains("x/adapter_config.json") && e.contains(field), "{field}: {e}");
    }
    let e = err_of(config_from_json(&cfg.replace("\"LORA\"", "\"IA3\""), "x/adapter_config.json"));
    assert!(e.contains("peft_type"), "{e}");
    assert!(err_of(config_from_json("{not json", "x/adapter_config.json")).contains("x/adapter_config.json"));
}

#[test]
fn config_validation_errors_are_clear() {
    let m = tiny_llama_config();
    let check = |c: LoraConfig, needle: &str| {
        let e = err_of(c.targets(&m));
        assert!(e.contains(needle), "want {needle:?} in: {e}");
    };
    check(LoraConfig { r: 0, ..LoraConfig::default() }, "r must be a positive integer");
    for p in [1.0, -0.1, f64::NAN, 1.5] {
        check(LoraConfig { lora_dropout: p, ..LoraConfig::default() }, "lora_dropout must be in [0, 1)");
    }
    check(LoraConfig { target_modules: TargetModules::Names(vec![]), ..LoraConfig::default() }, "target_modules is empty");
    let e = err_of(LoraConfig { target_modules: TargetModules::Names(vec!["q_proj".into(), "qkv".into()]), ..LoraConfig::default() }.targets(&m));
    assert!(e.contains("\"qkv\"") && e.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj") && e.contains("lm_head"), "{e}");
    for non_linear in ["lm_head", "embed_tokens", "self_attn", "input_layernorm", "layers"] {
        check(LoraConfig { target_modules: TargetModules::Names(vec![non_linear.into()]), ..LoraConfig::default() }, "cannot carry a LoRA adapter");
    }
    check(LoraConfig { target_modules: TargetModules::Regex(".*proj(".into()), ..LoraConfig::default() }, "missing )");
    check(LoraConfig { target_modules: TargetModules::Regex(".*(?=q)".into()), ..LoraConfig::default() }, "not supported");
    check(LoraConfig { target_modules: TargetModules::Regex(".*\\.qkv".into()), ..LoraConfig::default() }, "matches no module");
    // A regex that also matches a non-Linear module is refused (PEFT: "Target module ... is not
    // supported").
    check(LoraConfig { target_modules: TargetModules::Regex(r"model\.layers\.1\.mlp\..*".into()), ..LoraConfig::default() }, "act_fn");
    check(LoraConfig { bias: "all".into(), ..LoraConfig::default() }, "bias");
    check(LoraConfig { modules_to_save: Some(vec!["lm_head".into()]), ..LoraConfig::default() }, "modules_to_save");
    check(LoraConfig { rank_pattern: vec![("q_proj".into(), 0)], ..LoraConfig::default() }, "rank_pattern");
    check(LoraConfig { layers_to_transform: Some(vec![5]), ..LoraConfig::default() }, "layers_to_transform");
    check(
        LoraConfig { exclude_modules: Some(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])), ..LoraConfig::default() },
        "no module is targeted",
    );
    check(LoraConfig { lora_alpha: f64::INFINITY, ..LoraConfig::default() }, "lora_alpha");
}

#[test]
fn module_matching_follows_peft() {
    let m = tiny_llama_config();
    let names = |v: &[&str]| TargetModules::Names(v.iter().map(|s| s.to_string()).collect());
    let t = |c: LoraConfig| c.targets(&m).unwrap();
    // Suffix match on a dot boundary, exact names, all-linear, PEFT's llama default (q, v).
    assert_eq!(t(LoraConfig::default()), vec![[true, false, true, false, false, false, false]; 2]);
    assert_eq!(t(LoraConfig { target_modules: TargetModules::AllLinear, ..Default::default() }), vec![[true; 7]; 2]);
    assert_eq!(
        t(LoraConfig { target_modules: names(&["mlp.down_proj", "model.layers.1.self_attn.o_proj"]), ..Default::default() }),
        vec![[false, false, false, false, false, false, true], [false, false, false, true, false, false, true]]
    );
    // Regex: full match of the module name.
    assert_eq!(
        t(LoraConfig { target_modules: TargetModules::Regex(r".*\.(q_proj|v_proj)".into()), ..Default::default() }),
        vec![[true, false, true, false, false, false, false]; 2]
    );
    assert_eq!(
        t(LoraConfig { target_modules: TargetModules::Regex(r"model\.layers\.[1-9]\d*\.mlp\..*_proj".into()), ..Default::default() }),
        vec![[false; 7], [false, false, false, false, true, true, true]]
    );
    // layers_to_transform, exclude_modules.
    assert_eq!(
        t(LoraConfig { target_modules: TargetModules::AllLinear, layers_to_transform: Some(vec![1]), ..Default::default() }),
        vec![[false; 7], [true; 7]]
    );
    assert_eq!(
        t(LoraConfig {
            target_modules: TargetModules::AllLinear,
            exclude_modules: Some(names(&["mlp.gate_proj", "layers.0.self_attn.k_proj"])),
            ..Default::default()
        }),
        vec![[true, false, true, true, false, true, true], [true, true, true, true, false, true, true]]
    );
    // rank_pattern / alpha_pattern: first key k (in order) with re.match(r"(.*\.)?(k)$", name).
    let c = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        rank_pattern: vec![("layers.1.mlp.down_proj".into(), 2), ("down_proj".into(), 4), ("q".into(), 64)],
        alpha_pattern: vec![(r"model\.layers\.0\..*_proj".into(), 32.0)],
        target_modules: TargetModules::AllLinear,
        ..Default::default()
    };
    assert_eq!(c.rank_for(&module_name(1, 6)), 2);
    assert_eq!(c.rank_for(&module_name(0, 6)), 4);
    assert_eq!(c.rank_for(&module_name(0, 0)), 8, "\"q\" is not a whole name component of q_proj");
    assert_eq!(c.alpha_for(&module_name(0, 3)), 32.0);
    assert_eq!(c.alpha_for(&module_name(1, 3)), 16.0);
    assert_eq!(c.scale_for(&module_name(0, 6)), 8.0, "alpha 32 / r 4");
    assert_eq!(c.scale_for(&module_name(1, 0)), 2.0);
    let rs = LoraConfig { use_rslora: true, ..c.clone() };
    assert_eq!(rs.scale_for_f64(&module_name(1, 6)), 16.0 / 2f64.sqrt());
    // PEFT saves the patterns with sorted keys, so "down_proj" would come first on reading and
    // give layer 1's down_proj rank 4: writing such an ambiguous config is refused.
    let h = init_host_adapter(&m, &c, 1).unwrap();
    assert_eq!(h.layers[1][6].as_ref().unwrap().a.len(), 2 * 160);
    let e = err_of(host_adapter_to_bytes(&h, &m));
    assert!(e.contains("model.layers.1.mlp.down_proj") && e.contains("sorted"), "{e}");
    // With keys that match disjoint modules the ranks carry into the file and read back.
    let c = LoraConfig {
        rank_pattern: vec![("layers.1.mlp.down_proj".into(), 2), ("layers.0.mlp.down_proj".into(), 4)],
        ..c
    };
    let h = init_host_adapter(&m, &c, 1).unwrap();
    let (json, st) = host_adapter_to_bytes(&h, &m).unwrap();
    let back = host_adapter_from_bytes(&json, &st, &m, "patterns").unwrap();
    assert_eq!(back.layers, h.layers);
    assert_eq!(back.config.rank_for(&module_name(1, 6)), 2);
    assert_eq!(back.config.alpha_for(&module_name(0, 0)), 32.0);
}

#[test]
fn regex_subset_agrees_with_python() {
    // (pattern, string, re.fullmatch, re.match), as Python's `re` answers them.
    let cases: &[(&str, &str, bool, bool)] = &[
        (r".*\.q_proj", "model.layers.0.self_attn.q_proj", true, true),
        (r".*\.q_proj", "model.layers.0.self_attn.q_proj_x", false, true),
        (r"(.*\.)?(q_proj)$", "q_proj", true, true),
        (r"(.*\.)?(proj)$", "model.layers.0.self_attn.q_proj", false, false),
        (r"(.*\.)?(layers\.1\.mlp\.down_proj)$", "model.layers.1.mlp.down_proj", true, true),
        (r"model\.layers\.\d+\.mlp\.(gate|up)_proj", "model.layers.12.mlp.up_proj", true, true),
        (r"model\.layers\.\d{2}\.mlp.*", "model.layers.3.mlp.up_proj", false, false),
        (r"a{2,3}", "aaa", true, true),
        (r"a{2,3}", "aaaa", false, true),
        (r"a{,2}b", "aab", true, true),
        (r"a{x}", "a{x}", true, true),
        (r"[^.]+", "layers", true, true),
        (r"[^.]+", "model.layers", false, true),
        (r"(a|ab)(c|bcd)(d*)", "abcd", true, true),
        (r"x*?y", "xxy", true, true),
        (r"^model\..*", "model.norm", true, true),
        (r"(?:q|k)_proj", "k_proj", true, true),
        (r"\w+\.\w+", "mlp.act_fn", true, true),
        (r"(a*)*b", "aaaaaaaaaaaac", false, false),
    ];
    for &(p, s, full, start) in cases {
        assert_eq!(regex_matches(p, s).unwrap(), (full, start), "{p:?} on {s:?}");
    }
    for bad in [r"(?P<x>a)", r"\1", r"a**", r"[a-", r"(a", r"a)", r"*a", r"\b"] {
        assert!(regex_matches(bad, "a").is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn init_distributions_and_seeded_repeatability() {
    let m = tiny_llama_config();
    let cfg = LoraConfig::new(8, 16.0);
    let h = init_host_adapter(&m, &cfg, 42).unwrap();
    assert_eq!(h, init_host_adapter(&m, &cfg, 42).unwrap(), "same seed, same values");
    assert_ne!(h.layers, init_host_adapter(&m, &cfg, 43).unwrap().layers);
    // Default init: A ~ U(±1/√in) (kaiming_uniform_(a=√5)), B = 0. Over all A values (in = 64
    // or 160) the mean of x·√in is ~0 and its variance 1/3 (U(−1, 1)), within 5 standard errors.
    let mut scaled = Vec::new();
    for l in 0..2 {
        for mi in 0..7 {
            let x = h.layers[l][mi].as_ref().unwrap();
            let bound = kaiming_bound(x.in_features);
            assert!(x.a.iter().all(|&v| (v as f64).abs() <= bound));
            assert!(x.b.iter().all(|&v| v == 0.0));
            scaled.extend(x.a.iter().map(|&v| v as f64 / bound));
        }
    }
    let n = scaled.len() as f64;
    let mean = scaled.iter().sum::<f64>() / n;
    let var = scaled.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 5.0 * (1.0 / 3.0 / n).sqrt(), "mean {mean}");
    assert!((var - 1.0 / 3.0).abs() < 5.0 * (4.0 / 45.0 / n).sqrt(), "variance {var}");
    assert!(scaled.iter().any(|&v| v > 0.99) && scaled.iter().any(|&v| v < -0.99), "the range is used");

    // init_lora_weights False: B ~ U(±1/√r) too.
    let h = init_host_adapter(&m, &reference_config(), 7).unwrap();
    let b: Vec<f64> = h.layers.iter().flatten().flatten().flat_map(|x| x.b.iter().map(|&v| v as f64)).collect();
    assert!(b.iter().all(|v| v.abs() <= kaiming_bound(8)) && b.iter().any(|&v| v.abs() > 0.3));
    // Gaussian: A ~ N(0, σ = 1/r).
    let g = init_host_adapter(&m, &LoraConfig { init_lora_weights: InitLoraWeights::Gaussian, r: 4, ..LoraConfig::new(4, 8.0) }, 3).unwrap();
    let a: Vec<f64> = g.layers.iter().flatten().flatten().flat_map(|x| x.a.iter().map(|&v| v as f64 * 4.0)).collect();
    let n = a.len() as f64;
    let var = a.iter().map(|v| v * v).sum::<f64>() / n;
    assert!((var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "variance of A·r {var}");
    // Streams per matrix: a module's values do not depend on which others are targeted.
    let only_down = init_host_adapter(&m, &LoraConfig { target_modules: TargetModules::Names(vec!["down_proj".into()]), ..cfg.clone() }, 42).unwrap();
    assert_eq!(only_down.layers[1][6], init_host_adapter(&m, &cfg, 42).unwrap().layers[1][6]);
    // Orthogonal init is recognized but not implemented for new adapters.
    assert!(init_host_adapter(&m, &LoraConfig { init_lora_weights: InitLoraWeights::Orthogonal, ..cfg }, 1).is_err());
}

#[test]
fn init_on_the_gpu_downloads_to_the_host_init() {
    let ctx = gpu();
    let m = tiny_llama_config();
    let cfg = LoraConfig::new(4, 8.0);
    let set = lora::init_lora_set(&ctx, &m, &cfg, 9).unwrap();
    let got = block_on(HostAdapter::download(&ctx, &cfg, &set)).unwrap();
    assert_eq!(got, init_host_adapter(&m, &cfg, 9).unwrap());
    for p in set.params() {
        let (l, mi, b) = lora::param_of(p.id);
        assert_eq!(lora::param_id(l, mi, b), p.id);
    }
}

#[test]
fn native_save_and_load_write_pefts_folder() {
    let ctx = gpu();
    let m = tiny_llama_config();
    let (cfg, set) = peft::adapter_from_bytes(
        &ctx,
        &text("dev/adapter_init/adapter_config.json"),
        &tiny_llama_fixture("dev/adapter_init/adapter_model.safetensors"),
        &m,
        "dev/adapter_init",
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("qlora-lora-peft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    peft::save_adapter(&ctx, &dir, &cfg, &m, &set).unwrap();
    assert_eq!(peft::strip_checksum(&std::fs::read(dir.join("adapter_model.safetensors")).unwrap()), tiny_llama_fixture("dev/adapter_init/adapter_model.safetensors"));
    assert!(!dir.join("adapter_model.safetensors.tmp").exists());
    let (cfg2, set2) = peft::load_adapter(&ctx, &dir, &m).unwrap();
    assert_eq!(cfg2, cfg);
    assert_eq!(block_on(HostAdapter::download(&ctx, &cfg2, &set2)).unwrap(), load_reference());
    let e = err_of(peft::load_adapter(&ctx, &dir.join("nope"), &m));
    assert!(e.contains("nope") && e.contains("adapter_config.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Half an ulp of f32 at |x| (the largest error of one round-to-nearest).
fn half_ulp(x: f32) -> f64 {
    let a = x.abs();
    (f32::from_bits(a.to_bits() + 1) as f64 - a as f64) / 2.0
}

#[test]
fn merge_equals_w0_plus_s_b_a_in_f64() {
    let mut rng = Rng::new(5);
    for &(out, inp, r, s) in &[(1, 1, 1, 2.0), (3, 5, 2, 0.5), (64, 160, 8, 2.0), (33, 65, 16, 16.0 / 4.0)] {
        let lora = HostLora {
            r,
            in_features: inp,
            out_features: out,
            a: rng.vec(r * inp, 0.1).iter().map(|&v| v as f32).collect(),
            b: rng.vec(out * r, 0.1).iter().map(|&v| v as f32).collect(),
            magnitude: None,
        };
        let w0: Vec<f32> = rng.vec(out * inp, 0.02).iter().map(|&v| v as f32).collect();
        let got = merge_weight(&w0, &lora, s).unwrap();
        let mut worst = 0f64;
        for i in 0..out {
            for j in 0..inp {
                let d: f64 = (0..r).map(|k| lora.b[i * r + k] as f64 * lora.a[k * inp + j] as f64).sum();
                let want = w0[i * inp + j] as f64 + s * d;
                let g = got[i * inp + j];
                let err = (g as f64 - want).abs();
                assert!(err <= half_ulp(g) * (1.0 + 1e-9), "({out},{inp},{r}) [{i},{j}]: {g} vs {want}");
                worst = worst.max(err / half_ulp(g));
            }
        }
        eprintln!("merge {out}x{inp} r {r}: max error {worst:.3} half-ulps");
    }
    let bad = HostLora { r: 2, in_features: 3, out_features: 4, a: vec![0.0; 6], b: vec![0.0; 7], magnitude: None };
    assert!(merge_weight(&[0.0; 12], &bad, 1.0).is_err());
}

#[test]
fn merge_into_the_nf4_base_dequantizes_first() {
    // The QLoRA reference's NF4 base (bitsandbytes' files) with the trained adapter_final.
    let m = tiny_llama_config();
    let adapter = host_adapter_from_bytes(
        &text("dev/adapter_final/adapter_config.json"),
        &tiny_llama_fixture("dev/adapter_final/adapter_model.safetensors"),
        &m,
        "dev/adapter_final",
    )
    .unwrap();
    let bytes = tiny_llama_fixture("dev_qlora/base_nf4_weights.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut base = Vec::new();
    let mut dequantized = HashMap::new();
    for l in 0..2 {
        for mi in 0..7 {
            let name = hf_weight_name(l, mi);
            let q = read_bnb_nf4("base_nf4_weights.safetensors", &st, &name).unwrap();
            dequantized.insert(name.clone(), f32s(st.tensor(&format!("{name}.dequantized")).unwrap().data()));
            base.push((name, BaseTensor::Nf4(q)));
        }
    }
    let norm = HostTensor { shape: vec![64], data: (0..64).map(|i| 1.0 + i as f32 / 64.0).collect() };
    base.push(("model.norm.weight".into(), BaseTensor::Dense(norm.clone())));
    let merged = merge_adapter(&base, &adapter, &m).unwrap();
    assert_eq!(merged.len(), 15);
    assert_eq!(merged[14], ("model.norm.weight".to_string(), norm), "untargeted tensors pass through unchanged");
    for (name, t) in &merged[..14] {
        let l: usize = name.split('.').nth(2).unwrap().parse().unwrap();
        let mi = TARGETS.iter().position(|p| name.contains(p)).unwrap();
        let x = adapter.layers[l][mi].as_ref().unwrap();
        let w0 = &dequantized[name];
        for i in 0..x.out_features {
            for j in 0..x.in_features {
                let d: f64 = (0..8).map(|k| x.b[i * 8 + k] as f64 * x.a[k * x.in_features + j] as f64).sum();
                let want = w0[i * x.in_features + j] as f64 + 2.0 * d;
                let g = t.data[i * x.in_features + j];
                assert!((g as f64 - want).abs() <= half_ulp(g) * (1.0 + 1e-9), "{name}[{i},{j}]");
            }
        }
    }
    // A targeted weight missing from the base is an error naming it.
    let e = err_of(merge_adapter(&base[1..], &adapter, &m));
    assert!(e.contains(&hf_weight_name(0, 0)), "{e}");
}

#[test]
fn half_precision_conversion_rounds_to_nearest_even() {
    for (name, to, back, max_finite) in [
        ("f16", f32_to_f16_bits as fn(f32) -> u16, f16_to_f32 as fn(u16) -> f32, 0x7BFFu16),
        ("bf16", f32_to_bf16_bits, bf16_to_f32, 0x7F7F),
    ] {
        // Every half value converts back to itself (NaNs stay NaN).
        for h in 0..=u16::MAX {
            let x = back(h);
            if x.is_nan() {
                assert!(back(to(x)).is_nan());
            } else {
                assert_eq!(to(x), h, "{name} {h:#06x} ({x})");
            }
        }
        // Midpoints between neighbours (exact in f32) go to the even one; a hair off goes to
        // the nearer one.
        for h in 0..max_finite {
            let (lo, hi) = (back(h) as f64, back(h + 1) as f64);
            let mid = ((lo + hi) / 2.0) as f32;
            assert_eq!(mid as f64, (lo + hi) / 2.0, "{name}: midpoint exact in f32");
            let even = if h % 2 == 0 { h } else { h + 1 };
            assert_eq!(to(mid), even, "{name} tie between {h:#06x} and {:#06x}", h + 1);
            assert_eq!(to(-mid), even | 0x8000);
            let up = f32::from_bits(mid.to_bits() + 1);
            let down = f32::from_bits(mid.to_bits() - 1);
            if mid > 0.0 && down > 0.0 {
                assert_eq!((to(down), to(up)), (h, h + 1), "{name} near {h:#06x}");
            }
        }
        // Random values: the result is a nearest half value.
        let mut rng = Rng::new(11);
        for _ in 0..20000 {
            let x = (rng.normal() * 10f64.powi(rng.below(12) as i32 - 6)) as f32;
            if x.abs() >= back(max_finite) {
                continue;
            }
            let h = to(x);
            let e = (back(h) as f64 - x as f64).abs();
            for n in [h.wrapping_sub(1), h.wrapping_add(1)] {
                let v = back(n) as f64;
                if (n & 0x7FFF) <= max_finite && (n ^ h) & 0x8000 == 0 {
                    assert!(e <= (v - x as f64).abs(), "{name}: {x} -> {h:#06x}, but {n:#06x} is nearer");
                }
            }
        }
    }
    assert_eq!(f32_to_f16_bits(65520.0), 0x7C00, "rounds to inf past the largest f16");
    assert_eq!(f32_to_f16_bits(65519.0), 0x7BFF);
    assert_eq!(f32_to_f16_bits(f32::INFINITY), 0x7C00);
    assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80, "rounds to inf");
    assert_eq!(f32_to_f16_bits(5.960_464_5e-8), 0x0001, "2^-24, the smallest f16 subnormal");
    assert_eq!(f32_to_f16_bits(2.980_232_2e-8), 0x0000, "2^-25 ties to even (0)");
}

#[test]
fn merged_folder_files() {
    let tensors = vec![
        ("model.layers.0.self_attn.q_proj.weight".to_string(), HostTensor { shape: vec![2, 2], data: vec![1.0, -2.5, 1.0 / 3.0, 65536.0] }),
        ("model.norm.weight".to_string(), HostTensor { shape: vec![2], data: vec![1.0, 0.5] }),
    ];
    let config = br#"{"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32", "quantization_config": {"load_in_4bit": true}, "hidden_size": 2}"#;
    let tok = (String::from("tokenizer.json"), b"{\"model\": {}}".to_vec());
    let files = merged_folder(&tensors, OutDtype::Bf16, config, std::slice::from_ref(&tok)).unwrap();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["model.safetensors", "config.json", "tokenizer.json"]);
    assert_eq!(files[2].1, tok.1, "other files are copied unchanged");
    let cfg: Value = serde_json::from_slice(&files[1].1).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert!(cfg.get("quantization_config").is_none(), "the merged model is dense");
    assert_eq!(cfg["hidden_size"], 2);
    let st = SafeTensors::deserialize(&files[0].1).unwrap();
    let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!((q.dtype(), q.shape()), (Dtype::BF16, &[2usize, 2][..]));
    let vals: Vec<f32> = q.data().chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect();
    assert_eq!(vals, [1.0, -2.5, 0.333_984_38, 65536.0]);
    let f32_file = to_safetensors(&tensors, OutDtype::F32).unwrap();
    let st = SafeTensors::deserialize(&f32_file).unwrap();
    assert_eq!(f32s(st.tensor("model.norm.weight").unwrap().data()), [1.0, 0.5]);
    assert!(merged_folder(&tensors, OutDtype::F16, config, &[("model.safetensors".into(), vec![])]).is_err());
}
