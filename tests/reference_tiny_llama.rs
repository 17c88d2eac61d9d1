//! Parity with PyTorch + transformers + PEFT (+ bitsandbytes) on the reference tiny Llama
//! (tests/fixtures/tiny-llama, copied from ../shared/reference; see tests/fixtures/README.md), in
//! three cases: `dev` (f32 base), `dev_qlora` (the seven projections in NF4, block 64, loaded from
//! bitsandbytes' serialization and run through the NF4 kernels) and `dev_qlora_dq` (the same with
//! double quantization). The model loads from its Hugging Face folder (bf16 -> f32), PEFT's
//! initial adapter loads, and on the saved batch
//! - the logits equal transformers' (saved subset of 810 vocab ids, and the full-vocab
//!   logsumexp) within [`LOGIT_ABS`] at every non-padded position;
//! - the loss equals PEFT's within [`LOSS_ABS`];
//! - every lora_A / lora_B gradient matches within [`GRAD_REL`] relative (norm of the difference
//!   over the norm of the reference);
//! - 20 AdamW steps (lr 1e-3, the manifest's optimizer) give PEFT's losses within
//!   [`STEP_LOSS_ABS`] at every step and after the last update (`loss_after_20_steps`), and PEFT's
//!   final adapter within [`final_adapter_rel`] relative per tensor.
//!
//! The bounds are at most 10x the figures achieved (on lavapipe, both matmul paths: subgroups and
//! `QLORA_NO_SUBGROUPS=1`), and below the gap between the two NF4 variants' references (plain NF4
//! vs double quantization: 7.6e-6 in the step-0 loss, up to 8.2e-5 over the 20 steps, 8.6e-5
//! after them, 1.5e-3..2.9e-3 in the gradients, 1.7e-3 in the worst final-adapter tensor). The
//! QLoRA tests check that: each run is also compared with the OTHER variant's reference and must
//! fail every one of those checks, so a run that silently used the wrong NF4 variant is caught;
//! `bounds_tell_the_nf4_variants_apart` checks the same on the reference files alone.
//! Padded positions: transformers masks padded keys, our causal kernel does not; padded rows are
//! right of every real token, so real rows, the loss and the gradients are unaffected, and the
//! logits checks cover real rows only.

mod common;
use common::*;
use qlora_webgpu::autograd::Tape;
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::hf::load_hf_dir;
use qlora_webgpu::io::HostWeight;
use qlora_webgpu::lora::config::LoraConfig;
use qlora_webgpu::lora::peft::load_adapter;
use qlora_webgpu::lora::{param_of, peft_key, HostAdapter};
use qlora_webgpu::model::config::names;
use qlora_webgpu::ops::lora::Frozen;
use qlora_webgpu::io::bnb::read_bnb_nf4_file;
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
    name: String,
}

fn case(name: &str) -> Case {
    let ctx = gpu();
    let mut host = load_hf_dir(fixtures().join("model")).unwrap();
    if name != "dev" {
        // QLoRA: the projections come from bitsandbytes' 4-bit serialization and stay NF4.
        let nf4 = read_bnb_nf4_file(&fixtures().join(name).join("base_nf4_weights.safetensors")).unwrap();
        assert_eq!(nf4.len(), 7 * host.layers.len());
        for (wname, t) in nf4 {
            let (l, m) = (0..host.layers.len())
                .flat_map(|l| (0..7).map(move |m| (l, m)))
                .find(|&(l, m)| names::proj(l, m) == wname)
                .unwrap_or_else(|| panic!("unexpected NF4 weight {wname}"));
            host.layers[l].proj[m] = HostWeight::Nf4(t);
        }
    }
    let cfg = host.config.to_llama();
    let w = host.upload(&ctx).unwrap();
    if name != "dev" {
        assert!(w.layers.iter().all(|l| l.proj.iter().all(|p| matches!(p, Frozen::Nf4(_)))), "projections stay NF4 on the device");
    }
    // All three cases start from the same PEFT adapter (manifest: adapter_init of dev).
    let (_, lora) = load_adapter(&ctx, &fixtures().join("dev/adapter_init"), &cfg).unwrap();
    let fref = load_safetensors(&fixtures().join(name).join("forward_ref.safetensors"));
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
    Case { ctx, cfg, w, lora, tables, ids, targets, mask, batch, seq, fref, name: name.to_string() }
}

fn rel_norm(got: &[f32], want: &[f64]) -> f64 {
    rel_err(got, want)
}

