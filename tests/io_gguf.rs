//! GGUF (CPU only): the gguf Python package's own file and dequantized values
//! (tests/fixtures/gguf/quant_vectors.gguf) are matched bit for bit; a tiny Llama GGUF written
//! here with every supported tensor type loads to the values of plain per-element dequantizers
//! written here from the block layouts; llama.cpp's q/k row permutation is undone; malformed
//! files are errors naming the file and the tensor or key. The real SmolLM2 GGUF
//! ($QLORA_SMOLLM2_GGUF, from `bash scripts/fetch-smollm2.sh`; the test fails without it) loads
//! to the gguf package's values, q/k un-permuted as transformers does (tests/fixtures/smollm2/
//! gguf_values.json), with the metadata of tests/fixtures/smollm2_ref.json.

use std::collections::BTreeMap;
use std::path::PathBuf;

use qlora_webgpu::io::gguf::{dequantize, GgufFile, GgufModel, GgufStream, GgufValue, GgmlType};
use qlora_webgpu::io::{load_gguf, HostModel};
use qlora_webgpu::model::config::{Architecture, ModelConfig, RopeScaling};
use qlora_webgpu::Error;

use qlora_webgpu::io::sha256;
#[path = "support/smollm2_gguf.rs"]
mod smollm2_gguf;
use smollm2_gguf::{fixture_json, smollm2_gguf};

// ---------------------------------------------------------------- a GGUF writer for the tests

