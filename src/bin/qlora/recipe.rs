//! `qlora train ... --emit-recipe DIR`: instead of training, write a Python recipe that runs the
//! same training with TRL's SFTTrainer + PEFT (+ bitsandbytes for `--qlora`), to scale out with
//! `accelerate launch` (DDP, FSDP, DeepSpeed):
//! - `train_trl.py`: the script; the run's settings are constants at its top;
//! - `data.jsonl` (and `val.jsonl`): the examples exactly as `qlora train` tokenizes them
//!   (`input_ids`, `labels` with -100 where the loss does not count), so the loss mask is the
//!   same by construction; training examples in file order (after the validation split);
//! - `adapter_init/`: the run's initial adapter in PEFT's layout (the seeded init, or the
//!   `--init-adapter`), loaded with `PeftModel.from_pretrained(..., is_trainable=True)`;
//! - `accelerate_config.yaml`: one process on one machine, with how to scale out;
//! - `README.md`: how to run it, what maps to what, what differs.

use anyhow::{bail, Context, Result};
use qlora_webgpu::data::dataset::{self, Dataset, Example, TokenizedDataset};
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::lora::config::TargetModules;
use qlora_webgpu::lora::peft::{CONFIG_FILE, WEIGHTS_FILE};
use qlora_webgpu::io::files::write_atomic;
use qlora_webgpu::session::{BaseQuant, LoadedModel, TrainConfig, TrainSession};
use std::fmt::Write as _;
use std::path::Path;

/// The script inside the recipe folder.
pub const SCRIPT: &str = "train_trl.py";
/// The tokenized training examples.
pub const DATA: &str = "data.jsonl";
/// The tokenized validation examples (when the run has validation).
pub const VAL_DATA: &str = "val.jsonl";
/// The initial adapter (PEFT layout).
pub const ADAPTER_INIT: &str = "adapter_init";
/// The Accelerate config.
pub const ACCELERATE: &str = "accelerate_config.yaml";
/// The recipe's README.
pub const README: &str = "README.md";

/// What the recipe is written from.
pub struct Recipe<'a> {
    pub model_path: &'a Path,
    pub data_path: &'a Path,
    pub data: &'a Dataset,
    pub val_data: Option<&'a Dataset>,
    pub cfg: &'a TrainConfig,
    pub quant: BaseQuant,
    pub model: &'a LoadedModel,
    pub sess: &'a TrainSession,
    pub eval_every: Option<u64>,
}

/// A Python literal of a string (JSON's escapes are Python's too).
fn py_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// A Python float literal that reads back as the same f64.
fn py_f64(x: f64) -> String {
    let s = format!("{x:?}");
    if s.contains(['.', 'e', 'n', 'i']) {
        s
    } else {
        format!("{s}.0")
    }
}

fn jsonl(examples: &[Example]) -> String {
    let mut s = String::new();
    for e in examples {
        s.push_str(&serde_json::json!({"input_ids": e.ids, "labels": e.labels}).to_string());
        s.push('\n');
    }
    s
}

