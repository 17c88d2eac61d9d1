//! `qlora train`: flags and an equivalent TOML config file (flags win), a progress bar, a
//! metrics log (JSONL, every step's loss at full precision), the loss plot (SVG), answers to
//! sample prompts before and after, periodic checkpoints, Ctrl-C (finish the step, checkpoint,
//! exit) and `--resume`.

use crate::common::{self, mib, QuantArgs};
use crate::plot;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use qlora_webgpu::data::dataset::{Dataset, Format, Split};
use qlora_webgpu::generate::SamplingConfig;
use qlora_webgpu::gpu::{block_on, lossless_compact, DType, GpuContext};
use qlora_webgpu::lora::config::{InitLoraWeights, LoraConfig, TargetModules};
use qlora_webgpu::lora::peft::{CONFIG_FILE, WEIGHTS_FILE};
use qlora_webgpu::io::files::write_atomic;
use qlora_webgpu::session::{self, BaseQuant, LoadedModel, Prompt, TrainConfig, TrainSession};
use qlora_webgpu::train::checkpoint::{load_checkpoint_with, save_checkpoint_with};
use qlora_webgpu::train::memory::{self, RunShape};
use qlora_webgpu::train::ScheduleKind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set by Ctrl-C: the loop finishes the step in flight, checkpoints and exits.
static STOP: AtomicBool = AtomicBool::new(false);

/// Exit code after Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: i32 = 130;

/// The checkpoint folder inside `--out`.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// The effective settings of a run, inside `--out` (TOML, the config file's keys).
pub const RUN_CONFIG: &str = "train_config.toml";
/// The metrics log inside `--out`.
pub const METRICS: &str = "metrics.jsonl";
/// The loss plot inside `--out`.
pub const PLOT: &str = "loss.svg";
/// Sample answers before and after, inside `--out`.
pub const SAMPLES: &str = "samples.md";

/// Every training flag; a TOML file given with `--config` holds the same keys (snake_case), and
/// a flag given on the command line wins over the file.
#[derive(Args, Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainArgs {
    /// The base model: a .gguf file or a Hugging Face folder.
    pub model: Option<PathBuf>,
    /// Training data, JSONL: {"messages"}, {"prompt","completion"}, {"instruction","input","output"} or {"text"}.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A TOML file with any of these settings (keys as the flags, with underscores).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where the adapter, metrics, plot and checkpoint go [default: adapter].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Data format: auto, text, prompt-completion, messages, alpaca [default: auto].
    #[arg(long)]
    pub format: Option<String>,
    /// Validation data (JSONL); or hold out a fraction with --val-fraction.
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Hold out this fraction of --data for validation [default: none].
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Evaluate the validation loss every N steps [default: a tenth of the run].
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,

    /// LoRA rank r [default: 16].
    #[arg(long, short = 'r')]
    pub r: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha/r) [default: 16].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input [default: 0].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Modules to adapt: "all-linear" or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj [default: all-linear].
    #[arg(long)]
    pub target_modules: Option<String>,
    /// Scale by alpha/sqrt(r) instead of alpha/r (rsLoRA).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub use_rslora: Option<bool>,
    /// DoRA (PEFT's use_dora): also train a magnitude per output feature, the adapted weight's
    /// rows rescaled to it.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub use_dora: Option<bool>,
    /// Adapter init: true (A Kaiming-uniform, B zero), gaussian, false (both random) [default: true].
    #[arg(long)]
    pub init_lora_weights: Option<String>,
    /// Start from this PEFT adapter folder (its config replaces the LoRA flags).
    #[arg(long, value_name = "DIR")]
    pub init_adapter: Option<PathBuf>,
    /// QLoRA flags (--qlora, --bnb-4bit-use-double-quant, --bnb-4bit-blocksize), as the other
    /// commands take them.
    #[command(flatten)]
    #[serde(flatten)]
    pub quant: QuantArgs,

    /// Optimizer steps [default: 100, or from --epochs].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Passes over the training data (sets --steps).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Examples per micro-batch [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Longest example in tokens; longer ones are cut [default: 512].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Schedule after warmup: cosine, linear, constant [default: cosine].
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    /// Linear warmup steps [default: 3% of the steps].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the gradient norm to this; 0 turns clipping off [default: 1].
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    /// Seed of the adapter init, dropout, validation split and data order [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the data in file order (no shuffling).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub no_shuffle: Option<bool>,
    /// Count the loss on prompts and user turns too.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub train_on_prompt: Option<bool>,
    /// Do not append eos to text and prompt-completion examples.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub no_append_eos: Option<bool>,
    /// Sequence packing (TRL's padding-free packing): training examples packed into rows of
    /// --max-len tokens, positions restarting and attention kept within each example; a batch
    /// is then --batch-size packed rows.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub packing: Option<bool>,
    /// Recompute each layer's activations in the backward pass (less memory, ~30% more time).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub grad_checkpoint: Option<bool>,
    /// GPU memory the run may plan for (e.g. 6G, 7.5G, 512M) [default: 7G, an 8 GB card's
    /// worth]: past it, per-layer recomputation turns on by itself; if even that does not fit,
    /// the run stops before loading the model onto the GPU and says what would fit.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// Write a checkpoint every N steps [default: 50].
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Answer these prompts (JSONL: messages, prompt or text) before and after training.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Tokens per sample answer [default: 64].
    #[arg(long, value_name = "N")]
    pub sample_tokens: Option<usize>,
    /// Continue the run saved in OUT/checkpoint (same data and settings; --steps may grow).
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    /// Instead of training, write DIR/train_trl.py (TRL + PEFT, bitsandbytes with --qlora),
    /// the tokenized data, the initial adapter and an Accelerate config that reproduce the run,
    /// to scale it out with `accelerate launch` (DDP, FSDP, DeepSpeed); see DIR/README.md.
    #[arg(long, value_name = "DIR")]
    #[serde(skip)]
    pub emit_recipe: Option<PathBuf>,
}

