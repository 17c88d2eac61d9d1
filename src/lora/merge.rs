//! Merging an adapter into its base model on the CPU (no shader): W' = W0 + s·B·A for every
//! targeted projection (DoRA: each row of it scaled by m / ||W0 + s·B·A||_row, as PEFT merges), giving a plain dense model that needs no adapter at inference; plus the
//! f16/bf16 conversions (round to nearest, ties to even) used for the output and for reading
//! half-precision adapters, and the merged model folder as bytes.
//!
//! Precision: each merged element is W0[i,j] + s·Σ_k B[i,k]·A[k,j] evaluated in f64 and rounded
//! once to f32. PEFT's merge (`base_layer.weight.data += (B @ A) * scaling`) rounds B·A, the
//! scaled product and the sum to f32 in turn; the results differ by those roundings only (a few
//! f32 ulps at most).
//!
//! NF4 bases (QLoRA): the NF4 weights are dequantized first (`Nf4Tensor::dequantize`, the values
//! the QLoRA forward computes with) and the merged model is written dense (f32, f16 or bf16),
//! without a `quantization_config`: re-quantizing W0 + s·B·A to NF4 would add a new rounding
//! error of the size of the NF4 step, larger than the adapter's change in most elements.

use super::{module_name, HostAdapter, HostLora};
use crate::model::llama::LlamaConfig;
use crate::io::half::{f32_to_bf16_bits, f32_to_f16_bits};
use crate::io::safetensors_write::{serialize_tensors, RawTensor};
use crate::quant::Nf4Tensor;
use crate::{Error, Result};
use std::collections::HashMap;





/// A tensor on the host, f32, row-major (the loaders' type).
pub use crate::io::HostTensor;

/// A base-model weight as loaded: dense f32 (from f32, f16 or bf16 files) or NF4.
#[derive(Clone, Debug)]
pub enum BaseTensor {
    /// Dense values.
    Dense(HostTensor),
    /// NF4 (QLoRA's frozen base); dequantized for merging.
    Nf4(Nf4Tensor),
}

impl BaseTensor {
    /// Dense values: as is, or NF4 dequantized (`NF4_CODE[q] · absmax[block]`).
    pub fn to_dense(&self) -> HostTensor {
        match self {
            BaseTensor::Dense(t) => t.clone(),
            BaseTensor::Nf4(q) => HostTensor { shape: q.shape.clone(), data: q.dequantize() },
        }
    }
}

/// The Hugging Face name of the weight of projection `m` of layer `layer`:
/// `model.layers.{layer}.{self_attn|mlp}.{proj}.weight`.
pub fn hf_weight_name(layer: usize, m: usize) -> String {
    format!("{}.weight", module_name(layer, m))
}

/// W' (out, in) = W0 + s·B·A for one projection: W0 (out, in), A (r, in), B (out, r), s the
/// module's scale (f64, as PEFT's Python float). Each element is computed in f64 and rounded
/// once to f32. With DoRA's magnitude m (out) in `lora`, PEFT's DoRA merge:
/// W' = (m / ||W0 + s·B·A||_row) ⊙ (W0 + s·B·A), each row scaled by its factor (in f64).
pub fn merge_weight(w0: &[f32], lora: &HostLora, scale: f64) -> Result<Vec<f32>> {
    let (out, inp, r) = (lora.out_features, lora.in_features, lora.r);
    if w0.len() != out * inp || lora.a.len() != r * inp || lora.b.len() != out * r || lora.magnitude.as_ref().is_some_and(|g| g.len() != out) {
        return Err(Error::shape(
            "lora merge",
            format!("W0 has {} values, A {} and B {}: want W0 {out}x{inp}, A {r}x{inp}, B {out}x{r}", w0.len(), lora.a.len(), lora.b.len()),
        ));
    }
    let mut merged = Vec::with_capacity(out * inp);
    let mut acc = vec![0f64; inp];
    for i in 0..out {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for k in 0..r {
            let bik = lora.b[i * r + k] as f64;
            let row = &lora.a[k * inp..(k + 1) * inp];
            for (s, &a) in acc.iter_mut().zip(row) {
                *s += bik * a as f64;
            }
        }
        let w = &w0[i * inp..(i + 1) * inp];
        acc.iter_mut().zip(w).for_each(|(d, &w)| *d = w as f64 + scale * *d);
        let f = match &lora.magnitude {
            Some(g) => g[i] as f64 / acc.iter().map(|v| v * v).sum::<f64>().sqrt(),
            None => 1.0,
        };
        merged.extend(acc.iter().map(|&v| (f * v) as f32));
    }
    Ok(merged)
}