/// Writes the recipe into `dir` (created; files in it are replaced) and says what it wrote.
pub fn emit(dir: &Path, r: &Recipe, ctx: &GpuContext) -> Result<()> {
    let cfg = r.cfg;
    std::fs::create_dir_all(dir.join(ADAPTER_INIT)).with_context(|| format!("{}: cannot create the recipe folder", dir.display()))?;

    // The examples exactly as the run tokenizes them (TrainSession does the same steps).
    let enc = r.model.encoder(cfg.encode_options())?;
    let all = r.data.tokenize(&enc)?;
    let (train, val): (TokenizedDataset, TokenizedDataset) = match cfg.validation {
        Some(split) => all.split_validation(split, cfg.seed)?,
        None => (all, TokenizedDataset::from_examples(Vec::new())),
    };
    let val = match r.val_data {
        Some(v) => v.tokenize(&enc)?,
        None => val,
    };
    write_atomic(&dir.join(DATA), jsonl(train.examples()).as_bytes())?;
    if !val.is_empty() {
        write_atomic(&dir.join(VAL_DATA), jsonl(val.examples()).as_bytes())?;
    }

    // The initial adapter, as `qlora train` starts from it.
    let (acfg, st) = block_on(r.sess.adapter_files(ctx, Some(&r.model.name)))?;
    write_atomic(&dir.join(ADAPTER_INIT).join(CONFIG_FILE), acfg.as_bytes())?;
    write_atomic(&dir.join(ADAPTER_INIT).join(WEIGHTS_FILE), &st)?;

    let model_abs = std::fs::canonicalize(r.model_path).unwrap_or_else(|_| r.model_path.to_path_buf());
    let (model_dir, gguf_file) = if model_abs.is_dir() {
        (model_abs.display().to_string(), None)
    } else {
        let parent = model_abs.parent().map(|p| p.display().to_string()).unwrap_or_else(|| ".".into());
        (parent, model_abs.file_name().map(|f| f.to_string_lossy().into_owned()))
    };
    let (qlora, dq, blocksize) = match r.quant {
        BaseQuant::F32 => (false, true, 64),
        BaseQuant::Nf4 { blocksize, double_quant } => (true, double_quant, blocksize),
    };
    if qlora && blocksize != 64 {
        bail!("--emit-recipe with --bnb-4bit-blocksize {blocksize}: bitsandbytes' 4-bit layers in transformers use blocks of 64 only");
    }
    let l = r.sess.lora_config();
    let targets = match &l.target_modules {
        TargetModules::AllLinear => py_str("all-linear"),
        TargetModules::Names(n) => format!("[{}]", n.iter().map(|s| py_str(s)).collect::<Vec<_>>().join(", ")),
        TargetModules::Regex(p) => py_str(p),
    };
    let pad = dataset::pad_id(&r.model.tokenizer);
    let eval_every = r.eval_every.unwrap_or((cfg.steps / 10).max(1));

    let mut h = String::new();
    let w = &mut h;
    writeln!(w, "# The run, as `qlora train` would do it (written by --emit-recipe).")?;
    writeln!(w, "MODEL = {}  # a Hugging Face folder, or the folder of GGUF_FILE", py_str(&model_dir))?;
    writeln!(w, "GGUF_FILE = {}", gguf_file.as_deref().map_or("None".to_owned(), py_str))?;
    writeln!(w, "QLORA = {}  # --qlora: NF4 base (bitsandbytes), compute in f32", py_bool(qlora))?;
    writeln!(w, "BNB_4BIT_USE_DOUBLE_QUANT = {}", py_bool(dq))?;
    writeln!(w, "LORA = dict(r={}, lora_alpha={}, lora_dropout={}, target_modules={}, use_rslora={}, use_dora={})", l.r, py_f64(l.lora_alpha), py_f64(l.lora_dropout), targets, py_bool(l.use_rslora), py_bool(l.use_dora))?;
    writeln!(w, "STEPS = {}", cfg.steps)?;
    writeln!(w, "BATCH_SIZE = {}  # examples per micro-batch (per process)", cfg.batch_size)?;
    writeln!(w, "GRAD_ACCUM = {}", cfg.grad_accum)?;
    writeln!(w, "MAX_LEN = {}  # the examples in {DATA} are already cut to it", cfg.max_len)?;
    writeln!(w, "LR = {}", py_f64(cfg.lr))?;
    writeln!(w, "LR_SCHEDULER = {}", py_str(cfg.schedule.name()))?;
    writeln!(w, "WARMUP_STEPS = {}", cfg.warmup())?;
    writeln!(w, "WEIGHT_DECAY = {}", py_f64(cfg.weight_decay))?;
    writeln!(w, "ADAM_BETAS = ({}, {})", py_f64(cfg.betas.0), py_f64(cfg.betas.1))?;
    writeln!(w, "ADAM_EPS = {}", py_f64(cfg.eps))?;
    writeln!(w, "MAX_GRAD_NORM = {}  # 0: no clipping", py_f64(cfg.max_grad_norm.map_or(0.0, f64::from)))?;
    writeln!(w, "SEED = {}", cfg.seed)?;
    writeln!(w, "SHUFFLE = {}  # False: file order, epoch after epoch (--no-shuffle)", py_bool(cfg.shuffle))?;
    writeln!(w, "PACKING = {}", py_bool(cfg.packing))?;
    writeln!(w, "GRAD_CHECKPOINT = {}", py_bool(cfg.grad_checkpoint))?;
    writeln!(w, "EVAL_EVERY = {eval_every}")?;
    writeln!(w, "PAD_ID = {pad}")?;

    let script = SCRIPT_TEMPLATE.replace("@SETTINGS@", h.trim_end());
    write_atomic(&dir.join(SCRIPT), script.as_bytes())?;
    write_atomic(&dir.join(ACCELERATE), ACCELERATE_CONFIG.as_bytes())?;

    // The README: the run's own figures, then the mapping.
    let per_epoch = train.len().div_ceil(cfg.batch_size);
    let crosses = (cfg.steps * cfg.grad_accum as u64) > per_epoch as u64 && per_epoch % cfg.grad_accum != 0 && !cfg.packing;
    let mut notes = String::new();
    if crosses {
        let _ = writeln!(
            notes,
            "- **This run's order differs after the first epoch**: an epoch is {per_epoch} micro-batches, not a multiple of \
             --grad-accum {}. `qlora train` lets an optimizer step take micro-batches from two epochs; transformers' Trainer \
             ends each epoch with a shorter step. Losses match up to the end of the first epoch.",
            cfg.grad_accum
        );
    }
    if l.lora_dropout > 0.0 {
        let _ = writeln!(notes, "- **Dropout {}**: the dropout masks are drawn by torch, not by our generator; the losses agree in distribution, not number for number (with dropout 0 they agree to f32 rounding).", l.lora_dropout);
    }
    if qlora {
        let _ = writeln!(notes, "- **--qlora**: bitsandbytes quantizes the base to NF4 on a CUDA GPU; our NF4 follows bitsandbytes' format (same codebook, blocks of 64{}), so the base weights agree, and compute is f32 in both.", if dq { ", double-quantized scales" } else { "" });
    }
    if gguf_file.is_some() {
        let _ = writeln!(notes, "- **GGUF base**: transformers dequantizes {} to f32 when loading it (`gguf_file=`), as `qlora` does; with --qlora, convert it to a Hugging Face folder first if your transformers refuses a GGUF file with a quantization config.", gguf_file.as_deref().unwrap_or(""));
    }
    let readme = README_TEMPLATE
        .replace("@DATA_FILE@", &r.data_path.display().to_string())
        .replace("@N_TRAIN@", &train.len().to_string())
        .replace("@N_VAL@", &val.len().to_string())
        .replace("@STEPS@", &cfg.steps.to_string())
        .replace("@NOTES@", &if notes.is_empty() { String::new() } else { format!("\n## This run\n\n{}", notes.trim_end()) });
    write_atomic(&dir.join(README), readme.as_bytes())?;
    eprintln!(
        "recipe   {} written in {} (nothing trained): {}, {}, {}/, {}; run it with `python {}` or `accelerate launch --config_file {} {}`",
        SCRIPT,
        dir.display(),
        DATA,
        ACCELERATE,
        ADAPTER_INIT,
        README,
        dir.join(SCRIPT).display(),
        dir.join(ACCELERATE).display(),
        dir.join(SCRIPT).display()
    );
    Ok(())
}

