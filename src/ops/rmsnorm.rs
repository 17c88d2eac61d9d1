//! RMSNorm (shaders/rmsnorm.wgsl), as Hugging Face's LlamaRMSNorm: out = weight * x / rms(x).

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::ops::rows_cols;
use crate::{Error, Result};

const FORWARD: Kernel = shaders::kernel(shaders::RMSNORM, "rmsnorm_forward", &["inp", "weight", "rstd", "out"]);
const BACKWARD_INPUT: Kernel = shaders::kernel(shaders::RMSNORM, "rmsnorm_backward_input", &["inp", "weight", "dout", "rstd", "out"]);
const BACKWARD_WEIGHT: Kernel = shaders::kernel(shaders::RMSNORM, "rmsnorm_backward_weight", &["inp", "dout", "rstd", "out"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT];
/// Workgroup size of shaders/rmsnorm.wgsl (`WG` there).
pub const WG: u32 = 128;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_rows: u32,
    c: u32,
    eps: f32,
    _pad: u32,
}

fn params(inp: &Tensor, eps: f32) -> Params {
    let (n, c) = rows_cols(inp.shape());
    Params { n_rows: n as u32, c: c as u32, eps, _pad: 0 }
}

/// Forward: out (…, C) = weight (C) * inp (…, C) * rstd; returns (out, rstd (N)).
pub fn forward(ctx: &GpuContext, inp: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let (n, c) = rows_cols(inp.shape());
    if weight.shape() != [c] {
        return Err(Error::shape("rmsnorm", format!("weight {:?} for input {:?}", weight.shape(), inp.shape())));
    }
    let out = ctx.empty(inp.shape(), DType::F32)?;
    let rstd = ctx.empty(&[n], DType::F32)?;
    ctx.dispatch(&FORWARD, &params(inp, eps), &[inp, weight, &rstd, &out], groups_2d(n as u32))?;
    Ok((out, rstd))
}

/// Backward for the input: dinp (…, C) from dout, inp, weight and the saved rstd.
pub fn backward_input(ctx: &GpuContext, dout: &Tensor, inp: &Tensor, weight: &Tensor, rstd: &Tensor) -> Result<Tensor> {
    let (n, _) = rows_cols(inp.shape());
    let dinp = ctx.empty(inp.shape(), DType::F32)?;
    ctx.dispatch(&BACKWARD_INPUT, &params(inp, 0.0), &[inp, weight, dout, rstd, &dinp], groups_2d(n as u32))?;
    Ok(dinp)
}

/// Backward for the weight: dweight (C) = sum over rows of dout * inp * rstd.
pub fn backward_weight(ctx: &GpuContext, dout: &Tensor, inp: &Tensor, rstd: &Tensor) -> Result<Tensor> {
    let (_, c) = rows_cols(inp.shape());
    let dw = ctx.empty(&[c], DType::F32)?;
    ctx.dispatch(&BACKWARD_WEIGHT, &params(inp, 0.0), &[inp, dout, rstd, &dw], [groups_for(c, WG as usize), 1, 1])?;
    Ok(dw)
}

pub(crate) struct Saved {
    inp: Tensor,
    weight: Tensor,
    rstd: Tensor,
}

impl Saved {
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let dx = if needs[0] { Some(backward_input(ctx, g, &self.inp, &self.weight, &self.rstd)?) } else { None };
        let dw = if needs[1] { Some(backward_weight(ctx, g, &self.inp, &self.rstd)?) } else { None };
        Ok(vec![dx, dw])
    }
}

/// RMSNorm on the tape: out = weight * x * rstd(x). Records only when x or weight needs a
/// gradient; the weight gradient is computed only when the weight is trainable.
pub fn rmsnorm(tape: &mut Tape, ctx: &GpuContext, x: &Var, weight: &Var, eps: f32) -> Result<Var> {
    let (out, rstd) = forward(ctx, x.value(), weight.value(), eps)?;
    Ok(tape.record(out, &[x, weight], || {
        Op::RmsNorm(Saved { inp: x.value().clone(), weight: weight.value().clone(), rstd })
    }))
}

/// f64 reference, row-major (N, C).
pub mod cpu {
    /// out = w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps); returns (out, rstd).
    pub fn forward(x: &[f64], w: &[f64], c: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let n = x.len() / c;
        let mut out = vec![0.0; x.len()];
        let mut rstd = vec![0.0; n];
        for r in 0..n {
            let row = &x[r * c..(r + 1) * c];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / c as f64;
            rstd[r] = 1.0 / (ms + eps).sqrt();
            for j in 0..c {
                out[r * c + j] = w[j] * row[j] * rstd[r];
            }
        }
        (out, rstd)
    }

    /// (dx, dw) from dout.
    pub fn backward(dout: &[f64], x: &[f64], w: &[f64], c: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let n = x.len() / c;
        let (_, rstd) = forward(x, w, c, eps);
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; c];
        for r in 0..n {
            let o = r * c;
            let dot: f64 = (0..c).map(|j| w[j] * dout[o + j] * x[o + j]).sum();
            let rs = rstd[r];
            for j in 0..c {
                dx[o + j] = rs * w[j] * dout[o + j] - x[o + j] * rs * rs * rs * dot / c as f64;
                dw[j] += dout[o + j] * x[o + j] * rs;
            }
        }
        (dx, dw)
    }
}
