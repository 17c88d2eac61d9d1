//! GGUF files (llama.cpp's format, versions 2 and 3, little-endian) read from bytes (no shader;
//! CPU only), and Llama-family GGUF models turned into a [`HostModel`] with Hugging Face names.
//!
//! File layout (all integers little-endian):
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 kv_count
//! kv_count x   { string key, u32 value_type, value }
//! tensor_count x { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32), then the data section; each tensor's data
//! starts at data_section + offset (a multiple of the alignment).
//! string = u64 byte length + UTF-8 bytes (no terminator)
//! value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool (1 byte), 8 string,
//!              9 array (u32 element type, u64 count, elements), 10 u64, 11 i64, 12 f64
//! ```
//! `ne` lists dimensions innermost first (ne[0] is the row length, contiguous): the PyTorch shape
//! is `ne` reversed, with the same row-major element order.
//!
//! Block layouts of the supported tensor types (llama.cpp's reference dequantizers; `d`, `m`,
//! `dmin` are IEEE f16; elements of a block are consecutive in the row):
//! - F32, F16, BF16: one value per element.
//! - Q8_0 (32 elements, 34 bytes): d, i8 qs[32]; y[j] = qs[j] * d.
//! - Q4_0 (32 elements, 18 bytes): d, u8 qs[16]; y[j] = ((qs[j] & 15) - 8) * d and
//!   y[j + 16] = ((qs[j] >> 4) - 8) * d for j < 16 (low nibbles hold elements 0..15, high
//!   nibbles 16..31).
//! - Q4_1 (32 elements, 20 bytes): d, m, u8 qs[16]; y[j] = (qs[j] & 15) * d + m,
//!   y[j + 16] = (qs[j] >> 4) * d + m.
//! - Q4_K (256 elements, 144 bytes): d, dmin, u8 scales[12], u8 qs[128]. Eight sub-blocks of 32
//!   with 6-bit scale sc[k] and min mn[k]: for k < 4 sc = scales[k] & 63, mn = scales[k+4] & 63;
//!   for k >= 4 sc = (scales[k+4] & 15) | (scales[k-4] >> 6) << 4,
//!   mn = (scales[k+4] >> 4) | (scales[k] >> 6) << 4. Sub-block 2c (c < 4) takes the low nibbles
//!   of qs[32c..32c+32], sub-block 2c+1 their high nibbles: y = (d * sc) * q - dmin * mn.
//! - Q6_K (256 elements, 210 bytes): u8 ql[128], u8 qh[64], i8 scales[16], d. Element e:
//!   h = e / 128, r = e % 128, low 4 bits = (ql[64h + r % 64] >> 4 * (r / 64)) & 15, high 2 bits =
//!   (qh[32h + r % 32] >> 2 * (r / 32)) & 3, q = (low | high << 4) - 32;
//!   y = (d * scales[e / 16]) * q.
//!
//! The products are evaluated in f32 in exactly these orders (no fused multiply-add), so the
//! values equal those of the gguf Python package's numpy dequantizers bit for bit.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::half::{bf16_to_f32, f16_to_f32};
use super::{HostModel, HostTensor, HostWeight, TensorSource};
use crate::model::config::{names, Architecture, ModelConfig, RopeScaling};
use crate::{Error, Result};

/// The 4 magic bytes at the start of a GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of arrays accepted in metadata.
const MAX_ARRAY_DEPTH: usize = 4;
/// ggml's maximum number of dimensions.
const MAX_DIMS: u32 = 4;

/// A ggml tensor type id (`ggml_type`), e.g. 0 = F32, 3 = Q4_1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// (id, name, elements per block, bytes per block) of every ggml type known to this reader
/// (sizes from ggml's type traits); only some can be dequantized ([`GgmlType::is_supported`]).
const GGML_TYPES: [(u32, &str, usize, usize); 33] = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
];

impl GgmlType {
    /// F32.
    pub const F32: Self = Self(0);
    /// F16.
    pub const F16: Self = Self(1);
    /// Q4_0.
    pub const Q4_0: Self = Self(2);
    /// Q4_1.
    pub const Q4_1: Self = Self(3);
    /// Q8_0.
    pub const Q8_0: Self = Self(8);
    /// Q4_K.
    pub const Q4_K: Self = Self(12);
    /// Q6_K.
    pub const Q6_K: Self = Self(14);
    /// BF16.
    pub const BF16: Self = Self(30);
    /// The types [`dequantize`] reads.
    pub const SUPPORTED: [Self; 8] =
        [Self::F32, Self::F16, Self::BF16, Self::Q8_0, Self::Q4_0, Self::Q4_1, Self::Q4_K, Self::Q6_K];

