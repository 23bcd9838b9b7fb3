#!/usr/bin/env bash
# Builds tuna and runs the whole test suite, as CI does:
#   1. a Release-with-debug-info build, warnings as errors, the CUDA backend too when nvcc is
#      found (its GPU tests skip cleanly without a GPU), and ctest;
#   2. the CPU build again under AddressSanitizer + UBSan, and ctest.
# Tests read ../shared (fixtures, peers) when it is beside the checkout and skip what needs it
# otherwise. Usage: scripts/test.sh [--no-asan]
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-$(nproc)}"
ASAN=1
[ "${1:-}" = "--no-asan" ] && ASAN=0

echo "== build (warnings are errors; CUDA backend when nvcc is present)"
cmake -S . -B build/ci -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTUNA_WERROR=ON -DTUNA_CUDA=AUTO >/dev/null
cmake --build build/ci -j "$JOBS"
echo "== tests"
(cd build/ci && ctest --output-on-failure -j "$JOBS")

if [ "$ASAN" = 1 ]; then
  echo "== build under AddressSanitizer + UBSan (CPU only)"
  cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Debug -DTUNA_WERROR=ON -DTUNA_CUDA=OFF \
        -DTUNA_SANITIZE=address,undefined >/dev/null
  cmake --build build/asan -j "$JOBS"
  echo "== tests under AddressSanitizer + UBSan"
  (cd build/asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
     ctest --output-on-failure -j "$JOBS")
fi
