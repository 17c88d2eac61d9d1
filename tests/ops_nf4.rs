//! NF4 on the device (shaders/nf4.wgsl, src/ops/nf4.rs): GPU dequantization equals
//! `Nf4Tensor::dequantize` bit for bit (plain and double-quantized, every accepted block size
//! 32..=4096 (powers of two; others refused with a clear error), odd shapes,
//! every entry of both code tables); the NF4 linear forward and input gradient
//! agree with an f64 reference built from the CPU-dequantized weight; the fused kernels agree
//! with the scratch path; the tape op gives the launches' results.
//!
//! Tolerances of the matmuls: |got - want| <= 1e-6 * S against the f64 reference and 2e-6 * S
//! between the two GPU designs (each within 1e-6 * S of the reference), S = sum_k |x_k w_k| of
//! that output: the scale of f32 rounding in a dot product (terms and partial sums rounded at
//! relative 6e-8). The largest error seen is 3.4e-7 * S (K = 200); dequantization is exact.

mod common;
use common::*;
use qlora_webgpu::autograd::Tape;
use qlora_webgpu::gpu::{GpuContext, Tensor};
use qlora_webgpu::ops::nf4::{self, Nf4Scales, Nf4Weight};
use qlora_webgpu::quant::nf4::{dynamic_map, quantize_nf4, Nf4Stats, Nf4Tensor};

/// A weight (n, k) of normals with a few outlier rows (so block scales differ widely), quantized.
fn weight(rng: &mut Rng, n: usize, k: usize, blocksize: usize, dq: bool) -> Nf4Tensor {
    let mut w = rng.vec(n * k, 0.5);
    for (i, v) in w.iter_mut().enumerate() {
        if (i / k) % 7 == 3 {
            *v *= 8.0;
        }
    }
    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    quantize_nf4(&w32, &[n, k], blocksize, dq).expect("quantize")
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn every_code_of_both_tables_decodes_bit_for_bit() {
    // 256 blocks of 32: block b has 8-bit scale code b, and its 32 elements run through the 16
    // NF4 codes twice; so every entry of both code tables is read once at least.
    let ctx = gpu();
    let mut rng = Rng::new(10);
    let (n, k, bs) = (64, 128, 32);
    let packed: Vec<u8> = (0..n * k / 2).map(|i| (((2 * i) % 16) << 4 | ((2 * i + 1) % 16)) as u8).collect();
    let nested_absmax: Vec<f32> = (0..1).map(|_| (0.5 + rng.uniform()) as f32).collect();
    let stats = Nf4Stats::DoubleQuant {
        absmax_u8: (0..=255).collect(),
        nested_absmax,
        offset: (0.1 + rng.uniform()) as f32,
        nested_blocksize: 256,
    };
    for stats in [stats.clone(), Nf4Stats::Absmax(stats.absmax_f32())] {
        let t = Nf4Tensor { shape: vec![n, k], blocksize: bs, packed: packed.clone(), stats };
        let w = Nf4Weight::upload(&ctx, &t).unwrap();
        let got = read(&ctx, &nf4::dequantize(&ctx, &w).unwrap());
        let want = t.dequantize();
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(g.to_bits() == e.to_bits(), "dq {}: element {i} is {g:e}, CPU {e:e}", t.is_double_quant());
        }
    }
}

/// Blocks whose double-quantized scale would change if `dyn * nested + offset` were fused into
/// one rounding: the bit-exact check below is only meaningful if there are some.
fn fusion_sensitive_blocks(t: &Nf4Tensor) -> usize {
    let Nf4Stats::DoubleQuant { absmax_u8, nested_absmax, offset, nested_blocksize } = &t.stats else { return 0 };
    let d = dynamic_map();
    absmax_u8
        .iter()
        .enumerate()
        .filter(|&(b, &q)| {
            let (a, c) = (d[q as usize], nested_absmax[b / nested_blocksize]);
            a.mul_add(c, *offset).to_bits() != (a * c + offset).to_bits()
        })
        .count()
}

