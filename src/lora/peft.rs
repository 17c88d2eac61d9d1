//! PEFT's adapter files (no shader): `adapter_config.json` and `adapter_model.safetensors`,
//! written exactly as PEFT 0.21 writes them for the same LoraConfig and read back with every key,
//! shape and dtype checked. The core works on bytes (`config_to_json`, `config_from_json`,
//! `host_adapter_to_bytes`, `host_adapter_from_bytes`); `adapter_to_bytes` /
//! `adapter_from_bytes` add the device side; `save_adapter` / `load_adapter` (native only) add
//! the disk, writing through a temporary file renamed into place.
//!
//! What PEFT writes: the config as `json.dumps(config, indent=2, sort_keys=True)` (no final
//! newline) with `inference_mode` true and every field of its LoraConfig dataclass, and the
//! weights with safetensors' `save_file(state_dict, path, metadata={"format": "pt"})`: f32
//! tensors `base_model.model.{module}.lora_A.weight` (r, in) and `.lora_B.weight` (out, r),
//! and with `use_dora` also `base_model.model.{module}.lora_magnitude_vector` (out) (no
//! `.weight` suffix in the file; PEFT adds it when loading).
//! Both are reproduced byte for byte (safetensors 0.8 orders tensors the same way in Rust and in
//! Python, the Python package being this crate), except that `target_modules`, which PEFT keeps
//! as a Python set, is written in the order given (PEFT's order is a set's and has no meaning).

use super::config::{InitLoraWeights, LoraConfig, TargetModules};
use crate::io::half::{bf16_to_f32, f16_to_f32};
use super::{magnitude_key, module_name, peft_key, HostAdapter, HostLora};
use crate::gpu::GpuContext;
use crate::model::llama::{LlamaConfig, LoraSet, TARGETS};
use crate::io::safetensors_write::{serialize_tensors, RawTensor};
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};

/// The file name of the configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The file name of the weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The PEFT release whose file format (field list and defaults) this module writes; it goes into
/// `peft_version`, which PEFT uses to tell which format a file follows.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

