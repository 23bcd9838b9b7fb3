#!/usr/bin/env bash
# Installs every build and test dependency of tuna from Debian packages.
# Safe to run again: apt-get skips what is already there.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PKGS=(
  build-essential cmake pkg-config
  libcjson-dev        # config.json, tokenizer.json, HTTP bodies
  libpcre2-dev        # tokenizer pre-tokenizer regexes (Unicode properties)
  libutf8proc-dev     # Unicode normalization (NFC/NFD/NFKC/NFKD)
  libmicrohttpd-dev   # the OpenAI-compatible HTTP server
  libopenblas-dev     # CPU GEMM
  libcmocka-dev       # unit tests
  zlib1g-dev          # inflates the embedded GPU-reciprocal table (bit-exact 4-bit quantization)
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Node.js + npm run the server's end-to-end test with the official openai npm client. Machines
# that already have node/npm (e.g. from another packaging) keep theirs: Debian's npm package
# conflicts with some of those. Without them the e2e test skips with a message.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq --no-install-recommends nodejs npm ||
    echo "install-deps: nodejs/npm could not be installed; the serve end-to-end test will skip"
fi
echo "install-deps: all dependencies present"
