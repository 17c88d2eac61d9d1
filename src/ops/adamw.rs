//! AdamW (shaders/adamw.wgsl) with torch.optim.AdamW's semantics (single-tensor path, amsgrad
//! off): one kernel updates param, m and v in place.
//!
//! Precision, following torch: the step counter and every scalar derived from it (the bias
//! corrections 1 − β₁ᵗ and 1 − β₂ᵗ, the step size lr / (1 − β₁ᵗ), √(1 − β₂ᵗ), and 1 − lr·wd) are
//! Python floats in torch, so they are computed here in f64. They become f32 where torch hands
//! them to a float32 tensor op as a Python scalar, which then runs in the tensor's dtype:
//! `param.mul_(1 − lr·wd)`, `exp_avg.lerp_(grad, 1 − β₁)`, `exp_avg_sq.mul_(β₂)`,
//! `.addcmul_(grad, grad, value=1 − β₂)`, `exp_avg_sq.sqrt() / √(1 − β₂ᵗ)`, `.add_(eps)` and
//! `param.addcdiv_(exp_avg, denom, value=−step_size)`. The tensors (param, grad, m, v) are f32.
//!
//! Also the global gradient norm and clipping of torch.nn.utils.clip_grad_norm_
//! (`global_norm`, `clip_by_norm`): a deterministic two-pass sum of squares without atomics.

use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::{Error, Result};