const ACCELERATE_CONFIG: &str = r#"# Written by `qlora train --emit-recipe`: one process on this machine, which is what
# `python train_trl.py` does as well. Run it with
#   accelerate launch --config_file accelerate_config.yaml train_trl.py
# To scale out, edit this file (or write a new one with `accelerate config`):
# - DDP on N GPUs: distributed_type: MULTI_GPU and num_processes: N. Each process takes
#   BATCH_SIZE examples per micro-batch, so the global batch is N x BATCH_SIZE x GRAD_ACCUM:
#   divide GRAD_ACCUM (or BATCH_SIZE) in train_trl.py by N to keep the run's batch.
# - FSDP: distributed_type: FSDP, with an fsdp_config block (e.g. fsdp_version: 2,
#   fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, fsdp_transformer_layer_cls_to_wrap:
#   LlamaDecoderLayer, fsdp_state_dict_type: SHARDED_STATE_DICT).
# - DeepSpeed: distributed_type: DEEPSPEED, with deepspeed_config: {zero_stage: 2} (or 3).
# - Several machines: num_machines, machine_rank, main_process_ip and main_process_port.
# Loss: the mean over the counted tokens of the whole global batch (transformers counts the
# tokens of every process when average_tokens_across_devices is on, its default).
compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
mixed_precision: 'no'
num_machines: 1
num_processes: 1
machine_rank: 0
gpu_ids: all
use_cpu: false
"#;

const SCRIPT_TEMPLATE: &str = r#"#!/usr/bin/env python3
"""Train the adapter that `qlora train` would train, with TRL's SFTTrainer + PEFT (+ bitsandbytes
for QLoRA), written by `qlora train ... --emit-recipe`. See README.md next to this file.

    python train_trl.py                      # one process (CPU or one GPU)
    accelerate launch --config_file accelerate_config.yaml train_trl.py   # DDP / FSDP / DeepSpeed

The examples come tokenized in data.jsonl (input_ids, and labels with -100 where the loss does
not count), exactly as `qlora train` tokenizes them; the adapter starts from adapter_init/, the
weights `qlora train` starts from. The loss of a step is the mean over the counted tokens of all
its micro-batches (transformers' num_items_in_batch), as in `qlora train`.
"""
import argparse
import json
import os

@SETTINGS@

HERE = os.path.dirname(os.path.abspath(__file__))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join(HERE, "out"), help="where the adapter and metrics.jsonl go")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps (default: the run's)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from peft import PeftModel
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)

    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    if GGUF_FILE:
        load["gguf_file"] = GGUF_FILE
    if QLORA:
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=BNB_4BIT_USE_DOUBLE_QUANT,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(MODEL, **load)
    tok = AutoTokenizer.from_pretrained(MODEL, **({"gguf_file": GGUF_FILE} if GGUF_FILE else {}))
    if QLORA:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=GRAD_CHECKPOINT)
    # The run's initial adapter (its adapter_config.json holds LORA above).
    model = PeftModel.from_pretrained(model, os.path.join(HERE, "adapter_init"), is_trainable=True)
    got = model.peft_config["default"]
    for k, v in LORA.items():
        have = getattr(got, k)
        if k == "target_modules":
            continue  # PEFT resolves "all-linear" to the names
        assert have == v, f"adapter_init's {k} is {have!r}, the run's is {v!r}"

    train = Dataset.from_list(read_jsonl(os.path.join(HERE, "data.jsonl")))
    val_path = os.path.join(HERE, "val.jsonl")
    val = Dataset.from_list(read_jsonl(val_path)) if os.path.exists(val_path) else None

    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        learning_rate=LR,
        lr_scheduler_type=LR_SCHEDULER,
        warmup_steps=WARMUP_STEPS,
        weight_decay=WEIGHT_DECAY,
        optim="adamw_torch",
        adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1],
        adam_epsilon=ADAM_EPS,
        max_grad_norm=MAX_GRAD_NORM,
        seed=SEED,
        data_seed=SEED,
        bf16=False,
        fp16=False,
        gradient_checkpointing=GRAD_CHECKPOINT,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="steps" if val is not None else "no",
        eval_steps=EVAL_EVERY,
        report_to="none",
        use_cpu=args.cpu,
        dataloader_drop_last=False,
        # The data is tokenized already: TRL only packs it (PACKING), never re-tokenizes it.
        dataset_kwargs={"skip_prepare_dataset": not PACKING},
        packing=PACKING,
        packing_strategy="bfd",
        max_length=MAX_LEN,
    )

    class RecipeTrainer(SFTTrainer):
        def _get_train_sampler(self, *a, **kw):
            if not SHUFFLE:
                ds = a[0] if a and a[0] is not None else kw.get("train_dataset") or self.train_dataset
                return SequentialSampler(ds)
            return super()._get_train_sampler(*a, **kw)

    os.makedirs(args.output_dir, exist_ok=True)
    metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "w")

    class Metrics(TrainerCallback):
        """Every step's loss at full precision, as `qlora train` writes metrics.jsonl."""

        def on_log(self, _args, state, _control, logs=None, **kw):
            row = {"step": state.global_step}
            for k in ("loss", "grad_norm", "learning_rate", "eval_loss"):
                if logs and k in logs:
                    row[{"eval_loss": "val_loss"}.get(k, k)] = float(logs[k])
            if len(row) > 1:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()

    trainer = RecipeTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tok,
        # Padding and labels as `qlora`: right padding, -100 past each example. With PACKING,
        # TRL's own padding-free collator (position ids restart per example).
        data_collator=None if PACKING else DataCollatorForLanguageModeling(pad_token_id=PAD_ID),
        callbacks=[Metrics()],
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    metrics.close()


if __name__ == "__main__":
    main()
"#;

const README_TEMPLATE: &str = r#"# A TRL recipe of a `qlora train` run

Written by `qlora train ... --emit-recipe`, instead of training. It trains the same adapter with
TRL's SFTTrainer + PEFT (+ bitsandbytes for `--qlora`) and runs wherever they run: one GPU, or many
with `accelerate launch` (DDP, FSDP, DeepSpeed).

    pip install torch transformers peft trl accelerate datasets   # + bitsandbytes for --qlora
    python train_trl.py                  # one process; --cpu, --threads N, --steps N, --output-dir DIR
    accelerate launch --config_file accelerate_config.yaml train_trl.py

