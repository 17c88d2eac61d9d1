//! What the subcommands share: opening a model (a .gguf file or a Hugging Face folder) and an
//! adapter folder, the base precision flags, sampling flags, and reading prompts.

use anyhow::{bail, Context, Result};
use clap::Args;
use qlora_webgpu::data::chat::Message;
use qlora_webgpu::generate::SamplingConfig;
use qlora_webgpu::gpu::GpuContext;
use qlora_webgpu::io::hf::MmapDir;
use qlora_webgpu::lora::peft::read_host_adapter;
use qlora_webgpu::lora::HostAdapter;
use qlora_webgpu::session::{BaseQuant, LoadedModel, ModelSource, Prompt};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::rc::Rc;

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    Ok(qlora_webgpu::io::files::read_regular(path)?)
}

/// Opens a model: a `.gguf` file or a Hugging Face folder (config.json, *.safetensors,
/// tokenizer.json). Anything else is an error that says what was expected.
pub fn open_model(path: &Path) -> Result<ModelSource> {
    open_model_with(path, None)
}

/// As [`open_model`], the projections quantized to NF4 (blocksize, double quantization) as they
/// are read when `quantize` is given (`qlora train --qlora`: the f32 model never exists on the
/// host).
pub fn open_model_with(path: &Path, quantize: Option<(usize, bool)>) -> Result<ModelSource> {
    let name = path.display().to_string();
    if path.is_dir() {
        let dir = MmapDir::open(path)?;
        return Ok(ModelSource::from_hf_with(&name, &dir, quantize)?);
    }
    if !path.exists() {
        bail!("{name}: no such file or folder (give a .gguf file or a Hugging Face model folder)");
    }
    let is_gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let bytes = read(path)?;
    if is_gguf || bytes.starts_with(b"GGUF") {
        return Ok(ModelSource::from_gguf_with(&name, &bytes, quantize)?);
    }
    bail!("{name}: not a model: expected a .gguf file or a Hugging Face model folder (config.json + *.safetensors + tokenizer.json)")
}

/// Positions the model is loaded for: enough for `need` tokens, at least 2048, and never more
/// than the model's context (`max_position_embeddings`; 8192 when the model does not say), so
/// a large `need` cannot allocate RoPE tables and caches beyond what the model can use.
pub fn positions_for(src: &ModelSource, need: usize) -> usize {
    let cap = src.host.config.max_position_embeddings.unwrap_or(8192);
    need.max(2048.min(cap)).min(cap)
}

/// The frozen base's precision (QLoRA's NF4 as bitsandbytes' `BitsAndBytesConfig`).
#[derive(Args, Clone, Debug, Default, Serialize, Deserialize)]
pub struct QuantArgs {
    /// QLoRA: hold the frozen base projections in 4-bit NormalFloat (bitsandbytes' NF4,
    /// load_in_4bit), with double quantization unless --bnb-4bit-use-double-quant false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub qlora: Option<bool>,
    /// Double-quantize the NF4 block scales (bnb_4bit_use_double_quant; default true).
    #[arg(long, value_name = "BOOL")]
    pub bnb_4bit_use_double_quant: Option<bool>,
    /// NF4 block size (bitsandbytes' blocksize; default 64).
    #[arg(long, value_name = "N")]
    pub bnb_4bit_blocksize: Option<usize>,
}

impl QuantArgs {
    /// f32, or NF4 with the given block size and double quantization.
    pub fn quant(&self) -> Result<BaseQuant> {
        if !self.qlora.unwrap_or(false) {
            if self.bnb_4bit_use_double_quant.is_some() || self.bnb_4bit_blocksize.is_some() {
                bail!("--bnb-4bit-use-double-quant and --bnb-4bit-blocksize need --qlora");
            }
            return Ok(BaseQuant::F32);
        }
        let blocksize = self.bnb_4bit_blocksize.unwrap_or(64);
        if blocksize == 0 || blocksize % 2 != 0 {
            bail!("--bnb-4bit-blocksize {blocksize} must be a positive even number (bitsandbytes uses 64)");
        }
        Ok(BaseQuant::Nf4 { blocksize, double_quant: self.bnb_4bit_use_double_quant.unwrap_or(true) })
    }
}

/// Loads a model onto the GPU for `need` positions.
pub fn load_model(ctx: &Rc<GpuContext>, path: &Path, quant: BaseQuant, need: usize) -> Result<LoadedModel> {
    let src = open_model(path)?;
    let pos = positions_for(&src, need);
    Ok(src.upload(ctx, quant, pos)?)
}

/// Reads a PEFT adapter folder for `model`.
pub fn open_adapter(dir: &Path, model: &LoadedModel) -> Result<HostAdapter> {
    if !dir.is_dir() {
        bail!("{}: no such adapter folder (expected adapter_config.json + adapter_model.safetensors)", dir.display());
    }
    Ok(read_host_adapter(dir, &model.model.cfg)?)
}

/// Sampling flags.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens whose probability adds up to p.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The sampler settings (eos ids come from the model).
    pub fn config(&self) -> Result<SamplingConfig> {
        let c = SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            stop_strings: self.stop.clone(),
            ..SamplingConfig::default()
        };
        c.validate()?;
        Ok(c)
    }
}

/// A prompt: chat (a user message, with an optional system message) when the model has a chat
/// template and `raw` is false; raw text otherwise.
pub fn prompt(model: &LoadedModel, text: &str, system: Option<&str>, raw: bool) -> Prompt {
    if raw || model.template.is_none() {
        return Prompt::Raw(text.to_owned());
    }
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(Message::new("system", s));
    }
    m.push(Message::new("user", text));
    Prompt::Chat(m)
}

/// Prompts from a JSONL file: each line `{"messages": [...]}` (the conversation so far; a final
/// assistant turn is dropped, so a training file works as prompts), `{"prompt": ...}` or
/// `{"text": ...}`; the text shown for each is its last user message or its prompt.
pub fn read_prompts(path: &Path) -> Result<Vec<(String, Prompt)>> {
    let text = String::from_utf8(read(path)?).with_context(|| format!("{}: not UTF-8", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}: line {}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        if v.is_string() {
            bail!("{}: expected {{\"messages\": [...]}}, {{\"prompt\": ...}} or {{\"text\": ...}}", at());
        }
        match Prompt::from_json(&v, true).map_err(|e| anyhow::anyhow!("{}: {e}", at()))? {
            Prompt::Chat(mut m) => {
                // A final assistant turn is dropped, so a training file works as prompts.
                if m.last().is_some_and(|x| x.role == "assistant") {
                    m.pop();
                }
                let shown = m.iter().rev().find(|x| x.role == "user").map(|x| x.content.clone()).with_context(|| format!("{}: no user message", at()))?;
                out.push((shown, Prompt::Chat(m)));
            }
            Prompt::Raw(p) => out.push((p.clone(), Prompt::Raw(p))),
        }
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// Mebibytes, one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}
