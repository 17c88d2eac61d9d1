//! The reverse-mode tape. Ops record a node (what their backward needs, and the rule) only when
//! an input needs a gradient and the tape is recording; `backward` walks the nodes in reverse,
//! consuming them, so each saved activation is freed right after its last backward use.
//! Gradients are kept only for tensors on a path to a trainable parameter: frozen weights (the
//! base model, NF4 or not) get none, but the input gradient still flows through them.
//!
//! Gradient checkpointing (`Tape::checkpoint`): a block runs without recording and keeps only its
//! input; its backward re-runs the block on a sub-tape and backpropagates through that.

use crate::gpu::{GpuContext, Tensor};
use crate::ops::{self, attention, cross_entropy, dora, elementwise, embedding, head, lora, matmul, rmsnorm, rope, swiglu};
use crate::Result;
use std::collections::HashMap;
use std::rc::Rc;

/// Identifies a trainable parameter across tapes (and checkpoint sub-tapes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub u64);

/// A trainable parameter: its id and its current value on the device. The optimizer updates the
/// value in place, so a `Param` stays valid across steps.
#[derive(Clone, Debug)]
pub struct Param {
    /// Stable id: gradients are returned keyed by it.
    pub id: ParamId,
    /// The value.
    pub value: Tensor,
}

/// A value on the tape: a tensor, and whether a gradient flows back to it.
#[derive(Clone, Debug)]
pub struct Var {
    id: usize,
    value: Tensor,
    requires_grad: bool,
}

impl Var {
    /// The tensor.
    pub fn value(&self) -> &Tensor {
        &self.value
    }
    /// Its shape.
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    /// Whether a gradient flows back to it.
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }
    /// The same value with another shape (free; the tape sees one value).
    pub fn reshape(&self, shape: &[usize]) -> Var {
        Var { id: self.id, value: self.value.reshape(shape), requires_grad: self.requires_grad }
    }
}

/// What a node saves for its backward, one variant per op family: every backward rule of the
/// library is reached from the one `match` in `Op::backward`.
pub(crate) enum Op {
    Matmul(matmul::Saved),
    LoraLinear(lora::Saved),
    DoraLinear(dora::Saved),
    Nf4Linear(crate::ops::nf4::Saved),
    FrozenLinear(lora::FrozenSaved),
    RmsNorm(rmsnorm::Saved),
    Rope(rope::Saved),
    Attention(attention::Saved),
    SwiGlu(swiglu::Saved),
    Embedding(embedding::Saved),
    CrossEntropy(cross_entropy::Saved),
    Head(head::Saved),
    Add,
    AddBias,
    Rows(RowsSaved),
    ConcatRows(Vec<usize>),
    Checkpoint(CheckpointSaved),
}

/// A block function for gradient checkpointing: maps the block input to its output on `tape`.
pub type BlockFn = Rc<dyn Fn(&mut Tape, &Var) -> Result<Var>>;

/// What [`rows`] saves: the input's shape and where the rows start (elements).
pub(crate) struct RowsSaved {
    shape: Vec<usize>,
    at: usize,
}

pub(crate) struct CheckpointSaved {
    f: BlockFn,
    input: Tensor,
}

