//! The `qlora` command line (native only): `qlora info MODEL` describes a model (a Hugging Face
//! folder or a .gguf file) and the memory it needs; `qlora gpu` reports the adapter wgpu selects.
//! Training, generation, evaluation and merging subcommands are the CLI issue's (see README.md).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::gguf::load_gguf;
use qlora_webgpu::io::hf::{load_hf_dir, MmapDir};
use qlora_webgpu::io::safetensors::SafeTensorsFile;
use qlora_webgpu::io::HostModel;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "qlora", version, about = "LoRA and QLoRA fine-tuning of Llama-family models on WebGPU")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Architecture, parameter count, stored dtypes and the memory a model needs in f32, f16 and NF4.
    #[command(after_help = "Examples:\n  qlora info ~/models/SmolLM2-135M-Instruct\n  qlora info SmolLM2-135M-Instruct.Q4_1.gguf")]
    Info {
        /// A Hugging Face model folder (config.json + *.safetensors) or a .gguf file.
        model: PathBuf,
    },
    /// The GPU adapter wgpu selects: name, backend, limits and optional features.
    Gpu,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Gpu => {
            let ctx = block_on(GpuContext::new())?;
            println!("{}", ctx.info());
        }
        Cmd::Info { model } => info(&model)?,
    }
    Ok(())
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / 1048576.0)
}

fn info(path: &Path) -> Result<()> {
    let (host, dtypes): (HostModel, BTreeMap<String, usize>) = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
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
