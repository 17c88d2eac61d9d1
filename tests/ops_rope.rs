//! RoPE: inv_freq and the cos/sin tables follow transformers' f32 computation (default, linear
//! and llama3 scaling); the f64 reference backward passes a finite-difference check; the GPU
//! forward and backward agree with the reference on odd shapes; the tape gives the backward
//! launch's gradient.
//!
//! Tolerances: rotations are two f32 products and a sum per element, so GPU vs f64 reference
//! (on the same f32 tables) is held to 1e-6 abs + 1e-5 rel.

mod common;
use common::*;
use qlora_webgpu::autograd::Tape;
use qlora_webgpu::ops::rope::{self, RopeScaling, RopeTables};

/// transformers' default inv_freq computed here step by step in f32, with the power in f64 and
/// rounded once (the correctly rounded powf).
fn default_inv_freq_f32(theta: f64, hs: usize) -> Vec<f32> {
    (0..hs)
        .step_by(2)
        .map(|i| {
            let e: f32 = i as f32 / hs as f32;
            let pw: f32 = ((theta as f32) as f64).powf(e as f64) as f32;
            1.0f32 / pw
        })
        .collect()
}

#[test]
fn inv_freq_default_matches_the_f32_formula() {
    for theta in [10000.0, 100000.0] {
        let hs = 64;
        let got = rope::inv_freq(theta, hs, None);
        assert_eq!(got.len(), hs / 2);
        assert_eq!(got, default_inv_freq_f32(theta, hs), "theta {theta}: f32 steps");
        for (i, &g) in got.iter().enumerate() {
            // Two correctly rounded steps (powf, reciprocal) from the exact value: within 1 ulp.
            let exact = 1.0 / theta.powf((2 * i) as f64 / hs as f64);
            let rel = (g as f64 - exact).abs() / exact;
            assert!(rel <= f32::EPSILON as f64, "theta {theta} inv_freq[{i}] = {g}, exact {exact}, rel {rel:e}");
        }
        assert_eq!(got[0], 1.0);
    }
    // theta^(1/2) = 100 exactly for theta 10000: inv_freq[16] of HS 64 is f32(1/100).
    assert_eq!(rope::inv_freq(10000.0, 64, None)[16], 1.0f32 / 100.0f32);
}

#[test]
fn inv_freq_linear_divides_by_factor() {
    let base = rope::inv_freq(10000.0, 64, None);
    let lin = rope::inv_freq(10000.0, 64, Some(&RopeScaling::Linear { factor: 4.0 }));
    for (b, l) in base.iter().zip(&lin) {
        assert_eq!(*l, b / 4.0f32);
    }
}

/// transformers' `_compute_llama3_parameters` evaluated in f64 from the exact inv_freq.
fn llama3_f64(theta: f64, hs: usize, factor: f64, low: f64, high: f64, old: f64) -> Vec<f64> {
    let (low_wl, high_wl) = (old / low, old / high);
    (0..hs)
        .step_by(2)
        .map(|i| {
            let inv = 1.0 / theta.powf(i as f64 / hs as f64);
            let wl = 2.0 * std::f64::consts::PI / inv;
            if wl < high_wl {
                inv
            } else if wl > low_wl {
                inv / factor
            } else {
                let s = (old / wl - low) / (high - low);
                (1.0 - s) * inv / factor + s * inv
            }
        })
        .collect()
}