#[test]
fn gpu_dequantize_equals_cpu_bit_for_bit() {
    let ctx = gpu();
    let mut rng = Rng::new(11);
    let mut sensitive = 0;
    for blocksize in [64, 128] {
        for dq in [false, true] {
            for (n, k) in [(3, 1001), (65, 63), (1, 1), (1, 7), (64, 64), (300, 129), (576, 96)] {
                let t = weight(&mut rng, n, k, blocksize, dq);
                sensitive += fusion_sensitive_blocks(&t);
                let w = Nf4Weight::upload(&ctx, &t).unwrap();
                assert_eq!(w.shape(), [n, k]);
                assert_eq!(matches!(w.scales(), Nf4Scales::DoubleQuant { .. }), dq);
                let got = read(&ctx, &nf4::dequantize(&ctx, &w).unwrap());
                let want = t.dequantize();
                assert_eq!(got.len(), want.len());
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == e.to_bits(),
                        "dequantize ({n}, {k}) block {blocksize} dq {dq}: element {i} is {g:e}, CPU {e:e}"
                    );
                }
            }
        }
    }
    // (300, 129) and (576, 96) have more than 256 blocks: several nested scales.
    assert!(sensitive > 20, "only {sensitive} blocks would notice a fused multiply-add");
}

#[test]
fn device_bytes_are_the_packed_words_and_scales() {
    let ctx = gpu();
    let mut rng = Rng::new(12);
    for dq in [false, true] {
        let t = weight(&mut rng, 65, 63, 64, dq);
        let w = Nf4Weight::upload(&ctx, &t).unwrap();
        let n: usize = 65 * 63;
        let nb = n.div_ceil(64);
        // Packed words, scales, and the code tables (16 words, plus 256 for double quantization).
        let scales = if dq { 4 * nb.div_ceil(4) + 4 * nb.div_ceil(256) } else { 4 * nb };
        let tables = if dq { 4 * (16 + 256) } else { 4 * 16 };
        assert_eq!(w.bytes(), 4 * n.div_ceil(8) + scales + tables, "dq {dq}");
        // The CPU tensor's count: the same bytes without word padding and tables, plus the offset.
        let cpu = n.div_ceil(2) + if dq { nb + 4 * nb.div_ceil(256) + 4 } else { 4 * nb };
        assert_eq!(t.bytes(), cpu);
    }
    let t1 = quantize_nf4(&[1.0; 100], &[100], 64, false).unwrap();
    assert!(Nf4Weight::upload(&ctx, &t1).is_err(), "a 1-D tensor is not an (out, in) weight");
}

#[test]
fn reference_backward_passes_finite_differences() {
    let mut rng = Rng::new(13);
    let (r, n, k) = (3, 4, 5);
    let w = rng.vec(n * k, 1.0);
    let x = rng.vec(r * k, 1.0);
    let dy = rng.vec(r * n, 1.0);
    let dx = nf4::cpu::linear_backward_input(&dy, &w, r, n, k);
    gradcheck("nf4 linear dx", &|x| nf4::cpu::linear_forward(x, &w, r, n, k), &x, &dy, &dx);
}

/// S[r, j] = sum_p |a[r, p] * b(j, p)| for the error bound, b given by its (j, p) accessor.
fn abs_dot(a: &[f64], rows: usize, cols: usize, inner: usize, b: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    let mut s = vec![0.0; rows * cols];
    for r in 0..rows {
        for j in 0..cols {
            s[r * cols + j] = (0..inner).map(|p| (a[r * inner + p] * b(j, p)).abs()).sum();
        }
    }
    s
}

fn assert_within(what: &str, got: &[f32], want: &[f64], scale: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= rel * s + 1e-30, "{what}[{i}]: got {g}, want {w} (|err| {err:.3e} > {rel:e} * S = {:.3e})", rel * s);
    }
}

/// Forward and input-gradient references for x (m, k), dy (m, n) and the CPU-dequantized W.
struct Case {
    t: Nf4Tensor,
    lead: Vec<usize>,
    m: usize,
    n: usize,
    k: usize,
    x: Vec<f64>,
    dy: Vec<f64>,
}

