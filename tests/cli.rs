//! The `qlora` command line on the tiny reference Llama (tests/fixtures/tiny-llama):
//! - through the CLI alone, PEFT's reference run (its two texts as a {"text"} JSONL, batch 2,
//!   max length 24, its initial adapter, AdamW lr 1e-3, 20 steps, constant schedule) logs PEFT's
//!   20 losses within 2e-4 and saves PEFT's final adapter within 1e-3 relative per tensor;
//! - the same for PEFT's DoRA run (`--use-dora` from its initial DoRA adapter): its 20 losses and
//!   final A, B and magnitudes;
//! - train (TOML config with a flag overriding it) -> generate with the adapter (greedy tokens
//!   equal to an independent f64 model's on transformers' prompt ids) -> eval -> merge, where
//!   the merged model's loss equals base + adapter;
//! - Ctrl-C during training writes a checkpoint and exits 130, and `--resume` finishes the run
//!   with the same losses and adapter, bit for bit, as a run never stopped;
//! - bad arguments and inputs exit 1 with a message naming what is wrong.

mod common;
#[path = "common/llama_f64.rs"]
mod llama_f64;
use common::load_safetensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_model() -> PathBuf {
    fixtures().join("tiny-llama/model")
}

fn qlora_cmd(args: &[&str], cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qlora"));
    c.args(args).current_dir(cwd);
    c
}

/// Runs qlora; returns (exit code, stdout, stderr).
fn qlora(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let Output { status, stdout, stderr } = qlora_cmd(args, cwd).output().expect("run qlora");
    (status.code().unwrap_or(-1), String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned())
}

fn ok(args: &[&str], cwd: &Path) -> String {
    let (code, out, err) = qlora(args, cwd);
    assert_eq!(code, 0, "qlora {args:?} failed:\n{err}");
    out
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The metrics log's lines that have a training loss: (step, loss).
fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn peft_reference_run_through_the_cli() {
    let dir = peft_run_through_the_cli("dev", "manifest.json", "dev/adapter_final", &[], (2e-4, 1e-3));
    std::fs::remove_dir_all(&dir).ok();
}

/// PEFT's DoRA run (dora_manifest.json) through `qlora train --use-dora` from PEFT's initial DoRA
/// adapter: PEFT's losses (achieved 1.9e-6, bound 1e-5) and final A, B and magnitudes (achieved
/// 5.4e-5, bound 5e-4). Then, on the trained DoRA adapter: eval with it equals eval of its merge,
/// and generate with it writes the merged model's greedy text; a fresh `--use-dora` run writes
/// PEFT's keys and shapes; `--use-dora` with a plain LoRA --init-adapter is refused.
#[test]
fn peft_dora_run_through_the_cli() {
    let dir = peft_run_through_the_cli("dev_dora", "dora_manifest.json", "dev_dora/adapter_final", &["--use-dora"], (1e-5, 5e-4));
    let m = tiny_model();
    let m = m.to_str().unwrap();
    let eval_loss = |args: &[&str]| -> f64 {
        let out = ok(args, &dir);
        out.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("eval output: {out}"))
    };
    let with = eval_loss(&["eval", m, "--data", "dev.jsonl", "--adapter", "out", "--max-len", "24"]);
    let merge = ok(&["merge", m, "--adapter", "out", "--out", "merged", "--dtype", "f32"], &dir);
    assert!(merge.contains("merged 14 adapted projections"), "{merge}");
    let merged = eval_loss(&["eval", "merged", "--data", "dev.jsonl", "--max-len", "24"]);
    // Achieved 0 (lavapipe); bound 3e-6, about 3 f32 ulps of the loss (~10.27).
    eprintln!("DoRA eval: base + adapter {with}, merged {merged}");
    assert!((with - merged).abs() <= 3e-6, "merged DoRA model's loss {merged} vs base + adapter {with}");
    let gen = |args: &[&str]| {
        let (code, out, err) = qlora(args, &dir);
        assert_eq!(code, 0, "{err}");
        out
    };
    let prompt = "The quick brown fox";
    let a = gen(&["generate", m, "--adapter", "out", "--prompt", prompt, "--max-new-tokens", "8"]);
    let b = gen(&["generate", "merged", "--prompt", prompt, "--max-new-tokens", "8"]);
    assert_eq!(a, b, "greedy text with the DoRA adapter vs its merged model");

    // A fresh DoRA adapter: PEFT's file layout (keys, shapes, use_dora).
    ok(&["train", m, "--data", "dev.jsonl", "--use-dora", "--steps", "1", "--batch-size", "2", "--max-len", "24", "-r", "8", "--out", "fresh"], &dir);
    let ours = load_safetensors(&dir.join("fresh/adapter_model.safetensors"));
    let peft = load_safetensors(&fixtures().join("tiny-llama/dev_dora/adapter_init/adapter_model.safetensors"));
    let shapes = |t: &std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>| {
        let mut v: Vec<(String, Vec<usize>)> = t.iter().map(|(k, (s, _))| (k.clone(), s.clone())).collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&ours), shapes(&peft), "a fresh --use-dora adapter has PEFT's keys and shapes");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("fresh/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_dora"].as_bool(), Some(true));

    let plain = fixtures().join("tiny-llama/dev/adapter_init");
    let (code, _, err) = qlora(&["train", m, "--data", "dev.jsonl", "--use-dora", "--init-adapter", plain.to_str().unwrap(), "--out", "x"], &dir);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--use-dora") && err.contains("plain LoRA"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// PEFT's run `name` through `qlora train` (its texts as JSONL, its initial adapter, AdamW lr 1e-3,
