#!/usr/bin/env python3
"""synthetic_gguf.py: writes a GGUF file with Llama-3-8B's shapes and random quantized blocks, for
running llama.cpp's llama-bench beside `tuna bench --synthetic llama-3-8b` on the same GPU.

Usage: synthetic_gguf.py OUT.gguf q4_0|q4_k_m|f16 [LAYERS [tiny]]
  q4_0    every matrix Q4_0, output.weight Q6_K (llama-quantize's Q4_0 mix)
  q4_k_m  Q4_K, with Q6_K for output.weight and for attn_v / ffn_down of the layers llama-quantize
          gives more bits (its use_more_bits rule)
  f16     every matrix F16
  tiny    small shapes (hidden 256) for checking the file, e.g. with `tuna generate OUT.gguf`

The values are random (the blocks' scales set so nothing overflows): a decode step's speed does not
depend on them. The vocabulary is a SentencePiece-style filler of 128,256 pieces (the 256 byte
tokens, then "t<i>"), enough for llama.cpp to load the file and for llama-bench, which feeds token
ids without text. Tensor data is written from a 16 MiB template per type, so a 16 GB file takes
seconds. Pure Python 3, no packages. docs/PERFORMANCE.md ("llama.cpp beside tuna") has the use.
"""
import os, struct, sys
from math import prod

MIXES = ("q4_0", "q4_k_m", "f16")
USAGE = "usage: synthetic_gguf.py OUT.gguf q4_0|q4_k_m|f16 [LAYERS [tiny]]"
if len(sys.argv) < 3 or sys.argv[2] not in MIXES or (len(sys.argv) > 4 and sys.argv[4] != "tiny"):
    sys.exit(USAGE)
out, mix = sys.argv[1], sys.argv[2]
L = 32
if len(sys.argv) > 3:
    L = int(sys.argv[3]) if sys.argv[3].isdigit() else 0
    if L < 1:
        sys.exit("synthetic_gguf.py: LAYERS must be a whole number of at least 1, found '%s'\n%s" % (sys.argv[3], USAGE))
C, I, H, HKV, V = 4096, 14336, 32, 8, 128256  # Llama-3-8B
if len(sys.argv) > 4:  # tiny test shapes
    C, I, H, HKV, V = 256, 512, 4, 2, 1024
D = C // H
F32, F16, Q4_0, Q4_K, Q6_K = 0, 1, 2, 12, 14
BLK = {Q4_0: (32, 18), Q4_K: (256, 144), Q6_K: (256, 210), F16: (1, 2)}

def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

tensors = []  # (name, ne list, type)
def mat(name, k, n, t):
    tensors.append((name, [k, n], t))
base = {"q4_0": Q4_0, "q4_k_m": Q4_K, "f16": F16}[mix]
mat("token_embd.weight", C, V, base)
tensors.append(("output_norm.weight", [C], F32))
mat("output.weight", C, V, F16 if mix == "f16" else Q6_K)
for i in range(L):
    p = "blk.%d." % i
    tensors.append((p + "attn_norm.weight", [C], F32))
    mat(p + "attn_q.weight", C, C, base)
    mat(p + "attn_k.weight", C, HKV * D, base)
    wide = Q6_K if (mix == "q4_k_m" and use_more_bits(i, L)) else base  # attn_v and ffn_down
    mat(p + "attn_v.weight", C, HKV * D, wide)
    mat(p + "attn_output.weight", C, C, base)
    tensors.append((p + "ffn_norm.weight", [C], F32))
    mat(p + "ffn_gate.weight", C, I, base)
    mat(p + "ffn_up.weight", C, I, base)
    mat(p + "ffn_down.weight", I, C, wide)

def nbytes(ne, t):
    n = prod(ne)
    if t == F32: return 4 * n
    bw, bb = BLK[t]
    assert ne[0] % bw == 0
    return n // bw * bb

def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b

kv = []
def kv_str(k, v): kv.append(s(k) + struct.pack("<I", 8) + s(v))
def kv_u32(k, v): kv.append(s(k) + struct.pack("<II", 4, v))
def kv_f32(k, v): kv.append(s(k) + struct.pack("<If", 6, v))
def kv_arr(k, et, items):
    kv.append(s(k) + struct.pack("<IIQ", 9, et, len(items)) + items_bytes(et, items))
