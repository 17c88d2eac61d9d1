//! Writing GGUF files (the container read by [`super::gguf`]; layout in that module's docs):
//! metadata key-values of any GGUF type and tensors given as already-encoded bytes of a ggml
//! type, laid out at `general.alignment` (32) as llama.cpp's gguf writer lays them out (tensor
//! data in the order the tensors were added, each padded to the alignment). Also the q/k row
//! permutation llama.cpp applies to Llama attention weights ([`permute_rows`], the inverse of
//! [`super::gguf::unpermute_rows`]). What goes into the file (names, metadata, encodings) is
//! decided by the callers: `lora::gguf` for adapters and merged models.

use super::gguf::{GgmlType, GgufValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::{Error, Result};

/// A GGUF file being assembled in memory.
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    kv: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => {
            // An empty array gets element type u8 (it has no element to name one).
            out.extend_from_slice(&a.first().map_or(0, type_id).to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(out, x);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets metadata `key` (a later call for the same key replaces the value in place).
    pub fn kv(&mut self, key: &str, value: GgufValue) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.kv.push((key.to_owned(), value)),
        }
    }

    /// Sets a string value.
    pub fn kv_str(&mut self, key: &str, value: &str) {
        self.kv(key, GgufValue::String(value.to_owned()));
    }

    /// The metadata set so far, in order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.kv
    }

    /// Adds tensor `name` of PyTorch `shape` (outermost first; written as ggml `ne`, innermost
    /// first) holding `bytes` of type `ty`. The byte count must be the type's size for the
    /// shape and the row length a whole number of the type's blocks.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType, bytes: Vec<u8>) -> Result<()> {
        let (block, block_bytes) = ty.block_layout().ok_or_else(|| Error::Invalid(format!("tensor `{name}`: unknown ggml type id {}", ty.0)))?;
        if shape.is_empty() || shape.len() > 4 {
            return Err(Error::Invalid(format!("tensor `{name}`: {} dimensions (1 to 4 allowed)", shape.len())));
        }
        let row = *shape.last().expect("non-empty");
        let numel: usize = shape.iter().product();
        if row % block != 0 || bytes.len() != numel / block * block_bytes {
            return Err(Error::Invalid(format!(
                "tensor `{name}`: shape {shape:?} as {} needs rows of whole {block}-element blocks and {} bytes, got {} bytes",
                ty.name().unwrap_or("?"),
                numel / block * block_bytes,
                bytes.len()
            )));
        }
        if self.tensors.iter().any(|t| t.0 == name) {
            return Err(Error::Invalid(format!("tensor `{name}` added twice")));
        }
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.to_owned(), dims, ty, bytes));
        Ok(())
    }

    /// The file's bytes (GGUF version 3, little-endian, alignment 32).
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = DEFAULT_ALIGNMENT as usize;
        let pad = |n: usize| n.div_ceil(align) * align;
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.0.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += pad(bytes.len());
        }
        out.resize(pad(out.len()), 0);
        let total = out.len() + offset;
        out.reserve_exact(offset);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(pad(out.len()), 0);
        }
        debug_assert_eq!(out.len(), total);
        out
    }
}

/// llama.cpp's q/k row permutation for a (rows, cols) row-major `w` with `n_head` heads
/// (convert_hf_to_gguf's `permute`: `w.reshape(n_head, 2, rows / n_head / 2, cols)
/// .swapaxes(1, 2).reshape(rows, cols)`): GGUF row h*head_dim + 2j + s takes Hugging Face row
/// h*head_dim + s*half + j (half = head_dim / 2). Inverse of [`super::gguf::unpermute_rows`].
/// `None` when rows is not a multiple of 2 * n_head or the length is not rows * cols.
pub fn permute_rows(w: &[f32], rows: usize, n_head: usize) -> Option<Vec<f32>> {
    super::gguf::move_head_rows(w, rows, n_head, true)
}