fn num(x: f64) -> Value {
    // Python's json writes an int as `16` and a float as `16.0`; PEFT users give alpha as an
    // int, so an integral alpha is written as one.
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

fn modules_value(t: &TargetModules) -> Value {
    match t {
        TargetModules::Names(n) => {
            let mut seen = Vec::new();
            for s in n {
                if !seen.contains(s) {
                    seen.push(s.clone());
                }
            }
            Value::from(seen)
        }
        TargetModules::Regex(p) => Value::from(p.clone()),
        TargetModules::AllLinear => Value::from(TARGETS.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
    }
}

fn opt_str(s: &Option<String>) -> Value {
    s.clone().map(Value::from).unwrap_or(Value::Null)
}

/// adapter_config.json for `cfg`, as PEFT 0.21.2 writes it: all of its LoraConfig fields, keys
/// sorted, two-space indent, no final newline. Fields this crate does not model are written with
/// PEFT's defaults; `inference_mode` is true (PEFT sets it while saving); "all-linear" is
/// written as the list of the seven projections (PEFT resolves it before saving too).
pub fn config_to_json(cfg: &LoraConfig) -> String {
    let mut f: BTreeMap<&str, Value> = BTreeMap::new();
    let null = Value::Null;
    for k in [
        "alora_invocation_tokens",
        "arrow_config",
        "auto_mapping",
        "corda_config",
        "eva_config",
        "kasa_config",
        "layer_replication",
        "layers_pattern",
        "lora_ga_config",
        "megatron_config",
        "monteclora_config",
        "target_parameters",
        "trainable_token_indices",
        "use_bdlora",
        "velora_config",
    ] {
        f.insert(k, null.clone());
    }
    for k in ["ensure_weight_tying", "fan_in_fan_out", "lora_bias", "use_qalora"] {
        f.insert(k, Value::Bool(false));
    }
    f.insert("inference_mode", Value::Bool(true));
    f.insert("loftq_config", Value::Object(Map::new()));
    f.insert("megatron_core", Value::from("megatron.core"));
    f.insert("peft_type", Value::from("LORA"));
    f.insert("peft_version", Value::from(PEFT_FORMAT_VERSION));
    f.insert("qalora_group_size", Value::from(16));

    let alpha: BTreeMap<String, Value> = cfg.alpha_pattern.iter().rev().map(|(k, v)| (k.clone(), num(*v))).collect();
    let rank: BTreeMap<String, Value> = cfg.rank_pattern.iter().rev().map(|(k, v)| (k.clone(), Value::from(*v))).collect();
    f.insert("alpha_pattern", Value::Object(alpha.into_iter().collect()));
    f.insert("rank_pattern", Value::Object(rank.into_iter().collect()));
    f.insert("base_model_name_or_path", opt_str(&cfg.base_model_name_or_path));
    f.insert("revision", opt_str(&cfg.revision));
    f.insert("task_type", opt_str(&cfg.task_type));
    f.insert("bias", Value::from(cfg.bias.clone()));
    f.insert("exclude_modules", cfg.exclude_modules.as_ref().map(modules_value).unwrap_or(Value::Null));
    f.insert(
        "init_lora_weights",
        match cfg.init_lora_weights {
            InitLoraWeights::Default => Value::Bool(true),
            InitLoraWeights::NoInit => Value::Bool(false),
            InitLoraWeights::Gaussian => Value::from("gaussian"),
            InitLoraWeights::Orthogonal => Value::from("orthogonal"),
        },
    );
    f.insert(
        "layers_to_transform",
        cfg.layers_to_transform.as_ref().map(|v| Value::from(v.clone())).unwrap_or(Value::Null),
    );
    f.insert("lora_alpha", num(cfg.lora_alpha));
    f.insert("lora_dropout", Value::from(cfg.lora_dropout));
    f.insert(
        "modules_to_save",
        cfg.modules_to_save.as_ref().map(|v| Value::from(v.clone())).unwrap_or(Value::Null),
    );
    f.insert("r", Value::from(cfg.r));
    f.insert("target_modules", modules_value(&cfg.target_modules));
    f.insert("use_rslora", Value::Bool(cfg.use_rslora));
    f.insert("use_dora", Value::Bool(cfg.use_dora));
    let obj: Map<String, Value> = f.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    serde_json::to_string_pretty(&Value::Object(obj)).expect("a JSON value always serializes")
}

/// A JSON object read in document order (serde_json's `Value` sorts keys, which would lose the
/// order PEFT's first-match pattern lookup depends on).
struct Ordered<T>(Vec<(String, T)>);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Ordered<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> std::result::Result<Ordered<T>, A::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = a.next_entry::<String, T>()? {
                    v.push((k, x));
                }
                Ok(Ordered(v))
            }
            fn visit_unit<E>(self) -> std::result::Result<Ordered<T>, E> {
                Ok(Ordered(Vec::new()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(serde::Deserialize)]
struct Patterns {
    #[serde(default)]
    rank_pattern: Option<Ordered<usize>>,
    #[serde(default)]
    alpha_pattern: Option<Ordered<f64>>,
}

fn modules_from(v: &Value, field: &str, file: &str) -> Result<Option<TargetModules>> {
    Ok(match v {
        Value::Null => None,
        Value::String(s) if s.eq_ignore_ascii_case("all-linear") => Some(TargetModules::AllLinear),
        Value::String(s) => Some(TargetModules::Regex(s.clone())),
        Value::Array(a) => {
            let mut names = Vec::new();
            for x in a {
                let Some(s) = x.as_str() else {
                    return Err(Error::format(file, format!("{field}: {x} is not a module name (a string)")));
                };
                names.push(s.to_string());
            }
            Some(TargetModules::Names(names))
        }
        other => return Err(Error::format(file, format!("{field}: {other} is neither a list of module names nor a string"))),
    })
}

/// Parses PEFT's adapter_config.json (any PEFT version: missing fields take PEFT's defaults,
/// unknown fields are ignored). Fields that change what the adapter computes and that this crate
/// does not implement (LoRA bias, fan_in_fan_out, QALoRA, aLoRA, layer replication,
/// trainable tokens, modules_to_save, target_parameters, initializations that modify the base
/// weights such as PiSSA/OLoRA/LoftQ/CorDA/EVA, other LoRA variants) are errors naming the field,
/// never silently ignored. `file` names the file in errors.
pub fn config_from_json(text: &str, file: &str) -> Result<LoraConfig> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::format(file, format!("not valid JSON: {e}")))?;
    let Value::Object(o) = &v else { return Err(Error::format(file, "not a JSON object")) };
    let get = |k: &str| o.get(k).unwrap_or(&Value::Null);
    let bad = |k: &str, want: &str| Error::format(file, format!("field {k}: {} is not {want}", get(k)));
    if let Some(pt) = o.get("peft_type") {
        if pt.as_str() != Some("LORA") {
            return Err(Error::format(file, format!("peft_type {pt} is not \"LORA\": only LoRA adapters are supported")));
        }
    }
    for (k, what) in [
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D-style weights)"),
        ("lora_bias", "LoRA bias terms"),
        ("use_qalora", "QALoRA adapters"),
    ] {
        match get(k) {
            Value::Null | Value::Bool(false) => {}
            Value::Bool(true) => return Err(Error::format(file, format!("{k} is true: {what} are not supported"))),
            _ => return Err(bad(k, "a boolean")),
        }
    }
    for k in [
        "layer_replication",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "arrow_config",
        "kasa_config",
        "monteclora_config",
        "velora_config",
        "lora_ga_config",
    ] {
        if !get(k).is_null() {
            return Err(Error::format(file, format!("{k} is set ({}): this LoRA variant is not supported", get(k))));
        }
    }
    match get("use_bdlora") {
        Value::Null | Value::Bool(false) => {}
        x => return Err(Error::format(file, format!("use_bdlora is set ({x}): this LoRA variant is not supported"))),
    }
    match get("target_parameters") {
        Value::Null => {}
        Value::Array(a) if a.is_empty() => {}
        x => return Err(Error::format(file, format!("target_parameters is set ({x}): adapters on raw parameters are not supported"))),
    }
    match get("layers_pattern") {
        Value::Null => {}
        Value::String(s) if s == "layers" => {}
        Value::Array(a) if a.is_empty() || (a.len() == 1 && a[0] == "layers") => {}
        x => return Err(Error::format(file, format!("layers_pattern {x}: Llama models name their layers \"layers\""))),
    }

    let mut cfg = LoraConfig::default();
    match get("r") {
        Value::Null => {}
        x => cfg.r = x.as_u64().ok_or_else(|| bad("r", "a non-negative integer"))? as usize,
    }
    match get("lora_alpha") {
        Value::Null => {}
        x => cfg.lora_alpha = x.as_f64().ok_or_else(|| bad("lora_alpha", "a number"))?,
    }
    match get("lora_dropout") {
        Value::Null => {}
        x => cfg.lora_dropout = x.as_f64().ok_or_else(|| bad("lora_dropout", "a number"))?,
    }
    if let Some(t) = modules_from(get("target_modules"), "target_modules", file)? {
        cfg.target_modules = t;
    }
    cfg.exclude_modules = modules_from(get("exclude_modules"), "exclude_modules", file)?;
    cfg.layers_to_transform = match get("layers_to_transform") {
        Value::Null => None,
        Value::Number(n) => Some(vec![n.as_u64().ok_or_else(|| bad("layers_to_transform", "a layer index"))? as usize]),
        Value::Array(a) => Some(
            a.iter()
                .map(|x| x.as_u64().map(|u| u as usize).ok_or_else(|| bad("layers_to_transform", "a list of layer indices")))
                .collect::<Result<_>>()?,
        ),
        _ => return Err(bad("layers_to_transform", "a layer index or a list of them")),
    };
    match get("use_rslora") {
        Value::Null => {}
        x => cfg.use_rslora = x.as_bool().ok_or_else(|| bad("use_rslora", "a boolean"))?,
    }
    match get("use_dora") {
        Value::Null => {}
        x => cfg.use_dora = x.as_bool().ok_or_else(|| bad("use_dora", "a boolean"))?,
    }
    cfg.init_lora_weights = match get("init_lora_weights") {
        Value::Null | Value::Bool(true) => InitLoraWeights::Default,
        Value::Bool(false) => InitLoraWeights::NoInit,
        Value::String(s) if s.eq_ignore_ascii_case("gaussian") => InitLoraWeights::Gaussian,
        Value::String(s) if s.eq_ignore_ascii_case("orthogonal") => InitLoraWeights::Orthogonal,
        Value::String(s)
            if ["pissa", "olora", "loftq", "corda", "eva"].iter().any(|p| s.to_ascii_lowercase().starts_with(p)) =>
        {
            return Err(Error::format(
                file,
                format!(
                    "init_lora_weights {s:?}: this initialization changes the base model's weights, which are not saved \
                     with the adapter; convert it to a plain LoRA adapter first (PEFT's save_pretrained with \
                     path_initial_model_for_weight_conversion)"
                ),
            ))
        }
        x => return Err(Error::format(file, format!("init_lora_weights {x} is not true, false, \"gaussian\" or \"orthogonal\""))),
    };
    let pats: Patterns =
        serde_json::from_str(text).map_err(|e| Error::format(file, format!("rank_pattern / alpha_pattern: {e}")))?;
    cfg.rank_pattern = pats.rank_pattern.map(|o| o.0).unwrap_or_default();
    cfg.alpha_pattern = pats.alpha_pattern.map(|o| o.0).unwrap_or_default();
    match get("bias") {
        Value::Null => {}
        x => cfg.bias = x.as_str().ok_or_else(|| bad("bias", "a string"))?.to_string(),
    }
    cfg.modules_to_save = match get("modules_to_save") {
        Value::Null => None,
        Value::Array(a) => Some(a.iter().map(|x| x.as_str().unwrap_or_default().to_string()).collect()),
        _ => return Err(bad("modules_to_save", "a list of module names")),
    };
    let opt = |k: &str| -> Result<Option<String>> {
        match get(k) {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            _ => Err(bad(k, "a string")),
        }
    };
    cfg.base_model_name_or_path = opt("base_model_name_or_path")?;
    cfg.revision = opt("revision")?;
    cfg.task_type = opt("task_type")?;
    cfg.validate().map_err(|e| Error::format(file, e.to_string()))?;
    Ok(cfg)
}

fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn le_u16(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]))
}

/// The safetensors metadata key under which adapters written here record the SHA-256 of each
/// tensor's data: a JSON object `{tensor name: hex digest}`. PEFT's own files lack it.
pub const CHECKSUM_KEY: &str = "qlora_webgpu.sha256";

/// The value of [`CHECKSUM_KEY`] for `(name, data bytes)` pairs.
pub fn tensor_checksums<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let map: serde_json::Map<String, Value> =
        tensors.map(|(n, d)| (n.to_owned(), Value::from(crate::io::sha256::hex(&crate::io::sha256::sha256(d))))).collect();
    Value::Object(map).to_string()
}

/// `bytes` (a safetensors file written by [`host_adapter_to_bytes`]) without its
/// [`CHECKSUM_KEY`] metadata entry: the file exactly as PEFT writes it. Other files are
/// returned unchanged.
pub fn strip_checksum(bytes: &[u8]) -> Vec<u8> {
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize) else { return bytes.to_vec() };
    let Some(header) = bytes.get(8..8usize.saturating_add(n)).and_then(|h| std::str::from_utf8(h).ok()) else { return bytes.to_vec() };
    let key = format!(",\"{CHECKSUM_KEY}\":\"");
    let Some(start) = header.find(&key) else { return bytes.to_vec() };
    // The value is a JSON string whose quotes are escaped: it ends at the first bare quote.
    let body = &header[start + key.len()..];
    let mut end = None;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => {
                end = Some(start + key.len() + i + 1);
                break;
            }
            _ => escaped = false,
        }
    }
    let Some(end) = end else { return bytes.to_vec() };
    let mut h = format!("{}{}", &header[..start], &header[end..]).trim_end().to_owned();
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h.as_bytes());
    out.extend(&bytes[8 + n..]);
    out
}

