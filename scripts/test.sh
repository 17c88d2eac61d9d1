#!/usr/bin/env bash
# All tests: the library must compile for the browser (wasm32), then every native test
# (GPU tests run on whatever adapter wgpu finds: lavapipe on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo check --lib --target wasm32-unknown-unknown"
cargo check --lib --target wasm32-unknown-unknown
echo "== cargo test"
cargo test
