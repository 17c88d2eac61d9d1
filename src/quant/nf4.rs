//! NF4 (4-bit NormalFloat, QLoRA) blockwise quantization on the CPU, bit-exact with bitsandbytes
//! 0.50.2: flat blocks with an f32 absmax each, two codes per byte (first element in the high
//! nibble), and double quantization of the absmax with bitsandbytes' 8-bit dynamic map.
//!
//! Every rounding step follows the library (see docs/nf4.md): the NF4 code is the number of f32
//! midpoints strictly below `clamp(x * (1/absmax), -1, 1)`; the double-quantization offset is
//! torch's f32 `mean` (its cascade sum, reproduced by [`torch_mean_f32`]); the 8-bit codes come
//! from bitsandbytes' CPU quantizer, a 65,536-bin lookup table rather than an exact nearest search.

use std::sync::OnceLock;

use crate::{Error, Result};

/// NF4 code values as f32, index = nibble value 0..15: bitsandbytes' `get_4bit_type("nf4")`.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The nibble of 0.0 in [`NF4_CODE`]; also the padding nibble of an odd element count.
pub const NF4_ZERO_CODE: u8 = 7;

/// bitsandbytes' default NF4 block size (elements per absmax), also QLoRA's.
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// Block size of the 8-bit quantization of the absmax vector in double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Smallest block size accepted (bitsandbytes' smallest 4-bit block size).
pub const MIN_BLOCKSIZE: usize = 32;

/// Largest block size accepted (bitsandbytes' largest block size).
pub const MAX_BLOCKSIZE: usize = 4096;

/// The per-block scales of an [`Nf4Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Stats {
    /// One f32 absmax per block: `absmax[b] = max |x|` over block `b` (0 for an all-zero block).
    Absmax(Vec<f32>),
    /// Double quantization: `absmax[b] = dyn[absmax_u8[b]] * nested_absmax[b / nested_blocksize]
    /// + offset` (f32 multiply, then f32 add), `dyn` = [`dynamic_map`].
    DoubleQuant {
        /// One 8-bit code per NF4 block, index into [`dynamic_map`]; length nblocks.
        absmax_u8: Vec<u8>,
        /// `max |absmax - offset|` per nested block; length ceil(nblocks / nested_blocksize).
        nested_absmax: Vec<f32>,
        /// torch's f32 mean of the original absmax vector.
        offset: f32,
        /// NF4 blocks per nested block (256 in bitsandbytes).
        nested_blocksize: usize,
    },
}

/// An NF4-quantized tensor in bitsandbytes' layout.
///
/// The tensor is flattened row-major to `x[0..n)`, `n = shape.iter().product()`; block `b` is
/// `x[b*blocksize .. min((b+1)*blocksize, n))` (blocks may span rows; the last may be partial);
/// `packed[i] = (q[2i] << 4) | q[2i+1]` with `q[n] = 7` when `n` is odd, so `packed.len() =
/// ceil(n/2)`; value `i` is `NF4_CODE[q[i]] * absmax[i / blocksize]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Shape of the original tensor (row-major).
    pub shape: Vec<usize>,
    /// Elements per block: a power of two in 32..=4096.
    pub blocksize: usize,
    /// Two 4-bit codes per byte, first element in the high nibble; length ceil(n/2).
    pub packed: Vec<u8>,
    /// Per-block scales, plain or double-quantized.
    pub stats: Nf4Stats,
}

/// Checks that `blocksize` is a power of two in `MIN_BLOCKSIZE..=MAX_BLOCKSIZE` (32..=4096).
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if blocksize.is_power_of_two() && (MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "NF4 block size {blocksize} is not a power of two in {MIN_BLOCKSIZE}..={MAX_BLOCKSIZE}"
        )))
    }
}

/// Element count of `shape` (product of its dims; 1 for `[]`), or an error on overflow.
pub fn shape_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Invalid(format!("shape {shape:?}: element count overflows usize")))
}

/// The 15 NF4 decision midpoints `mid[i] = (NF4_CODE[i] + NF4_CODE[i+1]) / 2` in f32, ascending.
pub fn nf4_midpoints() -> [f32; 15] {
    let mut mid = [0f32; 15];
    for (i, m) in mid.iter_mut().enumerate() {
        *m = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
    }
    mid
}