/// 20 steps, constant schedule): its losses within `bounds.0` and its final adapter within
/// `bounds.1` relative per tensor. Returns the working folder (the adapter in `out`).
fn peft_run_through_the_cli(name: &str, manifest_file: &str, final_dir: &str, extra: &[&str], bounds: (f64, f64)) -> PathBuf {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("tiny-llama").join(manifest_file)).unwrap()).unwrap();
    let case = &m["cases"][name];
    let dir = tmp(name);
    let texts: String = case["texts"].as_array().unwrap().iter().map(|t| format!("{}\n", serde_json::json!({ "text": t }))).collect();
    std::fs::write(dir.join("dev.jsonl"), texts).unwrap();
    let init = fixtures().join(format!("tiny-llama/{name}/adapter_init"));
    let seq_len = case["seq_len"].to_string();
    let model = tiny_model();
    let mut args = vec![
            "train",
            model.to_str().unwrap(),
            "--data",
            "dev.jsonl",
            "--batch-size",
            "2",
            "--max-len",
            &seq_len,
            "--init-adapter",
            init.to_str().unwrap(),
            "--lr",
            "1e-3",
            "--steps",
            "20",
            "--lr-scheduler",
            "constant",
            "--warmup-steps",
            "0",
            "--weight-decay",
            "0",
            "--max-grad-norm",
            "0",
            "--no-shuffle",
            "--no-append-eos",
            "--out",
            "out",
    ];
    args.extend(extra);
    ok(&args, &dir);
    let got = losses(&dir.join("out"));
    let want: Vec<f64> = case["losses_adamw"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got.len(), 20, "one metrics line per step");
    let worst = got.iter().zip(&want).map(|((_, g), w)| (g - w).abs()).fold(0.0, f64::max);
    eprintln!("20 losses through the CLI vs PEFT: worst |difference| {worst:.2e}");
    for (k, ((step, g), w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(*step, k as u64 + 1);
        assert!((g - w).abs() <= bounds.0, "step {step}: loss {g} vs PEFT {w}");
    }
    let ours = load_safetensors(&dir.join("out/adapter_model.safetensors"));
    let peft = load_safetensors(&fixtures().join("tiny-llama").join(final_dir).join("adapter_model.safetensors"));
    assert_eq!(ours.len(), peft.len(), "same tensors");
    let mut worst = 0.0f64;
    for (k, (shape, want)) in &peft {
        let (s, got) = ours.get(k).unwrap_or_else(|| panic!("{k} missing from the CLI's adapter"));
        assert_eq!(s, shape, "{k}");
        let r = rel(got, want);
        worst = worst.max(r);
        assert!(r <= bounds.1, "{k}: relative difference {r:.2e} from PEFT's final adapter");
    }
    eprintln!("final adapter vs PEFT: worst relative difference per tensor {worst:.2e}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("out/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(16.0)), "the initial adapter's config is kept");
    assert_eq!(cfg["use_dora"].as_bool(), Some(name == "dev_dora"));
    dir
}

