#!/usr/bin/env bash
# bench_serve_e2e.sh TUNA_BIN SOURCE_DIR WORK_DIR — `tuna bench --serve` from the command line on
# models/pymini (CPU, tiny numbers): offline and closed-loop runs with synthetic adapters report
# every request completed and the exact token counts in --json; `--write-synthetic` writes a
# folder (tiny Llama-3 shapes) whose tokenizer loads, which `tuna bench --serve` and `tuna generate`
# run, and bench/serve_startup.sh answers on it (when curl is installed); plain `tuna bench` runs
# and prints its prefill and decode lines, and its sweep form prints a row per run.
set -u
TUNA=$1 SRC=$2 WORK=$3
rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
fail() { echo "FAIL: $*"; exit 1; }
# has KEY VALUE FILE: the JSON report has "KEY":VALUE
has() { grep -q "\"$1\":$2[,}]" "$3" || fail "$3: wanted \"$1\":$2 in $(cat "$3")"; }

common=(--device cpu --threads 1 --kv-cache-gb 0.01 --max-num-seqs 4 --max-num-batched-tokens 64)
"$TUNA" bench --serve "$SRC/models/pymini" "${common[@]}" --requests 5 --prompt-len 16 --gen 6 \
  --json "$WORK/offline.json" >"$WORK/offline.txt" || fail "offline run exited $?"
cat "$WORK/offline.txt"
has completed 5 "$WORK/offline.json"
has failed 0 "$WORK/offline.json"
has output_tokens 30 "$WORK/offline.json"
has prompt_tokens 80 "$WORK/offline.json"
has mode '"offline"' "$WORK/offline.json"
grep -q '^requests     5 completed, 0 failed' "$WORK/offline.txt" || fail "offline report"

"$TUNA" bench --serve "$SRC/models/pymini" "${common[@]}" --requests 6 --prompt-len 9 --gen 5 --concurrency 2 \
  --loras 2 --lora-rank 4 --json "$WORK/online.json" >"$WORK/online.txt" || fail "online run exited $?"
cat "$WORK/online.txt"
has completed 6 "$WORK/online.json"
has output_tokens 30 "$WORK/online.json"
has loras 2 "$WORK/online.json"
has mode '"online"' "$WORK/online.json"

"$TUNA" bench --serve "$SRC/models/pymini" --requests 0 >/dev/null 2>&1 && fail "--requests 0 accepted"
# a synthetic model that cannot be built (no such GPU, or no CUDA in this build): an error message
# and exit status 1, not an abort (its weights were freed twice until the twelfth session)
"$TUNA" bench --serve --synthetic llama-3-tiny --device cuda:99 --requests 1 >"$WORK/nodev.txt" 2>&1
rc=$?
[ "$rc" = 1 ] || fail "--device cuda:99 exited $rc (wanted 1): $(cat "$WORK/nodev.txt")"
grep -q 'double free\|Aborted' "$WORK/nodev.txt" && fail "--device cuda:99: $(cat "$WORK/nodev.txt")"

# plain `tuna bench` (prefill and decode speed): its warm-up steps, timed prefill and greedy decode steps
"$TUNA" bench --synthetic llama-3-tiny --device cpu --threads 1 --batch 3 --prompt-len 16 --gen 3 >"$WORK/speed.txt" ||
  fail "tuna bench exited $?"
cat "$WORK/speed.txt"
grep -q '^prefill     3 x 16 tokens in ' "$WORK/speed.txt" || fail "tuna bench printed no prefill line"
grep -q '^decode      batch 3, 3 steps in ' "$WORK/speed.txt" || fail "tuna bench printed no decode line"
"$TUNA" bench --synthetic llama-3-tiny --gen 1 >/dev/null 2>&1 && fail "tuna bench --gen 1 accepted"
# issue #6's form: `tuna bench decode|prefill --synthetic llama3-... --dtype nf4 --batch 1,2 --ctx 8,16`,
# one run per batch size and prompt length, then a table row each
"$TUNA" bench decode --synthetic llama3-tiny --device cpu --threads 1 --dtype nf4 --batch 1,2 --ctx 8,16 --gen 2 \
  >"$WORK/sweep.txt" || fail "tuna bench decode (a sweep) exited $?"
cat "$WORK/sweep.txt"
rows=$(grep -cE '^ +[12] +(8|16) +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9]+%$' "$WORK/sweep.txt")
[ "$rows" = 4 ] || fail "the sweep printed $rows table rows, wanted 4"
grep -q 'prefill tok/s' "$WORK/sweep.txt" && fail "bench decode printed the prefill columns"
"$TUNA" bench prefill --synthetic llama-3-tiny --device cpu --threads 1 --ctx 16 >"$WORK/pf.txt" ||
  fail "tuna bench prefill exited $?"
grep -q '^prefill     1 x 16 tokens in ' "$WORK/pf.txt" || fail "bench prefill printed no prefill line"
grep -q '^decode' "$WORK/pf.txt" && fail "bench prefill printed a decode line"
"$TUNA" bench --synthetic llama-3-tiny --batch 1,,2 >/dev/null 2>&1 && fail "--batch 1,,2 accepted"
"$TUNA" bench --synthetic llama-3-tiny --ctx 0 >/dev/null 2>&1 && fail "--ctx 0 accepted"
"$TUNA" bench --synthetic llama-3-tiny --batch 257 >/dev/null 2>&1 && fail "--batch 257 accepted"

M="$WORK/synth"
"$TUNA" bench --synthetic llama-3-tiny --write-synthetic "$M" || fail "--write-synthetic exited $?"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json; do
  [ -s "$M/$f" ] || fail "$f missing from the written folder"
done
"$TUNA" bench --synthetic llama-3-tiny --write-synthetic "$M" >/dev/null 2>&1 && fail "an existing folder was overwritten"
"$TUNA" bench --serve "$M" "${common[@]}" --requests 3 --prompt-len 8 --gen 5 --json "$WORK/synth.json" \
  >/dev/null || fail "bench on the written folder exited $?"
has completed 3 "$WORK/synth.json"
"$TUNA" generate "$M" --device cpu --prompt "Hello" --max-tokens 4 --ignore-eos >"$WORK/gen.txt" ||
  fail "tuna generate on the written folder exited $?"
if command -v curl >/dev/null; then
  TUNA="$TUNA" "$SRC/bench/serve_startup.sh" "$M" "$TUNA" -- --device cpu --kv-cache-gb 0.01 >"$WORK/startup.txt" ||
    fail "serve_startup.sh exited $?"
  cat "$WORK/startup.txt"
  grep -q '^startup_seconds [0-9]' "$WORK/startup.txt" || fail "serve_startup.sh printed no time"
else
  echo "(curl not installed: bench/serve_startup.sh not checked)"
fi
echo "PASS"
