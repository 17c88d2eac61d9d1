//! The Llama decoder (Llama, SmolLM2, Mistral-style grouped-query attention) on the tape:
//! embedding -> N x [RMSNorm, attention with RoPE, residual, RMSNorm, SwiGLU MLP, residual] ->
//! RMSNorm -> lm_head (tied to the embedding or separate). Base weights are frozen; each of the
//! seven projections may carry a frozen bias (Qwen2 on q, k, v; Llama with attention_bias /
//! mlp_bias) and a LoRA adapter, applied as PEFT does: y = x·W^T + b + s·(dropout(x)·A^T)·B^T,
//! or its DoRA form (ops::dora) when the adapter carries a magnitude.
//! Optional gradient checkpointing per decoder layer.

use crate::autograd::{self, BlockFn, Param, Tape, Var};
use crate::gpu::{GpuContext, HostRows, RowShards, Tensor};
use crate::ops::lora::{self, Frozen, LoraRun};
use crate::ops::rope::{self, RopeTables};
use crate::ops::{attention, dora, embedding, head, matmul, rmsnorm, swiglu};
use crate::{Error, Result};
use std::rc::Rc;

/// The seven projections LoRA can target, in PEFT's module names.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Architecture hyperparameters (the fields of config.json the decoder needs).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// hidden_size (C).
    pub hidden: usize,
    /// intermediate_size of the MLP.
    pub intermediate: usize,
    /// num_hidden_layers.
    pub layers: usize,
    /// num_attention_heads (NH).
    pub heads: usize,
    /// num_key_value_heads (NKV).
    pub kv_heads: usize,
    /// head_dim (HS); hidden / heads unless config.json says otherwise.
    pub head_dim: usize,
    /// vocab_size (V).
    pub vocab: usize,
    /// rms_norm_eps.
    pub rms_eps: f32,
    /// rope_theta.
    pub rope_theta: f64,
    /// tie_word_embeddings: the lm_head is the embedding table.
    pub tied: bool,
    /// `sliding_window` of a model with sliding-window attention (Mistral; Qwen2 with
    /// `use_sliding_window`), None for full causal attention. The decoder does not apply the
    /// window: it attends over the full causal context, which equals the windowed attention
    /// only for sequences of at most this many tokens, so longer ones are refused
    /// ([`LlamaConfig::check_sequence`]).
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// `Error::Invalid` naming `sliding_window`, the window and the length when a sequence of
    /// `len` tokens is longer than the model's sliding window (which the decoder does not apply:
    /// it would attend farther back than the model does).
    pub fn check_sequence(&self, len: usize) -> Result<()> {
        match self.sliding_window {
            Some(w) if len > w => Err(Error::Invalid(format!(
                "a sequence of {len} tokens is longer than the model's sliding_window of {w} tokens; \
                 sliding-window attention is not implemented, so sequences are limited to {w} tokens \
                 (shorten max_len, or the prompt plus max_new_tokens)"
            ))),
            _ => Ok(()),
        }
    }

    /// Width of the widest activation a sequence's rows must hold in one binding: the hidden
    /// size or the query width (the MLP's intermediate tensors run in row chunks when they would
    /// not fit, [`mlp_chunk_rows`]; attention keeps no (T, T) scores; the output layer walks
    /// the vocabulary in chunks). One sequence of T tokens needs T x this x 4 bytes in a binding.
    pub fn activation_width(&self) -> usize {
        self.hidden.max(self.heads * self.head_dim).max(1)
    }

    /// (out, in) of projection `m` (index into TARGETS).
    pub fn proj_shape(&self, m: usize) -> (usize, usize) {
        let (c, i) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        [(q, c), (kv, c), (kv, c), (c, q), (i, c), (i, c), (c, i)][m]
    }
}

