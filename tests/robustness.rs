//! Bad input never crashes, hangs or misleads (issue 12): each failure found by hand and by
//! mutation is reproduced here and must end with a clean error whose message is asserted:
//! header size fields far beyond the tensors present (config.json, GGUF), non-regular files, a
//! folder in place of a file, missing vs unreadable files, huge bad values quoted briefly,
//! tokenizer_config.json token fields of the wrong type, adapter files with a broken tensor,
//! flag bounds, a prompt longer than the context and generation that reaches the context's end.
//! The CLI cases run the `qlora` binary; the generation cases need a GPU adapter (lavapipe in CI).

mod common;
#[path = "common/gguf.rs"]
mod gguf;

use qlora_webgpu::io::hf::{load_hf, load_hf_dir, MmapDir};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_model() -> PathBuf {
    fixtures().join("tiny-llama/model")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-robust-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny model's files, by name.
fn tiny_files() -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(tiny_model()).unwrap() {
        let p = e.unwrap().path();
        m.insert(p.file_name().unwrap().to_str().unwrap().to_owned(), std::fs::read(&p).unwrap());
    }
    m
}

fn with_config(edit: impl FnOnce(&mut serde_json::Value)) -> BTreeMap<String, Vec<u8>> {
    let mut files = tiny_files();
    let mut cfg: serde_json::Value = serde_json::from_slice(&files["config.json"]).unwrap();
    edit(&mut cfg);
    files.insert("config.json".into(), serde_json::to_vec(&cfg).unwrap());
    files
}

/// Runs qlora with a time limit; returns (exit code, stderr).
fn qlora(args: &[&str], cwd: &Path, limit: Duration) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qlora");
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("qlora {args:?} still running after {limit:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output { status, stderr, .. } = child.wait_with_output().unwrap();
    (status.code().unwrap_or(-1), String::from_utf8_lossy(&stderr).into_owned())
}

fn fails_with(args: &[&str], cwd: &Path, needles: &[&str]) -> String {
    let (code, err) = qlora(args, cwd, Duration::from_secs(60));
    assert_eq!(code, 1, "qlora {args:?} should fail with exit code 1:\n{err}");
    for n in needles {
        assert!(err.contains(n), "qlora {args:?}: the message lacks {n:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "a panic:\n{err}");
    err
}

#[test]
fn huge_layer_counts_in_config_json_are_refused_before_allocating() {
    // 2^31, 2^32, 2^40 aborted the process (allocation failure), 2^62 panicked (capacity
    // overflow); the tiny model's files hold 20 tensors.
    for n in [1u64 << 31, 1 << 32, 1 << 40, 1 << 62, u64::MAX] {
        let files = with_config(|c| c["num_hidden_layers"] = n.into());
        let e = load_hf(&files).unwrap_err().to_string();
        assert!(e.starts_with("config.json: "), "{e}");
        assert!(e.contains(&format!("`num_hidden_layers` is {n} layers, but the model files hold only 20 tensors")), "{e}");
    }
    // Sizes whose products overflow are refused by the config itself.
    let files = with_config(|c| {
        c["vocab_size"] = (1u64 << 62).into();
    });
    let e = load_hf(&files).unwrap_err().to_string();
    assert!(e.contains("vocab_size x hidden_size") && e.contains("too large"), "{e}");
    let files = with_config(|c| {
        c["head_dim"] = (1u64 << 62).into();
    });
    let e = load_hf(&files).unwrap_err().to_string();
    assert!(e.contains("head_dim") && e.contains("too large"), "{e}");
}

#[test]
fn huge_gguf_block_count_is_refused_before_allocating() {
    let mut bytes = gguf::llama_gguf_from_hf(&tiny_model());
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("the key") + key.len();
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 4, "a u32 value");
    bytes[at + 4..at + 8].copy_from_slice(&(1u32 << 31).to_le_bytes());
    let e = qlora_webgpu::io::load_gguf("tiny.gguf", &bytes).unwrap_err().to_string();
    assert!(e.contains("tiny.gguf: `llama.block_count` is 2147483648 layers, but the model files hold only"), "{e}");
}

#[test]
fn a_fifo_is_refused_not_read() {
    let dir = tmp("fifo");
    let fifo = dir.join("model.gguf");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success(), "mkfifo");
    // `qlora info` blocked forever on opening it; now it ends at once with a message.
    let (code, err) = qlora(&["info", "model.gguf"], &dir, Duration::from_secs(10));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("model.gguf: not a regular file (a FIFO, socket or device): refused"), "{err}");
    // The same for a data file and a file inside a model folder.
    let e = qlora_webgpu::data::dataset::Dataset::from_jsonl_file(&fifo, qlora_webgpu::data::dataset::Format::Auto).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let folder = dir.join("folder");
    std::fs::create_dir(&folder).unwrap();
    assert!(Command::new("mkfifo").arg(folder.join("config.json")).status().unwrap().success());
    let e = MmapDir::open(&folder).err().expect("refused").to_string();
    assert!(e.contains("config.json: not a regular file"), "{e}");
}

