#!/usr/bin/env bash
# Sets up tuna on a fresh Debian machine and runs the main job on the embedded default model
# (models/pymini: a 5M-parameter Llama trained on Python source): inspect it, then generate.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DTUNA_CUDA=AUTO >/dev/null
cmake --build build/release -j "$(nproc)" --target tuna
./build/release/tuna inspect models/pymini
./build/release/tuna generate models/pymini --prompt "def fibonacci(n):" --max-tokens 64 --temperature 0
