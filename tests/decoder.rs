//! A tiny two-block Llama decoder built from the ops (src/model/llama.rs): the loss equals an
//! independent f64 CPU implementation written here, the tape's gradients for every LoRA A and B
//! element pass a central finite-difference check of that f64 loss, and gradient checkpointing
//! gives the same gradients (also with LoRA dropout, whose masks are recomputed from the seed).
//! Models with projection biases (Qwen2 on q, k, v; Llama with attention_bias and mlp_bias),
//! written here as Hugging Face folders and loaded through the library's loader, pass the same
//! checks (logits, LoRA gradients, KV cache, NF4 upload) against the same f64 decoder.

mod common;
use common::*;
use qlora_webgpu::autograd::{Param, ParamId, Tape};
use qlora_webgpu::gpu::{GpuContext, RowShards, Tensor};
use qlora_webgpu::model::llama::{self, ForwardOpts, LayerWeights, LlamaConfig, LlamaWeights, LoraModule, LoraSet};
use qlora_webgpu::ops::cross_entropy;
use qlora_webgpu::ops::lora::{Frozen, LoraRun};
use qlora_webgpu::ops::rope::{self, RopeTables};
use qlora_webgpu::io::safetensors_write::{serialize_tensors, RawTensor};
use qlora_webgpu::train::trainer::Model;
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
        sliding_window: None,
    }
}

/// Host copy of the model: embed, per layer (attn_norm, 7 projections, mlp_norm), final norm,
/// per layer the bias of each projection that has one, and the lm_head when not tied.
#[derive(Clone)]
struct HostModel {
    embed: Vec<f64>,
    layers: Vec<(Vec<f64>, Vec<Vec<f64>>, Vec<f64>)>,
    final_norm: Vec<f64>,
    bias: Vec<Vec<Option<Vec<f64>>>>,
    lm_head: Option<Vec<f64>>,
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
        bias: vec![vec![None; 7]; c.layers],
        lm_head: None,
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

/// y (rows, n) = x (rows, k) · W^T (+ bias) (+ s · x·A^T·B^T).
fn lin(x: &[f64], w: &[f64], bias: Option<&[f64]>, k: usize, ab: Option<(&[f64], &[f64], usize, f64)>) -> Vec<f64> {
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
            let mut v: f64 = (0..k).map(|c| xr[c] * w[j * k + c]).sum::<f64>() + bias.map_or(0.0, |b| b[j]);
            if let Some((_, b, r, s)) = ab {
                v += s * (0..r).map(|t| h[t] * b[j * r + t]).sum::<f64>();
            }
            y[i * n + j] = v;
        }
    }
    y
}

/// LoRA factors (A, B) of one projection, flattened.
type AB = (Vec<f64>, Vec<f64>);

/// The f64 logits (B*T, V) of the decoder: lora[l][m] = (A, B) flattened (None: no adapters).
fn cpu_logits(c: &LlamaConfig, m: &HostModel, lora: Option<&[Vec<AB>]>, r: usize, s: f64, ids: &[u32], batch: usize) -> Vec<f64> {
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
            let (a, b) = &lora?[l][mi];
            Some((a.as_slice(), b.as_slice(), r, s))
        };
        let bias = |mi: usize| m.bias[l][mi].as_deref();
        let h = rms(&x, n1, c.rms_eps as f64);
        let mut q = lin(&h, &p[0], bias(0), ch, ab(0));
        let mut k = lin(&h, &p[1], bias(1), ch, ab(1));
        let v = lin(&h, &p[2], bias(2), ch, ab(2));
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
        let o = lin(&att, &p[3], bias(3), nh * hs, ab(3));
        let x1: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
        let h2 = rms(&x1, n2, c.rms_eps as f64);
        let g = lin(&h2, &p[4], bias(4), ch, ab(4));
        let u = lin(&h2, &p[5], bias(5), ch, ab(5));
        let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let d = lin(&a, &p[6], bias(6), c.intermediate, ab(6));
        x = x1.iter().zip(&d).map(|(a, b)| a + b).collect();
    }
    let h = rms(&x, &m.final_norm, c.rms_eps as f64);
    lin(&h, m.lm_head.as_ref().unwrap_or(&m.embed), None, ch, None)
}

