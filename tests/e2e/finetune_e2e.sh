#!/usr/bin/env bash
# finetune_e2e.sh TUNA_BIN SOURCE_DIR WORK_DIR — `tuna finetune` end to end on the fixture run
# train/llama-tiny-lora-responses: the recipe of its trace.json given as flags, every step's loss
# in metrics.jsonl within relative 1e-4 of the trace, the PEFT files and loss.svg written, and a
# run resumed from checkpoint-5 ending byte-identical to the uninterrupted one.
# Exit 77 (ctest SKIP) without ../shared.
set -u
TUNA=$1 SRC=$2 WORK=$3
SHARED=${TUNA_SHARED_DIR:-$SRC/../shared}
FX=$SHARED/fixtures/train/llama-tiny-lora-responses
if [ ! -d "$FX" ]; then echo "SKIP: $FX not found (set TUNA_SHARED_DIR)"; exit 77; fi
rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
fail() { echo "FAIL: $*"; exit 1; }
recipe=(--model "$SHARED/fixtures/models/llama-tiny" --data "$FX/data.jsonl" --train-on-responses-only
        --learning-rate 2e-3 --weight-decay 0.01 --lr-scheduler constant --max-grad-norm 0 --lora-r 8
        --lora-alpha 16 --batch-size 2 --no-shuffle --max-steps 12 --threads 2 --quiet)

"$TUNA" finetune "${recipe[@]}" --init-adapter "$FX/adapter_init" --output "$WORK/a" --save-steps 5 \
  || fail "finetune exited $?"
for f in adapter_config.json adapter_model.safetensors metrics.jsonl loss.svg checkpoint-5/optimizer.bin \
         checkpoint-10/trainer_state.json; do
  [ -s "$WORK/a/$f" ] || fail "$f missing"
done
grep -q '<svg' "$WORK/a/loss.svg" || fail "loss.svg is not an SVG"
[ "$(wc -l <"$WORK/a/metrics.jsonl")" -eq 12 ] || fail "metrics.jsonl has $(wc -l <"$WORK/a/metrics.jsonl") lines"
# per-step losses of run DIR against PEFT's trace, within 1e-4 relative
check_losses() {
  grep -o '"loss": [0-9][-0-9.e+]*' "$1/metrics.jsonl" | awk '{print $2}' >"$WORK/ours"
  grep -o '"loss": [0-9][-0-9.e+]*' "$FX/trace.json" | awk '{print $2}' >"$WORK/ref"
  paste "$WORK/ours" "$WORK/ref" | awk '{ e = ($1 - $2) / $2; if (e < 0) e = -e; printf "step %d loss %s ref %s rel %.1e\n", NR, $1, $2, e
                                          if (e > 1e-4) bad = 1 } END { exit bad || NR != 12 }'
}
check_losses "$WORK/a" || fail "losses differ"
# the memory mode (--offload: checkpointing, host-side AdamW, the MLP in chunks) trains the same
"$TUNA" finetune "${recipe[@]}" --init-adapter "$FX/adapter_init" --output "$WORK/off" --offload \
  || fail "finetune --offload exited $?"
check_losses "$WORK/off" || fail "--offload losses differ"
for k in step loss grad_norm learning_rate tokens_per_second; do
  grep -q "\"$k\": " "$WORK/a/metrics.jsonl" || fail "metrics.jsonl lacks $k"
done

# resume from checkpoint-5: the same adapter, byte for byte
mkdir -p "$WORK/b" && cp -r "$WORK/a/checkpoint-5" "$WORK/b/" || exit 1
"$TUNA" finetune "${recipe[@]}" --output "$WORK/b" --resume || fail "resume exited $?"
cmp "$WORK/a/adapter_model.safetensors" "$WORK/b/adapter_model.safetensors" || fail "resumed adapter differs"
[ "$(grep -c . "$WORK/b/loss.svg")" -gt 0 ] || fail "resumed run wrote no loss.svg"

# refusals: a resume with another data order, an existing adapter without --overwrite, bad flags
"$TUNA" finetune "${recipe[@]}" --output "$WORK/b" --resume --batch-size 4 2>"$WORK/err" && fail "resume accepted another batch size"
grep -q "resume with the same data order" "$WORK/err" || fail "unclear message: $(cat "$WORK/err")"
"$TUNA" finetune "${recipe[@]}" --output "$WORK/a" 2>"$WORK/err" && fail "overwrote an adapter without --overwrite"
grep -q -- "--overwrite" "$WORK/err" || fail "unclear message: $(cat "$WORK/err")"
"$TUNA" finetune "${recipe[@]}" --output "$WORK/c" --lora-r 0 2>/dev/null; [ $? -eq 2 ] || fail "--lora-r 0 accepted"
"$TUNA" finetune "${recipe[@]}" --output "$WORK/c" --lr-scheduler wsd 2>"$WORK/err" && fail "unknown scheduler accepted"
grep -q "constant, linear or cosine" "$WORK/err" || fail "unclear message: $(cat "$WORK/err")"
echo "finetune e2e: ok"
