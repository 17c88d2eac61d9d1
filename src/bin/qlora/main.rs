//! The `qlora` command line (native only): `train` (LoRA / QLoRA on a JSONL data set),
//! `generate` (with or without an adapter, streaming), `chat` (interactive, several adapters), `eval` (loss and perplexity), `merge`
//! (adapter into the base, out to a Hugging Face folder), `info` (a model's shape and memory),
//! `bench` (SmolLM2-135M-shaped training steps) and `gpu` (the adapter wgpu selects).

mod bench;
mod chat;
mod common;
mod export;
mod plot;
mod recipe;
mod train;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use common::{QuantArgs, SamplingArgs};
use qlora_webgpu::data::dataset::{Dataset, EncodeOptions, Format};
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::gguf::load_gguf;
use qlora_webgpu::io::hf::{load_hf_dir, MmapDir};
use qlora_webgpu::io::safetensors::SafeTensorsFile;
use qlora_webgpu::io::{HostModel, TensorRef};
use qlora_webgpu::lora::merge::{merge_adapter, merged_folder, write_folder, BaseTensor, OutDtype};
use qlora_webgpu::model::llama::LoraSet;
use qlora_webgpu::session::{self, SourceKind};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "qlora", version, about = "LoRA and QLoRA fine-tuning of Llama-family models on WebGPU")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a LoRA (or, with --qlora, QLoRA) adapter on a JSONL data set.
    #[command(after_help = "Defaults: r 16, alpha 16, all seven projections, dropout 0, AdamW lr 2e-4 without weight decay,
cosine schedule after a linear warmup over 3% of the steps, gradient clipping at 1.0, batch 4, max length 512;
with --qlora the base projections are NF4 (block 64) with double quantization.

OUT receives: adapter_config.json + adapter_model.safetensors (PEFT's layout), metrics.jsonl (one line per step),
loss.svg, train_config.toml (the effective settings) and checkpoint/ (to continue with --resume).
Ctrl-C finishes the current step, writes the checkpoint and exits (code 130).

Examples:
  qlora train SmolLM2-135M-Instruct.Q4_1.gguf --data data/pirate.jsonl --qlora --steps 60 --out pirate-adapter
  qlora train ~/models/Llama-3.2-1B --data chat.jsonl --epochs 2 --val-fraction 0.1 -r 8 --lora-alpha 16
  qlora train --config run.toml --steps 200        (flags override the file)
  qlora train --config run.toml --resume           (continue after Ctrl-C or a crash)
  qlora train MODEL --data d.jsonl --init-adapter old-adapter --no-shuffle --lr-scheduler constant --warmup-steps 0
  qlora train MODEL --data d.jsonl --qlora --steps 500 --emit-recipe recipe   (a TRL + PEFT script of the run, for accelerate launch)")]
    Train(train::TrainArgs),
    /// Generate text (streamed), with or without an adapter.
    #[command(after_help = "Examples:
  qlora generate SmolLM2-135M-Instruct.Q4_1.gguf --prompt \"What is the capital of France?\"
  qlora generate MODEL --adapter pirate-adapter --prompt \"How do I stay warm?\" --temperature 0.7 --top-p 0.9
  echo \"Once upon a time\" | qlora generate MODEL --raw")]
    Generate(GenerateArgs),
    /// An interactive chat in the terminal (streamed answers, history, several adapters).
    #[command(after_help = "Examples:
  qlora chat SmolLM2-135M-Instruct.Q4_1.gguf
  qlora chat MODEL --adapter pirate-adapter --adapter formal=runs/formal --system \"Be brief.\"