/// The f64 loss of the decoder: lora[l][m] = (A, B) flattened; mean CE over targets != -100.
fn cpu_loss(c: &LlamaConfig, m: &HostModel, lora: &[Vec<(Vec<f64>, Vec<f64>)>], r: usize, s: f64, ids: &[u32], targets: &[i32], batch: usize) -> f64 {
    let logits = cpu_logits(c, m, Some(lora), r, s, ids, batch);
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

/// Random LoRA factors (A (r, in), B (out, r)) for every projection of every layer.
fn host_lora(c: &LlamaConfig, r: usize, rng: &mut Rng) -> Vec<Vec<(Vec<f64>, Vec<f64>)>> {
    (0..c.layers)
        .map(|_| {
            (0..7)
                .map(|m| {
                    let (o, i) = c.proj_shape(m);
                    (rng.vec(r * i, 0.3), rng.vec(o * r, 0.3))
                })
                .collect()
        })
        .collect()
}

/// The adapters on the device; parameter ids A = 2 + 2 (7 l + m), B = A + 1.
fn lora_set(ctx: &GpuContext, c: &LlamaConfig, host_lora: &[Vec<(Vec<f64>, Vec<f64>)>], r: usize, s: f64, dropout: f32) -> LoraSet {
    let mut next = 0u64;
    LoraSet {
        layers: host_lora
            .iter()
            .map(|l| {
                std::array::from_fn(|m| {
                    let (o, i) = c.proj_shape(m);
                    next += 2;
                    Some(LoraModule {
                        a: Param { id: ParamId(next), value: up(ctx, &l[m].0, &[r, i]) },
                        b: Param { id: ParamId(next + 1), value: up(ctx, &l[m].1, &[o, r]) },
                        run: LoraRun { scale: s as f32, dropout, seed: 5 },
                        magnitude: None,
                        dora_norm: None,
                    })
                })
            })
            .collect(),
    }
}

/// Two sequences of 5 random ids, next-token targets within each sequence; the last position of
/// each and one more ignored.
fn batch_of(c: &LlamaConfig, rng: &mut Rng) -> (Vec<u32>, Vec<i32>, usize, usize) {
    let (batch, t) = (2, 5);
    let ids: Vec<u32> = (0..batch * t).map(|_| rng.below(c.vocab) as u32).collect();
    let mut targets: Vec<i32> = (0..batch * t).map(|i| if i % t == t - 1 { -100 } else { ids[i + 1] as i32 }).collect();
    targets[2] = -100;
    (ids, targets, batch, t)
}

fn setup(dropout: f32) -> Setup {
    let ctx = gpu();
    let c = cfg();
    let mut rng = Rng::new(99);
    let host = host_model(&c, &mut rng);
    let (r, s) = (2usize, 1.5f64);
    let host_lora = host_lora(&c, r, &mut rng);
    let up2 = |v: &[f64], shape: &[usize]| -> Tensor { up(&ctx, v, shape) };
    let w = LlamaWeights {
        embed: qlora_webgpu::model::llama::InputEmbedding::Device(RowShards::from_tensor(up2(&host.embed, &[c.vocab, c.hidden]))),
        layers: host
            .layers
            .iter()
            .map(|(n1, p, n2)| LayerWeights {
                attn_norm: up2(n1, &[c.hidden]),
                proj: std::array::from_fn(|m| {
                    let (o, i) = c.proj_shape(m);
                    Frozen::F32(up2(&p[m], &[o, i]))
                }),
                bias: Default::default(),
                mlp_norm: up2(n2, &[c.hidden]),
            })
            .collect(),
        final_norm: up2(&host.final_norm, &[c.hidden]),
        lm_head: None,
    };
    let lora = lora_set(&ctx, &c, &host_lora, r, s, dropout);
    let (ids, targets, batch, t) = batch_of(&c, &mut rng);
    let inv = rope::inv_freq(c.rope_theta, c.head_dim, None);
    let pos: Vec<u32> = (0..t as u32).collect();
    let tables = Rc::new(RopeTables::new(&ctx, &inv, &pos).unwrap());
    Setup { ctx, c, host, host_lora, w, lora, tables, ids, targets, batch, r, s }
}

/// GPU loss and gradients keyed by ParamId.
fn gpu_grads(su: &Setup, checkpoint: bool) -> (f32, HashMap<ParamId, Vec<f32>>) {
    let ctx = &su.ctx;
    let mut tape = Tape::new(true);
    let opts = ForwardOpts { grad_checkpoint: checkpoint, seed: 3 };
    let logits = llama::forward(&mut tape, ctx, &su.c, &su.w, &su.lora, &su.ids, su.batch, &su.tables, opts).unwrap();
    let loss = cross_entropy::cross_entropy(&mut tape, ctx, &logits, &su.targets).unwrap();
    let lv = read(ctx, loss.value())[0];
    let grads = tape.backward(ctx, &loss).unwrap();
    (lv, grads.iter().map(|(k, v)| (*k, read(ctx, v))).collect())
}

fn max_abs(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(&g, w)| (g as f64 - w).abs()).fold(0.0, f64::max)
}

