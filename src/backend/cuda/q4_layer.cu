/* q4_layer.cu — one decode layer of one token with 4-bit weights as one persistent kernel
 * (backend.h's decode_layer; fifteenth session). EXPERIMENTAL, OFF BY DEFAULT (TUNA_LAYER_KERNEL=1
 * turns it on): on the H100 it is slower than the ops it replaces (NF4 Llama-3-8B batch 1: 3.72
 * against 2.76 ms/step), kept as the measured starting point of a persistent decode kernel; see
 * docs/PERFORMANCE.md, "NF4, fifteenth session".
 *
 * The idea: at batch 1 the layer's six kernels (q/k/v, RoPE + KV store, attention, o, gate/up,
 * down) each pay a launch, a prologue (the byte -> half2 table, the first weight loads) and a
 * drain; the fourteenth session's timeline put that at 5.7-7 us per GEMV-to-GEMV transition and
 * ~18 us for RoPE + attention, ~35 of a ~75 us layer. Here one block per SM runs the whole layer
 * with grid barriers between the phases:
 *   1. q/k/v: k_q4_h4's loop (q4_h4.cuh) with the RMSNorm folded in; the q and k rows are taken
 *      in RoPE pairs (an item holds rows j, j + 1, j + D/2, j + D/2 + 1 of one head) so the store
 *      rotates them (rope.cuh's arithmetic: the same bits as rope_kv_store) and writes k and v
 *      into the KV cache;
 *   2. attention over the paged cache (below), its scratch over the byte -> half2 table;
 *   3. o: x += W_o att (the table built again first);  4. gate/up with the RMSNorm and the GLU;
 *   5. down: x += W_down act.
 * Each GEMV phase issues its first weight loads before its barrier (weights never depend on the
 * phase before). Data made inside the kernel (x, q, att, act, the new K/V rows, the partials) is
 * read with ld.global.cg: L1 is not coherent between SMs.
 *
 * What the timeline (-DTUNA_Q4_TRACE, bench/q4l_trace.py) showed: the barriers cost ~0.9 us each,
 * but every GEMV loop ran 1.3-2.3x longer than the same loop in k_q4_h4 (gate/up 30.2 against
 * 22.9 us, down 16.0-17.3 against 11.4, q/k/v 10.1 against 4.4, o 6.0 against 2.7; also without
 * phase 2 in the build, and with 108 as with 215 KB of shared memory), the x staging took 2-4 us
 * per phase, the entry to the PDL wait ~6 us, and phase 2 ~11.5 us. Why the loops are slower here
 * is not known yet.
 *
 * Attention (phase 2): a unit is (kv head, group of up to GM query heads); its context is cut
 * into groups of 16 keys at absolute positions 16 g. A unit runs on up to Q4L_BPH blocks (at
 * most one per Q4L_AW groups, so a short context stays in one block); warp w < Q4L_AW of block b
 * takes groups AW b + w, then + AW nb, ... Per group a warp copies its 16 K and V rows into shared
 * memory at once (cp.async), lane (j, h) scores key j's row half h (interleaved 16-byte chunks)
 * against all GM heads (q from shared memory), the online softmax runs in log2 units (q scaled by
 * scale * log2 e), and lane l adds its D/32 columns of the V rows. The warps merge in shared
 * memory; with several blocks the last one to finish (an atomic counter, reset to 0 by it) merges
 * the blocks' partials. The float32 softmax of attention.cu summed in another order: the results
 * agree to rounding, not bit for bit.
 *
 * Needs: every projection 4-bit in one table, blocksize and scale form (what k_q4_h4 needs), a
 * bf16/f16 cache, D = 32, 64 or 128 with RoPE over all of it, no adapters, no q/k norms, sm_80+;
 * the host side declines anything else (the caller then runs the ops). All blocks are resident at
 * once (grid = SMs, one block each, launched as a cooperative kernel). */
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/attention_internal.cuh"
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/kv_types.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_h4.cuh"
#include "backend/cuda/rope.cuh"
#include "backend/backend.h"

#define Q4L_BPH 16 /* blocks per attention unit at most */
#define Q4L_NW (Q4H4_THREADS / 32)
#define Q4L_AW 12 /* warps of a block that load K/V in phase 2 */

