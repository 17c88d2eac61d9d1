//! A tiny two-block Llama decoder built from the ops (src/model/llama.rs): the loss equals an
//! independent f64 CPU implementation written here, the tape's gradients for every LoRA A and B
//! element pass a central finite-difference check of that f64 loss, and gradient checkpointing
//! gives the same gradients (also with LoRA dropout, whose masks are recomputed from the seed).

mod common;
use common::*;
use qlora_webgpu::autograd::{Param, ParamId, Tape};
use qlora_webgpu::gpu::{GpuContext, Tensor};
use qlora_webgpu::model::llama::{self, ForwardOpts, LayerWeights, LlamaConfig, LlamaWeights, LoraModule, LoraSet};
use qlora_webgpu::ops::cross_entropy;
use qlora_webgpu::ops::lora::{Frozen, LoraRun};
use qlora_webgpu::ops::rope::{self, RopeTables};
use std::collections::HashMap;
use std::rc::Rc;

fn cfg() -> LlamaConfig {
    LlamaConfig {
        hidden: 16,
        intermediate: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        vocab: 40,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        tied: true,
    }
}

/// Host copy of the model: embed, per layer (attn_norm, 7 projections, mlp_norm), final norm.
struct HostModel {
    embed: Vec<f64>,
    layers: Vec<(Vec<f64>, Vec<Vec<f64>>, Vec<f64>)>,
    final_norm: Vec<f64>,
}

fn host_model(c: &LlamaConfig, rng: &mut Rng) -> HostModel {
    let norm = |rng: &mut Rng| (0..c.hidden).map(|_| (1.0 + 0.1 * rng.normal()) as f32 as f64).collect::<Vec<_>>();
    HostModel {
        embed: rng.vec(c.vocab * c.hidden, 0.5),
        layers: (0..c.layers)
            .map(|_| {
                let n1 = norm(rng);
                let p = (0..7).map(|m| {
                    let (o, i) = c.proj_shape(m);
                    rng.vec(o * i, 0.3)
                });
                let p: Vec<Vec<f64>> = p.collect();
                (n1, p, norm(rng))
            })
            .collect(),
        final_norm: norm(rng),
    }
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let c = w.len();
    let mut out = vec![0.0; x.len()];
    for (r, row) in x.chunks(c).enumerate() {
        let s = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps).sqrt();
        for j in 0..c {
            out[r * c + j] = w[j] * row[j] * s;
        }
    }
    out
}

/// y (rows, n) = x (rows, k) · W^T (+ s · x·A^T·B^T).
fn lin(x: &[f64], w: &[f64], k: usize, ab: Option<(&[f64], &[f64], usize, f64)>) -> Vec<f64> {
    let rows = x.len() / k;
    let n = w.len() / k;
    let mut y = vec![0.0; rows * n];
    for i in 0..rows {
        let xr = &x[i * k..(i + 1) * k];
        let h: Vec<f64> = match ab {
            Some((a, _, r, _)) => (0..r).map(|t| (0..k).map(|c| xr[c] * a[t * k + c]).sum()).collect(),
            None => vec![],
        };
        for j in 0..n {
            let mut v: f64 = (0..k).map(|c| xr[c] * w[j * k + c]).sum();
            if let Some((_, b, r, s)) = ab {
                v += s * (0..r).map(|t| h[t] * b[j * r + t]).sum::<f64>();
            }
            y[i * n + j] = v;
        }
    }
    y
}

