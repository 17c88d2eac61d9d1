//! A QLoRA base written by us is what bitsandbytes writes: quantizing the reference tiny Llama's
//! projections gives, tensor for tensor and byte for byte, the bitsandbytes serialization in
//! ../shared/reference (tests/fixtures/tiny-llama/dev_qlora*/base_nf4_weights.safetensors, made
//! by bitsandbytes 0.50.2 from the same weights); the folder's config.json carries transformers'
//! `quantization_config`; it loads back through our loader with NF4 projections; and the device
//! memory of the base with and without quantization is reported.

mod common;
use common::*;
use qlora_webgpu::io::hf::load_hf_dir;
use qlora_webgpu::io::quantized::quantized_folder;
use qlora_webgpu::io::{hf::load_hf, HostWeight};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

#[test]
fn quantized_folder_equals_bitsandbytes_serialization_and_loads_back() {
    let model = load_hf_dir(fixtures().join("model")).unwrap();
    let config = std::fs::read(fixtures().join("model/config.json")).unwrap();
    for (case, dq) in [("dev_qlora", false), ("dev_qlora_dq", true)] {
        let files = quantized_folder(&model, &config, 64, dq).unwrap();
        let map: BTreeMap<String, Vec<u8>> = files.into_iter().collect();
        let ours = safetensors::SafeTensors::deserialize(&map["model.safetensors"]).unwrap();
        let bnb_bytes = std::fs::read(fixtures().join(case).join("base_nf4_weights.safetensors")).unwrap();
        let bnb = safetensors::SafeTensors::deserialize(&bnb_bytes).unwrap();
        let mut compared = 0;
        for (name, view) in bnb.tensors() {
            if name.ends_with(".dequantized") {
                continue;
            }
            let mine = ours.tensor(&name).unwrap_or_else(|_| panic!("{case}: we do not write {name}"));
            assert_eq!(mine.dtype(), view.dtype(), "{case} {name}: dtype");
            assert_eq!(mine.shape(), view.shape(), "{case} {name}: shape");
            assert!(mine.data() == view.data(), "{case} {name}: bytes differ from bitsandbytes'");
            compared += 1;
        }
        assert_eq!(compared, 14 * if dq { 6 } else { 4 }, "{case}: every bitsandbytes tensor compared");

        let cfg: serde_json::Value = serde_json::from_slice(&map["config.json"]).unwrap();
        let q = &cfg["quantization_config"];
        assert_eq!(q["quant_method"], "bitsandbytes");
        assert_eq!(q["load_in_4bit"], true);
        assert_eq!(q["bnb_4bit_quant_type"], "nf4");
        assert_eq!(q["bnb_4bit_use_double_quant"], dq);

        let back = load_hf(&map).unwrap();
        assert!(back.layers.iter().all(|l| l.proj.iter().all(|p| matches!(p, HostWeight::Nf4(_)))));
        assert_eq!(back.embed, model.embed, "{case}: the embedding stays exact");
        assert_eq!(back.final_norm, model.final_norm);
    }
}

#[test]
fn device_memory_of_the_base_with_and_without_nf4() {
    let ctx = gpu();
    let model = load_hf_dir(fixtures().join("model")).unwrap();
    let (p32, rest32) = model.upload(&ctx).unwrap().device_bytes();
    let (p4, rest4) = model.upload_nf4(&ctx, 64, false).unwrap().device_bytes();
    let (p4dq, _) = model.upload_nf4(&ctx, 64, true).unwrap().device_bytes();
    eprintln!("projections: f32 {p32} B, NF4 {p4} B, NF4+DQ {p4dq} B; embedding+norms {rest32} B (not quantized)");
    assert_eq!(rest4, rest32, "norms and the embedding stay f32");
    // Per weight on the device: the packed codes (half a byte a weight, in 4-byte words), the
    // scales (an f32 absmax per 64 weights; with double quantization one byte per block plus an
    // f32 per 256 blocks) and the decode tables (16 codes; +256 for the 8-bit dynamic map).
    let cfg = model.config.to_llama();
    let (mut want4, mut want4dq) = (0, 0);
    for _ in 0..cfg.layers {
        for m in 0..7 {
            let (o, i) = cfg.proj_shape(m);
            let n = o * i;
            let packed = n.div_ceil(8) * 4;
            let blocks = n.div_ceil(64);
            want4 += packed + blocks * 4 + 16 * 4;
            want4dq += packed + blocks.div_ceil(4) * 4 + blocks.div_ceil(256) * 4 + (16 + 256) * 4;
        }
    }
    assert_eq!(p4, want4, "NF4 device bytes");
    assert_eq!(p4dq, want4dq, "NF4 + double quantization device bytes");
    // About 1/7 of f32 (0.5625 B/weight): the tables are a fixed 64 B a weight.
    assert!((p32 as f64 / p4 as f64) > 6.9, "NF4 takes about 1/7 of f32: {p32} vs {p4}");
}

#[test]
fn quantizing_while_reading_gives_the_same_nf4_as_quantizing_after() {
    // `qlora train --qlora` reads each projection and quantizes it at once (the f32 model never
    // exists on the host): the same NF4 bits as loading in f32 and quantizing afterwards (the
    // GGUF loader shares the same wrapper; tests/cli_qlora.rs trains from both).
    use qlora_webgpu::io::hf::MmapDir;
    use qlora_webgpu::quant::nf4::quantize_nf4;
    let dir = MmapDir::open(fixtures().join("model")).unwrap();
    let f32_model = load_hf(&dir).unwrap();
    for (bs, dq) in [(64, true), (128, false)] {
        let q = qlora_webgpu::io::hf::load_hf_with(&dir, Some((bs, dq))).unwrap();
        assert_eq!(q.embed, f32_model.embed, "the embedding stays f32");
        let mut n = 0;
        for (lq, lf) in q.layers.iter().zip(&f32_model.layers) {
            for (pq, pf) in lq.proj.iter().zip(&lf.proj) {
                let (HostWeight::Nf4(got), HostWeight::F32(t)) = (pq, pf) else { panic!("NF4 after reading, f32 without") };
                assert_eq!(got, &quantize_nf4(&t.data, &t.shape, bs, dq).unwrap());
                n += 1;
            }
            assert_eq!(lq.attn_norm, lf.attn_norm);
        }
        assert_eq!(n, 14);
    }
}