struct q4l_params {
    struct gemv_job jq, jo, jg, jd; /* q/k/v (norm, RoPE), o (+= x), gate/up (norm, GLU), down (+= x) */
    int nq, no, ng, nd;             /* items of 4 rows (GLU: of 2 outputs) */
    struct q4_lut lut;
    float lmax;
    int nshift;
    float *x;          /* [C] the residual stream: jq's and jg's input, jo's and jd's output */
    float *att;        /* [H * D] attention output = jo's input */
    const float *act;  /* [I] GLU output = jd's input */
    /* RoPE and the KV store (phase 1) */
    const int64_t *pos, *slot; /* [1] */
    const float *inv_freq;     /* [D / 2] */
    float attn_factor;
    void *kc, *vc; /* [slots, Hkv, D] 16-bit */
    int bf;        /* cache dtype: 1 bf16, 0 f16 */
    /* attention (phase 2) */
    att_meta md;
    int H, Hkv, n_hg;
    float qscale;  /* scale * log2(e) */
    float *part;   /* [units][Q4L_BPH][GM * D + 2 GM] the blocks' partials */
    unsigned *cnt; /* [units] 0 between launches */
    unsigned *bar; /* [2] the grid barrier's 64-bit count (q4l_grid_sync) */
#ifdef TUNA_Q4_TRACE
    int trace_id;
#endif
};

#ifdef TUNA_Q4_TRACE
#include <stdio.h>
/* The diagnostic timeline of this kernel (built only with -DTUNA_Q4_TRACE): for launches
 * first..first+count-1 (TUNA_Q4L_TRACE=first:count) and blocks < 132, %globaltimer at entry [0],
 * after the PDL wait [1], at each grid barrier's arrival and release [2..9], at the end [10], and
 * the SM [11]; written at exit to q4ltrace.bin as uint64 [count][132][12] (bench/q4l_trace.py). */
#define Q4LT_SLOTS 96 /* 12, then 4 GEMV phases x 20 (q4_h4.cuh's tr), then 4 of the attention */
__device__ unsigned long long *g_q4ltr;
__device__ int g_q4ltr_first, g_q4ltr_n;
#define Q4LT(slot) do { if (ltr && threadIdx.x == 0) ltr[slot] = q4tr_now(); } while (0)
#else
#define Q4LT(slot) do { } while (0)
#endif

/* Bytes of phase 2's shared scratch */
static size_t q4l_att_smem(int DH, int GM)
{
    const size_t kv = (size_t)Q4L_AW * 16 * (2 * DH + 16) * 2, wacc = (size_t)Q4L_NW * GM * DH * 4;
    return (size_t)(GM * DH + Q4L_NW * 16 * GM + Q4L_NW * 2 * GM) * sizeof(float) + (kv > wacc ? kv : wacc);
}

/* The device code: sm_80+ (the sm_75 pass compiles an empty kernel; the host side declines). */
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

static __device__ __forceinline__ unsigned long long q4l_ld_acquire64(const unsigned long long *p)
{
    unsigned long long v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
#else
    v = *(const volatile unsigned long long *)p;
#endif
    return v;
}

/* Every block of the grid reaches this point before any goes on (all resident: cooperative
 * launch). bar: a 64-bit count of arrivals that only grows (a multiple of the grid between
 * barriers): a block's ticket t says which barrier it is at, which ends when the count reaches
 * the next multiple of the grid. One atomic per block and no reset (a count reset and a
 * generation flag took two more round trips to L2). */
static __device__ __forceinline__ void q4l_grid_sync(unsigned *bar, unsigned long long *ltr, int slot)
{
    __syncthreads();
#ifdef TUNA_Q4_TRACE
    Q4LT(slot);
#else
    (void)ltr, (void)slot;
#endif
    if (threadIdx.x == 0) {
        unsigned long long *cnt = reinterpret_cast<unsigned long long *>(bar);
        __threadfence();
        const unsigned long long t = atomicAdd(cnt, 1ull), nb = gridDim.x, target = (t / nb + 1) * nb;
        while (q4l_ld_acquire64(cnt) < target) {
        }
    }
#ifdef TUNA_Q4_TRACE
    Q4LT(slot + 1);
#endif
    __syncthreads();
}

static __device__ __forceinline__ float q4l_exp2(float x) /* 2^x, x <= 0 or -inf */
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* A float32 into a 16-bit cache element */
static __device__ __forceinline__ void q4l_st16(void *c, int64_t i, float v, int bf)
{
    if (bf) ((__nv_bfloat16 *)c)[i] = __float2bfloat16_rn(v);
    else ((__half *)c)[i] = __float2half_rn(v);
}