impl Case {
    fn new(rng: &mut Rng, lead: &[usize], n: usize, k: usize, blocksize: usize, dq: bool) -> Case {
        let m = lead.iter().product();
        let t = weight(rng, n, k, blocksize, dq);
        Case { t, lead: lead.to_vec(), m, n, k, x: rng.vec(m * k, 1.0), dy: rng.vec(m * n, 1.0) }
    }
    fn shape(&self, last: usize) -> Vec<usize> {
        let mut s = self.lead.clone();
        s.push(last);
        s
    }
    fn upload(&self, ctx: &GpuContext) -> (Nf4Weight, Tensor, Tensor) {
        let w = Nf4Weight::upload(ctx, &self.t).unwrap();
        (w, up(ctx, &self.x, &self.shape(self.k)), up(ctx, &self.dy, &self.shape(self.n)))
    }
    fn name(&self) -> String {
        format!("{:?}x{}->{} block {} dq {}", self.lead, self.k, self.n, self.t.blocksize, self.t.is_double_quant())
    }
    /// (y, S of y, dx, S of dx) in f64 from the CPU-dequantized weight.
    fn reference(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (m, n, k) = (self.m, self.n, self.k);
        let wd = f64s(&self.t.dequantize());
        let y = nf4::cpu::linear_forward(&self.x, &wd, m, n, k);
        let sy = abs_dot(&self.x, m, n, k, |j, p| wd[j * k + p]);
        let dx = nf4::cpu::linear_backward_input(&self.dy, &wd, m, n, k);
        let sdx = abs_dot(&self.dy, m, k, n, |j, p| wd[p * k + j]);
        (y, sy, dx, sdx)
    }
}

#[test]
fn linear_forward_and_input_gradient_match_f64_reference() {
    let ctx = gpu();
    let mut rng = Rng::new(14);
    let cases = [
        (vec![3], 5, 1001, 64, false),
        (vec![3], 5, 1001, 128, true),
        (vec![7], 65, 63, 64, true),
        (vec![1], 1, 1, 64, false),
        (vec![65], 63, 130, 64, false),
        (vec![2, 33], 96, 200, 128, true),
        (vec![67], 64, 136, 64, true),
        // Up to 8 rows with in % 8 == 0 the launches take the fused kernels.
        (vec![1], 576, 576, 64, true),
        (vec![2, 4], 68, 136, 128, false),
        (vec![5], 3, 200, 64, true),
    ];
    for (lead, n, k, bs, dq) in cases {
        let c = Case::new(&mut rng, &lead, n, k, bs, dq);
        let (w, x, dy) = c.upload(&ctx);
        let (y_ref, sy, dx_ref, sdx) = c.reference();
        let y = nf4::linear_forward(&ctx, &x, &w).unwrap();
        assert_eq!(y.shape(), c.shape(n).as_slice());
        assert_within(&format!("y {}", c.name()), &read(&ctx, &y), &y_ref, &sy, 1e-6);
        let dx = nf4::linear_backward_input(&ctx, &dy, &w).unwrap();
        assert_eq!(dx.shape(), c.shape(k).as_slice());
        assert_within(&format!("dx {}", c.name()), &read(&ctx, &dx), &dx_ref, &sdx, 1e-6);
    }
}

