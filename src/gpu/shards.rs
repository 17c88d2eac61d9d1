//! `RowShards`: a frozen (R, C) matrix stored as consecutive row blocks, each in its own buffer
//! within the device's largest storage binding, so that an embedding table or lm_head larger than
//! one binding (128 MiB on lavapipe, WebGPU's default limits and many mobile GPUs) still lives on
//! the device. Kernels take one shard per dispatch (WebGPU allows only 8 storage bindings a stage).
//! Storage is f32, or bf16 / f16 where every value is exactly representable in it (a 16-bit
//! checkpoint), which halves the bytes and stays bit-exact after widening in the kernels.

use super::{DType, GpuContext, Tensor, Q8_BLOCK};
use crate::{Error, Result};

/// A (rows, cols) matrix as row blocks of `rows_per` rows (the last may be shorter).
#[derive(Clone, Debug)]
pub struct RowShards {
    parts: Vec<Tensor>,
    rows_per: usize,
    rows: usize,
    cols: usize,
    dtype: DType,
}

/// Row granularity of a shard: a multiple of 64 keeps the vec4 matmul paths (multiples of 4) and
/// the 16-bit word packing (even element offsets) on every shard boundary.
const ROW_ALIGN: usize = 64;

/// bf16 bits of `x` when the conversion is exact (the low 16 bits are zero).
fn bf16_exact(x: f32) -> Option<u16> {
    let b = x.to_bits();
    (b & 0xffff == 0).then_some((b >> 16) as u16)
}

/// IEEE half bits of `x` when `x` is exactly a half (finite, normal or subnormal, or ±0/±inf/NaN
/// with a payload that fits), else None.
pub fn f16_exact(x: f32) -> Option<u16> {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        // inf or NaN: keep the top 10 mantissa bits if nothing below them is set.
        return (man & 0x1fff == 0).then_some(sign | 0x7c00 | (man >> 13) as u16);
    }
    if exp == 0 && man == 0 {
        return Some(sign);
    }
    let e = exp - 127; // unbiased
    if (-14..=15).contains(&e) {
        // normal half: 10 mantissa bits
        (man & 0x1fff == 0).then_some(sign | (((e + 15) as u16) << 10) | (man >> 13) as u16)
    } else if (-24..-14).contains(&e) && exp != 0 {
        // subnormal half: value = m * 2^-24 with m < 1024
        let full = man | 0x80_0000; // 24 bits, value = full * 2^(e-23)
        let shift = (-14 - e) as u32 + 13; // bits dropped to reach units of 2^-24
        (full & ((1 << shift) - 1) == 0).then_some(sign | (full >> shift) as u16)
    } else {
        None
    }
}

/// `x` rounded to the nearest IEEE half (ties to even), as f32: ±inf past the largest half
/// (65504), subnormal halves below 2^-14, NaN and infinities kept.
pub fn round_f16(x: f32) -> f32 {
    let a = x.abs();
    if !a.is_finite() {
        return x;
    }
    if a >= 65520.0 {
        return f32::INFINITY.copysign(x);
    }
    // The spacing of halves around a: 2^-24 below 2^-14, else 2^(exponent - 10).
    let e = ((a.to_bits() >> 23) as i32 - 127).max(-14);
    let step = f32::from_bits(((e - 10 + 127) as u32) << 23);
    ((a / step).round_ties_even() * step).copysign(x)
}

/// The widest storage that holds every value of `data` exactly: bf16 or f16 (2 bytes), else f32.
pub fn lossless_16bit(data: &[f32]) -> DType {
    if data.iter().all(|&x| bf16_exact(x).is_some()) {
        DType::BF16
    } else if data.iter().all(|&x| f16_exact(x).is_some()) {
        DType::F16
    } else {
        DType::F32
    }
}

