//! NF4 on the CPU against bitsandbytes 0.50.2 (tests/fixtures/nf4, tests/fixtures/tiny-llama):
//! quantization, double quantization and dequantization bit for bit (also at real model sizes,
//! 576x576 and 1536x576), bitsandbytes' safetensors layout both ways, and errors (never panics)
//! on bad files and arguments.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use qlora_webgpu::io::bnb::{
    bnb_weight_names, python_float_repr, read_all_bnb_nf4, read_bnb_nf4, read_bnb_nf4_file,
    write_bnb_nf4, NF4_QUANT_STATE_SUFFIX,
};
use qlora_webgpu::io::safetensors_write::{serialize_tensors, RawTensor};
use qlora_webgpu::quant::nf4::{
    dynamic_map, nf4_midpoints, quantize_nf4, torch_mean_f32, Nf4Stats, Nf4Tensor, NF4_CODE,
};
use qlora_webgpu::Error;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use qlora_webgpu::io::sha256::{hex, sha256, sha256_f32_le_hex, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

fn read_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn manifest() -> Value {
    let bytes = read_bytes(&fixtures().join("nf4/manifest.json"));
    serde_json::from_slice(&bytes).expect("manifest.json parses")
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let v = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("tensor {name} missing"));
    assert_eq!(v.dtype(), Dtype::F32, "{name} dtype");
    v.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u8s(st: &SafeTensors, name: &str) -> Vec<u8> {
    let v = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("tensor {name} missing"));
    assert_eq!(v.dtype(), Dtype::U8, "{name} dtype");
    v.data().to_vec()
}

fn shape_of(st: &SafeTensors, name: &str) -> Vec<usize> {
    st.tensor(name)
        .unwrap_or_else(|_| panic!("tensor {name} missing"))
        .shape()
        .to_vec()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_u64().expect("uint") as usize)
        .collect()
}

/// Asserts two f32 slices are equal bit for bit, reporting the first difference.
fn assert_bits_eq(ours: &[f32], reference: &[f32], what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let diff: Vec<usize> = (0..ours.len())
        .filter(|&i| ours[i].to_bits() != reference[i].to_bits())
        .collect();
    if let Some(&i) = diff.first() {
        panic!(
            "{what}: {} of {} values differ; first at {i}: ours {:e} ({:#010x}) vs reference {:e} ({:#010x})",
            diff.len(),
            ours.len(),
            ours[i],
            ours[i].to_bits(),
            reference[i],
            reference[i].to_bits()
        );
    }
}

fn assert_tensor_bits_eq(a: &Nf4Tensor, b: &Nf4Tensor, what: &str) {
    assert_eq!(a.shape, b.shape, "{what}: shape");
    assert_eq!(a.blocksize, b.blocksize, "{what}: blocksize");
    assert_eq!(a.packed, b.packed, "{what}: packed");
    match (&a.stats, &b.stats) {
        (Nf4Stats::Absmax(x), Nf4Stats::Absmax(y)) => assert_bits_eq(x, y, what),
        (
            Nf4Stats::DoubleQuant {
                absmax_u8: q1,
                nested_absmax: n1,
                offset: o1,
                nested_blocksize: s1,
            },
            Nf4Stats::DoubleQuant {
                absmax_u8: q2,
                nested_absmax: n2,
                offset: o2,
                nested_blocksize: s2,
            },
        ) => {
            assert_eq!(q1, q2, "{what}: absmax_u8");
            assert_bits_eq(n1, n2, &format!("{what}: nested_absmax"));
            assert_eq!(o1.to_bits(), o2.to_bits(), "{what}: offset");
            assert_eq!(s1, s2, "{what}: nested_blocksize");
        }
        _ => panic!("{what}: stats kinds differ"),
    }
}

#[test]
fn code_tables_equal_reference() {
    let m = manifest();
    let st_bytes = read_bytes(&fixtures().join("nf4/nf4_dev.safetensors"));
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let from_manifest: Vec<f32> = m["nf4_code"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_bits_eq(&NF4_CODE, &from_manifest, "NF4_CODE vs manifest");
    assert_bits_eq(
        &NF4_CODE,
        &f32s(&st, "nf4_code"),
        "NF4_CODE vs nf4_code tensor",
    );
    // Computed like torch 2.15 (linspace with fused multiply-add); the plain-numpy linspace of
    // nf4_numpy.py differs from bitsandbytes' table in 22 entries (manifest:
    // dynamic_code_numpy_reimpl_matches = false).
    let dynm = dynamic_map();
    assert_bits_eq(
        &dynm,
        &f32s(&st, "dynamic_code"),
        "dynamic_map vs dynamic_code",
    );
    assert!(
        dynm.windows(2).all(|w| w[0] <= w[1]),
        "dynamic map ascending"
    );
    assert_eq!(dynm[255], 1.0);
    // Midpoints sorted, and the one between -0.091 and 0.0 is below 0, the next above.
    let mid = nf4_midpoints();
    assert!(mid.windows(2).all(|w| w[0] < w[1]));
    assert!(mid[6] < 0.0 && mid[7] > 0.0);
}

#[test]
fn sha256_matches_known_digests() {
    // FIPS 180-4 examples (values as Python's hashlib gives them) and a multi-block message
    // (the padding crosses a block boundary).
    assert_eq!(
        hex(&sha256(b"")),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        hex(&sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        hex(&sha256(
            b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
        )),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    // Fed in uneven pieces, the incremental hash is the same (and equals hashlib's).
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut inc = Sha256::default();
    for piece in data.chunks(37) {
        inc.update(piece);
    }
    assert_eq!(inc.finish(), sha256(&data));
    assert_eq!(
        hex(&sha256(&data)),
        "59425e4412e296fc74736673ce067027f384203f59c0d2c3e6be7b13347b3ffc"
    );
    // The committed subset file hashes to the digest its generator recorded.
    let doc: Value = serde_json::from_slice(&read_bytes(
        &fixtures().join("nf4/nf4_dev_large_subset.json"),
    ))
    .unwrap();
    assert_eq!(
        hex(&sha256(&read_bytes(
            &fixtures().join("nf4/nf4_dev_large_subset.safetensors")
        ))),
        doc["subset_sha256"].as_str().unwrap()
    );
}

/// Where an entry's derived f32 arrays (`.dequant`, `.dq.dequant`, `.dq.absmax_dequant`) come
/// from: the full arrays in the file, or (for the large entries, whose fixture omits them) the
/// SHA-256 of bitsandbytes' little-endian bytes plus a strided sample of its values, from
/// tests/fixtures/nf4/nf4_dev_large_subset.json.
enum Derived<'a> {
    Full(&'a SafeTensors<'a>),
    Digest(&'a Value),
}

impl Derived<'_> {
    /// Asserts `ours` equals bitsandbytes' array `key` bit for bit.
    fn check(&self, key: &str, ours: &[f32], what: &str) {
        match self {
            Derived::Full(st) => assert_bits_eq(ours, &f32s(st, key), what),
            Derived::Digest(doc) => {
                let d = &doc["digested"][key];
                assert!(
                    d.is_object(),
                    "{key}: no digest in nf4_dev_large_subset.json"
                );
                let n: usize = usizes(&d["shape"]).iter().product();
                assert_eq!(ours.len(), n, "{what}: length");
                // The sample first, so a difference is named by its element.
                let stride = d["sample_stride"].as_u64().unwrap() as usize;
                let sample: Vec<f32> = d["sample"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                let ours_sampled: Vec<f32> = ours.iter().step_by(stride).copied().collect();
                assert_bits_eq(
                    &ours_sampled,
                    &sample,
                    &format!("{what} (every {stride}th element)"),
                );
                // Then every element: equal SHA-256 of the f32 bytes means equal bits.
                assert_eq!(
                    sha256_f32_le_hex(ours),
                    d["sha256_f32_le"].as_str().unwrap(),
                    "{what}: SHA-256 of the f32 bytes differs from bitsandbytes'"
                );
            }
        }
    }
}

/// Checks one manifest entry of nf4_dev against the file `st` that holds it; `derived` supplies
/// the expected dequantized arrays.
fn check_entry(st: &SafeTensors, derived: &Derived, e: &Value) {
    let name = e["name"].as_str().unwrap();
    let shape = usizes(&e["shape"]);
    let bs = e["blocksize"].as_u64().unwrap() as usize;
    let n: usize = shape.iter().product();
    let input = f32s(st, &format!("{name}.input"));
    assert_eq!(
        shape_of(st, &format!("{name}.input")),
        shape,
        "{name}: input shape"
    );
    assert_eq!(input.len(), n);

    // Plain NF4: packed codes, absmax, dequantized values.
    let t = quantize_nf4(&input, &shape, bs, false).unwrap();
    assert_eq!(
        t.nblocks() as u64,
        e["nblocks"].as_u64().unwrap(),
        "{name}: nblocks"
    );
    assert_eq!(
        shape_of(st, &format!("{name}.packed")),
        usizes(&e["packed_shape"])
    );
    assert_eq!(
        t.packed,
        u8s(st, &format!("{name}.packed")),
        "{name}: packed bytes"
    );
    let Nf4Stats::Absmax(absmax) = &t.stats else {
        panic!("plain stats expected")
    };
    assert_bits_eq(
        absmax,
        &f32s(st, &format!("{name}.absmax")),
        &format!("{name}: absmax"),
    );
    let deq = t.dequantize();
    derived.check(
        &format!("{name}.dequant"),
        &deq,
        &format!("{name}: dequant"),
    );
    let codes = t.codes();
    let first8: Vec<u8> = usizes(&e["first8_codes"])
        .iter()
        .map(|&c| c as u8)
        .collect();
    assert_eq!(&codes[..8], &first8[..], "{name}: first8_codes");
    let first4: Vec<u8> = usizes(&e["first4_bytes"])
        .iter()
        .map(|&c| c as u8)
        .collect();
    assert_eq!(&t.packed[..4], &first4[..], "{name}: first4_bytes");
    if let Some(pad) = e.get("last_byte_low_nibble_pad") {
        assert_eq!(
            u64::from(t.packed.last().unwrap() & 0x0F),
            pad.as_u64().unwrap()
        );
    }
    // bitsandbytes' CPU dequantize kernel (AVX512 path) uses wrong scales for blocks that span
    // rows; we match the flat-block reference instead, so we differ from the kernel's output in
    // exactly the elements the manifest counts.
    if st.tensor(&format!("{name}.dequant_cpu_kernel")).is_ok() {
        let cpu = f32s(st, &format!("{name}.dequant_cpu_kernel"));
        let differ = deq
            .iter()
            .zip(&cpu)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ as u64,
            e["cpu_kernel_mismatch_elements"].as_u64().unwrap()
        );
        assert!(differ > 0);
    }

    // Double quantization.
    let tq = quantize_nf4(&input, &shape, bs, true).unwrap();
    assert_eq!(
        tq.packed, t.packed,
        "{name}: packed identical with double quantization"
    );
    let Nf4Stats::DoubleQuant {
        absmax_u8,
        nested_absmax,
        offset,
        nested_blocksize,
    } = &tq.stats
    else {
        panic!("double-quant stats expected")
    };
    assert_eq!(*nested_blocksize, 256);
    let ref_offset = f32s(st, &format!("{name}.dq.offset"));
    assert_eq!(ref_offset.len(), 1);
    // The stored offset is torch's f32 `absmax.mean()`. torch_mean_f32 (torch's cascade sum with
    // 8-lane vectors, then / n) reproduces it bit for bit in every entry, including those where
    // the correctly rounded mean differs by 1 ulp (dq_offset_equal_numpy_f64mean = false).
    assert_eq!(
        offset.to_bits(),
        ref_offset[0].to_bits(),
        "{name}: offset ours {offset:e} vs torch {:e}",
        ref_offset[0]
    );
    assert_eq!(offset.to_bits(), torch_mean_f32(absmax).to_bits());
    let f64_mean =
        (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / n.div_ceil(bs) as f64) as f32;
    assert_eq!(
        f64_mean.to_bits() == ref_offset[0].to_bits(),
        e["checks"]["dq_offset_equal_numpy_f64mean"]
            .as_bool()
            .unwrap(),
        "{name}: the correctly rounded mean matches torch's exactly where the manifest says so"
    );
    assert_eq!(
        absmax_u8,
        &u8s(st, &format!("{name}.dq.absmax_u8")),
        "{name}: absmax_u8"
    );
    assert_bits_eq(
        nested_absmax,
        &f32s(st, &format!("{name}.dq.nested_absmax")),
        &format!("{name}: nested_absmax"),
    );
    assert_eq!(
        nested_absmax.len() as u64,
        e["nested_blocks"].as_u64().unwrap()
    );
    derived.check(
        &format!("{name}.dq.absmax_dequant"),
        &tq.absmax_f32(),
        &format!("{name}: decoded absmax"),
    );
    derived.check(
        &format!("{name}.dq.dequant"),
        &tq.dequantize(),
        &format!("{name}: dq dequant"),
    );

    // Dequantization from the stored statistics alone (independent of how we compute offsets).
    let stored = Nf4Tensor {
        shape: shape.clone(),
        blocksize: bs,
        packed: u8s(st, &format!("{name}.packed")),
        stats: Nf4Stats::DoubleQuant {
            absmax_u8: u8s(st, &format!("{name}.dq.absmax_u8")),
            nested_absmax: f32s(st, &format!("{name}.dq.nested_absmax")),
            offset: ref_offset[0],
            nested_blocksize: 256,
        },
    };
    stored.validate().unwrap();
    derived.check(
        &format!("{name}.dq.dequant"),
        &stored.dequantize(),
        &format!("{name}: dequant from stored stats"),
    );
}

fn entries_in(file: &str) -> Vec<Value> {
    manifest()["sets"]["dev"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["file"] == file)
        .cloned()
        .collect()
}

#[test]
fn nf4_dev_entries_bit_exact() {
    let bytes = read_bytes(&fixtures().join("nf4/nf4_dev.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let entries = entries_in("nf4_dev.safetensors");
    assert_eq!(entries.len(), 6, "all six entries of the small file");
    for e in &entries {
        check_entry(&st, &Derived::Full(&st), e);
    }
}

/// The two large entries (576x576 and 1536x576, real SmolLM2 projection sizes) of bitsandbytes'
/// nf4_dev_large.safetensors (15 MB, not copied whole): tests/fixtures/nf4/
/// nf4_dev_large_subset.safetensors holds its inputs, packed codes, absmax and double-quant
/// statistics unchanged, and nf4_dev_large_subset.json the SHA-256 (and a strided sample) of its
/// three dequantized arrays; both written by make_large_subset.py beside them.
#[test]
fn nf4_dev_large_entries_bit_exact() {
    let bytes = read_bytes(&fixtures().join("nf4/nf4_dev_large_subset.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let doc: Value = serde_json::from_slice(&read_bytes(
        &fixtures().join("nf4/nf4_dev_large_subset.json"),
    ))
    .unwrap();
    assert_eq!(
        doc["source_sha256"],
        manifest()["sets"]["dev"]["large_file_sha256"],
        "the subset was cut from the file the manifest describes"
    );
    // The code tables in the subset are bitsandbytes' (the same as in the small file).
    assert_bits_eq(&NF4_CODE, &f32s(&st, "nf4_code"), "nf4_code (large file)");
    assert_bits_eq(
        &dynamic_map(),
        &f32s(&st, "dynamic_code"),
        "dynamic_code (large file)",
    );
    let entries = entries_in("nf4_dev_large.safetensors");
    assert_eq!(entries.len(), 2);
    for e in &entries {
        check_entry(&st, &Derived::Digest(&doc), e);
    }
}

#[test]
fn tie_rule_padding_and_zero_block() {
    // absmax 1.0 so the scaled values are the inputs: a value exactly on midpoint i takes the
    // lower code i; the next f32 above it takes code i + 1.
    let mid = nf4_midpoints();
    let mut data = vec![1.0f32];
    data.extend_from_slice(&mid);
    data.extend(mid.iter().map(|m| {
        f32::from_bits(if *m > 0.0 {
            m.to_bits() + 1
        } else {
            m.to_bits() - 1
        })
    }));
    data.push(0.0); // 32 values: one block of 32
    let t = quantize_nf4(&data, &[data.len()], 32, false).unwrap();
    let codes = t.codes();
    assert_eq!(codes[0], 15);
    for i in 0..15 {
        assert_eq!(
            codes[1 + i] as usize,
            i,
            "value on midpoint {i} takes the lower code"
        );
        assert_eq!(
            codes[16 + i] as usize,
            i + 1,
            "value just above midpoint {i}"
        );
    }
    assert_eq!(codes[31], 7);

    // Odd count: the last low nibble is 7; an all-zero block has absmax 0 and dequantizes to 0.
    let mut odd = vec![0.0f32; 64];
    odd.extend((0..33).map(|i| (i as f32 - 16.0) * 0.01));
    let t = quantize_nf4(&odd, &[97], 64, false).unwrap();
    assert_eq!(t.packed.len(), 49);
    assert_eq!(t.packed[48] & 0x0F, 7);
    let Nf4Stats::Absmax(a) = &t.stats else {
        panic!()
    };
    assert_eq!(a[0], 0.0);
    assert!(t.codes()[..64].iter().all(|&c| c == 7));
    let d = t.dequantize();
    assert_eq!(d.len(), 97);
    assert!(d[..64].iter().all(|&v| v.to_bits() == 0));
    // Blocks span rows: a [3, 40] tensor in blocks of 32 equals the flat [120] one.
    let x: Vec<f32> = (0..120)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
        .collect();
    let a = quantize_nf4(&x, &[3, 40], 32, true).unwrap();
    let b = quantize_nf4(&x, &[120], 32, true).unwrap();
    assert_eq!(a.packed, b.packed);
    assert_eq!(a.stats, b.stats);
}

#[test]
fn memory_figures() {
    // 1024 x 1024 at blocksize 64: 16384 blocks, 64 nested blocks.
    let n = 1024 * 1024;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 1e-4)
        .collect();
    let plain = quantize_nf4(&x, &[1024, 1024], 64, false).unwrap();
    assert_eq!(plain.bytes(), n / 2 + 4 * (n / 64)); // 0.5 + 4/64 = 0.5625 B/param
    assert_eq!(plain.bytes() as f64 / n as f64, 0.5625);
    let dq = quantize_nf4(&x, &[1024, 1024], 64, true).unwrap();
    assert_eq!(dq.bytes(), n / 2 + n / 64 + 4 * (n / 64 / 256) + 4); // + the f32 offset
    let per_param = dq.bytes() as f64 / n as f64;
    let expected = 0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0);
    assert!(
        (per_param - expected).abs() < 1e-5,
        "{per_param} vs {expected}"
    );
    assert!(4.0 / per_param > 7.7, "about 7.75x smaller than f32");
}

#[test]
fn invalid_arguments_are_errors() {
    let x = vec![0.5f32; 128];
    for bs in [0usize, 16, 48, 100, 8192] {
        match quantize_nf4(&x, &[128], bs, false) {
            Err(Error::Invalid(msg)) => assert!(msg.contains(&bs.to_string()), "{msg}"),
            other => panic!("blocksize {bs}: {other:?}"),
        }
    }
    assert!(matches!(
        quantize_nf4(&x, &[2, 63], 64, false),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        quantize_nf4(&[], &[0], 64, false),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        quantize_nf4(&x, &[usize::MAX, 3], 64, false),
        Err(Error::Invalid(_))
    ));
    let mut y = x.clone();
    y[5] = f32::NAN;
    assert!(matches!(
        quantize_nf4(&y, &[128], 64, true),
        Err(Error::Invalid(_))
    ));
    y[5] = f32::INFINITY;
    assert!(matches!(
        quantize_nf4(&y, &[128], 64, false),
        Err(Error::Invalid(_))
    ));
    // An inconsistent hand-made tensor is refused by the writer.
    let mut t = quantize_nf4(&x, &[128], 64, false).unwrap();
    t.packed.pop();
    assert!(t.validate().is_err());
    let mut out = Vec::new();
    assert!(matches!(
        write_bnb_nf4("w", &t, &mut out),
        Err(Error::Invalid(_))
    ));
    assert!(out.is_empty());
}

// ---------------------------------------------------------------- bitsandbytes format

const PLAIN_FILE: &str = "tiny-llama/dev_qlora/base_nf4_weights.safetensors";
const DQ_FILE: &str = "tiny-llama/dev_qlora_dq/base_nf4_weights.safetensors";

fn load(rel: &str) -> Vec<u8> {
    read_bytes(&fixtures().join(rel))
}

fn quant_state_json(st: &SafeTensors, w: &str) -> BTreeMap<String, Value> {
    let bytes = u8s(st, &format!("{w}{NF4_QUANT_STATE_SUFFIX}"));
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn bnb_files_load_and_dequantize_bit_exact() {
    for (rel, dq) in [(PLAIN_FILE, false), (DQ_FILE, true)] {
        let bytes = load(rel);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let names = bnb_weight_names(&st);
        assert_eq!(names.len(), 14, "{rel}: 2 layers x 7 projections");
        // Exactly the weights that have a `.dequantized` tensor beside them.
        let with_deq: Vec<String> = {
            let mut v: Vec<String> = st
                .names()
                .into_iter()
                .filter_map(|n| n.strip_suffix(".dequantized").map(str::to_owned))
                .collect();
            v.sort();
            v
        };
        assert_eq!(names, with_deq);
        let all = read_all_bnb_nf4(rel, &st).unwrap();
        // docs/nf4.md: the 86,016 projection parameters take 48,384 bytes as NF4 and 44,464
        // with double quantization.
        assert_eq!(all.iter().map(|(_, t)| t.numel()).sum::<usize>(), 86_016);
        let bytes: usize = all.iter().map(|(_, t)| t.bytes()).sum();
        assert_eq!(bytes, if dq { 44_464 } else { 48_384 });
        for (w, t) in all {
            assert_eq!(t.is_double_quant(), dq);
            assert_eq!(t.blocksize, 64);
            let deq_name = format!("{w}.dequantized");
            assert_eq!(t.shape, shape_of(&st, &deq_name), "{w}: shape");
            assert_bits_eq(
                &t.dequantize(),
                &f32s(&st, &deq_name),
                &format!("{rel} {w}"),
            );
        }
    }
}

/// Compares what we write with the tensors of the reference file for the same weights.
fn assert_written_equals_file(ours: &[RawTensor], st: &SafeTensors, rel: &str, exact_offset: bool) {
    for t in ours {
        let v = st
            .tensor(&t.name)
            .unwrap_or_else(|_| panic!("{rel}: no tensor {}", t.name));
        assert_eq!(t.dtype, v.dtype(), "{}: dtype", t.name);
        let is_json = t.name.ends_with(NF4_QUANT_STATE_SUFFIX);
        if exact_offset || !is_json {
            // (The JSON blob's length follows the digits of nested_offset.)
            assert_eq!(t.shape, v.shape(), "{}: shape", t.name);
        } else {
            assert_eq!(t.shape.len(), 1, "{}: rank", t.name);
        }
        if is_json {
            let a: BTreeMap<String, Value> = serde_json::from_slice(&t.data).unwrap();
            let b: BTreeMap<String, Value> = serde_json::from_slice(v.data()).unwrap();
            assert_eq!(
                a.keys().collect::<Vec<_>>(),
                b.keys().collect::<Vec<_>>(),
                "{}: JSON fields",
                t.name
            );
            for (k, va) in &a {
                if k == "nested_offset" && !exact_offset {
                    let (x, y) = (va.as_f64().unwrap(), b[k].as_f64().unwrap());
                    assert!(
                        (x - y).abs() < 0.01 * y.abs(),
                        "{}: nested_offset {x} vs {y}",
                        t.name
                    );
                } else {
                    assert_eq!(va, &b[k], "{}: JSON field {k}", t.name);
                }
            }
            if exact_offset {
                // Same bytes as Python's json.dumps.
                assert_eq!(
                    std::str::from_utf8(&t.data).unwrap(),
                    std::str::from_utf8(v.data()).unwrap()
                );
            }
        } else if exact_offset
            || !(t.name.ends_with(".absmax") || t.name.ends_with(".nested_absmax"))
        {
            assert_eq!(t.data, v.data(), "{}: bytes", t.name);
        }
    }
}

#[test]
fn bnb_write_reproduces_reference_files() {
    let plain_bytes = load(PLAIN_FILE);
    let plain = SafeTensors::deserialize(&plain_bytes).unwrap();
    let dq_bytes = load(DQ_FILE);
    let dq = SafeTensors::deserialize(&dq_bytes).unwrap();
    let names = bnb_weight_names(&plain);
    assert_eq!(names, bnb_weight_names(&dq));

    // Re-quantizing the plain file's dequantized weights gives back the same codes and absmax
    // (each block's largest element decodes to exactly ±absmax), so both files are reproduced
    // tensor for tensor, byte for byte, JSON included. With double quantization the original
    // absmax (hence torch's offset, the 8-bit codes and nested absmax) is reproduced too.
    for (file, st, double) in [(PLAIN_FILE, &plain, false), (DQ_FILE, &dq, true)] {
        let mut ours = Vec::new();
        for w in &names {
            let x = f32s(&plain, &format!("{w}.dequantized"));
            let shape = shape_of(&plain, &format!("{w}.dequantized"));
            let t = quantize_nf4(&x, &shape, 64, double).unwrap();
            write_bnb_nf4(w, &t, &mut ours).unwrap();
        }
        let ours_names: BTreeSet<String> = ours.iter().map(|t| t.name.clone()).collect();
        let mut file_names: BTreeSet<String> = st.names().into_iter().map(str::to_owned).collect();
        file_names.retain(|n| !n.ends_with(".dequantized"));
        assert_eq!(ours_names, file_names, "{file}: tensor names");
        assert_written_equals_file(&ours, st, file, true);
    }

    // Quantizing the double-quantized file's own dequantized weights (whose block maxima are the
    // decoded absmax') gives the same names, dtypes, shapes, codes and JSON fields; only the
    // statistics' values (absmax, nested_absmax, nested_offset) move with the changed absmax.
    let mut ours = Vec::new();
    for w in &names {
        let x = f32s(&dq, &format!("{w}.dequantized"));
        let t = quantize_nf4(&x, &shape_of(&dq, &format!("{w}.dequantized")), 64, true).unwrap();
        write_bnb_nf4(w, &t, &mut ours).unwrap();
    }
    assert_written_equals_file(&ours, &dq, DQ_FILE, false);
    for w in &names {
        let js = quant_state_json(&dq, w);
        assert_eq!(js["quant_type"], "nf4");
        assert_eq!(js["nested_blocksize"], 256);
        assert_eq!(js["nested_dtype"], "float32");
        assert_eq!(js["dtype"], "float32");
    }
}

#[test]
fn plain_file_double_quantized_equals_dq_file() {
    let plain_bytes = load(PLAIN_FILE);
    let plain = SafeTensors::deserialize(&plain_bytes).unwrap();
    let dq_bytes = load(DQ_FILE);
    let dq = SafeTensors::deserialize(&dq_bytes).unwrap();
    for w in bnb_weight_names(&plain) {
        let a = read_bnb_nf4(PLAIN_FILE, &plain, &w)
            .unwrap()
            .to_double_quant()
            .unwrap();
        let b = read_bnb_nf4(DQ_FILE, &dq, &w).unwrap();
        assert_tensor_bits_eq(&a, &b, &w);
    }
}

#[test]
fn bnb_round_trip() {
    let mut tensors: Vec<(String, Nf4Tensor)> = Vec::new();
    for (i, rel) in [PLAIN_FILE, DQ_FILE].iter().enumerate() {
        let bytes = load(rel);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (w, t) in read_all_bnb_nf4(rel, &st).unwrap() {
            tensors.push((format!("f{i}.{w}"), t));
        }
    }
    // Odd sizes, several block sizes, more than 256 blocks (several nested blocks), 1-D and 3-D.
    let synth = |n: usize, seed: u32| -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    for (k, (shape, bs)) in [
        (vec![33usize, 47], 32usize),
        (vec![1001], 128),
        (vec![3, 5, 7], 4096),
        (vec![300, 130], 64),
        (vec![257, 64], 32),
    ]
    .into_iter()
    .enumerate()
    {
        let n: usize = shape.iter().product();
        for double in [false, true] {
            let t = quantize_nf4(&synth(n, k as u32 + 1), &shape, bs, double).unwrap();
            tensors.push((format!("synth{k}.{double}.weight"), t));
        }
    }
    let mut out = Vec::new();
    for (w, t) in &tensors {
        write_bnb_nf4(w, t, &mut out).unwrap();
    }
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let bytes = serialize_tensors(&out, Some(meta)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let back = read_all_bnb_nf4("roundtrip.safetensors", &st).unwrap();
    let mut expected = tensors.clone();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(back.len(), expected.len());
    for ((wa, a), (wb, b)) in expected.iter().zip(&back) {
        assert_eq!(wa, wb);
        assert_tensor_bits_eq(a, b, wa);
        assert_eq!(a, b);
    }
    // Duplicate names are refused, not silently overwritten.
    let dup = vec![out[0].clone(), out[0].clone()];
    assert!(matches!(
        serialize_tensors(&dup, None),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn python_float_repr_matches_python() {
    for (x, s) in [
        (0.05133361741900444, "0.05133361741900444"),
        (0.049137115478515625, "0.049137115478515625"),
        (1e-05, "1e-05"),
        (1.5e-07, "1.5e-07"),
        (0.0001, "0.0001"),
        (123.0, "123.0"),
        (-2.5, "-2.5"),
        (1e16, "1e+16"),
        (1234567890123456.0, "1234567890123456.0"),
        (0.0, "0.0"),
        (f64::from(0.1f32), "0.10000000149011612"),
    ] {
        assert_eq!(python_float_repr(x), s);
    }
}

// ---------------------------------------------------------------- bad input

const W: &str = "model.layers.0.mlp.down_proj.weight";

/// The tensors bitsandbytes writes for `W`, from the reference files.
fn base_tensors(double: bool) -> Vec<RawTensor> {
    let bytes = load(if double { DQ_FILE } else { PLAIN_FILE });
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = read_bnb_nf4("ref", &st, W).unwrap();
    let mut out = Vec::new();
    write_bnb_nf4(W, &t, &mut out).unwrap();
    out
}

fn read_mutated(double: bool, f: impl FnOnce(&mut Vec<RawTensor>)) -> Result<Nf4Tensor, Error> {
    let mut tensors = base_tensors(double);
    f(&mut tensors);
    let bytes = serialize_tensors(&tensors, None).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    read_bnb_nf4("bad.safetensors", &st, W)
}

fn expect_format_err(r: Result<Nf4Tensor, Error>, needles: &[&str]) {
    match r {
        Err(Error::Format { file, what }) => {
            assert_eq!(file, "bad.safetensors");
            for n in needles {
                assert!(what.contains(n), "error {what:?} should mention {n:?}");
            }
        }
        other => panic!("expected a format error mentioning {needles:?}, got {other:?}"),
    }
}

fn find<'a>(ts: &'a mut [RawTensor], suffix: &str) -> &'a mut RawTensor {
    let name = format!("{W}{suffix}");
    ts.iter_mut().find(|t| t.name == name).unwrap()
}

fn edit_json(ts: &mut [RawTensor], f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let t = find(ts, NF4_QUANT_STATE_SUFFIX);
    let mut v: Value = serde_json::from_slice(&t.data).unwrap();
    f(v.as_object_mut().unwrap());
    t.data = serde_json::to_vec(&v).unwrap();
    t.shape = vec![t.data.len()];
}

#[test]
fn bad_files_are_errors_naming_the_tensor() {
    let absmax = format!("{W}.absmax");
    let qs = format!("{W}{NF4_QUANT_STATE_SUFFIX}");
    // Sanity: the unmodified tensors read fine.
    read_mutated(false, |_| {}).unwrap();
    read_mutated(true, |_| {}).unwrap();

    // Missing / truncated / wrong-dtype absmax.
    expect_format_err(
        read_mutated(false, |ts| ts.retain(|t| t.name != absmax)),
        &["missing", &absmax],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            let t = find(ts, ".absmax");
            t.data.truncate(t.data.len() - 4);
            t.shape[0] -= 1;
        }),
        &[&absmax, "shape"],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            let t = find(ts, ".absmax");
            t.dtype = Dtype::F16;
            t.shape[0] *= 2;
        }),
        &[&absmax, "dtype"],
    );
    expect_format_err(
        read_mutated(true, |ts| {
            let t = find(ts, ".absmax");
            t.dtype = Dtype::I8;
        }),
        &[&absmax, "dtype"],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            let t = find(ts, ".absmax");
            t.data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }),
        &[&absmax],
    );
    // Packed codes of the wrong shape or dtype.
    expect_format_err(
        read_mutated(false, |ts| {
            let t = ts.iter_mut().find(|t| t.name == W).unwrap();
            t.shape = vec![t.data.len()];
        }),
        &[W, "shape"],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            let t = ts.iter_mut().find(|t| t.name == W).unwrap();
            t.data.truncate(t.data.len() - 2);
            t.shape = vec![t.data.len(), 1];
        }),
        &[W, "shape"],
    );
    // Quant state JSON: a missing field, a bad block size, wrong types, garbage, other types.
    for field in ["blocksize", "shape", "quant_type", "dtype"] {
        expect_format_err(
            read_mutated(false, |ts| {
                edit_json(ts, |o| {
                    o.remove(field);
                })
            }),
            &[&qs, field],
        );
    }
    expect_format_err(
        read_mutated(true, |ts| {
            edit_json(ts, |o| {
                o.remove("nested_offset");
            })
        }),
        &[&qs, "nested_offset"],
    );
    for bs in [48, 0, 16, 8192] {
        expect_format_err(
            read_mutated(false, |ts| {
                edit_json(ts, |o| {
                    o.insert("blocksize".into(), bs.into());
                })
            }),
            &[&qs, "blocksize", &bs.to_string()],
        );
    }
    expect_format_err(
        read_mutated(true, |ts| {
            edit_json(ts, |o| {
                o.insert("nested_blocksize".into(), 100.into());
            })
        }),
        &[&qs, "nested_blocksize"],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            edit_json(ts, |o| {
                o.insert("blocksize".into(), "64".into());
            })
        }),
        &[&qs, "blocksize"],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            edit_json(ts, |o| {
                o.insert("quant_type".into(), "fp4".into());
            })
        }),
        &[&qs, "fp4"],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            edit_json(ts, |o| {
                o.insert("shape".into(), serde_json::json!([64, 161]));
            })
        }),
        &[W, "shape"],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            edit_json(ts, |o| {
                o.insert("shape".into(), serde_json::json!([64, -1]));
            })
        }),
        &[&qs, "shape"],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            edit_json(ts, |o| {
                o.insert("extra".into(), 1.into());
            })
        }),
        &[&qs, "extra"],
    );
    expect_format_err(
        read_mutated(false, |ts| {
            let t = find(ts, NF4_QUANT_STATE_SUFFIX);
            t.data = b"{\"quant_type\": \"nf4\", \"blocksize\": 6".to_vec();
            t.shape = vec![t.data.len()];
        }),
        &[&qs, "JSON"],
    );
    // Nested tensors: missing map, absmax dtype mismatch with the JSON, a different code table.
    expect_format_err(
        read_mutated(true, |ts| {
            ts.retain(|t| !t.name.ends_with(".nested_quant_map"))
        }),
        &["missing", ".nested_quant_map"],
    );
    expect_format_err(
        read_mutated(true, |ts| {
            edit_json(ts, |o| {
                o.remove("nested_offset");
                o.remove("nested_blocksize");
                o.remove("nested_dtype");
            })
        }),
        &[".nested_absmax"],
    );
    expect_format_err(
        read_mutated(false, |ts| find(ts, ".quant_map").data[4] ^= 1),
        &[".quant_map"],
    );
    // FP4 weights and non-weights.
    expect_format_err(
        read_mutated(false, |ts| {
            find(ts, NF4_QUANT_STATE_SUFFIX).name = format!("{W}.quant_state.bitsandbytes__fp4");
        }),
        &[W, "FP4"],
    );
    let bytes = load(PLAIN_FILE);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    match read_bnb_nf4(PLAIN_FILE, &st, "model.embed_tokens.weight") {
        Err(Error::Format { file, what }) => {
            assert_eq!(file, PLAIN_FILE);
            assert!(what.contains("model.embed_tokens.weight"), "{what}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unreadable_or_truncated_files_are_errors() {
    let path = fixtures().join(DQ_FILE);
    assert_eq!(read_bnb_nf4_file(&path).unwrap().len(), 14);
    let bytes = load(DQ_FILE);
    let dir = std::env::temp_dir().join(format!("qlora_nf4_test_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, cut) in [0usize, 7, 100, bytes.len() / 2, bytes.len() - 1]
        .into_iter()
        .enumerate()
    {
        let p = dir.join(format!("truncated{i}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        match read_bnb_nf4_file(&p) {
            Err(Error::Format { file, .. }) => assert!(file.contains("truncated")),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(
        read_bnb_nf4_file(&fixtures().join("no_such_file.safetensors")),
        Err(Error::Format { .. })
    ));
}
