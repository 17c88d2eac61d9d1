//! `QLORA_COMPAT_LIMITS=1` (native) opens the device with WebGPU compatibility mode's limits
//! (`gpu::compat_limits`), so wgpu validates every pipeline against them as a browser's
//! compatibility-mode device does: the device reports 128 invocations a workgroup, a kernel of
//! core's 256 invocations is refused (and accepted without the variable: the control), one of 128
//! runs, and so do the library's kernels (an RMSNorm and a cross-entropy row, compared with f64).
//! The whole training run under these limits is web/test/compat.test.mjs's native run. One test
//! in its own binary: it sets the environment variable, which every context opened later reads.
//! Needs a GPU adapter (lavapipe in CI).

use qlora_webgpu::gpu::{block_on, compat_limits, GpuContext, Kernel, COMPAT_LIMITS_ENV};
use qlora_webgpu::ops::{cross_entropy, rmsnorm};

fn open() -> std::rc::Rc<GpuContext> {
    block_on(GpuContext::new()).expect("a GPU adapter (on Linux without a GPU: apt-get install mesa-vulkan-drivers)")
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
}

/// A kernel filling `out` from one workgroup of `$wg` invocations.
macro_rules! fill_kernel {
    ($wg:literal) => {
        concat!(
            "const WG: u32 = ",
            $wg,
            "u;
struct Params { n: u32, a: u32, b: u32, c: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(WG)
fn fill(@builtin(local_invocation_index) lid: u32) {
    if (lid < params.n) { out[lid] = f32(lid) + 0.5; }
}
"
        )
    };
}
const WIDE: &str = fill_kernel!("256");
const NARROW: &str = fill_kernel!("128");

/// Runs `fill` of `source` over `n` elements in one workgroup; the values, or the device's error.
fn fill(ctx: &GpuContext, file: &'static str, source: &'static str, n: usize) -> Result<Vec<f32>, String> {
    let kernel = Kernel { file, source, entry: "fill", bindings: &["out"] };
    let out = ctx.zeros(&[n], qlora_webgpu::gpu::DType::F32).map_err(|e| e.to_string())?;
    ctx.dispatch(&kernel, &Params { n: n as u32, _pad: [0; 3] }, &[&out], [1, 1, 1]).map_err(|e| e.to_string())?;
    block_on(ctx.read_f32(&out)).map_err(|e| e.to_string())
}

fn filled(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 + 0.5).collect()
}

#[test]
fn compat_limits_refuse_a_256_invocation_kernel_and_run_the_library_kernels() {
    // The function: lowers, never raises.
    let low = compat_limits(wgpu::Limits::default());
    assert_eq!(
        (low.max_compute_invocations_per_workgroup, low.max_compute_workgroup_size_x, low.max_compute_workgroup_size_y, low.max_compute_workgroup_size_z),
        (128, 128, 128, 64)
    );
    assert_eq!(low.max_storage_buffers_per_shader_stage, 8);
    let small = wgpu::Limits { max_compute_invocations_per_workgroup: 64, ..wgpu::Limits::default() };
    assert_eq!(compat_limits(small).max_compute_invocations_per_workgroup, 64);

    // Control: the adapter's own limits (256 invocations or more on every WebGPU adapter).
    assert!(std::env::var_os(COMPAT_LIMITS_ENV).is_none(), "run without {COMPAT_LIMITS_ENV} set");
    let core = open();
    assert!(core.info().max_invocations >= 256, "{:?}", core.info().max_invocations);
    assert_eq!(fill(&core, "wide.wgsl", WIDE, 256).unwrap(), filled(256));
    drop(core);

    std::env::set_var(COMPAT_LIMITS_ENV, "1");
    let ctx = open();
    let info = ctx.info();
    eprintln!("{COMPAT_LIMITS_ENV}=1: {} invocations, binding {} MiB, buffer {} MiB", info.max_invocations, info.max_storage_binding >> 20, info.max_buffer >> 20);
    assert_eq!(info.max_invocations, 128);
    assert_eq!(info.max_storage_binding, 128 << 20);
    assert_eq!(info.max_buffer, 256 << 20);
    let err = fill(&ctx, "wide.wgsl", WIDE, 256).expect_err("a 256-invocation kernel under compatibility limits");
    eprintln!("256 invocations: {err}");
    assert!(err.contains("256") || err.to_lowercase().contains("workgroup"), "{err}");

    // A fresh context (the failed pipeline poisons nothing else): a 128-invocation kernel and the
    // library's reductions run.
    let ctx = open();
    assert_eq!(fill(&ctx, "narrow.wgsl", NARROW, 128).unwrap(), filled(128));

    // RMSNorm of 3 rows of 700 (several strides of the 128-invocation workgroup), against f64.
    let (rows, c) = (3usize, 700usize);
    let x: Vec<f32> = (0..rows * c).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    let w: Vec<f32> = (0..c).map(|i| 0.5 + (i % 7) as f32 / 10.0).collect();
    let xt = ctx.upload_f32(&x, &[rows, c]).unwrap();
    let wt = ctx.upload_f32(&w, &[c]).unwrap();
    let (y, _rstd) = rmsnorm::forward(&ctx, &xt, &wt, 1e-5).unwrap();
    let y = block_on(ctx.read_f32(&y)).unwrap();
    let mut worst = 0f64;
    for r in 0..rows {
        let row = &x[r * c..(r + 1) * c];
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (ms + 1e-5).sqrt();
        for j in 0..c {
            let want = w[j] as f64 * row[j] as f64 * rstd;
            worst = worst.max((y[r * c + j] as f64 - want).abs());
        }
    }
    eprintln!("rmsnorm under compatibility limits: worst |error| {worst:.2e}");
    // Achieved 2.1e-7 (outputs up to ~3); bound 2e-6.
    assert!(worst <= 2e-6, "rmsnorm: {worst}");

    // Cross-entropy of 2 rows of 1000 logits, one ignored target, against f64.
    let v = 1000usize;
    let logits: Vec<f32> = (0..2 * v).map(|i| ((i * 53 % 97) as f32 - 48.0) / 10.0).collect();
    let targets = [7i32, -100];
    let lt = ctx.upload_f32(&logits, &[2, v]).unwrap();
    let (loss, _rows, _lse) = cross_entropy::forward(&ctx, &lt, &targets).unwrap();
    let loss = block_on(ctx.read_f32(&loss)).unwrap()[0] as f64;
    let row = &logits[..v];
    let m = row.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
    let lse = m + row.iter().map(|&b| (b as f64 - m).exp()).sum::<f64>().ln();
    let want = lse - row[7] as f64;
    eprintln!("cross-entropy under compatibility limits: {loss} vs f64 {want}");
    // Achieved 1.2e-7 relative; bound 1e-6.
    assert!((loss - want).abs() <= 1e-6 * want.abs(), "cross-entropy {loss} vs {want}");
}