In the chat: /adapter NAME (or /adapter base) switches adapters without reloading the model,
/system TEXT sets the system message, /reset forgets the conversation, /exit (or end of input) quits.")]
    Chat(chat::ChatArgs),
    /// Loss and perplexity of a model (with or without an adapter) on a JSONL data set.
    #[command(after_help = "Examples:\n  qlora eval MODEL --data data/pirate_eval.jsonl\n  qlora eval MODEL --adapter pirate-adapter --data held-out.jsonl --max-len 96\nGive the encoding options the adapter was trained with (--format, --max-len, --train-on-prompt,\n--no-append-eos) to score the tokens training scored.")]
    Eval(EvalArgs),
    /// Merge an adapter into its base model and write a Hugging Face folder (dense weights).
    #[command(after_help = "Examples:\n  qlora merge SmolLM2-135M-Instruct.Q4_1.gguf --adapter pirate-adapter --out smollm2-pirate\n  qlora merge ~/models/base --adapter a --out merged --dtype bf16\n  qlora merge SmolLM2-135M-Instruct.Q4_1.gguf --adapter pirate-adapter --out smollm2-pirate.gguf --dtype q8_0   (a GGUF for llama.cpp)")]
    Merge(MergeArgs),
    /// Write a PEFT adapter as a llama.cpp GGUF LoRA adapter (or, without --adapter, the model as a GGUF).
    #[command(after_help = "Examples:
  qlora export SmolLM2-135M-Instruct.Q4_1.gguf --adapter pirate-adapter --out pirate-lora.gguf
  qlora export ~/models/Llama-3.2-1B --adapter a --out a.gguf --dtype f16
  qlora export SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-f32.gguf --dtype f32   (the model itself)

llama.cpp: llama-cli -m BASE.gguf --lora pirate-lora.gguf (BASE as llama.cpp converted it, or our export).
DoRA adapters and adapters whose modules need different alpha/r are refused (llama.cpp cannot apply them): merge instead.")]
    Export(export::ExportArgs),
    /// Architecture, parameter count, stored dtypes and the memory a model needs in f32, f16 and NF4.
    #[command(after_help = "Examples:\n  qlora info ~/models/SmolLM2-135M-Instruct\n  qlora info SmolLM2-135M-Instruct.Q4_1.gguf")]
    Info {
        /// A Hugging Face model folder (config.json + *.safetensors) or a .gguf file.
        model: PathBuf,
    },
    /// Time SmolLM2-135M-shaped QLoRA training steps (random weights): step time, tokens/s, peak GPU memory.
    #[command(after_help = "Examples:\n  qlora bench\n  qlora bench --shapes 1x256,4x128 --steps 5 --model SmolLM2-135M-Instruct.Q4_1.gguf")]
    Bench(bench::BenchArgs),
    /// The GPU adapter wgpu selects: name, backend, limits and optional features.
    Gpu,
}

#[derive(Args)]
struct GenerateArgs {
    /// The base model: a .gguf file or a Hugging Face folder.
    model: PathBuf,
    /// A PEFT adapter folder to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt (a user message under the chat template, or raw text with --raw); read from
    /// standard input when absent.
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// A system message (chat only).
    #[arg(long)]
    system: Option<String>,
    /// Use the prompt as raw text, without the chat template.
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    quant: QuantArgs,
    /// Also write a JSON file with the prompt's token ids, the logits at its last position and
    /// the generated ids (for comparing with another implementation, e.g. llama.cpp).
    #[arg(long, value_name = "FILE")]
    dump_logits: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    /// The base model: a .gguf file or a Hugging Face folder.
    model: PathBuf,
    /// JSONL data (the formats `train` reads).
    #[arg(long)]
    data: PathBuf,
    /// A PEFT adapter folder to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Data format: auto, text, prompt-completion, messages, alpaca.
    #[arg(long, default_value = "auto")]
    format: String,
    /// Longest example in tokens (longer ones keep their first tokens), as in `train`.
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Examples per forward pass (the loss is one mean over all counted tokens either way).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Count the loss on prompts and user turns too (as `train --train-on-prompt`).
    #[arg(long)]
    train_on_prompt: bool,
    /// Do not append eos to text and prompt-completion examples (as `train --no-append-eos`).
    #[arg(long)]
    no_append_eos: bool,
    #[command(flatten)]
    quant: QuantArgs,
}

