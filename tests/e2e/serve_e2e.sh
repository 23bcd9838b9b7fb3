#!/usr/bin/env bash
# serve_e2e.sh TUNA_BIN SOURCE_DIR WORK_DIR — end-to-end test of `tuna serve` with the official
# `openai` npm client. Installs the client into WORK_DIR (inside the build folder, ignored by git),
# starts the server on a free loopback port with the embedded pymini model and runs e2e.mjs.
# Exit 77 (ctest SKIP) when node/npm or the npm registry are not available.
set -u
TUNA=$1 SRC=$2 WORK=$3
MODEL="$SRC/models/pymini"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "SKIP: node and npm are needed for the serve end-to-end test (scripts/install-deps.sh installs them)"
  exit 77
fi
mkdir -p "$WORK"
cp "$SRC/tests/e2e/package.json" "$SRC/tests/e2e/e2e.mjs" "$WORK/"
if [ ! -d "$WORK/node_modules/openai" ]; then
  if ! (cd "$WORK" && timeout 300 npm install --no-audit --no-fund --loglevel=error >npm.log 2>&1); then
    echo "SKIP: npm install of the openai client failed (offline?):"; tail -5 "$WORK/npm.log"
    exit 77
  fi
fi
OUT="$WORK/server.out"
# A small KV cache (about 2,100 tokens, >= max model len 1024) so that the load test preempts.
"$TUNA" serve "$MODEL" --host 127.0.0.1 --port 0 --api-key e2e-key --kv-cache-gb 0.008 --max-num-seqs 64 \
  --max-num-batched-tokens 256 --max-request-bytes 65536 --threads 2 >"$OUT" 2>"$WORK/server.err" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
PORT=""
for _ in $(seq 1 100); do
  PORT=$(sed -n 's/.*on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$OUT")
  [ -n "$PORT" ] && break
  kill -0 $PID 2>/dev/null || break
  sleep 0.1
done
if [ -z "$PORT" ]; then
  echo "FAIL: the server did not start"; cat "$WORK/server.err"; exit 1
fi
cat "$WORK/server.err"
(cd "$WORK" && BASE="http://127.0.0.1:$PORT" TUNA="$TUNA" MODEL="$MODEL" timeout 600 node e2e.mjs)
rc=$?
kill -TERM $PID
wait $PID
src=$?
trap - EXIT
if [ $src -ne 0 ]; then echo "FAIL: the server exited with $src after SIGTERM"; cat "$WORK/server.err"; exit 1; fi
exit $rc
