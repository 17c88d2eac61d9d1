//! Rotary position embedding (shaders/rope.wgsl) in Hugging Face's rotate-half layout, with the
//! cos/sin tables computed on the CPU the way transformers computes them in f32.
//!
//! How the tables reproduce transformers (torch on CPU, where `LlamaRotaryEmbedding` builds
//! `inv_freq` at init and where `cos`/`sin` come from f32 tensors):
//! - `inv_freq = 1.0 / (theta ** (arange(0, HS, 2, int64).float() / HS))`: the exponent i/HS is an
//!   f32 division; `theta ** tensor` is `pow(Scalar, Tensor)`, whose wrapped scalar is cast to the
//!   tensor's dtype, so it is powf(f32(theta), e) in f32; `1.0 / t` is `t.reciprocal() * 1.0`, an
//!   f32 reciprocal. Here powf is evaluated in f64 on the same f32 operands and rounded once, which
//!   gives the correctly rounded f32 power. torch's CPU kernel uses SLEEF's powf_u10 (error at most
//!   1 ulp; glibc powf for short tails), so a value may differ from torch in the last bit where
//!   torch's own powf is not correctly rounded; everything after the power is bit-exact f32.
//! - `freqs = inv_freq @ position.float()` is a K = 1 product: one f32 multiply per element.
//! - `emb.cos()` / `emb.sin()` in f32: torch's CPU kernel uses SLEEF's cosf/sinf_u10 (at most
//!   1 ulp from the true value). Here cos and sin are evaluated in f64 on the f32 argument and
//!   rounded once to f32: the correctly rounded value, within 1 ulp of torch's.
//! - `attention_scaling` is 1 for the default, linear and llama3 types (a multiply by 1 is exact).
//! - Scaling, as transformers' `_compute_linear_scaling_rope_parameters` and
//!   `_compute_llama3_parameters`, with each step in f32 as torch evaluates it (python scalars cast
//!   to f32, `a / tensor` = `tensor.reciprocal() * a`).
//! - Per-frequency factors (llama.cpp's `rope_freqs.weight`, how a GGUF carries Llama 3.1+
//!   scaling): inv_freq[i] / factors[i], one f32 division, as ggml's rope divides theta by the
//!   factor. Factors written from the llama3 rule (1 / its scale per frequency) give the llama3
//!   inv_freq to within an ulp or two in the blended band, exactly elsewhere.

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::ops::expect_rank;
use crate::{Error, Result};

const FORWARD: Kernel = shaders::kernel(shaders::ROPE, "rope_forward", &["inp", "cos_t", "sin_t", "out"]);
const BACKWARD: Kernel = shaders::kernel(shaders::ROPE, "rope_backward", &["inp", "cos_t", "sin_t", "out"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[FORWARD, BACKWARD];
/// Workgroup size of shaders/rope.wgsl (`WG` there).
pub const WG: u32 = 128;

/// RoPE frequency scaling: config.json's `rope_scaling` (or, in transformers 5, `rope_parameters`)
/// with `rope_type` "linear" or "llama3", `None` where the type is "default" or absent; or
/// per-frequency factors from a GGUF (`ModelConfig::effective_rope_scaling` picks the one to use).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: positions / factor, i.e. inv_freq / factor.
    Linear {
        /// The divisor of the positions.
        factor: f64,
    },
    /// Llama 3.1's band-wise scaling: wavelengths above original/low_freq_factor are divided by
    /// `factor`, those below original/high_freq_factor are kept, and the band between is blended.
    Llama3 {
        /// Divisor of the low frequencies (8 for Llama 3.1, 32 for Llama 3.2).
        factor: f64,
        /// Wavelengths above original_max_position_embeddings / low_freq_factor are scaled.
        low_freq_factor: f64,
        /// Wavelengths below original_max_position_embeddings / high_freq_factor are kept.
        high_freq_factor: f64,
        /// Context length the model was pretrained with (8192 for Llama 3).
        original_max_position_embeddings: u32,
    },
    /// llama.cpp's per-frequency divisors (a GGUF's `rope_freqs.weight`, HS / 2 values):
    /// inv_freq[i] / factors[i].
    FreqFactors {
        /// One positive divisor per rotated pair.
        factors: Vec<f32>,
    },
}

impl RopeScaling {
    /// Reads a `rope_scaling` / `rope_parameters` JSON object (keys `rope_type` or the older
    /// `type`, `factor`, ...): Ok(None) for "default" or a missing type, an error for the types
    /// this library does not implement (dynamic, ntk, yarn, longrope) or missing fields.
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Option<RopeScaling>> {
        if v.is_null() {
            return Ok(None);
        }
        let obj = v.as_object().ok_or_else(|| Error::Invalid(format!("rope_scaling is not an object: {v}")))?;
        let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            obj.get(key)
                .and_then(|x| x.as_f64())
                .ok_or_else(|| Error::Invalid(format!("rope_scaling of type {kind:?} needs a number {key:?}: {v}")))
        };
        match kind {
            "default" => Ok(None),
            "linear" => Ok(Some(RopeScaling::Linear { factor: num("factor")? })),
            "llama3" => {
                let orig = num("original_max_position_embeddings")?;
                if !(orig >= 1.0 && orig <= u32::MAX as f64) {
                    return Err(Error::Invalid(format!("rope_scaling original_max_position_embeddings {orig}")));
                }
                Ok(Some(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: orig as u32,
                }))
            }
            other => Err(Error::Invalid(format!(
                "rope_scaling type {other:?} is not supported (supported: default, linear, llama3)"
            ))),
        }
    }

    /// Checks the parameters for head size `hs`: positive finite factors, HS / 2 of them for
    /// `FreqFactors`. [`inv_freq`] assumes a checked scaling.
    pub fn validate(&self, hs: usize) -> Result<()> {
        let positive = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::Invalid(format!("rope scaling {what} {v} is not a positive finite number")))
            }
        };
        match self {
            RopeScaling::Linear { factor } => positive("factor", *factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, .. } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::Invalid(format!(
                        "rope scaling high_freq_factor {high_freq_factor} is not above low_freq_factor {low_freq_factor}"
                    )));
                }
                Ok(())
            }
            RopeScaling::FreqFactors { factors } => {
                if factors.len() != hs / 2 {
                    return Err(Error::Invalid(format!(
                        "{} rope frequency factors for head size {hs}, expected {}",
                        factors.len(),
                        hs / 2
                    )));
                }
                for (i, &f) in factors.iter().enumerate() {
                    positive(&format!("frequency factor {i}"), f as f64)?;
                }
                Ok(())
            }
        }
    }
}

