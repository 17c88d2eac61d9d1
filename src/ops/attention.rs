//! Causal grouped-query self-attention (shaders/attention.wgsl): per head,
//! out = softmax(q k^T / sqrt(HS), causal mask) v, query head h reading kv head h / (NH / NKV) as
//! transformers' repeat_kv does; a KV-cache forward for generation shares the forward kernel, or
//! for one or two query rows (`DECODE_MAX_TQ`) runs a decode kernel that gives the same bits.
//!
//! The kernels are flash-attention style: one invocation per query row (per key row for dk/dv),
//! `WG` rows of one (batch, head) per workgroup, the other side streamed through workgroup memory
//! in tiles with the online softmax kept per invocation (the shader's header has the details and
//! examples/attn_timing.rs the timings). For SmolLM2-135M's heads on lavapipe they run 10 to 13
//! times (forward) and 5 to 9 times (backward) faster than the former one-workgroup-per-row
//! kernels, and a decode step 2 to 2.5 times.
//!
//! Saved state and memory per layer. The forward saves only the row logsumexp `lse` (B, NH, T)
//! and the backward recomputes P = exp(S - lse), instead of keeping P (B, NH, T, T). The node
//! holds handles to q (B, T, NH, HS), k and v (B, T, NKV, HS) (the RoPE outputs, which nothing
//! else keeps: RoPE saves only its tables), out (B, T, NH, HS) (the output tensor itself, also
//! what o_proj's LoRA keeps) and lse: 4 * B * T * (2 * NH * HS + 2 * NKV * HS + NH) bytes. For
//! SmolLM2-135M (NH 9, NKV 3, HS 64) at B = 1, T = 2048 that is 12 MiB of tensors plus 72 KiB of
//! lse per layer, where P alone would be 9 * 2048^2 * 4 B = 144 MiB per layer. The backward
//! allocates `delta` (2, B, NH, T) transiently (delta, and a copy of lse for the dk/dv kernel).
//! The price is recomputing q.k and dout.v once in each of the two backward kernels (about 2x
//! the forward's dot products).

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{groups_2d, shaders, DType, GpuContext, Kernel, Tensor};
use crate::ops::expect_rank;
use crate::{Error, Result};

const FORWARD: Kernel = shaders::kernel(shaders::ATTENTION, "attention_forward", &["q", "k", "v", "out", "lse", "seg"]);
const DECODE: Kernel = shaders::kernel(shaders::ATTENTION, "attention_decode", &["q", "k", "v", "out", "lse"]);
const BACKWARD_DELTA: Kernel = shaders::kernel(shaders::ATTENTION, "attention_backward_delta", &["dout", "out", "lse", "delta"]);
const BACKWARD_DQ: Kernel = shaders::kernel(shaders::ATTENTION, "attention_backward_dq", &["q", "k", "v", "dout", "lse", "delta", "dq", "seg"]);
const BACKWARD_DKV: Kernel = shaders::kernel(shaders::ATTENTION, "attention_backward_dkv", &["q", "k", "v", "dout", "delta", "dk", "dv", "seg"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[FORWARD, DECODE, BACKWARD_DELTA, BACKWARD_DQ, BACKWARD_DKV];
/// Workgroup size of shaders/attention.wgsl (`WG` there): query rows (or key rows, for dk/dv)
/// per workgroup, one invocation each.
pub const WG: u32 = 64;
/// Largest head size the kernels take (`MAX_HS` in shaders/attention.wgsl).
pub const MAX_HS: usize = 256;
/// Up to this many query rows (a KV-cache decode step) the forward runs `attention_decode`, one
/// workgroup per row with the keys spread over its lanes, instead of `attention_forward`'s one
/// invocation per row; both give the same bits.
pub const DECODE_MAX_TQ: usize = 2;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    b: u32,
    tq: u32,
    tk: u32,
    nh: u32,
    nkv: u32,
    hs: u32,
    q_pos0: u32,
    scale: f32,
}

/// Sizes of one attention call (also the CPU reference's shape description).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Batch B.
    pub b: usize,
    /// Query rows Tq.
    pub tq: usize,
    /// Key/value rows Tk.
    pub tk: usize,
    /// Query heads NH.
    pub nh: usize,
    /// Key/value heads NKV (NH a multiple of it).
    pub nkv: usize,
    /// Head size HS.
    pub hs: usize,
    /// Position of query row 0; query i attends keys 0..=q_pos0 + i.
    pub q_pos0: usize,
}

