//! Training checkpoints (no shader): everything a run needs to continue exactly where it stopped.
//! A checkpoint folder holds
//! - `adapter_config.json`, `adapter_model.safetensors`: the adapter, as PEFT writes it (so a
//!   checkpoint is also a usable adapter);
//! - `optimizer.safetensors`: AdamW's moments, `{peft key}.exp_avg` and `{peft key}.exp_avg_sq`
//!   (f32, the parameter's shape), for every parameter updated so far (DoRA's magnitudes under
//!   `...lora_magnitude_vector`);
//! - `trainer_state.json`: the step, the run's RNG state, the data position, the schedule, the
//!   AdamW hyperparameters and the per-parameter step counts. Every f64 is stored twice: as a
//!   JSON number to read, and as its exact bits (`*_bits`, hex) that loading uses, so a resumed
//!   run computes with the very same numbers.
//!
//! The core works on bytes (`Checkpoint::to_files`, `Checkpoint::from_files`); `save_checkpoint`
//! (native) writes all files into `{dir}.tmp`, syncs them, and renames the folder into place
//! (an old `dir` is first renamed to `{dir}.old` and removed at the end), so `dir` is always
//! either the previous complete checkpoint or the new one; `load_checkpoint` falls back to
//! `{dir}.old` when a crash hit between the two renames.

use super::optim::{LoraOptimizer, Moments};
use super::schedule::{Schedule, ScheduleKind};
use crate::data::dataset::DataPosition;
use crate::rng::SplitMix64;
use crate::autograd::ParamId;
use crate::gpu::GpuContext;
use crate::lora::peft::{host_adapter_from_bytes, host_adapter_to_bytes, CONFIG_FILE, WEIGHTS_FILE};
use crate::lora::{magnitude_id, param_id, param_key, param_role, HostAdapter, LoraConfig, ParamRole};
use crate::model::llama::{LlamaConfig, LoraSet};
use crate::ops::adamw::AdamW;
use crate::io::safetensors_write::{serialize_tensors, RawTensor};
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};

/// The optimizer-state file of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer-state file of a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// Version of the trainer_state.json layout.
pub const STATE_VERSION: u64 = 1;
/// The most optimizer steps a run may have (also `session::bounds::MAX_STEPS`).
pub const MAX_STEPS: u64 = 100_000_000;
/// The manifest of a checkpoint folder: the SHA-256 of every other file and the settings that
/// determine the run (`{"version": 1, "files": {name: hex}, "settings": {...}}`), written last.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest (see [`MANIFEST_FILE`]) of checkpoint `files`, recording `settings` (the caller's
/// description of the run, e.g. the command line's settings; `null` when none).
pub fn manifest_bytes(files: &[(String, Vec<u8>)], settings: &Value) -> Vec<u8> {
    let digests: Map<String, Value> = files
        .iter()
        .map(|(n, b)| (n.clone(), Value::from(crate::io::sha256::hex(&crate::io::sha256::sha256(b)))))
        .collect();
    let mut o = Map::new();
    o.insert("version".into(), Value::from(1));
    o.insert("files".into(), Value::Object(digests));
    o.insert("settings".into(), settings.clone());
    let mut text = serde_json::to_string_pretty(&Value::Object(o)).expect("a JSON value always serializes");
    text.push('\n');
    text.into_bytes()
}

/// Checks `files` against `manifest` (the bytes of [`MANIFEST_FILE`]): every file listed with
/// the SHA-256 recorded for it and no other. Returns the recorded settings. `source` names the
/// checkpoint in errors, which name the file that differs.
pub fn verify_manifest(files: &[(String, Vec<u8>)], manifest: &[u8], source: &str) -> Result<Value> {
    let mfile = format!("{source}/{MANIFEST_FILE}");
    let v: Value = serde_json::from_slice(manifest).map_err(|e| Error::format(&mfile, format!("not valid JSON: {e}")))?;
    let digests = v.get("files").and_then(Value::as_object).ok_or_else(|| Error::format(&mfile, "missing object `files`"))?;
    for (name, bytes) in files {
        let got = crate::io::sha256::hex(&crate::io::sha256::sha256(bytes));
        match digests.get(name).and_then(Value::as_str) {
            Some(want) if want == got => {}
            Some(want) => {
                return Err(Error::format(
                    format!("{source}/{name}"),
                    format!(
                        "SHA-256 {got} differs from the {} recorded in {MANIFEST_FILE} when the checkpoint was written: the file was changed or corrupted; refusing to resume from it",
                        crate::error::quote(want)
                    ),
                ))
            }
            None => return Err(Error::format(&mfile, format!("no SHA-256 recorded for {name}"))),
        }
    }
    if digests.len() != files.len() {
        return Err(Error::format(&mfile, format!("lists {} files, the checkpoint holds {}", digests.len(), files.len())));
    }
    Ok(v.get("settings").cloned().unwrap_or(Value::Null))
}

/// The trainer's own state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The run's RNG (data order, dropout seeds), as it is after `step` steps.
    pub rng: SplitMix64,
    /// The data position after `step` steps.
    pub data: DataPosition,
    /// The learning-rate schedule (a pure function of the step, so this is all its state).
    pub schedule: Schedule,
    /// Gradient clipping threshold, if any.
    pub max_grad_norm: Option<f32>,
}

impl TrainState {
    /// The state before the first step of a run: its RNG from `seed` (data order, dropout
    /// seeds), the schedule and the clipping threshold, at the start of the data.
    pub fn start(seed: u64, schedule: Schedule, max_grad_norm: Option<f32>) -> TrainState {
        TrainState { step: 0, rng: SplitMix64::new(seed), data: DataPosition::default(), schedule, max_grad_norm }
    }
}

/// The optimizer state on the host: hyperparameters, steps taken, and per parameter (m, v, t).
#[derive(Clone, Debug, PartialEq)]
pub struct HostOptimizer {
    /// AdamW hyperparameters.
    pub hp: AdamW,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Per parameter id: (exp_avg, exp_avg_sq, t), values in the parameter's row-major order.
    pub moments: BTreeMap<ParamId, (Vec<f32>, Vec<f32>, u64)>,
}

/// A complete checkpoint on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The adapter (configuration and weights).
    pub adapter: HostAdapter,
    /// The optimizer state.
    pub optimizer: HostOptimizer,
    /// The trainer state.
    pub state: TrainState,
}

fn put_f64(o: &mut Map<String, Value>, k: &str, x: f64) {
    o.insert(k.into(), Value::from(x));
    o.insert(format!("{k}_bits"), Value::from(format!("{:016x}", x.to_bits())));
}

fn get_f64(o: &Map<String, Value>, k: &str, file: &str) -> Result<f64> {
    if let Some(b) = o.get(&format!("{k}_bits")) {
        let s = b.as_str().ok_or_else(|| Error::format(file, format!("{k}_bits is not a hex string")))?;
        let bits = u64::from_str_radix(s, 16).map_err(|_| Error::format(file, format!("{k}_bits {s:?} is not 16 hex digits")))?;
        return Ok(f64::from_bits(bits));
    }
    o.get(k).and_then(Value::as_f64).ok_or_else(|| Error::format(file, format!("missing number {k}")))
}

fn get_u64(o: &Map<String, Value>, k: &str, file: &str) -> Result<u64> {
    o.get(k).and_then(Value::as_u64).ok_or_else(|| Error::format(file, format!("missing or bad integer {k}")))
}

fn get_obj<'a>(o: &'a Map<String, Value>, k: &str, file: &str) -> Result<&'a Map<String, Value>> {
    o.get(k).and_then(Value::as_object).ok_or_else(|| Error::format(file, format!("missing object {k}")))
}

impl Checkpoint {
    /// Reads the adapter and optimizer state back from the device and bundles them with `state`.
    pub async fn capture(ctx: &GpuContext, cfg: &LoraConfig, set: &LoraSet, opt: &LoraOptimizer, state: &TrainState) -> Result<Checkpoint> {
        let adapter = HostAdapter::download(ctx, cfg, set).await?;
        let mut moments = BTreeMap::new();
        for (id, st) in opt.state() {
            let m = ctx.read_f32(&st.m).await?;
            let v = ctx.read_f32(&st.v).await?;
            moments.insert(*id, (m, v, st.t));
        }
        Ok(Checkpoint { adapter, optimizer: HostOptimizer { hp: opt.hp, steps: opt.step_count(), moments }, state: *state })
    }