The adapter (PEFT files) and `metrics.jsonl` (every step's loss) go to `out/`; the adapter loads
in `qlora generate --adapter out`, `qlora merge`, PEFT and the browser package.

## Files

- `train_trl.py`: the script; the run's settings are the constants at its top.
- `data.jsonl`: the @N_TRAIN@ training examples of @DATA_FILE@ (after the validation split), in file
  order, **tokenized by `qlora`**: `input_ids` and `labels` (-100 where the loss does not count).
  `val.jsonl`: the @N_VAL@ validation examples, likewise (absent without validation).
  We chose to write the tokens rather than re-tokenize in Python: the chat template, the text
  formats, the appended eos and the loss mask (prompt and user turns masked unless
  `--train-on-prompt`) are then the run's by construction.
- `adapter_init/`: the run's initial adapter in PEFT's layout (the seeded init, or the
  `--init-adapter`), loaded with `PeftModel.from_pretrained(..., is_trainable=True)`: training
  starts from exactly the weights `qlora train` starts from.
- `accelerate_config.yaml`: one process on one machine; its comments say how to scale out.

## What maps to what

| `qlora train` | recipe |
|---|---|
| MODEL (.gguf or folder) | `AutoModelForCausalLM.from_pretrained(MODEL, gguf_file=...)`, f32 |
| `--qlora`, `--bnb-4bit-use-double-quant` | `BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute f32)` |
| `-r`, `--lora-alpha`, `--lora-dropout`, `--target-modules`, `--use-rslora`, `--use-dora` | `adapter_init/adapter_config.json` (the `LORA` constant) |
| `--format`, chat template, `--no-append-eos`, `--train-on-prompt`, `--max-len` | the tokens in `data.jsonl` |
| `--steps` (or `--epochs`) | `max_steps` |
| `--batch-size`, `--grad-accum` | `per_device_train_batch_size`, `gradient_accumulation_steps` |
| `--lr`, `--lr-scheduler`, `--warmup-steps` | `learning_rate`, `lr_scheduler_type` (`constant_with_warmup`, `linear`, `cosine`), `warmup_steps` |
| AdamW (betas 0.9, 0.999, eps 1e-8), `--weight-decay` | `optim="adamw_torch"`, `adam_beta1/2`, `adam_epsilon`, `weight_decay` |
| `--max-grad-norm` | `max_grad_norm` (0: off) |
| `--seed` | `seed`, `data_seed` |
| `--no-shuffle` | a trainer whose `_get_train_sampler` returns a `SequentialSampler` |
| `--packing` | `SFTConfig(packing=True, packing_strategy="bfd")`, padding-free (position ids restart per example) |
| `--grad-checkpoint` | `gradient_checkpointing` |
| `--val-data` / `--val-fraction`, `--eval-every` | `eval_dataset` (`val.jsonl`), `eval_steps` |

**Loss**: the mean over the counted tokens of all micro-batches of a step (one mean over the
whole accumulated batch, not a mean of per-example or per-micro-batch means). transformers'
Trainer does the same when the model takes `num_items_in_batch` (causal LMs do): each
micro-batch's summed token loss is divided by the step's total count of counted tokens.

## What differs

- The data order with shuffling on: our sampler's permutation is not torch's `RandomSampler`'s;
  the same examples are seen per epoch, in another order. With `--no-shuffle` the order is the same.
- Across an epoch boundary with `--grad-accum` > 1: `qlora` lets a step take micro-batches from two
  epochs, transformers ends each epoch with a shorter step (same order, other grouping).
- LoRA dropout masks (torch's generator, not ours): with dropout > 0 the runs agree in
  distribution only.
- With `--packing`, TRL packs the rows itself (best-fit decreasing, as `qlora` does, but the rows
  may group examples differently) and trains padding-free: position ids restart per example and
  transformers keeps attention within each example (FlashAttention's varlen kernels on a GPU; on
  the CPU a block-diagonal mask built from the position ids).
- The validation loss: transformers' evaluation averages the mean losses of the evaluation
  batches; `qlora` takes one mean over all counted validation tokens (equal when the batches
  count equally many tokens).
- Under DDP the global batch is the number of processes times the per-device batch: see
  `accelerate_config.yaml`.
@NOTES@
"#;
