#!/usr/bin/env bash
# lora_e2e.sh TUNA_BIN SHARED_DIR WORK_DIR — end-to-end test of runtime LoRA adapters and chat
# templates in `tuna serve`: copies the llama-tiny fixture adapter under a temporary --lora-root,
# serves llama-tiny from a folder whose chat_template.jinja renders `tools`, and runs
# lora_e2e.mjs (node's built-in fetch). Exit 77 (ctest SKIP) without node or the fixtures.
set -u
TUNA=$1 SHARED=${TUNA_SHARED_DIR:-$2} WORK=$3
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL="$SHARED/fixtures/models/llama-tiny"
ADAPTER="$SHARED/fixtures/lora/llama-tiny/adapter"
if ! command -v node >/dev/null; then echo "SKIP: node is needed for the LoRA serve end-to-end test"; exit 77; fi
if [ ! -d "$MODEL" ] || [ ! -d "$ADAPTER" ]; then echo "SKIP: fixtures not found under $SHARED"; exit 77; fi
rm -rf "$WORK"
mkdir -p "$WORK/root" "$WORK/model" "$WORK/outside"
cp -r "$ADAPTER" "$WORK/root/tiny"
cp -r "$ADAPTER" "$WORK/outside/tiny"
ln -s "$WORK/outside/tiny" "$WORK/root/escape"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json; do
  [ -e "$MODEL/$f" ] && ln -s "$MODEL/$f" "$WORK/model/$f"
done
# a template that shows the tools it was given (and numbers as the template sees them)
cat >"$WORK/model/chat_template.jinja" <<'TPL'
{{- bos_token }}{%- if tools is not none %}{{- 'TOOLS ' + (tools | tojson) + '\n' }}{%- else %}{{- 'NO TOOLS\n' }}{%- endif %}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
TPL
OUT="$WORK/server.out"
"$TUNA" serve "$WORK/model" --served-model-name llama-tiny --host 127.0.0.1 --port 0 --threads 2 \
  --kv-cache-gb 0.01 --lora-root "$WORK/root" --max-loras 1 --max-lora-rank 8 >"$OUT" 2>"$WORK/server.err" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
PORT=""
for _ in $(seq 1 100); do
  PORT=$(sed -n 's/.*on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$OUT")
  [ -n "$PORT" ] && break
  kill -0 $PID 2>/dev/null || break
  sleep 0.1
done
if [ -z "$PORT" ]; then echo "FAIL: the server did not start"; cat "$WORK/server.err"; exit 1; fi
BASE="http://127.0.0.1:$PORT" TUNA="$TUNA" MODEL="$MODEL" TPLMODEL="$WORK/model" WORK="$WORK" \
  timeout 300 node "$HERE/lora_e2e.mjs"
rc=$?
kill -TERM $PID
wait $PID
src=$?
trap - EXIT
if [ $src -ne 0 ]; then echo "FAIL: the server exited with $src after SIGTERM"; cat "$WORK/server.err"; exit 1; fi
[ $rc -ne 0 ] && cat "$WORK/server.err"
exit $rc
