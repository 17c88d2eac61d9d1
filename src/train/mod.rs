//! Training: the learning-rate schedules (`schedule`), the AdamW optimizer over a LoRA set with
//! gradient accumulation and global-norm clipping (`optim`, driving shaders/adamw.wgsl), and
//! checkpoints that resume a run exactly (`checkpoint`), and one training step (`train_step`)
//! that ties them together around any loss function on the tape. The run's seeded RNG is
//! `crate::rng`.

pub mod checkpoint;
pub mod memory;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use crate::data::dataset::DataPosition;
pub use checkpoint::{Checkpoint, TrainState};
pub use optim::{check_loss, clip_grad_norm, global_grad_norm, Accumulator, LoraOptimizer};
pub use schedule::{Schedule, ScheduleKind};

use crate::autograd::{Tape, Var};
use crate::gpu::GpuContext;
use crate::model::llama::LoraSet;
use crate::Result;

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The loss of the whole (accumulated) batch: Σ_i (n_i / N) · loss_i, which is the mean over
    /// all N valid target tokens of the step, as transformers computes it for one batch.
    pub loss: f64,
    /// The global gradient norm before clipping (None when clipping is off).
    pub grad_norm: Option<f32>,
    /// The learning rate the update used.
    pub lr: f64,
}

/// One optimizer step over micro-batches: for each micro-batch i (with `tokens[i]` valid target
/// tokens), `loss_fn(tape, i)` builds the mean loss of that micro-batch on a fresh recording
/// tape; its gradients are accumulated with weight tokens[i] / Σ tokens (so the result is the
/// gradient of the full batch's mean-over-tokens loss). Then the loss is read back and checked
/// (a NaN or infinite loss is an error and nothing is updated), the gradients are clipped to
/// `max_grad_norm` when given (torch's clip_grad_norm_), and AdamW updates every parameter of
/// `set` that received a gradient, at rate `lr`.
pub async fn train_step(
    ctx: &GpuContext,
    set: &LoraSet,
    opt: &mut LoraOptimizer,
    tokens: &[usize],
    mut loss_fn: impl FnMut(&mut Tape, usize) -> Result<Var>,
    lr: f64,
    max_grad_norm: Option<f32>,
) -> Result<StepReport> {
    let total: usize = tokens.iter().sum();
    let mut acc = Accumulator::new(total)?;
    for (i, &n) in tokens.iter().enumerate() {
        let mut tape = Tape::new(true);
        let loss = loss_fn(&mut tape, i)?;
        acc.backward(ctx, tape, &loss, n)?;
    }
    let loss = acc.loss(ctx).await?;
    check_loss(loss, opt.step_count() + 1)?;
    let grads = acc.finish();
    let grad_norm = match max_grad_norm {
        Some(max) => {
            // A fixed order (by parameter id) keeps the reduction, and so the norm, deterministic.
            let mut ids: Vec<_> = grads.keys().copied().collect();
            ids.sort();
            let list: Vec<_> = ids.iter().map(|id| &grads[id]).collect();
            let norm = clip_grad_norm(ctx, &list, max)?;
            Some(ctx.read_f32(&norm).await?[0])
        }
        None => None,
    };
    opt.step(ctx, set, &grads, lr)?;
    Ok(StepReport { loss, grad_norm, lr })
}
