//! NF4 weights on the device (shaders/nf4.wgsl): the upload of a bitsandbytes-layout
//! [`Nf4Tensor`], dequantization, and the frozen NF4 linear layer y = x · dequant(W)^T with its
//! input gradient dx = dy · dequant(W) (W gets no gradient).
//!
//! Two designs compute the linear layer, and each is the other's test oracle:
//! * scratch: dequantize W into a pooled f32 (N, K) buffer, then the f32 matmul
//!   (`matmul::x_wt`, `matmul::g_w`); W is decoded once a launch; any shape;
//! * fused: a register-blocked kernel (BM x BN a invocation, as the f32 matmul) that decodes W a
//!   word (eight elements) at a time inside the matmul, with no dequantized copy; W is decoded
//!   ceil(M / BM) times; needs K % 8 == 0, and N % 4 == 0 for the input gradient.
//!
//! Measured on lavapipe (benches/nf4.rs, docs/nf4.md), decoding costs more than a load there, so
//! the fused kernel wins only when it decodes W once: up to BM (8) rows it runs at the f32
//! matmul's speed and about 1.6 times faster than the scratch path (no scratch round trip); at
//! 512 rows it is about 3 times slower than the scratch path, which stays within a few percent
//! of the f32 matmul. The launches below take the fused kernel for M <= BM where it applies and
//! the scratch path otherwise.

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::ops::{matmul, rows_cols};
use crate::quant::nf4::{dynamic_map, Nf4Stats, Nf4Tensor, NF4_CODE};
use crate::{Error, Result};

const DEQUANTIZE: Kernel = shaders::kernel(shaders::NF4, "nf4_dequantize", &["packed", "stats", "out4"]);
const FORWARD_FUSED: Kernel = shaders::kernel(shaders::NF4, "nf4_linear_forward", &["packed", "stats", "x4", "out"]);
const FORWARD_ROWS: Kernel = shaders::kernel(shaders::NF4, "nf4_linear_forward_rows", &["packed", "stats", "x4", "out"]);
/// Most rows of x the row kernel takes (`MAX_ROWS` in shaders/nf4.wgsl).
pub const MAX_ROWS: u32 = 8;
const BACKWARD_INPUT_FUSED: Kernel = shaders::kernel(shaders::NF4, "nf4_linear_backward_input", &["packed", "stats", "x4", "out"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[DEQUANTIZE, FORWARD_FUSED, FORWARD_ROWS, BACKWARD_INPUT_FUSED];

/// Workgroup side of shaders/nf4.wgsl (`WG` there): the fused kernels run WG x WG invocations,
/// `nf4_dequantize` WG * WG in one dimension.
pub const WG: u32 = 8;
/// Rows of x (or dy) per invocation of the fused kernels (`BM` in shaders/nf4.wgsl).
pub const BM: u32 = 8;
/// Rows of W per invocation of the fused forward (`BN` in shaders/nf4.wgsl).
pub const BN: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    numel: u32,
    block_shift: u32,
    dq: u32,
    nested_shift: u32,
    nested_at: u32,
    offset: f32,
    one: f32,
    tables_at: u32,
    word0: u32,
}

/// How the block scales are laid out in [`Nf4Weight::stats`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Nf4Scales {
    /// One f32 absmax per block: `stats[b]` holds its bits (nblocks words).
    Absmax,
    /// Double quantization: the 8-bit codes of the blocks, four a word little-endian
    /// (ceil(nblocks / 4) words), then from word `nested_at` the f32 bits of `nested_absmax`
    /// (ceil(nblocks / nested_blocksize) words); `absmax[b] = dyn[code[b]] *
    /// nested_absmax[b / nested_blocksize] + offset` (f32 multiply, then f32 add).
    DoubleQuant {
        /// The mean subtracted before the 8-bit quantization.
        offset: f32,
        /// NF4 blocks per nested block (256 in bitsandbytes).
        nested_blocksize: usize,
        /// Word of `stats` where the nested absmax starts: ceil(nblocks / 4).
        nested_at: usize,
    },
}

/// A frozen NF4 weight W (out, in) on the device, in bitsandbytes' layout: cheap to clone (the
/// tensors are shared handles).
#[derive(Clone, Debug)]
pub struct Nf4Weight {
    shape: [usize; 2],
    blocksize: usize,
    packed: Tensor,
    stats: Tensor,
    scales: Nf4Scales,
    tables_at: usize,
}

/// `bytes` (little-endian) as u32 words, the last one zero-padded.
fn words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect()
}

