//! Tokenized data sets, the validation split, batches (padded, or packed rows) with the
//! causal-LM shift.
//!
//! [`collate`] right-pads to the longest example of the batch and shifts labels the way
//! transformers' causal-LM loss does (`target[b, t] = labels[b, t + 1]`, -100 at the last
//! position and at padding), so the model's cross-entropy scores logits row (b, t) against
//! `target[b, t]`. With causal attention and right padding, real tokens never attend to padding.
//! [`BatchSampler`] yields batches of indices: each epoch is a permutation of the examples
//! (seeded per epoch, or in file order without shuffling), cut into consecutive batches (the
//! last one smaller when the batch size does not divide the count); its [`SamplerState`]
//! (seed, epoch, position) resumes the exact sequence.

use crate::data::tokenizer::Tokenizer;
use crate::model::llama::LlamaConfig;
use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use super::*;

/// Sizes of a tokenized data set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Number of examples.
    pub examples: usize,
    /// Tokens over all examples.
    pub tokens: usize,
    /// Tokens the loss scores ([`Example::n_counted`] summed): the sum of `n_tokens` over the
    /// batches of one epoch.
    pub counted_tokens: usize,
    /// Longest example, in tokens.
    pub max_tokens: usize,
    /// Examples cut to `max_len`.
    pub truncated: usize,
    /// Examples with no scored token (e.g. a conversation whose assistant turns were all cut
    /// off by truncation): they cost compute and teach nothing.
    pub without_loss: usize,
}

/// Tokenized examples, in the order of their records.
#[derive(Clone, Debug, Default)]
pub struct TokenizedDataset {
    pub(super) examples: Vec<Example>,
    pub(super) truncated: usize,
}

impl TokenizedDataset {
    /// Wraps examples made elsewhere (none counted as truncated).
    pub fn from_examples(examples: Vec<Example>) -> Self {
        TokenizedDataset { examples, truncated: 0 }
    }

    /// The examples.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Examples, tokens, counted tokens, the longest example, how many were truncated and how
    /// many have no scored token.
    pub fn stats(&self) -> DatasetStats {
        DatasetStats {
            examples: self.examples.len(),
            tokens: self.examples.iter().map(|e| e.ids.len()).sum(),
            counted_tokens: self.examples.iter().map(Example::n_counted).sum(),
            max_tokens: self.examples.iter().map(|e| e.ids.len()).max().unwrap_or(0),
            truncated: self.truncated,
            without_loss: self.examples.iter().filter(|e| e.n_counted() == 0).count(),
        }
    }

    /// Splits off a validation set (see [`split_indices`]): (train, validation), each in the
    /// original order. The truncation count stays with neither (it describes the whole set).
    pub fn split_validation(&self, split: Split, seed: u64) -> Result<(TokenizedDataset, TokenizedDataset)> {
        let (train, val) = split_indices(self.len(), split, seed)?;
        let pick = |idx: &[usize]| TokenizedDataset::from_examples(idx.iter().map(|&i| self.examples[i].clone()).collect());
        Ok((pick(&train), pick(&val)))
    }

    /// The batch of the examples at `indices` (see [`collate`]); an index out of range is an
    /// error.
    pub fn batch(&self, indices: &[usize], pad_id: u32) -> Result<Batch> {
        let mut picked = Vec::with_capacity(indices.len());
        for &i in indices {
            picked.push(self.examples.get(i).ok_or_else(|| {
                Error::Invalid(format!("example index {i} is outside the data set of {}", self.len()))
            })?);
        }
        collate(&picked, pad_id)
    }

    /// Every example once, in order, `batch_size` at a time (the last batch smaller): how
    /// validation and evaluation sets are scored.
    pub fn batches_in_order(&self, batch_size: usize, pad_id: u32) -> Result<Vec<Batch>> {
        let bs = batch_size.max(1);
        (0..self.len()).step_by(bs).map(|i| self.batch(&(i..(i + bs).min(self.len())).collect::<Vec<_>>(), pad_id)).collect()
    }
}

/// How much of a data set [`split_indices`] holds out for validation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Split {
    /// This fraction of the examples, rounded to the nearest count, in [0, 1).
    Fraction(f64),
    /// This many examples, fewer than the data set has.
    Count(usize),
}

