//! Merging against PEFT: `merge_and_unload()` of the dev adapter after 20 steps
//! (tests/fixtures/tiny-llama/dev/adapter_final) onto the tiny model (tiny-llama/model, bf16 read
//! as f32), saved by PEFT 0.21.2 as tiny-llama/dev/merged_ref.safetensors (copied from
//! ../shared/reference; see tests/fixtures/README.md). Our merge, both through the library calls
//! `qlora merge` makes (src/lora/merge.rs) and through the `qlora merge` command itself
//! (`--dtype f32`), must equal it for every projection within f32 rounding.
//!
//! Bound: PEFT computes W0 + ((B @ A) * scaling) in f32 (the r = 8 products accumulated in f32,
//! then the scaling, then the sum, each rounded); we evaluate W0 + s·B·A in f64 and round once.
//! The two differ by those roundings only: measured per element in f32 ulps of its operand
//! magnitude max(|W0|, s·Σ_k |B_ik|·|A_kj|), the worst element is 3.0 ulps (4.5e-8 absolute,
//! about half the elements differ at all); the bound is [`MERGE_ULPS`] = 4 ulps.

use qlora_webgpu::io::hf::load_hf_dir;
use qlora_webgpu::io::TensorRef;
use qlora_webgpu::lora::merge::{hf_weight_name, merge_adapter, BaseTensor};
use qlora_webgpu::lora::module_name;
use qlora_webgpu::lora::peft::read_host_adapter;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Worst |ours - PEFT| per element in f32 ulps of its operand magnitude: achieved 3.0, bound 4.
const MERGE_ULPS: f64 = 4.0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// f32 tensors of a safetensors file by name.
fn f32_tensors(bytes: &[u8]) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), Dtype::F32, "{name}");
            let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (name.to_string(), (v.shape().to_vec(), data))
        })
        .collect()
}

fn peft_merged() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let p = fixtures().join("dev/merged_ref.safetensors");
    let r = f32_tensors(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())));
    assert_eq!(r.len(), 14, "the seven projections of both layers");
    r
}

/// The f32 ulp at x (the gap to the next representable value away from zero).
fn ulp(x: f32) -> f64 {
    let a = x.abs();
    (f32::from_bits(a.to_bits() + 1) - a) as f64
}

/// The base's value of every reference tensor.
fn base_weights() -> BTreeMap<String, Vec<f32>> {
    let base = load_hf_dir(fixtures().join("model")).unwrap();
    peft_merged().keys().map(|n| (n.clone(), base.get_f32(n).unwrap())).collect()
}

/// For every reference tensor, the magnitude of each element's operands:
/// max(|W0[i,j]|, s·Σ_k |B[i,k]|·|A[k,j]|), in f64. f32 rounding errors of PEFT's product, scaling
/// and sum are relative to it (an element where the terms cancel keeps their rounding error).
fn operand_scales() -> BTreeMap<String, Vec<f64>> {
    let host = load_hf_dir(fixtures().join("model")).unwrap();
    let lcfg = host.config.to_llama();
    let adapter = read_host_adapter(&fixtures().join("dev/adapter_final"), &lcfg).unwrap();
    let base = base_weights();
    let mut out = BTreeMap::new();
    for l in 0..lcfg.layers {
        for m in 0..7 {
            let name = hf_weight_name(l, m);
            let lora = adapter.layers[l][m].as_ref().unwrap();
            let s = adapter.config.scale_for_f64(&module_name(l, m));
            assert_eq!(s, 2.0, "alpha 16 / r 8");
            let (o, i, r) = (lora.out_features, lora.in_features, lora.r);
            let w0 = &base[&name];
            let v: Vec<f64> = (0..o * i)
                .map(|e| {
                    let (row, col) = (e / i, e % i);
                    let p: f64 = (0..r).map(|k| (lora.b[row * r + k] as f64 * lora.a[k * i + col] as f64).abs()).sum();
                    (w0[e].abs() as f64).max(s * p)
                })
                .collect();
            out.insert(name, v);
        }
    }
    out
}

