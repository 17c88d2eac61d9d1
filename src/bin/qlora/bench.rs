//! `qlora bench`: timed training steps of a SmolLM2-135M-shaped model (random weights with the
//! real shapes: 30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV heads, vocab 49152,
//! tied embeddings), QLoRA (NF4 + double quantization) with r=16 on all seven projections, for
//! each batch shape: mean and best step time, tokens/s and the peak GPU memory the pool held.
//! Not a test: figures go in the README.

use anyhow::{bail, Result};
use clap::Args;
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::{HostLayer, HostModel, HostTensor, HostWeight};
use qlora_webgpu::lora::config::{init_lora_set, LoraConfig};
use qlora_webgpu::model::config::ModelConfig;
use qlora_webgpu::ops::adamw::AdamW;
use qlora_webgpu::train::trainer::{Model, TokenBatch, TrainOpts, Trainer};
use qlora_webgpu::train::{DataPosition, Schedule, ScheduleKind, SplitMix64};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

/// SmolLM2-135M-Instruct's config.json (the fields the decoder reads).
const SMOLLM2_135M: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
"intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
"vocab_size": 49152, "rms_norm_eps": 1e-05, "rope_theta": 100000, "tie_word_embeddings": true,
"max_position_embeddings": 8192}"#;

#[derive(Args)]
pub struct BenchArgs {
    /// Batch shapes, BxT each (B sequences of T tokens).
    #[arg(long, default_value = "1x256,4x128")]
    shapes: String,
    /// Timed steps per shape (after one untimed warm-up step).
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
    /// Also run one step per shape with per-kernel timing and print where the time goes.
    #[arg(long)]
    profile: bool,
    /// Use this model's weights (a .gguf file or a Hugging Face folder) instead of random ones.
    #[arg(long)]
    model: Option<PathBuf>,
}

fn random_model(seed: u64) -> Result<HostModel> {
    let config = ModelConfig::from_json("SmolLM2-135M config", SMOLLM2_135M.as_bytes())?;
    let mut rng = SplitMix64::new(seed);
    let mut t = |shape: &[usize], scale: f64| HostTensor {
        shape: shape.to_vec(),
        data: (0..shape.iter().product::<usize>()).map(|_| ((rng.uniform() * 2.0 - 1.0) * scale) as f32).collect(),
    };
    let c = config.hidden_size;
    let lc = config.to_llama();
    let layers = (0..lc.layers)
        .map(|_| HostLayer {
            attn_norm: HostTensor { shape: vec![c], data: vec![1.0; c] },
            proj: std::array::from_fn(|m| {
                let (o, i) = lc.proj_shape(m);
                HostWeight::F32(t(&[o, i], 0.03))
            }),
            proj_bias: Default::default(),
            mlp_norm: HostTensor { shape: vec![c], data: vec![1.0; c] },
        })
        .collect();
    let embed = t(&[lc.vocab, c], 0.03);
    Ok(HostModel { config, embed, layers, final_norm: HostTensor { shape: vec![c], data: vec![1.0; c] }, lm_head: None, unused: Vec::new() })
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
        None => random_model(1)?,
    };
    let cfg = host.config.to_llama();
    println!(
        "qlora bench: {} ({} layers, hidden {}, vocab {}), base {}, LoRA r={} on all seven projections, {} timed steps after 1 warm-up",
        a.model.as_ref().map_or("SmolLM2-135M shapes, random weights".into(), |p| p.display().to_string()),
        cfg.layers,
        cfg.hidden,
        cfg.vocab,
        if a.f32_base { "f32" } else { "NF4 + double quant (block 64)" },
        a.r,
        a.steps
    );
    println!("| batch (B x T) | step time mean / best | tokens/s | peak GPU memory (tensors) | pool total |");
    println!("|---|---|---|---|---|");
    for (b, t) in shapes {
        // A fresh device per shape, so that the peak is this shape's.
        let ctx = block_on(GpuContext::new())?;
        let weights = if a.f32_base { host.upload(&ctx)? } else { host.upload_nf4(&ctx, 64, true)? };
        let model = Rc::new(Model::new(&ctx, cfg.clone(), weights, host.config.effective_rope_scaling().as_ref(), t.max(16))?);
        let lora = LoraConfig::new(a.r, a.r as f64);
        let set = init_lora_set(&ctx, &cfg, &lora, 0)?;
        let opts = TrainOpts {
            adamw: AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
            schedule: Schedule::new(ScheduleKind::Constant, 1e-4, 0, 1000),
            max_grad_norm: Some(1.0),
            checkpoint_layers: a.grad_checkpoint,
            seed: 0,
        };
        let mut trainer = Trainer::new(ctx.clone(), model, lora, set, opts);
        let mut rng = SplitMix64::new(7);
        let ids: Vec<u32> = (0..b * t).map(|_| rng.below(cfg.vocab as u64) as u32).collect();
        let targets: Vec<i32> = (0..b * t).map(|i| if i % t + 1 < t { ids[i + 1] as i32 } else { -100 }).collect();
        let batch = [TokenBatch { ids, targets, batch: b }];
        let mut times = Vec::new();
        for k in 0..=a.steps {
            let t0 = Instant::now();
            block_on(trainer.step(&batch, DataPosition { epoch: 0, index: k as u64 + 1 }))?;
            if k > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        if a.profile {
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
            "| {b} x {t} | {mean:.2} s / {best:.2} s | {:.0} | {:.1} MiB | {:.1} MiB |",
            (b * t) as f64 / mean,
            st.peak_in_use as f64 / 1048576.0,
            st.allocated as f64 / 1048576.0
        );
    }
    Ok(())
}
