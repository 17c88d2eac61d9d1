//! LoRA adapters as PEFT defines them: the configuration (`config`: PEFT's `LoraConfig`, its
//! target matching, ranks, scales and seeded initialization), PEFT's files (`peft`:
//! adapter_config.json + adapter_model.safetensors, read and written), and merging an adapter
//! into its base weights (`merge`), several adapters on one base (`named`). No shader of its own: the LoRA linear is ops::lora.
//!
//! Names: PEFT names a module by its path in the transformers model
//! (`model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.mlp.gate_proj`) and saves its
//! weights under `base_model.model.{module}.lora_A.weight` / `.lora_B.weight`; A is (r, in) and
//! B is (out, r), f32; a DoRA adapter (`use_dora`) adds `...lora_magnitude_vector` (out). The library's device form is `model::llama::LoraSet` (one optional
//! `LoraModule` per layer and projection, in `TARGETS` order); the host form is [`HostAdapter`].

pub mod config;
pub mod gguf;
pub mod init;
pub mod merge;
pub mod named;
pub mod peft;
pub mod regex;

pub use config::{InitLoraWeights, LoraConfig, TargetModules};
pub use init::{init_host_adapter, init_lora_set, kaiming_bound};
pub use named::AdapterSet;

use crate::autograd::{Param, ParamId};
use crate::gpu::GpuContext;
use crate::model::llama::{LlamaConfig, LlamaWeights, LoraModule, LoraSet};
use crate::ops::lora::LoraRun;
use crate::{Error, Result};

/// PEFT's module name of projection `m` (index into TARGETS) of layer `layer`:
/// `model.layers.{layer}.self_attn.{q,k,v,o}_proj` or `model.layers.{layer}.mlp.{gate,up,down}_proj`
/// (the model's own name, `model::config::names::proj_module`).
pub use crate::model::config::names::proj_module as module_name;

/// The key PEFT saves the A (`b` false) or B (`b` true) weight of a module under:
/// `base_model.model.{module_name}.lora_{A,B}.weight`.
pub fn peft_key(layer: usize, m: usize, b: bool) -> String {
    format!("base_model.model.{}.lora_{}.weight", module_name(layer, m), if b { "B" } else { "A" })
}

/// The key PEFT saves DoRA's magnitude of a module under in adapter_model.safetensors:
/// `base_model.model.{module_name}.lora_magnitude_vector` (its state-dict and gradient name adds
/// `.weight`).
pub fn magnitude_key(layer: usize, m: usize) -> String {
    format!("base_model.model.{}.lora_magnitude_vector", module_name(layer, m))
}

/// First id of DoRA magnitudes: ParamId(MAGNITUDE_IDS + 7·layer + m), far above every A/B id.
pub const MAGNITUDE_IDS: u64 = 1 << 40;

/// The stable id of DoRA's magnitude of projection `m` of layer `layer`.
pub fn magnitude_id(layer: usize, m: usize) -> ParamId {
    ParamId(MAGNITUDE_IDS + (7 * layer + m) as u64)
}

/// Which tensor of a module a parameter id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRole {
    /// lora_A.
    A,
    /// lora_B.
    B,
    /// DoRA's lora_magnitude_vector.
    Magnitude,
}

/// (layer, m, role) of any adapter parameter id ([`param_id`] or [`magnitude_id`]).
pub fn param_role(id: ParamId) -> (usize, usize, ParamRole) {
    if id.0 >= MAGNITUDE_IDS {
        let k = (id.0 - MAGNITUDE_IDS) as usize;
        return (k / 7, k % 7, ParamRole::Magnitude);
    }
    let (l, m, b) = param_of(id);
    (l, m, if b { ParamRole::B } else { ParamRole::A })
}

/// The PEFT file key of any adapter parameter id (A, B, or DoRA's magnitude).
pub fn param_key(id: ParamId) -> String {
    match param_role(id) {
        (l, m, ParamRole::Magnitude) => magnitude_key(l, m),
        (l, m, role) => peft_key(l, m, role == ParamRole::B),
    }
}

