//! `config.json` of a Hugging Face Llama-family checkpoint (Llama, SmolLM/SmolLM2, Mistral,
//! Qwen2) parsed into [`ModelConfig`], with the defaults transformers applies, and the list of
//! tensors (names and shapes) such a model has. No shader: CPU only.
//!
//! Both rope layouts transformers writes are read: transformers 4 puts `rope_theta` and
//! `rope_scaling` at the top level; transformers 5 writes `rope_parameters` (`rope_theta`,
//! `rope_type` and the scaling fields together).

use serde_json::{Map, Value};

use super::llama::{LlamaConfig, TARGETS};
use crate::{Error, Result};

/// The model families this crate runs; all share the Llama decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 1/2/3, SmolLM, SmolLM2, TinyLlama, ...).
    Llama,
    /// `MistralForCausalLM` (sliding-window attention, not applied by the decoder: exact for
    /// sequences no longer than the window, and longer ones are refused).
    Mistral,
    /// `Qwen2ForCausalLM` (q, k and v projections always carry a bias).
    Qwen2,
}

impl Architecture {
    /// The `architectures` entry of config.json.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
    /// The `model_type` of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// Rope frequency scaling (linear, llama3): the rope op's own type, so that the config feeds
/// `ops::rope::inv_freq` directly.
pub use crate::ops::rope::RopeScaling;

/// The fields of config.json the loaders and the decoder need, with transformers' defaults
/// filled in. Sizes are element counts.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The model family (from `architectures`, else `model_type`).
    pub architecture: Architecture,
    /// `hidden_size` (C).
    pub hidden_size: usize,
    /// `intermediate_size` of the MLP.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads` (NH).
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (NKV); default NH.
    pub num_key_value_heads: usize,
    /// `head_dim`; default hidden_size / NH.
    pub head_dim: usize,
    /// `vocab_size` (V).
    pub vocab_size: usize,
    /// `rms_norm_eps`; default 1e-6 (all three families).
    pub rms_norm_eps: f64,
    /// `rope_theta` (or `rope_parameters.rope_theta`); default 10000.
    pub rope_theta: f64,
    /// Rope scaling; None for the "default" rope type.
    pub rope_scaling: Option<RopeScaling>,
    /// Per-frequency divisors of inv_freq (head_dim / 2 values: inv_freq[i] / factors[i]), as
    /// llama.cpp stores Llama 3.1+ rope scaling in a GGUF (`rope_freqs.weight`) instead of the
    /// llama3 parameters; for such a model they equal the llama3 rule. Never set from config.json.
    /// Applied through [`ModelConfig::effective_rope_scaling`].
    pub rope_freq_factors: Option<Vec<f32>>,
    /// `tie_word_embeddings`; default false for Llama, Mistral and Qwen2 (their config classes
    /// override PretrainedConfig's true).
    pub tie_word_embeddings: bool,
    /// `max_position_embeddings`, if given.
    pub max_position_embeddings: Option<usize>,
    /// `bos_token_id`, if given and not null.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`: one id or a list (empty when absent or null).
    pub eos_token_ids: Vec<u32>,
    /// `pad_token_id`, if given and not null.
    pub pad_token_id: Option<u32>,
    /// `torch_dtype` (transformers 4) or `dtype` (transformers 5): the stored weights' dtype name.
    pub dtype: Option<String>,
    /// `attention_bias` (Llama, Mistral: bias on q, k, v and o). Qwen2 ignores it: its q, k, v
    /// always have a bias and o never does; see [`ModelConfig::proj_has_bias`].
    pub attention_bias: bool,
    /// `mlp_bias` (Llama only): bias on gate, up and down.
    pub mlp_bias: bool,
    /// `sliding_window` when sliding-window attention is on (Mistral; Qwen2 with
    /// `use_sliding_window`). The decoder attends over the full causal context, which is exact
    /// for sequences of at most this many tokens; it refuses longer ones
    /// ([`LlamaConfig::check_sequence`]).
    pub sliding_window: Option<usize>,
    /// `quantization_config.quant_method`, if any (e.g. "bitsandbytes").
    pub quant_method: Option<String>,
}

fn err(file: &str, what: impl Into<String>) -> Error {
    Error::format(file, what)
}