    /// Puts the adapter and the optimizer back on the device: (config, set, optimizer).
    pub fn restore(&self, ctx: &GpuContext) -> Result<(LoraConfig, LoraSet, LoraOptimizer)> {
        let set = self.adapter.upload(ctx)?;
        let params = set.params();
        let mut state = BTreeMap::new();
        for (id, (m, v, t)) in &self.optimizer.moments {
            let p = params
                .iter()
                .find(|p| p.id == *id)
                .ok_or_else(|| Error::Invalid(format!("checkpoint: optimizer state for {id:?}, which the adapter does not hold")))?;
            let shape = p.value.shape();
            state.insert(*id, Moments { m: ctx.upload_f32(m, shape)?, v: ctx.upload_f32(v, shape)?, t: *t });
        }
        let opt = LoraOptimizer::from_state(self.optimizer.hp, state, self.optimizer.steps);
        Ok((self.adapter.config.clone(), set, opt))
    }

    /// The checkpoint's files as (name, bytes), for `model`.
    pub fn to_files(&self, model: &LlamaConfig) -> Result<Vec<(String, Vec<u8>)>> {
        let (cfg_json, weights) = host_adapter_to_bytes(&self.adapter, model)?;
        let mut raw = Vec::new();
        let mut param_steps = Map::new();
        for (id, (m, v, t)) in &self.optimizer.moments {
            let (l, mi, role) = param_role(*id);
            let key = param_key(*id);
            let h = self.adapter.layers.get(l).and_then(|r| r[mi].as_ref()).ok_or_else(|| {
                Error::Invalid(format!("checkpoint: optimizer state for {key}, which the adapter does not hold"))
            })?;
            let shape = match role {
                ParamRole::A => vec![h.r, h.in_features],
                ParamRole::B => vec![h.out_features, h.r],
                ParamRole::Magnitude => vec![h.out_features],
            };
            if m.len() != shape.iter().product::<usize>() || v.len() != m.len() {
                return Err(Error::shape("checkpoint", format!("moments of {key} have {} and {} values for shape {shape:?}", m.len(), v.len())));
            }
            for (suffix, data) in [("exp_avg", m), ("exp_avg_sq", v)] {
                raw.push(RawTensor {
                    name: format!("{key}.{suffix}"),
                    dtype: safetensors::Dtype::F32,
                    shape: shape.clone(),
                    data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                });
            }
            param_steps.insert(key, Value::from(*t));
        }
        let meta = HashMap::from([("format".to_string(), "qlora-webgpu-adamw".to_string())]);
        let optim = serialize_tensors(&raw, Some(meta))?;

        let s = &self.state;
        let mut o = Map::new();
        o.insert("version".into(), Value::from(STATE_VERSION));
        o.insert("step".into(), Value::from(s.step));
        o.insert("rng_state".into(), Value::from(format!("{:016x}", s.rng.state)));
        let mut d = Map::new();
        d.insert("epoch".into(), Value::from(s.data.epoch));
        d.insert("index".into(), Value::from(s.data.index));
        o.insert("data".into(), Value::Object(d));
        let mut sc = Map::new();
        sc.insert("kind".into(), Value::from(s.schedule.kind.name()));
        put_f64(&mut sc, "base_lr", s.schedule.base_lr);
        sc.insert("warmup_steps".into(), Value::from(s.schedule.warmup_steps));
        sc.insert("total_steps".into(), Value::from(s.schedule.total_steps));
        put_f64(&mut sc, "num_cycles", s.schedule.num_cycles);
        o.insert("schedule".into(), Value::Object(sc));
        match s.max_grad_norm {
            Some(x) => {
                o.insert("max_grad_norm".into(), Value::from(x as f64));
                o.insert("max_grad_norm_bits".into(), Value::from(format!("{:08x}", x.to_bits())));
            }
            None => {
                o.insert("max_grad_norm".into(), Value::Null);
            }
        }
        let hp = &self.optimizer.hp;
        let mut a = Map::new();
        put_f64(&mut a, "lr", hp.lr);
        put_f64(&mut a, "beta1", hp.beta1);
        put_f64(&mut a, "beta2", hp.beta2);
        put_f64(&mut a, "eps", hp.eps);
        put_f64(&mut a, "weight_decay", hp.weight_decay);
        a.insert("steps".into(), Value::from(self.optimizer.steps));
        a.insert("param_steps".into(), Value::Object(param_steps));
        o.insert("adamw".into(), Value::Object(a));
        let mut text = serde_json::to_string_pretty(&Value::Object(o)).expect("a JSON value always serializes");
        text.push('\n');

        Ok(vec![
            (WEIGHTS_FILE.to_string(), weights),
            (CONFIG_FILE.to_string(), cfg_json.into_bytes()),
            (OPTIMIZER_FILE.to_string(), optim),
            (STATE_FILE.to_string(), text.into_bytes()),
        ])
    }