/// The settings that must not change between a run and its resumption.
const RESUME_KEYS: [&str; 24] = [
    "model", "data", "format", "val_data", "val_fraction", "r", "lora_alpha", "lora_dropout", "target_modules",
    "use_rslora", "use_dora", "init_lora_weights", "init_adapter", "qlora", "bnb_4bit_use_double_quant", "bnb_4bit_blocksize",
    "batch_size", "grad_accum", "max_len", "lr", "lr_scheduler", "seed", "no_shuffle",
    "packing",
];

fn to_map(a: &TrainArgs) -> serde_json::Map<String, Value> {
    match serde_json::to_value(a).expect("the settings serialize") {
        Value::Object(m) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        _ => unreachable!("a struct serializes to an object"),
    }
}

impl TrainArgs {
    /// The flags over the config file (when given): a flag set on the command line wins.
    pub fn merged(self) -> Result<TrainArgs> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text = String::from_utf8(common::read(&path)?).with_context(|| format!("{}: not UTF-8", path.display()))?;
        let at_line = |start: usize| text[..start.min(text.len())].lines().count().max(1);
        let file: TrainArgs = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: line {}: {}", path.display(), e.span().map_or(0, |s| at_line(s.start)), qlora_webgpu::error::quote(e.message().trim())))?;
        // serde's `flatten` (the QLoRA flags) rules out `deny_unknown_fields`: keys are checked here.
        let known = match serde_json::to_value(TrainArgs::default())? {
            Value::Object(m) => m,
            _ => unreachable!("a struct serializes to an object"),
        };
        let table: toml::Table = toml::from_str(&text)?;
        if let Some(k) = table.keys().find(|k| !known.contains_key(*k)) {
            let line = text.lines().position(|l| l.trim_start().starts_with(k.as_str())).map_or(0, |i| i + 1);
            bail!("{}: line {line}: unknown field `{k}` (the keys are the flags' long names with underscores)", path.display());
        }
        let mut m = to_map(&file);
        // Paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        for k in ["model", "data", "val_data", "out", "init_adapter", "prompts"] {
            if let Some(Value::String(p)) = m.get(k) {
                let p = base.join(p);
                m.insert(k.into(), Value::String(p.display().to_string()));
            }
        }
        m.extend(to_map(&self));
        let mut out: TrainArgs = serde_json::from_value(Value::Object(m))?;
        out.resume = self.resume;
        Ok(out)
    }

    fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| PathBuf::from("adapter"))
    }

    fn lora(&self) -> Result<LoraConfig> {
        let mut c = LoraConfig::new(self.r.unwrap_or(16), self.lora_alpha.unwrap_or(16.0));
        c.lora_dropout = self.lora_dropout.unwrap_or(0.0);
        c.use_rslora = self.use_rslora.unwrap_or(false);
        c.use_dora = self.use_dora.unwrap_or(false);
        c.target_modules = match self.target_modules.as_deref() {
            None | Some("all-linear") => TargetModules::AllLinear,
            Some(list) => TargetModules::Names(list.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()),
        };
        c.init_lora_weights = match self.init_lora_weights.as_deref().unwrap_or("true") {
            "true" | "default" => InitLoraWeights::Default,
            "gaussian" => InitLoraWeights::Gaussian,
            "false" => InitLoraWeights::NoInit,
            other => bail!("--init-lora-weights {other:?}: expected true, gaussian or false"),
        };
        if c.r == 0 {
            bail!("--r 0: the LoRA rank must be at least 1");
        }
        c.validate()?;
        Ok(c)
    }

    /// The run's settings; `n_train` examples set the steps of `--epochs`.
    fn train_config(&self, n_examples: usize) -> Result<TrainConfig> {
        let mut c = TrainConfig { lora: self.lora()?, ..TrainConfig::default() };
        c.batch_size = self.batch_size.unwrap_or(c.batch_size);
        c.grad_accum = self.grad_accum.unwrap_or(c.grad_accum);
        c.max_len = self.max_len.unwrap_or(c.max_len);
        c.lr = self.lr.unwrap_or(c.lr);
        if let Some(s) = &self.lr_scheduler {
            c.schedule = ScheduleKind::parse(s)?;
        }
        c.warmup_steps = self.warmup_steps;
        c.weight_decay = self.weight_decay.unwrap_or(c.weight_decay);
        c.max_grad_norm = match self.max_grad_norm {
            Some(x) if x == 0.0 => None,
            Some(x) => Some(x),
            None => c.max_grad_norm,
        };
        c.seed = self.seed.unwrap_or(c.seed);
        c.shuffle = !self.no_shuffle.unwrap_or(false);
        c.train_on_prompt = self.train_on_prompt.unwrap_or(false);
        c.append_eos = !self.no_append_eos.unwrap_or(false);
        c.grad_checkpoint = self.grad_checkpoint.unwrap_or(false);
        c.packing = self.packing.unwrap_or(false);
        if c.packing && self.epochs.is_some() {
            bail!("--epochs with --packing: give --steps (the number of packed rows is known only after tokenizing; the log's packing line states it)");
        }
        c.validation = match self.val_fraction {
            Some(f) if self.val_data.is_some() => bail!("--val-fraction {f} and --val-data: give one of them"),
            Some(f) => Some(Split::Fraction(f)),
            None => None,
        };
        let n_train = match c.validation {
            Some(Split::Fraction(f)) => n_examples - (f * n_examples as f64).round() as usize,
            _ => n_examples,
        };
        c.steps = match (self.steps, self.epochs) {
            (Some(_), Some(_)) => bail!("--steps and --epochs: give one of them"),
            (Some(s), None) => s,
            (None, Some(e)) if e > 0.0 => ((e * n_train as f64) / (c.batch_size * c.grad_accum) as f64).ceil().max(1.0) as u64,
            (None, Some(e)) => bail!("--epochs {e} must be positive"),
            (None, None) => c.steps,
        };
        c.validate()?;
        Ok(c)
    }
}