#[test]
fn inv_freq_llama3_follows_the_wavelength_bands() {
    // Llama 3.1 (theta 5e5, HS 128, factor 8) and Llama 3.2 1B (factor 32, HS 64).
    for (hs, factor) in [(128usize, 8.0f64), (64, 32.0)] {
        let (theta, low, high, old) = (500000.0, 1.0, 4.0, 8192u32);
        let sc = RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: old,
        };
        let got = rope::inv_freq(theta, hs, Some(&sc));
        let base = rope::inv_freq(theta, hs, None);
        let want = llama3_f64(theta, hs, factor, low, high, old as f64);
        let (mut n_high, mut n_low, mut n_mid) = (0, 0, 0);
        for i in 0..hs / 2 {
            let rel = (got[i] as f64 - want[i]).abs() / want[i];
            assert!(rel <= 1e-6, "hs {hs} factor {factor}: inv_freq[{i}] = {}, f64 formula {}", got[i], want[i]);
            let wavelen = 2.0 * std::f64::consts::PI / base[i] as f64;
            if wavelen < old as f64 / high {
                assert_eq!(got[i], base[i], "high frequency {i} must be kept");
                n_high += 1;
            } else if wavelen > old as f64 / low {
                assert_eq!(got[i], base[i] / factor as f32, "low frequency {i} must be divided by the factor");
                n_low += 1;
            } else {
                assert!(got[i] < base[i] && got[i] > base[i] / factor as f32, "medium frequency {i} must be blended");
                n_mid += 1;
            }
        }
        assert!(n_high > 0 && n_low > 0 && n_mid > 0, "bands {n_high} {n_mid} {n_low}: the test must cover all three");
    }
}

