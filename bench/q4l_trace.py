#!/usr/bin/env python3
"""q4l_trace.py — summary of the decode-layer kernel's timeline (q4_layer.cu built with
-DTUNA_Q4_TRACE, run with TUNA_Q4L_TRACE=first:count). Reads q4ltrace.bin ([count][132][96]
uint64: entry, after the PDL wait, four grid barriers' arrival and release, end, SM; then per
GEMV phase 20 slots (before its wait, after it, after the x staging, each warp's end); then the
attention's start, q staged, warps merged, done) and prints medians over the launches, in us.
Usage: q4l_trace.py [FILE] [SKIP]"""
import struct
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "q4ltrace.bin"
skip = int(sys.argv[2]) if len(sys.argv) > 2 else 0
try:
    raw = open(path, "rb").read()
except OSError as e:
    sys.exit(f"q4l_trace: {e}")
S, B = 96, 132
n = len(raw) // (8 * S * B)
if n == 0:
    sys.exit(f"q4l_trace: {path} holds no launch")
vals = struct.unpack(f"<{n * B * S}Q", raw[: n * B * S * 8])
launches = []
for i in range(n):
    rows = [vals[(i * B + b) * S:(i * B + b + 1) * S] for b in range(B)]
    rows = [r for r in rows if r[0] and r[10]]
    if rows:
        launches.append(rows)
res = {}


def add(k, v):
    res.setdefault(k, []).append(v)


def med(v):
    v = sorted(v)
    return v[len(v) // 2]


for i, rows in enumerate(launches):
    if i < skip:
        continue
    mn = lambda k: min(r[k] for r in rows if r[k])
    mx = lambda k: max(r[k] for r in rows if r[k])
    t0 = mn(0)
    add("entry spread", mx(0) - t0)
    add("PDL wait end (last)", mx(1) - t0)
    for b, (a, l) in enumerate([(2, 3), (4, 5), (6, 7), (8, 9)]):
        add(f"barrier {b + 1}: last arrival", mx(a) - t0)
        add(f"barrier {b + 1}: release after it", mx(l) - mx(a))
    add("end (last)", mx(10) - t0)
    for k, name in enumerate(["q/k/v", "o", "gate/up", "down"]):
        o = 12 + 20 * k
        rel = mx(o + 2)
        add(f"{name}: released (last) ", rel - t0)
        add(f"{name}: staging (median block)", med([r[o + 3] - r[o + 2] for r in rows]))
        add(f"{name}: staged (last) after release", mx(o + 3) - rel)
        ends = [max(r[o + 4:o + 20]) for r in rows]
        add(f"{name}: loop (median block)", med([e - r[o + 3] for e, r in zip(ends, rows)]))
        add(f"{name}: loop (slowest block)", max(e - r[o + 3] for e, r in zip(ends, rows)))
        add(f"{name}: last warp end after release", max(ends) - rel)
    att = [r for r in rows if r[92]]
    if att:
        add("attention blocks", len(att))
        add("att: q staged (median)", med([r[93] - r[92] for r in att]))
        add("att: loop+warp merge (median)", med([r[94] - r[93] for r in att]))
        add("att: output (median)", med([r[95] - r[94] for r in att]))
        add("att: total (slowest)", max(r[95] - r[92] for r in att))
print(f"{len(launches) - skip} launches ({len(launches[0])} blocks); medians over launches, us:")
for k, v in res.items():
    v = sorted(v)
    print(f"  {k:40s} {v[len(v) // 2] / 1000:8.2f}   (min {v[0] / 1000:.2f}, max {v[-1] / 1000:.2f})")