/// Field accessors of one JSON object, naming `file` and the field path in errors.
struct Fields<'a> {
    file: &'a str,
    prefix: &'a str,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn path(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }
    /// The value of `k`, None when absent or null.
    fn get(&self, k: &str) -> Option<&Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }
    fn usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| err(self.file, format!("field `{}`: {v} is not a non-negative integer", self.path(k), v = crate::error::quote(&v.to_string())))),
        }
    }
    fn req_usize(&self, k: &str) -> Result<usize> {
        self.usize(k)?
            .ok_or_else(|| err(self.file, format!("missing field `{}` (a positive integer)", self.path(k))))
    }
    fn f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| err(self.file, format!("field `{}`: {v} is not a finite number", self.path(k), v = crate::error::quote(&v.to_string())))),
        }
    }
    fn req_f64(&self, k: &str) -> Result<f64> {
        self.f64(k)?
            .ok_or_else(|| err(self.file, format!("missing field `{}` (a number)", self.path(k))))
    }
    fn bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| err(self.file, format!("field `{}`: {v} is not true or false", self.path(k), v = crate::error::quote(&v.to_string())))),
        }
    }
    fn str(&self, k: &str) -> Result<Option<&str>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| err(self.file, format!("field `{}`: {v} is not a string", self.path(k), v = crate::error::quote(&v.to_string())))),
        }
    }
    fn token_id(&self, k: &str) -> Result<Option<u32>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| err(self.file, format!("field `{}`: {v} is not a token id", self.path(k), v = crate::error::quote(&v.to_string())))),
        }
    }
}