#[test]
fn a_folder_in_place_of_config_json_is_named_as_such() {
    let dir = tmp("dir-config");
    for (name, bytes) in tiny_files() {
        if name != "config.json" {
            std::fs::write(dir.join(&name), bytes).unwrap();
        }
    }
    std::fs::create_dir(dir.join("config.json")).unwrap();
    let e = load_hf_dir(&dir).err().expect("refused").to_string();
    assert!(e.contains("config.json: is a folder, not a file"), "{e}");
    // Missing, by contrast:
    std::fs::remove_dir(dir.join("config.json")).unwrap();
    let e = load_hf_dir(&dir).err().expect("refused").to_string();
    assert!(e.contains("config.json: file not found"), "{e}");
}

#[test]
fn huge_bad_values_are_quoted_briefly() {
    let long = "x".repeat(100_000);
    let files = with_config(|c| c["hidden_act"] = long.clone().into());
    let e = load_hf(&files).unwrap_err().to_string();
    assert!(e.contains("hidden_act") && e.contains("(100000 characters)") && e.len() < 400, "{} chars: {}", e.len(), &e[..300.min(e.len())]);
    let files = with_config(|c| c["num_hidden_layers"] = long.clone().into());
    let e = load_hf(&files).unwrap_err().to_string();
    assert!(e.contains("num_hidden_layers") && e.len() < 400, "{} chars", e.len());
    assert_eq!(qlora_webgpu::error::quote("short"), "short");
}

#[test]
fn tokenizer_config_token_fields_must_be_tokens_and_errors_name_the_folder() {
    let dir = tmp("tokcfg");
    for (name, bytes) in tiny_files() {
        std::fs::write(dir.join(&name), bytes).unwrap();
    }
    let base: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    for (field, value) in [("bos_token", serde_json::json!(1)), ("eos_token", serde_json::json!(2.5)), ("pad_token", serde_json::json!({"id": 3}))] {
        let mut c = base.clone();
        c[field] = value;
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
        let d = MmapDir::open(&dir).unwrap();
        let e = qlora_webgpu::session::ModelSource::from_hf("tiny", &d).err().expect("refused").to_string();
        let path = dir.join("tokenizer_config.json").display().to_string();
        assert!(e.starts_with(&path) && e.contains(&format!("field `{field}`")) && e.contains("is not a token"), "{e}");
    }
    // A broken tokenizer.json names its path in the folder.
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec(&base).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{\"model\": 3}").unwrap();
    let d = MmapDir::open(&dir).unwrap();
    let e = qlora_webgpu::session::ModelSource::from_hf("tiny", &d).err().expect("refused").to_string();
    assert!(e.starts_with(&dir.join("tokenizer.json").display().to_string()), "{e}");
}

#[test]
fn flag_bounds_are_enforced_with_messages() {
    let dir = tmp("flags");
    std::fs::copy(fixtures().join("data/chat.jsonl"), dir.join("chat.jsonl")).unwrap();
    let m = tiny_model().display().to_string();
    let train = |extra: &[&str], needles: &[&str]| {
        let mut a = vec!["train", m.as_str(), "--data", "chat.jsonl", "--out", "o"];
        a.extend_from_slice(extra);
        fails_with(&a, &dir, needles);
    };
    train(&["--steps", "9223372036854775807"], &["steps 9223372036854775807 must be in 1..=100000000"]);
    train(&["--lora-alpha", "9223372036854775807"], &["lora_alpha 922337203685477", "must be in (0, 1000000]"]);
    train(&["--lora-alpha", "0"], &["lora_alpha 0 must be in (0, 1000000]"]);
    train(&["--max-len", "4294967296"], &["max_len 4294967296 must be at most 1048576"]);
    train(&["--batch-size", "1000000"], &["must each be at most 65536"]);
    // max_new_tokens wrapped around in `max_new_tokens + 4096`.
    fails_with(
        &["generate", &m, "--prompt", "hi", "--max-new-tokens", "18446744073709551615"],
        &dir,
        &["max_new_tokens 18446744073709551615 must be at most 16777216"],
    );
}

