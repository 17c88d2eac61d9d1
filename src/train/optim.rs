//! The optimizer over a LoRA set (shaders/adamw.wgsl through ops::adamw): AdamW state (m, v and
//! the step count t of every parameter), gradient accumulation over micro-batches, clipping by
//! the global gradient norm, and the check that stops training on a NaN or infinite loss.
//!
//! Gradient accumulation: the reference loss is ONE mean over all valid target tokens of the
//! whole batch, L = Σ_i S_i / N with S_i the summed token losses of micro-batch i and N = Σ n_i
//! its valid-token counts. Each micro-batch's loss is its own mean L_i = S_i / n_i, so
//! L = Σ_i (n_i / N) · L_i: the backward of micro-batch i is seeded with n_i / N instead of 1
//! (the same as scaling its loss by n_i / N), and the gradients are summed. This equals the
//! full-batch gradient exactly in real arithmetic, however unequal the n_i (where "sum the
//! micro-batch gradients and divide by their number" would weight tokens of short micro-batches
//! more).

use crate::autograd::{ParamId, Tape, Var};
use crate::gpu::{DType, GpuContext, Tensor};
use crate::model::llama::LoraSet;
use crate::ops::adamw::{self, AdamW};
use crate::ops::elementwise;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};

/// Optimizer state of one parameter: the moments and the count of updates it received.
#[derive(Clone, Debug)]
pub struct Moments {
    /// exp_avg, the first moment (the parameter's shape).
    pub m: Tensor,
    /// exp_avg_sq, the second moment.
    pub v: Tensor,
    /// torch's per-parameter `step`: updates applied so far.
    pub t: u64,
}

/// AdamW over the parameters of a LoRA set, torch.optim.AdamW's semantics: state is created at a
/// parameter's first update (m = v = 0), and a parameter without a gradient in a step is left
/// untouched (no decay, no moment update, its t unchanged), as torch skips `grad is None`.
pub struct LoraOptimizer {
    /// Hyperparameters (`lr` is the base rate; each step takes its rate explicitly).
    pub hp: AdamW,
    state: BTreeMap<ParamId, Moments>,
    steps: u64,
}

impl LoraOptimizer {
    /// An optimizer with no state yet.
    pub fn new(hp: AdamW) -> Self {
        LoraOptimizer { hp, state: BTreeMap::new(), steps: 0 }
    }

    /// An optimizer restored from saved state (`steps` optimizer steps taken so far).
    pub fn from_state(hp: AdamW, state: BTreeMap<ParamId, Moments>, steps: u64) -> Self {
        LoraOptimizer { hp, state, steps }
    }

    /// Optimizer steps taken so far (calls of `step`).
    pub fn step_count(&self) -> u64 {
        self.steps
    }

    /// The state of every parameter updated so far, by id.
    pub fn state(&self) -> &BTreeMap<ParamId, Moments> {
        &self.state
    }

    /// One AdamW update at rate `lr` of every parameter of `set` that has a gradient in `grads`
    /// (grad (same shape as the parameter)): the parameter's t += 1, then ops::adamw's step. A
    /// gradient for a parameter not in `set`, or of the wrong shape, is an error (and nothing is
    /// updated).
    pub fn step(&mut self, ctx: &GpuContext, set: &LoraSet, grads: &HashMap<ParamId, Tensor>, lr: f64) -> Result<()> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::Invalid(format!("optimizer step: learning rate {lr} is not a finite non-negative number")));
        }
        let params = set.params();
        for (id, g) in grads {
            let Some(p) = params.iter().find(|p| p.id == *id) else {
                return Err(Error::Invalid(format!("optimizer step: a gradient for parameter {id:?}, which the LoRA set does not hold")));
            };
            if g.shape() != p.value.shape() {
                return Err(Error::shape("optimizer step", format!("gradient {:?} for parameter {:?} of shape {:?}", g.shape(), id, p.value.shape())));
            }
        }
        for p in params {
            let Some(g) = grads.get(&p.id) else { continue };
            if !self.state.contains_key(&p.id) {
                let m = ctx.zeros(p.value.shape(), DType::F32)?;
                let v = ctx.zeros(p.value.shape(), DType::F32)?;
                self.state.insert(p.id, Moments { m, v, t: 0 });
            }
            let st = self.state.get_mut(&p.id).expect("inserted above");
            if st.m.shape() != p.value.shape() {
                return Err(Error::shape("optimizer step", format!("state {:?} for parameter {:?} of shape {:?}", st.m.shape(), p.id, p.value.shape())));
            }
            st.t += 1;
            self.hp.step_at(ctx, &p.value, g, &st.m, &st.v, st.t, lr)?;
        }
        self.steps += 1;
        Ok(())
    }
}

