#!/usr/bin/env bash
# All tests: the library built for the browser (wasm32, wasm-bindgen's package in web/pkg: a
# build, which includes `cargo check --lib --target wasm32-unknown-unknown`), every native test
# (GPU tests run on whatever adapter wgpu finds: lavapipe on a machine without a GPU), then the
# browser tests in web/test (headless Chromium with WebGPU on SwiftShader: the demo trains the
# tiny model and its adapter is compared with the native one; `npm pack` installs and imports).
# Ends with one summary line over every test binary and the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== browser package (scripts/build-web.sh)"
JOBS="${JOBS:-$(nproc)}" bash scripts/build-web.sh
echo "== cargo test (library, binary and integration tests)"
log=$(mktemp)
status=0
cargo test --lib --bins --tests 2>&1 | tee "$log" || status=$?
echo "== browser tests (node --test web/test: Chromium on SwiftShader, npm pack)"
cargo build -q --example web_native || status=$?
(cd web && node --test --test-reporter=tap test/npm-pack.test.mjs test/browser.test.mjs) 2>&1 | tee -a "$log" || status=$?
summary=$(awk '
  /^test result: /{for(i=1;i<=NF;i++){if($(i+1) ~ /^passed/) p+=$i; if($(i+1) ~ /^failed/) f+=$i}}
  /^# pass [0-9]+$/{p+=$3} /^# fail [0-9]+$/{f+=$3}
  END{printf "%d passed, %d failed", p, f}' "$log")
rm -f "$log"
echo "tests: $summary"
exit "$status"
