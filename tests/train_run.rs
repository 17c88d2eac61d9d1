//! Training runs on a tiny random Llama: a run stopped after 10 steps and resumed from its
//! checkpoint on disk gives the same losses and the same adapter, bit for bit, as 20 steps in one
//! go (with dropout, clipping, accumulation and a warmup + cosine schedule); training lowers the
//! validation loss on a held-out split; a non-finite loss stops the step with a clear message
//! and changes nothing, so the last checkpoint stays the last good state.

mod common;
use common::*;
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::lora::config::{InitLoraWeights, LoraConfig};
use qlora_webgpu::lora::HostAdapter;
use qlora_webgpu::ops::adamw::AdamW;
use qlora_webgpu::train::checkpoint::{load_checkpoint, save_checkpoint};
use qlora_webgpu::train::trainer::{Model, TrainOpts, Trainer};
use qlora_webgpu::data::dataset::Batch;
use qlora_webgpu::train::{DataPosition, Schedule, ScheduleKind};
use std::rc::Rc;



fn pattern_batch(rng: &mut Rng, rows: usize, len: usize, v: usize) -> Batch {
    let mut ids = Vec::new();
    let mut targets = Vec::new();
    for _ in 0..rows {
        let mut t = rng.below(v);
        let row: Vec<u32> = (0..len)
            .map(|_| {
                let cur = t as u32;
                t = (5 * t + 3) % v;
                cur
            })
            .collect();
        for i in 0..len {
            targets.push(if i + 1 < len { row[i + 1] as i32 } else { -100 });
        }
        ids.extend(row);
    }
    Batch::new(ids, targets, rows, None).unwrap()
}

fn lora_cfg(dropout: f64) -> LoraConfig {
    let mut c = LoraConfig::new(4, 8.0);
    c.lora_dropout = dropout;
    c.init_lora_weights = InitLoraWeights::Default;
    c
}

fn opts(steps: u64, lr: f64) -> TrainOpts {
    TrainOpts {
        adamw: AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
        grad_checkpoint: false,
        start: qlora_webgpu::train::TrainState::start(42, Schedule::new(ScheduleKind::Cosine, lr, 3, steps), Some(1.0)),
    }
}

/// The micro-batches of step k (a pure function of the position, as a data loader is).
fn data_at(pos: u64) -> Vec<Batch> {
    let mut rng = Rng::new(1000 + pos);
    vec![pattern_batch(&mut rng, 2, 9, 64), pattern_batch(&mut rng, 1, 12, 64)]
}

fn new_trainer(ctx: &Rc<GpuContext>, model: &Rc<Model>, steps: u64) -> Trainer {
    let cfg = lora_cfg(0.1);
    let set = qlora_webgpu::lora::init_lora_set(ctx, &model.cfg, &cfg, 7).unwrap();
    Trainer::new(ctx.clone(), model.clone(), cfg, set, opts(steps, 5e-3))
}

fn run(t: &mut Trainer, until: u64) -> Vec<f64> {
    let mut losses = Vec::new();
    while t.state.step < until {
        let pos = t.state.data.index;
        let r = block_on(t.step(&data_at(pos), DataPosition { epoch: 0, index: pos + 1 })).unwrap();
        losses.push(r.loss);
    }
    losses
}

#[test]
fn resume_from_a_checkpoint_continues_exactly() {
    let ctx = gpu();
    let model = small_random_model(&ctx, 3, 0.1);
    let mut whole = new_trainer(&ctx, &model, 20);
    let all = run(&mut whole, 20);

    let mut first = new_trainer(&ctx, &model, 20);
    let mut resumed_losses = run(&mut first, 10);
    let dir = std::env::temp_dir().join(format!("qlora-resume-{}", std::process::id()));
    save_checkpoint(&dir, &block_on(first.checkpoint()).unwrap(), &model.cfg).unwrap();
    drop(first);
    let ck = load_checkpoint(&dir, &model.cfg).unwrap();
    let mut second = Trainer::resume(ctx.clone(), model.clone(), &ck, false).unwrap();
    assert_eq!(second.state.step, 10);
    resumed_losses.extend(run(&mut second, 20));
    std::fs::remove_dir_all(&dir).ok();

    assert_eq!(all, resumed_losses, "losses of 20 steps vs 10 + resume + 10");
    let a = block_on(HostAdapter::download(&ctx, &whole.lora_cfg, &whole.set)).unwrap();
    let b = block_on(HostAdapter::download(&ctx, &second.lora_cfg, &second.set)).unwrap();
    assert!(a.layers == b.layers, "the adapter after 20 steps differs from the resumed run's");
    // "all-linear" is written out as the seven names, as PEFT does: compare what it selects.
    assert_eq!(a.config.targets(&model.cfg).unwrap(), b.config.targets(&model.cfg).unwrap());
    assert_eq!((a.config.r, a.config.lora_alpha, a.config.lora_dropout), (b.config.r, b.config.lora_alpha, b.config.lora_dropout));
}

#[test]
fn training_lowers_the_validation_loss() {
    let ctx = gpu();
    let model = small_random_model(&ctx, 5, 0.1);
    let mut t = new_trainer(&ctx, &model, 40);
    t.state.schedule = Schedule::new(ScheduleKind::Constant, 1e-2, 0, 40);
    let mut rng = Rng::new(77);
    let val: Vec<Batch> = (0..3).map(|_| pattern_batch(&mut rng, 2, 10, 64)).collect();
    let before = block_on(t.eval_loss(&val)).unwrap();
    run(&mut t, 40);
    let after = block_on(t.eval_loss(&val)).unwrap();
    eprintln!("validation loss {before:.4} -> {after:.4} (perplexity {:.2} -> {:.2})", before.exp(), after.exp());
    assert!(after < 0.8 * before, "validation loss {before} -> {after}");
}

#[test]
fn a_non_finite_loss_stops_the_step_and_changes_nothing() {
    let ctx = gpu();
    let model = small_random_model(&ctx, 9, 0.1);
    let mut t = new_trainer(&ctx, &model, 10);
    run(&mut t, 2);
    let good = block_on(t.checkpoint()).unwrap();
    // poison one B matrix: every logit becomes NaN
    let p = &t.set.layers[0][6].as_ref().unwrap().b;
    let n = p.value.numel();
    let nan = ctx.upload_f32(&vec![f32::NAN; n], p.value.shape()).unwrap();
    ctx.copy(&nan, &p.value).unwrap();
    let before = block_on(HostAdapter::download(&ctx, &t.lora_cfg, &t.set)).unwrap();
    let err = block_on(t.step(&data_at(2), DataPosition { epoch: 0, index: 3 })).err().expect("a NaN loss is an error");
    let msg = err.to_string();
    assert!(msg.contains("NaN") && msg.contains("step 3") && msg.contains("last good state"), "{msg}");
    assert_eq!(t.state.step, 2, "the failed step is not counted");
    let after = block_on(HostAdapter::download(&ctx, &t.lora_cfg, &t.set)).unwrap();
    let same = before.layers.iter().flatten().zip(after.layers.iter().flatten()).all(|(x, y)| match (x, y) {
        (Some(x), Some(y)) => x.a == y.a && x.b.iter().zip(&y.b).all(|(u, v)| u.to_bits() == v.to_bits()),
        (None, None) => true,
        _ => false,
    });
    assert!(same, "no parameter changed");
    assert_eq!(good.state.step, 2);
}
