#!/usr/bin/env bash
# gpu-bundle.sh — builds the GPU binaries here and packs what the GPU machine needs into .device/
# (ignored by git): the binaries, the Debian libraries they link (../shared/device/bundle-libs.sh),
# and the fixtures the GPU tests read. Then run, on the GPU machine (the `device` tool, carrying
# .device/pack.tar.xz): `bash scripts/gpu-check.sh`.
# OpenBLAS is left out (-DTUNA_BLAS=OFF) so the carried tree stays under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${TUNA_SHARED_DIR:-../shared}
cmake -S . -B .device/build -DCMAKE_BUILD_TYPE=Release -DTUNA_CUDA=ON -DTUNA_CUDA_ARCHS=90a -DTUNA_BLAS=OFF >/dev/null
TESTS="test_forward test_backend_cuda test_cuda_fused test_cuda_graphs test_train_ops_cuda test_train test_greedy test_lora_device ${TUNA_GPU_EXTRA_TESTS:-}" # more with TUNA_GPU_EXTRA_TESTS="test_a test_b"
cmake --build .device/build -j "$(nproc)" --target tuna $TESTS bench_cuda_ops bench_tokenizer
rm -rf .device/bin && mkdir -p .device/bin
cp .device/build/tuna .device/build/bench/bench_cuda_ops .device/build/bench/bench_tokenizer .device/bin/
for t in $TESTS; do cp .device/build/tests/$t .device/bin/; done
strip .device/bin/*
bash "$SHARED/device/bundle-libs.sh" .device/lib .device/bin/* >/dev/null
S=.device/shared/fixtures
rm -rf .device/shared && mkdir -p $S/models $S/bnb $S/lora $S/tokenizers
for m in llama mistral qwen2 qwen3 gemma; do cp -r "$SHARED/fixtures/models/$m-tiny" $S/models/; done
for m in llama-tiny-bnb-nf4-dq llama-tiny-bnb-fp4 qwen2-tiny-bnb-nf4-dq pymini-bnb-nf4-dq; do cp -r "$SHARED/fixtures/bnb/$m" $S/bnb/; done
cp -r "$SHARED/fixtures/lora/llama-tiny" "$SHARED/fixtures/lora/llama-tiny-rslora" $S/lora/
mkdir -p $S/train && cp -r "$SHARED/fixtures/train/"* $S/train/
cp -r "$SHARED/fixtures/tokenizers/bpe-4k" "$SHARED/fixtures/tokenizers/spm-1k" $S/tokenizers/
# pymini: the repository's own copy of the weights, the fixture's references
mkdir -p $S/models/pymini
cp "$SHARED/fixtures/models/pymini/"{reference.safetensors,heldout.txt,eval.json} $S/models/pymini/
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja model.safetensors; do
  ln -s "../../../../../models/pymini/$f" "$S/models/pymini/$f"
done
chmod -R u+w .device/shared
du -sh .device/bin .device/lib .device/shared
# binaries + fixtures pass the 64 MiB carry limit: carry one archive (gpu-check.sh unpacks it)
rm -f .device/pack.tar.xz
tar -C .device -cf - bin lib shared | xz -T1 -9e > .device/pack.tar.xz  # one thread, 64 MiB dictionary: the binaries share ~11 MB of CUDA backend each (20 MB packed instead of 55)
du -sh .device/pack.tar.xz
