//! GPU timing from timestamp queries (`GpuContext::set_gpu_timing`, what `qlora bench --profile`
//! prints): every dispatch is counted under its entry point, across submits, with a positive GPU
//! time, and the per-kernel times add up to the busy total; the results of the timed kernels are
//! unchanged. Like the subgroup tests, this FAILS on an adapter without timestamp queries instead
//! of skipping: lavapipe, where CI runs, has them.

mod common;
use common::*;
use qlora_webgpu::ops::matmul::{self, Trans};

#[test]
fn every_dispatch_is_timed_under_its_kernel() {
    let ctx = gpu();
    assert!(ctx.info().timestamp_query, "this test needs an adapter with timestamp queries (lavapipe has them): {}", ctx.info());
    let mut rng = Rng::new(1);
    let a = up(&ctx, &rng.vec(96 * 64, 1.0), &[96, 64]);
    let b = up(&ctx, &rng.vec(80 * 64, 1.0), &[80, 64]);
    let untimed = read(&ctx, &matmul::matmul(&ctx, &a, &b, Trans::NT, 1.0).unwrap());
    assert!(ctx.set_gpu_timing(true));
    let kernel = match matmul::chosen_path(&ctx, Trans::NT, 96, 80, 64) {
        matmul::Path::Subgroup => "matmul_nt_subgroup",
        _ => "matmul_nt_vec4",
    };
    // 700 dispatches: more than one submit's worth (512), so timing carries across submits.
    let mut last = None;
    for _ in 0..700 {
        last = Some(matmul::matmul(&ctx, &a, &b, Trans::NT, 1.0).unwrap());
    }
    let timed = read(&ctx, &last.unwrap());
    let rep = ctx.gpu_timing_report();
    assert!(!ctx.set_gpu_timing(false));
    assert_eq!(timed, untimed, "timing does not change results");
    let (name, calls, secs) = rep.kernels[0];
    assert_eq!((name, calls), (kernel, 700), "{rep:?}");
    assert!(secs > 0.0 && rep.busy > 0.0, "{rep:?}");
    let sum: f64 = rep.kernels.iter().map(|k| k.2).sum();
    assert!((sum - rep.busy).abs() <= 1e-9 * rep.busy.max(1.0), "{sum} vs {}", rep.busy);
    eprintln!("700 x {kernel} (96 x 80 x 64): {:.3} ms of GPU time in all", secs * 1e3);
}
