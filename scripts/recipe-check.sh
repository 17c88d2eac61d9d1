#!/usr/bin/env bash
# Checks `qlora train --emit-recipe` against `qlora train` itself (outside CI: it installs torch,
# transformers, peft, trl, accelerate and datasets from PyPI, several GB with torch's CUDA
# libraries, into a cache venv once). On the tiny reference model (tests/fixtures/tiny-llama/model,
# a Hugging Face folder), it
#   1. trains 10 steps with `qlora train` (--no-shuffle, constant learning rate, dropout 0),
#   2. writes the recipe of the same flags (--emit-recipe) and runs it on the CPU in f32,
#   3. prints both runs' per-step losses and the worst difference; fails above 1e-4.
# Dropout is 0 because the two runs draw their dropout masks from different generators.
#
#   scripts/recipe-check.sh
# Environment: QLORA_RECIPE_PYTHON=/path/to/python uses that interpreter instead of the cache venv
# (it needs torch, transformers, peft, trl, accelerate, datasets); QLORA_RECIPE_VENV moves the venv
# (default ~/.cache/qlora-recipe/venv); QLORA_BIN uses that `qlora` instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ -n "${QLORA_RECIPE_PYTHON:-}" ]; then
    py=$QLORA_RECIPE_PYTHON
else
    venv=${QLORA_RECIPE_VENV:-$HOME/.cache/qlora-recipe/venv}
    py=$venv/bin/python
    if ! "$py" -c "import torch, transformers, peft, trl, accelerate, datasets" 2>/dev/null; then
        echo "recipe-check: installing torch, transformers, peft, trl, accelerate, datasets into $venv (once)"
        python3 -m venv "$venv"
        "$py" -m pip install --upgrade pip
        "$py" -m pip install torch transformers peft trl accelerate datasets
    fi
fi
"$py" -c "import torch, transformers, peft, trl; print('recipe-check: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"

if [ -n "${QLORA_BIN:-}" ]; then
    qlora=$QLORA_BIN
else
    cargo build --bin qlora
    qlora=$root/target/debug/qlora
fi

work=$(mktemp -d /tmp/qlora-recipe-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r tests/fixtures/tiny-llama/model "$work/model"
# 12 chat examples: system prompts, two-turn conversations (the loss counts assistant turns only).
"$py" - "$work/data.jsonl" <<'EOF'
import json, sys
qa = [("What is 2 + 3?", "2 + 3 = 5."), ("Name a primary color.", "Red is one."), ("Capital of France?", "Paris."),
      ("Say hi", "Hi! How can I help?"), ("What is the opposite of up?", "Down."), ("Count to three.", "One, two, three."),
      ("Is water wet?", "Yes, it is."), ("Spell cat.", "C-A-T.")]
rows = []
for i, (q, a) in enumerate(qa):
    m = [{"role": "system", "content": "You answer briefly."}] if i % 3 == 0 else []
    m += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if i % 2 == 1:
        m += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
    rows.append({"messages": m})
for t in ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine.", "Fortune favours the bold.", "All that glitters is not gold."]:
    rows.append({"messages": [{"role": "user", "content": "Quote?"}, {"role": "assistant", "content": t}]})
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
EOF

# 12 examples in micro-batches of 2, 2 per step: 3 steps an epoch, 10 steps run 3 1/3 epochs in
# file order. --init-lora-weights false: A and B both random, so the start is not the base model.
flags=(train "$work/model" --data "$work/data.jsonl" --no-shuffle --lr-scheduler constant --warmup-steps 0
    --steps 10 --batch-size 2 --grad-accum 2 --max-len 64 -r 4 --lora-alpha 8 --lora-dropout 0
    --init-lora-weights false --lr 5e-3 --weight-decay 0.01 --seed 3)
echo "recipe-check: qlora ${flags[*]} --out ours"
"$qlora" "${flags[@]}" --out "$work/ours" 2>&1 | grep -E "^(trained|loss) "
"$qlora" "${flags[@]}" --emit-recipe "$work/recipe" 2>&1 | grep -E "^recipe "
echo "recipe-check: $py $work/recipe/train_trl.py --cpu --threads 1"
"$py" "$work/recipe/train_trl.py" --cpu --threads 1 --output-dir "$work/trl" >"$work/trl.log" 2>&1 || { tail -30 "$work/trl.log"; exit 1; }

"$py" - "$work/ours/metrics.jsonl" "$work/trl/metrics.jsonl" <<'EOF'
import json, sys
def losses(p):
    return {r["step"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r}
ours, trl = losses(sys.argv[1]), losses(sys.argv[2])
assert sorted(ours) == list(range(1, 11)) and sorted(trl) == list(range(1, 11)), (sorted(ours), sorted(trl))
worst_abs = worst_rel = 0.0
print(f"{'step':>4} {'qlora train':>14} {'TRL recipe':>14} {'|diff|':>10}")
for s in range(1, 11):
    d = abs(ours[s] - trl[s])
    worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, d / abs(trl[s]))
    print(f"{s:>4} {ours[s]:>14.8f} {trl[s]:>14.8f} {d:>10.2e}")
print(f"recipe-check: loss {ours[1]:.4f} -> {ours[10]:.4f}; worst difference over 10 steps {worst_abs:.2e} absolute, {worst_rel:.2e} relative (bound 1e-4)")
sys.exit(0 if worst_abs <= 1e-4 else 1)
EOF
