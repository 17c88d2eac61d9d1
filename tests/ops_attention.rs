//! Causal GQA attention: the f64 reference backward passes a finite-difference check; the GPU
//! forward (out and the saved logsumexp) and backward (dq, dk, dv) agree with it on odd shapes
//! (T 1, 3, 63, 65, 128, 257, 300 and 2048; HS 3, 5, 8, 33, 64, 96, 128, 130 and 256; NH/NKV
//! 4/2, 3/1, 2/2, 9/3); the KV-cache forward equals the full forward's rows, also for the one-
//! and two-row decode kernel; the tape gives the launches' gradients; results are deterministic
//! run to run; the kernels fit WebGPU's default workgroup memory; with sequence packing
//! (per-row segment starts) no attention weight crosses an example boundary.
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
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
        .validate(&m)
        .unwrap();
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(m.to_ctx()).unwrap();
    // Per entry point, the workgroup variables it uses (shaders/common.wgsl's scratch, appended
    // to every file, is used by none of the attention kernels); the largest.
    let bytes: u32 = (0..m.entry_points.len())
        .map(|i| {
            let ep = info.get_entry_point(i);
            m.global_variables
                .iter()
                .filter(|(h, g)| g.space == naga::AddressSpace::WorkGroup && !ep[*h].is_empty())
                .map(|(_, g)| layouter[g.ty].size)
                .sum::<u32>()
        })
        .max()
        .unwrap();
    assert!(bytes <= 16384, "shaders/{file}: {bytes} bytes of workgroup memory (> 16 KiB, WebGPU's default)");
    // dk/dv: two tiles of 256 vec4 (q and dout rows), 64 lse and delta values and 64 segment
    // starts (under sequence packing).
    assert_eq!(bytes, 2 * 256 * 16 + 3 * 64 * 4);
}

/// Segment starts (B * T) of rows packed from examples of the given lengths.
fn seg_starts(rows: &[&[usize]]) -> Vec<usize> {
    let mut s = Vec::new();
    for lens in rows {
        let mut start = 0;
        for &n in *lens {
            s.extend(std::iter::repeat_n(start, n));
            start += n;
        }
    }
    s
}

/// Sequence packing: with per-row segment starts the GPU forward and backward equal the f64
/// reference that masks keys outside each query's example (1e-5 abs + 1e-4 rel, as above);
/// changing every key and value outside one example leaves that example's outputs and its
/// dq unchanged bit for bit (no attention weight crosses a boundary); each example of the
/// packed row equals that example run alone as an unpacked row (f32 noise: other tile splits).
#[test]
fn packed_rows_never_attend_across_examples() {
    let ctx = gpu();
    let mut rng = Rng::new(31);
    for (nh, nkv, hs, rows) in [
        (9usize, 3usize, 64usize, vec![vec![1usize, 37, 70, 42], vec![150]]),
        (4, 2, 8, vec![vec![5, 3, 90, 2], vec![64, 1, 35]]),
    ] {
        let t: usize = rows[0].iter().sum();
        let rows_ref: Vec<&[usize]> = rows.iter().map(|r| r.as_slice()).collect();
        assert!(rows.iter().all(|r| r.iter().sum::<usize>() == t));
        let d = Dims::causal(rows.len(), t, nh, nkv, hs);
        let c = case(&mut rng, d);
        let seg = seg_starts(&rows_ref);
        let seg_t = ctx.upload_u32(&seg.iter().map(|&x| x as u32).collect::<Vec<_>>(), &[d.b, t]).unwrap();
        let (qs, ks) = ([d.b, t, nh, hs], [d.b, t, nkv, hs]);
        let name = format!("packed NH{nh} NKV{nkv} HS{hs} {rows:?}");
        let run = |k: &[f64], v: &[f64]| {
            let (q, k, v) = (up(&ctx, &c.q, &qs), up(&ctx, k, &ks), up(&ctx, v, &ks));
            let (out, lse) = attention::forward_packed(&ctx, &q, &k, &v, Some(&seg_t)).unwrap();
            let g = up(&ctx, &c.dout, &qs);
            let (dq, dk, dv) = attention::backward_packed(&ctx, &g, &q, &k, &v, &out, &lse, Some(&seg_t)).unwrap();
            (read(&ctx, &out), read(&ctx, &dq), read(&ctx, &dk), read(&ctx, &dv))
        };
        let (out, dq, dk, dv) = run(&c.k, &c.v);
        let (out_ref, p) = cpu::forward_packed(&c.q, &c.k, &c.v, &d, &seg);
        let (dq_ref, dk_ref, dv_ref) = cpu::backward_packed(&c.dout, &c.q, &c.k, &c.v, &d, &seg);
        assert_close(&format!("out {name}"), &out, &out_ref, 1e-5, 1e-4);
        assert_close(&format!("dq {name}"), &dq, &dq_ref, 1e-5, 1e-4);
        assert_close(&format!("dk {name}"), &dk, &dk_ref, 1e-5, 1e-4);
        assert_close(&format!("dv {name}"), &dv, &dv_ref, 1e-5, 1e-4);
        // The reference's P is zero across boundaries (it is what the GPU matches above).
        for b in 0..d.b {
            for h in 0..nh {
                for tq in 0..t {
                    let row = &p[((b * nh + h) * t + tq) * t..][..t];
                    assert!(row[..seg[b * t + tq]].iter().all(|&x| x == 0.0));
                }
            }
        }
        // Every key and value of row 0 outside its third example replaced: that example's out
        // and dq stay the same bits.
        let (s0, n0) = (rows[0][..2].iter().sum::<usize>(), rows[0][2]);
        let (mut k2, mut v2) = (c.k.clone(), c.v.clone());
        for j in (0..t).filter(|j| *j < s0 || *j >= s0 + n0) {
            for x in &mut k2[j * nkv * hs..(j + 1) * nkv * hs] {
                *x = 3.0 * rng.normal();
            }
            for x in &mut v2[j * nkv * hs..(j + 1) * nkv * hs] {
                *x = 100.0 * rng.normal();
            }
        }
        let (out2, dq2, _, _) = run(&k2, &v2);
        let span = s0 * nh * hs..(s0 + n0) * nh * hs;
        assert!(out2[span.clone()].iter().zip(&out[span.clone()]).all(|(a, b)| a.to_bits() == b.to_bits()), "out {name}: a weight crosses");
        assert!(dq2[span.clone()].iter().zip(&dq[span.clone()]).all(|(a, b)| a.to_bits() == b.to_bits()), "dq {name}: a weight crosses");
        // The same example alone, unpacked.
        let sub = |x: &[f64], heads: usize| x[s0 * heads * hs..(s0 + n0) * heads * hs].to_vec();
        let d1 = Dims::causal(1, n0, nh, nkv, hs);
        let (q1, k1, v1) = (up(&ctx, &sub(&c.q, nh), &[1, n0, nh, hs]), up(&ctx, &sub(&c.k, nkv), &[1, n0, nkv, hs]), up(&ctx, &sub(&c.v, nkv), &[1, n0, nkv, hs]));
        let (o1, _) = attention::forward(&ctx, &q1, &k1, &v1).unwrap();
        let alone: Vec<f64> = read(&ctx, &o1).iter().map(|&x| x as f64).collect();
        assert_close(&format!("alone {name} {d1:?}"), &out[span], &alone, 1e-6, 1e-5);
    }
}