/// powf in f32 as the correctly rounded result (see the module comment).
fn powf_f32(base: f32, e: f32) -> f32 {
    (base as f64).powf(e as f64) as f32
}

/// inv_freq (ceil(HS/2)) = 1 / theta^(2i/HS) in f32 as transformers computes it, then scaled:
/// linear: inv_freq / factor; llama3: the band-wise adjustment of `_compute_llama3_parameters`;
/// per-frequency factors: inv_freq[i] / factors[i] (as llama.cpp; `RopeScaling::validate` first:
/// a frequency without a factor is left as it is).
pub fn inv_freq(theta: f64, hs: usize, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let base = theta as f32;
    let dim = hs as f32;
    let inv: Vec<f32> = (0..hs).step_by(2).map(|i| 1.0f32 / powf_f32(base, i as f32 / dim)).collect();
    match scaling {
        None => inv,
        Some(RopeScaling::Linear { factor }) => {
            let f = *factor as f32;
            inv.iter().map(|&x| x / f).collect()
        }
        Some(&RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let old = original_max_position_embeddings as f64;
            // Python-float arithmetic first, then the scalar meets an f32 tensor and becomes f32.
            let low_wavelen = (old / low_freq_factor) as f32;
            let high_wavelen = (old / high_freq_factor) as f32;
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            let f = factor as f32;
            let band = (high_freq_factor - low_freq_factor) as f32;
            inv.iter()
                .map(|&x| {
                    let wavelen = (1.0f32 / x) * two_pi;
                    let scaled = if wavelen > low_wavelen { x / f } else { x };
                    let smooth = ((1.0f32 / wavelen) * old as f32 - low_freq_factor as f32) / band;
                    let smoothed = (1.0f32 - smooth) * scaled / f + smooth * scaled;
                    // transformers: ~(wavelen < high) & ~(wavelen > low); no NaN can occur here.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        smoothed
                    } else {
                        scaled
                    }
                })
                .collect()
        }
        Some(RopeScaling::FreqFactors { factors }) => {
            inv.iter().enumerate().map(|(i, &x)| x / factors.get(i).copied().unwrap_or(1.0)).collect()
        }
    }
}