/// Checks the per-tensor SHA-256 of [`CHECKSUM_KEY`] when the file records it (an adapter
/// written by this project); a file without it (written by PEFT) passes. Names the first
/// tensor whose data differs.
pub fn verify_checksums(st: &crate::io::safetensors::SafeTensorsFile, file: &str) -> Result<()> {
    let Some(text) = st.metadata().get(CHECKSUM_KEY) else { return Ok(()) };
    let want: serde_json::Map<String, Value> = serde_json::from_str(text)
        .map_err(|e| Error::format(file, format!("metadata `{CHECKSUM_KEY}` is not a JSON object of digests: {e}")))?;
    for t in st.tensors() {
        let got = crate::io::sha256::hex(&crate::io::sha256::sha256(st.data(&t.name)?));
        match want.get(&t.name).and_then(Value::as_str) {
            Some(w) if w == got => {}
            Some(_) => {
                return Err(Error::format(
                    file,
                    format!("tensor {}: its data does not match the SHA-256 recorded in the file's metadata (the file is corrupted or was edited)", t.name),
                ))
            }
            None => return Err(Error::format(file, format!("tensor {}: no SHA-256 in metadata `{CHECKSUM_KEY}`, which lists the others", t.name))),
        }
    }
    if want.len() != st.tensors().len() {
        return Err(Error::format(file, format!("metadata `{CHECKSUM_KEY}` lists {} tensors, the file holds {}", want.len(), st.tensors().len())));
    }
    Ok(())
}

