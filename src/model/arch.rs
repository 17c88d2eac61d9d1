//! Named model shapes for benchmarks and generated test models (`qlora bench --arch NAME`,
//! examples/random_hf_model.rs): the config.json fields of well-known checkpoints, as their
//! Hugging Face configs give them (architecture, sizes, heads, vocabulary, RoPE, tying). No
//! weights: callers generate random ones with these shapes.

use crate::model::config::ModelConfig;
use crate::{Error, Result};

/// (name, config.json) of every named shape.
pub const ARCHS: &[(&str, &str)] = &[
    (
        "smollm2-135m",
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
"intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
"vocab_size": 49152, "rms_norm_eps": 1e-05, "rope_theta": 100000, "tie_word_embeddings": true,
"max_position_embeddings": 8192, "torch_dtype": "bfloat16"}"#,
    ),
    (
        "smollm2-360m",
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 960,
"intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
"vocab_size": 49152, "rms_norm_eps": 1e-05, "rope_theta": 100000, "tie_word_embeddings": true,
"max_position_embeddings": 8192, "torch_dtype": "bfloat16"}"#,
    ),
    (
        "qwen2.5-0.5b",
        r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
"intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
"vocab_size": 151936, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": true,
"max_position_embeddings": 32768, "use_sliding_window": false, "torch_dtype": "bfloat16"}"#,
    ),
    (
        "llama-3.2-1b",
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
"intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
"head_dim": 64, "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
"rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
"original_max_position_embeddings": 8192, "rope_type": "llama3"}, "tie_word_embeddings": true,
"max_position_embeddings": 131072, "torch_dtype": "bfloat16"}"#,
    ),
    (
        "llama-3.1-8b",
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
"intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
"vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
"rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
"original_max_position_embeddings": 8192, "rope_type": "llama3"}, "tie_word_embeddings": false,
"max_position_embeddings": 131072, "torch_dtype": "bfloat16"}"#,
    ),
];

/// The config.json text of the named shape.
pub fn config_json(name: &str) -> Result<&'static str> {
    ARCHS.iter().find(|(n, _)| *n == name).map(|(_, j)| *j).ok_or_else(|| {
        let names: Vec<&str> = ARCHS.iter().map(|(n, _)| *n).collect();
        Error::Invalid(format!("unknown architecture {name:?} (known: {})", names.join(", ")))
    })
}

/// The parsed config of the named shape.
pub fn config(name: &str) -> Result<ModelConfig> {
    ModelConfig::from_json(&format!("{name} (built-in shape)"), config_json(name)?.as_bytes())
}
