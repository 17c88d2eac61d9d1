//! The LoRA linear (shaders/lora.wgsl for the dropout mask, shaders/matmul.wgsl for the products,
//! shaders/elementwise.wgsl for a bias): y = x·W0^T (+ b0) + s·(dropout(x)·A^T)·B^T with W0 and
//! the optional bias b0 frozen, A (r, in) and B (out, r) trainable and s = alpha / r (or
//! alpha / sqrt(r) with rsLoRA), as PEFT's `lora.Linear`: the base layer's output, bias
//! included, first, then the scaled low-rank term added to it.

use crate::autograd::{self, Op, Tape, Var};
use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, RowShards, Tensor};
use crate::ops::elementwise;
use crate::ops::matmul::{self, Trans};
use crate::ops::nf4::{self, Nf4Weight};
use crate::ops::rows_cols;
use crate::{Error, Result};

const DROPOUT_FORWARD: Kernel = shaders::kernel(shaders::LORA, "lora_dropout_forward", &["inp", "out"]);
const DROPOUT_BACKWARD: Kernel = shaders::kernel(shaders::LORA, "lora_dropout_backward", &["inp", "out"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[DROPOUT_FORWARD, DROPOUT_BACKWARD];
/// Workgroup size of shaders/lora.wgsl (`WG` there).
pub const WG: u32 = 128;

/// A frozen base weight W0 (out, in): f32 (in one buffer, or in row blocks when it exceeds the
/// device's largest binding), or NF4 dequantized on the fly (QLoRA). It never gets a gradient;
/// its input gradient is dy·W0.
#[derive(Clone, Debug)]
pub enum Frozen {
    /// f32 (out, in).
    F32(Tensor),
    /// f32 (out, in) as row blocks, each within the device's largest binding: the forward gives
    /// y a column block per shard (the same bits as one buffer), the input gradient sums the
    /// shards' products.
    F32Rows(RowShards),
    /// NF4 (bitsandbytes layout) on the device.
    Nf4(Nf4Weight),
}

impl Frozen {
    /// Uploads an f32 weight (out, in): one buffer when it fits
    /// [`GpuContext::projection_shard_limit`], else row blocks ([`Frozen::F32Rows`]).
    pub fn upload_f32(ctx: &GpuContext, data: &[f32], out: usize, inp: usize) -> Result<Frozen> {
        let w = RowShards::upload_projection(ctx, data, out, inp)?;
        Ok(match w.parts() {
            [one] => Frozen::F32(one.clone()),
            _ => Frozen::F32Rows(w),
        })
    }
    /// (out, in).
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Frozen::F32(t) => [t.shape()[0], t.shape()[1]],
            Frozen::F32Rows(w) => [w.rows(), w.cols()],
            Frozen::Nf4(w) => w.shape(),
        }
    }
    /// Bytes the weight takes on the device.
    pub fn bytes(&self) -> usize {
        match self {
            Frozen::F32(t) => t.byte_len(),
            Frozen::F32Rows(w) => w.byte_len(),
            Frozen::Nf4(w) => w.bytes(),
        }
    }
    /// y (rows, out) = x (rows, in) · W0^T.
    pub fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::F32(w) => matmul::matmul(ctx, x, w, Trans::NT, 1.0),
            Frozen::F32Rows(w) => {
                let (rows, k) = rows_cols(x.shape());
                let ranges: Vec<_> = (0..w.parts().len()).map(|i| w.range(i)).collect();
                let y = matmul::x_wt_row_blocks(ctx, &x.reshape(&[rows, k]), w.rows(), &ranges, |i| Ok(w.parts()[i].clone()))?;
                let mut shape = x.shape().to_vec();
                *shape.last_mut().unwrap() = w.rows();
                Ok(y.reshape(&shape))
            }
            Frozen::Nf4(w) => nf4::linear_forward(ctx, x, w),
        }
    }
    /// dx (rows, in) = dy (rows, out) · W0.
    pub fn backward_input(&self, ctx: &GpuContext, dy: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::F32(w) => matmul::matmul(ctx, dy, w, Trans::NN, 1.0),
            Frozen::F32Rows(w) => {
                let (rows, n) = rows_cols(dy.shape());
                let ranges: Vec<_> = (0..w.parts().len()).map(|i| w.range(i)).collect();
                let dx = matmul::g_w_row_blocks(ctx, &dy.reshape(&[rows, n]), &ranges, |i| Ok(w.parts()[i].clone()))?;
                let mut shape = dy.shape().to_vec();
                *shape.last_mut().unwrap() = w.cols();
                Ok(dx.reshape(&shape))
            }
            Frozen::Nf4(w) => nf4::linear_backward_input(ctx, dy, w),
        }
    }
}

