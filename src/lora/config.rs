//! PEFT's `LoraConfig` (no shader): the fields with PEFT's names and meanings, which modules it
//! targets (matched as PEFT 0.21 matches them, regular expressions included), the rank, alpha and
//! scale of each module (`rank_pattern` / `alpha_pattern`) and validation with clear errors.
//!
//! Matching, as PEFT's `check_target_module_exists` and `get_pattern_key` do, against module
//! names such as `model.layers.3.self_attn.q_proj`:
//! - `target_modules` a list: a module is targeted when its name equals an entry or ends with
//!   `"." + entry`; `"all-linear"` (any case): every Linear but the output head, i.e. the seven
//!   projections; any other string: a regular expression that must match the whole name
//!   (`re.fullmatch`).
//! - `exclude_modules` (list or regex, same rules) removes modules; `layers_to_transform` keeps
//!   only those layer indices (with `layers_pattern` unset or "layers").
//! - `rank_pattern` / `alpha_pattern`: the first key k (in the map's order) for which the regex
//!   `(.*\.)?(k)$` matches the name from its start (`re.match`) gives that module's r / alpha.
//!
//! The regular expressions are Python's `re` syntax restricted to what module names need
//! (lora/regex.rs). New adapters' initial values: lora/init.rs.

use super::module_name;
use super::regex as re;
use crate::model::llama::{LlamaConfig, TARGETS};
use crate::{Error, Result};

/// Which modules carry an adapter (`target_modules`; also the form of `exclude_modules`).
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Module names or name suffixes (`"q_proj"`, `"self_attn.q_proj"`,
    /// `"model.layers.0.mlp.up_proj"`). PEFT saves this form as a JSON list.
    Names(Vec<String>),
    /// A regular expression matched against the whole module name (PEFT: a string other than
    /// "all-linear").
    Regex(String),
    /// `"all-linear"`: every Linear layer except the output head, i.e. the seven projections.
    /// PEFT resolves it to the list of their names before saving, and so does `peft`.
    AllLinear,
}

/// How a new adapter is initialized (`init_lora_weights`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitLoraWeights {
    /// `true`, PEFT's default: A = kaiming_uniform_(a=√5) on (r, in), i.e. U(−1/√in, 1/√in);
    /// B = 0, so the adapter starts as the identity change.
    Default,
    /// `"gaussian"`: A ~ N(0, σ = 1/r) (PEFT's `normal_(std=1/r)`); B = 0.
    Gaussian,
    /// `false`: both keep nn.Linear's default init: A ~ U(±1/√in), B ~ U(±1/√r) (fan_in of B is r).
    /// Not an identity start; PEFT uses it for tests, as the reference run does.
    NoInit,
    /// `"orthogonal"`: recognized so that such adapters load and save; initializing a new one
    /// this way is not implemented (an error).
    Orthogonal,
}

/// PEFT's `LoraConfig` (the fields this crate uses; `peft` writes the rest as PEFT's defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// `r`: the default rank (> 0).
    pub r: usize,
    /// `lora_alpha`: the default alpha; scale = alpha / r (alpha / √r with rsLoRA).
    pub lora_alpha: f64,
    /// `lora_dropout`: dropout probability on the input of the LoRA branch, in [0, 1).
    pub lora_dropout: f64,
    /// `target_modules`.
    pub target_modules: TargetModules,
    /// `exclude_modules`: modules never targeted (None: PEFT's null). `AllLinear` is invalid here.
    pub exclude_modules: Option<TargetModules>,
    /// `layers_to_transform`: only these layer indices (None or empty: all layers).
    pub layers_to_transform: Option<Vec<usize>>,
    /// `use_rslora`: scale alpha / √r instead of alpha / r.
    pub use_rslora: bool,
    /// `use_dora`: DoRA (weight-decomposed LoRA): each adapted projection also has a magnitude
    /// vector m (out), PEFT's `lora_magnitude_vector`, initialized to ||W0 + s·B·A||_row.
    pub use_dora: bool,
    /// `init_lora_weights`.
    pub init_lora_weights: InitLoraWeights,
    /// `rank_pattern`: (key, r) in order; the first key matching a module gives its rank.
    pub rank_pattern: Vec<(String, usize)>,
    /// `alpha_pattern`: (key, alpha) in order; the first key matching a module gives its alpha.
    pub alpha_pattern: Vec<(String, f64)>,
    /// `bias`: only "none" is supported (PEFT's default).
    pub bias: String,
    /// `modules_to_save`: only None (or empty) is supported.
    pub modules_to_save: Option<Vec<String>>,
    /// `base_model_name_or_path`: where the base model came from (written as is; may be None).
    pub base_model_name_or_path: Option<String>,
    /// `revision` of the base model (written as is).
    pub revision: Option<String>,
    /// `task_type`: "CAUSAL_LM" for this crate's models.
    pub task_type: Option<String>,
}