/// A block of Q8_BLOCK values as (codes, scale) when every value is exactly q * d for one f32
/// scale d and codes q in [-127, 127]: d = max |x| / 127, the scale GGUF's Q8_0 quantizer gives
/// its largest value (a Q8_0 table read from a GGUF has this form), bit for bit, else None.
fn q8_block(block: &[f32]) -> Option<([i8; Q8_BLOCK], f32)> {
    let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let mut q = [0i8; Q8_BLOCK];
    for (j, &x) in block.iter().enumerate() {
        let c = if d == 0.0 { 0.0 } else { (x / d).round() };
        if !(-127.0..=127.0).contains(&c) || (c * d).to_bits() != x.to_bits() {
            return None;
        }
        q[j] = c as i8;
    }
    Some((q, d))
}

/// The most compact storage that holds every value of a (rows, cols) matrix exactly: Q8 (a
/// GGUF Q8_0 table: 9 bits a value), bf16 or f16 (16), else f32.
pub fn lossless_compact(data: &[f32], cols: usize) -> DType {
    if cols % Q8_BLOCK == 0 && !data.is_empty() && data.chunks(Q8_BLOCK).all(|b| q8_block(b).is_some()) {
        DType::Q8
    } else {
        lossless_16bit(data)
    }
}

/// `data` narrowed to `dtype` (bytes, little-endian). Every value must be exact in it
/// ([`lossless_compact`]); f32 is copied as is.
fn narrow(data: &[f32], dtype: DType) -> Result<Vec<u8>> {
    let conv: fn(f32) -> Option<u16> = match dtype {
        DType::F32 => return Ok(bytemuck::cast_slice(data).to_vec()),
        DType::Q8 => {
            let mut codes = Vec::with_capacity(DType::Q8.bytes(data.len()));
            let mut scales = Vec::with_capacity(data.len() / Q8_BLOCK * 4);
            if data.len() % Q8_BLOCK != 0 {
                return Err(Error::Invalid(format!("{} values do not make whole Q8 blocks of {Q8_BLOCK}", data.len())));
            }
            for (i, b) in data.chunks(Q8_BLOCK).enumerate() {
                let (q, d) = q8_block(b).ok_or_else(|| Error::Invalid(format!("block {i} is not exact in Q8")))?;
                codes.extend(q.iter().map(|&x| x as u8));
                scales.extend_from_slice(&d.to_le_bytes());
            }
            codes.extend(scales);
            return Ok(codes);
        }
        DType::BF16 => bf16_exact,
        DType::F16 => f16_exact,
        other => return Err(Error::Invalid(format!("row shards cannot be stored as {other:?}"))),
    };
    let mut out = Vec::with_capacity(data.len() * 2);
    for (i, &x) in data.iter().enumerate() {
        let h = conv(x).ok_or_else(|| Error::Invalid(format!("value {x} at {i} is not exact in {dtype:?}")))?;
        out.extend_from_slice(&h.to_le_bytes());
    }
    Ok(out)
}

impl RowShards {
    /// Rows per shard for a (rows, cols) matrix of `dtype` on `ctx`: as many as fit the largest
    /// binding, rounded down to a multiple of 64 (all rows when they fit at once).
    pub fn rows_per_shard(ctx: &GpuContext, rows: usize, cols: usize, dtype: DType) -> Result<usize> {
        Self::rows_per_block(ctx.max_binding(), rows, cols, dtype, ROW_ALIGN)
    }

    /// Rows per shard within `max` bytes, a multiple of `align` (all rows when they fit at once).
    fn rows_per_block(max: u64, rows: usize, cols: usize, dtype: DType, align: usize) -> Result<usize> {
        let row_bytes = dtype.bytes(cols).max(1) as u64;
        if rows as u64 * row_bytes <= max {
            return Ok(rows.max(1));
        }
        let fit = (max / row_bytes) as usize / align * align;
        if fit == 0 {
            return Err(Error::Limit {
                op: "shard",
                msg: format!(
                    "{align} rows of {cols} {dtype:?} values ({} bytes) exceed the device's largest storage binding ({max} bytes)",
                    align as u64 * row_bytes
                ),
            });
        }
        Ok(fit)
    }