/// One decoder layer's frozen weights, each projection (out, in).
#[derive(Clone)]
pub struct LayerWeights {
    /// input_layernorm.weight (C).
    pub attn_norm: Tensor,
    /// q, k, v, o, gate, up, down projection weights (f32 or NF4), in TARGETS order.
    pub proj: [Frozen; 7],
    /// The bias (out) of each projection that has one, f32 (also when the weight is NF4, as
    /// bitsandbytes keeps it), in TARGETS order; `Default::default()` for none.
    pub bias: [Option<Tensor>; 7],
    /// post_attention_layernorm.weight (C).
    pub mlp_norm: Tensor,
}

/// The input embedding embed_tokens.weight (V, C): on the device (row-sharded when larger than
/// one binding; f32, or bf16 / f16 when the checkpoint's values are exact in it) when it is also
/// the output layer (tied), else in host memory, since only a gather of the batch's rows reads it
/// (see [`HostRows`]).
#[derive(Clone)]
pub enum InputEmbedding {
    /// On the device.
    Device(RowShards),
    /// In host memory.
    Host(Rc<HostRows>),
}

impl InputEmbedding {
    /// The device table, None when the table is in host memory.
    pub fn device(&self) -> Option<&RowShards> {
        match self {
            InputEmbedding::Device(t) => Some(t),
            InputEmbedding::Host(_) => None,
        }
    }
    /// Bytes on the device.
    pub fn device_bytes(&self) -> usize {
        self.device().map_or(0, RowShards::byte_len)
    }
    /// (V, C).
    pub fn shape(&self) -> [usize; 2] {
        match self {
            InputEmbedding::Device(t) => [t.rows(), t.cols()],
            InputEmbedding::Host(t) => [t.rows(), t.cols()],
        }
    }
    /// The rows of `ids` (N, C) in f32 on the device.
    pub fn gather(&self, ctx: &GpuContext, ids: &[u32]) -> Result<Tensor> {
        match self {
            InputEmbedding::Device(t) => embedding::forward_shards(ctx, t, ids),
            InputEmbedding::Host(t) => embedding::forward_host(ctx, t, ids),
        }
    }
}

/// The frozen base model on the device.
#[derive(Clone)]
pub struct LlamaWeights {
    /// embed_tokens.weight (V, C).
    pub embed: InputEmbedding,
    /// The decoder layers.
    pub layers: Vec<LayerWeights>,
    /// norm.weight (C).
    pub final_norm: Tensor,
    /// lm_head.weight (V, C) (stored as the embedding is); None when tied to the embedding.
    pub lm_head: Option<RowShards>,
}

impl LlamaWeights {
    /// Bytes the base model takes on the device: (projection weights, everything else: the
    /// embedding, norms, projection biases and lm_head).
    pub fn device_bytes(&self) -> (usize, usize) {
        let proj = self.layers.iter().flat_map(|l| l.proj.iter()).map(Frozen::bytes).sum();
        let norms: usize = self.layers.iter().map(|l| l.attn_norm.byte_len() + l.mlp_norm.byte_len()).sum();
        let biases: usize = self.layers.iter().flat_map(|l| l.bias.iter().flatten()).map(Tensor::byte_len).sum();
        let other = self.embed.device_bytes() + norms + biases + self.final_norm.byte_len() + self.lm_head.as_ref().map_or(0, RowShards::byte_len);
        (proj, other)
    }

    /// The output layer's weights: the lm_head, or the embedding when tied (a tied embedding is
    /// always on the device).
    pub fn head(&self) -> Result<&RowShards> {
        self.lm_head
            .as_ref()
            .or(self.embed.device())
            .ok_or_else(|| Error::Invalid("the model has no lm_head and its embedding is not on the device".into()))
    }
}

