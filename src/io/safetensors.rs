//! safetensors files read from bytes (no shader; CPU only), validated before any tensor is used.
//!
//! Layout: 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON (an object: tensor name ->
//! `{"dtype", "shape", "data_offsets": [begin, end]}`, plus an optional `"__metadata__"` string
//! map), then the data section; offsets are relative to the start of the data section (8 + N).
//! Every check is made on the header before a tensor byte is read: N within the file (an absurd
//! N is rejected without allocating), JSON well-formed, dtypes known, begin <= end <= data
//! length, ranges non-overlapping, and shape x dtype size == end - begin.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::io::half::{bf16_to_f32, f16_to_f32};
use crate::{Error, Result};

/// Element types of the safetensors format (the names in the header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// "BOOL" (1 byte).
    Bool,
    /// "U8".
    U8,
    /// "I8".
    I8,
    /// "F8_E5M2".
    F8E5M2,
    /// "F8_E4M3".
    F8E4M3,
    /// "F8_E8M0".
    F8E8M0,
    /// "I16".
    I16,
    /// "U16".
    U16,
    /// "F16" (IEEE half).
    F16,
    /// "BF16" (bfloat16: the top 16 bits of an f32).
    BF16,
    /// "I32".
    I32,
    /// "U32".
    U32,
    /// "F32".
    F32,
    /// "F64".
    F64,
    /// "I64".
    I64,
    /// "U64".
    U64,
    /// "C64" (complex of two f32).
    C64,
    /// "F4" (4 bits, two a byte).
    F4,
    /// "F6_E2M3" (6 bits).
    F6E2M3,
    /// "F6_E3M2" (6 bits).
    F6E3M2,
}

const DTYPES: [(Dtype, &str, usize); 20] = [
    (Dtype::Bool, "BOOL", 8),
    (Dtype::U8, "U8", 8),
    (Dtype::I8, "I8", 8),
    (Dtype::F8E5M2, "F8_E5M2", 8),
    (Dtype::F8E4M3, "F8_E4M3", 8),
    (Dtype::F8E8M0, "F8_E8M0", 8),
    (Dtype::I16, "I16", 16),
    (Dtype::U16, "U16", 16),
    (Dtype::F16, "F16", 16),
    (Dtype::BF16, "BF16", 16),
    (Dtype::I32, "I32", 32),
    (Dtype::U32, "U32", 32),
    (Dtype::F32, "F32", 32),
    (Dtype::F64, "F64", 64),
    (Dtype::I64, "I64", 64),
    (Dtype::U64, "U64", 64),
    (Dtype::C64, "C64", 64),
    (Dtype::F4, "F4", 4),
    (Dtype::F6E2M3, "F6_E2M3", 6),
    (Dtype::F6E3M2, "F6_E3M2", 6),
];

impl Dtype {
    /// The dtype of header name `name` ("F32", "BF16", ...), None if unknown.
    pub fn from_name(name: &str) -> Option<Self> {
        DTYPES.iter().find(|d| d.1 == name).map(|d| d.0)
    }
    /// The header name ("F32", "BF16", ...).
    pub fn name(self) -> &'static str {
        DTYPES.iter().find(|d| d.0 == self).map_or("?", |d| d.1)
    }
    /// Bits per element.
    pub fn bits(self) -> usize {
        DTYPES.iter().find(|d| d.0 == self).map_or(0, |d| d.2)
    }
}