/// What a frozen linear over a sharded f32 weight saves for backward: the weight (shared handles).
pub(crate) struct FrozenSaved {
    w: Frozen,
}

impl FrozenSaved {
    /// dx = g · W0 when needs[0]; W0 is frozen and has no gradient.
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![if needs[0] { Some(self.w.backward_input(ctx, g)?) } else { None }])
    }
}

/// A frozen linear on the tape: y = x·W0^T; only x gets a gradient.
pub fn frozen_linear(tape: &mut Tape, ctx: &GpuContext, x: &Var, w0: &Frozen) -> Result<Var> {
    match w0 {
        Frozen::F32(w) => {
            let w = tape.constant(w.clone());
            matmul::linear(tape, ctx, x, &w)
        }
        Frozen::F32Rows(_) => {
            let y = w0.forward(ctx, x.value())?;
            Ok(tape.record(y, &[x], || Op::FrozenLinear(FrozenSaved { w: w0.clone() })))
        }
        Frozen::Nf4(w) => nf4::nf4_linear(tape, ctx, x, w),
    }
}

/// A frozen linear with an optional frozen bias (out) on the tape: y = x·W0^T + b0; only x gets
/// a gradient.
pub fn frozen_linear_with_bias(tape: &mut Tape, ctx: &GpuContext, x: &Var, w0: &Frozen, bias: Option<&Tensor>) -> Result<Var> {
    let y = frozen_linear(tape, ctx, x, w0)?;
    match bias {
        Some(b0) => autograd::add_bias(tape, ctx, &y, b0),
        None => Ok(y),
    }
}

/// How one LoRA linear runs: the scale s applied to the low-rank product, and dropout on the
/// branch input (probability `dropout`, mask drawn from `seed`; a new seed per step and layer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraRun {
    /// s = alpha / r (alpha / sqrt(r) with rsLoRA).
    pub scale: f32,
    /// Dropout probability on the LoRA branch input, in [0, 1).
    pub dropout: f32,
    /// Seed of the dropout mask.
    pub seed: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    seed: u32,
    p: f32,
    scale: f32,
}

fn dropout_params(n: usize, run: &LoraRun) -> Params {
    Params { n: n as u32, seed: run.seed, p: run.dropout, scale: 1.0 / (1.0 - run.dropout) }
}

/// Dropout of the LoRA branch input: out = x * keep / (1 - p) with the seeded mask.
pub fn dropout_forward(ctx: &GpuContext, x: &Tensor, run: &LoraRun) -> Result<Tensor> {
    let out = ctx.empty(x.shape(), DType::F32)?;
    let n = x.numel();
    ctx.dispatch(&DROPOUT_FORWARD, &dropout_params(n, run), &[x, &out], groups_2d(groups_for(n, WG as usize)))?;
    Ok(out)
}

/// Dropout backward, accumulated: dinp += dout * keep / (1 - p). `dinp` must be a tensor the
/// caller owns alone (it is updated in place).
pub fn dropout_backward_acc(ctx: &GpuContext, dout: &Tensor, dinp: &Tensor, run: &LoraRun) -> Result<()> {
    let n = dout.numel();
    ctx.dispatch(&DROPOUT_BACKWARD, &dropout_params(n, run), &[dout, dinp], groups_2d(groups_for(n, WG as usize)))
}

fn check(x: &Tensor, w0: &Frozen, a: &Tensor, b: &Tensor, run: &LoraRun) -> Result<(usize, usize, usize, usize)> {
    let (rows, k) = rows_cols(x.shape());
    let (&[n, k0], &[r, ka], &[nb, rb]) = (&w0.shape()[..], a.shape(), b.shape()) else {
        return Err(Error::shape("lora_linear", format!("W0 {:?}, A {:?}, B {:?} must be matrices", w0.shape(), a.shape(), b.shape())));
    };
    if k0 != k || ka != k || nb != n || rb != r {
        return Err(Error::shape(
            "lora_linear",
            format!("x {:?}, W0 {:?}, A {:?}, B {:?}: want W0 (out, in), A (r, in), B (out, r)", x.shape(), w0.shape(), a.shape(), b.shape()),
        ));
    }
    if !(0.0..1.0).contains(&run.dropout) {
        return Err(Error::Invalid(format!("LoRA dropout {} is outside [0, 1)", run.dropout)));
    }
    Ok((rows, k, n, r))
}

