//! Adapters and merged models out to GGUF, for llama.cpp (and what builds on it: Ollama, LM
//! Studio, wllama). The files follow what llama.cpp's own converters write for the same input
//! (`convert_lora_to_gguf.py`, `convert_hf_to_gguf.py`; facts taken from them, no code):
//!
//! - **LoRA adapter** ([`adapter_to_gguf`]): `general.architecture` (the base's), `general.type =
//!   "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (f32), `general.file_type`,
//!   `general.quantization_version`; per adapted projection `blk.{i}.{attn_q|attn_k|attn_v|
//!   attn_output|ffn_gate|ffn_up|ffn_down}.weight.lora_a` (PEFT's lora_A, PyTorch shape (r, in):
//!   ggml ne [in, r]) and `.lora_b` (lora_B, (out, r): ne [r, out]). For architecture "llama"
//!   the rows of lora_B of attn_q and attn_k are permuted as llama.cpp permutes the base
//!   weights' rows ([`permute_rows`] with the head count, and the kv head count for attn_k), so
//!   that B·A lines up with the permuted base. llama.cpp scales every module by alpha / r (r
//!   from the tensor): an rsLoRA adapter or one with `alpha_pattern` is written with the alpha
//!   that gives each module its PEFT scale, and refused when no single alpha does.
//! - **Merged model** ([`model_to_gguf`]): `general.*`, `{arch}.*` hyperparameters, tokenizer
//!   metadata and chat template, and every weight under its llama.cpp name (q/k rows permuted
//!   for "llama"); 1-D tensors (norms, biases, `rope_freqs.weight`) stay F32.
//!
//! Types: F32; F16 (round to nearest even); Q8_0 (llama.cpp's reference quantizer: per block of
//! 32, d = max|x| / 127, q = round(x / d) half away from zero, d stored as f16). As the
//! converters do, a tensor whose rows are not whole Q8_0 blocks (lora_b with r < 32) falls back
//! to F16.

use crate::data::tokenizer::Tokenizer;
use crate::io::gguf::{gguf_name, GgmlType, GgufValue};
use crate::io::gguf_write::{permute_rows, GgufWriter};
use crate::io::HostTensor;
use crate::io::half::f32_to_f16_bits;
use crate::lora::{module_name, HostAdapter};
use crate::model::config::{Architecture, ModelConfig, RopeScaling};
use crate::model::llama::TARGETS;
use crate::{Error, Result};

/// Element type of the tensors of a written GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufDtype {
    /// F32 (llama.cpp file type ALL_F32, 0).
    F32,
    /// F16 (MOSTLY_F16, 1).
    F16,
    /// Q8_0 (MOSTLY_Q8_0, 7).
    Q8_0,
}

impl GgufDtype {
    /// "f32", "f16" or "q8_0" (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            other => Err(Error::Invalid(format!("GGUF type {other:?}: expected f32, f16 or q8_0"))),
        }
    }
    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_*).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }
}

/// llama.cpp's reference Q8_0 quantization of `x` (a whole number of 32-element blocks).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// `data` (rows of `row` values) encoded as `dtype`: (the type used, bytes). Q8_0 falls back
/// to F16 when `row` is not a multiple of 32; `force_f32` keeps F32 (1-D tensors).
pub fn encode(data: &[f32], row: usize, dtype: GgufDtype, force_f32: bool) -> (GgmlType, Vec<u8>) {
    let f32s = || data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let f16s = || data.iter().flat_map(|&v| f32_to_f16_bits(v).to_le_bytes()).collect::<Vec<u8>>();
    match (dtype, force_f32) {
        (_, true) | (GgufDtype::F32, _) => (GgmlType::F32, f32s()),
        (GgufDtype::F16, _) => (GgmlType::F16, f16s()),
        (GgufDtype::Q8_0, _) if row % 32 == 0 => (GgmlType::Q8_0, quantize_q8_0(data)),
        (GgufDtype::Q8_0, _) => (GgmlType::F16, f16s()),
    }
}

