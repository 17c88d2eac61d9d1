//! The LoRA linear: the f64 reference passes finite differences (with and without dropout); the
//! GPU forward and the gradients for x, A and B agree with it on odd shapes; the seeded dropout
//! mask is the same on the GPU and the CPU and drops about p of the elements.

mod common;
use common::*;
use qlora_webgpu::autograd::{Param, ParamId, Tape};
use qlora_webgpu::ops::lora::{self, Frozen, LoraRun};

struct Case {
    rows: usize,
    k: usize,
    n: usize,
    r: usize,
    p: f64,
}

fn data(rng: &mut Rng, c: &Case) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    (rng.vec(c.rows * c.k, 1.0), rng.vec(c.n * c.k, 0.3), rng.vec(c.r * c.k, 0.3), rng.vec(c.n * c.r, 0.3))
}

#[test]
fn reference_backward_passes_finite_differences() {
    let mut rng = Rng::new(7);
    for p in [0.0, 0.3] {
        let c = Case { rows: 3, k: 5, n: 4, r: 2, p };
        let (x, w0, a, b) = data(&mut rng, &c);
        let g = rng.vec(c.rows * c.n, 1.0);
        let (s, seed) = (2.0, 11);
        let f = |x: &[f64], a: &[f64], b: &[f64]| lora::cpu::forward(x, &w0, a, b, c.rows, c.k, c.n, c.r, s, c.p, seed);
        let (dx, da, db) = lora::cpu::backward(&g, &x, &w0, &a, &b, c.rows, c.k, c.n, c.r, s, c.p, seed);
        gradcheck("lora dx", &|x| f(x, &a, &b), &x, &g, &dx);
        gradcheck("lora dA", &|a| f(&x, a, &b), &a, &g, &da);
        gradcheck("lora dB", &|b| f(&x, &a, b), &b, &g, &db);
    }
}

#[test]
fn gpu_matches_reference_on_odd_shapes() {
    let ctx = gpu();
    let mut rng = Rng::new(8);
    let cases = [
        Case { rows: 1, k: 3, n: 5, r: 1, p: 0.0 },
        Case { rows: 3, k: 63, n: 65, r: 4, p: 0.0 },
        Case { rows: 65, k: 64, n: 68, r: 8, p: 0.1 },
        Case { rows: 7, k: 1001, n: 33, r: 16, p: 0.25 },
    ];
    for (i, c) in cases.iter().enumerate() {
        let (x, w0, a, b) = data(&mut rng, c);
        let g = rng.vec(c.rows * c.n, 1.0);
        let run = LoraRun { scale: 1.5, dropout: c.p as f32, seed: 1234 + i as u32 };
        let s = run.scale as f64;
        let want = lora::cpu::forward(&x, &w0, &a, &b, c.rows, c.k, c.n, c.r, s, c.p, run.seed);
        let (dx_r, da_r, db_r) = lora::cpu::backward(&g, &x, &w0, &a, &b, c.rows, c.k, c.n, c.r, s, c.p, run.seed);

        let mut tape = Tape::new(true);
        let xv = tape.input(up(&ctx, &x, &[c.rows, c.k]));
        let pa = Param { id: ParamId(1), value: up(&ctx, &a, &[c.r, c.k]) };
        let pb = Param { id: ParamId(2), value: up(&ctx, &b, &[c.n, c.r]) };
        let (av, bv) = (tape.param(&pa), tape.param(&pb));
        let w0t = Frozen::F32(up(&ctx, &w0, &[c.n, c.k]));
        let y = lora::lora_linear(&mut tape, &ctx, &xv, &w0t, &av, &bv, &run).unwrap();
        let what = format!("case {i} ({}x{}->{} r{} p{})", c.rows, c.k, c.n, c.r, c.p);
        assert_close(&format!("{what} y"), &read(&ctx, y.value()), &want, 1e-4, 1e-4);
        let (grads, wrt) = tape.backward_from(&ctx, &y, up(&ctx, &g, &[c.rows, c.n]), &[&xv]).unwrap();
        assert_close(&format!("{what} dx"), &read(&ctx, wrt[0].as_ref().unwrap()), &dx_r, 1e-4, 1e-4);
        assert_close(&format!("{what} dA"), &read(&ctx, &grads[&ParamId(1)]), &da_r, 1e-4, 1e-4);
        assert_close(&format!("{what} dB"), &read(&ctx, &grads[&ParamId(2)]), &db_r, 1e-4, 1e-4);
    }
}

#[test]
fn dropout_mask_is_seeded_and_drops_about_p() {
    let ctx = gpu();
    let n = 100_000;
    let x: Vec<f64> = vec![1.0; n];
    let xt = up(&ctx, &x, &[n]);
    for (p, seed) in [(0.1f32, 1u32), (0.5, 2)] {
        let run = LoraRun { scale: 1.0, dropout: p, seed };
        let out = read(&ctx, &lora::dropout_forward(&ctx, &xt, &run).unwrap());
        let kept = out.iter().filter(|&&v| v != 0.0).count();
        let frac = 1.0 - kept as f64 / n as f64;
        assert!((frac - p as f64).abs() < 0.01, "p {p}: dropped fraction {frac}");
        for (i, &v) in out.iter().enumerate() {
            let want = if lora::keep(seed, i as u32, p) { 1.0 / (1.0 - p) } else { 0.0 };
            assert_eq!(v, want, "element {i}");
        }
        let again = read(&ctx, &lora::dropout_forward(&ctx, &xt, &run).unwrap());
        assert_eq!(out, again, "same seed, same mask");
        let other = read(&ctx, &lora::dropout_forward(&ctx, &xt, &LoraRun { seed: seed + 100, ..run }).unwrap());
        assert_ne!(out, other, "another seed, another mask");
    }
}
