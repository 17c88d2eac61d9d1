//! The DoRA linear (shaders/dora.wgsl, src/ops/dora.rs): the f64 reference's gradients for x, A,
//! B and the magnitude pass central finite differences at a fixed (detached) norm, with and
//! without dropout; without dropout it equals the paper's form m/||W0 + s·B·A|| ⊙ (W0 + s·B·A)
//! applied to x. On the GPU, with f32 and with NF4 bases (QLoRA + DoRA; the reference uses the
//! CPU-dequantized weight), on odd shapes and with dropout, the row norms, y and the four
//! gradients equal the reference; an NF4 norm computed in several row chunks equals the one-chunk
//! result.
//!
//! Tolerances: 1e-4 absolute + relative, as tests/ops_lora.rs (f32 products of up to 1001 terms;
//! the largest error seen is ~2e-6).

mod common;
use common::*;
use qlora_webgpu::autograd::{Param, ParamId, Tape};
use qlora_webgpu::gpu::GpuContext;
use qlora_webgpu::ops::dora;
use qlora_webgpu::ops::lora::{Frozen, LoraRun};
use qlora_webgpu::ops::nf4::Nf4Weight;
use qlora_webgpu::quant::nf4::quantize_nf4;

struct Case {
    rows: usize,
    k: usize,
    n: usize,
    r: usize,
    p: f64,
}

/// x, W0, A, B, m (m near the row norms, as trained magnitudes are).
fn data(rng: &mut Rng, c: &Case) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (x, w0, a, b) = (rng.vec(c.rows * c.k, 1.0), rng.vec(c.n * c.k, 0.3), rng.vec(c.r * c.k, 0.3), rng.vec(c.n * c.r, 0.3));
    let norm = dora::cpu::weight_norm(&w0, &a, &b, c.k, c.n, c.r, 1.5);
    let m = norm.iter().map(|v| v * (1.0 + 0.2 * rng.normal())).collect();
    (x, w0, a, b, m)
}

#[test]
fn reference_backward_passes_finite_differences() {
    let mut rng = Rng::new(17);
    for p in [0.0, 0.3] {
        let c = Case { rows: 3, k: 5, n: 4, r: 2, p };
        let (x, w0, a, b, m) = data(&mut rng, &c);
        let g = rng.vec(c.rows * c.n, 1.0);
        let (s, seed) = (1.5, 11);
        // The norm is detached: held at its value for the unperturbed A and B.
        let norm = dora::cpu::weight_norm(&w0, &a, &b, c.k, c.n, c.r, s);
        let f = |x: &[f64], a: &[f64], b: &[f64], m: &[f64]| dora::cpu::forward(x, &w0, a, b, m, &norm, c.rows, c.k, c.n, c.r, s, c.p, seed);
        let (dx, da, db, dm) = dora::cpu::backward(&g, &x, &w0, &a, &b, &m, &norm, c.rows, c.k, c.n, c.r, s, c.p, seed);
        gradcheck("dora dx", &|x| f(x, &a, &b, &m), &x, &g, &dx);
        gradcheck("dora dA", &|a| f(&x, a, &b, &m), &a, &g, &da);
        gradcheck("dora dB", &|b| f(&x, &a, b, &m), &b, &g, &db);
        gradcheck("dora dm", &|m| f(&x, &a, &b, m), &m, &g, &dm);
        if p == 0.0 {
            // PEFT's form equals the DoRA paper's: x · (m/||V|| ⊙ V)^T with V = W0 + s·B·A.
            let y = f(&x, &a, &b, &m);
            for i in 0..c.rows {
                for j in 0..c.n {
                    let v = |t: usize| w0[j * c.k + t] + s * (0..c.r).map(|q| b[j * c.r + q] * a[q * c.k + t]).sum::<f64>();
                    let want: f64 = (0..c.k).map(|t| x[i * c.k + t] * m[j] / norm[j] * v(t)).sum();
                    assert!((y[i * c.n + j] - want).abs() < 1e-12, "[{i},{j}] {} vs {want}", y[i * c.n + j]);
                }
            }
        }
    }
}

/// The base weight on the device and the f64 values the reference uses for it.
fn base(ctx: &GpuContext, w0: &[f64], n: usize, k: usize, nf4: bool) -> (Frozen, Vec<f64>) {
    if !nf4 {
        return (Frozen::F32(up(ctx, w0, &[n, k])), f32_round(w0));
    }
    let w32: Vec<f32> = w0.iter().map(|&v| v as f32).collect();
    let t = quantize_nf4(&w32, &[n, k], 64, true).unwrap();
    let deq = t.dequantize().iter().map(|&v| v as f64).collect();
    (Frozen::Nf4(Nf4Weight::upload(ctx, &t).unwrap()), deq)
}

