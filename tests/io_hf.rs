//! Hugging Face folders, safetensors and config.json (CPU only): the tiny reference Llama
//! (tests/fixtures/tiny-llama/model, bf16, tied) loads exactly; sharded, f16 and f32 copies
//! written here load to the same tensors; bitsandbytes NF4 checkpoints keep their NF4
//! projections; every malformed input is an error naming the file and the tensor or field.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use qlora_webgpu::io::{hf, load_hf, HostModel, HostWeight, SafeTensorsFile, TensorRef};
use qlora_webgpu::model::config::{Architecture, ModelConfig, RopeScaling};
use qlora_webgpu::io::safetensors_write::{serialize_tensors, RawTensor};
use qlora_webgpu::Error;
use safetensors::Dtype;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/model")
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join(name)).expect("fixture")
}

/// The tensors of a safetensors file, read by a minimal parser written here (independent of the
/// library's): (name, dtype name, shape, bytes), in header order of offsets.
fn raw_tensors(bytes: &[u8]) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = Vec::new();
    for (name, e) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let dtype = e["dtype"].as_str().unwrap().to_owned();
        let shape = e["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let off = e["data_offsets"].as_array().unwrap();
        let (b, en) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
        out.push((name.clone(), dtype, shape, data[b..en].to_vec()));
    }
    out
}

fn dtype_of(name: &str) -> Dtype {
    match name {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "U8" => Dtype::U8,
        other => panic!("dtype {other}"),
    }
}

fn to_raw(t: &[(String, String, Vec<usize>, Vec<u8>)]) -> Vec<RawTensor> {
    t.iter()
        .map(|(n, d, s, b)| RawTensor { name: n.clone(), dtype: dtype_of(d), shape: s.clone(), data: b.clone() })
        .collect()
}

/// bf16 bits -> f32, written independently of the library: the bits are the top half of an f32.
fn bf16(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2).map(|c| f32::from_bits((u32::from(c[1]) << 24) | (u32::from(c[0]) << 16))).collect()
}

/// IEEE half -> f32 from the definition: (-1)^s 2^(e-15) (1 + m/1024), subnormal 2^-14 m/1024.
fn f16_ref(h: u16) -> f32 {
    let s = if h >> 15 == 1 { -1.0 } else { 1.0 };
    let e = i32::from((h >> 10) & 31);
    let m = f64::from(h & 1023);
    let v = if e == 0 { 2f64.powi(-14) * m / 1024.0 } else { 2f64.powi(e - 15) * (1.0 + m / 1024.0) };
    (s * v) as f32
}

fn folder(config: &[u8], files: Vec<(&str, Vec<u8>)>) -> HashMap<String, Vec<u8>> {
    let mut m: HashMap<String, Vec<u8>> = files.into_iter().map(|(n, b)| (n.to_owned(), b)).collect();
    m.insert("config.json".into(), config.to_vec());
    m
}

