#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test qlora-webgpu: Mesa's software
# Vulkan driver (lavapipe) so wgpu finds an adapter without a GPU, the wasm32 target, and for the
# browser package and its tests: Chromium (Debian's; WebGPU on SwiftShader), Node.js and npm,
# wasm-bindgen's CLI at the version of the wasm-bindgen crate in Cargo.lock, and web/'s npm
# packages (npm ci: playwright-core, typescript). Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
missing=""
for p in mesa-vulkan-drivers libvulkan1 chromium; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
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
