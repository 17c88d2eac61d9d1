//! The DoRA linear (shaders/dora.wgsl for the row norms, the per-column scaling and the magnitude
//! gradient; shaders/matmul.wgsl for the products; shaders/lora.wgsl for dropout), as PEFT's
//! `DoraLinearLayer` (peft/tuners/lora/dora.py and the DoRA variant of `lora.Linear`):
//!
//!   norm = ||W0 + s·B·A||_row (out), detached from the gradient (DoRA paper §4.3);  f = m / norm
//!   no dropout (or inference):  y = f ⊙ (x·W0^T + s·(x·A^T)·B^T) + b0
//!   dropout p > 0 (training):   y = x·W0^T + b0 + (f − 1) ⊙ (xd·W0^T) + f ⊙ s·(xd·A^T)·B^T,
//!                               xd = dropout(x)
//!
//! with f broadcast over rows (one factor per output feature), W0 frozen (f32 or NF4, then
//! dequantized by row chunks for the norm), A (r, in), B (out, r) and the magnitude m (out)
//! trainable. The two forms agree when xd = x; PEFT switches to the second only when dropout is
//! active. Gradients, with z = xd·W0^T + s·h·B^T and h = xd·A^T:
//!   dm = Σ_rows g ⊙ z / norm;  gs = g ⊙ f;  dB = s·gs^T·h;  dh = s·gs·B;  dA = dh^T·xd;
//!   dx = gs·W0 + dh·A (no dropout),  g·W0 + dropout^T((g ⊙ (f − 1))·W0 + dh·A) (dropout).

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::ops::elementwise;
use crate::ops::lora::{dropout_backward_acc, dropout_forward, Frozen, LoraRun};
use crate::ops::matmul::{self, Trans};
use crate::ops::nf4;
use crate::ops::rows_cols;
use crate::{Error, Result};