/// One adapter: A (r, in), B (out, r), and how it runs (scale, dropout, seed); with DoRA also
/// the magnitude m (out) (PEFT's `lora_magnitude_vector`).
#[derive(Clone)]
pub struct LoraModule {
    /// lora_A.
    pub a: Param,
    /// lora_B.
    pub b: Param,
    /// Scale and dropout; the seed is mixed with the step, layer and module at run time.
    pub run: LoraRun,
    /// DoRA's magnitude m (out); None for plain LoRA.
    pub magnitude: Option<Param>,
    /// DoRA only: the row norms ||W0 + s·B·A|| (out) computed once for inference while A and B
    /// do not change (generation); None: computed at every forward (training).
    pub dora_norm: Option<Tensor>,
}

/// The adapters of a model: for each layer, one optional adapter per projection (TARGETS order).
#[derive(Clone, Default)]
pub struct LoraSet {
    /// layers[l][m]: the adapter of projection m in layer l.
    pub layers: Vec<[Option<LoraModule>; 7]>,
}

impl LoraSet {
    /// Every parameter, in a stable order (layer, module, A, B, then DoRA's magnitude).
    pub fn params(&self) -> Vec<&Param> {
        let mut v = Vec::new();
        for l in &self.layers {
            for m in l.iter().flatten() {
                v.push(&m.a);
                v.push(&m.b);
                if let Some(g) = &m.magnitude {
                    v.push(g);
                }
            }
        }
        v
    }

    /// Whether any module carries a DoRA magnitude.
    pub fn is_dora(&self) -> bool {
        self.layers.iter().flatten().flatten().any(|m| m.magnitude.is_some())
    }

    /// Computes and keeps the DoRA row norms of every DoRA module for inference with fixed A and
    /// B (generation): each forward then skips the norm. Training must not call this (the norm
    /// follows A and B); [`LoraSet::clear_dora_norms`] undoes it.
    pub fn cache_dora_norms(&mut self, ctx: &GpuContext, w: &LlamaWeights) -> Result<()> {
        for (l, mods) in self.layers.iter_mut().enumerate() {
            for (m, lm) in mods.iter_mut().enumerate() {
                let Some(lm) = lm else { continue };
                if lm.magnitude.is_some() {
                    let w0 = &w.layers[l].proj[m];
                    lm.dora_norm = Some(crate::ops::dora::weight_norm(ctx, w0, &lm.a.value, &lm.b.value, lm.run.scale)?);
                }
            }
        }
        Ok(())
    }

    /// Drops the norms kept by [`LoraSet::cache_dora_norms`].
    pub fn clear_dora_norms(&mut self) {
        self.layers.iter_mut().flatten().flatten().for_each(|m| m.dora_norm = None);
    }
}

/// Options of one forward pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardOpts {
    /// Recompute each decoder layer in backward instead of keeping its activations (gradient
    /// checkpointing; `--grad-checkpoint`, `gradCheckpoint` in the browser).
    pub grad_checkpoint: bool,
    /// Mixed into every dropout seed (e.g. the optimizer step), so each step draws new masks.
    pub seed: u32,
}

/// Sequence packing inputs of one batch: segment starts `seg` (B, T) u32 (each position's example
/// start in its row, see `ops::attention::forward_packed`) and RoPE tables of the B*T position
/// ids (restarting at each example), row b*T + t for position (b, t).
#[derive(Clone)]
pub struct Packing {
    /// Segment starts (B, T).
    pub seg: Tensor,
    /// cos/sin (B*T, HS/2) of each position's id.
    pub rope: Rc<RopeTables>,
}

/// A projection's adapter leaves on the tape: A, B and DoRA's magnitude.
type LoraVars = (Var, Var, Option<Var>);

/// Rows of the MLP computed at once: all `rows` when (rows, intermediate) in f32 fits `limit`
/// bytes (one binding), else the fewest chunks that fit, balanced. At least 1.
pub fn mlp_chunk_rows(cfg: &LlamaConfig, rows: usize, limit: u64) -> usize {
    let per_row = cfg.intermediate.max(1) as u64 * 4;
    let fit = ((limit / per_row) as usize).max(1);
    if rows <= fit {
        return rows.max(1);
    }
    rows.div_ceil(rows.div_ceil(fit))
}

