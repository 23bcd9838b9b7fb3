#!/usr/bin/env python3
"""sched_sim.py — the offline load through a copy of src/serve/scheduler.c's policy (running
sequences first, a token budget per step, FCFS admission while max_num_seqs and the KV blocks
allow, preemption of the last running sequence by recompute; no prefix cache), with a cost model
per step: fixed + GEMM max(weights / bw_w, FLOPs / R(T)) + FP8 KV bytes read / bw_kv.

It reproduces the H100 run of `tuna bench --serve --synthetic llama-3-8b --requests 1000
--prompt-len 1000 --gen 1000 --kv-cache-dtype fp8 --max-num-seqs 512` step for step (2,356
steps, mean 424.7 sequences, 631 steps with prefill, 39 preemptions); the times are a model
(docs/PERFORMANCE.md, "Offline load, ninth session"). Usage: sched_sim.py [max_seqs budget ...]
"""
import sys


def run(max_seqs=512, budget=2048, cap_tokens=899088, bs=16, nreq=1000, P=1000, G=1000, fixed=1.5e-3,
        bw_kv=2.55e12, bw_w=2.9e12, rate=None, kv_bytes=65536, flop_tok=14.0e9, flop_lm=1.05e9, w_bytes=15e9):
    rate = rate or (lambda T: 560e12 if T >= 1024 else 520e12 if T >= 384 else 450e12)
    cap = cap_tokens // bs
    waiting = [[i, 0, 0, P] for i in range(nreq)]  # id, computed, generated, known tokens
    running, held = [], {}
    free, steps, t, pre, out, seqsum, mixed = cap, 0, 0.0, 0, 0, 0, 0
    parts = {"gemm": 0.0, "attn": 0.0, "fixed": 0.0}

    def blocks(n):
        return (n + bs - 1) // bs

    while waiting or running:
        b, reserved, step, preempted = budget, 0, [], False
        i = 0
        while i < len(running) and b > 0:
            q = running[i]
            chunk = min(q[3] - q[1], b)
            if chunk <= 0:
                i += 1
                continue
            need = max(0, blocks(q[1] + chunk) - held[q[0]])
            while need > free - reserved:
                v = running.pop()
                free += held.pop(v[0])
                v[1] = 0
                waiting.insert(0, v)
                pre += 1
                preempted = True
                if v is q:
                    break
            if q not in running:
                break
            reserved += need
            step.append((q, chunk))
            b -= chunk
            i += 1
        while not preempted and b > 0 and waiting and len(running) < max_seqs:
            q = waiting[0]
            chunk = min(q[3], b)
            need = blocks(chunk)
            if need > free - reserved:
                break
            waiting.pop(0)
            running.append(q)
            held[q[0]] = 0
            reserved += need
            step.append((q, chunk))
            b -= chunk
        if not step:
            break
        T = sum(c for _, c in step)
        nlog = kv = pf = 0
        for q, c in step:
            nb = blocks(q[1] + c)
            free -= nb - held[q[0]]
            held[q[0]] = nb
            kv += q[1] + c
            pf += c if c > 1 else 0
            q[1] += c
            nlog += q[1] == q[3]
        g = max(w_bytes / bw_w, (T * flop_tok + nlog * flop_lm) / rate(T))
        a = kv * kv_bytes / bw_kv
        t += fixed + g + a
        parts["gemm"] += g
        parts["attn"] += a
        parts["fixed"] += fixed
        steps += 1
        seqsum += len(step)
        mixed += pf > 0
        for q, c in step:
            if q[1] == q[3]:
                q[2] += 1
                out += 1
                q[3] += 1
                if q[2] == G:
                    running.remove(q)
                    free += held.pop(q[0])
                    q[3] -= 1
    return dict(tok_s=round(out / t), steps=steps, ms_step=round(1e3 * t / steps, 2), seqs=round(seqsum / steps, 1),
                preemptions=pre, mixed_steps=mixed, **{k + "_s": round(v, 1) for k, v in parts.items()})


if __name__ == "__main__":
    a = [int(x) for x in sys.argv[1:]] or [512, 2048]
    for k in range(0, len(a) - 1, 2):
        print(a[k], a[k + 1], run(max_seqs=a[k], budget=a[k + 1]))
