//! The frozen NF4 linear layer (src/ops/nf4.rs, shaders/nf4.wgsl) against the f32 matmul on the
//! same shapes in the same run: forward y = x · W^T vs `matmul::x_wt`, input gradient
//! dx = dy · W vs `matmul::g_w`, for both NF4 designs (scratch: dequantize, then the f32 matmul;
//! fused: W decoded inside a register-blocked matmul) and both scale formats (plain absmax,
//! double-quantized); and the weight memory of each.
//!
//! `cargo bench --bench nf4 [-- --quick]`. Shapes: the four projections of SmolLM2-135M,
//! (K, N) = (in, out) = 576x576, 576x192, 576x1536, 1536x576, block 64; M = 512 tokens (training),
//! then M = 1 and 8 (where the launches take the fused kernel).
//! Timing: std::time::Instant around the launch and `block_on(ctx.sync())`; one warm-up of every
//! variant (it also compiles the pipelines), then rounds that run every variant once in turn
//! (interleaved, since the machine is shared and noisy); the median of the rounds is reported.

use qlora_webgpu::gpu::{block_on, GpuContext, Tensor};
use qlora_webgpu::ops::nf4::{self, Nf4Weight};
use qlora_webgpu::ops::matmul;
use qlora_webgpu::quant::nf4::quantize_nf4;
use std::time::Instant;

const SHAPES: [(usize, usize); 4] = [(576, 576), (576, 192), (576, 1536), (1536, 576)];

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

type Launch<'a> = Box<dyn Fn() -> Tensor + 'a>;

/// Median seconds of each launch: one warm-up each, then `rounds` rounds running each once.
fn time_interleaved(ctx: &GpuContext, launches: &[Launch], rounds: usize) -> Vec<f64> {
    for f in launches {
        drop(f());
        block_on(ctx.sync()).unwrap();
    }
    let mut times = vec![Vec::new(); launches.len()];
    for _ in 0..rounds {
        for (f, t) in launches.iter().zip(&mut times) {
            let t0 = Instant::now();
            let out = f();
            block_on(ctx.sync()).unwrap();
            t.push(t0.elapsed().as_secs_f64());
            drop(out);
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(|a, b| a.partial_cmp(b).unwrap());
            t[t.len() / 2]
        })
        .collect()
}

/// One layer shape on the device: the f32 weight, its NF4 forms, and inputs of `m` rows.
struct Layer {
    k: usize,
    n: usize,
    wf: Tensor,
    wp: Nf4Weight,
    wq: Nf4Weight,
    x: Tensor,
    g: Tensor,
}