#[derive(Clone)]
enum Val {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Arr(u32, Vec<Val>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Val {
    fn ty(&self) -> u32 {
        match self {
            Val::U8(_) => 0,
            Val::I8(_) => 1,
            Val::U16(_) => 2,
            Val::I16(_) => 3,
            Val::U32(_) => 4,
            Val::I32(_) => 5,
            Val::F32(_) => 6,
            Val::Bool(_) => 7,
            Val::Str(_) => 8,
            Val::Arr(..) => 9,
            Val::U64(_) => 10,
            Val::I64(_) => 11,
            Val::F64(_) => 12,
        }
    }
    fn put(&self, b: &mut Vec<u8>) {
        match self {
            Val::U8(v) => b.push(*v),
            Val::I8(v) => b.extend(v.to_le_bytes()),
            Val::U16(v) => b.extend(v.to_le_bytes()),
            Val::I16(v) => b.extend(v.to_le_bytes()),
            Val::U32(v) => b.extend(v.to_le_bytes()),
            Val::I32(v) => b.extend(v.to_le_bytes()),
            Val::F32(v) => b.extend(v.to_le_bytes()),
            Val::Bool(v) => b.push(u8::from(*v)),
            Val::Str(s) => put_str(b, s),
            Val::Arr(et, items) => {
                b.extend(et.to_le_bytes());
                b.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    i.put(b);
                }
            }
            Val::U64(v) => b.extend(v.to_le_bytes()),
            Val::I64(v) => b.extend(v.to_le_bytes()),
            Val::F64(v) => b.extend(v.to_le_bytes()),
        }
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

struct Tensor {
    name: String,
    /// ggml ne, innermost first.
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

#[derive(Default)]
struct Writer {
    version: u32,
    kv: Vec<(String, Val)>,
    tensors: Vec<Tensor>,
    alignment: u64,
    /// Lay the data out in the reverse order of the tensor infos (offsets decreasing).
    data_reversed: bool,
}

impl Writer {
    fn new() -> Self {
        Writer { version: 3, alignment: 32, ..Default::default() }
    }
    fn kv(&mut self, k: &str, v: Val) -> &mut Self {
        self.kv.push((k.into(), v));
        self
    }
    /// `shape` in PyTorch order.
    fn tensor(&mut self, name: &str, shape: &[usize], ty: u32, data: Vec<u8>) -> &mut Self {
        let ne = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push(Tensor { name: name.into(), ne, ty, data });
        self
    }
    /// (file bytes, offset of the data section).
    fn bytes_and_data_start(&self) -> (Vec<u8>, usize) {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut b, k);
            b.extend(v.ty().to_le_bytes());
            v.put(&mut b);
        }
        let al = self.alignment as usize;
        let mut order: Vec<usize> = (0..self.tensors.len()).collect();
        if self.data_reversed {
            order.reverse();
        }
        let mut offsets = vec![0usize; self.tensors.len()];
        let mut offset = 0usize;
        for &i in &order {
            offsets[i] = offset;
            offset += self.tensors[i].data.len().div_ceil(al) * al;
        }
        for (t, &offset) in self.tensors.iter().zip(&offsets) {
            put_str(&mut b, &t.name);
            b.extend((t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.ty.to_le_bytes());
            b.extend((offset as u64).to_le_bytes());
        }
        b.resize(b.len().div_ceil(al) * al, 0);
        let start = b.len();
        for &i in &order {
            b.extend(&self.tensors[i].data);
            b.resize(b.len().div_ceil(al) * al, 0);
        }
        (b, start)
    }
    fn bytes(&self) -> Vec<u8> {
        self.bytes_and_data_start().0
    }
}

// ------------------------------------------- plain per-element reference dequantizers (layouts)

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q5_0: u32 = 6;
const Q8_0: u32 = 8;
const Q4_K: u32 = 12;
const Q6_K: u32 = 14;
const BF16: u32 = 30;

fn block_of(ty: u32) -> (usize, usize) {
    match ty {
        F32 => (1, 4),
        F16 | BF16 => (1, 2),
        Q4_0 => (32, 18),
        Q4_1 => (32, 20),
        Q8_0 => (32, 34),
        Q4_K => (256, 144),
        Q6_K => (256, 210),
        _ => panic!("type {ty}"),
    }
}

/// IEEE half from its definition.
fn half(lo: u8, hi: u8) -> f32 {
    let h = u16::from_le_bytes([lo, hi]);
    let s = if h >> 15 == 1 { -1.0 } else { 1.0 };
    let e = i32::from((h >> 10) & 31);
    let m = f64::from(h & 1023);
    assert!(e != 31, "test data has no inf/NaN");
    (s * if e == 0 { 2f64.powi(-14) * m / 1024.0 } else { 2f64.powi(e - 15) * (1.0 + m / 1024.0) }) as f32
}

/// Element `i` of a tensor of type `ty` stored in `data`, from the block layouts.
fn ref_value(ty: u32, data: &[u8], i: usize) -> f32 {
    let (bs, bb) = block_of(ty);
    let blk = &data[(i / bs) * bb..(i / bs + 1) * bb];
    let j = i % bs;
    match ty {
        F32 => f32::from_le_bytes(blk.try_into().unwrap()),
        F16 => half(blk[0], blk[1]),
        BF16 => f32::from_bits(u32::from(u16::from_le_bytes([blk[0], blk[1]])) << 16),
        Q8_0 => f32::from(blk[2 + j] as i8) * half(blk[0], blk[1]),
        Q4_0 => {
            // low nibbles: elements 0..15, high nibbles: 16..31
            let nib = if j < 16 { blk[2 + j] & 0x0f } else { blk[2 + j - 16] >> 4 };
            (f32::from(nib) - 8.0) * half(blk[0], blk[1])
        }
        Q4_1 => {
            let nib = if j < 16 { blk[4 + j] & 0x0f } else { blk[4 + j - 16] >> 4 };
            f32::from(nib) * half(blk[0], blk[1]) + half(blk[2], blk[3])
        }
        Q4_K => {
            let (d, dmin) = (half(blk[0], blk[1]), half(blk[2], blk[3]));
            let s = &blk[4..16];
            let sub = j / 32; // 8 sub-blocks of 32
            // 6-bit scale and min of sub-block `sub` (12 bytes: 4 low-6-bit scales, 4 low-6-bit
            // mins, then 4 bytes of 4+4 low bits for sub-blocks 4..7 whose top 2 bits sit in the
            // top bits of the first 8 bytes)
            let (sc, mn) = if sub < 4 {
                (s[sub] & 0x3f, s[sub + 4] & 0x3f)
            } else {
                let low = s[sub + 4];
                ((low & 0x0f) | ((s[sub - 4] & 0xc0) >> 2), (low >> 4) | ((s[sub] & 0xc0) >> 2))
            };
            let byte = blk[16 + (sub / 2) * 32 + j % 32];
            let q = if sub & 1 == 0 { byte & 0x0f } else { byte >> 4 };
            d * f32::from(sc) * f32::from(q) - dmin * f32::from(mn)
        }
        Q6_K => {
            let ql = &blk[0..128];
            let qh = &blk[128..192];
            let sc = &blk[192..208];
            let d = half(blk[208], blk[209]);
            let half_i = j / 128;
            let l = j % 32;
            let quarter = (j % 128) / 32; // 0..3
            let lo_byte = ql[half_i * 64 + l + if quarter % 2 == 1 { 32 } else { 0 }];
            let lo = if quarter < 2 { lo_byte & 0x0f } else { lo_byte >> 4 };
            let hi = (qh[half_i * 32 + l] >> (2 * quarter)) & 3;
            let q = i32::from(lo | (hi << 4)) - 32;
            d * f32::from(sc[j / 16] as i8) * q as f32
        }
        _ => unreachable!(),
    }
}

fn ref_dequant(ty: u32, data: &[u8], n: usize) -> Vec<f32> {
    (0..n).map(|i| ref_value(ty, data, i)).collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 24) as u8
    }
    /// A finite half in about ±[2^-12, 2].
    fn half_scale(&mut self) -> [u8; 2] {
        let e = 3 + (self.next() % 13) as u16; // 2^-12 .. 2^0
        let m = (self.next() % 1024) as u16;
        let s = (self.next() % 2) as u16;
        ((s << 15) | (e << 10) | m).to_le_bytes()
    }
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Random bytes of `n` elements of type `ty`, with finite scales.
fn random_data(rng: &mut Rng, ty: u32, n: usize) -> Vec<u8> {
    let (bs, bb) = block_of(ty);
    assert_eq!(n % bs, 0);
    let mut out = Vec::new();
    for _ in 0..n / bs {
        let mut b: Vec<u8> = (0..bb).map(|_| rng.byte()).collect();
        match ty {
            F32 => b.copy_from_slice(&rng.uniform().to_le_bytes()),
            F16 => b.copy_from_slice(&rng.half_scale()),
            BF16 => b.copy_from_slice(&((rng.uniform().to_bits() >> 16) as u16).to_le_bytes()),
            Q8_0 | Q4_0 => b[0..2].copy_from_slice(&rng.half_scale()),
            Q4_1 => {
                b[0..2].copy_from_slice(&rng.half_scale());
                b[2..4].copy_from_slice(&rng.half_scale());
            }
            Q4_K => {
                b[0..2].copy_from_slice(&rng.half_scale());
                b[2..4].copy_from_slice(&rng.half_scale());
            }
            Q6_K => b[208..210].copy_from_slice(&rng.half_scale()),
            _ => unreachable!(),
        }
        out.extend(b);
    }
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

// ----------------------------------------------------------------------- gguf package vectors

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(name)).expect("fixture")
}

#[test]
fn gguf_package_file_and_dequantizers_match() {
    let bytes = fixture("quant_vectors.gguf");
    let g = GgufFile::parse("quant_vectors.gguf", &bytes).expect("parse");
    assert_eq!((g.version, g.alignment), (3, 32));
    let get = |k: &str| g.get(k).unwrap_or_else(|| panic!("{k}")).clone();
    assert_eq!(get("general.architecture"), GgufValue::String("test".into()));
    assert_eq!(get("test.u8"), GgufValue::U8(200));
    assert_eq!(get("test.i8"), GgufValue::I8(-100));
    assert_eq!(get("test.u16"), GgufValue::U16(60000));
    assert_eq!(get("test.i16"), GgufValue::I16(-30000));
    assert_eq!(get("test.u32"), GgufValue::U32(4_000_000_000));
    assert_eq!(get("test.i32"), GgufValue::I32(-2_000_000_000));
    assert_eq!(get("test.f32"), GgufValue::F32(0.1));
    assert_eq!(get("test.bool"), GgufValue::Bool(true));
    assert_eq!(get("test.string"), GgufValue::String("héllo, GGUF".into()));
    assert_eq!(get("test.u64"), GgufValue::U64((1 << 63) + 5));
    assert_eq!(get("test.i64"), GgufValue::I64(-(1 << 62)));
    assert_eq!(get("test.f64"), GgufValue::F64(0.1));
    let s = |x: &str| GgufValue::String(x.into());
    assert_eq!(get("test.strings"), GgufValue::Array(vec![s("a"), s(""), s("<|im_start|>"), s("Ġthe")]));
    assert_eq!(get("test.ints"), GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(-2), GgufValue::I32(3)]));
    assert_eq!(get("test.bools"), GgufValue::Array(vec![GgufValue::Bool(true), GgufValue::Bool(false)]));
    assert_eq!(
        get("test.nested"),
        GgufValue::Array(vec![
            GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(2)]),
            GgufValue::Array(vec![GgufValue::I32(3)])
        ])
    );
    let types = [("F32", F32), ("F16", F16), ("BF16", BF16), ("Q8_0", Q8_0), ("Q4_0", Q4_0), ("Q4_1", Q4_1), ("Q4_K", Q4_K), ("Q6_K", Q6_K)];
    for (name, ty) in types {
        let t = g.tensor(name).unwrap();
        assert_eq!(t.ty, GgmlType(ty));
        let e = g.tensor(&format!("{name}.expected")).unwrap();
        assert_eq!(t.shape(), e.shape(), "{name}");
        let got = g.tensor_f32(name).unwrap();
        let want = g.tensor_f32(&format!("{name}.expected")).unwrap();
        assert!(same_bits(&got, &want), "{name}: differs from gguf.quants.dequantize");
        // The per-element reference of this file agrees with the package too.
        let data = g.tensor_data(name).unwrap();
        assert!(same_bits(&ref_dequant(ty, data, t.numel()), &want), "{name}: the test's reference differs");
    }
    assert_eq!(g.tensor("F32").unwrap().shape(), vec![2, 3, 4]);
    assert_eq!(g.tensor("F32").unwrap().dims, vec![4, 3, 2]);
}