#[test]
fn train_generate_eval_merge() {
    let dir = tmp("flow");
    let data = fixtures().join("data/chat.jsonl");
    // The config file says 3 steps; the flag says 5 and wins. Paths in the file are relative to it.
    std::fs::copy(&data, dir.join("chat.jsonl")).unwrap();
    std::fs::write(
        dir.join("run.toml"),
        format!(
            "model = {:?}\ndata = \"chat.jsonl\"\nr = 4\nlora_alpha = 8.0\nsteps = 3\nlr = 5e-3\nbatch_size = 2\nmax_len = 64\nseed = 3\nval_fraction = 0.25\neval_every = 2\nprompts = \"chat.jsonl\"\nsample_tokens = 4\n",
            tiny_model().display().to_string()
        ),
    )
    .unwrap();
    let out = ok(&["train", "--config", "run.toml", "--steps", "5", "--out", "a"], &dir);
    assert!(out.contains("after:"), "sample answers are printed: {out}");
    let a = dir.join("a");
    for f in ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.svg", "train_config.toml", "samples.md", "checkpoint/trainer_state.json"] {
        assert!(a.join(f).is_file(), "{f} is written");
    }
    let l = losses(&a);
    assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5], "the flag's 5 steps, not the file's 3");
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let vals = metrics.lines().filter(|l| l.contains("\"val_loss\"")).count();
    assert_eq!(vals, 4, "validation at steps 0, 2, 4 and 5:\n{metrics}");
    let svg = std::fs::read_to_string(a.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("training") && svg.contains("validation"), "loss plot");
    let toml_text = std::fs::read_to_string(a.join("train_config.toml")).unwrap();
    assert!(toml_text.contains("steps = 5") && toml_text.contains("r = 4"), "{toml_text}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 4);

    let model = tiny_model();
    let m = model.to_str().unwrap();
    // Greedy generation with an adapter: the tokens of an independent f64 model (base + the
    // adapter, tests/common/llama_f64.rs) run greedily on transformers' ids of the same chat
    // prompt (tests/fixtures/tokenizer_ref.json `chat`, SmolLM2's template). With the adapter
    // just trained the random tiny model repeats the prompt's last token ("\n"); PEFT's trained
    // dev adapter (r 8, B far from zero) makes it produce varied tokens.
    let tok_ref: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("tokenizer_ref.json")).unwrap()).unwrap();
    let chat = &tok_ref["chat"];
    assert_eq!(chat["messages"].as_array().unwrap().len(), 1);
    let question = chat["messages"][0]["content"].as_str().unwrap();
    let prompt_ids: Vec<u32> = chat["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let tok = qlora_webgpu::data::Tokenizer::from_hf_files(
        &std::fs::read(model.join("tokenizer.json")).unwrap(),
        Some(&std::fs::read(model.join("tokenizer_config.json")).unwrap()),
    )
    .unwrap();
    const NEW: usize = 8;
    let peft_final = fixtures().join("tiny-llama/dev/adapter_final");
    for adapter in [dir.join("a"), peft_final] {
        let mut f64_model = llama_f64::Llama64::from_hf(&model);
        f64_model.add_lora(&adapter);
        let (want_ids, min_gap) = f64_model.greedy(&prompt_ids, NEW, &[2]);
        // The GPU's f32 logits are within ~1e-5 of the f64 ones; a reference whose best and
        // second-best logits were closer than 1e-3 would not decide the greedy choice
        // (achieved: 4.8e-2 with the trained adapter, 9.7e-3 with PEFT's).
        eprintln!("{}: f64 greedy reference {want_ids:?}, smallest top-2 logit gap {min_gap:.2e}", adapter.display());
        assert!(min_gap > 1e-3, "the reference's greedy choices are near-ties ({min_gap:.2e}): pick another prompt");
        let want_text = tok.decode(&want_ids, true).unwrap();
        let ad = adapter.display().to_string();
        let (code, out, err) = qlora(&["generate", m, "--adapter", &ad, "--prompt", question, "--max-new-tokens", &NEW.to_string()], &dir);
        assert_eq!(code, 0, "{err}");
        let summary = err.lines().find(|l| l.contains("prompt tokens")).unwrap_or_else(|| panic!("no generation summary in {err}"));
        let head = format!("[{} prompt tokens, {} new,", prompt_ids.len(), want_ids.len());
        assert!(summary.starts_with(&head), "{summary} vs the reference's {head}");
        assert_eq!(out.strip_suffix('\n').unwrap_or(&out), want_text, "{ad}: greedy text vs the f64 reference's tokens {want_ids:?}");
    }

    // eval with the adapter == eval of the merged model (f32)
    let eval_loss = |args: &[&str]| -> f64 {
        let out = ok(args, &dir);
        out.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("eval output: {out}"))
    };
    let base = eval_loss(&["eval", m, "--data", "chat.jsonl"]);
    let with = eval_loss(&["eval", m, "--data", "chat.jsonl", "--adapter", "a"]);
    let merge = ok(&["merge", m, "--adapter", "a", "--out", "merged", "--dtype", "f32"], &dir);
    assert!(merge.contains("merged 14 adapted projections"), "{merge}");
    let merged = eval_loss(&["eval", "merged", "--data", "chat.jsonl"]);
    eprintln!("eval loss: base {base:.6}, base + adapter {with:.6}, merged {merged:.6}");
    assert!((with - merged).abs() < 1e-4, "merged model's loss {merged} vs base + adapter {with}");
    assert!(with < base, "training lowered the loss on its data: {base} -> {with}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ctrl_c_checkpoints_and_resume_continues_exactly() {
    let dir = tmp("resume");
    std::fs::copy(fixtures().join("data/chat.jsonl"), dir.join("chat.jsonl")).unwrap();
    let m = tiny_model().display().to_string();
    let args_lr = |out: &'static str, lr: &str| -> Vec<String> {
        ["train", &m, "--data", "chat.jsonl", "-r", "4", "--steps", "12", "--lr", lr, "--batch-size", "2", "--max-len", "48", "--lora-dropout", "0.1", "--seed", "5", "--out", out]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let args = |out: &'static str| args_lr(out, "3e-3");
    let strs = |v: &[String]| v.iter().map(String::as_str).collect::<Vec<_>>().join("\u{1}");
    let run = |v: Vec<String>| {
        let s = strs(&v);
        let a: Vec<&str> = s.split('\u{1}').collect();
        ok(&a, &dir)
    };
    run(args("whole"));

    let v = args("stopped");
    let mut child = qlora_cmd(&v.iter().map(String::as_str).collect::<Vec<_>>(), &dir).stderr(Stdio::piped()).spawn().unwrap();
    let metrics = dir.join("stopped/metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(300), "training did not start");
        assert!(child.try_wait().unwrap().is_none(), "training ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "Ctrl-C exits with 130:\n{err}");
    assert!(err.contains("--resume"), "the message says how to continue:\n{err}");
    let stopped_at = losses(&dir.join("stopped")).len();
    assert!((3..12).contains(&stopped_at), "stopped after step {stopped_at}");
    assert!(dir.join("stopped/checkpoint/optimizer.safetensors").is_file());

    let mut v = args("stopped");
    v.push("--resume".into());
    run(v);
    let whole = losses(&dir.join("whole"));
    let resumed = losses(&dir.join("stopped"));
    assert_eq!(whole.len(), 12);
    // Bit for bit: the metrics log writes the shortest exact decimal of each loss.
    assert_eq!(whole, resumed, "losses of a run stopped at step {stopped_at} and resumed");
    let a = std::fs::read(dir.join("whole/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(dir.join("stopped/adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed run's adapter equals the uninterrupted run's");

    // A resume with a changed setting is refused, naming it.
    let mut v = args_lr("stopped", "1e-2");
    v.push("--resume".into());
    let s = strs(&v);
    let (code, _, err) = qlora(&s.split('\u{1}').collect::<Vec<_>>(), &dir);
    assert_eq!(code, 1);
    assert!(err.contains("lr: 0.003 -> 0.01"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_arguments_and_inputs_fail_clearly() {
    let dir = tmp("errors");
    std::fs::copy(fixtures().join("data/text.jsonl"), dir.join("good.jsonl")).unwrap();
    std::fs::write(dir.join("bad.jsonl"), "{\"text\": \"fine\"}\n{not json\n").unwrap();
    std::fs::write(dir.join("run.toml"), "learning_rate = 1e-3\n").unwrap();
    let m = tiny_model().display().to_string();
    let cargo_toml = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["train", &m, "--data", "missing.jsonl"], &["missing.jsonl", "cannot read"]),
        (vec!["train", "/no/such/model", "--data", "good.jsonl"], &["/no/such/model", "no such file or folder"]),
        (vec!["train", cargo_toml, "--data", "good.jsonl"], &["Cargo.toml", "not a model", ".gguf"]),
        (vec!["train", &m, "--data", "good.jsonl", "--format", "xml"], &["unknown data format \"xml\""]),
        (vec!["train", &m, "--data", "good.jsonl", "-r", "0"], &["rank must be at least 1"]),
        (
            vec!["train", &m, "--data", "good.jsonl", "--target-modules", "q_proj,qkv_proj"],
            &["\"qkv_proj\" is not a module of the model", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"],
        ),
        (vec!["train", &m, "--data", "bad.jsonl"], &["bad.jsonl", "line 2", "not valid JSON"]),
        (vec!["train", &m, "--data", "good.jsonl", "--out", "fresh", "--resume"], &["fresh has no checkpoint"]),
        (vec!["train", "--config", "run.toml"], &["run.toml", "unknown field `learning_rate`"]),
        (vec!["train", &m, "--data", "good.jsonl", "--steps", "3", "--epochs", "1"], &["--steps and --epochs"]),
        (vec!["generate", &m, "--adapter", "nowhere", "--prompt", "hi"], &["nowhere", "no such adapter folder"]),
        (vec!["eval", &m, "--data", "bad.jsonl"], &["bad.jsonl", "line 2"]),
    ];
    for (args, needles) in cases {
        let (code, _, err) = qlora(&args, &dir);
        assert_eq!(code, 1, "qlora {args:?} exits 1:\n{err}");
        let last = err.lines().filter(|l| l.starts_with("error: ")).last().unwrap_or_else(|| panic!("qlora {args:?}: no error line in\n{err}"));
        for n in needles {
            assert!(last.contains(n), "qlora {args:?}: {n:?} not in {last:?}");
        }
        assert!(!err.contains("panicked"), "qlora {args:?} panicked:\n{err}");
    }
    // clap's own usage errors exit 2
    let (code, _, err) = qlora(&["train", "--no-such-flag"], &dir);
    assert_eq!(code, 2, "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_packed_run_counts_epochs_in_rows() {
    // The pirate examples (about 60 tokens each in the chat template) pack about two to a
    // 128-token row; one epoch is the rows / batch steps, and the metrics log says epoch 1.0 at
    // its last step (not steps x batch / examples).
    let dir = tmp("packed-epochs");
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/pirate.jsonl");
    let out = dir.join("out");
    let m = tiny_model();
    let args = ["train", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--packing", "--max-len", "128", "--batch-size", "4"];
    // First learn the row count from the log, then run exactly one epoch of it.
    let (code, _, err) = qlora(&[&args[..], &["--steps", "1", "--out", out.to_str().unwrap()]].concat(), &dir);
    assert_eq!(code, 0, "{err}");
    let rows: usize = err
        .lines()
        .find_map(|l| l.strip_prefix("packing ").and_then(|r| r.split(" in ").nth(1)).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("no packing line in:\n{err}"));
    let examples = std::fs::read_to_string(&data).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
    assert!(rows < examples, "{rows} rows for {examples} examples: several examples share a row");
    let steps = rows.div_ceil(4);
    std::fs::remove_dir_all(&out).unwrap();
    ok(&[&args[..], &["--steps", &steps.to_string(), "--out", out.to_str().unwrap()]].concat(), &dir);
    let last: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().filter(|l| l.contains("\"loss\"")).last().unwrap()).unwrap();
    let epoch = last["epoch"].as_f64().unwrap();
    // steps x 4 rows over `rows` rows: 1.0 unless the last batch is short.
    assert!((epoch - (steps * 4) as f64 / rows as f64).abs() < 1e-9 && (1.0..1.0 + 4.0 / rows as f64).contains(&epoch), "epoch {epoch} after {steps} steps of {rows} rows");
    let _ = std::fs::remove_dir_all(&dir);
}
