//! Sharded tensors (src/gpu/shards.rs) and the ops that work across them. The chunked output
//! layer (src/ops/head.rs): the causal-LM loss of h · W^T without logits
//! (N, V), scored on the counted rows only, over a row-sharded and 16-bit-stored W.
//!
//! - With W in one f32 buffer (one chunk) the fused loss and its dh equal the unfused path
//!   (`linear` then `cross_entropy` on the tape) bit for bit, with ignored rows in the batch.
//! - bf16 and f16 storage of a W whose values are exact in them equal f32 storage bit for bit.
//! - With the binding limit lowered (W in 5 shards, logits in many chunks) the loss and dh equal
//!   the f64 reference within f32 rounding: the only difference from one chunk is the order of
//!   the logsumexp merge and of the dh accumulation (bounds stated at each check).
//! - `logits` across shards equals the single-buffer logits bit for bit (the same per-row dot
//!   products), and the plan never exceeds the binding.

mod common;
use common::*;
use qlora_webgpu::autograd::Tape;
use qlora_webgpu::gpu::{DType, GpuContext, RowShards, Tensor};
use qlora_webgpu::ops::cross_entropy::{self, cpu as ce_cpu};
use qlora_webgpu::ops::{head, matmul};
use std::rc::Rc;

/// Rounds to bf16 (so every storage holds the same values).
fn bf16(x: f64) -> f32 {
    f32::from_bits((x as f32).to_bits() & 0xffff_0000)
}

struct Case {
    n: usize,
    c: usize,
    v: usize,
    h: Vec<f32>,
    w: Vec<f32>,
    targets: Vec<i32>,
}

fn case(seed: u64, n: usize, c: usize, v: usize) -> Case {
    let mut rng = Rng::new(seed);
    let h: Vec<f32> = rng.vec(n * c, 1.0).iter().map(|&x| x as f32).collect();
    let w: Vec<f32> = rng.vec(v * c, 0.3).iter().map(|&x| bf16(x)).collect();
    // Every third row ignored, and targets spread over the whole vocabulary (every shard).
    let targets: Vec<i32> = (0..n).map(|i| if i % 3 == 1 { -100 } else { rng.below(v) as i32 }).collect();
    Case { n, c, v, h, w, targets }
}

/// (loss, dh) through the fused head on `ctx` with W stored as `dtype`.
fn fused(ctx: &Rc<GpuContext>, k: &Case, dtype: DType) -> (f32, Vec<f32>) {
    let w = RowShards::upload(ctx, &k.w, k.v, k.c, dtype).unwrap();
    let mut tape = Tape::new(true);
    let h = tape.input(ctx.upload_f32(&k.h, &[k.n, k.c]).unwrap());
    let loss = head::loss(&mut tape, ctx, &h, &w, &k.targets).unwrap();
    let l = read(ctx, loss.value())[0];
    let seed = ctx.upload_f32(&[1.0], &[1]).unwrap();
    let (_, mut g) = tape.backward_from(ctx, &loss, seed, &[&h]).unwrap();
    (l, read(ctx, &g.pop().unwrap().unwrap()))
}

/// (loss, dh) through `linear` + `cross_entropy` on the tape (logits (N, V) held).
fn unfused(ctx: &Rc<GpuContext>, k: &Case) -> (f32, Vec<f32>) {
    let mut tape = Tape::new(true);
    let h = tape.input(ctx.upload_f32(&k.h, &[k.n, k.c]).unwrap());
    let w = tape.constant(ctx.upload_f32(&k.w, &[k.v, k.c]).unwrap());
    let logits = matmul::linear(&mut tape, ctx, &h, &w).unwrap();
    let loss = cross_entropy::cross_entropy(&mut tape, ctx, &logits, &k.targets).unwrap();
    let l = read(ctx, loss.value())[0];
    let seed = ctx.upload_f32(&[1.0], &[1]).unwrap();
    let (_, mut g) = tape.backward_from(ctx, &loss, seed, &[&h]).unwrap();
    (l, read(ctx, &g.pop().unwrap().unwrap()))
}