#[test]
fn fused_kernels_equal_the_scratch_path() {
    let ctx = gpu();
    let mut rng = Rng::new(15);
    // Shapes where the fused kernels apply (in % 8 == 0, out % 4 == 0), with rows and columns
    // that are not multiples of the 64 x 64 tile, and blocks that span rows (in = 200, 136).
    let cases = [
        (vec![1], 4, 8, 64, false),
        (vec![65], 68, 200, 64, false),
        (vec![65], 68, 200, 64, true),
        (vec![2, 37], 12, 136, 128, true),
        (vec![130], 132, 64, 64, false),
        (vec![9], 300, 576, 64, true),
    ];
    for (lead, n, k, bs, dq) in cases {
        let c = Case::new(&mut rng, &lead, n, k, bs, dq);
        let (w, x, dy) = c.upload(&ctx);
        assert!(nf4::fused_forward_applies(&w) && nf4::fused_backward_applies(&w));
        let (y_ref, sy, dx_ref, sdx) = c.reference();
        let y_fused = read(&ctx, &nf4::linear_forward_fused(&ctx, &x, &w).unwrap());
        let y_scratch = read(&ctx, &nf4::linear_forward_scratch(&ctx, &x, &w).unwrap());
        assert_within(&format!("fused y {}", c.name()), &y_fused, &y_ref, &sy, 1e-6);
        assert_within(&format!("fused y vs scratch {}", c.name()), &y_fused, &f64s(&y_scratch), &sy, 2e-6);
        let dx_fused = read(&ctx, &nf4::linear_backward_input_fused(&ctx, &dy, &w).unwrap());
        let dx_scratch = read(&ctx, &nf4::linear_backward_input_scratch(&ctx, &dy, &w).unwrap());
        assert_within(&format!("fused dx {}", c.name()), &dx_fused, &dx_ref, &sdx, 1e-6);
        assert_within(&format!("fused dx vs scratch {}", c.name()), &dx_fused, &f64s(&dx_scratch), &sdx, 2e-6);
    }
    // Shapes the fused kernels do not take are refused, not miscomputed.
    let c = Case::new(&mut rng, &[3], 5, 1001, 64, false);
    let (w, x, dy) = c.upload(&ctx);
    assert!(nf4::linear_forward_fused(&ctx, &x, &w).is_err());
    assert!(nf4::linear_backward_input_fused(&ctx, &dy, &w).is_err());
}

#[test]
fn bad_shapes_are_errors() {
    let ctx = gpu();
    let mut rng = Rng::new(16);
    let c = Case::new(&mut rng, &[4], 8, 16, 64, false);
    let (w, x, dy) = c.upload(&ctx);
    // x's last dim must be in (16), dy's must be out (8).
    assert!(nf4::linear_forward(&ctx, &dy, &w).is_err());
    assert!(nf4::linear_backward_input(&ctx, &x, &w).is_err());
    assert!(nf4::linear_forward_fused(&ctx, &dy, &w).is_err());
    let ids = ctx.upload_u32(&[0; 16], &[1, 16]).unwrap();
    assert!(nf4::linear_forward(&ctx, &ids, &w).is_err(), "x must be f32");
}

#[test]
fn tape_op_gives_the_launches_results() {
    let ctx = gpu();
    let mut rng = Rng::new(17);
    for (lead, n, k, dq) in [(vec![5], 64, 200, true), (vec![2, 3], 65, 63, false)] {
        let c = Case::new(&mut rng, &lead, n, k, 64, dq);
        let (w, x, dy) = c.upload(&ctx);
        let y_launch = read(&ctx, &nf4::linear_forward(&ctx, &x, &w).unwrap());
        let dx_launch = read(&ctx, &nf4::linear_backward_input(&ctx, &dy, &w).unwrap());

        let mut tape = Tape::new(true);
        let xv = tape.input(x.clone());
        let y = nf4::nf4_linear(&mut tape, &ctx, &xv, &w).unwrap();
        assert!(y.requires_grad());
        assert_eq!(read(&ctx, y.value()), y_launch, "tape forward {}", c.name());
        let (params, grads) = tape.backward_from(&ctx, &y, dy.clone(), &[&xv]).unwrap();
        assert!(params.is_empty(), "the NF4 weight is frozen: no parameter gradient");
        let dx = grads[0].as_ref().expect("dx reaches the input");
        assert_eq!(read(&ctx, dx), dx_launch, "tape dx {}", c.name());

        // A constant input records nothing.
        let mut tape = Tape::new(true);
        let xc = tape.constant(x.clone());
        assert!(!nf4::nf4_linear(&mut tape, &ctx, &xc, &w).unwrap().requires_grad());
    }
}

/// Worst |got - want| / S over a result (S as in `assert_within`).
fn worst_rel(got: &[f32], want: &[f64], scale: &[f64]) -> f64 {
    got.iter().zip(want).zip(scale).map(|((&g, &w), &s)| (g as f64 - w).abs() / s.max(1e-30)).fold(0.0, f64::max)
}