/// The GPU loss equals the f64 loss and every LoRA A and B gradient element equals the central
/// finite difference of the f64 loss; returns (|loss error|, max abs gradient error, max relative
/// L2 error of one tensor).
fn check_loss_and_lora_grads(label: &str, su: &Setup) -> (f64, f64, f64) {
    let (loss, grads) = gpu_grads(su, false);
    let want = cpu_loss(&su.c, &su.host, &su.host_lora, su.r, su.s, &su.ids, &su.targets, su.batch);
    let loss_err = (loss as f64 - want).abs();
    assert!(loss_err <= 1e-5 * want.abs().max(1.0), "{label} loss: GPU {loss}, f64 {want}");

    let mut lora = su.host_lora.clone();
    let h = 1e-5;
    let (mut worst_abs, mut worst_rel) = (0.0f64, 0.0f64);
    for l in 0..su.c.layers {
        for m in 0..7 {
            for which in 0..2 {
                // ids as lora_set() hands them out: A = 2 + 2 (7 l + m), B = A + 1
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
                let what = format!("{label} layer {l} {} lora_{}", llama::TARGETS[m], if which == 0 { "A" } else { "B" });
                let err = rel_err(got, &fd);
                assert!(err < 1e-3, "{what}: relative error {err:.2e} of the tape's gradient vs finite differences");
                assert_close(&what, got, &fd, 1e-4, 1e-2);
                worst_abs = worst_abs.max(max_abs(got, &fd));
                worst_rel = worst_rel.max(err);
            }
        }
    }
    eprintln!("{label}: |loss GPU - f64| {loss_err:.2e}; LoRA gradients vs finite differences: max abs {worst_abs:.2e}, max relative L2 {worst_rel:.2e}");
    (loss_err, worst_abs, worst_rel)
}