struct Layer {
    ctx: Rc<GpuContext>,
    /// Sequence packing (None: one example per row).
    packing: Option<Packing>,
    /// Inference: LoRA dropout off.
    inference: bool,
    cfg: LlamaConfig,
    w: LayerWeights,
    lora: [Option<LoraModule>; 7],
    rope: Rc<RopeTables>,
    batch: usize,
    seq: usize,
    seed: u32,
    index: usize,
}

impl Layer {
    /// The adapter leaves of projection m on the tape (A, B, DoRA's magnitude); None without an
    /// adapter. Made once per layer and shared by every row chunk of the MLP, so that each
    /// parameter's gradient sums its chunks in a fixed order.
    fn lora_vars(&self, tape: &mut Tape, m: usize) -> Option<LoraVars> {
        self.lora[m].as_ref().map(|l| (tape.param(&l.a), tape.param(&l.b), l.magnitude.as_ref().map(|g| tape.param(g))))
    }

    /// Projection m: x·W^T (+ bias) (+ the LoRA term).
    fn linear(&self, tape: &mut Tape, x: &Var, m: usize) -> Result<Var> {
        let vars = self.lora_vars(tape, m);
        self.linear_with(tape, x, m, vars.as_ref(), 0)
    }

    /// [`Layer::linear`] with the adapter's leaves `vars` (from [`Layer::lora_vars`]); `chunk`
    /// (row chunk of the MLP, 0 for the first or only one) is mixed into the dropout seed, so
    /// each chunk draws its own mask.
    fn linear_with(&self, tape: &mut Tape, x: &Var, m: usize, vars: Option<&LoraVars>, chunk: u32) -> Result<Var> {
        let ctx = &*self.ctx;
        let (w0, bias) = (&self.w.proj[m], self.w.bias[m].as_ref());
        match (&self.lora[m], vars) {
            (Some(l), Some((a, b, mag))) => {
                let mut seed = lora::hash32(self.seed ^ lora::hash32((self.index * 7 + m) as u32 ^ l.run.seed));
                if chunk > 0 {
                    seed = lora::hash32(seed ^ lora::hash32(chunk.wrapping_mul(0x9e37_79b9)));
                }
                let dropout = if self.inference { 0.0 } else { l.run.dropout };
                let run = LoraRun { seed, dropout, ..l.run };
                match mag {
                    Some(mag) => dora::dora_linear(tape, ctx, x, w0, bias, a, b, mag, &run, l.dora_norm.as_ref()),
                    None => lora::lora_linear_with_bias(tape, ctx, x, w0, bias, a, b, &run),
                }
            }
            _ => lora::frozen_linear_with_bias(tape, ctx, x, w0, bias),
        }
    }

    /// x (B*T, C) -> (B*T, C).
    fn forward(&self, tape: &mut Tape, x: &Var) -> Result<Var> {
        let ctx = &*self.ctx;
        let c = &self.cfg;
        let (b, t, hs) = (self.batch, self.seq, c.head_dim);
        let n1 = tape.constant(self.w.attn_norm.clone());
        let h = rmsnorm::rmsnorm(tape, ctx, x, &n1, c.rms_eps)?;
        let q = self.linear(tape, &h, 0)?.reshape(&[b, t, c.heads, hs]);
        let k = self.linear(tape, &h, 1)?.reshape(&[b, t, c.kv_heads, hs]);
        let v = self.linear(tape, &h, 2)?.reshape(&[b, t, c.kv_heads, hs]);
        let (q, k, seg) = match &self.packing {
            // Packed: (B, T) seen as one row of B*T positions, each with its own table row.
            Some(p) => {
                let q = rope::rope(tape, ctx, &q.reshape(&[1, b * t, c.heads, hs]), &p.rope)?.reshape(&[b, t, c.heads, hs]);
                let k = rope::rope(tape, ctx, &k.reshape(&[1, b * t, c.kv_heads, hs]), &p.rope)?.reshape(&[b, t, c.kv_heads, hs]);
                (q, k, Some(&p.seg))
            }
            None => (rope::rope(tape, ctx, &q, &self.rope)?, rope::rope(tape, ctx, &k, &self.rope)?, None),
        };
        let a = attention::attention_packed(tape, ctx, &q, &k, &v, seg)?.reshape(&[b * t, c.heads * hs]);
        self.finish(tape, x, &a)
    }

