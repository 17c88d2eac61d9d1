//! SwiGLU (shaders/swiglu.wgsl), the Llama MLP activation: out = silu(gate) * up.

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::{Error, Result};

const FORWARD: Kernel = shaders::kernel(shaders::SWIGLU, "swiglu_forward", &["gate", "up", "out"]);
const BACKWARD: Kernel = shaders::kernel(shaders::SWIGLU, "swiglu_backward", &["gate", "up", "dout", "out", "dup"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[FORWARD, BACKWARD];
/// Workgroup size of shaders/swiglu.wgsl (`WG` there).
pub const WG: u32 = 128;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
}

fn check(gate: &Tensor, up: &Tensor) -> Result<Params> {
    if gate.shape() != up.shape() {
        return Err(Error::shape("swiglu", format!("gate {:?} and up {:?} differ", gate.shape(), up.shape())));
    }
    let n = gate.numel();
    if n > u32::MAX as usize {
        return Err(Error::shape("swiglu", format!("{n} elements exceed u32 indexing")));
    }
    Ok(Params { n: n as u32, _pad: [0; 3] })
}

fn groups(n: u32) -> [u32; 3] {
    groups_2d(groups_for(n as usize, WG as usize))
}

/// Forward: out (…, I) = silu(gate) * up, gate and up (…, I) of one shape.
pub fn forward(ctx: &GpuContext, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let p = check(gate, up)?;
    let out = ctx.empty(gate.shape(), DType::F32)?;
    ctx.dispatch(&FORWARD, &p, &[gate, up, &out], groups(p.n))?;
    Ok(out)
}

/// Backward, one kernel: dgate = dout * up * σ(g)(1 + g(1 − σ(g))), dup = dout * silu(g), all (…, I);
/// returns (dgate, dup).
pub fn backward(ctx: &GpuContext, dout: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let p = check(gate, up)?;
    if dout.shape() != gate.shape() {
        return Err(Error::shape("swiglu", format!("dout {:?} for gate {:?}", dout.shape(), gate.shape())));
    }
    let dgate = ctx.empty(gate.shape(), DType::F32)?;
    let dup = ctx.empty(gate.shape(), DType::F32)?;
    ctx.dispatch(&BACKWARD, &p, &[gate, up, dout, &dgate, &dup], groups(p.n))?;
    Ok((dgate, dup))
}

pub(crate) struct Saved {
    gate: Tensor,
    up: Tensor,
}

impl Saved {
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        // One kernel writes both gradients; the one not wanted is dropped straight back to the pool.
        let (dgate, dup) = backward(ctx, g, &self.gate, &self.up)?;
        Ok(vec![needs[0].then_some(dgate), needs[1].then_some(dup)])
    }
}

/// SwiGLU on the tape: out (…, I) = silu(gate) * up. Records (saving gate and up) only when
/// either needs a gradient.
pub fn swiglu(tape: &mut Tape, ctx: &GpuContext, gate: &Var, up: &Var) -> Result<Var> {
    let out = forward(ctx, gate.value(), up.value())?;
    Ok(tape.record(out, &[gate, up], || Op::SwiGlu(Saved { gate: gate.value().clone(), up: up.value().clone() })))
}

/// f64 reference, flat slices of one length.
pub mod cpu {
    /// σ(g) without overflow for large |g|.
    pub fn sigmoid(g: f64) -> f64 {
        if g >= 0.0 {
            1.0 / (1.0 + (-g).exp())
        } else {
            let e = g.exp();
            e / (1.0 + e)
        }
    }

    /// out = silu(gate) * up = gate σ(gate) up.
    pub fn forward(gate: &[f64], up: &[f64]) -> Vec<f64> {
        gate.iter().zip(up).map(|(&g, &u)| g * sigmoid(g) * u).collect()
    }

    /// (dgate, dup) from dout.
    pub fn backward(dout: &[f64], gate: &[f64], up: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let mut dgate = Vec::with_capacity(gate.len());
        let mut dup = Vec::with_capacity(gate.len());
        for ((&d, &g), &u) in dout.iter().zip(gate).zip(up) {
            let s = sigmoid(g);
            dgate.push(d * u * s * (1.0 + g * (1.0 - s)));
            dup.push(d * g * s);
        }
        (dgate, dup)
    }
}