    fn entry(self) -> Option<&'static (u32, &'static str, usize, usize)> {
        GGML_TYPES.iter().find(|t| t.0 == self.0)
    }
    /// ggml's name ("Q4_1"), None for an unknown id.
    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|t| t.1)
    }
    /// (elements per block, bytes per block), None for an unknown id.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        self.entry().map(|t| (t.2, t.3))
    }
    /// Whether [`dequantize`] reads this type.
    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }
    fn describe(self) -> String {
        match self.name() {
            Some(n) => n.to_owned(),
            None => format!("type id {}", self.0),
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9 (elements all of one type).
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The GGUF type name ("u32", "string", "array", ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }
    /// An integer of any type as u64, None if negative or not an integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// An integer of any type as i64, None if out of range or not an integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// A float (f32 widened) or an integer as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    /// The string, None for other types.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// The bool, None for other types.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The elements of an array, None for other types.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// Tensor name (llama.cpp's, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dimensions `ne`, innermost (contiguous) first.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Start of the data, relative to the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub nbytes: usize,
}

impl GgufTensorInfo {
    /// The PyTorch shape: `dims` reversed (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
}

/// A validated GGUF file borrowed from its bytes.
#[derive(Clone, Debug)]
pub struct GgufFile<'a> {
    file: String,
    /// Format version (2 or 3).
    pub version: u32,
    /// `general.alignment` (or 32).
    pub alignment: u64,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    data: &'a [u8],
}

/// A bounds-checked little-endian cursor naming the file in its errors.
struct Reader<'a> {
    file: &'a str,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::format(
                self.file,
                format!(
                    "truncated: {} needs {n} bytes at offset {} but the file has {} bytes",
                    what(),
                    self.pos,
                    self.b.len()
                ),
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(Error::format(
                self.file,
                format!(
                    "{}: string length {len} at offset {} runs past the end of the file ({} bytes)",
                    what(),
                    self.pos - 8,
                    self.b.len()
                ),
            ));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| Error::format(self.file, format!("{}: string is not UTF-8 ({e})", what())))
    }

    /// Smallest encoded size of one value of type `ty` (for bounding counts before allocating).
    fn min_size(ty: u32) -> usize {
        match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10 | 11 | 12 => 8,
            9 => 12,
            _ => 1,
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = || format!("metadata `{key}`");
        let w: &dyn Fn() -> String = &what;
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(w)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(w)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(w)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(w)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(w)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(w)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(w)?)),
            7 => match self.array::<1>(w)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(Error::format(self.file, format!("metadata `{key}`: bool byte {b}, expected 0 or 1"))),
            },
            8 => GgufValue::String(self.string(w)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::format(self.file, format!("metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let et = self.u32(w)?;
                let count = self.u64(w)?;
                if value_type_name(et).is_none() {
                    return Err(Error::format(self.file, format!("metadata `{key}`: unknown array element type {et}")));
                }
                let max = (self.remaining() / Self::min_size(et)) as u64;
                if count > max {
                    return Err(Error::format(
                        self.file,
                        format!(
                            "metadata `{key}`: array of {count} {} elements cannot fit in the {} bytes left in the file",
                            value_type_name(et).unwrap_or("?"),
                            self.remaining()
                        ),
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(et, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(w)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(w)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(w)?)),
            other => return Err(Error::format(self.file, format!("metadata `{key}`: unknown value type {other}"))),
        })
    }
}

fn value_type_name(ty: u32) -> Option<&'static str> {
    [
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64",
    ]
    .get(ty as usize)
    .copied()
}

