//! The frozen bias of a linear layer (shaders/elementwise.wgsl `add_bias_forward`): the GPU
//! broadcast add equals the f64 reference on odd shapes, its tape rule passes the gradient to the
//! input unchanged and gives the bias none, and the biased LoRA linear (f32 and NF4 base weight)
//! equals x·W0^T + b0 + s·(dropout(x)·A^T)·B^T with the gradients of the unbiased one.

mod common;
use common::*;
use qlora_webgpu::autograd::{self, Param, ParamId, Tape};
use qlora_webgpu::ops::elementwise;
use qlora_webgpu::ops::lora::{self, Frozen, LoraRun};
use qlora_webgpu::ops::nf4::Nf4Weight;
use qlora_webgpu::quant::nf4::quantize_nf4;

fn max_abs(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(&g, w)| (g as f64 - w).abs()).fold(0.0, f64::max)
}

#[test]
fn reference_add_bias_passes_finite_differences() {
    let mut rng = Rng::new(1);
    let (rows, c) = (3, 7);
    let x = rng.vec(rows * c, 1.0);
    let b = rng.vec(c, 1.0);
    let dout = rng.vec(rows * c, 1.0);
    // d(x + b)/dx = dout: the rule the tape applies.
    gradcheck("add_bias dx", &|x| elementwise::cpu::add_bias(x, &b), &x, &dout, &dout);
}

#[test]
fn gpu_add_bias_matches_reference_on_odd_shapes() {
    let ctx = gpu();
    let mut rng = Rng::new(2);
    for shape in [vec![1, 1], vec![3, 63], vec![2, 65], vec![5, 257], vec![3, 1001], vec![2, 3, 7], vec![1, 4097]] {
        let c = *shape.last().unwrap();
        let n: usize = shape.iter().product();
        let x = rng.vec(n, 2.0);
        let b = rng.vec(c, 1.0);
        let want = elementwise::cpu::add_bias(&x, &b);
        let got = read(&ctx, &elementwise::add_bias(&ctx, &up(&ctx, &x, &shape), &up(&ctx, &b, &[c])).unwrap());
        // One f32 add of f32 inputs: exactly the rounded f64 sum.
        let want32: Vec<f64> = want.iter().map(|&v| v as f32 as f64).collect();
        assert_close(&format!("add_bias {shape:?}"), &got, &want32, 0.0, 0.0);
    }
    // A bias that does not match the last dimension is a shape error.
    let x = up(&ctx, &[0.0; 6], &[2, 3]);
    let err = elementwise::add_bias(&ctx, &x, &up(&ctx, &[0.0; 2], &[2])).unwrap_err().to_string();
    assert!(err.contains("add_bias") && err.contains("[2]") && err.contains("[2, 3]"), "{err}");
}

#[test]
fn tape_add_bias_passes_the_gradient_to_the_input_only() {
    let ctx = gpu();
    let mut rng = Rng::new(3);
    let (rows, c) = (5, 33);
    let x = rng.vec(rows * c, 1.0);
    let b = rng.vec(c, 1.0);
    let g = rng.vec(rows * c, 1.0);
    let mut tape = Tape::new(true);
    let xv = tape.input(up(&ctx, &x, &[rows, c]));
    let y = autograd::add_bias(&mut tape, &ctx, &xv, &up(&ctx, &b, &[c])).unwrap();
    assert!(y.requires_grad());
    let (grads, wrt) = tape.backward_from(&ctx, &y, up(&ctx, &g, &[rows, c]), &[&xv]).unwrap();
    assert!(grads.is_empty(), "a frozen bias gets no gradient");
    assert_eq!(read(&ctx, wrt[0].as_ref().unwrap()), g.iter().map(|&v| v as f32).collect::<Vec<_>>());
    // On a constant input nothing is recorded.
    let mut tape = Tape::new(true);
    let xc = tape.constant(up(&ctx, &x, &[rows, c]));
    assert!(!autograd::add_bias(&mut tape, &ctx, &xc, &up(&ctx, &b, &[c])).unwrap().requires_grad());
}

