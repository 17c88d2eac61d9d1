//! Writes a Hugging Face model folder with the shapes of a known model (src/model/arch.rs) and
//! random bf16 weights, for trying `qlora train --qlora` on real model sizes without a download:
//!
//!   cargo run --release --example random_hf_model -- llama-3.2-1b /tmp/llama1b [--layers 2]
//!
//! config.json (the architecture's own fields; `--layers N` keeps N decoder layers), one
//! model.safetensors in bf16 (projections uniform in ±0.03, embeddings ±0.03, norms 1, Qwen2's
//! q/k/v biases 0.01; seeded, deterministic), and SmolLM2's tokenizer files and chat template
//! from tests/fixtures/tiny-llama/model (49,152 ids: every id it produces is inside each of these
//! vocabularies). The weights are noise: the model learns nothing useful, but every tensor has
//! its real size (the point: sharded embeddings, memory, speed).

use safetensors::Dtype;
use qlora_webgpu::model::arch;
use qlora_webgpu::io::safetensors_write::{serialize_tensors, RawTensor};
use qlora_webgpu::rng::SplitMix64;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: random_hf_model ARCH OUT_DIR [--layers N]";
    let (name, out) = match (args.first(), args.get(1)) {
        (Some(a), Some(o)) => (a.clone(), PathBuf::from(o)),
        _ => return Err(usage.into()),
    };
    let layers: Option<usize> = match args.get(2).map(String::as_str) {
        Some("--layers") => Some(args.get(3).ok_or(usage)?.parse()?),
        Some(other) => return Err(format!("unknown argument {other:?}; {usage}").into()),
        None => None,
    };
    let mut json: serde_json::Value = serde_json::from_str(arch::config_json(&name)?)?;
    if let Some(n) = layers {
        json["num_hidden_layers"] = n.into();
    }
    let config = qlora_webgpu::model::config::ModelConfig::from_json("config.json", json.to_string().as_bytes())?;
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&json)?)?;
    let mut rng = SplitMix64::new(1);
    let mut tensors = Vec::new();
    for (tname, shape) in config.tensor_shapes() {
        let n: usize = shape.iter().product();
        let mut data = Vec::with_capacity(2 * n);
        let norm = tname.ends_with("norm.weight");
        let bias = tname.ends_with(".bias");
        for _ in 0..n {
            let x = if norm {
                1.0f32
            } else if bias {
                0.01
            } else {
                ((rng.uniform() * 2.0 - 1.0) * 0.03) as f32
            };
            // bf16: the top half of the f32, rounded to nearest even.
            let b = x.to_bits();
            let r = ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16;
            data.extend_from_slice(&r.to_le_bytes());
        }
        tensors.push(RawTensor { name: tname, dtype: Dtype::BF16, shape, data });
    }
    let bytes = serialize_tensors(&tensors, Some([("format".to_string(), "pt".to_string())].into()))?;
    drop(tensors);
    std::fs::write(out.join("model.safetensors"), bytes)?;
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/model");
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(tok.join(f), out.join(f))?;
    }
    eprintln!("wrote {} ({name}{}): {} layers, hidden {}, vocab {}", out.display(), layers.map_or(String::new(), |n| format!(", {n} layers kept")), config.num_hidden_layers, config.hidden_size, config.vocab_size);
    Ok(())
}
