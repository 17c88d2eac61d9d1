//! The output layer and its loss: logits = h · W^T with W (V, C) the lm_head or the tied embedding,
//! stored as row shards of any storage ([`RowShards`]: f32, bf16, f16), and the causal-LM
//! cross-entropy over them, without ever holding logits (N, V) at once. Drives the chunk kernels
//! of shaders/cross_entropy.wgsl, the gathers and 16-bit widening of shaders/embedding.wgsl, and
//! the f32 matmuls.
//!
//! The fused loss ([`loss`]) scores only the rows whose target counts (chat data counts about a
//! third of its tokens): those rows of h are gathered first, then the vocabulary is walked in
//! chunks (at most one shard each, and at most `CHUNK_BYTES` of logits), folding each chunk into a
//! running logsumexp. Backward turns each chunk into its gradient in place and accumulates
//! dh = Σ dlogits_chunk · W_chunk; the chunks are kept from the forward when they fit
//! `KEEP_BYTES`, else recomputed. With one f32 shard and one chunk every value equals the
//! unfused path's bit for bit (same kernels, same reduction order; tests/head.rs).

use crate::autograd::{Op, Tape, Var};
use crate::gpu::{DType, GpuContext, RowShards, Tensor};
use crate::ops::cross_entropy::{self, ChunkState, IGNORE_INDEX};
use crate::ops::embedding::{self, IdGroups};
use crate::ops::matmul::{self, Trans};
use crate::ops::rows_cols;
use crate::{Error, Result};

/// Most bytes of one logits chunk (Nc, Vc) (also bounded by the device's largest binding).
pub const CHUNK_BYTES: u64 = 256 << 20;
/// Most bytes of logits chunks kept from the forward for the backward; beyond, they are recomputed.
pub const KEEP_BYTES: u64 = 256 << 20;
/// Most bytes of one chunk's weights in f32 (Vc, C): the output layer's transient beyond its
/// logits (SmolLM2's whole embedding in f32 would be 108 MiB).
pub const WIDEN_BYTES: u64 = 32 << 20;

/// One chunk of the vocabulary: rows `local` of shard `shard`, vocabulary ids v0 ...
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    /// Index of the shard.
    pub shard: usize,
    /// Rows within the shard.
    pub local: std::ops::Range<usize>,
    /// First vocabulary id of the chunk.
    pub v0: usize,
}

/// The chunks for `rows` logits rows over `head`: each within one shard, at most `CHUNK_BYTES`
/// and the device's binding of logits (rows, Vc) f32, and at most `WIDEN_BYTES` and the binding
/// of f32 weights (Vc, C); widths are multiples of 64 unless a shard's end cuts them.
pub fn plan(ctx: &GpuContext, head: &RowShards, rows: usize) -> Vec<Chunk> {
    let cap = ctx.max_binding().min(CHUNK_BYTES);
    let by_logits = (cap / (4 * rows.max(1) as u64)) as usize;
    // The chunk's weights as f32 (widened from 16 bits, or a copy of part of an f32 shard) stay
    // within WIDEN_BYTES, for every storage type alike, so f32 and 16-bit storage of the same
    // values give the same chunks and the same results bit for bit.
    let by_widen = (ctx.max_binding().min(WIDEN_BYTES) / (4 * head.cols().max(1) as u64)) as usize;
    let mut width = by_logits.min(by_widen);
    if width >= 64 {
        width = width / 64 * 64;
    } else if width >= 4 {
        width = width / 4 * 4;
    }
    let width = width.max(1);
    let mut out = Vec::new();
    for s in 0..head.parts().len() {
        let r = head.range(s);
        let len = r.len();
        // Even split of the shard into as few chunks as the width allows.
        let pieces = len.div_ceil(width).max(1);
        let step = len.div_ceil(pieces).div_ceil(4) * 4;
        let mut a = 0;
        while a < len {
            let b = (a + step).min(len);
            out.push(Chunk { shard: s, local: a..b, v0: r.start + a });
            a = b;
        }
    }
    out
}

/// W rows of `chunk` as f32 (V_chunk, C): the shard itself when it is f32 and whole.
fn chunk_weights(ctx: &GpuContext, head: &RowShards, chunk: &Chunk) -> Result<Tensor> {
    embedding::rows_f32(ctx, &head.parts()[chunk.shard], chunk.local.clone())
}

fn check_h(op: &str, h: &[usize], head: &RowShards) -> Result<(usize, usize)> {
    let (n, c) = rows_cols(h);
    if h.is_empty() || c != head.cols() {
        return Err(Error::shape("head", format!("{op}: h {h:?} against a ({}, {}) output layer", head.rows(), head.cols())));
    }
    Ok((n, c))
}

/// Logits (…, V) = h (…, C) · W^T for inference and tests. One f32 shard: a plain NT matmul; else
/// chunk by chunk into the output (which must fit one binding: generation asks for one row).
pub fn logits(ctx: &GpuContext, h: &Tensor, head: &RowShards) -> Result<Tensor> {
    let (n, c) = check_h("logits", h.shape(), head)?;
    if let Some(w) = head.as_single_f32() {
        return matmul::x_wt(ctx, h, w);
    }
    let v = head.rows();
    let mut shape = h.shape().to_vec();
    *shape.last_mut().unwrap() = v;
    let out = ctx.empty(&shape, DType::F32)?;
    let h2 = h.reshape(&[n, c]);
    for ch in plan(ctx, head, n) {
        let w = chunk_weights(ctx, head, &ch)?;
        let part = matmul::matmul(ctx, &h2, &w, Trans::NT, 1.0)?;
        crate::ops::elementwise::put_cols(ctx, &part, &out.reshape(&[n, v]), ch.v0)?;
    }
    Ok(out)
}