    /// Reads a checkpoint from its files ((name, bytes); all four must be present) for `model`;
    /// `source` names the checkpoint in errors. Checks every tensor's name, dtype and shape.
    pub fn from_files(files: &[(String, Vec<u8>)], model: &LlamaConfig, source: &str) -> Result<Checkpoint> {
        let get = |name: &str| -> Result<&[u8]> {
            files
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| b.as_slice())
                .ok_or_else(|| Error::format(format!("{source}/{name}"), "missing from the checkpoint"))
        };
        let cfg_text = std::str::from_utf8(get(CONFIG_FILE)?).map_err(|_| Error::format(format!("{source}/{CONFIG_FILE}"), "not UTF-8 text"))?;
        let adapter = host_adapter_from_bytes(cfg_text, get(WEIGHTS_FILE)?, model, source)?;

        let sfile = format!("{source}/{STATE_FILE}");
        let sv: Value = serde_json::from_slice(get(STATE_FILE)?).map_err(|e| Error::format(&sfile, format!("not valid JSON: {e}")))?;
        let o = sv.as_object().ok_or_else(|| Error::format(&sfile, "not a JSON object"))?;
        let version = get_u64(o, "version", &sfile)?;
        if version != STATE_VERSION {
            return Err(Error::format(&sfile, format!("version {version}; this build reads version {STATE_VERSION}")));
        }
        let rng_hex = o.get("rng_state").and_then(Value::as_str).ok_or_else(|| Error::format(&sfile, "missing rng_state"))?;
        let rng = u64::from_str_radix(rng_hex, 16).map_err(|_| Error::format(&sfile, format!("rng_state {rng_hex:?} is not hex")))?;
        let d = get_obj(o, "data", &sfile)?;
        let sc = get_obj(o, "schedule", &sfile)?;
        let kind = ScheduleKind::parse(sc.get("kind").and_then(Value::as_str).unwrap_or("")).map_err(|e| Error::format(&sfile, e.to_string()))?;
        let schedule = Schedule {
            kind,
            base_lr: get_f64(sc, "base_lr", &sfile)?,
            warmup_steps: get_u64(sc, "warmup_steps", &sfile)?,
            total_steps: get_u64(sc, "total_steps", &sfile)?,
            num_cycles: get_f64(sc, "num_cycles", &sfile)?,
        };
        let max_grad_norm = match o.get("max_grad_norm_bits").and_then(Value::as_str) {
            Some(h) => Some(f32::from_bits(
                u32::from_str_radix(h, 16).map_err(|_| Error::format(&sfile, format!("max_grad_norm_bits {h:?} is not hex")))?,
            )),
            None => o.get("max_grad_norm").and_then(Value::as_f64).map(|x| x as f32),
        };
        let step = get_u64(o, "step", &sfile)?;
        let state = TrainState {
            step,
            rng: SplitMix64 { state: rng },
            data: DataPosition { epoch: get_u64(d, "epoch", &sfile)?, index: get_u64(d, "index", &sfile)? },
            schedule,
            max_grad_norm,
        };
        let a = get_obj(o, "adamw", &sfile)?;
        let hp = AdamW {
            lr: get_f64(a, "lr", &sfile)?,
            beta1: get_f64(a, "beta1", &sfile)?,
            beta2: get_f64(a, "beta2", &sfile)?,
            eps: get_f64(a, "eps", &sfile)?,
            weight_decay: get_f64(a, "weight_decay", &sfile)?,
        };
        let steps = get_u64(a, "steps", &sfile)?;
        let param_steps = get_obj(a, "param_steps", &sfile)?;
        // The state must be one a run can be in (checked before anything is sized from it).
        let mut bad = Vec::new();
        if step == 0 {
            bad.push("step is 0 (a checkpoint is written after a step)".to_owned());
        }
        if steps != step {
            bad.push(format!("adamw.steps {steps} differs from step {step}"));
        }
        if schedule.total_steps < step || schedule.total_steps > MAX_STEPS {
            bad.push(format!("schedule.total_steps {} is not in {step}..={}", schedule.total_steps, MAX_STEPS));
        }
        if schedule.warmup_steps > schedule.total_steps {
            bad.push(format!("schedule.warmup_steps {} exceeds total_steps {}", schedule.warmup_steps, schedule.total_steps));
        }
        if schedule.base_lr.to_bits() != hp.lr.to_bits() {
            bad.push(format!("schedule.base_lr {} differs from adamw.lr {}", schedule.base_lr, hp.lr));
        }
        for (x, what) in [(hp.lr, "adamw.lr"), (hp.beta1, "adamw.beta1"), (hp.beta2, "adamw.beta2"), (hp.eps, "adamw.eps"), (hp.weight_decay, "adamw.weight_decay")] {
            if !(x.is_finite() && x >= 0.0) {
                bad.push(format!("{what} {x} is not a finite number >= 0"));
            }
        }
        if let Some(g) = max_grad_norm.filter(|g| !(g.is_finite() && *g > 0.0)) {
            bad.push(format!("max_grad_norm {g} is not positive"));
        }
        for (k, t) in param_steps {
            if !t.as_u64().is_some_and(|t| t >= 1 && t <= step) {
                bad.push(format!("param_steps[{k}] {t} is not in 1..={step}"));
            }
        }
        if !bad.is_empty() {
            bad.truncate(5);
            return Err(Error::format(&sfile, format!("not a state a run can be in: {}", bad.join("; "))));
        }

