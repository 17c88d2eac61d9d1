"""llama.cpp (through llama-cpp-python) on the GGUF files our export wrote, against
`qlora generate --adapter --dump-logits` on the f32 base. Called by scripts/llama-cpp-judge.sh
with its work folder: base-{f32,f16,q8_0}.gguf, pirate-lora-{...}.gguf, merged-{...}.gguf,
ours-{0,1,2}.json. For each variant and prompt: the prompt's token ids (ours) are evaluated by
llama.cpp, the last-position logits compared with ours (max |difference|), then 32 greedy tokens
(argmax, stopping at end of generation) compared with ours. Writes judge.md and judge.json."""

import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama

work = Path(sys.argv[1])
ours = [json.loads(p.read_text()) for p in sorted(work.glob("ours-*.json"))]

# Bounds on max |logit difference| against ours (f32 base + f32 adapter on our side).
# f32: both sides compute in f32 with different summation orders.
# Measured (SmolLM2-135M-Instruct, 8-step pirate adapter, 3 prompts, logits up to 25):
# f32 1.2e-4 (bound 5e-4); f16 4.2e-2 (bound 0.1); q8_0 1.23 (bound 2): the 16- and 8-bit
# figures are the weights' rounding, as our side runs the f32 model.
BOUNDS = {"f32": 5e-4, "f16": 0.1, "q8_0": 2.0}

# The first row is a control: the f32 base without the adapter (how far the adapter moves the
# logits), with no bound.
variants = [("base f32, no adapter (control)", None, work / "base-f32.gguf", None)]
for dt in ["f32", "f16", "q8_0"]:
    variants.append((f"base {dt} + adapter {dt}", dt, work / f"base-{dt}.gguf", work / f"pirate-lora-{dt}.gguf"))
    variants.append((f"merged {dt}", dt, work / f"merged-{dt}.gguf", None))

rows = []
ok = True
for name, dt, model, lora in variants:
    # logits_all: llama-cpp-python keeps the logits of every evaluated position (without it,
    # `scores` stays zero in 0.3.36). type_k / type_v 0 = GGML_TYPE_F32: an f32 KV cache, so both
    # sides compute in f32 (llama.cpp's default f16 cache alone moves these logits by about 1e-2).
    kw = dict(model_path=str(model), n_ctx=256, n_batch=256, n_threads=2, verbose=False, seed=0,
              logits_all=True, type_k=0, type_v=0)
    if lora is not None:
        kw["lora_path"] = str(lora)
    llm = Llama(**kw)
    eog = {llm.token_eos()}
    for i, o in enumerate(ours):
        ids = o["prompt_ids"]
        llm.reset()
        llm.eval(ids)
        last = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
        mine = np.array(o["last_logits"], dtype=np.float64)
        d = float(np.max(np.abs(last - mine)))
        gen = []
        logits = last
        for _ in range(32):
            t = int(np.argmax(logits))
            gen.append(t)
            if t in eog:
                break
            llm.eval([t])
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        same = gen == o["generated_ids"]
        first_diff = next((k for k, (a, b) in enumerate(zip(gen, o["generated_ids"])) if a != b), None)
        if dt is None:
            rows.append(dict(variant=name, prompt=i, max_abs_logit_diff=d, bound=None, greedy_same=same,
                             first_diff=first_diff, n_llama=len(gen), n_ours=len(o["generated_ids"]), text_llama=""))
            print(f"{name:28s} prompt {i}: max|Δlogit| {d:.3e} (control)", flush=True)
            continue
        within = d <= BOUNDS[dt]
        # A greedy mismatch is only a failure for f32 (16-bit and 8-bit rounding may flip a
        # near-tie; reported either way).
        ok &= within and (same or dt != "f32")
        rows.append(dict(variant=name, prompt=i, max_abs_logit_diff=d, bound=BOUNDS[dt], greedy_same=same,
                         first_diff=first_diff, n_llama=len(gen), n_ours=len(o["generated_ids"]),
                         text_llama=llm.detokenize(gen).decode("utf-8", "replace")))
        print(f"{name:28s} prompt {i}: max|Δlogit| {d:.3e} (bound {BOUNDS[dt]:g})  greedy {'same' if same else f'differs at {first_diff}'}"
              f"  ({len(gen)} vs {len(o['generated_ids'])} tokens)", flush=True)
    del llm

(work / "judge.json").write_text(json.dumps(rows, indent=1))
md = ["| variant | prompt | max abs logit diff | bound | greedy 32 tokens |", "|---|---|---|---|---|"]
for r in rows:
    md.append(f"| {r['variant']} | {r['prompt']} | {r['max_abs_logit_diff']:.2e} | {r['bound'] if r['bound'] is not None else '-'} | "
              f"{'same' if r['greedy_same'] else 'differs at token %s' % r['first_diff']} |")
md.append("")
md.append("Our text: " + " / ".join(repr(o["text"]) for o in ours))
(work / "judge.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
print("all within bounds" if ok else "OVER A BOUND")
sys.exit(0 if ok else 1)
