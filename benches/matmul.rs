//! Matmul throughput: the GPU kernels of src/ops/matmul.rs (shaders/matmul.wgsl and, where the
//! device has subgroups, shaders/matmul_subgroup.wgsl), one row per kernel path for every shape,
//! next to the CPU BLAS-like `matrixmultiply::sgemm` (threaded) on the same shape in the same run
//! (timed once per shape; every path's row repeats that figure).
//!
//! `cargo bench --bench matmul [-- FILTER] [-- --quick]`: FILTER keeps the rows whose label,
//! variant or path equals or contains it; `--quick` drops the largest shapes and takes fewer
//! repetitions.
//! Timing: std::time::Instant around the dispatch and `block_on(ctx.sync())` (submit, execute,
//! wait for the queue); nothing is subtracted, so per-dispatch overhead is included. One warm-up
//! run (it also compiles the pipeline), then the median of several runs.
//! Shapes: (M, N, K) of C (M, N) = op(A, B); for the 135M-Llama rows, M = 512 tokens and (K, N)
//! the layer's (in, out) features: NT is the forward y = x W^T (M x N from M x K and N x K), NN
//! the input gradient dX = G W (M x K from M x N and N x K), TN the weight gradient dW = G^T X
//! (N x K from M x N and M x K).

use qlora_webgpu::gpu::{block_on, DType, GpuContext, Tensor};
use qlora_webgpu::ops::matmul::{self, Path, Trans};
use std::time::{Duration, Instant};

struct Case {
    label: String,
    trans: Trans,
    // C (m, n) = op(A, B) over k.
    m: usize,
    n: usize,
    k: usize,
}

fn cases(quick: bool) -> Vec<Case> {
    let mut v = Vec::new();
    let squares: &[usize] = if quick { &[512, 1024] } else { &[512, 1024, 2048] };
    for &s in squares {
        for trans in [Trans::NT, Trans::NN, Trans::TN] {
            v.push(Case { label: format!("{s}^3"), trans, m: s, n: s, k: s });
        }
    }
    // The shape of the burn comparison in the issue: 256 tokens through a 576 -> 1536 projection.
    v.push(Case { label: "256x576->1536".into(), trans: Trans::NT, m: 256, n: 1536, k: 576 });
    let t = 512;
    let mut layers: Vec<(usize, usize)> = vec![(576, 576), (576, 192), (576, 1536), (1536, 576)];
    if !quick {
        layers.push((576, 49152));
    }
    for (k_in, n_out) in layers {
        let label = format!("135M {t}x{k_in}->{n_out}");
        v.push(Case { label: label.clone(), trans: Trans::NT, m: t, n: n_out, k: k_in });
        v.push(Case { label: label.clone(), trans: Trans::NN, m: t, n: k_in, k: n_out });
        v.push(Case { label, trans: Trans::TN, m: n_out, n: k_in, k: t });
    }
    v
}

/// Stored shapes of A and B for an (M, N, K) product of `trans`.
fn operand_shapes(trans: Trans, m: usize, n: usize, k: usize) -> ([usize; 2], [usize; 2]) {
    match trans {
        Trans::NT => ([m, k], [n, k]),
        Trans::NN => ([m, k], [k, n]),
        Trans::TN => ([k, m], [k, n]),
    }
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Median of `f`'s durations: one warm-up, then at least `min_reps` runs and more (up to 9)
/// while the total stays under `budget`. Also returns the process CPU seconds per run (all
/// threads, the driver's included) when /proc/self/stat is readable.
fn median_time(mut f: impl FnMut(), min_reps: usize, budget: Duration) -> (f64, Option<f64>) {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    let cpu0 = process_cpu_seconds();
    while times.len() < min_reps || (times.len() < 9 && start.elapsed() < budget) {
        let t0 = Instant::now();
        f();
        times.push(t0.elapsed().as_secs_f64());
    }
    let cpu = match (cpu0, process_cpu_seconds()) {
        (Some(a), Some(b)) => Some((b - a) / times.len() as f64),
        _ => None,
    };
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times[times.len() / 2], cpu)
}

