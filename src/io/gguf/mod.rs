//! GGUF files (llama.cpp's format): the container (`file`), ggml's quantized types dequantized
//! (`dequant`), Llama-family models with Hugging Face names and config (`llama`), and the
//! tokenizer metadata (`tokenizer`). The writer is io/gguf_write.rs.

mod dequant;
mod file;
mod llama;
mod stream;
mod tokenizer;

pub use dequant::dequantize;
pub use file::{GgmlType, GgufFile, GgufHeader, GgufTensorInfo, HeaderParse, GgufValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};
pub(crate) use llama::move_head_rows;
pub use llama::{gguf_config, gguf_name, load_gguf, load_gguf_with, unpermute_rows, GgufModel};
pub use stream::{GgufStream, StreamedGguf};
