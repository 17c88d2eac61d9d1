//! The trainer: one model (frozen base, f32 or NF4), one LoRA adapter, AdamW with a schedule,
//! gradient accumulation over micro-batches, optional clipping and per-layer checkpointing, and
//! the state a checkpoint needs to resume bit for bit (step, RNG, data position).

use crate::autograd::{Tape, Var};
use crate::data::dataset::Batch;
use crate::gpu::GpuContext;
use crate::lora::config::LoraConfig;
use crate::model::llama::{self, ForwardOpts, LlamaConfig, LlamaWeights, LoraSet};
use crate::ops::adamw::AdamW;
use crate::ops::rope::{self, RopeTables};
use crate::train::{train_step, Checkpoint, DataPosition, LoraOptimizer, StepReport, TrainState};
use crate::{Error, Result};
use std::rc::Rc;

/// A frozen base model on the device with its RoPE tables.
pub struct Model {
    /// Architecture.
    pub cfg: LlamaConfig,
    /// Frozen weights.
    pub weights: LlamaWeights,
    /// cos/sin for positions 0..max_len.
    pub rope: Rc<RopeTables>,
    /// The RoPE inverse frequencies (HS/2) the tables were built from (packed batches build
    /// tables for their own position ids).
    pub inv_freq: Vec<f32>,
}

impl Model {
    /// Wraps uploaded weights; RoPE tables cover positions 0..max_len with `scaling` applied
    /// (for a loaded model: `ModelConfig::effective_rope_scaling()`, which also carries a GGUF's
    /// per-frequency factors). `Error::Invalid` for scaling parameters that do not fit the head
    /// size (e.g. not HS / 2 frequency factors).
    pub fn new(ctx: &GpuContext, cfg: LlamaConfig, weights: LlamaWeights, scaling: Option<&rope::RopeScaling>, max_len: usize) -> Result<Self> {
        if let Some(s) = scaling {
            s.validate(cfg.head_dim)?;
        }
        let inv = rope::inv_freq(cfg.rope_theta, cfg.head_dim, scaling);
        let pos: Vec<u32> = (0..max_len as u32).collect();
        let rope = Rc::new(RopeTables::new(ctx, &inv, &pos)?);
        Ok(Model { cfg, weights, rope, inv_freq: inv })
    }

    /// Logits (B*T, V) of `ids` (B sequences) on `tape`.
    pub fn logits(&self, tape: &mut Tape, ctx: &Rc<GpuContext>, lora: &LoraSet, ids: &[u32], batch: usize, opts: ForwardOpts) -> Result<Var> {
        let seq = ids.len() / batch.max(1);
        if seq > self.rope.rows() {
            return Err(Error::Invalid(format!("sequence of {seq} tokens is longer than the {} positions prepared", self.rope.rows())));
        }
        llama::forward(tape, ctx, &self.cfg, &self.weights, lora, ids, batch, &self.rope, opts)
    }

    /// The causal-LM loss (1) of `ids` (B sequences) against `targets` on `tape`, through the
    /// chunked output layer (no logits (B*T, V) held; only counted rows scored).
    #[allow(clippy::too_many_arguments)]
    pub fn loss(&self, tape: &mut Tape, ctx: &Rc<GpuContext>, lora: &LoraSet, ids: &[u32], targets: &[i32], batch: usize, opts: ForwardOpts) -> Result<Var> {
        let seq = ids.len() / batch.max(1);
        if seq > self.rope.rows() {
            return Err(Error::Invalid(format!("sequence of {seq} tokens is longer than the {} positions prepared", self.rope.rows())));
        }
        llama::forward_loss(tape, ctx, &self.cfg, &self.weights, lora, ids, targets, batch, &self.rope, opts)
    }

