#!/usr/bin/env bash
# gpu-check.sh — on the GPU machine, after scripts/gpu-bundle.sh here: the CUDA op tests, every
# fixture model on the GPU (fp32 and bf16), LoRA on the GPU against the CPU, the kernel benchmark
# and end-to-end decode on synthetic Llama-3-8B shapes (bf16 and NF4). Prints a short table;
# full logs go to $OUT (or /tmp/tuna-gpu).
set -u
R=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$R/.device/pack.tar.xz" ] && tar -C "$R/.device" -xJf "$R/.device/pack.tar.xz"
# tests built here find models/ through the absolute source path they were built with
[ -e /work/main ] || { mkdir -p /work 2>/dev/null && ln -s "$R" /work/main 2>/dev/null; }
OUT=${OUT:-/tmp/tuna-gpu}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$R/.device/lib:/usr/local/cuda/lib64 TUNA_SHARED_DIR=$R/.device/shared
BIN=$R/.device/bin S=$TUNA_SHARED_DIR/fixtures
row() { printf '%-46s %s\n' "$1" "$2"; }
for t in test_backend_cuda test_cuda_fused test_cuda_graphs test_train_ops_cuda test_greedy test_lora_device; do
  r=$($BIN/$t 2>&1 | tee "$OUT/$t.txt" | grep -E '^\[  (PASSED|FAILED) *\]' | tr '\n' ' '); row "$t" "$r"
done
for dt in float32 bfloat16; do
  r=$(cd "$BIN" && TUNA_TEST_DEVICE=cuda TUNA_TEST_GPU_DTYPE=$dt ./test_train 2>&1 | tee "$OUT/train_$dt.txt" | grep -E '^\[  (PASSED|FAILED) *\]' | tr '\n' ' ')
  row "fixture training runs on the GPU, $dt" "$r"
done
for dt in float32 bfloat16; do
  (cd "$BIN" && TUNA_TEST_DEVICE=cuda TUNA_TEST_GPU_DTYPE=$dt ./test_forward >"$OUT/fwd_$dt.txt" 2>&1)
  worst=$(grep 'rel err' "$OUT/fwd_$dt.txt" | awk '{print $NF}' | sort -g | tail -1)
  ok=$(grep -qE 'FAILED' "$OUT/fwd_$dt.txt" && echo FAIL || echo pass)
  row "fixture models on the GPU, $dt" "$ok (worst logits rel err $worst)"
done
for d in "cpu" "cuda --dtype float32"; do
  "$BIN/tuna" logits "$S/models/llama-tiny" --ids 1,50,300,7,900,12 --lora "$S/lora/llama-tiny/adapter" \
    -o "$OUT/lg_${d%% *}.safetensors" --device $d >/dev/null 2>&1
done
row "LoRA on the GPU vs CPU" "$(python3 -c "
from safetensors.numpy import load_file as L; import numpy as np
a=L('$OUT/lg_cpu.safetensors')['logits']; b=L('$OUT/lg_cuda.safetensors')['logits']
print('rel err %.2e' % (np.linalg.norm(a-b)/np.linalg.norm(a)))" 2>&1)"
"$BIN/bench_cuda_ops" >"$OUT/bench_ops.txt" 2>&1
row "device-to-device copy" "$(grep -m1 'copy' "$OUT/bench_ops.txt" | sed 's/.*) *//')"
row "GEMV gate/up 14336x4096 bf16, T=1" "$(grep -m1 'gate / up 14336x4096 T=1 ' "$OUT/bench_ops.txt" | sed 's/.*T=1 *//')"
for q in "" "--load-in-4bit"; do
  for b in 1 32; do
    line=$(timeout 300 "$BIN/tuna" bench --synthetic llama-3-8b --device cuda $q --batch $b --gen 32 --prompt-len 128 2>&1 |
           tee -a "$OUT/bench_8b.txt" | grep '^decode')
    row "8B ${q:-bf16} decode batch $b" "$(echo "$line" | sed 's/.*= //')"
  done
done
