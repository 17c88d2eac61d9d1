//! The order of the examples: seeded per-epoch permutations in batches, and the position
//! that checkpoints store to resume exactly.

use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Where the data stream is: the epoch and the index of the next example (or micro-batch) in
/// that epoch's order (the order itself is derived from the run's seed and the epoch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Next position within the epoch.
    pub index: u64,
}

/// Where a [`BatchSampler`] stands: enough to continue the exact same sequence of batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The seed of the data order.
    pub seed: u64,
    /// The epoch of the next batch and the position of its first example in that epoch's order
    /// (what checkpoints store).
    pub at: DataPosition,
    /// The number of examples (checked on resume: a changed data set would silently change the
    /// order).
    pub n_examples: u64,
    /// Whether epochs are shuffled.
    pub shuffle: bool,
}

impl SamplerState {
    /// The position as the checkpoint stores it.
    pub fn data_position(&self) -> DataPosition {
        self.at
    }
}

/// Yields batches of example indices forever, epoch after epoch: each epoch is a permutation of
/// `0..n` (seeded by (seed, epoch); the identity without shuffling) cut into consecutive batches
/// of `batch_size` (the epoch's last batch holds the remainder).
#[derive(Clone, Debug)]
pub struct BatchSampler {
    state: SamplerState,
    batch_size: usize,
    order: Vec<usize>,
}

impl BatchSampler {
    /// A sampler at the start of epoch 0. `n` and `batch_size` must be at least 1.
    pub fn new(n: usize, batch_size: usize, shuffle: bool, seed: u64) -> Result<Self> {
        Self::resume(SamplerState { seed, at: DataPosition::default(), n_examples: n as u64, shuffle }, n, batch_size)
    }

    /// A sampler continuing from `state` over a data set of `n` examples; the batch size may
    /// differ from the saved run's. A state for another number of examples, or with a position
    /// past the end, is an error.
    pub fn resume(state: SamplerState, n: usize, batch_size: usize) -> Result<Self> {
        if n == 0 || batch_size == 0 {
            return Err(Error::Invalid(format!("batch sampler over {n} examples with batch size {batch_size}")));
        }
        if state.n_examples != n as u64 {
            return Err(Error::Invalid(format!(
                "the saved data position is for {} examples, the data set has {n}",
                state.n_examples
            )));
        }
        if state.at.index >= n as u64 {
            return Err(Error::Invalid(format!("saved data position {} is past the {n} examples", state.at.index)));
        }
        let order = epoch_order(n, state.shuffle, state.seed, state.at.epoch);
        Ok(BatchSampler { state, batch_size, order })
    }

    /// The state to save: the next call to [`BatchSampler::next_batch`] after resuming from it
    /// returns what this sampler's next call returns.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Batches per epoch: ceil(n / batch_size).
    pub fn batches_per_epoch(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// The next batch's example indices (and moves on, to the next epoch after its last batch).
    pub fn next_batch(&mut self) -> Vec<usize> {
        let n = self.order.len();
        let p = self.state.at.index as usize;
        let end = (p + self.batch_size).min(n);
        let out = self.order[p..end].to_vec();
        if end == n {
            self.state.at = DataPosition { epoch: self.state.at.epoch + 1, index: 0 };
            self.order = epoch_order(n, self.state.shuffle, self.state.seed, self.state.at.epoch);
        } else {
            self.state.at.index = end as u64;
        }
        out
    }
}

/// The order of `0..n` in `epoch`: a Fisher–Yates permutation from the project's SplitMix64,
/// stream `epoch` of `seed`, or the identity without shuffling.
pub fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        SplitMix64::stream(seed, epoch).shuffle(&mut order);
    }
    order
}
