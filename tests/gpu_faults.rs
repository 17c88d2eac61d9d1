//! GPU faults end the work with a clear message and lose nothing saved (issue 12): a device lost
//! mid-step (wgpu's `Device::destroy`, through `GpuContext::destroy_device` / the
//! `QLORA_TEST_LOSE_DEVICE_AFTER` hook, as a driver reset or a lost browser GPU would) and an
//! allocation that does not fit (a forced memory budget, `QLORA_GPU_MEMORY_BUDGET`, as on a
//! smaller GPU). Library calls return `Error::DeviceLost` / `Error::OutOfMemory`; `qlora train`
//! exits 1 naming what happened, what to try and the step the checkpoint and adapter on disk
//! hold, and those files are complete (manifest checksums match, the adapter loads) and the run
//! continues from them with --resume to the same bytes as an uninterrupted run. Needs a GPU
//! adapter (lavapipe in CI).

use qlora_webgpu::gpu::{block_on, DType, GpuContext};
use qlora_webgpu::Error;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ctx() -> std::rc::Rc<GpuContext> {
    block_on(GpuContext::new()).expect("a GPU adapter (on Linux without a GPU: apt-get install mesa-vulkan-drivers)")
}

#[test]
fn a_destroyed_device_fails_every_later_call_with_device_lost() {
    let ctx = ctx();
    let a = ctx.upload_f32(&[1.0, 2.0, 3.0, 4.0], &[4]).unwrap();
    let b = ctx.duplicate(&a).unwrap();
    assert_eq!(block_on(ctx.read_f32(&b)).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    ctx.destroy_device();
    let msg = |r: Result<(), Error>| match r {
        Err(e @ Error::DeviceLost(_)) => e.to_string(),
        other => panic!("expected DeviceLost, got {other:?}"),
    };
    let m = msg(block_on(ctx.read_f32(&b)).map(|_| ()));
    assert!(m.contains("GPU device was lost") && m.contains("destroyed") && m.contains("Try:") && m.contains("--resume"), "{m}");
    msg(ctx.empty(&[4], DType::F32).map(|_| ()));
    msg(ctx.upload_f32(&[0.0], &[1]).map(|_| ()));
    msg(block_on(ctx.sync()));
}

#[test]
fn an_allocation_past_the_memory_budget_fails_with_out_of_memory() {
    let ctx = ctx();
    let held = ctx.zeros(&[1 << 16], DType::F32).unwrap(); // 256 KiB
    let allocated = ctx.pool_stats().allocated;
    ctx.set_memory_budget(Some(allocated + (64 << 10)));
    // Within the budget: fine. Past it: OutOfMemory naming the sizes, and nothing allocated.
    let small = ctx.empty(&[1 << 14], DType::F32).unwrap(); // 64 KiB
    let e = ctx.empty(&[1 << 16], DType::F32).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory(_)), "{e:?}");
    let m = e.to_string();
    assert!(m.contains("ran out of memory") && m.contains("262144 bytes") && m.contains("QLORA_GPU_MEMORY_BUDGET") && m.contains("--batch-size"), "{m}");
    assert_eq!(ctx.pool_stats().allocated, allocated + (64 << 10));
    // A freed buffer is reused within the budget; the device still works.
    drop(held);
    let again = ctx.upload_f32(&vec![2.0; 1 << 16], &[1 << 16]).unwrap();
    assert_eq!(block_on(ctx.read_f32(&again)).unwrap()[12345], 2.0);
    drop(small);
}

// ---- qlora train -------------------------------------------------------------------------------

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-gpu-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(fixtures().join("data/chat.jsonl"), d.join("chat.jsonl")).unwrap();
    d
}