#[test]
fn biased_lora_linear_matches_reference_with_unchanged_gradients() {
    let ctx = gpu();
    let mut rng = Rng::new(4);
    // (rows, k, n, r, dropout, nf4): NF4 needs k * n in whole blocks of 64.
    for (i, &(rows, k, n, r, p, nf4)) in
        [(1, 3, 5, 1, 0.0, false), (3, 63, 65, 4, 0.0, false), (7, 1001, 33, 16, 0.25, false), (5, 64, 33, 4, 0.1, true), (3, 128, 65, 8, 0.0, true)]
            .iter()
            .enumerate()
    {
        let x = rng.vec(rows * k, 1.0);
        let mut w0 = rng.vec(n * k, 0.3);
        let (a, b) = (rng.vec(r * k, 0.3), rng.vec(n * r, 0.3));
        let bias = rng.vec(n, 1.0);
        let g = rng.vec(rows * n, 1.0);
        let w0t = if nf4 {
            let q = quantize_nf4(&w0.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[n, k], 64, false).unwrap();
            w0 = q.dequantize().iter().map(|&v| v as f64).collect();
            Frozen::Nf4(Nf4Weight::upload(&ctx, &q).unwrap())
        } else {
            Frozen::F32(up(&ctx, &w0, &[n, k]))
        };
        let run = LoraRun { scale: 1.5, dropout: p as f32, seed: 77 + i as u32 };
        let s = run.scale as f64;
        let want = elementwise::cpu::add_bias(&lora::cpu::forward(&x, &w0, &a, &b, rows, k, n, r, s, p, run.seed), &bias);
        let (dx_r, da_r, db_r) = lora::cpu::backward(&g, &x, &w0, &a, &b, rows, k, n, r, s, p, run.seed);
        let what = format!("case {i} ({rows}x{k}->{n} r{r} p{p}{})", if nf4 { " nf4" } else { "" });

        let mut tape = Tape::new(true);
        let xv = tape.input(up(&ctx, &x, &[rows, k]));
        let pa = Param { id: ParamId(1), value: up(&ctx, &a, &[r, k]) };
        let pb = Param { id: ParamId(2), value: up(&ctx, &b, &[n, r]) };
        let (av, bv) = (tape.param(&pa), tape.param(&pb));
        let bt = up(&ctx, &bias, &[n]);
        let y = lora::lora_linear_with_bias(&mut tape, &ctx, &xv, &w0t, Some(&bt), &av, &bv, &run).unwrap();
        let got = read(&ctx, y.value());
        eprintln!("{what}: y max |GPU - f64| = {:.2e}", max_abs(&got, &want));
        assert_close(&format!("{what} y"), &got, &want, 1e-4, 1e-4);
        let (grads, wrt) = tape.backward_from(&ctx, &y, up(&ctx, &g, &[rows, n]), &[&xv]).unwrap();
        assert_close(&format!("{what} dx"), &read(&ctx, wrt[0].as_ref().unwrap()), &dx_r, 1e-4, 1e-4);
        assert_close(&format!("{what} dA"), &read(&ctx, &grads[&ParamId(1)]), &da_r, 1e-4, 1e-4);
        assert_close(&format!("{what} dB"), &read(&ctx, &grads[&ParamId(2)]), &db_r, 1e-4, 1e-4);

        // Without an adapter: y = x·W0^T + b0, dx = g·W0.
        let mut tape = Tape::new(true);
        let xv = tape.input(up(&ctx, &x, &[rows, k]));
        let y = lora::frozen_linear_with_bias(&mut tape, &ctx, &xv, &w0t, Some(&bt)).unwrap();
        let zero = vec![0.0; n * r];
        let want = elementwise::cpu::add_bias(&lora::cpu::forward(&x, &w0, &a, &zero, rows, k, n, r, s, 0.0, 0), &bias);
        assert_close(&format!("{what} frozen y"), &read(&ctx, y.value()), &want, 1e-4, 1e-4);
        let (_, wrt) = tape.backward_from(&ctx, &y, up(&ctx, &g, &[rows, n]), &[&xv]).unwrap();
        let (dx_f, _, _) = lora::cpu::backward(&g, &x, &w0, &a, &zero, rows, k, n, r, s, 0.0, 0);
        assert_close(&format!("{what} frozen dx"), &read(&ctx, wrt[0].as_ref().unwrap()), &dx_f, 1e-4, 1e-4);
    }
}