    /// The same layer for new tokens at positions pos0.. of one sequence, appending their keys
    /// and values to the cache (B = 1; no tape recording).
    fn forward_cached(&self, tape: &mut Tape, x: &Var, kc: &Tensor, vc: &Tensor, pos0: usize) -> Result<Var> {
        let ctx = &*self.ctx;
        let c = &self.cfg;
        let (t, hs) = (self.seq, c.head_dim);
        let n1 = tape.constant(self.w.attn_norm.clone());
        let h = rmsnorm::rmsnorm(tape, ctx, x, &n1, c.rms_eps)?;
        let q = self.linear(tape, &h, 0)?.value().reshape(&[1, t, c.heads, hs]);
        let k = self.linear(tape, &h, 1)?.value().reshape(&[1, t, c.kv_heads, hs]);
        let v = self.linear(tape, &h, 2)?;
        let q = rope::forward_rows(ctx, &q, &self.rope, pos0)?;
        let k = rope::forward_rows(ctx, &k, &self.rope, pos0)?;
        let row = c.kv_heads * hs;
        ctx.copy_region(&k, 0, kc, pos0 * row, t * row)?;
        ctx.copy_region(v.value(), 0, vc, pos0 * row, t * row)?;
        let a = attention::forward_cached(ctx, &q, kc, vc, pos0)?.reshape(&[t, c.heads * hs]);
        let a = tape.constant(a);
        self.finish(tape, x, &a)
    }

    /// o_proj, residual, and the MLP block: x (rows, C), a = attention output (rows, NH*HS).
    fn finish(&self, tape: &mut Tape, x: &Var, a: &Var) -> Result<Var> {
        let ctx = &*self.ctx;
        let c = &self.cfg;
        let o = self.linear(tape, a, 3)?;
        let x1 = autograd::add(tape, ctx, x, &o)?;
        let n2 = tape.constant(self.w.mlp_norm.clone());
        let h2 = rmsnorm::rmsnorm(tape, ctx, &x1, &n2, c.rms_eps)?;
        let vars = [4, 5, 6].map(|m| self.lora_vars(tape, m));
        let rows = h2.shape()[0];
        let chunk = mlp_chunk_rows(c, rows, self.ctx.activation_chunk_limit());
        let d = if chunk >= rows {
            self.mlp(tape, &h2, &vars, 0)?
        } else {
            // (rows, intermediate) would exceed one binding: the MLP is row-independent, so it
            // runs on row chunks (the same dot products per row; parameter gradients summed
            // chunk by chunk).
            let mut parts = Vec::with_capacity(rows.div_ceil(chunk));
            for (i, r0) in (0..rows).step_by(chunk).enumerate() {
                let hc = autograd::rows(tape, ctx, &h2, r0..(r0 + chunk).min(rows))?;
                parts.push(self.mlp(tape, &hc, &vars, i as u32)?);
            }
            autograd::concat_rows(tape, ctx, &parts)?
        };
        autograd::add(tape, ctx, &x1, &d)
    }

    /// The MLP down(swiglu(gate(h), up(h))) of h (rows, C) -> (rows, C); `vars`: the adapter
    /// leaves of gate, up and down; `chunk`: which row chunk (dropout seeds).
    fn mlp(&self, tape: &mut Tape, h: &Var, vars: &[Option<LoraVars>; 3], chunk: u32) -> Result<Var> {
        let g = self.linear_with(tape, h, 4, vars[0].as_ref(), chunk)?;
        let u = self.linear_with(tape, h, 5, vars[1].as_ref(), chunk)?;
        let s = swiglu::swiglu(tape, &self.ctx, &g, &u)?;
        self.linear_with(tape, &s, 6, vars[2].as_ref(), chunk)
    }
}

