//! Quantization on the CPU: NF4 and its double quantization, bit-exact with bitsandbytes 0.50.2
//! (`nf4`). See docs/nf4.md. bitsandbytes' safetensors serialization of NF4 weights is a file
//! format: io/bnb.rs.

pub mod nf4;

pub use nf4::{
    double_quantize_absmax, dynamic_map, quantize_nf4, torch_mean_f32, Nf4Stats, Nf4Tensor,
    DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE, NF4_CODE,
};