/// Forward: returns (y (…, out), h = dropout(x)·A^T (rows, r)).
pub fn forward(ctx: &GpuContext, x: &Tensor, w0: &Frozen, a: &Tensor, b: &Tensor, run: &LoraRun) -> Result<(Tensor, Tensor)> {
    forward_with_bias(ctx, x, w0, None, a, b, run)
}

/// Forward with the base layer's frozen bias b0 (out), in PEFT's order: y = (x·W0^T + b0) +
/// s·(dropout(x)·A^T)·B^T. Returns (y (…, out), h = dropout(x)·A^T (rows, r)).
pub fn forward_with_bias(
    ctx: &GpuContext,
    x: &Tensor,
    w0: &Frozen,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    run: &LoraRun,
) -> Result<(Tensor, Tensor)> {
    let (rows, k, n, _) = check(x, w0, a, b, run)?;
    let x2 = x.reshape(&[rows, k]);
    let xd = if run.dropout > 0.0 { dropout_forward(ctx, &x2, run)? } else { x2.clone() };
    let h = matmul::matmul(ctx, &xd, a, Trans::NT, 1.0)?;
    let mut y = w0.forward(ctx, &x2)?;
    if let Some(b0) = bias {
        y = elementwise::add_bias(ctx, &y, b0)?;
    }
    matmul::matmul_into(ctx, &h, b, Trans::NT, run.scale, 1.0, &y)?;
    let mut yshape = x.shape().to_vec();
    *yshape.last_mut().unwrap() = n;
    Ok((y.reshape(&yshape), h))
}

/// The low-rank branch's gradients from g2 (rows, out), the gradient reaching s·h·B^T: (dh =
/// s·g2·B, dA = dh^T·dropout(x), dB = s·g2^T·h), each only when `want` (dx, dA, dB) needs it
/// (dh for dx or dA). Shared by the LoRA and DoRA linears.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adapter_grads(
    ctx: &GpuContext,
    g2: &Tensor,
    x: Option<&Tensor>,
    h: Option<&Tensor>,
    b: &Tensor,
    run: &LoraRun,
    k: usize,
    want: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let rows = g2.shape()[0];
    let db = match (want[2], h) {
        (true, Some(h)) => Some(matmul::matmul(ctx, g2, h, Trans::TN, run.scale)?),
        _ => None,
    };
    let dh = if want[0] || want[1] { Some(matmul::matmul(ctx, g2, b, Trans::NN, run.scale)?) } else { None };
    let da = match (want[1], x, &dh) {
        (true, Some(x), Some(dh)) => {
            let x2 = x.reshape(&[rows, k]);
            let xd = if run.dropout > 0.0 { dropout_forward(ctx, &x2, run)? } else { x2 };
            Some(matmul::matmul(ctx, dh, &xd, Trans::TN, 1.0)?)
        }
        _ => None,
    };
    Ok((dh, da, db))
}

/// Gradients of the LoRA linear from g = dL/dy: (dx, dA, dB), each computed only when asked.
/// dB = s·g^T·h, dh = s·g·B, dA = dh^T·dropout(x), dx = g·W0 + dropout^T(dh·A).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    ctx: &GpuContext,
    g: &Tensor,
    x: Option<&Tensor>,
    h: Option<&Tensor>,
    w0: &Frozen,
    a: &Tensor,
    b: &Tensor,
    run: &LoraRun,
    want: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (rows, n) = rows_cols(g.shape());
    let k = w0.shape()[1];
    let g2 = g.reshape(&[rows, n]);
    let (dh, da, db) = adapter_grads(ctx, &g2, x, h, b, run, k, want)?;
    let dx = match (want[0], &dh) {
        (true, Some(dh)) => {
            let dx = w0.backward_input(ctx, &g2)?;
            if run.dropout > 0.0 {
                let dxd = matmul::matmul(ctx, dh, a, Trans::NN, 1.0)?;
                dropout_backward_acc(ctx, &dxd, &dx, run)?;
            } else {
                matmul::matmul_into(ctx, dh, a, Trans::NN, 1.0, 1.0, &dx)?;
            }
            let mut xs = g.shape().to_vec();
            *xs.last_mut().unwrap() = k;
            Some(dx.reshape(&xs))
        }
        _ => None,
    };
    Ok((dx, da, db))
}

pub(crate) struct Saved {
    x: Option<Tensor>,
    h: Option<Tensor>,
    w0: Frozen,
    a: Tensor,
    b: Tensor,
    run: LoraRun,
}

impl Saved {
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (dx, da, db) =
            backward(ctx, g, self.x.as_ref(), self.h.as_ref(), &self.w0, &self.a, &self.b, &self.run, [needs[0], needs[1], needs[2]])?;
        Ok(vec![dx, da, db])
    }
}