/// User + system CPU time of this process, all threads (Linux; 10 ms resolution).
fn process_cpu_seconds() -> Option<f64> {
    let st = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = st.get(st.rfind(')')? + 2..)?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn per_cpu_second(flops: f64, cpu: Option<f64>) -> String {
    match cpu {
        Some(c) if c > 0.0 => format!("{:.1}", flops / c / 1e9),
        _ => "-".into(),
    }
}

fn cpu_sgemm(trans: Trans, m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    // Row and column strides of the logical A (M, K) and B (K, N) over the stored layouts.
    let (rsa, csa) = match trans {
        Trans::NT | Trans::NN => (k as isize, 1),
        Trans::TN => (1, m as isize),
    };
    let (rsb, csb) = match trans {
        Trans::NT => (1, k as isize),
        Trans::NN | Trans::TN => (n as isize, 1),
    };
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the strides address exactly the m*k, k*n and m*n elements checked above.
    unsafe {
        matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, 0.0, c.as_mut_ptr(), n as isize, 1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned();
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("MATMUL_NUM_THREADS", n.to_string());
    }
    let ctx = block_on(GpuContext::new()).expect("a GPU adapter");
    println!("GPU: {}", ctx.info());
    println!(
        "CPU: matrixmultiply::sgemm, MATMUL_NUM_THREADS={}; {} cores available",
        std::env::var("MATMUL_NUM_THREADS").unwrap_or_default(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("GPU time: Instant around dispatch + block_on(ctx.sync()), nothing subtracted; median after one warm-up.");
    println!(
        "GF/cpu-s: GFLOP per CPU-second of this process (all threads, 10 ms ticks): what the work costs, \
         independent of how much of a shared machine the run got"
    );
    // The machine may be shared: the load average says how much of it this run had.
    if let Some(l) = load_average() {
        println!("load average before: {l}");
    }
    println!(
        "matmul kernels: vec4 {}x{} register block, {}x{} workgroup; subgroup {}x{} register block, {} x 1 workgroup \
         sharing A over the subgroup; plain strided kernel where vec4 does not apply",
        matmul::BM,
        matmul::BN,
        matmul::WG,
        matmul::WG,
        matmul::SG_BM,
        matmul::SG_BN,
        matmul::SG_WG
    );
    let subgroups = ctx.info().subgroups;
    if !subgroups {
        println!("(no subgroups on this device: the subgroup rows are left out)");
    }
    println!();
    println!(
        "{:<22} {:>7} {:>8} {:>16} {:>10} {:>11} {:>11} {:>9} {:>13} {:>13}",
        "shape", "variant", "path", "M x N x K", "GPU ms", "GPU GFLOP/s", "CPU GFLOP/s", "GPU/CPU", "GPU GF/cpu-s", "CPU GF/cpu-s"
    );
    let (min_reps, budget) = if quick { (2, Duration::from_millis(500)) } else { (3, Duration::from_secs(2)) };
    for (i, c) in cases(quick).into_iter().enumerate() {
        let variant = format!("{:?}", c.trans);
        let paths: Vec<Path> = if !matmul::vec4_applies(c.trans, c.m, c.n, c.k) {
            vec![Path::Plain]
        } else if subgroups {
            vec![Path::Vec4, Path::Subgroup]
        } else {
            vec![Path::Vec4]
        };
        let path_name = |p: Path| format!("{p:?}").to_lowercase();
        if let Some(f) = &filter {
            let hit = c.label.contains(f.as_str()) || variant == *f || paths.iter().any(|&p| path_name(p) == *f);
            if !hit {
                continue;
            }
        }
        let (sa, sb) = operand_shapes(c.trans, c.m, c.n, c.k);
        let a = random(c.m * c.k, 2 * i as u64 + 1);
        let b = random(c.n * c.k, 2 * i as u64 + 2);
        let (at, bt): (Tensor, Tensor) = (ctx.upload_f32(&a, &sa).unwrap(), ctx.upload_f32(&b, &sb).unwrap());
        let mut cbuf = vec![0f32; c.m * c.n];
        let (cpu, cpu_cpu) = median_time(|| cpu_sgemm(c.trans, c.m, c.n, c.k, &a, &b, &mut cbuf), min_reps.max(3), budget);
        let fl = matmul::flops(c.m, c.n, c.k);
        let cg = fl / cpu / 1e9;
        for path in paths {
            if let Some(f) = &filter {
                // A path filter keeps only that path's rows.
                if (f == "vec4" || f == "subgroup" || f == "plain") && path_name(path) != *f {
                    continue;
                }
            }
            let out = ctx.empty(&[c.m, c.n], DType::F32).unwrap();
            let (gpu, gpu_cpu) = median_time(
                || {
                    matmul::matmul_into_path(&ctx, &at, &bt, c.trans, 1.0, 0.0, &out, path).unwrap();
                    block_on(ctx.sync()).unwrap();
                },
                min_reps,
                budget,
            );
            // A spot check that both computed the same product (a wrong kernel must not look fast).
            let got = block_on(ctx.read_f32(&out)).unwrap();
            let worst = got.iter().zip(&cbuf).map(|(g, w)| (g - w).abs() / (1.0 + w.abs())).fold(0f32, f32::max);
            assert!(worst < 1e-3, "{} {variant} {path:?}: GPU and CPU results differ (worst {worst:e})", c.label);
            let gg = fl / gpu / 1e9;
            println!(
                "{:<22} {:>7} {:>8} {:>16} {:>10.2} {:>11.2} {:>11.1} {:>8.1}% {:>13} {:>13}",
                c.label,
                variant,
                path_name(path),
                format!("{}x{}x{}", c.m, c.n, c.k),
                gpu * 1e3,
                gg,
                cg,
                100.0 * gg / cg,
                per_cpu_second(fl, gpu_cpu),
                per_cpu_second(fl, cpu_cpu)
            );
        }
    }
    if let Some(l) = load_average() {
        println!("load average after: {l}");
    }
}

/// The 1, 5 and 15 minute load averages (Linux), when readable.
fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}