/// Merges `adapter` into the base model `base` ((HF name, tensor) in file order): every
/// targeted projection weight becomes W0 + s·B·A, every other tensor passes through (NF4 ones
/// dequantized), in the same order. A targeted weight that is missing or has another shape than
/// (out, in) is an error naming it.
pub fn merge_adapter(base: &[(String, BaseTensor)], adapter: &HostAdapter, model: &LlamaConfig) -> Result<Vec<(String, HostTensor)>> {
    adapter.check(model)?;
    let mut wanted: HashMap<String, (usize, usize)> = HashMap::new();
    for (l, mods) in adapter.layers.iter().enumerate() {
        for (m, x) in mods.iter().enumerate() {
            if x.is_some() {
                wanted.insert(hf_weight_name(l, m), (l, m));
            }
        }
    }
    let mut out = Vec::with_capacity(base.len());
    let mut done = 0;
    for (name, t) in base {
        let dense = t.to_dense();
        let Some(&(l, m)) = wanted.get(name) else {
            out.push((name.clone(), dense));
            continue;
        };
        let (o, i) = model.proj_shape(m);
        if dense.shape != [o, i] {
            return Err(Error::Invalid(format!("merge: base weight {name} has shape {:?}, want [{o}, {i}]", dense.shape)));
        }
        let lora = adapter.layers[l][m].as_ref().expect("wanted only for present modules");
        let scale = adapter.config.scale_for_f64(&module_name(l, m));
        let data = merge_weight(&dense.data, lora, scale)?;
        out.push((name.clone(), HostTensor { shape: dense.shape, data }));
        done += 1;
    }
    if done != wanted.len() {
        let mut missing: Vec<_> = wanted.keys().filter(|k| !base.iter().any(|(n, _)| n == *k)).cloned().collect();
        missing.sort();
        return Err(Error::Invalid(format!(
            "merge: the base model lacks the targeted weight(s) {}",
            missing.join(", ")
        )));
    }
    Ok(out)
}

/// Element type of a written model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    /// float32 (exact).
    F32,
    /// float16, round to nearest even.
    F16,
    /// bfloat16, round to nearest even.
    Bf16,
}

impl OutDtype {
    /// The torch dtype name config.json uses: "float32", "float16", "bfloat16".
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::F16 => "float16",
            OutDtype::Bf16 => "bfloat16",
        }
    }
}

/// A safetensors file of `tensors` in `dtype` (f16/bf16 rounded to nearest even), with the
/// metadata transformers writes (`{"format": "pt"}`).
pub fn to_safetensors(tensors: &[(String, HostTensor)], dtype: OutDtype) -> Result<Vec<u8>> {
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, t)| {
            let (dt, data) = match dtype {
                OutDtype::F32 => (safetensors::Dtype::F32, t.data.iter().flat_map(|v| v.to_le_bytes()).collect()),
                OutDtype::F16 => {
                    (safetensors::Dtype::F16, t.data.iter().flat_map(|&v| f32_to_f16_bits(v).to_le_bytes()).collect())
                }
                OutDtype::Bf16 => {
                    (safetensors::Dtype::BF16, t.data.iter().flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes()).collect())
                }
            };
            RawTensor { name: name.clone(), dtype: dt, shape: t.shape.clone(), data }
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    serialize_tensors(&raw, Some(meta))
}

/// The files of a merged model folder: `model.safetensors` (the merged tensors in `dtype`),
/// `config.json` (the base's, with `torch_dtype` / `dtype` set to the output dtype and any
/// `quantization_config` removed, as the merged model is dense; written as transformers writes
/// it: sorted keys, two-space indent, final newline), and every file of `other` (tokenizer.json,
/// tokenizer_config.json, generation_config.json, ...) unchanged. `config_json` is the base
/// model's config.json.
pub fn merged_folder(
    tensors: &[(String, HostTensor)],
    dtype: OutDtype,
    config_json: &[u8],
    other: &[(String, Vec<u8>)],
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut cfg: serde_json::Value =
        serde_json::from_slice(config_json).map_err(|e| Error::format("config.json", format!("not valid JSON: {e}")))?;
    let Some(o) = cfg.as_object_mut() else { return Err(Error::format("config.json", "not a JSON object")) };
    o.remove("quantization_config");
    let has_dtype = o.contains_key("dtype");
    if has_dtype || !o.contains_key("torch_dtype") {
        o.insert("dtype".into(), dtype.torch_name().into());
    }
    if o.contains_key("torch_dtype") {
        o.insert("torch_dtype".into(), dtype.torch_name().into());
    }
    let mut text = serde_json::to_string_pretty(&cfg).expect("a JSON value always serializes");
    text.push('\n');
    let mut files = vec![("model.safetensors".to_string(), to_safetensors(tensors, dtype)?), ("config.json".to_string(), text.into_bytes())];
    for (name, bytes) in other {
        if name == "model.safetensors" || name == "config.json" || name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            return Err(Error::Invalid(format!("merged_folder: {name} would clash with the merged model's own files")));
        }
        files.push((name.clone(), bytes.clone()));
    }
    Ok(files)
}

/// Writes the files of `merged_folder` into `dir` (created if needed), each through a temporary
/// file renamed into place (native shell).
#[cfg(not(target_arch = "wasm32"))]
pub fn write_folder(dir: &std::path::Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::format(dir.display().to_string(), format!("create folder: {e}")))?;
    for (name, bytes) in files {
        crate::io::files::write_atomic(&dir.join(name), bytes)?;
    }
    Ok(())
}
