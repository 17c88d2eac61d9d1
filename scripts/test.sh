#!/usr/bin/env bash
# All tests: the library built for the browser (wasm32, wasm-bindgen's package in web/pkg: a
# build, which includes `cargo check --lib --target wasm32-unknown-unknown`); the benches and
# examples compiled (dev profile); every native test (`cargo test --no-fail-fast`: one failing
# binary does not hide the others; GPU tests run on whatever adapter wgpu finds: lavapipe on a
# machine without a GPU), with QLORA_SMOLLM2_GGUF set to SmolLM2-135M-Instruct in the cache folder
# (scripts/fetch-smollm2.sh, which scripts/setup.sh runs: fetched here if missing) for the
# real-model tests; the tests that run the matmul kernels (model-level and ops) a second time with
# QLORA_NO_SUBGROUPS=1, so both matmul paths run: the dispatcher picks the subgroup kernels where
# the device has subgroups (lavapipe does) and the vec4 kernels, what browsers and adapters
# without subgroups run, with the variable set; then the browser tests in web/test (headless
# Chromium with WebGPU on SwiftShader: the demo trains the tiny model and its adapter is compared
# with the native one; `npm pack` installs and imports).
# Ends with one summary line over every test binary of both passes and the browser tests:
# `tests: N passed, N failed, N skipped` (libtest's ignored and node's skipped count as skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
# Test binaries that dispatch matmuls (src/model, src/ops/{lora,nf4}.rs, src/autograd call
# src/ops/matmul.rs), run again on the vec4 kernels.
VEC4_TESTS="reference_tiny_llama decoder cli train_parts train_run ops_matmul ops_lora ops_nf4 smollm2_real"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
stage() { echo "== $1"; SECONDS=0; }
took() { echo "   (${SECONDS} s)"; }

stage "browser package (scripts/build-web.sh)"
JOBS="${JOBS:-$(nproc)}" bash scripts/build-web.sh || status=$?
took
stage "benches and examples (cargo build --benches --examples, dev profile)"
cargo build --benches --examples || status=$?
took
stage "SmolLM2-135M-Instruct for the real-model tests (scripts/fetch-smollm2.sh)"
QLORA_SMOLLM2_GGUF=$(bash scripts/fetch-smollm2.sh) || status=$?
export QLORA_SMOLLM2_GGUF="${QLORA_SMOLLM2_GGUF:-}"
echo "   QLORA_SMOLLM2_GGUF=$QLORA_SMOLLM2_GGUF"
took
stage "cargo test --no-fail-fast (library, binary and integration tests)"
cargo test --no-fail-fast --lib --bins --tests 2>&1 | tee -a "$log" || status=$?
took
stage "QLORA_NO_SUBGROUPS=1 cargo test (the vec4 matmul kernels): $VEC4_TESTS"
args=()
for t in $VEC4_TESTS; do args+=(--test "$t"); done
QLORA_NO_SUBGROUPS=1 cargo test --no-fail-fast "${args[@]}" 2>&1 | tee -a "$log" || status=$?
took
stage "browser tests (node --test web/test: Chromium on SwiftShader, npm pack)"
(cd web && node --test --test-reporter=tap test/npm-pack.test.mjs test/browser.test.mjs test/adapter_set.test.mjs test/from_url.test.mjs test/compat.test.mjs test/device_loss.test.mjs test/stop.test.mjs test/real_model.test.mjs) 2>&1 | tee -a "$log" || status=$?
took
# Per test binary (cargo's "Running" line) its last libtest line "test result: ok. 5 passed;
# 0 failed; 1 ignored; ..." (a failing test's output may quote a child's); a binary that ends
# without one (it crashed) and a test target that does not compile count as one failed test
# each. Node's TAP summary: "# pass N", "# fail N" and "# cancelled N" (failed), "# skipped N".
summary=$(awk '
  function flush() { if (open) { if (have) { p += rp; f += rf; s += rs } else f += 1 } open = 0; have = 0 }
  /^ +Running /{flush(); open = 1; next}
  /^test result: /{have = 1; rp = rf = rs = 0
    for (i = 1; i < NF; i++) { w = $(i+1); if (w ~ /^passed/) rp = $i; if (w ~ /^failed/) rf = $i; if (w ~ /^ignored/) rs = $i }}
  /^error: could not compile /{f += 1}
  /^# pass [0-9]+$/{flush(); p += $3} /^# (fail|cancelled) [0-9]+$/{flush(); f += $3} /^# skipped [0-9]+$/{flush(); s += $3}
  END{flush(); printf "%d passed, %d failed, %d skipped", p, f, s}' "$log")
echo "tests: $summary"
exit "$status"
