#!/usr/bin/env bash
# A fuzz campaign over every parser (examples/fuzz.rs): SECONDS per parser (default 60), seed
# SEED (default 1). Release profile; prints executions per parser. An input that aborts the
# process (an allocation beyond 64 MiB + 64x its size, or an execution over 10 s) is moved into
# tests/fixtures/fuzz/<parser>/ and the campaign goes on with the next parser; panics are saved
# there by the fuzzer itself. Exit status 1 when anything failed.
#   [PROFILE=dev] scripts/fuzz.sh [SECONDS] [SEED] [PARSER...]
set -uo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
SEED=${2:-1}
shift $(( $# > 2 ? 2 : $# ))
PARSERS=("$@")
[ ${#PARSERS[@]} -eq 0 ] && PARSERS=(safetensors config.json gguf tokenizer chat_template jsonl toml peft_adapter bnb_4bit checkpoint)
# PROFILE=dev uses the dev profile (optimized too; no release build of the dependencies needed).
if [ "${PROFILE:-release}" = dev ]; then cargo build --example fuzz || exit 2; BIN=target/debug/examples/fuzz
else cargo build --release --example fuzz || exit 2; BIN=target/release/examples/fuzz; fi
status=0
for p in "${PARSERS[@]}"; do
  if ! "$BIN" "$p" "$SECS" "$SEED" | grep -v '^parser\|^total'; then
    status=1
    pending="${TMPDIR:-/tmp}/qlora-fuzz-pending.$p"
    if [ -s "$pending" ]; then
      mkdir -p "tests/fixtures/fuzz/$p"
      h=$(sha256sum "$pending" | cut -c1-16)
      mv "$pending" "tests/fixtures/fuzz/$p/abort-s0-$h.bin"
      echo "$p: the process aborted; input kept as tests/fixtures/fuzz/$p/abort-s0-$h.bin"
    fi
  fi
done
exit $status