/// Worst difference over every tensor of the reference (each must be in `ours` with the same
/// shape), in f32 ulps of the element's operand magnitude ([`operand_scales`]); and the worst
/// absolute difference.
fn compare(what: &str, ours: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> (f64, f64) {
    let scales = operand_scales();
    let (mut worst_ulps, mut worst_abs) = (0.0f64, 0.0f64);
    for (name, (shape, want)) in peft_merged() {
        let (s, got) = ours.get(&name).unwrap_or_else(|| panic!("{what}: no {name}"));
        assert_eq!(s, &shape, "{what} {name}");
        for ((&g, &w), &scale) in got.iter().zip(&want).zip(&scales[&name]) {
            let d = (g as f64 - w as f64).abs();
            worst_abs = worst_abs.max(d);
            worst_ulps = worst_ulps.max(d / ulp(scale as f32));
        }
    }
    (worst_ulps, worst_abs)
}

/// What `qlora merge` does before writing: the base's tensors in config order (NF4 kept as NF4),
/// the PEFT adapter read from its folder, merged on the host.
fn library_merge() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let host = load_hf_dir(fixtures().join("model")).unwrap();
    let lcfg = host.config.to_llama();
    let adapter = read_host_adapter(&fixtures().join("dev/adapter_final"), &lcfg).unwrap();
    let base: Vec<(String, BaseTensor)> = host
        .config
        .tensor_shapes()
        .into_iter()
        .filter_map(|(name, _)| {
            host.get(&name).map(|t| {
                let b = match t {
                    TensorRef::Nf4(q) => BaseTensor::Nf4(q.clone()),
                    TensorRef::F32(d) => BaseTensor::Dense(d.clone()),
                };
                (name, b)
            })
        })
        .collect();
    let merged = merge_adapter(&base, &adapter, &lcfg).unwrap();
    // Untargeted tensors pass through unchanged.
    for ((n, b), (m, t)) in base.iter().zip(&merged) {
        assert_eq!(n, m);
        let is_proj = (0..lcfg.layers).any(|l| (0..7).any(|p| hf_weight_name(l, p) == *n));
        if !is_proj {
            assert!(b.to_dense() == *t, "{n} changed by the merge");
        }
    }
    merged.into_iter().map(|(n, t)| (n, (t.shape, t.data))).collect()
}

#[test]
fn merge_equals_peft_merge_and_unload() {
    let ours = library_merge();
    let (ulps, abs) = compare("library merge", &ours);
    eprintln!("library merge vs PEFT merge_and_unload: worst {ulps:.2} ulp, {abs:.3e} absolute (bound {MERGE_ULPS} ulp)");
    assert!(ulps <= MERGE_ULPS, "merge differs from PEFT by {ulps:.2} f32 ulps (> {MERGE_ULPS})");
    // The check tells a merge from no merge (the base itself).
    let unmerged: BTreeMap<_, _> =
        peft_merged().into_iter().map(|(n, (s, _))| (n.clone(), (s, base_weights()[&n].clone()))).collect();
    let (u, _) = compare("unmerged base", &unmerged);
    assert!(u > 100.0 * MERGE_ULPS, "the unmerged base is only {u:.1} ulps from PEFT's merge");
}

#[test]
fn qlora_merge_command_equals_peft_merge_and_unload() {
    let out = std::env::temp_dir().join(format!("qlora-merge-peft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let model = fixtures().join("model");
    let adapter = fixtures().join("dev/adapter_final");
    let o = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("merge")
        .arg(&model)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&out)
        .args(["--dtype", "f32"])
        .output()
        .expect("run qlora");
    assert!(o.status.success(), "qlora merge failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let written = f32_tensors(&std::fs::read(out.join("model.safetensors")).unwrap());
    std::fs::remove_dir_all(&out).unwrap();
    let (ulps, abs) = compare("qlora merge", &written);
    eprintln!("qlora merge vs PEFT merge_and_unload: worst {ulps:.2} ulp, {abs:.3e} absolute (bound {MERGE_ULPS} ulp)");
    assert!(ulps <= MERGE_ULPS, "qlora merge differs from PEFT by {ulps:.2} f32 ulps (> {MERGE_ULPS})");
    // The command writes exactly what the library computes.
    let lib = library_merge();
    for (name, t) in &lib {
        assert!(written.get(name) == Some(t), "{name}: the command's output differs from the library merge");
    }
}
