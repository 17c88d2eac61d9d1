//! Llama-family GGUF models turned into a [`HostModel`] with Hugging Face names: llama.cpp's
//! tensor names and q/k row permutation undone, the config read from `{arch}.*` metadata.

use std::collections::{BTreeMap, BTreeSet};

use crate::io::{HostModel, HostTensor, HostWeight, TensorSource};
use crate::model::config::{names, Architecture, ModelConfig, RopeScaling};
use crate::{Error, Result};
use super::file::{GgmlType, GgufFile, GgufHeader, GgufTensorInfo, GgufValue};

/// Undoes llama.cpp's q/k row permutation for a (rows, cols) row-major `w` with `n_head` heads.
///
/// convert_hf_to_gguf's `permute(w, n_head, n_head_kv)` (n_head replaced by n_head_kv when they
/// differ, i.e. for attn_k) computes
/// `w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)`: with
/// head_dim = rows / n_head and half = head_dim / 2, GGUF row h*head_dim + 2j + s holds Hugging
/// Face row h*head_dim + s*half + j (s in {0, 1}, j < half). The inverse used here is
/// `hf[h*head_dim + s*half + j] = gguf[h*head_dim + 2j + s]`, i.e.
/// `gguf.reshape(n_head, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)` (the same as
/// transformers' `reverse_permute_weights`). Applies to biases too (cols = 1).
/// `None` when rows is not a multiple of 2 * n_head or the length is not rows * cols.
pub fn unpermute_rows(w: &[f32], rows: usize, n_head: usize) -> Option<Vec<f32>> {
    move_head_rows(w, rows, n_head, false)
}

