//! A GGUF file loaded onto the GPU as its bytes arrive (`session::GgufUpload`, what the browser's
//! `Model.fromUrl` runs): each tensor is uploaded as soon as its bytes are in. The model is the
//! one the whole-file path (`ModelSource::from_gguf` then `upload`) makes from the same bytes,
//! bit for bit (logits, config, tokenizer, device bytes) for an f32, NF4 and NF4 + double-quant
//! base, tied and untied; and the host heap it needs stays a fraction of the f32 weights (the
//! whole-file path holds them all). Needs a GPU adapter (lavapipe in CI); fails without one.

mod common;
#[path = "common/gguf.rs"]
mod gguf;

use gguf::{Val, Writer, F32};
use qlora_webgpu::gpu::block_on;
use qlora_webgpu::model::llama::{forward_cached, KvCache, LoraSet};
use qlora_webgpu::session::{BaseQuant, GgufUpload, LoadStep, LoadedModel, ModelSource};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

// ------------------------------------------------- heap bytes allocated by this test's thread

/// Counts the bytes each thread has allocated and not freed, and their peak (per thread, so that
/// tests running in parallel do not count each other).
struct Counting;

thread_local! {
    static NOW: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(n: isize) {
    let _ = NOW.try_with(|c| {
        let v = c.get() + n;
        c.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        count(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            count(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most heap bytes this thread held above what it held at the start while `f` ran.
fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = NOW.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    (out, (PEAK.with(Cell::get) - start).max(0) as usize)
}

// ------------------------------------------------------------------------------ the models

fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/model")
}

const HIDDEN: usize = 256;
const INTER: usize = 1024;
const HEADS: usize = 4;
const KV: usize = 2;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 40;
const LAYERS: usize = 3;

/// A projection-heavy model (3 layers of 256 x 1024 MLPs, a 40-token vocabulary) in f32 with an
/// untied output layer: its projections take 11.25 MiB in f32, the largest one 1 MiB.
fn wide_gguf() -> Vec<u8> {
    // Byte-level BPE over lowercase letters and the space (Ġ), with merges to "tok".
    let mut tokens: Vec<String> = ["<s>", "</s>", "<unk>", "t", "o", "k", "to", "tok", "Ġ"].map(String::from).to_vec();
    tokens.extend(('a'..='z').filter(|c| !"tok".contains(*c)).map(String::from));
    tokens.extend((tokens.len()..VOCAB).map(|i| format!("x{i}")));
    assert_eq!(tokens.len(), VOCAB);
    let mut w = Writer::new();
    w.kv("general.architecture", Val::Str("llama".into()))
        .kv("llama.block_count", Val::U32(LAYERS as u32))
        .kv("llama.context_length", Val::U32(512))
        .kv("llama.embedding_length", Val::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", Val::U32(INTER as u32))
        .kv("llama.attention.head_count", Val::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Val::U32(KV as u32))
        .kv("llama.rope.freq_base", Val::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5))
        .kv("tokenizer.ggml.model", Val::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Val::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", Val::Strs(tokens))
        .kv("tokenizer.ggml.token_type", Val::I32s((0..VOCAB).map(|i| if i < 3 { 3 } else { 1 }).collect()))
        .kv("tokenizer.ggml.merges", Val::Strs(vec!["t o".into(), "to k".into()]))
        .kv("tokenizer.ggml.bos_token_id", Val::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Val::U32(2));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut values = |n: usize, scale: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                (scale * (2.0 * u - 1.0)).to_le_bytes()
            })
            .collect()
    };
    w.tensor("token_embd.weight", &[VOCAB, HIDDEN], F32, values(VOCAB * HIDDEN, 1.0));
    let (q, kv) = (HEADS * HEAD_DIM, KV * HEAD_DIM);
    for i in 0..LAYERS {
        w.tensor(&format!("blk.{i}.attn_norm.weight"), &[HIDDEN], F32, values(HIDDEN, 1.0));
        for (name, shape) in [
            ("attn_q", [q, HIDDEN]),
            ("attn_k", [kv, HIDDEN]),
            ("attn_v", [kv, HIDDEN]),
            ("attn_output", [HIDDEN, q]),
            ("ffn_gate", [INTER, HIDDEN]),
            ("ffn_up", [INTER, HIDDEN]),
            ("ffn_down", [HIDDEN, INTER]),
        ] {
            w.tensor(&format!("blk.{i}.{name}.weight"), &shape, F32, values(shape[0] * shape[1], 0.1));
        }
        w.tensor(&format!("blk.{i}.ffn_norm.weight"), &[HIDDEN], F32, values(HIDDEN, 1.0));
    }
    w.tensor("output_norm.weight", &[HIDDEN], F32, values(HIDDEN, 1.0));
    w.tensor("output.weight", &[VOCAB, HIDDEN], F32, values(VOCAB * HIDDEN, 1.0));
    w.bytes()
}

const QUANTS: [BaseQuant; 3] = [BaseQuant::F32, BaseQuant::Nf4 { blocksize: 64, double_quant: false }, BaseQuant::QLORA];

/// `bytes` through a [`GgufUpload`] in chunks of `chunk` bytes; also the progress reports.
fn streamed(name: &str, bytes: &[u8], quant: BaseQuant, chunk: usize) -> (LoadedModel, Vec<(usize, usize)>) {
    let ctx = common::gpu();
    let mut load = GgufUpload::new(&ctx, name);
    let mut setups = 0;
    let mut setup = |_: &qlora_webgpu::model::config::ModelConfig| {
        setups += 1;
        Ok((quant, 64))
    };
    let mut events = Vec::new();
    let mut progress = |d: usize, t: usize| events.push((d, t));
    for c in bytes.chunks(chunk) {
        load.push(c, &mut setup, &mut progress).unwrap_or_else(|(s, e)| panic!("{name}: {s:?}: {e}"));
    }
    let m = load.finish(&mut setup, &mut progress).unwrap_or_else(|(s, e)| panic!("{name}: {s:?}: {e}"));
    assert_eq!(setups, 1, "setup is asked once");
    (m, events)
}

/// Every position's logits of `ids` (no adapter), as bits.
fn logits(m: &LoadedModel, ids: &[u32]) -> Vec<u32> {
    let ctx = common::gpu();
    let mm = &m.model;
    let mut cache = KvCache::new(&ctx, &mm.cfg, ids.len()).unwrap();
    let t = forward_cached(&ctx, &mm.cfg, &mm.weights, &LoraSet::default(), ids, &mut cache, &mm.rope).unwrap();
    block_on(ctx.read_f32(&t)).unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn streamed_upload_gives_the_whole_file_model() {
    let ctx = common::gpu();
    let files = [("tiny-llama.gguf (tied, bf16)", gguf::llama_gguf_from_hf(&tiny_model())), ("wide.gguf (untied, f32)", wide_gguf())];
    for (name, bytes) in &files {
        for quant in QUANTS {
            let whole = ModelSource::from_gguf(name, bytes).unwrap().upload(&ctx, quant, 64).unwrap();
            // Chunks that split tensors, and one chunk holding the whole file.
            for chunk in [4099, bytes.len()] {
                let label = format!("{name}, {}, chunks of {chunk}", quant.name());
                let (got, events) = streamed(name, bytes, quant, chunk);
                assert_eq!(got.config, whole.config, "{label}");
                assert_eq!((got.quant, got.max_positions, &got.name), (whole.quant, whole.max_positions, &whole.name), "{label}");
                assert_eq!(got.model.weights.device_bytes(), whole.model.weights.device_bytes(), "{label}");
                let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % got.config.vocab_size as u32).collect();
                assert_eq!(logits(&got, &ids), logits(&whole, &ids), "{label}: the same logits, bit for bit");
                let text = "to tok the capital of France";
                assert_eq!(got.tokenizer.encode(text, true).unwrap(), whole.tokenizer.encode(text, true).unwrap(), "{label}");
                assert_eq!(got.template.is_some(), whole.template.is_some(), "{label}");
                assert_eq!(got.eos_ids(), whole.eos_ids(), "{label}");
                // One report per tensor, counting up to all of them.
                let total = events[0].1;
                assert_eq!(events, (1..=total).map(|d| (d, total)).collect::<Vec<_>>(), "{label}");
                let layers = got.config.num_hidden_layers;
                assert_eq!(total, layers * 9 + 2 + usize::from(!got.config.tie_word_embeddings), "{label}");
            }
        }
    }
}

#[test]
fn streamed_upload_holds_one_tensor_not_the_model() {
    let ctx = common::gpu();
    let bytes = wide_gguf();
    let proj_f32 = 4 * LAYERS * (2 * HEADS * HEAD_DIM * HIDDEN + 2 * KV * HEAD_DIM * HIDDEN + 3 * INTER * HIDDEN);
    let largest = 4 * INTER * HIDDEN;
    let mib = |b: usize| format!("{:.2} MiB", b as f64 / 1048576.0);
    for quant in QUANTS {
        // Warm: the GPU context's and the shaders' first allocations are not the load's.
        drop(streamed("wide.gguf", &bytes, quant, 65536));
        let (m, whole) = peak_growth(|| ModelSource::from_gguf("wide.gguf", &bytes).unwrap().upload(&ctx, quant, 64).unwrap());
        drop(m);
        let (m, stream) = peak_growth(|| streamed("wide.gguf", &bytes, quant, 65536));
        drop(m);
        eprintln!(
            "# {}: peak heap growth: streamed {}, whole file {} (file {}, f32 projections {}, largest tensor {})",
            quant.name(),
            mib(stream),
            mib(whole),
            mib(bytes.len()),
            mib(proj_f32),
            mib(largest)
        );
        // The whole-file path holds every f32 projection on the host.
        assert!(whole >= proj_f32, "{}: whole-file peak {whole} below the f32 projections {proj_f32}", quant.name());
        // Achieved (lavapipe, this machine): streamed 2.1 MiB for each base (the largest tensor's
        // 1 MiB of received bytes, then its 1 MiB conversion), whole file 12.4-13.1 MiB. Bound:
        // 3 x the largest tensor in f32 (3 MiB, 1.4 x achieved); keeping the f32 projections
        // until the end (11.25 MiB) breaks it.
        assert!(stream <= 3 * largest, "{}: streamed peak {} over 3 x the largest tensor in f32 ({})", quant.name(), mib(stream), mib(3 * largest));
    }
}

#[test]
fn streamed_upload_errors_say_which_step() {
    let ctx = common::gpu();
    let bytes = wide_gguf();
    // The setup's refusal comes before any tensor is uploaded.
    let mut load = GgufUpload::new(&ctx, "wide.gguf");
    let mut uploaded = 0;
    let mut refuse = |_: &qlora_webgpu::model::config::ModelConfig| Err(qlora_webgpu::Error::Invalid("no".into()));
    let err = bytes.chunks(65536).try_for_each(|c| load.push(c, &mut refuse, &mut |_, _| uploaded += 1)).unwrap_err();
    assert_eq!(err.0, LoadStep::Setup);
    assert_eq!(uploaded, 0);
    // A file cut in its data: the whole-file loader's error, as a read error.
    let cut = &bytes[..bytes.len() - 100];
    let mut load = GgufUpload::new(&ctx, "wide.gguf");
    let mut ok = |_: &qlora_webgpu::model::config::ModelConfig| Ok((BaseQuant::F32, 64));
    for c in cut.chunks(65536) {
        load.push(c, &mut ok, &mut |_, _| {}).unwrap();
    }
    let (step, e) = load.finish(&mut ok, &mut |_, _| {}).err().expect("a cut file is an error");
    assert_eq!(step, LoadStep::Read);
    let whole = ModelSource::from_gguf("wide.gguf", cut).err().expect("a cut file is an error");
    assert!(e.to_string().contains("truncated tensor data") && whole.to_string().contains("wide.gguf"), "{e} / {whole}");
}