def items_bytes(et, items):
    if et == 8: return b"".join(s(x) for x in items)
    if et == 6: return struct.pack("<%df" % len(items), *items)
    if et == 5: return struct.pack("<%di" % len(items), *items)
    raise ValueError(et)

kv_str("general.architecture", "llama")
kv_str("general.name", "synthetic-llama3-8b-" + mix)
kv_u32("general.alignment", 32)
kv_u32("general.file_type", {"q4_0": 2, "q4_k_m": 15, "f16": 1}[mix])
kv_u32("llama.context_length", 8192)
kv_u32("llama.embedding_length", C)
kv_u32("llama.block_count", L)
kv_u32("llama.feed_forward_length", I)
kv_u32("llama.attention.head_count", H)
kv_u32("llama.attention.head_count_kv", HKV)
kv_u32("llama.rope.dimension_count", D)
kv_u32("llama.vocab_size", V)
kv_f32("llama.rope.freq_base", 500000.0)
kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
# SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then filler pieces.
toks = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
types = [2, 3, 3] + [6] * 256
toks += ["\u2581t%d" % i for i in range(V - len(toks))]
types += [1] * (V - len(types))
kv_str("tokenizer.ggml.model", "llama")
kv_arr("tokenizer.ggml.tokens", 8, toks)
kv_arr("tokenizer.ggml.scores", 6, [-float(i) for i in range(V)])
kv_arr("tokenizer.ggml.token_type", 5, types)
kv_u32("tokenizer.ggml.bos_token_id", 1)
kv_u32("tokenizer.ggml.eos_token_id", 2)
kv_u32("tokenizer.ggml.unknown_token_id", 0)

ALIGN = 32
infos, off = [], 0
for name, ne, t in tensors:
    infos.append(s(name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne) + struct.pack("<IQ", t, off))
    off += (nbytes(ne, t) + ALIGN - 1) // ALIGN * ALIGN

CH = 1 << 24  # bytes of a template chunk per type (whole blocks)
def f16(x): return struct.pack("<e", x)
def template(t):
    bw, bb = BLK[t]
    nb = CH // bb
    a = bytearray(os.urandom(nb * bb))
    def put(o, b2):
        for j, c in enumerate(b2): a[o + j::bb] = bytes([c]) * nb
    if t == F16:
        a[1::2] = bytes(x & 0x9F for x in a[1::2])  # |value| < 2^-7: no inf or NaN
    elif t == Q4_0:
        put(0, f16(0.01))
    elif t == Q4_K:
        put(0, f16(0.002)); put(2, f16(0.002))
    elif t == Q6_K:
        for j in range(192, 208): a[j::bb] = bytes(x & 0x0F for x in a[j::bb])  # small int8 scales
        put(208, f16(0.0005))
    return bytes(a), nb * bb
tmpl = {t: template(t) for t in {t for _, _, t in tensors if t != F32}}  # the types in use only

with open(out + ".tmp", "wb") as f:
    f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for x in kv: f.write(x)
    for x in infos: f.write(x)
    pos = f.tell()
    f.write(b"\0" * ((ALIGN - pos % ALIGN) % ALIGN))
    total = 0
    for name, ne, t in tensors:
        n = nbytes(ne, t)
        if t == F32:
            f.write(struct.pack("<f", 1.0) * prod(ne))
        else:
            buf, bl = tmpl[t]
            left = n
            while left > 0:
                w = min(left, bl)
                f.write(buf[:w])
                left -= w
        f.write(b"\0" * ((ALIGN - n % ALIGN) % ALIGN))
        total += n
os.replace(out + ".tmp", out)
print("%s: %d tensors, %.1f MB of tensor data" % (out, len(tensors), total / 1e6))
lay = sum(nbytes(ne, t) for name, ne, t in tensors if name.startswith("blk.") or name.startswith("output"))
print("bytes read per token (all but token_embd): %.1f MB" % (lay / 1e6))
