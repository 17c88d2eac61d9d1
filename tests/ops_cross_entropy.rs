//! Cross-entropy: the f64 reference passes a finite-difference check; the GPU loss, per-row loss,
//! lse and dlogits agree with it on odd shapes with ignored rows, and at V = 49152 with logits of
//! ±80 (a naive exp overflows there); count 0 gives loss 0 and a zero gradient; bad targets are
//! errors naming the row; on the tape, embedding -> SwiGLU -> cross-entropy gives the gradients of
//! the f64 chain.
//! Tolerances: loss, per-row loss and lse 1e-5 abs + 1e-5 rel (a few f32 ulps of values near 10);
//! at |logits| ~ 80 the ulp of lse is 7.6e-6, so there 4e-5 abs. dlogits 1e-7 abs + 1e-4 rel
//! (exp of a difference of two rounded f32 values; at ±80 that difference carries ~1e-5 abs).

mod common;
use common::*;
use qlora_webgpu::autograd::{Param, ParamId, Tape};
use qlora_webgpu::gpu::{DType, GpuContext};
use qlora_webgpu::ops::{cross_entropy as ce, embedding, swiglu};

fn targets_for(rng: &mut Rng, n: usize, v: usize, ignore_every: usize) -> Vec<i32> {
    (0..n).map(|k| if k % ignore_every == 1 { ce::IGNORE_INDEX } else { rng.below(v) as i32 }).collect()
}

#[test]
fn reference_backward_passes_finite_differences() {
    let mut rng = Rng::new(31);
    let (n, v) = (4, 6);
    let logits = rng.vec(n * v, 2.0);
    let targets = [3, -100, 0, 5];
    let dloss = 0.7;
    let d = ce::cpu::backward(dloss, &logits, v, &targets);
    gradcheck("cross_entropy dlogits", &|x| vec![ce::cpu::forward(x, v, &targets).0], &logits, &[dloss], &d);
    assert!(d[v..2 * v].iter().all(|&x| x == 0.0), "ignored row has a gradient");
}

fn check_gpu(ctx: &GpuContext, n: usize, v: usize, logits: &[f64], targets: &[i32], dloss: f64, atol_fwd: f64) {
    let what = format!("n{n} v{v}");
    let lt = up(ctx, logits, &[n, v]);
    let (loss, rows, lse) = ce::forward(ctx, &lt, targets).unwrap();
    assert_eq!((loss.shape(), rows.shape(), lse.shape()), (&[1usize][..], &[n][..], &[n][..]));
    let (want_loss, want_rows, want_lse) = ce::cpu::forward(logits, v, targets);
    assert_close(&format!("ce loss {what}"), &read(ctx, &loss), &[want_loss], atol_fwd, 1e-5);
    assert_close(&format!("ce row loss {what}"), &read(ctx, &rows), &want_rows, atol_fwd, 1e-5);
    assert_close(&format!("ce lse {what}"), &read(ctx, &lse), &want_lse, atol_fwd, 1e-5);
    let dt = up(ctx, &[dloss], &[1]);
    let d = ce::backward(ctx, &dt, &lt, targets, &lse).unwrap();
    assert_eq!(d.shape(), &[n, v]);
    let got = read(ctx, &d);
    assert_close(&format!("ce dlogits {what}"), &got, &ce::cpu::backward(dloss, logits, v, targets), 1e-7, 1e-4);
    for (r, &t) in targets.iter().enumerate() {
        if t == ce::IGNORE_INDEX {
            assert!(got[r * v..(r + 1) * v].iter().all(|&x| x == 0.0), "{what}: ignored row {r} has a gradient");
        }
    }
}

#[test]
fn gpu_matches_reference_on_odd_shapes() {
    let ctx = gpu();
    let mut rng = Rng::new(32);
    for n in [1, 3, 65] {
        for v in [1, 63, 65, 1001] {
            let logits = rng.vec(n * v, 3.0);
            let targets = targets_for(&mut rng, n, v, 3);
            check_gpu(&ctx, n, v, &logits, &targets, 0.7, 1e-5);
        }
    }
}

#[test]
fn large_vocabulary_with_large_logits_is_safe() {
    let ctx = gpu();
    let mut rng = Rng::new(33);
    let (n, v) = (3, 49152);
    // ±80 (exp(80) overflows f32) plus noise, one row's target at its max, one ignored row.
    let mut logits: Vec<f64> = (0..n * v).map(|_| ((if rng.uniform() < 0.5 { -80.0 } else { 80.0 }) + rng.normal()) as f32 as f64).collect();
    logits[7] = 90.0;
    let targets = [7, ce::IGNORE_INDEX, 40000];
    check_gpu(&ctx, n, v, &logits, &targets, 1.0, 4e-5);
}