/// NF4 code of one scaled value `s` in [-1, 1]: `#{i : mid[i] < s}` (a value exactly on a
/// midpoint takes the lower code, as torch.bucketize(right=False)).
pub fn nf4_code_index(s: f32) -> u8 {
    let mid = nf4_midpoints_cached();
    mid.partition_point(|&m| m < s) as u8
}

fn nf4_midpoints_cached() -> &'static [f32; 15] {
    static MID: OnceLock<[f32; 15]> = OnceLock::new();
    MID.get_or_init(nf4_midpoints)
}

/// Quantizes `data` (`shape.product()` f32 values, row-major) to NF4 blocks of `blocksize`:
/// `absmax[b] = max |x|` over block b, `q[i] = nf4_code_index(clamp(x[i] * (1/max(absmax[b],
/// 1e-38)), -1, 1))`, packed two per byte high nibble first (odd `n` pads with 7). With
/// `double_quant`, the absmax vector (length ceil(n/blocksize)) is stored as
/// [`Nf4Stats::DoubleQuant`] via [`double_quantize_absmax`]. Errors (`Error::Invalid`): a block
/// size that is not a power of two in 32..=4096, `data.len() != shape.product()`, an empty
/// tensor, or a non-finite value.
pub fn quantize_nf4(
    data: &[f32],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    check_blocksize(blocksize)?;
    let n = shape_numel(shape)?;
    if n != data.len() {
        return Err(Error::Invalid(format!(
            "quantize_nf4: shape {shape:?} has {n} elements but {} values were given",
            data.len()
        )));
    }
    if n == 0 {
        return Err(Error::Invalid(format!(
            "quantize_nf4: shape {shape:?} is empty"
        )));
    }
    if let Some((i, x)) = data.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::Invalid(format!(
            "quantize_nf4: element {i} is {x}; NF4 needs finite values"
        )));
    }
    let (packed, absmax) = quantize_blocks(data, blocksize);
    let stats = if double_quant {
        double_quantize_absmax(&absmax)?
    } else {
        Nf4Stats::Absmax(absmax)
    };
    Ok(Nf4Tensor {
        shape: shape.to_vec(),
        blocksize,
        packed,
        stats,
    })
}

/// The NF4 kernel: (packed codes, absmax) of finite `data` in blocks of `blocksize`.
fn quantize_blocks(data: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let n = data.len();
    let mid = nf4_midpoints_cached();
    // torch/numpy: the f32 literal 1e-38 is the double 1e-38 rounded to f32 (a subnormal).
    let tiny = 1e-38_f64 as f32;
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    for (b, block) in data.chunks(blocksize).enumerate() {
        let am = block.iter().fold(0f32, |m, &x| m.max(x.abs()));
        absmax.push(am);
        let inv = 1.0f32 / am.max(tiny);
        let base = b * blocksize;
        for (j, &x) in block.iter().enumerate() {
            let s = (x * inv).clamp(-1.0, 1.0);
            let q = mid.partition_point(|&m| m < s) as u8;
            let i = base + j;
            if i & 1 == 0 {
                packed[i / 2] = q << 4;
            } else {
                packed[i / 2] |= q;
            }
        }
    }
    if n & 1 == 1 {
        packed[n / 2] |= NF4_ZERO_CODE;
    }
    (packed, absmax)
}

/// Double quantization of an absmax vector `a` (length nblocks >= 1, finite):
/// `offset = torch_mean_f32(a)`, then `(absmax_u8, nested_absmax) =
/// quantize_blockwise_dynamic(a - offset, 256)`; decode with `dyn[q] * nested[b/256] + offset`.
pub fn double_quantize_absmax(absmax: &[f32]) -> Result<Nf4Stats> {
    if absmax.is_empty() {
        return Err(Error::Invalid(
            "double_quantize_absmax: empty absmax vector".into(),
        ));
    }
    if let Some((i, x)) = absmax.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::Invalid(format!(
            "double_quantize_absmax: absmax[{i}] is {x}"
        )));
    }
    let offset = torch_mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (absmax_u8, nested_absmax) = quantize_blockwise_dynamic(&centered, NESTED_BLOCKSIZE);
    Ok(Nf4Stats::DoubleQuant {
        absmax_u8,
        nested_absmax,
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
    })
}