#[test]
fn loss_matches_f64_and_lora_gradients_pass_finite_differences() {
    check_loss_and_lora_grads("plain llama", &setup(0.0));
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

/// Feeds the first sequence through `forward_cached` (a prompt of 2 tokens, then one token at a
/// time; each call gives the logits of its last position) and returns (cached logits,
/// full-forward logits), both (T - 1, V): positions 1 .. T.
fn cached_and_full(su: &Setup) -> (Vec<f32>, Vec<f32>) {
    let ctx = &su.ctx;
    let t = su.ids.len() / su.batch;
    let seq = &su.ids[..t];
    let mut tape = Tape::new(false);
    let full = llama::forward(&mut tape, ctx, &su.c, &su.w, &su.lora, seq, 1, &su.tables, ForwardOpts::default()).unwrap();
    let full = read(ctx, full.value())[su.c.vocab..].to_vec();
    let mut cache = llama::KvCache::new(ctx, &su.c, t).unwrap();
    let mut got = read(ctx, &llama::forward_cached(ctx, &su.c, &su.w, &su.lora, &seq[..2], &mut cache, &su.tables).unwrap());
    for i in 2..t {
        got.extend(read(ctx, &llama::forward_cached(ctx, &su.c, &su.w, &su.lora, &seq[i..i + 1], &mut cache, &su.tables).unwrap()));
    }
    assert_eq!(cache.len(), t);
    let err = llama::forward_cached(ctx, &su.c, &su.w, &su.lora, &seq[..1], &mut cache, &su.tables).err().unwrap();
    assert!(err.to_string().contains("do not fit the cache"), "{err}");
    (got, full)
}

#[test]
fn kv_cache_inference_equals_the_full_forward() {
    let su = setup(0.1);
    let (got, full) = cached_and_full(&su);
    let want: Vec<f64> = full.iter().map(|&v| v as f64).collect();
    assert_close("cached logits vs full forward", &got, &want, 1e-5, 1e-5);
}

// ------------------------------------------------------------ models with projection biases

/// The two biased families: Qwen2 (q, k, v biases; untied lm_head; rope_theta 1e6) and Llama with
/// attention_bias and mlp_bias (all seven; tied).
#[derive(Clone, Copy, Debug)]
enum Biased {
    Qwen2,
    LlamaAllBiases,
}

impl Biased {
    fn has_bias(self, m: usize) -> bool {
        match self {
            Biased::Qwen2 => m < 3,
            Biased::LlamaAllBiases => true,
        }
    }
    /// The decoder config the test expects the loader to produce (written independently).
    fn cfg(self) -> LlamaConfig {
        match self {
            Biased::Qwen2 => LlamaConfig { rope_theta: 1e6, tied: false, ..cfg() },
            Biased::LlamaAllBiases => cfg(),
        }
    }
    fn config_json(self) -> String {
        let common = r#""hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 40, "rms_norm_eps": 1e-5, "hidden_act": "silu""#;
        match self {
            Biased::Qwen2 => format!(
                r#"{{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", {common}, "rope_theta": 1000000.0,
                    "tie_word_embeddings": false}}"#
            ),
            Biased::LlamaAllBiases => format!(
                r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", {common}, "rope_theta": 10000.0,
                    "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": true}}"#
            ),
        }
    }
}

const PROJ_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A random biased model and its Hugging Face folder (config.json + model.safetensors, f32).
fn biased_folder(kind: Biased, rng: &mut Rng) -> (HostModel, HashMap<String, Vec<u8>>) {
    let c = kind.cfg();
    let mut host = host_model(&c, rng);
    for l in 0..c.layers {
        for m in 0..7 {
            if kind.has_bias(m) {
                host.bias[l][m] = Some(rng.vec(c.proj_shape(m).0, 0.5));
            }
        }
    }
    if !c.tied {
        host.lm_head = Some(rng.vec(c.vocab * c.hidden, 0.5));
    }
    let raw = |name: String, shape: Vec<usize>, v: &[f64]| RawTensor {
        name,
        dtype: safetensors::Dtype::F32,
        shape,
        data: v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
    };
    let mut tensors = vec![raw("model.embed_tokens.weight".into(), vec![c.vocab, c.hidden], &host.embed)];
    for (l, (n1, p, n2)) in host.layers.iter().enumerate() {
        tensors.push(raw(format!("model.layers.{l}.input_layernorm.weight"), vec![c.hidden], n1));
        tensors.push(raw(format!("model.layers.{l}.post_attention_layernorm.weight"), vec![c.hidden], n2));
        for m in 0..7 {
            let (o, i) = c.proj_shape(m);
            tensors.push(raw(format!("model.layers.{l}.{}.weight", PROJ_NAMES[m]), vec![o, i], &p[m]));
            if let Some(b) = &host.bias[l][m] {
                tensors.push(raw(format!("model.layers.{l}.{}.bias", PROJ_NAMES[m]), vec![o], b));
            }
        }
    }
    tensors.push(raw("model.norm.weight".into(), vec![c.hidden], &host.final_norm));
    if let Some(h) = &host.lm_head {
        tensors.push(raw("lm_head.weight".into(), vec![c.vocab, c.hidden], h));
    }
    let mut files = HashMap::new();
    files.insert("config.json".to_owned(), kind.config_json().into_bytes());
    files.insert("model.safetensors".to_owned(), serialize_tensors(&tensors, None).unwrap());
    (host, files)
}

