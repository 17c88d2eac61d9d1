#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test qlora-webgpu: Mesa's software
# Vulkan driver (lavapipe) so wgpu finds an adapter without a GPU, and the wasm32 target.
# Idempotent: installs only what is missing.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
missing=""
for p in mesa-vulkan-drivers libvulkan1; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "setup: adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi
