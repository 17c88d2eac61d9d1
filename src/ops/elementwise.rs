//! Elementwise ops (shaders/elementwise.wgsl): residual add, scale, and the bias of a linear
//! layer broadcast over its rows.

use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::ops::rows_cols;
use crate::{Error, Result};

const ADD: Kernel = shaders::kernel(shaders::ELEMENTWISE, "add_forward");
const SCALE: Kernel = shaders::kernel(shaders::ELEMENTWISE, "scale");
const ADD_BIAS: Kernel = shaders::kernel(shaders::ELEMENTWISE, "add_bias_forward");
/// Workgroup size of shaders/elementwise.wgsl (`WG` there).
pub const WG: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    alpha: f32,
    cols: u32,
    _pad: u32,
}

fn count(op: &'static str, t: &Tensor) -> Result<u32> {
    u32::try_from(t.numel()).map_err(|_| Error::Limit { op, msg: format!("{:?} has more than 2^32 elements", t.shape()) })
}

/// out = a + b, same shapes.
pub fn add(ctx: &GpuContext, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(Error::shape("add", format!("{:?} + {:?}", a.shape(), b.shape())));
    }
    let out = ctx.empty(a.shape(), DType::F32)?;
    let n = a.numel();
    let p = Params { n: n as u32, alpha: 1.0, cols: 0, _pad: 0 };
    ctx.dispatch(&ADD, &[], &p, &[(1, a), (2, b), (3, &out)], groups_2d(groups_for(n, WG as usize)))?;
    Ok(out)
}

/// out = alpha * a.
pub fn scale(ctx: &GpuContext, a: &Tensor, alpha: f32) -> Result<Tensor> {
    let out = ctx.empty(a.shape(), DType::F32)?;
    let n = a.numel();
    let p = Params { n: n as u32, alpha, cols: 0, _pad: 0 };
    ctx.dispatch(&SCALE, &[], &p, &[(1, a), (3, &out)], groups_2d(groups_for(n, WG as usize)))?;
    Ok(out)
}

/// out (…, C) = x (…, C) + bias (C), the bias added to every row (a linear layer's bias).
pub fn add_bias(ctx: &GpuContext, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, c) = rows_cols(x.shape());
    if x.shape().is_empty() || bias.shape() != [c] {
        return Err(Error::shape("add_bias", format!("bias {:?} for x {:?}: want bias (C) for x (…, C)", bias.shape(), x.shape())));
    }
    let n = count("add_bias", x)?;
    let out = ctx.empty(x.shape(), DType::F32)?;
    let p = Params { n, alpha: 1.0, cols: c as u32, _pad: 0 };
    ctx.dispatch(&ADD_BIAS, &[], &p, &[(1, x), (2, bias), (3, &out)], groups_2d(groups_for(n as usize, WG as usize)))?;
    Ok(out)
}

/// f64 references, row-major.
pub mod cpu {
    /// out (rows, C) = x (rows, C) + bias (C) on every row; its input gradient is dout itself.
    pub fn add_bias(x: &[f64], bias: &[f64]) -> Vec<f64> {
        x.iter().enumerate().map(|(i, v)| v + bias[i % bias.len()]).collect()
    }
}