impl<'a> GgufFile<'a> {
    /// Parses and validates a GGUF file (`file` names it in errors): magic, version 2 or 3,
    /// every metadata value, every tensor info (at most 4 dims, a known type, a row length that
    /// is a whole number of blocks, an aligned offset, data inside the file and not overlapping
    /// another tensor's). Counts and lengths read from the file are checked against the bytes
    /// left before anything is allocated for them.
    pub fn parse(file: &str, bytes: &'a [u8]) -> Result<Self> {
        let fail = |what: String| Error::format(file, what);
        let mut r = Reader { file, b: bytes, pos: 0 };
        let magic = r.array::<4>(&|| "the magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(fail(format!("bad magic {magic:02x?}, expected \"GGUF\": not a GGUF file")));
        }
        let version = r.u32(&|| "the version".into())?;
        if !(version == 2 || version == 3) {
            let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                " (a big-endian file; only little-endian GGUF is supported)"
            } else {
                ""
            };
            return Err(fail(format!("GGUF version {version} is not supported (only 2 and 3){hint}")));
        }
        let tensor_count = r.u64(&|| "the tensor count".into())?;
        let kv_count = r.u64(&|| "the metadata count".into())?;
        // Each kv takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info at least
        // 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
        if kv_count > (r.remaining() / 13) as u64 {
            return Err(fail(format!("metadata count {kv_count} cannot fit in a {}-byte file", bytes.len())));
        }
        let mut metadata = Vec::with_capacity(kv_count as usize);
        let mut meta_index = HashMap::new();
        for i in 0..kv_count {
            let key = r.string(&|| format!("metadata key #{i}"))?;
            let ty = r.u32(&|| format!("metadata `{key}` type"))?;
            let value = r.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(fail(format!("metadata `{key}` appears twice")));
            }
            metadata.push((key, value));
        }
        if tensor_count > (r.remaining() / 24) as u64 {
            return Err(fail(format!("tensor count {tensor_count} cannot fit in a {}-byte file", bytes.len())));
        }
        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => return Err(fail(format!("metadata `general.alignment`: {v}, expected a power of two", v = crate::error::quote(&format!("{v:?}"))))),
            },
        };

        let mut infos = Vec::with_capacity(tensor_count as usize);
        let mut tensor_index = HashMap::new();
        for i in 0..tensor_count {
            let name = r.string(&|| format!("tensor info #{i} name"))?;
            let w = || format!("tensor `{name}` info");
            let n_dims = r.u32(&w)?;
            if n_dims > MAX_DIMS {
                return Err(fail(format!("tensor `{name}`: {n_dims} dimensions, at most {MAX_DIMS} supported")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&w)?);
            }
            let ty = GgmlType(r.u32(&w)?);
            let offset = r.u64(&w)?;
            let (block, block_bytes) = ty.block_layout().ok_or_else(|| {
                fail(format!("tensor `{name}`: unknown tensor type id {} (not a ggml type this reader knows)", ty.0))
            })?;
            let numel = dims
                .iter()
                .try_fold(1usize, |a, &d| usize::try_from(d).ok().and_then(|d| a.checked_mul(d)))
                .ok_or_else(|| fail(format!("tensor `{name}`: dimensions {dims:?} are too large")))?;
            let row = dims.first().copied().unwrap_or(1);
            if row % block as u64 != 0 {
                return Err(fail(format!(
                    "tensor `{name}`: row length {row} is not a multiple of the {} block size {block}",
                    ty.describe()
                )));
            }
            let nbytes = (numel / block)
                .checked_mul(block_bytes)
                .ok_or_else(|| fail(format!("tensor `{name}`: dimensions {dims:?} are too large")))?;
            if offset % alignment != 0 {
                return Err(fail(format!("tensor `{name}`: offset {offset} is not a multiple of the alignment {alignment}")));
            }
            if tensor_index.insert(name.clone(), infos.len()).is_some() {
                return Err(fail(format!("tensor `{name}` appears twice")));
            }
            infos.push(GgufTensorInfo { name, dims, ty, offset, nbytes });
        }
        let start = (r.pos as u64).div_ceil(alignment).saturating_mul(alignment);
        let data: &[u8] = usize::try_from(start).ok().and_then(|s| bytes.get(s..)).unwrap_or(&[]);
        for t in &infos {
            let end = t.offset.checked_add(t.nbytes as u64);
            if end.is_none_or(|e| e > data.len() as u64) {
                return Err(fail(format!(
                    "tensor `{}`: data at [{}, {}) of the data section runs past the end of the file (the data section has {} bytes): truncated tensor data",
                    t.name,
                    t.offset,
                    end.map_or("overflow".into(), |e| e.to_string()),
                    data.len()
                )));
            }
        }
        let mut order: Vec<usize> = (0..infos.len()).filter(|&i| infos[i].nbytes > 0).collect();
        order.sort_by_key(|&i| infos[i].offset);
        for w in order.windows(2) {
            let (a, b) = (&infos[w[0]], &infos[w[1]]);
            if b.offset < a.offset + a.nbytes as u64 {
                return Err(fail(format!("tensor `{}`: data overlaps that of tensor `{}`", b.name, a.name)));
            }
        }
        Ok(GgufFile {
            file: file.to_owned(),
            version,
            alignment,
            metadata,
            meta_index,
            tensors: infos,
            tensor_index,
            data,
        })
    }

    /// The name this file has in errors.
    pub fn file(&self) -> &str {
        &self.file
    }
    /// Every metadata key-value pair, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }
    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    /// Every tensor info, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }
    /// The info of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    /// The raw bytes of tensor `name`.
    pub fn tensor_data(&self, name: &str) -> Result<&'a [u8]> {
        let t = self
            .tensor(name)
            .ok_or_else(|| Error::format(&self.file, format!("missing tensor `{name}`")))?;
        let off = t.offset as usize; // checked against the data length in parse
        Ok(&self.data[off..off + t.nbytes])
    }
    /// Tensor `name` dequantized to f32, row-major in its PyTorch shape ([`GgufTensorInfo::shape`]).
    /// An unsupported type is an error naming the tensor and type.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let data = self.tensor_data(name)?;
        let t = self.tensor(name).expect("found above");
        dequantize(t.ty, data).ok_or_else(|| {
            Error::format(
                &self.file,
                format!(
                    "tensor `{name}`: type {} is not supported (supported: {})",
                    t.ty.describe(),
                    GgmlType::SUPPORTED.iter().filter_map(|t| t.name()).collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// `data` of type `ty` dequantized to f32 following the block layouts in the module docs;
/// None when the type is not supported or `data` is not a whole number of blocks.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    let (block, bytes) = ty.block_layout()?;
    if !ty.is_supported() || !data.len().is_multiple_of(bytes) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / bytes * block);
    let blocks = data.chunks_exact(bytes);
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))),
        GgmlType::BF16 => out.extend(blocks.map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))),
        GgmlType::Q8_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| f32::from((q & 15) as i8 - 8) * d));
                out.extend(qs.iter().map(|&q| f32::from((q >> 4) as i8 - 8) * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 15) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        GgmlType::Q4_K => {
            for b in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let sc = &b[4..16];
                let qs = &b[16..144];
                for k in 0..8 {
                    let (s, mn) = if k < 4 {
                        (sc[k] & 63, sc[k + 4] & 63)
                    } else {
                        ((sc[k + 4] & 15) | ((sc[k - 4] >> 6) << 4), (sc[k + 4] >> 4) | ((sc[k] >> 6) << 4))
                    };
                    let scale = d * f32::from(s);
                    let min = dmin * f32::from(mn);
                    let chunk = &qs[32 * (k / 2)..32 * (k / 2) + 32];
                    let shift = 4 * (k % 2);
                    out.extend(chunk.iter().map(|&q| scale * f32::from((q >> shift) & 15) - min));
                }
            }
        }
        GgmlType::Q6_K => {
            for b in blocks {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for e in 0..256 {
                    let (h, r) = (e / 128, e % 128);
                    let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
                    let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
                    let q = (lo | (hi << 4)) as i8 - 32;
                    out.push(d * f32::from(sc[e / 16] as i8) * f32::from(q));
                }
            }
        }
        _ => return None,
    }
    Some(out)
}

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

