//! GGUF export (`qlora export`, `qlora merge … --out model.gguf`; src/lora/gguf.rs,
//! src/io/gguf_write.rs), checked with our GGUF reader and PEFT's own merge:
//!
//! - the PEFT dev adapter (tests/fixtures/tiny-llama/dev/adapter_final, r 8, alpha 16, all seven
//!   projections of the 2-layer tiny Llama) written as a llama.cpp LoRA adapter carries the
//!   metadata and ggml shapes convert_lora_to_gguf.py writes (general.type "adapter",
//!   adapter.type "lora", adapter.lora.alpha f32, lora_a ne [in, r], lora_b ne [r, out]) and
//!   maps back to the PEFT tensors exactly once the q/k row permutation of lora_b is undone
//!   (f32: bit for bit; f16: each value within half an f16 ulp; q8_0: lora_a within half a
//!   quantization step of its block, lora_b stored f16 as the converter falls back for r < 32);
//! - the merged model written as a GGUF and read back by our GGUF loader equals PEFT's
//!   `merge_and_unload()` (tiny-llama/dev/merged_ref.safetensors) within the bound of
//!   tests/merge_peft.rs, and its last-position logits on the GPU equal those of the merged
//!   Hugging Face folder (F32: identical; F16 and Q8_0 within the bounds below);
//! - what cannot be exported fails with a message that names why: an adapter for another model,
//!   a target module the model lacks, DoRA.

mod common;

use qlora_webgpu::gpu::block_on;
use qlora_webgpu::io::gguf::{load_gguf, GgmlType, GgufFile, GgufValue};
use qlora_webgpu::io::hf::{load_hf_dir, MmapDir};
use qlora_webgpu::io::HostTensor;
use qlora_webgpu::lora::gguf::{adapter_to_gguf, model_to_gguf, read_gguf_adapter, tokenizer_kv_from_hf, GgufDtype};
use qlora_webgpu::lora::peft::read_host_adapter;
use qlora_webgpu::lora::HostAdapter;
use qlora_webgpu::model::llama::{forward_cached, KvCache, LoraSet};
use qlora_webgpu::session::{BaseQuant, ModelSource};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}
fn tiny_model() -> PathBuf {
    fixtures().join("tiny-llama/model")
}
fn dev_adapter() -> PathBuf {
    fixtures().join("tiny-llama/dev/adapter_final")
}
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-gguf-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
fn qlora(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qlora")).args(args).output().expect("run qlora");
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}
fn ok(args: &[&str]) -> String {
    let (code, out, err) = qlora(args);
    assert_eq!(code, 0, "qlora {args:?} failed:\n{err}");
    out
}

fn tiny_source() -> ModelSource {
    ModelSource::from_hf("tiny", &MmapDir::open(tiny_model()).unwrap()).unwrap()
}

fn dev(src: &ModelSource) -> HostAdapter {
    read_host_adapter(&dev_adapter(), &src.host.config.to_llama()).unwrap()
}

/// The f16 value nearest x, computed independently of the crate (through f64 and the f16 grid).
fn f16_step(x: f32) -> f64 {
    let a = (x as f64).abs();
    if a < 6.103515625e-5 {
        return 2f64.powi(-24); // subnormal spacing
    }
    2f64.powi(a.log2().floor() as i32 - 10)
}