impl Dims {
    /// Training self-attention: Tq = Tk = T, q_pos0 = 0.
    pub fn causal(b: usize, t: usize, nh: usize, nkv: usize, hs: usize) -> Dims {
        Dims { b, tq: t, tk: t, nh, nkv, hs, q_pos0: 0 }
    }

    fn params(&self) -> Params {
        Params {
            b: self.b as u32,
            tq: self.tq as u32,
            tk: self.tk as u32,
            nh: self.nh as u32,
            nkv: self.nkv as u32,
            hs: self.hs as u32,
            q_pos0: self.q_pos0 as u32,
            scale: (1.0 / (self.hs as f64).sqrt()) as f32,
        }
    }
}

/// Checks q (B, Tq, NH, HS), k and v (B, Tk, NKV, HS) and returns the dims (q_pos0 = 0).
fn dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    let qs = expect_rank("attention", "q (B, T, NH, HS)", q.shape(), 4)?;
    let ks = expect_rank("attention", "k (B, T, NKV, HS)", k.shape(), 4)?;
    if v.shape() != ks {
        return Err(Error::shape("attention", format!("v {:?} differs from k {:?}", v.shape(), ks)));
    }
    let d = Dims { b: qs[0], tq: qs[1], tk: ks[1], nh: qs[2], nkv: ks[2], hs: qs[3], q_pos0: 0 };
    if ks[0] != d.b || ks[3] != d.hs {
        return Err(Error::shape("attention", format!("q {qs:?} and k {ks:?} differ in batch or head size")));
    }
    if d.nkv == 0 || !d.nh.is_multiple_of(d.nkv) {
        return Err(Error::shape("attention", format!("query heads {} are not a multiple of kv heads {}", d.nh, d.nkv)));
    }
    if d.hs == 0 || d.hs > MAX_HS {
        return Err(Error::shape("attention", format!("head size {} outside 1..={MAX_HS}", d.hs)));
    }
    let rows = (d.b * d.nh * d.tq).max(d.b * d.nkv * d.tk);
    if rows > 65535 * 65535 || d.tk + d.tq > u32::MAX as usize / 2 {
        return Err(Error::Limit { op: "attention", msg: format!("q {qs:?}, k {ks:?}: too many rows") });
    }
    Ok(d)
}

/// The segment starts (B, Tq) u32 of a call: `seg` checked, or zeros (no packing).
fn segments(ctx: &GpuContext, seg: Option<&Tensor>, d: &Dims) -> Result<Tensor> {
    match seg {
        Some(s) if s.shape() == [d.b, d.tq] && s.dtype() == DType::U32 => Ok(s.clone()),
        Some(s) => Err(Error::shape("attention", format!("segment starts {:?} {:?}, expected u32 {:?}", s.shape(), s.dtype(), [d.b, d.tq]))),
        None => ctx.zeros(&[d.b, d.tq], DType::U32),
    }
}

fn launch_forward(ctx: &GpuContext, q: &Tensor, k: &Tensor, v: &Tensor, d: &Dims, seg: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let out = ctx.empty(q.shape(), DType::F32)?;
    let lse = ctx.empty(&[d.b, d.nh, d.tq], DType::F32)?;
    if d.tq <= DECODE_MAX_TQ && seg.is_none() {
        ctx.dispatch(&DECODE, &d.params(), &[q, k, v, &out, &lse], groups_2d((d.b * d.nh * d.tq) as u32))?;
    } else {
        let seg = segments(ctx, seg, d)?;
        ctx.dispatch(&FORWARD, &d.params(), &[q, k, v, &out, &lse, &seg], groups_2d((d.b * d.nh * d.tq.div_ceil(WG as usize)) as u32))?;
    }
    Ok((out, lse))
}

