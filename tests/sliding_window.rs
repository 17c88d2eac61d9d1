//! Mistral's (and Qwen2's) `sliding_window`: the decoder does not apply sliding-window
//! attention; it attends over the full causal context, which is what the windowed model computes
//! for sequences of at most `sliding_window` tokens. So such a model loads and runs those
//! sequences unchanged (the same logits as without a window), and every longer sequence is
//! refused with an error naming `sliding_window`, the window and the length: in the training
//! forward, in the KV-cached generation forward, and through the session's generate and train
//! step. A `sliding_window` that is null (or no longer than what a sequence can reach) changes
//! nothing.
//!
//! The model is the tiny reference Llama (tests/fixtures/tiny-llama/model) with its config.json
//! rewritten as a MistralForCausalLM with a window of 8 tokens (Mistral's decoder is Llama's).

mod common;
use common::*;
use qlora_webgpu::autograd::Tape;
use qlora_webgpu::data::dataset::{Dataset, Format};
use qlora_webgpu::generate::SamplingConfig;
use qlora_webgpu::io::hf::load_hf;
use qlora_webgpu::model::config::ModelConfig;
use qlora_webgpu::model::llama::{self, ForwardOpts, KvCache, LoraSet};
use qlora_webgpu::ops::rope::{self, RopeTables};
use qlora_webgpu::session::{BaseQuant, ModelSource, TrainConfig, TrainSession};
use qlora_webgpu::Error;
use std::collections::HashMap;
use std::rc::Rc;

const WINDOW: usize = 8;

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/model").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The tiny model's config.json as a Mistral with `sliding_window` = `window` (JSON value).
fn mistral_config(window: serde_json::Value) -> Vec<u8> {
    let mut c: serde_json::Value = serde_json::from_slice(&fixture("config.json")).unwrap();
    c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    c["model_type"] = "mistral".into();
    c["sliding_window"] = window;
    serde_json::to_vec(&c).unwrap()
}

/// The model folder's files with the Mistral config.
fn files(window: serde_json::Value) -> HashMap<String, Vec<u8>> {
    let mut f = HashMap::new();
    for name in ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        f.insert(name.to_string(), fixture(name));
    }
    f.insert("config.json".to_string(), mistral_config(window));
    f
}

fn assert_window_error(e: Error, len: usize) {
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("sequence of {len} tokens")) && msg.contains(&format!("sliding_window of {WINDOW} tokens")),
        "{msg}"
    );
}

#[test]
fn config_carries_the_window_to_the_decoder() {
    let c = ModelConfig::from_json("config.json", &mistral_config(WINDOW.into())).unwrap();
    assert_eq!(c.sliding_window, Some(WINDOW));
    assert_eq!(c.to_llama().sliding_window, Some(WINDOW));
    let c = ModelConfig::from_json("config.json", &mistral_config(serde_json::Value::Null)).unwrap();
    assert_eq!(c.to_llama().sliding_window, None);
    let llama = ModelConfig::from_json("config.json", &fixture("config.json")).unwrap();
    assert_eq!(llama.to_llama().sliding_window, None);
    // The check itself: up to the window is fine, one more token is not; no window, no limit.
    let cfg = c.to_llama();
    let windowed = qlora_webgpu::model::llama::LlamaConfig { sliding_window: Some(WINDOW), ..cfg.clone() };
    assert!(windowed.check_sequence(WINDOW).is_ok());
    assert_window_error(windowed.check_sequence(WINDOW + 1).unwrap_err(), WINDOW + 1);
    assert!(cfg.check_sequence(1 << 20).is_ok());
}

