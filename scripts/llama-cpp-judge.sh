#!/usr/bin/env bash
# llama.cpp as the judge of our GGUF export (outside CI: it builds llama.cpp).
#
# 1. builds the PyPI package llama-cpp-python from source once into a virtual environment in
#    $LLAMA_CPP_VENV (default ~/.cache/qlora-llamacpp/venv; CMAKE_ARGS="-DGGML_NATIVE=OFF"; on a
#    busy 2-core machine this took 65 minutes; later runs reuse it);
# 2. builds `qlora` (release; or give QLORA=path/to/qlora);
# 3. trains a short pirate adapter (the README's main job, data/pirate.jsonl, QLoRA r 16
#    alpha 32 lr 1e-3 batch 2, $STEPS steps, default 8), or takes ADAPTER=folder;
# 4. writes with our export: SmolLM2-135M-Instruct as an F32 / F16 / Q8_0 GGUF (the Q4_1 file
#    dequantized by our loader), the adapter as an F32 / F16 / Q8_0 llama.cpp LoRA adapter, and
#    the merged model as F32 / F16 / Q8_0 GGUFs;
# 5. runs `qlora generate --adapter` on the f32 base (greedy, 32 new tokens, --dump-logits) for
#    three chat prompts, and llama.cpp (scripts/llama-cpp-judge.py) on the same prompt token ids
#    for each export: last-position logits compared, greedy 32 tokens compared.
#
# Everything lands in $WORK (default ~/.cache/qlora-llamacpp/judge); the table is
# $WORK/judge.md. Exit status 1 when a figure is over its bound.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

CACHE="${QLORA_LLAMACPP_CACHE:-$HOME/.cache/qlora-llamacpp}"
VENV="${LLAMA_CPP_VENV:-$CACHE/venv}"
WORK="${WORK:-$CACHE/judge}"
STEPS="${STEPS:-8}"
mkdir -p "$WORK"

if ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "== building llama-cpp-python from source into $VENV (once; slow)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
    nice "$VENV/bin/pip" install --no-binary llama-cpp-python llama-cpp-python numpy
fi
"$VENV/bin/python" -c "import llama_cpp; print('== llama-cpp-python', llama_cpp.__version__)"

GGUF="${QLORA_SMOLLM2_GGUF:-$(bash scripts/fetch-smollm2.sh)}"
if [ -z "${QLORA:-}" ]; then
  echo "== building qlora (release)"
  cargo build --release --quiet --bin qlora
  QLORA=./target/release/qlora
fi

ADAPTER="${ADAPTER:-$WORK/pirate}"
if [ ! -f "$ADAPTER/adapter_model.safetensors" ]; then
  echo "== training the pirate adapter ($STEPS steps)"
  $QLORA train "$GGUF" --data data/pirate.jsonl --qlora -r 16 --lora-alpha 32 --lr 1e-3 \
    --steps "$STEPS" --batch-size 2 --max-len 96 --out "$ADAPTER"
fi

echo "== exports"
for dt in f32 f16 q8_0; do
  [ -f "$WORK/base-$dt.gguf" ] || $QLORA export "$GGUF" --out "$WORK/base-$dt.gguf" --dtype $dt
  $QLORA export "$GGUF" --adapter "$ADAPTER" --out "$WORK/pirate-lora-$dt.gguf" --dtype $dt
  $QLORA merge "$GGUF" --adapter "$ADAPTER" --out "$WORK/merged-$dt.gguf" --dtype $dt
done

echo "== qlora generate --adapter (f32 base, greedy, 32 tokens)"
PROMPTS=("What is the capital of Italy?" "How can I stay warm when camping?" "What should I pack for a day at the beach?")
for i in 0 1 2; do
  $QLORA generate "$GGUF" --adapter "$ADAPTER" --prompt "${PROMPTS[$i]}" --max-new-tokens 32 \
    --dump-logits "$WORK/ours-$i.json"
done

echo "== llama.cpp"
"$VENV/bin/python" scripts/llama-cpp-judge.py "$WORK"