/// The final hidden states h (B*T, C) (after the final RMSNorm, the input of the output layer) of
/// the token ids (B*T, row-major by sequence) through the decoder.
#[allow(clippy::too_many_arguments)]
pub fn forward_hidden(
    tape: &mut Tape,
    ctx: &Rc<GpuContext>,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    lora: &LoraSet,
    ids: &[u32],
    batch: usize,
    rope: &Rc<RopeTables>,
    opts: ForwardOpts,
) -> Result<Var> {
    forward_hidden_packed(tape, ctx, cfg, w, lora, ids, batch, rope, None, opts)
}

/// [`forward_hidden`] of a packed batch (`packing`: segment starts and per-position RoPE tables;
/// None: one example per row).
#[allow(clippy::too_many_arguments)]
pub fn forward_hidden_packed(
    tape: &mut Tape,
    ctx: &Rc<GpuContext>,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    lora: &LoraSet,
    ids: &[u32],
    batch: usize,
    rope: &Rc<RopeTables>,
    packing: Option<&Packing>,
    opts: ForwardOpts,
) -> Result<Var> {
    if batch == 0 || ids.len() % batch != 0 {
        return Err(Error::shape("llama", format!("{} ids do not split into {batch} sequences", ids.len())));
    }
    let seq = ids.len() / batch;
    cfg.check_sequence(seq)?;
    let mut x = tape.constant(w.embed.gather(ctx, ids)?);
    for (i, lw) in w.layers.iter().enumerate() {
        let layer = Layer {
            ctx: ctx.clone(),
            packing: packing.cloned(),
            inference: !tape.is_recording(),
            cfg: cfg.clone(),
            w: lw.clone(),
            lora: lora.layers.get(i).cloned().unwrap_or_default(),
            rope: rope.clone(),
            batch,
            seq,
            seed: opts.seed,
            index: i,
        };
        x = if opts.grad_checkpoint && tape.is_recording() {
            let f: BlockFn = Rc::new(move |tape: &mut Tape, x: &Var| layer.forward(tape, x));
            tape.checkpoint(&x, f)?
        } else {
            layer.forward(tape, &x)?
        };
    }
    let nf = tape.constant(w.final_norm.clone());
    rmsnorm::rmsnorm(tape, ctx, &x, &nf, cfg.rms_eps)
}

/// Logits (B*T, V) of the token ids through the decoder. With an output layer in one buffer the
/// product is on the tape (gradients flow from the logits); a row-sharded output layer gives the
/// logits as a constant (train through [`forward_loss`], which never holds them).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    tape: &mut Tape,
    ctx: &Rc<GpuContext>,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    lora: &LoraSet,
    ids: &[u32],
    batch: usize,
    rope: &Rc<RopeTables>,
    opts: ForwardOpts,
) -> Result<Var> {
    let h = forward_hidden(tape, ctx, cfg, w, lora, ids, batch, rope, opts)?;
    let out = w.head()?;
    if out.parts().len() == 1 {
        // One buffer (f32, or 16-bit widened to f32 for the product): on the tape.
        let t = embedding::rows_f32(ctx, &out.parts()[0], 0..out.rows())?;
        let head = tape.constant(t);
        return matmul::linear(tape, ctx, &h, &head);
    }
    Ok(tape.constant(head::logits(ctx, h.value(), out)?))
}