    /// [`Model::loss`] of a packed batch (sequence packing) when `seg` (B*T segment starts, see
    /// `data::dataset::Batch::seg`) is given: position ids restart at each example (RoPE tables
    /// built for them) and attention stays within each example. None: `loss`.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_packed(
        &self,
        tape: &mut Tape,
        ctx: &Rc<GpuContext>,
        lora: &LoraSet,
        ids: &[u32],
        targets: &[i32],
        batch: usize,
        seg: Option<&[u32]>,
        opts: ForwardOpts,
    ) -> Result<Var> {
        let Some(seg) = seg else { return self.loss(tape, ctx, lora, ids, targets, batch, opts) };
        let seq = ids.len() / batch.max(1);
        if seg.len() != ids.len() || batch == 0 || ids.len() % batch != 0 {
            return Err(Error::shape("packed batch", format!("{} segment starts for {} ids in {batch} rows", seg.len(), ids.len())));
        }
        let mut pos = Vec::with_capacity(seg.len());
        for (i, &s) in seg.iter().enumerate() {
            let t = i % seq;
            if s as usize > t {
                return Err(Error::shape("packed batch", format!("segment start {s} after position {t}")));
            }
            pos.push((t - s as usize) as u32);
        }
        if let Some(&p) = pos.iter().max() {
            if p as usize >= self.rope.rows() {
                return Err(Error::Invalid(format!("an example of {} tokens is longer than the {} positions prepared", p + 1, self.rope.rows())));
            }
        }
        let packing = llama::Packing { seg: ctx.upload_u32(seg, &[batch, seq])?, rope: Rc::new(RopeTables::new(ctx, &self.inv_freq, &pos)?) };
        llama::forward_loss_packed(tape, ctx, &self.cfg, &self.weights, lora, ids, targets, batch, &self.rope, Some(&packing), opts)
    }
}

/// How a run starts, besides its adapter: AdamW's hyperparameters, per-layer recomputation, and
/// the state before the first step (seed, learning-rate schedule and clipping, which then live
/// in [`TrainState`] and its checkpoints).
#[derive(Clone, Copy, Debug)]
pub struct TrainOpts {
    /// AdamW hyperparameters (lr is taken from the schedule each step).
    pub adamw: AdamW,
    /// Recompute each decoder layer in backward (less memory, same gradients).
    pub grad_checkpoint: bool,
    /// Step 0: [`TrainState::start`].
    pub start: TrainState,
}

/// A training run in memory.
pub struct Trainer {
    ctx: Rc<GpuContext>,
    model: Rc<Model>,
    /// The adapter's configuration.
    pub lora_cfg: LoraConfig,
    /// The adapter's parameters (updated in place).
    pub set: LoraSet,
    opt: LoraOptimizer,
    /// Step, RNG, data position, schedule.
    pub state: TrainState,
    grad_checkpoint: bool,
}

impl Trainer {
    /// A fresh run from an initial adapter.
    pub fn new(ctx: Rc<GpuContext>, model: Rc<Model>, lora_cfg: LoraConfig, set: LoraSet, opts: TrainOpts) -> Self {
        Trainer { ctx, model, lora_cfg, set, opt: LoraOptimizer::new(opts.adamw), state: opts.start, grad_checkpoint: opts.grad_checkpoint }
    }

    /// A run resumed from a checkpoint: the adapter, optimizer moments, step, RNG and data
    /// position come back exactly.
    pub fn resume(ctx: Rc<GpuContext>, model: Rc<Model>, ck: &Checkpoint, grad_checkpoint: bool) -> Result<Self> {
        let (lora_cfg, set, opt) = ck.restore(&ctx)?;
        Ok(Trainer { ctx, model, lora_cfg, set, opt, state: ck.state, grad_checkpoint })
    }

    /// The model.
    pub fn model(&self) -> &Rc<Model> {
        &self.model
    }

