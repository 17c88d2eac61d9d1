//! Training data (CPU only, no shader): JSONL data sets, their tokenization into examples with
//! loss masks, batches with the causal-LM shift, seeded shuffling that resumes exactly, and the
//! validation split.
//!
//! The parts: `jsonl` (formats, lines to records), `encode` (records to tokens and labels),
//! `batch` (tokenized data sets, validation split, padded and packed batches), `sampler` (the
//! seeded order and its resumable position). Everything is used as `data::dataset::Name`.

mod batch;
mod encode;
mod jsonl;
mod sampler;

pub use batch::*;
pub use encode::*;
pub use jsonl::*;
pub use sampler::*;