/// llama.cpp's architecture name for `cfg`: "llama" (Llama and Mistral, as convert_hf_to_gguf
/// maps them; q/k rows permuted) or "qwen2"; an error naming what llama.cpp's llama/qwen2
/// graphs do not express.
pub fn gguf_arch(cfg: &ModelConfig) -> Result<&'static str> {
    match cfg.architecture {
        Architecture::Llama | Architecture::Mistral => {
            if cfg.attention_bias || cfg.mlp_bias {
                return Err(Error::Invalid(
                    "a Llama model with attention_bias / mlp_bias: not written to GGUF (convert_hf_to_gguf writes no such biases for \"llama\")".into(),
                ));
            }
            Ok("llama")
        }
        Architecture::Qwen2 => Ok("qwen2"),
    }
}

/// The row-permutation head count of HF tensor `gname` (a llama.cpp name) under `arch`.
fn permute_heads(arch: &str, cfg: &ModelConfig, gname: &str) -> Option<usize> {
    if arch != "llama" {
        return None;
    }
    if gname.contains(".attn_q.") {
        Some(cfg.num_attention_heads)
    } else if gname.contains(".attn_k.") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

fn permuted(data: &[f32], rows: usize, heads: usize, what: &str) -> Result<Vec<f32>> {
    permute_rows(data, rows, heads)
        .ok_or_else(|| Error::Invalid(format!("{what}: {rows} rows do not split into {heads} heads of even size")))
}

/// The GGUF LoRA adapter of `h` for a base of config `cfg` (see the module docs). `name`
/// becomes `general.name`. Errors name what llama.cpp cannot apply: DoRA is refused before
/// this point (PEFT's reader), an architecture llama.cpp lacks, scales no single alpha gives.
pub fn adapter_to_gguf(h: &HostAdapter, cfg: &ModelConfig, dtype: GgufDtype, name: Option<&str>) -> Result<Vec<u8>> {
    let arch = gguf_arch(cfg)?;
    let lcfg = cfg.to_llama();
    h.check(&lcfg)?;
    // llama.cpp scales every module by alpha / r: one alpha must give each module its scale.
    let mut alpha: Option<(f64, String)> = None;
    for (l, mods) in h.layers.iter().enumerate() {
        for (m, x) in mods.iter().enumerate() {
            let Some(x) = x else { continue };
            let module = module_name(l, m);
            let a = h.config.scale_for_f64(&module) * x.r as f64;
            match &alpha {
                None => alpha = Some((a, module)),
                Some((a0, m0)) if ((a - a0) / a0).abs() > 1e-6 => {
                    return Err(Error::Invalid(format!(
                        "llama.cpp scales every module of an adapter by one adapter.lora.alpha / r, but {m0} needs alpha {a0} and \
                         {module} needs {a} (rank_pattern / alpha_pattern{}): not expressible as one GGUF adapter; merge instead \
                         (qlora merge … --out model.gguf)",
                        if h.config.use_rslora { " with use_rslora" } else { "" }
                    )))
                }
                _ => {}
            }
        }
    }
    let (alpha, _) = alpha.ok_or_else(|| Error::Invalid("the adapter adapts no module".into()))?;
    if alpha == 0.0 {
        return Err(Error::Invalid("lora_alpha 0: llama.cpp reads adapter.lora.alpha 0 as \"no alpha\" (scale 1)".into()));
    }
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", arch);
    w.kv_str("general.type", "adapter");
    if let Some(n) = name {
        w.kv_str("general.name", n);
    }
    w.kv_str("adapter.type", "lora");
    w.kv("adapter.lora.alpha", GgufValue::F32(alpha as f32));
    w.kv("general.quantization_version", GgufValue::U32(2));
    w.kv("general.file_type", GgufValue::U32(dtype.file_type()));
    for (l, mods) in h.layers.iter().enumerate() {
        for (m, x) in mods.iter().enumerate() {
            let Some(x) = x else { continue };
            let base = gguf_name(&format!("{}.weight", module_name(l, m))).expect("a projection has a GGUF name");
            let b = match permute_heads(arch, cfg, &base) {
                Some(n) => permuted(&x.b, x.out_features, n, &format!("{base}.lora_b"))?,
                None => x.b.clone(),
            };
            let (ta, da) = encode(&x.a, x.in_features, dtype, false);
            w.tensor(&format!("{base}.lora_a"), &[x.r, x.in_features], ta, da)?;
            let (tb, db) = encode(&b, x.r, dtype, false);
            w.tensor(&format!("{base}.lora_b"), &[x.out_features, x.r], tb, db)?;
        }
    }
    Ok(w.to_bytes())
}

/// llama.cpp's `rope_freqs.weight` (per-frequency divisors, head_dim / 2 values) for a config
/// whose RoPE scaling llama.cpp expresses that way (Llama 3 scaling, or factors read from a
/// GGUF); None when there is none.
fn rope_freqs(cfg: &ModelConfig) -> Option<Vec<f32>> {
    if let Some(f) = &cfg.rope_freq_factors {
        return Some(f.clone());
    }
    match &cfg.rope_scaling {
        Some(s @ RopeScaling::Llama3 { .. }) => {
            let plain = crate::ops::rope::inv_freq(cfg.rope_theta, cfg.head_dim, None);
            let scaled = crate::ops::rope::inv_freq(cfg.rope_theta, cfg.head_dim, Some(s));
            Some(plain.iter().zip(&scaled).map(|(p, s)| p / s).collect())
        }
        _ => None,
    }
}

/// A complete GGUF model: `cfg`'s hyperparameters as `{arch}.*` metadata, the `tensors`
/// (Hugging Face names and shapes, f32; every tensor of [`ModelConfig::tensor_shapes`]) under
/// llama.cpp names as `dtype`, and `extra` metadata (tokenizer.*, general.name, ...) added after
/// the hyperparameters. Errors name what llama.cpp's graph for the architecture lacks.
pub fn model_to_gguf(cfg: &ModelConfig, tensors: &[(String, HostTensor)], extra: &[(String, GgufValue)], dtype: GgufDtype) -> Result<Vec<u8>> {
    let arch = gguf_arch(cfg)?;
    let mut w = GgufWriter::new();
    let u32v = |v: usize| GgufValue::U32(v as u32);
    w.kv_str("general.architecture", arch);
    w.kv_str("general.type", "model");
    for (k, v) in extra.iter().filter(|(k, _)| k.starts_with("general.")) {
        w.kv(k, v.clone());
    }
    let key = |k: &str| format!("{arch}.{k}");
    w.kv(&key("block_count"), u32v(cfg.num_hidden_layers));
    w.kv(&key("context_length"), u32v(cfg.max_position_embeddings.unwrap_or(2048)));
    w.kv(&key("embedding_length"), u32v(cfg.hidden_size));
    w.kv(&key("feed_forward_length"), u32v(cfg.intermediate_size));
    w.kv(&key("attention.head_count"), u32v(cfg.num_attention_heads));
    w.kv(&key("attention.head_count_kv"), u32v(cfg.num_key_value_heads));
    w.kv(&key("rope.freq_base"), GgufValue::F32(cfg.rope_theta as f32));
    w.kv(&key("attention.layer_norm_rms_epsilon"), GgufValue::F32(cfg.rms_norm_eps as f32));
    w.kv(&key("attention.key_length"), u32v(cfg.head_dim));
    w.kv(&key("attention.value_length"), u32v(cfg.head_dim));
    w.kv("general.file_type", GgufValue::U32(dtype.file_type()));
    w.kv(&key("vocab_size"), u32v(cfg.vocab_size));
    w.kv(&key("rope.dimension_count"), u32v(cfg.head_dim));
    match &cfg.rope_scaling {
        None | Some(RopeScaling::Llama3 { .. }) => {}
        Some(RopeScaling::Linear { factor }) => {
            w.kv_str(&key("rope.scaling.type"), "linear");
            w.kv(&key("rope.scaling.factor"), GgufValue::F32(*factor as f32));
        }
        Some(RopeScaling::FreqFactors { .. }) if cfg.rope_freq_factors.is_some() => {}
        Some(RopeScaling::FreqFactors { .. }) => {
            return Err(Error::Invalid("per-frequency RoPE factors without rope_freq_factors: not expressible".into()))
        }
    }
    if cfg.rope_freq_factors.is_some() && cfg.rope_scaling.is_some() {
        return Err(Error::Invalid("both a RoPE scaling type and per-frequency factors: llama.cpp would apply only the factors".into()));
    }
    if arch == "qwen2" && cfg.sliding_window.is_some() {
        return Err(Error::Invalid("a Qwen2 model with use_sliding_window: llama.cpp's qwen2 graph attends over the full context".into()));
    }
    w.kv("general.quantization_version", GgufValue::U32(2));
    for (k, v) in extra.iter().filter(|(k, _)| !k.starts_with("general.")) {
        w.kv(k, v.clone());
    }
    let lookup = |n: &str| tensors.iter().find(|(name, _)| name == n).map(|(_, t)| t);
    for (name, shape) in cfg.tensor_shapes() {
        let t = lookup(&name).ok_or_else(|| Error::Invalid(format!("model_to_gguf: tensor {name} missing")))?;
        if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
            return Err(Error::Invalid(format!("model_to_gguf: tensor {name} has shape {:?}, want {shape:?}", t.shape)));
        }
        let gname = gguf_name(&name).ok_or_else(|| Error::Invalid(format!("no llama.cpp name for tensor {name}")))?;
        let data = match permute_heads(arch, cfg, &gname) {
            Some(n) => permuted(&t.data, shape[0], n, &gname)?,
            None => t.data.clone(),
        };
        let row = *shape.last().expect("a shape");
        let (ty, bytes) = encode(&data, row, dtype, shape.len() == 1);
        w.tensor(&gname, &shape, ty, bytes)?;
    }
    if let Some(f) = rope_freqs(cfg) {
        if f.len() != cfg.head_dim / 2 {
            return Err(Error::Invalid(format!("rope_freqs: {} factors for head_dim {}", f.len(), cfg.head_dim)));
        }
        let (ty, bytes) = encode(&f, f.len(), GgufDtype::F32, true);
        w.tensor("rope_freqs.weight", &[f.len()], ty, bytes)?;
    }
    Ok(w.to_bytes())
}

/// Tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) for a Hugging Face
/// tokenizer.json, as llama.cpp reads a byte-level BPE tokenizer ("gpt2"): tokens by id, token
/// types (special added tokens 3 = control, other added tokens 4 = user-defined, the rest 1 =
/// normal), merges as "left right", the bos/eos/unk/pad ids, `add_bos_token`, and the
/// pre-tokenizer name of the tokenizer.json's own split rule: ByteLevel with GPT-2's regex ->
/// "gpt2", Llama 3's split regex -> "llama-bpe". Other tokenizers are an error naming why.
pub fn tokenizer_kv_from_hf(tok: &Tokenizer, chat_template: Option<&str>) -> Result<Vec<(String, GgufValue)>> {
    let bad = |what: String| Error::Invalid(format!("tokenizer.json: {what}: not written to GGUF (only byte-level BPE tokenizers are)"));
    let json: serde_json::Value = serde_json::from_str(&tok.inner().to_string(false).map_err(|e| bad(format!("{e}")))?)
        .map_err(|e| bad(format!("{e}")))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!("model type {}", model["type"])));
    }
    let pt = &json["pre_tokenizer"];
    let pre = if pt["type"] == "ByteLevel" && pt["use_regex"] == true && pt["add_prefix_space"] != true {
        "gpt2"
    } else if pt["type"] == "Sequence"
        && pt["pretokenizers"].as_array().is_some_and(|a| {
            a.len() == 2
                && a[0]["type"] == "Split"
                && a[0]["pattern"]["Regex"] == crate::data::tokenizer::LLAMA3_SPLIT_REGEX
                && a[1]["type"] == "ByteLevel"
                && a[1]["use_regex"] == false
        })
    {
        "llama-bpe"
    } else {
        return Err(bad(format!("pre-tokenizer {pt} (known: ByteLevel with GPT-2's regex, Llama 3's split)")));
    };
    let vocab = tok.inner().get_vocab(true);
    let n = tok.vocab_size();
    let mut tokens = vec![None; n];
    for (t, &id) in &vocab {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(t.clone());
        }
    }
    let mut types = vec![1i32; n];
    for a in json["added_tokens"].as_array().into_iter().flatten() {
        if let Some(id) = a["id"].as_u64().filter(|&i| (i as usize) < n) {
            types[id as usize] = if a["special"] == true { 3 } else { 4 };
        }
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| bad(format!("no token has id {i} (ids must be 0..{n})"))))
        .collect::<Result<Vec<_>>>()?;
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("no merges".into()))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or(""))),
            other => Err(bad(format!("merge {other}"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let with = tok.encode("a", true)?;
    let without = tok.encode("a", false)?;
    let add_bos = with.len() > without.len() && tok.bos_id().is_some() && with.first().copied() == tok.bos_id();
    let s = GgufValue::String;
    let mut kv = vec![
        ("tokenizer.ggml.model".to_string(), s("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), s(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), GgufValue::Array(tokens.into_iter().map(s).collect())),
        ("tokenizer.ggml.token_type".to_string(), GgufValue::Array(types.into_iter().map(GgufValue::I32).collect())),
        ("tokenizer.ggml.merges".to_string(), GgufValue::Array(merges.into_iter().map(s).collect())),
    ];
    for (k, id) in [
        ("tokenizer.ggml.bos_token_id", tok.bos_id()),
        ("tokenizer.ggml.eos_token_id", tok.eos_id()),
        ("tokenizer.ggml.unknown_token_id", tok.unk_id()),
        ("tokenizer.ggml.padding_token_id", tok.pad_id()),
    ] {
        if let Some(id) = id {
            kv.push((k.to_string(), GgufValue::U32(id)));
        }
    }
    kv.push(("tokenizer.ggml.add_bos_token".to_string(), GgufValue::Bool(add_bos)));
    if let Some(t) = chat_template {
        kv.push(("tokenizer.chat_template".to_string(), s(t.to_owned())));
    }
    Ok(kv)
}

/// The PEFT lora_A and lora_B of every module of a GGUF LoRA adapter `bytes`, read back with
/// the GGUF reader and with the q/k permutation of lora_B undone: (layer, module index in
/// [`TARGETS`], A (r, in), B (out, r)) in file order. For tests and inspection.
pub fn read_gguf_adapter(file: &str, bytes: &[u8], cfg: &ModelConfig) -> Result<Vec<(usize, usize, HostTensor, HostTensor)>> {
    let g = crate::io::gguf::GgufFile::parse(file, bytes)?;
    let arch = g.get("general.architecture").and_then(GgufValue::as_str).unwrap_or("");
    let mut out = Vec::new();
    for t in g.tensors().iter().filter(|t| t.name.ends_with(".lora_a")) {
        let base = t.name.trim_end_matches(".lora_a");
        let bname = format!("{base}.lora_b");
        let bi = g.tensor(&bname).ok_or_else(|| Error::format(file, format!("{} without {bname}", t.name)))?;
        let (l, m) = (0..cfg.num_hidden_layers)
            .flat_map(|l| (0..TARGETS.len()).map(move |m| (l, m)))
            .find(|&(l, m)| gguf_name(&format!("{}.weight", module_name(l, m))).as_deref() == Some(base))
            .ok_or_else(|| Error::format(file, format!("{}: not a projection of this model", t.name)))?;
        let a = HostTensor { shape: t.shape(), data: g.tensor_f32(&t.name)? };
        let mut b = HostTensor { shape: bi.shape(), data: g.tensor_f32(&bname)? };
        if let Some(n) = permute_heads(arch, cfg, base) {
            b.data = crate::io::gguf::unpermute_rows(&b.data, b.shape[0], n)
                .ok_or_else(|| Error::format(file, format!("{bname}: rows do not split into {n} heads")))?;
        }
        out.push((l, m, a, b));
    }
    Ok(out)
}