/// One tensor of a parsed header. `begin..end` is its byte range in the data section.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major, PyTorch order).
    pub shape: Vec<usize>,
    /// Start of the data, relative to the data section.
    pub begin: usize,
    /// End (exclusive) of the data, relative to the data section.
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements (product of the shape; validated not to overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A validated safetensors file borrowed from its bytes.
#[derive(Clone, Debug)]
pub struct SafeTensorsFile<'a> {
    file: String,
    bytes: &'a [u8],
    data: &'a [u8],
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl<'a> SafeTensorsFile<'a> {
    /// Parses and validates the header of the safetensors file `bytes` (`file` names it in
    /// errors). Nothing is allocated in proportion to a size the file claims before that size is
    /// checked against the file's length.
    pub fn parse(file: &str, bytes: &'a [u8]) -> Result<Self> {
        let fail = |what: String| Error::format(file, what);
        if bytes.len() < 8 {
            return Err(fail(format!(
                "{} bytes: too short for the 8-byte header length of a safetensors file",
                bytes.len()
            )));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let rest = (bytes.len() - 8) as u64;
        if n > rest {
            return Err(fail(format!(
                "header length {n} bytes runs past the end of the file ({} bytes): truncated or not a safetensors file",
                bytes.len()
            )));
        }
        let n = n as usize;
        let header = &bytes[8..8 + n];
        let data = &bytes[8 + n..];
        if header.first() != Some(&b'{') {
            return Err(fail("header is not a JSON object (does not start with `{`): not a safetensors file".into()));
        }
        let value: Value = serde_json::from_slice(header)
            .map_err(|e| fail(format!("header is not valid JSON ({e})")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| fail("header is not a JSON object".into()))?;

        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(obj.len());
        for (name, entry) in obj {
            if name == "__metadata__" {
                let m = entry
                    .as_object()
                    .ok_or_else(|| fail("`__metadata__` is not an object".into()))?;
                for (k, v) in m {
                    let v = v.as_str().ok_or_else(|| {
                        fail(format!("`__metadata__` entry `{k}` is not a string"))
                    })?;
                    metadata.insert(k.clone(), v.to_owned());
                }
                continue;
            }
            tensors.push(Self::tensor_info(file, name, entry, data.len())?);
        }

        // Non-overlapping ranges: sorted by start, each begins at or after the previous end.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| (tensors[i].begin, tensors[i].end));
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            if b.begin < a.end {
                return Err(fail(format!(
                    "tensor `{}`: data_offsets [{}, {}] overlap those of tensor `{}` [{}, {}]",
                    b.name, b.begin, b.end, a.name, a.begin, a.end
                )));
            }
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafeTensorsFile { file: file.to_owned(), bytes, data, tensors, index, metadata })
    }

    fn tensor_info(file: &str, name: &str, entry: &Value, data_len: usize) -> Result<TensorInfo> {
        let fail = |what: String| Error::format(file, format!("tensor `{name}`: {what}"));
        let e = entry
            .as_object()
            .ok_or_else(|| fail("header entry is not an object".into()))?;
        let dtype_name = e
            .get("dtype")
            .ok_or_else(|| fail("missing `dtype`".into()))?
            .as_str()
            .ok_or_else(|| fail("`dtype` is not a string".into()))?;
        let dtype = Dtype::from_name(dtype_name).ok_or_else(|| {
            fail(format!(
                "unknown dtype \"{dtype_name}\" (known: {})",
                DTYPES.iter().map(|d| d.1).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let shape = e
            .get("shape")
            .ok_or_else(|| fail("missing `shape`".into()))?
            .as_array()
            .ok_or_else(|| fail("`shape` is not a list".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| fail("`shape` is not a list of non-negative integers".into()))?;
        let offs = e
            .get("data_offsets")
            .ok_or_else(|| fail("missing `data_offsets`".into()))?
            .as_array()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| fail("`data_offsets` is not a list of two integers".into()))?;
        let off = |i: usize| -> Result<u64> {
            offs[i]
                .as_u64()
                .ok_or_else(|| fail("`data_offsets` is not a list of two non-negative integers".into()))
        };
        let (begin, end) = (off(0)?, off(1)?);
        if begin > end {
            return Err(fail(format!("data_offsets [{begin}, {end}]: begin after end")));
        }
        if end > data_len as u64 {
            return Err(fail(format!(
                "data_offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes): truncated file or bad offset"
            )));
        }
        let (begin, end) = (begin as usize, end as usize);
        let bits = shape
            .iter()
            .try_fold(dtype.bits(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| fail(format!("shape {shape:?} is too large")))?;
        if bits % 8 != 0 {
            return Err(fail(format!(
                "shape {shape:?} of {dtype_name} does not fill whole bytes ({bits} bits)"
            )));
        }
        if bits / 8 != end - begin {
            return Err(fail(format!(
                "shape {shape:?} of {dtype_name} is {} bytes, but data_offsets [{begin}, {end}] hold {}",
                bits / 8,
                end - begin
            )));
        }
        Ok(TensorInfo { name: name.to_owned(), dtype, shape, begin, end })
    }

    /// The name this file has in errors.
    pub fn file(&self) -> &str {
        &self.file
    }
    /// The whole file's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    /// The `__metadata__` string map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// The header entry of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
    /// Whether the file has tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    /// The raw little-endian bytes of tensor `name`; a missing tensor is an error naming it.
    pub fn data(&self, name: &str) -> Result<&'a [u8]> {
        let t = self.info(name).ok_or_else(|| self.missing(name))?;
        Ok(&self.data[t.begin..t.end])
    }
    /// Tensor `name` (F32, F16 or BF16) as f32 values, row-major (exact: every F16 and BF16
    /// value is an f32). Other dtypes and missing tensors are errors naming the tensor.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.info(name).ok_or_else(|| self.missing(name))?;
        to_f32(&self.file, name, t.dtype, &self.data[t.begin..t.end])
    }

    fn missing(&self, name: &str) -> Error {
        Error::format(&self.file, format!("missing tensor `{name}`"))
    }
}



/// Little-endian `data` of `dtype` (F32, F16, BF16) as f32 values; another dtype, or a length
/// that is not a whole number of elements, is an error naming `file` and `tensor`.
pub fn to_f32(file: &str, tensor: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    let size = dtype.bits() / 8;
    if matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) && !data.len().is_multiple_of(size) {
        return Err(Error::format(
            file,
            format!("tensor `{tensor}`: {} bytes is not a whole number of {} elements", data.len(), dtype.name()),
        ));
    }
    let half = |f: fn(u16) -> f32| -> Vec<f32> {
        data.chunks_exact(2).map(|c| f(u16::from_le_bytes([c[0], c[1]]))).collect()
    };
    match dtype {
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::F16 => Ok(half(f16_to_f32)),
        Dtype::BF16 => Ok(half(bf16_to_f32)),
        other => Err(Error::format(
            file,
            format!("tensor `{tensor}`: dtype {} cannot be read as floats (expected F32, F16 or BF16)", other.name()),
        )),
    }
}