#[test]
fn every_row_ignored_gives_zero_loss_and_gradient() {
    let ctx = gpu();
    let mut rng = Rng::new(34);
    let (n, v) = (3, 65);
    let logits = rng.vec(n * v, 1.0);
    let targets = [ce::IGNORE_INDEX; 3];
    assert_eq!(ce::cpu::forward(&logits, v, &targets).0, 0.0);
    let lt = up(&ctx, &logits, &[n, v]);
    let (loss, _, lse) = ce::forward(&ctx, &lt, &targets).unwrap();
    assert_eq!(read(&ctx, &loss), [0.0]);
    let d = ce::backward(&ctx, &up(&ctx, &[1.0], &[1]), &lt, &targets, &lse).unwrap();
    assert!(read(&ctx, &d).iter().all(|&x| x == 0.0));
}

#[test]
fn bad_targets_are_errors_naming_the_row() {
    let ctx = gpu();
    let lt = ctx.zeros(&[3, 5], DType::F32).unwrap();
    for bad in [5, -1, -101] {
        let err = ce::forward(&ctx, &lt, &[0, bad, -100]).unwrap_err().to_string();
        assert!(err.contains("row 1") && err.contains(&bad.to_string()), "{err}");
    }
    assert!(ce::forward(&ctx, &lt, &[0, 1]).is_err(), "target count must equal the rows");
}

#[test]
fn three_dimensional_logits_fold_into_rows() {
    let ctx = gpu();
    let mut rng = Rng::new(35);
    let (b, t, v) = (2, 3, 63);
    let logits = rng.vec(b * t * v, 2.0);
    let targets = targets_for(&mut rng, b * t, v, 4);
    let (loss, _, lse) = ce::forward(&ctx, &up(&ctx, &logits, &[b, t, v]), &targets).unwrap();
    let (want, _, want_lse) = ce::cpu::forward(&logits, v, &targets);
    assert_close("ce loss (B, T, V)", &read(&ctx, &loss), &[want], 1e-5, 1e-5);
    assert_close("ce lse (B, T, V)", &read(&ctx, &lse), &want_lse, 1e-5, 1e-5);
}

/// loss = CE(swiglu(table_g[ids], table_u[ids]), targets) on the tape, with both tables trainable:
/// the gradients of the tables equal the f64 chain of the three reference backwards.
#[test]
fn tape_chain_matches_the_reference_chain() {
    let ctx = gpu();
    let mut rng = Rng::new(36);
    let (vocab, c) = (11, 65); // c is also the vocabulary of the loss
    let ids = [3u32, 0, 3, 10, 7, 3, 0];
    let n = ids.len();
    let targets: Vec<i32> = (0..n).map(|k| if k == 2 { -100 } else { rng.below(c) as i32 }).collect();
    let (tg, tu) = (rng.vec(vocab * c, 1.5), rng.vec(vocab * c, 1.0));

    let pg = Param { id: ParamId(1), value: up(&ctx, &tg, &[vocab, c]) };
    let pu = Param { id: ParamId(2), value: up(&ctx, &tu, &[vocab, c]) };
    let mut tape = Tape::new(true);
    let (wg, wu) = (tape.param(&pg), tape.param(&pu));
    let gate = embedding::embedding(&mut tape, &ctx, &wg, &ids).unwrap();
    let upv = embedding::embedding(&mut tape, &ctx, &wu, &ids).unwrap();
    let h = swiglu::swiglu(&mut tape, &ctx, &gate, &upv).unwrap();
    let loss = ce::cross_entropy(&mut tape, &ctx, &h, &targets).unwrap();
    assert_eq!(loss.shape(), &[1]);
    let loss_val = read(&ctx, loss.value());
    let grads = tape.backward(&ctx, &loss).unwrap();

    let g64 = embedding::cpu::forward(&tg, c, &ids);
    let u64_ = embedding::cpu::forward(&tu, c, &ids);
    let h64 = swiglu::cpu::forward(&g64, &u64_);
    let (want_loss, _, _) = ce::cpu::forward(&h64, c, &targets);
    assert_close("chain loss", &loss_val, &[want_loss], 1e-5, 1e-5);
    let dh = ce::cpu::backward(1.0, &h64, c, &targets);
    let (dg, du) = swiglu::cpu::backward(&dh, &g64, &u64_);
    let want_g = embedding::cpu::backward(&dg, c, &ids, vocab);
    let want_u = embedding::cpu::backward(&du, c, &ids, vocab);
    assert_close("chain dtable_gate", &read(&ctx, &grads[&ParamId(1)]), &want_g, 1e-7, 1e-4);
    assert_close("chain dtable_up", &read(&ctx, &grads[&ParamId(2)]), &want_u, 1e-7, 1e-4);

    // Frozen logits: nothing recorded, the loss is still computed.
    let mut tape = Tape::new(true);
    let x = tape.constant(up(&ctx, &h64, &[n, c]));
    let l = ce::cross_entropy(&mut tape, &ctx, &x, &targets).unwrap();
    assert!(!l.requires_grad());
    assert_close("frozen loss", &read(&ctx, l.value()), &[want_loss], 1e-5, 1e-5);
}
