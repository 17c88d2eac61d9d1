//! Cross-entropy over the vocabulary (shaders/cross_entropy.wgsl), as transformers' causal-LM
//! loss: the mean of -log softmax(logits[n])[target[n]] over rows whose target is not -100.
//!
//! The targets are taken already shifted (row n is scored against target[n]); transformers shifts
//! labels inside its loss (`logits[:, :-1]` against `labels[:, 1:]`), which the batch builder does
//! here. When every target is -100 (count 0) the loss is 0 and the gradient is zero, where torch
//! would give NaN (0/0): a batch with nothing to learn must not poison training.

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{groups_2d, groups_for, shaders, DType, GpuContext, Kernel, Tensor};
use crate::ops::rows_cols;
use crate::{Error, Result};

const FORWARD: Kernel = shaders::kernel(shaders::CROSS_ENTROPY, "ce_forward", &["logits", "targets", "lse", "row_loss"]);
const SUM: Kernel = shaders::kernel(shaders::CROSS_ENTROPY, "ce_sum", &["row_loss", "out"]);
const BACKWARD: Kernel = shaders::kernel(shaders::CROSS_ENTROPY, "ce_backward", &["logits", "targets", "dloss", "lse", "out"]);
const CHUNK_FORWARD: Kernel = shaders::kernel(shaders::CROSS_ENTROPY, "ce_chunk_forward", &["logits", "targets", "run_m", "run_s", "tgt_logit"]);
const CHUNK_FINISH: Kernel = shaders::kernel(shaders::CROSS_ENTROPY, "ce_chunk_finish", &["lse", "row_loss", "run_m", "run_s", "tgt_logit", "rows"]);
const CHUNK_BACKWARD: Kernel = shaders::kernel(shaders::CROSS_ENTROPY, "ce_chunk_backward", &["targets", "dloss", "lse", "out"]);
/// Every kernel this op launches (tests/shaders.rs checks their bindings against the WGSL).
pub(crate) const KERNELS: &[Kernel] = &[FORWARD, SUM, BACKWARD, CHUNK_FORWARD, CHUNK_FINISH, CHUNK_BACKWARD];
/// Workgroup size of shaders/cross_entropy.wgsl (`WG` there).
pub const WG: u32 = 128;
/// The target that marks a row as not scored (PyTorch's and transformers' default).
pub const IGNORE_INDEX: i32 = -100;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_rows: u32,
    v: u32,
    count: f32,
    v0: u32,
}

/// Checks the targets (N) against the logits' shape (…, V) and returns (N, V, count), count = rows
/// whose target is not -100. A target that is neither -100 nor in [0, V) is an error naming its row.
pub fn check_targets(logits_shape: &[usize], targets: &[i32]) -> Result<(usize, usize, usize)> {
    if logits_shape.is_empty() {
        return Err(Error::shape("cross_entropy", "logits must have at least one dimension (…, V)"));
    }
    let (n, v) = rows_cols(logits_shape);
    if targets.len() != n {
        return Err(Error::shape("cross_entropy", format!("{} targets for logits {logits_shape:?} ({n} rows)", targets.len())));
    }
    if n.checked_mul(v).is_none_or(|nv| nv > u32::MAX as usize) {
        return Err(Error::shape("cross_entropy", format!("logits {logits_shape:?} exceed u32 indexing")));
    }
    Ok((n, v, check_target_values(targets, v)?))
}

/// Checks that each target is -100 or in [0, V) (the error names the first bad row) and returns
/// the count of rows that are not -100.
pub(crate) fn check_target_values(targets: &[i32], v: usize) -> Result<usize> {
    let mut count = 0;
    for (row, &t) in targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            continue;
        }
        if t < 0 || t as usize >= v {
            return Err(Error::Invalid(format!(
                "cross_entropy: target {t} at row {row} is neither {IGNORE_INDEX} (ignored) nor in [0, {v})"
            )));
        }
        count += 1;
    }
    Ok(count)
}

pub(crate) fn upload_targets(ctx: &GpuContext, targets: &[i32]) -> Result<Tensor> {
    ctx.upload_bytes(bytemuck::cast_slice(targets), &[targets.len()], DType::I32)
}