#[test]
fn decoder_runs_up_to_the_window_and_refuses_longer_sequences() {
    let ctx = gpu();
    let host = load_hf(&files(WINDOW.into())).unwrap();
    let cfg = host.config.to_llama();
    assert_eq!(cfg.sliding_window, Some(WINDOW));
    let full = qlora_webgpu::model::llama::LlamaConfig { sliding_window: None, ..cfg.clone() };
    let w = host.upload(&ctx).unwrap();
    let lora = LoraSet::default();
    let inv = rope::inv_freq(cfg.rope_theta, cfg.head_dim, None);
    let pos: Vec<u32> = (0..16).collect();
    let tables = Rc::new(RopeTables::new(&ctx, &inv, &pos).unwrap());
    let ids: Vec<u32> = (0..2 * (WINDOW + 1) as u32).map(|i| 100 + 37 * i).collect();
    let fwd = |c: &qlora_webgpu::model::llama::LlamaConfig, ids: &[u32], batch: usize| {
        let mut tape = Tape::new(false);
        llama::forward(&mut tape, &ctx, c, &w, &lora, ids, batch, &tables, ForwardOpts::default()).map(|v| read(&ctx, v.value()))
    };
    // Two sequences of exactly the window: the same logits as the model without a window.
    let two = [&ids[..WINDOW], &ids[WINDOW + 1..2 * WINDOW + 1]].concat();
    assert_eq!(fwd(&cfg, &two, 2).unwrap(), fwd(&full, &two, 2).unwrap());
    // One token more, in one sequence or in a batch of two: refused.
    assert_window_error(fwd(&cfg, &ids[..WINDOW + 1], 1).unwrap_err(), WINDOW + 1);
    assert_window_error(fwd(&cfg, &ids, 2).unwrap_err(), WINDOW + 1);
    assert!(fwd(&full, &ids, 2).is_ok(), "without a window the same batch runs");

    // KV-cached generation: positions 0..WINDOW fill (in two pieces), position WINDOW is refused
    // and leaves the cache as it was; a prompt longer than the window is refused at once.
    let mut cache = KvCache::new(&ctx, &cfg, 16).unwrap();
    llama::forward_cached(&ctx, &cfg, &w, &lora, &ids[..5], &mut cache, &tables).unwrap();
    llama::forward_cached(&ctx, &cfg, &w, &lora, &ids[5..WINDOW], &mut cache, &tables).unwrap();
    assert_eq!(cache.len(), WINDOW);
    assert_window_error(llama::forward_cached(&ctx, &cfg, &w, &lora, &ids[WINDOW..WINDOW + 1], &mut cache, &tables).unwrap_err(), WINDOW + 1);
    assert_eq!(cache.len(), WINDOW);
    let mut cache = KvCache::new(&ctx, &cfg, 16).unwrap();
    assert_window_error(llama::forward_cached(&ctx, &cfg, &w, &lora, &ids[..WINDOW + 3], &mut cache, &tables).unwrap_err(), WINDOW + 3);
}

#[test]
fn generation_and_training_refuse_sequences_longer_than_the_window() {
    let ctx = gpu();
    let model = ModelSource::from_hf("mistral-tiny", &files(WINDOW.into())).unwrap().upload(&ctx, BaseQuant::F32, 64).unwrap();
    let lora = LoraSet::default();
    let greedy = |n: usize| SamplingConfig { temperature: 0.0, max_new_tokens: n, eos_ids: vec![u32::MAX], ..Default::default() };
    let prompt: Vec<u32> = (0..5u32).map(|i| 100 + 37 * i).collect();
    // Prompt + new tokens within the window: runs to max_new_tokens.
    let out = qlora_webgpu::gpu::block_on(model.generate(&ctx, &lora, &prompt, &greedy(WINDOW - 5), |_| {})).unwrap();
    assert_eq!(out.ids.len(), WINDOW - 5);
    // Beyond it: the step that would feed position WINDOW is refused.
    let e = qlora_webgpu::gpu::block_on(model.generate(&ctx, &lora, &prompt, &greedy(WINDOW), |_| {})).unwrap_err();
    assert_window_error(e, WINDOW + 1);

    // Training: a text example longer than the window fails the first step with the same error;
    // a short one trains.
    let cfg = TrainConfig { steps: 1, batch_size: 1, max_len: 32, shuffle: false, ..Default::default() };
    let long = Dataset::from_jsonl("long.jsonl", br#"{"text": "one two three four five six seven eight nine ten eleven twelve"}"#, Format::Auto).unwrap();
    let mut s = TrainSession::new(&ctx, &model, &long, cfg.clone(), None).unwrap();
    let e = qlora_webgpu::gpu::block_on(s.step()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("sliding_window of 8 tokens"), "{msg}");
    let short = Dataset::from_jsonl("short.jsonl", br#"{"text": "one two"}"#, Format::Auto).unwrap();
    let mut s = TrainSession::new(&ctx, &model, &short, cfg, None).unwrap();
    qlora_webgpu::gpu::block_on(s.step()).unwrap();
}
