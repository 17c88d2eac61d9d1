//! Matmul: every variant (NT, NN, TN) through the dispatcher against the f64 reference on odd
//! shapes (1, 3, 63, 65, 1001, one dimension at a time) and on multiples of 4 that are not
//! multiples of the tile, so both a fast path (with edge tiles) and the plain strided kernel run,
//! counted by the path the dispatcher chose; batches with and without broadcasting; alpha and
//! beta = 1 accumulation; the linear layer on the tape against the reference backward, which
//! passes a finite-difference check; shape errors. Each fast kernel family forced through
//! `matmul_into_path` on every shape where it applies, batched with and without broadcast, and
//! with beta = 1 / beta = 0, against the reference and the plain kernel: the vec4 kernels
//! (shaders/matmul.wgsl, what browsers and adapters without subgroups run) and the subgroup
//! kernels (shaders/matmul_subgroup.wgsl) in both their branches (shared and own loads of A).
//! Which path the dispatcher picks: `Subgroup` here, `Vec4` with QLORA_NO_SUBGROUPS=1; every
//! test holds under both settings (scripts/test.sh runs this file under both), and the other
//! setting is checked in a child process either way. The subgroup tests FAIL on a device
//! without subgroups instead of skipping: lavapipe, the driver these tests run on here, has them.
//!
//! Tolerances: inputs are scaled by K^-1/4 so entries of C are O(1); f32 results must then be
//! within 1e-5 abs + 1e-4 rel of the f64 reference (f32 rounding of a K-term sum is about
//! 6e-8 * sqrt(K) here), and the vec4 and subgroup kernels within 1e-6 abs + 1e-5 rel of the
//! plain kernel.

mod common;
use common::*;
use qlora_webgpu::autograd::{Param, ParamId, Tape};
use qlora_webgpu::gpu::{DType, GpuContext, Tensor};
use qlora_webgpu::ops::matmul::{self, cpu, Path, Trans};
use qlora_webgpu::Error;

const ALL: [Trans; 3] = [Trans::NT, Trans::NN, Trans::TN];
const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-4;

/// Stored shapes of A and B for an (M, N, K) product of `trans`.
fn shapes(trans: Trans, m: usize, n: usize, k: usize) -> ([usize; 2], [usize; 2]) {
    match trans {
        Trans::NT => ([m, k], [n, k]),
        Trans::NN => ([m, k], [k, n]),
        Trans::TN => ([k, m], [k, n]),
    }
}

/// Random A and B for an (M, N, K) product, scaled so that C is O(1).
fn operands(rng: &mut Rng, m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let s = (k.max(1) as f64).powf(-0.25);
    (rng.vec(m * k, s), rng.vec(n * k, s))
}

fn with_batch(b: Option<usize>, s: [usize; 2]) -> Vec<usize> {
    match b {
        Some(b) => vec![b, s[0], s[1]],
        None => s.to_vec(),
    }
}

#[test]
fn reference_is_a_plain_product() {
    // A (2, 3) = [[1, 2, 3], [4, 5, 6]], B (3, 2) = [[7, 8], [9, 10], [11, 12]]: A B = [[58, 64], [139, 154]].
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
    let bt = [7.0, 9.0, 11.0, 8.0, 10.0, 12.0];
    let at = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
    let want = vec![58.0, 64.0, 139.0, 154.0];
    assert_eq!(cpu::matmul(&a, &b, 2, 2, 3, Trans::NN), want);
    assert_eq!(cpu::matmul(&a, &bt, 2, 2, 3, Trans::NT), want);
    assert_eq!(cpu::matmul(&at, &b, 2, 2, 3, Trans::TN), want);
}

