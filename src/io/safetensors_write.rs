//! safetensors files written: tensors given as name, dtype, shape and little-endian bytes
//! ([`RawTensor`]) serialized with deterministic bytes ([`serialize_tensors`]). The writer of
//! every safetensors file the project makes: PEFT adapters (lora/peft.rs), merged models
//! (lora/merge.rs), checkpoints (train/checkpoint.rs), bitsandbytes NF4 state dicts
//! (io/bnb.rs). The reader is io/safetensors.rs.

use std::collections::HashMap;

use safetensors::tensor::TensorView;
pub use safetensors::Dtype;

use crate::{Error, Result};

/// One tensor to be written into a safetensors file: name, dtype, shape, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Full tensor name, e.g. `model.layers.0.self_attn.q_proj.weight.absmax`.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// `shape.product() * dtype size` bytes, little-endian.
    pub data: Vec<u8>,
}

/// Serializes `tensors` (unique names, data matching dtype and shape) and optional string
/// `metadata` into safetensors bytes. `Error::Invalid` on a duplicate name or a size mismatch.
pub fn serialize_tensors(
    tensors: &[RawTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::Invalid(format!(
                "duplicate tensor name `{}`",
                t.name
            )));
        }
        let view = TensorView::new(t.dtype, t.shape.clone(), &t.data)
            .map_err(|e| Error::Invalid(format!("tensor `{}`: {e}", t.name)))?;
        views.push((t.name.clone(), view));
    }
    // The safetensors crate writes the metadata map in HashMap order, which differs from run to
    // run once there are two entries: rewrite it with sorted keys (the same entries, so the
    // same length) so that equal inputs give equal bytes.
    let fix = metadata.as_ref().filter(|m| m.len() > 1).map(|m| {
        let written = serde_json::to_string(m).expect("strings serialize");
        let sorted = serde_json::to_string(&m.iter().collect::<std::collections::BTreeMap<_, _>>()).expect("strings serialize");
        (written, sorted)
    });
    let mut bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::Invalid(format!("safetensors serialization failed: {e}")))?;
    if let Some((written, sorted)) = fix {
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let at = bytes[8..header_end]
            .windows(written.len())
            .position(|w| w == written.as_bytes())
            .ok_or_else(|| Error::Invalid("safetensors serialization: metadata not found in the header".into()))?;
        bytes[8 + at..8 + at + sorted.len()].copy_from_slice(sorted.as_bytes());
    }
    Ok(bytes)
}
