//! `qlora bench`: timed training steps of a model with real shapes and random weights
//! (`--arch`: SmolLM2-135M by default, also SmolLM2-360M, Qwen2.5-0.5B, Llama-3.2-1B and
//! Llama-3.1-8B; src/model/arch.rs), QLoRA (NF4 + double quantization) with r=16 on all seven
//! projections, for each batch shape: mean and best step time, tokens/s, the peak GPU memory the
//! pool held and the process's peak resident memory. Projections are generated and quantized one
//! at a time (an 8B model never exists in f32 on the host); embeddings are bf16-valued, as the
//! checkpoints are, so they are stored in bf16. Not a test: figures go in docs/benchmarks.md.

use anyhow::{bail, Result};
use clap::Args;
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::{HostLayer, HostModel, HostTensor, HostWeight};
use qlora_webgpu::lora::{init_lora_set, LoraConfig};
use qlora_webgpu::ops::adamw::AdamW;
use qlora_webgpu::train::trainer::{Model, TrainOpts, Trainer};
use qlora_webgpu::rng::SplitMix64;
use qlora_webgpu::train::{DataPosition, Schedule, ScheduleKind, TrainState};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;


#[derive(Args)]
pub struct BenchArgs {
    /// Batch shapes, BxT each (B sequences of T tokens).
    #[arg(long, default_value = "1x256,4x128")]
    shapes: String,
    /// Timed steps per shape, after one untimed warm-up step (0: time the warm-up step alone,
    /// for shapes too slow to run twice).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// LoRA rank (alpha = r).
    #[arg(short, long, default_value_t = 16)]
    r: usize,
    /// Keep the base in f32 (plain LoRA) instead of NF4.
    #[arg(long)]
    f32_base: bool,
    /// Recompute layer activations in the backward pass.
    #[arg(long)]
    grad_checkpoint: bool,
    /// Also run one step per shape with per-kernel timing and print where the time goes: GPU time
    /// from timestamp queries where the adapter has them (GPU-busy share of the wall time, time
    /// per kernel), else the wall time of each dispatch waited for on its own.
    #[arg(long)]
    profile: bool,
    /// Use this model's weights (a .gguf file or a Hugging Face folder) instead of random ones.
    #[arg(long, conflicts_with = "arch")]
    model: Option<PathBuf>,
    /// Shapes of a known model, random weights: smollm2-135m, smollm2-360m, qwen2.5-0.5b,
    /// llama-3.2-1b, llama-3.1-8b.
    #[arg(long, default_value = "smollm2-135m")]
    arch: String,
}

/// The process's peak resident memory (VmHWM), bytes; None where /proc is absent.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// A model of `arch`'s shapes with random weights: projections uniform in ±0.03 (NF4 with double
/// quantization, block 64, unless `f32_base`), embeddings rounded to bf16, norms 1, biases 0.01.
fn random_model(arch: &str, seed: u64, f32_base: bool) -> Result<HostModel> {
    let config = qlora_webgpu::model::arch::config(arch)?;
    let mut rng = SplitMix64::new(seed);
    let mut t = |shape: &[usize], scale: f64, bf16: bool| HostTensor {
        shape: shape.to_vec(),
        data: (0..shape.iter().product::<usize>())
            .map(|_| {
                let x = ((rng.uniform() * 2.0 - 1.0) * scale) as f32;
                if bf16 { f32::from_bits(x.to_bits() & 0xffff_0000) } else { x }
            })
            .collect(),
    };
    let c = config.hidden_size;
    let lc = config.to_llama();
    let ones = |n: usize| HostTensor { shape: vec![n], data: vec![1.0; n] };
    let mut layers = Vec::with_capacity(lc.layers);
    for _ in 0..lc.layers {
        let mut proj = Vec::with_capacity(7);
        let mut proj_bias: [Option<HostTensor>; 7] = Default::default();
        for (m, bias) in proj_bias.iter_mut().enumerate() {
            let (o, i) = lc.proj_shape(m);
            let w = t(&[o, i], 0.03, false);
            proj.push(if f32_base {
                HostWeight::F32(w)
            } else {
                HostWeight::Nf4(qlora_webgpu::quant::nf4::quantize_nf4(&w.data, &w.shape, 64, true)?)
            });
            if config.proj_has_bias(m) {
                *bias = Some(HostTensor { shape: vec![o], data: vec![0.01; o] });
            }
        }
        layers.push(HostLayer { attn_norm: ones(c), proj: proj.try_into().expect("seven"), proj_bias, mlp_norm: ones(c) });
    }
    let embed = t(&[lc.vocab, c], 0.03, true);
    let lm_head = (!config.tie_word_embeddings).then(|| t(&[lc.vocab, c], 0.03, true));
    Ok(HostModel { config, embed, layers, final_norm: ones(c), lm_head, unused: Vec::new() })
}