/// The f64 reference: (loss, dh).
fn reference(k: &Case) -> (f64, Vec<f64>) {
    let h: Vec<f64> = k.h.iter().map(|&x| x as f64).collect();
    let w: Vec<f64> = k.w.iter().map(|&x| x as f64).collect();
    let logits = matmul::cpu::linear(&h, &w, k.n, k.v, k.c);
    let (loss, _, _) = ce_cpu::forward(&logits, k.v, &k.targets);
    let dlogits = ce_cpu::backward(1.0, &logits, k.v, &k.targets);
    let (dh, _) = matmul::cpu::linear_backward(&dlogits, &h, &w, k.n, k.v, k.c);
    (loss, dh)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn one_chunk_equals_linear_then_cross_entropy_bit_for_bit() {
    let ctx = gpu();
    for (n, c, v) in [(37, 64, 1000), (8, 576, 4099), (5, 12, 7)] {
        let k = case(1, n, c, v);
        let (l0, d0) = unfused(&ctx, &k);
        let (l1, d1) = fused(&ctx, &k, DType::F32);
        assert_eq!(l1.to_bits(), l0.to_bits(), "{n}x{c}x{v}: loss {l1} vs {l0}");
        assert_eq!(bits(&d1), bits(&d0), "{n}x{c}x{v}: dh");
        // The reference: f32 rounding of K-term sums (bounds about 10x what this achieves).
        let (lr, dr) = reference(&k);
        assert!(((l1 as f64 - lr) / lr).abs() < 1e-6, "{n}x{c}x{v}: loss {l1} vs reference {lr}");
        assert_close(&format!("{n}x{c}x{v} dh vs reference"), &d1, &dr, 1e-6, 1e-4);
    }
}

#[test]
fn sixteen_bit_storage_equals_f32_storage_bit_for_bit() {
    let ctx = gpu();
    let k = case(2, 21, 64, 1001);
    let (l0, d0) = fused(&ctx, &k, DType::F32);
    for dt in [DType::BF16, DType::F16] {
        // bf16-rounded values of this size are exact in f16 too (|w| < 2, 8 significant bits).
        let (l1, d1) = fused(&ctx, &k, dt);
        assert_eq!(l1.to_bits(), l0.to_bits(), "{dt:?}: loss");
        assert_eq!(bits(&d1), bits(&d0), "{dt:?}: dh");
    }
}

#[test]
fn sharded_and_chunked_matches_reference() {
    let ctx = gpu();
    let k = case(3, 40, 64, 2000);
    let (l_one, d_one) = fused(&ctx, &k, DType::F32);
    let (lr, dr) = reference(&k);
    // 2000 x 64 f32 = 500 KiB: 64 KiB bindings give 8 shards of 256 rows; logits chunks of 40 rows
    // fit 64 KiB at 409 columns, so each shard is 1 chunk in two rounds... several chunks per W.
    let lowered = Lowered::new(&ctx, 64 << 10);
    let w = RowShards::upload(&ctx, &k.w, k.v, k.c, DType::F32).unwrap();
    assert!(w.parts().len() >= 5, "{} shards", w.parts().len());
    let plan = head::plan(&ctx, &w, 27);
    assert!(plan.len() >= w.parts().len(), "{} chunks", plan.len());
    for ch in &plan {
        assert!((27 * ch.local.len() * 4) as u64 <= ctx.max_binding(), "{ch:?}");
    }
    for dt in [DType::F32, DType::BF16] {
        let (l, d) = fused(&ctx, &k, dt);
        let one: Vec<f64> = d_one.iter().map(|&x| x as f64).collect();
        eprintln!("{dt:?}: loss rel vs reference {:.1e}, vs one chunk {:.1e}; dh rel vs one chunk {:.1e}", ((l as f64 - lr) / lr).abs(), ((l - l_one) / l_one).abs(), rel_err(&d, &one));
        // Measured: loss 3.3e-8 relative from the reference and equal to the one-chunk run's;
        // dh 7.2e-7 relative (norm) from the one-chunk run (its N-sum in 12 partial sums).
        assert!(((l as f64 - lr) / lr).abs() < 3e-7, "{dt:?}: loss {l} vs reference {lr}");
        assert!(((l - l_one) / l_one).abs() < 2e-7, "{dt:?}: loss {l} vs one chunk {l_one}");
        assert!(rel_err(&d, &one) < 7e-6, "{dt:?}: dh vs one chunk {:.2e}", rel_err(&d, &one));
        assert_close(&format!("{dt:?} sharded dh vs reference"), &d, &dr, 1e-6, 1e-4);
        assert_close(&format!("{dt:?} sharded dh vs one chunk"), &d, &one, 1e-6, 1e-5);
    }
    // Logits across shards: the same per-row products as one buffer (8 rows: the (rows, V)
    // output must fit one binding).
    let h = ctx.upload_f32(&k.h[..8 * k.c], &[8, k.c]).unwrap();
    let sharded = read(&ctx, &head::logits(&ctx, &h, &w).unwrap());
    drop(lowered);
    let single: Tensor = matmul::x_wt(&ctx, &h, &ctx.upload_f32(&k.w, &[k.v, k.c]).unwrap()).unwrap();
    assert_eq!(bits(&sharded), bits(&read(&ctx, &single)), "logits across shards");
}

#[test]
fn nothing_counted_gives_zero_loss_and_zero_gradient() {
    let ctx = gpu();
    let mut k = case(4, 6, 16, 300);
    k.targets = vec![-100; 6];
    let (l, d) = fused(&ctx, &k, DType::F32);
    assert_eq!(l, 0.0);
    assert!(d.iter().all(|&x| x == 0.0));
    k.targets[2] = 300;
    let w = RowShards::upload(&ctx, &k.w, k.v, k.c, DType::F32).unwrap();
    let mut tape = Tape::new(false);
    let h = tape.input(ctx.upload_f32(&k.h, &[k.n, k.c]).unwrap());
    let e = head::loss(&mut tape, &ctx, &h, &w, &k.targets).err().expect("target 300 of 300");
    assert!(e.to_string().contains("target 300 at row 2"), "{e}");
}

#[test]
fn embedding_gather_across_shards_and_16bit_storage_is_exact() {
    let ctx = gpu();
    let (v, c) = (3000, 40);
    let mut rng = Rng::new(5);
    let table: Vec<f32> = rng.vec(v * c, 1.0).iter().map(|&x| bf16(x)).collect();
    let ids: Vec<u32> = (0..77).map(|i| if i % 5 == 0 { (v - 1 - i) as u32 } else { rng.below(v) as u32 }).collect();
    let want = bits(&read(&ctx, &qlora_webgpu::ops::embedding::forward(&ctx, &ctx.upload_f32(&table, &[v, c]).unwrap(), &ids).unwrap()));
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let _l = Lowered::new(&ctx, 40 << 10); // 256 f32 rows (or 512 16-bit rows) a shard
        let shards = RowShards::upload(&ctx, &table, v, c, dt).unwrap();
        assert!(shards.parts().len() >= 6, "{dt:?}: {} shards", shards.parts().len());
        let got = read(&ctx, &qlora_webgpu::ops::embedding::forward_shards(&ctx, &shards, &ids).unwrap());
        assert_eq!(bits(&got), want, "{dt:?}");
        // Rows of a shard as f32 (the output layer's chunks).
        let r = shards.range(1);
        let rows = read(&ctx, &qlora_webgpu::ops::embedding::rows_f32(&ctx, &shards.parts()[1], 3..9).unwrap());
        assert_eq!(bits(&rows), bits(&table[(r.start + 3) * c..(r.start + 9) * c]), "{dt:?} rows");
    }
    // The same rows gathered from a table kept in host memory (an untied input embedding): bf16
    // storage for these bf16 values (half the bytes), f32 otherwise, the same bits.
    let host = qlora_webgpu::gpu::HostRows::new(&table, v, c).unwrap();
    assert_eq!(host.byte_len(), 2 * v * c);
    assert_eq!(bits(&read(&ctx, &qlora_webgpu::ops::embedding::forward_host(&ctx, &host, &ids).unwrap())), want, "host table");
    let wide: Vec<f32> = table.iter().enumerate().map(|(i, &x)| x + (i % 3) as f32 * 1e-6).collect();
    let host = qlora_webgpu::gpu::HostRows::new(&wide, v, c).unwrap();
    assert_eq!(host.byte_len(), 4 * v * c);
    let want_wide = bits(&read(&ctx, &qlora_webgpu::ops::embedding::forward(&ctx, &ctx.upload_f32(&wide, &[v, c]).unwrap(), &ids).unwrap()));
    assert_eq!(bits(&read(&ctx, &qlora_webgpu::ops::embedding::forward_host(&ctx, &host, &ids).unwrap())), want_wide, "host table, f32");
    let e = qlora_webgpu::ops::embedding::forward_host(&ctx, &host, &[v as u32]).err().expect("id V is out of range");
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    // A Q8_0-form table (what a GGUF's Q8_0 embedding dequantizes to: f16 scale x int8 code per
    // block of 32) is stored as Q8 (9 bits a value) and gathers the same bits, sharded or not.
    let (cq, vq) = (64, 1000);
    let mut q8 = Vec::with_capacity(vq * cq);
    for _ in 0..vq * cq / 32 {
        let d = bf16(rng.vec(1, 0.01)[0].abs() + 1e-4); // an exact f16 for these magnitudes
        let mut codes: Vec<i32> = (0..32).map(|_| rng.below(255) as i32 - 127).collect();
        codes[rng.below(32)] = if rng.below(2) == 0 { 127 } else { -127 };
        q8.extend(codes.iter().map(|&q| q as f32 * d));
    }
    assert_eq!(qlora_webgpu::gpu::lossless_compact(&q8, cq), DType::Q8);
    let ids8: Vec<u32> = (0..50).map(|i| if i % 7 == 0 { (vq - 1) as u32 } else { rng.below(vq) as u32 }).collect();
    let want8 = bits(&read(&ctx, &qlora_webgpu::ops::embedding::forward(&ctx, &ctx.upload_f32(&q8, &[vq, cq]).unwrap(), &ids8).unwrap()));
    for limit in [u64::MAX, 20 << 10] {
        let _l = Lowered::new(&ctx, limit);
        let t = RowShards::upload_auto(&ctx, &q8, vq, cq, true).unwrap();
        assert_eq!(t.dtype(), DType::Q8);
        assert_eq!(t.byte_len(), vq * cq * 9 / 8);
        let got = read(&ctx, &qlora_webgpu::ops::embedding::forward_shards(&ctx, &t, &ids8).unwrap());
        assert_eq!(bits(&got), want8, "Q8 gather, binding {limit}: {} shards", t.parts().len());
        let last = t.parts().len() - 1;
        let r = t.range(last);
        let rows = read(&ctx, &qlora_webgpu::ops::embedding::rows_f32(&ctx, &t.parts()[last], 1..41).unwrap());
        assert_eq!(bits(&rows), bits(&q8[(r.start + 1) * cq..(r.start + 41) * cq]), "Q8 rows of the last shard");
    }
    // One value off the Q8 grid keeps the table in f32 (here: not 16-bit exact either).
    let mut off = q8.clone();
    off[5] += 1e-7;
    assert_eq!(qlora_webgpu::gpu::lossless_compact(&off, cq), DType::F32);
    // f16 widening of subnormals, the largest half, signed zeros and infinities, exactly.
    let special: Vec<f32> = vec![5.960464477539063e-8, -3.0517578125e-5, 6.103515625e-5, 65504.0, -0.0, 0.0, f32::INFINITY, -1.5];
    let t = RowShards::upload(&ctx, &special, 4, 2, DType::F16).unwrap();
    let got = read(&ctx, &qlora_webgpu::ops::embedding::forward_shards(&ctx, &t, &[3, 0, 1, 2]).unwrap());
    let want: Vec<f32> = [3, 0, 1, 2].iter().flat_map(|&r| special[2 * r..2 * r + 2].to_vec()).collect();
    assert_eq!(bits(&got), bits(&want), "f16 special values");
    // A value that is not exact in the asked storage is refused, not rounded.
    let e = RowShards::upload(&ctx, &[0.1, 0.2], 1, 2, DType::BF16).err().expect("0.1 is not a bf16");
    assert!(e.to_string().contains("not exact"), "{e}");
    // A single row larger than the binding cannot be sharded.
    let _l = Lowered::new(&ctx, 1024);
    let e = RowShards::upload(&ctx, &vec![0.0; 64 * 512], 64, 512, DType::F32).err().expect("a 2 KiB row");
    assert!(e.to_string().contains("exceed"), "{e}");
}