/// A seeded split of `0..n` into (train, validation) index lists, each sorted: the validation
/// set is the first k indices of a seeded permutation (k from `split`). At least one example
/// stays for training. The permutation's stream differs from the data order's, so the same seed
/// can serve both.
pub fn split_indices(n: usize, split: Split, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    let k = match split {
        Split::Fraction(f) if (0.0..1.0).contains(&f) => (f * n as f64).round() as usize,
        Split::Fraction(f) => return Err(Error::Invalid(format!("validation fraction {f} is not in [0, 1)"))),
        Split::Count(k) => k,
    };
    if k >= n && k > 0 {
        return Err(Error::Invalid(format!(
            "a validation set of {k} examples leaves none of the {n} for training"
        )));
    }
    let mut perm: Vec<usize> = (0..n).collect();
    SplitMix64::stream(seed, SPLIT_STREAM).shuffle(&mut perm);
    let mut val = perm[..k].to_vec();
    let mut train = perm[k..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    Ok((train, val))
}

/// The RNG stream of the validation split (epochs use streams 0, 1, 2, ...).
const SPLIT_STREAM: u64 = u64::MAX;

/// A batch for the model, the one batch type from the data set to the trainer: `ids` (B, T) and
/// `targets` (B, T) row-major, targets already shifted (`targets[b, t] = labels[b, t + 1]`, -100
/// at t = T_b − 1 and on padding), and with sequence packing the segment starts. The count of
/// scored targets is computed once, when the batch is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Token ids (B*T), right-padded with the pad id.
    pub ids: Vec<u32>,
    /// Shifted targets (B*T); -100 where nothing is scored.
    pub targets: Vec<i32>,
    /// B.
    pub batch: usize,
    /// T: the longest example (or packed row) of the batch.
    pub seq: usize,
    /// Sequence packing ([`collate_packed`]): for each position (B*T), the row offset of its
    /// example's first token (padding forms a segment of its own; position id = t − seg);
    /// None for one example per row.
    pub seg: Option<Vec<u32>>,
    n_tokens: usize,
}

impl Batch {
    /// A batch of `batch` rows from ids and shifted targets of equal length (a multiple of
    /// `batch`), and segment starts of the same length for packed rows.
    pub fn new(ids: Vec<u32>, targets: Vec<i32>, batch: usize, seg: Option<Vec<u32>>) -> Result<Batch> {
        let n = ids.len();
        if batch == 0 || n == 0 || targets.len() != n || n % batch != 0 || seg.as_ref().is_some_and(|g| g.len() != n) {
            return Err(Error::Invalid(format!(
                "a batch of {batch} rows needs ids ({n}), targets ({}) and segment starts ({}) of one length, a non-zero multiple of the rows",
                targets.len(),
                seg.as_ref().map_or("none".to_string(), |g| g.len().to_string())
            )));
        }
        let n_tokens = targets.iter().filter(|&&t| t != IGNORE).count();
        Ok(Batch { seq: n / batch, ids, targets, batch, seg, n_tokens })
    }

    /// Targets that count (not -100): the tokens the loss averages over.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Rows `r0..r1` as a batch of their own.
    pub fn rows(&self, r0: usize, r1: usize) -> Batch {
        let t = self.seq;
        let targets = self.targets[r0 * t..r1 * t].to_vec();
        let n_tokens = targets.iter().filter(|&&x| x != IGNORE).count();
        Batch {
            ids: self.ids[r0 * t..r1 * t].to_vec(),
            targets,
            batch: r1 - r0,
            seq: t,
            seg: self.seg.as_ref().map(|g| g[r0 * t..r1 * t].to_vec()),
            n_tokens,
        }
    }

    /// The batch as consecutive runs of whole sequences whose widest activation that is not
    /// chunked (one (rows, width) f32 tensor: the hidden size or the query width,
    /// `LlamaConfig::activation_width`) fits `max_binding` bytes, leaving out runs without a
    /// counted target. The MLP's wider (rows, intermediate) tensors run in row chunks inside each
    /// layer (`llama::mlp_chunk_rows`); the rest is not sharded: a batch too large for one
    /// binding is run as several micro-batches, which gives the step of the whole batch
    /// (gradient accumulation weights each by its counted tokens), and `Error::Limit` says how
    /// long a sequence may be when one sequence alone does not fit.
    pub fn split_to_fit(&self, cfg: &LlamaConfig, max_binding: u64) -> Result<Vec<Batch>> {
        let (b, t) = (self.batch, self.seq);
        let width = cfg.activation_width() as u64;
        let per_seq = t as u64 * width * 4;
        if per_seq * b as u64 <= max_binding {
            return Ok(vec![self.clone()]);
        }
        let fit = (max_binding / per_seq.max(1)) as usize;
        if fit == 0 {
            return Err(Error::Limit {
                op: "training",
                msg: format!(
                    "a sequence of {t} tokens needs activations of {per_seq} bytes ({t} x {width} x 4, the hidden or query \
                     width), over the device's largest storage binding of {max_binding} bytes; sequences of at most {} tokens \
                     fit (a smaller max length)",
                    max_binding / (width * 4)
                ),
            });
        }
        Ok((0..b).step_by(fit).map(|s0| self.rows(s0, (s0 + fit).min(b))).filter(|part| part.n_tokens > 0).collect())
    }
}

/// The padding id of a tokenizer: its pad, else its eos, else 0 (any id does: padded positions
/// are never attended to by real ones and never scored).
pub fn pad_id(tok: &Tokenizer) -> u32 {
    tok.pad_id().or(tok.eos_id()).unwrap_or(0)
}