impl Default for LoraConfig {
    /// PEFT's defaults (r 8, alpha 8, dropout 0, bias "none", default init), with the targets
    /// PEFT picks for Llama when none are given (`q_proj`, `v_proj`) and task_type CAUSAL_LM.
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            exclude_modules: None,
            layers_to_transform: None,
            use_rslora: false,
            use_dora: false,
            init_lora_weights: InitLoraWeights::Default,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            bias: "none".into(),
            modules_to_save: None,
            base_model_name_or_path: None,
            revision: None,
            task_type: Some("CAUSAL_LM".into()),
        }
    }
}

pub(super) fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(format!("LoraConfig: {}", msg.into()))
}

/// Every module name a Llama model has (transformers' `named_modules()` without the root), so
/// that target matching sees what PEFT sees; the 7·layers projections are the LoRA-capable ones.
fn model_modules(model: &LlamaConfig) -> Vec<(String, Option<(usize, usize)>)> {
    let mut v: Vec<(String, Option<(usize, usize)>)> =
        vec![("model".into(), None), ("model.embed_tokens".into(), None), ("model.layers".into(), None)];
    for l in 0..model.layers {
        let p = format!("model.layers.{l}");
        v.push((p.clone(), None));
        v.push((format!("{p}.self_attn"), None));
        for m in 0..4 {
            v.push((module_name(l, m), Some((l, m))));
        }
        v.push((format!("{p}.mlp"), None));
        for m in 4..7 {
            v.push((module_name(l, m), Some((l, m))));
        }
        v.push((format!("{p}.mlp.act_fn"), None));
        v.push((format!("{p}.input_layernorm"), None));
        v.push((format!("{p}.post_attention_layernorm"), None));
    }
    v.push(("model.norm".into(), None));
    v.push(("model.rotary_emb".into(), None));
    v.push(("lm_head".into(), None));
    v
}

fn module_list_hint(model: &LlamaConfig) -> String {
    let last = model.layers.saturating_sub(1);
    format!(
        "the model's modules are model.embed_tokens, model.layers.{{0..{last}}}.self_attn.{{q_proj, k_proj, v_proj, o_proj}}, \
         model.layers.{{0..{last}}}.mlp.{{gate_proj, up_proj, down_proj, act_fn}}, model.layers.{{0..{last}}}.{{input_layernorm, \
         post_attention_layernorm}}, model.norm, lm_head; LoRA can target the projections: {} (or \"all-linear\")",
        TARGETS.join(", ")
    )
}

/// Whether `key` is selected by `sel` (list: equal or `"." + entry` suffix; regex: full match).
fn selects(sel: &TargetModules, key: &str) -> Result<bool> {
    Ok(match sel {
        TargetModules::AllLinear => TARGETS.iter().any(|t| key.ends_with(&format!(".{t}"))),
        TargetModules::Names(names) => names.iter().any(|n| key == n || key.ends_with(&format!(".{n}"))),
        TargetModules::Regex(p) => re::Regex::new(p)?.fullmatch(key),
    })
}

/// PEFT's `get_pattern_key`: the first key k with `re.match(r"(.*\.)?(k)$", name)`.
fn pattern_key<'a, V>(pattern: &'a [(String, V)], name: &str) -> Option<&'a V> {
    pattern.iter().find_map(|(k, v)| {
        let r = re::Regex::new(&format!("(.*\\.)?({k})$")).ok()?;
        r.match_start(name).then_some(v)
    })
}

impl LoraConfig {
    /// PEFT's config for the reference run and the usual QLoRA recipe: rank `r`, `alpha`, the
    /// seven projections ("all-linear"), dropout 0, default init.
    pub fn new(r: usize, alpha: f64) -> Self {
        LoraConfig { r, lora_alpha: alpha, target_modules: TargetModules::AllLinear, ..Default::default() }
    }