    /// One optimizer step over `micro` (gradient accumulation: the result is the step of the
    /// concatenated batch, with one mean over all its counted tokens). `data_after` is where the
    /// data stream stands once these batches are consumed (saved in checkpoints). A NaN or
    /// infinite loss returns an error and changes nothing.
    pub async fn step(&mut self, micro: &[Batch], data_after: DataPosition) -> Result<StepReport> {
        if micro.is_empty() {
            return Err(Error::Invalid("a training step needs at least one micro-batch".into()));
        }
        // Micro-batches whose activations would exceed one binding run in parts.
        let mut split = Vec::with_capacity(micro.len());
        for b in micro {
            split.extend(b.split_to_fit(&self.model.cfg, self.ctx.max_binding())?);
        }
        let micro = &split[..];
        let tokens: Vec<usize> = micro.iter().map(Batch::n_tokens).collect();
        if tokens.iter().sum::<usize>() == 0 {
            return Err(Error::Invalid(format!("step {}: no target token counts in this batch (all labels are -100)", self.state.step + 1)));
        }
        let mut rng = self.state.rng;
        let seed = rng.next_u32();
        let lr = self.state.schedule.lr(self.state.step);
        let opts = ForwardOpts { grad_checkpoint: self.grad_checkpoint, seed };
        let (ctx, model, set) = (&self.ctx, &self.model, &self.set);
        let report = train_step(
            ctx,
            set,
            &mut self.opt,
            &tokens,
            |tape, i| {
                let b = &micro[i];
                model.loss_packed(tape, ctx, set, &b.ids, &b.targets, b.batch, b.seg.as_deref(), opts)
            },
            lr,
            self.state.max_grad_norm,
        )
        .await?;
        self.state.step += 1;
        self.state.rng = rng;
        self.state.data = data_after;
        Ok(report)
    }

    /// Mean loss over every counted token of `batches` (no dropout, nothing recorded): the
    /// validation loss; perplexity is its exp.
    pub async fn eval_loss(&self, batches: &[Batch]) -> Result<f64> {
        eval_loss(&self.ctx, &self.model, &self.set, batches).await
    }

    /// [`eval_loss_with`] under the adapter being trained.
    pub async fn eval_loss_with(&self, batches: &[Batch], progress: impl FnMut(usize, usize) -> bool) -> Result<Option<f64>> {
        eval_loss_with(&self.ctx, &self.model, &self.set, batches, progress).await
    }

    /// The run's state as a checkpoint (adapter, optimizer, step, RNG, data position).
    pub async fn checkpoint(&self) -> Result<Checkpoint> {
        Checkpoint::capture(&self.ctx, &self.lora_cfg, &self.set, &self.opt, &self.state).await
    }
}

/// Token-weighted mean loss of `batches` under adapter `set` (inference: no dropout).
pub async fn eval_loss(ctx: &Rc<GpuContext>, model: &Model, set: &LoraSet, batches: &[Batch]) -> Result<f64> {
    eval_loss_with(ctx, model, set, batches, |_, _| true).await.map(|l| l.unwrap_or(f64::NAN))
}

/// [`eval_loss`] calling `progress(sequences done, sequences in all)` after each (micro-)batch;
/// it returning false abandons the evaluation (None).
pub async fn eval_loss_with(
    ctx: &Rc<GpuContext>,
    model: &Model,
    set: &LoraSet,
    batches: &[Batch],
    mut progress: impl FnMut(usize, usize) -> bool,
) -> Result<Option<f64>> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    let mut split = Vec::with_capacity(batches.len());
    for b in batches {
        split.extend(b.split_to_fit(&model.cfg, ctx.max_binding())?);
    }
    let total: usize = split.iter().map(|b| b.batch).sum();
    let mut done = 0;
    for b in &split {
        let k = b.n_tokens();
        done += b.batch;
        if k == 0 {
            if !progress(done, total) {
                return Ok(None);
            }
            continue;
        }
        let mut tape = Tape::new(false);
        let loss = model.loss_packed(&mut tape, ctx, set, &b.ids, &b.targets, b.batch, b.seg.as_deref(), ForwardOpts::default())?;
        let loss = loss.value();
        sum += ctx.read_f32(loss).await?[0] as f64 * k as f64;
        n += k;
        if !progress(done, total) {
            return Ok(None);
        }
    }
    if n == 0 {
        return Err(Error::Invalid("evaluation data has no counted target tokens".into()));
    }
    Ok(Some(sum / n as f64))
}
