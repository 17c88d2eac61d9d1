//! Per-call times of the attention kernels (shaders/attention.wgsl) on SmolLM2-135M's head shape
//! (NH 9, NKV 3, HS 64) or any other: forward, backward dq and backward dk/dv of a training
//! step (B x T, Tq = Tk = T) and a KV-cache decode step (Tq query rows against Tk cached keys).
//!
//! `cargo run --example attn_timing -- [--shapes 1x128,1x256,4x128,4x256]
//! [--decode 128,1024,4096] [--decode-tq 1] [--heads 9,3,64] [--reps 5] [--baseline FILE]
//! [--alt FILE]...`
//!
//! Next to the library's kernels it can time other versions of attention.wgsl (same entry
//! points, bindings and Params) in the same run: `--baseline FILE` dispatched the way the kernels
//! before the flash-style rewrite were (one workgroup per query row, or per key row for dk/dv),
//! for example `git show cc4a100:shaders/attention.wgsl > /tmp/attention_old.wgsl`; `--alt FILE`
//! (repeatable) dispatched like the current kernels with the file's own `const WG` rows per
//! workgroup, its `attention_forward` also for the decode rows (a variant under tuning). Each
//! figure is the median over `--reps` calls, each submitted and waited for on its own (the
//! library's two backward kernels timed apiece by the profiler); the versions are interleaved
//! call by call, so load from other processes hits them alike. After the training shapes, the
//! last other version's out, lse, dq, dk and dv are compared with the library's, and a maximal
//! difference above 1e-4 is printed.

use qlora_webgpu::gpu::{block_on, groups_2d, DType, GpuContext, Kernel, Tensor};
use qlora_webgpu::ops::attention;
use std::time::Instant;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    b: u32,
    tq: u32,
    tk: u32,
    nh: u32,
    nkv: u32,
    hs: u32,
    q_pos0: u32,
    scale: f32,
}

#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    tq: usize,
    tk: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
}

impl Shape {
    fn params(&self) -> Params {
        Params {
            b: self.b as u32,
            tq: self.tq as u32,
            tk: self.tk as u32,
            nh: self.nh as u32,
            nkv: self.nkv as u32,
            hs: self.hs as u32,
            q_pos0: (self.tk - self.tq) as u32,
            scale: (1.0 / (self.hs as f64).sqrt()) as f32,
        }
    }
}

/// Another file's three kernels: `rows` rows per workgroup (1: the old one-row geometry).
struct Other {
    fwd: Kernel,
    dq: Kernel,
    dkv: Kernel,
    rows: usize,
}