#[test]
fn adapter_gguf_has_llama_cpp_layout_and_maps_back_to_peft() {
    let src = tiny_source();
    let cfg = &src.host.config;
    let h = dev(&src);
    let bytes = adapter_to_gguf(&h, cfg, GgufDtype::F32, Some("adapter_final")).unwrap();
    let g = GgufFile::parse("a.gguf", &bytes).unwrap();
    let s = |k: &str| g.get(k).and_then(GgufValue::as_str).unwrap_or_else(|| panic!("{k}"));
    assert_eq!(s("general.architecture"), "llama");
    assert_eq!(s("general.type"), "adapter");
    assert_eq!(s("adapter.type"), "lora");
    assert_eq!(g.get("adapter.lora.alpha"), Some(&GgufValue::F32(16.0)), "lora_alpha as f32");
    assert_eq!(g.get("general.file_type"), Some(&GgufValue::U32(0)), "ALL_F32");
    // Every targeted projection: lora_a ne [in, r], lora_b ne [r, out] (PyTorch shapes reversed).
    let short = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
    assert_eq!(g.tensors().len(), 2 * 7 * 2);
    for l in 0..2 {
        for (m, sname) in short.iter().enumerate() {
            let (out, inp) = cfg.proj_shape(m);
            let a = g.tensor(&format!("blk.{l}.{sname}.weight.lora_a")).unwrap();
            let b = g.tensor(&format!("blk.{l}.{sname}.weight.lora_b")).unwrap();
            assert_eq!((a.dims.clone(), a.ty), (vec![inp as u64, 8], GgmlType::F32));
            assert_eq!((b.dims.clone(), b.ty), (vec![8, out as u64], GgmlType::F32));
        }
    }
    // Read back with the permutation undone: exactly PEFT's tensors.
    let back = read_gguf_adapter("a.gguf", &bytes, cfg).unwrap();
    assert_eq!(back.len(), 14);
    for (l, m, a, b) in &back {
        let p = h.layers[*l][*m].as_ref().unwrap();
        assert_eq!(a.shape, [p.r, p.in_features]);
        assert_eq!(b.shape, [p.out_features, p.r]);
        assert!(a.data == p.a && b.data == p.b, "layer {l} module {m}: not bit-identical");
    }
    // The stored lora_b of attn_q / attn_k is row-permuted (4 heads / 2 kv heads of 16): stored
    // row h*16 + 2j + s is PEFT row h*16 + 8s + j.
    for (name, m, heads) in [("attn_q", 0usize, 4usize), ("attn_k", 1, 2)] {
        let stored = g.tensor_f32(&format!("blk.1.{name}.weight.lora_b")).unwrap();
        let p = h.layers[1][m].as_ref().unwrap();
        assert_ne!(stored, p.b, "{name}: permuted");
        for hh in 0..heads {
            for j in 0..8 {
                for s in 0..2 {
                    let (dst, srow) = (hh * 16 + 2 * j + s, hh * 16 + 8 * s + j);
                    assert_eq!(stored[dst * 8..dst * 8 + 8], p.b[srow * 8..srow * 8 + 8], "{name} row {dst}");
                }
            }
        }
        assert_eq!(g.tensor_f32(&format!("blk.1.{name}.weight.lora_a")).unwrap(), p.a, "{name}: A is not permuted");
    }

    // F16: every value is the nearest f16 (within half an f16 step, checked in f64).
    let b16 = adapter_to_gguf(&h, cfg, GgufDtype::F16, None).unwrap();
    let g16 = GgufFile::parse("a16.gguf", &b16).unwrap();
    assert!(g16.tensors().iter().all(|t| t.ty == GgmlType::F16));
    assert_eq!(g16.get("general.file_type"), Some(&GgufValue::U32(1)));
    for (l, m, a, b) in read_gguf_adapter("a16.gguf", &b16, cfg).unwrap() {
        let p = h.layers[l][m].as_ref().unwrap();
        for (x, y) in p.a.iter().zip(&a.data).chain(p.b.iter().zip(&b.data)) {
            assert!(((*x as f64) - (*y as f64)).abs() <= 0.5 * f16_step(*x) + 1e-12, "f16 {x} -> {y}");
        }
    }
    // Q8_0: lora_a (rows of in = 64 or 160) in Q8_0, within half a step d = max|block| / 127
    // (plus the f16 rounding of d: 127.5 · |Δd| ≤ 127.5 · d · 2^-11); lora_b (rows of r = 8)
    // falls back to F16 as convert_lora_to_gguf.py does.
    let b8 = adapter_to_gguf(&h, cfg, GgufDtype::Q8_0, None).unwrap();
    let g8 = GgufFile::parse("a8.gguf", &b8).unwrap();
    assert_eq!(g8.get("general.file_type"), Some(&GgufValue::U32(7)));
    for t in g8.tensors() {
        let want = if t.name.ends_with(".lora_a") { GgmlType::Q8_0 } else { GgmlType::F16 };
        assert_eq!(t.ty, want, "{}", t.name);
    }
    for (l, m, a, _) in read_gguf_adapter("a8.gguf", &b8, cfg).unwrap() {
        let p = h.layers[l][m].as_ref().unwrap();
        for (blk_x, blk_y) in p.a.chunks(32).zip(a.data.chunks(32)) {
            let d = blk_x.iter().fold(0f64, |mx, v| mx.max((*v as f64).abs())) / 127.0;
            for (x, y) in blk_x.iter().zip(blk_y) {
                assert!(((*x as f64) - (*y as f64)).abs() <= 0.5 * d + 127.5 * d * 2f64.powi(-11) + 1e-12, "q8_0 {x} -> {y}");
            }
        }
    }
}