/// Forward: out (B, T, NH, HS) = softmax(q k^T / sqrt(HS), causal) v per head, with q
/// (B, T, NH, HS) and k, v (B, T, NKV, HS); returns (out, saved): saved is the row logsumexp
/// lse (B, NH, T) that `backward` takes.
pub fn forward(ctx: &GpuContext, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    forward_packed(ctx, q, k, v, None)
}

/// `forward` over packed rows (sequence packing): `seg` (B, T) u32 holds, for each query row,
/// the first row of its example (non-decreasing along T); query t attends keys
/// seg[b, t]..=t only, so no attention weight crosses an example boundary. None: plain causal.
pub fn forward_packed(ctx: &GpuContext, q: &Tensor, k: &Tensor, v: &Tensor, seg: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let d = dims(q, k, v)?;
    if d.tq != d.tk {
        return Err(Error::shape("attention", format!("q {:?} and k {:?} differ in T", q.shape(), k.shape())));
    }
    launch_forward(ctx, q, k, v, &d, seg)
}

/// KV-cache forward (inference): q (B, Tq, NH, HS) at positions q_pos0.., k_cache and v_cache
/// (B, Tk, NKV, HS) with Tk >= q_pos0 + Tq; query i attends keys 0..=q_pos0 + i. Returns
/// out (B, Tq, NH, HS), equal to the rows q_pos0.. of the full forward.
pub fn forward_cached(ctx: &GpuContext, q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, q_pos0: usize) -> Result<Tensor> {
    let mut d = dims(q, k_cache, v_cache)?;
    if q_pos0 + d.tq > d.tk {
        return Err(Error::shape(
            "attention",
            format!("queries at positions {q_pos0}..{} need {} cached keys, got k {:?}", q_pos0 + d.tq, q_pos0 + d.tq, k_cache.shape()),
        ));
    }
    d.q_pos0 = q_pos0;
    Ok(launch_forward(ctx, q, k_cache, v_cache, &d, None)?.0)
}

/// Backward: (dq (B, T, NH, HS), dk, dv (B, T, NKV, HS)) from dout (B, T, NH, HS), the inputs,
/// the forward's out and its saved lse (B, NH, T).
pub fn backward(
    ctx: &GpuContext,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    saved: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_packed(ctx, dout, q, k, v, out, saved, None)
}

/// `backward` of `forward_packed` with the same segment starts.
#[allow(clippy::too_many_arguments)]
pub fn backward_packed(
    ctx: &GpuContext,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    saved: &Tensor,
    seg: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dq, dkv) = backward_parts(ctx, dout, q, k, v, out, saved, seg, true)?;
    let (dk, dv) = dkv.expect("dk and dv were asked for");
    Ok((dq, dk, dv))
}