impl Op {
    /// Gradients for the node's inputs (in the order they were recorded) from the output's
    /// gradient `g`; `needs[i]` says whether input i wants one. Parameter gradients of a
    /// checkpointed block go straight into `param_grads`.
    fn backward(
        self,
        ctx: &GpuContext,
        g: &Tensor,
        needs: &[bool],
        param_grads: &mut HashMap<ParamId, Tensor>,
    ) -> Result<Vec<Option<Tensor>>> {
        match self {
            Op::Matmul(s) => s.backward(ctx, g, needs),
            Op::LoraLinear(s) => s.backward(ctx, g, needs),
            Op::DoraLinear(s) => s.backward(ctx, g, needs),
            Op::Nf4Linear(s) => s.backward(ctx, g, needs),
            Op::FrozenLinear(s) => s.backward(ctx, g, needs),
            Op::RmsNorm(s) => s.backward(ctx, g, needs),
            Op::Rope(s) => s.backward(ctx, g, needs),
            Op::Attention(s) => s.backward(ctx, g, needs),
            Op::SwiGlu(s) => s.backward(ctx, g, needs),
            Op::Embedding(s) => s.backward(ctx, g, needs),
            Op::CrossEntropy(s) => s.backward(ctx, g, needs),
            Op::Head(s) => s.backward(ctx, g, needs),
            // d(a + b) = g for each: the same tensor, shared (gradients are never updated in place).
            Op::Add => Ok(needs.iter().map(|&n| n.then(|| g.clone())).collect()),
            // d(x + bias) / dx = g; the bias is frozen and not an input of the node.
            Op::AddBias => Ok(vec![needs[0].then(|| g.clone())]),
            // The rows' gradient in place, zeros elsewhere (x + 0 = x: summing the chunks'
            // gradients of one tensor is exact).
            Op::Rows(s) => {
                if !needs[0] {
                    return Ok(vec![None]);
                }
                let dx = ctx.zeros(&s.shape, crate::gpu::DType::F32)?;
                ctx.copy_region(g, 0, &dx, s.at, g.numel())?;
                Ok(vec![Some(dx)])
            }
            // Each part's rows of g.
            Op::ConcatRows(rows) => {
                let cols = g.numel() / rows.iter().sum::<usize>().max(1);
                let mut at = 0;
                let mut out = Vec::with_capacity(rows.len());
                for (&n, &need) in rows.iter().zip(needs) {
                    out.push(if need {
                        let part = ctx.empty(&[n, cols], crate::gpu::DType::F32)?;
                        ctx.copy_region(g, at * cols, &part, 0, n * cols)?;
                        Some(part)
                    } else {
                        None
                    });
                    at += n;
                }
                Ok(out)
            }
            Op::Checkpoint(s) => {
                let mut sub = Tape::new(true);
                let x = sub.input(s.input);
                let y = (s.f)(&mut sub, &x)?;
                let (grads, mut wrt) = sub.backward_from(ctx, &y, g.clone(), &[&x])?;
                for (id, t) in grads {
                    accumulate(ctx, param_grads, id, t)?;
                }
                Ok(vec![wrt.pop().flatten()])
            }
        }
    }
}

fn accumulate<K: std::hash::Hash + Eq>(ctx: &GpuContext, map: &mut HashMap<K, Tensor>, k: K, g: Tensor) -> Result<()> {
    match map.remove(&k) {
        Some(prev) => {
            // Two consumers may have seen the value under different views: add in prev's shape.
            let sum = elementwise::add(ctx, &prev, &g.reshape(prev.shape()))?;
            map.insert(k, sum);
        }
        None => {
            map.insert(k, g);
        }
    }
    Ok(())
}

struct Node {
    out: usize,
    /// Shape of the output as the op produced it (consumers may have seen a reshaped view).
    out_shape: Vec<usize>,
    inputs: Vec<usize>,
    needs: Vec<bool>,
    op: Op,
}

/// The tape.
pub struct Tape {
    recording: bool,
    next_id: usize,
    nodes: Vec<Node>,
    params: HashMap<usize, ParamId>,
}

impl Tape {
    /// A tape; with `recording` false nothing is saved (inference, or a checkpointed block's
    /// forward).
    pub fn new(recording: bool) -> Self {
        Tape { recording, next_id: 0, nodes: Vec::new(), params: HashMap::new() }
    }

    fn fresh(&mut self) -> usize {
        self.next_id += 1;
        self.next_id
    }