fn forward_on_device(ctx: &GpuContext, logits: &Tensor, targets: &Tensor, n: usize, v: usize, count: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let p = Params { n_rows: n as u32, v: v as u32, count: count as f32, v0: 0 };
    let loss = ctx.empty(&[1], DType::F32)?;
    let row_loss = ctx.empty(&[n], DType::F32)?;
    let lse = ctx.empty(&[n], DType::F32)?;
    ctx.dispatch(&FORWARD, &p, &[logits, targets, &lse, &row_loss], groups_2d(n as u32))?;
    ctx.dispatch(&SUM, &p, &[&row_loss, &loss], [1, 1, 1])?;
    Ok((loss, row_loss, lse))
}

fn backward_on_device(ctx: &GpuContext, dloss: &Tensor, logits: &Tensor, targets: &Tensor, lse: &Tensor, count: usize) -> Result<Tensor> {
    let (n, v) = rows_cols(logits.shape());
    if dloss.numel() != 1 {
        return Err(Error::shape("cross_entropy", format!("dloss {:?} is not a scalar", dloss.shape())));
    }
    let p = Params { n_rows: n as u32, v: v as u32, count: count as f32, v0: 0 };
    let dlogits = ctx.empty(logits.shape(), DType::F32)?;
    ctx.dispatch(&BACKWARD, &p, &[logits, targets, dloss, lse, &dlogits], groups_2d(groups_for(n * v, WG as usize)))?;
    Ok(dlogits)
}

/// Running softmax statistics of the chunked output layer (src/ops/head.rs): per counted row the
/// running max, the running sum of exp(x − max) and the target's logit (Nc each).
pub(crate) struct ChunkState {
    run_m: Tensor,
    run_s: Tensor,
    tgt: Tensor,
}

impl ChunkState {
    pub(crate) fn new(ctx: &GpuContext, nc: usize) -> Result<Self> {
        Ok(ChunkState { run_m: ctx.empty(&[nc], DType::F32)?, run_s: ctx.empty(&[nc], DType::F32)?, tgt: ctx.empty(&[nc], DType::F32)? })
    }
}

/// Folds the logits of vocabulary columns v0 .. v0 + Vc of the Nc counted rows, `chunk` (Nc, Vc),
/// into `state`; `targets` (Nc) are the rows' targets (none ignored). Chunks must come in
/// ascending v0, starting at 0 (see shaders/cross_entropy.wgsl, ce_chunk_forward).
pub(crate) fn chunk_forward(ctx: &GpuContext, chunk: &Tensor, targets: &Tensor, state: &ChunkState, v0: usize) -> Result<()> {
    let (nc, vc) = rows_cols(chunk.shape());
    let p = Params { n_rows: nc as u32, v: vc as u32, count: 0.0, v0: v0 as u32 };
    ctx.dispatch(&CHUNK_FORWARD, &p, &[chunk, targets, &state.run_m, &state.run_s, &state.tgt], groups_2d(nc as u32))
}

/// After the last chunk: lse (Nc) and the loss (1) = Σ row losses / count, the rows' losses laid
/// into an (N) zero vector at `rows` (Nc, their batch rows) and summed as [`forward`] sums them.
pub(crate) fn chunk_finish(ctx: &GpuContext, state: &ChunkState, rows: &Tensor, n: usize, count: usize) -> Result<(Tensor, Tensor)> {
    let nc = rows.numel();
    let lse = ctx.empty(&[nc], DType::F32)?;
    let row_loss = ctx.zeros(&[n], DType::F32)?;
    let loss = ctx.empty(&[1], DType::F32)?;
    let p = Params { n_rows: nc as u32, v: 0, count: count as f32, v0: 0 };
    if nc > 0 {
        ctx.dispatch(&CHUNK_FINISH, &p, &[&lse, &row_loss, &state.run_m, &state.run_s, &state.tgt, rows], groups_2d(groups_for(nc, WG as usize)))?;
    }
    let p = Params { n_rows: n as u32, v: 0, count: count as f32, v0: 0 };
    ctx.dispatch(&SUM, &p, &[&row_loss, &loss], [1, 1, 1])?;
    Ok((loss, lse))
}

/// Turns the logits chunk (Nc, Vc) of columns v0 .. into its gradient in place:
/// (softmax − onehot(target)) · dloss / count, with the lse (Nc) of [`chunk_finish`].
pub(crate) fn chunk_backward(ctx: &GpuContext, chunk: &Tensor, targets: &Tensor, dloss: &Tensor, lse: &Tensor, v0: usize, count: usize) -> Result<()> {
    let (nc, vc) = rows_cols(chunk.shape());
    if dloss.numel() != 1 {
        return Err(Error::shape("cross_entropy", format!("dloss {:?} is not a scalar", dloss.shape())));
    }
    let p = Params { n_rows: nc as u32, v: vc as u32, count: count as f32, v0: v0 as u32 };
    ctx.dispatch(&CHUNK_BACKWARD, &p, &[targets, dloss, lse, chunk], groups_2d(groups_for(nc * vc, WG as usize)))
}

