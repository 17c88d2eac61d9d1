//! Quantization on the CPU: NF4 and its double quantization, bit-exact with bitsandbytes 0.50.2
//! (`nf4`), and bitsandbytes' safetensors serialization of NF4 weights (`bnb`). See docs/nf4.md.

pub mod bnb;
pub mod nf4;

pub use bnb::{
    bnb_weight_names, read_all_bnb_nf4, read_bnb_nf4, read_bnb_nf4_file, serialize_tensors,
    write_bnb_nf4, BnbNestedState, BnbQuantState, RawTensor, NF4_QUANT_STATE_SUFFIX,
};
pub use nf4::{
    double_quantize_absmax, dynamic_map, quantize_nf4, torch_mean_f32, Nf4Stats, Nf4Tensor,
    DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE, NF4_CODE,
};