    /// Whether this tape records.
    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// A trainable parameter as a leaf: its gradient is returned by `backward`.
    pub fn param(&mut self, p: &Param) -> Var {
        let id = self.fresh();
        self.params.insert(id, p.id);
        Var { id, value: p.value.clone(), requires_grad: self.recording }
    }

    /// A frozen value (input data, a base weight): no gradient.
    pub fn constant(&mut self, t: Tensor) -> Var {
        let id = self.fresh();
        Var { id, value: t, requires_grad: false }
    }

    /// A leaf whose gradient is wanted (the input of a checkpointed block).
    pub fn input(&mut self, t: Tensor) -> Var {
        let id = self.fresh();
        Var { id, value: t, requires_grad: self.recording }
    }

    /// Whether an op with these inputs must record a node.
    pub fn needs_grad(&self, inputs: &[&Var]) -> bool {
        self.recording && inputs.iter().any(|v| v.requires_grad)
    }

    /// Records the output of an op. `save` builds what backward needs; it is called only when an
    /// input needs a gradient, so nothing is kept for frozen paths.
    pub(crate) fn record(&mut self, out: Tensor, inputs: &[&Var], save: impl FnOnce() -> Op) -> Var {
        let id = self.fresh();
        let requires_grad = self.needs_grad(inputs);
        if requires_grad {
            self.nodes.push(Node {
                out: id,
                out_shape: out.shape().to_vec(),
                inputs: inputs.iter().map(|v| v.id).collect(),
                needs: inputs.iter().map(|v| v.requires_grad).collect(),
                op: save(),
            });
        }
        Var { id, value: out, requires_grad }
    }

    /// Gradient checkpointing: runs `f` on `x` without recording its inside and keeps only `x`;
    /// backward re-runs `f` on a sub-tape and gives the same gradients as recording it whole.
    pub fn checkpoint(&mut self, x: &Var, f: BlockFn) -> Result<Var> {
        let mut inner = Tape::new(false);
        let xin = inner.constant(x.value.clone());
        let y = f(&mut inner, &xin)?;
        let id = self.fresh();
        // The block's parameters live inside `f`: the output needs a gradient whenever the tape
        // records, even when `x` itself is a constant.
        if self.recording {
            self.nodes.push(Node {
                out: id,
                out_shape: y.value.shape().to_vec(),
                inputs: vec![x.id],
                needs: vec![x.requires_grad],
                op: Op::Checkpoint(CheckpointSaved { f, input: x.value.clone() }),
            });
        }
        Ok(Var { id, value: y.value, requires_grad: self.recording })
    }

    /// Backpropagates from a scalar `loss` (seed 1) and returns each parameter's gradient.
    pub fn backward(self, ctx: &GpuContext, loss: &Var) -> Result<HashMap<ParamId, Tensor>> {
        if loss.value.numel() != 1 {
            return Err(crate::Error::shape("backward", format!("loss of shape {:?} is not a scalar", loss.shape())));
        }
        let seed = ctx.upload_f32(&[1.0], loss.shape())?;
        Ok(self.backward_from(ctx, loss, seed, &[])?.0)
    }

    /// Backpropagates `seed` (the gradient of `out`) and returns the parameters' gradients and
    /// the gradients of the leaves `wrt` (None where no gradient reached one).
    pub fn backward_from(
        mut self,
        ctx: &GpuContext,
        out: &Var,
        seed: Tensor,
        wrt: &[&Var],
    ) -> Result<(HashMap<ParamId, Tensor>, Vec<Option<Tensor>>)> {
        let mut grads: HashMap<usize, Tensor> = HashMap::new();
        let mut param_grads: HashMap<ParamId, Tensor> = HashMap::new();
        grads.insert(out.id, seed);
        let keep: Vec<usize> = wrt.iter().map(|v| v.id).collect();
        while let Some(node) = self.nodes.pop() {
            let Some(g) = grads.remove(&node.out) else { continue };
            // A value's gradient has the value's element count; views share it under any shape.
            let g = g.reshape(&node.out_shape);
            let in_grads = node.op.backward(ctx, &g, &node.needs, &mut param_grads)?;
            drop(g);
            for ((id, need), gi) in node.inputs.iter().zip(&node.needs).zip(in_grads) {
                if let (true, Some(gi)) = (*need, gi) {
                    accumulate(ctx, &mut grads, *id, gi)?;
                }
            }
        }
        for (id, pid) in &self.params {
            if let Some(g) = grads.remove(id) {
                accumulate(ctx, &mut param_grads, *pid, g)?;
            }
        }
        let wrt_grads = keep.iter().map(|id| grads.remove(id)).collect();
        Ok((param_grads, wrt_grads))
    }
}