/* Phase 2: att [H * D] from q (rotated) and the cache. sm: the scratch (q4l_att_smem bytes). */
template <int DH, int GM>
static __device__ __forceinline__ void q4l_attend(const struct q4l_params &P, float *sm, unsigned long long *ltr)
{
#ifndef TUNA_Q4_TRACE
    (void)ltr;
#endif
    constexpr int KCH = DH / 16;     /* 16-byte chunks of a key row per lane */
    constexpr int VE = DH / 32;      /* V columns per lane */
    constexpr int CB = DH / 8;       /* 16-byte chunks of a row */
    constexpr int KS = DH + 16;      /* K row stride in elements (+32 bytes: no bank conflicts) */
    __shared__ int s_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int G = P.H / P.Hkv, nu = P.Hkv * P.n_hg;
    const int64_t HkvD = (int64_t)P.Hkv * DH;
    const int bph = max(1, min(Q4L_BPH, (int)gridDim.x / nu));
    const int p = (int)P.md.pos[0], start = (int)att_start(P.md, p);
    const int gb = start >> 4, ge = p >> 4, ngrp = ge - gb + 1;
    const int nbw = min(bph, (ngrp + Q4L_AW - 1) / Q4L_AW); /* blocks with work per unit */
    const int32_t *table = att_table(P.md, 0);
    const int bs = P.md.bs;
    const uint16_t *kc = (const uint16_t *)P.kc, *vc = (const uint16_t *)P.vc;
    float *qs = sm;                               /* [GM][DH] */
    float *ps = qs + GM * DH;                     /* [NW][16][GM] */
    float *wml = ps + Q4L_NW * 16 * GM;           /* [NW][2 GM] */
    /* [AW] x (K [16][KS], V [16][DH]): the rows of each attention warp's group; after the loop
     * wacc [NW][GM][DH] over them */
    uint16_t *kvst = (uint16_t *)(wml + Q4L_NW * 2 * GM);
    float *wacc = (float *)kvst;
    const int j = lane >> 1, hf = lane & 1;
    for (int u = blockIdx.x; u < nu * bph; u += gridDim.x) {
        const int unit = u / bph, bi = u - unit * bph;
        if (bi >= nbw) continue; /* the same for the whole block */
        const int kvh = unit / P.n_hg, hg = unit - kvh * P.n_hg;
        const int h0 = kvh * G + hg * GM, ng = min(GM, G - hg * GM);
        const uint16_t *kb = kc + (int64_t)kvh * DH, *vb = vc + (int64_t)kvh * DH;
        uint16_t *kw = kvst + warp * 16 * (KS + DH), *vw = kw + 16 * KS;

        bool kval = false;
        /* group g: its 16 K and V rows into kw and vw (zeros outside the context), every copy
         * issued before any is waited for */
        auto load = [&](int g) {
            const int key = g * 16 + j;
            kval = key >= start && key <= p;
            const int sl = kval ? __ldg(table + key / bs) * bs + key % bs : -1;
#pragma unroll
            for (int idx = lane; idx < 16 * CB; idx += 32) {
                const int row = idx / CB, c = idx - row * CB;
                const int s2 = __shfl_sync(0xffffffffu, sl, 2 * row);
                const int64_t off = (int64_t)(s2 < 0 ? 0 : s2) * HkvD + c * 8;
                cp_async16(kw + row * KS + c * 8, kb + off, s2 < 0 ? 0 : 16);
                cp_async16(vw + row * DH + c * 8, vb + off, s2 < 0 ? 0 : 16);
            }
            cp_async_commit();
        };
        /* warps >= Q4L_AW only merge (their shared memory would take L1's room) */
        int g = warp < Q4L_AW ? gb + bi * Q4L_AW + warp : ge + 1;
        Q4LT(0);
        if (g <= ge) load(g);
        for (int x = tid; x < GM * DH; x += blockDim.x)
            qs[x] = x < ng * DH ? __ldcg(P.jq.s[0].y + (int64_t)h0 * DH + x) * P.qscale : 0.0f;
        __syncthreads();
        Q4LT(1);

        float m[GM], l[GM], acc[GM][VE];
#pragma unroll
        for (int h = 0; h < GM; h++) {
            m[h] = -INFINITY, l[h] = 0.0f;
#pragma unroll
            for (int e = 0; e < VE; e++) acc[h][e] = 0.0f;
        }
        float *pw_s = ps + warp * 16 * GM;
        for (; g <= ge; g += nbw * Q4L_AW) {
            cp_async_wait<0>();
            __syncwarp();
            float s[GM];
#pragma unroll
            for (int h = 0; h < GM; h++) s[h] = 0.0f;
#pragma unroll
            for (int i = 0; i < KCH; i++) { /* lane (j, hf): chunks hf, hf + 2, ... of key j's row */
                const uint4 kq = *(const uint4 *)(kw + j * KS + (hf + 2 * i) * 8);
                float kf[8];
                kv_unpack_u32(kq.x, P.bf, kf), kv_unpack_u32(kq.y, P.bf, kf + 2);
                kv_unpack_u32(kq.z, P.bf, kf + 4), kv_unpack_u32(kq.w, P.bf, kf + 6);
                const float *qq = qs + (hf + 2 * i) * 8;
#pragma unroll
                for (int h = 0; h < GM; h++) {
                    const float4 a = *(const float4 *)(qq + h * DH), b = *(const float4 *)(qq + h * DH + 4);
                    s[h] += a.x * kf[0] + a.y * kf[1] + a.z * kf[2] + a.w * kf[3] + b.x * kf[4] + b.y * kf[5] +
                            b.z * kf[6] + b.w * kf[7];
                }
            }
            float pv[GM];
#pragma unroll
            for (int h = 0; h < GM; h++) {
                float v = s[h] + __shfl_xor_sync(0xffffffffu, s[h], 1);
                v = kval ? v : -INFINITY;
                float mx = v;
#pragma unroll
                for (int o = 2; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
                const float mn = fmaxf(m[h], mx); /* finite: every group holds a key of the context */
                const float c = q4l_exp2(m[h] - mn), pe = q4l_exp2(v - mn);
                l[h] = l[h] * c + (hf == 0 ? pe : 0.0f);
                m[h] = mn;
#pragma unroll
                for (int e = 0; e < VE; e++) acc[h][e] *= c;
                pv[h] = pe;
            }
            if (hf == 0)
#pragma unroll
                for (int h = 0; h < GM; h += 4)
                    *(float4 *)(pw_s + j * GM + h) = make_float4(pv[h], pv[h + 1], pv[h + 2], pv[h + 3]);
            __syncwarp();
#pragma unroll 4
            for (int jj = 0; jj < 16; jj++) {
                float pw[GM], vf[VE];
#pragma unroll
                for (int h = 0; h < GM; h += 4) {
                    const float4 w = *(const float4 *)(pw_s + jj * GM + h);
                    pw[h] = w.x, pw[h + 1] = w.y, pw[h + 2] = w.z, pw[h + 3] = w.w;
                }
                const uint16_t *vr = vw + jj * DH + lane * VE;
                if constexpr (VE == 4) {
                    const uint2 w = *(const uint2 *)vr;
                    kv_unpack_u32(w.x, P.bf, vf), kv_unpack_u32(w.y, P.bf, vf + 2);
                } else if constexpr (VE == 2) {
                    kv_unpack_u32(*(const uint32_t *)vr, P.bf, vf);
                } else {
                    vf[0] = P.bf ? __uint_as_float((uint32_t)vr[0] << 16) : __half2float(__ushort_as_half(vr[0]));
                }
#pragma unroll
                for (int h = 0; h < GM; h++)
#pragma unroll
                    for (int e = 0; e < VE; e++) acc[h][e] += pw[h] * vf[e];
            }
            __syncwarp(); /* every lane is done with kw, vw and pw_s */
            if (g + nbw * Q4L_AW <= ge) load(g + nbw * Q4L_AW);
        }
        /* the warps' partials, merged in shared memory (wacc over the V rows: after a barrier) */
#pragma unroll
        for (int h = 0; h < GM; h++) {
            float v = l[h];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            l[h] = v;
        }
        if (lane == 0)
#pragma unroll
            for (int h = 0; h < GM; h++) wml[warp * 2 * GM + h] = m[h], wml[warp * 2 * GM + GM + h] = l[h];
        __syncthreads();
#pragma unroll
        for (int h = 0; h < GM; h++)
#pragma unroll
            for (int e = 0; e < VE; e++) wacc[(warp * GM + h) * DH + lane * VE + e] = acc[h][e];
        __syncthreads();
        Q4LT(2);
        float *pp = P.part + ((size_t)unit * Q4L_BPH + bi) * (GM * DH + 2 * GM);
        for (int x = tid; x < ng * DH; x += blockDim.x) {
            const int h = x / DH, d = x - h * DH;
            float M = -INFINITY, L = 0.0f, a = 0.0f;
            for (int w = 0; w < Q4L_NW; w++) M = fmaxf(M, wml[w * 2 * GM + h]);
            for (int w = 0; w < Q4L_NW; w++) {
                const float lw = wml[w * 2 * GM + GM + h];
                if (lw > 0.0f) { /* a warp without keys adds nothing */
                    const float f = q4l_exp2(wml[w * 2 * GM + h] - M);
                    L += f * lw;
                    a += f * wacc[(w * GM + h) * DH + d];
                }
            }
            if (nbw == 1) {
                P.att[(int64_t)(h0 + h) * DH + d] = a / L;
            } else {
                pp[x] = a;
                if (d == 0) pp[GM * DH + h] = M, pp[GM * DH + GM + h] = L;
            }
        }
        if (nbw > 1) { /* the last block of the unit to finish merges the blocks */
            __threadfence();
            __syncthreads();
            if (tid == 0) {
                const unsigned prev = atomicAdd(P.cnt + unit, 1u);
                s_last = prev == (unsigned)nbw - 1;
                if (s_last) atomicExch(P.cnt + unit, 0u); /* ready for the next launch */
            }
            __syncthreads();
            if (s_last) {
                __threadfence();
                const float *p0 = P.part + (size_t)unit * Q4L_BPH * (GM * DH + 2 * GM);
                for (int x = tid; x < ng * DH; x += blockDim.x) {
                    const int h = x / DH;
                    float M = -INFINITY, L = 0.0f, a = 0.0f;
                    for (int b = 0; b < nbw; b++) M = fmaxf(M, __ldcg(p0 + (size_t)b * (GM * DH + 2 * GM) + GM * DH + h));
                    for (int b = 0; b < nbw; b++) {
                        const float *pb = p0 + (size_t)b * (GM * DH + 2 * GM);
                        const float f = q4l_exp2(__ldcg(pb + GM * DH + h) - M);
                        L += f * __ldcg(pb + GM * DH + GM + h);
                        a += f * __ldcg(pb + x);
                    }
                    P.att[(int64_t)h0 * DH + x] = a / L;
                }
            }
        }
        __syncthreads(); /* before the next unit rewrites the scratch */
        Q4LT(3);
    }
}


#endif /* sm_80+ */

template <bool NESTED, int DH, int GM>
__global__ void __launch_bounds__(Q4H4_THREADS, 1) k_q4_layer(const __grid_constant__ struct q4l_params P)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    (void)P; /* sm_80+ only (cp.async; the host side declines older GPUs): no code for sm_75 */
#else
    extern __shared__ float4 q4l_smem4[];
    __shared__ float slut[16];
    __shared__ float red[64];
    __shared__ float part[Q4H4_PAIRS][2][4];
    struct q4h4_smem sm;
    sm.tab = reinterpret_cast<uint8_t *>(q4l_smem4);
    sm.ncode = reinterpret_cast<float *>(sm.tab + Q4H4_TAB);
    sm.xs = sm.tab + Q4H4_TAB + Q4H4_NCODE;
    sm.slut = slut, sm.red = red, sm.part = part;
#ifdef TUNA_Q4_TRACE
    unsigned long long *ltr = NULL;
    if (g_q4ltr && blockIdx.x < 132 && P.trace_id >= g_q4ltr_first && P.trace_id < g_q4ltr_first + g_q4ltr_n)
        ltr = g_q4ltr + ((size_t)(P.trace_id - g_q4ltr_first) * 132 + blockIdx.x) * Q4LT_SLOTS;
    Q4LT(0);
    if (ltr && threadIdx.x == 0) {
        unsigned smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        ltr[11] = smid;
    }
#else
    unsigned long long *const ltr = NULL;
#endif
    int bslot = 2;
    auto pdl = [&] {
        tuna_pdl_wait();
        Q4LT(1);
    };
    auto barrier = [&] {
        q4l_grid_sync(P.bar, ltr, bslot);
        bslot += 2;
    };
#ifdef TUNA_Q4_TRACE
#define Q4L_TR(k) , (ltr ? ltr + 12 + 20 * (k) : (unsigned long long *)NULL)
#else
#define Q4L_TR(k)
#endif

    /* 1. q/k/v with the norm; RoPE of q and k and the KV store in the store (which reads what
     * it needs from the parameters: nothing of it stays live across the GEMV's loop) */
    auto store_qkv = [&](int it, int v, float tot) {
        const float other = __shfl_xor_sync(0xffffffffu, tot, 16); /* row v ^ 2: the RoPE partner */
        if ((threadIdx.x & 7) != 0) return;
        int seg;
        int64_t n0;
        gemv_rows(P.jq, 4, it, &seg, &n0);
        const struct gemv_seg &s = P.jq.s[seg];
        const int64_t cs = __ldg(P.slot) * ((int64_t)P.Hkv * DH);
        if (seg < 2) { /* row v of the item and its partner in the other half (q4h4_rope_row's order) */
            const bool second = v >= 2;
            const int64_t row = q4h4_rope_row<true>(seg, n0, v >> 1, DH) + (v & 1);
            const int64_t prow = q4h4_rope_row<true>(seg, n0, (v >> 1) ^ 1, DH) + (v & 1);
            const int64_t jj = row % DH - (second ? DH / 2 : 0); /* the pair's frequency */
            const float xa = tot + (s.bias ? s.bias[row] : 0.0f), xb = other + (s.bias ? s.bias[prow] : 0.0f);
            float c, sn;
            rope_cos_sin(P.inv_freq, jj, (float)__ldg(P.pos), P.attn_factor, &c, &sn);
            const float out = second ? rope_second(xb, xa, c, sn) : rope_first(xa, xb, c, sn);
            s.y[row] = out;
            if (seg == 1) q4l_st16(P.kc, cs + row, out, P.bf);
        } else if (n0 + v < s.N) {
            const int64_t row = n0 + v;
            const float val = tot + (s.bias ? s.bias[row] : 0.0f);
            s.y[row] = val;
            q4l_st16(P.vc, cs + row, val, P.bf);
        }
    };
    q4h4_run<true, NESTED, 2, true, 2>(sm, P.x, P.jq, P.lut, true, P.nq, P.lmax, P.nshift, DH, pdl, store_qkv Q4L_TR(0));

    /* 2. attention; every block is resident from here on: the next kernel may be launched */
    barrier();
    tuna_pdl_trigger();
    q4l_attend<DH, GM>(P, reinterpret_cast<float *>(q4l_smem4), ltr ? ltr + 92 : NULL); /* over the table */

    /* 3. x += W_o att */
    auto store_add = [&](const struct gemv_job &j, int it, int v, float tot) {
        if ((threadIdx.x & 7) != 0) return;
        int seg;
        int64_t n0;
        gemv_rows(j, 4, it, &seg, &n0);
        const struct gemv_seg &s = j.s[seg];
        if (n0 + v < s.N) {
            float *yp = s.y + n0 + v;
            *yp = __ldcg(yp) + (tot + (s.bias ? s.bias[n0 + v] : 0.0f));
        }
    };
    auto store_o = [&](int it, int v, float tot) { store_add(P.jo, it, v, tot); };
    q4h4_run<false, NESTED, 2, false, 2>(sm, P.att, P.jo, P.lut, true, P.no, P.lmax, P.nshift, DH, barrier, store_o Q4L_TR(1));

    /* 4. act = act(gate) * up with the norm */
    auto store_glu = [&](int it, int v, float tot) {
        const float up = __shfl_down_sync(0xffffffffu, tot, 16); /* lanes 0, 8: rows 2, 3 */
        const int64_t n = (int64_t)it * 2 + v;
        if ((threadIdx.x & 31) < 16 && (threadIdx.x & 7) == 0 && n < P.jg.s[0].N) {
            const float a2[2][1] = {{tot}, {up}}, one[1] = {1.0f};
            gemv_store<1, 2>(P.jg, a2, one, 0, n);
        }
    };
    q4h4_run<true, NESTED, 2, false, 1>(sm, P.x, P.jg, P.lut, false, P.ng, P.lmax, P.nshift, DH, barrier, store_glu Q4L_TR(2));

    /* 5. x += W_down act */
    auto store_d = [&](int it, int v, float tot) { store_add(P.jd, it, v, tot); };
    q4h4_run<false, NESTED, 2, false, 2>(sm, P.act, P.jd, P.lut, false, P.nd, P.lmax, P.nshift, DH, barrier, store_d Q4L_TR(3));
#ifdef TUNA_Q4_TRACE
    __syncthreads();
    Q4LT(10);
#endif
#endif
}