/// Gradient accumulation over the micro-batches of one optimizer step (see the module
/// documentation): micro-batch i is backpropagated with seed n_i / N and the gradients summed.
pub struct Accumulator {
    total: usize,
    grads: HashMap<ParamId, Tensor>,
    losses: Vec<(Tensor, f64)>,
}

impl Accumulator {
    /// An accumulator for a step whose micro-batches hold N = `total_tokens` valid target tokens
    /// in all. N = 0 (nothing to learn) is allowed: every weight is then 0.
    pub fn new(total_tokens: usize) -> Result<Self> {
        Ok(Accumulator { total: total_tokens, grads: HashMap::new(), losses: Vec::new() })
    }

    /// The weight n / N of a micro-batch with n valid tokens (0 when N = 0).
    pub fn weight(&self, tokens: usize) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            tokens as f64 / self.total as f64
        }
    }

    /// Backpropagates one micro-batch: `loss` (a scalar on `tape`, the mean over its `tokens`
    /// valid tokens) seeded with tokens / N; its parameter gradients are added to the sums.
    pub fn backward(&mut self, ctx: &GpuContext, tape: Tape, loss: &Var, tokens: usize) -> Result<()> {
        if loss.value().numel() != 1 {
            return Err(Error::shape("accumulate", format!("loss of shape {:?} is not a scalar", loss.shape())));
        }
        let w = self.weight(tokens);
        if self.losses.iter().map(|(_, w)| w).sum::<f64>() + w > 1.0 + 1e-9 {
            return Err(Error::Invalid(format!("accumulate: micro-batches hold more than the {} tokens announced", self.total)));
        }
        let seed = ctx.upload_f32(&[w as f32], loss.shape())?;
        let (grads, _) = tape.backward_from(ctx, loss, seed, &[])?;
        for (id, g) in grads {
            let g = match self.grads.remove(&id) {
                Some(prev) => elementwise::add(ctx, &prev, &g)?,
                None => g,
            };
            self.grads.insert(id, g);
        }
        self.losses.push((loss.value().clone(), w));
        Ok(())
    }

    /// The loss of the whole step, Σ_i (n_i / N) · L_i in f64 from the micro-batch losses read
    /// back (one readback for all).
    pub async fn loss(&self, ctx: &GpuContext) -> Result<f64> {
        let mut total = 0.0;
        for (t, w) in &self.losses {
            let v = ctx.read_f32(t).await?[0] as f64;
            total += if *w == 0.0 { 0.0 } else { w * v };
        }
        Ok(total)
    }

    /// The summed gradients, by parameter id.
    pub fn finish(self) -> HashMap<ParamId, Tensor> {
        self.grads
    }
}

/// Stops training on a bad loss: an error when `loss` (the loss of step `step`, counted from 1)
/// is NaN or infinite, saying that the update was not applied, so the adapter on the device
/// still holds the last good state (what was saved to disk, if anything, the caller says).
pub fn check_loss(loss: f64, step: u64) -> Result<()> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "the loss is {loss} at step {step}: training stopped before applying that update, so the adapter on the \
             device still holds the last good state (lower the learning rate, enable gradient clipping, or check \
             the data)"
        )))
    }
}

/// The global gradient norm sqrt(Σ over all gradients of their squared elements), as a (1)
/// tensor on the device (see ops::adamw::global_norm; deterministic for a given order).
pub fn global_grad_norm(ctx: &GpuContext, grads: &[&Tensor]) -> Result<Tensor> {
    adamw::global_norm(ctx, grads)
}

/// torch.nn.utils.clip_grad_norm_(grads, max_norm) (norm type 2): total = the global norm;
/// coef = max_norm / (total + 1e-6); when coef < 1 every gradient is scaled by coef in place.
/// Returns total (before clipping) as a (1) tensor; nothing is read back. The gradients must be
/// distinct buffers; their order fixes the (deterministic) reduction order.
pub fn clip_grad_norm(ctx: &GpuContext, grads: &[&Tensor], max_norm: f32) -> Result<Tensor> {
    let norm = adamw::global_norm(ctx, grads)?;
    adamw::clip_by_norm(ctx, grads, &norm, max_norm)?;
    Ok(norm)
}