/// The tokenizer.ggml.* metadata of a GGUF model, for building a tokenizer.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model` ("gpt2" for byte-level BPE, "llama" for SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre` (the pre-tokenizer, e.g. "smollm").
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte), empty when absent.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores`, empty when absent.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges` ("a b" pairs, by rank), empty when absent.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    /// The tokenizer these fields describe (byte-level BPE rebuilt as the equivalent
    /// tokenizer.json, see `data::tokenizer`).
    pub fn build(&self) -> Result<crate::data::tokenizer::Tokenizer> {
        crate::data::tokenizer::Tokenizer::from_gguf(&crate::data::tokenizer::GgufTokenizerSpec {
            model: self.model.clone(),
            pre: self.pre.clone(),
            tokens: self.tokens.clone(),
            token_types: self.token_types.clone(),
            merges: self.merges.clone(),
            bos: self.bos,
            eos: self.eos,
            unk: self.unk,
            pad: self.pad,
            add_bos: self.add_bos.unwrap_or(false),
        })
    }
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
    /// The tokenizer metadata; `file` names the file in errors (a key of the wrong type).
    pub fn tokenizer(&self, file: &str) -> Result<GgufTokenizer> {
        let bad = |k: &str, what: &str| Error::format(file, format!("metadata `{k}`: expected {what}"));
        let string = |k: &str| -> Result<Option<String>> {
            self.get(k)
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad(k, "a string")))
                .transpose()
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            match self.get(k) {
                None => Ok(Vec::new()),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad(k, "an array of strings")),
            }
        };
        let id = |k: &str| -> Result<Option<u32>> {
            self.get(k)
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| bad(k, "a token id")))
                .transpose()
        };
        let flag = |k: &str| -> Result<Option<bool>> {
            self.get(k).map(|v| v.as_bool().ok_or_else(|| bad(k, "a bool"))).transpose()
        };
        let token_types = match self.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_i64().and_then(|t| i32::try_from(t).ok())).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad("tokenizer.ggml.token_type", "an array of integers"))?,
        };
        let scores = match self.get("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad("tokenizer.ggml.scores", "an array of numbers"))?,
        };
        Ok(GgufTokenizer {
            model: string("tokenizer.ggml.model")?.ok_or_else(|| Error::format(file, "missing metadata `tokenizer.ggml.model`"))?,
            pre: string("tokenizer.ggml.pre")?,
            tokens: strings("tokenizer.ggml.tokens")?,
            token_types,
            scores,
            merges: strings("tokenizer.ggml.merges")?,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?,
            add_eos: flag("tokenizer.ggml.add_eos_token")?,
            chat_template: string("tokenizer.chat_template")?,
        })
    }
}