/// Reads an adapter from the bytes of its two files, for `model`. `source` names the adapter
/// (e.g. its folder) in errors, which then read `{source}/adapter_config.json: ...` or
/// `{source}/adapter_model.safetensors: tensor KEY: ...`. Checks: the config parses and fits the
/// model; the tensor set is exactly the A and B of every targeted module (a missing key and an
/// unexpected one are both errors); each tensor is F32, F16 or BF16 (converted to f32 exactly)
/// with shape A (r, in), B (out, r) for its module's rank.
pub fn host_adapter_from_bytes(config_json: &str, st: &[u8], model: &LlamaConfig, source: &str) -> Result<HostAdapter> {
    let cfile = format!("{source}/{CONFIG_FILE}");
    let wfile = format!("{source}/{WEIGHTS_FILE}");
    let config = config_from_json(config_json, &cfile)?;
    let targets = config.targets(model).map_err(|e| Error::format(&cfile, e.to_string()))?;
    // Our reader first: its errors name the tensor at fault.
    let checked = crate::io::safetensors::SafeTensorsFile::parse(&wfile, st)?;
    verify_checksums(&checked, &wfile)?;
    let tensors = safetensors::SafeTensors::deserialize(st)
        .map_err(|e| Error::format(&wfile, format!("not a valid safetensors file: {e}")))?;
    // Kind of tensor: 0 lora_A, 1 lora_B, 2 DoRA's lora_magnitude_vector.
    let mut expected: HashMap<String, (usize, usize, u8)> = HashMap::new();
    for (l, t) in targets.iter().enumerate() {
        for m in 0..7 {
            if t[m] {
                expected.insert(peft_key(l, m, false), (l, m, 0));
                expected.insert(peft_key(l, m, true), (l, m, 1));
                if config.use_dora {
                    // PEFT writes the key without `.weight`; its state-dict form (with it) is read too.
                    let k = magnitude_key(l, m);
                    let k = if tensors.tensor(&k).is_err() && tensors.tensor(&format!("{k}.weight")).is_ok() { format!("{k}.weight") } else { k };
                    expected.insert(k, (l, m, 2));
                }
            }
        }
    }
    // Missing keys first, in layer and module order, so the first error is the natural one.
    for (l, t) in targets.iter().enumerate() {
        for m in 0..7 {
            for b in [false, true] {
                let k = peft_key(l, m, b);
                if t[m] && tensors.tensor(&k).is_err() {
                    return Err(Error::format(
                        &wfile,
                        format!("missing tensor {k} (the config targets {}: it needs lora_A and lora_B)", module_name(l, m)),
                    ));
                }
            }
            let k = magnitude_key(l, m);
            if t[m] && config.use_dora && tensors.tensor(&k).is_err() && tensors.tensor(&format!("{k}.weight")).is_err() {
                return Err(Error::format(
                    &wfile,
                    format!("missing tensor {k} (use_dora is true: {} needs its DoRA magnitude)", module_name(l, m)),
                ));
            }
        }
    }
    let mut names = tensors.names();
    names.sort();
    for k in &names {
        if !expected.contains_key(*k) {
            let why = if k.contains("lora_magnitude_vector") && !config.use_dora {
                "a DoRA magnitude, but the config's use_dora is false".to_string()
            } else {
                format!("not the lora_A/lora_B weight of a module the config targets in this {}-layer model", model.layers)
            };
            return Err(Error::format(&wfile, format!("unexpected tensor {k}: {why}")));
        }
    }
    let mut layers: Vec<[Option<HostLora>; 7]> = vec![Default::default(); model.layers];
    for (k, &(l, m, kind)) in &expected {
        let view = tensors.tensor(k).expect("present: checked above");
        let (out, inp) = model.proj_shape(m);
        let r = config.rank_for(&module_name(l, m));
        let want: Vec<usize> = match kind {
            0 => vec![r, inp],
            1 => vec![out, r],
            _ => vec![out],
        };
        if view.shape() != want {
            return Err(Error::format(
                &wfile,
                format!(
                    "tensor {k}: shape {:?}, want {want:?} ({} is {out}x{inp} (out x in), rank {r}; lora_A is r x in, lora_B is out x r, \
                     lora_magnitude_vector is out)",
                    view.shape(),
                    module_name(l, m)
                ),
            ));
        }
        let data = match view.dtype() {
            safetensors::Dtype::F32 => le_f32(view.data()),
            safetensors::Dtype::F16 => le_u16(view.data()).map(f16_to_f32).collect(),
            safetensors::Dtype::BF16 => le_u16(view.data()).map(bf16_to_f32).collect(),
            d => return Err(Error::format(&wfile, format!("tensor {k}: dtype {d:?}; want F32, F16 or BF16"))),
        };
        let slot = layers[l][m].get_or_insert_with(|| HostLora {
            r,
            in_features: inp,
            out_features: out,
            a: Vec::new(),
            b: Vec::new(),
            magnitude: None,
        });
        match kind {
            0 => slot.a = data,
            1 => slot.b = data,
            _ => slot.magnitude = Some(data),
        }
    }
    Ok(HostAdapter { config, layers })
}

