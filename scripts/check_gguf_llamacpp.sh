#!/usr/bin/env bash
# check_gguf_llamacpp.sh — cross-checks tuna's GGUF export with a llama.cpp build.
#
# usage: scripts/check_gguf_llamacpp.sh LLAMA_CPP_BUILD_DIR [TUNA_BIN] [SHARED_DIR]
#
# For each fixture model and export type it writes OUT.gguf with `tuna export gguf`, then
#  1. loads it with llama.cpp (llama-cli / llama-completion, greedy, 24 tokens) — a load
#     failure (wrong key type, tensor shape, unknown pre-tokenizer ...) fails the check;
#  2. for pymini (a trained model, so greedy tokens are stable) compares llama.cpp's greedy
#     continuation of a prompt at f32 with tuna's own (tuna generate on the folder);
#  3. when llama-perplexity is present, prints llama.cpp's perplexity of pymini's heldout.txt
#     next to fixtures/models/pymini/eval.json (the transformers reference).
# Exit status 0 only if every model loads and pymini's f32 continuation matches.
set -u
LCPP=${1:?usage: $0 LLAMA_CPP_BUILD_DIR [TUNA_BIN] [SHARED_DIR]}
TUNA=${2:-$(dirname "$0")/../build/tuna}
SHARED=${3:-$(dirname "$0")/../../shared}
BIN=$LCPP/bin
RUN=""
for c in llama-completion llama-cli main; do [ -x "$BIN/$c" ] && { RUN=$BIN/$c; break; }; done
[ -n "$RUN" ] || { echo "no llama-completion/llama-cli in $BIN"; exit 2; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
fail=0
for m in llama-tiny mistral-tiny qwen2-tiny qwen3-tiny gemma-tiny pymini; do
  for q in f32 f16 bf16 q8_0 q4_0 q4_k_m; do
    f=$OUT/$m-$q.gguf
    if ! "$TUNA" export gguf --model "$SHARED/fixtures/models/$m" --quant $q "$f" 2>"$OUT/export.log"; then
      echo "FAIL export $m $q"; cat "$OUT/export.log"; fail=1; continue
    fi
    if "$RUN" -m "$f" -p "def main(" -n 24 --temp 0 -no-cnv --no-warmup >"$OUT/lc.txt" 2>"$OUT/lc.log" ||
       "$RUN" -m "$f" -p "def main(" -n 24 --temp 0 >"$OUT/lc.txt" 2>"$OUT/lc.log"; then
      echo "ok   llama.cpp loads $m $q"
    else
      echo "FAIL llama.cpp cannot run $m $q:"; tail -5 "$OUT/lc.log"; fail=1
    fi
  done
done
# pymini greedy continuation, llama.cpp (f32 GGUF) vs tuna (folder)
P="def fibonacci(n):"
"$RUN" -m "$OUT/pymini-f32.gguf" -p "$P" -n 32 --temp 0 -no-cnv --no-warmup 2>/dev/null >"$OUT/lc.txt" ||
  "$RUN" -m "$OUT/pymini-f32.gguf" -p "$P" -n 32 --temp 0 2>/dev/null >"$OUT/lc.txt"
"$TUNA" generate "$SHARED/fixtures/models/pymini" --prompt "$P" --max-tokens 32 --temperature 0 >"$OUT/tuna.txt" 2>/dev/null
if grep -qF "$(head -c 60 "$OUT/tuna.txt")" "$OUT/lc.txt"; then
  echo "ok   pymini greedy continuation equal (first 60 bytes)"
else
  echo "FAIL pymini greedy continuation differs"; echo "--- llama.cpp"; cat "$OUT/lc.txt"; echo "--- tuna"; cat "$OUT/tuna.txt"; fail=1
fi
if [ -x "$BIN/llama-perplexity" ]; then
  for q in f32 q8_0 q4_k_m; do
    echo "llama.cpp perplexity pymini $q: $("$BIN/llama-perplexity" -m "$OUT/pymini-$q.gguf" -f "$SHARED/fixtures/models/pymini/heldout.txt" -c 128 2>&1 | grep -o 'Final estimate: PPL = [0-9.]*')"
  done
  echo "reference: $(cat "$SHARED/fixtures/models/pymini/eval.json")"
fi
exit $fail