#[test]
fn resume_names_a_missing_or_unreadable_or_broken_run_config() {
    let dir = tmp("resume-config");
    std::fs::copy(fixtures().join("data/chat.jsonl"), dir.join("chat.jsonl")).unwrap();
    let m = tiny_model().display().to_string();
    std::fs::create_dir_all(dir.join("o/checkpoint")).unwrap();
    let args = ["train", m.as_str(), "--data", "chat.jsonl", "--out", "o", "--resume"];
    fails_with(&args, &dir, &["--resume: o/train_config.toml: cannot read: no such file"]);
    std::fs::create_dir(dir.join("o/train_config.toml")).unwrap();
    fails_with(&args, &dir, &["--resume: o/train_config.toml: is a folder, not a file"]);
    std::fs::remove_dir(dir.join("o/train_config.toml")).unwrap();
    std::fs::write(dir.join("o/train_config.toml"), "r = 4\nsteps = [unclosed\n").unwrap();
    fails_with(&args, &dir, &["--resume: o/train_config.toml: line 2:"]);
    // A config file given with --config: the file and line, and a long bad value cut short.
    std::fs::write(dir.join("run.toml"), format!("r = 4\nlr_scheduler = {}\n", "y".repeat(50_000))).unwrap();
    let e = fails_with(&["train", "--config", "run.toml"], &dir, &["run.toml: line 2:"]);
    assert!(e.len() < 600, "{} characters", e.len());
}

#[test]
fn ctrl_c_right_after_start_exits_130_in_order() {
    // The handler used to be installed after the model was loaded: a Ctrl-C in the first
    // ~0.3 s killed the process on the signal. Now it is the first thing `train` does.
    let dir = tmp("early-ctrl-c");
    std::fs::copy(fixtures().join("data/chat.jsonl"), dir.join("chat.jsonl")).unwrap();
    let m = tiny_model().display().to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["train", &m, "--data", "chat.jsonl", "--steps", "3", "--batch-size", "2", "--max-len", "32", "--out", "o"])
        .current_dir(&dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "exit status {:?} (killed by the signal when None):\n{err}", out.status);
    assert!(!dir.join("o/checkpoint").exists() || dir.join("o/checkpoint/manifest.json").exists(), "no partial checkpoint");
}