#[test]
fn dequantize_rejects_partial_blocks_and_unsupported_types() {
    assert!(dequantize(GgmlType::Q4_1, &[0; 19]).is_none());
    assert!(dequantize(GgmlType(6), &[0; 22]).is_none()); // Q5_0
    assert!(dequantize(GgmlType(99), &[0; 4]).is_none());
    assert_eq!(dequantize(GgmlType::F32, &1.5f32.to_le_bytes()), Some(vec![1.5]));
}

#[test]
fn every_value_type_round_trips_in_v2_and_v3() {
    for version in [2, 3] {
        let mut w = Writer::new();
        w.version = version;
        let vals = [
            Val::U8(255),
            Val::I8(-128),
            Val::U16(65535),
            Val::I16(-32768),
            Val::U32(u32::MAX),
            Val::I32(i32::MIN),
            Val::F32(-1.25),
            Val::Bool(false),
            Val::Str(String::new()),
            Val::Arr(8, vec![Val::Str("x y".into()), Val::Str("\u{0120}z".into())]),
            Val::U64(u64::MAX),
            Val::I64(i64::MIN),
            Val::F64(std::f64::consts::PI),
            Val::Arr(9, vec![Val::Arr(12, vec![Val::F64(1.5)]), Val::Arr(12, vec![])]),
        ];
        for (i, v) in vals.iter().enumerate() {
            w.kv(&format!("k{i}"), v.clone());
        }
        let b = w.bytes();
        let g = GgufFile::parse("v.gguf", &b).unwrap();
        assert_eq!(g.version, version);
        use GgufValue as G;
        let want = [
            G::U8(255),
            G::I8(-128),
            G::U16(65535),
            G::I16(-32768),
            G::U32(u32::MAX),
            G::I32(i32::MIN),
            G::F32(-1.25),
            G::Bool(false),
            G::String(String::new()),
            G::Array(vec![G::String("x y".into()), G::String("\u{0120}z".into())]),
            G::U64(u64::MAX),
            G::I64(i64::MIN),
            G::F64(std::f64::consts::PI),
            G::Array(vec![G::Array(vec![G::F64(1.5)]), G::Array(vec![])]),
        ];
        for (i, v) in want.iter().enumerate() {
            assert_eq!(g.get(&format!("k{i}")), Some(v), "k{i}");
        }
        assert_eq!(g.metadata().len(), want.len());
        assert_eq!(g.get("k4").unwrap().as_u64(), Some(u64::from(u32::MAX)));
        assert_eq!(g.get("k5").unwrap().as_u64(), None);
        assert_eq!(g.get("k5").unwrap().as_i64(), Some(i64::from(i32::MIN)));
        assert_eq!(g.get("k6").unwrap().as_f64(), Some(-1.25));
    }
    // A bool byte other than 0 or 1 is an error naming the key.
    let mut w = Writer::new();
    w.kv("flag", Val::U8(2));
    let mut b = w.bytes();
    let at = b.windows(4).position(|x| x == b"flag").unwrap() + 4;
    b[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
    assert_mentions(&parse_err(&b), &["metadata `flag`", "bool"]);
}

// ------------------------------------------------------------------------- a tiny Llama GGUF

const HIDDEN: usize = 256;
const INTER: usize = 512;
const HEADS: usize = 4;
const KV: usize = 2;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 40;
const LAYERS: usize = 2;

/// The converter's permutation (convert_hf_to_gguf `permute`): `w.reshape(n_head, 2, hd/2, in)
/// .swapaxes(1, 2)`, written as an index map: permuted row (h, j, s) = original row (h, s, j).
fn converter_permute(w: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let cols = w.len() / rows;
    let hd = rows / n_head;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for j in 0..hd / 2 {
            for s in 0..2 {
                let r = h * hd + s * hd / 2 + j;
                out.extend_from_slice(&w[r * cols..(r + 1) * cols]);
            }
        }
    }
    out
}

fn unpermute_ref(w: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    // invert converter_permute by brute force: find where each original row went
    let cols = w.len() / rows;
    let ids: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    let moved = converter_permute(&ids, rows, n_head);
    let mut out = vec![0.0; w.len()];
    for (p, &orig) in moved.iter().enumerate() {
        let o = orig as usize;
        out[o * cols..(o + 1) * cols].copy_from_slice(&w[p * cols..(p + 1) * cols]);
    }
    out
}

fn tokens() -> Vec<Val> {
    (0..VOCAB).map(|i| Val::Str(format!("tok{i}"))).collect()
}