// Bounds, with the worst figure achieved over the three cases on lavapipe (subgroup and vec4
// matmul paths) and the plain-NF4 vs double-quantization gap each must stay below.
/// Logits (subset and logsumexp), absolute. Achieved 9.6e-7; NF4-variant gap 1.3e-3.
const LOGIT_ABS: f64 = 5e-6;
/// Step-0 loss, absolute (the loss is ~10.76, one f32 ulp 9.5e-7). Achieved 9.5e-7; gap 7.6e-6.
const LOSS_ABS: f64 = 3e-6;
/// Gradients, relative L2 per tensor. Achieved 8.3e-6; gap 1.5e-3 (the closest tensor).
const GRAD_REL: f64 = 5e-5;
/// Loss at each of the 20 AdamW steps and after them, absolute. Achieved 3.8e-6 (dev), 1.9e-6
/// (QLoRA); gap up to 8.2e-5 (step 19) and 8.6e-5 (after the 20th update).
const STEP_LOSS_ABS: f64 = 1e-5;
/// Final adapter, relative L2, worst tensor. Achieved 1.4e-5 (dev; bound 1e-4) and 1.1e-6 (QLoRA;
/// bound 1e-5); gap 1.7e-3.
fn final_adapter_rel(name: &str) -> f64 {
    if name == "dev" {
        1e-4
    } else {
        1e-5
    }
}

/// The other NF4 variant of a QLoRA case (None for `dev`).
fn other_variant(name: &str) -> Option<&'static str> {
    match name {
        "dev_qlora" => Some("dev_qlora_dq"),
        "dev_qlora_dq" => Some("dev_qlora"),
        _ => None,
    }
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("manifest.json")).unwrap()).unwrap()
}