/// cos and sin tables (T, half), T = positions.len(), half = inv_freq.len():
/// angle[t, i] = f32(f32(positions[t]) * inv_freq[i]); cos/sin of it rounded to f32.
pub fn tables(inv_freq: &[f32], positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(positions.len() * inv_freq.len());
    let mut sin = Vec::with_capacity(positions.len() * inv_freq.len());
    for &p in positions {
        for &f in inv_freq {
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// The cos and sin tables (R, half) on the device, uploaded once and shared by every layer.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// cos (R, half).
    pub cos: Tensor,
    /// sin (R, half).
    pub sin: Tensor,
}

impl RopeTables {
    /// Builds (`tables`) and uploads cos and sin (positions.len(), inv_freq.len()).
    pub fn new(ctx: &GpuContext, inv_freq: &[f32], positions: &[u32]) -> Result<Self> {
        let (c, s) = tables(inv_freq, positions);
        let shape = [positions.len(), inv_freq.len()];
        Ok(RopeTables { cos: ctx.upload_f32(&c, &shape)?, sin: ctx.upload_f32(&s, &shape)? })
    }

    /// Rows R (positions held).
    pub fn rows(&self) -> usize {
        self.cos.shape()[0]
    }

    /// Columns: half = HS / 2.
    pub fn half(&self) -> usize {
        self.cos.shape()[1]
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_pairs: u32,
    t: u32,
    h: u32,
    half: u32,
    row0: u32,
    _pad: [u32; 3],
}

fn launch(kernel: &Kernel, ctx: &GpuContext, x: &Tensor, tables: &RopeTables, row0: usize) -> Result<Tensor> {
    let s = expect_rank("rope", "x (B, T, H, HS)", x.shape(), 4)?;
    let (b, t, h, hs) = (s[0], s[1], s[2], s[3]);
    if tables.cos.shape().len() != 2 || tables.cos.shape() != tables.sin.shape() {
        return Err(Error::shape(
            "rope",
            format!("tables cos {:?} and sin {:?} must both be (R, half)", tables.cos.shape(), tables.sin.shape()),
        ));
    }
    if hs % 2 != 0 || hs / 2 != tables.half() {
        return Err(Error::shape("rope", format!("head size {hs} of x {:?} needs tables of {} columns, got {}", s, hs / 2, tables.half())));
    }
    if row0 + t > tables.rows() {
        return Err(Error::shape("rope", format!("rows {row0}..{} of x {:?} past the tables' {} rows", row0 + t, s, tables.rows())));
    }
    let n_pairs = b * t * h * (hs / 2);
    if n_pairs > u32::MAX as usize / 2 {
        return Err(Error::Limit { op: "rope", msg: format!("x {s:?} has too many elements") });
    }
    let out = ctx.empty(s, DType::F32)?;
    let p = Params { n_pairs: n_pairs as u32, t: t as u32, h: h as u32, half: (hs / 2) as u32, row0: row0 as u32, _pad: [0; 3] };
    ctx.dispatch(kernel, &p, &[x, &tables.cos, &tables.sin, &out], groups_2d(groups_for(n_pairs, WG as usize)))?;
    Ok(out)
}

/// Forward: out (B, T, H, HS) = x rotated by the angles of table rows 0..T (tables: R >= T rows).
pub fn forward(ctx: &GpuContext, x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    launch(&FORWARD, ctx, x, tables, 0)
}

/// Forward with table rows row0..row0+T (one table of every position, new tokens of a KV cache).
pub fn forward_rows(ctx: &GpuContext, x: &Tensor, tables: &RopeTables, row0: usize) -> Result<Tensor> {
    launch(&FORWARD, ctx, x, tables, row0)
}

/// Backward: dx (B, T, H, HS) = dout rotated by the negative angles of table rows 0..T.
pub fn backward(ctx: &GpuContext, dout: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    launch(&BACKWARD, ctx, dout, tables, 0)
}

pub(crate) struct Saved {
    tables: RopeTables,
}

impl Saved {
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![if needs[0] { Some(backward(ctx, g, &self.tables)?) } else { None }])
    }
}

/// RoPE on the tape: out (B, T, H, HS) = rotate(x, table rows 0..T). Saves only the tables.
pub fn rope(tape: &mut Tape, ctx: &GpuContext, x: &Var, tables: &RopeTables) -> Result<Var> {
    let out = forward(ctx, x.value(), tables)?;
    Ok(tape.record(out, &[x], || Op::Rope(Saved { tables: tables.clone() })))
}

/// f64 reference, row-major; x (B, T, H, HS) seen as rows of HS, cos/sin (T, HS/2).
pub mod cpu {
    fn rotate(x: &[f64], cos: &[f64], sin: &[f64], t: usize, h: usize, hs: usize, sign: f64) -> Vec<f64> {
        let half = hs / 2;
        let mut out = vec![0.0; x.len()];
        for (r, (row, o)) in x.chunks(hs).zip(out.chunks_mut(hs)).enumerate() {
            let tt = (r / h) % t;
            for i in 0..half {
                let (c, s) = (cos[tt * half + i], sign * sin[tt * half + i]);
                o[i] = row[i] * c - row[i + half] * s;
                o[i + half] = row[i + half] * c + row[i] * s;
            }
        }
        out
    }

    /// out[i] = x[i] cos - x[i+half] sin, out[i+half] = x[i+half] cos + x[i] sin, per row (b, t, h).
    pub fn forward(x: &[f64], cos: &[f64], sin: &[f64], t: usize, h: usize, hs: usize) -> Vec<f64> {
        rotate(x, cos, sin, t, h, hs, 1.0)
    }

    /// dx = the rotation of dout by the negative angle (the transpose).
    pub fn backward(dout: &[f64], cos: &[f64], sin: &[f64], t: usize, h: usize, hs: usize) -> Vec<f64> {
        rotate(dout, cos, sin, t, h, hs, -1.0)
    }
}