/// The backward kernels: delta, dq, and dk/dv only when `want_dkv`.
#[allow(clippy::too_many_arguments)]
fn backward_parts(
    ctx: &GpuContext,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    seg: Option<&Tensor>,
    want_dkv: bool,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let d = dims(q, k, v)?;
    if d.tq != d.tk {
        return Err(Error::shape("attention backward", format!("q {:?} and k {:?} differ in T", q.shape(), k.shape())));
    }
    if dout.shape() != q.shape() || out.shape() != q.shape() {
        return Err(Error::shape(
            "attention backward",
            format!("dout {:?} and out {:?} must have q's shape {:?}", dout.shape(), out.shape(), q.shape()),
        ));
    }
    if lse.shape() != [d.b, d.nh, d.tq] {
        return Err(Error::shape("attention backward", format!("saved lse {:?}, expected {:?}", lse.shape(), [d.b, d.nh, d.tq])));
    }
    let p = d.params();
    let seg = segments(ctx, seg, &d)?;
    // delta, then a copy of lse: the dk/dv kernel reads both through one binding (8 storage
    // buffers, WebGPU's default per-stage limit).
    let delta = ctx.empty(&[2, d.b, d.nh, d.tq], DType::F32)?;
    ctx.dispatch(&BACKWARD_DELTA, &p, &[dout, out, lse, &delta], groups_2d((d.b * d.nh * d.tq).div_ceil(WG as usize) as u32))?;
    let dq = ctx.empty(q.shape(), DType::F32)?;
    ctx.dispatch(&BACKWARD_DQ, &p, &[q, k, v, dout, lse, &delta, &dq, &seg], groups_2d((d.b * d.nh * d.tq.div_ceil(WG as usize)) as u32))?;
    if !want_dkv {
        return Ok((dq, None));
    }
    let dk = ctx.empty(k.shape(), DType::F32)?;
    let dv = ctx.empty(v.shape(), DType::F32)?;
    ctx.dispatch(&BACKWARD_DKV, &p, &[q, k, v, dout, &delta, &dk, &dv, &seg], groups_2d((d.b * d.nkv * d.tk.div_ceil(WG as usize)) as u32))?;
    Ok((dq, Some((dk, dv))))
}

pub(crate) struct Saved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    seg: Option<Tensor>,
}

impl Saved {
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let want_dkv = needs[1] || needs[2];
        let (dq, dkv) = backward_parts(ctx, g, &self.q, &self.k, &self.v, &self.out, &self.lse, self.seg.as_ref(), want_dkv)?;
        let (dk, dv) = match dkv {
            Some((dk, dv)) => (needs[1].then_some(dk), needs[2].then_some(dv)),
            None => (None, None),
        };
        Ok(vec![needs[0].then_some(dq), dk, dv])
    }
}

/// Causal GQA attention on the tape: out (B, T, NH, HS) from q (B, T, NH, HS), k, v
/// (B, T, NKV, HS). Saves q, k, v, out and lse (B, NH, T) when an input needs a gradient.
pub fn attention(tape: &mut Tape, ctx: &GpuContext, q: &Var, k: &Var, v: &Var) -> Result<Var> {
    attention_packed(tape, ctx, q, k, v, None)
}

/// `attention` over packed rows with segment starts `seg` (B, T) u32 (see `forward_packed`).
pub fn attention_packed(tape: &mut Tape, ctx: &GpuContext, q: &Var, k: &Var, v: &Var, seg: Option<&Tensor>) -> Result<Var> {
    let (out, lse) = forward_packed(ctx, q.value(), k.value(), v.value(), seg)?;
    let saved_out = out.clone();
    Ok(tape.record(out, &[q, k, v], || {
        Op::Attention(Saved { q: q.value().clone(), k: k.value().clone(), v: v.value().clone(), out: saved_out, lse, seg: seg.cloned() })
    }))
}

/// f64 reference, row-major: q (B, Tq, NH, HS), k and v (B, Tk, NKV, HS), P (B, NH, Tq, Tk).
pub mod cpu {
    pub use super::Dims;

    fn qi(d: &Dims, b: usize, t: usize, h: usize) -> usize {
        ((b * d.tq + t) * d.nh + h) * d.hs
    }
    fn ki(d: &Dims, b: usize, j: usize, g: usize) -> usize {
        ((b * d.tk + j) * d.nkv + g) * d.hs
    }
    fn pi(d: &Dims, b: usize, h: usize, t: usize) -> usize {
        ((b * d.nh + h) * d.tq + t) * d.tk
    }