/// The causal-LM loss (1) of the token ids against `targets` (B*T, already shifted, -100 =
/// ignored) through the decoder and the chunked output layer ([`head::loss`]): never holds the
/// logits (B*T, V), scores only counted rows.
#[allow(clippy::too_many_arguments)]
pub fn forward_loss(
    tape: &mut Tape,
    ctx: &Rc<GpuContext>,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    lora: &LoraSet,
    ids: &[u32],
    targets: &[i32],
    batch: usize,
    rope: &Rc<RopeTables>,
    opts: ForwardOpts,
) -> Result<Var> {
    forward_loss_packed(tape, ctx, cfg, w, lora, ids, targets, batch, rope, None, opts)
}

/// [`forward_loss`] of a packed batch (see [`forward_hidden_packed`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_loss_packed(
    tape: &mut Tape,
    ctx: &Rc<GpuContext>,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    lora: &LoraSet,
    ids: &[u32],
    targets: &[i32],
    batch: usize,
    rope: &Rc<RopeTables>,
    packing: Option<&Packing>,
    opts: ForwardOpts,
) -> Result<Var> {
    let h = forward_hidden_packed(tape, ctx, cfg, w, lora, ids, batch, rope, packing, opts)?;
    head::loss(tape, ctx, &h, w.head()?, targets)
}

/// Keys and values of every layer for one sequence: (max_len, NKV, HS) each, `len` filled.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    max: usize,
}

impl KvCache {
    /// An empty cache for up to `max_len` positions.
    pub fn new(ctx: &GpuContext, cfg: &LlamaConfig, max_len: usize) -> Result<Self> {
        let shape = [1, max_len, cfg.kv_heads, cfg.head_dim];
        let mk = || (0..cfg.layers).map(|_| ctx.zeros(&shape, crate::gpu::DType::F32)).collect::<Result<Vec<_>>>();
        Ok(KvCache { k: mk()?, v: mk()?, len: 0, max: max_len })
    }
    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets the cached positions (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Inference with a KV cache: feeds `ids` (new tokens of one sequence, at positions cache.len()..)
/// and returns the logits (1, V) of the last of them (the only ones generation samples from, so a
/// long prompt never needs logits (n, V)). `rope` must hold rows for every position up to the cache's
/// maximum. LoRA adapters apply without dropout.
#[allow(clippy::too_many_arguments)]
pub fn forward_cached(
    ctx: &Rc<GpuContext>,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    lora: &LoraSet,
    ids: &[u32],
    cache: &mut KvCache,
    rope: &Rc<RopeTables>,
) -> Result<Tensor> {
    let pos0 = cache.len;
    if ids.is_empty() || pos0 + ids.len() > cache.max || pos0 + ids.len() > rope.rows() {
        return Err(Error::Invalid(format!(
            "{} new tokens at position {pos0} do not fit the cache of {} positions (rope tables: {})",
            ids.len(),
            cache.max,
            rope.rows()
        )));
    }
    cfg.check_sequence(pos0 + ids.len())?;
    let mut tape = Tape::new(false);
    let mut x = tape.constant(w.embed.gather(ctx, ids)?);
    for (i, lw) in w.layers.iter().enumerate() {
        let layer = Layer {
            ctx: ctx.clone(),
            packing: None,
            inference: true,
            cfg: cfg.clone(),
            w: lw.clone(),
            lora: lora.layers.get(i).cloned().unwrap_or_default(),
            rope: rope.clone(),
            batch: 1,
            seq: ids.len(),
            seed: 0,
            index: i,
        };
        x = layer.forward_cached(&mut tape, &x, &cache.k[i], &cache.v[i], pos0)?;
    }
    cache.len += ids.len();
    // Only the last position goes through the final norm and the output layer.
    let c = cfg.hidden;
    let last = ctx.empty(&[1, c], crate::gpu::DType::F32)?;
    ctx.copy_region(x.value(), (ids.len() - 1) * c, &last, 0, c)?;
    let last = tape.constant(last);
    let nf = tape.constant(w.final_norm.clone());
    let h = rmsnorm::rmsnorm(&mut tape, ctx, &last, &nf, cfg.rms_eps)?;
    head::logits(ctx, h.value(), w.head()?)
}
