//! Elementwise ops (shaders/elementwise.wgsl): residual add and scale.

use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::{Error, Result};

const ADD: Kernel = shaders::kernel(shaders::ELEMENTWISE, "add_forward");
const SCALE: Kernel = shaders::kernel(shaders::ELEMENTWISE, "scale");
/// Workgroup size of shaders/elementwise.wgsl (`WG` there).
pub const WG: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    alpha: f32,
    _pad: [u32; 2],
}

/// out = a + b, same shapes.
pub fn add(ctx: &GpuContext, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(Error::shape("add", format!("{:?} + {:?}", a.shape(), b.shape())));
    }
    let out = ctx.empty(a.shape(), DType::F32)?;
    let n = a.numel();
    let p = Params { n: n as u32, alpha: 1.0, _pad: [0; 2] };
    ctx.dispatch(&ADD, &[], &p, &[(1, a), (2, b), (3, &out)], groups_2d(groups_for(n, WG as usize)))?;
    Ok(out)
}

/// out = alpha * a.
pub fn scale(ctx: &GpuContext, a: &Tensor, alpha: f32) -> Result<Tensor> {
    let out = ctx.empty(a.shape(), DType::F32)?;
    let n = a.numel();
    let p = Params { n: n as u32, alpha, _pad: [0; 2] };
    ctx.dispatch(&SCALE, &[], &p, &[(1, a), (3, &out)], groups_2d(groups_for(n, WG as usize)))?;
    Ok(out)
}