/// The q/k row permutation (`to_gguf`: Hugging Face -> GGUF order) or its inverse: for head h,
/// GGUF row h*head_dim + 2j + s is Hugging Face row h*head_dim + s*half + j.
pub(crate) fn move_head_rows(w: &[f32], rows: usize, n_head: usize, to_gguf: bool) -> Option<Vec<f32>> {
    if n_head == 0 || rows == 0 || !rows.is_multiple_of(2 * n_head) || !w.len().is_multiple_of(rows) {
        return None;
    }
    let cols = w.len() / rows;
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for j in 0..half {
                let (gguf, hf) = (h * hd + 2 * j + s, h * hd + s * half + j);
                let (dst, src) = if to_gguf { (gguf, hf) } else { (hf, gguf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// The llama.cpp name of the Hugging Face tensor `name` (`model.embed_tokens.weight` ->
/// `token_embd.weight`, `model.layers.{i}.self_attn.q_proj.weight` -> `blk.{i}.attn_q.weight`,
/// ..., `model.norm.weight` -> `output_norm.weight`, `lm_head.weight` -> `output.weight`).
pub fn gguf_name(name: &str) -> Option<String> {
    match name {
        names::EMBED => return Some("token_embd.weight".into()),
        names::FINAL_NORM => return Some("output_norm.weight".into()),
        names::LM_HEAD => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}.{kind}"))
}

/// A GGUF model: the host model (Hugging Face names and layout) plus the file's metadata
/// (tokenizer.ggml.*, tokenizer.chat_template, general.*, ...).
#[derive(Clone, Debug)]
pub struct GgufModel {
    /// The weights, dequantized to f32, q/k rows restored to the Hugging Face order.
    pub model: HostModel,
    /// GGUF version of the file.
    pub version: u32,
    /// Every metadata key-value pair.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensor types of the file, by llama.cpp name.
    pub tensor_types: BTreeMap<String, GgmlType>,
}

impl GgufModel {
    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
    /// `tokenizer.chat_template`, if present.
    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template").and_then(GgufValue::as_str)
    }
}

/// Where [`GgufSource`] gets a tensor's f32 values: converted from the whole file's bytes as
/// asked for, or converted earlier as a stream brought each tensor's bytes (by llama.cpp name).
pub(super) enum TensorData<'g, 'a> {
    File(&'g GgufFile<'a>),
    Converted(BTreeMap<String, Vec<f32>>),
}

struct GgufSource<'g, 'a> {
    h: &'g GgufHeader,
    data: TensorData<'g, 'a>,
    /// (n_head for attn_q, n_head for attn_k) when llama.cpp permuted their rows.
    permuted: Option<(usize, usize)>,
    used: BTreeSet<String>,
}

/// (n_head for attn_q, n_head for attn_k) when llama.cpp permuted their rows ("llama" files).
pub(super) fn permuted_heads(config: &ModelConfig) -> Option<(usize, usize)> {
    (config.architecture != Architecture::Qwen2).then_some((config.num_attention_heads, config.num_key_value_heads))
}

/// One tensor's bytes (`data`, its `nbytes`) as the host model holds them: dequantized to f32,
/// the q/k rows of a permuted file (`permuted`) restored to the Hugging Face order, a token
/// embedding or output layer in a quantized type other than Q8_0 rounded to f16. The whole-file
/// loader and the streamed one ([`super::GgufStream`]) both convert with this.
pub(super) fn convert_tensor(file: &str, info: &GgufTensorInfo, data: &[u8], permuted: Option<(usize, usize)>) -> Result<Vec<f32>> {
    let gname = info.name.as_str();
    let mut data = info.to_f32(file, data)?;
    if let Some((nq, nk)) = permuted {
        let heads = if gname.contains(".attn_q.") {
            Some(nq)
        } else if gname.contains(".attn_k.") {
            Some(nk)
        } else {
            None
        };
        if let Some(n) = heads {
            let rows = info.shape().first().copied().unwrap_or(0);
            data = unpermute_rows(&data, rows, n).ok_or_else(|| {
                Error::format(file, format!("tensor `{gname}`: {rows} rows do not split into {n} heads of even size"))
            })?;
        }
    }
    // A token embedding or output layer quantized in a type other than Q8_0 (Q4_K, Q6_K, ...:
    // values that need more than 16 bits to be exact) is rounded to f16, so it is held in
    // 16 bits on the device instead of 32 (a Q8_0 table stays exact, in 8 bits).
    let table = gname == "token_embd.weight" || gname == "output.weight";
    if table && !matches!(info.ty.name(), Some("F32" | "F16" | "BF16" | "Q8_0")) {
        data.iter_mut().for_each(|v| *v = crate::gpu::round_f16(*v));
    }
    Ok(data)
}

impl TensorSource for GgufSource<'_, '_> {
    fn present(&self) -> (String, &'static str, usize) {
        let field = if self.permuted.is_some() { "llama.block_count" } else { "qwen2.block_count" };
        (self.h.file().to_owned(), field, self.h.tensors().len())
    }
    fn fetch(&mut self, name: &str, shape: &[usize], _projection: bool) -> Result<HostWeight> {
        let file = self.h.file();
        let gname = gguf_name(name).ok_or_else(|| Error::Invalid(format!("no GGUF name for `{name}`")))?;
        let info = check_tensor(self.h, name, &gname, shape)?;
        let data = match &mut self.data {
            TensorData::File(g) => convert_tensor(file, info, g.tensor_data(&gname)?, self.permuted)?,
            TensorData::Converted(m) => m
                .remove(&gname)
                .ok_or_else(|| Error::Invalid(format!("tensor `{gname}` of {file} was not converted while streaming")))?,
        };
        self.used.insert(gname);
        Ok(HostWeight::F32(HostTensor { shape: shape.to_vec(), data }))
    }
}

/// The header's tensor `gname` (Hugging Face `name`), checked to be there with `shape`.
pub(super) fn check_tensor<'h>(h: &'h GgufHeader, name: &str, gname: &str, shape: &[usize]) -> Result<&'h GgufTensorInfo> {
    let file = h.file();
    let info = h.tensor(gname).ok_or_else(|| Error::format(file, format!("missing tensor `{gname}` (Hugging Face `{name}`)")))?;
    if info.shape() != shape {
        return Err(Error::format(
            file,
            format!("tensor `{gname}`: shape {:?} (ggml dims {:?}), expected {shape:?} from the model metadata", info.shape(), info.dims),
        ));
    }
    Ok(info)
}

/// The model of a parsed header whose tensors `data` gives (the whole file, or a stream's
/// converted tensors): the host model built (projections quantized when `quantize` says), the
/// tensors it did not use listed, the metadata kept.
pub(super) fn assemble(h: &GgufHeader, config: ModelConfig, data: TensorData, quantize: Option<(usize, bool)>) -> Result<GgufModel> {
    let permuted = permuted_heads(&config);
    let mut src = GgufSource { h, data, permuted, used: BTreeSet::new() };
    let mut model = HostModel::build_with(config, &mut src, quantize)?;
    if h.tensor("rope_freqs.weight").is_some() {
        src.used.insert("rope_freqs.weight".into());
    }
    model.unused = h.tensors().iter().map(|t| t.name.clone()).filter(|n| !src.used.contains(n)).collect();
    model.unused.sort();
    Ok(GgufModel {
        model,
        version: h.version,
        metadata: h.metadata().iter().cloned().collect(),
        tensor_types: h.tensors().iter().map(|t| (t.name.clone(), t.ty)).collect(),
    })
}

/// Reads a Llama-family GGUF model (`general.architecture` "llama" — Llama, SmolLM2, Mistral
/// as llama.cpp converts them — or "qwen2") from `bytes` (`file` names it in errors): the config
/// from `{arch}.*` metadata (block_count, embedding_length, feed_forward_length,
/// attention.head_count, attention.head_count_kv, attention.key_length, rope.freq_base,
/// attention.layer_norm_rms_epsilon, context_length, rope.scaling.*; vocabulary size from
/// tokenizer.ggml.tokens; tied when there is no output.weight), every tensor dequantized to f32
/// under its Hugging Face name (a token embedding or output layer in a quantized type other than
/// Q8_0 rounded to f16, so that it is held in 16 bits), and attn_q/attn_k rows of "llama" files restored with
/// [`unpermute_rows`].
pub fn load_gguf(file: &str, bytes: &[u8]) -> Result<GgufModel> {
    load_gguf_with(file, bytes, None)
}

/// As [`load_gguf`], with every projection quantized to NF4 (blocksize, double quantization) as
/// it is dequantized when `quantize` is given (QLoRA).
pub fn load_gguf_with(file: &str, bytes: &[u8], quantize: Option<(usize, bool)>) -> Result<GgufModel> {
    let g = GgufFile::parse(file, bytes)?;
    let config = gguf_config(&g)?;
    assemble(g.header(), config, TensorData::File(&g), quantize)
}

/// The [`ModelConfig`] of a GGUF file's metadata (see [`load_gguf`]).
pub fn gguf_config(g: &GgufFile) -> Result<ModelConfig> {
    let mut config = header_config(g.header())?;
    if g.tensor("rope_freqs.weight").is_some() {
        config.rope_freq_factors = Some(check_rope_factors(g.file(), g.tensor_f32("rope_freqs.weight")?)?);
    }
    Ok(config)
}

/// `rope_freqs.weight`'s values, checked: positive finite factors.
pub(super) fn check_rope_factors(file: &str, factors: Vec<f32>) -> Result<Vec<f32>> {
    if let Some((i, f)) = factors.iter().enumerate().find(|(_, f)| !(f.is_finite() && **f > 0.0)) {
        return Err(Error::format(file, format!("tensor `rope_freqs.weight`: value {f} at {i} is not a positive finite factor")));
    }
    Ok(factors)
}

/// [`gguf_config`] from the header alone: `rope_freq_factors` is left to the caller (it needs
/// `rope_freqs.weight`'s data; its shape is checked here).
pub(super) fn header_config(g: &GgufHeader) -> Result<ModelConfig> {
    let file = g.file();
    let arch_v = g
        .get("general.architecture")
        .ok_or_else(|| Error::format(file, "missing metadata `general.architecture`"))?;
    let arch = arch_v
        .as_str()
        .ok_or_else(|| Error::format(file, "metadata `general.architecture` is not a string"))?;
    let architecture = match arch {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(Error::format(
                file,
                format!("metadata `general.architecture`: \"{other}\" is not supported (supported: llama, qwen2)", other = crate::error::quote(other)),
            ))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let uint = |k: &str| -> Result<Option<usize>> {
        let k = key(k);
        g.get(&k)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| Error::format(file, format!("metadata `{k}`: {v}, expected a non-negative integer", v = crate::error::quote(&format!("{v:?}")))))
            })
            .transpose()
    };
    let req = |k: &str| -> Result<usize> {
        match uint(k)? {
            Some(v) if v > 0 => Ok(v),
            Some(_) => Err(Error::format(file, format!("metadata `{}` is 0", key(k)))),
            None => Err(Error::format(file, format!("missing metadata `{}`", key(k)))),
        }
    };
    let float = |k: &str| -> Result<Option<f64>> {
        let k = key(k);
        g.get(&k)
            .map(|v| {
                v.as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| Error::format(file, format!("metadata `{k}`: {v}, expected a number", v = crate::error::quote(&format!("{v:?}")))))
            })
            .transpose()
    };
    let hidden_size = req("embedding_length")?;
    let num_hidden_layers = req("block_count")?;
    let intermediate_size = req("feed_forward_length")?;
    let heads = req("attention.head_count")?;
    let kv_heads = uint("attention.head_count_kv")?.unwrap_or(heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::format(
            file,
            format!("metadata `{}`: {kv_heads} does not divide the head count {heads}", key("attention.head_count_kv")),
        ));
    }
    let head_dim = match uint("attention.key_length")? {
        Some(d) => d,
        None if hidden_size % heads == 0 => hidden_size / heads,
        None => {
            return Err(Error::format(
                file,
                format!("metadata `{}`: {hidden_size} is not a multiple of the head count {heads}", key("embedding_length")),
            ))
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::format(file, format!("head dimension {head_dim} is not a positive even number")));
    }
    if let Some(v) = uint("attention.value_length")? {
        if v != head_dim {
            return Err(Error::format(
                file,
                format!("metadata `{}`: {v} differs from the key length {head_dim} (not supported)", key("attention.value_length"), v = crate::error::quote(&v.to_string())),
            ));
        }
    }
    if let Some(r) = uint("rope.dimension_count")? {
        if r != head_dim {
            return Err(Error::format(
                file,
                format!("metadata `{}`: rope on {r} of {head_dim} head dimensions is not supported", key("rope.dimension_count")),
            ));
        }
    }
    let rms_norm_eps = float("attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| Error::format(file, format!("missing metadata `{}`", key("attention.layer_norm_rms_epsilon"))))?;
    let rope_theta = float("rope.freq_base")?.unwrap_or(10000.0);
    let scaling_type = match g.get(&key("rope.scaling.type")) {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| {
            Error::format(file, format!("metadata `{}` is not a string", key("rope.scaling.type")))
        })?),
    };
    let rope_scaling = match scaling_type {
        None | Some("none") => None,
        Some("linear") => {
            let factor = float("rope.scaling.factor")?
                .filter(|f| *f > 0.0)
                .ok_or_else(|| Error::format(file, format!("metadata `{}`: missing or not positive", key("rope.scaling.factor"))))?;
            Some(RopeScaling::Linear { factor })
        }
        Some(other) => {
            return Err(Error::format(
                file,
                format!("metadata `{}`: \"{other}\" is not supported (supported: none, linear)", key("rope.scaling.type"), other = crate::error::quote(other)),
            ))
        }
    };
    if let Some(t) = g.tensor("rope_freqs.weight") {
        if rope_scaling.is_some() {
            return Err(Error::format(file, "both rope.scaling.type and a rope_freqs.weight tensor: not supported"));
        }
        if t.shape() != [head_dim / 2] {
            return Err(Error::format(
                file,
                format!("tensor `rope_freqs.weight`: shape {:?}, expected [{}]", t.shape(), head_dim / 2),
            ));
        }
    }
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::format(file, "missing tensor `token_embd.weight` (Hugging Face `model.embed_tokens.weight`)"))?;
    let vocab_size = match g.get("tokenizer.ggml.tokens") {
        Some(GgufValue::Array(a)) => a.len(),
        Some(_) => return Err(Error::format(file, "metadata `tokenizer.ggml.tokens` is not an array")),
        None => match uint("vocab_size")? {
            Some(v) => v,
            None => embd.shape().first().copied().unwrap_or(0),
        },
    };
    if vocab_size == 0 {
        return Err(Error::format(file, "the vocabulary is empty"));
    }
    let token = |k: &str| -> Result<Option<u32>> {
        g.get(k)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| Error::format(file, format!("metadata `{k}`: {v}, expected a token id", v = crate::error::quote(&format!("{v:?}")))))
            })
            .transpose()
    };
    Ok(ModelConfig {
        architecture,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        rope_freq_factors: None,
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        max_position_embeddings: uint("context_length")?,
        bos_token_id: token("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: token("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        pad_token_id: token("tokenizer.ggml.padding_token_id")?,
        dtype: None,
        attention_bias: false,
        mlp_bias: false,
        sliding_window: None,
        quant_method: None,
    })
}