/// One line of the metrics log.
fn metrics_line(v: Value) -> String {
    let mut s = v.to_string();
    s.push('\n');
    s
}

struct Run<'a> {
    /// The settings that determine the run ([`RESUME_KEYS`]), recorded in each checkpoint.
    settings: Value,
    ctx: Rc<GpuContext>,
    model: &'a LoadedModel,
    out: PathBuf,
    metrics: std::fs::File,
    train_points: Vec<(u64, f64)>,
    val_points: Vec<(u64, f64)>,
}

impl Run<'_> {
    /// Writes the adapter (PEFT files) into `out`, each file atomically.
    fn save_adapter(&self, s: &TrainSession) -> Result<()> {
        let (cfg, st) = block_on(s.adapter_files(&self.ctx, Some(&self.model.name)))?;
        write_atomic(&self.out.join(CONFIG_FILE), cfg.as_bytes())?;
        write_atomic(&self.out.join(WEIGHTS_FILE), &st)?;
        Ok(())
    }

    fn save_checkpoint(&self, s: &TrainSession) -> Result<()> {
        let ck = block_on(s.checkpoint())?;
        save_checkpoint_with(&self.out.join(CHECKPOINT_DIR), &ck, &self.model.model.cfg, &self.settings)?;
        Ok(())
    }

    fn plot(&self) -> Result<()> {
        plot::loss_svg(&self.out.join(PLOT), &self.train_points, &self.val_points, &self.model.name)
    }
}