/// bitsandbytes' CPU 8-bit blockwise quantizer (csrc/cpu_ops.cpp) with the dynamic map, on
/// `values` (length n) in blocks of `blocksize`: per block `m = max |v|` (returned, length
/// ceil(n/blocksize)); if `m == 0` the codes are 0; else `s = clamp(v * (1/m), -1, 1)`,
/// `k = floor(((s + 1) * 0.5) * 65535 + 0.5)` (f32, no fused ops) and the code is `lut[k]`,
/// `lut[k] = #{dynamic midpoints < -1 + 2k/65535}`; codes have length n.
pub fn quantize_blockwise_dynamic(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let blocksize = blocksize.max(1);
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let am = block.iter().fold(0f32, |m, &x| m.max(x.abs()));
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0f32 / am;
        for &v in block {
            let s = (v * inv).clamp(-1.0, 1.0);
            let t = ((s + 1.0f32) * 0.5f32) * 65535.0f32 + 0.5f32;
            let k = (t.floor() as i64).clamp(0, 65535) as usize;
            codes.push(lut[k]);
        }
    }
    (codes, absmax)
}

/// Inverse of [`quantize_blockwise_dynamic`]: `out[i] = dyn[codes[i]] * absmax[i / blocksize]`
/// (f32; `absmax` has ceil(n/blocksize) entries, out has n). Panics if `absmax` is shorter than
/// that (an argument error; the crate only calls it on validated tensors).
pub fn dequantize_blockwise_dynamic(codes: &[u8], absmax: &[f32], blocksize: usize) -> Vec<f32> {
    let dynm = dynamic_map_cached();
    let blocksize = blocksize.max(1);
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| dynm[q as usize] * absmax[i / blocksize])
        .collect()
}

/// bitsandbytes' 8-bit dynamic map `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`, computed the way torch 2.15 does on the CPU: for i in 0..7,
/// `b = torch.linspace(0.1, 1, 2^i + 1)` (f32, `start + step*k` fused for the first half,
/// `end - step*(steps-1-k)` fused for the rest), means `(b[k] + b[k+1]) / 2`, values
/// `±f32(10^(i-6)) * mean`; plus 0 and 1; sorted ascending: 256 values in [-0.99297, 1].
pub fn dynamic_map() -> [f32; 256] {
    *dynamic_map_cached()
}

fn dynamic_map_cached() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(compute_dynamic_map)
}

/// torch.linspace(start, end, steps) for an f32 output on the CPU (steps >= 2).
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|k| {
            if k < halfway {
                step.mul_add(k as f32, start)
            } else {
                (-step).mul_add((steps - k - 1) as f32, end)
            }
        })
        .collect()
}

fn compute_dynamic_map() -> [f32; 256] {
    // Python's 10 ** (i - 6) for i in 0..7 (a double; 10 ** 0 is the int 1).
    const SCALE: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, &scale) in SCALE.iter().enumerate() {
        let b = torch_linspace_f32(0.1, 1.0, (1usize << i) + 1);
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let s = scale as f32;
        data.extend(means.iter().map(|&m| s * m));
        data.extend(means.iter().map(|&m| (-s) * m));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// The CPU quantizer's 65,536-entry table: `lut[k] = #{m_j < -1 + (2k)/65535}` with
/// `m_j = 0.5 * (dyn[j] + dyn[j+1])` (all f32).
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map_cached();
        let mid: Vec<f32> = code.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
        (0..65536u32)
            .map(|k| {
                let v = -1.0f32 + (2.0f32 * k as f32) / 65535.0f32;
                mid.partition_point(|&m| m < v) as u8
            })
            .collect()
    })
}

/// torch 2.15's f32 sum of a contiguous vector on the CPU (single-threaded path, n <= 32768):
/// 8-lane vectors (AVX2) summed by a 4-way interleaved cascade (4 levels of 16-chunk partial
/// sums), then the scalar tail and the 8 lanes added in order; n < 8 uses the same cascade on
/// scalars. Returns the f32 sum.
pub fn torch_sum_f32(xs: &[f32]) -> f32 {
    const W: usize = 8;
    let n = xs.len();
    if n < W {
        let r = row_sum::<1>(xs, n);
        return 0.0 + r[0];
    }
    let nv = n / W;
    let lanes = row_sum::<W>(&xs[..nv * W], nv);
    let mut acc = 0f32;
    for &t in &xs[nv * W..] {
        acc += t;
    }
    for l in lanes {
        acc += l;
    }
    0.0 + acc
}

