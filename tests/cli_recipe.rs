//! `qlora train --emit-recipe DIR` writes the TRL recipe of the run instead of training: the
//! files are there, nothing was trained, the script compiles (python3 -m py_compile), its
//! settings are the run's, data.jsonl holds exactly the ids and loss mask our encoder makes, and
//! adapter_init/ is the run's initial adapter (the seeded init, or the --init-adapter).
//! That the script reproduces the run's losses is scripts/recipe-check.sh (outside CI: it
//! installs torch, TRL and PEFT).

use qlora_webgpu::data::dataset::{Dataset, Format};
use qlora_webgpu::gpu::{block_on, GpuContext};
use qlora_webgpu::io::hf::MmapDir;
use qlora_webgpu::lora::config::{InitLoraWeights, LoraConfig};
use qlora_webgpu::lora::peft::read_host_adapter;
use qlora_webgpu::session::{BaseQuant, ModelSource, TrainConfig, TrainSession};
use qlora_webgpu::train::ScheduleKind;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn qlora(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora")).args(args).current_dir(cwd).output().expect("run qlora");
    assert!(out.status.success(), "qlora {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-cli-recipe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn emit_recipe_writes_the_run_and_trains_nothing() {
    let dir = tmp("seeded");
    let model_dir = fixtures().join("tiny-llama/model");
    let m = model_dir.to_str().unwrap();
    std::fs::copy(fixtures().join("data/chat.jsonl"), dir.join("chat.jsonl")).unwrap();
    let flags = [
        "train", m, "--data", "chat.jsonl", "-r", "4", "--lora-alpha", "8", "--init-lora-weights", "false", "--seed", "7",
        "--steps", "5", "--batch-size", "2", "--grad-accum", "2", "--max-len", "48", "--no-shuffle", "--lr", "3e-3",
        "--lr-scheduler", "constant", "--warmup-steps", "0", "--weight-decay", "0.01", "--max-grad-norm", "0.5", "--out", "run",
    ];
    let mut args = flags.to_vec();
    args.extend_from_slice(&["--emit-recipe", "recipe"]);
    let log = qlora(&args, &dir);
    assert!(log.contains("nothing trained"), "{log}");
    let r = dir.join("recipe");
    for f in ["train_trl.py", "data.jsonl", "accelerate_config.yaml", "README.md", "adapter_init/adapter_config.json", "adapter_init/adapter_model.safetensors"] {
        assert!(r.join(f).is_file(), "the recipe lacks {f}");
    }
    assert!(!r.join("val.jsonl").exists(), "no validation in this run");
    // Nothing trained: no output folder, no adapter, no metrics.
    assert!(!dir.join("run").exists(), "--emit-recipe trained (or created --out)");

    // The script compiles and carries the run's settings.
    let py = Command::new("python3")
        .args(["-m", "py_compile"])
        .arg(r.join("train_trl.py"))
        .output()
        .expect("python3 runs (apt-get install python3; scripts/setup.sh installs it)");
    assert!(py.status.success(), "train_trl.py does not compile:\n{}", String::from_utf8_lossy(&py.stderr));
    let script = std::fs::read_to_string(r.join("train_trl.py")).unwrap();
    for want in [
        "STEPS = 5\n", "BATCH_SIZE = 2 ", "GRAD_ACCUM = 2\n", "LR = 0.003\n", "LR_SCHEDULER = \"constant_with_warmup\"\n",
        "WARMUP_STEPS = 0\n", "WEIGHT_DECAY = 0.01\n", "ADAM_BETAS = (0.9, 0.999)\n", "ADAM_EPS = 1e-8\n", "MAX_GRAD_NORM = 0.5 ",
        "SEED = 7\n", "SHUFFLE = False ", "QLORA = False ", "use_dora=False", "r=4, lora_alpha=8.0, lora_dropout=0.0",
        "SequentialSampler(ds)", "PeftModel.from_pretrained(", "is_trainable=True",
    ] {
        assert!(script.contains(want), "train_trl.py lacks {want:?}");
    }

    // data.jsonl: our encoder's ids and labels (chat template, eos, assistant turns counted).
    let ctx = block_on(GpuContext::new()).expect("a GPU adapter (Mesa's lavapipe: apt-get install mesa-vulkan-drivers)");
    let model = ModelSource::from_hf("tiny-llama", &MmapDir::open(&model_dir).unwrap()).unwrap().upload(&ctx, BaseQuant::F32, 64).unwrap();
    let mut lora = LoraConfig::new(4, 8.0);
    lora.init_lora_weights = InitLoraWeights::NoInit;
    let cfg = TrainConfig {
        lora,
        steps: 5,
        batch_size: 2,
        grad_accum: 2,
        max_len: 48,
        lr: 3e-3,
        schedule: ScheduleKind::Constant,
        warmup_steps: Some(0),
        weight_decay: 0.01,
        max_grad_norm: Some(0.5),
        seed: 7,
        shuffle: false,
        ..TrainConfig::default()
    };
    let data = Dataset::from_jsonl_file(&dir.join("chat.jsonl"), Format::Auto).unwrap();
    let want = data.tokenize(&model.encoder(cfg.encode_options()).unwrap()).unwrap();
    let got = jsonl(&r.join("data.jsonl"));
    assert_eq!(got.len(), want.len());
    let (mut masked, mut counted) = (0, 0);
    for (g, w) in got.iter().zip(want.examples()) {
        let ids: Vec<u32> = serde_json::from_value(g["input_ids"].clone()).unwrap();
        let labels: Vec<i32> = serde_json::from_value(g["labels"].clone()).unwrap();
        assert_eq!(ids, w.ids);
        assert_eq!(labels, w.labels);
        masked += labels.iter().filter(|&&l| l == -100).count();
        counted += labels.iter().filter(|&&l| l != -100).count();
    }
    assert!(masked > 0 && counted > 0, "the chat examples mask their prompts: {masked} masked, {counted} counted");

    // adapter_init: the adapter the run starts from (seed 7, init false: A and B both random).
    let sess = TrainSession::new(&ctx, &model, &data, cfg, None).unwrap();
    let start = block_on(sess.adapter(&ctx)).unwrap();
    let init = read_host_adapter(&r.join("adapter_init"), &model.model.cfg).unwrap();
    assert_eq!(init.config.r, 4);
    assert_eq!(init.config.lora_alpha, 8.0);
    assert!(init.layers == start.layers, "adapter_init is not the run's initial adapter");
    let b_nonzero = start.layers.iter().flatten().flatten().any(|m| m.b.iter().any(|&x| x != 0.0));
    assert!(b_nonzero, "init false draws B too (so the comparison covers B)");

    // With --init-adapter, adapter_init holds that adapter.
    let given = fixtures().join("tiny-llama/dev/adapter_final");
    let mut args = flags.to_vec();
    args.extend_from_slice(&["--init-adapter", given.to_str().unwrap(), "--emit-recipe", "recipe2"]);
    qlora(&args, &dir);
    let want = read_host_adapter(&given, &model.model.cfg).unwrap();
    let got = read_host_adapter(&dir.join("recipe2/adapter_init"), &model.model.cfg).unwrap();
    assert!(got.layers == want.layers, "adapter_init is not the --init-adapter");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn emit_recipe_with_resume_is_refused() {
    let dir = tmp("resume");
    let m = fixtures().join("tiny-llama/model");
    std::fs::copy(fixtures().join("data/chat.jsonl"), dir.join("chat.jsonl")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["train", m.to_str().unwrap(), "--data", "chat.jsonl", "--resume", "--emit-recipe", "r"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--emit-recipe with --resume"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