fn answers(ctx: &Rc<GpuContext>, model: &LoadedModel, set: &qlora_webgpu::model::llama::LoraSet, prompts: &[(String, Prompt)], tokens: usize) -> Result<Vec<String>> {
    let cfg = SamplingConfig { max_new_tokens: tokens, ..SamplingConfig::default() };
    let mut out = Vec::new();
    for (_, p) in prompts {
        let ids = model.prompt_ids(p)?;
        let g = block_on(model.generate(ctx, set, &ids, &cfg, |_| {}))?;
        out.push(g.text.trim().to_owned());
    }
    Ok(out)
}

/// Reads the metrics log of an interrupted run, keeping the lines up to `step` (a crash may
/// have logged steps after the last checkpoint; those are run again).
fn metrics_upto(path: &Path, step: u64) -> Result<(String, Vec<(u64, f64)>, Vec<(u64, f64)>)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (mut keep, mut tr, mut va) = (String::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let Some(s) = v.get("step").and_then(Value::as_u64) else { continue };
        if s > step {
            continue;
        }
        if let Some(l) = v.get("loss").and_then(Value::as_f64) {
            tr.push((s, l));
        }
        if let Some(l) = v.get("val_loss").and_then(Value::as_f64) {
            va.push((s, l));
        }
        keep.push_str(line);
        keep.push('\n');
    }
    Ok((keep, tr, va))
}

/// The adapted modules, in the model's order ("q_proj, v_proj" or "all seven projections").
fn targets_text(l: &LoraConfig, model: &LoadedModel) -> Result<String> {
    let t = l.targets(&model.model.cfg)?;
    let names: Vec<&str> = (0..7).filter(|&m| t.iter().any(|layer| layer[m])).map(|m| qlora_webgpu::model::llama::TARGETS[m]).collect();
    let layers = t.iter().filter(|layer| layer.iter().any(|&x| x)).count();
    let what = if names.len() == 7 { "all seven projections".to_owned() } else { names.join(", ") };
    Ok(if layers == t.len() { what } else { format!("{what} in {layers} of {} layers", t.len()) })
}

/// A byte size: a number with an optional K, M or G suffix (binary units), e.g. 7.5G.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], (1u64 << 10) as f64),
        'M' | 'm' => (&s[..s.len() - 1], (1u64 << 20) as f64),
        'G' | 'g' => (&s[..s.len() - 1], (1u64 << 30) as f64),
        _ => (s, 1.0),
    };
    let x: f64 = num.trim().parse().ok()?;
    (x.is_finite() && x > 0.0 && x * mul < 1e18).then(|| (x * mul) as u64)
}

/// Ctrl-C at any moment ends the run in order: before training starts nothing has been written
/// and the run exits at the next check; during training the step in flight finishes and a
/// checkpoint is written. A second Ctrl-C exits at once.
fn handle_ctrl_c() -> Result<()> {
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
            std::process::exit(EXIT_INTERRUPTED);
        }
        eprintln!("\nCtrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to quit now)");
    })?;
    Ok(())
}

/// "key: saved -> now" for each of [`RESUME_KEYS`] whose value differs.
fn settings_diff(saved: &Value, now: &Value) -> Vec<String> {
    RESUME_KEYS
        .iter()
        .filter(|k| saved.get(**k) != now.get(**k))
        .map(|k| format!("{k}: {} -> {}", saved.get(*k).unwrap_or(&Value::Null), now.get(*k).unwrap_or(&Value::Null)))
        .collect()
}

/// --resume: the output folder has a checkpoint and its saved settings (train_config.toml) are
/// this run's in every key of [`RESUME_KEYS`].
fn check_resumable(out: &Path, now: &Value) -> Result<()> {
    if !out.join(CHECKPOINT_DIR).is_dir() {
        bail!("--resume: {} has no checkpoint (run without --resume to start)", out.display());
    }
    let saved_path = out.join(RUN_CONFIG);
    let saved = qlora_webgpu::io::files::read_regular(&saved_path).map_err(|e| anyhow::anyhow!("--resume: {e}"))?;
    let saved = String::from_utf8(saved).map_err(|_| anyhow::anyhow!("--resume: {}: not UTF-8 text", saved_path.display()))?;
    let saved: toml::Table = toml::from_str(&saved).map_err(|e| {
        let line = e.span().map_or(0, |s| saved[..s.start.min(saved.len())].lines().count().max(1));
        anyhow::anyhow!("--resume: {}: line {line}: {}", saved_path.display(), qlora_webgpu::error::quote(e.message().trim()))
    })?;
    let diff = settings_diff(&serde_json::to_value(saved)?, now);
    if !diff.is_empty() {
        bail!("--resume: these settings differ from the saved run's ({}): {}", saved_path.display(), diff.join("; "));
    }
    Ok(())
}