/// Every block size the library accepts (src/quant/nf4.rs `check_blocksize`: powers of two in
/// 32..=4096, bitsandbytes' range), beyond the 64 and 128 of the tests above: GPU dequantization
/// equals the CPU's bit for bit, plain and double-quantized, with a partial last block, blocks
/// spanning rows, a tensor smaller than one block, and more than 256 blocks (several nested
/// scales); the forward and input gradient (dispatching, fused and scratch kernels) agree with the
/// f64 reference within the file's 1e-6 * S. Other sizes are refused with an error naming the size
/// and the accepted range.
#[test]
fn every_accepted_block_size_matches_the_cpu_reference() {
    let ctx = gpu();
    let mut rng = Rng::new(18);
    let mut worst = 0.0f64;
    for bs in [32usize, 64, 128, 256, 512, 1024, 2048, 4096] {
        // (n, k): partial last block and rows spanning blocks; one partial block; > 256 blocks.
        let many = (256 * bs + 3 * bs / 2).div_ceil(1024);
        for (n, k) in [(3, 1001), (1, 7), (9, 4100), (many, 1024)] {
            for dq in [false, true] {
                let t = weight(&mut rng, n, k, bs, dq);
                assert_eq!(t.blocksize, bs);
                let w = Nf4Weight::upload(&ctx, &t).unwrap();
                assert_eq!(w.blocksize(), bs);
                let got = read(&ctx, &nf4::dequantize(&ctx, &w).unwrap());
                let want = t.dequantize();
                assert_eq!(got.len(), want.len());
                if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                    panic!("dequantize ({n}, {k}) block {bs} dq {dq}: element {i} is {:e}, CPU {:e}", got[i], want[i]);
                }
                if let Nf4Stats::DoubleQuant { nested_absmax, .. } = &t.stats {
                    if n == many {
                        assert!(nested_absmax.len() >= 2, "block {bs}: want several nested scales");
                    }
                }
            }
        }
        for (lead, n, k, dq) in [(vec![3], 68, 200, false), (vec![2, 5], 36, 520, true)] {
            let c = Case::new(&mut rng, &lead, n, k, bs, dq);
            let (w, x, dy) = c.upload(&ctx);
            let (y_ref, sy, dx_ref, sdx) = c.reference();
            assert!(nf4::fused_forward_applies(&w) && nf4::fused_backward_applies(&w), "{}", c.name());
            for (kind, y, dx) in [
                ("dispatch", nf4::linear_forward(&ctx, &x, &w), nf4::linear_backward_input(&ctx, &dy, &w)),
                ("fused", nf4::linear_forward_fused(&ctx, &x, &w), nf4::linear_backward_input_fused(&ctx, &dy, &w)),
                ("scratch", nf4::linear_forward_scratch(&ctx, &x, &w), nf4::linear_backward_input_scratch(&ctx, &dy, &w)),
            ] {
                let (y, dx) = (read(&ctx, &y.unwrap()), read(&ctx, &dx.unwrap()));
                worst = worst.max(worst_rel(&y, &y_ref, &sy)).max(worst_rel(&dx, &dx_ref, &sdx));
                assert_within(&format!("{kind} y {}", c.name()), &y, &y_ref, &sy, 1e-6);
                assert_within(&format!("{kind} dx {}", c.name()), &dx, &dx_ref, &sdx, 1e-6);
            }
        }
    }
    eprintln!("NF4 linear, every block size: worst error {worst:.2e} * S (bound 1e-6 * S)");
    // Sizes outside the accepted set: quantizing, and uploading a tensor built by hand, fail with
    // the size and the range in the message.
    for bs in [0, 8, 16, 48, 100, 8192] {
        let e = quantize_nf4(&[0.5; 64], &[8, 8], bs, false).unwrap_err().to_string();
        assert!(e.contains(&format!("NF4 block size {bs} is not a power of two in 32..=4096")), "{e}");
    }
    let t = Nf4Tensor { shape: vec![8, 8], blocksize: 16, packed: vec![0x77; 32], stats: Nf4Stats::Absmax(vec![1.0; 4]) };
    let e = Nf4Weight::upload(&ctx, &t).unwrap_err().to_string();
    assert!(e.contains("NF4 block size 16 is not a power of two in 32..=4096"), "{e}");
}
