//! `qlora eval` and `train --val-data` encode examples as training does: with PEFT's reference
//! encoding (its two texts as {"text"} rows, no eos appended, cut to 24 tokens) `qlora eval`
//! reproduces PEFT's loss at the initial adapter (`loss_init`) and after its 20 AdamW steps
//! (`loss_after_20_steps`, with PEFT's final adapter), and `train --val-data` with
//! `--no-append-eos` logs PEFT's initial loss as its step-0 validation loss.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("tiny-llama/manifest.json")).unwrap()).unwrap()
}

fn qlora(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora")).args(args).current_dir(cwd).output().expect("run qlora");
    assert!(out.status.success(), "qlora {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The data set PEFT's reference run used, as a {"text"} JSONL file in a fresh folder.
fn dev_data(name: &str) -> (PathBuf, serde_json::Value) {
    let m = manifest();
    let case = m["cases"]["dev"].clone();
    let dir = std::env::temp_dir().join(format!("qlora-cli-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let texts: String = case["texts"].as_array().unwrap().iter().map(|t| format!("{}\n", serde_json::json!({ "text": t }))).collect();
    std::fs::write(dir.join("dev.jsonl"), texts).unwrap();
    (dir, case)
}

fn eval_loss(dir: &Path, adapter: &str, extra: &[&str]) -> f64 {
    let model = fixtures().join("tiny-llama/model");
    let adapter = fixtures().join("tiny-llama/dev").join(adapter);
    let mut args = vec!["eval", model.to_str().unwrap(), "--data", "dev.jsonl", "--adapter", adapter.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = qlora(&args, dir);
    out.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("eval output: {out}"))
}

#[test]
fn eval_reproduces_peft_losses_with_the_training_encoding() {
    let (dir, case) = dev_data("peft");
    let len = case["seq_len"].to_string();
    let peft_encoding = ["--no-append-eos", "--max-len", len.as_str(), "--format", "text"];
    for (adapter, key) in [("adapter_init", "loss_init"), ("adapter_final", "loss_after_20_steps")] {
        let want = case[key].as_f64().unwrap();
        // Batch 2 (PEFT's batch) and batch 1: one mean over all counted tokens either way.
        for bs in ["2", "1"] {
            let mut extra = peft_encoding.to_vec();
            extra.extend_from_slice(&["--batch-size", bs]);
            let got = eval_loss(&dir, adapter, &extra);
            let r = (got - want).abs() / want;
            eprintln!("eval {adapter} batch {bs}: {got:.6} vs PEFT {key} {want:.6}: relative {r:.1e}");
            // Achieved 1.2e-7 at most (f32 sums in another order, plus the 6 printed decimals); bound
            // 1e-6 (the issue asks for 1e-5).
            assert!(r <= 1e-6, "{adapter}: {got} vs PEFT {want} (relative {r:.2e})");
        }
    }
    // The default appends eos to the short text (the long one is cut before it): one more
    // scored token, 1.5e-4 relative away from PEFT's loss.
    let with_eos = eval_loss(&dir, "adapter_init", &["--max-len", len.as_str()]);
    let want = case["loss_init"].as_f64().unwrap();
    assert!((with_eos - want).abs() / want > 1e-4, "appending eos changes the scored tokens: {with_eos} vs {want}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn train_val_data_uses_the_run_encoding() {
    let (dir, case) = dev_data("val");
    let model = fixtures().join("tiny-llama/model");
    let init = fixtures().join("tiny-llama/dev/adapter_init");
    let len = case["seq_len"].to_string();
    qlora(
        &[
            "train", model.to_str().unwrap(), "--data", "dev.jsonl", "--val-data", "dev.jsonl", "--batch-size", "2",
            "--max-len", &len, "--init-adapter", init.to_str().unwrap(), "--steps", "1", "--lr", "1e-3",
            "--lr-scheduler", "constant", "--warmup-steps", "0", "--no-append-eos", "--out", "out",
        ],
        &dir,
    );
    let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"].as_u64(), Some(0), "{metrics}");
    let got = first["val_loss"].as_f64().unwrap();
    let want = case["loss_init"].as_f64().unwrap();
    let r = (got - want).abs() / want;
    eprintln!("train --val-data step-0 validation loss {got:.7} vs PEFT loss_init {want:.7}: relative {r:.1e}");
    // Achieved 8.9e-8; bound 1e-6 (with eos appended it would be 1.5e-4 away).
    assert!(r <= 1e-6, "{got} vs {want}");
    std::fs::remove_dir_all(&dir).ok();
}