/// The run's memory plan within `--max-memory` (7 GiB by default), printed; it may turn on
/// per-layer recomputation to fit.
fn plan_memory(args: &TrainArgs, cfg: &TrainConfig, src: &session::ModelSource, quant: BaseQuant, model_path: &Path) -> Result<memory::MemoryPlan> {
    let budget = match &args.max_memory {
        Some(m) => parse_size(m).with_context(|| format!("--max-memory {m:?}: expected a size such as 6G, 7.5G or 512M"))?,
        None => 7 << 30,
    };
    let shape = RunShape {
        batch: cfg.batch_size,
        seq: cfg.max_len,
        rank: cfg.lora.r,
        adapted: 7,
        nf4: match quant {
            BaseQuant::F32 => None,
            BaseQuant::Nf4 { double_quant, .. } => Some(double_quant),
        },
        // Q8 (9 bits a value) is planned as 2 bytes: an upper bound.
        table_bytes: if lossless_compact(&src.host.embed.data, src.host.config.hidden_size) == DType::F32 { 4 } else { 2 },
        dora: cfg.lora.use_dora,
    };
    let plan = memory::choose(&src.host.config, &shape, budget, cfg.grad_checkpoint).map_err(|e| anyhow::anyhow!("{}: {e}", model_path.display()))?;
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    eprintln!(
        "memory   about {} planned (base {}, adapter + optimizer {}, activations {}, transient {}) of {} (--max-memory){}",
        gib(plan.total()),
        gib(plan.weights),
        gib(plan.lora),
        gib(plan.activations),
        gib(plan.transient),
        gib(budget),
        match (plan.grad_checkpoint, cfg.grad_checkpoint) {
            (true, false) => "; per-layer recomputation turned on to fit",
            (true, true) => "; per-layer recomputation on",
            _ => "",
        }
    );
    Ok(plan)
}

/// How often the loop evaluates and saves.
struct Every {
    /// Steps between validation losses (and at the last step).
    eval: u64,
    /// Steps between checkpoints + adapter files (and at the last step, and on Ctrl-C).
    save: u64,
    /// Whether there is validation data.
    has_val: bool,
}

/// The training loop: steps with a progress bar, the metrics log, validation, checkpoints and
/// Ctrl-C. Returns (stopped by Ctrl-C, steps run, input tokens, seconds).
#[allow(clippy::too_many_arguments)]
fn train_steps(
    sess: &mut TrainSession,
    run: &mut Run,
    cfg: &TrainConfig,
    per_epoch: usize,
    every: &Every,
    val_loss: &dyn Fn(&TrainSession) -> Result<Option<f64>>,
    ck_dir: &Path,
    out: &Path,
    resume: bool,
) -> Result<(bool, u64, usize, f64)> {
    let (eval_every, save_every, has_val) = (every.eval, every.save, every.has_val);
    let ctx = run.ctx.clone();
    let pb = ProgressBar::new(cfg.steps);
    pb.set_style(ProgressStyle::with_template("{bar:28} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")?);
    pb.set_position(sess.step_count());
    let t0 = Instant::now();
    let start_step = sess.step_count();
    let mut tokens_total = 0usize;
    let mut interrupted = false;
    // The step of the last checkpoint and adapter on disk (for the message of a failed step).
    let mut saved_step = if resume { Some(sess.step_count()) } else { None };
    // A failed step, evaluation or save (a NaN loss, a lost device, out of GPU memory): the
    // message says what the files on disk hold; files are written atomically, so they are whole.
    let failed = |e: &dyn std::fmt::Display, saved_step: Option<u64>| {
        let saved = match saved_step {
            Some(s) => format!("the checkpoint {} and the adapter in {} hold step {s}", ck_dir.display(), out.display()),
            None => format!("nothing was saved yet (the first checkpoint comes at step {save_every})"),
        };
        anyhow::anyhow!("{e}; {saved}")
    };
    while !sess.done() {
        let ts = Instant::now();
        let info = block_on(sess.step()).map_err(|e| failed(&e, saved_step))?;
        let dt = ts.elapsed().as_secs_f64();
        tokens_total += info.input_tokens;
        let tps = tokens_total as f64 / t0.elapsed().as_secs_f64();
        let mem = ctx.pool_stats();
        let mut line = json!({
            "step": info.step, "loss": info.loss, "lr": info.lr, "grad_norm": info.grad_norm,
            "tokens": info.input_tokens, "counted_tokens": info.counted_tokens,
            "epoch": (info.step * (cfg.batch_size * cfg.grad_accum) as u64) as f64 / per_epoch as f64,
            "step_s": dt, "tokens_per_s": tps, "gpu_in_use_bytes": mem.in_use, "elapsed_s": t0.elapsed().as_secs_f64(),
        });
        run.train_points.push((info.step, info.loss));
        let mut val_msg = String::new();
        if has_val && (info.step % eval_every == 0 || info.step == cfg.steps) {
            if let Some(v) = val_loss(&sess).map_err(|e| failed(&e, saved_step))? {
                line["val_loss"] = json!(v);
                line["val_ppl"] = json!(v.exp());
                run.val_points.push((info.step, v));
                val_msg = format!(" val {v:.4}");
            }
        }
        run.metrics.write_all(metrics_line(line).as_bytes())?;
        let msg = format!(
            "loss {:.4}{val_msg} lr {:.2e} {:.0} tok/s gpu {}",
            info.loss,
            info.lr,
            tps,
            mib(mem.in_use)
        );
        pb.set_position(info.step);
        pb.set_message(msg.clone());
        if pb.is_hidden() && (info.step == 1 || info.step % 10 == 0 || info.step == cfg.steps || !val_msg.is_empty()) {
            eprintln!("step {}/{} {msg} ({dt:.2} s)", info.step, cfg.steps);
        }
        let stop = STOP.load(Ordering::SeqCst);
        if info.step % save_every == 0 || stop || sess.done() {
            // The checkpoint is written before the adapter: a failure between them leaves a
            // checkpoint one save ahead of the adapter, both whole.
            run.save_checkpoint(&sess).map_err(|e| failed(&e, saved_step))?;
            run.save_adapter(&sess).map_err(|e| {
                let adapter = saved_step.map_or("no adapter".to_string(), |s| format!("the adapter in {} holds step {s}", out.display()));
                anyhow::anyhow!("{e}; the checkpoint {} holds step {} and {adapter}", ck_dir.display(), info.step)
            })?;
            run.plot()?;
            saved_step = Some(info.step);
        }
        if stop {
            interrupted = true;
            break;
        }
    }
    pb.finish_and_clear();
    Ok((interrupted, sess.step_count() - start_step, tokens_total, t0.elapsed().as_secs_f64()))
}

