//! Causal GQA attention: the f64 reference backward passes a finite-difference check; the GPU
//! forward (out and the saved logsumexp) and backward (dq, dk, dv) agree with it on odd shapes
//! (T 1, 3, 63, 65, 128, 257, 300 and 2048; HS 3, 5, 8, 33, 64, 96, 128, 130 and 256; NH/NKV
//! 4/2, 3/1, 2/2, 9/3); the KV-cache forward equals the full forward's rows, also for the one-
//! and two-row decode kernel; the tape gives the launches' gradients; results are deterministic
//! run to run; the kernels fit WebGPU's default workgroup memory.
//!
//! Tolerances: 1e-5 abs + 1e-4 rel for the forward and for every gradient (f32 accumulations
//! over at most a few hundred terms of size ~1 against an f64 reference).

mod common;
use common::*;
use qlora_webgpu::autograd::Tape;
use qlora_webgpu::gpu::{shaders, DType, GpuContext};
use qlora_webgpu::ops::attention::{self, cpu, Dims};

struct Case {
    d: Dims,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    dout: Vec<f64>,
}

fn case(rng: &mut Rng, d: Dims) -> Case {
    Case {
        q: rng.vec(d.b * d.tq * d.nh * d.hs, 1.0),
        k: rng.vec(d.b * d.tk * d.nkv * d.hs, 1.0),
        v: rng.vec(d.b * d.tk * d.nkv * d.hs, 1.0),
        dout: rng.vec(d.b * d.tq * d.nh * d.hs, 1.0),
        d,
    }
}