const WEIGHT_NORM: Kernel = shaders::kernel(shaders::DORA, "dora_weight_norm", &["in0", "in1", "in2", "out"]);
const SCALE: Kernel = shaders::kernel(shaders::DORA, "dora_scale", &["in0", "in1", "in2", "out"]);
const MAGNITUDE_GRAD: Kernel = shaders::kernel(shaders::DORA, "dora_magnitude_grad", &["in0", "in1", "in2", "out"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[WEIGHT_NORM, SCALE, MAGNITUDE_GRAD];
/// Workgroup size of shaders/dora.wgsl (`WG` there).
pub const WG: u32 = 128;
/// Columns per `dora_magnitude_grad` workgroup (`COLS` there).
const COLS: usize = 64;
/// Largest f32 row chunk of an NF4 W0 dequantized at a time for the norm.
const NORM_CHUNK_BYTES: usize = 16 << 20;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    k: u32,
    r: u32,
    row0: u32,
    s: f32,
    n: u32,
    cols: u32,
    accumulate: u32,
    offset: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

fn norm_block(ctx: &GpuContext, w0: &Tensor, a: &Tensor, b: &Tensor, norm: &Tensor, row0: usize, s: f32) -> Result<()> {
    let (rows, k) = (w0.shape()[0], w0.shape()[1]);
    let p = Params { rows: rows as u32, k: k as u32, r: a.shape()[0] as u32, row0: row0 as u32, s, ..Default::default() };
    ctx.dispatch(&WEIGHT_NORM, &p, &[w0, a, b, norm], groups_2d(rows as u32))
}

/// norm (out) = ||W0 + s·B·A||_2 per output row: W0 (out, in) f32 or NF4 (dequantized in row
/// chunks of at most 16 MiB of f32), A (r, in), B (out, r).
pub fn weight_norm(ctx: &GpuContext, w0: &Frozen, a: &Tensor, b: &Tensor, s: f32) -> Result<Tensor> {
    let [n, k] = w0.shape();
    let (&[r, ka], &[nb, rb]) = (a.shape(), b.shape()) else {
        return Err(Error::shape("dora_weight_norm", format!("A {:?}, B {:?} must be matrices", a.shape(), b.shape())));
    };
    if ka != k || nb != n || rb != r {
        return Err(Error::shape("dora_weight_norm", format!("W0 {:?}, A {:?}, B {:?}: want A (r, in), B (out, r)", w0.shape(), a.shape(), b.shape())));
    }
    let norm = ctx.empty(&[n], DType::F32)?;
    match w0 {
        Frozen::F32(w) => norm_block(ctx, w, a, b, &norm, 0, s)?,
        Frozen::F32Rows(w) => {
            for (i, part) in w.parts().iter().enumerate() {
                norm_block(ctx, part, a, b, &norm, w.range(i).start, s)?;
            }
        }
        Frozen::Nf4(w) => {
            // Multiples of 64 rows keep every chunk start on a packed-word boundary.
            let budget = (NORM_CHUNK_BYTES as u64).min(ctx.max_binding()) as usize;
            let per = (budget / (4 * k.max(1)) / 64 * 64).max(64);
            let mut r0 = 0;
            while r0 < n {
                let r1 = (r0 + per).min(n);
                let wc = nf4::dequantize_rows(ctx, w, r0..r1)?;
                norm_block(ctx, &wc, a, b, &norm, r0, s)?;
                r0 = r1;
            }
        }
    }
    Ok(norm)
}

/// out (rows, N) = [out +] (mag / norm − offset) ⊙ z, the factor broadcast over rows; `acc`
/// given: accumulated into it (returned), else a new tensor.
pub fn scale(ctx: &GpuContext, mag: &Tensor, norm: &Tensor, z: &Tensor, offset: f32, acc: Option<&Tensor>) -> Result<Tensor> {
    let (rows, n) = rows_cols(z.shape());
    if mag.numel() != n || norm.numel() != n || acc.is_some_and(|t| t.numel() != z.numel()) {
        return Err(Error::shape("dora_scale", format!("z {:?}, magnitude {:?}, norm {:?}", z.shape(), mag.shape(), norm.shape())));
    }
    let out = match acc {
        Some(t) => t.clone(),
        None => ctx.empty(z.shape(), DType::F32)?,
    };
    let total = rows * n;
    let p = Params { n: total as u32, cols: n as u32, accumulate: acc.is_some() as u32, offset, ..Default::default() };
    ctx.dispatch(&SCALE, &p, &[mag, norm, z, &out], groups_2d(groups_for(total, WG as usize)))?;
    Ok(out)
}

/// dmag (N) = Σ_rows g ⊙ z / norm: g, z (rows, N), norm (N).
pub fn magnitude_grad(ctx: &GpuContext, g: &Tensor, z: &Tensor, norm: &Tensor) -> Result<Tensor> {
    let (rows, n) = rows_cols(g.shape());
    if z.numel() != g.numel() || norm.numel() != n {
        return Err(Error::shape("dora_magnitude_grad", format!("g {:?}, z {:?}, norm {:?}", g.shape(), z.shape(), norm.shape())));
    }
    let out = ctx.empty(&[n], DType::F32)?;
    let p = Params { rows: rows as u32, cols: n as u32, ..Default::default() };
    ctx.dispatch(&MAGNITUDE_GRAD, &p, &[g, z, norm, &out], groups_2d(groups_for(n, COLS)))?;
    Ok(out)
}

/// What the forward returns besides y: h = xd·A^T (rows, r), z = xd·W0^T + s·h·B^T (rows, out)
/// and the detached norm (out).
pub struct Forward {
    /// y (…, out).
    pub y: Tensor,
    /// h (rows, r).
    pub h: Tensor,
    /// z (rows, out).
    pub z: Tensor,
    /// ||W0 + s·B·A||_row (out).
    pub norm: Tensor,
}

/// The DoRA forward (see the module documentation) with the base layer's optional frozen bias b0
/// (out). `norm`: the row norms when already known (generation caches them), else computed.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &GpuContext,
    x: &Tensor,
    w0: &Frozen,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    mag: &Tensor,
    run: &LoraRun,
    norm: Option<&Tensor>,
) -> Result<Forward> {
    let (rows, k) = rows_cols(x.shape());
    let [n, k0] = w0.shape();
    if k0 != k || mag.numel() != n {
        return Err(Error::shape("dora_linear", format!("x {:?}, W0 {:?}, magnitude {:?}", x.shape(), w0.shape(), mag.shape())));
    }
    if !(0.0..1.0).contains(&run.dropout) {
        return Err(Error::Invalid(format!("LoRA dropout {} is outside [0, 1)", run.dropout)));
    }
    let norm = match norm {
        Some(t) => t.clone(),
        None => weight_norm(ctx, w0, a, b, run.scale)?,
    };
    let x2 = x.reshape(&[rows, k]);
    let mut yshape = x.shape().to_vec();
    *yshape.last_mut().unwrap() = n;
    if run.dropout > 0.0 {
        let xd = dropout_forward(ctx, &x2, run)?;
        let h = matmul::matmul(ctx, &xd, a, Trans::NT, 1.0)?;
        let mut y = w0.forward(ctx, &x2)?;
        if let Some(b0) = bias {
            y = elementwise::add_bias(ctx, &y, b0)?;
        }
        let d = w0.forward(ctx, &xd)?;
        let u = matmul::matmul(ctx, &h, b, Trans::NT, run.scale)?;
        scale(ctx, mag, &norm, &d, 1.0, Some(&y))?;
        scale(ctx, mag, &norm, &u, 0.0, Some(&y))?;
        let z = elementwise::add(ctx, &d, &u)?;
        return Ok(Forward { y: y.reshape(&yshape), h, z, norm });
    }
    let h = matmul::matmul(ctx, &x2, a, Trans::NT, 1.0)?;
    let z = w0.forward(ctx, &x2)?;
    matmul::matmul_into(ctx, &h, b, Trans::NT, run.scale, 1.0, &z)?;
    let mut y = scale(ctx, mag, &norm, &z, 0.0, None)?;
    if let Some(b0) = bias {
        y = elementwise::add_bias(ctx, &y, b0)?;
    }
    Ok(Forward { y: y.reshape(&yshape), h, z, norm })
}

/// Gradients of the DoRA linear from g = dL/dy: (dx, dA, dB, dm), each computed only when asked
/// in `want` (x, A, B, m); `x` is needed for dA, `h` for dB, `z` for dm.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    ctx: &GpuContext,
    g: &Tensor,
    x: Option<&Tensor>,
    h: Option<&Tensor>,
    z: Option<&Tensor>,
    norm: &Tensor,
    w0: &Frozen,
    a: &Tensor,
    b: &Tensor,
    mag: &Tensor,
    run: &LoraRun,
    want: [bool; 4],
) -> Result<[Option<Tensor>; 4]> {
    let (rows, n) = rows_cols(g.shape());
    let k = w0.shape()[1];
    let g2 = g.reshape(&[rows, n]);
    let dm = match (want[3], z) {
        (true, Some(z)) => Some(magnitude_grad(ctx, &g2, z, norm)?),
        _ => None,
    };
    if !(want[0] || want[1] || want[2]) {
        return Ok([None, None, None, dm]);
    }
    let gs = scale(ctx, mag, norm, &g2, 0.0, None)?;
    let (dh, da, db) = crate::ops::lora::adapter_grads(ctx, &gs, x, h, b, run, k, [want[0], want[1], want[2]])?;
    let dx = match (want[0], &dh) {
        (true, Some(dh)) => {
            let dx = if run.dropout > 0.0 {
                let dx = w0.backward_input(ctx, &g2)?;
                let gd = scale(ctx, mag, norm, &g2, 1.0, None)?;
                let dxd = w0.backward_input(ctx, &gd)?;
                matmul::matmul_into(ctx, dh, a, Trans::NN, 1.0, 1.0, &dxd)?;
                dropout_backward_acc(ctx, &dxd, &dx, run)?;
                dx
            } else {
                let dx = w0.backward_input(ctx, &gs)?;
                matmul::matmul_into(ctx, dh, a, Trans::NN, 1.0, 1.0, &dx)?;
                dx
            };
            let mut xs = g.shape().to_vec();
            *xs.last_mut().unwrap() = k;
            Some(dx.reshape(&xs))
        }
        _ => None,
    };
    Ok([dx, da, db, dm])
}

