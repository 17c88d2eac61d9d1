#!/usr/bin/env bash
# Builds the browser package: the library for wasm32-unknown-unknown (profile `web`: the dev
# profile's optimization without debug info), then wasm-bindgen's JavaScript glue and TypeScript
# types into web/pkg/ (ESM, `--target web`: the page or worker calls the default export `init`).
# The wasm-bindgen CLI must be the version of the wasm-bindgen crate in Cargo.lock
# (scripts/setup.sh installs it). JOBS (default 1) sets cargo's parallel jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  echo "build-web: wasm-bindgen CLI ${have:-missing}, the crate uses $want:" >&2
  echo "  cargo install wasm-bindgen-cli --version $want" >&2
  exit 1
fi
echo "== cargo build --lib --target wasm32-unknown-unknown --profile web"
cargo build -j"${JOBS:-1}" --lib --target wasm32-unknown-unknown --profile web
wasm=target/wasm32-unknown-unknown/web/qlora_webgpu.wasm
echo "== wasm-bindgen --target web -> web/pkg"
rm -rf web/pkg
wasm-bindgen --target web --typescript --out-dir web/pkg "$wasm"
ls -l web/pkg | awk 'NR>1{printf "  %-28s %8.1f KiB\n", $9, $5/1024}'
