//! Sequence packing (`--packing`, TRL's padding-free packing): best-fit-decreasing rows keep
//! every example whole and once; a packed batch of several examples gives the same loss (the
//! mean over the same counted tokens) and the same LoRA gradients as the same examples unpacked,
//! one per padded row (position ids restart per example, attention stays within each example).
//! That no attention weight crosses a boundary at the kernel level is tests/ops_attention.rs's
//! packed_rows_never_attend_across_examples.

mod common;
use common::*;
use qlora_webgpu::autograd::Tape;
use qlora_webgpu::data::dataset::{collate, collate_packed, pack, Example, PackedRow, IGNORE};
use qlora_webgpu::gpu::GpuContext;
use qlora_webgpu::lora::{init_lora_set, InitLoraWeights, LoraConfig};
use qlora_webgpu::model::llama::{ForwardOpts, LoraSet};
use qlora_webgpu::train::trainer::Model;
use std::rc::Rc;

/// Examples of the given lengths: random ids below 64, a "prompt" of the first third not
/// counted (-100), as a chat example's labels are.
fn examples(lens: &[usize], seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    lens.iter()
        .map(|&n| {
            let ids: Vec<u32> = (0..n).map(|_| rng.below(64) as u32).collect();
            let labels = ids.iter().enumerate().map(|(i, &x)| if i < n / 3 { IGNORE } else { x as i32 }).collect();
            Example { ids, labels }
        })
        .collect()
}