/// Residual add on the tape: out = a + b (same shape).
pub fn add(tape: &mut Tape, ctx: &GpuContext, a: &Var, b: &Var) -> Result<Var> {
    let out = ops::elementwise::add(ctx, a.value(), b.value())?;
    Ok(tape.record(out, &[a, b], || Op::Add))
}

/// A frozen bias on the tape: out (…, C) = x (…, C) + bias (C) on every row. Only x gets a
/// gradient (dx = dout); the bias is a constant (projection biases are never trained by LoRA).
pub fn add_bias(tape: &mut Tape, ctx: &GpuContext, x: &Var, bias: &Tensor) -> Result<Var> {
    let out = ops::elementwise::add_bias(ctx, x.value(), bias)?;
    Ok(tape.record(out, &[x], || Op::AddBias))
}

/// Rows `r` of x (rows, C) (f32) as a tensor (r.len(), C) of its own: with [`concat_rows`], lets a
/// row-independent block (the MLP) run a chunk of rows at a time so that its widest tensors stay
/// within one binding. Backward writes the chunk's gradient into zeros of x's shape.
pub fn rows(tape: &mut Tape, ctx: &GpuContext, x: &Var, r: std::ops::Range<usize>) -> Result<Var> {
    let shape = x.shape().to_vec();
    if shape.len() != 2 || r.start >= r.end || r.end > shape[0] || x.value().dtype() != crate::gpu::DType::F32 {
        return Err(crate::Error::shape("rows", format!("rows {r:?} of {:?} ({:?})", shape, x.value().dtype())));
    }
    let cols = shape[1];
    let out = ctx.empty(&[r.len(), cols], crate::gpu::DType::F32)?;
    ctx.copy_region(x.value(), r.start * cols, &out, 0, r.len() * cols)?;
    Ok(tape.record(out, &[x], || Op::Rows(RowsSaved { shape, at: r.start * cols })))
}

/// The row blocks `parts` (n_i, C) (f32) stacked into one tensor (Σ n_i, C); backward hands each
/// part its rows of the gradient.
pub fn concat_rows(tape: &mut Tape, ctx: &GpuContext, parts: &[Var]) -> Result<Var> {
    let cols = parts.first().map_or(0, |p| p.shape().last().copied().unwrap_or(0));
    if parts.is_empty() || parts.iter().any(|p| p.shape().len() != 2 || p.shape()[1] != cols || p.value().dtype() != crate::gpu::DType::F32) {
        let shapes: Vec<_> = parts.iter().map(|p| p.shape().to_vec()).collect();
        return Err(crate::Error::shape("concat_rows", format!("parts {shapes:?}")));
    }
    let rows: Vec<usize> = parts.iter().map(|p| p.shape()[0]).collect();
    let out = ctx.empty(&[rows.iter().sum(), cols], crate::gpu::DType::F32)?;
    let mut at = 0;
    for p in parts {
        ctx.copy_region(p.value(), 0, &out, at, p.value().numel())?;
        at += p.value().numel();
    }
    let refs: Vec<&Var> = parts.iter().collect();
    Ok(tape.record(out, &refs, || Op::ConcatRows(rows)))
}