#[derive(Args)]
struct MergeArgs {
    /// The base model: a .gguf file or a Hugging Face folder.
    model: PathBuf,
    /// The PEFT adapter folder to merge.
    #[arg(long)]
    adapter: PathBuf,
    /// The output folder (config.json, model.safetensors, tokenizer files), or a .gguf file
    /// (a complete GGUF model for llama.cpp: hyperparameters, tokenizer, chat template).
    #[arg(long)]
    out: PathBuf,
    /// Output dtype: f32, f16, bf16 [default: the base's dtype for a Hugging Face folder, f32 for GGUF];
    /// for a .gguf output f32, f16 or q8_0 [default f16].
    #[arg(long)]
    dtype: Option<String>,
}

/// Mesa's Vulkan device-selection layer (an implicit layer installed with Mesa's drivers) tries
/// to connect to a Wayland compositor whenever an instance enables VK_KHR_wayland_surface, which
/// wgpu always does; without XDG_RUNTIME_DIR libwayland then prints "error: XDG_RUNTIME_DIR is
/// invalid or not set in the environment." once per device enumeration. Without a Wayland
/// session the layer has nothing to learn from Wayland, so it is switched off through its own
/// documented variable (NODEVICE_SELECT=1) unless the user set that variable; wgpu still orders
/// the adapters (high-performance first). Runs before any thread starts.
fn quiet_device_select_without_wayland() {
    let runtime_dir_ok = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_dir());
    if !runtime_dir_ok && std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

fn main() {
    quiet_device_select_without_wayland();
    let code = match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Gpu => {
            let ctx = block_on(GpuContext::new())?;
            println!("{}", ctx.info());
        }
        Cmd::Info { model } => info(&model)?,
        Cmd::Train(a) => return train::run(a),
        Cmd::Generate(a) => generate(a)?,
        Cmd::Chat(a) => chat::run(a)?,
        Cmd::Eval(a) => eval(a)?,
        Cmd::Merge(a) => merge(a)?,
        Cmd::Export(a) => export::run(a)?,
        Cmd::Bench(a) => bench::run(a)?,
    }
    Ok(0)
}