impl Nf4Weight {
    /// Uploads a 2-D [`Nf4Tensor`] (out, in): the packed byte stream as u32 words (four bytes a
    /// word, little-endian, zero-padded) and the scales as laid out in [`Nf4Scales`].
    pub fn upload(ctx: &GpuContext, t: &Nf4Tensor) -> Result<Self> {
        t.validate()?;
        let shape = match *t.shape.as_slice() {
            [n, k] => [n, k],
            _ => return Err(Error::shape("nf4", format!("an NF4 weight must be (out, in), got shape {:?}", t.shape))),
        };
        let numel = shape[0] * shape[1];
        // The kernels index elements in u32 (e * 8 for the last word must not wrap).
        if numel > (u32::MAX - 64) as usize {
            return Err(Error::Limit { op: "nf4", msg: format!("{numel} elements exceed u32 indexing") });
        }
        let packed_words = words(&t.packed);
        let packed = ctx.upload_u32(&packed_words, &[packed_words.len()])?;
        let (stat_words, scales) = match &t.stats {
            Nf4Stats::Absmax(a) => (a.iter().map(|v| v.to_bits()).collect::<Vec<u32>>(), Nf4Scales::Absmax),
            Nf4Stats::DoubleQuant { absmax_u8, nested_absmax, offset, nested_blocksize } => {
                let mut s = words(absmax_u8);
                let nested_at = s.len();
                s.extend(nested_absmax.iter().map(|v| v.to_bits()));
                (s, Nf4Scales::DoubleQuant { offset: *offset, nested_blocksize: *nested_blocksize, nested_at })
            }
        };
        // The code tables follow the scales (see shaders/nf4.wgsl for why they are not WGSL
        // constants): 16 words, plus 256 for the dynamic map of double quantization.
        let mut stat_words = stat_words;
        let tables_at = stat_words.len();
        stat_words.extend(NF4_CODE.iter().map(|v| v.to_bits()));
        if matches!(scales, Nf4Scales::DoubleQuant { .. }) {
            stat_words.extend(dynamic_map().iter().map(|v| v.to_bits()));
        }
        let stats = ctx.upload_u32(&stat_words, &[stat_words.len()])?;
        Ok(Nf4Weight { shape, blocksize: t.blocksize, packed, stats, scales, tables_at })
    }

    /// The weight's shape (out, in) = (N, K).
    pub fn shape(&self) -> [usize; 2] {
        self.shape
    }

    /// Elements per block of the flat weight (blocks may span rows).
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// The packed codes: u32 words of bitsandbytes' byte stream, (ceil(N*K / 8)).
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// The block scales as u32 words, laid out as [`Self::scales`] says.
    pub fn stats(&self) -> &Tensor {
        &self.stats
    }

    /// The layout of [`Self::stats`]: plain f32 absmax or double-quantized.
    pub fn scales(&self) -> Nf4Scales {
        self.scales
    }

    /// Device bytes of the weight (packed codes and scales, as stored, with their word padding).
    pub fn bytes(&self) -> usize {
        self.packed.byte_len() + self.stats.byte_len()
    }

    fn params(&self, m: usize) -> Params {
        let [n, k] = self.shape;
        let (dq, nested_shift, nested_at, offset) = match self.scales {
            Nf4Scales::Absmax => (0, 0, 0, 0.0),
            Nf4Scales::DoubleQuant { offset, nested_blocksize, nested_at } => {
                (1, nested_blocksize.trailing_zeros(), nested_at as u32, offset)
            }
        };
        Params {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            numel: (n * k) as u32,
            block_shift: self.blocksize.trailing_zeros(),
            dq,
            nested_shift,
            nested_at,
            offset,
            one: 1.0,
            tables_at: self.tables_at as u32,
            word0: 0,
        }
    }
}

/// W (N, K) = dequant(w) in f32: `W[i] = NF4_CODE[q[i]] * absmax[i / blocksize]` over the flat
/// index, double-quantized scales decoded first; equal to `Nf4Tensor::dequantize`.
pub fn dequantize(ctx: &GpuContext, w: &Nf4Weight) -> Result<Tensor> {
    let out = ctx.empty(&w.shape, DType::F32)?;
    let words = (w.shape[0] * w.shape[1]).div_ceil(8);
    let groups = groups_2d(groups_for(words, (WG * WG) as usize));
    ctx.dispatch(&DEQUANTIZE, &w.params(0), &[&w.packed, &w.stats, &out], groups)?;
    Ok(out)
}

/// Rows r0 .. r1 of W = dequant(w) in f32 (r1 − r0, K); r0 * K must be a multiple of 8 (a word
/// boundary of the packed codes).
pub fn dequantize_rows(ctx: &GpuContext, w: &Nf4Weight, rows: std::ops::Range<usize>) -> Result<Tensor> {
    let [n, k] = w.shape;
    if rows.start > rows.end || rows.end > n || (rows.start * k) % 8 != 0 {
        return Err(Error::shape("nf4_dequantize", format!("rows {rows:?} of W {:?} (start * in must be a multiple of 8)", w.shape)));
    }
    let numel = rows.len() * k;
    let out = ctx.empty(&[rows.len(), k], DType::F32)?;
    if numel == 0 {
        return Ok(out);
    }
    let mut p = w.params(0);
    p.numel = numel as u32;
    p.word0 = (rows.start * k / 8) as u32;
    let groups = groups_2d(groups_for(numel.div_ceil(8), (WG * WG) as usize));
    ctx.dispatch(&DEQUANTIZE, &p, &[&w.packed, &w.stats, &out], groups)?;
    Ok(out)
}