/// Trains the tiny model for 4 steps (a checkpoint every 2) into `dir/o`; returns the args
/// that continue it to 6 steps with --resume.
fn trained_run(dir: &Path) -> Vec<String> {
    std::fs::copy(fixtures().join("data/chat.jsonl"), dir.join("chat.jsonl")).unwrap();
    let m = tiny_model().display().to_string();
    let base: Vec<String> = ["train", &m, "--data", "chat.jsonl", "-r", "2", "--batch-size", "2", "--max-len", "48", "--save-every", "2", "--lr", "1e-3", "--out", "o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut first = base.clone();
    first.extend(["--steps".into(), "4".into()]);
    let a: Vec<&str> = first.iter().map(String::as_str).collect();
    let (code, err) = qlora(&a, dir, Duration::from_secs(300));
    assert_eq!(code, 0, "{err}");
    let mut resume = base;
    resume.extend(["--steps".into(), "6".into(), "--resume".into()]);
    resume
}

fn sha_hex(b: &[u8]) -> String {
    qlora_webgpu::io::sha256::hex(&qlora_webgpu::io::sha256::sha256(b))
}

#[test]
fn changed_or_corrupted_checkpoints_and_adapters_are_refused() {
    let dir = tmp("checksums");
    let resume = trained_run(&dir);
    let ra: Vec<&str> = resume.iter().map(String::as_str).collect();
    let ck = dir.join("o/checkpoint");
    let pristine: Vec<(String, Vec<u8>)> = ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json", "manifest.json"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(ck.join(n)).unwrap()))
        .collect();
    let restore = || {
        for (n, b) in &pristine {
            std::fs::write(ck.join(n), b).unwrap();
        }
    };
    let manifest: serde_json::Value = serde_json::from_slice(&pristine[4].1).unwrap();
    assert_eq!(manifest["settings"]["r"], 2, "the manifest records the run's settings: {manifest}");
    for (n, b) in &pristine[..4] {
        assert_eq!(manifest["files"][n], sha_hex(b), "{n}");
    }

    // One flipped bit in any file: refused, naming the file.
    for (i, name) in ["adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"].iter().enumerate() {
        let mut b = pristine.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let at = b.len() - 1 - 8 * i;
        b[at] ^= 0x10;
        std::fs::write(ck.join(name), &b).unwrap();
        fails_with(&ra, &dir, &[&format!("checkpoint/{name}: SHA-256"), "refusing to resume"]);
        restore();
    }
    std::fs::remove_file(ck.join("manifest.json")).unwrap();
    fails_with(&ra, &dir, &["checkpoint/manifest.json: cannot read: no such file"]);
    restore();

    // trainer_state.json edited and the manifest made to match: the state itself is checked.
    let state: serde_json::Value = serde_json::from_slice(&pristine[3].1).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value), needles: &[&str]| {
        let mut s = state.clone();
        f(&mut s);
        let text = serde_json::to_vec_pretty(&s).unwrap();
        let mut m = manifest.clone();
        m["files"]["trainer_state.json"] = sha_hex(&text).into();
        std::fs::write(ck.join("trainer_state.json"), &text).unwrap();
        std::fs::write(ck.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        fails_with(&ra, &dir, needles);
        restore();
    };
    edit(&|s| s["step"] = 0.into(), &["trainer_state.json", "step is 0"]);
    edit(&|s| s["adamw"]["steps"] = (1u64 << 63).into(), &["adamw.steps 9223372036854775808 differs from step 4"]);
    edit(&|s| s["schedule"]["total_steps"] = (1u64 << 63).into(), &["schedule.total_steps 9223372036854775808 is not in 4..=100000000"]);
    edit(&|s| s["data"]["epoch"] = 7.into(), &["chat.jsonl: the checkpoint's trainer_state.json: data position epoch 7 index 0 does not follow from step 4 (expected epoch 2 index 0"]);
    let lr_bits = format!("{:016x}", 2e-3f64.to_bits());
    edit(
        &|s| {
            s["adamw"]["lr_bits"] = lr_bits.clone().into();
            s["schedule"]["base_lr_bits"] = lr_bits.clone().into();
        },
        &["does not belong to this run: lr: 2e-3"],
    );
    // Settings recorded in the manifest that differ from the command line: named.
    let mut m = manifest.clone();
    m["settings"]["seed"] = 9.into();
    std::fs::write(ck.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    fails_with(&ra, &dir, &["written by a run with other settings: seed: 9 -> null"]);
    restore();

    // The untouched checkpoint resumes.
    let (code, err) = qlora(&ra, &dir, Duration::from_secs(300));
    assert_eq!(code, 0, "{err}");

    // The adapter written to OUT carries per-tensor SHA-256 in its metadata; a flipped bit in
    // a tensor's data is refused naming that tensor. Without the metadata (as PEFT writes it)
    // the same bytes load.
    let ad = dir.join("o");
    let bytes = std::fs::read(ad.join("adapter_model.safetensors")).unwrap();
    let st = qlora_webgpu::io::SafeTensorsFile::parse("a", &bytes).unwrap();
    assert!(st.metadata().contains_key(qlora_webgpu::lora::peft::CHECKSUM_KEY));
    let first = st.tensors().iter().min_by_key(|t| st.data(&t.name).unwrap().as_ptr() as usize).unwrap().name.clone();
    let cfg = qlora_webgpu::model::config::ModelConfig::from_json("config.json", &std::fs::read(tiny_model().join("config.json")).unwrap()).unwrap().to_llama();
    qlora_webgpu::lora::peft::read_host_adapter(&ad, &cfg).expect("the adapter as written loads");
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut flipped = bytes.clone();
    flipped[header + 1] ^= 0x01;
    std::fs::write(ad.join("adapter_model.safetensors"), &flipped).unwrap();
    let e = qlora_webgpu::lora::peft::read_host_adapter(&ad, &cfg).unwrap_err().to_string();
    assert!(e.contains(&format!("tensor {first}: its data does not match the SHA-256")), "{e}");
    // A broken tensor entry in the header names the tensor.
    let text = String::from_utf8_lossy(&bytes[8..header]).into_owned();
    let broken = text.replacen("\"data_offsets\":[0,", "\"data_offsets\":[7,", 1);
    assert_ne!(broken, text);
    let mut b2 = bytes[..8].to_vec();
    b2.extend(broken.as_bytes());
    b2.extend(&bytes[header..]);
    std::fs::write(ad.join("adapter_model.safetensors"), &b2).unwrap();
    let e = qlora_webgpu::lora::peft::read_host_adapter(&ad, &cfg).unwrap_err().to_string();
    assert!(e.contains("adapter_model.safetensors") && e.contains(&first), "{e}");
}