/// A biased model loaded from its folder through the library (load_hf, upload or upload_nf4,
/// trainer::Model::new with the config's rope scaling), with adapters on every projection.
fn biased_setup(kind: Biased, dropout: f32, nf4: bool) -> Setup {
    let ctx = gpu();
    let mut rng = Rng::new(1234 + kind as u64);
    let (mut host, files) = biased_folder(kind, &mut rng);
    let loaded = qlora_webgpu::io::load_hf(&files).unwrap();
    assert_eq!(loaded.config.to_llama(), kind.cfg(), "{kind:?}: config read from config.json");
    assert!(loaded.unused.is_empty(), "{kind:?}: {:?}", loaded.unused);
    assert_eq!(loaded.layers.len(), 2);
    for (l, layer) in loaded.layers.iter().enumerate() {
        for (m, b) in layer.proj_bias.iter().enumerate() {
            assert_eq!(b.is_some(), kind.has_bias(m), "{kind:?} layer {l} {}", PROJ_NAMES[m]);
        }
    }
    let w = if nf4 {
        // The f64 reference takes the weights the GPU holds: NF4-dequantized projections.
        for (l, layer) in host.layers.iter_mut().enumerate() {
            for (m, p) in layer.1.iter_mut().enumerate() {
                let (o, i) = kind.cfg().proj_shape(m);
                let q = qlora_webgpu::quant::nf4::quantize_nf4(&p.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[o, i], 64, false).unwrap();
                *p = q.dequantize().iter().map(|&v| v as f64).collect();
                assert!(p.iter().any(|&v| v != 0.0), "layer {l} {}", PROJ_NAMES[m]);
            }
        }
        loaded.upload_nf4(&ctx, 64, false).unwrap()
    } else {
        loaded.upload(&ctx).unwrap()
    };
    // An untied input embedding (Qwen2 here) stays in host memory; a tied one is the output layer.
    assert_eq!(w.embed.device().is_none(), !kind.cfg().tied, "where the input embedding lives");
    for lw in &w.layers {
        for m in 0..7 {
            assert_eq!(matches!(lw.proj[m], Frozen::Nf4(_)), nf4);
            if let Some(b) = &lw.bias[m] {
                assert_eq!(b.dtype(), qlora_webgpu::gpu::DType::F32, "biases stay f32");
            }
        }
    }
    let (r, s) = (2usize, 1.5f64);
    let host_lora = host_lora(&kind.cfg(), r, &mut rng);
    let (ids, targets, batch, t) = batch_of(&kind.cfg(), &mut rng);
    let model = Model::new(&ctx, loaded.config.to_llama(), w, loaded.config.effective_rope_scaling().as_ref(), t).unwrap();
    let lora = lora_set(&ctx, &model.cfg, &host_lora, r, s, dropout);
    Setup { c: model.cfg.clone(), w: model.weights.clone(), tables: model.rope.clone(), ctx, host, host_lora, lora, ids, targets, batch, r, s }
}