impl ModelConfig {
    /// config.json for a model that came without one (GGUF), as transformers writes a
    /// Llama-family config (`qlora merge` of a GGUF base writes it next to the merged weights).
    pub fn to_hf_json(&self) -> Result<Vec<u8>> {
        if self.rope_freq_factors.is_some() && self.rope_scaling.is_none() {
            return Err(Error::Invalid("this GGUF stores its rope scaling as per-frequency factors (rope_freqs.weight), which config.json cannot express; merge from the Hugging Face folder instead".into()));
        }
        let rope_scaling = match &self.rope_scaling {
            None => serde_json::Value::Null,
            Some(RopeScaling::Linear { factor }) => serde_json::json!({"rope_type": "linear", "factor": factor}),
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings}),
            Some(RopeScaling::FreqFactors { .. }) => return Err(Error::Invalid("per-frequency rope factors cannot be written to config.json".into())),
        };
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": "float32",
        });
        let o = v.as_object_mut().expect("an object");
        if let Some(m) = self.max_position_embeddings {
            o.insert("max_position_embeddings".into(), m.into());
        }
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), b.into());
        }
        if !self.eos_token_ids.is_empty() {
            o.insert("eos_token_id".into(), if self.eos_token_ids.len() == 1 { self.eos_token_ids[0].into() } else { self.eos_token_ids.clone().into() });
        }
        if let Some(p) = self.pad_token_id {
            o.insert("pad_token_id".into(), p.into());
        }
        serde_json::to_vec_pretty(&v).map_err(|e| Error::Invalid(format!("config.json: {e}")))
    }

    /// Parses config.json `bytes` (`file` names it in errors: "config.json" or a path). Checks
    /// the architecture (Llama/SmolLM, Mistral, Qwen2), hidden_act "silu", the rope type
    /// (default, llama3, linear) and that the sizes fit together (NH % NKV == 0, head_dim even,
    /// hidden_size == NH * head_dim unless head_dim is given). Errors name the file and field.
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| err(file, format!("not valid JSON ({e})")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| err(file, "not a JSON object"))?;
        let f = Fields { file, prefix: "", obj };

        let architecture = Self::architecture(&f)?;
        let hidden_size = f.req_usize("hidden_size")?;
        let intermediate_size = f.req_usize("intermediate_size")?;
        let num_hidden_layers = f.req_usize("num_hidden_layers")?;
        let num_attention_heads = f.req_usize("num_attention_heads")?;
        let vocab_size = f.req_usize("vocab_size")?;
        for (k, v) in [
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("vocab_size", vocab_size),
        ] {
            if v == 0 {
                return Err(err(file, format!("field `{k}` is 0")));
            }
        }
        let num_key_value_heads = f.usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(err(
                file,
                format!(
                    "field `num_key_value_heads`: {num_key_value_heads} does not divide \
                     num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match f.usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(err(
                        file,
                        format!(
                            "field `hidden_size`: {hidden_size} is not a multiple of \
                             num_attention_heads {num_attention_heads} (and no head_dim is given)"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(err(file, format!("field `head_dim`: {head_dim}, expected a positive even number (rope rotates pairs)")));
        }
        if let Some(act) = f.str("hidden_act")? {
            if act != "silu" {
                return Err(err(file, format!("field `hidden_act`: \"{act}\" is not supported (only \"silu\")", act = crate::error::quote(act))));
            }
        }
        let rms_norm_eps = f.f64("rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(err(file, format!("field `rms_norm_eps`: {rms_norm_eps} is not positive")));
        }
        let (rope_theta, rope_scaling) = Self::rope(&f)?;
        let eos_token_ids = match f.get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| err(file, "field `eos_token_id`: not a list of token ids"))?,
            Some(_) => vec![f.token_id("eos_token_id")?.unwrap_or_default()],
        };
        let dtype = match f.str("torch_dtype")? {
            Some(d) => Some(d.to_owned()),
            None => f.str("dtype")?.map(str::to_owned),
        };
        let (attention_bias, mlp_bias) = match architecture {
            Architecture::Llama => (
                f.bool("attention_bias")?.unwrap_or(false),
                f.bool("mlp_bias")?.unwrap_or(false),
            ),
            Architecture::Mistral | Architecture::Qwen2 => (false, false),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => f.usize("sliding_window")?,
            Architecture::Qwen2 if f.bool("use_sliding_window")?.unwrap_or(false) => {
                f.usize("sliding_window")?
            }
            _ => None,
        };
        let quant_method = match f.get("quantization_config") {
            Some(Value::Object(q)) => {
                let qf = Fields { file, prefix: "quantization_config.", obj: q };
                qf.str("quant_method")?.map(str::to_owned)
            }
            Some(v) => return Err(err(file, format!("field `quantization_config`: {v} is not an object", v = crate::error::quote(&v.to_string())))),
            None => None,
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: f.usize("max_position_embeddings")?,
            bos_token_id: f.token_id("bos_token_id")?,
            eos_token_ids,
            pad_token_id: f.token_id("pad_token_id")?,
            dtype,
            attention_bias,
            mlp_bias,
            sliding_window,
            quant_method,
        };
        config.check_sizes(file, "num_hidden_layers", None)?;
        Ok(config)
    }

    fn architecture(f: &Fields) -> Result<Architecture> {
        const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";
        let all = [Architecture::Llama, Architecture::Mistral, Architecture::Qwen2];
        match f.get("architectures") {
            Some(Value::Array(list)) if !list.is_empty() => {
                let name = list[0]
                    .as_str()
                    .ok_or_else(|| err(f.file, "field `architectures`: not a list of strings"))?;
                all.into_iter().find(|a| a.hf_name() == name).ok_or_else(|| {
                    err(f.file, format!("field `architectures`: \"{name}\" is not supported (supported: {SUPPORTED})", name = crate::error::quote(name)))
                })
            }
            Some(v) if !v.is_array() => {
                Err(err(f.file, format!("field `architectures`: {v} is not a list", v = crate::error::quote(&v.to_string()))))
            }
            _ => {
                let mt = f.str("model_type")?.ok_or_else(|| {
                    err(f.file, "missing fields `architectures` and `model_type`: cannot tell the model family")
                })?;
                all.into_iter().find(|a| a.model_type() == mt).ok_or_else(|| {
                    err(f.file, format!("field `model_type`: \"{mt}\" is not supported (supported: llama, mistral, qwen2)", mt = crate::error::quote(mt)))
                })
            }
        }
    }

    fn rope(f: &Fields) -> Result<(f64, Option<RopeScaling>)> {
        // transformers 5: everything in `rope_parameters`; transformers 4: `rope_theta` and
        // `rope_scaling` at the top level.
        let (params, prefix) = match f.get("rope_parameters") {
            Some(Value::Object(p)) => (Some(p), "rope_parameters."),
            Some(v) => return Err(err(f.file, format!("field `rope_parameters`: {v} is not an object", v = crate::error::quote(&v.to_string())))),
            None => match f.get("rope_scaling") {
                Some(Value::Object(p)) => (Some(p), "rope_scaling."),
                Some(v) => return Err(err(f.file, format!("field `rope_scaling`: {v} is not an object", v = crate::error::quote(&v.to_string())))),
                None => (None, ""),
            },
        };
        let top_theta = f.f64("rope_theta")?;
        let Some(p) = params else {
            return Ok((top_theta.unwrap_or(10000.0), None));
        };
        let pf = Fields { file: f.file, prefix, obj: p };
        let theta = pf.f64("rope_theta")?.or(top_theta).unwrap_or(10000.0);
        if theta <= 0.0 {
            return Err(err(f.file, format!("field `{prefix}rope_theta`: {theta} is not positive")));
        }
        let (kind, kind_field) = match pf.str("rope_type")? {
            Some(t) => (t, "rope_type"),
            None => (pf.str("type")?.unwrap_or("default"), "type"),
        };
        let positive = |k: &str| -> Result<f64> {
            let v = pf.req_f64(k)?;
            if v > 0.0 {
                Ok(v)
            } else {
                Err(err(f.file, format!("field `{prefix}{k}`: {v} is not positive", v = crate::error::quote(&v.to_string()))))
            }
        };
        let scaling = match kind {
            "default" => None,
            "linear" => Some(RopeScaling::Linear { factor: positive("factor")? }),
            "llama3" => {
                let low = positive("low_freq_factor")?;
                let high = positive("high_freq_factor")?;
                if high <= low {
                    return Err(err(
                        f.file,
                        format!("field `{prefix}high_freq_factor`: {high} is not above low_freq_factor {low}"),
                    ));
                }
                let orig = pf.req_usize("original_max_position_embeddings")?;
                let orig = u32::try_from(orig).ok().filter(|&o| o > 0).ok_or_else(|| {
                    err(f.file, format!("field `{prefix}original_max_position_embeddings`: {orig} is not in 1..2^32"))
                })?;
                Some(RopeScaling::Llama3 {
                    factor: positive("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: orig,
                })
            }
            other => {
                return Err(err(
                    f.file,
                    format!("field `{prefix}{kind_field}`: rope type \"{other}\" is not supported (supported: default, linear, llama3)", other = crate::error::quote(other)),
                ))
            }
        };
        Ok((theta, scaling))
    }

    /// Checks that the sizes are plausible before anything is allocated from them: every
    /// tensor's element count (and its f32 bytes) fits in 64 bits, and, when `present` (the
    /// number of tensors the model files hold) is given, the `num_hidden_layers` layers (of at
    /// least 9 tensors each, plus the embedding and the final norm) can be there at all.
    /// `file` and `field` (the layer count's name there) name the source in the error.
    pub fn check_sizes(&self, file: &str, field: &str, present: Option<usize>) -> Result<()> {
        let too_big = |what: String| err(file, format!("{what}: too large to be a real model (sizes overflow)"));
        let mul = |a: usize, b: usize, what: &str| -> Result<usize> {
            a.checked_mul(b).and_then(|n| n.checked_mul(4)).map(|_| a * b).ok_or_else(|| too_big(format!("{what} = {a} x {b}")))
        };
        let (c, h, kv, d) = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim);
        mul(self.vocab_size, c, "vocab_size x hidden_size")?;
        mul(mul(h, d, "num_attention_heads x head_dim")?, c, "the q/o projection")?;
        mul(mul(kv, d, "num_key_value_heads x head_dim")?, c, "the k/v projection")?;
        mul(self.intermediate_size, c, "intermediate_size x hidden_size")?;
        if let Some(present) = present {
            // A layer has at least 9 tensors; refuse counts that cannot be there at all (the
            // loader names the first missing tensor of a count that is merely wrong).
            if self.num_hidden_layers > present {
                return Err(err(
                    file,
                    format!(
                        "`{field}` is {} layers, but the model files hold only {present} tensors (a layer has at least 9)",
                        self.num_hidden_layers
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The decoder's hyperparameters (rope scaling and biases are not part of [`LlamaConfig`];
    /// see those fields here).
    pub fn to_llama(&self) -> LlamaConfig {
        LlamaConfig {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            vocab: self.vocab_size,
            rms_eps: self.rms_norm_eps as f32,
            rope_theta: self.rope_theta,
            tied: self.tie_word_embeddings,
            sliding_window: self.sliding_window,
        }
    }

    /// The rope scaling to build the RoPE tables with (what `trainer::Model::new` takes):
    /// `rope_freq_factors` when present, as llama.cpp applies them: they encode Llama 3.1+
    /// scaling, so a llama3 `rope_scaling` next to them is not applied a second time, while a
    /// linear one is applied as well (llama.cpp scales positions by 1/factor on top of the
    /// factors: inv_freq[i] / (factors[i] * factor)). Otherwise `rope_scaling`.
    pub fn effective_rope_scaling(&self) -> Option<RopeScaling> {
        match (&self.rope_freq_factors, &self.rope_scaling) {
            (Some(factors), Some(RopeScaling::Linear { factor })) => {
                let f = *factor as f32;
                Some(RopeScaling::FreqFactors { factors: factors.iter().map(|&x| x * f).collect() })
            }
            (Some(factors), _) => Some(RopeScaling::FreqFactors { factors: factors.clone() }),
            (None, scaling) => scaling.clone(),
        }
    }

    /// Whether projection `m` (index into [`TARGETS`]) has a bias: Qwen2 on q, k, v; Llama on
    /// q, k, v, o with `attention_bias` and on gate, up, down with `mlp_bias`; Mistral never.
    pub fn proj_has_bias(&self, m: usize) -> bool {
        match self.architecture {
            Architecture::Qwen2 => m < 3,
            Architecture::Llama => if m < 4 { self.attention_bias } else { self.mlp_bias },
            Architecture::Mistral => false,
        }
    }

    /// (out, in) of projection `m` (index into [`TARGETS`]).
    pub fn proj_shape(&self, m: usize) -> (usize, usize) {
        self.to_llama().proj_shape(m)
    }

    /// Every tensor the model has, Hugging Face names and PyTorch shapes, in this order:
    /// `model.embed_tokens.weight` (V, C); per layer i `model.layers.{i}.input_layernorm.weight`
    /// (C), the seven projections `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` and
    /// `model.layers.{i}.mlp.{gate,up,down}_proj.weight` (out, in) each followed by its `.bias`
    /// (out) when it has one, `model.layers.{i}.post_attention_layernorm.weight` (C);
    /// `model.norm.weight` (C); `lm_head.weight` (V, C) unless tied.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.hidden_size;
        let mut v = vec![(names::EMBED.to_owned(), vec![self.vocab_size, c])];
        for i in 0..self.num_hidden_layers {
            v.push((names::attn_norm(i), vec![c]));
            for m in 0..TARGETS.len() {
                let (o, inp) = self.proj_shape(m);
                v.push((names::proj(i, m), vec![o, inp]));
                if self.proj_has_bias(m) {
                    v.push((names::proj_bias(i, m), vec![o]));
                }
            }
            v.push((names::mlp_norm(i), vec![c]));
        }
        v.push((names::FINAL_NORM.to_owned(), vec![c]));
        if !self.tie_word_embeddings {
            v.push((names::LM_HEAD.to_owned(), vec![self.vocab_size, c]));
        }
        v
    }
}

/// Hugging Face tensor names of the Llama family.
pub mod names {
    use super::TARGETS;

    /// The token embedding (V, C).
    pub const EMBED: &str = "model.embed_tokens.weight";
    /// The final RMSNorm weight (C).
    pub const FINAL_NORM: &str = "model.norm.weight";
    /// The output projection (V, C), absent when tied.
    pub const LM_HEAD: &str = "lm_head.weight";

    /// `model.layers.{i}.input_layernorm.weight`.
    pub fn attn_norm(i: usize) -> String {
        format!("model.layers.{i}.input_layernorm.weight")
    }
    /// `model.layers.{i}.post_attention_layernorm.weight`.
    pub fn mlp_norm(i: usize) -> String {
        format!("model.layers.{i}.post_attention_layernorm.weight")
    }
    /// The path of projection `m` (TARGETS index) inside a layer: `self_attn.q_proj`, ...,
    /// `mlp.down_proj`.
    pub fn proj_local(m: usize) -> String {
        let block = if m < 4 { "self_attn" } else { "mlp" };
        format!("{block}.{}", TARGETS[m])
    }
    /// The module path of projection `m` (TARGETS index) in layer i, e.g.
    /// `model.layers.0.self_attn.q_proj`.
    pub fn proj_module(i: usize, m: usize) -> String {
        format!("model.layers.{i}.{}", proj_local(m))
    }
    /// `<module>.weight` of projection `m` in layer i.
    pub fn proj(i: usize, m: usize) -> String {
        format!("{}.weight", proj_module(i, m))
    }
    /// `<module>.bias` of projection `m` in layer i.
    pub fn proj_bias(i: usize, m: usize) -> String {
        format!("{}.bias", proj_module(i, m))
    }
}
