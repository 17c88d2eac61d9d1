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

use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::{Error, Result};

const STEP: Kernel = shaders::kernel(shaders::ADAMW, "adamw_step");
/// Workgroup size of shaders/adamw.wgsl (`WG` there).
pub const WG: u32 = 256;

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
    pub fn step(&self, ctx: &GpuContext, param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor, t: u64, lr: f32) -> Result<()> {
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
        let p = self.params(n, t, lr as f64);
        ctx.dispatch(&STEP, &[], &p, &[(1, grad), (2, param), (3, m), (4, v)], groups_2d(groups_for(n, WG as usize)))
    }
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
}
