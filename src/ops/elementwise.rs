//! Elementwise ops (shaders/elementwise.wgsl): residual add, scale, the bias of a linear layer
//! broadcast over its rows, and column blocks of a matrix (chunked products over sharded weights).

use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::ops::rows_cols;
use crate::{Error, Result};

const ADD: Kernel = shaders::kernel(shaders::ELEMENTWISE, "add_forward", &["a", "b", "out"]);
const SCALE: Kernel = shaders::kernel(shaders::ELEMENTWISE, "scale", &["a", "out"]);
const ADD_BIAS: Kernel = shaders::kernel(shaders::ELEMENTWISE, "add_bias_forward", &["a", "b", "out"]);
const PUT_COLS: Kernel = shaders::kernel(shaders::ELEMENTWISE, "put_cols", &["a", "out"]);
const TAKE_COLS: Kernel = shaders::kernel(shaders::ELEMENTWISE, "take_cols", &["a", "out"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[ADD, SCALE, ADD_BIAS, PUT_COLS, TAKE_COLS];
/// Workgroup size of shaders/elementwise.wgsl (`WG` there).
pub const WG: u32 = 128;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    alpha: f32,
    cols: u32,
    ld: u32,
    c0: u32,
    _pad: [u32; 3],
}

impl Params {
    fn new(n: u32, alpha: f32, cols: u32) -> Self {
        Params { n, alpha, cols, ld: 0, c0: 0, _pad: [0; 3] }
    }
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
    let p = Params::new(n as u32, 1.0, 0);
    ctx.dispatch(&ADD, &p, &[a, b, &out], groups_2d(groups_for(n, WG as usize)))?;
    Ok(out)
}

/// out = alpha * a.
pub fn scale(ctx: &GpuContext, a: &Tensor, alpha: f32) -> Result<Tensor> {
    let out = ctx.empty(a.shape(), DType::F32)?;
    let n = a.numel();
    let p = Params::new(n as u32, alpha, 0);
    ctx.dispatch(&SCALE, &p, &[a, &out], groups_2d(groups_for(n, WG as usize)))?;
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
    let p = Params::new(n, 1.0, c as u32);
    ctx.dispatch(&ADD_BIAS, &p, &[x, bias, &out], groups_2d(groups_for(n as usize, WG as usize)))?;
    Ok(out)
}

/// Checks a (R, w) block at column c0 of an (R, ld) matrix; returns (R, w, ld).
fn block_dims(op: &'static str, block: &Tensor, wide: &Tensor, c0: usize) -> Result<(usize, usize, usize)> {
    let (r, w) = rows_cols(block.shape());
    let (r2, ld) = rows_cols(wide.shape());
    if block.shape().is_empty() || wide.shape().is_empty() || r != r2 || c0 + w > ld {
        return Err(Error::shape(op, format!("block {:?} at column {c0} of {:?}", block.shape(), wide.shape())));
    }
    if r.checked_mul(ld).is_none_or(|x| x > u32::MAX as usize) {
        return Err(Error::Limit { op, msg: format!("{:?} has more than 2^32 elements", wide.shape()) });
    }
    Ok((r, w, ld))
}

/// wide[:, c0 .. c0 + w] = block (R, w), wide (R, ld): a column block of a wider matrix.
pub fn put_cols(ctx: &GpuContext, block: &Tensor, wide: &Tensor, c0: usize) -> Result<()> {
    let (r, w, ld) = block_dims("put_cols", block, wide, c0)?;
    let mut p = Params::new((r * w) as u32, 1.0, w as u32);
    (p.ld, p.c0) = (ld as u32, c0 as u32);
    if r * w > 0 {
        ctx.dispatch(&PUT_COLS, &p, &[block, wide], groups_2d(groups_for(r * w, WG as usize)))?;
    }
    Ok(())
}

/// A new (R, w) tensor = wide[:, c0 .. c0 + w], wide (R, ld).
pub fn take_cols(ctx: &GpuContext, wide: &Tensor, c0: usize, w: usize) -> Result<Tensor> {
    let (r, _) = rows_cols(wide.shape());
    let out = ctx.empty(&[r, w], DType::F32)?;
    let (r, w, ld) = block_dims("take_cols", &out, wide, c0)?;
    let mut p = Params::new((r * w) as u32, 1.0, w as u32);
    (p.ld, p.c0) = (ld as u32, c0 as u32);
    if r * w > 0 {
        ctx.dispatch(&TAKE_COLS, &p, &[wide, &out], groups_2d(groups_for(r * w, WG as usize)))?;
    }
    Ok(out)
}

/// f64 references, row-major.
pub mod cpu {
    /// out (rows, C) = x (rows, C) + bias (C) on every row; its input gradient is dout itself.
    pub fn add_bias(x: &[f64], bias: &[f64]) -> Vec<f64> {
        x.iter().enumerate().map(|(i, v)| v + bias[i % bias.len()]).collect()
    }
}
