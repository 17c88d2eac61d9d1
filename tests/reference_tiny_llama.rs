//! Parity with PyTorch + transformers + PEFT on the reference tiny Llama (tests/fixtures/tiny-llama,
//! copied from ../shared/reference; see tests/fixtures/README.md): the model loads from its
//! Hugging Face folder (bf16 -> f32), PEFT's initial adapter loads, and on the saved batch
//! - the logits equal transformers' (saved subset of 810 vocab ids, and the full-vocab
//!   logsumexp) within 1e-4 at every non-padded position;
//! - the loss equals PEFT's within 1e-5 relative;
//! - every lora_A / lora_B gradient matches within 1e-4 relative (norm of the difference over the
//!   norm of the reference);
//! - 20 AdamW steps (lr 1e-3, the manifest's optimizer) give PEFT's losses within 2e-4 at every
//!   step and PEFT's final adapter within 1e-3 relative per tensor.
//! Padded positions: transformers masks padded keys, our causal kernel does not; padded rows are
//! right of every real token, so real rows, the loss and the gradients are unaffected, and the
//! logits checks cover real rows only.

mod common;
use common::*;
use qlora_webgpu::autograd::{ParamId, Tape};
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::hf::load_hf_dir;
use qlora_webgpu::lora::peft::{load_adapter, read_host_adapter};
use qlora_webgpu::lora::{param_of, peft_key, HostAdapter};
use qlora_webgpu::model::llama::{self, ForwardOpts, LlamaConfig, LlamaWeights, LoraSet};
use qlora_webgpu::ops::adamw::AdamW;
use qlora_webgpu::ops::cross_entropy;
use qlora_webgpu::ops::rope::{self, RopeTables};
use qlora_webgpu::train::optim::LoraOptimizer;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// Tensors of a reference safetensors file as f64 (ints converted), with shapes.
fn load_st(path: &std::path::Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let v: Vec<f64> = match view.dtype() {
            safetensors::Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            safetensors::Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            safetensors::Dtype::U8 => d.iter().map(|&b| b as f64).collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        };
        out.insert(name.to_string(), (view.shape().to_vec(), v));
    }
    out
}

