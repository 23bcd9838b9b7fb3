#!/usr/bin/env python3
"""q4_trace.py: reads the k_q4_h4 timeline of a build with -DTUNA_Q4_TRACE (src/backend/cuda/q4_h4.cu).

Usage: q4_trace.py TRACE.bin [LAST_N]
  TRACE.bin  what TUNA_Q4_TRACE=first:count wrote (TUNA_Q4_TRACE_OUT, default q4trace.bin):
             uint64 [count][132][24] per launch and block: %globaltimer at entry, before the PDL
             wait, after it, after the x staging, each warp's end [4..19]; SM, K, N * 4 + mode, grid
  LAST_N     only the last N launches in time (e.g. 128: the last decode step of a graph replay)

Prints, per pair (previous op -> op) of consecutive traced launches, medians in microseconds
relative to the previous launch's last warp end: when the op's blocks entered (first, last), passed
the PDL wait (first, last), finished staging x (last), ended (first, last); each block's loop time
(median, max); the spread of a block's warp ends; the previous launch's tail (last minus first block
end). Ops: qkv (K = hidden, store), o (K = hidden, add), gu (GLU), down (K > 8192, add). Needs numpy.
"""
import sys

import numpy as np

SLOTS = 24


def launches(path):
    try:
        a = np.fromfile(path, dtype=np.uint64)
    except OSError as e:
        sys.exit("%s: %s" % (path, e.strerror or e))
    if a.size % (132 * SLOTS):
        sys.exit("%s: %d words, not a multiple of 132 x %d: not a q4 trace" % (path, a.size, SLOTS))
    a = a.reshape(-1, 132, SLOTS).astype(np.int64)
    rows = []
    for b in a:
        b = b[b[:, 0] != 0]
        if not len(b):
            continue
        K, mode = b[0, 21], b[0, 22] % 4
        op = "gu" if mode == 2 else "down" if K > 8192 else "o" if mode == 1 else "qkv"
        ends = b[:, 4:20].max(axis=1)
        rows.append(dict(op=op, e0=b[:, 0].min(), e1=b[:, 0].max(), w0=b[:, 2].min(), w1=b[:, 2].max(),
                         st=b[:, 3].max(), end0=ends.min(), end1=ends.max(), loop=np.median(ends - b[:, 3]),
                         loopmax=(ends - b[:, 3]).max(),
                         spread=np.median(b[:, 4:20].max(axis=1) - b[:, 4:20].min(axis=1))))
    rows.sort(key=lambda r: r["e0"])
    return rows


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    last = 0
    if len(sys.argv) > 2:
        if not sys.argv[2].isdigit() or int(sys.argv[2]) < 1:
            sys.exit("LAST_N: want a positive number of launches, got %r" % sys.argv[2])
        last = int(sys.argv[2])
    rows = launches(sys.argv[1])
    if last:
        rows = rows[-last:]
    print("launches", len(rows))
    keys = ["first_in", "last_in", "wait_first", "wait_last", "staged", "end_first", "end_last", "loop_med",
            "loop_max", "warp_spread", "prev_tail"]
    agg = {}
    for p, r in zip(rows, rows[1:]):
        pe = p["end1"]
        d = dict(first_in=r["e0"] - pe, last_in=r["e1"] - pe, wait_first=r["w0"] - pe, wait_last=r["w1"] - pe,
                 staged=r["st"] - pe, end_first=r["end0"] - pe, end_last=r["end1"] - pe, loop_med=r["loop"],
                 loop_max=r["loopmax"], warp_spread=r["spread"], prev_tail=p["end1"] - p["end0"])
        agg.setdefault((p["op"], r["op"]), []).append(d)
    print("us, relative to the previous traced launch's last warp end (medians over the launches)")
    print("%-12s %4s " % ("prev->op", "n") + " ".join("%11s" % k for k in keys))
    for k, v in sorted(agg.items()):
        print("%-12s %4d " % (k[0] + "->" + k[1], len(v)) +
              " ".join("%11.2f" % (np.median([d[x] for d in v]) / 1000.0) for x in keys))
    if rows:
        print("span %.1f us over %d launches" % ((rows[-1]["end1"] - rows[0]["e0"]) / 1000.0, len(rows)))


if __name__ == "__main__":
    main()