pub(crate) struct Saved {
    x: Option<Tensor>,
    h: Option<Tensor>,
    z: Option<Tensor>,
    norm: Tensor,
    w0: Frozen,
    a: Tensor,
    b: Tensor,
    mag: Tensor,
    run: LoraRun,
}

impl Saved {
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let want = [needs[0], needs[1], needs[2], needs[3]];
        let s = self;
        Ok(backward(ctx, g, s.x.as_ref(), s.h.as_ref(), s.z.as_ref(), &s.norm, &s.w0, &s.a, &s.b, &s.mag, &s.run, want)?.into())
    }
}

/// The DoRA linear on the tape (inputs x, A, B, m; see the module documentation). Saves x only
/// when A needs a gradient, h only when B does, z only when m does; `norm` as in [`forward`].
#[allow(clippy::too_many_arguments)]
pub fn dora_linear(
    tape: &mut Tape,
    ctx: &GpuContext,
    x: &Var,
    w0: &Frozen,
    bias: Option<&Tensor>,
    a: &Var,
    b: &Var,
    mag: &Var,
    run: &LoraRun,
    norm: Option<&Tensor>,
) -> Result<Var> {
    let f = forward(ctx, x.value(), w0, bias, a.value(), b.value(), mag.value(), run, norm)?;
    let Forward { y, h, z, norm } = f;
    Ok(tape.record(y, &[x, a, b, mag], || {
        Op::DoraLinear(Saved {
            x: a.requires_grad().then(|| x.value().clone()),
            h: b.requires_grad().then_some(h),
            z: mag.requires_grad().then_some(z),
            norm,
            w0: w0.clone(),
            a: a.value().clone(),
            b: b.value().clone(),
            mag: mag.value().clone(),
            run: *run,
        })
    }))
}

