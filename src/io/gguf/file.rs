//! The GGUF container (llama.cpp's format, versions 2 and 3, little-endian) read from bytes:
//! metadata values, tensor infos, a validated [`GgufFile`] borrowed from its bytes.
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

use std::collections::HashMap;

use super::dequant::dequantize;
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

/// A GGUF file's header: metadata and tensor infos, owned (no tensor data). Parsed from the
/// whole file by [`GgufFile::parse`], or from the file's first bytes by
/// [`GgufHeader::parse_prefix`] (a streamed download).
#[derive(Clone, Debug)]
pub struct GgufHeader {
    file: String,
    /// Format version (2 or 3).
    pub version: u32,
    /// `general.alignment` (or 32).
    pub alignment: u64,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Where the data section starts, bytes from the start of the file.
    pub data_start: u64,
}

/// What [`GgufHeader::parse_prefix`] made of the bytes it was given.
#[derive(Clone, Debug)]
pub enum HeaderParse {
    /// The header is not complete: at least this many bytes from the start of the file are
    /// needed (more may be, once they are read).
    NeedMore(usize),
    /// The whole header.
    Done(GgufHeader),
}

/// A validated GGUF file borrowed from its bytes.
#[derive(Clone, Debug)]
pub struct GgufFile<'a> {
    /// Format version (2 or 3).
    pub version: u32,
    /// `general.alignment` (or 32).
    pub alignment: u64,
    header: GgufHeader,
    data: &'a [u8],
}

/// A bounds-checked little-endian cursor naming the file in its errors.
/// With `partial` (the bytes are a prefix of the file), running out of bytes records in `short`
/// how many bytes from the start would be needed and fails; the caller then asks for more.
struct Reader<'a> {
    file: &'a str,
    b: &'a [u8],
    pos: usize,
    partial: bool,
    short: Option<usize>,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    /// In a prefix, `n` more bytes than are left: records the need; true when that is the case
    /// (the caller then fails with any error: [`GgufHeader::parse_prefix`] reports the need).
    fn need(&mut self, n: u64) -> bool {
        if self.partial {
            let want = (self.pos as u64).saturating_add(n);
            self.short = Some(usize::try_from(want).unwrap_or(usize::MAX));
        }
        self.partial
    }
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            self.need(n as u64);
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
            self.need(len);
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
                    self.need(count.saturating_mul(Self::min_size(et) as u64));
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
        let mut r = Reader { file, b: bytes, pos: 0, partial: false, short: None };
        let header = GgufHeader::read(&mut r)?;
        let fail = |what: String| Error::format(file, what);
        let start = header.data_start;
        let data: &[u8] = usize::try_from(start).ok().and_then(|s| bytes.get(s..)).unwrap_or(&[]);
        for t in &header.tensors {
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
        Ok(GgufFile { version: header.version, alignment: header.alignment, header, data })
    }

    /// The header (metadata and tensor infos).
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }
}

impl GgufHeader {
    /// Parses the header from the first bytes of a GGUF file (`file` names it in errors), with
    /// the checks of [`GgufFile::parse`] that do not need the tensor data: `NeedMore(n)` when
    /// `prefix` ends inside the header (n: the least length that can get further). An error is
    /// an error of the file whatever follows, except that a count or length too large for the
    /// bytes given is taken for a need of more bytes: at the end of the file
    /// [`GgufFile::parse`]'s error applies (see [`crate::io::gguf::GgufStream::finish`]).
    pub fn parse_prefix(file: &str, prefix: &[u8]) -> Result<HeaderParse> {
        let mut r = Reader { file, b: prefix, pos: 0, partial: true, short: None };
        match Self::read(&mut r) {
            Ok(h) => Ok(HeaderParse::Done(h)),
            Err(_) if r.short.is_some() => Ok(HeaderParse::NeedMore(r.short.unwrap_or(usize::MAX).max(prefix.len() + 1))),
            Err(e) => Err(e),
        }
    }

    fn read(r: &mut Reader) -> Result<Self> {
        let file = r.file;
        let fail = |what: String| Error::format(file, what);
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
            r.need(kv_count.saturating_mul(13));
            return Err(fail(format!("metadata count {kv_count} cannot fit in a {}-byte file", r.b.len())));
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
            r.need(tensor_count.saturating_mul(24));
            return Err(fail(format!("tensor count {tensor_count} cannot fit in a {}-byte file", r.b.len())));
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
        let data_start = (r.pos as u64).div_ceil(alignment).saturating_mul(alignment);
        let mut order: Vec<usize> = (0..infos.len()).filter(|&i| infos[i].nbytes > 0).collect();
        order.sort_by_key(|&i| infos[i].offset);
        for w in order.windows(2) {
            let (a, b) = (&infos[w[0]], &infos[w[1]]);
            if b.offset < a.offset + a.nbytes as u64 {
                return Err(fail(format!("tensor `{}`: data overlaps that of tensor `{}`", b.name, a.name)));
            }
        }
        Ok(GgufHeader { file: file.to_owned(), version, alignment, metadata, meta_index, tensors: infos, tensor_index, data_start })
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
}

impl<'a> GgufFile<'a> {
    /// The name this file has in errors.
    pub fn file(&self) -> &str {
        self.header.file()
    }
    /// Every metadata key-value pair, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        self.header.metadata()
    }
    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.header.get(key)
    }
    /// Every tensor info, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        self.header.tensors()
    }
    /// The info of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.header.tensor(name)
    }
    /// The raw bytes of tensor `name`.
    pub fn tensor_data(&self, name: &str) -> Result<&'a [u8]> {
        let t = self
            .tensor(name)
            .ok_or_else(|| Error::format(self.file(), format!("missing tensor `{name}`")))?;
        let off = t.offset as usize; // checked against the data length in parse
        Ok(&self.data[off..off + t.nbytes])
    }
    /// Tensor `name` dequantized to f32, row-major in its PyTorch shape ([`GgufTensorInfo::shape`]).
    /// An unsupported type is an error naming the tensor and type.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let data = self.tensor_data(name)?;
        let t = self.tensor(name).expect("found above");
        t.to_f32(self.file(), data)
    }
}

impl GgufTensorInfo {
    /// This tensor's `data` (its `nbytes` bytes) dequantized to f32, row-major in its PyTorch
    /// shape; `file` names the file in errors. An unsupported type is an error naming the tensor
    /// and type.
    pub fn to_f32(&self, file: &str, data: &[u8]) -> Result<Vec<f32>> {
        dequantize(self.ty, data).ok_or_else(|| {
            Error::format(
                file,
                format!(
                    "tensor `{}`: type {} is not supported (supported: {})",
                    self.name,
                    self.ty.describe(),
                    GgmlType::SUPPORTED.iter().filter_map(|t| t.name()).collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }
}