fn generate(a: GenerateArgs) -> Result<()> {
    let cfg = a.sampling.config()?;
    let text = match a.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading the prompt from standard input")?;
            s
        }
    };
    if text.trim().is_empty() {
        bail!("empty prompt: give --prompt TEXT or text on standard input");
    }
    let ctx = block_on(GpuContext::new())?;
    let model = common::load_model(&ctx, &a.model, a.quant.quant()?, cfg.max_new_tokens + 4096)?;
    let set = match &a.adapter {
        Some(d) => common::open_adapter(d, &model)?.upload(&ctx)?,
        None => LoraSet::default(),
    };
    let ids = model.prompt_ids(&common::prompt(&model, &text, a.system.as_deref(), a.raw))?;
    let profile = std::env::var_os("QLORA_PROFILE").is_some();
    ctx.set_profiling(profile);
    let last_logits = match &a.dump_logits {
        Some(_) => {
            let m = &model.model;
            let mut cache = qlora_webgpu::model::llama::KvCache::new(&ctx, &m.cfg, ids.len())?;
            let t = qlora_webgpu::model::llama::forward_cached(&ctx, &m.cfg, &m.weights, &set, &ids, &mut cache, &m.rope)?;
            let mut l = block_on(ctx.read_f32(&t))?;
            l.truncate(m.cfg.vocab);
            Some(l)
        }
        None => None,
    };
    let mut out = std::io::stdout();
    let g = block_on(model.generate(&ctx, &set, &ids, &cfg, |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
    }))?;
    println!();
    if let (Some(path), Some(logits)) = (&a.dump_logits, last_logits) {
        let v = serde_json::json!({"prompt_ids": ids, "last_logits": logits, "generated_ids": g.ids, "text": g.text});
        std::fs::write(path, serde_json::to_vec(&v)?).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    eprintln!("[{} prompt tokens, {} new, stop: {:?}]", ids.len(), g.ids.len(), g.stop_reason);
    if profile {
        for (k, n, s) in ctx.profile_report().iter().take(12) {
            eprintln!("  {k:32} {n:6} calls {s:8.3} s");
        }
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let data = Dataset::from_jsonl_file(&a.data, Format::parse(&a.format)?)?;
    let ctx = block_on(GpuContext::new())?;
    let model = common::load_model(&ctx, &a.model, a.quant.quant()?, a.max_len)?;
    let set = match &a.adapter {
        Some(d) => common::open_adapter(d, &model)?.upload(&ctx)?,
        None => LoraSet::default(),
    };
    let opts = EncodeOptions { max_len: a.max_len, train_on_prompt: a.train_on_prompt, append_eos: !a.no_append_eos };
    let (loss, n) = block_on(session::evaluate(&ctx, &model, &set, &data, opts, a.batch_size))?;
    println!("loss {loss:.6}  perplexity {:.4}  ({n} tokens counted, {} examples of {})", loss.exp(), data.len(), a.data.display());
    Ok(())
}


fn merge(a: MergeArgs) -> Result<()> {
    let src = common::open_model(&a.model)?;
    let lcfg = src.host.config.to_llama();
    if !a.adapter.is_dir() {
        bail!("{}: no such adapter folder", a.adapter.display());
    }
    let to_gguf = a.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let adapter = if to_gguf { export::read_adapter_for(&a.adapter, &src, false)? } else { qlora_webgpu::lora::peft::read_host_adapter(&a.adapter, &lcfg)? };
    let dtype = match a.dtype.as_deref() {
        _ if to_gguf => OutDtype::F32,
        Some("f32") | Some("float32") => OutDtype::F32,
        Some("f16") | Some("float16") => OutDtype::F16,
        Some("bf16") | Some("bfloat16") => OutDtype::Bf16,
        Some(d) => bail!("--dtype {d}: expected f32, f16 or bf16"),
        None => match src.host.config.dtype.as_deref() {
            Some("bfloat16") => OutDtype::Bf16,
            Some("float16") => OutDtype::F16,
            _ => OutDtype::F32,
        },
    };
    let base: Vec<(String, BaseTensor)> = src
        .host
        .config
        .tensor_shapes()
        .into_iter()
        .filter_map(|(name, _)| {
            src.host.get(&name).map(|t| {
                let b = match t {
                    TensorRef::Nf4(q) => BaseTensor::Nf4(q.clone()),
                    TensorRef::F32(d) => BaseTensor::Dense(d.clone()),
                };
                (name, b)
            })
        })
        .collect();
    let merged = merge_adapter(&base, &adapter, &lcfg)?;
    if to_gguf {
        let dt = export::write_model_gguf(&a.model, &src, &merged, &a.out, a.dtype.as_deref())?;
        let n = adapter.layers.iter().flatten().filter(|x| x.is_some()).count();
        println!("merged {n} adapted projections of {} into {} (GGUF, {dt:?})", a.model.display(), a.out.display());
        return Ok(());
    }
    let (config_json, side) = match src.kind {
        SourceKind::HfFolder => (src.config_json.clone().context("config.json")?, src.side_files.clone()),
        SourceKind::Gguf => {
            let tok = src.tokenizer.inner().to_string(true).map_err(|e| anyhow::anyhow!("tokenizer.json: {e}"))?;
            let mut tc = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"});
            for (k, id) in [("bos_token", src.tokenizer.bos_id()), ("eos_token", src.tokenizer.eos_id()), ("pad_token", src.tokenizer.pad_id()), ("unk_token", src.tokenizer.unk_id())] {
                if let Some(t) = src.tokenizer.special_token(id) {
                    tc[k] = t.into();
                }
            }
            if let Some(t) = &src.template {
                tc["chat_template"] = t.source().into();
            }
            (src.host.config.to_hf_json()?, vec![("tokenizer.json".to_string(), tok.into_bytes()), ("tokenizer_config.json".to_string(), serde_json::to_vec_pretty(&tc)?)])
        }
    };
    let files = merged_folder(&merged, dtype, &config_json, &side)?;
    write_folder(&a.out, &files)?;
    let n = adapter.layers.iter().flatten().filter(|x| x.is_some()).count();
    println!("merged {n} adapted projections of {} into {} ({:?}): {}", a.model.display(), a.out.display(), dtype, files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>().join(", "));
    Ok(())
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / 1048576.0)
}