fn llama_metadata(w: &mut Writer) {
    w.kv("general.architecture", Val::Str("llama".into()))
        .kv("general.name", Val::Str("tiny".into()))
        .kv("llama.block_count", Val::U32(LAYERS as u32))
        .kv("llama.context_length", Val::U32(512))
        .kv("llama.embedding_length", Val::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", Val::U32(INTER as u32))
        .kv("llama.attention.head_count", Val::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Val::U32(KV as u32))
        .kv("llama.rope.freq_base", Val::F32(100000.0))
        .kv("llama.rope.dimension_count", Val::U32(HEAD_DIM as u32))
        .kv("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5))
        .kv("tokenizer.ggml.model", Val::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Val::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", Val::Arr(8, tokens()))
        .kv("tokenizer.ggml.token_type", Val::Arr(5, (0..VOCAB).map(|i| Val::I32(if i < 3 { 3 } else { 1 })).collect()))
        .kv("tokenizer.ggml.merges", Val::Arr(8, vec![Val::Str("t o".into()), Val::Str("to k".into())]))
        .kv("tokenizer.ggml.bos_token_id", Val::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Val::U32(2))
        .kv("tokenizer.ggml.padding_token_id", Val::U32(2))
        .kv("tokenizer.ggml.add_bos_token", Val::Bool(false))
        .kv("tokenizer.chat_template", Val::Str("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()));
}

/// The tiny model's tensors: (gguf name, PyTorch shape, type) for every tensor, with the seven
/// projections of layer 0 and 1 given different types so that each supported type is used.
fn tiny_layout(untied: bool) -> Vec<(String, Vec<usize>, u32)> {
    let mut v = vec![("token_embd.weight".to_owned(), vec![VOCAB, HIDDEN], Q8_0)];
    let types = [[Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, BF16], [Q4_K, Q6_K, Q4_1, Q4_0, Q8_0, BF16, F16]];
    let proj = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
    let shapes = [
        vec![HEADS * HEAD_DIM, HIDDEN],
        vec![KV * HEAD_DIM, HIDDEN],
        vec![KV * HEAD_DIM, HIDDEN],
        vec![HIDDEN, HEADS * HEAD_DIM],
        vec![INTER, HIDDEN],
        vec![INTER, HIDDEN],
        vec![HIDDEN, INTER],
    ];
    for (i, layer_types) in types.iter().enumerate() {
        v.push((format!("blk.{i}.attn_norm.weight"), vec![HIDDEN], F32));
        for m in 0..7 {
            v.push((format!("blk.{i}.{}.weight", proj[m]), shapes[m].clone(), layer_types[m]));
        }
        v.push((format!("blk.{i}.ffn_norm.weight"), vec![HIDDEN], F32));
    }
    v.push(("output_norm.weight".into(), vec![HIDDEN], F32));
    if untied {
        v.push(("output.weight".into(), vec![VOCAB, HIDDEN], Q6_K));
    }
    v
}

const HF_OF: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The Hugging Face name of a llama.cpp name, written independently of the library's map.
fn hf_name(g: &str) -> String {
    match g {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let parts: Vec<&str> = g.split('.').collect();
    let hf = HF_OF.iter().find(|(k, _)| *k == parts[2]).unwrap().1;
    format!("model.layers.{}.{hf}.{}", parts[1], parts[3])
}

/// Writes the tiny model (random data of each tensor's type) and returns the bytes and, per HF
/// name, the expected f32 values.
fn tiny_gguf(untied: bool, seed: u64) -> (Vec<u8>, BTreeMap<String, Vec<f32>>) {
    let mut rng = Rng(seed);
    let mut w = Writer::new();
    llama_metadata(&mut w);
    let mut expected = BTreeMap::new();
    for (name, shape, ty) in tiny_layout(untied) {
        let n: usize = shape.iter().product();
        let data = random_data(&mut rng, ty, n);
        let mut want = ref_dequant(ty, &data, n);
        if name == "output.weight" {
            // A Q6_K output layer is held in f16 (16 bits instead of f32's 32).
            let rounded: Vec<f32> = want.iter().map(|&x| nearest_half(x)).collect();
            assert!(rounded.iter().zip(&want).filter(|(a, b)| a != b).count() > n / 2, "Q6_K values are not halves");
            want = rounded;
        }
        if name.contains("attn_q") {
            want = unpermute_ref(&want, shape[0], HEADS);
        } else if name.contains("attn_k") {
            want = unpermute_ref(&want, shape[0], KV);
        }
        expected.insert(hf_name(&name), want);
        w.tensor(&name, &shape, ty, data);
    }
    (w.bytes(), expected)
}

/// The half nearest to x (ties to even), in f64 arithmetic, for |x| well inside the half range.
fn nearest_half(x: f32) -> f32 {
    let a = (x as f64).abs();
    if a == 0.0 {
        return x;
    }
    let step = if a < 2f64.powi(-14) { 2f64.powi(-24) } else { 2f64.powi(a.log2().floor() as i32 - 10) };
    let q = a / step;
    let mut r = q.round();
    if (q - q.floor() - 0.5).abs() == 0.0 && r % 2.0 != 0.0 {
        r -= 1.0;
    }
    ((r * step) as f32).copysign(x)
}

fn check_model(m: &HostModel, expected: &BTreeMap<String, Vec<f32>>) {
    assert_eq!(m.config.tensor_shapes().len(), expected.len());
    for (name, shape) in m.config.tensor_shapes() {
        let want = &expected[&name];
        let got = m.get_f32(&name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(shape.iter().product::<usize>(), got.len(), "{name}");
        assert!(same_bits(&got, want), "{name}: values differ from the reference dequantizer");
    }
}

#[test]
fn tiny_llama_gguf_with_every_type_loads() {
    for untied in [false, true] {
        let (bytes, expected) = tiny_gguf(untied, 7 + u64::from(untied));
        let g = load_gguf("tiny.gguf", &bytes).expect("load");
        let c = &g.model.config;
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size),
            (HIDDEN, INTER, LAYERS, HEADS, KV, HEAD_DIM, VOCAB)
        );
        assert_eq!(c.tie_word_embeddings, !untied);
        assert_eq!((c.rope_theta, c.rms_norm_eps, c.max_position_embeddings), (100000.0, f64::from(1e-5f32), Some(512)));
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id), (Some(1), vec![2], Some(2)));
        assert_eq!(c.rope_scaling, None);
        assert_eq!(g.model.lm_head.is_some(), untied);
        assert!(g.model.unused.is_empty(), "{:?}", g.model.unused);
        check_model(&g.model, &expected);
        assert_eq!(g.tensor_types["blk.0.attn_q.weight"], GgmlType::Q4_0);

        let t = g.tokenizer("tiny.gguf").unwrap();
        assert_eq!((t.model.as_str(), t.pre.as_deref()), ("gpt2", Some("smollm")));
        assert_eq!(t.tokens.len(), VOCAB);
        assert_eq!(t.tokens[5], "tok5");
        assert_eq!(t.token_types[0], 3);
        assert_eq!(t.merges, vec!["t o".to_owned(), "to k".to_owned()]);
        assert_eq!((t.bos, t.eos, t.unk, t.pad, t.add_bos, t.add_eos), (Some(1), Some(2), None, Some(2), Some(false), None));
        assert_eq!(g.chat_template(), Some("{% for m in messages %}{{ m['content'] }}{% endfor %}"));
        assert_eq!(t.chat_template.as_deref(), g.chat_template());
    }
}

#[test]
fn qk_permutation_round_trip() {
    // Hugging Face q and k weights (and a q bias-like vector), permuted as the converter does,
    // stored as F32: loading gives the original rows back.
    let mut rng = Rng(99);
    let mut w = Writer::new();
    llama_metadata(&mut w);
    let mut originals = BTreeMap::new();
    for (name, shape, ty) in tiny_layout(false) {
        let n: usize = shape.iter().product();
        let (data, want) = if name.contains("attn_q") || name.contains("attn_k") {
            let orig: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
            let heads = if name.contains("attn_q") { HEADS } else { KV };
            let permuted = converter_permute(&orig, shape[0], heads);
            assert_ne!(permuted, orig);
            (permuted.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(), orig)
        } else {
            let d = random_data(&mut rng, ty, n);
            let want = ref_dequant(ty, &d, n);
            (d, want)
        };
        let ty = if name.contains("attn_q") || name.contains("attn_k") { F32 } else { ty };
        originals.insert(hf_name(&name), want);
        w.tensor(&name, &shape, ty, data);
    }
    let g = load_gguf("perm.gguf", &w.bytes()).unwrap();
    check_model(&g.model, &originals);

    // The library's inverse, directly: HF row h*hd + s*hd/2 + j = GGUF row h*hd + 2j + s.
    use qlora_webgpu::io::gguf::unpermute_rows;
    let rows = 12; // 3 heads of 4
    let w: Vec<f32> = (0..rows * 2).map(|i| i as f32).collect();
    let p = converter_permute(&w, rows, 3);
    assert_eq!(unpermute_rows(&p, rows, 3).unwrap(), w);
    // the stored order of head 0 is rows 0, 2, 1, 3
    assert_eq!(&p[..8], &[0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
    assert!(unpermute_rows(&p, rows, 5).is_none());
}

#[test]
fn qwen2_gguf_keeps_row_order_and_biases() {
    let mut rng = Rng(5);
    let mut w = Writer::new();
    w.kv("general.architecture", Val::Str("qwen2".into()))
        .kv("qwen2.block_count", Val::U32(1))
        .kv("qwen2.embedding_length", Val::U32(64))
        .kv("qwen2.feed_forward_length", Val::U32(96))
        .kv("qwen2.attention.head_count", Val::U32(2))
        .kv("qwen2.attention.head_count_kv", Val::U32(1))
        .kv("qwen2.rope.freq_base", Val::F32(1e6))
        .kv("qwen2.attention.layer_norm_rms_epsilon", Val::F32(1e-6))
        .kv("tokenizer.ggml.tokens", Val::Arr(8, (0..8).map(|i| Val::Str(i.to_string())).collect()));
    let mut expected = BTreeMap::new();
    let mut add = |w: &mut Writer, name: &str, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
        expected.insert(hf_name(name), vals.clone());
        w.tensor(name, &shape, F32, vals.iter().flat_map(|v| v.to_le_bytes()).collect());
    };
    add(&mut w, "token_embd.weight", vec![8, 64]);
    add(&mut w, "blk.0.attn_norm.weight", vec![64]);
    for (p, rows, cols) in [("attn_q", 64, 64), ("attn_k", 32, 64), ("attn_v", 32, 64), ("attn_output", 64, 64), ("ffn_gate", 96, 64), ("ffn_up", 96, 64), ("ffn_down", 64, 96)] {
        add(&mut w, &format!("blk.0.{p}.weight"), vec![rows, cols]);
        if ["attn_q", "attn_k", "attn_v"].contains(&p) {
            add(&mut w, &format!("blk.0.{p}.bias"), vec![rows]);
        }
    }
    add(&mut w, "blk.0.ffn_norm.weight", vec![64]);
    add(&mut w, "output_norm.weight", vec![64]);
    let g = load_gguf("qwen.gguf", &w.bytes()).unwrap();
    assert_eq!(g.model.config.architecture, Architecture::Qwen2);
    assert_eq!(g.model.config.rope_theta, 1e6);
    check_model(&g.model, &expected);
}

#[test]
fn rope_scaling_metadata() {
    let build = |extra: &dyn Fn(&mut Writer)| {
        let mut rng = Rng(3);
        let mut w = Writer::new();
        llama_metadata(&mut w);
        extra(&mut w);
        for (name, shape, ty) in tiny_layout(false) {
            let n: usize = shape.iter().product();
            w.tensor(&name, &shape, ty, random_data(&mut rng, ty, n));
        }
        w
    };
    let w = build(&|w| {
        w.kv("llama.rope.scaling.type", Val::Str("linear".into())).kv("llama.rope.scaling.factor", Val::F32(4.0));
    });
    let g = load_gguf("t.gguf", &w.bytes()).unwrap();
    assert_eq!(g.model.config.rope_scaling, Some(RopeScaling::Linear { factor: 4.0 }));

    let factors: Vec<f32> = (0..HEAD_DIM / 2).map(|i| 1.0 + i as f32).collect();
    let w = build(&|w| {
        w.tensor("rope_freqs.weight", &[HEAD_DIM / 2], F32, factors.iter().flat_map(|v| v.to_le_bytes()).collect());
    });
    let g = load_gguf("t.gguf", &w.bytes()).unwrap();
    assert_eq!(g.model.config.rope_scaling, None);
    assert_eq!(g.model.config.rope_freq_factors, Some(factors.clone()));
    assert!(g.model.unused.is_empty());

    let w = build(&|w| {
        w.kv("llama.rope.scaling.type", Val::Str("yarn".into()));
    });
    let msg = load_gguf("t.gguf", &w.bytes()).unwrap_err().to_string();
    assert_mentions(&msg, &["t.gguf", "llama.rope.scaling.type", "yarn"]);
}

/// The factors llama.cpp's converter writes as `rope_freqs.weight` for a Llama 3.1+ model: per
/// frequency, 1 / the llama3 scale (1 for short wavelengths, `factor` for long ones, the blend
/// between), here from the f64 formula.
fn llama3_rope_factors(theta: f64, hs: usize, factor: f64, low: f64, high: f64, old: f64) -> Vec<f32> {
    (0..hs)
        .step_by(2)
        .map(|i| {
            let wavelen = 2.0 * std::f64::consts::PI * theta.powf(i as f64 / hs as f64);
            let scale = if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                1.0 / factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) / factor + smooth
            };
            (1.0 / scale) as f32
        })
        .collect()
}

#[test]
fn rope_freqs_from_a_gguf_give_the_llama3_inv_freq() {
    use qlora_webgpu::ops::rope;
    // Llama 3.1's rope scaling on the tiny model's head size and base (theta 1e5 from
    // llama_metadata): the 32 frequencies cover all three llama3 bands.
    let (theta, factor, low, high, old) = (100000.0, 8.0, 1.0, 4.0, 8192u32);
    let llama3 = RopeScaling::Llama3 { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: old };
    let factors = llama3_rope_factors(theta, HEAD_DIM, factor, low, high, old as f64);
    let mut rng = Rng(17);
    let mut w = Writer::new();
    llama_metadata(&mut w);
    w.tensor("rope_freqs.weight", &[HEAD_DIM / 2], F32, factors.iter().flat_map(|v| v.to_le_bytes()).collect());
    for (name, shape, ty) in tiny_layout(false) {
        let n: usize = shape.iter().product();
        w.tensor(&name, &shape, ty, random_data(&mut rng, ty, n));
    }
    let g = load_gguf("llama31.gguf", &w.bytes()).unwrap();
    let c = &g.model.config;
    assert_eq!(c.rope_theta, theta);
    assert_eq!(c.rope_freq_factors.as_deref(), Some(&factors[..]));
    let eff = c.effective_rope_scaling();
    assert_eq!(eff, Some(RopeScaling::FreqFactors { factors: factors.clone() }));

    let got = rope::inv_freq(c.rope_theta, c.head_dim, eff.as_ref());
    let want = rope::inv_freq(theta, HEAD_DIM, Some(&llama3));
    let base = rope::inv_freq(theta, HEAD_DIM, None);
    let (mut bands, mut worst) = ([0usize; 3], 0.0f64);
    for i in 0..HEAD_DIM / 2 {
        let rel = (got[i] as f64 - want[i] as f64).abs() / want[i] as f64;
        worst = worst.max(rel);
        assert!(rel <= 1e-6, "inv_freq[{i}]: with rope_freqs {}, llama3 formula {}", got[i], want[i]);
        match factors[i] {
            f if f == 1.0 => {
                assert_eq!(got[i], base[i], "high frequency {i} kept");
                bands[0] += 1;
            }
            f if f == factor as f32 => {
                assert_eq!(got[i], want[i], "low frequency {i}: both divide by the factor");
                bands[2] += 1;
            }
            _ => bands[1] += 1,
        }
    }
    eprintln!("inv_freq from rope_freqs.weight vs the llama3 formula: max relative difference {worst:.2e} (bands high/mid/low {bands:?})");
    assert!(bands.iter().all(|&n| n > 0), "bands {bands:?}: the test must cover all three");

    // Next to llama3 parameters the factors are applied once, not twice; a linear factor is
    // applied on top of them (llama.cpp's freq_scale); without factors the config's scaling.
    let mut both = c.clone();
    both.rope_scaling = Some(llama3.clone());
    assert_eq!(both.effective_rope_scaling(), Some(RopeScaling::FreqFactors { factors: factors.clone() }));
    both.rope_scaling = Some(RopeScaling::Linear { factor: 2.0 });
    let times2: Vec<f32> = factors.iter().map(|f| f * 2.0).collect();
    assert_eq!(both.effective_rope_scaling(), Some(RopeScaling::FreqFactors { factors: times2 }));
    both.rope_freq_factors = None;
    assert_eq!(both.effective_rope_scaling(), Some(RopeScaling::Linear { factor: 2.0 }));

    // A factor that is not positive and finite is an error naming the tensor.
    let mut bad = factors.clone();
    bad[3] = 0.0;
    let mut w = Writer::new();
    llama_metadata(&mut w);
    w.tensor("rope_freqs.weight", &[HEAD_DIM / 2], F32, bad.iter().flat_map(|v| v.to_le_bytes()).collect());
    for (name, shape, ty) in tiny_layout(false) {
        let n: usize = shape.iter().product();
        w.tensor(&name, &shape, ty, random_data(&mut rng, ty, n));
    }
    assert_mentions(&load_err(&w.bytes()), &["rope_freqs.weight", "at 3"]);
}

/// `bytes` fed to a [`GgufStream`] in chunks of 1 to `max` bytes (random sizes), then finished.
/// Also returns the most bytes the stream held once the header was parsed.
fn stream_load(name: &str, bytes: &[u8], rng: &mut Rng, max: usize) -> Result<(GgufModel, usize), Error> {
    let mut s = GgufStream::new(name);
    let (mut at, mut held) = (0, 0);
    while at < bytes.len() {
        let end = (at + 1 + (rng.next() as usize) % max).min(bytes.len());
        s.push(&bytes[at..end])?;
        if s.header().is_some() {
            held = held.max(s.buffered());
        }
        at = end;
    }
    let (done, total) = s.tensors_done();
    let m = s.finish(None)?;
    assert!(total > 1 && done == total, "every tensor converted when the last byte is in: {done} of {total}");
    Ok((m, held))
}

#[test]
fn streamed_gguf_in_random_chunks_gives_the_whole_file_model() {
    // The tiny model in both layouts, with rope_freqs.weight, and with its data laid out in the
    // reverse order of the tensor infos (the stream reads the data section front to back).
    let mut files: Vec<(&str, Vec<u8>)> = vec![("tied", tiny_gguf(false, 3).0), ("untied", tiny_gguf(true, 4).0)];
    let mut rng = Rng(29);
    for reversed in [false, true] {
        let mut w = Writer::new();
        w.data_reversed = reversed;
        llama_metadata(&mut w);
        let factors: Vec<f32> = (0..HEAD_DIM / 2).map(|i| 1.0 + i as f32 / 8.0).collect();
        w.tensor("rope_freqs.weight", &[HEAD_DIM / 2], F32, factors.iter().flat_map(|v| v.to_le_bytes()).collect());
        for (name, shape, ty) in tiny_layout(true) {
            let n: usize = shape.iter().product();
            w.tensor(&name, &shape, ty, random_data(&mut rng, ty, n));
        }
        w.tensor("unused.weight", &[4], F32, vec![0; 16]);
        files.push((if reversed { "rope_freqs, data reversed" } else { "rope_freqs" }, w.bytes()));
    }
    for (label, bytes) in &files {
        let g = GgufFile::parse("x.gguf", bytes).unwrap();
        let largest = g.tensors().iter().map(|t| t.nbytes).max().unwrap();
        let want = load_gguf("x.gguf", bytes).unwrap();
        for max in [7, 300, 5000, bytes.len()] {
            let (got, held) = stream_load("x.gguf", bytes, &mut rng, max).unwrap();
            assert_eq!(got.model.config, want.model.config, "{label}, chunks up to {max}");
            for (name, _) in want.model.config.tensor_shapes() {
                assert!(same_bits(&got.model.get_f32(&name).unwrap(), &want.model.get_f32(&name).unwrap()), "{label}: {name}");
            }
            assert_eq!(got.model, want.model, "{label}");
            assert_eq!((&got.metadata, &got.tensor_types, got.version), (&want.metadata, &want.tensor_types, want.version));
            assert_eq!(got.tokenizer("x.gguf").unwrap(), want.tokenizer("x.gguf").unwrap());
            // After the header: at most one tensor's bytes held (of a file of bytes.len()).
            assert!(held <= largest, "{label}: held {held} bytes, the largest tensor has {largest}");
        }
        if label.starts_with("rope") {
            assert!(want.model.config.rope_freq_factors.is_some());
            assert_eq!(want.model.unused, vec!["unused.weight".to_owned()]);
        }
    }
    // A file cut short: the whole-file loader's error, in the header or in the data.
    let (bytes, _) = tiny_gguf(false, 3);
    let g = GgufFile::parse("x.gguf", &bytes).unwrap();
    let start = g.header().data_start as usize;
    for cut in [60, start - 5, start + 100, bytes.len() - 40] {
        let streamed = err_of(stream_load("x.gguf", &bytes[..cut], &mut rng, 300).map(|(g, _)| g.version));
        let whole = err_of(load_gguf("x.gguf", &bytes[..cut]).map(|g| g.version));
        assert_eq!(streamed, whole, "cut at {cut}");
    }
    // Not a GGUF file: the same error once 64 KiB (or the end) are in.
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(err_of(stream_load("x.gguf", &bad, &mut rng, 300).map(|(g, _)| g.version)), err_of(load_gguf("x.gguf", &bad).map(|g| g.version)));
}

// ------------------------------------------------------------------------------- bad files

fn err_of(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => {
            assert!(matches!(e, Error::Format { .. }), "not a format error: {e:?}");
            e.to_string()
        }
    }
}

fn parse_err(bytes: &[u8]) -> String {
    err_of(GgufFile::parse("bad.gguf", bytes).map(|g| g.version))
}

fn load_err(bytes: &[u8]) -> String {
    err_of(load_gguf("bad.gguf", bytes).map(|g| g.version))
}

fn small_file() -> Writer {
    let mut w = Writer::new();
    w.kv("general.architecture", Val::Str("llama".into()))
        .kv("tokenizer.ggml.tokens", Val::Arr(8, vec![Val::Str("a".into()), Val::Str("b".into())]));
    w.tensor("a.weight", &[2, 32], Q8_0, vec![0; 68]);
    w.tensor("b.weight", &[3], F32, vec![0; 12]);
    w
}

#[test]
fn bad_magic_and_version() {
    let good = small_file().bytes();
    GgufFile::parse("ok.gguf", &good).expect("the base file is fine");
    let mut b = good.clone();
    b[0..4].copy_from_slice(b"GGML");
    assert_mentions(&parse_err(&b), &["bad.gguf", "magic", "GGUF"]);
    for v in [1u32, 4, 0x0300_0000] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert_mentions(&parse_err(&b), &["bad.gguf", "version", &v.to_string()]);
    }
    let mut b = good.clone();
    b[4..8].copy_from_slice(&0x0300_0000u32.to_le_bytes());
    assert_mentions(&parse_err(&b), &["big-endian"]);
    let mut w = small_file();
    w.version = 2;
    assert_eq!(GgufFile::parse("v2.gguf", &w.bytes()).unwrap().version, 2);
    assert_mentions(&parse_err(&good[..3]), &["bad.gguf", "truncated"]);
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let mut w = small_file();
    w.tensors[1].ty = 99;
    assert_mentions(&parse_err(&w.bytes()), &["bad.gguf", "tensor `b.weight`", "unknown tensor type id 99"]);
    // Known to ggml but not dequantized here: the file parses, reading the tensor fails.
    let mut w = small_file();
    w.tensors[0].ty = Q5_0;
    w.tensors[0].data = vec![0; 44];
    let bytes = w.bytes();
    let g = GgufFile::parse("bad.gguf", &bytes).unwrap();
    assert_mentions(&err_of(g.tensor_f32("a.weight")), &["bad.gguf", "tensor `a.weight`", "Q5_0", "not supported"]);
}