const STEP: Kernel = shaders::kernel(shaders::ADAMW, "adamw_step", &["grad", "param", "m", "v"]);
const SUMSQ_PARTIAL: Kernel = shaders::kernel(shaders::ADAMW, "sumsq_partial", &["x", "partials"]);
const SUMSQ_FINAL: Kernel = shaders::kernel(shaders::ADAMW, "sumsq_final", &["partials", "norm"]);
const CLIP_SCALE: Kernel = shaders::kernel(shaders::ADAMW, "clip_scale", &["norm", "y"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[STEP, SUMSQ_PARTIAL, SUMSQ_FINAL, CLIP_SCALE];
/// Workgroup size of shaders/adamw.wgsl (`WG` there).
pub const WG: u32 = 128;
/// Elements each invocation of `sumsq_partial` squares (`PER` in shaders/adamw.wgsl).
pub const PER: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
struct ReduceParams {
    n: u32,
    offset: u32,
    max_norm: f32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    decay: f32,
    w1: f32,
    beta2: f32,
    w2: f32,
    neg_step: f32,
    bc2_sqrt: f32,
    eps: f32,
}

/// AdamW hyperparameters, with torch.optim.AdamW's defaults (`AdamW::default()`). `lr` is the base
/// rate a schedule scales; `step` takes the rate of each step explicitly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Base learning rate (torch default 1e-3).
    pub lr: f64,
    /// β₁, decay of the first moment (0.9).
    pub beta1: f64,
    /// β₂, decay of the second moment (0.999).
    pub beta2: f64,
    /// ε added to the denominator (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (0.01).
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamW {
    fn params(&self, n: usize, t: u64, lr: f64) -> Params {
        // f64 here, as torch's Python floats; `as f32` marks where torch's tensor ops take them.
        let bc1 = 1.0 - self.beta1.powf(t as f64);
        let bc2 = 1.0 - self.beta2.powf(t as f64);
        let step_size = lr / bc1;
        Params {
            n: n as u32,
            decay: (1.0 - lr * self.weight_decay) as f32,
            w1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            w2: (1.0 - self.beta2) as f32,
            neg_step: (-step_size) as f32,
            bc2_sqrt: bc2.powf(0.5) as f32,
            eps: self.eps as f32,
        }
    }

    /// One AdamW step t (t ≥ 1, the count of steps including this one) at rate `lr`, in place on
    /// param, m, v (n) from grad (n): p *= 1 − lr·wd; m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²;
    /// p −= lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε). m and v start as zeros.
    #[allow(clippy::too_many_arguments)]
    pub fn step(&self, ctx: &GpuContext, param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor, t: u64, lr: f32) -> Result<()> {
        self.step_at(ctx, param, grad, m, v, t, lr as f64)
    }

    /// `step` with the rate as an f64, as torch receives it from a scheduler (a Python float):
    /// the scalars derived from lr are then computed from the exact rate, not its f32 rounding.
    #[allow(clippy::too_many_arguments)]
    pub fn step_at(&self, ctx: &GpuContext, param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor, t: u64, lr: f64) -> Result<()> {
        if t == 0 {
            return Err(Error::Invalid("adamw: the step count t starts at 1".into()));
        }
        let n = param.numel();
        for (what, x) in [("param", param), ("grad", grad), ("m", m), ("v", v)] {
            if x.numel() != n || x.dtype() != DType::F32 {
                return Err(Error::shape(
                    "adamw",
                    format!("{what} {:?} {:?} for param {:?} (all f32 of one size)", x.shape(), x.dtype(), param.shape()),
                ));
            }
        }
        if n > u32::MAX as usize {
            return Err(Error::shape("adamw", format!("{n} elements exceed u32 indexing")));
        }
        let state = [param, m, v, grad];
        for a in 0..4 {
            for b in a + 1..4 {
                if state[a].same_buffer(state[b]) {
                    return Err(Error::Invalid("adamw: param, grad, m and v must be distinct buffers".into()));
                }
            }
        }
        let p = self.params(n, t, lr);
        ctx.dispatch(&STEP, &p, &[grad, param, m, v], groups_2d(groups_for(n, WG as usize)))
    }
}

fn check_f32(op: &'static str, xs: &[&Tensor]) -> Result<()> {
    for x in xs {
        if x.dtype() != DType::F32 {
            return Err(Error::shape(op, format!("tensor {:?} is {:?}, want f32", x.shape(), x.dtype())));
        }
        if x.numel() > u32::MAX as usize {
            return Err(Error::shape(op, format!("tensor {:?} exceeds u32 indexing", x.shape())));
        }
    }
    Ok(())
}

/// The global L2 norm of tensors xs, sqrt(Σ_t Σ_i x_t[i]²), as a (1) tensor on the device (torch's
/// total_norm of clip_grad_norm_ with norm_type 2). Two passes, no atomics: per tensor, one
/// partial sum per CHUNK = WG·PER elements; then one workgroup sums the partials in a fixed
/// order, so the result depends only on the tensors and their order. f32 throughout (tree sums;
/// relative error ~1e-7·log2(n)). Zero tensors (or only empty ones) give 0.
pub fn global_norm(ctx: &GpuContext, xs: &[&Tensor]) -> Result<Tensor> {
    check_f32("global_norm", xs)?;
    let chunk = (WG * PER) as usize;
    let total: usize = xs.iter().map(|x| x.numel().div_ceil(chunk)).sum();
    let norm = ctx.zeros(&[1], DType::F32)?;
    if total == 0 {
        return Ok(norm);
    }
    let partials = ctx.empty(&[total], DType::F32)?;
    let mut offset = 0usize;
    for x in xs {
        let groups = x.numel().div_ceil(chunk);
        if groups == 0 {
            continue;
        }
        let p = ReduceParams { n: x.numel() as u32, offset: offset as u32, max_norm: 0.0, _pad: 0 };
        ctx.dispatch(&SUMSQ_PARTIAL, &p, &[x, &partials], groups_2d(groups as u32))?;
        offset += groups;
    }
    let p = ReduceParams { n: total as u32, offset: 0, max_norm: 0.0, _pad: 0 };
    ctx.dispatch(&SUMSQ_FINAL, &p, &[&partials, &norm], [1, 1, 1])?;
    Ok(norm)
}

/// Clipping by a global norm, in place: with coef = max_norm / (norm + 1e-6) (f32, as torch),
/// every x_t[i] *= coef when coef < 1, else nothing changes. `norm` is the (1) tensor of
/// `global_norm`; the tensors must be distinct buffers (each is scaled once).
pub fn clip_by_norm(ctx: &GpuContext, xs: &[&Tensor], norm: &Tensor, max_norm: f32) -> Result<()> {
    check_f32("clip_by_norm", xs)?;
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::Invalid(format!("clip_by_norm: max_norm must be a positive number, got {max_norm}")));
    }
    if norm.numel() != 1 {
        return Err(Error::shape("clip_by_norm", format!("norm {:?} is not a scalar", norm.shape())));
    }
    for (i, a) in xs.iter().enumerate() {
        for b in &xs[i + 1..] {
            if a.same_buffer(b) {
                return Err(Error::Invalid("clip_by_norm: a tensor appears twice (it would be scaled twice)".into()));
            }
        }
    }
    for x in xs {
        let n = x.numel();
        let p = ReduceParams { n: n as u32, offset: 0, max_norm, _pad: 0 };
        ctx.dispatch(&CLIP_SCALE, &p, &[norm, x], groups_2d(groups_for(n, WG as usize)))?;
    }
    Ok(())
}

/// f64 reference.
pub mod cpu {
    use super::AdamW;

    /// One step t (≥ 1) at rate `lr`, in place on p, m, v from g (all of one length), in f64 with
    /// the formula of torch.optim.AdamW.
    pub fn step(opt: &AdamW, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], t: u64, lr: f64) {
        let bc1 = 1.0 - opt.beta1.powf(t as f64);
        let bc2 = 1.0 - opt.beta2.powf(t as f64);
        let step_size = lr / bc1;
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * opt.weight_decay;
            m[i] = opt.beta1 * m[i] + (1.0 - opt.beta1) * g[i];
            v[i] = opt.beta2 * v[i] + (1.0 - opt.beta2) * g[i] * g[i];
            let denom = v[i].sqrt() / bc2.sqrt() + opt.eps;
            p[i] -= step_size * m[i] / denom;
        }
    }

    /// The global L2 norm sqrt(Σ_t Σ_i x_t[i]²) in f64.
    pub fn global_norm(xs: &[&[f64]]) -> f64 {
        xs.iter().flat_map(|x| x.iter()).map(|v| v * v).sum::<f64>().sqrt()
    }
}