/// The LoRA linear on the tape: y = x·W0^T + s·(dropout(x)·A^T)·B^T, W0 frozen. Saves x only
/// when A needs a gradient and h only when B does.
pub fn lora_linear(tape: &mut Tape, ctx: &GpuContext, x: &Var, w0: &Frozen, a: &Var, b: &Var, run: &LoraRun) -> Result<Var> {
    lora_linear_with_bias(tape, ctx, x, w0, None, a, b, run)
}

/// The LoRA linear of a base layer with a frozen bias b0 (out), on the tape:
/// y = (x·W0^T + b0) + s·(dropout(x)·A^T)·B^T (PEFT's order). The bias changes no gradient, so
/// the node and its backward are those of [`lora_linear`].
#[allow(clippy::too_many_arguments)]
pub fn lora_linear_with_bias(
    tape: &mut Tape,
    ctx: &GpuContext,
    x: &Var,
    w0: &Frozen,
    bias: Option<&Tensor>,
    a: &Var,
    b: &Var,
    run: &LoraRun,
) -> Result<Var> {
    let (y, h) = forward_with_bias(ctx, x.value(), w0, bias, a.value(), b.value(), run)?;
    Ok(tape.record(y, &[x, a, b], || {
        Op::LoraLinear(Saved {
            x: a.requires_grad().then(|| x.value().clone()),
            h: b.requires_grad().then_some(h),
            w0: w0.clone(),
            a: a.value().clone(),
            b: b.value().clone(),
            run: *run,
        })
    }))
}

/// The dropout mask hash, the same integer function as `hash32` in shaders/lora.wgsl.
pub fn hash32(v: u32) -> u32 {
    let mut x = v;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Whether element i survives dropout with probability p under `seed` (as the shader decides).
pub fn keep(seed: u32, i: u32, p: f32) -> bool {
    let u = (hash32(i ^ hash32(seed)) >> 8) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

/// f64 reference of the LoRA linear, row-major: x (rows, k), W0 (n, k), A (r, k), B (n, r).
pub mod cpu {
    use super::keep;

    fn nt(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
            }
        }
        c
    }

    fn dropped(x: &[f64], p: f64, seed: u32) -> Vec<f64> {
        if p == 0.0 {
            return x.to_vec();
        }
        x.iter().enumerate().map(|(i, &v)| if keep(seed, i as u32, p as f32) { v / (1.0 - p) } else { 0.0 }).collect()
    }

    /// y = x·W0^T + s·(dropout(x)·A^T)·B^T (add a bias with `elementwise::cpu::add_bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(x: &[f64], w0: &[f64], a: &[f64], b: &[f64], rows: usize, k: usize, n: usize, r: usize, s: f64, p: f64, seed: u32) -> Vec<f64> {
        let h = nt(&dropped(x, p, seed), a, rows, r, k);
        let base = nt(x, w0, rows, n, k);
        let up = nt(&h, b, rows, n, r);
        base.iter().zip(&up).map(|(u, v)| u + s * v).collect()
    }

    /// (dx, dA, dB) from g = dL/dy.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        g: &[f64], x: &[f64], w0: &[f64], a: &[f64], b: &[f64], rows: usize, k: usize, n: usize, r: usize, s: f64, p: f64, seed: u32,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let xd = dropped(x, p, seed);
        let h = nt(&xd, a, rows, r, k);
        let mut db = vec![0.0; n * r];
        let mut dh = vec![0.0; rows * r];
        for i in 0..rows {
            for j in 0..n {
                let gij = g[i * n + j];
                for t in 0..r {
                    db[j * r + t] += s * gij * h[i * r + t];
                    dh[i * r + t] += s * gij * b[j * r + t];
                }
            }
        }
        let mut da = vec![0.0; r * k];
        let mut dxd = vec![0.0; rows * k];
        let mut dx = vec![0.0; rows * k];
        for i in 0..rows {
            for t in 0..r {
                for c in 0..k {
                    da[t * k + c] += dh[i * r + t] * xd[i * k + c];
                    dxd[i * k + c] += dh[i * r + t] * a[t * k + c];
                }
            }
            for j in 0..n {
                for c in 0..k {
                    dx[i * k + c] += g[i * n + j] * w0[j * k + c];
                }
            }
        }
        let dxd = if p == 0.0 {
            dxd
        } else {
            dxd.iter().enumerate().map(|(i, &v)| if keep(seed, i as u32, p as f32) { v / (1.0 - p) } else { 0.0 }).collect()
        };
        let dx = dx.iter().zip(&dxd).map(|(u, v)| u + v).collect();
        (dx, da, db)
    }
}
