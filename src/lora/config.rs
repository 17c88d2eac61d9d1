//! PEFT's `LoraConfig` (no shader): the fields with PEFT's names and meanings, which modules it
//! targets (matched as PEFT 0.21 matches them, regular expressions included), the rank, alpha and
//! scale of each module (`rank_pattern` / `alpha_pattern`), validation with clear errors, and
//! seeded initialization of a new adapter.
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
//! The regular expressions are Python's `re` syntax restricted to what module names need:
//! literals, `.`, classes `[...]` (ranges, negation, `\d \w \s`), groups `(...)` / `(?:...)`,
//! alternation `|`, the quantifiers `* + ? {m} {m,} {m,n}` (greedy, or lazy with `?`), anchors
//! `^ $`, and escapes `\d \D \w \W \s \S \.` etc. Anything else (look-arounds, back-references,
//! named groups, flags) is an error that says so, never a silent mismatch.

use super::{module_name, HostAdapter, HostLora};
use crate::gpu::GpuContext;
use crate::model::llama::{LlamaConfig, LoraSet, TARGETS};
use crate::rng::SplitMix64;
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

fn invalid(msg: impl Into<String>) -> Error {
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

/// A small backtracking matcher for the subset of Python's `re` that module-name patterns use
/// (see the module documentation). Patterns and names are ASCII in practice; matching is on bytes.
pub(crate) mod re {
    use crate::{Error, Result};

    #[derive(Clone, Debug)]
    enum Node {
        Byte(u8),
        /// `.`: any byte but a newline.
        Any,
        /// `[...]`: inclusive byte ranges, negated or not.
        Class(Vec<(u8, u8)>, bool),
        Start,
        End,
        /// A group: its alternatives.
        Group(Vec<Vec<Node>>),
        /// node, min, max (None: unbounded), greedy.
        Repeat(Box<Node>, usize, Option<usize>, bool),
    }

    /// A compiled pattern.
    #[derive(Clone, Debug)]
    pub struct Regex {
        alts: Vec<Vec<Node>>,
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
        pat: &'a str,
    }

    const DIGIT: &[(u8, u8)] = &[(b'0', b'9')];
    const WORD: &[(u8, u8)] = &[(b'a', b'z'), (b'A', b'Z'), (b'0', b'9'), (b'_', b'_')];
    const SPACE: &[(u8, u8)] = &[(b' ', b' '), (b'\t', b'\r')];

    impl Parser<'_> {
        fn err(&self, what: &str) -> Error {
            Error::Invalid(format!("regular expression {:?} at position {}: {what}", self.pat, self.i))
        }
        fn peek(&self) -> Option<u8> {
            self.s.get(self.i).copied()
        }
        fn alt(&mut self) -> Result<Vec<Vec<Node>>> {
            let mut alts = vec![self.seq()?];
            while self.peek() == Some(b'|') {
                self.i += 1;
                alts.push(self.seq()?);
            }
            Ok(alts)
        }
        fn seq(&mut self) -> Result<Vec<Node>> {
            let mut seq = Vec::new();
            while let Some(c) = self.peek() {
                if c == b'|' || c == b')' {
                    break;
                }
                let atom = self.atom()?;
                let atom = self.quantifier(atom)?;
                seq.push(atom);
            }
            Ok(seq)
        }
        fn escape_class(c: u8) -> Option<(&'static [(u8, u8)], bool)> {
            match c {
                b'd' => Some((DIGIT, false)),
                b'D' => Some((DIGIT, true)),
                b'w' => Some((WORD, false)),
                b'W' => Some((WORD, true)),
                b's' => Some((SPACE, false)),
                b'S' => Some((SPACE, true)),
                _ => None,
            }
        }
        fn atom(&mut self) -> Result<Node> {
            let c = self.peek().unwrap();
            self.i += 1;
            Ok(match c {
                b'(' => {
                    if self.s[self.i..].starts_with(b"?:") {
                        self.i += 2;
                    } else if self.peek() == Some(b'?') {
                        return Err(self.err("extension groups (?...) other than (?:...) are not supported"));
                    }
                    let alts = self.alt()?;
                    if self.peek() != Some(b')') {
                        return Err(self.err("missing )"));
                    }
                    self.i += 1;
                    Node::Group(alts)
                }
                b'[' => self.class()?,
                b'.' => Node::Any,
                b'^' => Node::Start,
                b'$' => Node::End,
                b'*' | b'+' | b'?' => return Err(self.err("nothing to repeat")),
                b'\\' => {
                    let Some(e) = self.peek() else { return Err(self.err("trailing backslash")) };
                    self.i += 1;
                    if let Some((r, neg)) = Self::escape_class(e) {
                        Node::Class(r.to_vec(), neg)
                    } else if e.is_ascii_alphanumeric() {
                        return Err(self.err(&format!("escape \\{} is not supported", e as char)));
                    } else {
                        Node::Byte(e)
                    }
                }
                _ => Node::Byte(c),
            })
        }
        fn class(&mut self) -> Result<Node> {
            let mut neg = false;
            if self.peek() == Some(b'^') {
                neg = true;
                self.i += 1;
            }
            let mut ranges = Vec::new();
            let mut first = true;
            loop {
                let Some(c) = self.peek() else { return Err(self.err("unterminated [")) };
                self.i += 1;
                if c == b']' && !first {
                    break;
                }
                first = false;
                let lo = if c == b'\\' {
                    let Some(e) = self.peek() else { return Err(self.err("trailing backslash")) };
                    self.i += 1;
                    if let Some((r, false)) = Self::escape_class(e) {
                        ranges.extend_from_slice(r);
                        continue;
                    }
                    if e.is_ascii_alphanumeric() {
                        return Err(self.err(&format!("escape \\{} in a class is not supported", e as char)));
                    }
                    e
                } else {
                    c
                };
                if self.peek() == Some(b'-') && self.s.get(self.i + 1).is_some_and(|&n| n != b']') {
                    let hi = self.s[self.i + 1];
                    if hi == b'\\' {
                        return Err(self.err("escapes as range ends are not supported"));
                    }
                    self.i += 2;
                    if hi < lo {
                        return Err(self.err("bad character range"));
                    }
                    ranges.push((lo, hi));
                } else {
                    ranges.push((lo, lo));
                }
            }
            Ok(Node::Class(ranges, neg))
        }
        fn number(&mut self) -> Option<usize> {
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            std::str::from_utf8(&self.s[start..self.i]).ok()?.parse().ok()
        }
        fn quantifier(&mut self, atom: Node) -> Result<Node> {
            let (min, max) = match self.peek() {
                Some(b'*') => (0, None),
                Some(b'+') => (1, None),
                Some(b'?') => (0, Some(1)),
                Some(b'{') => {
                    // Python reads `{` as a literal unless it forms {m}, {m,}, {,n} or {m,n}.
                    let save = self.i;
                    self.i += 1;
                    let min = self.number();
                    let (min, max) = if self.peek() == Some(b',') {
                        self.i += 1;
                        (min.unwrap_or(0), self.number())
                    } else if let Some(m) = min {
                        (m, Some(m))
                    } else {
                        self.i = save;
                        return Ok(atom);
                    };
                    if self.peek() != Some(b'}') {
                        self.i = save;
                        return Ok(atom);
                    }
                    if max.is_some_and(|mx| mx < min) {
                        return Err(self.err("min repeat greater than max repeat"));
                    }
                    (min, max)
                }
                _ => return Ok(atom),
            };
            self.i += 1;
            if matches!(atom, Node::Start | Node::End) {
                return Err(self.err("an anchor cannot be repeated"));
            }
            let greedy = if self.peek() == Some(b'?') {
                self.i += 1;
                false
            } else {
                true
            };
            if matches!(self.peek(), Some(b'*' | b'+' | b'?')) {
                return Err(self.err("multiple repeat"));
            }
            Ok(Node::Repeat(Box::new(atom), min, max, greedy))
        }
    }

    fn m(nodes: &[Node], s: &[u8], pos: usize, k: &dyn Fn(usize) -> bool) -> bool {
        let Some((first, rest)) = nodes.split_first() else { return k(pos) };
        match first {
            Node::Byte(c) => pos < s.len() && s[pos] == *c && m(rest, s, pos + 1, k),
            Node::Any => pos < s.len() && s[pos] != b'\n' && m(rest, s, pos + 1, k),
            Node::Class(r, neg) => {
                pos < s.len() && (r.iter().any(|&(lo, hi)| (lo..=hi).contains(&s[pos])) != *neg) && m(rest, s, pos + 1, k)
            }
            Node::Start => pos == 0 && m(rest, s, pos, k),
            // Python's `$` also matches right before a final newline.
            Node::End => (pos == s.len() || (pos + 1 == s.len() && s[pos] == b'\n')) && m(rest, s, pos, k),
            Node::Group(alts) => alts.iter().any(|alt| m(alt, s, pos, &|p| m(rest, s, p, k))),
            Node::Repeat(node, min, max, greedy) => rep(node, *min, *max, *greedy, rest, s, pos, 0, k),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn rep(
        node: &Node,
        min: usize,
        max: Option<usize>,
        greedy: bool,
        rest: &[Node],
        s: &[u8],
        pos: usize,
        count: usize,
        k: &dyn Fn(usize) -> bool,
    ) -> bool {
        let more = || {
            max.is_none_or(|mx| count < mx)
                // An empty iteration past the minimum cannot change anything: stop there.
                && m(std::slice::from_ref(node), s, pos, &|p| (p != pos || count < min) && rep(node, min, max, greedy, rest, s, p, count + 1, k))
        };
        let stop = || count >= min && m(rest, s, pos, k);
        if greedy {
            more() || stop()
        } else {
            stop() || more()
        }
    }

    impl Regex {
        /// Compiles `pattern`; an unsupported construct is an error naming it and its position.
        pub fn new(pattern: &str) -> Result<Regex> {
            let mut p = Parser { s: pattern.as_bytes(), i: 0, pat: pattern };
            let alts = p.alt()?;
            if p.i != p.s.len() {
                return Err(p.err("unbalanced )"));
            }
            Ok(Regex { alts })
        }

        /// Python's `re.fullmatch`: the pattern matches the whole of `s`.
        pub fn fullmatch(&self, s: &str) -> bool {
            let b = s.as_bytes();
            self.alts.iter().any(|alt| m(alt, b, 0, &|p| p == b.len()))
        }

        /// Python's `re.match`: the pattern matches a prefix of `s`.
        pub fn match_start(&self, s: &str) -> bool {
            let b = s.as_bytes();
            self.alts.iter().any(|alt| m(alt, b, 0, &|_| true))
        }
    }
}

/// Python-`re` subset matching, exposed for tests: (fullmatch, match-at-start) of `pattern` on `s`.
pub fn regex_matches(pattern: &str, s: &str) -> Result<(bool, bool)> {
    let r = re::Regex::new(pattern)?;
    Ok((r.fullmatch(s), r.match_start(s)))
}