#[test]
fn nf4_linear_whose_f32_copy_exceeds_the_binding_runs_in_row_chunks() {
    use qlora_webgpu::ops::nf4::{self as nf4op, Nf4Weight};
    use qlora_webgpu::quant::nf4::quantize_nf4;
    let ctx = gpu();
    let (m, n, k) = (33, 520, 96);
    let mut rng = Rng::new(6);
    let w: Vec<f32> = rng.vec(n * k, 0.1).iter().map(|&x| x as f32).collect();
    let x = ctx.upload_f32(&rng.vec(m * k, 1.0).iter().map(|&v| v as f32).collect::<Vec<_>>(), &[m, k]).unwrap();
    let dy = ctx.upload_f32(&rng.vec(m * n, 1.0).iter().map(|&v| v as f32).collect::<Vec<_>>(), &[m, n]).unwrap();
    for dq in [false, true] {
        let q = Nf4Weight::upload(&ctx, &quantize_nf4(&w, &[n, k], 64, dq).unwrap()).unwrap();
        let y1 = read(&ctx, &nf4op::linear_forward_scratch(&ctx, &x, &q).unwrap());
        let dx1 = read(&ctx, &nf4op::linear_backward_input_scratch(&ctx, &dy, &q).unwrap());
        let full = read(&ctx, &nf4op::dequantize(&ctx, &q).unwrap());
        let _l = Lowered::new(&ctx, 96 << 10); // W in f32 is 195 KiB: chunks of 256, 256 and 8 rows
        let rows = read(&ctx, &nf4op::dequantize_rows(&ctx, &q, 128..256).unwrap());
        assert_eq!(bits(&rows), bits(&full[128 * k..256 * k]), "dq {dq}: dequantized rows");
        let y2 = read(&ctx, &nf4op::linear_forward_scratch(&ctx, &x, &q).unwrap());
        let dx2 = read(&ctx, &nf4op::linear_backward_input_scratch(&ctx, &dy, &q).unwrap());
        // Forward: the same per-element products, bit for bit. Input gradient: the N-sum runs
        // in 3 partial sums.
        assert_eq!(bits(&y2), bits(&y1), "dq {dq}: forward");
        let want: Vec<f64> = dx1.iter().map(|&v| v as f64).collect();
        assert_close(&format!("dq {dq}: input gradient in chunks"), &dx2, &want, 1e-5, 1e-5);
    }
}

#[test]
fn column_blocks() {
    use qlora_webgpu::ops::elementwise::{put_cols, take_cols};
    let ctx = gpu();
    let (r, ld) = (7, 23);
    let wide_v: Vec<f32> = (0..r * ld).map(|i| i as f32).collect();
    let wide = ctx.upload_f32(&wide_v, &[r, ld]).unwrap();
    let block = read(&ctx, &take_cols(&ctx, &wide, 5, 9).unwrap());
    let want: Vec<f32> = (0..r).flat_map(|i| (5..14).map(move |j| (i * ld + j) as f32)).collect();
    assert_eq!(block, want);
    let z = ctx.zeros(&[r, ld], DType::F32).unwrap();
    put_cols(&ctx, &ctx.upload_f32(&want, &[r, 9]).unwrap(), &z, 5).unwrap();
    let back = read(&ctx, &z);
    for i in 0..r {
        for j in 0..ld {
            let e = if (5..14).contains(&j) { (i * ld + j) as f32 } else { 0.0 };
            assert_eq!(back[i * ld + j], e, "({i}, {j})");
        }
    }
    assert!(take_cols(&ctx, &wide, 20, 9).is_err(), "a block past the end");
}
