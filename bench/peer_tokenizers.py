#!/usr/bin/env python3
"""peer_tokenizers.py — Hugging Face `tokenizers` on the text bench_tokenizer uses, one thread.

Builds the same text as bench/bench_tokenizer.c (the pymini held-out file and the peers' prompt
files, concatenated and repeated to at least 4 MiB), encodes it with `tokenizers.Tokenizer`
(add_special_tokens=False) in 4 KB chunks and whole, and prints the same table, so the two can be
compared line by line. Rates are over this thread's CPU time. Run where `tokenizers` is installed
(the GPU machine), with TUNA_SHARED_DIR pointing at the shared folder:

    TUNA_SHARED_DIR=../shared python3 bench/peer_tokenizers.py [TOKENIZER_DIR ...]
"""
import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tokenizers import Tokenizer  # noqa: E402

SHARED = os.environ.get("TUNA_SHARED_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
FILES = ["fixtures/models/pymini/heldout.txt", "peers/ggml/examples/prompts/gpt-2.txt",
         "peers/ggml/examples/prompts/starcoder.txt", "peers/llama.cpp/models/ggml-vocab-llama-spm.gguf.inp"]
DIRS = ["fixtures/tokenizers/bpe-4k", "fixtures/tokenizers/spm-1k", "fixtures/models/pymini",
        "fixtures/models/qwen2-tiny", "peers/onnxruntime-extensions/test/data/llama2",
        "peers/onnxruntime-extensions/test/data/falcon-tokenizer"]


def build_text(target=4 << 20):
    base = b""
    for f in FILES:
        p = os.path.join(SHARED, f)
        if os.path.exists(p):
            base += open(p, "rb").read()
    out = b""
    while len(out) < target:
        out += base
    return out


def chunks(data, size=4096):
    off = 0
    while off < len(data):
        n = min(size, len(data) - off)
        while off + n < len(data) and (data[off + n] & 0xC0) == 0x80:
            n -= 1  # whole characters, as bench_tokenizer.c
        yield data[off:off + n].decode("utf-8", errors="replace")
        off += n


def bench(d, data, text):
    name = os.path.basename(d.rstrip("/"))
    try:
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    except Exception as e:  # e.g. Llama 2's merges with spaces: tokenizers 0.23 refuses the file
        print(f"{name:<12} cannot load: {e}")
        return
    t0 = time.thread_time()
    for c in chunks(data):
        tok.encode(c, add_special_tokens=False)
    t1 = time.thread_time()
    enc = tok.encode(text, add_special_tokens=False)
    t2 = time.thread_time()
    dec = tok.decode(enc.ids, skip_special_tokens=False)
    t3 = time.thread_time()
    mb = len(data) / 1e6
    print(f"{name:<12} {len(enc.ids):>10} {mb / (t1 - t0):>14.1f} {mb / (t2 - t1):>14.1f} {mb / (t3 - t2):>14.1f} "
          f"{len(data) / max(len(enc.ids), 1):>12.2f} {'yes' if dec == text else 'NO'}")


def main():
    data = build_text()
    text = data.decode("utf-8", errors="replace")
    import tokenizers
    print(f"text: {len(data) / 1e6:.2f} MB, one thread, HF tokenizers {tokenizers.__version__}, thread CPU time")
    print(f"{'tokenizer':<12} {'tokens':>10} {'enc MB/s 4KB':>14} {'enc MB/s all':>14} {'dec MB/s':>14} "
          f"{'bytes/token':>12} round trip")
    for d in (sys.argv[1:] or [os.path.join(SHARED, x) for x in DIRS]):
        bench(d, data, text)


if __name__ == "__main__":
    main()