/// The stable id of a LoRA parameter: ParamId(2·(7·layer + m) + [b]), so ids (and the
/// optimizer state keyed by them) do not depend on which modules are targeted.
pub fn param_id(layer: usize, m: usize, b: bool) -> ParamId {
    ParamId((2 * (7 * layer + m) + b as usize) as u64)
}

/// Inverse of [`param_id`]: (layer, m, b) (for A and B ids; see [`param_role`] for all).
pub fn param_of(id: ParamId) -> (usize, usize, bool) {
    let k = id.0 as usize;
    (k / 14, (k / 2) % 7, k % 2 == 1)
}

/// One adapter on the host: A (r, in) and B (out, r), row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostLora {
    /// The rank r.
    pub r: usize,
    /// in_features of the projection.
    pub in_features: usize,
    /// out_features of the projection.
    pub out_features: usize,
    /// lora_A, (r, in).
    pub a: Vec<f32>,
    /// lora_B, (out, r).
    pub b: Vec<f32>,
    /// DoRA's magnitude (out) (`lora_magnitude_vector`); None for plain LoRA.
    pub magnitude: Option<Vec<f32>>,
}

/// An adapter on the host: its configuration and, per layer and projection (TARGETS order), the
/// optional A and B.
#[derive(Clone, Debug, PartialEq)]
pub struct HostAdapter {
    /// The configuration (PEFT's adapter_config.json).
    pub config: LoraConfig,
    /// layers[l][m]: the adapter of projection m in layer l.
    pub layers: Vec<[Option<HostLora>; 7]>,
}

impl HostAdapter {
    /// Uploads A and B (and DoRA's magnitude) of every module as trainable parameters (ids from
    /// [`param_id`], [`magnitude_id`]); each module runs with its configured scale (alpha/r or
    /// alpha/√r) and dropout. The dropout seed of each `LoraRun` is 0: the per-step seed comes
    /// from `ForwardOpts::seed`. A module without a magnitude under `use_dora` uploads without
    /// one: [`init_dora_magnitudes`] gives it its initial value from the base weights.
    pub fn upload(&self, ctx: &GpuContext) -> Result<LoraSet> {
        let mut set = LoraSet { layers: Vec::with_capacity(self.layers.len()) };
        for (l, mods) in self.layers.iter().enumerate() {
            let mut row: [Option<LoraModule>; 7] = Default::default();
            for (m, h) in mods.iter().enumerate() {
                let Some(h) = h else { continue };
                let name = module_name(l, m);
                let a = ctx.upload_f32(&h.a, &[h.r, h.in_features])?;
                let b = ctx.upload_f32(&h.b, &[h.out_features, h.r])?;
                let magnitude = match &h.magnitude {
                    Some(g) => Some(Param { id: magnitude_id(l, m), value: ctx.upload_f32(g, &[h.out_features])? }),
                    None => None,
                };
                row[m] = Some(LoraModule {
                    a: Param { id: param_id(l, m, false), value: a },
                    b: Param { id: param_id(l, m, true), value: b },
                    run: LoraRun {
                        scale: self.config.scale_for(&name),
                        dropout: self.config.lora_dropout as f32,
                        seed: 0,
                    },
                    magnitude,
                    dora_norm: None,
                });
            }
            set.layers.push(row);
        }
        Ok(set)
    }