/// Row chunks of W whose f32 copy fits the device's largest binding: None when all of W fits.
fn scratch_chunks(ctx: &GpuContext, w: &Nf4Weight) -> Option<Vec<std::ops::Range<usize>>> {
    let [n, k] = w.shape;
    let row = (4 * k.max(1)) as u64;
    if n as u64 * row <= ctx.max_binding() {
        return None;
    }
    // Multiples of 64 rows: word-aligned starts (r0 * K % 8 == 0) and vec4-friendly widths.
    let per = ((ctx.max_binding() / row) as usize / 64 * 64).max(64);
    Some((0..n.div_ceil(per)).map(|i| i * per..((i + 1) * per).min(n)).collect())
}

/// Checks x (…, K) against w (N, K) and returns (rows M, output shape with the last dim `last`).
fn check_rows(op: &'static str, what: &str, x: &Tensor, inner: usize, last: usize) -> Result<(usize, Vec<usize>)> {
    if x.shape().is_empty() || x.dtype() != DType::F32 {
        return Err(Error::shape(op, format!("{what} must be an f32 tensor of rank >= 1, got {:?}", x)));
    }
    let (m, c) = rows_cols(x.shape());
    if c != inner {
        return Err(Error::shape(op, format!("{what} {:?}: last dim must be {inner}", x.shape())));
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = last;
    Ok((m, shape))
}

/// Whether the fused forward kernel applies to a weight (N, K): K % 8 == 0.
pub fn fused_forward_applies(w: &Nf4Weight) -> bool {
    w.shape[1] % 8 == 0
}

/// Whether the fused input-gradient kernel applies to a weight (N, K): K % 8 == 0, N % 4 == 0.
pub fn fused_backward_applies(w: &Nf4Weight) -> bool {
    w.shape[1] % 8 == 0 && w.shape[0] % 4 == 0
}

/// Whether the fused kernel is the faster design for `rows` rows (M): it decodes W once when
/// M <= BM (see the module comment).
fn fused_is_faster(rows: usize) -> bool {
    rows <= BM as usize
}

/// y (…, N) = x (…, K) · dequant(W)^T, W (N, K) frozen: the NF4 linear forward (fused kernel for
/// M <= 8 rows when K % 8 == 0, else the scratch path).
pub fn linear_forward(ctx: &GpuContext, x: &Tensor, w: &Nf4Weight) -> Result<Tensor> {
    let (m, _) = rows_cols(x.shape());
    if fused_forward_applies(w) && fused_is_faster(m) && !x.shape().is_empty() {
        linear_forward_fused(ctx, x, w)
    } else {
        linear_forward_scratch(ctx, x, w)
    }
}

/// dx (…, K) = dy (…, N) · dequant(W), W (N, K): the NF4 linear input gradient (fused kernel for
/// M <= 8 rows when K % 8 == 0 and N % 4 == 0, else the scratch path).
pub fn linear_backward_input(ctx: &GpuContext, dy: &Tensor, w: &Nf4Weight) -> Result<Tensor> {
    let (m, _) = rows_cols(dy.shape());
    if fused_backward_applies(w) && fused_is_faster(m) && !dy.shape().is_empty() {
        linear_backward_input_fused(ctx, dy, w)
    } else {
        linear_backward_input_scratch(ctx, dy, w)
    }
}

/// y (…, N) = x (…, K) · dequant(W)^T by dequantizing W into a pooled scratch buffer (N, K) and
/// the f32 matmul; any shape.
pub fn linear_forward_scratch(ctx: &GpuContext, x: &Tensor, w: &Nf4Weight) -> Result<Tensor> {
    let [n, k] = w.shape;
    let (m, shape) = check_rows("nf4_linear", "x", x, k, n)?;
    let Some(chunks) = scratch_chunks(ctx, w) else {
        let scratch = dequantize(ctx, w)?;
        return matmul::x_wt(ctx, x, &scratch);
    };
    // W's f32 copy exceeds one binding: a row block of W at a time, each giving a column block of y.
    let y = matmul::x_wt_row_blocks(ctx, &x.reshape(&[m, k]), n, &chunks, |i| dequantize_rows(ctx, w, chunks[i].clone()))?;
    Ok(y.reshape(&shape))
}

/// dx (…, K) = dy (…, N) · dequant(W) by dequantizing W into a pooled scratch buffer (N, K) and
/// the f32 matmul; any shape.
pub fn linear_backward_input_scratch(ctx: &GpuContext, dy: &Tensor, w: &Nf4Weight) -> Result<Tensor> {
    let [n, k] = w.shape;
    let (m, shape) = check_rows("nf4_linear_backward", "dy", dy, n, k)?;
    let Some(chunks) = scratch_chunks(ctx, w) else {
        let scratch = dequantize(ctx, w)?;
        return matmul::g_w(ctx, dy, &scratch);
    };
    // dx = Σ over row blocks of W: dy[:, block] · W[block, :].
    let dx = matmul::g_w_row_blocks(ctx, &dy.reshape(&[m, n]), &chunks, |i| dequantize_rows(ctx, w, chunks[i].clone()))?;
    Ok(dx.reshape(&shape))
}

/// y (…, N) = x (…, K) · dequant(W)^T with the fused kernel (W decoded inside the matmul, no
/// dequantized copy); a shape error unless K % 8 == 0.
pub fn linear_forward_fused(ctx: &GpuContext, x: &Tensor, w: &Nf4Weight) -> Result<Tensor> {
    let [n, k] = w.shape;
    let (m, shape) = check_rows("nf4_linear", "x", x, k, n)?;
    if !fused_forward_applies(w) {
        return Err(Error::shape("nf4_linear", format!("the fused kernel needs in % 8 == 0, W is {:?}", w.shape)));
    }
    let y = ctx.empty(&shape, DType::F32)?;
    if m <= MAX_ROWS as usize {
        let groups = crate::gpu::groups_2d(n.div_ceil((WG * WG) as usize) as u32);
        ctx.dispatch(&FORWARD_ROWS, &w.params(m), &[&w.packed, &w.stats, x, &y], groups)?;
        return Ok(y);
    }
    let groups = [groups_for(n, (WG * BN) as usize), groups_for(m, (WG * BM) as usize), 1];
    ctx.dispatch(&FORWARD_FUSED, &w.params(m), &[&w.packed, &w.stats, x, &y], groups)?;
    Ok(y)
}

/// dx (…, K) = dy (…, N) · dequant(W) with the fused kernel; a shape error unless K % 8 == 0 and
/// N % 4 == 0.
pub fn linear_backward_input_fused(ctx: &GpuContext, dy: &Tensor, w: &Nf4Weight) -> Result<Tensor> {
    let [n, k] = w.shape;
    let (m, shape) = check_rows("nf4_linear_backward", "dy", dy, n, k)?;
    if !fused_backward_applies(w) {
        return Err(Error::shape(
            "nf4_linear_backward",
            format!("the fused kernel needs in % 8 == 0 and out % 4 == 0, W is {:?}", w.shape),
        ));
    }
    let dx = ctx.empty(&shape, DType::F32)?;
    let groups = [groups_for(k / 8, WG as usize), groups_for(m, (WG * BM) as usize), 1];
    ctx.dispatch(&BACKWARD_INPUT_FUSED, &w.params(m), &[&w.packed, &w.stats, dy, &dx], groups)?;
    Ok(dx)
}

/// What the NF4 linear's backward needs: the frozen weight (a shared handle).
pub(crate) struct Saved {
    w: Nf4Weight,
}

impl Saved {
    /// dx = g · dequant(W) when needs[0]; W is frozen and has no gradient.
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let dx = if needs[0] { Some(linear_backward_input(ctx, g, &self.w)?) } else { None };
        Ok(vec![dx])
    }
}