/// Row logsumexp (B, NH, Tq) of the scaled causal scores, in f64.
fn lse_ref(c: &Case) -> Vec<f64> {
    let d = &c.d;
    let scale = 1.0 / (d.hs as f64).sqrt();
    let mut out = Vec::new();
    for b in 0..d.b {
        for h in 0..d.nh {
            let g = h / (d.nh / d.nkv);
            for t in 0..d.tq {
                let qo = ((b * d.tq + t) * d.nh + h) * d.hs;
                let s: Vec<f64> = (0..=d.q_pos0 + t)
                    .map(|j| {
                        let ko = ((b * d.tk + j) * d.nkv + g) * d.hs;
                        scale * (0..d.hs).map(|e| c.q[qo + e] * c.k[ko + e]).sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                out.push(m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln());
            }
        }
    }
    out
}

#[test]
fn reference_backward_passes_finite_differences() {
    let mut rng = Rng::new(21);
    for d in [Dims::causal(2, 4, 4, 2, 3), Dims::causal(1, 5, 3, 1, 2)] {
        let c = case(&mut rng, d);
        let (dq, dk, dv) = cpu::backward(&c.dout, &c.q, &c.k, &c.v, &d);
        gradcheck("attention dq", &|q| cpu::forward(q, &c.k, &c.v, &d).0, &c.q, &c.dout, &dq);
        gradcheck("attention dk", &|k| cpu::forward(&c.q, k, &c.v, &d).0, &c.k, &c.dout, &dk);
        gradcheck("attention dv", &|v| cpu::forward(&c.q, &c.k, v, &d).0, &c.v, &c.dout, &dv);
    }
}

fn check_gpu(ctx: &GpuContext, c: &Case) {
    let d = &c.d;
    let name = format!("B{} T{} NH{} NKV{} HS{}", d.b, d.tq, d.nh, d.nkv, d.hs);
    let qs = [d.b, d.tq, d.nh, d.hs];
    let ks = [d.b, d.tk, d.nkv, d.hs];
    let (q, k, v) = (up(ctx, &c.q, &qs), up(ctx, &c.k, &ks), up(ctx, &c.v, &ks));
    let (out, lse) = attention::forward(ctx, &q, &k, &v).unwrap();
    assert_eq!(lse.shape(), [d.b, d.nh, d.tq]);
    let (want, _) = cpu::forward(&c.q, &c.k, &c.v, d);
    assert_close(&format!("out {name}"), &read(ctx, &out), &want, 1e-5, 1e-4);
    assert_close(&format!("lse {name}"), &read(ctx, &lse), &lse_ref(c), 1e-5, 1e-4);
    let g = up(ctx, &c.dout, &qs);
    let (dq, dk, dv) = attention::backward(ctx, &g, &q, &k, &v, &out, &lse).unwrap();
    let (dq_ref, dk_ref, dv_ref) = cpu::backward(&c.dout, &c.q, &c.k, &c.v, d);
    assert_close(&format!("dq {name}"), &read(ctx, &dq), &dq_ref, 1e-5, 1e-4);
    assert_close(&format!("dk {name}"), &read(ctx, &dk), &dk_ref, 1e-5, 1e-4);
    assert_close(&format!("dv {name}"), &read(ctx, &dv), &dv_ref, 1e-5, 1e-4);
}

#[test]
fn gpu_matches_reference_on_odd_shapes() {
    let ctx = gpu();
    let mut rng = Rng::new(22);
    for (b, t, nh, nkv, hs) in [
        (1, 1, 4, 2, 8),
        (2, 3, 3, 1, 8),
        (1, 63, 2, 2, 64),
        (2, 65, 4, 2, 64),
        (2, 63, 3, 1, 8),
        (1, 65, 3, 1, 64),
        (2, 3, 2, 2, 64),
        (1, 1, 2, 2, 64),
        (1, 7, 4, 2, 96),  // HS does not divide the workgroup: 2 slices of 96 lanes
        (1, 5, 2, 1, 256), // the largest head size, one slice
    ] {
        check_gpu(&ctx, &case(&mut rng, Dims::causal(b, t, nh, nkv, hs)));
    }
}

#[test]
fn gpu_matches_reference_past_one_workgroup_of_keys() {
    let ctx = gpu();
    let mut rng = Rng::new(23);
    // Rows longer than the 256 keys (or queries) of one chunk.
    check_gpu(&ctx, &case(&mut rng, Dims::causal(1, 300, 4, 2, 64)));
}

#[test]
fn gpu_matches_reference_on_smollm2_heads() {
    // SmolLM2-135M's heads (NH 9, NKV 3, HS 64): T over two workgroups of rows, and T = 257 (five
    // workgroups, the last with one row; 17 tiles of 16 keys, the last with one key).
    let ctx = gpu();
    let mut rng = Rng::new(28);
    for (b, t) in [(2, 128), (1, 257)] {
        check_gpu(&ctx, &case(&mut rng, Dims::causal(b, t, 9, 3, 64)));
    }
}

#[test]
fn gpu_matches_reference_on_large_and_odd_head_sizes() {
    // HS 128 and 256 (tiles of 8 and 4 rows) over many tiles; HS not a multiple of 4 (the vec4
    // loads zero-fill past HS), and HS 130 (tiles of 4 rows of 33 vec4).
    let ctx = gpu();
    let mut rng = Rng::new(29);
    for (b, t, nh, nkv, hs) in [(1, 70, 2, 1, 128), (1, 37, 2, 2, 256), (2, 19, 4, 2, 5), (1, 40, 3, 3, 33), (1, 9, 2, 1, 130), (1, 66, 2, 1, 3)] {
        check_gpu(&ctx, &case(&mut rng, Dims::causal(b, t, nh, nkv, hs)));
    }
}

#[test]
fn decode_steps_match_the_reference_and_the_full_forward_rows() {
    // One or two query rows (attention_decode) at the end of a long cache: several passes of
    // its score phase (256 keys each at HS 64), against the f64 reference and, bit for bit,
    // against the full forward's last rows (attention_forward).
    let ctx = gpu();
    let mut rng = Rng::new(30);
    for (b, t, nh, nkv, hs) in [(1, 600, 9, 3, 64), (2, 70, 4, 2, 5), (1, 45, 2, 1, 256)] {
        let full = case(&mut rng, Dims::causal(b, t, nh, nkv, hs));
        let (qs, ks) = ([b, t, nh, hs], [b, t, nkv, hs]);
        let (k, v) = (up(&ctx, &full.k, &ks), up(&ctx, &full.v, &ks));
        let (out, _) = attention::forward(&ctx, &up(&ctx, &full.q, &qs), &k, &v).unwrap();
        let (out, out_ref) = (read(&ctx, &out), cpu::forward(&full.q, &full.k, &full.v, &full.d).0);
        for tq in [1, 2] {
            let p0 = t - tq;
            let row = nh * hs;
            let (mut qn, mut want, mut want_ref) = (Vec::new(), Vec::new(), Vec::new());
            for bb in 0..b {
                qn.extend_from_slice(&full.q[(bb * t + p0) * row..][..tq * row]);
                want.extend_from_slice(&out[(bb * t + p0) * row..][..tq * row]);
                want_ref.extend_from_slice(&out_ref[(bb * t + p0) * row..][..tq * row]);
            }
            let got = read(&ctx, &attention::forward_cached(&ctx, &up(&ctx, &qn, &[b, tq, nh, hs]), &k, &v, p0).unwrap());
            let name = format!("decode B{b} Tq{tq} Tk{t} NH{nh} NKV{nkv} HS{hs}");
            assert_close(&name, &got, &want_ref, 1e-5, 1e-4);
            assert_eq!(got, want, "{name}: differs from the full forward's rows");
        }
    }
}

#[test]
fn gpu_handles_t_2048() {
    let ctx = gpu();
    let mut rng = Rng::new(24);
    check_gpu(&ctx, &case(&mut rng, Dims::causal(1, 2048, 2, 1, 8)));
}

#[test]
fn cached_forward_equals_the_full_forward_rows() {
    let ctx = gpu();
    let mut rng = Rng::new(25);
    for (b, t, nh, nkv, hs, extra) in [(2, 65, 4, 2, 8, 7), (1, 300, 2, 1, 64, 0), (2, 3, 3, 1, 8, 2)] {
        let full = case(&mut rng, Dims::causal(b, t, nh, nkv, hs));
        let (q, k, v) = (
            up(&ctx, &full.q, &[b, t, nh, hs]),
            up(&ctx, &full.k, &[b, t, nkv, hs]),
            up(&ctx, &full.v, &[b, t, nkv, hs]),
        );
        let (out, _) = attention::forward(&ctx, &q, &k, &v).unwrap();
        let out = read(&ctx, &out);
        // The cache holds `extra` more rows than the positions used (garbage the mask must skip).
        let tk = t + extra;
        let mut kc = rng.vec(b * tk * nkv * hs, 100.0);
        let mut vc = rng.vec(b * tk * nkv * hs, 100.0);
        let row = nkv * hs;
        for bb in 0..b {
            kc[bb * tk * row..][..t * row].copy_from_slice(&full.k[bb * t * row..][..t * row]);
            vc[bb * tk * row..][..t * row].copy_from_slice(&full.v[bb * t * row..][..t * row]);
        }
        let (kc, vc) = (up(&ctx, &kc, &[b, tk, nkv, hs]), up(&ctx, &vc, &[b, tk, nkv, hs]));
        for p0 in [0, t / 2, t - 1] {
            let tq = t - p0;
            let qrow = nh * hs;
            let mut qn = Vec::new();
            let mut want = Vec::new();
            for bb in 0..b {
                qn.extend_from_slice(&full.q[(bb * t + p0) * qrow..][..tq * qrow]);
                want.extend_from_slice(&out[(bb * t + p0) * qrow..][..tq * qrow]);
            }
            let qn = up(&ctx, &qn, &[b, tq, nh, hs]);
            let got = read(&ctx, &attention::forward_cached(&ctx, &qn, &kc, &vc, p0).unwrap());
            // The same kernel on the same rows in the same order: bit-identical.
            assert_eq!(got, want, "cached rows {p0}..{t} of T {t}");
        }
        let qn = up(&ctx, &full.q[..nh * hs * b], &[b, 1, nh, hs]);
        assert!(attention::forward_cached(&ctx, &qn, &kc, &vc, tk).is_err(), "position past the cache");
    }
}

#[test]
fn cached_forward_matches_reference_with_offset() {
    let ctx = gpu();
    let mut rng = Rng::new(26);
    let d = Dims { b: 2, tq: 3, tk: 70, nh: 4, nkv: 2, hs: 8, q_pos0: 60 };
    let c = case(&mut rng, d);
    let (q, k, v) = (up(&ctx, &c.q, &[2, 3, 4, 8]), up(&ctx, &c.k, &[2, 70, 2, 8]), up(&ctx, &c.v, &[2, 70, 2, 8]));
    let got = attention::forward_cached(&ctx, &q, &k, &v, 60).unwrap();
    assert_close("cached out", &read(&ctx, &got), &cpu::forward(&c.q, &c.k, &c.v, &d).0, 1e-5, 1e-4);
}

#[test]
fn tape_gradients_equal_the_backward_launches_and_are_deterministic() {
    let ctx = gpu();
    let mut rng = Rng::new(27);
    let d = Dims::causal(2, 33, 4, 2, 16);
    let c = case(&mut rng, d);
    let (qs, ks) = ([2, 33, 4, 16], [2, 33, 2, 16]);
    let (qt, kt, vt, gt) = (up(&ctx, &c.q, &qs), up(&ctx, &c.k, &ks), up(&ctx, &c.v, &ks), up(&ctx, &c.dout, &qs));
    let mut tape = Tape::new(true);
    let (q, k, v) = (tape.input(qt.clone()), tape.input(kt.clone()), tape.input(vt.clone()));
    let y = attention::attention(&mut tape, &ctx, &q, &k, &v).unwrap();
    let (_, wrt) = tape.backward_from(&ctx, &y, gt.clone(), &[&q, &k, &v]).unwrap();
    let (out, lse) = attention::forward(&ctx, &qt, &kt, &vt).unwrap();
    assert_eq!(read(&ctx, y.value()), read(&ctx, &out));
    let (dq, dk, dv) = attention::backward(&ctx, &gt, &qt, &kt, &vt, &out, &lse).unwrap();
    let (dq2, dk2, dv2) = attention::backward(&ctx, &gt, &qt, &kt, &vt, &out, &lse).unwrap();
    for (name, tape_g, direct, again) in [("dq", &wrt[0], &dq, &dq2), ("dk", &wrt[1], &dk, &dk2), ("dv", &wrt[2], &dv, &dv2)] {
        let direct = read(&ctx, direct);
        assert_eq!(read(&ctx, tape_g.as_ref().expect(name)), direct, "{name}: tape vs launch");
        assert_eq!(read(&ctx, again), direct, "{name}: run to run");
    }

    // Only q needs a gradient (k, v constants): the node returns dq alone, the same values.
    let mut tape = Tape::new(true);
    let q = tape.input(qt.clone());
    let (k, v) = (tape.constant(kt.clone()), tape.constant(vt.clone()));
    let y = attention::attention(&mut tape, &ctx, &q, &k, &v).unwrap();
    let (_, wrt) = tape.backward_from(&ctx, &y, gt, &[&q, &k]).unwrap();
    assert_eq!(read(&ctx, wrt[0].as_ref().unwrap()), read(&ctx, &dq));
    assert!(wrt[1].is_none());
}

#[test]
fn bad_shapes_are_errors() {
    let ctx = gpu();
    let z = |s: &[usize]| ctx.zeros(s, DType::F32).unwrap();
    assert!(attention::forward(&ctx, &z(&[1, 4, 3, 8]), &z(&[1, 4, 2, 8]), &z(&[1, 4, 2, 8])).is_err(), "NH 3, NKV 2");
    assert!(attention::forward(&ctx, &z(&[1, 4, 2, 8]), &z(&[1, 5, 2, 8]), &z(&[1, 5, 2, 8])).is_err(), "T differs");
    assert!(attention::forward(&ctx, &z(&[1, 4, 2, 8]), &z(&[1, 4, 2, 8]), &z(&[1, 4, 1, 8])).is_err(), "v differs from k");
    assert!(attention::forward(&ctx, &z(&[1, 2, 1, 512]), &z(&[1, 2, 1, 512]), &z(&[1, 2, 1, 512])).is_err(), "HS 512");
    assert!(attention::forward(&ctx, &z(&[4, 2, 8]), &z(&[4, 2, 8]), &z(&[4, 2, 8])).is_err(), "rank 3");
}

#[test]
fn kernels_fit_the_default_workgroup_memory() {
    let (file, src) = shaders::ATTENTION;
    let m = naga::front::wgsl::parse_str(src).unwrap();
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(m.to_ctx()).unwrap();
    let bytes: u32 = m
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
        .map(|(_, g)| layouter[g.ty].size)
        .sum();
    // Every workgroup variable counted, whichever entry point uses it: an upper bound.
    assert!(bytes <= 16384, "shaders/{file}: {bytes} bytes of workgroup memory (> 16 KiB, WebGPU's default)");
    // Two tiles of 256 vec4 (k/v rows, or q/dout rows for dk/dv) and 64 lse and delta values.
    assert_eq!(bytes, 2 * 256 * 16 + 2 * 64 * 4);
}