fn load_err(files: &HashMap<String, Vec<u8>>) -> String {
    match load_hf(files) {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            assert!(matches!(e, Error::Format { .. }), "not a format error: {e:?}");
            e.to_string()
        }
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

fn tensor_values(m: &HostModel, name: &str) -> Vec<f32> {
    m.get_f32(name).unwrap_or_else(|| panic!("no tensor {name}"))
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn tiny_llama_fixture_loads_exactly() {
    let m = hf::load_hf_dir(fixture_dir()).expect("load");
    let c = &m.config;
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size),
        (64, 160, 2, 4, 2, 16, 49152)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!((c.rms_norm_eps, c.rope_theta, c.rope_scaling.clone()), (1e-5, 10000.0, None));
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id), (Some(1), vec![2], Some(2)));
    assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    assert_eq!(c.max_position_embeddings, Some(256));
    let l = c.to_llama();
    assert_eq!((l.hidden, l.intermediate, l.layers, l.heads, l.kv_heads, l.head_dim, l.vocab), (64, 160, 2, 4, 2, 16, 49152));
    assert!(l.tied && l.rms_eps == 1e-5 && l.rope_theta == 10000.0);

    assert!(m.lm_head.is_none() && m.get("lm_head.weight").is_none());
    assert!(m.unused.is_empty(), "{:?}", m.unused);
    assert!(!m.has_nf4());
    let raw = raw_tensors(&read_fixture("model.safetensors"));
    assert_eq!(raw.len(), c.tensor_shapes().len());
    for (name, shape) in c.tensor_shapes() {
        let (_, dtype, rshape, bytes) = raw.iter().find(|t| t.0 == name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(dtype, "BF16");
        assert_eq!(rshape, &shape, "{name}");
        let TensorRef::F32(t) = m.get(&name).unwrap() else { panic!("{name} is NF4") };
        assert_eq!(t.shape, shape, "{name}");
        assert!(same_bits(&t.data, &bf16(bytes)), "{name}: values differ from bf16 -> f32");
    }
    assert_eq!(m.layers[1].proj[2].shape(), &[32, 64]);
    assert_eq!(m.embed.shape, vec![49152, 64]);

    // The same folder handed in as a map of blobs gives the same model.
    let files = folder(&read_fixture("config.json"), vec![("model.safetensors", read_fixture("model.safetensors"))]);
    assert_eq!(load_hf(&files).expect("map load"), m);
    let btree: BTreeMap<String, Vec<u8>> = files.into_iter().collect();
    assert_eq!(load_hf(&btree).expect("btree load"), m);
}