    /// Checks the fields that need no model: r > 0, alpha finite, dropout in [0, 1), targets
    /// non-empty, every regex and pattern key parses, pattern ranks > 0, bias "none",
    /// modules_to_save empty, exclude_modules not "all-linear".
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(invalid("r must be a positive integer, got 0"));
        }
        if !self.lora_alpha.is_finite() {
            return Err(invalid(format!("lora_alpha must be a finite number, got {}", self.lora_alpha)));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid(format!("lora_dropout must be in [0, 1), got {}", self.lora_dropout)));
        }
        match &self.target_modules {
            TargetModules::Names(n) if n.is_empty() => {
                return Err(invalid("target_modules is empty: name at least one module (e.g. [\"q_proj\", \"v_proj\"]) or \"all-linear\""))
            }
            TargetModules::Names(n) if n.iter().any(|s| s.is_empty()) => return Err(invalid("target_modules has an empty name")),
            TargetModules::Regex(p) if p.is_empty() => return Err(invalid("target_modules is an empty string")),
            TargetModules::Regex(p) => {
                re::Regex::new(p).map_err(|e| invalid(format!("target_modules: {e}")))?;
            }
            _ => {}
        }
        match &self.exclude_modules {
            Some(TargetModules::AllLinear) => return Err(invalid("exclude_modules cannot be \"all-linear\"")),
            Some(TargetModules::Regex(p)) => {
                re::Regex::new(p).map_err(|e| invalid(format!("exclude_modules: {e}")))?;
            }
            _ => {}
        }
        for (k, r) in &self.rank_pattern {
            if *r == 0 {
                return Err(invalid(format!("rank_pattern[{k:?}] must be a positive integer, got 0")));
            }
            re::Regex::new(&format!("(.*\\.)?({k})$")).map_err(|e| invalid(format!("rank_pattern key {k:?}: {e}")))?;
        }
        for (k, a) in &self.alpha_pattern {
            if !a.is_finite() {
                return Err(invalid(format!("alpha_pattern[{k:?}] must be a finite number, got {a}")));
            }
            re::Regex::new(&format!("(.*\\.)?({k})$")).map_err(|e| invalid(format!("alpha_pattern key {k:?}: {e}")))?;
        }
        if self.bias != "none" {
            return Err(invalid(format!("bias {:?} is not supported (only \"none\", PEFT's default)", self.bias)));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(invalid(format!(
                "modules_to_save {:?} is not supported: only LoRA adapters on the projections are trained",
                self.modules_to_save.as_ref().unwrap()
            )));
        }
        Ok(())
    }

    /// The rank of module `module` (a full name such as `model.layers.0.self_attn.q_proj`): the
    /// `rank_pattern` value of the first matching key, else `r`.
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_key(&self.rank_pattern, module).copied().unwrap_or(self.r)
    }

    /// The alpha of module `module`: the `alpha_pattern` value of the first matching key, else
    /// `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        pattern_key(&self.alpha_pattern, module).copied().unwrap_or(self.lora_alpha)
    }

    /// The scale of module `module` in f64 (a Python float in PEFT): alpha / r, or alpha / √r
    /// with `use_rslora`.
    pub fn scale_for_f64(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// The scale of module `module` as the f32 the forward multiplies by (see `scale_for_f64`).
    pub fn scale_for(&self, module: &str) -> f32 {
        self.scale_for_f64(module) as f32
    }

    /// Which projections of `model` carry an adapter: `[layer][m]` (m in TARGETS order). Also
    /// validates the config against the model: every `target_modules` entry must match a module
    /// of the model, only projections may match, and at least one module must be targeted; the
    /// errors list the model's module names.
    pub fn targets(&self, model: &LlamaConfig) -> Result<Vec<[bool; 7]>> {
        self.validate()?;
        if model.layers == 0 {
            return Err(invalid("the model has no layers"));
        }
        let modules = model_modules(model);
        // Every list entry must name something, and only projections.
        let entries: Vec<TargetModules> = match &self.target_modules {
            TargetModules::Names(n) => n.iter().map(|s| TargetModules::Names(vec![s.clone()])).collect(),
            other => vec![other.clone()],
        };
        for e in &entries {
            let mut hit = false;
            for (key, proj) in &modules {
                if selects(e, key)? {
                    hit = true;
                    if proj.is_none() {
                        let what = match e {
                            TargetModules::Names(n) => format!("target_modules entry {:?}", n[0]),
                            TargetModules::Regex(p) => format!("target_modules regex {p:?}"),
                            TargetModules::AllLinear => "all-linear".into(),
                        };
                        return Err(invalid(format!(
                            "{what} matches module {key:?}, which cannot carry a LoRA adapter here; {}",
                            module_list_hint(model)
                        )));
                    }
                }
            }
            if !hit {
                let what = match e {
                    TargetModules::Names(n) => format!("target module {:?} is not a module of the model", n[0]),
                    TargetModules::Regex(p) => format!("target_modules regex {p:?} matches no module of the model"),
                    TargetModules::AllLinear => "all-linear matches nothing".into(),
                };
                return Err(invalid(format!("{what}; {}", module_list_hint(model))));
            }
        }
        let layers = self.layers_to_transform.as_ref().filter(|v| !v.is_empty());
        if let Some(ls) = layers {
            if let Some(bad) = ls.iter().find(|&&l| l >= model.layers) {
                return Err(invalid(format!("layers_to_transform has layer {bad}; the model has {} layers", model.layers)));
            }
        }
        let mut out = vec![[false; 7]; model.layers];
        let mut any = false;
        for (key, proj) in &modules {
            let Some((l, m)) = *proj else { continue };
            if let Some(ex) = &self.exclude_modules {
                if selects(ex, key)? {
                    continue;
                }
            }
            if !selects(&self.target_modules, key)? {
                continue;
            }
            // PEFT applies layers_to_transform only to list targets.
            if let (Some(ls), false) = (layers, matches!(self.target_modules, TargetModules::Regex(_))) {
                if !ls.contains(&l) {
                    continue;
                }
            }
            out[l][m] = true;
            any = true;
        }
        if !any {
            return Err(invalid(format!(
                "no module is targeted once exclude_modules and layers_to_transform are applied; {}",
                module_list_hint(model)
            )));
        }
        Ok(out)
    }
}
