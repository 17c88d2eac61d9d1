//! `qlora info` on the tiny reference model: architecture, parameter count, stored dtypes and
//! the memory estimates; a clear error and a non-zero exit for a path that is not a model.

use std::process::Command;

fn qlora(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora")).args(args).output().expect("run qlora");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn info_describes_the_tiny_llama() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama/model");
    let (ok, out, err) = qlora(&["info", dir]);
    assert!(ok, "{err}");
    assert!(out.contains("Llama (2 layers, hidden 64, intermediate 160, heads 4 / kv heads 2, head_dim 16)"), "{out}");
    // 49152*64 embeddings + 2 layers * (64*64*2 + 64*32*2 + 3*64*160) projections + 5*64 norms
    let params = 49152 * 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 160) + 5 * 64;
    assert!(out.contains(&format!("parameters   {:.1} M", params as f64 / 1e6)), "{out}");
    assert!(out.contains("stored as    BF16 x20"), "{out}");
    assert!(out.contains(&format!("f32 {:.1} MiB", params as f64 * 4.0 / 1048576.0)), "{out}");
}

#[test]
fn info_on_a_non_model_fails_clearly() {
    let (ok, _, err) = qlora(&["info", concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")]);
    assert!(!ok);
    assert!(err.starts_with("error: ") && err.contains("Cargo.toml"), "{err}");
    let (ok, _, err) = qlora(&["info", "/no/such/model"]);
    assert!(!ok && err.contains("/no/such/model"), "{err}");
}

/// Without XDG_RUNTIME_DIR (a container, a CI job, ssh without a login session) Mesa's Vulkan
/// device-selection layer used to make libwayland print "error: XDG_RUNTIME_DIR is invalid or not
/// set in the environment." twice before every GPU command; the CLI keeps it quiet.
#[test]
fn no_wayland_error_without_xdg_runtime_dir() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama/model");
    for args in [&["info", dir][..], &["gpu"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
            .args(args)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("NODEVICE_SELECT")
            .output()
            .expect("run qlora");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "qlora {args:?}: {err}");
        assert!(!err.contains("XDG_RUNTIME_DIR"), "qlora {args:?} printed: {err}");
    }
}