/// The f64 loss of the decoder: lora[l][m] = (A, B) flattened; mean CE over targets != -100.
fn cpu_loss(c: &LlamaConfig, m: &HostModel, lora: &[Vec<(Vec<f64>, Vec<f64>)>], r: usize, s: f64, ids: &[u32], targets: &[i32], batch: usize) -> f64 {
    let (ch, hs, nh, nkv) = (c.hidden, c.head_dim, c.heads, c.kv_heads);
    let t_len = ids.len() / batch;
    let mut x: Vec<f64> = ids.iter().flat_map(|&i| m.embed[i as usize * ch..(i as usize + 1) * ch].to_vec()).collect();
    let half = hs / 2;
    let inv: Vec<f64> = (0..half).map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f64 / hs as f64)).collect();
    let rope = |v: &mut [f64], heads: usize| {
        for b in 0..batch {
            for t in 0..t_len {
                for h in 0..heads {
                    let o = ((b * t_len + t) * heads + h) * hs;
                    for i in 0..half {
                        let ang = t as f64 * inv[i];
                        let (x1, x2) = (v[o + i], v[o + i + half]);
                        v[o + i] = x1 * ang.cos() - x2 * ang.sin();
                        v[o + i + half] = x2 * ang.cos() + x1 * ang.sin();
                    }
                }
            }
        }
    };
    for (l, (n1, p, n2)) in m.layers.iter().enumerate() {
        let ab = |mi: usize| -> Option<(&[f64], &[f64], usize, f64)> {
            let (a, b) = &lora[l][mi];
            Some((a.as_slice(), b.as_slice(), r, s))
        };
        let h = rms(&x, n1, c.rms_eps as f64);
        let mut q = lin(&h, &p[0], ch, ab(0));
        let mut k = lin(&h, &p[1], ch, ab(1));
        let v = lin(&h, &p[2], ch, ab(2));
        rope(&mut q, nh);
        rope(&mut k, nkv);
        let mut att = vec![0.0; batch * t_len * nh * hs];
        for b in 0..batch {
            for hh in 0..nh {
                let kh = hh / (nh / nkv);
                for t in 0..t_len {
                    let qo = ((b * t_len + t) * nh + hh) * hs;
                    let sc: Vec<f64> = (0..=t)
                        .map(|u| {
                            let ko = ((b * t_len + u) * nkv + kh) * hs;
                            (0..hs).map(|d| q[qo + d] * k[ko + d]).sum::<f64>() / (hs as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (u, eu) in e.iter().enumerate() {
                        let vo = ((b * t_len + u) * nkv + kh) * hs;
                        for d in 0..hs {
                            att[qo + d] += eu / z * v[vo + d];
                        }
                    }
                }
            }
        }
        let o = lin(&att, &p[3], nh * hs, ab(3));
        let x1: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
        let h2 = rms(&x1, n2, c.rms_eps as f64);
        let g = lin(&h2, &p[4], ch, ab(4));
        let u = lin(&h2, &p[5], ch, ab(5));
        let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let d = lin(&a, &p[6], c.intermediate, ab(6));
        x = x1.iter().zip(&d).map(|(a, b)| a + b).collect();
    }
    let h = rms(&x, &m.final_norm, c.rms_eps as f64);
    let logits = lin(&h, &m.embed, ch, None);
    let (mut sum, mut n) = (0.0, 0);
    for (i, &tg) in targets.iter().enumerate() {
        if tg == -100 {
            continue;
        }
        let row = &logits[i * c.vocab..(i + 1) * c.vocab];
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        sum += lse - row[tg as usize];
        n += 1;
    }
    sum / n as f64
}

struct Setup {
    ctx: Rc<GpuContext>,
    c: LlamaConfig,
    host: HostModel,
    host_lora: Vec<Vec<(Vec<f64>, Vec<f64>)>>,
    w: LlamaWeights,
    lora: LoraSet,
    tables: Rc<RopeTables>,
    ids: Vec<u32>,
    targets: Vec<i32>,
    batch: usize,
    r: usize,
    s: f64,
}

fn setup(dropout: f32) -> Setup {
    let ctx = gpu();
    let c = cfg();
    let mut rng = Rng::new(99);
    let host = host_model(&c, &mut rng);
    let (r, s) = (2usize, 1.5f64);
    let host_lora: Vec<Vec<(Vec<f64>, Vec<f64>)>> = (0..c.layers)
        .map(|_| {
            (0..7)
                .map(|m| {
                    let (o, i) = c.proj_shape(m);
                    (rng.vec(r * i, 0.3), rng.vec(o * r, 0.3))
                })
                .collect()
        })
        .collect();
    let up2 = |v: &[f64], shape: &[usize]| -> Tensor { up(&ctx, v, shape) };
    let w = LlamaWeights {
        embed: up2(&host.embed, &[c.vocab, c.hidden]),
        layers: host
            .layers
            .iter()
            .map(|(n1, p, n2)| LayerWeights {
                attn_norm: up2(n1, &[c.hidden]),
                proj: std::array::from_fn(|m| {
                    let (o, i) = c.proj_shape(m);
                    Frozen::F32(up2(&p[m], &[o, i]))
                }),
                mlp_norm: up2(n2, &[c.hidden]),
            })
            .collect(),
        final_norm: up2(&host.final_norm, &[c.hidden]),
        lm_head: None,
    };
    let mut next = 0u64;
    let lora = LoraSet {
        layers: host_lora
            .iter()
            .map(|l| {
                std::array::from_fn(|m| {
                    let (o, i) = c.proj_shape(m);
                    next += 2;
                    Some(LoraModule {
                        a: Param { id: ParamId(next), value: up2(&l[m].0, &[r, i]) },
                        b: Param { id: ParamId(next + 1), value: up2(&l[m].1, &[o, r]) },
                        run: LoraRun { scale: s as f32, dropout, seed: 5 },
                    })
                })
            })
            .collect(),
    };
    let (batch, t) = (2, 5);
    let ids: Vec<u32> = (0..batch * t).map(|_| rng.below(c.vocab) as u32).collect();
    // next-token targets within each sequence; the last position of each and one more ignored
    let mut targets: Vec<i32> = (0..batch * t).map(|i| if i % t == t - 1 { -100 } else { ids[i + 1] as i32 }).collect();
    targets[2] = -100;
    let inv = rope::inv_freq(c.rope_theta, c.head_dim, None);
    let pos: Vec<u32> = (0..t as u32).collect();
    let tables = Rc::new(RopeTables::new(&ctx, &inv, &pos).unwrap());
    Setup { ctx, c, host, host_lora, w, lora, tables, ids, targets, batch, r, s }
}

/// GPU loss and gradients keyed by ParamId.
fn gpu_grads(su: &Setup, checkpoint: bool) -> (f32, HashMap<ParamId, Vec<f32>>) {
    let ctx = &su.ctx;
    let mut tape = Tape::new(true);
    let opts = ForwardOpts { checkpoint, seed: 3 };
    let logits = llama::forward(&mut tape, ctx, &su.c, &su.w, &su.lora, &su.ids, su.batch, &su.tables, opts).unwrap();
    let loss = cross_entropy::cross_entropy(&mut tape, ctx, &logits, &su.targets).unwrap();
    let lv = read(ctx, loss.value())[0];
    let grads = tape.backward(ctx, &loss).unwrap();
    (lv, grads.iter().map(|(k, v)| (*k, read(ctx, v))).collect())
}

#[test]
fn loss_matches_f64_and_lora_gradients_pass_finite_differences() {
    let su = setup(0.0);
    let (loss, grads) = gpu_grads(&su, false);
    let want = cpu_loss(&su.c, &su.host, &su.host_lora, su.r, su.s, &su.ids, &su.targets, su.batch);
    assert!((loss as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "loss: GPU {loss}, f64 {want}");

    let mut lora = su.host_lora.clone();
    let h = 1e-5;
    for l in 0..su.c.layers {
        for m in 0..7 {
            for which in 0..2 {
                // ids as setup() hands them out: A = 2 + 2 (7 l + m), B = A + 1
                let got = &grads[&ParamId(2 + 2 * (l * 7 + m) as u64 + which as u64)];
                fn param(lora: &mut [Vec<(Vec<f64>, Vec<f64>)>], l: usize, m: usize, which: usize) -> &mut Vec<f64> {
                    let ab = &mut lora[l][m];
                    if which == 0 { &mut ab.0 } else { &mut ab.1 }
                }
                let n = param(&mut lora, l, m, which).len();
                let mut fd = vec![0.0; n];
                for (i, fdi) in fd.iter_mut().enumerate() {
                    let orig = param(&mut lora, l, m, which)[i];
                    param(&mut lora, l, m, which)[i] = orig + h;
                    let lp = cpu_loss(&su.c, &su.host, &lora, su.r, su.s, &su.ids, &su.targets, su.batch);
                    param(&mut lora, l, m, which)[i] = orig - h;
                    let lm = cpu_loss(&su.c, &su.host, &lora, su.r, su.s, &su.ids, &su.targets, su.batch);
                    param(&mut lora, l, m, which)[i] = orig;
                    *fdi = (lp - lm) / (2.0 * h);
                }
                let what = format!("layer {l} {} lora_{}", llama::TARGETS[m], if which == 0 { "A" } else { "B" });
                let err = rel_err(got, &fd);
                assert!(err < 1e-3, "{what}: relative error {err:.2e} of the tape's gradient vs finite differences");
                assert_close(&what, got, &fd, 1e-4, 1e-2);
            }
        }
    }
}

#[test]
fn checkpointing_gives_the_same_gradients() {
    for dropout in [0.0, 0.2] {
        let su = setup(dropout);
        let (l0, g0) = gpu_grads(&su, false);
        let (l1, g1) = gpu_grads(&su, true);
        assert_eq!(l0, l1, "dropout {dropout}: loss with and without checkpointing");
        assert_eq!(g0.len(), 2 * 7 * su.c.layers);
        assert_eq!(g0.len(), g1.len());
        for (k, v0) in &g0 {
            assert_eq!(v0, &g1[k], "dropout {dropout}: gradient of {k:?} differs with checkpointing");
        }
    }
}

#[test]
fn kv_cache_inference_equals_the_full_forward() {
    let su = setup(0.1);
    let ctx = &su.ctx;
    let t = su.ids.len() / su.batch;
    let seq = &su.ids[..t];
    let mut tape = Tape::new(false);
    let full = llama::forward(&mut tape, ctx, &su.c, &su.w, &su.lora, seq, 1, &su.tables, ForwardOpts::default()).unwrap();
    let full = read(ctx, full.value());
    // prompt of 2 tokens, then one token at a time
    let mut cache = llama::KvCache::new(ctx, &su.c, t).unwrap();
    let mut got = read(ctx, &llama::forward_cached(ctx, &su.c, &su.w, &su.lora, &seq[..2], &mut cache, &su.tables).unwrap());
    for i in 2..t {
        got.extend(read(ctx, &llama::forward_cached(ctx, &su.c, &su.w, &su.lora, &seq[i..i + 1], &mut cache, &su.tables).unwrap()));
    }
    assert_eq!(cache.len(), t);
    let want: Vec<f64> = full.iter().map(|&v| v as f64).collect();
    assert_close("cached logits vs full forward", &got, &want, 1e-5, 1e-5);
    let err = llama::forward_cached(ctx, &su.c, &su.w, &su.lora, &seq[..1], &mut cache, &su.tables).err().unwrap();
    assert!(err.to_string().contains("do not fit the cache"), "{err}");
}
