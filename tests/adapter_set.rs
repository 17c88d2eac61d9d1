//! Several adapters on one loaded base (`lora::AdapterSet`): answering with base -> adapter A ->
//! adapter B -> base on one model gives, bit for bit, what a fresh load of the base with only
//! that adapter gives (last-position logits, 8 greedy tokens, the loss of PEFT's two texts), and
//! the device memory in use grows by the adapters' A and B only (the buffer pool's accounting).
//! A is PEFT's trained dev adapter (adapter_final), B its initial one (adapter_init).

use qlora_webgpu::data::dataset::{Dataset, EncodeOptions, Format};
use qlora_webgpu::generate::SamplingConfig;
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::hf::MmapDir;
use qlora_webgpu::lora::peft::read_host_adapter;
use qlora_webgpu::lora::{AdapterSet, HostAdapter};
use qlora_webgpu::model::llama::{forward_cached, KvCache, LoraSet};
use qlora_webgpu::session::{BaseQuant, EvalSet, LoadedModel, ModelSource, Prompt};
use std::path::PathBuf;
use std::rc::Rc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(ctx: &Rc<GpuContext>) -> LoadedModel {
    let dir = MmapDir::open(&fixtures().join("tiny-llama/model")).unwrap();
    ModelSource::from_hf("tiny-llama", &dir).unwrap().upload(ctx, BaseQuant::F32, 64).unwrap()
}

fn adapter(model: &LoadedModel, name: &str) -> HostAdapter {
    read_host_adapter(&fixtures().join("tiny-llama/dev").join(name), &model.model.cfg).unwrap()
}

/// What one request returns: the logits (bits) after the prompt, 8 greedy ids, the loss (bits)
/// of PEFT's two texts as PEFT encodes them.
#[derive(Debug, PartialEq)]
struct Answer {
    logits: Vec<u32>,
    ids: Vec<u32>,
    loss: u64,
}

fn answer(ctx: &Rc<GpuContext>, model: &LoadedModel, lora: &LoraSet) -> Answer {
    let ids = model.prompt_ids(&Prompt::Raw("The quick brown fox".into())).unwrap();
    let m = &model.model;
    let mut cache = KvCache::new(ctx, &m.cfg, ids.len()).unwrap();
    let logits = forward_cached(ctx, &m.cfg, &m.weights, lora, &ids, &mut cache, &m.rope).unwrap();
    let logits = block_on(ctx.read_f32(&logits)).unwrap().iter().map(|x| x.to_bits()).collect();
    let cfg = SamplingConfig { max_new_tokens: 8, eos_ids: vec![u32::MAX], ..SamplingConfig::default() };
    let g = block_on(model.generate(ctx, lora, &ids, &cfg, |_| {})).unwrap();
    let texts: String = ["The quick brown fox jumps over the lazy dog.", "Fine-tuning small language models on a laptop GPU is fun."]
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({ "text": t })))
        .collect();
    let data = Dataset::from_jsonl("dev.jsonl", texts.as_bytes(), Format::Text).unwrap();
    let set = EvalSet::new(model, &data, EncodeOptions { max_len: 24, train_on_prompt: false, append_eos: false }, 2).unwrap();
    let loss = block_on(set.loss(ctx, model, lora)).unwrap();
    Answer { logits, ids: g.ids, loss: loss.to_bits() }
}

/// The answer of a fresh context and a fresh load of the base with only `name` (None: no adapter).
fn alone(name: Option<&str>) -> Answer {
    let ctx = block_on(GpuContext::new()).expect("a GPU adapter (Mesa's lavapipe: apt-get install mesa-vulkan-drivers)");
    let model = load(&ctx);
    let set = match name {
        Some(n) => adapter(&model, n).upload(&ctx).unwrap(),
        None => LoraSet::default(),
    };
    answer(&ctx, &model, &set)
}

#[test]
fn switching_adapters_on_one_base_equals_loading_each_alone() {
    let ctx = block_on(GpuContext::new()).expect("a GPU adapter (Mesa's lavapipe: apt-get install mesa-vulkan-drivers)");
    let model = load(&ctx);
    let base_in_use = ctx.pool_stats().in_use;
    let (a, b) = (adapter(&model, "adapter_final"), adapter(&model, "adapter_init"));
    let mut set = AdapterSet::new();
    set.add(&ctx, &model.model.cfg, "A", &a).unwrap();
    let a_bytes = set.device_bytes() as u64;
    set.add(&ctx, &model.model.cfg, "B", &b).unwrap();
    let ab_bytes = set.device_bytes() as u64;
    // 28 tensors of 8x64, 64x8, 32x8, 160x8, 8x160 f32 each: 2 x 71,680 bytes; every one of
    // these sizes is its own pool size class, so the pool holds exactly these bytes.
    assert_eq!(a_bytes, 17920 * 4);
    assert_eq!(ab_bytes, 2 * 17920 * 4);
    assert_eq!(ctx.pool_stats().in_use, base_in_use + ab_bytes, "two adapters add their A and B only");
    assert!(set.add(&ctx, &model.model.cfg, "A", &a).is_err(), "names are unique");
    assert!(set.use_adapter(Some("C")).unwrap_err().to_string().contains("A, B"), "an unknown name lists the loaded ones");

    let mut got = Vec::new();
    for name in [None, Some("A"), Some("B"), None] {
        set.use_adapter(name).unwrap();
        assert_eq!(set.active_name(), name);
        got.push((name, answer(&ctx, &model, set.active())));
        // A request leaves nothing behind: in use is the base and the two adapters again.
        assert_eq!(ctx.pool_stats().in_use, base_in_use + ab_bytes, "after answering with {name:?}");
    }
    // The per-request choice (without `use`) gives the same as the active one.
    assert_eq!(answer(&ctx, &model, set.get(Some("A")).unwrap()), got[1].1);
    assert_ne!(got[0].1, got[1].1, "the adapter changes the answer");
    assert_ne!(got[1].1, got[2].1, "A and B differ");
    assert_eq!(got[0].1, got[3].1, "back to the base");
    for (name, ans) in &got[..3] {
        let want = alone(name.map(|n| if n == "A" { "adapter_final" } else { "adapter_init" }));
        assert_eq!(ans, &want, "{name:?} on the shared base vs loaded alone");
    }
    eprintln!(
        "base in use {} bytes; with A and B {} bytes (+{} = the adapters' A and B); answers bit-equal to loading each alone",
        base_in_use,
        base_in_use + ab_bytes,
        ab_bytes
    );
    assert!(set.remove("A") && set.active_name().is_none() && set.names() == ["B"]);
}