#[test]
fn gpu_matches_reference_on_f32_and_nf4_bases() {
    let ctx = gpu();
    let mut rng = Rng::new(18);
    let cases = [
        Case { rows: 1, k: 3, n: 5, r: 1, p: 0.0 },
        Case { rows: 3, k: 63, n: 65, r: 4, p: 0.0 },
        Case { rows: 65, k: 64, n: 68, r: 8, p: 0.1 },
        Case { rows: 7, k: 1001, n: 33, r: 16, p: 0.25 },
        Case { rows: 5, k: 96, n: 130, r: 8, p: 0.0 },
    ];
    for nf4 in [false, true] {
        for (i, c) in cases.iter().enumerate() {
            let (x, w0, a, b, m) = data(&mut rng, c);
            let (frozen, w0r) = base(&ctx, &w0, c.n, c.k, nf4);
            let g = rng.vec(c.rows * c.n, 1.0);
            let run = LoraRun { scale: 1.5, dropout: c.p as f32, seed: 99 + i as u32 };
            let s = run.scale as f64;
            let (a, b, m) = (f32_round(&a), f32_round(&b), f32_round(&m));
            let x = f32_round(&x);
            let norm = dora::cpu::weight_norm(&w0r, &a, &b, c.k, c.n, c.r, s);
            let want = dora::cpu::forward(&x, &w0r, &a, &b, &m, &norm, c.rows, c.k, c.n, c.r, s, c.p, run.seed);
            let (dx_r, da_r, db_r, dm_r) = dora::cpu::backward(&g, &x, &w0r, &a, &b, &m, &norm, c.rows, c.k, c.n, c.r, s, c.p, run.seed);

            let what = format!("{} case {i} ({}x{}->{} r{} p{})", if nf4 { "NF4" } else { "f32" }, c.rows, c.k, c.n, c.r, c.p);
            let (at, bt) = (up(&ctx, &a, &[c.r, c.k]), up(&ctx, &b, &[c.n, c.r]));
            let got_norm = dora::weight_norm(&ctx, &frozen, &at, &bt, run.scale).unwrap();
            assert_close(&format!("{what} norm"), &read(&ctx, &got_norm), &norm, 1e-5, 1e-5);

            let mut tape = Tape::new(true);
            let xv = tape.input(up(&ctx, &x, &[c.rows, c.k]));
            let pa = Param { id: ParamId(1), value: at };
            let pb = Param { id: ParamId(2), value: bt };
            let pm = Param { id: ParamId(3), value: up(&ctx, &m, &[c.n]) };
            let (av, bv, mv) = (tape.param(&pa), tape.param(&pb), tape.param(&pm));
            let y = dora::dora_linear(&mut tape, &ctx, &xv, &frozen, None, &av, &bv, &mv, &run, None).unwrap();
            assert_close(&format!("{what} y"), &read(&ctx, y.value()), &want, 1e-4, 1e-4);
            let (grads, wrt) = tape.backward_from(&ctx, &y, up(&ctx, &g, &[c.rows, c.n]), &[&xv]).unwrap();
            assert_close(&format!("{what} dx"), &read(&ctx, wrt[0].as_ref().unwrap()), &dx_r, 1e-4, 1e-4);
            assert_close(&format!("{what} dA"), &read(&ctx, &grads[&ParamId(1)]), &da_r, 1e-4, 1e-4);
            assert_close(&format!("{what} dB"), &read(&ctx, &grads[&ParamId(2)]), &db_r, 1e-4, 1e-4);
            assert_close(&format!("{what} dm"), &read(&ctx, &grads[&ParamId(3)]), &dm_r, 1e-4, 1e-4);
        }
    }
}

/// The NF4 norm in row chunks (the device's binding limit lowered to 64 rows of f32) equals the
/// norm computed in one piece, bit for bit (each row is reduced the same way in either).
#[test]
fn nf4_norm_in_row_chunks_equals_one_piece() {
    let ctx = gpu();
    let mut rng = Rng::new(19);
    let (n, k, r) = (200, 96, 4);
    let (frozen, _) = base(&ctx, &rng.vec(n * k, 0.3), n, k, true);
    let (a, b) = (up(&ctx, &rng.vec(r * k, 0.3), &[r, k]), up(&ctx, &rng.vec(n * r, 0.3), &[n, r]));
    let whole = read(&ctx, &dora::weight_norm(&ctx, &frozen, &a, &b, 2.0).unwrap());
    let chunked = {
        let _low = Lowered::new(&ctx, (64 * k * 4) as u64);
        read(&ctx, &dora::weight_norm(&ctx, &frozen, &a, &b, 2.0).unwrap())
    };
    assert_eq!(whole, chunked);
}