/// Logits of the whole batch without recording, with the setup's adapters or none.
fn gpu_logits(su: &Setup, with_lora: bool) -> Vec<f32> {
    let mut tape = Tape::new(false);
    let lora = if with_lora { su.lora.clone() } else { LoraSet::default() };
    let logits = llama::forward(&mut tape, &su.ctx, &su.c, &su.w, &lora, &su.ids, su.batch, &su.tables, ForwardOpts::default()).unwrap();
    read(&su.ctx, logits.value())
}

#[test]
fn biased_models_from_hf_folders_match_f64_logits_and_lora_gradients() {
    for kind in [Biased::Qwen2, Biased::LlamaAllBiases] {
        let su = biased_setup(kind, 0.0, false);
        for with_lora in [false, true] {
            let got = gpu_logits(&su, with_lora);
            let lora = with_lora.then_some(&su.host_lora[..]);
            let want = cpu_logits(&su.c, &su.host, lora, su.r, su.s, &su.ids, su.batch);
            let d = max_abs(&got, &want);
            eprintln!("{kind:?} {} LoRA: logits max |GPU - f64| = {d:.2e}", if with_lora { "with" } else { "without" });
            assert!(d <= 1e-4, "{kind:?}: logits differ from the f64 decoder by {d:.2e}");
            // The biases matter: the same model without them is far away.
            let mut unbiased = su.host.clone();
            unbiased.bias = vec![vec![None; 7]; su.c.layers];
            let off = max_abs(&got, &cpu_logits(&su.c, &unbiased, lora, su.r, su.s, &su.ids, su.batch));
            assert!(off > 0.05, "{kind:?}: the biases change the logits by only {off:.2e}");
        }
        check_loss_and_lora_grads(&format!("{kind:?}"), &su);
        // Checkpointing recomputes the biased layers to the same gradients.
        let (g0, g1) = (gpu_grads(&su, false), gpu_grads(&su, true));
        assert_eq!(g0.0, g1.0);
        for (k, v) in &g0.1 {
            assert_eq!(v, &g1.1[k], "{kind:?}: gradient of {k:?} differs with checkpointing");
        }
    }
}

#[test]
fn biased_models_kv_cache_equals_the_full_forward() {
    for kind in [Biased::Qwen2, Biased::LlamaAllBiases] {
        let su = biased_setup(kind, 0.1, false);
        let (got, full) = cached_and_full(&su);
        let v = su.c.vocab;
        // Rows for positions 1 .. T (generation gives each call's last position only).
        let t = full.len() / v;
        let d = max_abs(&got, &full.iter().map(|&x| x as f64).collect::<Vec<_>>());
        let last = max_abs(&got[(t - 1) * v..], &full[(t - 1) * v..].iter().map(|&x| x as f64).collect::<Vec<_>>());
        // and the last position against the f64 decoder (adapters without dropout at inference)
        let want = cpu_logits(&su.c, &su.host, Some(&su.host_lora), su.r, su.s, &su.ids[..t + 1], 1);
        let d64 = max_abs(&got[(t - 1) * v..], &want[t * v..]);
        eprintln!("{kind:?}: cached vs full logits max abs {d:.2e} (last position {last:.2e}); last position vs f64 {d64:.2e}");
        assert!(d <= 1e-5, "{kind:?}: cached logits differ from the full forward by {d:.2e}");
        assert!(d64 <= 1e-4, "{kind:?}: cached last-position logits differ from f64 by {d64:.2e}");
    }
}

#[test]
fn biased_model_under_nf4_keeps_f32_biases_and_matches_f64() {
    for kind in [Biased::Qwen2, Biased::LlamaAllBiases] {
        let su = biased_setup(kind, 0.0, true);
        let got = gpu_logits(&su, true);
        let want = cpu_logits(&su.c, &su.host, Some(&su.host_lora), su.r, su.s, &su.ids, su.batch);
        let d = max_abs(&got, &want);
        eprintln!("{kind:?} NF4 with LoRA: logits max |GPU - f64 (dequantized weights)| = {d:.2e}");
        assert!(d <= 1e-4, "{kind:?} NF4: logits differ from the f64 decoder by {d:.2e}");
    }
}
