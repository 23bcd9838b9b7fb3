#!/usr/bin/env bash
# serve_startup.sh MODEL_DIR [TUNA_BIN] [-- extra `tuna serve` options]
# The time from starting `tuna serve MODEL_DIR` to the first answer of a real HTTP request: starts
# the server on a free port, polls GET /health every 20 ms, then sends one /v1/completions request
# (max_tokens 1) with curl. Prints the two times and, last, "startup_seconds S" (to the answer).
# For 8B shapes without a download: tuna bench --synthetic llama-3-8b --write-synthetic DIR first.
# Exit 1 when the server does not come up or the request fails (its log is printed).
set -u
if [ $# -lt 1 ]; then
  echo "usage: $0 MODEL_DIR [TUNA_BIN] [-- tuna serve options]" >&2
  exit 2
fi
DIR=$1
shift
TUNA=${TUNA:-$(dirname "$0")/../build/tuna}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then TUNA=$1; shift; fi
[ $# -gt 0 ] && [ "$1" = "--" ] && shift
command -v curl >/dev/null || { echo "serve_startup.sh: curl is needed" >&2; exit 2; }
[ -x "$TUNA" ] || { echo "serve_startup.sh: no tuna binary at $TUNA (give it as the 2nd argument)" >&2; exit 2; }
LOG=$(mktemp -d)
now() { date +%s.%N; }
T0=$(now)
"$TUNA" serve "$DIR" --port 0 --served-model-name startup "$@" >"$LOG/out" 2>"$LOG/err" &
PID=$!
cleanup() { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; rm -rf "$LOG"; }
trap cleanup EXIT
die() {
  echo "serve_startup.sh: $*" >&2
  sed 's/^/  tuna serve: /' "$LOG/err" "$LOG/out" >&2
  exit 1
}
PORT=
while [ -z "$PORT" ]; do
  kill -0 "$PID" 2>/dev/null || die "tuna serve exited before listening"
  PORT=$(sed -n 's|.* on http://[^:]*:\([0-9][0-9]*\) .*|\1|p' "$LOG/out" | head -n 1)
  [ -n "$PORT" ] || sleep 0.02
done
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  kill -0 "$PID" 2>/dev/null || die "tuna serve exited before /health answered"
  sleep 0.02
done
T1=$(now)
BODY='{"model": "startup", "prompt": "Hello, my name is", "max_tokens": 1, "temperature": 0}'
ANSWER=$(curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' -d "$BODY") ||
  die "the completion request failed"
T2=$(now)
echo "$ANSWER" | grep -q '"choices"' || die "unexpected answer: $ANSWER"
awk -v a="$T0" -v b="$T1" -v c="$T2" 'BEGIN {
  printf "health      %.2f s after start\n", b - a
  printf "first answer %.2f s after start\n", c - a
  printf "startup_seconds %.2f\n", c - a }'
