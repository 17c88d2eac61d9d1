//! An independent f64 CPU Llama (transformers' LlamaForCausalLM, eval mode) for end-to-end
//! references: loads a Hugging Face folder (bf16 or f32 safetensors, tied or separate lm_head),
//! adds PEFT LoRA adapters (W + scale·B·A in f64), replaces projections (e.g. by an NF4 round
//! trip), and gives last-position logits, greedy continuations and the token-mean cross-entropy.
//! Written here from the model's definition, without the library. Include with
//! `#[path = "common/llama_f64.rs"] mod llama_f64;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

/// The seven projections, in the library's and PEFT's module order.
pub const PROJ: [&str; 7] =
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

pub struct Layer {
    pub attn_norm: Vec<f64>,
    pub mlp_norm: Vec<f64>,
    /// (out, in) row-major, PROJ order.
    pub proj: Vec<Vec<f64>>,
}

pub struct Llama64 {
    pub hidden: usize,
    pub inter: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub eps: f64,
    pub theta: f64,
    pub embed: Vec<f64>,
    pub lm_head: Option<Vec<f64>>,
    pub norm: Vec<f64>,
    pub layers: Vec<Layer>,
}

/// The tensors of a safetensors file as f64 (F32, BF16; U8 as its values), by name, with shapes.
pub fn read_f64_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let d = t.data();
            let v: Vec<f64> = match t.dtype() {
                safetensors::Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                safetensors::Dtype::BF16 => {
                    d.chunks_exact(2).map(|c| f32::from_bits((u32::from(c[1]) << 24) | (u32::from(c[0]) << 16)) as f64).collect()
                }
                safetensors::Dtype::U8 => d.iter().map(|&b| b as f64).collect(),
                other => panic!("{name}: dtype {other:?}"),
            };
            (name, (t.shape().to_vec(), v))
        })
        .collect()
}

impl Llama64 {
    /// A Hugging Face folder: config.json and model.safetensors.
    pub fn from_hf(dir: &Path) -> Self {
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let u = |k: &str| cfg[k].as_u64().unwrap_or_else(|| panic!("config.json: {k}")) as usize;
        let (hidden, heads) = (u("hidden_size"), u("num_attention_heads"));
        let mut t = read_f64_tensors(&dir.join("model.safetensors"));
        let mut take = |n: &str| t.remove(n).unwrap_or_else(|| panic!("{n} missing")).1;
        let layers = (0..u("num_hidden_layers"))
            .map(|l| Layer {
                attn_norm: take(&format!("model.layers.{l}.input_layernorm.weight")),
                mlp_norm: take(&format!("model.layers.{l}.post_attention_layernorm.weight")),
                proj: PROJ.iter().map(|p| take(&format!("model.layers.{l}.{p}.weight"))).collect(),
            })
            .collect();
        let embed = take("model.embed_tokens.weight");
        let norm = take("model.norm.weight");
        let lm_head = if cfg["tie_word_embeddings"] == true { None } else { Some(take("lm_head.weight")) };
        Llama64 {
            hidden,
            inter: u("intermediate_size"),
            heads,
            kv_heads: u("num_key_value_heads"),
            head_dim: cfg["head_dim"].as_u64().map_or(hidden / heads, |d| d as usize),
            vocab: u("vocab_size"),
            eps: cfg["rms_norm_eps"].as_f64().unwrap(),
            theta: cfg["rope_parameters"]["rope_theta"].as_f64().or(cfg["rope_theta"].as_f64()).unwrap(),
            embed,
            lm_head,
            norm,
            layers,
        }
    }

