#!/usr/bin/env bash
# All tests: the library must compile for the browser (wasm32), then every native test
# (GPU tests run on whatever adapter wgpu finds: lavapipe on a machine without a GPU).
# Ends with one summary line over every test binary.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo check --lib --target wasm32-unknown-unknown"
cargo check --lib --target wasm32-unknown-unknown
echo "== cargo test (library, binary and integration tests)"
log=$(mktemp)
status=0
cargo test --lib --bins --tests 2>&1 | tee "$log" || status=$?
summary=$(awk '/^test result: /{for(i=1;i<=NF;i++){if($(i+1) ~ /^passed/) p+=$i; if($(i+1) ~ /^failed/) f+=$i}} END{printf "%d passed, %d failed", p, f}' "$log")
rm -f "$log"
echo "tests: $summary"
exit "$status"