#[test]
fn sharded_checkpoint_loads_to_the_same_tensors() {
    let single = hf::load_hf_dir(fixture_dir()).unwrap();
    let raw = raw_tensors(&read_fixture("model.safetensors"));
    let (a, b) = raw.split_at(raw.len() / 2);
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let mut weight_map = serde_json::Map::new();
    for (part, file) in [(a, names[0]), (b, names[1])] {
        for t in part {
            weight_map.insert(t.0.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    let files = folder(
        &read_fixture("config.json"),
        vec![
            (names[0], serialize_tensors(&to_raw(a), None).unwrap()),
            (names[1], serialize_tensors(&to_raw(b), None).unwrap()),
            ("model.safetensors.index.json", serde_json::to_vec(&index).unwrap()),
        ],
    );
    assert_eq!(load_hf(&files).expect("sharded"), single);

    // On disk through the memory-mapped folder too.
    let dir = std::env::temp_dir().join(format!("qlora-io-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (n, bytes) in &files {
        std::fs::write(dir.join(n), bytes).unwrap();
    }
    let r = hf::load_hf_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(r.expect("sharded dir"), single);

    // An index that names a shard which is not there.
    let mut bad = files.clone();
    bad.remove(names[1]);
    let msg = load_err(&bad);
    assert_mentions(&msg, &["model.safetensors.index.json", names[1]]);

    // A tensor the index puts in a shard that does not hold it.
    let mut wm = weight_map.clone();
    wm.insert("model.norm.weight".into(), names[0].into());
    wm.insert(a[0].0.clone(), names[1].into());
    let mut bad = files.clone();
    bad.insert("model.safetensors.index.json".into(), serde_json::to_vec(&serde_json::json!({"weight_map": wm})).unwrap());
    let msg = load_err(&bad);
    assert_mentions(&msg, &["missing tensor"]);

    // A tensor absent from the weight_map.
    let mut wm = weight_map.clone();
    wm.remove("model.norm.weight");
    let mut bad = files.clone();
    bad.insert("model.safetensors.index.json".into(), serde_json::to_vec(&serde_json::json!({"weight_map": wm})).unwrap());
    let msg = load_err(&bad);
    assert_mentions(&msg, &["model.safetensors.index.json", "model.norm.weight"]);
}

#[test]
fn f32_and_f16_checkpoints_load() {
    let single = hf::load_hf_dir(fixture_dir()).unwrap();
    let raw = raw_tensors(&read_fixture("model.safetensors"));
    // f32: the bf16 values widened, written as F32.
    let f32s: Vec<RawTensor> = raw
        .iter()
        .map(|(n, _, s, b)| RawTensor {
            name: n.clone(),
            dtype: Dtype::F32,
            shape: s.clone(),
            data: bf16(b).iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    let files = folder(&read_fixture("config.json"), vec![("model.safetensors", serialize_tensors(&f32s, None).unwrap())]);
    assert_eq!(load_hf(&files).unwrap(), single);

    // f16: arbitrary finite half bit patterns (subnormals, zeros of both signs included),
    // checked against the definition of the format.
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut expected = HashMap::new();
    let f16s: Vec<RawTensor> = raw
        .iter()
        .map(|(n, _, s, b)| {
            let count = b.len() / 2;
            let bits: Vec<u16> = (0..count)
                .map(|i| {
                    let h = (next() >> 20) as u16;
                    match i % 97 {
                        0 => 0x8000,                   // -0
                        1 => 0x0001,                   // smallest subnormal
                        2 => 0x83ff,                   // largest negative subnormal
                        _ if (h >> 10) & 31 == 31 => h & 0xbfff, // keep it finite
                        _ => h,
                    }
                })
                .collect();
            expected.insert(n.clone(), bits.iter().map(|&h| f16_ref(h)).collect::<Vec<f32>>());
            RawTensor {
                name: n.clone(),
                dtype: Dtype::F16,
                shape: s.clone(),
                data: bits.iter().flat_map(|h| h.to_le_bytes()).collect(),
            }
        })
        .collect();
    let files = folder(&read_fixture("config.json"), vec![("model.safetensors", serialize_tensors(&f16s, None).unwrap())]);
    let m = load_hf(&files).unwrap();
    for (name, want) in &expected {
        assert!(same_bits(&tensor_values(&m, name), want), "{name}");
    }
}

/// A bitsandbytes NF4 checkpoint: the fixture's norms and embedding plus the seven projections
/// of both layers in bitsandbytes' serialization (tests/fixtures/tiny-llama/dev_qlora*).
fn bnb_folder(variant: &str) -> (HashMap<String, Vec<u8>>, HashMap<String, Vec<f32>>) {
    let nf4_file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-llama")
        .join(variant)
        .join("base_nf4_weights.safetensors");
    let nf4 = raw_tensors(&std::fs::read(nf4_file).unwrap());
    let mut dequantized = HashMap::new();
    let mut tensors: Vec<RawTensor> = Vec::new();
    for t in &nf4 {
        match t.0.strip_suffix(".dequantized") {
            Some(w) => {
                let v: Vec<f32> = t.3.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                dequantized.insert(w.to_owned(), v);
            }
            None => tensors.extend(to_raw(std::slice::from_ref(t))),
        }
    }
    for t in raw_tensors(&read_fixture("model.safetensors")) {
        if !dequantized.contains_key(&t.0) {
            tensors.extend(to_raw(&[t]));
        }
    }
    let mut config: serde_json::Value = serde_json::from_slice(&read_fixture("config.json")).unwrap();
    config["quantization_config"] = serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4"});
    let files = folder(&serde_json::to_vec(&config).unwrap(), vec![("model.safetensors", serialize_tensors(&tensors, None).unwrap())]);
    (files, dequantized)
}

#[test]
fn bitsandbytes_nf4_checkpoints_keep_nf4_projections() {
    let plain = hf::load_hf_dir(fixture_dir()).unwrap();
    for (variant, double) in [("dev_qlora", false), ("dev_qlora_dq", true)] {
        let (files, dequantized) = bnb_folder(variant);
        let m = load_hf(&files).unwrap_or_else(|e| panic!("{variant}: {e}"));
        assert_eq!(m.config.quant_method.as_deref(), Some("bitsandbytes"));
        assert!(m.has_nf4());
        assert!(m.unused.is_empty(), "{variant}: {:?}", m.unused);
        assert_eq!(dequantized.len(), 14);
        for (name, want) in &dequantized {
            let Some(TensorRef::Nf4(t)) = m.get(name) else { panic!("{variant}: {name} is not NF4") };
            assert_eq!(t.is_double_quant(), double);
            let shape = m.config.tensor_shapes().into_iter().find(|s| &s.0 == name).unwrap().1;
            assert_eq!(t.shape, shape);
            assert!(same_bits(&t.dequantize(), want), "{variant}: {name} dequantizes differently");
        }
        for l in &m.layers {
            assert!(l.proj.iter().all(|p| matches!(p, HostWeight::Nf4(_))));
        }
        assert_eq!(m.embed, plain.embed);
        assert_eq!(m.final_norm, plain.final_norm);
        assert_eq!(m.layers[1].attn_norm, plain.layers[1].attn_norm);
    }

    // An NF4 weight whose quant_state shape contradicts config.json.
    let (files, _) = bnb_folder("dev_qlora");
    let mut config: serde_json::Value = serde_json::from_slice(&files["config.json"]).unwrap();
    config["intermediate_size"] = 128.into();
    let mut bad = files.clone();
    bad.insert("config.json".into(), serde_json::to_vec(&config).unwrap());
    let msg = load_err(&bad);
    assert_mentions(&msg, &["model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[160, 64]", "[128, 64]"]);
}

fn fixture_with(edit: impl FnOnce(&mut Vec<RawTensor>)) -> HashMap<String, Vec<u8>> {
    let mut t = to_raw(&raw_tensors(&read_fixture("model.safetensors")));
    edit(&mut t);
    folder(&read_fixture("config.json"), vec![("model.safetensors", serialize_tensors(&t, None).unwrap())])
}

fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> HashMap<String, Vec<u8>> {
    let mut c: serde_json::Value = serde_json::from_slice(&read_fixture("config.json")).unwrap();
    edit(&mut c);
    folder(&serde_json::to_vec(&c).unwrap(), vec![("model.safetensors", read_fixture("model.safetensors"))])
}

#[test]
fn missing_tensor_is_named() {
    let files = fixture_with(|t| t.retain(|t| t.name != "model.layers.1.mlp.up_proj.weight"));
    let msg = load_err(&files);
    assert_mentions(&msg, &["model.safetensors", "missing tensor", "model.layers.1.mlp.up_proj.weight"]);

    // Untied: lm_head.weight is then required.
    let files = config_with(|c| c["tie_word_embeddings"] = false.into());
    let msg = load_err(&files);
    assert_mentions(&msg, &["model.safetensors", "lm_head.weight"]);
}

#[test]
fn lm_head_next_to_tied_embeddings_is_listed_unused() {
    let files = fixture_with(|t| {
        let e = t.iter().find(|t| t.name == "model.embed_tokens.weight").unwrap().clone();
        t.push(RawTensor { name: "lm_head.weight".into(), ..e });
    });
    let m = load_hf(&files).unwrap();
    assert_eq!(m.unused, vec!["lm_head.weight".to_owned()]);
    assert!(m.lm_head.is_none());
    // Untied, the same file gives an lm_head.
    let mut files = files;
    let mut c: serde_json::Value = serde_json::from_slice(&files["config.json"]).unwrap();
    c["tie_word_embeddings"] = false.into();
    files.insert("config.json".into(), serde_json::to_vec(&c).unwrap());
    let m = load_hf(&files).unwrap();
    assert!(m.unused.is_empty());
    assert_eq!(m.lm_head.as_ref().unwrap(), &m.embed);
    assert!(m.get("lm_head.weight").is_some());
}

#[test]
fn shape_contradicting_config_is_named() {
    let files = config_with(|c| c["intermediate_size"] = 128.into());
    let msg = load_err(&files);
    assert_mentions(&msg, &["model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[160, 64]", "[128, 64]", "config.json"]);

    let files = config_with(|c| c["num_key_value_heads"] = 4.into());
    let msg = load_err(&files);
    assert_mentions(&msg, &["model.layers.0.self_attn.k_proj.weight", "[32, 64]", "[64, 64]"]);
}

#[test]
fn unsupported_architecture_and_config_errors_name_the_field() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &[&str])> = vec![
        (Box::new(|c| c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])), &["config.json", "architectures", "GPT2LMHeadModel"]),
        (
            Box::new(|c| c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})),
            &["config.json", "rope_parameters.rope_type", "yarn"],
        ),
        (Box::new(|c| { c.as_object_mut().unwrap().remove("hidden_size"); }), &["config.json", "hidden_size"]),
        (Box::new(|c| c["hidden_act"] = "gelu".into()), &["config.json", "hidden_act", "gelu"]),
        (Box::new(|c| c["num_key_value_heads"] = 3.into()), &["config.json", "num_key_value_heads"]),
        (Box::new(|c| c["vocab_size"] = "many".into()), &["config.json", "vocab_size"]),
    ];
    for (edit, parts) in cases {
        let msg = load_err(&config_with(edit));
        assert_mentions(&msg, parts);
    }
    let mut files = config_with(|_| {});
    files.insert("config.json".into(), b"{not json".to_vec());
    assert_mentions(&load_err(&files), &["config.json", "JSON"]);
    files.remove("config.json");
    assert_mentions(&load_err(&files), &["config.json", "not found"]);
    let mut files = config_with(|_| {});
    files.remove("model.safetensors");
    assert_mentions(&load_err(&files), &["model.safetensors", "not found"]);
}