/// The two files of `h` as PEFT writes them: (adapter_config.json text, adapter_model.safetensors
/// bytes). The shapes are checked against `model` first.
pub fn host_adapter_to_bytes(h: &HostAdapter, model: &LlamaConfig) -> Result<(String, Vec<u8>)> {
    h.config.validate()?;
    h.check(model)?;
    let json = config_to_json(&h.config);
    // PEFT saves rank_pattern / alpha_pattern with sorted keys and looks them up first match
    // first: when two keys match one module, the saved file would give it another rank or
    // alpha than the live config did (PEFT has this trap too). Refuse to write such a file.
    let reread = config_from_json(&json, CONFIG_FILE)?;
    for (l, mods) in h.layers.iter().enumerate() {
        for (m, x) in mods.iter().enumerate() {
            if x.is_none() {
                continue;
            }
            let name = module_name(l, m);
            let (r0, r1) = (h.config.rank_for(&name), reread.rank_for(&name));
            let (a0, a1) = (h.config.alpha_for(&name), reread.alpha_for(&name));
            if r0 != r1 || a0 != a1 {
                return Err(Error::Invalid(format!(
                    "{name}: rank {r0} / alpha {a0} under the config's pattern order, but {r1} / {a1} once the patterns are \
                     saved with sorted keys (as PEFT saves them): several rank_pattern / alpha_pattern keys match this \
                     module; make them match disjoint modules"
                )));
            }
        }
    }
    let mut raw = Vec::new();
    for (l, mods) in h.layers.iter().enumerate() {
        for (m, x) in mods.iter().enumerate() {
            let Some(x) = x else { continue };
            for (b, data, shape) in [(false, &x.a, vec![x.r, x.in_features]), (true, &x.b, vec![x.out_features, x.r])] {
                raw.push(RawTensor {
                    name: peft_key(l, m, b),
                    dtype: safetensors::Dtype::F32,
                    shape,
                    data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                });
            }
            if let Some(g) = &x.magnitude {
                raw.push(RawTensor {
                    name: magnitude_key(l, m),
                    dtype: safetensors::Dtype::F32,
                    shape: vec![x.out_features],
                    data: g.iter().flat_map(|v| v.to_le_bytes()).collect(),
                });
            }
        }
    }
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    meta.insert(CHECKSUM_KEY.to_string(), tensor_checksums(raw.iter().map(|t| (t.name.as_str(), t.data.as_slice()))));
    Ok((json, serialize_tensors(&raw, Some(meta))?))
}