/// torch 2.15's `Tensor.mean()` of a contiguous f32 vector on the CPU: `torch_sum_f32(xs) / n`
/// in f32. Equals torch bit for bit for n <= 32768 (torch's grain size; beyond it the sum is split
/// across threads and depends on the thread count). Not the correctly rounded mean.
pub fn torch_mean_f32(xs: &[f32]) -> f32 {
    torch_sum_f32(xs) / xs.len() as f32
}

fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

fn vadd<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

fn load<const W: usize>(xs: &[f32], v: usize) -> [f32; W] {
    let mut out = [0f32; W];
    out.copy_from_slice(&xs[v * W..(v + 1) * W]);
    out
}

/// torch's `row_sum`: `count` vectors of W lanes in `xs`, 4 interleaved accumulators.
fn row_sum<const W: usize>(xs: &[f32], count: usize) -> [f32; W] {
    let size_ilp = count / 4;
    let mut part = multi_row_sum::<W>(xs, size_ilp);
    for v in size_ilp * 4..count {
        vadd(&mut part[0], &load::<W>(xs, v));
    }
    let [mut p0, p1, p2, p3] = part;
    vadd(&mut p0, &p1);
    vadd(&mut p0, &p2);
    vadd(&mut p0, &p3);
    p0
}

/// torch's `multi_row_sum` with 4 rows (row i = vectors 4i..4i+4) and 4 cascade levels.
fn multi_row_sum<const W: usize>(xs: &[f32], size: usize) -> [[f32; W]; 4] {
    const LEVELS: usize = 4;
    let level_power = 4usize.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; W]; 4]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                vadd(a, &load::<W>(xs, 4 * i + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let lower = std::mem::replace(&mut acc[j - 1], [[0f32; W]; 4]);
            for (a, l) in acc[j].iter_mut().zip(&lower) {
                vadd(a, l);
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            vadd(a, &load::<W>(xs, 4 * i + k));
        }
        i += 1;
    }
    let [mut total, rest @ ..] = acc;
    for level in &rest {
        for (a, u) in total.iter_mut().zip(level) {
            vadd(a, u);
        }
    }
    total
}

impl Nf4Stats {
    /// Number of NF4 blocks these stats describe (length of absmax or absmax_u8).
    pub fn nblocks(&self) -> usize {
        match self {
            Nf4Stats::Absmax(a) => a.len(),
            Nf4Stats::DoubleQuant { absmax_u8, .. } => absmax_u8.len(),
        }
    }

    /// The f32 scales, length nblocks: plain absmax as is, or for double quantization
    /// `dyn[absmax_u8[b]] * nested_absmax[b / nested_blocksize] + offset` (f32 mul, then add).
    /// Panics only if the stats are inconsistent (see [`Nf4Tensor::validate`]).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match self {
            Nf4Stats::Absmax(a) => a.clone(),
            Nf4Stats::DoubleQuant {
                absmax_u8,
                nested_absmax,
                offset,
                nested_blocksize,
            } => dequantize_blockwise_dynamic(absmax_u8, nested_absmax, *nested_blocksize)
                .into_iter()
                .map(|v| v + *offset)
                .collect(),
        }
    }
}

impl Nf4Tensor {
    /// Element count n = product of `shape`; 0 if it overflows (such a tensor fails `validate`).
    pub fn numel(&self) -> usize {
        shape_numel(&self.shape).unwrap_or(0)
    }