fn other(path: &str, tag: &str, rows: Option<usize>) -> Other {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let src = leak(format!("{text}\n{}", qlora_webgpu::gpu::shaders::COMMON));
    let file = leak(format!("{tag}:{path}"));
    // The rows per workgroup of a flash-style file: its `const WG: u32 = N`.
    let rows = rows.unwrap_or_else(|| {
        let line = src.lines().find(|l| l.starts_with("const WG: u32 =")).expect("const WG in the file");
        line.trim_start_matches("const WG: u32 =").trim().trim_end_matches(';').trim_end_matches('u').parse().unwrap()
    });
    Other {
        fwd: Kernel { file, source: src, entry: "attention_forward", bindings: &["q", "k", "v", "out", "lse"] },
        dq: Kernel { file, source: src, entry: "attention_backward_dq", bindings: &["q", "k", "v", "dout", "out", "lse", "delta", "dq"] },
        dkv: Kernel { file, source: src, entry: "attention_backward_dkv", bindings: &["q", "k", "v", "dout", "lse", "delta", "dk", "dv"] },
        rows,
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn time<F: FnMut()>(ctx: &GpuContext, mut f: F) -> f64 {
    block_on(ctx.sync()).expect("sync");
    let t0 = Instant::now();
    f();
    block_on(ctx.sync()).expect("sync");
    t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn random(ctx: &GpuContext, seed: &mut u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    ctx.upload_f32(&data, shape).expect("upload")
}

fn parse_list(s: &str) -> Vec<usize> {
    s.split(',').filter(|x| !x.is_empty()).map(|x| x.trim().parse().expect("a number")).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut shapes = "1x128,1x256,4x128,4x256".to_string();
    let mut decode = "128,1024,4096".to_string();
    let mut heads = "9,3,64".to_string();
    let mut reps = 5usize;
    let mut decode_tq = 1usize;
    let mut others = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--shapes" => shapes = v,
            "--decode" => decode = v,
            "--heads" => heads = v,
            "--reps" => reps = v.parse().expect("--reps N"),
            "--decode-tq" => decode_tq = v.parse().expect("--decode-tq N"),
            "--baseline" => others.push(("baseline".to_string(), other(&v, "baseline", Some(1)))),
            "--alt" => others.push((format!("alt{}", others.len()), other(&v, "alt", None))),
            other => panic!("unknown argument {other} (see the header of examples/attn_timing.rs)"),
        }
        i += 2;
    }
    let hv = parse_list(&heads);
    let (nh, nkv, hs) = (hv[0], hv[1], hv[2]);
    let ctx = block_on(GpuContext::new()).expect("a GPU adapter");
    eprintln!("GPU: {}", ctx.info());
    println!("NH {nh}, NKV {nkv}, HS {hs}; median of {reps} calls, ms per call (ratio: other / current)");
    print!("{:<24} {:>9}", "kernel", "current");
    for (name, o) in &others {
        print!(" {:>12} {:>6}", format!("{name}({})", o.rows), "ratio");
    }
    println!();
    let report = |name: String, times: &[Vec<f64>]| {
        let c = median(times[0].clone()) * 1e3;
        print!("{name:<24} {c:>9.2}");
        for t in &times[1..] {
            let o = median(t.clone()) * 1e3;
            print!(" {o:>12.2} {:>5.1}x", o / c);
        }
        println!();
    };
    let mut seed = 1u64;
    let zeros = |t: &Tensor| ctx.zeros(t.shape(), DType::F32).unwrap();

    for s in shapes.split(',').filter(|s| !s.is_empty()) {
        let (b, t) = s.split_once('x').expect("shapes as BxT");
        let (b, t): (usize, usize) = (b.parse().unwrap(), t.parse().unwrap());
        let sh = Shape { b, tq: t, tk: t, nh, nkv, hs };
        let p = sh.params();
        let q = random(&ctx, &mut seed, &[b, t, nh, hs]);
        let k = random(&ctx, &mut seed, &[b, t, nkv, hs]);
        let v = random(&ctx, &mut seed, &[b, t, nkv, hs]);
        let g = random(&ctx, &mut seed, &[b, t, nh, hs]);
        let (out, lse) = attention::forward(&ctx, &q, &k, &v).unwrap();
        let (o2, l2, d2, dq2, dk2, dv2) = (zeros(&out), zeros(&lse), zeros(&lse), zeros(&q), zeros(&k), zeros(&v));
        let n = others.len() + 1;
        let (mut fwd, mut dq, mut dkv) = (vec![vec![]; n], vec![vec![]; n], vec![vec![]; n]);
        // One untimed round (pipeline creation), then rounds with the versions interleaved.
        for rep in 0..=reps {
            let mut tf = vec![time(&ctx, || {
                attention::forward(&ctx, &q, &k, &v).unwrap();
            })];
            // The library's backward runs both kernels: the profiler times each on its own.
            block_on(ctx.sync()).expect("sync");
            ctx.set_profiling(true);
            attention::backward(&ctx, &g, &q, &k, &v, &out, &lse).unwrap();
            let prof = ctx.profile_report();
            ctx.set_profiling(false);
            let entry = |e: &str| prof.iter().find(|p| p.0 == e).map(|p| p.2).expect("profiled");
            let mut tb = vec![entry("attention_backward_dq")];
            let mut tkv = vec![entry("attention_backward_dkv")];
            for (_, o) in &others {
                let gq = groups_2d((b * nh * t.div_ceil(o.rows)) as u32);
                let gk = groups_2d((b * nkv * t.div_ceil(o.rows)) as u32);
                tf.push(time(&ctx, || {
                    ctx.dispatch(&o.fwd, &p, &[&q, &k, &v, &o2, &l2], gq).unwrap();
                }));
                tb.push(time(&ctx, || {
                    ctx.dispatch(&o.dq, &p, &[&q, &k, &v, &g, &out, &lse, &d2, &dq2], gq).unwrap();
                }));
                tkv.push(time(&ctx, || {
                    ctx.dispatch(&o.dkv, &p, &[&q, &k, &v, &g, &lse, &d2, &dk2, &dv2], gk).unwrap();
                }));
            }
            if rep > 0 {
                for i in 0..n {
                    fwd[i].push(tf[i]);
                    dq[i].push(tb[i]);
                    dkv[i].push(tkv[i]);
                }
            }
        }
        if !others.is_empty() {
            // The last other's results against the library's (a wrong variant shows here).
            let (want_dq, want_dk, want_dv) = attention::backward(&ctx, &g, &q, &k, &v, &out, &lse).unwrap();
            for (name, a, w) in [("out", &o2, &out), ("lse", &l2, &lse), ("dq", &dq2, &want_dq), ("dk", &dk2, &want_dk), ("dv", &dv2, &want_dv)] {
                let (a, w) = (block_on(ctx.read_f32(a)).unwrap(), block_on(ctx.read_f32(w)).unwrap());
                let diff = a.iter().zip(&w).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                if diff > 1e-4 {
                    println!("  {b}x{t} {name}: max |other - current| = {diff:e}");
                }
            }
        }
        report(format!("{b}x{t} forward"), &fwd);
        report(format!("{b}x{t} backward dq"), &dq);
        report(format!("{b}x{t} backward dk/dv"), &dkv);
    }

    for tk in parse_list(&decode) {
        let sh = Shape { b: 1, tq: decode_tq, tk, nh, nkv, hs };
        let p = sh.params();
        let q = random(&ctx, &mut seed, &[1, decode_tq, nh, hs]);
        let k = random(&ctx, &mut seed, &[1, tk, nkv, hs]);
        let v = random(&ctx, &mut seed, &[1, tk, nkv, hs]);
        let (o2, l2) = (zeros(&q), ctx.zeros(&[1, nh, decode_tq], DType::F32).unwrap());
        let mut times = vec![vec![]; others.len() + 1];
        for rep in 0..=reps {
            let mut tf = vec![time(&ctx, || {
                attention::forward_cached(&ctx, &q, &k, &v, tk - decode_tq).unwrap();
            })];
            for (_, o) in &others {
                tf.push(time(&ctx, || {
                    ctx.dispatch(&o.fwd, &p, &[&q, &k, &v, &o2, &l2], groups_2d((nh * decode_tq.div_ceil(o.rows)) as u32)).unwrap();
                }));
            }
            if rep > 0 {
                for (i, t) in tf.into_iter().enumerate() {
                    times[i].push(t);
                }
            }
        }
        report(format!("decode Tq {decode_tq} Tk {tk}"), &times);
    }
}
