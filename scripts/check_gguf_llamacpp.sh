#!/usr/bin/env bash
# check_gguf_llamacpp.sh — cross-checks tuna's GGUF export with a llama.cpp build.
#
# usage: scripts/check_gguf_llamacpp.sh LLAMA_CPP_BUILD_DIR [TUNA_BIN] [SHARED_DIR]
#
# LLAMA_CPP_BUILD_DIR is a CMake build folder of llama.cpp (with bin/ holding llama-completion or
# llama-cli, and the shared libraries); its source tree is found from CMakeCache.txt. Nothing of
# llama.cpp is built here except scripts/gguf_logits.c, compiled against that build.
# Needs bash, python3 (standard library only) and a C compiler (cc, or $CC).
#
# For each fixture model and export type it writes OUT.gguf with `tuna export gguf`, then
#  1. loads it with llama.cpp (llama-completion / llama-cli, greedy, 24 tokens) — a load
#     failure (wrong key type, tensor shape, unknown pre-tokenizer ...) fails the check;
#  2. logits: runs the same token ids through llama.cpp (scripts/gguf_logits.c, float32 KV cache,
#     no flash attention) and through `tuna logits` on the safetensors folder, and prints
#     max over positions of ‖lc − tuna‖/‖tuna‖ and the fraction of positions with the same
#     argmax. f32 exports must agree within F32_TOL (default 1e-4; 1e-3, F32_TOL_GELU, for
#     models with a GELU activation: ggml's CPU GELU goes through a float16 table; see
#     docs/GGUF.md); the other types are reported, not judged. The "tokens" column says whether
#     llama.cpp tokenizes the prompt to tuna's ids;
#  3. tokenizer: llama.cpp's tokenization of every text of the matching
#     fixtures/tokenizers/*/cases.json (with special tokens) against transformers' ids;
#  4. for pymini (a trained model, so greedy tokens are stable) compares llama.cpp's greedy
#     continuation of a prompt at f32 with tuna's own (tuna generate on the folder);
#  5. when llama-quantize is present, quantizes each f32 export to q8_0, q4_0 and q4_k_m with it
#     and compares, tensor by tensor, the bytes with tuna's direct export of the same type
#     (tensors whose types differ are listed, not compared);
#  6. when llama-perplexity is present, prints llama.cpp's perplexity of pymini's heldout.txt
#     (its own protocol, not the one of fixtures/models/pymini/eval.json, printed beside it).
# Exit status 0 only if every model loads, every f32 logits comparison is within its tolerance,
# every tokenizer case is equal, pymini's f32 continuation matches, and every compared
# llama-quantize tensor is byte-identical.
# LoRA: base f32 GGUF + `tuna export gguf-lora` file in llama.cpp, and `tuna export gguf --lora`
# (merged), vs `tuna logits --lora` for every fixtures/lora adapter.
# Environment: MODELS, QUANTS (space-separated lists) restrict the run, ROPE_VARIANTS (lines
# base:name:json, empty: none) replaces the RoPE variants; KEEP=DIR keeps the files.
set -u
LCPP=${1:?usage: $0 LLAMA_CPP_BUILD_DIR [TUNA_BIN] [SHARED_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
TUNA=${2:-$HERE/../build/tuna}
SHARED=${3:-$HERE/../../shared}
MODELS=${MODELS:-llama-tiny mistral-tiny qwen2-tiny qwen3-tiny gemma-tiny pymini}
QUANTS=${QUANTS:-f32 f16 bf16 q8_0 q4_0 q4_k_m}
F32_TOL=${F32_TOL:-1e-4}
F32_TOL_GELU=${F32_TOL_GELU:-1e-3}
PROMPT=${PROMPT:-"def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)"}
LCPP=$(cd "$LCPP" && pwd) || exit 2
BIN=$LCPP/bin
RUN=""
for c in llama-completion llama-cli main; do [ -x "$BIN/$c" ] && { RUN=$BIN/$c; break; }; done
[ -n "$RUN" ] || { echo "no llama-completion/llama-cli in $BIN"; exit 2; }
[ -x "$TUNA" ] || { echo "no tuna binary at $TUNA"; exit 2; }
[ -d "$SHARED/fixtures/models" ] || { echo "no fixtures under $SHARED"; exit 2; }
command -v python3 >/dev/null || { echo "python3 is needed for the comparisons"; exit 2; }
if [ -n "${KEEP:-}" ]; then OUT=$KEEP; mkdir -p "$OUT"; else OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT; fi
fail=0
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# --- build scripts/gguf_logits.c against the llama.cpp build
SRC=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$LCPP/CMakeCache.txt" 2>/dev/null)
[ -n "$SRC" ] || SRC=$(dirname "$LCPP")
LOGITS=$OUT/gguf_logits
if [ -f "$SRC/include/llama.h" ] &&
   ${CC:-cc} -std=c11 -O2 -Wall -Wextra "$HERE/gguf_logits.c" -I"$SRC/include" -I"$SRC/ggml/include" \
     -L"$BIN" -Wl,-rpath,"$BIN" -lllama -lggml -lggml-base -o "$LOGITS" 2>"$OUT/cc.log"; then
  echo "ok   built gguf_logits against $SRC (commit $(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo unknown))"
else
  echo "FAIL cannot build scripts/gguf_logits.c against $SRC ($BIN)"; cat "$OUT/cc.log" 2>/dev/null; LOGITS=""; fail=1
fi

# safetensors logits comparison: prints "maxrel meanrel argmax_equal/T", exit 1 on shape mismatch
cmp_logits() {
  python3 - "$1" "$2" <<'PY'
import json, math, struct, sys
def load(p):
    b = open(p, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n])
    s, e = h['logits']['data_offsets']
    T, V = h['logits']['shape']
    x = struct.unpack('<%df' % (T * V), b[8 + n + s:8 + n + e])
    return T, V, [x[i * V:(i + 1) * V] for i in range(T)]
Ta, Va, a = load(sys.argv[1])
Tb, Vb, b = load(sys.argv[2])
if (Ta, Va) != (Tb, Vb):
    print('shape %dx%d vs %dx%d' % (Ta, Va, Tb, Vb)); sys.exit(1)
rels, same = [], 0
for ra, rb in zip(a, b):
    d = math.sqrt(sum((p - q) ** 2 for p, q in zip(ra, rb)))
    nb = math.sqrt(sum(q * q for q in rb))
    rels.append(d / nb if nb else d)
    same += max(range(Va), key=ra.__getitem__) == max(range(Vb), key=rb.__getitem__)
print('%.2e %.2e %d/%d' % (max(rels), sum(rels) / len(rels), same, Ta))
PY
}

# the input_ids of a `tuna logits` file as "1,2,3"
st_ids() {
  python3 -c '
import json, struct, sys
b = open(sys.argv[1], "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
s, e = h["input_ids"]["data_offsets"]
print(",".join(str(x) for x in struct.unpack("<%di" % ((e - s) // 4), b[8 + n + s:8 + n + e])))' "$1"
}

# GGUF tensor comparison: tensors of equal type byte by byte; prints a summary line and the
# differing/skipped tensors; exit 1 if a compared tensor differs
cmp_gguf() {
  python3 - "$1" "$2" <<'PY'
import struct, sys
BLK = {0: (4, 1), 1: (2, 1), 30: (2, 1), 8: (34, 32), 2: (18, 32), 3: (20, 32), 6: (22, 32), 7: (24, 32),
       12: (144, 256), 13: (176, 256), 14: (210, 256), 10: (84, 256), 11: (110, 256)}
NAME = {0: 'f32', 1: 'f16', 30: 'bf16', 8: 'q8_0', 2: 'q4_0', 3: 'q4_1', 6: 'q5_0', 7: 'q5_1', 12: 'q4_K',
        13: 'q5_K', 14: 'q6_K', 10: 'q2_K', 11: 'q3_K'}
def read(path):
    b = open(path, 'rb').read()
    pos = 0
    def take(fmt):
        nonlocal pos
        v = struct.unpack_from('<' + fmt, b, pos); pos += struct.calcsize('<' + fmt); return v[0]
    def string():
        nonlocal pos
        n = take('Q'); s = b[pos:pos + n].decode('utf-8', 'replace'); pos += n; return s
    SC = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q', 12: 'd'}
    def value(t):
        if t == 8: return string()
        if t == 9:
            et = take('I'); n = take('Q'); return [value(et) for _ in range(n)]
        return take(SC[t])
    assert b[:4] == b'GGUF', path
    pos = 4; take('I'); nt = take('Q'); nkv = take('Q')
    kv = {}
    for _ in range(nkv):
        k = string(); kv[k] = value(take('I'))
    ti = []
    for _ in range(nt):
        name = string(); nd = take('I'); dims = [take('Q') for _ in range(nd)]; t = take('I'); off = take('Q')
        ti.append((name, dims, t, off))
    al = kv.get('general.alignment', 32)
    base = (pos + al - 1) // al * al
    out = {}
    for name, dims, t, off in ti:
        n = 1
        for d in dims: n *= d
        bs, bl = BLK[t]
        out[name] = (t, dims, b[base + off:base + off + n // bl * bs])
    return out
a, b = read(sys.argv[1]), read(sys.argv[2])
same, diff, skip = {}, [], []
for name in a:
    if name not in b:
        skip.append('%s only in tuna' % name); continue
    ta, da, xa = a[name]; tb, db, xb = b[name]
    if ta != tb or da != db:
        skip.append('%s tuna %s, llama-quantize %s' % (name, NAME.get(ta, ta), NAME.get(tb, tb))); continue
    if xa == xb:
        same[NAME.get(ta, ta)] = same.get(NAME.get(ta, ta), 0) + 1
    else:
        nbad = sum(p != q for p, q in zip(xa, xb))
        diff.append('%s (%s): %d of %d bytes differ' % (name, NAME.get(ta, ta), nbad, len(xa)))
skip += ['%s only in llama-quantize' % n for n in b if n not in a]
print('identical: %s; differ: %d; not compared: %d' % (
    ', '.join('%d %s' % (v, k) for k, v in sorted(same.items())) or 'none', len(diff), len(skip)))
for l in diff: print('    differs: ' + l)
for l in skip: print('    not compared: ' + l)
sys.exit(1 if diff else 0)
PY
}

printf '%-13s %-7s %-5s %-10s %-10s %-7s %s\n' model quant load max_rel mean_rel argmax tokens
for m in $MODELS; do
  dir=$SHARED/fixtures/models/$m
  ids=""
  if "$TUNA" logits "$dir" --text "$PROMPT" -o "$OUT/$m-tuna.st" 2>"$OUT/tl.log"; then
    ids=$(st_ids "$OUT/$m-tuna.st")
  else
    echo "FAIL tuna logits $m:"; cat "$OUT/tl.log"; fail=1
  fi
  for q in $QUANTS; do
    f=$OUT/$m-$q.gguf
    if ! "$TUNA" export gguf --model "$dir" --quant "$q" "$f" 2>"$OUT/export.log"; then
      echo "FAIL export $m $q"; cat "$OUT/export.log"; fail=1; continue
    fi
    load=ok
    if ! "$RUN" -m "$f" -p "def main(" -n 24 --temp 0 -no-cnv --no-warmup >"$OUT/lc.txt" 2>"$OUT/lc.log" &&
       ! "$RUN" -m "$f" -p "def main(" -n 24 --temp 0 >"$OUT/lc.txt" 2>"$OUT/lc.log"; then
      load=FAIL; fail=1
      echo "FAIL llama.cpp cannot run $m $q:"; tail -5 "$OUT/lc.log"
    fi
    res="- - -" tokres="-"
    if [ -n "$LOGITS" ] && [ -n "$ids" ] && [ $load = ok ]; then
      if "$LOGITS" "$f" --ids "$ids" -o "$OUT/$m-$q-lc.st" 2>"$OUT/gl.log"; then
        res=$(cmp_logits "$OUT/$m-$q-lc.st" "$OUT/$m-tuna.st") || { fail=1; res="$res - -"; }
        tol=$F32_TOL
        grep -q '"hidden_act[a-z]*": *"gelu' "$dir/config.json" && tol=$F32_TOL_GELU
        if [ "$q" = f32 ] && ! python3 -c 'import sys; sys.exit(not float(sys.argv[1]) <= float(sys.argv[2]))' \
             "${res%% *}" "$tol"; then
          echo "FAIL $m f32 logits: max relative error ${res%% *} > $tol"; fail=1
        fi
      else
        echo "FAIL gguf_logits $m $q:"; tail -5 "$OUT/gl.log"; fail=1
      fi
      lcids=$("$LOGITS" "$f" --text "$PROMPT" --print-ids -o "$OUT/tok.st" 2>/dev/null)
      if [ "$lcids" = "$ids" ]; then tokres="same"; else tokres="DIFFER (tuna $ids | llama.cpp $lcids)"; fi
    fi
    # shellcheck disable=SC2086
    printf '%-13s %-7s %-5s %-10s %-10s %-7s %s\n' "$m" "$q" "$load" $res "$tokres"
  done
done

# RoPE scaling: the fixtures use plain RoPE, so variants of llama-tiny and qwen2-tiny with
# rope_parameters changed (same weights) are exported at f32 and compared like above; tuna's
# RoPE variants follow transformers' _compute_*_rope_parameters (tests/test_rope*.c)
ROPE_VARIANTS=${ROPE_VARIANTS-"llama-tiny:linear:{\"rope_type\":\"linear\",\"factor\":2.0}
llama-tiny:yarn:{\"rope_type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":128}
llama-tiny:yarn-attn:{\"rope_type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":128,\"attention_factor\":1.3}
llama-tiny:llama3:{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":64}
qwen2-tiny:linear:{\"rope_type\":\"linear\",\"factor\":2.0}
qwen2-tiny:yarn:{\"rope_type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":128}"}
if [ -n "$LOGITS" ]; then
  while IFS=: read -r base name upd; do
    [ -n "$base" ] || continue
    v=$OUT/rope-$base-$name
    rm -rf "$v" && mkdir -p "$v"
    for f in "$SHARED/fixtures/models/$base"/*; do ln -s "$f" "$v/"; done
    rm "$v/config.json"
    python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))
c.setdefault("rope_parameters", {"rope_theta": c.pop("rope_theta", 10000.0)}).update(json.loads(sys.argv[2]))
json.dump(c, open(sys.argv[3], "w"), indent=1)' "$SHARED/fixtures/models/$base/config.json" "$upd" "$v/config.json"
    if ! "$TUNA" logits "$v" --text "$PROMPT" -o "$v.st" 2>"$OUT/tl.log" ||
       ! "$TUNA" export gguf --model "$v" --quant f32 "$v.gguf" 2>"$OUT/export.log"; then
      echo "FAIL rope $base $name: tuna refuses:"; tail -n 2 "$OUT/tl.log" "$OUT/export.log"; fail=1; continue
    fi
    ids=$(st_ids "$v.st")
    if ! "$LOGITS" "$v.gguf" --ids "$ids" -o "$v-lc.st" 2>"$OUT/gl.log"; then
      echo "FAIL rope $base $name: gguf_logits:"; tail -3 "$OUT/gl.log"; fail=1; continue
    fi
    res=$(cmp_logits "$v-lc.st" "$v.st")
    if python3 -c 'import sys; sys.exit(not float(sys.argv[1]) <= float(sys.argv[2]))' "${res%% *}" "$F32_TOL"; then
      st=ok
    else
      st=FAIL; fail=1
    fi
    echo "$st   rope $base $name f32: max_rel mean_rel argmax $res"
  done <<<"$ROPE_VARIANTS"
fi

# LoRA: every fixture adapter (fixtures/lora/*/adapter, base from its folder name, e.g.
# llama-tiny-rslora → models/llama-tiny) on the prompt, against `tuna logits --lora` on the folder
# (PEFT's unmerged LoRA): (a) the base f32 GGUF + tuna's GGUF LoRA file (f32) in llama.cpp,
# unmerged (llama_set_adapters_lora, scale 1); (b) `tuna export gguf --lora` (merged) at f32.
# (b) is merged into the bf16 weights (the merged-16bit rounding), so it is compared with
# `tuna logits` on the `tuna export merged-16bit` folder at F32_TOL, and with the unmerged run
# for information; (c) the GGUF LoRA file at f16 (informative).
if [ -n "$LOGITS" ] && [ -d "$SHARED/fixtures/lora" ]; then
  for ad in "$SHARED"/fixtures/lora/*/adapter; do
    lname=$(basename "$(dirname "$ad")")
    base=""
    for m in llama-tiny mistral-tiny qwen2-tiny qwen3-tiny gemma-tiny pymini; do
      case $lname in "$m"|"$m"-*) base=$m ;; esac
    done
    [ -n "$base" ] || { echo "skip lora $lname: no base model name in it"; continue; }
    dir=$SHARED/fixtures/models/$base
    L=$OUT/lora-$lname
    if ! "$TUNA" logits "$dir" --lora "$ad" --text "$PROMPT" -o "$L-tuna.st" 2>"$OUT/tl.log" ||
       ! "$TUNA" export gguf --model "$dir" --quant f32 "$L-base.gguf" 2>"$OUT/export.log" ||
       ! "$TUNA" export gguf-lora --model "$dir" --lora "$ad" --quant f32 "$L-f32.gguf" 2>>"$OUT/export.log" ||
       ! "$TUNA" export gguf-lora --model "$dir" --lora "$ad" --quant f16 "$L-f16.gguf" 2>>"$OUT/export.log" ||
       ! "$TUNA" export gguf --model "$dir" --lora "$ad" --quant f32 "$L-merged.gguf" 2>>"$OUT/export.log" ||
       ! { rm -rf "$L-merged16" && "$TUNA" export merged-16bit --model "$dir" --adapter "$ad" "$L-merged16" >/dev/null 2>>"$OUT/export.log"; } ||
       ! "$TUNA" logits "$L-merged16" --text "$PROMPT" -o "$L-merged16.st" 2>"$OUT/tl.log"; then
      echo "FAIL lora $lname: tuna:"; tail -n 3 "$OUT/tl.log" "$OUT/export.log"; fail=1; continue
    fi
    ids=$(st_ids "$L-tuna.st")
    for v in f32 f16 merged merged-vs-unmerged; do
      ref=$L-tuna.st
      case $v in
        merged) "$LOGITS" "$L-merged.gguf" --ids "$ids" -o "$L-$v-lc.st" 2>"$OUT/gl.log"; rc=$?; ref=$L-merged16.st ;;
        merged-vs-unmerged) cp "$L-merged-lc.st" "$L-$v-lc.st"; rc=$? ;;
        *) "$LOGITS" "$L-base.gguf" --lora "$L-$v.gguf" --ids "$ids" -o "$L-$v-lc.st" 2>"$OUT/gl.log"; rc=$? ;;
      esac
      if [ $rc -ne 0 ]; then echo "FAIL lora $lname $v: gguf_logits:"; tail -3 "$OUT/gl.log"; fail=1; continue; fi
      res=$(cmp_logits "$L-$v-lc.st" "$ref")
      if [ $v = f16 ] || [ $v = merged-vs-unmerged ]; then
        st=info
      elif python3 -c 'import sys; sys.exit(not float(sys.argv[1]) <= float(sys.argv[2]))' "${res%% *}" "$F32_TOL"; then
        st=ok
      else
        st=FAIL; fail=1
      fi
      case $v in f32) what="base f32 + GGUF LoRA f32" ;; f16) what="base f32 + GGUF LoRA f16" ;;
                 merged) what="gguf --lora f32 vs merged-16bit" ;;
                 merged-vs-unmerged) what="gguf --lora f32 vs unmerged" ;; esac
      printf '%-4s  lora %-18s %-32s max_rel mean_rel argmax %s\n' "$st" "$lname" "$what" "$res"
    done
    # the adapter changes the logits: llama.cpp without it must not agree as well
    if "$LOGITS" "$L-base.gguf" --ids "$ids" -o "$L-none-lc.st" 2>"$OUT/gl.log"; then
      echo "info  lora $lname base f32 without the adapter: max_rel mean_rel argmax $(cmp_logits "$L-none-lc.st" "$L-tuna.st")"
    fi
  done
fi

# llama.cpp's tokenizer on the exported vocabulary vs transformers: the fixture tokenizer whose
# tokenizer.json is the model's, every cases.json text, ids with special tokens (BOS) as
# transformers' encode() gives them; llama.cpp tokenizes with add_special and parse_special
cmp_tokenizer() {
  python3 - "$@" <<'PY'
import glob, json, os, subprocess, sys
exe, gguf, mdir, tdir = sys.argv[1:]
tj = open(os.path.join(mdir, 'tokenizer.json'), 'rb').read()
cases = [c for c in sorted(glob.glob(os.path.join(tdir, '*', 'cases.json')))
         if open(os.path.join(os.path.dirname(c), 'tokenizer.json'), 'rb').read() == tj]
if not cases:
    print('no fixture tokenizer with this tokenizer.json'); sys.exit(0)
enc = json.load(open(cases[0]))['encode']
bad = []
for e in enc:
    p = subprocess.run([exe, gguf, '--text', e['text'], '--tokenize-only'], capture_output=True, text=True)
    got = [int(x) for x in p.stdout.strip().split(',') if x] if p.returncode == 0 else None
    if got != e['ids_with_special']:
        bad.append('%r: transformers %s, llama.cpp %s' % (e['text'], e['ids_with_special'], got))
print('%d/%d equal to transformers (%s)' % (len(enc) - len(bad), len(enc), os.path.basename(os.path.dirname(cases[0]))))
for b in bad: print('    ' + b)
sys.exit(1 if bad else 0)
PY
}
if [ -n "$LOGITS" ]; then
  for m in $MODELS; do
    [ -f "$OUT/$m-f32.gguf" ] || continue
    if r=$(cmp_tokenizer "$LOGITS" "$OUT/$m-f32.gguf" "$SHARED/fixtures/models/$m" "$SHARED/fixtures/tokenizers"); then
      st=ok
    else
      st=FAIL; fail=1
    fi
    echo "$st   llama.cpp tokenizer $m: $r"
  done
fi

# pymini greedy continuation, llama.cpp (f32 GGUF) vs tuna (folder)
if [ -f "$OUT/pymini-f32.gguf" ]; then
  P="def fibonacci(n):"
  "$RUN" -m "$OUT/pymini-f32.gguf" -p "$P" -n 32 --temp 0 -no-cnv --no-warmup 2>/dev/null >"$OUT/lc.txt" ||
    "$RUN" -m "$OUT/pymini-f32.gguf" -p "$P" -n 32 --temp 0 2>/dev/null >"$OUT/lc.txt"
  "$TUNA" generate "$SHARED/fixtures/models/pymini" --prompt "$P" --max-tokens 32 --temperature 0 >"$OUT/tuna.txt" 2>/dev/null
  if [ -s "$OUT/tuna.txt" ] && grep -qF "$(head -c 60 "$OUT/tuna.txt")" "$OUT/lc.txt"; then
    echo "ok   pymini greedy continuation equal (first 60 bytes)"
  else
    echo "FAIL pymini greedy continuation differs"; echo "--- llama.cpp"; cat "$OUT/lc.txt"; echo "--- tuna"; cat "$OUT/tuna.txt"; fail=1
  fi
fi

# llama-quantize of tuna's f32 export vs tuna's direct export
if [ -x "$BIN/llama-quantize" ]; then
  for m in $MODELS; do
    [ -f "$OUT/$m-f32.gguf" ] || continue
    for q in q8_0 q4_0 q4_k_m; do
      [ -f "$OUT/$m-$q.gguf" ] || continue
      if ! "$BIN/llama-quantize" "$OUT/$m-f32.gguf" "$OUT/$m-$q-lq.gguf" "$(echo "$q" | tr "[:lower:]" "[:upper:]")" 2 >"$OUT/lq.log" 2>&1; then
        echo "FAIL llama-quantize $m $q:"; tail -5 "$OUT/lq.log"; fail=1; continue
      fi
      if r=$(cmp_gguf "$OUT/$m-$q.gguf" "$OUT/$m-$q-lq.gguf"); then st=ok; else st=FAIL; fail=1; fi
      echo "$st   llama-quantize $m $q: $r"
    done
  done
fi

if [ -x "$BIN/llama-perplexity" ] && [ -f "$OUT/pymini-f32.gguf" ]; then
  for q in f32 q8_0 q4_k_m; do
    [ -f "$OUT/pymini-$q.gguf" ] || continue
    "$BIN/llama-perplexity" -m "$OUT/pymini-$q.gguf" -f "$SHARED/fixtures/models/pymini/heldout.txt" -c 128 >"$OUT/ppl.log" 2>&1
    r=$(grep -o 'Final estimate: PPL = [0-9.]*' "$OUT/ppl.log") || r="no result ($(tail -n 1 "$OUT/ppl.log"))"
    echo "llama.cpp perplexity pymini $q (-c 128): $r"
  done
  echo "reference: $(cat "$SHARED/fixtures/models/pymini/eval.json")"
fi
exit $fail
