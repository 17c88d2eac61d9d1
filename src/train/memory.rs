//! The GPU memory a training run will need, planned from the shapes alone (before anything heavy
//! is loaded), so that `qlora train` can say up front what a run needs, switch per-layer
//! recomputation (gradient checkpointing) on when the plan exceeds the budget, and say what to
//! change when even that does not fit. An estimate, not a measurement: tests/memory_plan.rs holds
//! it against the buffer pool's measured peak.
//!
//! Terms (bytes; f32 = 4):
//! - base weights: NF4 projections at 0.5 byte a value plus their block statistics (4 bytes per
//!   block of 64, or 1 byte per block plus 4 per 256 blocks with double quantization), or 4 bytes
//!   a value in f32; the output layer's table (the lm_head, or the tied embedding) in its storage
//!   type (2 bytes for a 16-bit checkpoint, else 4; an untied input embedding stays in host
//!   memory), norms and biases in f32.
//! - LoRA: 16 bytes a trainable value (the value, its gradient, AdamW's two moments); with DoRA
//!   also the magnitude vectors (one value per output feature of each adapted projection).
//! - activations kept for backward, per token and decoder layer: the two RMSNorm inputs and
//!   outputs (4C), q, k, v after RoPE (Cq + 2 Ckv), the attention output (Cq), gate, up and
//!   their SwiGLU product (3I), each adapter's x·Aᵀ (r per adapted projection), with DoRA each
//!   adapted projection's pre-scaling output (its out features), and the attention row
//!   statistics (NH): with checkpointing only the layer input (C), plus one layer's full set
//!   while it is recomputed.
//! - the backward of one layer: about as much again as one layer's activations (gradients
//!   flowing through it).
//! - the output layer: its logits chunks kept for backward (at most 256 MiB) and one chunk's
//!   weights in f32 (at most 32 MiB; src/ops/head.rs).
//! - the dequantization scratch of the largest NF4 projection (at most one binding).

use crate::model::config::ModelConfig;

/// A planned run's memory, bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryPlan {
    /// The frozen base model.
    pub weights: u64,
    /// LoRA parameters, gradients and AdamW moments.
    pub lora: u64,
    /// Activations kept for backward.
    pub activations: u64,
    /// Transient: one layer's backward, the output layer's chunks, dequantization scratch.
    pub transient: u64,
    /// Whether the plan recomputes each layer in backward (gradient checkpointing).
    pub grad_checkpoint: bool,
}

impl MemoryPlan {
    /// Everything.
    pub fn total(&self) -> u64 {
        self.weights + self.lora + self.activations + self.transient
    }
}

/// What the plan needs to know about the run.
#[derive(Clone, Copy, Debug)]
pub struct RunShape {
    /// Sequences per micro-batch (B).
    pub batch: usize,
    /// Tokens per sequence (T, the maximum length).
    pub seq: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Adapted projections per layer (0..=7).
    pub adapted: usize,
    /// NF4 projections (QLoRA) and whether with double quantization; None for f32.
    pub nf4: Option<bool>,
    /// Bytes per value of the embedding and lm_head (2 for a 16-bit checkpoint, else 4).
    pub table_bytes: usize,
    /// DoRA: a magnitude per output feature of each adapted projection (trained), and its
    /// pre-scaling output kept for backward.
    pub dora: bool,
}