    /// Number of blocks: ceil(n / blocksize).
    pub fn nblocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize.max(1))
    }

    /// Whether the absmax vector is double-quantized.
    pub fn is_double_quant(&self) -> bool {
        matches!(self.stats, Nf4Stats::DoubleQuant { .. })
    }

    /// Checks internal consistency: blocksize valid, n >= 1, `packed.len() == ceil(n/2)`, stats of
    /// length nblocks, nested blocksize valid with ceil(nblocks/nested) nested scales, finite
    /// scales. `Error::Invalid` names what is wrong.
    pub fn validate(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let n = shape_numel(&self.shape)?;
        if n == 0 {
            return Err(Error::Invalid(format!(
                "Nf4Tensor: shape {:?} is empty",
                self.shape
            )));
        }
        if self.packed.len() != n.div_ceil(2) {
            return Err(Error::Invalid(format!(
                "Nf4Tensor: {} packed bytes for {n} elements (expected {})",
                self.packed.len(),
                n.div_ceil(2)
            )));
        }
        let nb = n.div_ceil(self.blocksize);
        match &self.stats {
            Nf4Stats::Absmax(a) => {
                if a.len() != nb {
                    return Err(Error::Invalid(format!(
                        "Nf4Tensor: {} absmax values for {nb} blocks",
                        a.len()
                    )));
                }
                if a.iter().any(|x| !x.is_finite()) {
                    return Err(Error::Invalid("Nf4Tensor: non-finite absmax".into()));
                }
            }
            Nf4Stats::DoubleQuant {
                absmax_u8,
                nested_absmax,
                offset,
                nested_blocksize,
            } => {
                if absmax_u8.len() != nb {
                    return Err(Error::Invalid(format!(
                        "Nf4Tensor: {} 8-bit absmax codes for {nb} blocks",
                        absmax_u8.len()
                    )));
                }
                if !nested_blocksize.is_power_of_two()
                    || !(MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(nested_blocksize)
                {
                    return Err(Error::Invalid(format!(
                        "Nf4Tensor: nested block size {nested_blocksize} is not a power of two \
                         in {MIN_BLOCKSIZE}..={MAX_BLOCKSIZE}"
                    )));
                }
                let nn = nb.div_ceil(*nested_blocksize);
                if nested_absmax.len() != nn {
                    return Err(Error::Invalid(format!(
                        "Nf4Tensor: {} nested absmax values for {nn} nested blocks",
                        nested_absmax.len()
                    )));
                }
                if nested_absmax.iter().any(|x| !x.is_finite()) || !offset.is_finite() {
                    return Err(Error::Invalid("Nf4Tensor: non-finite nested scales".into()));
                }
            }
        }
        Ok(())
    }

    /// The 4-bit codes unpacked, length n: `q[2i] = packed[i] >> 4`, `q[2i+1] = packed[i] & 15`.
    pub fn codes(&self) -> Vec<u8> {
        let n = self.numel();
        let mut q = Vec::with_capacity(self.packed.len() * 2);
        for &b in &self.packed {
            q.push(b >> 4);
            q.push(b & 0x0F);
        }
        q.truncate(n);
        q
    }

    /// The decoded f32 scales, length nblocks (see [`Nf4Stats::absmax_f32`]).
    pub fn absmax_f32(&self) -> Vec<f32> {
        self.stats.absmax_f32()
    }

    /// Dequantizes to n f32 values in row-major order of `shape`:
    /// `out[i] = NF4_CODE[q[i]] * absmax[i / blocksize]` (one f32 multiply, decoded scales).
    /// Panics only on an inconsistent tensor (one that fails [`Nf4Tensor::validate`]); tensors
    /// from [`quantize_nf4`] and the bitsandbytes reader are always consistent.
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.numel();
        let absmax = self.absmax_f32();
        let bs = self.blocksize.max(1);
        let mut out = Vec::with_capacity(n);
        for (i, &byte) in self.packed.iter().enumerate() {
            let i0 = 2 * i;
            if i0 < n {
                out.push(NF4_CODE[(byte >> 4) as usize] * absmax[i0 / bs]);
            }
            if i0 + 1 < n {
                out.push(NF4_CODE[(byte & 0x0F) as usize] * absmax[(i0 + 1) / bs]);
            }
        }
        out
    }

    /// This tensor with double-quantized stats (same packed codes): plain absmax goes through
    /// [`double_quantize_absmax`]; an already double-quantized tensor is returned as is.
    pub fn to_double_quant(&self) -> Result<Nf4Tensor> {
        match &self.stats {
            Nf4Stats::Absmax(a) => Ok(Nf4Tensor {
                shape: self.shape.clone(),
                blocksize: self.blocksize,
                packed: self.packed.clone(),
                stats: double_quantize_absmax(a)?,
            }),
            Nf4Stats::DoubleQuant { .. } => Ok(self.clone()),
        }
    }

    /// Bytes of quantized data this tensor holds: `ceil(n/2)` packed + `4*nblocks` (plain) or
    /// `nblocks + 4*ceil(nblocks/256) + 4` (double-quantized: codes, nested scales, offset).
    /// At blocksize 64 that is 0.5625 B/param plain and about 0.5158 B/param double-quantized,
    /// vs 4 B/param in f32 (the shared 16- and 256-entry code tables are not counted).
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.stats {
                Nf4Stats::Absmax(a) => 4 * a.len(),
                Nf4Stats::DoubleQuant {
                    absmax_u8,
                    nested_absmax,
                    ..
                } => absmax_u8.len() + 4 * nested_absmax.len() + 4,
            }
    }
}