#[test]
fn reference_linear_backward_passes_finite_differences() {
    let mut rng = Rng::new(1);
    let (rows, n, k) = (3, 4, 5);
    let x = rng.vec(rows * k, 1.0);
    let w = rng.vec(n * k, 1.0);
    let dy = rng.vec(rows * n, 1.0);
    let (dx, dw) = cpu::linear_backward(&dy, &x, &w, rows, n, k);
    gradcheck("linear dx", &|x| cpu::linear(x, &w, rows, n, k), &x, &dy, &dx);
    gradcheck("linear dw", &|w| cpu::linear(&x, w, rows, n, k), &w, &dy, &dw);
}

/// (M, N, K): each of 1, 3, 63, 65, 1001 in one dimension at a time, and multiples of 4 that are
/// not multiples of the 64 x 64 tile (vec4 kernels with edge tiles on every side).
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 3, 3),
    (1, 20, 16),
    (20, 1, 16),
    (20, 16, 1),
    (63, 20, 16),
    (20, 65, 16),
    (20, 16, 63),
    (65, 63, 64),
    (1001, 12, 8),
    (12, 1001, 8),
    (12, 8, 1001),
    (68, 132, 260),
    (64, 128, 4),
    (4, 4, 4),
];

/// Whether QLORA_NO_SUBGROUPS turns the subgroup kernels off in this process (set to anything but
/// empty or `0`, as src/ops/matmul.rs documents).
fn no_subgroups_env() -> bool {
    std::env::var_os(matmul::NO_SUBGROUPS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The path the dispatcher must take where `vec4_applies`: the vec4 kernels with
/// QLORA_NO_SUBGROUPS set or on a device without subgroups, else the subgroup kernels.
fn expected_fast_path(ctx: &GpuContext) -> Path {
    if no_subgroups_env() || !ctx.info().subgroups {
        Path::Vec4
    } else {
        Path::Subgroup
    }
}

#[test]
fn every_variant_matches_reference() {
    let ctx = gpu();
    let fast = expected_fast_path(&ctx);
    let mut rng = Rng::new(2);
    for trans in ALL {
        let (mut fast_runs, mut plain_runs) = (0, 0);
        for &(m, n, k) in SHAPES {
            let (a, b) = operands(&mut rng, m, n, k);
            let (sa, sb) = shapes(trans, m, n, k);
            let got = matmul::matmul(&ctx, &up(&ctx, &a, &sa), &up(&ctx, &b, &sb), trans, 1.0).unwrap();
            assert_eq!(got.shape(), [m, n]);
            let want = cpu::matmul(&a, &b, m, n, k, trans);
            let path = matmul::chosen_path(&ctx, trans, m, n, k);
            assert_close(&format!("{trans:?} {m}x{n}x{k} ({path:?})"), &read(&ctx, &got), &want, ATOL, RTOL);
            match path {
                Path::Plain => plain_runs += 1,
                p if p == fast => fast_runs += 1,
                p => panic!("{trans:?} {m}x{n}x{k}: the dispatcher chose {p:?}, expected {fast:?} or Plain"),
            }
        }
        eprintln!("{trans:?}: {fast_runs} shapes on {fast:?}, {plain_runs} on Plain");
        assert!(fast_runs >= 5 && plain_runs >= 2, "{trans:?}: {fast_runs} {fast:?}, {plain_runs} plain shapes");
    }
}

/// Runs a batched product (batch `nb`, `a_batched`/`b_batched`: whether that operand has the
/// batch dimension) through the dispatcher and the plain kernel, and checks each batch against
/// the reference (each fast path forced: `forced_paths_batched`).
fn check_batched(ctx: &GpuContext, rng: &mut Rng, trans: Trans, nb: usize, (m, n, k): (usize, usize, usize), a_batched: bool, b_batched: bool) {
    let (sa, sb) = shapes(trans, m, n, k);
    let s = (k as f64).powf(-0.25);
    let a = rng.vec(if a_batched { nb } else { 1 } * m * k, s);
    let b = rng.vec(if b_batched { nb } else { 1 } * n * k, s);
    let at = up(ctx, &a, &with_batch(a_batched.then_some(nb), sa));
    let bt = up(ctx, &b, &with_batch(b_batched.then_some(nb), sb));
    let mut want = Vec::new();
    for z in 0..nb {
        let az = if a_batched { &a[z * m * k..(z + 1) * m * k] } else { &a[..] };
        let bz = if b_batched { &b[z * n * k..(z + 1) * n * k] } else { &b[..] };
        want.extend(cpu::matmul(az, bz, m, n, k, trans));
    }
    let what = format!("{trans:?} batch {nb} (a {a_batched}, b {b_batched}) {m}x{n}x{k}");
    let got = matmul::matmul(ctx, &at, &bt, trans, 1.0).unwrap();
    assert_eq!(got.shape(), [nb, m, n], "{what}");
    assert_close(&what, &read(ctx, &got), &want, ATOL, RTOL);
    let plain = ctx.empty(&[nb, m, n], DType::F32).unwrap();
    matmul::matmul_plain_into(ctx, &at, &bt, trans, 1.0, 0.0, &plain).unwrap();
    assert_close(&format!("{what} plain"), &read(ctx, &plain), &want, ATOL, RTOL);
}

#[test]
fn batched_with_and_without_broadcast() {
    let ctx = gpu();
    let mut rng = Rng::new(4);
    for trans in ALL {
        for &(m, n, k) in &[(20, 12, 16), (68, 72, 36), (5, 7, 9)] {
            for (ab, bb) in [(true, true), (false, true), (true, false)] {
                check_batched(&ctx, &mut rng, trans, 3, (m, n, k), ab, bb);
            }
        }
    }
}

#[test]
fn alpha_and_beta_accumulate() {
    let ctx = gpu();
    let mut rng = Rng::new(5);
    for trans in ALL {
        for &(m, n, k) in &[(68, 132, 36), (7, 5, 3)] {
            let (a, b) = operands(&mut rng, m, n, k);
            let (sa, sb) = shapes(trans, m, n, k);
            let (at, bt) = (up(&ctx, &a, &sa), up(&ctx, &b, &sb));
            let c0 = rng.vec(m * n, 1.0);
            let ab = cpu::matmul(&a, &b, m, n, k, trans);
            let alpha = -0.375;
            let want: Vec<f64> = c0.iter().zip(&ab).map(|(c, p)| c + alpha * p).collect();
            // Auto (the dispatcher's choice) and the plain kernel; each fast path forced:
            // forced_paths_alpha_and_beta.
            for path in [Path::Auto, Path::Plain] {
                let out = up(&ctx, &c0, &[m, n]);
                matmul::matmul_into_path(&ctx, &at, &bt, trans, alpha as f32, 1.0, &out, path).unwrap();
                assert_close(&format!("{trans:?} {m}x{n}x{k} beta=1 {path:?}"), &read(&ctx, &out), &want, ATOL, RTOL);
                // beta = 0 never reads out: NaN there must not leak into the result.
                let nan = ctx.upload_f32(&vec![f32::NAN; m * n], &[m, n]).unwrap();
                matmul::matmul_into_path(&ctx, &at, &bt, trans, alpha as f32, 0.0, &nan, path).unwrap();
                let scaled: Vec<f64> = ab.iter().map(|p| alpha * p).collect();
                assert_close(&format!("{trans:?} {m}x{n}x{k} beta=0 {path:?}"), &read(&ctx, &nan), &scaled, ATOL, RTOL);
            }
        }
    }
}

#[test]
fn training_wrappers_fold_leading_dims() {
    let ctx = gpu();
    let mut rng = Rng::new(6);
    // (B, T) = (2, 3) folds into 6 rows; K = 20 and N = 12 take the vec4 kernels, K = 7 and
    // N = 5 the plain one.
    for (n, k) in [(12, 20), (5, 7)] {
        let rows = 6;
        let x = rng.vec(rows * k, 0.5);
        let w = rng.vec(n * k, 0.5);
        let g = rng.vec(rows * n, 0.5);
        let (xt, wt, gt) = (up(&ctx, &x, &[2, 3, k]), up(&ctx, &w, &[n, k]), up(&ctx, &g, &[2, 3, n]));
        let y = matmul::x_wt(&ctx, &xt, &wt).unwrap();
        assert_eq!(y.shape(), [2, 3, n]);
        assert_close("x_wt", &read(&ctx, &y), &cpu::linear(&x, &w, rows, n, k), ATOL, RTOL);
        let (dx_ref, dw_ref) = cpu::linear_backward(&g, &x, &w, rows, n, k);
        let dx = matmul::g_w(&ctx, &gt, &wt).unwrap();
        assert_eq!(dx.shape(), [2, 3, k]);
        assert_close("g_w", &read(&ctx, &dx), &dx_ref, ATOL, RTOL);
        let dw = matmul::gt_x(&ctx, &gt, &xt).unwrap();
        assert_eq!(dw.shape(), [n, k]);
        assert_close("gt_x", &read(&ctx, &dw), &dw_ref, ATOL, RTOL);
    }
}

fn param(id: u64, t: Tensor) -> Param {
    Param { id: ParamId(id), value: t }
}

#[test]
fn linear_on_the_tape_gives_reference_gradients() {
    let ctx = gpu();
    let mut rng = Rng::new(7);
    for (n, k) in [(24, 36), (3, 65)] {
        let (bsz, t) = (2, 5);
        let rows = bsz * t;
        let x = rng.vec(rows * k, 0.5);
        let w = rng.vec(n * k, 0.5);
        let dy = rng.vec(rows * n, 1.0);
        let (dx_ref, dw_ref) = cpu::linear_backward(&dy, &x, &w, rows, n, k);

        // x and W both need gradients.
        let mut tape = Tape::new(true);
        let xv = tape.input(up(&ctx, &x, &[bsz, t, k]));
        let wv = tape.param(&param(1, up(&ctx, &w, &[n, k])));
        let y = matmul::linear(&mut tape, &ctx, &xv, &wv).unwrap();
        assert_eq!(y.shape(), [bsz, t, n]);
        assert_close("linear y", &read(&ctx, y.value()), &cpu::linear(&x, &w, rows, n, k), ATOL, RTOL);
        let seed = up(&ctx, &dy, &[bsz, t, n]);
        let (pg, wrt) = tape.backward_from(&ctx, &y, seed.clone(), &[&xv]).unwrap();
        let dx = wrt[0].as_ref().expect("dx");
        assert_eq!(dx.shape(), [bsz, t, k]);
        assert_close("linear dx", &read(&ctx, dx), &dx_ref, ATOL, RTOL);
        assert_close("linear dW", &read(&ctx, &pg[&ParamId(1)]), &dw_ref, ATOL, RTOL);

        // Frozen W (a base weight): dx still flows, no weight gradient.
        let mut tape = Tape::new(true);
        let xv = tape.input(up(&ctx, &x, &[bsz, t, k]));
        let wv = tape.constant(up(&ctx, &w, &[n, k]));
        let y = matmul::linear(&mut tape, &ctx, &xv, &wv).unwrap();
        let (pg, wrt) = tape.backward_from(&ctx, &y, seed.clone(), &[&xv]).unwrap();
        assert!(pg.is_empty());
        assert_close("linear dx (frozen W)", &read(&ctx, wrt[0].as_ref().unwrap()), &dx_ref, ATOL, RTOL);

        // Constant input x (data): only dW.
        let mut tape = Tape::new(true);
        let xv = tape.constant(up(&ctx, &x, &[bsz, t, k]));
        let wv = tape.param(&param(2, up(&ctx, &w, &[n, k])));
        let y = matmul::linear(&mut tape, &ctx, &xv, &wv).unwrap();
        let (pg, wrt) = tape.backward_from(&ctx, &y, seed, &[&xv]).unwrap();
        assert!(wrt[0].is_none());
        assert_close("linear dW (constant x)", &read(&ctx, &pg[&ParamId(2)]), &dw_ref, ATOL, RTOL);
    }
}

fn is_shape_err<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Shape { .. }))
}