/// Forward: from logits (…, V) with N rows and targets (N) (-100 = ignored), returns
/// (loss (1) = Σ counted rows (lse − logit[target]) / count, per-row loss (N) with 0 on ignored
/// rows, lse (N) = logsumexp of each row). Nothing is read back to the host.
pub fn forward(ctx: &GpuContext, logits: &Tensor, targets: &[i32]) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, v, count) = check_targets(logits.shape(), targets)?;
    let t = upload_targets(ctx, targets)?;
    forward_on_device(ctx, logits, &t, n, v, count)
}

/// Backward: dlogits (…, V) = (softmax(logits) − onehot(target)) · dloss / count, zero on ignored
/// rows (and everywhere when count is 0); dloss is the (1) gradient of the loss on the device and
/// lse (N) the forward's.
pub fn backward(ctx: &GpuContext, dloss: &Tensor, logits: &Tensor, targets: &[i32], lse: &Tensor) -> Result<Tensor> {
    let (n, _, count) = check_targets(logits.shape(), targets)?;
    if lse.shape() != [n] {
        return Err(Error::shape("cross_entropy", format!("lse {:?} for {n} rows", lse.shape())));
    }
    let t = upload_targets(ctx, targets)?;
    backward_on_device(ctx, dloss, logits, &t, lse, count)
}

pub(crate) struct Saved {
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    count: usize,
}

impl Saved {
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let d = if needs[0] { Some(backward_on_device(ctx, g, &self.logits, &self.targets, &self.lse, self.count)?) } else { None };
        Ok(vec![d])
    }
}

/// Cross-entropy on the tape: a scalar loss (shape [1]) = mean over rows with target != -100 of
/// lse(logits[n]) − logits[n, target[n]], logits (…, V), targets (N). Records (logits, the
/// uploaded targets, lse) only when the logits need a gradient.
pub fn cross_entropy(tape: &mut Tape, ctx: &GpuContext, logits: &Var, targets: &[i32]) -> Result<Var> {
    let (n, v, count) = check_targets(logits.shape(), targets)?;
    let t = upload_targets(ctx, targets)?;
    let (loss, _, lse) = forward_on_device(ctx, logits.value(), &t, n, v, count)?;
    Ok(tape.record(loss, &[logits], || {
        Op::CrossEntropy(Saved { logits: logits.value().clone(), targets: t, lse, count })
    }))
}

/// f64 reference, row-major (N, V).
pub mod cpu {
    use super::IGNORE_INDEX;

    /// logsumexp of each row, shifted by the row max (no overflow).
    pub fn lse(logits: &[f64], v: usize) -> Vec<f64> {
        logits
            .chunks(v)
            .map(|row| {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
            })
            .collect()
    }

    /// (loss, per-row loss (N), lse (N)); loss 0 when every target is -100.
    pub fn forward(logits: &[f64], v: usize, targets: &[i32]) -> (f64, Vec<f64>, Vec<f64>) {
        let lse = lse(logits, v);
        let rows: Vec<f64> = targets
            .iter()
            .enumerate()
            .map(|(n, &t)| if t == IGNORE_INDEX { 0.0 } else { lse[n] - logits[n * v + t as usize] })
            .collect();
        let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let loss = if count == 0 { 0.0 } else { rows.iter().sum::<f64>() / count as f64 };
        (loss, rows, lse)
    }

    /// dlogits (N, V) = (softmax − onehot(target)) · dloss / count, zero on ignored rows.
    pub fn backward(dloss: f64, logits: &[f64], v: usize, targets: &[i32]) -> Vec<f64> {
        let lse = lse(logits, v);
        let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let mut d = vec![0.0; logits.len()];
        if count == 0 {
            return d;
        }
        let scale = dloss / count as f64;
        for (n, &t) in targets.iter().enumerate() {
            if t == IGNORE_INDEX {
                continue;
            }
            for j in 0..v {
                let p = (logits[n * v + j] - lse[n]).exp();
                d[n * v + j] = (p - if j as i32 == t { 1.0 } else { 0.0 }) * scale;
            }
        }
        d
    }
}