    /// Reads every A and B of `set` back to the host (the current values on the device).
    pub async fn download(ctx: &GpuContext, config: &LoraConfig, set: &LoraSet) -> Result<HostAdapter> {
        let mut layers = Vec::with_capacity(set.layers.len());
        for mods in &set.layers {
            let mut row: [Option<HostLora>; 7] = Default::default();
            for (m, lm) in mods.iter().enumerate() {
                let Some(lm) = lm else { continue };
                let (&[r, inp], &[out, rb]) = (lm.a.value.shape(), lm.b.value.shape()) else {
                    return Err(Error::shape("lora download", format!("A {:?}, B {:?}", lm.a.value.shape(), lm.b.value.shape())));
                };
                if rb != r {
                    return Err(Error::shape("lora download", format!("A {:?}, B {:?}: ranks differ", lm.a.value.shape(), lm.b.value.shape())));
                }
                let a = ctx.read_f32(&lm.a.value).await?;
                let b = ctx.read_f32(&lm.b.value).await?;
                let magnitude = match &lm.magnitude {
                    Some(g) => Some(ctx.read_f32(&g.value).await?),
                    None => None,
                };
                row[m] = Some(HostLora { r, in_features: inp, out_features: out, a, b, magnitude });
            }
            layers.push(row);
        }
        Ok(HostAdapter { config: config.clone(), layers })
    }

    /// Checks that every module's shapes fit `model` (A (r, in), B (out, r) with (out, in) of
    /// the projection and r the configured rank) and that the data lengths match the shapes.
    pub fn check(&self, model: &LlamaConfig) -> Result<()> {
        if self.layers.len() != model.layers {
            return Err(Error::Invalid(format!("adapter has {} layers, the model {}", self.layers.len(), model.layers)));
        }
        for (l, mods) in self.layers.iter().enumerate() {
            for (m, h) in mods.iter().enumerate() {
                let Some(h) = h else { continue };
                let (out, inp) = model.proj_shape(m);
                let r = self.config.rank_for(&module_name(l, m));
                if h.r != r || h.in_features != inp || h.out_features != out || h.a.len() != r * inp || h.b.len() != out * r {
                    return Err(Error::Invalid(format!(
                        "{}: A {}x{} ({} values), B {}x{} ({} values); the model and config want A {r}x{inp}, B {out}x{r}",
                        module_name(l, m),
                        h.r,
                        h.in_features,
                        h.a.len(),
                        h.out_features,
                        h.r,
                        h.b.len()
                    )));
                }
                match (&h.magnitude, self.config.use_dora) {
                    (Some(g), true) if g.len() == out => {}
                    (Some(g), true) => {
                        return Err(Error::Invalid(format!("{}: DoRA magnitude of {} values; want {out}", module_name(l, m), g.len())))
                    }
                    (Some(_), false) => {
                        return Err(Error::Invalid(format!("{}: a DoRA magnitude, but the config's use_dora is false", module_name(l, m))))
                    }
                    (None, true) => {
                        return Err(Error::Invalid(format!("{}: use_dora is true but the module has no DoRA magnitude", module_name(l, m))))
                    }
                    (None, false) => {}
                }
            }
        }
        Ok(())
    }
}

/// DoRA: gives every module of `set` that has no magnitude yet PEFT's initial one,
/// m = ||W0 + s·B·A||_row computed on the device from the base weights `w` (so the adapted model
/// starts equal to the plain LoRA one). Nothing changes unless `cfg.use_dora`.
pub fn init_dora_magnitudes(ctx: &GpuContext, cfg: &LoraConfig, set: &mut LoraSet, w: &LlamaWeights) -> Result<()> {
    if !cfg.use_dora {
        return Ok(());
    }
    for (l, mods) in set.layers.iter_mut().enumerate() {
        for (m, lm) in mods.iter_mut().enumerate() {
            let Some(lm) = lm else { continue };
            if lm.magnitude.is_none() {
                let w0 = &w.layers.get(l).ok_or_else(|| Error::Invalid(format!("the adapter has layer {l}; the model does not")))?.proj[m];
                let norm = crate::ops::dora::weight_norm(ctx, w0, &lm.a.value, &lm.b.value, lm.run.scale)?;
                lm.magnitude = Some(Param { id: magnitude_id(l, m), value: norm });
            }
        }
    }
    Ok(())
}

