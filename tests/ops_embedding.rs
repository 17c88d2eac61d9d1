//! Embedding: the f64 reference passes a finite-difference check; the GPU lookup and the
//! scatter-add backward agree with it on odd shapes with repeated ids; rows of absent ids are zero;
//! out-of-range ids are an error; a frozen table records nothing on the tape.
//! Tolerances: the forward is a copy (exact); the backward sums at most N f32 rows in a fixed
//! order: 1e-6 abs + 1e-5 rel.

mod common;
use common::*;
use qlora_webgpu::autograd::{Param, ParamId, Tape};
use qlora_webgpu::gpu::DType;
use qlora_webgpu::ops::embedding;

#[test]
fn reference_backward_passes_finite_differences() {
    let mut rng = Rng::new(21);
    let (v, c) = (5, 3);
    let ids = [4u32, 1, 4, 0, 4, 2];
    let table = rng.vec(v * c, 1.0);
    let dout = rng.vec(ids.len() * c, 1.0);
    let d = embedding::cpu::backward(&dout, c, &ids, v);
    gradcheck("embedding dtable", &|t| embedding::cpu::forward(t, c, &ids), &table, &dout, &d);
}

#[test]
fn ids_are_grouped_by_id_in_position_order() {
    let g = embedding::group_ids(&[5, 2, 5, 0, 2, 5]);
    assert_eq!(g.uniq, [0, 2, 5]);
    assert_eq!(g.offsets, [0, 1, 3, 6]);
    assert_eq!(g.pos, [3, 1, 4, 0, 2, 5]);
    let e = embedding::group_ids(&[]);
    assert!(e.uniq.is_empty() && e.pos.is_empty());
    assert_eq!(e.offsets, [0]);
}

#[test]
fn gpu_matches_reference_on_odd_shapes() {
    let ctx = gpu();
    let mut rng = Rng::new(22);
    for n in [1, 3, 65] {
        for (v, c) in [(1, 63), (63, 1), (65, 65), (1001, 63), (63, 1001)] {
            let table = rng.vec(v * c, 1.0);
            let dout = rng.vec(n * c, 1.0);
            // Draw ids from a few values so that ids repeat, and some from the whole table.
            let few = v.min(4);
            let ids: Vec<u32> = (0..n)
                .map(|k| if k % 2 == 0 { rng.below(few) as u32 } else { rng.below(v) as u32 })
                .collect();
            let tt = up(&ctx, &table, &[v, c]);
            let out = embedding::forward(&ctx, &tt, &ids).unwrap();
            assert_eq!(out.shape(), &[n, c]);
            assert_close(&format!("embedding out n{n} v{v} c{c}"), &read(&ctx, &out), &embedding::cpu::forward(&table, c, &ids), 0.0, 0.0);
            let want = embedding::cpu::backward(&dout, c, &ids, v);
            let dt = embedding::backward(&ctx, &up(&ctx, &dout, &[n, c]), &ids, v).unwrap();
            assert_eq!(dt.shape(), &[v, c]);
            let got = read(&ctx, &dt);
            assert_close(&format!("embedding dtable n{n} v{v} c{c}"), &got, &want, 1e-6, 1e-5);
            for id in 0..v {
                if !ids.contains(&(id as u32)) {
                    assert!(got[id * c..(id + 1) * c].iter().all(|&x| x == 0.0), "row {id} absent but nonzero");
                }
            }
        }
    }
}

#[test]
fn backward_is_deterministic_with_many_repeats() {
    let ctx = gpu();
    let mut rng = Rng::new(23);
    let (n, v, c) = (300, 7, 65);
    let ids: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let dout = rng.vec(n * c, 1.0);
    let dt = up(&ctx, &dout, &[n, c]);
    let a = read(&ctx, &embedding::backward(&ctx, &dt, &ids, v).unwrap());
    let b = read(&ctx, &embedding::backward(&ctx, &dt, &ids, v).unwrap());
    assert_eq!(a, b);
    // The kernel adds in position order, as this f32 loop does: bit-equal.
    let mut want = vec![0f32; v * c];
    for (k, &id) in ids.iter().enumerate() {
        for j in 0..c {
            want[id as usize * c + j] += dout[k * c + j] as f32;
        }
    }
    assert_eq!(a, want);
}

#[test]
fn out_of_range_ids_are_an_error() {
    let ctx = gpu();
    let table = ctx.zeros(&[10, 4], DType::F32).unwrap();
    let err = embedding::forward(&ctx, &table, &[1, 10, 2]).unwrap_err().to_string();
    assert!(err.contains("id 10") && err.contains("position 1"), "{err}");
    let dout = ctx.zeros(&[2, 4], DType::F32).unwrap();
    assert!(embedding::backward(&ctx, &dout, &[3, 11], 10).is_err());
    assert!(embedding::backward(&ctx, &dout, &[3, 1, 2], 10).is_err(), "dout rows must match the ids");
    let flat = ctx.zeros(&[40], DType::F32).unwrap();
    assert!(embedding::forward(&ctx, &flat, &[1]).is_err(), "table must be (V, C)");
}

#[test]
fn tape_records_only_for_a_trainable_table() {
    let ctx = gpu();
    let mut rng = Rng::new(24);
    let (v, c) = (9, 5);
    let ids = [3u32, 3, 0, 8, 3];
    let table = rng.vec(v * c, 1.0);
    let dout = rng.vec(ids.len() * c, 1.0);
    let tt = up(&ctx, &table, &[v, c]);
    let gt = up(&ctx, &dout, &[ids.len(), c]);

    let mut tape = Tape::new(true);
    let frozen = tape.constant(tt.clone());
    let out = embedding::embedding(&mut tape, &ctx, &frozen, &ids).unwrap();
    assert!(!out.requires_grad());

    let mut tape = Tape::new(true);
    let p = Param { id: ParamId(7), value: tt };
    let w = tape.param(&p);
    let out = embedding::embedding(&mut tape, &ctx, &w, &ids).unwrap();
    assert_close("embedding tape out", &read(&ctx, out.value()), &embedding::cpu::forward(&table, c, &ids), 0.0, 0.0);
    let (grads, _) = tape.backward_from(&ctx, &out, gt.clone(), &[]).unwrap();
    let direct = embedding::backward(&ctx, &gt, &ids, v).unwrap();
    assert_eq!(read(&ctx, &grads[&ParamId(7)]), read(&ctx, &direct));
}
