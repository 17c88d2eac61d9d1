//! SwiGLU: the f64 reference passes a finite-difference check; the GPU forward and backward agree
//! with it on odd shapes and on large |gate| (where a naive sigmoid overflows); the tape gives the
//! backward kernel's gradients.
//! Tolerances: forward 1e-6 abs + 1e-5 rel, backward 1e-6 abs + 1e-5 rel (a few f32 ulps of
//! exp and two products).

mod common;
use common::*;
use qlora_webgpu::autograd::Tape;
use qlora_webgpu::ops::swiglu;

#[test]
fn reference_backward_passes_finite_differences() {
    let mut rng = Rng::new(11);
    let n = 24;
    let mut gate = rng.vec(n, 2.0);
    gate[0] = 30.0;
    gate[1] = -30.0;
    let up = rng.vec(n, 1.0);
    let dout = rng.vec(n, 1.0);
    let (dg, du) = swiglu::cpu::backward(&dout, &gate, &up);
    gradcheck("swiglu dgate", &|g| swiglu::cpu::forward(g, &up), &gate, &dout, &dg);
    gradcheck("swiglu dup", &|u| swiglu::cpu::forward(&gate, u), &up, &dout, &du);
}

#[test]
fn reference_sigmoid_does_not_overflow() {
    for g in [-1e4, -800.0, -100.0, 100.0, 800.0, 1e4] {
        let s = swiglu::cpu::sigmoid(g);
        assert!(s.is_finite() && (0.0..=1.0).contains(&s), "sigmoid({g}) = {s}");
    }
    assert_eq!(swiglu::cpu::sigmoid(-1e4), 0.0);
    assert_eq!(swiglu::cpu::sigmoid(1e4), 1.0);
}

fn check_gpu(n: usize, i: usize, gate: &[f64], upv: &[f64], dout: &[f64]) {
    let ctx = gpu();
    let shape = [n, i];
    let (gt, ut, dt) = (up(&ctx, gate, &shape), up(&ctx, upv, &shape), up(&ctx, dout, &shape));
    let out = swiglu::forward(&ctx, &gt, &ut).unwrap();
    assert_eq!(out.shape(), &shape);
    assert_close(&format!("swiglu out {n}x{i}"), &read(&ctx, &out), &swiglu::cpu::forward(gate, upv), 1e-6, 1e-5);
    let (dg_ref, du_ref) = swiglu::cpu::backward(dout, gate, upv);
    let (dg, du) = swiglu::backward(&ctx, &dt, &gt, &ut).unwrap();
    assert_close(&format!("swiglu dgate {n}x{i}"), &read(&ctx, &dg), &dg_ref, 1e-6, 1e-5);
    assert_close(&format!("swiglu dup {n}x{i}"), &read(&ctx, &du), &du_ref, 1e-6, 1e-5);
}

#[test]
fn gpu_matches_reference_on_odd_shapes() {
    let mut rng = Rng::new(12);
    for n in [1, 3, 65] {
        for i in [1, 63, 65, 1001] {
            let gate = rng.vec(n * i, 3.0);
            let upv = rng.vec(n * i, 1.0);
            let dout = rng.vec(n * i, 1.0);
            check_gpu(n, i, &gate, &upv, &dout);
        }
    }
}

#[test]
fn gpu_is_finite_for_large_gates() {
    let gate: Vec<f64> = vec![-1e4, -200.0, -88.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.0, 200.0, 1e4];
    let n = gate.len();
    let upv: Vec<f64> = (0..n).map(|k| 0.5 + k as f64 * 0.25).collect();
    let dout: Vec<f64> = (0..n).map(|k| 1.0 - k as f64 * 0.125).collect();
    check_gpu(1, n, &gate, &upv, &dout);
}

#[test]
fn tape_gives_the_backward_kernels_gradients() {
    let ctx = gpu();
    let mut rng = Rng::new(13);
    let (n, i) = (3, 65);
    let (gate, upv, dout) = (rng.vec(n * i, 2.0), rng.vec(n * i, 1.0), rng.vec(n * i, 1.0));
    let (gt, ut, dt) = (up(&ctx, &gate, &[n, i]), up(&ctx, &upv, &[n, i]), up(&ctx, &dout, &[n, i]));
    let (dg_direct, du_direct) = swiglu::backward(&ctx, &dt, &gt, &ut).unwrap();

    let mut tape = Tape::new(true);
    let g = tape.input(gt.clone());
    let u = tape.input(ut.clone());
    let out = swiglu::swiglu(&mut tape, &ctx, &g, &u).unwrap();
    assert!(out.requires_grad());
    let (_, grads) = tape.backward_from(&ctx, &out, dt.clone(), &[&g, &u]).unwrap();
    assert_eq!(read(&ctx, grads[0].as_ref().unwrap()), read(&ctx, &dg_direct));
    assert_eq!(read(&ctx, grads[1].as_ref().unwrap()), read(&ctx, &du_direct));

    // Only `up` trainable: only its gradient comes back.
    let mut tape = Tape::new(true);
    let g = tape.constant(gt.clone());
    let u = tape.input(ut.clone());
    let out = swiglu::swiglu(&mut tape, &ctx, &g, &u).unwrap();
    let (_, grads) = tape.backward_from(&ctx, &out, dt, &[&g, &u]).unwrap();
    assert!(grads[0].is_none());
    assert_eq!(read(&ctx, grads[1].as_ref().unwrap()), read(&ctx, &du_direct));

    // Nothing trainable: nothing recorded.
    let mut tape = Tape::new(true);
    let g = tape.constant(gt);
    let u = tape.constant(ut);
    assert!(!swiglu::swiglu(&mut tape, &ctx, &g, &u).unwrap().requires_grad());
}

#[test]
fn mismatched_shapes_are_an_error() {
    let ctx = gpu();
    let a = ctx.zeros(&[2, 3], qlora_webgpu::gpu::DType::F32).unwrap();
    let b = ctx.zeros(&[3, 2], qlora_webgpu::gpu::DType::F32).unwrap();
    assert!(swiglu::forward(&ctx, &a, &b).is_err());
}