/// Last-position logits of `ids` through `src` on the GPU (no adapter).
fn logits(src: ModelSource, ids: &[u32]) -> Vec<f32> {
    let ctx = common::gpu();
    let m = src.upload(&ctx, BaseQuant::F32, 64).unwrap();
    let mm = &m.model;
    let mut cache = KvCache::new(&ctx, &mm.cfg, ids.len()).unwrap();
    let t = forward_cached(&ctx, &mm.cfg, &mm.weights, &LoraSet::default(), ids, &mut cache, &mm.rope).unwrap();
    let mut l = block_on(ctx.read_f32(&t)).unwrap();
    l.truncate(mm.cfg.vocab);
    l
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

#[test]
fn merged_gguf_reads_back_as_the_merged_model() {
    let dir = tmp("merge");
    let m = tiny_model().display().to_string();
    let a = dev_adapter().display().to_string();
    let folder = dir.join("merged");
    ok(&["merge", &m, "--adapter", &a, "--out", folder.to_str().unwrap(), "--dtype", "f32"]);
    let mut files = Vec::new();
    for dt in ["f32", "f16", "q8_0"] {
        let f = dir.join(format!("merged-{dt}.gguf"));
        let out = ok(&["merge", &m, "--adapter", &a, "--out", f.to_str().unwrap(), "--dtype", dt]);
        assert!(out.contains("GGUF"), "{out}");
        files.push(f);
    }
    // F32: every tensor read back equals the merged folder's, bit for bit, and PEFT's merge
    // within f32 rounding (max |Δ| / max |W| per tensor; bound 1e-6, about 8 f32 eps).
    let hf = load_hf_dir(&folder).unwrap();
    let bytes = std::fs::read(&files[0]).unwrap();
    let g = load_gguf("merged-f32.gguf", &bytes).unwrap();
    assert_eq!(g.model.config.hidden_size, 64);
    assert_eq!(g.model.config.num_key_value_heads, 2);
    assert_eq!(g.model.config.head_dim, 16);
    assert!(g.model.config.tie_word_embeddings);
    assert!(g.model.unused.is_empty(), "{:?}", g.model.unused);
    for (name, _) in hf.config.tensor_shapes() {
        assert_eq!(g.model.get_f32(&name), hf.get_f32(&name), "{name}");
    }
    let peft = safetensors::SafeTensors::deserialize(&std::fs::read(fixtures().join("tiny-llama/dev/merged_ref.safetensors")).unwrap())
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<f32>>()))
        .collect::<Vec<_>>();
    assert_eq!(peft.len(), 14);
    for (name, want) in &peft {
        let got = g.model.get_f32(name).unwrap();
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let worst = max_abs(&got, want) / scale;
        assert!(worst <= 1e-6, "{name}: max |Δ| / max |W| = {worst:e} from PEFT's merge");
    }
    // Metadata as convert_hf_to_gguf.py writes it for llama, the tokenizer and chat template.
    let meta = |k: &str| g.metadata.get(k).unwrap_or_else(|| panic!("missing {k}")).clone();
    assert_eq!(meta("general.architecture"), GgufValue::String("llama".into()));
    assert_eq!(meta("llama.block_count"), GgufValue::U32(2));
    assert_eq!(meta("llama.rope.dimension_count"), GgufValue::U32(16));
    assert_eq!(meta("tokenizer.ggml.model"), GgufValue::String("gpt2".into()));
    let src_gguf = ModelSource::from_gguf("merged-f32.gguf", &bytes).unwrap();
    let src_hf = ModelSource::from_hf("merged", &MmapDir::open(&folder).unwrap()).unwrap();
    assert_eq!(src_gguf.template.as_ref().map(|t| t.source().to_owned()), src_hf.template.as_ref().map(|t| t.source().to_owned()));
    let text = "<|im_start|>user\nWhat is 6 times 9? Arr!<|im_end|>\n<|im_start|>assistant\n";
    let ids = src_hf.tokenizer.encode(text, false).unwrap();
    assert_eq!(src_gguf.tokenizer.encode(text, false).unwrap(), ids, "same tokens");
    assert!(ids.len() > 10);

    // Logits at the last position: F32 identical to the folder's; F16 / Q8_0 within bounds.
    let want = logits(src_hf, &ids);
    let spread = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    assert_eq!(logits(src_gguf, &ids), want, "F32 GGUF: the same logits as the merged folder");
    // Max |Δlogit| against the merged f32 folder (logits up to 0.79 in magnitude on this
    // random model): measured F16 8.7e-4, Q8_0 2.5e-2 (the tied embedding, also the output
    // layer, in Q8_0); bounds 2e-3 and 5e-2 (about 2x). Q8_0 is about 30x F16 here, as its step
    // (max|block| / 127) is to f16's relative 2^-11.
    for (f, bound) in [(&files[1], 2e-3), (&files[2], 5e-2)] {
        let b = std::fs::read(f).unwrap();
        let got = logits(ModelSource::from_gguf("m.gguf", &b).unwrap(), &ids);
        let d = max_abs(&got, &want);
        eprintln!("{}: max |Δlogit| {d:.3e} (largest |logit| {spread:.3})", f.display());
        assert!(d <= bound, "{}: max |Δlogit| {d:e} > {bound:e}", f.display());
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn what_cannot_be_exported_fails_clearly() {
    let dir = tmp("errors");
    let m = tiny_model().display().to_string();
    let a = dev_adapter().display().to_string();
    // Another model: the tiny model's shape with intermediate 96 instead of 160 (written with
    // the library's own GGUF writer; its weights do not matter).
    let src = tiny_source();
    let mut cfg = src.host.config.clone();
    cfg.intermediate_size = 96;
    let tensors: Vec<(String, HostTensor)> =
        cfg.tensor_shapes().into_iter().map(|(n, s)| (n, HostTensor { data: vec![0.01; s.iter().product()], shape: s })).collect();
    let kv = tokenizer_kv_from_hf(&src.tokenizer, src.template.as_ref().map(|t| t.source())).unwrap();
    let other = dir.join("other.gguf");
    std::fs::write(&other, model_to_gguf(&cfg, &tensors, &kv, GgufDtype::F32).unwrap()).unwrap();
    // An unknown target module, and DoRA: copies of the dev adapter with the config changed.
    let variant = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(dev_adapter().join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(dev_adapter().join("adapter_config.json")).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(d.join("adapter_config.json"), serde_json::to_vec(&v).unwrap()).unwrap();
        d.display().to_string()
    };
    let unknown = variant("unknown", &|v| v["target_modules"] = serde_json::json!(["q_proj", "wq"]));
    let dora = variant("dora", &|v| v["use_dora"] = true.into());
    let out = dir.join("x.gguf").display().to_string();
    let o = other.display().to_string();
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["export", &o, "--adapter", &a, "--out", &out], &["an adapter for another model", "hidden size 64", "96"]),
        (vec!["merge", &o, "--adapter", &a, "--out", &out], &["an adapter for another model"]),
        (vec!["export", &m, "--adapter", &unknown, "--out", &out], &["target module \"wq\" is not a module of the model"]),
        (vec!["export", &m, "--adapter", &dora, "--out", &out], &["DoRA", "llama.cpp cannot apply DoRA"]),
        (vec!["export", &m, "--adapter", &a, "--out", &out, "--dtype", "q4_k"], &["expected f32, f16 or q8_0"]),
        (vec!["export", &m, "--adapter", &a, "--out", "x.bin"], &["must end in .gguf"]),
    ];
    for (args, needles) in cases {
        let (code, _, err) = qlora(&args);
        assert_eq!(code, 1, "qlora {args:?} exits 1:\n{err}");
        let last = err.lines().rfind(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("qlora {args:?}: no error line in\n{err}"));
        for n in needles {
            assert!(last.contains(n), "qlora {args:?}: {n:?} not in {last:?}");
        }
    }
    assert!(!Path::new(&out).exists(), "nothing written on failure");
    std::fs::remove_dir_all(&dir).ok();
}