/* ------------------------------------------------------------------------------------------
 * Host side. */

static long g_q4l_launches;
#ifdef TUNA_Q4_TRACE
static unsigned long long *q4ltr_dev;
static int q4ltr_n;
static void q4ltr_dump(void)
{
    const size_t n = (size_t)q4ltr_n * 132 * Q4LT_SLOTS;
    unsigned long long *h = (unsigned long long *)malloc(n * 8);
    if (!h || cudaDeviceSynchronize() != cudaSuccess ||
        cudaMemcpy(h, q4ltr_dev, n * 8, cudaMemcpyDeviceToHost) != cudaSuccess) {
        fprintf(stderr, "q4l trace: copy failed\n");
        free(h);
        return;
    }
    FILE *f = fopen("q4ltrace.bin.tmp", "wb");
    const bool ok = f && fwrite(h, 8, n, f) == n;
    if ((f && fclose(f) != 0) || !ok || rename("q4ltrace.bin.tmp", "q4ltrace.bin") != 0)
        fprintf(stderr, "q4l trace: could not write q4ltrace.bin\n");
    else
        fprintf(stderr, "q4l trace: %d launches written to q4ltrace.bin\n", q4ltr_n);
    free(h);
}
static int q4ltr_setup(void)
{
    static bool done = false;
    const char *e = done ? NULL : getenv("TUNA_Q4L_TRACE");
    done = true;
    int first = 0, n = 0;
    unsigned long long *d = NULL;
    if (e && (sscanf(e, "%d:%d", &first, &n) != 2 || first < 0 || n <= 0 || n > 100000)) {
        fprintf(stderr, "q4l trace: TUNA_Q4L_TRACE=%s: want first:count; not tracing\n", e);
    } else if (e && cudaMalloc(&d, (size_t)n * 132 * Q4LT_SLOTS * 8) == cudaSuccess) {
        cudaMemset(d, 0, (size_t)n * 132 * Q4LT_SLOTS * 8);
        cudaMemcpyToSymbol(g_q4ltr, &d, sizeof d);
        cudaMemcpyToSymbol(g_q4ltr_first, &first, sizeof first);
        cudaMemcpyToSymbol(g_q4ltr_n, &n, sizeof n);
        q4ltr_dev = d, q4ltr_n = n;
        atexit(q4ltr_dump);
    }
    return (int)g_q4l_launches;
}
#endif