/// `qlora train` on the tiny model into `dir/out`, `steps` steps, a checkpoint every step, with
/// extra environment variables; returns (exit code, stderr).
fn train(dir: &Path, out: &str, steps: u64, resume: bool, env: &[(&str, &str)]) -> (i32, String) {
    let m = fixtures().join("tiny-llama/model");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora"));
    cmd.arg("train").arg(&m).args(["--data", "chat.jsonl", "-r", "2", "--batch-size", "2", "--max-len", "48", "--lr", "1e-3", "--save-every", "1", "--seed", "3", "--out", out]);
    cmd.args(["--steps", &steps.to_string()]);
    if resume {
        cmd.arg("--resume");
    }
    cmd.env_remove("QLORA_TEST_LOSE_DEVICE_AFTER").env_remove("QLORA_GPU_MEMORY_BUDGET").envs(env.iter().copied());
    let mut child = cmd.current_dir(dir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("qlora train still running after 300 s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn sha_hex(b: &[u8]) -> String {
    qlora_webgpu::io::sha256::hex(&qlora_webgpu::io::sha256::sha256(b))
}

/// Every file of `out`'s checkpoint matches its manifest; returns the step the checkpoint holds.
fn checkpoint_intact(out: &Path) -> u64 {
    let ck = out.join("checkpoint");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(ck.join("manifest.json")).unwrap()).unwrap();
    for (name, want) in manifest["files"].as_object().unwrap() {
        assert_eq!(&sha_hex(&std::fs::read(ck.join(name)).unwrap()), want, "{name} matches the manifest");
    }
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(ck.join("trainer_state.json")).unwrap()).unwrap();
    state["step"].as_u64().unwrap()
}

/// Only final files in `out` (no temporaries left by an interrupted write).
fn no_partial_files(out: &Path) {
    for d in [out.to_path_buf(), out.join("checkpoint")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            assert!(!n.contains(".tmp") && !n.starts_with('.'), "a temporary file {n} in {}", d.display());
        }
    }
}

#[test]
fn train_ends_cleanly_when_the_device_is_lost_mid_step_and_resumes_to_the_same_bytes() {
    let dir = tmp("lost");
    let (code, err) = train(&dir, "ref", 4, false, &[]);
    assert_eq!(code, 0, "{err}");

    let (code, err) = train(&dir, "run", 4, false, &[("QLORA_TEST_LOSE_DEVICE_AFTER", LOSE_AFTER)]);
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for needle in ["GPU device was lost (destroyed)", "Try:", "--resume", "hold step 2"] {
        assert!(err.contains(needle), "the message lacks {needle:?}:\n{err}");
    }
    let out = dir.join("run");
    assert_eq!(checkpoint_intact(&out), 2);
    no_partial_files(&out);
    let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert!(qlora_webgpu::io::safetensors::SafeTensorsFile::parse("adapter_model.safetensors", &adapter).is_ok());

    let (code, err) = train(&dir, "run", 4, true, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), std::fs::read(dir.join("ref/adapter_model.safetensors")).unwrap(), "the resumed run ends with the uninterrupted run's adapter");
}

#[test]
fn train_ends_cleanly_when_gpu_memory_runs_out_and_leaves_the_saved_run_as_it_was() {
    let dir = tmp("oom");
    let (code, err) = train(&dir, "run", 2, false, &[]);
    assert_eq!(code, 0, "{err}");
    let out = dir.join("run");
    let before: Vec<(PathBuf, Vec<u8>)> = ["adapter_model.safetensors", "adapter_config.json", "checkpoint/manifest.json", "checkpoint/adapter_model.safetensors", "checkpoint/optimizer.safetensors", "checkpoint/trainer_state.json"]
        .iter()
        .map(|n| (out.join(n), std::fs::read(out.join(n)).unwrap()))
        .collect();
    let (code, err) = train(&dir, "run", 4, true, &[("QLORA_GPU_MEMORY_BUDGET", OOM_BUDGET)]);
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for needle in ["GPU ran out of memory", "QLORA_GPU_MEMORY_BUDGET", "Try:", "--batch-size", "hold step 2"] {
        assert!(err.contains(needle), "the message lacks {needle:?}:\n{err}");
    }
    for (p, b) in &before {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} unchanged", p.display());
    }
    no_partial_files(&out);
    assert_eq!(checkpoint_intact(&out), 2);
}

/// Dispatches before the device is destroyed: the tiny run records about 200 a step with its
/// checkpoint (300 ends in step 2, 500 and 700 in step 3, 900 in step 4), so 600 falls in step 3
/// with step 2 saved.
const LOSE_AFTER: &str = "600";
/// A budget the tiny model's weights (7.5 MB allocated once loaded) fit in but a training step
/// (peak 22.6 MiB, with a 12 MiB buffer) does not.
const OOM_BUDGET: &str = "8M";