fn parse_shapes(s: &str) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|p| {
            let (b, t) = p.trim().split_once('x').ok_or_else(|| anyhow::anyhow!("--shapes {p:?}: expected BxT, e.g. 4x128"))?;
            let (b, t): (usize, usize) = (b.parse()?, t.parse()?);
            if b == 0 || t < 2 {
                bail!("--shapes {p:?}: B >= 1 and T >= 2");
            }
            Ok((b, t))
        })
        .collect()
}

/// Runs `qlora bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let shapes = parse_shapes(&a.shapes)?;
    let host = match &a.model {
        Some(p) => crate::common::open_model(p)?.host,
        None => random_model(&a.arch, 1, a.f32_base)?,
    };
    let cfg = host.config.to_llama();
    println!(
        "qlora bench: {} ({} layers, hidden {}, vocab {}), base {}, LoRA r={} on all seven projections, {} timed steps after 1 warm-up",
        a.model.as_ref().map_or(format!("{} shapes, random weights", a.arch), |p| p.display().to_string()),
        cfg.layers,
        cfg.hidden,
        cfg.vocab,
        if a.f32_base { "f32" } else { "NF4 + double quant (block 64)" },
        a.r,
        a.steps
    );
    println!("| batch (B x T) | step time mean / best | tokens/s | peak GPU memory (tensors) | pool total | peak process memory |");
    println!("|---|---|---|---|---|---|");
    for (b, t) in shapes {
        // A fresh device per shape, so that the peak is this shape's.
        let ctx = block_on(GpuContext::new())?;
        let weights = if a.f32_base { host.upload(&ctx)? } else { host.upload_nf4(&ctx, 64, true)? };
        let model = Rc::new(Model::new(&ctx, cfg.clone(), weights, host.config.effective_rope_scaling().as_ref(), t.max(16))?);
        let lora = LoraConfig::new(a.r, a.r as f64);
        let set = init_lora_set(&ctx, &cfg, &lora, 0)?;
        let opts = TrainOpts {
            adamw: AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
            grad_checkpoint: a.grad_checkpoint,
            start: TrainState::start(0, Schedule::new(ScheduleKind::Constant, 1e-4, 0, 1000), Some(1.0)),
        };
        let mut trainer = Trainer::new(ctx.clone(), model, lora, set, opts);
        let mut rng = SplitMix64::new(7);
        let ids: Vec<u32> = (0..b * t).map(|_| rng.below(cfg.vocab as u64) as u32).collect();
        let targets: Vec<i32> = (0..b * t).map(|i| if i % t + 1 < t { ids[i + 1] as i32 } else { -100 }).collect();
        let batch = [qlora_webgpu::data::dataset::Batch::new(ids, targets, b, None)?];
        let mut times = Vec::new();
        for k in 0..=a.steps {
            let t0 = Instant::now();
            block_on(trainer.step(&batch, DataPosition { epoch: 0, index: k as u64 + 1 }))?;
            // With --steps 0 the one step run (the warm-up, pipelines compiled in it) is timed.
            if k > 0 || a.steps == 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        if a.profile && ctx.set_gpu_timing(true) {
            // Timestamp queries around every compute pass: kernels run batched as in the timed
            // steps, and the GPU's own clock says how long each took.
            let t0 = Instant::now();
            block_on(trainer.step(&batch, DataPosition { epoch: 0, index: 99 }))?;
            let wall = t0.elapsed().as_secs_f64();
            let rep = ctx.gpu_timing_report();
            ctx.set_gpu_timing(false);
            let calls: u64 = rep.kernels.iter().map(|k| k.1).sum();
            eprintln!(
                "GPU profile of one {b} x {t} step (timestamp queries): GPU busy {:.3} s of {wall:.3} s wall ({:.0}%), {calls} dispatches; \
                 the rest is CPU-side work (recording, uploads, readbacks) and gaps between submits",
                rep.busy,
                100.0 * rep.busy / wall
            );
            for (k, n, s) in rep.kernels.iter().take(15) {
                eprintln!("  {k:32} {n:6} calls {:9.2} ms {:5.1}% of GPU time", s * 1e3, 100.0 * s / rep.busy.max(1e-12));
            }
        } else if a.profile {
            ctx.set_profiling(true);
            let t0 = Instant::now();
            block_on(trainer.step(&batch, DataPosition { epoch: 0, index: 99 }))?;
            let total = t0.elapsed().as_secs_f64();
            let rep = ctx.profile_report();
            ctx.set_profiling(false);
            eprintln!("profile of one {b} x {t} step ({total:.2} s with a wait after every dispatch):");
            for (k, n, s) in rep.iter().take(15) {
                eprintln!("  {k:32} {n:6} calls {s:8.3} s {:5.1}%", 100.0 * s / total);
            }
        }
        let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let st = ctx.pool_stats();
        println!(
            "| {b} x {t} | {mean:.2} s / {best:.2} s | {:.0} | {:.1} MiB | {:.1} MiB | {} |",
            (b * t) as f64 / mean,
            st.peak_in_use as f64 / 1048576.0,
            st.allocated as f64 / 1048576.0,
            peak_rss().map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
        );
    }
    Ok(())
}