#[test]
fn mismatched_shapes_are_errors() {
    let ctx = gpu();
    let z = |s: &[usize]| ctx.zeros(s, DType::F32).unwrap();
    let mm = |a: &[usize], b: &[usize], t: Trans| matmul::matmul(&ctx, &z(a), &z(b), t, 1.0);
    assert!(is_shape_err(mm(&[4, 5], &[6, 4], Trans::NT)), "NT inner dims");
    assert!(is_shape_err(mm(&[4, 5], &[4, 6], Trans::NN)), "NN inner dims");
    assert!(is_shape_err(mm(&[4, 5], &[5, 6], Trans::TN)), "TN inner dims");
    assert!(is_shape_err(mm(&[2, 4, 5], &[3, 6, 5], Trans::NT)), "batch sizes");
    assert!(is_shape_err(mm(&[5], &[6, 5], Trans::NT)), "rank 1");
    assert!(is_shape_err(mm(&[1, 2, 4, 5], &[6, 5], Trans::NT)), "rank 4");
    let (a, b) = (z(&[4, 5]), z(&[6, 5]));
    assert!(is_shape_err(matmul::matmul_into(&ctx, &a, &b, Trans::NT, 1.0, 0.0, &z(&[6, 4]))), "out shape");
    assert!(is_shape_err(matmul::matmul_into(&ctx, &a, &b, Trans::NT, 1.0, 0.0, &z(&[2, 4, 6]))), "out rank");
    let half_beta = matmul::matmul_into(&ctx, &a, &b, Trans::NT, 1.0, 0.5, &z(&[4, 6]));
    assert!(matches!(half_beta, Err(Error::Invalid(_))), "beta 0.5");
    assert!(matmul::matmul_into(&ctx, &a, &b, Trans::NT, 1.0, 0.0, &a).is_err(), "out aliasing a");
    assert!(is_shape_err(matmul::x_wt(&ctx, &z(&[2, 3, 5]), &z(&[6, 4]))), "x_wt");
    assert!(is_shape_err(matmul::x_wt(&ctx, &z(&[2, 3, 5]), &z(&[2, 6, 5]))), "x_wt rank-3 w");
    assert!(is_shape_err(matmul::g_w(&ctx, &z(&[2, 3, 5]), &z(&[6, 4]))), "g_w");
    assert!(is_shape_err(matmul::gt_x(&ctx, &z(&[2, 3, 6]), &z(&[2, 4, 5]))), "gt_x rows");
}