    /// Uploads a (rows, cols) f32 matrix as row shards, stored in `dtype` (F32, or BF16 / F16
    /// when every value is exact in it: see [`lossless_16bit`]).
    pub fn upload(ctx: &GpuContext, data: &[f32], rows: usize, cols: usize, dtype: DType) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::shape("shard", format!("{} values for ({rows}, {cols})", data.len())));
        }
        let rows_per = Self::rows_per_shard(ctx, rows, cols, dtype)?;
        Self::upload_blocks(ctx, data, rows, cols, dtype, rows_per)
    }

    /// Uploads an f32 projection weight (out, in) in row blocks within
    /// [`GpuContext::projection_shard_limit`], each a multiple of 4 rows (the vec4 matmul
    /// paths' granularity): one block when it fits.
    pub fn upload_projection(ctx: &GpuContext, data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::shape("shard", format!("{} values for ({rows}, {cols})", data.len())));
        }
        let rows_per = Self::rows_per_block(ctx.projection_shard_limit(), rows, cols, DType::F32, 4)?;
        Self::upload_blocks(ctx, data, rows, cols, DType::F32, rows_per)
    }

    fn upload_blocks(ctx: &GpuContext, data: &[f32], rows: usize, cols: usize, dtype: DType, rows_per: usize) -> Result<Self> {
        let mut parts = Vec::with_capacity(rows.div_ceil(rows_per));
        let mut r0 = 0;
        while r0 < rows || parts.is_empty() {
            let r1 = (r0 + rows_per).min(rows);
            let bytes = narrow(&data[r0 * cols..r1 * cols], dtype)?;
            parts.push(ctx.upload_bytes(&bytes, &[r1 - r0, cols], dtype)?);
            r0 = r1;
        }
        Ok(RowShards { parts, rows_per, rows, cols, dtype })
    }

    /// Uploads in the smallest lossless storage ([`lossless_compact`]: Q8, bf16 or f16) when
    /// `compact`, else f32.
    pub fn upload_auto(ctx: &GpuContext, data: &[f32], rows: usize, cols: usize, compact: bool) -> Result<Self> {
        let dtype = if compact { lossless_compact(data, cols) } else { DType::F32 };
        Self::upload(ctx, data, rows, cols, dtype)
    }

    /// One tensor (R, C) as a single shard.
    pub fn from_tensor(t: Tensor) -> Self {
        let (rows, cols) = match t.shape() {
            [r, c] => (*r, *c),
            s => (s.iter().product::<usize>() / s.last().copied().unwrap_or(1).max(1), s.last().copied().unwrap_or(1)),
        };
        let dtype = t.dtype();
        RowShards { parts: vec![t], rows_per: rows.max(1), rows, cols, dtype }
    }

    /// The shards, in row order.
    pub fn parts(&self) -> &[Tensor] {
        &self.parts
    }
    /// Rows of shard `i`: `start..end` in the whole matrix.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        let r0 = i * self.rows_per;
        r0..(r0 + self.rows_per).min(self.rows)
    }
    /// R.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// C.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The storage type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes on the device.
    pub fn byte_len(&self) -> usize {
        self.parts.iter().map(Tensor::byte_len).sum()
    }
    /// The whole matrix as one f32 tensor when it is a single f32 shard.
    pub fn as_single_f32(&self) -> Option<&Tensor> {
        (self.parts.len() == 1 && self.dtype == DType::F32).then(|| &self.parts[0])
    }
}

/// A frozen (R, C) table kept in host memory instead of on the device: an untied input
/// embedding, which only a gather of a few rows per step reads, so its GPU memory (1 GiB for
/// Llama-3.1-8B in bf16) buys nothing. Stored as bf16 bits when every value is a bf16 (a bf16
/// checkpoint), else f32; rows come back widened to f32, the same bits a device gather gives.
#[derive(Debug)]
pub struct HostRows {
    data: HostData,
    rows: usize,
    cols: usize,
}