#[test]
fn truncated_and_out_of_range_data() {
    let good = small_file().bytes();
    // Cut in the tensor data: the last tensor runs past the end.
    let msg = parse_err(&good[..good.len() - 24]); // the last 20 bytes are padding
    assert_mentions(&msg, &["bad.gguf", "tensor `b.weight`", "truncated tensor data"]);
    // Cut inside the metadata: names the key being read.
    let msg = parse_err(&good[..60]);
    assert_mentions(&msg, &["bad.gguf", "truncated", "general.architecture"]);

    // Offset past the end.
    let (mut b, _) = small_file().bytes_and_data_start();
    let pos = find_offset_field(&b, "b.weight");
    b[pos..pos + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_mentions(&parse_err(&b), &["tensor `b.weight`", "past the end"]);
    // Misaligned offset.
    b[pos..pos + 8].copy_from_slice(&8u64.to_le_bytes());
    assert_mentions(&parse_err(&b), &["tensor `b.weight`", "alignment"]);
    // Overlapping data.
    b[pos..pos + 8].copy_from_slice(&0u64.to_le_bytes());
    assert_mentions(&parse_err(&b), &["overlaps"]);

    // Row length not a whole number of blocks.
    let mut w = small_file();
    w.tensors[0].ne = vec![16, 2];
    assert_mentions(&parse_err(&w.bytes()), &["tensor `a.weight`", "row length 16", "32"]);
    // Too many dimensions.
    let mut w = small_file();
    w.tensors[1].ne = vec![1, 1, 1, 1, 3];
    assert_mentions(&parse_err(&w.bytes()), &["tensor `b.weight`", "dimensions"]);
}

/// Byte position of the offset field of tensor `name` in a file from `Writer`.
fn find_offset_field(b: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend(name.as_bytes());
    let at = b.windows(key.len()).position(|w| w == key.as_slice()).unwrap() + key.len();
    let n_dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * n_dims + 4
}

#[test]
fn absurd_counts_and_lengths_are_rejected_without_allocating() {
    let good = small_file().bytes();
    // tensor count 2^60
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert_mentions(&parse_err(&b), &["bad.gguf", "tensor count"]);
    // kv count 2^60
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert_mentions(&parse_err(&b), &["bad.gguf", "metadata count"]);
    // a key length of 2^62
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert_mentions(&parse_err(&b), &["bad.gguf", "string length"]);
    // an array count of 2^61 strings
    let mut w = Writer::new();
    w.kv("tokenizer.ggml.tokens", Val::Arr(8, vec![Val::Str("a".into())]));
    let mut b = w.bytes();
    let key = b"tokenizer.ggml.tokens";
    let at = b.windows(key.len()).position(|x| x == key).unwrap() + key.len() + 4 + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 61).to_le_bytes());
    assert_mentions(&parse_err(&b), &["bad.gguf", "tokenizer.ggml.tokens", "array"]);
    // unknown value type
    let mut w = Writer::new();
    w.kv("x.y", Val::U8(1));
    let mut b = w.bytes();
    let at = b.windows(3).position(|x| x == b"x.y").unwrap() + 3;
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert_mentions(&parse_err(&b), &["metadata `x.y`", "unknown value type 77"]);
    // alignment not a power of two
    let mut w = small_file();
    w.kv("general.alignment", Val::U32(24));
    assert_mentions(&parse_err(&w.bytes()), &["general.alignment"]);
    // a custom alignment is honoured
    let mut w = small_file();
    w.alignment = 64;
    w.kv("general.alignment", Val::U32(64));
    let b = w.bytes();
    let g = GgufFile::parse("a64.gguf", &b).unwrap();
    assert_eq!(g.alignment, 64);
    assert_eq!(g.tensor("b.weight").unwrap().offset, 128);
    // duplicate keys and tensors
    let mut w = small_file();
    w.kv("general.architecture", Val::Str("llama".into()));
    assert_mentions(&parse_err(&w.bytes()), &["general.architecture", "twice"]);
    let mut w = small_file();
    w.tensor("b.weight", &[3], F32, vec![0; 12]);
    assert_mentions(&parse_err(&w.bytes()), &["b.weight", "twice"]);
}

