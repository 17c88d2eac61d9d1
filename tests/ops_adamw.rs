//! AdamW: the GPU step (f32, torch's operation order) follows the f64 reference over several
//! steps with and without weight decay, and reproduces the fixed two-step case below.
//! Tolerances: 1e-6 abs + 1e-5 rel on param (f32 rounding of values near 1 is 6e-8 a step),
//! 1e-9 abs + 1e-5 rel on m and v (their magnitudes are ~g and ~g²).

mod common;
use common::*;
use qlora_webgpu::gpu::{DType, GpuContext, Tensor};
use qlora_webgpu::ops::adamw::{self, AdamW};

struct State {
    p: Tensor,
    m: Tensor,
    v: Tensor,
}

fn state(ctx: &GpuContext, p: &[f64]) -> State {
    let n = p.len();
    State { p: up(ctx, p, &[n]), m: ctx.zeros(&[n], DType::F32).unwrap(), v: ctx.zeros(&[n], DType::F32).unwrap() }
}

#[test]
fn defaults_are_torchs() {
    let d = AdamW::default();
    assert_eq!((d.lr, d.beta1, d.beta2, d.eps, d.weight_decay), (1e-3, 0.9, 0.999, 1e-8, 0.01));
}

/// p = [1, -2, 0.5], g1 = [0.1, -0.2, 0.3], g2 = [-0.05, 0.4, 0], lr 1e-2, betas (0.9, 0.999),
/// eps 1e-8, wd 0.1. The expected values were computed with the formula in f64 (Python floats),
/// step by step: p *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps). They are not outputs of torch.
const P1: [f64; 3] = [0.9890000009999999, -1.9880000005, 0.4895000003333333];
const P2: [f64; 3] = [0.9853476309393391, -1.989673035654104, 0.4823099181075821];
const M2: [f64; 3] = [0.004, 0.021999999999999995, 0.026999999999999993];
const V2: [f64; 3] = [1.2490000000000014e-05, 0.00019996000000000022, 8.991000000000008e-05];

#[test]
fn two_steps_match_the_fixed_numbers() {
    let opt = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let p0 = [1.0, -2.0, 0.5];
    let grads = [[0.1, -0.2, 0.3], [-0.05, 0.4, 0.0]];

    // The f64 reference gives these numbers (to the last few bits: same formula, same order).
    let (mut p, mut m, mut v) = (p0.to_vec(), vec![0.0; 3], vec![0.0; 3]);
    adamw::cpu::step(&opt, &mut p, &grads[0], &mut m, &mut v, 1, opt.lr);
    for i in 0..3 {
        assert!((p[i] - P1[i]).abs() <= 1e-15, "reference step 1 p[{i}] = {}", p[i]);
    }
    adamw::cpu::step(&opt, &mut p, &grads[1], &mut m, &mut v, 2, opt.lr);
    for i in 0..3 {
        assert!((p[i] - P2[i]).abs() <= 1e-15, "reference step 2 p[{i}] = {}", p[i]);
        assert!((m[i] - M2[i]).abs() <= 1e-17 && (v[i] - V2[i]).abs() <= 1e-19, "reference m/v [{i}]");
    }

    // The f32 GPU step is within 1e-6 of them.
    let ctx = gpu();
    let s = state(&ctx, &p0);
    for (k, g) in grads.iter().enumerate() {
        let gt = up(&ctx, g, &[3]);
        opt.step(&ctx, &s.p, &gt, &s.m, &s.v, k as u64 + 1, 1e-2).unwrap();
        let want = if k == 0 { &P1 } else { &P2 };
        assert_close(&format!("adamw p step {}", k + 1), &read(&ctx, &s.p), want, 1e-6, 0.0);
    }
    assert_close("adamw m step 2", &read(&ctx, &s.m), &M2, 1e-9, 1e-6);
    assert_close("adamw v step 2", &read(&ctx, &s.v), &V2, 1e-12, 1e-6);
}

#[test]
fn several_steps_follow_the_f64_reference() {
    let ctx = gpu();
    let mut rng = Rng::new(41);
    for (wd, n) in [(0.0, 1001), (0.01, 65), (0.1, 1)] {
        let opt = AdamW { weight_decay: wd, ..AdamW::default() };
        let p0 = rng.vec(n, 1.0);
        let s = state(&ctx, &p0);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
        for t in 1..=10u64 {
            // A decaying schedule, passed per step; an exactly-zero gradient element too.
            let lr = (1e-2 / t as f64) as f32;
            let mut g = rng.vec(n, if t % 3 == 0 { 1e-3 } else { 0.5 });
            g[0] = 0.0;
            adamw::cpu::step(&opt, &mut p, &g, &mut m, &mut v, t, lr as f64);
            opt.step(&ctx, &s.p, &up(&ctx, &g, &[n]), &s.m, &s.v, t, lr).unwrap();
        }
        assert_close(&format!("adamw p wd {wd} n {n}"), &read(&ctx, &s.p), &p, 1e-6, 1e-5);
        assert_close(&format!("adamw m wd {wd} n {n}"), &read(&ctx, &s.m), &m, 1e-9, 1e-5);
        assert_close(&format!("adamw v wd {wd} n {n}"), &read(&ctx, &s.v), &v, 1e-12, 1e-5);
    }
}

#[test]
fn bad_arguments_are_errors() {
    let ctx = gpu();
    let opt = AdamW::default();
    let s = state(&ctx, &[1.0, 2.0]);
    let g = up(&ctx, &[0.1, 0.2], &[2]);
    assert!(opt.step(&ctx, &s.p, &g, &s.m, &s.v, 0, 1e-3).is_err(), "t = 0");
    let g3 = up(&ctx, &[0.1, 0.2, 0.3], &[3]);
    assert!(opt.step(&ctx, &s.p, &g3, &s.m, &s.v, 1, 1e-3).is_err(), "size mismatch");
    assert!(opt.step(&ctx, &s.p, &g, &s.m, &s.m, 1, 1e-3).is_err(), "m and v alias");
}