#[test]
fn empty_inner_dimension_gives_zeros_or_keeps_out() {
    let ctx = gpu();
    let (a, b) = (ctx.zeros(&[3, 0], DType::F32).unwrap(), ctx.zeros(&[4, 0], DType::F32).unwrap());
    let c = matmul::matmul(&ctx, &a, &b, Trans::NT, 1.0).unwrap();
    assert_eq!(read(&ctx, &c), vec![0.0; 12]);
    let out = ctx.upload_f32(&[2.0; 12], &[3, 4]).unwrap();
    matmul::matmul_into(&ctx, &a, &b, Trans::NT, 1.0, 1.0, &out).unwrap();
    assert_eq!(read(&ctx, &out), vec![2.0; 12]);
}

/// The u32 module-scope constants `names` of a shader file (None where missing).
fn wgsl_consts(file: (&str, &'static str), names: &[&str]) -> Vec<Option<u32>> {
    let src = qlora_webgpu::gpu::shaders::for_target(file.1);
    let m = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{}", e.emit_to_string_with_path(src, file.0)));
    let get = |name: &str| {
        m.constants.iter().find_map(|(_, c)| match (c.name.as_deref(), &m.global_expressions[c.init]) {
            (Some(n), naga::Expression::Literal(naga::Literal::U32(v))) if n == name => Some(*v),
            _ => None,
        })
    };
    names.iter().map(|n| get(n)).collect()
}

#[test]
fn block_constants_match_rust() {
    // The launch geometry in src/ops/matmul.rs mirrors WG, BM and BN of shaders/matmul.wgsl and
    // of shaders/matmul_subgroup.wgsl.
    use qlora_webgpu::gpu::shaders::{MATMUL, MATMUL_SUBGROUP};
    let names = ["WG", "BM", "BN"];
    assert_eq!(wgsl_consts(MATMUL, &names), [Some(matmul::WG), Some(matmul::BM), Some(matmul::BN)]);
    assert_eq!(wgsl_consts(MATMUL_SUBGROUP, &names), [Some(matmul::SG_WG), Some(matmul::SG_BM), Some(matmul::SG_BN)]);
}

// ---- The fast kernels forced: vec4 and subgroup ---------------------------------------------

/// A context whose device has subgroups, or a panic saying why the test cannot run: these tests
/// check the subgroup path and must not pass vacuously (lavapipe, the driver here, has them).
fn gpu_with_subgroups() -> std::rc::Rc<GpuContext> {
    let ctx = gpu();
    assert!(
        ctx.info().subgroups,
        "this test needs a device with subgroups (lavapipe has them), got {}",
        ctx.info()
    );
    ctx
}

const SUBGROUP_PATHS: [Path; 2] = [Path::Subgroup, Path::SubgroupOwnLoads];

/// C = alpha * op(a, b) through `path` in a new (…, M, N) tensor.
fn run_path(ctx: &GpuContext, a: &Tensor, b: &Tensor, trans: Trans, alpha: f32, out_shape: &[usize], path: Path) -> Vec<f32> {
    let out = ctx.empty(out_shape, DType::F32).unwrap();
    matmul::matmul_into_path(ctx, a, b, trans, alpha, 0.0, &out, path).unwrap();
    read(ctx, &out)
}

/// Each of `paths` forced on every shape of SHAPES and of the extra list where `vec4_applies`
/// (edges on every side of the vec4 64 x 64 and the subgroup 32 x 512 workgroup tiles, K = 4 ..
/// 1001, M and N of 1 and 12), against the reference (ATOL, RTOL) and the plain kernel (1e-6 abs
/// + 1e-5 rel); at least 8 shapes per variant.
fn forced_paths_match_reference_and_plain(ctx: &GpuContext, paths: &[Path], seed: u64) {
    let mut rng = Rng::new(seed);
    let extra = [(68, 132, 260), (129, 76, 36), (12, 8, 1001), (1001, 12, 8), (4, 4, 4), (40, 1100, 12)];
    for trans in ALL {
        let mut runs = 0;
        for &(m, n, k) in SHAPES.iter().chain(&extra) {
            if !matmul::vec4_applies(trans, m, n, k) {
                continue;
            }
            let (a, b) = operands(&mut rng, m, n, k);
            let (sa, sb) = shapes(trans, m, n, k);
            let (at, bt) = (up(ctx, &a, &sa), up(ctx, &b, &sb));
            let want: Vec<f64> = cpu::matmul(&a, &b, m, n, k, trans).iter().map(|v| 0.75 * v).collect();
            let plain: Vec<f64> = run_path(ctx, &at, &bt, trans, 0.75, &[m, n], Path::Plain).iter().map(|&v| v as f64).collect();
            for &path in paths {
                let got = run_path(ctx, &at, &bt, trans, 0.75, &[m, n], path);
                let what = format!("{trans:?} {m}x{n}x{k} {path:?}");
                assert_close(&what, &got, &want, ATOL, RTOL);
                assert_close(&format!("{what} vs plain"), &got, &plain, 1e-6, 1e-5);
            }
            runs += 1;
        }
        assert!(runs >= 8, "{trans:?}: only {runs} shapes took {paths:?}");
    }
}

/// Each of `paths` forced on batch-3 products, both operands batched or one broadcast, against
/// the reference.
fn forced_paths_batched(ctx: &GpuContext, paths: &[Path], seed: u64) {
    let mut rng = Rng::new(seed);
    let nb = 3;
    for trans in ALL {
        let mut runs = 0;
        for &(m, n, k) in &[(20, 12, 16), (68, 72, 36), (36, 520, 8)] {
            if !matmul::vec4_applies(trans, m, n, k) {
                continue;
            }
            for (a_batched, b_batched) in [(true, true), (false, true), (true, false)] {
                let (sa, sb) = shapes(trans, m, n, k);
                let s = (k as f64).powf(-0.25);
                let a = rng.vec(if a_batched { nb } else { 1 } * m * k, s);
                let b = rng.vec(if b_batched { nb } else { 1 } * n * k, s);
                let at = up(ctx, &a, &with_batch(a_batched.then_some(nb), sa));
                let bt = up(ctx, &b, &with_batch(b_batched.then_some(nb), sb));
                let mut want = Vec::new();
                for z in 0..nb {
                    let az = if a_batched { &a[z * m * k..(z + 1) * m * k] } else { &a[..] };
                    let bz = if b_batched { &b[z * n * k..(z + 1) * n * k] } else { &b[..] };
                    want.extend(cpu::matmul(az, bz, m, n, k, trans));
                }
                for &path in paths {
                    let what = format!("{trans:?} batch {nb} (a {a_batched}, b {b_batched}) {m}x{n}x{k} {path:?}");
                    assert_close(&what, &run_path(ctx, &at, &bt, trans, 1.0, &[nb, m, n], path), &want, ATOL, RTOL);
                }
                runs += 1;
            }
        }
        assert_eq!(runs, 9, "{trans:?}: every batched shape must take {paths:?}");
    }
}

/// Each of `paths` forced with beta = 1 (C = C0 + alpha AB) and beta = 0 over NaN (never read),
/// on a shape with edge tiles and on the smallest one.
fn forced_paths_alpha_and_beta(ctx: &GpuContext, paths: &[Path], seed: u64) {
    let mut rng = Rng::new(seed);
    for trans in ALL {
        for &(m, n, k) in &[(68, 132, 36), (4, 4, 4)] {
            let (a, b) = operands(&mut rng, m, n, k);
            let (sa, sb) = shapes(trans, m, n, k);
            let (at, bt) = (up(ctx, &a, &sa), up(ctx, &b, &sb));
            let c0 = rng.vec(m * n, 1.0);
            let ab = cpu::matmul(&a, &b, m, n, k, trans);
            let alpha = -0.375;
            let want: Vec<f64> = c0.iter().zip(&ab).map(|(c, p)| c + alpha * p).collect();
            let scaled: Vec<f64> = ab.iter().map(|p| alpha * p).collect();
            for &path in paths {
                let out = up(ctx, &c0, &[m, n]);
                matmul::matmul_into_path(ctx, &at, &bt, trans, alpha as f32, 1.0, &out, path).unwrap();
                assert_close(&format!("{trans:?} {m}x{n}x{k} beta=1 {path:?}"), &read(ctx, &out), &want, ATOL, RTOL);
                // beta = 0 never reads out: NaN there must not leak into the result.
                let nan = ctx.upload_f32(&vec![f32::NAN; m * n], &[m, n]).unwrap();
                matmul::matmul_into_path(ctx, &at, &bt, trans, alpha as f32, 0.0, &nan, path).unwrap();
                assert_close(&format!("{trans:?} {m}x{n}x{k} beta=0 {path:?}"), &read(ctx, &nan), &scaled, ATOL, RTOL);
            }
        }
    }
}

#[test]
fn vec4_kernels_match_reference_and_plain() {
    forced_paths_match_reference_and_plain(&gpu(), &[Path::Vec4], 3);
}

#[test]
fn vec4_kernels_batched_with_and_without_broadcast() {
    forced_paths_batched(&gpu(), &[Path::Vec4], 11);
}

#[test]
fn vec4_kernels_alpha_and_beta_accumulate() {
    forced_paths_alpha_and_beta(&gpu(), &[Path::Vec4], 12);
}

#[test]
fn subgroup_kernels_match_reference_and_plain() {
    forced_paths_match_reference_and_plain(&gpu_with_subgroups(), &SUBGROUP_PATHS, 8);
}

#[test]
fn subgroup_kernels_batched_with_and_without_broadcast() {
    forced_paths_batched(&gpu_with_subgroups(), &SUBGROUP_PATHS, 9);
}

#[test]
fn subgroup_kernels_alpha_and_beta_accumulate() {
    forced_paths_alpha_and_beta(&gpu_with_subgroups(), &SUBGROUP_PATHS, 10);
}

/// The line `dispatcher_picks_the_path_the_environment_asks_for` prints (with --nocapture) for
/// the path it asserted, which the child-process test looks for.
fn dispatcher_line(path: Path) -> String {
    format!("dispatcher chose {path:?} where vec4 applies")
}

#[test]
fn dispatcher_picks_the_path_the_environment_asks_for() {
    // Subgroup on this device (it has subgroups), Vec4 with QLORA_NO_SUBGROUPS=1.
    let ctx = gpu_with_subgroups();
    let want = if no_subgroups_env() { Path::Vec4 } else { Path::Subgroup };
    for trans in ALL {
        assert_eq!(matmul::chosen_path(&ctx, trans, 64, 64, 64), want, "{trans:?}");
        assert_eq!(matmul::chosen_path(&ctx, trans, 7, 5, 3), Path::Plain, "{trans:?}");
    }
    println!("{} ({}={:?})", dispatcher_line(want), matmul::NO_SUBGROUPS_ENV, std::env::var_os(matmul::NO_SUBGROUPS_ENV));
    // Forcing a path where it does not apply is an error, not a silent fallback.
    let (a, b) = (ctx.zeros(&[4, 3], DType::F32).unwrap(), ctx.zeros(&[5, 3], DType::F32).unwrap());
    for path in [Path::Vec4, Path::Subgroup, Path::SubgroupOwnLoads] {
        let out = ctx.empty(&[4, 5], DType::F32).unwrap();
        let r = matmul::matmul_into_path(&ctx, &a, &b, Trans::NT, 1.0, 0.0, &out, path);
        assert!(matches!(r, Err(Error::Invalid(_))), "{path:?} on K = 3: {r:?}");
    }
}

#[test]
fn the_other_no_subgroups_setting_in_a_child_process() {
    // The dispatcher test again in a child process with QLORA_NO_SUBGROUPS flipped (set to 1
    // when unset here, removed when set), so each run of this file checks both settings; set
    // here, it would race with the other tests' dispatches. No dispatch in the child beyond the
    // error checks: it would compile its pipelines again.
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", "dispatcher_picks_the_path_the_environment_asks_for", "--nocapture", "--test-threads=1"]);
    let want = if no_subgroups_env() {
        cmd.env_remove(matmul::NO_SUBGROUPS_ENV);
        Path::Subgroup
    } else {
        cmd.env(matmul::NO_SUBGROUPS_ENV, "1");
        Path::Vec4
    };
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
    assert!(text.contains(&dispatcher_line(want)), "the child did not assert {want:?}:\n{text}");
}