/// Prints the answers before (when there are) and after training and writes them to `path`
/// (Markdown).
fn write_samples(path: &Path, prompts: &[(String, Prompt)], before: Option<&[String]>, after: &[String]) -> Result<()> {
    let mut md = String::from("# Sample answers before and after training\n\n");
    println!();
    for (i, (shown, _)) in prompts.iter().enumerate() {
        println!("### {shown}");
        md.push_str(&format!("## {shown}\n\n"));
        if let Some(b) = before {
            println!("before: {}", b[i]);
            md.push_str(&format!("**before:** {}\n\n", b[i]));
        }
        println!("after:  {}\n", after[i]);
        md.push_str(&format!("**after:** {}\n\n", after[i]));
    }
    write_atomic(path, md.as_bytes())?;
    Ok(())
}

/// The packing, data and LoRA lines printed before training.
fn print_summary(sess: &TrainSession, model: &LoadedModel, cfg: &TrainConfig, data_path: &Path, val_data: Option<&Dataset>) -> Result<()> {
    let st = sess.data_stats();
    let (n_train, n_val) = sess.split_sizes();
    if let Some(rows) = sess.packed_rows() {
        eprintln!("packing  {n_train} training examples in {rows} rows of at most {} tokens", cfg.max_len);
    }
    eprintln!(
        "data     {}: {} examples ({} training, {} validation{}), {} tokens, {} counted by the loss, longest {}{}",
        data_path.display(),
        st.examples,
        n_train,
        n_val,
        val_data.map(|v| format!(" + {} in {}", v.len(), v.file())).unwrap_or_default(),
        st.tokens,
        st.counted_tokens,
        st.max_tokens,
        if st.truncated > 0 { format!(", {} cut to {} tokens", st.truncated, cfg.max_len) } else { String::new() }
    );
    let l = sess.lora_config();
    eprintln!(
        "lora     r {} alpha {} dropout {}{} on {}; {} steps of batch {}x{}, lr {} {} (warmup {}), seed {}",
        l.r, l.lora_alpha, l.lora_dropout, if l.use_dora { " DoRA" } else { "" }, targets_text(l, model)?, cfg.steps, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.schedule.name(), cfg.warmup(), cfg.seed
    );
    Ok(())
}