extern "C" long tuna_cuda_q4_layer_launches(void)
{
    return g_q4l_launches;
}

/* Off unless TUNA_LAYER_KERNEL=1 (read at every call: tests switch it): slower than the ops on the
 * H100 (see the file's comment). A TUNA_Q4_K other than 8 (another GEMV) keeps it off too. */
static bool q4l_env_on(void)
{
    const char *e = getenv("TUNA_LAYER_KERNEL"), *k = getenv("TUNA_Q4_K");
    return e && e[0] == '1' && !(k && *k && strcmp(k, "8") != 0);
}

/* A job over n weights of the layer (gemv_job_init with the 4-bit scales). */
static void q4l_job(struct gemv_job *j, int n, float *const *ys, const struct tuna_weight *const *ws,
                    const float *const *biases, int mode, const float *nw, float *xn, float eps, int shift)
{
    gemv_job_init(j, n, ys, ws, biases, mode, nw, xn, eps);
    j->bs_shift = shift;
    j->prefetch = tuna_cuda_gemv_prefetch();
    for (int i = 0; i < n; i++) j->s[i].sc = q4_scales_of((const struct tuna_cuda_q4 *)ws[i]->q4);
}

typedef void (*q4l_kernel)(const struct q4l_params);

static q4l_kernel q4l_pick(bool nested, int D, int GM)
{
#define Q4L_K(N, DD, G) (G == 4 ? k_q4_layer<N, DD, 4> : k_q4_layer<N, DD, 8>)
    if (nested) return D == 32 ? Q4L_K(true, 32, GM) : D == 64 ? Q4L_K(true, 64, GM) : Q4L_K(true, 128, GM);
    return D == 32 ? Q4L_K(false, 32, GM) : D == 64 ? Q4L_K(false, 64, GM) : Q4L_K(false, 128, GM);
#undef Q4L_K
}