/// A safetensors file with a hand-written header and `data`.
fn handmade(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn parse_err(bytes: &[u8]) -> String {
    match SafeTensorsFile::parse("weights.safetensors", bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_safetensors_files_are_errors_naming_file_and_tensor() {
    // Truncated file: the header is intact, the data is cut.
    let full = read_fixture("model.safetensors");
    let files = folder(&read_fixture("config.json"), vec![("model.safetensors", full[..full.len() / 2].to_vec())]);
    let msg = load_err(&files);
    assert_mentions(&msg, &["model.safetensors", "tensor `", "past the end"]);
    // Cut inside the header.
    let msg = parse_err(&full[..100]);
    assert_mentions(&msg, &["weights.safetensors", "header length"]);
    assert_mentions(&parse_err(&full[..5]), &["weights.safetensors", "too short"]);

    // Offset past the end of the data.
    let msg = parse_err(&handmade(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#, &[0; 8]));
    assert_mentions(&msg, &["weights.safetensors", "tensor `w`", "past the end"]);
    // begin after end.
    let msg = parse_err(&handmade(r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#, &[0; 8]));
    assert_mentions(&msg, &["tensor `w`", "begin after end"]);

    // A header claiming an absurd size: rejected before anything is allocated.
    let mut absurd = (1u64 << 60).to_le_bytes().to_vec();
    absurd.extend_from_slice(b"{}");
    assert_mentions(&parse_err(&absurd), &["weights.safetensors", "header length 1152921504606846976"]);
    let mut absurd = u64::MAX.to_le_bytes().to_vec();
    absurd.extend_from_slice(b"{}");
    assert_mentions(&parse_err(&absurd), &["weights.safetensors", "header length"]);

    // Unknown dtype.
    let msg = parse_err(&handmade(r#"{"w":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]));
    assert_mentions(&msg, &["weights.safetensors", "tensor `w`", "unknown dtype \"F7\""]);

    // shape x dtype size differs from the byte range.
    let msg = parse_err(&handmade(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]));
    assert_mentions(&msg, &["tensor `w`", "12 bytes", "[0, 8]"]);
    let msg = parse_err(&handmade(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#, &[0; 8]));
    assert_mentions(&msg, &["tensor `w`", "too large"]);

    // Overlapping ranges.
    let msg = parse_err(&handmade(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0; 12],
    ));
    assert_mentions(&msg, &["weights.safetensors", "overlap", "`a`", "`b`"]);

    // Malformed JSON, non-object header, bad fields.
    assert_mentions(&parse_err(&handmade("{\"w\":", &[])), &["weights.safetensors", "JSON"]);
    assert_mentions(&parse_err(&handmade("[1, 2]", &[])), &["weights.safetensors", "JSON object"]);
    let msg = parse_err(&handmade(r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}"#, &[]));
    assert_mentions(&msg, &["tensor `w`", "shape"]);
    let msg = parse_err(&handmade(r#"{"w":{"dtype":"F32","shape":[1]}}"#, &[0; 4]));
    assert_mentions(&msg, &["tensor `w`", "data_offsets"]);
    let msg = parse_err(&handmade(r#"{"__metadata__":{"a":1}}"#, &[]));
    assert_mentions(&msg, &["__metadata__", "`a`"]);

    // A well-formed tensor of a dtype that is not a float.
    let ok = handmade(r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#, &[1, 2]);
    let st = SafeTensorsFile::parse("weights.safetensors", &ok).unwrap();
    assert_eq!(st.metadata()["format"], "pt");
    assert_eq!(st.data("w").unwrap(), &[1, 2]);
    let msg = st.to_f32("w").unwrap_err().to_string();
    assert_mentions(&msg, &["weights.safetensors", "tensor `w`", "I8"]);
    assert_mentions(&st.to_f32("nope").unwrap_err().to_string(), &["weights.safetensors", "missing tensor `nope`"]);

    // A model weight of the wrong dtype, through the loader.
    let files = fixture_with(|t| {
        let w = t.iter_mut().find(|t| t.name == "model.norm.weight").unwrap();
        w.dtype = Dtype::I16;
    });
    assert_mentions(&load_err(&files), &["model.safetensors", "model.norm.weight", "I16"]);
}

#[test]
fn bf16_f16_conversion_is_exact() {
    use qlora_webgpu::io::half::{bf16_to_f32, f16_to_f32};
    for h in 0..=u16::MAX {
        let e = (h >> 10) & 31;
        if e != 31 {
            assert_eq!(f16_to_f32(h).to_bits(), f16_ref(h).to_bits(), "f16 {h:#06x}");
        } else if h & 1023 == 0 {
            assert_eq!(f16_to_f32(h), if h >> 15 == 1 { f32::NEG_INFINITY } else { f32::INFINITY });
        } else {
            assert!(f16_to_f32(h).is_nan());
        }
        assert_eq!(bf16_to_f32(h).to_bits(), u32::from(h) << 16);
    }
}

const SMOLLM2_135M: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
  "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
  "is_llama_config": true, "max_position_embeddings": 8192, "model_type": "llama",
  "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
  "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": false,
  "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 49152
}"#;

const LLAMA32_1B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": false,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
  "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256
}"#;

const QWEN25_05B: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
  "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
  "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936
}"#;

const MISTRAL_7B: &str = r#"{
  "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0",
  "use_cache": true, "vocab_size": 32000
}"#;

#[test]
fn configs_of_the_supported_families_parse() {
    let c = ModelConfig::from_json("config.json", SMOLLM2_135M.as_bytes()).unwrap();
    assert_eq!((c.architecture, c.head_dim, c.num_key_value_heads, c.rope_theta), (Architecture::Llama, 64, 3, 100000.0));
    assert!(c.tie_word_embeddings && c.rope_scaling.is_none());
    assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    assert!((0..7).all(|m| !c.proj_has_bias(m)));

    let c = ModelConfig::from_json("config.json", LLAMA32_1B.as_bytes()).unwrap();
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.pad_token_id, None);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 })
    );
    assert_eq!((c.rope_theta, c.head_dim, c.proj_shape(1)), (500000.0, 64, (512, 2048)));

    let c = ModelConfig::from_json("config.json", QWEN25_05B.as_bytes()).unwrap();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert_eq!((c.head_dim, c.rms_norm_eps, c.sliding_window), (64, 1e-6, None));
    assert_eq!((0..7).map(|m| c.proj_has_bias(m)).collect::<Vec<_>>(), [true, true, true, false, false, false, false]);
    let shapes = c.tensor_shapes();
    assert!(shapes.contains(&("model.layers.0.self_attn.k_proj.bias".into(), vec![128])));
    assert!(!shapes.iter().any(|s| s.0.contains("o_proj.bias")));
    assert!(!shapes.iter().any(|s| s.0 == "lm_head.weight"));

    let c = ModelConfig::from_json("config.json", MISTRAL_7B.as_bytes()).unwrap();
    assert_eq!(c.architecture, Architecture::Mistral);
    assert_eq!((c.sliding_window, c.tie_word_embeddings, c.num_key_value_heads), (Some(4096), false, 8));
    assert_eq!(c.tensor_shapes().last().unwrap(), &("lm_head.weight".to_owned(), vec![32000, 4096]));

    // Defaults: no rope_theta, no kv heads, no tie flag, no eps; model_type without architectures.
    let c = ModelConfig::from_json(
        "config.json",
        br#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "vocab_size": 100, "rope_scaling": {"type": "linear", "factor": 2.0},
             "attention_bias": true}"#,
    )
    .unwrap();
    assert_eq!((c.rope_theta, c.num_key_value_heads, c.head_dim, c.rms_norm_eps), (10000.0, 4, 16, 1e-6));
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    assert!((0..4).all(|m| c.proj_has_bias(m)) && (4..7).all(|m| !c.proj_has_bias(m)));
    // A Qwen2 default is untied too.
    let c = ModelConfig::from_json(
        "config.json",
        br#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}"#,
    )
    .unwrap();
    assert!(!c.tie_word_embeddings);

    // Unsupported rope types name the field.
    let msg = ModelConfig::from_json("x/config.json", br#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 100, "rope_scaling": {"type": "dynamic", "factor": 2.0}}"#)
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["x/config.json", "rope_scaling.type", "dynamic"]);
}

#[test]
fn qwen2_folder_loads_with_qkv_biases() {
    let config = br#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10,
        "tie_word_embeddings": false, "rms_norm_eps": 1e-6}"#;
    let c = ModelConfig::from_json("config.json", config).unwrap();
    let mut tensors = Vec::new();
    for (k, (name, shape)) in c.tensor_shapes().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n).map(|i| (k * 1000 + i) as f32).collect();
        tensors.push(RawTensor { name, dtype: Dtype::F32, shape, data: vals.iter().flat_map(|v| v.to_le_bytes()).collect() });
    }
    let files = folder(config, vec![("model.safetensors", serialize_tensors(&tensors, None).unwrap())]);
    let m = load_hf(&files).unwrap();
    for t in &tensors {
        let want: Vec<f32> = t.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(tensor_values(&m, &t.name), want, "{}", t.name);
    }
    assert_eq!(m.layers[1].proj_bias[1].as_ref().unwrap().shape, vec![4]);
    assert!(m.layers[0].proj_bias[3].is_none());
    // Missing bias is named.
    let without: Vec<RawTensor> = tensors.iter().filter(|t| t.name != "model.layers.1.self_attn.v_proj.bias").cloned().collect();
    let files = folder(config, vec![("model.safetensors", serialize_tensors(&without, None).unwrap())]);
    assert_mentions(&load_err(&files), &["model.safetensors", "model.layers.1.self_attn.v_proj.bias"]);
}