/// The two files of the adapter `set` (its values read back from the device) under `cfg`.
pub async fn adapter_to_bytes(ctx: &GpuContext, cfg: &LoraConfig, model: &LlamaConfig, set: &LoraSet) -> Result<(String, Vec<u8>)> {
    let h = HostAdapter::download(ctx, cfg, set).await?;
    host_adapter_to_bytes(&h, model)
}

/// Reads an adapter from its two files (see `host_adapter_from_bytes`) and uploads it.
pub fn adapter_from_bytes(
    ctx: &GpuContext,
    config_json: &str,
    st: &[u8],
    model: &LlamaConfig,
    source: &str,
) -> Result<(LoraConfig, LoraSet)> {
    let h = host_adapter_from_bytes(config_json, st, model, source)?;
    let set = h.upload(ctx)?;
    Ok((h.config, set))
}

/// Reads the adapter folder `dir` (adapter_config.json + adapter_model.safetensors) to the host.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_host_adapter(dir: &std::path::Path, model: &LlamaConfig) -> Result<HostAdapter> {
    let read = |f: &str| crate::io::files::read_regular(&dir.join(f));
    let cfg = read(CONFIG_FILE)?;
    let cfg = String::from_utf8(cfg).map_err(|_| Error::format(dir.join(CONFIG_FILE).display().to_string(), "not UTF-8 text"))?;
    let st = read(WEIGHTS_FILE)?;
    host_adapter_from_bytes(&cfg, &st, model, &dir.display().to_string())
}

/// Loads the adapter folder `dir` onto the device (native shell).
#[cfg(not(target_arch = "wasm32"))]
pub fn load_adapter(ctx: &GpuContext, dir: &std::path::Path, model: &LlamaConfig) -> Result<(LoraConfig, LoraSet)> {
    let h = read_host_adapter(dir, model)?;
    let set = h.upload(ctx)?;
    Ok((h.config, set))
}

/// Writes `h` into the folder `dir` (created if needed) as PEFT does; each file goes through a
/// temporary file renamed into place, the weights first, so a crash leaves either the old or
/// the new file, never a partial one.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_host_adapter(dir: &std::path::Path, h: &HostAdapter, model: &LlamaConfig) -> Result<()> {
    let (json, st) = host_adapter_to_bytes(h, model)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::format(dir.display().to_string(), format!("create folder: {e}")))?;
    crate::io::files::write_atomic(&dir.join(WEIGHTS_FILE), &st)?;
    crate::io::files::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
}

/// Saves the device adapter `set` under `cfg` into the folder `dir` (native shell; blocks).
#[cfg(not(target_arch = "wasm32"))]
pub fn save_adapter(ctx: &GpuContext, dir: &std::path::Path, cfg: &LoraConfig, model: &LlamaConfig, set: &LoraSet) -> Result<()> {
    let h = crate::gpu::block_on(HostAdapter::download(ctx, cfg, set))?;
    write_host_adapter(dir, &h, model)
}
