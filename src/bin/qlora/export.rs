//! `qlora export`: a PEFT adapter as a llama.cpp GGUF LoRA adapter, or (without --adapter) the
//! model itself as a GGUF; and the GGUF output of `qlora merge … --out model.gguf`.

use crate::common;
use anyhow::{bail, Context, Result};
use clap::Args;
use qlora_webgpu::io::gguf::{GgufFile, GgufValue};
use qlora_webgpu::io::HostTensor;
use qlora_webgpu::lora::gguf::{adapter_to_gguf, model_to_gguf, tokenizer_kv_from_hf, GgufDtype};
use qlora_webgpu::lora::HostAdapter;
use qlora_webgpu::session::{ModelSource, SourceKind};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ExportArgs {
    /// The base model the adapter belongs to: a .gguf file or a Hugging Face folder.
    model: PathBuf,
    /// The PEFT adapter folder (adapter_config.json + adapter_model.safetensors); without it
    /// the model itself is written.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// Tensor type: f32, f16 or q8_0 [default: f32 for an adapter (as convert_lora_to_gguf.py), f16 for a model].
    #[arg(long)]
    dtype: Option<String>,
}

fn dtype(s: Option<&str>, default: GgufDtype) -> Result<GgufDtype> {
    Ok(match s {
        Some(s) => GgufDtype::parse(s)?,
        None => default,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.extension().is_none_or(|e| !e.eq_ignore_ascii_case("gguf")) {
        bail!("{}: the output of a GGUF export must end in .gguf", path.display());
    }
    std::fs::write(path, bytes).with_context(|| format!("{}: cannot write", path.display()))
}

/// Reads adapter folder `dir` for `src`, with messages that say why it cannot be exported:
/// DoRA (llama.cpp has no magnitude vector), an adapter of another model, a target module the
/// model lacks.
pub fn read_adapter_for(dir: &Path, src: &ModelSource, gguf_target: bool) -> Result<HostAdapter> {
    if !dir.is_dir() {
        bail!("{}: no such adapter folder (expected adapter_config.json + adapter_model.safetensors)", dir.display());
    }
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read", cfg_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", cfg_path.display()))?;
    if gguf_target && v.get("use_dora") == Some(&serde_json::Value::Bool(true)) {
        bail!(
            "{}: a DoRA adapter (use_dora true): llama.cpp's GGUF LoRA adapters (adapter.type \"lora\") hold only lora_a and \
             lora_b, and llama.cpp cannot apply DoRA's magnitude vector; merge the adapter into the model instead \
             (qlora merge MODEL --adapter DIR --out model.gguf)",
            dir.display()
        );
    }
    let lcfg = src.host.config.to_llama();
    qlora_webgpu::lora::peft::read_host_adapter(dir, &lcfg).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("shape") || msg.contains("unexpected tensor") || msg.contains("layers") {
            anyhow::anyhow!(
                "{} is an adapter for another model than {} ({} layers, hidden size {}): {msg}",
                dir.display(),
                src.name,
                lcfg.layers,
                lcfg.hidden
            )
        } else {
            anyhow::anyhow!("{msg}")
        }
    })
}

/// Metadata a merged or exported model carries besides its hyperparameters: the source's
/// descriptive `general.*` keys and tokenizer (a GGUF source's `tokenizer.*` keys as they are;
/// for a Hugging Face folder, rebuilt from tokenizer.json and the chat template).
fn model_metadata(path: &Path, src: &ModelSource) -> Result<Vec<(String, GgufValue)>> {
    let skip = ["general.architecture", "general.type", "general.file_type", "general.quantization_version", "general.alignment"];
    match src.kind {
        SourceKind::Gguf => {
            let bytes = common::read(path)?;
            let g = GgufFile::parse(&src.name, &bytes)?;
            Ok(g.metadata()
                .iter()
                .filter(|(k, _)| (k.starts_with("general.") && !skip.contains(&k.as_str())) || k.starts_with("tokenizer."))
                .cloned()
                .collect())
        }
        SourceKind::HfFolder => {
            let mut kv = vec![(
                "general.name".to_string(),
                GgufValue::String(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
            )];
            kv.extend(tokenizer_kv_from_hf(&src.tokenizer, src.template.as_ref().map(|t| t.source()))?);
            Ok(kv)
        }
    }
}

/// Writes `tensors` (the whole model, Hugging Face names) of `src` as a GGUF model.
pub fn write_model_gguf(path: &Path, src: &ModelSource, tensors: &[(String, HostTensor)], out: &Path, dtype: Option<&str>) -> Result<GgufDtype> {
    let dt = self::dtype(dtype, GgufDtype::F16)?;
    let meta = model_metadata(path, src)?;
    let bytes = model_to_gguf(&src.host.config, tensors, &meta, dt).with_context(|| format!("{}: cannot be written as GGUF", src.name))?;
    write(out, &bytes)?;
    Ok(dt)
}

pub fn run(a: ExportArgs) -> Result<()> {
    let src = common::open_model(&a.model)?;
    match &a.adapter {
        Some(dir) => {
            let dt = dtype(a.dtype.as_deref(), GgufDtype::F32)?;
            let h = read_adapter_for(dir, &src, true)?;
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            let bytes = adapter_to_gguf(&h, &src.host.config, dt, name.as_deref())
                .with_context(|| format!("{}: cannot be written as a llama.cpp LoRA adapter", dir.display()))?;
            write(&a.out, &bytes)?;
            let n = h.layers.iter().flatten().filter(|x| x.is_some()).count();
            println!("wrote {} ({:?}, {n} adapted projections, {:.1} MiB): llama.cpp LoRA adapter for {}", a.out.display(), dt, bytes.len() as f64 / 1048576.0, a.model.display());
        }
        None => {
            let tensors: Vec<(String, HostTensor)> = src
                .host
                .config
                .tensor_shapes()
                .into_iter()
                .map(|(name, _)| {
                    let data = src.host.get_f32(&name).with_context(|| format!("tensor {name} missing"))?;
                    let shape = src.host.get(&name).map(|t| match t {
                        qlora_webgpu::io::TensorRef::F32(t) => t.shape.clone(),
                        qlora_webgpu::io::TensorRef::Nf4(q) => q.shape.clone(),
                    });
                    Ok((name, HostTensor { shape: shape.unwrap_or_default(), data }))
                })
                .collect::<Result<_>>()?;
            let dt = write_model_gguf(&a.model, &src, &tensors, &a.out, a.dtype.as_deref())?;
            println!("wrote {} ({dt:?}): {} as a GGUF model", a.out.display(), a.model.display());
        }
    }
    Ok(())
}
