//! RMSNorm: the f64 reference passes a finite-difference check; the GPU forward and both
//! backward kernels agree with it on odd shapes (C below and above the workgroup size).

mod common;
use common::*;
use qlora_webgpu::ops::rmsnorm;

#[test]
fn reference_backward_passes_finite_differences() {
    let mut rng = Rng::new(1);
    let (n, c) = (3, 7);
    let x = rng.vec(n * c, 1.0);
    let w = rng.vec(c, 1.0);
    let dout = rng.vec(n * c, 1.0);
    let (dx, dw) = rmsnorm::cpu::backward(&dout, &x, &w, c, 1e-5);
    gradcheck("rmsnorm dx", &|x| rmsnorm::cpu::forward(x, &w, c, 1e-5).0, &x, &dout, &dx);
    gradcheck("rmsnorm dw", &|w| rmsnorm::cpu::forward(&x, w, c, 1e-5).0, &w, &dout, &dw);
}

#[test]
fn gpu_matches_reference_on_odd_shapes() {
    let ctx = gpu();
    let mut rng = Rng::new(2);
    for (n, c) in [(1, 1), (3, 63), (2, 65), (5, 257), (3, 1001), (4, 576)] {
        let x = rng.vec(n * c, 2.0);
        let w = rng.vec(c, 1.0);
        let dout = rng.vec(n * c, 1.0);
        let eps = 1e-5;
        let (want, _) = rmsnorm::cpu::forward(&x, &w, c, eps);
        let (dx_ref, dw_ref) = rmsnorm::cpu::backward(&dout, &x, &w, c, eps);
        let (xt, wt, gt) = (up(&ctx, &x, &[n, c]), up(&ctx, &w, &[c]), up(&ctx, &dout, &[n, c]));
        let (out, rstd) = rmsnorm::forward(&ctx, &xt, &wt, eps as f32).unwrap();
        assert_close(&format!("rmsnorm out {n}x{c}"), &read(&ctx, &out), &want, 1e-5, 1e-5);
        let dx = rmsnorm::backward_input(&ctx, &gt, &xt, &wt, &rstd).unwrap();
        assert_close(&format!("rmsnorm dx {n}x{c}"), &read(&ctx, &dx), &dx_ref, 1e-5, 1e-4);
        let dw = rmsnorm::backward_weight(&ctx, &gt, &xt, &rstd).unwrap();
        assert_close(&format!("rmsnorm dw {n}x{c}"), &read(&ctx, &dw), &dw_ref, 1e-5, 1e-4);
    }
}