bool tuna_cuda_decode_layer(tuna_backend *be, const struct tuna_decode_layer *a)
{
    if (be->sticky) return true; /* the step fails anyway */
    if (!q4l_env_on() || tuna_cuda_q4_old() || be->cc_major < 8 || be->sm_count <= 0) return false;
    tuna_cuda_racc_settle(be, a->x);
    const int64_t H = a->H, Hkv = a->Hkv, D = a->D, C = a->w[0]->cols, I = a->w[4]->rows;
    const int code = kv_code(a->kv_dtype);
    if ((code != 1 && code != 2) || (D != 32 && D != 64 && D != 128) || a->rot_dim != D || Hkv <= 0 || H % Hkv != 0 ||
        !a->inv_freq || a->ab->T != 1 || a->ab->block_size <= 0)
        return false;
    /* shapes: the Llama block's */
    const struct tuna_weight *const *w = a->w;
    if (w[0]->rows != H * D || w[1]->rows != Hkv * D || w[2]->rows != Hkv * D || w[1]->cols != C || w[2]->cols != C ||
        w[3]->rows != C || w[3]->cols != H * D || w[4]->cols != C || w[5]->rows != I || w[5]->cols != C ||
        w[6]->rows != C || w[6]->cols != I)
        return false;
    const float *vec[] = {a->x, a->q, a->att, a->act, a->xn_attn, a->xn_mlp, a->attn_norm, a->mlp_norm};
    for (int i = 0; i < 8; i++) /* read or written in 16-byte pieces */
        if (!vec[i] || (uintptr_t)vec[i] % 16 != 0) return false;
    /* the weights: k_q4_h4's conditions, one table, blocksize and scale form for all seven */
    /* (misaligned codes: q4h_job_fits below declines them too) */
    for (int i = 0; i < 7; i++)
        if (!q4_weight_aligned(w[i])) return false;
    const struct tuna_cuda_q4 *q0 = (const struct tuna_cuda_q4 *)w[0]->q4;
    for (int i = 0; i < 7; i++)
        if (!q4_same_form(q0, (const struct tuna_cuda_q4 *)w[i]->q4)) return false;
    int shift = 0;
    while ((1 << shift) < q0->blocksize) shift++;
    if ((1 << shift) != q0->blocksize) return false;
    const bool nested = q0->absmax == NULL;

    struct q4l_params P;
    memset(&P, 0, sizeof P);
    float *yq[3] = {a->q, a->k, a->v}, *yx[1] = {a->x}, *yg[2] = {a->act, NULL};
    q4l_job(&P.jq, 3, yq, w, a->bias, GEMV_STORE, a->attn_norm, a->xn_attn, a->eps, shift);
    q4l_job(&P.jo, 1, yx, w + 3, a->bias + 3, GEMV_ADD, NULL, NULL, 0.0f, shift);
    q4l_job(&P.jg, 2, yg, w + 4, a->bias + 4, GEMV_GLU, a->mlp_norm, a->xn_mlp, a->eps, shift);
    P.jg.act = a->act_kind;
    q4l_job(&P.jd, 1, yx, w + 6, a->bias + 6, GEMV_ADD, NULL, NULL, 0.0f, shift);
    bool nest_chk;
    const struct gemv_job *jobs[4] = {&P.jq, &P.jo, &P.jg, &P.jd};
    for (int i = 0, wi = 0; i < 4; wi += jobs[i]->nseg, i++)
        if (!q4h_job_fits(jobs[i], w + wi, q0->blocksize, 1, &nest_chk)) return false;
    P.nq = (int)(gemv_number_rows(&P.jq, 4) / 4);
    P.no = (int)(gemv_number_rows(&P.jo, 4) / 4);
    P.ng = (int)((I + 1) / 2);
    P.nd = (int)(gemv_number_rows(&P.jd, 4) / 4);
    memcpy(P.lut.v, q0->lut, sizeof P.lut.v);
    P.lmax = q4_lut_absmax(&P.lut);
    P.nshift = nested ? q0->nested_shift : 0;
    P.x = a->x, P.att = a->att, P.act = a->act;
    P.attn_factor = a->attn_factor;
    P.kc = a->kcache, P.vc = a->vcache, P.bf = code == 1;
    P.H = (int)H, P.Hkv = (int)Hkv;
    /* TUNA_LAYER_GM=8: the 8-head instantiation for any group (tests: its padded heads) */
    const char *gme = getenv("TUNA_LAYER_GM");
    const int G = (int)(H / Hkv), GM = G <= 4 && !(gme && gme[0] == '8') ? 4 : 8;
    P.n_hg = (G + GM - 1) / GM;
    P.qscale = a->scale * 1.4426950408889634f;

    /* shared memory: the table, the nested codes, then x (the largest K) or phase 2's scratch */
    const int64_t kmax = C > I ? (C > H * D ? C : H * D) : (I > H * D ? I : H * D); /* the largest K: C, I or H*D (o) */
    /* phase 2's scratch lies over the table (phase 3 builds it again): the kernel asks for little
     * more than k_q4_h4 does (108 KB at 8B shapes instead of 215; the H100 ran the GEMV loops no
     * faster with the smaller size, but L1 keeps its room) */
    const size_t xs = ((size_t)kmax * 2 + 127) / 128 * 128, att = q4l_att_smem((int)D, GM);
    const size_t gemv = (size_t)Q4H4_TAB + Q4H4_NCODE + xs, smem = gemv > att ? gemv : att;
    if (be->max_smem_optin <= 0 || smem + 2048 > (size_t)be->max_smem_optin) return false;
    const q4l_kernel fn = q4l_pick(nested, (int)D, GM);
    /* one block per SM, all resident */
    if (!tuna_cuda_one_per_sm(be, (const void *)fn, Q4H4_THREADS, smem)) return false;

    /* metadata: position, block table, slot, RoPE frequencies */
    if (!tuna_cuda_decode_meta(be, a, "decode layer", &P.md, &P.slot, &P.inv_freq)) return true;
    P.pos = P.md.pos;

    /* the barrier, the counters and the partials: one buffer, sized once for the model */
    const int nu = (int)(Hkv * P.n_hg);
    const size_t part_f = (size_t)nu * Q4L_BPH * (size_t)(GM * D + 2 * GM);
    const size_t o_part = (256 + (size_t)nu * 4 + 255) / 256 * 256, bytes = o_part + part_f * 4;
    char *scratch = (char *)tuna_cuda_layer_scratch(be, bytes);
    if (!scratch) return true; /* sticky */
    P.bar = (unsigned *)scratch;
    P.cnt = P.bar + 64;
    P.part = (float *)(scratch + o_part);

    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)be->sm_count);
    cfg.blockDim = dim3(Q4H4_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = be->stream;
    cudaLaunchAttribute attr[2];
    tuna_cuda_grid_attrs(be, &cfg, attr, true);
#ifdef TUNA_Q4_TRACE
    P.trace_id = q4ltr_setup();
#endif
    g_q4l_launches++;
    tuna_cuda_check(be, cudaLaunchKernelEx(&cfg, fn, P), "k_q4_layer");
    return true;
}
