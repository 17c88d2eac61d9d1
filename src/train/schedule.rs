//! Learning-rate schedules (no shader) with transformers' semantics
//! (`get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
//! `get_cosine_schedule_with_warmup`, each a torch `LambdaLR`): the rate of an update is
//! base_lr · λ(k), where k is the number of optimizer steps already taken (k = 0 for the first
//! update: LambdaLR applies λ(0) at construction and `scheduler.step()` after each update moves
//! to λ(k+1)). With W warmup steps and T total steps:
//! - warmup (every kind), k < W: λ(k) = k / max(1, W) (so the very first update has rate 0
//!   when W > 0, as in transformers);
//! - constant: λ(k) = 1;
//! - linear: λ(k) = max(0, (T − k) / max(1, T − W));
//! - cosine: p = (k − W) / max(1, T − W); λ(k) = max(0, ½·(1 + cos(π · 2·c · p))), c = 0.5 cycles
//!   by default (one half cosine from 1 down to 0 at k = T).
//!
//! Everything is f64, as the Python floats transformers uses.

use crate::{Error, Result};

/// The shape of a schedule after its warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// λ = 1 after warmup (transformers' "constant_with_warmup"; "constant" when W = 0).
    Constant,
    /// Linear decay to 0 at the last step ("linear", the Trainer's default).
    Linear,
    /// Cosine decay ("cosine").
    Cosine,
}

impl ScheduleKind {
    /// transformers' name of the schedule ("constant_with_warmup", "linear", "cosine").
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant_with_warmup",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }

    /// Parses transformers' `lr_scheduler_type` names: "constant", "constant_with_warmup",
    /// "linear", "cosine".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "constant" | "constant_with_warmup" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::Invalid(format!(
                "unknown learning-rate schedule {s:?} (constant, constant_with_warmup, linear, cosine)"
            ))),
        }
    }
}

/// A schedule: the kind, the base rate, warmup W and total T steps, cosine cycles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Constant, linear or cosine after the warmup.
    pub kind: ScheduleKind,
    /// The base (peak) learning rate.
    pub base_lr: f64,
    /// W: steps of linear warmup from 0.
    pub warmup_steps: u64,
    /// T: the total number of optimizer steps (the end of the decay).
    pub total_steps: u64,
    /// Cosine cycles c (transformers' `num_cycles`, default 0.5).
    pub num_cycles: f64,
}

impl Schedule {
    /// A schedule of `kind` with base rate `base_lr`, W = `warmup_steps`, T = `total_steps`,
    /// c = 0.5.
    pub fn new(kind: ScheduleKind, base_lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        Schedule { kind, base_lr, warmup_steps, total_steps, num_cycles: 0.5 }
    }

    /// W from transformers' `warmup_ratio`: ⌈ratio · T⌉.
    pub fn warmup_from_ratio(ratio: f64, total_steps: u64) -> u64 {
        (ratio * total_steps as f64).ceil() as u64
    }

    /// λ(k), the multiplier of the base rate for the update after k completed steps (see the
    /// module documentation for the formulas).
    pub fn multiplier(&self, k: u64) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if k < w {
            return k as f64 / w.max(1) as f64;
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => (0.0f64).max((t as f64 - k as f64) / t.saturating_sub(w).max(1) as f64),
            ScheduleKind::Cosine => {
                let p = (k - w) as f64 / t.saturating_sub(w).max(1) as f64;
                (0.0f64).max(0.5 * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * p).cos()))
            }
        }
    }

    /// The rate of the update after k completed steps: base_lr · λ(k).
    pub fn lr(&self, k: u64) -> f64 {
        self.base_lr * self.multiplier(k)
    }
}