/// Runs `qlora train`.
pub fn run(args: TrainArgs) -> Result<i32> {
    // First thing, so that Ctrl-C at any moment ends the run in order.
    handle_ctrl_c()?;
    let args = args.merged()?;
    let model_path = args.model.clone().context("no model: give MODEL (a .gguf file or a Hugging Face folder) or `model` in --config")?;
    let data_path = args.data.clone().context("no training data: give --data FILE.jsonl or `data` in --config")?;
    let out = args.out_dir();
    let format = Format::parse(args.format.as_deref().unwrap_or("auto"))?;
    let data = Dataset::from_jsonl_file(&data_path, format)?;
    let val_data = args.val_data.as_ref().map(|p| Dataset::from_jsonl_file(p, format)).transpose()?;
    let cfg = args.train_config(data.len())?;
    let quant = args.quant.quant()?;
    let prompts = args.prompts.as_ref().map(|p| common::read_prompts(p)).transpose()?;
    let sample_tokens = args.sample_tokens.unwrap_or(64);

    // The effective settings, kept with the run (and compared on --resume).
    let mut eff = args.clone();
    eff.steps = Some(cfg.steps);
    eff.epochs = None;
    let run_toml = toml::to_string(&Value::Object(to_map(&eff)))?;
    let now_map = to_map(&eff);
    let settings = Value::Object(RESUME_KEYS.iter().filter_map(|k| now_map.get(*k).map(|v| (k.to_string(), v.clone()))).collect());
    let ck_dir = out.join(CHECKPOINT_DIR);
    if args.resume && args.emit_recipe.is_some() {
        bail!("--emit-recipe with --resume: a recipe starts a run (from its initial adapter); emit it without --resume");
    }
    if args.resume {
        check_resumable(&out, &Value::Object(now_map.clone()))?;
    }

    let ctx = block_on(GpuContext::new())?;
    let gi = ctx.info();
    eprintln!("gpu      {} ({}, {})", gi.name, gi.backend, gi.device_type);
    let t_load = Instant::now();
    // With --qlora each projection is quantized as it is read: the model is never all f32 here.
    let src = common::open_model_with(
        &model_path,
        match quant {
            BaseQuant::F32 => None,
            BaseQuant::Nf4 { blocksize, double_quant } => Some((blocksize, double_quant)),
        },
    )?;
    let mut cfg = cfg;
    let plan = plan_memory(&args, &cfg, &src, quant, &model_path)?;
    cfg.grad_checkpoint = plan.grad_checkpoint;
    let pos = common::positions_for(&src, cfg.max_len + sample_tokens + 256);
    let model = src.upload(&ctx, quant, pos)?;
    let (pb_bytes, rest) = model.model.weights.device_bytes();
    eprintln!(
        "model    {} ({} layers, hidden {}), base {} : projections {}, embeddings and norms {}; loaded in {:.1} s",
        model.name,
        model.model.cfg.layers,
        model.model.cfg.hidden,
        quant.name(),
        mib(pb_bytes as u64),
        mib(rest as u64),
        t_load.elapsed().as_secs_f64()
    );
    let init = args.init_adapter.as_ref().map(|d| common::open_adapter(d, &model)).transpose()?;
    if let (Some(h), Some(true)) = (&init, args.use_dora) {
        if !h.config.use_dora {
            bail!(
                "--use-dora: the --init-adapter {} is a plain LoRA adapter (use_dora false in its config), and its \
                 config replaces the LoRA flags; start without --init-adapter to train DoRA",
                args.init_adapter.as_ref().unwrap().display()
            );
        }
    }
    let mut sess = if args.resume {
        let (ck, saved) = load_checkpoint_with(&ck_dir, &model.model.cfg).map_err(|e| anyhow::anyhow!("--resume: {e}"))?;
        let diff = settings_diff(&saved, &settings);
        if !diff.is_empty() {
            bail!("--resume: the checkpoint {} was written by a run with other settings: {}", ck_dir.display(), qlora_webgpu::error::quote(&diff.join("; ")));
        }
        TrainSession::resume(&ctx, &model, &data, cfg.clone(), &ck).map_err(|e| anyhow::anyhow!("--resume from {}: {e}", ck_dir.display()))?
    } else {
        TrainSession::new(&ctx, &model, &data, cfg.clone(), init.as_ref())?
    };
    if let Some(dir) = &args.emit_recipe {
        let r = crate::recipe::Recipe {
            model_path: &model_path,
            data_path: &data_path,
            data: &data,
            val_data: val_data.as_ref(),
            cfg: &cfg,
            quant,
            model: &model,
            sess: &sess,
            eval_every: args.eval_every,
        };
        crate::recipe::emit(dir, &r, &ctx)?;
        return Ok(0);
    }
    let (n_train, n_val) = sess.split_sizes();
    print_summary(&sess, &model, &cfg, &data_path, val_data.as_ref())?;

    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create the output folder", out.display()))?;
    write_atomic(&out.join(RUN_CONFIG), run_toml.as_bytes())?;
    let metrics_path = out.join(METRICS);
    let (kept, tr, va) = if args.resume { metrics_upto(&metrics_path, sess.step_count())? } else { (String::new(), vec![], vec![]) };
    std::fs::write(&metrics_path, kept)?;
    let metrics = std::fs::OpenOptions::new().append(true).open(&metrics_path)?;
    let mut run = Run { settings: settings.clone(), ctx: ctx.clone(), model: &model, out: out.clone(), metrics, train_points: tr, val_points: va };

    let before = match &prompts {
        Some(p) if !args.resume => {
            eprintln!("answering {} prompts before training...", p.len());
            Some(answers(&ctx, &model, &qlora_webgpu::model::llama::LoraSet::default(), p, sample_tokens)?)
        }
        _ => None,
    };

    // --val-data: tokenized once, with the run's encoding options.
    let val_set = val_data.as_ref().map(|v| session::EvalSet::new(&model, v, cfg.encode_options(), cfg.batch_size)).transpose()?;
    let val_loss = |s: &TrainSession| -> Result<Option<f64>> {
        match &val_set {
            Some(v) => Ok(Some(block_on(v.loss(&ctx, &model, s.lora_set()))?)),
            None => Ok(block_on(s.validation_loss())?),
        }
    };
    let has_val = val_data.is_some() || n_val > 0;
    let save_every = args.save_every.unwrap_or(50).max(1);
    if sess.step_count() == 0 && has_val {
        if let Some(v) = val_loss(&sess)? {
            run.val_points.push((0, v));
            run.metrics.write_all(metrics_line(json!({"step": 0, "val_loss": v, "val_ppl": v.exp()})).as_bytes())?;
        }
    }

    if STOP.load(Ordering::SeqCst) && !args.resume && sess.step_count() == 0 {
        eprintln!("stopped  by Ctrl-C before the first step: no checkpoint written");
        return Ok(EXIT_INTERRUPTED);
    }

    let every = Every { eval: args.eval_every.unwrap_or((cfg.steps / 10).max(1)), save: save_every, has_val };
    // An epoch is the training examples, or with --packing the rows they make.
    let per_epoch = sess.packed_rows().unwrap_or(n_train);
    let (interrupted, steps_run, tokens_total, secs) = train_steps(&mut sess, &mut run, &cfg, per_epoch, &every, &val_loss, &ck_dir, &out, args.resume)?;
    if steps_run > 0 {
        eprintln!(
            "trained  {} steps in {:.1} s ({:.2} s/step, {:.0} tokens/s), peak GPU memory {}",
            steps_run,
            secs,
            secs / steps_run as f64,
            tokens_total as f64 / secs,
            mib(ctx.pool_stats().peak_in_use)
        );
    }
    if interrupted {
        eprintln!(
            "stopped  at step {}: checkpoint in {}, adapter so far in {}; continue with the same command and --resume",
            sess.step_count(),
            ck_dir.display(),
            out.display()
        );
        return Ok(EXIT_INTERRUPTED);
    }
    run.save_adapter(&sess)?;
    run.plot()?;
    if let (Some(first), Some(last)) = (run.train_points.first(), run.train_points.last()) {
        eprintln!("loss     {:.4} (step {}) -> {:.4} (step {})", first.1, first.0, last.1, last.0);
    }
    if let (Some(first), Some(last)) = (run.val_points.first(), run.val_points.last()) {
        eprintln!("val loss {:.4} (step {}) -> {:.4} (step {})", first.1, first.0, last.1, last.0);
    }
    if let Some(p) = &prompts {
        let after = answers(&ctx, &model, sess.lora_set(), p, sample_tokens)?;
        write_samples(&out.join(SAMPLES), p, before.as_deref(), &after)?;
    }
    eprintln!(
        "saved    adapter {} + {}, metrics {}, loss plot {}, checkpoint {} (all in {})",
        CONFIG_FILE,
        WEIGHTS_FILE,
        METRICS,
        PLOT,
        CHECKPOINT_DIR,
        out.display()
    );
    std::io::stdout().flush()?;
    Ok(0)
}