    /// (out, in) of projection `m` (PROJ order).
    pub fn proj_shape(&self, m: usize) -> (usize, usize) {
        let (h, q, k, i) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.inter);
        [(q, h), (k, h), (k, h), (h, q), (i, h), (i, h), (h, i)][m]
    }

    /// Adds a PEFT adapter folder (adapter_config.json: r, lora_alpha, use_rslora;
    /// adapter_model.safetensors: `base_model.model.model.layers.L.P.lora_{A,B}.weight`):
    /// W += scale · B · A, in f64. Returns the scale.
    pub fn add_lora(&mut self, adapter: &Path) -> f64 {
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
        let r = cfg["r"].as_f64().unwrap();
        let alpha = cfg["lora_alpha"].as_f64().unwrap();
        let scale = if cfg["use_rslora"] == true { alpha / r.sqrt() } else { alpha / r };
        let t = read_f64_tensors(&adapter.join("adapter_model.safetensors"));
        let mut used = 0;
        for l in 0..self.layers.len() {
            for (m, p) in PROJ.iter().enumerate() {
                let key = |x: &str| format!("base_model.model.model.layers.{l}.{p}.lora_{x}.weight");
                let (Some(a), Some(b)) = (t.get(&key("A")), t.get(&key("B"))) else { continue };
                used += 2;
                let delta = lora_delta(&a.1, &b.1, self.proj_shape(m), scale);
                for (w, d) in self.layers[l].proj[m].iter_mut().zip(&delta) {
                    *w += d;
                }
            }
        }
        assert_eq!(used, t.len(), "every adapter tensor is a known projection's");
        scale
    }

    fn rms(&self, x: &[f64], w: &[f64]) -> Vec<f64> {
        let c = w.len();
        let mut out = vec![0.0; x.len()];
        for (r, row) in x.chunks(c).enumerate() {
            let s = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / c as f64 + self.eps).sqrt();
            for j in 0..c {
                out[r * c + j] = w[j] * (row[j] * s);
            }
        }
        out
    }

    /// The final-norm hidden states (T, hidden) of one sequence, positions 0..T.
    pub fn hidden_states(&self, ids: &[u32]) -> Vec<f64> {
        let (ch, hs, nh, nkv) = (self.hidden, self.head_dim, self.heads, self.kv_heads);
        let t_len = ids.len();
        let mut x: Vec<f64> = ids.iter().flat_map(|&i| self.embed[i as usize * ch..(i as usize + 1) * ch].to_vec()).collect();
        let half = hs / 2;
        let inv: Vec<f64> = (0..half).map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / hs as f64)).collect();
        let rope = |v: &mut [f64], heads: usize| {
            for t in 0..t_len {
                for h in 0..heads {
                    let o = (t * heads + h) * hs;
                    for i in 0..half {
                        let (s, c) = (t as f64 * inv[i]).sin_cos();
                        let (x1, x2) = (v[o + i], v[o + i + half]);
                        v[o + i] = x1 * c - x2 * s;
                        v[o + i + half] = x2 * c + x1 * s;
                    }
                }
            }
        };
        for l in &self.layers {
            let h = self.rms(&x, &l.attn_norm);
            let mut q = matmul_t(&h, &l.proj[0], ch);
            let mut k = matmul_t(&h, &l.proj[1], ch);
            let v = matmul_t(&h, &l.proj[2], ch);
            rope(&mut q, nh);
            rope(&mut k, nkv);
            let mut att = vec![0.0; t_len * nh * hs];
            let scale = 1.0 / (hs as f64).sqrt();
            for h in 0..nh {
                let g = h / (nh / nkv);
                for i in 0..t_len {
                    let qi = &q[(i * nh + h) * hs..(i * nh + h + 1) * hs];
                    let s: Vec<f64> = (0..=i)
                        .map(|j| qi.iter().zip(&k[(j * nkv + g) * hs..(j * nkv + g + 1) * hs]).map(|(a, b)| a * b).sum::<f64>() * scale)
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, p) in e.iter().enumerate() {
                        for d in 0..hs {
                            att[(i * nh + h) * hs + d] += p / z * v[(j * nkv + g) * hs + d];
                        }
                    }
                }
            }
            let o = matmul_t(&att, &l.proj[3], nh * hs);
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            let h = self.rms(&x, &l.mlp_norm);
            let gate = matmul_t(&h, &l.proj[4], ch);
            let up = matmul_t(&h, &l.proj[5], ch);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let d = matmul_t(&act, &l.proj[6], self.inter);
            for (a, b) in x.iter_mut().zip(&d) {
                *a += b;
            }
        }
        self.rms(&x, &self.norm)
    }

    /// Logits (vocab) of one final hidden state.
    pub fn logits_of(&self, h: &[f64]) -> Vec<f64> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        matmul_t(h, head, self.hidden)
    }

    /// Greedy continuation of `prompt` for up to `n` tokens, stopping after an id in `eos`:
    /// (ids, the smallest gap between the best and second-best logit over the steps).
    pub fn greedy(&self, prompt: &[u32], n: usize, eos: &[u32]) -> (Vec<u32>, f64) {
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        let mut min_gap = f64::INFINITY;
        for _ in 0..n {
            let h = self.hidden_states(&ids);
            let z = self.logits_of(&h[(ids.len() - 1) * self.hidden..]);
            let (mut best, mut second) = ((0usize, f64::NEG_INFINITY), f64::NEG_INFINITY);
            for (i, &v) in z.iter().enumerate() {
                if v > best.1 {
                    second = best.1;
                    best = (i, v);
                } else if v > second {
                    second = v;
                }
            }
            min_gap = min_gap.min(best.1 - second);
            out.push(best.0 as u32);
            ids.push(best.0 as u32);
            if eos.contains(&(best.0 as u32)) {
                break;
            }
        }
        (out, min_gap)
    }

    /// Sum of -log p(label) over positions whose label is not -100, and their count
    /// (labels aligned with ids: position t predicts labels[t]).
    pub fn nll(&self, ids: &[u32], labels: &[i64]) -> (f64, usize) {
        let h = self.hidden_states(ids);
        let (mut sum, mut n) = (0.0, 0);
        for (t, &y) in labels.iter().enumerate() {
            if y < 0 {
                continue;
            }
            let z = self.logits_of(&h[t * self.hidden..(t + 1) * self.hidden]);
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            sum += lse - z[y as usize];
            n += 1;
        }
        (sum, n)
    }
}

/// scale · B (out, r) · A (r, in), (out, in) row-major, in f64.
pub fn lora_delta(a: &[f64], b: &[f64], (out, inn): (usize, usize), scale: f64) -> Vec<f64> {
    let r = a.len() / inn;
    assert_eq!(b.len(), out * r);
    let mut d = vec![0.0; out * inn];
    for o in 0..out {
        for t in 0..r {
            let bv = b[o * r + t] * scale;
            for i in 0..inn {
                d[o * inn + i] += bv * a[t * inn + i];
            }
        }
    }
    d
}

/// x (rows, k) · W^T, W (n, k) row-major.
fn matmul_t(x: &[f64], w: &[f64], k: usize) -> Vec<f64> {
    let rows = x.len() / k;
    let n = w.len() / k;
    let mut y = vec![0.0; rows * n];
    for i in 0..rows {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            y[i * n + j] = xr.iter().zip(&w[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
        }
    }
    y
}