#[derive(Debug)]
enum HostData {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
}

impl HostRows {
    /// Keeps a (rows, cols) f32 matrix, in bf16 when that is lossless.
    pub fn new(data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::shape("host table", format!("{} values for ({rows}, {cols})", data.len())));
        }
        let bf16: Option<Vec<u16>> = data.iter().map(|&x| bf16_exact(x)).collect();
        let data = match bf16 {
            Some(b) => HostData::Bf16(b),
            None => HostData::F32(data.to_vec()),
        };
        Ok(HostRows { data, rows, cols })
    }
    /// R.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// C.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Host bytes held.
    pub fn byte_len(&self) -> usize {
        match &self.data {
            HostData::Bf16(v) => 2 * v.len(),
            HostData::F32(v) => 4 * v.len(),
        }
    }
    /// Appends row `r` (< R) in f32 to `out`.
    pub fn push_row(&self, r: usize, out: &mut Vec<f32>) {
        let span = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            HostData::Bf16(v) => out.extend(v[span].iter().map(|&h| f32::from_bits((h as u32) << 16))),
            HostData::F32(v) => out.extend_from_slice(&v[span]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_f16_is_to_the_nearest_half() {
        // Every half's neighbourhood: the half itself, the midpoints to its neighbours (ties to
        // even) and points just inside them.
        for h in 0u16..0x7c00 {
            let v = f32::from_bits(f16_to_f32_bits(h));
            assert_eq!(round_f16(v).to_bits(), v.to_bits(), "half {h:#x}");
            assert_eq!(round_f16(-v).to_bits(), (-v).to_bits());
            if h == 0x7bff {
                // 65504, the largest half: its midpoint to the next (65520) and beyond overflow.
                assert_eq!(round_f16(65520.0), f32::INFINITY);
                assert_eq!(round_f16(65519.99), 65504.0);
                continue;
            }
            let next = f32::from_bits(f16_to_f32_bits(h + 1));
            let mid = (v as f64 + next as f64) / 2.0;
            let even = if h % 2 == 0 { v } else { next };
            assert_eq!(round_f16(mid as f32), even, "midpoint above {h:#x}");
            let below = f32::from_bits((mid as f32).to_bits() - 1);
            let above = f32::from_bits((mid as f32).to_bits() + 1);
            assert_eq!(round_f16(below), v, "just below the midpoint above {h:#x}");
            assert_eq!(round_f16(above), next, "just above the midpoint above {h:#x}");
        }
        assert_eq!(round_f16(1e6), f32::INFINITY);
        assert!(round_f16(f32::NAN).is_nan());
    }

    /// f32 bits of half `h` (normal or subnormal, positive), computed independently of the code
    /// under test.
    fn f16_to_f32_bits(h: u16) -> u32 {
        let (e, m) = ((h >> 10) as i32, (h & 0x3ff) as f64);
        let v = if e == 0 { m * 2f64.powi(-24) } else { (1.0 + m / 1024.0) * 2f64.powi(e - 15) };
        (v as f32).to_bits()
    }

    #[test]
    fn f16_exactness() {
        for (x, want) in [(1.0f32, Some(0x3c00u16)), (-2.0, Some(0xc000)), (65504.0, Some(0x7bff)), (65505.0, None), (0.1, None), (5.960464477539063e-8, Some(1)), (6.103515625e-5, Some(0x0400)), (3.0517578125e-5, Some(0x0200)), (0.0, Some(0)), (-0.0, Some(0x8000)), (f32::INFINITY, Some(0x7c00))] {
            assert_eq!(f16_exact(x), want, "{x}");
        }
        assert_eq!(lossless_16bit(&[1.0, 0.5, -3.0]), DType::BF16);
        assert_eq!(lossless_16bit(&[1.0, 1.0009765625]), DType::F16);
        assert_eq!(lossless_16bit(&[0.1]), DType::F32);
    }
}