fn info(path: &Path) -> Result<()> {
    let (host, dtypes): (HostModel, BTreeMap<String, usize>) = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let bytes = qlora_webgpu::io::files::read_regular(path)?;
        let g = load_gguf(&path.display().to_string(), &bytes)?;
        let mut d = BTreeMap::new();
        for t in g.tensor_types.values() {
            *d.entry(t.name().map_or_else(|| format!("type {}", t.0), str::to_owned)).or_insert(0) += 1;
        }
        (g.model, d)
    } else {
        let dir = MmapDir::open(path)?;
        let mut d = BTreeMap::new();
        let names: Vec<String> = dir.names().filter(|n| n.ends_with(".safetensors")).map(str::to_owned).collect();
        for n in names {
            use qlora_webgpu::io::hf::ModelFiles;
            let bytes = dir.file(&n).unwrap_or_default();
            let st = SafeTensorsFile::parse(&dir.display(&n), bytes)?;
            for t in st.tensors() {
                *d.entry(t.dtype.name().to_string()).or_insert(0) += 1;
            }
        }
        (load_hf_dir(path)?, d)
    };
    let c = &host.config;
    let lc = c.to_llama();
    let embed = c.vocab_size * c.hidden_size;
    let head = if lc.tied { 0 } else { embed };
    let proj: usize = (0..7).map(|m| {
        let (o, i) = lc.proj_shape(m);
        o * i
    }).sum::<usize>() * lc.layers;
    let norms = (2 * lc.layers + 1) * c.hidden_size;
    let total = embed + head + proj + norms;
    println!("model        {}", path.display());
    println!("architecture {:?} ({} layers, hidden {}, intermediate {}, heads {} / kv heads {}, head_dim {})",
        c.architecture, lc.layers, lc.hidden, lc.intermediate, lc.heads, lc.kv_heads, lc.head_dim);
    println!("vocabulary   {} tokens, {} embeddings", lc.vocab, if lc.tied { "tied" } else { "separate lm_head and" });
    println!("rope         theta {}, scaling {:?}; rms_norm_eps {}", lc.rope_theta, c.rope_scaling, lc.rms_eps);
    println!("parameters   {:.1} M ({:.1} M in the 7 projections LoRA targets, {:.1} M embeddings)", total as f64 / 1e6, proj as f64 / 1e6, (embed + head) as f64 / 1e6);
    let dt: Vec<String> = dtypes.iter().map(|(k, n)| format!("{k} x{n}")).collect();
    println!("stored as    {}", dt.join(", "));
    let other = (embed + head + norms) as f64 * 4.0;
    println!("memory       f32 {}   f16 {}   NF4 {} (NF4 + double quant {}): projections in NF4, block 64; embeddings and norms f32 as QLoRA keeps them",
        mib(total as f64 * 4.0),
        mib(total as f64 * 2.0),
        mib(proj as f64 * (0.5 + 4.0 / 64.0) + other),
        mib(proj as f64 * (0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0)) + other));
    if !host.unused.is_empty() {
        println!("unused       {}", host.unused.join(", "));
    }
    Ok(())
}
