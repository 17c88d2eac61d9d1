#!/usr/bin/env bash
# kill -9 at random moments while `qlora train` writes checkpoints (every step) on the tiny
# reference model, KILLS times (default 100); after each kill, every file in a final location
# must be intact (the checkpoint folder's files match the SHA-256 in its manifest; the adapter in
# OUT loads), and the run continues with --resume. At the end the adapter must be byte-identical
# to an uninterrupted run's. Not part of CI (minutes on lavapipe). Needs a GPU adapter.
#   [PROFILE=dev] [WHEN=saves|anytime] scripts/kill-saves.sh [KILLS] [STEPS]
# WHEN=saves (default) aims every kill at a save: a watcher polls the output folder every ~0.1 ms
# and kills the run a random 0-3 ms after the k-th save (k random in 1..3) starts, that is after
# a temporary (adapter_model.safetensors.tmp, checkpoint.tmp, checkpoint.old, ...) appears; the
# temporaries' fsync and the renames take milliseconds, so most kills land inside a write or
# between the renames. WHEN=anytime kills after a random 0.3-2.5 s (mostly while loading or
# training).
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS=${1:-100}
STEPS=${2:-40}
WHEN=${WHEN:-saves}
# PROFILE=dev uses the dev profile (no release build needed; slower steps, same checks).
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = dev ]; then cargo build --bin qlora >/dev/null; Q=$PWD/target/debug/qlora
else cargo build --release --bin qlora >/dev/null; Q=$PWD/target/release/qlora; fi
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
# A copy of the binary: a rebuild while this runs (minutes) does not change what is tested.
cp "$Q" "$W/qlora"; Q=$W/qlora
cp tests/fixtures/data/chat.jsonl "$W/"
cd "$W"
ARGS=(train "$OLDPWD/tests/fixtures/tiny-llama/model" --data chat.jsonl -r 2 --batch-size 2 --max-len 48 --lr 1e-3 --save-every 1 --steps "$STEPS" --seed 3)
"$Q" "${ARGS[@]}" --out ref 2>/dev/null
check() {  # every file in a final location is whole: the checkpoint folder (or, after a kill
  # between its two renames, checkpoint.old) matches its manifest; the adapter in OUT parses
  # with all its tensor data present
  python3 - run <<'PY'
import hashlib, json, struct, sys, os
out = sys.argv[1]
ck = os.path.join(out, "checkpoint")
if not os.path.isdir(ck):
    ck = os.path.join(out, "checkpoint.old")
if os.path.isdir(ck):
    m = json.load(open(os.path.join(ck, "manifest.json")))
    for name, want in m["files"].items():
        got = hashlib.sha256(open(os.path.join(ck, name), "rb").read()).hexdigest()
        if got != want:
            sys.exit(f"CORRUPT {ck}/{name}")
a = os.path.join(out, "adapter_model.safetensors")
if os.path.exists(a):
    b = open(a, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    end = max((v["data_offsets"][1] for k, v in h.items() if k != "__metadata__"), default=0)
    if 8 + n + end != len(b):
        sys.exit(f"CORRUPT {a}")
    json.load(open(os.path.join(out, "adapter_config.json")))
PY
}
temps() { ls -d --full-time run/*.tmp run/checkpoint.tmp run/checkpoint.tmp/* run/checkpoint.old 2>/dev/null || true; }
kills=0; corrupt=0; refused=0; resumes=0; midwrite=0
while [ $kills -lt "$KILLS" ]; do
  if [ -f run/checkpoint/manifest.json ] || [ -d run/checkpoint.old ]; then EXTRA=(--resume); resumes=$((resumes+1)); else EXTRA=(); fi
  before=$(temps)
  if [ "$WHEN" = saves ]; then
    r=$(python3 - "$Q" "${ARGS[@]}" --out run "${EXTRA[@]}" <<'PY'
import glob, os, random, signal, subprocess, sys, time
# Start the run, wait for the k-th save to begin (a temporary appears in the output folder),
# kill -9 a random 0-3 ms later; prints "killed" or "finished".
pats = ["run/*.tmp", "run/checkpoint.tmp", "run/checkpoint.old"]
def temps():
    return sorted(p for q in pats for p in glob.glob(q))
before = temps()
k, delay = random.randint(1, 3), random.uniform(0, 0.003)
with open("err.txt", "w") as err:
    p = subprocess.Popen(sys.argv[1:], stderr=err, stdout=subprocess.DEVNULL)
    seen, saves = False, 0
    while p.poll() is None:
        now = temps()
        busy = bool(now) and now != before
        if busy and not seen:
            saves += 1
            if saves == k:
                time.sleep(delay)
                p.send_signal(signal.SIGKILL)
                p.wait()
                print("killed")
                sys.exit(0)
        seen = busy
        time.sleep(0.0001)
print("finished")
PY
)
    if [ "$r" = finished ]; then echo "the run finished before kill $((kills+1)); starting over"; rm -rf run; continue; fi
    kills=$((kills+1))
  else
    "$Q" "${ARGS[@]}" --out run "${EXTRA[@]}" 2>err.txt &
    pid=$!
    sleep "$(python3 -c 'import random; print(round(random.uniform(0.3, 2.5), 3))')"
    if kill -9 $pid 2>/dev/null; then kills=$((kills+1)); fi
    wait $pid 2>/dev/null && { echo "the run finished before kill $((kills+1)); starting over"; rm -rf run; continue; } || true
  fi
  # A kill during a write leaves its temporary (checkpoint.tmp, *.tmp) or checkpoint.old behind:
  # counted when they differ from what was there before this run (stale ones from an earlier kill
  # are not counted again).
  after=$(temps)
  if [ -n "$after" ] && [ "$after" != "$before" ]; then midwrite=$((midwrite+1)); fi
  if grep -q "^error" err.txt; then refused=$((refused+1)); echo "refused: $(grep '^error' err.txt | head -1)"; fi
  check || corrupt=$((corrupt+1))
done
# Finish the run and compare with the uninterrupted one.
if [ -f run/checkpoint/manifest.json ] || [ -d run/checkpoint.old ]; then "$Q" "${ARGS[@]}" --out run --resume 2>err.txt; else "$Q" "${ARGS[@]}" --out run 2>err.txt; fi
same=no; cmp -s ref/adapter_model.safetensors run/adapter_model.safetensors && same=yes
echo "kills $kills ($midwrite during a write: new temporaries left), resumes $resumes, corrupt files in final locations $corrupt, resumes refused $refused, final adapter byte-identical to the uninterrupted run: $same"
[ $corrupt -eq 0 ] && [ $same = yes ]