/// f64 reference of the DoRA linear, row-major: x (rows, k), W0 (n, k), A (r, k), B (n, r),
/// m (n). The norm is an argument (computed by [`cpu::weight_norm`]) so that finite differences
/// of [`cpu::forward`] at a fixed norm check the detached-norm gradients of [`cpu::backward`].
pub mod cpu {
    use crate::ops::lora::keep;

    fn dropped(x: &[f64], p: f64, seed: u32) -> Vec<f64> {
        if p == 0.0 {
            return x.to_vec();
        }
        x.iter().enumerate().map(|(i, &v)| if keep(seed, i as u32, p as f32) { v / (1.0 - p) } else { 0.0 }).collect()
    }

    fn nt(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
            }
        }
        c
    }

    /// ||W0 + s·B·A||_2 per row (n).
    pub fn weight_norm(w0: &[f64], a: &[f64], b: &[f64], k: usize, n: usize, r: usize, s: f64) -> Vec<f64> {
        (0..n)
            .map(|j| {
                (0..k)
                    .map(|c| {
                        let v = w0[j * k + c] + s * (0..r).map(|t| b[j * r + t] * a[t * k + c]).sum::<f64>();
                        v * v
                    })
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    }

    /// y (rows, n) as PEFT computes it (dropout p with the seeded mask; no bias), with `norm`
    /// held as a constant.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        x: &[f64], w0: &[f64], a: &[f64], b: &[f64], mag: &[f64], norm: &[f64], rows: usize, k: usize, n: usize, r: usize, s: f64, p: f64,
        seed: u32,
    ) -> Vec<f64> {
        let xd = dropped(x, p, seed);
        let base = nt(x, w0, rows, n, k);
        let based = nt(&xd, w0, rows, n, k);
        let up = nt(&nt(&xd, a, rows, r, k), b, rows, n, r);
        (0..rows * n)
            .map(|i| {
                let f = mag[i % n] / norm[i % n];
                base[i] + (f - 1.0) * based[i] + f * s * up[i]
            })
            .collect()
    }

    /// (dx, dA, dB, dm) from g = dL/dy with the norm detached.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        g: &[f64], x: &[f64], w0: &[f64], a: &[f64], b: &[f64], mag: &[f64], norm: &[f64], rows: usize, k: usize, n: usize, r: usize, s: f64,
        p: f64, seed: u32,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let xd = dropped(x, p, seed);
        let h = nt(&xd, a, rows, r, k);
        let z: Vec<f64> = {
            let based = nt(&xd, w0, rows, n, k);
            let up = nt(&h, b, rows, n, r);
            based.iter().zip(&up).map(|(u, v)| u + s * v).collect()
        };
        let f: Vec<f64> = (0..n).map(|j| mag[j] / norm[j]).collect();
        let mut dm = vec![0.0; n];
        for i in 0..rows {
            for j in 0..n {
                dm[j] += g[i * n + j] * z[i * n + j] / norm[j];
            }
        }
        let gs: Vec<f64> = (0..rows * n).map(|i| g[i] * f[i % n]).collect();
        let mut db = vec![0.0; n * r];
        let mut dh = vec![0.0; rows * r];
        for i in 0..rows {
            for j in 0..n {
                for t in 0..r {
                    db[j * r + t] += s * gs[i * n + j] * h[i * r + t];
                    dh[i * r + t] += s * gs[i * n + j] * b[j * r + t];
                }
            }
        }
        let mut da = vec![0.0; r * k];
        // d/dxd: (g ⊙ (f − 1))·W0 + dh·A; d/dx (direct base path): g·W0.
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
                    dxd[i * k + c] += g[i * n + j] * (f[j] - 1.0) * w0[j * k + c];
                }
            }
        }
        let dxd: Vec<f64> = if p == 0.0 {
            dxd
        } else {
            dxd.iter().enumerate().map(|(i, &v)| if keep(seed, i as u32, p as f32) { v / (1.0 - p) } else { 0.0 }).collect()
        };
        let dx = dx.iter().zip(&dxd).map(|(u, v)| u + v).collect();
        (dx, da, db, dm)
    }
}