struct Case {
    ctx: Rc<GpuContext>,
    cfg: LlamaConfig,
    w: LlamaWeights,
    lora: LoraSet,
    tables: Rc<RopeTables>,
    ids: Vec<u32>,
    targets: Vec<i32>,
    mask: Vec<f64>,
    batch: usize,
    seq: usize,
    fref: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

fn case() -> Case {
    let ctx = gpu();
    let host = load_hf_dir(fixtures().join("model")).unwrap();
    let cfg = host.config.to_llama();
    let w = host.upload(&ctx).unwrap();
    let (_, lora) = load_adapter(&ctx, &fixtures().join("dev/adapter_init"), &cfg).unwrap();
    let fref = load_st(&fixtures().join("dev/forward_ref.safetensors"));
    let (shape, ids) = &fref["input_ids"];
    let (batch, seq) = (shape[0], shape[1]);
    let ids: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
    let labels = &fref["labels"].1;
    // transformers' causal-LM loss: position t predicts label t+1; the last position has none.
    let targets: Vec<i32> =
        (0..batch * seq).map(|i| if i % seq == seq - 1 { -100 } else { labels[i + 1] as i32 }).collect();
    let mask = fref["attention_mask"].1.clone();
    let inv = rope::inv_freq(cfg.rope_theta, cfg.head_dim, None);
    let pos: Vec<u32> = (0..seq as u32).collect();
    let tables = Rc::new(RopeTables::new(&ctx, &inv, &pos).unwrap());
    Case { ctx, cfg, w, lora, tables, ids, targets, mask, batch, seq, fref }
}

fn rel_norm(got: &[f32], want: &[f64]) -> f64 {
    rel_err(got, want)
}

#[test]
fn logits_loss_and_gradients_match_transformers_and_peft() {
    let c = case();
    let ctx = &c.ctx;
    let mut tape = Tape::new(true);
    let logits = llama::forward(&mut tape, ctx, &c.cfg, &c.w, &c.lora, &c.ids, c.batch, &c.tables, ForwardOpts::default()).unwrap();
    let full = read(ctx, logits.value());
    let v = c.cfg.vocab;
    let (sub_ids, sub) = (&c.fref["logits_subset_ids"].1, &c.fref["logits_subset"].1);
    let k = sub_ids.len();
    let lse_ref = &c.fref["logsumexp"].1;
    let mut worst = 0.0f64;
    for row in 0..c.batch * c.seq {
        if c.mask[row] == 0.0 {
            continue;
        }
        let lrow = &full[row * v..(row + 1) * v];
        for (j, &id) in sub_ids.iter().enumerate() {
            worst = worst.max((lrow[id as usize] as f64 - sub[row * k + j]).abs());
        }
        let mx = lrow.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = mx + lrow.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        worst = worst.max((lse - lse_ref[row]).abs());
    }
    eprintln!("max |logit - transformers| over real rows: {worst:.3e}");
    assert!(worst <= 1e-4, "logits differ from transformers by {worst:.3e} (> 1e-4)");

    let loss = cross_entropy::cross_entropy(&mut tape, ctx, &logits, &c.targets).unwrap();
    let got = read(ctx, loss.value())[0] as f64;
    let want = c.fref["loss"].1[0];
    eprintln!("loss {got} vs PEFT {want}");
    assert!((got - want).abs() <= 1e-5 * want.abs(), "loss {got} vs PEFT {want}");

    let grads = tape.backward(ctx, &loss).unwrap();
    let gref = load_st(&fixtures().join("dev/grads_init.safetensors"));
    assert_eq!(grads.len(), gref.len(), "one gradient per LoRA tensor");
    let mut worst = 0.0f64;
    for (id, g) in &grads {
        let (l, m, b) = param_of(*id);
        let key = peft_key(l, m, b);
        let e = rel_norm(&read(ctx, g), &gref[&key].1);
        worst = worst.max(e);
        assert!(e <= 1e-4, "{key}: gradient relative error {e:.3e}");
    }
    eprintln!("worst gradient relative error {worst:.3e}");
}

#[test]
fn twenty_adamw_steps_follow_peft() {
    let c = case();
    let ctx = &c.ctx;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("manifest.json")).unwrap()).unwrap();
    let want: Vec<f64> =
        manifest["cases"]["dev"]["losses_adamw"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let mut opt = LoraOptimizer::new(AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    let mut worst = 0.0f64;
    for (step, &w) in want.iter().enumerate() {
        let mut tape = Tape::new(true);
        let logits = llama::forward(&mut tape, ctx, &c.cfg, &c.w, &c.lora, &c.ids, c.batch, &c.tables, ForwardOpts::default()).unwrap();
        let loss = cross_entropy::cross_entropy(&mut tape, ctx, &logits, &c.targets).unwrap();
        let got = read(ctx, loss.value())[0] as f64;
        worst = worst.max((got - w).abs());
        assert!((got - w).abs() <= 2e-4, "step {step}: loss {got} vs PEFT {w}");
        let grads = tape.backward(ctx, &loss).unwrap();
        opt.step(ctx, &c.lora, &grads, 1e-3).unwrap();
    }
    eprintln!("worst loss difference over 20 steps: {worst:.3e}");
    let fin: HostAdapter = read_host_adapter(&fixtures().join("dev/adapter_final"), &c.cfg).unwrap();
    let ours = block_on(HostAdapter::download(ctx, &fin.config, &c.lora)).unwrap();
    let mut worst = 0.0f64;
    for (l, (a, b)) in ours.layers.iter().zip(&fin.layers).enumerate() {
        for m in 0..7 {
            let (Some(a), Some(b)) = (&a[m], &b[m]) else { panic!("layer {l} module {m}: adapter missing") };
            for (x, y, which) in [(&a.a, &b.a, "A"), (&a.b, &b.b, "B")] {
                let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
                let e = rel_norm(x, &y64);
                worst = worst.max(e);
                assert!(e <= 1e-3, "layer {l} module {m} lora_{which}: relative error {e:.3e} after 20 steps");
            }
        }
    }
    eprintln!("worst final-adapter relative error {worst:.3e}");
    let _ = ParamId(0);
}