struct GgufSource<'g, 'a> {
    g: &'g GgufFile<'a>,
    /// (n_head for attn_q, n_head for attn_k) when llama.cpp permuted their rows.
    permuted: Option<(usize, usize)>,
    used: BTreeSet<String>,
}

impl TensorSource for GgufSource<'_, '_> {
    fn present(&self) -> (String, &'static str, usize) {
        let field = if self.permuted.is_some() { "llama.block_count" } else { "qwen2.block_count" };
        (self.g.file().to_owned(), field, self.g.tensors().len())
    }
    fn fetch(&mut self, name: &str, shape: &[usize], _projection: bool) -> Result<HostWeight> {
        let file = self.g.file();
        let gname = gguf_name(name).ok_or_else(|| Error::Invalid(format!("no GGUF name for `{name}`")))?;
        let info = self
            .g
            .tensor(&gname)
            .ok_or_else(|| Error::format(file, format!("missing tensor `{gname}` (Hugging Face `{name}`)")))?;
        if info.shape() != shape {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{gname}`: shape {:?} (ggml dims {:?}), expected {shape:?} from the model metadata",
                    info.shape(),
                    info.dims
                ),
            ));
        }
        let mut data = self.g.tensor_f32(&gname)?;
        if let Some((nq, nk)) = self.permuted {
            let heads = if gname.contains(".attn_q.") {
                Some(nq)
            } else if gname.contains(".attn_k.") {
                Some(nk)
            } else {
                None
            };
            if let Some(n) = heads {
                data = unpermute_rows(&data, shape[0], n).ok_or_else(|| {
                    Error::format(file, format!("tensor `{gname}`: {} rows do not split into {n} heads of even size", shape[0]))
                })?;
            }
        }
        // A token embedding or output layer quantized in a type other than Q8_0 (Q4_K, Q6_K, ...:
        // values that need more than 16 bits to be exact) is rounded to f16, so it is held in
        // 16 bits on the device instead of 32 (a Q8_0 table stays exact, in 8 bits).
        let table = name == crate::model::config::names::EMBED || name == crate::model::config::names::LM_HEAD;
        if table && !matches!(info.ty.name(), Some("F32" | "F16" | "BF16" | "Q8_0")) {
            data.iter_mut().for_each(|v| *v = crate::gpu::round_f16(*v));
        }
        self.used.insert(gname);
        Ok(HostWeight::F32(HostTensor { shape: shape.to_vec(), data }))
    }
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
    let permuted = (config.architecture != Architecture::Qwen2)
        .then_some((config.num_attention_heads, config.num_key_value_heads));
    let mut src = GgufSource { g: &g, permuted, used: BTreeSet::new() };
    let mut model = HostModel::build_with(config, &mut src, quantize)?;
    if g.tensor("rope_freqs.weight").is_some() {
        src.used.insert("rope_freqs.weight".into());
    }
    model.unused = g
        .tensors()
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| !src.used.contains(n))
        .collect();
    model.unused.sort();
    Ok(GgufModel {
        model,
        version: g.version,
        metadata: g.metadata().iter().cloned().collect(),
        tensor_types: g.tensors().iter().map(|t| (t.name.clone(), t.ty)).collect(),
    })
}

/// The [`ModelConfig`] of a GGUF file's metadata (see [`load_gguf`]).
pub fn gguf_config(g: &GgufFile) -> Result<ModelConfig> {
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
    let mut rope_freq_factors = None;
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
        let factors = g.tensor_f32("rope_freqs.weight")?;
        if let Some((i, f)) = factors.iter().enumerate().find(|(_, f)| !(f.is_finite() && **f > 0.0)) {
            return Err(Error::format(file, format!("tensor `rope_freqs.weight`: value {f} at {i} is not a positive finite factor")));
        }
        rope_freq_factors = Some(factors);
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
        rope_freq_factors,
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