/// The plan for `cfg` run as `run`, with or without per-layer recomputation.
pub fn plan(cfg: &ModelConfig, run: &RunShape, grad_checkpoint: bool) -> MemoryPlan {
    let lc = cfg.to_llama();
    let (c, i, l) = (lc.hidden as u64, lc.intermediate as u64, lc.layers as u64);
    let cq = (lc.heads * lc.head_dim) as u64;
    let ckv = (lc.kv_heads * lc.head_dim) as u64;
    let v = lc.vocab as u64;
    let proj_values: u64 = (0..7).map(|m| lc.proj_shape(m)).map(|(o, n)| (o * n) as u64).sum::<u64>() * l;
    let proj_bytes = match run.nf4 {
        None => 4 * proj_values,
        Some(false) => proj_values / 2 + 4 * proj_values.div_ceil(64),
        Some(true) => proj_values / 2 + proj_values.div_ceil(64) + 4 * proj_values.div_ceil(64 * 256),
    };
    // The output layer's table; an untied input embedding stays in host memory.
    let tables = v * c * run.table_bytes as u64;
    let small = 4 * (2 * c * l + c + (cq + 2 * ckv) * l);
    let weights = proj_bytes + tables + small;
    let lora_values: u64 = (0..run.adapted.min(7)).map(|m| lc.proj_shape(m)).map(|(o, n)| ((o + n) * run.rank) as u64).sum::<u64>() * l;
    // DoRA's magnitude vectors: one value per output feature of each adapted projection.
    let dora_out: u64 = if run.dora { (0..run.adapted.min(7)).map(|m| lc.proj_shape(m).0 as u64).sum() } else { 0 };
    let lora = 16 * (lora_values + dora_out * l);
    let tokens = (run.batch * run.seq) as u64;
    let per_layer_token = 4 * (4 * c + 2 * cq + 2 * ckv + 3 * i + (run.adapted * run.rank) as u64 + lc.heads as u64 + dora_out);
    let layer = tokens * per_layer_token;
    let activations = if grad_checkpoint { tokens * 4 * c * l + layer } else { layer * l };
    let widened = (v * c * 4).min(crate::ops::head::WIDEN_BYTES);
    let head = (tokens * v * 4).min(crate::ops::head::KEEP_BYTES) + widened + tokens * c * 8;
    let largest = (0..7).map(|m| lc.proj_shape(m)).map(|(o, n)| (o * n) as u64).max().unwrap_or(0);
    let scratch = if run.nf4.is_some() { 4 * largest } else { 0 };
    let transient = layer + head + scratch;
    MemoryPlan { weights, lora, activations, transient, grad_checkpoint }
}

/// The plan without recomputation when it fits `budget`, else with it; `Err` with the smallest
/// plan and a message saying what would fit when neither does.
pub fn choose(cfg: &ModelConfig, run: &RunShape, budget: u64, force_checkpoint: bool) -> Result<MemoryPlan, String> {
    let plain = plan(cfg, run, force_checkpoint);
    if plain.total() <= budget {
        return Ok(plain);
    }
    let ck = plan(cfg, run, true);
    if ck.total() <= budget {
        return Ok(ck);
    }
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    let mut hints = Vec::new();
    let fixed = ck.weights + ck.lora;
    if fixed > budget {
        hints.push(format!("the base model and adapter alone need {}", gib(fixed)));
        if run.nf4.is_none() {
            hints.push("--qlora holds the projections in 4 bits".into());
        }
    } else {
        // Largest batch x length with recomputation that fits.
        let mut fit = None;
        for b in (1..=run.batch).rev() {
            let r = RunShape { batch: b, ..*run };
            if plan(cfg, &r, true).total() <= budget {
                fit = Some(format!("--batch-size {b} (with --grad-accum to keep the effective batch)"));
                break;
            }
        }
        if fit.is_none() {
            let mut t = run.seq;
            while t > 16 {
                t /= 2;
                if plan(cfg, &RunShape { batch: 1, seq: t, ..*run }, true).total() <= budget {
                    fit = Some(format!("--batch-size 1 --max-len {t}"));
                    break;
                }
            }
        }
        hints.push(fit.unwrap_or_else(|| "a smaller --max-len or rank".into()));
    }
    Err(format!(
        "the run needs about {} of GPU memory with per-layer recomputation ({} without), over the budget of {} (--max-memory): {}",
        gib(ck.total()),
        gib(plain.total()),
        gib(budget),
        hints.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recomputation_is_chosen_only_when_needed() {
        let cfg = crate::model::arch::config("smollm2-135m").unwrap();
        let run = RunShape { batch: 4, seq: 512, rank: 16, adapted: 7, nf4: Some(true), table_bytes: 2, dora: false };
        let p = plan(&cfg, &run, false);
        let c = plan(&cfg, &run, true);
        assert!(c.activations < p.activations / 5, "{c:?} vs {p:?}");
        assert_eq!(choose(&cfg, &run, p.total(), false).unwrap(), p);
        assert_eq!(choose(&cfg, &run, p.total() - 1, false).unwrap(), c);
        let e = choose(&cfg, &run, c.total() - 1, false).unwrap_err();
        assert!(e.contains("--batch-size"), "{e}");
        let e = choose(&cfg, &run, 1 << 20, false).unwrap_err();
        assert!(e.contains("base model and adapter alone"), "{e}");
    }
}