fn ref_losses(name: &str) -> (Vec<f64>, f64) {
    let m = manifest();
    let c = &m["cases"][name];
    let steps = c["losses_adamw"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    (steps, c["loss_after_20_steps"].as_f64().unwrap())
}

fn ref_final_adapter(name: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    if name == "dev" {
        load_safetensors(&fixtures().join("dev/adapter_final/adapter_model.safetensors"))
    } else {
        load_safetensors(&fixtures().join(name).join("adapter_final.safetensors"))
    }
}

/// Worst |logit - reference| over real rows (saved subset and full-vocab logsumexp).
fn logits_error(c: &Case, full: &[f32], fref: &HashMap<String, (Vec<usize>, Vec<f64>)>) -> f64 {
    let v = c.cfg.vocab;
    let (sub_ids, sub) = (&fref["logits_subset_ids"].1, &fref["logits_subset"].1);
    let k = sub_ids.len();
    let lse_ref = &fref["logsumexp"].1;
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
    worst
}

/// (best, worst) gradient relative error over the LoRA tensors against `gref`.
fn grad_errors(ctx: &GpuContext, grads: &HashMap<qlora_webgpu::autograd::ParamId, qlora_webgpu::gpu::Tensor>, gref: &HashMap<String, (Vec<usize>, Vec<f64>)>) -> (f64, f64) {
    assert_eq!(grads.len(), gref.len(), "one gradient per LoRA tensor");
    let (mut best, mut worst) = (f64::INFINITY, 0.0f64);
    for (id, g) in grads {
        let (l, m, b) = param_of(*id);
        let e = rel_norm(&read(ctx, g), &gref[&peft_key(l, m, b)].1);
        best = best.min(e);
        worst = worst.max(e);
    }
    (best, worst)
}

/// (best, worst) relative error over the tensors of our adapter against `fin`.
fn adapter_errors(ours: &HostAdapter, fin: &HashMap<String, (Vec<usize>, Vec<f64>)>) -> (f64, f64) {
    assert_eq!(fin.len(), 2 * 7 * ours.layers.len());
    let (mut best, mut worst) = (f64::INFINITY, 0.0f64);
    for (l, mods) in ours.layers.iter().enumerate() {
        for (m, lm) in mods.iter().enumerate() {
            let lm = lm.as_ref().unwrap_or_else(|| panic!("layer {l} module {m}: adapter missing"));
            for (x, b) in [(&lm.a, false), (&lm.b, true)] {
                let e = rel_norm(x, &fin[&peft_key(l, m, b)].1);
                best = best.min(e);
                worst = worst.max(e);
            }
        }
    }
    (best, worst)
}

fn logits_loss_and_gradients(name: &str) {
    let c = case(name);
    let ctx = &c.ctx;
    let mut tape = Tape::new(true);
    let logits = llama::forward(&mut tape, ctx, &c.cfg, &c.w, &c.lora, &c.ids, c.batch, &c.tables, ForwardOpts::default()).unwrap();
    let full = read(ctx, logits.value());
    let worst = logits_error(&c, &full, &c.fref);
    eprintln!("{name}: max |logit - transformers| over real rows: {worst:.3e} (bound {LOGIT_ABS:.0e})");
    assert!(worst <= LOGIT_ABS, "{name}: logits differ from transformers by {worst:.3e} (> {LOGIT_ABS:.0e})");

    let loss = cross_entropy::cross_entropy(&mut tape, ctx, &logits, &c.targets).unwrap();
    let got = read(ctx, loss.value())[0] as f64;
    let want = c.fref["loss"].1[0];
    eprintln!("{name}: loss {got} vs PEFT {want}: {:.3e} (bound {LOSS_ABS:.0e})", (got - want).abs());
    assert!((got - want).abs() <= LOSS_ABS, "{name}: loss {got} vs PEFT {want}");

    let grads = tape.backward(ctx, &loss).unwrap();
    let gref = load_safetensors(&fixtures().join(name).join("grads_init.safetensors"));
    let (_, worst) = grad_errors(ctx, &grads, &gref);
    eprintln!("{name}: worst gradient relative error {worst:.3e} (bound {GRAD_REL:.0e})");
    assert!(worst <= GRAD_REL, "{name}: gradient relative error {worst:.3e} (> {GRAD_REL:.0e})");

    // The same run checked against the other NF4 variant's reference fails every check.
    if let Some(other) = other_variant(name) {
        let oref = load_safetensors(&fixtures().join(other).join("forward_ref.safetensors"));
        let e_logits = logits_error(&c, &full, &oref);
        let e_loss = (got - oref["loss"].1[0]).abs();
        let ogref = load_safetensors(&fixtures().join(other).join("grads_init.safetensors"));
        let (e_grad, _) = grad_errors(ctx, &grads, &ogref);
        eprintln!("{name} vs the {other} reference: logits {e_logits:.3e}, loss {e_loss:.3e}, closest gradient {e_grad:.3e}");
        assert!(e_logits > LOGIT_ABS, "{name}: the logits check cannot tell {other} apart ({e_logits:.3e})");
        assert!(e_loss > LOSS_ABS, "{name}: the loss check cannot tell {other} apart ({e_loss:.3e})");
        assert!(e_grad > GRAD_REL, "{name}: a gradient check cannot tell {other} apart ({e_grad:.3e})");
    }
}

#[test]
fn dev_logits_loss_and_gradients_match_transformers_and_peft() {
    logits_loss_and_gradients("dev");
}

#[test]
fn qlora_logits_loss_and_gradients_match_peft_with_bitsandbytes_nf4() {
    logits_loss_and_gradients("dev_qlora");
}

#[test]
fn qlora_double_quant_logits_loss_and_gradients_match_peft() {
    logits_loss_and_gradients("dev_qlora_dq");
}

/// Worst |loss - reference| over the 20 steps and after them.
fn loss_errors(losses: &[f64], after: f64, want: &(Vec<f64>, f64)) -> (f64, f64) {
    assert_eq!(losses.len(), want.0.len());
    let steps = losses.iter().zip(&want.0).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
    (steps, (after - want.1).abs())
}

fn twenty_adamw_steps(name: &str) {
    let c = case(name);
    let ctx = &c.ctx;
    let want = ref_losses(name);
    assert_eq!(want.0.len(), 20);
    let mut opt = LoraOptimizer::new(AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    let forward_loss = |tape: &mut Tape| {
        let logits = llama::forward(tape, ctx, &c.cfg, &c.w, &c.lora, &c.ids, c.batch, &c.tables, ForwardOpts::default()).unwrap();
        cross_entropy::cross_entropy(tape, ctx, &logits, &c.targets).unwrap()
    };
    let mut losses = Vec::new();
    for (step, &w) in want.0.iter().enumerate() {
        let mut tape = Tape::new(true);
        let loss = forward_loss(&mut tape);
        let got = read(ctx, loss.value())[0] as f64;
        assert!((got - w).abs() <= STEP_LOSS_ABS, "{name} step {step}: loss {got} vs PEFT {w}");
        losses.push(got);
        let grads = tape.backward(ctx, &loss).unwrap();
        opt.step(ctx, &c.lora, &grads, 1e-3).unwrap();
    }
    // The manifest's loss_after_20_steps: the forward after the 20th update.
    let mut tape = Tape::new(true);
    let after = read(ctx, forward_loss(&mut tape).value())[0] as f64;
    let (e_steps, e_after) = loss_errors(&losses, after, &want);
    eprintln!(
        "{}: worst loss difference over 20 steps {e_steps:.3e}, after them {e_after:.3e} ({after} vs PEFT {}; bound {STEP_LOSS_ABS:.0e})",
        c.name, want.1
    );
    assert!(e_after <= STEP_LOSS_ABS, "{name}: loss after 20 steps {after} vs PEFT {}", want.1);
    let ours = block_on(HostAdapter::download(ctx, &LoraConfig::new(8, 16.0), &c.lora)).unwrap();
    let bound = final_adapter_rel(name);
    let (_, worst) = adapter_errors(&ours, &ref_final_adapter(name));
    eprintln!("{name}: worst final-adapter relative error {worst:.3e} (bound {bound:.0e})");
    assert!(worst <= bound, "{name}: final adapter relative error {worst:.3e} (> {bound:.0e}) after 20 steps");

    // The same run checked against the other NF4 variant's reference fails every check.
    if let Some(other) = other_variant(name) {
        let (o_steps, o_after) = loss_errors(&losses, after, &ref_losses(other));
        let (_, o_adapter) = adapter_errors(&ours, &ref_final_adapter(other));
        eprintln!("{name} vs the {other} reference: losses {o_steps:.3e}, after 20 steps {o_after:.3e}, final adapter {o_adapter:.3e}");
        assert!(o_steps > STEP_LOSS_ABS, "{name}: the per-step loss check cannot tell {other} apart ({o_steps:.3e})");
        assert!(o_after > STEP_LOSS_ABS, "{name}: the loss-after-20-steps check cannot tell {other} apart ({o_after:.3e})");
        assert!(o_adapter > bound, "{name}: the final-adapter check cannot tell {other} apart ({o_adapter:.3e})");
    }
}

#[test]
fn dev_twenty_adamw_steps_follow_peft() {
    twenty_adamw_steps("dev");
}

#[test]
fn qlora_twenty_adamw_steps_follow_peft() {
    twenty_adamw_steps("dev_qlora");
}

#[test]
fn qlora_double_quant_twenty_adamw_steps_follow_peft() {
    twenty_adamw_steps("dev_qlora_dq");
}

/// The bounds sit below the gap between the plain-NF4 and double-quantization references (no
/// GPU: reference files only), with room for our own error: gap > bound + the worst achieved
/// figure, so a run of one variant checked against the other's reference fails.
#[test]
fn bounds_tell_the_nf4_variants_apart() {
    let (a, b) = ("dev_qlora", "dev_qlora_dq");
    let (la, lb) = (ref_losses(a), ref_losses(b));
    let step0 = (la.0[0] - lb.0[0]).abs();
    assert!(step0 > LOSS_ABS + 9.5e-7, "step-0 loss gap {step0:.3e}");
    let (steps, after) = loss_errors(&la.0, la.1, &lb);
    assert!(steps > STEP_LOSS_ABS + 3.8e-6, "20-step loss gap {steps:.3e}");
    assert!(after > STEP_LOSS_ABS + 3.8e-6, "loss-after-20-steps gap {after:.3e}");
    let f32s = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (ga, gb) = (
        load_safetensors(&fixtures().join(a).join("grads_init.safetensors")),
        load_safetensors(&fixtures().join(b).join("grads_init.safetensors")),
    );
    let closest = ga.iter().map(|(k, (_, g))| rel_norm(&f32s(g), &gb[k].1)).fold(f64::INFINITY, f64::min);
    assert!(closest > GRAD_REL + 8.3e-6, "closest gradient gap {closest:.3e}");
    let (fa, fb) = (ref_final_adapter(a), ref_final_adapter(b));
    let worst = fa.iter().map(|(k, (_, x))| rel_norm(&f32s(x), &fb[k].1)).fold(0.0, f64::max);
    assert!(worst > final_adapter_rel(a) + 1.1e-6, "final adapter gap {worst:.3e}");
    eprintln!("NF4 vs NF4+DQ references: step-0 loss {step0:.3e}, steps {steps:.3e}, after {after:.3e}, closest gradient {closest:.3e}, final adapter {worst:.3e}");
}