#[test]
fn best_fit_decreasing_keeps_every_example_whole_and_once() {
    let ex = examples(&[5, 7, 3, 9, 4, 6, 16, 1, 12, 2], 1);
    let rows = pack(&ex, 16).unwrap();
    let mut seen = vec![0; ex.len()];
    for r in &rows {
        assert!(r.ids.len() <= 16 && r.starts[0] == 0);
        let mut bounds = r.starts.clone();
        bounds.push(r.ids.len());
        for w in bounds.windows(2) {
            let piece = &r.ids[w[0]..w[1]];
            let i = ex.iter().position(|e| e.ids == piece && e.labels == r.labels[w[0]..w[1]]).expect("a packed piece is one example");
            seen[i] += 1;
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
    // 65 tokens in rows of 16: BFD needs the minimum, 5 rows.
    assert_eq!(rows.len(), 5);
    // The packed batch counts exactly the tokens the examples count unpacked.
    let refs: Vec<&PackedRow> = rows.iter().collect();
    let p = collate_packed(&refs, 0).unwrap();
    assert_eq!(p.n_tokens(), ex.iter().map(Example::n_counted).sum::<usize>());
    assert!(pack(&examples(&[17], 2), 16).is_err());
}

fn loss_and_grads(ctx: &Rc<GpuContext>, model: &Model, set: &LoraSet, ids: &[u32], targets: &[i32], batch: usize, seg: Option<&[u32]>, checkpoint: bool) -> (f64, Vec<Vec<f32>>) {
    let mut tape = Tape::new(true);
    let opts = ForwardOpts { grad_checkpoint: checkpoint, seed: 0 };
    let loss = model.loss_packed(&mut tape, ctx, set, ids, targets, batch, seg, opts).unwrap();
    let l = read(ctx, loss.value())[0] as f64;
    let g = tape.backward(ctx, &loss).unwrap();
    (l, set.params().iter().map(|p| read(ctx, &g[&p.id])).collect())
}

#[test]
fn packed_batch_gives_the_unpacked_loss_and_lora_gradients() {
    let ctx = gpu();
    let model = small_random_model(&ctx, 3, 0.2);
    let mut lc = LoraConfig::new(4, 8.0);
    lc.lora_dropout = 0.0;
    lc.init_lora_weights = InitLoraWeights::NoInit; // B != 0: A's gradients are not zero
    let set = init_lora_set(&ctx, &model.cfg, &lc, 5).unwrap();
    let ex = examples(&[5, 7, 3, 9, 4, 6, 11, 8], 7);

    // Unpacked: one example per row, right-padded to the longest.
    let refs: Vec<&Example> = ex.iter().collect();
    let u = collate(&refs, 0).unwrap();
    let (lu, gu) = loss_and_grads(&ctx, &model, &set, &u.ids, &u.targets, u.batch, None, false);

    // Packed: 53 tokens in rows of 24 (BFD: 11+9+4, 8+7+6+3, 5).
    let rows = pack(&ex, 24).unwrap();
    assert!(rows.len() < ex.len() && rows.iter().any(|r| r.starts.len() >= 3), "several examples share a row");
    let rrefs: Vec<&PackedRow> = rows.iter().collect();
    let p = collate_packed(&rrefs, 0).unwrap();
    assert_eq!(p.n_tokens(), u.n_tokens());
    for checkpoint in [false, true] {
        let (lp, gp) = loss_and_grads(&ctx, &model, &set, &p.ids, &p.targets, p.batch, p.seg.as_deref(), checkpoint);
        let loss_rel = (lp - lu).abs() / lu.abs();
        // Achieved: 0 (the same f32 sum over the same rows of the loss); bound: 8 f32 ulps.
        assert!(loss_rel <= 1e-6, "loss packed {lp} vs unpacked {lu}: relative {loss_rel:e}");
        let mut worst = 0.0f64;
        for (a, b) in gp.iter().zip(&gu) {
            let scale = b.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
            assert!(scale > 0.0, "a LoRA gradient is zero");
            let d = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale;
            worst = worst.max(d);
        }
        eprintln!("checkpoint {checkpoint}: loss {lp} vs {lu} (relative {loss_rel:e}); worst gradient error / max |gradient| of a tensor {worst:e}");
        // Achieved 3.5e-7 (f32 sums over other row groupings); bound 3.5e-6 (10x).
        assert!(worst <= 3.5e-6, "LoRA gradients differ by {worst:e} of their size");
    }

    // Without the segment starts (plain causal over the packed rows, positions running on) the
    // loss differs: the test can see a boundary being crossed.
    let mut tape = Tape::new(false);
    let l = model.loss_packed(&mut tape, &ctx, &set, &p.ids, &p.targets, p.batch, None, ForwardOpts::default()).unwrap();
    let l = read(&ctx, l.value())[0] as f64;
    assert!((l - lu).abs() / lu > 1e-3, "causal attention across examples gives {l}, unpacked {lu}");
}

/// End to end through the session (what `qlora train --packing` runs): on the tiny Llama with
/// the pirate-style chat data, the first step of a packed run scores the same tokens with the same
/// loss as the unpacked run of the same examples in one batch, in fewer rows.
#[test]
fn packed_session_step_equals_the_unpacked_one() {
    use qlora_webgpu::data::dataset::{Dataset, Format};
    use qlora_webgpu::gpu::block_on;
    use qlora_webgpu::io::hf::MmapDir;
    use qlora_webgpu::session::{BaseQuant, ModelSource, TrainConfig, TrainSession};
    let ctx = gpu();
    let dir = MmapDir::open(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/model")).unwrap();
    let model = ModelSource::from_hf("tiny-llama", &dir).unwrap().upload(&ctx, BaseQuant::F32, 128).unwrap();
    let mut jsonl = String::new();
    for (q, a) in [("Where be the gold?", "Buried on the isle, matey."), ("What is 2 plus 2?", "Arr, four."), ("Name a fruit.", "A lime, to keep the scurvy away, arr."), ("Is the sea wet?", "Aye."), ("Who are you?", "A humble pirate of the seven seas, arr!")] {
        jsonl += &serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string();
        jsonl.push('\n');
    }
    let data = Dataset::from_jsonl("pirates.jsonl", jsonl.as_bytes(), Format::Auto).unwrap();
    let cfg = TrainConfig { steps: 3, batch_size: 5, max_len: 128, shuffle: false, ..Default::default() };
    let mut plain = TrainSession::new(&ctx, &model, &data, cfg.clone(), None).unwrap();
    let mut packed = TrainSession::new(&ctx, &model, &data, TrainConfig { packing: true, ..cfg }, None).unwrap();
    let rows = packed.packed_rows().unwrap();
    assert!(rows < 5, "5 short examples pack into {rows} rows of 128");
    let a = block_on(plain.step()).unwrap();
    let b = block_on(packed.step()).unwrap();
    assert_eq!(a.counted_tokens, b.counted_tokens);
    let rel = (a.loss - b.loss).abs() / a.loss;
    // Achieved: 0; bound 8 f32 ulps.
    eprintln!("first step: unpacked {} packed {} (relative {rel:e}), rows {rows}, input tokens {} vs {}", a.loss, b.loss, a.input_tokens, b.input_tokens);
    assert!(rel <= 1e-6, "first step: unpacked loss {} vs packed {}", a.loss, b.loss);
}