/// Stacks examples into a batch: T = the longest, right padding with `pad_id`, targets
/// (B, T) = labels shifted left by one (transformers' causal-LM shift), -100 past each example's
/// last token. No examples, an empty example, or ids and labels of different lengths are errors.
pub fn collate(examples: &[&Example], pad_id: u32) -> Result<Batch> {
    if examples.is_empty() {
        return Err(Error::Invalid("a batch needs at least one example".into()));
    }
    for (b, e) in examples.iter().enumerate() {
        if e.ids.is_empty() || e.ids.len() != e.labels.len() {
            return Err(Error::Invalid(format!(
                "batch example {b} has {} ids and {} labels (need the same, at least one)",
                e.ids.len(),
                e.labels.len()
            )));
        }
    }
    let bsz = examples.len();
    let seq = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; bsz * seq];
    let mut targets = vec![IGNORE; bsz * seq];
    for (b, e) in examples.iter().enumerate() {
        let row = b * seq;
        ids[row..row + e.ids.len()].copy_from_slice(&e.ids);
        targets[row..row + e.labels.len() - 1].copy_from_slice(&e.labels[1..]);
    }
    Batch::new(ids, targets, bsz, None)
}

/// One row of sequence packing (TRL's padding-free packing): several whole examples
/// concatenated, with the row offset where each starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedRow {
    /// The examples' ids, one after the other.
    pub ids: Vec<u32>,
    /// Their labels, one after the other (unshifted, as in [`Example`]).
    pub labels: Vec<i32>,
    /// Row offset of each example's first token (ascending, the first is 0).
    pub starts: Vec<usize>,
}

/// Packs examples into rows of at most `max_len` tokens by best-fit decreasing (TRL's default
/// "bfd" strategy): longest example first, each into the fullest row it still fits, else a new
/// row; within a row the examples keep the order they were placed in. Examples are never split
/// (they are already cut to max_len by the encoder); a longer one is an error. Empty examples
/// are left out.
pub fn pack(examples: &[Example], max_len: usize) -> Result<Vec<PackedRow>> {
    let mut order: Vec<usize> = (0..examples.len()).filter(|&i| !examples[i].ids.is_empty()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
    let mut rows: Vec<PackedRow> = Vec::new();
    // (space left, row index) of every row with space left.
    let mut free: std::collections::BTreeSet<(usize, usize)> = std::collections::BTreeSet::new();
    for i in order {
        let e = &examples[i];
        let n = e.ids.len();
        if n > max_len || e.labels.len() != n {
            return Err(Error::Invalid(format!(
                "example {i} has {n} ids and {} labels, not at most the packing length {max_len} of each",
                e.labels.len()
            )));
        }
        let r = match free.range((n, 0)..).next().copied() {
            Some(key) => {
                free.remove(&key);
                key.1
            }
            None => {
                rows.push(PackedRow { ids: Vec::new(), labels: Vec::new(), starts: Vec::new() });
                rows.len() - 1
            }
        };
        let row = &mut rows[r];
        row.starts.push(row.ids.len());
        row.ids.extend_from_slice(&e.ids);
        row.labels.extend_from_slice(&e.labels);
        if row.ids.len() < max_len {
            free.insert((max_len - row.ids.len(), r));
        }
    }
    Ok(rows)
}

/// Stacks packed rows into a [`Batch`] with segment starts (right padding with `pad_id`;
/// targets shifted within each example, -100 at each example's last token, so every example
/// counts exactly the tokens it counts unpacked).
pub fn collate_packed(rows: &[&PackedRow], pad_id: u32) -> Result<Batch> {
    if rows.is_empty() || rows.iter().any(|r| r.ids.is_empty() || r.ids.len() != r.labels.len() || r.starts.first() != Some(&0)) {
        return Err(Error::Invalid("a packed batch needs at least one row, each non-empty with as many labels as ids".into()));
    }
    let bsz = rows.len();
    let seq = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; bsz * seq];
    let mut targets = vec![IGNORE; bsz * seq];
    let mut seg = vec![0u32; bsz * seq];
    for (b, r) in rows.iter().enumerate() {
        let row = b * seq;
        ids[row..row + r.ids.len()].copy_from_slice(&r.ids);
        let mut bounds = r.starts.clone();
        bounds.push(r.ids.len());
        for w in bounds.windows(2) {
            let (s, e) = (w[0], w[1]);
            if s >= e {
                return Err(Error::Invalid(format!("packed row {b}: example starts {:?} are not ascending", r.starts)));
            }
            targets[row + s..row + e - 1].copy_from_slice(&r.labels[s + 1..e]);
            seg[row + s..row + e].iter_mut().for_each(|x| *x = s as u32);
        }
        // Padding: a segment of its own.
        seg[row + r.ids.len()..row + seq].iter_mut().for_each(|x| *x = r.ids.len() as u32);
    }
    Batch::new(ids, targets, bsz, Some(seg))
}
