//! Writing a QLoRA base as a Hugging Face folder that transformers + bitsandbytes load with
//! `from_pretrained`: the seven projections of every layer in bitsandbytes' 4-bit serialization
//! (NF4, optionally double-quantized), everything else in f32, and config.json with the
//! `quantization_config` transformers writes for a `BitsAndBytesConfig(load_in_4bit=True)`.

use crate::io::{HostModel, HostWeight};
use crate::model::config::names;
use crate::io::safetensors_write::{serialize_tensors, RawTensor};
use crate::io::bnb::write_bnb_nf4;
use crate::quant::nf4::quantize_nf4;
use crate::{Error, Result};
use safetensors::Dtype;

/// The `quantization_config` entry of config.json (transformers' BitsAndBytesConfig.to_dict()
/// for 4-bit NF4 with f32 compute).
pub fn bnb_quantization_config(double_quant: bool) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

fn f32_raw(name: String, shape: &[usize], data: &[f32]) -> RawTensor {
    RawTensor { name, dtype: Dtype::F32, shape: shape.to_vec(), data: bytemuck::cast_slice(data).to_vec() }
}

/// The files of a 4-bit folder for `model`: ("config.json", …) and ("model.safetensors", …).
/// `config_json` is the original config.json (its fields are kept, `quantization_config` and
/// `torch_dtype`/`dtype` set). Projections already in NF4 are written as they are; f32 ones are
/// quantized with `blocksize` (bitsandbytes' default is 64) and `double_quant`.
pub fn quantized_folder(model: &HostModel, config_json: &[u8], blocksize: usize, double_quant: bool) -> Result<Vec<(String, Vec<u8>)>> {
    let mut cfg: serde_json::Value =
        serde_json::from_slice(config_json).map_err(|e| Error::format("config.json", format!("not JSON: {e}")))?;
    let obj = cfg.as_object_mut().ok_or_else(|| Error::format("config.json", "not a JSON object"))?;
    obj.insert("quantization_config".into(), bnb_quantization_config(double_quant));
    obj.insert("torch_dtype".into(), "float32".into());
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), "float32".into());
    }
    let mut raw = vec![f32_raw(names::EMBED.into(), &model.embed.shape, &model.embed.data)];
    for (i, l) in model.layers.iter().enumerate() {
        raw.push(f32_raw(names::attn_norm(i), &l.attn_norm.shape, &l.attn_norm.data));
        raw.push(f32_raw(names::mlp_norm(i), &l.mlp_norm.shape, &l.mlp_norm.data));
        for (m, p) in l.proj.iter().enumerate() {
            let q = match p {
                HostWeight::Nf4(t) => t.clone(),
                HostWeight::F32(t) => quantize_nf4(&t.data, &t.shape, blocksize, double_quant)?,
            };
            write_bnb_nf4(&names::proj(i, m), &q, &mut raw)?;
            if let Some(b) = &l.proj_bias[m] {
                raw.push(f32_raw(names::proj_bias(i, m), &b.shape, &b.data));
            }
        }
    }
    raw.push(f32_raw(names::FINAL_NORM.into(), &model.final_norm.shape, &model.final_norm.data));
    if let Some(h) = &model.lm_head {
        raw.push(f32_raw(names::LM_HEAD.into(), &h.shape, &h.data));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = serialize_tensors(&raw, Some(meta))?;
    let cfg_text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(vec![("config.json".into(), cfg_text.into_bytes()), ("model.safetensors".into(), st)])
}