        let ofile = format!("{source}/{OPTIMIZER_FILE}");
        let ost = safetensors::SafeTensors::deserialize(get(OPTIMIZER_FILE)?)
            .map_err(|e| Error::format(&ofile, format!("not a valid safetensors file: {e}")))?;
        let mut moments = BTreeMap::new();
        let mut seen = 0;
        for (l, mods) in adapter.layers.iter().enumerate() {
            for (m, h) in mods.iter().enumerate() {
                let Some(h) = h else { continue };
                let ids = [param_id(l, m, false), param_id(l, m, true), magnitude_id(l, m)];
                for id in ids {
                    let key = param_key(id);
                    let Some(t) = param_steps.get(&key) else { continue };
                    let t = t.as_u64().ok_or_else(|| Error::format(&sfile, format!("param_steps[{key}] is not an integer")))?;
                    let shape: Vec<usize> = match param_role(id).2 {
                        ParamRole::A => vec![h.r, h.in_features],
                        ParamRole::B => vec![h.out_features, h.r],
                        ParamRole::Magnitude => vec![h.out_features],
                    };
                    let mut read = |suffix: &str| -> Result<Vec<f32>> {
                        let name = format!("{key}.{suffix}");
                        let view = ost.tensor(&name).map_err(|_| Error::format(&ofile, format!("missing tensor {name}")))?;
                        if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape {
                            return Err(Error::format(
                                &ofile,
                                format!("tensor {name}: {:?} {:?}, want F32 {shape:?}", view.dtype(), view.shape()),
                            ));
                        }
                        seen += 1;
                        Ok(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
                    };
                    let mv = read("exp_avg")?;
                    let vv = read("exp_avg_sq")?;
                    moments.insert(id, (mv, vv, t));
                }
            }
        }
        if seen != ost.len() || moments.len() != param_steps.len() {
            return Err(Error::format(
                &ofile,
                format!(
                    "holds {} tensors and {STATE_FILE} {} step counts, of which {} match the adapter's parameters",
                    ost.len(),
                    param_steps.len(),
                    moments.len()
                ),
            ));
        }
        Ok(Checkpoint { adapter, optimizer: HostOptimizer { hp, steps, moments }, state })
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn sibling(dir: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    std::path::PathBuf::from(s)
}

/// Writes the checkpoint into the folder `dir` atomically (native shell; see the module
/// documentation for the temporary-folder-and-rename protocol).
#[cfg(not(target_arch = "wasm32"))]
pub fn save_checkpoint(dir: &std::path::Path, ck: &Checkpoint, model: &LlamaConfig) -> Result<()> {
    save_checkpoint_with(dir, ck, model, &Value::Null)
}

/// [`save_checkpoint`], recording `settings` (the settings that determine the run) in the
/// manifest next to the SHA-256 of every file; [`load_checkpoint_with`] gives them back.
#[cfg(not(target_arch = "wasm32"))]
pub fn save_checkpoint_with(dir: &std::path::Path, ck: &Checkpoint, model: &LlamaConfig, settings: &Value) -> Result<()> {
    use std::io::Write;
    let mut files = ck.to_files(model)?;
    let manifest = manifest_bytes(&files, settings);
    // Written last: a folder with a manifest is complete.
    files.push((MANIFEST_FILE.to_string(), manifest));
    let io = |p: &std::path::Path, what: &str, e: std::io::Error| Error::format(p.display().to_string(), format!("{what}: {e}"));
    let tmp = sibling(dir, ".tmp");
    let old = sibling(dir, ".old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, "remove stale temporary folder", e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, "create folder", e))?;
    for (name, bytes) in &files {
        let p = tmp.join(name);
        let mut f = std::fs::File::create(&p).map_err(|e| io(&p, "create", e))?;
        f.write_all(bytes).map_err(|e| io(&p, "write", e))?;
        f.sync_all().map_err(|e| io(&p, "sync", e))?;
    }
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| io(&old, "remove", e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| io(dir, "move the previous checkpoint aside", e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io(dir, "rename the new checkpoint into place", e))?;
    // Make the renames durable before the previous checkpoint is removed.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, "remove the previous checkpoint", e))?;
    }
    Ok(())
}

/// Reads the checkpoint folder `dir` (or `{dir}.old` when `dir` is missing after a crash
/// between the renames of `save_checkpoint`) for `model` (native shell).
#[cfg(not(target_arch = "wasm32"))]
pub fn load_checkpoint(dir: &std::path::Path, model: &LlamaConfig) -> Result<Checkpoint> {
    load_checkpoint_with(dir, model).map(|(ck, _)| ck)
}

/// [`load_checkpoint`], also returning the settings recorded by [`save_checkpoint_with`]. Every
/// file is checked against the SHA-256 in the manifest first; a missing manifest, a changed or
/// corrupted file is an error naming it.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_checkpoint_with(dir: &std::path::Path, model: &LlamaConfig) -> Result<(Checkpoint, Value)> {
    let old = sibling(dir, ".old");
    let src = if !dir.exists() && old.exists() { old } else { dir.to_path_buf() };
    let mut files = Vec::new();
    for name in [CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE] {
        let p = src.join(name);
        let bytes = crate::io::files::read_regular(&p)?;
        files.push((name.to_string(), bytes));
    }
    let source = src.display().to_string();
    let manifest = crate::io::files::read_regular(&src.join(MANIFEST_FILE))
        .map_err(|e| Error::format(format!("{source}/{MANIFEST_FILE}"), format!("{e} (every checkpoint this version writes has one; the folder is incomplete or was changed)")))?;
    let settings = verify_manifest(&files, &manifest, &source)?;
    Ok((Checkpoint::from_files(&files, model, &source)?, settings))
}