#[test]
fn model_level_errors_name_tensor_and_key() {
    // Missing tensor.
    let mut w = Writer::new();
    llama_metadata(&mut w);
    let mut rng = Rng(1);
    for (name, shape, ty) in tiny_layout(false) {
        if name != "blk.1.ffn_up.weight" {
            let n: usize = shape.iter().product();
            w.tensor(&name, &shape, ty, random_data(&mut rng, ty, n));
        }
    }
    assert_mentions(&load_err(&w.bytes()), &["bad.gguf", "missing tensor `blk.1.ffn_up.weight`", "model.layers.1.mlp.up_proj.weight"]);

    // Shape contradicting the metadata.
    let mut w = Writer::new();
    llama_metadata(&mut w);
    let mut rng = Rng(1);
    for (name, mut shape, ty) in tiny_layout(false) {
        if name == "blk.0.ffn_gate.weight" {
            shape[0] = 256;
        }
        let n: usize = shape.iter().product();
        w.tensor(&name, &shape, ty, random_data(&mut rng, ty, n));
    }
    assert_mentions(&load_err(&w.bytes()), &["bad.gguf", "blk.0.ffn_gate.weight", "[256, 256]", "[512, 256]"]);

    // Unsupported architecture, missing key, wrong type.
    let mut w = small_file();
    w.kv[0].1 = Val::Str("gpt2".into());
    assert_mentions(&load_err(&w.bytes()), &["bad.gguf", "general.architecture", "gpt2"]);
    let w = small_file();
    assert_mentions(&load_err(&w.bytes()), &["bad.gguf", "missing metadata `llama.embedding_length`"]);
    let mut w = Writer::new();
    llama_metadata(&mut w);
    w.kv.retain(|(k, _)| k != "llama.attention.layer_norm_rms_epsilon");
    w.kv("llama.attention.layer_norm_rms_epsilon", Val::Str("tiny".into()));
    assert_mentions(&load_err(&w.bytes()), &["bad.gguf", "llama.attention.layer_norm_rms_epsilon"]);
    let mut w = Writer::new();
    w.kv("general.name", Val::Str("x".into()));
    assert_mentions(&load_err(&w.bytes()), &["bad.gguf", "general.architecture"]);
}