#[test]
fn rope_scaling_reads_hf_config_objects() {
    let v: serde_json::Value = serde_json::from_str(
        r#"{"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
    )
    .unwrap();
    assert_eq!(
        RopeScaling::from_hf_json(&v).unwrap(),
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );
    let v: serde_json::Value = serde_json::from_str(r#"{"type": "linear", "factor": 2.0}"#).unwrap();
    assert_eq!(RopeScaling::from_hf_json(&v).unwrap(), Some(RopeScaling::Linear { factor: 2.0 }));
    let v: serde_json::Value = serde_json::from_str(r#"{"rope_theta": 10000.0, "rope_type": "default"}"#).unwrap();
    assert_eq!(RopeScaling::from_hf_json(&v).unwrap(), None);
    assert_eq!(RopeScaling::from_hf_json(&serde_json::Value::Null).unwrap(), None);
    let v: serde_json::Value = serde_json::from_str(r#"{"rope_type": "yarn", "factor": 4.0}"#).unwrap();
    assert!(RopeScaling::from_hf_json(&v).is_err());
    let v: serde_json::Value = serde_json::from_str(r#"{"rope_type": "llama3", "factor": 4.0}"#).unwrap();
    assert!(RopeScaling::from_hf_json(&v).is_err());
}

#[test]
fn tables_are_cos_and_sin_of_the_f32_angle() {
    let inv = rope::inv_freq(10000.0, 64, None);
    let positions: Vec<u32> = vec![0, 1, 2, 7, 100, 2047, 5];
    let (c, s) = rope::tables(&inv, &positions);
    assert_eq!(c.len(), positions.len() * 32);
    for (r, &p) in positions.iter().enumerate() {
        for (i, &f) in inv.iter().enumerate() {
            let angle = p as f32 * f; // f32 multiply, as the K = 1 matmul in transformers
            assert_eq!(c[r * 32 + i], (angle as f64).cos() as f32, "cos at position {p}, i {i}");
            assert_eq!(s[r * 32 + i], (angle as f64).sin() as f32, "sin at position {p}, i {i}");
            // Against the exact angle: off only by the f32 rounding of the angle (<= |angle| 2^-24)
            // and of the result.
            let exact = p as f64 * (f as f64);
            let lim = exact.abs() * f32::EPSILON as f64 / 2.0 + f32::EPSILON as f64;
            assert!((c[r * 32 + i] as f64 - exact.cos()).abs() <= lim && (s[r * 32 + i] as f64 - exact.sin()).abs() <= lim);
        }
    }
    // Position 0: the identity rotation.
    assert!(c[..32].iter().all(|&x| x == 1.0) && s[..32].iter().all(|&x| x == 0.0));
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[test]
fn reference_backward_passes_finite_differences() {
    let mut rng = Rng::new(11);
    let (b, t, h, hs) = (2, 3, 2, 6);
    let inv = rope::inv_freq(10000.0, hs, None);
    let (c, s) = rope::tables(&inv, &[0, 1, 5]);
    let (c, s) = (to64(&c), to64(&s));
    let x = rng.vec(b * t * h * hs, 1.0);
    let dout = rng.vec(x.len(), 1.0);
    let dx = rope::cpu::backward(&dout, &c, &s, t, h, hs);
    gradcheck("rope dx", &|x| rope::cpu::forward(x, &c, &s, t, h, hs), &x, &dout, &dx);
}

#[test]
fn gpu_matches_reference_on_odd_shapes() {
    let ctx = gpu();
    let mut rng = Rng::new(12);
    for (b, t, h, hs, theta) in [
        (1, 1, 1, 2, 10000.0),
        (2, 3, 4, 8, 10000.0),
        (1, 63, 3, 64, 100000.0),
        (2, 65, 2, 64, 10000.0),
        (1, 5, 9, 128, 500000.0),
        (2, 300, 1, 16, 10000.0),
    ] {
        let inv = rope::inv_freq(theta, hs, None);
        // Positions need not be 0..T: a shifted window, as for the new tokens of a KV cache.
        let positions: Vec<u32> = (0..t as u32).map(|p| p + 3).collect();
        let tabs = RopeTables::new(&ctx, &inv, &positions).unwrap();
        let (c, s) = rope::tables(&inv, &positions);
        let (c, s) = (to64(&c), to64(&s));
        let x = rng.vec(b * t * h * hs, 1.0);
        let dout = rng.vec(x.len(), 1.0);
        let shape = [b, t, h, hs];
        let out = rope::forward(&ctx, &up(&ctx, &x, &shape), &tabs).unwrap();
        let want = rope::cpu::forward(&x, &c, &s, t, h, hs);
        assert_close(&format!("rope out {shape:?}"), &read(&ctx, &out), &want, 1e-6, 1e-5);
        let dx = rope::backward(&ctx, &up(&ctx, &dout, &shape), &tabs).unwrap();
        let want = rope::cpu::backward(&dout, &c, &s, t, h, hs);
        assert_close(&format!("rope dx {shape:?}"), &read(&ctx, &dx), &want, 1e-6, 1e-5);
    }
}

#[test]
fn forward_rows_uses_a_window_of_a_larger_table() {
    let ctx = gpu();
    let mut rng = Rng::new(13);
    let (b, t, h, hs) = (2, 5, 3, 16);
    let inv = rope::inv_freq(10000.0, hs, None);
    let all: Vec<u32> = (0..40).collect();
    let big = RopeTables::new(&ctx, &inv, &all).unwrap();
    let row0 = 17;
    let small = RopeTables::new(&ctx, &inv, &all[row0..row0 + t]).unwrap();
    let x = up(&ctx, &rng.vec(b * t * h * hs, 1.0), &[b, t, h, hs]);
    let a = read(&ctx, &rope::forward_rows(&ctx, &x, &big, row0).unwrap());
    let bb = read(&ctx, &rope::forward(&ctx, &x, &small).unwrap());
    assert_eq!(a, bb);
    assert!(rope::forward_rows(&ctx, &x, &big, 36).is_err(), "rows past the table");
}

#[test]
fn tape_gradient_equals_the_backward_launch() {
    let ctx = gpu();
    let mut rng = Rng::new(14);
    let (b, t, h, hs) = (2, 7, 3, 8);
    let shape = [b, t, h, hs];
    let inv = rope::inv_freq(10000.0, hs, None);
    let positions: Vec<u32> = (0..t as u32).collect();
    let tabs = RopeTables::new(&ctx, &inv, &positions).unwrap();
    let xt = up(&ctx, &rng.vec(b * t * h * hs, 1.0), &shape);
    let gt = up(&ctx, &rng.vec(b * t * h * hs, 1.0), &shape);
    let mut tape = Tape::new(true);
    let x = tape.input(xt.clone());
    let y = rope::rope(&mut tape, &ctx, &x, &tabs).unwrap();
    assert_eq!(read(&ctx, y.value()), read(&ctx, &rope::forward(&ctx, &xt, &tabs).unwrap()));
    let (_, wrt) = tape.backward_from(&ctx, &y, gt.clone(), &[&x]).unwrap();
    let got = read(&ctx, wrt[0].as_ref().expect("x gradient"));
    assert_eq!(got, read(&ctx, &rope::backward(&ctx, &gt, &tabs).unwrap()));
}

#[test]
fn bad_shapes_are_errors() {
    let ctx = gpu();
    let inv = rope::inv_freq(10000.0, 8, None);
    let tabs = RopeTables::new(&ctx, &inv, &[0, 1, 2]).unwrap();
    let x = ctx.zeros(&[1, 3, 2, 6], qlora_webgpu::gpu::DType::F32).unwrap();
    assert!(rope::forward(&ctx, &x, &tabs).is_err(), "head size 6 with tables of 4 columns");
    let x = ctx.zeros(&[1, 4, 2, 8], qlora_webgpu::gpu::DType::F32).unwrap();
    assert!(rope::forward(&ctx, &x, &tabs).is_err(), "T 4 with 3 table rows");
    let x = ctx.zeros(&[12, 8], qlora_webgpu::gpu::DType::F32).unwrap();
    assert!(rope::forward(&ctx, &x, &tabs).is_err(), "rank 2");
}

#[test]
fn freq_factors_divide_inv_freq_and_rope_with_them_matches_f64() {
    // llama.cpp's per-frequency factors (a GGUF's rope_freqs.weight): inv_freq[i] / factors[i],
    // checked against RoPE evaluated wholly in f64 (angle = p * theta^(-2i/HS) / factors[i]).
    let ctx = gpu();
    let mut rng = Rng::new(13);
    for (b, t, h, hs, theta) in [(1, 1, 1, 2, 10000.0), (1, 7, 3, 8, 10000.0), (2, 33, 2, 64, 500000.0), (1, 9, 5, 128, 500000.0)] {
        let factors: Vec<f32> = (0..hs / 2).map(|_| (1.0 + 31.0 * rng.uniform()) as f32).collect();
        let sc = RopeScaling::FreqFactors { factors: factors.clone() };
        sc.validate(hs).unwrap();
        let base = rope::inv_freq(theta, hs, None);
        let inv = rope::inv_freq(theta, hs, Some(&sc));
        for i in 0..hs / 2 {
            assert_eq!(inv[i], base[i] / factors[i], "hs {hs}: inv_freq[{i}] is one f32 division by the factor");
        }
        let positions: Vec<u32> = (0..t as u32).map(|p| 2 * p + 1).collect();
        let tabs = RopeTables::new(&ctx, &inv, &positions).unwrap();
        let half = hs / 2;
        let f = &factors;
        let ang: Vec<f64> = positions
            .iter()
            .flat_map(|&p| (0..half).map(move |i| p as f64 * theta.powf(-2.0 * i as f64 / hs as f64) / f[i] as f64))
            .collect();
        let (c64, s64): (Vec<f64>, Vec<f64>) = (ang.iter().map(|a| a.cos()).collect(), ang.iter().map(|a| a.sin()).collect());
        let x = rng.vec(b * t * h * hs, 1.0);
        let shape = [b, t, h, hs];
        let got = read(&ctx, &rope::forward(&ctx, &up(&ctx, &x, &shape), &tabs).unwrap());
        let want = rope::cpu::forward(&x, &c64, &s64, t, h, hs);
        let d = got.iter().zip(&want).map(|(&g, w)| (g as f64 - w).abs()).fold(0.0, f64::max);
        eprintln!("rope with frequency factors {shape:?}: max |GPU - f64| = {d:.2e}");
        // f32 inv_freq, angle and table rounding at positions up to 65: below 1e-6 here.
        assert_close(&format!("rope with factors {shape:?}"), &got, &want, 5e-6, 0.0);
    }
}

#[test]
fn rope_scaling_validation_names_the_fault() {
    let ok = RopeScaling::FreqFactors { factors: vec![1.0, 2.0, 8.0, 8.0] };
    ok.validate(8).unwrap();
    let err = ok.validate(10).unwrap_err().to_string();
    assert!(err.contains("4 rope frequency factors") && err.contains("head size 10"), "{err}");
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        let err = RopeScaling::FreqFactors { factors: vec![1.0, bad, 1.0, 1.0] }.validate(8).unwrap_err().to_string();
        assert!(err.contains("frequency factor 1"), "{bad}: {err}");
    }
    assert!(RopeScaling::Linear { factor: 0.0 }.validate(8).is_err());
    assert!(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 4.0, high_freq_factor: 1.0, original_max_position_embeddings: 8192 }
        .validate(8)
        .is_err());
}