/// The counted rows of `targets` (N) and their targets; checks each target is -100 or in [0, V).
fn counted(targets: &[i32], v: usize) -> Result<(Vec<u32>, Vec<i32>)> {
    cross_entropy::check_target_values(targets, v)?;
    Ok(targets.iter().enumerate().filter(|(_, &t)| t != IGNORE_INDEX).map(|(r, &t)| (r as u32, t)).unzip())
}

pub(crate) struct Saved {
    head: RowShards,
    chunks: Vec<Chunk>,
    /// Kept logits chunks (one per chunk), or empty when they are recomputed from `h_c`.
    kept: Vec<Tensor>,
    h_c: Option<Tensor>,
    rows: Vec<u32>,
    targets: Tensor,
    lse: Tensor,
    n: usize,
    count: usize,
    h_shape: Vec<usize>,
}

impl Saved {
    pub(crate) fn backward(self, ctx: &GpuContext, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if !needs[0] {
            return Ok(vec![None]);
        }
        let nc = self.rows.len();
        if nc == 0 {
            return Ok(vec![Some(ctx.zeros(&self.h_shape, DType::F32)?)]);
        }
        let mut kept = self.kept.into_iter();
        let mut dh_c: Option<Tensor> = None;
        for ch in &self.chunks {
            let w = chunk_weights(ctx, &self.head, ch)?;
            let part = match kept.next() {
                Some(t) => t,
                None => {
                    let h_c = self.h_c.as_ref().expect("h kept when chunks are recomputed");
                    matmul::matmul(ctx, h_c, &w, Trans::NT, 1.0)?
                }
            };
            cross_entropy::chunk_backward(ctx, &part, &self.targets, g, &self.lse, ch.v0, self.count)?;
            match &dh_c {
                None => dh_c = Some(matmul::matmul(ctx, &part, &w, Trans::NN, 1.0)?),
                Some(acc) => matmul::matmul_into(ctx, &part, &w, Trans::NN, 1.0, 1.0, acc)?,
            }
        }
        let dh_c = dh_c.expect("at least one chunk");
        let dh = if nc == self.n {
            dh_c
        } else {
            let groups = IdGroups { uniq: self.rows.clone(), offsets: (0..=nc as u32).collect(), pos: (0..nc as u32).collect() };
            embedding::backward_grouped(ctx, &dh_c, &groups, self.n)?
        };
        Ok(vec![Some(dh.reshape(&self.h_shape))])
    }
}

/// The causal-LM loss of the output layer on the tape: a scalar (1) = mean over rows whose target
/// is not -100 of lse(h[n] · W^T) − (h[n] · W^T)[target[n]], h (…, C) with N rows, targets (N),
/// W (V, C) frozen. Equal to `cross_entropy(linear(h, W), targets)` without its (N, V) logits;
/// backward gives dh only (the head is frozen). Count 0 gives loss 0 and a zero gradient.
pub fn loss(tape: &mut Tape, ctx: &GpuContext, h: &Var, head: &RowShards, targets: &[i32]) -> Result<Var> {
    let (n, c) = check_h("loss", h.shape(), head)?;
    if targets.len() != n {
        return Err(Error::shape("cross_entropy", format!("{} targets for h {:?} ({n} rows)", targets.len(), h.shape())));
    }
    let v = head.rows();
    let (rows, tc) = counted(targets, v)?;
    let nc = rows.len();
    let targets_t = cross_entropy::upload_targets(ctx, &tc)?;
    let rows_t = ctx.upload_u32(&rows, &[nc])?;
    let state = ChunkState::new(ctx, nc)?;
    let chunks = plan(ctx, head, nc);
    let h2 = h.value().reshape(&[n, c]);
    let h_c = if nc == n {
        h2
    } else {
        // The counted rows of h, gathered with the row indices already uploaded for the loss.
        let out = ctx.empty(&[nc, c], DType::F32)?;
        embedding::gather_into(ctx, &h2, &rows_t, &out)?;
        out
    };
    let keep = (nc * v * 4) as u64 <= KEEP_BYTES && tape.is_recording() && h.requires_grad();
    let mut kept = Vec::new();
    if nc > 0 {
        for ch in &chunks {
            let w = chunk_weights(ctx, head, ch)?;
            let part = matmul::matmul(ctx, &h_c, &w, Trans::NT, 1.0)?;
            cross_entropy::chunk_forward(ctx, &part, &targets_t, &state, ch.v0)?;
            if keep {
                kept.push(part);
            }
        }
    }
    let (loss, lse) = cross_entropy::chunk_finish(ctx, &state, &rows_t, n, nc)?;
    let h_shape = h.shape().to_vec();
    Ok(tape.record(loss, &[h], || {
        Op::Head(Saved {
            head: head.clone(),
            chunks,
            h_c: (!keep).then_some(h_c),
            kept,
            rows,
            targets: targets_t,
            lse,
            n,
            count: nc,
            h_shape,
        })
    }))
}