// ------------------------------------------------------------------ the real SmolLM2 GGUF

/// The real SmolLM2-135M-Instruct Q4_1 GGUF against references: its metadata against
/// tests/fixtures/smollm2_ref.json `gguf_metadata` (read by the gguf package when the reference
/// was made), every one of its 272 tensors against tests/fixtures/smollm2/gguf_values.json (the
/// gguf package's dequantizers, attn_q / attn_k rows reverse-permuted as transformers' GGUF loader
/// does; the script beside it checked that all 272 equal transformers' loaded weights): SHA-256 of
/// the f32 values, so every value bit for bit, with first/last values and permuted rows compared
/// first to name a difference.
#[test]
fn smollm2_gguf_matches_reference() {
    let (path, bytes) = smollm2_gguf();
    let r = fixture_json("smollm2_ref.json");
    let vals = fixture_json("smollm2/gguf_values.json");
    assert_eq!(vals["source_gguf_sha256"], r["source_gguf_sha256"], "fixtures made from one file");
    let meta = &r["gguf_metadata"];
    let raw = GgufFile::parse(&path, &bytes).unwrap();
    assert_eq!(
        (u64::from(raw.version), raw.tensors().len() as u64, raw.metadata().len() as u64),
        (
            meta["GGUF.version"].as_u64().unwrap(),
            meta["GGUF.tensor_count"].as_u64().unwrap(),
            meta["GGUF.kv_count"].as_u64().unwrap()
        )
    );
    let g = load_gguf(&path, &bytes).unwrap();

    // Every metadata key of the reference, by its JSON type; arrays are recorded by length.
    let mut checked = 0;
    for (key, want) in meta.as_object().unwrap() {
        if key.starts_with("GGUF.") {
            continue;
        }
        let got = g.get(key).unwrap_or_else(|| panic!("metadata {key} missing"));
        match want {
            serde_json::Value::String(w) if w.starts_with("<array of ") => {
                let n: usize = w["<array of ".len()..w.len() - 1].parse().unwrap();
                assert_eq!(got.as_array().map(<[_]>::len), Some(n), "{key}: array length");
            }
            serde_json::Value::String(w) => assert_eq!(got.as_str(), Some(w.as_str()), "{key}"),
            serde_json::Value::Bool(w) => assert_eq!(got.as_bool(), Some(*w), "{key}"),
            serde_json::Value::Number(w) if w.is_u64() => {
                assert_eq!(got.as_u64(), w.as_u64(), "{key}")
            }
            // Floats: the reference printed the f32 value as a Python float (exact).
            serde_json::Value::Number(w) => assert_eq!(got.as_f64(), w.as_f64(), "{key}"),
            serde_json::Value::Array(w) => {
                let got: Vec<&str> = got.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
                let want: Vec<&str> = w.iter().map(|v| v.as_str().unwrap()).collect();
                assert_eq!(got, want, "{key}");
            }
            other => panic!("{key}: unexpected reference value {other}"),
        }
        checked += 1;
    }
    // 32 of the 33 keys (the reference lists `tokenizer.chat_template` apart: gguf_chat_template).
    assert_eq!(checked, 32, "metadata keys checked");
    assert_eq!(g.get("llama.rope.freq_base"), Some(&GgufValue::F32(100000.0)), "stored as f32");
    let t = g.tokenizer(&path).unwrap();
    assert_eq!((t.model.as_str(), t.pre.as_deref()), (r["gguf_tokenizer_model"].as_str().unwrap(), r["gguf_tokenizer_pre"].as_str()));
    assert_eq!((t.tokens.len(), t.token_types.len(), t.merges.len()), (49152, 49152, 48900));
    assert_eq!((t.bos, t.eos, t.unk, t.pad, t.add_bos), (Some(1), Some(2), Some(0), Some(2), Some(false)));
    for role in ["bos", "eos", "pad", "unk"] {
        let sp = &r["special_tokens"][role];
        assert_eq!(t.tokens[sp[1].as_u64().unwrap() as usize], sp[0].as_str().unwrap(), "{role} token");
    }
    assert_eq!(g.chat_template(), r["gguf_chat_template"].as_str(), "chat template");
    let mut counts = BTreeMap::new();
    for ty in g.tensor_types.values() {
        *counts.entry(ty.name().unwrap().to_owned()).or_insert(0u64) += 1;
    }
    let want_counts: BTreeMap<String, u64> = r["gguf_tensor_types"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    assert_eq!(counts, want_counts);

    let hc = &r["hf_config"];
    let c: &ModelConfig = &g.model.config;
    let h = |k: &str| hc[k].as_u64().unwrap() as usize;
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size),
        (h("hidden_size"), h("intermediate_size"), h("num_hidden_layers"), h("num_attention_heads"), h("num_key_value_heads"), h("head_dim"), h("vocab_size"))
    );
    assert_eq!(c.tie_word_embeddings, hc["tie_word_embeddings"].as_bool().unwrap());
    assert!(g.model.lm_head.is_none());
    assert_eq!(c.rope_theta, hc["rope_parameters"]["rope_theta"].as_f64().unwrap());
    assert_eq!(c.rms_norm_eps, hc["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(c.max_position_embeddings, Some(h("max_position_embeddings")));
    assert!(g.model.unused.is_empty());

    // Every tensor, bit for bit.
    let m = &g.model;
    let tensors = vals["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), 272);
    let f32s = |v: &serde_json::Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    for (name, want) in tensors {
        let gguf_name = want["gguf_name"].as_str().unwrap();
        assert_eq!(g.tensor_types[gguf_name].name(), want["ggml_type"].as_str(), "{gguf_name} type");
        let Some(qlora_webgpu::io::TensorRef::F32(host)) = m.get(name) else {
            panic!("{name}: missing or not f32")
        };
        let shape: Vec<usize> = want["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(host.shape, shape, "{name} shape");
        let v = &host.data;
        let first = f32s(&want["first4"]);
        let last = f32s(&want["last2"]);
        assert_eq!(&v[..4], &first[..], "{name} first values");
        assert_eq!(&v[v.len() - 2..], &last[..], "{name} last values");
        if let Some(rows) = vals["rows_first8"].get(name) {
            let cols = shape[1];
            for (row, want_row) in rows.as_object().unwrap() {
                let row: usize = row.parse().unwrap();
                assert_eq!(&v[row * cols..row * cols + 8], &f32s(want_row)[..], "{name} row {row} (the q/k permutation)");
            }
        }
        assert_eq!(
            sha256::sha256_f32_le_hex(v),
            want["sha256_f32_le"].as_str().unwrap(),
            "{name}: values differ from the gguf package's (SHA-256 of the f32 bytes)"
        );
    }
    assert_eq!(vals["rows_first8"].as_object().unwrap().len(), 4, "q and k of layers 0 and 29");
}