/// Frozen NF4 linear on the tape: y (…, N) = x (…, K) · dequant(W)^T. Records a node only when x
/// needs a gradient; backward gives dx = g · dequant(W) only.
pub fn nf4_linear(tape: &mut Tape, ctx: &GpuContext, x: &Var, w: &Nf4Weight) -> Result<Var> {
    let y = linear_forward(ctx, x.value(), w)?;
    Ok(tape.record(y, &[x], || Op::Nf4Linear(Saved { w: w.clone() })))
}

/// f64 reference, row-major slices; `w` is the dequantized weight (N, K).
pub mod cpu {
    /// y (R, N) = x (R, K) · w^T.
    pub fn linear_forward(x: &[f64], w: &[f64], rows: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                y[r * n + j] = (0..k).map(|p| x[r * k + p] * w[j * k + p]).sum();
            }
        }
        y
    }

    /// dx (R, K) = dy (R, N) · w.
    pub fn linear_backward_input(dy: &[f64], w: &[f64], rows: usize, n: usize, k: usize) -> Vec<f64> {
        let mut dx = vec![0.0; rows * k];
        for r in 0..rows {
            for j in 0..n {
                let g = dy[r * n + j];
                for p in 0..k {
                    dx[r * k + p] += g * w[j * k + p];
                }
            }
        }
        dx
    }
}