fn layer(ctx: &GpuContext, m: usize, k: usize, n: usize, seed: u64) -> Layer {
    let w32 = random(n * k, 3 * seed + 1, 0.1);
    let tp = quantize_nf4(&w32, &[n, k], 64, false).unwrap();
    let tq = tp.to_double_quant().unwrap();
    Layer {
        k,
        n,
        wf: ctx.upload_f32(&w32, &[n, k]).unwrap(),
        wp: Nf4Weight::upload(ctx, &tp).unwrap(),
        wq: Nf4Weight::upload(ctx, &tq).unwrap(),
        x: ctx.upload_f32(&random(m * k, 3 * seed + 2, 2.0), &[m, k]).unwrap(),
        g: ctx.upload_f32(&random(m * n, 3 * seed + 3, 2.0), &[m, n]).unwrap(),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 3 } else { 7 };
    let ctx = block_on(GpuContext::new()).expect("a GPU adapter");
    println!("GPU: {}", ctx.info());
    println!("time: ms, Instant around launch + block_on(ctx.sync()); median of {rounds} interleaved rounds after a warm-up");
    println!("NF4 block 64. scratch = dequantize into a pooled f32 (N, K) buffer + f32 matmul; fused = W decoded in the matmul.");
    println!("The launches (nf4::linear_forward / linear_backward_input) take scratch for M > 8, fused for M <= 8.");

    let m = 512;
    println!();
    println!("M = {m}: path = scratch; ratio = scratch / f32");
    println!(
        "{:<16} {:>4} {:>8} | {:>8} {:>6} {:>8} | {:>8} {:>6} {:>8} | {:>6} {:>6}",
        "M x K -> N", "pass", "f32", "scratch", "ratio", "fused", "scr. DQ", "ratio", "fus. DQ", "deq", "deq DQ"
    );
    let mut totals = [0.0f64; 12];
    let mut mem = Vec::new();
    for (i, &(k, n)) in SHAPES.iter().enumerate() {
        let l = layer(&ctx, m, k, n, i as u64);
        mem.push((k, n, l.wf.byte_len(), l.wp.bytes(), l.wq.bytes()));
        let launches: Vec<Launch> = vec![
            Box::new(|| matmul::x_wt(&ctx, &l.x, &l.wf).unwrap()),
            Box::new(|| nf4::linear_forward_scratch(&ctx, &l.x, &l.wp).unwrap()),
            Box::new(|| nf4::linear_forward_fused(&ctx, &l.x, &l.wp).unwrap()),
            Box::new(|| nf4::linear_forward_scratch(&ctx, &l.x, &l.wq).unwrap()),
            Box::new(|| nf4::linear_forward_fused(&ctx, &l.x, &l.wq).unwrap()),
            Box::new(|| matmul::g_w(&ctx, &l.g, &l.wf).unwrap()),
            Box::new(|| nf4::linear_backward_input_scratch(&ctx, &l.g, &l.wp).unwrap()),
            Box::new(|| nf4::linear_backward_input_fused(&ctx, &l.g, &l.wp).unwrap()),
            Box::new(|| nf4::linear_backward_input_scratch(&ctx, &l.g, &l.wq).unwrap()),
            Box::new(|| nf4::linear_backward_input_fused(&ctx, &l.g, &l.wq).unwrap()),
            Box::new(|| nf4::dequantize(&ctx, &l.wp).unwrap()),
            Box::new(|| nf4::dequantize(&ctx, &l.wq).unwrap()),
        ];
        let t = time_interleaved(&ctx, &launches, rounds);
        for (tot, v) in totals.iter_mut().zip(&t) {
            *tot += v;
        }
        print_rows(&format!("{m}x{}->{}", l.k, l.n), &t, true);
    }
    print_rows("sum of shapes", &totals, false);
    let t = totals;
    println!(
        "fused / scratch, sum of shapes: fwd {:.2} (DQ {:.2}), bwd {:.2} (DQ {:.2})",
        t[2] / t[1],
        t[4] / t[3],
        t[7] / t[6],
        t[9] / t[8]
    );

    for m in [1, 8] {
        println!();
        println!("M = {m}: path = fused; ratios = fused / f32 and scratch / fused (plain scales)");
        println!(
            "{:<16} {:>8} {:>8} {:>8} {:>6} {:>6} | {:>8} {:>8} {:>8} {:>6} {:>6}",
            "M x K -> N", "f32 fwd", "scratch", "fused", "f/f32", "s/f", "f32 bwd", "scratch", "fused", "f/f32", "s/f"
        );
        for (i, &(k, n)) in SHAPES.iter().enumerate() {
            let l = layer(&ctx, m, k, n, i as u64);
            let launches: Vec<Launch> = vec![
                Box::new(|| matmul::x_wt(&ctx, &l.x, &l.wf).unwrap()),
                Box::new(|| nf4::linear_forward_scratch(&ctx, &l.x, &l.wp).unwrap()),
                Box::new(|| nf4::linear_forward_fused(&ctx, &l.x, &l.wp).unwrap()),
                Box::new(|| matmul::g_w(&ctx, &l.g, &l.wf).unwrap()),
                Box::new(|| nf4::linear_backward_input_scratch(&ctx, &l.g, &l.wp).unwrap()),
                Box::new(|| nf4::linear_backward_input_fused(&ctx, &l.g, &l.wp).unwrap()),
            ];
            let t: Vec<f64> = time_interleaved(&ctx, &launches, rounds).iter().map(|v| v * 1e3).collect();
            println!(
                "{:<16} {:>8.2} {:>8.2} {:>8.2} {:>6.2} {:>6.2} | {:>8.2} {:>8.2} {:>8.2} {:>6.2} {:>6.2}",
                format!("{m}x{k}->{n}"),
                t[0],
                t[1],
                t[2],
                t[2] / t[0],
                t[1] / t[2],
                t[3],
                t[4],
                t[5],
                t[5] / t[3],
                t[4] / t[5]
            );
        }
    }

    println!();
    println!("weight memory on the device, bytes (NF4: packed words + scales + code tables; the scratch");
    println!("path adds one pooled f32 (N, K) buffer while a launch runs):");
    println!("{:<12} {:>10} {:>10} {:>8} {:>10} {:>8}", "K -> N", "f32", "NF4", "f32/NF4", "NF4 DQ", "f32/DQ");
    for (k, n, f, p, q) in mem {
        let r = |b: usize| f as f64 / b as f64;
        println!("{:<12} {:>10} {:>10} {:>8.2} {:>10} {:>8.2}", format!("{k}->{n}"), f, p, r(p), q, r(q));
    }
}

/// The forward and backward rows of the M = 512 table from the 12 medians (seconds).
fn print_rows(label: &str, t: &[f64], deq: bool) {
    let ms = |v: f64| v * 1e3;
    let deq_cols = if deq { format!(" {:>6.2} {:>6.2}", ms(t[10]), ms(t[11])) } else { String::new() };
    println!(
        "{:<16} {:>4} {:>8.2} | {:>8.2} {:>6.2} {:>8.2} | {:>8.2} {:>6.2} {:>8.2} |{}",
        label,
        "fwd",
        ms(t[0]),
        ms(t[1]),
        t[1] / t[0],
        ms(t[2]),
        ms(t[3]),
        t[3] / t[0],
        ms(t[4]),
        deq_cols
    );
    println!(
        "{:<16} {:>4} {:>8.2} | {:>8.2} {:>6.2} {:>8.2} | {:>8.2} {:>6.2} {:>8.2} |",
        "",
        "bwd",
        ms(t[5]),
        ms(t[6]),
        t[6] / t[5],
        ms(t[7]),
        ms(t[8]),
        t[8] / t[5],
        ms(t[9])
    );
}
