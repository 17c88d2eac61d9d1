//! A new adapter's initial values: PEFT's distributions (`init_lora_weights`), drawn from the
//! run's seed with one SplitMix64 stream per matrix.

use super::config::{invalid, InitLoraWeights, LoraConfig};
use super::{module_name, HostAdapter, HostLora};
use crate::gpu::GpuContext;
use crate::model::llama::{LlamaConfig, LoraSet};
use crate::rng::SplitMix64;
use crate::Result;

/// The bound 1/√fan_in of kaiming_uniform_(a=√5), torch's nn.Linear default: gain √(2/(1+5)),
/// std = gain/√fan_in, bound = √3·std = 1/√fan_in.
pub fn kaiming_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

/// A new adapter on the host for `model` under `cfg`, drawn from `seed`. Each matrix has its own
/// stream, `SplitMix64::stream(seed, 2·(7·layer + m) + [B])`, so the values of one module do not
/// depend on which others are targeted. Values are drawn in f64 and rounded to f32, row-major:
/// uniform U(lo, hi) = lo + (hi − lo)·u with u in [0, 1) from 53 bits; normal by Box–Muller.
/// The distributions are PEFT's (see [`InitLoraWeights`]); the values are not torch's.
pub fn init_host_adapter(model: &LlamaConfig, cfg: &LoraConfig, seed: u64) -> Result<HostAdapter> {
    let targets = cfg.targets(model)?;
    if cfg.init_lora_weights == InitLoraWeights::Orthogonal {
        return Err(invalid("init_lora_weights \"orthogonal\" is not implemented for new adapters (use true, false or \"gaussian\")"));
    }
    let mut layers = Vec::with_capacity(model.layers);
    for (l, t) in targets.iter().enumerate() {
        let mut row: [Option<HostLora>; 7] = Default::default();
        for m in 0..7 {
            if !t[m] {
                continue;
            }
            let (out, inp) = model.proj_shape(m);
            let r = cfg.rank_for(&module_name(l, m));
            let stream = 2 * (7 * l + m) as u64;
            let mut ra = SplitMix64::stream(seed, stream);
            let mut rb = SplitMix64::stream(seed, stream + 1);
            let ba = kaiming_bound(inp);
            let a: Vec<f32> = match cfg.init_lora_weights {
                InitLoraWeights::Gaussian => (0..r * inp).map(|_| (ra.normal() / r as f64) as f32).collect(),
                _ => (0..r * inp).map(|_| ra.uniform_in(-ba, ba) as f32).collect(),
            };
            let b: Vec<f32> = match cfg.init_lora_weights {
                InitLoraWeights::NoInit => {
                    let bb = kaiming_bound(r);
                    (0..out * r).map(|_| rb.uniform_in(-bb, bb) as f32).collect()
                }
                _ => vec![0.0; out * r],
            };
            // DoRA's magnitude needs the base weights: `super::init_dora_magnitudes` sets it.
            row[m] = Some(HostLora { r, in_features: inp, out_features: out, a, b, magnitude: None });
        }
        layers.push(row);
    }
    Ok(HostAdapter { config: cfg.clone(), layers })
}

/// A new adapter on the device (see [`init_host_adapter`] for the distributions and the RNG).
pub fn init_lora_set(ctx: &GpuContext, model: &LlamaConfig, cfg: &LoraConfig, seed: u64) -> Result<LoraSet> {
    init_host_adapter(model, cfg, seed)?.upload(ctx)
}