    /// Returns (out (B, Tq, NH, HS), P (B, NH, Tq, Tk)): P[t, j] = softmax_j(q[t].k[j] / sqrt(HS))
    /// over j <= q_pos0 + t (0 elsewhere), out[t] = sum_j P[t, j] v[j]; kv head h / (NH / NKV).
    pub fn forward(q: &[f64], k: &[f64], v: &[f64], d: &Dims) -> (Vec<f64>, Vec<f64>) {
        forward_packed(q, k, v, d, &vec![0; d.b * d.tq])
    }

    /// `forward` where query t of row b attends keys seg[b * Tq + t]..=q_pos0 + t only (P is 0
    /// before its example's first key).
    pub fn forward_packed(q: &[f64], k: &[f64], v: &[f64], d: &Dims, seg: &[usize]) -> (Vec<f64>, Vec<f64>) {
        let scale = 1.0 / (d.hs as f64).sqrt();
        let rep = d.nh / d.nkv;
        let mut out = vec![0.0; d.b * d.tq * d.nh * d.hs];
        let mut p = vec![0.0; d.b * d.nh * d.tq * d.tk];
        for b in 0..d.b {
            for h in 0..d.nh {
                let g = h / rep;
                for t in 0..d.tq {
                    let n = d.q_pos0 + t + 1;
                    let j0 = seg[b * d.tq + t];
                    let qr = &q[qi(d, b, t, h)..][..d.hs];
                    let s: Vec<f64> = (0..n)
                        .map(|j| scale * qr.iter().zip(&k[ki(d, b, j, g)..][..d.hs]).map(|(a, c)| a * c).sum::<f64>())
                        .collect();
                    let m = s[j0..].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s[j0..].iter().map(|x| (x - m).exp()).sum();
                    let prow = &mut p[pi(d, b, h, t)..][..d.tk];
                    for j in j0..n {
                        prow[j] = (s[j] - m).exp() / z;
                    }
                    let o = qi(d, b, t, h);
                    for j in j0..n {
                        for e in 0..d.hs {
                            out[o + e] += prow[j] * v[ki(d, b, j, g) + e];
                        }
                    }
                }
            }
        }
        (out, p)
    }

    /// (dq, dk, dv) from dout (B, Tq, NH, HS): dP = dout v^T, dS = P (dP - rowsum(dP P)),
    /// dq = scale dS k, dk = scale dS^T q and dv = P^T dout summed over each kv head's group.
    pub fn backward(dout: &[f64], q: &[f64], k: &[f64], v: &[f64], d: &Dims) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        backward_packed(dout, q, k, v, d, &vec![0; d.b * d.tq])
    }

    /// `backward` of `forward_packed` (P is 0 outside each query's example, so are its terms).
    pub fn backward_packed(dout: &[f64], q: &[f64], k: &[f64], v: &[f64], d: &Dims, seg: &[usize]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let scale = 1.0 / (d.hs as f64).sqrt();
        let rep = d.nh / d.nkv;
        let (_, p) = forward_packed(q, k, v, d, seg);
        let mut dq = vec![0.0; q.len()];
        let mut dk = vec![0.0; k.len()];
        let mut dv = vec![0.0; v.len()];
        for b in 0..d.b {
            for h in 0..d.nh {
                let g = h / rep;
                for t in 0..d.tq {
                    let n = d.q_pos0 + t + 1;
                    let prow = &p[pi(d, b, h, t)..][..d.tk];
                    let go = &dout[qi(d, b, t, h)..][..d.hs];
                    let dp: Vec<f64> =
                        (0..n).map(|j| go.iter().zip(&v[ki(d, b, j, g)..][..d.hs]).map(|(a, c)| a * c).sum()).collect();
                    let dsum: f64 = (0..n).map(|j| dp[j] * prow[j]).sum();
                    for j in 0..n {
                        let ds = prow[j] * (dp[j] - dsum);
                        let (qo, ko) = (qi(d, b, t, h), ki(d, b, j, g));
                        for e in 0..d.hs {
                            dq[qo + e] += scale * ds * k[ko + e];
                            dk[ko + e] += scale * ds * q[qo + e];
                            dv[ko + e] += prow[j] * go[e];
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}
