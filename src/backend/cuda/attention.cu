/* attention.cu — causal attention over the paged KV cache (float32, bf16, f16 or FP8 E4M3 elements), two
 * kernels chosen per group of tokens, both float32 softmax with the CPU twin's semantics
 * (src/backend/cpu/attention.c: token t attends to positions [max(0, pos - window + 1), pos] of
 * its own sequence; GQA maps head h to kv head h / (H / Hkv)).
 *
 * Decode (k_attn_decode + k_attn_combine): flash-decoding. A block handles one token, one kv head
 * and up to DEC_GM of its query heads (so K and V are read once for the whole GQA group), and one
 * split of the token's context; 8 lanes share a key row, read in 16-byte vectors. Each split
 * keeps an online softmax over tiles of DEC_TILE keys and writes its running max, sum and
 * unnormalized output; k_attn_combine merges the splits. The number of splits comes only from
 * the batch size, head shape and the cache's bound max_blocks_per_seq (and the SM count): the
 * actual lengths are read on the device, and the context of each token is divided among the
 * splits there (splits past it exit at once), so one launch configuration serves every decode
 * step of a batch size — what CUDA graphs need (src/backend/cuda/graph.cu). With one split the
 * block writes the output itself. A call of one token over a 16-bit cache on sm_90+ goes to the
 * cluster kernel of attention_b1.cu instead (TUNA_ATTN_B1=0: not).
 *
 * Prefill (k_attn_prefill, in attention_prefill.cu): flash attention for runs of at least
 * PF_MIN_RUN consecutive tokens of one sequence (see that file). Other tokens of a mixed batch go
 * through the decode kernels in the same call.
 *
 * Metadata: positions and block tables come through the metadata arena; a caller that provides
 * tables_flat ([T, max_blocks_per_seq], e.g. in the step block) saves the flattening here.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <type_traits>

#include "backend/cuda/act16.cuh"
#include "backend/cuda/attention_dec16.cuh"
#include "backend/cuda/attention_internal.cuh"
#include "backend/cuda/kv_types.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"

#define DEC_THREADS 128
#define DEC_TILE 64          /* keys per online-softmax tile of a split */
#define DEC_GM 8             /* query heads per block at most (GQA group or part of it) */
#define DEC_MIN_CHUNK 64     /* a split covers at least this many keys */
#define DEC_MAX_SPLITS 256
#define DEC_BLOCKS_PER_SM 8  /* splits are added until the grid has this many blocks per SM */

/* ------------------------------------------------------------------------------------------
 * Decode: grid (tokens, Hkv * n_hg, n_splits), DEC_THREADS threads.
 * rows: decode token i is token rows[i] of the batch (NULL: token i).
 * part_acc [n_rows, H, n_splits, D], part_ml [n_rows, H, n_splits, 2] when n_splits > 1.
 * VEC: K/V rows read in 16-byte vectors (D a multiple of kv_traits<KT>::VEC), else by element. */
template <typename KT, bool VEC>
__global__ void __launch_bounds__(DEC_THREADS)
    k_attn_decode(float *out, float *part_acc, float *part_ml, const float *q, const KT *kc, const KT *vc,
                  att_meta md, const int32_t *rows, int H, int Hkv, int D, int n_hg, int n_splits, float scale, int io)
{
    constexpr int VE = VEC ? kv_traits<KT>::VEC : 1; /* elements per unit (one load) */
    constexpr int UPT = VEC ? 1 : 2;                  /* units per thread in the V phase */
    __shared__ float qs[DEC_GM * ATT_MAX_D];
    __shared__ float sc[DEC_GM * DEC_TILE];
    __shared__ int64_t slots[DEC_TILE];
    __shared__ float red[DEC_THREADS * 8];
    __shared__ float ml[DEC_GM * 2], corr[DEC_GM];

    const int i = blockIdx.x, split = blockIdx.z;
    const int64_t t = rows ? (int64_t)rows[i] : (int64_t)i;
    const int kvh = blockIdx.y / n_hg, hg = blockIdx.y % n_hg;
    const int G = H / Hkv, h0 = kvh * G + hg * DEC_GM;
    const int ng = min(DEC_GM, G - hg * DEC_GM);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t p = md.pos[t], start = att_start(md, p);
    int64_t chunk = (p - start + n_splits) / n_splits; /* ceil(len / n_splits), len = p - start + 1 */
    chunk = (chunk + DEC_TILE - 1) / DEC_TILE * DEC_TILE;
    const int64_t lo = start + (int64_t)split * chunk;
    if (lo > p) { /* nothing of this token's context falls in this split */
        if (tid < ng) {
            size_t r = ((size_t)i * H + h0 + tid) * n_splits + split;
            part_ml[2 * r] = -INFINITY;
            part_ml[2 * r + 1] = 0.0f;
        }
        return;
    }
    const int64_t hi = min(p, lo + chunk - 1);
    const int32_t *table = att_table(md, t);
    const int64_t HkvD = (int64_t)Hkv * D;
    const KT *kbase = kc + (int64_t)kvh * D, *vbase = vc + (int64_t)kvh * D;
    for (int x = tid; x < ng * D; x += DEC_THREADS) {
        int g = x / D, d = x % D;
        qs[x] = a16_ld(q, io, ((int64_t)t * H + h0 + g) * D + d) * scale;
    }
    if (tid < ng) {
        ml[2 * tid] = -INFINITY;
        ml[2 * tid + 1] = 0.0f;
    }
    /* V phase: thread = (unit vu of the row, key lane kl); KL key lanes share the tile's keys */
    const int nunits = D / VE;
    const bool wide = nunits > DEC_THREADS; /* only by element with D > 128: two units each */
    const int KL = wide ? 1 : DEC_THREADS / nunits;
    const int vu = wide ? tid : tid % nunits, kl = wide ? 0 : tid / nunits;
    const bool vactive = kl < KL;
    float acc[DEC_GM][UPT * VE];
#pragma unroll
    for (int g = 0; g < DEC_GM; g++)
#pragma unroll
        for (int e = 0; e < UPT * VE; e++) acc[g][e] = 0.0f;
    const int grp = lane >> 3, l8 = lane & 7;
    __syncthreads();

    for (int64_t k0 = lo; k0 <= hi; k0 += DEC_TILE) {
        const int n = (int)min((int64_t)DEC_TILE, hi - k0 + 1);
        for (int j = tid; j < n; j += DEC_THREADS) {
            int64_t pp = k0 + j;
            slots[j] = (int64_t)table[pp / md.bs] * md.bs + pp % md.bs;
        }
        __syncthreads();
        /* scores: 8 lanes per key, 4 keys per warp at a time */
        for (int jb = warp * 4; jb < DEC_TILE; jb += 16) {
            const int j = jb + grp;
            float dot[DEC_GM];
#pragma unroll
            for (int g = 0; g < DEC_GM; g++) dot[g] = 0.0f;
            if (j < n) {
                const KT *kr = kbase + slots[j] * HkvD;
                for (int u = l8; u < nunits; u += 8) {
                    float f[VE];
                    if constexpr (VEC) kv_load_vec(kr + u * VE, f);
                    else f[0] = kv_traits<KT>::to_f32(kr[u]);
#pragma unroll
                    for (int g = 0; g < DEC_GM; g++) {
                        if (g < ng) {
                            const float *qq = qs + g * D + u * VE;
                            float s = 0.0f;
#pragma unroll
                            for (int e = 0; e < VE; e++) s += qq[e] * f[e];
                            dot[g] += s;
                        }
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < DEC_GM; g++) {
                float v = dot[g];
                v += __shfl_xor_sync(0xffffffffu, v, 4);
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                v += __shfl_xor_sync(0xffffffffu, v, 1);
                if (l8 == 0 && g < ng) sc[g * DEC_TILE + j] = j < n ? v : -INFINITY;
            }
        }
        __syncthreads();
        /* online softmax of the tile, one warp per head (the tile holds at least one key) */
        for (int g = warp; g < ng; g += DEC_THREADS / 32) {
            float s0 = sc[g * DEC_TILE + lane], s1 = sc[g * DEC_TILE + lane + 32];
            float mx = fmaxf(s0, s1);
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_old = ml[2 * g], m_new = fmaxf(m_old, mx);
            float e0 = expf(s0 - m_new), e1 = expf(s1 - m_new); /* masked keys: exp(-inf) = 0 */
            sc[g * DEC_TILE + lane] = e0;
            sc[g * DEC_TILE + lane + 32] = e1;
            float sum = e0 + e1;
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) {
                float c = expf(m_old - m_new); /* 0 on the first tile */
                corr[g] = c;
                ml[2 * g] = m_new;
                ml[2 * g + 1] = ml[2 * g + 1] * c + sum;
            }
        }
        __syncthreads();
        /* values: rescale, then add this tile's weighted rows */
#pragma unroll
        for (int g = 0; g < DEC_GM; g++) {
            if (g < ng) {
                const float c = corr[g];
#pragma unroll
                for (int e = 0; e < UPT * VE; e++) acc[g][e] *= c;
            }
        }
        if (vactive) {
            for (int j = kl; j < n; j += KL) {
                const KT *vr = vbase + slots[j] * HkvD;
#pragma unroll
                for (int uu = 0; uu < UPT; uu++) {
                    const int u = vu + uu * DEC_THREADS;
                    if (u >= nunits) break;
                    float f[VE];
                    if constexpr (VEC) kv_load_vec(vr + u * VE, f);
                    else f[0] = kv_traits<KT>::to_f32(vr[u]);
#pragma unroll
                    for (int g = 0; g < DEC_GM; g++) {
                        if (g < ng) {
                            const float w = sc[g * DEC_TILE + j];
#pragma unroll
                            for (int e = 0; e < VE; e++) acc[g][uu * VE + e] += w * f[e];
                        }
                    }
                }
            }
        }
        __syncthreads(); /* before the next tile rewrites slots[] and sc[] */
    }

    /* sum the key lanes, one head at a time, and write the output or the split's partial */
#pragma unroll
    for (int g = 0; g < DEC_GM; g++) {
        if (g < ng) { /* ng is the same for the whole block: the barriers below are uniform */
            if (vactive) {
#pragma unroll
                for (int uu = 0; uu < UPT; uu++) {
                    const int u = vu + uu * DEC_THREADS;
                    if (u < nunits)
#pragma unroll
                        for (int e = 0; e < VE; e++) red[kl * D + u * VE + e] = acc[g][uu * VE + e];
                }
            }
            __syncthreads();
            const float l = ml[2 * g + 1];
            const size_t r = ((size_t)i * H + h0 + g) * n_splits + split;
            for (int d = tid; d < D; d += DEC_THREADS) {
                float s = 0.0f;
                for (int k = 0; k < KL; k++) s += red[k * D + d];
                if (n_splits == 1) a16_st(out, io, ((int64_t)t * H + h0 + g) * D + d, s / l);
                else part_acc[r * D + d] = s;
            }
            if (n_splits > 1 && tid == 0) {
                part_ml[2 * r] = ml[2 * g];
                part_ml[2 * r + 1] = l;
            }
            __syncthreads();
        }
    }
}

/* out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s over the splits; grid (tokens, H). */
__global__ void k_attn_combine(float *out, const float *part_acc, const float *part_ml, const int32_t *rows, int H,
                               int D, int n_splits, int io)
{
    __shared__ float w[DEC_MAX_SPLITS];
    const int i = blockIdx.x, h = blockIdx.y;
    const int64_t t = rows ? (int64_t)rows[i] : (int64_t)i;
    const size_t r0 = ((size_t)i * H + h) * n_splits;
    float M = -INFINITY;
    for (int s = 0; s < n_splits; s++) M = fmaxf(M, part_ml[2 * (r0 + s)]);
    for (int s = threadIdx.x; s < n_splits; s += blockDim.x)
        w[s] = part_ml[2 * (r0 + s) + 1] > 0.0f ? expf(part_ml[2 * (r0 + s)] - M) : 0.0f; /* empty splits: 0 */
    __syncthreads();
    float L = 0.0f;
    for (int s = 0; s < n_splits; s++) L += w[s] * part_ml[2 * (r0 + s) + 1];
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < n_splits; s++)
            if (w[s] != 0.0f) a += w[s] * part_acc[(r0 + s) * D + d]; /* an empty split's acc is never written */
        a16_st(out, io, ((int64_t)t * H + h) * D + d, a / L);
    }
}

/* ------------------------------------------------------------------------------------------
 * Decode for 16-bit caches (bf16/f16) with D a multiple of 8 and 16-byte aligned rows:
 * k_attn_decode16. Grid (Hkv * n_hg, tokens, n_splits) (or tokens along x), 32 * nw threads.
 *
 * A block takes one token, one kv head, up to GM query heads of its group and one split of the
 * context. The split is cut into groups of D16_KEYS (16) keys at absolute positions 16 k (one
 * block-table entry per group when the block size is 16), and warp w of the block takes groups
 * w, w + nw, ... on its own: it copies each group's 16 K rows and 16 V rows into its own ring of
 * ns shared-memory stages with cp.async (rows outside the context are zero-filled), ns - 1
 * groups ahead of the one it computes, with the block-table entry of the next group loaded one
 * group earlier still; no block-wide barrier stands in the loop. Per group: lane (j, half)
 * computes key j's scores for all GM heads over half of the row (Q from shared memory,
 * broadcast), one shuffle joins the halves and four give the group's max (all heads at once,
 * no branches, so the shuffle chains overlap); p = exp2(s - m) goes through shared memory to
 * the PV step, where lane (kq, c) owns the 8 columns c of the output rows of every head for keys
 * kq, kq + KQ, ... (no per-key reduction). Each warp keeps its own running max and sum; at the
 * end the warps are merged through shared memory. With several splits the block writes (max,
 * sum, unnormalized output) per head and the last block of the (token, kv head) to finish —
 * found with an atomic counter, which it resets to 0 — merges the splits (weights in shared
 * memory, the partial rows read with several loads in flight), so no second kernel runs.
 * Scores are in log2 units (q is scaled by scale * log2(e)). GM is a power of two >= the heads
 * of the block; padded heads have q = 0 and are never written.
 * FP8 cache with D 64 or 128 (template TC, the default on sm_80+, TUNA_ATTN_F8MMA=0 for the
 * FFMA path): the two products of a group run on the tensor cores (see the kernel). The FFMA
 * path spends the same instructions per key as bf16 on half the bytes: on the H100 it was
 * issue-bound at 2.0 TB/s (185M instructions per b256 launch, 69% SM throughput); TC issues 84M
 * and streams 2.55 TB/s (bf16: 2.68). */
#define D16_MAX_BPS 4 /* blocks per SM counted at most when sizing the grid */

/* 8x8 tile of 16-bit values, transposed across the warp (the mma fragment layout: lane holds
 * row lane/4, columns 2(lane%4)..+1; afterwards the same of the transpose) */
static __device__ __forceinline__ uint32_t d16_movt(uint32_t x)
{
#if TUNA_MMA_SM80
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
#else
    return x;
#endif
}
/* x as f16 hi + lo (hi = f16(x), lo = f16(x - hi)): two float32 in, (hi pair, lo pair) out */
static __device__ __forceinline__ void d16_split2(float x, float y, uint32_t &hi, uint32_t &lo)
{
    const __half2 h = __floats2half2_rn(x, y);
    const __half2 r = __floats2half2_rn(x - __low2float(h), y - __high2float(h));
    hi = *reinterpret_cast<const uint32_t *>(&h);
    lo = *reinterpret_cast<const uint32_t *>(&r);
}

/* KT: bf16, f16, or FP8 E4M3 (then D a multiple of 16: rows are copied in 16-byte chunks; the
 * compute reads 8 elements at a time either way).
 * DT: D when compiled for one head size (64, 128), 0 = any multiple of 8 up to 256 (Drt).
 * GM: query heads per block (1, 2, 4 or 8). wr: bytes of shared memory per warp (its stage
 * ring; reused for the merge). counters [tokens * Hkv * n_hg]: 0 between launches. */
/* TC: 0 FFMA path, 1 tensor cores (at most 128 registers: 4 blocks per SM; compiled for 5 blocks,
 * <= 102 registers, it spilled and ran the b256 fp8 step in 16.96 against 15.82 ms on the H100) */
template <typename KT, int DT, int GM, int TC>
__global__ void __launch_bounds__(128, TC ? 4 : 1)
    k_attn_decode16(float *out, float *part_acc, float *part_ml, unsigned *counters, const float *q, const KT *kc,
                    const KT *vc, att_meta md, const int32_t *rows, int H, int Hkv, int Drt, int n_hg, int n_splits,
                    int ns, int wr, float qscale, int heads_x, int min_g, int flags, const struct tuna_l2pf pf)
{
    const int D = DT ? DT : Drt;
    constexpr int ES = (int)sizeof(KT);    /* bytes per element: 2, or 1 (FP8) */
    const int CH = D / 8;                  /* units of 8 elements per row (16 bytes at ES = 2) */
    const int CB = ES * D / 16;            /* 16-byte chunks per row (the copies) */
    const int KQ = TC ? 1 : min(D16_KEYS, 32 / CH); /* key lanes of the PV step (TC: one partial row) */
    const int RB = ES * D + 16;            /* bytes per row in a stage (padded: no bank conflicts) */
    const int NW = blockDim.x >> 5;
    extern __shared__ float4 d16_smem[];
    float *qs = (float *)d16_smem;         /* [GM][D] */
    float *ps_all = qs + GM * D;           /* [NW][16][GM] */
    char *wreg_all = (char *)(ps_all + NW * D16_KEYS * ((GM + 3) & ~3));
    __shared__ int is_last;

    /* heads_x: blockIdx.x is the (kv head, head group) and blockIdx.y the token (blocks running
     * at the same time then read neighbouring rows of the same cache slots), else the reverse */
    const int i = heads_x ? blockIdx.y : blockIdx.x, hy = heads_x ? blockIdx.x : blockIdx.y;
    const int n_hy = heads_x ? gridDim.x : gridDim.y, split = blockIdx.z;
    const int t = rows ? rows[i] : i;
    const int kvh = hy / n_hg, hg = hy % n_hg;
    const int G = H / Hkv, h0 = kvh * G + hg * GM;
    const int ng = min(GM, G - hg * GM);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int p = (int)md.pos[t], start = (int)att_start(md, p);
    const int gb = start / D16_KEYS, ge = p / D16_KEYS;
    /* groups per split: ceil((ge - gb + 1) / n_splits), at least min_g; the nsp first splits have
     * work (a short context runs on few blocks and merges few partial rows; the others leave).
     * min_g 0: every split runs, those past the context write empty rows (the former rule). */
    const int gps = max((ge - gb + n_splits) / n_splits, min_g), nsp = min_g ? (ge - gb + gps) / gps : n_splits;
    /* the L2 prefetch hint (TUNA_L2PF=1): every block brings its share of the next weight into
     * L2, a block with work after its first K/V copies are queued */
    const long long pf_b = ((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x,
                    pf_nb = (long long)gridDim.x * gridDim.y * gridDim.z;
    if (split >= nsp) {
        if (threadIdx.x == 0) tuna_l2pf_issue(pf, pf_b, pf_nb);
        return;
    }
    const int s0 = gb + split * gps, s1 = min(ge, s0 + gps - 1);
    const int lo = max(start, s0 * D16_KEYS), hi = min(p, s1 * D16_KEYS + D16_KEYS - 1);
    const int nk = s1 >= s0 + warp ? (s1 - s0 - warp) / NW + 1 : 0; /* this warp's groups (0 if s0 > ge) */

    /* launched with PDL (TUNA_ATTN_PDL, flags & 2): q and this step's K/V rows come from the
     * kernel before; meanwhile this warp's K/V rows go into L2 (the rows of earlier steps; the
     * step's own row may be fetched before it is written: L2 is where both meet, and the copies
     * below read L2). flags & 1 (TUNA_ATTN_TRIGGER=1): the next kernel (the o GEMV, launched
     * with PDL) may start its prologue now. Off by default: its blocks then land on SMs still
     * set to this kernel's shared-memory carveout, where the PDL-chained GEMVs that follow ran
     * slower (H100: 6.46 against 6.06 ms per bf16 step; the regression after 7cb6c0b). */
    if (flags & 2) {
        const int32_t *tb = att_table(md, t);
        const int64_t HD = (int64_t)Hkv * D;
        for (int k = 0; k < nk && lane < 16; k++) {
            const int key = (s0 + warp + NW * k) * D16_KEYS + lane;
            if (key < lo || key > hi) continue;
            const int64_t off = ((int64_t)tb[key / md.bs] * md.bs + key % md.bs) * HD + (int64_t)kvh * D;
            tuna_prefetch_l2_bulk(kc + off, (unsigned)(ES * D));
            tuna_prefetch_l2_bulk(vc + off, (unsigned)(ES * D));
        }
    }
    tuna_pdl_wait();
    if (flags & 1) tuna_pdl_trigger();
    const int io = (flags >> 2) & 3; /* q and out: float32, bf16 or f16 (the 16-bit activation op) */
    for (int x = tid; x < GM * D; x += blockDim.x)
        qs[x] = x < ng * D ? a16_ld(q, io, ((int64_t)t * H + h0) * D + x) * qscale : 0.0f;

    const int32_t *table = att_table(md, t);
    const int64_t HkvD = (int64_t)Hkv * D;
    const KT *kbase = kc + (int64_t)kvh * D, *vbase = vc + (int64_t)kvh * D;
    char *wreg = wreg_all + (size_t)warp * wr;
    constexpr int GP = (GM + 3) & ~3; /* ps row stride (float4 reads) */
    float *ps = ps_all + warp * D16_KEYS * GP;
    const int bs = md.bs;

    /* lane j < 16: the cache slot of key j of this warp's group k, -1 outside the context */
    auto slot_of = [&](int k) -> int {
        const int key = (s0 + warp + NW * k) * D16_KEYS + (lane & 15);
        return k < nk && lane < 16 && key >= lo && key <= hi ? table[key / bs] * bs + key % bs : -1;
    };
    int nslot = slot_of(0);
    /* copies group k of this warp (if any) into stage k % ns (slot: its slots); always commits */
    auto issue = [&](int k, int slot) {
        if (k < nk) {
            char *buf = wreg + (k % ns) * (2 * D16_KEYS) * RB;
            for (int idx = lane; idx < 2 * D16_KEYS * CB; idx += 32) { /* rows 0..15 K, 16..31 V */
                const int row = idx / CB, c = idx - row * CB;
                const int sl = __shfl_sync(0xffffffffu, slot, row & 15);
                const char *src =
                    (const char *)((row < 16 ? kbase : vbase) + (int64_t)(sl < 0 ? 0 : sl) * HkvD) + c * 16;
                cp_async16(buf + row * RB + c * 16, src, sl < 0 ? 0 : 16);
            }
        }
        cp_async_commit();
    };

    float m[GM], l[GM], acc[GM][8];
    d16_state_init<GM>(m, l, acc);
    for (int k = 0; k < ns - 1; k++) {
        const int sl = nslot;
        nslot = slot_of(k + 1);
        issue(k, sl);
    }
    if (threadIdx.x == 0) tuna_l2pf_issue(pf, pf_b, pf_nb);
    __syncthreads(); /* qs */

    const int j = lane & 15, half = lane >> 4;
    const int kq = lane / CH, cc = lane - kq * CH;
    const bool pv_active = kq < KQ;
    /* TC (FP8 cache, D = 64 or 128, sm_80+): both products on the tensor cores (mma m16n8k16,
     * f16 inputs, float32 accumulation). E4M3 is exact in f16; q and p are split into f16 hi +
     * lo, so the products keep ~22 bits (the FFMA path's accuracy). Per group of 16 keys:
     *   S^T[key][head] = K[key][dim] Q^T[dim][head] (M = 16 keys, N = 8 heads, D/16 k-steps), the
     *   dims of k-step s, column 2c..2c+1 / 2c+8..2c+9 being c*D/4 + 4s + 0..1 / 2..3, so lane
     *   (g, c) reads D/4 consecutive bytes of key rows g and g+8;
     *   O^T[dim][head] += V^T[dim][key] P^T[key][head] (M = 16 dims of m-tile i: row r is dim
     *   r*D/16 + i, so a lane reads D/16 consecutive bytes of 4 key rows; P^T from the S^T
     *   fragment by one movmatrix per 8 keys).
     * Lane (g = lane/4, c = lane%4) keeps the running max and sum of heads 2c, 2c+1. */
    constexpr int TS = TC ? DT / 16 : 1; /* k-steps of Q K^T = m-tiles of P V */
    const int tg = lane >> 2, tcq = lane & 3;
    uint32_t tqh[TS][2], tql[TS][2];
    float tm[2] = {-INFINITY, -INFINITY}, tl[2] = {0.0f, 0.0f}, tacc[TS][4];
    if constexpr (TC) {
#pragma unroll
        for (int s = 0; s < TS; s++) {
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (tg < GM) v = *(const float4 *)(qs + tg * DT + tcq * (DT / 4) + 4 * s);
            d16_split2(v.x, v.y, tqh[s][0], tql[s][0]);
            d16_split2(v.z, v.w, tqh[s][1], tql[s][1]);
#pragma unroll
            for (int e = 0; e < 4; e++) tacc[s][e] = 0.0f;
        }
    }
    for (int k = 0; k < nk; k++) {
        __syncwarp(); /* every lane is done with the stage about to be refilled */
        {
            const int sl = nslot;
            nslot = slot_of(k + ns);
            issue(k + ns - 1, sl);
        }
        cp_async_wait_rt(ns - 1);
        __syncwarp();
        const char *buf = wreg + (k % ns) * (2 * D16_KEYS) * RB;
        if constexpr (TC) {
            const int kb = (s0 + warp + NW * k) * D16_KEYS;
            constexpr int KW = DT / 16; /* 32-bit words of a lane's share of a K row */
            uint32_t kw0[KW], kw8[KW];
#pragma unroll
            for (int x = 0; x < KW / 4; x++) {
                const uint4 v0 = *(const uint4 *)(buf + tg * RB + tcq * (DT / 4) + 16 * x);
                const uint4 v8 = *(const uint4 *)(buf + (tg + 8) * RB + tcq * (DT / 4) + 16 * x);
                kw0[4 * x] = v0.x, kw0[4 * x + 1] = v0.y, kw0[4 * x + 2] = v0.z, kw0[4 * x + 3] = v0.w;
                kw8[4 * x] = v8.x, kw8[4 * x + 1] = v8.y, kw8[4 * x + 2] = v8.z, kw8[4 * x + 3] = v8.w;
            }
            float sh[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sl[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int s = 0; s < KW; s++) {
                const uint32_t a[4] = {kv_f8x2_to_h2(kw0[s]), kv_f8x2_to_h2(kw8[s]), kv_f8x2_to_h2(kw0[s] >> 16),
                                       kv_f8x2_to_h2(kw8[s] >> 16)};
                mma_16816<__half>(sh, a, tqh[s][0], tqh[s][1]);
                mma_16816<__half>(sl, a, tql[s][0], tql[s][1]);
            }
            /* sh + sl: (key g, heads 2c, 2c+1), (key g + 8, heads 2c, 2c+1) */
            const bool v0 = kb + tg >= lo && kb + tg <= hi, v8 = kb + tg + 8 >= lo && kb + tg + 8 <= hi;
            const float x0 = v0 ? sh[0] + sl[0] : -INFINITY, x1 = v0 ? sh[1] + sl[1] : -INFINITY;
            const float x2 = v8 ? sh[2] + sl[2] : -INFINITY, x3 = v8 ? sh[3] + sl[3] : -INFINITY;
            float mx0 = fmaxf(x0, x2), mx1 = fmaxf(x1, x3);
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
            }
            const float mn0 = fmaxf(tm[0], mx0), mn1 = fmaxf(tm[1], mx1); /* finite: a key of the group is in */
            const float c0 = d16_exp2(tm[0] - mn0), c1 = d16_exp2(tm[1] - mn1);
            const float p0 = d16_exp2(x0 - mn0), p1 = d16_exp2(x1 - mn1), p2 = d16_exp2(x2 - mn0),
                        p3 = d16_exp2(x3 - mn1);
            tm[0] = mn0, tm[1] = mn1;
            tl[0] = tl[0] * c0 + (p0 + p2), tl[1] = tl[1] * c1 + (p1 + p3);
            uint32_t ph0, pl0, ph1, pl1;
            d16_split2(p0, p1, ph0, pl0); /* keys 0..7 (row g) */
            d16_split2(p2, p3, ph1, pl1); /* keys 8..15 */
            const uint32_t bh0 = d16_movt(ph0), bh1 = d16_movt(ph1), bl0 = d16_movt(pl0), bl1 = d16_movt(pl1);
            /* V: rows 2c, 2c+1, 2c+8, 2c+9; bytes of dims g*D/16.. and (g+8)*D/16.. */
            constexpr int VW = DT / 64; /* words per chunk */
            uint32_t vr[4][2][VW];
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const char *row = buf + (D16_KEYS + 2 * tcq + (r & 1) + (r >> 1) * 8) * RB;
#pragma unroll
                for (int h8 = 0; h8 < 2; h8++) {
                    const char *src = row + (tg + 8 * h8) * (DT / 16);
                    if constexpr (VW == 2) {
                        const uint2 w = *(const uint2 *)src;
                        vr[r][h8][0] = w.x, vr[r][h8][VW - 1] = w.y;
                    } else {
                        vr[r][h8][0] = *(const uint32_t *)src;
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < TS; i++) {
                tacc[i][0] *= c0, tacc[i][1] *= c1, tacc[i][2] *= c0, tacc[i][3] *= c1;
                const int wi = i >> 2, sel = (i & 2) ? 0x7362 : 0x5140, hs = (i & 1) * 16;
                uint32_t a[4];
#pragma unroll
                for (int q2 = 0; q2 < 4; q2++) { /* a0: (dim row g, keys 2c..), a1: row g+8, a2/a3: keys 2c+8.. */
                    const int h8 = q2 & 1, rk = (q2 >> 1) * 2;
                    a[q2] = kv_f8x2_to_h2(__byte_perm(vr[rk][h8][wi], vr[rk + 1][h8][wi], sel) >> hs);
                }
                mma_16816<__half>(tacc[i], a, bh0, bh1);
                mma_16816<__half>(tacc[i], a, bl0, bl1);
            }
            continue;
        }
        const int key = (s0 + warp + NW * k) * D16_KEYS + j;
        d16_group_ffma<KT, GM>(buf, RB, D, qs, ps, j, half, kq, cc, pv_active, key >= lo && key <= hi, m, l, acc);
    }
    cp_async_wait<0>();
    __syncwarp();

    /* merge the warps: each writes [KQ][GM][D] partial rows, its max and its sum */
    float *accs = (float *)wreg, *mls = accs + KQ * GM * D;
    if constexpr (TC) {
#pragma unroll
        for (int e = 0; e < 2; e++)
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) tl[e] += __shfl_xor_sync(0xffffffffu, tl[e], o);
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int h = 2 * tcq + e;
            if (h < GM) {
#pragma unroll
                for (int i = 0; i < TS; i++) {
                    accs[h * DT + tg * (DT / 16) + i] = tacc[i][e];
                    accs[h * DT + (tg + 8) * (DT / 16) + i] = tacc[i][2 + e];
                }
                if (tg == 0) mls[h] = tm[e], mls[GM + h] = tl[e];
            }
        }
    } else {
        d16_warp_store<GM>(accs, D, kq, cc, pv_active, lane, m, l, acc);
    }
    __syncthreads();
    for (int x = tid; x < ng * D; x += blockDim.x) {
        const int g = x / D, d = x - g * D;
        float M, L;
        const float a = d16_block_merge(wreg_all, wr, NW, KQ * GM * D, GM, KQ, D, g, d, M, L);
        if (nsp == 1) {
            a16_st(out, io, ((int64_t)t * H + h0 + g) * D + d, a / L);
        } else { /* every split writes its rows, an empty one (M = -inf, L = 0) zeros */
            const size_t r = ((size_t)i * H + h0 + g) * n_splits + split;
            part_acc[r * D + d] = a;
            if (d == 0) part_ml[2 * r] = M, part_ml[2 * r + 1] = L;
        }
    }
    if (nsp == 1) return;

    /* the last split of this (token, kv head, head group) to finish merges them all */
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        unsigned *cnt = counters + (size_t)i * n_hy + hy;
        const unsigned prev = atomicAdd(cnt, 1u);
        is_last = prev == (unsigned)nsp - 1;
        if (is_last) *cnt = 0; /* every split has counted: ready for the next launch */
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    /* only the splits with keys (s0 <= ge) hold anything: the others (min_g 0 at a short context,
     * e.g. 40 of 48 at batch 1, context 128) have weight 0 and are not read; flags & 16
     * (TUNA_ATTN_MERGE_ALL=1): read all nsp, as before */
    const int nm = (flags & 16) ? nsp : min(nsp, (ge - gb) / gps + 1);
    float *msm = (float *)d16_smem, *wsm = msm + GM * n_splits, *Lsm = wsm + GM * n_splits; /* [ng][n_splits] */
    const size_t rb = ((size_t)i * H + h0) * n_splits;
    for (int x = tid; x < ng * n_splits; x += blockDim.x) {
        if (x % n_splits >= nm) continue;
        msm[x] = __ldcg(part_ml + 2 * (rb + x));
        wsm[x] = __ldcg(part_ml + 2 * (rb + x) + 1);
    }
    __syncthreads();
    for (int g = warp; g < ng; g += NW) {
        float M = -INFINITY, L = 0.0f;
        for (int s = lane; s < nm; s += 32) M = fmaxf(M, msm[g * n_splits + s]);
        for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
        for (int s = lane; s < nm; s += 32) {
            const float ls = wsm[g * n_splits + s];
            const float w = ls > 0.0f ? d16_exp2(msm[g * n_splits + s] - M) : 0.0f; /* empty splits: 0 */
            wsm[g * n_splits + s] = w;
            L += w * ls;
        }
        for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
        if (lane == 0) Lsm[g] = L;
    }
    __syncthreads();
    for (int x = tid; x < ng * D; x += blockDim.x) {
        const int g = x / D, d = x - g * D;
        const float *pa = part_acc + (rb + (size_t)g * n_splits) * D + d, *wg = wsm + g * n_splits;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        int s = 0;
        for (; s + 8 <= nm; s += 8) { /* eight loads in flight */
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; u++) v[u] = __ldcg(pa + (size_t)(s + u) * D);
            a0 += wg[s] * v[0], a1 += wg[s + 1] * v[1], a2 += wg[s + 2] * v[2], a3 += wg[s + 3] * v[3];
            a0 += wg[s + 4] * v[4], a1 += wg[s + 5] * v[5], a2 += wg[s + 6] * v[6], a3 += wg[s + 7] * v[7];
        }
        for (; s + 4 <= nm; s += 4) {
            a0 += wg[s] * __ldcg(pa + (size_t)s * D);
            a1 += wg[s + 1] * __ldcg(pa + (size_t)(s + 1) * D);
            a2 += wg[s + 2] * __ldcg(pa + (size_t)(s + 2) * D);
            a3 += wg[s + 3] * __ldcg(pa + (size_t)(s + 3) * D);
        }
        for (; s < nm; s++) a0 += wg[s] * __ldcg(pa + (size_t)s * D);
        a16_st(out, io, ((int64_t)t * H + h0 + g) * D + d, ((a0 + a1) + (a2 + a3)) / Lsm[g]);
    }
}

/* ------------------------------------------------------------------------------------------
 * Host side. */

/* How k_attn_decode16 runs for one head size: warps per block, stages per warp, bytes of
 * shared memory per warp and per block, blocks resident per SM (0: it does not fit, the
 * general kernel runs). From D, GM and the device only, never from lengths (CUDA graphs).
 * TUNA_ATTN_DEC_WARPS (1..4) and TUNA_ATTN_DEC_STAGES (2..4) override the defaults (tuning). */
struct dec16_cfg {
    int nw, ns, wr, smem, bps, tc; /* tc: the tensor-core instantiation (FP8, D 64 or 128) */
};

template <typename KT>
using dec16_kernel = void (*)(float *, float *, float *, unsigned *, const float *, const KT *, const KT *, att_meta,
                              const int32_t *, int, int, int, int, int, int, int, float, int, int, int,
                              const struct tuna_l2pf);

template <typename KT, int GM> static dec16_kernel<KT> dec16_pick_d(int D, int tc)
{
    if constexpr (sizeof(KT) == 1) {
        if (tc) return D == 64 ? k_attn_decode16<KT, 64, GM, 1> : k_attn_decode16<KT, 128, GM, 1>;
    }
    return D == 64    ? k_attn_decode16<KT, 64, GM, 0>
           : D == 128 ? k_attn_decode16<KT, 128, GM, 0>
                      : k_attn_decode16<KT, 0, GM, 0>;
}
/* tc: the tensor-core variant (FP8 cache, D 64 or 128 only) */
template <typename KT> static dec16_kernel<KT> dec16_pick(int D, int GM, int tc)
{
    return GM == 1 ? dec16_pick_d<KT, 1>(D, tc) : GM == 2 ? dec16_pick_d<KT, 2>(D, tc) : GM == 4 ? dec16_pick_d<KT, 4>(D, tc)
                                                                                            : dec16_pick_d<KT, 8>(D, tc);
}

static int env_int(const char *name, int lo, int hi)
{
    const char *e = getenv(name);
    if (!e || !*e) return 0;
    int v = atoi(e);
    return v >= lo && v <= hi ? v : 0;
}

static int dec16_smem(int D, int GM, int nw, int ns, int es, int *wr_out)
{
    const int CH = D / 8, KQ = 32 / CH < D16_KEYS ? 32 / CH : D16_KEYS;
    int wr = ns * 2 * D16_KEYS * (es * D + 16);
    const int merge = (KQ * GM * D + 2 * GM) * 4;
    if (merge > wr) wr = merge;
    wr = (wr + 15) / 16 * 16;
    *wr_out = wr;
    const int total = GM * D * 4 + nw * D16_KEYS * ((GM + 3) & ~3) * 4 + nw * wr;
    const int split_merge = (2 * GM * DEC_MAX_SPLITS + GM) * 4; /* the last split's weights */
    return total > split_merge ? total : split_merge;
}

template <typename KT> static dec16_cfg dec16_config(tuna_backend *be, int D, int GM, int max_smem, int tc)
{
    struct entry {
        int dev, D, GM, tc;
        dec16_cfg c;
    };
    static entry cache[32];
    static int n_cache = 0;
    for (int k = 0; k < n_cache; k++)
        if (cache[k].dev == be->device && cache[k].D == D && cache[k].GM == GM && cache[k].tc == tc)
            return cache[k].c;
    dec16_cfg c = {4, 2, 0, 0, 0, tc}; /* H100: 2 stages, 3 blocks per SM beat 3 stages, 2 blocks (55% vs 51% at B=256) */
    if (D > 128) c.nw = 2;
    const int ew = env_int("TUNA_ATTN_DEC_WARPS", 1, 4), es = env_int("TUNA_ATTN_DEC_STAGES", 2, 4);
    if (ew) c.nw = ew;
    if (es) c.ns = es;
    dec16_kernel<KT> fn = dec16_pick<KT>(D, GM, tc);
    cudaFuncAttributes fa;
    memset(&fa, 0, sizeof fa);
    if (cudaFuncGetAttributes(&fa, (const void *)fn) != cudaSuccess) fa.sharedSizeBytes = 1024;
    const int lim = max_smem - (int)fa.sharedSizeBytes; /* dynamic shared memory the kernel may have */
    const int esz = (int)sizeof(KT);
    c.smem = dec16_smem(D, GM, c.nw, c.ns, esz, &c.wr);
    while (c.smem > lim && c.ns > 2) c.smem = dec16_smem(D, GM, c.nw, --c.ns, esz, &c.wr);
    while (c.smem > lim && c.nw > 1) c.smem = dec16_smem(D, GM, --c.nw, c.ns, esz, &c.wr);
    if (c.smem <= lim) {
        /* the device's bound, not c.smem: one instantiation (DT = 0) serves several head sizes */
        const bool ok = cudaFuncSetAttribute((const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, lim) ==
                        cudaSuccess;
        /* TUNA_ATTN_CARVEOUT=pct: another preferred carveout (measurements: the PDL chain's
         * kernels around this one keep an SM at whatever carveout it has) */
        const char *ce = getenv("TUNA_ATTN_CARVEOUT");
        cudaFuncSetAttribute((const void *)fn, cudaFuncAttributePreferredSharedMemoryCarveout,
                             ce && *ce ? atoi(ce) : (int)cudaSharedmemCarveoutMaxShared);
        if (!ok || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&c.bps, (const void *)fn, 32 * c.nw,
                                                                 (size_t)c.smem) != cudaSuccess)
            c.bps = 0;
        cudaGetLastError(); /* a refusal above only means: the general kernel runs */
    }
    if (n_cache < 32) cache[n_cache++] = entry{be->device, D, GM, tc, c};
    return c;
}

/* Bytes of the split buffer (partial rows and the counters): fixed per device, never moves. */
#define DEC_PART_ROWS(n_sm) ((size_t)128 * (size_t)(n_sm))
#define DEC_COUNTERS(n_sm) ((size_t)64 * (size_t)(n_sm))

template <typename KT>
static void launch_kernels(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                           const att_meta &md, const int32_t *drows, int64_t n_dec, const int32_t *dtiles,
                           int64_t n_tiles, int H, int Hkv, int D, int n_hg, int n_splits, int BQ, float scale,
                           float *part_acc, float *part_ml, unsigned *counters, const dec16_cfg *c16, int GM,
                           const struct tuna_l2pf &pf, int io, bool pdl_hint)
{
    const KT *kc = (const KT *)kcache, *vc = (const KT *)vcache;
    constexpr int VE = kv_traits<KT>::VEC;
    const bool vec = D % VE == 0 && ((uintptr_t)kcache % 16) == 0 && ((uintptr_t)vcache % 16) == 0;
    bool done = false;
    if constexpr (sizeof(KT) <= 2) {
        if (n_dec > 0 && c16) {
            /* heads along x unless TUNA_ATTN_DEC_ORDER=0 (or more tokens than grid y allows) */
            static const int order = env_int("TUNA_ATTN_DEC_ORDER", 0, 1) || !getenv("TUNA_ATTN_DEC_ORDER");
            const int hx = order && n_dec <= 65535;
            dim3 grid(hx ? (unsigned)(Hkv * n_hg) : (unsigned)n_dec, hx ? (unsigned)n_dec : (unsigned)(Hkv * n_hg),
                      (unsigned)n_splits);
            /* with programmatic dependent launch (pdl.cuh) after rope_kv_store's own kernel for one
             * token (be->attn_pdl_hint: the NF4 and q/k-norm decode paths; H100, NF4 batch 1:
             * 2.70-2.76 against 2.77-2.80 ms per step), not after a GEMV with RoPE folded in (bf16
             * batch 1: 5.90-5.97 against 5.88 in the ninth session); TUNA_ATTN_PDL=1 always, =0 never */
            static const char *pe = getenv("TUNA_ATTN_PDL");
            const bool pdl = pe && *pe ? pe[0] == '1' : pdl_hint && n_dec == 1 && n_tiles == 0;
            /* TUNA_ATTN_DEC_MING=n: at least n groups of 16 keys per split, the splits without
             * work leave at once (measured on the H100 at n = 8: 6.47 against 6.42 ms per bf16
             * step, so not the default); unset: every split runs, as before */
            static const int min_g = env_int("TUNA_ATTN_DEC_MING", 1, 4096);
            /* TUNA_ATTN_TRIGGER=1: the next kernel may start early (see the kernel; slower) */
            static const int trig = env_int("TUNA_ATTN_TRIGGER", 1, 1);
            /* TUNA_ATTN_MERGE_ALL=1: the split merge reads every split's row, empty ones included (before) */
            static const int mall = env_int("TUNA_ATTN_MERGE_ALL", 1, 1);
            if (pdl) {
                if (!tuna_cuda_launch(be, "k_attn_decode16", dec16_pick<KT>(D, GM, c16->tc), grid, dim3(32 * c16->nw),
                                      (size_t)c16->smem, out, part_acc, part_ml, counters, q, kc, vc, md, drows, H, Hkv,
                                      D, n_hg, n_splits, c16->ns, c16->wr, scale * 1.4426950408889634f, hx, min_g, trig | 2 | io << 2 | mall << 4,
                                      pf))
                    return;
            } else {
                dec16_pick<KT>(D, GM, c16->tc)<<<grid, 32 * c16->nw, (size_t)c16->smem, be->stream>>>(
                    out, part_acc, part_ml, counters, q, kc, vc, md, drows, H, Hkv, D, n_hg, n_splits, c16->ns, c16->wr,
                    scale * 1.4426950408889634f, hx, min_g, trig | io << 2 | mall << 4, pf);
                if (!tuna_cuda_check_launch(be, "k_attn_decode16")) return;
            }
            done = true;
        }
    } else {
        (void)counters, (void)c16, (void)GM;
    }
    if (n_dec > 0 && !done) {
        dim3 grid((unsigned)n_dec, (unsigned)(Hkv * n_hg), (unsigned)n_splits);
        if (vec)
            k_attn_decode<KT, true><<<grid, DEC_THREADS, 0, be->stream>>>(out, part_acc, part_ml, q, kc, vc, md, drows,
                                                                          H, Hkv, D, n_hg, n_splits, scale, io);
        else
            k_attn_decode<KT, false><<<grid, DEC_THREADS, 0, be->stream>>>(out, part_acc, part_ml, q, kc, vc, md,
                                                                           drows, H, Hkv, D, n_hg, n_splits, scale, io);
        if (!tuna_cuda_check_launch(be, "k_attn_decode")) return;
        if (n_splits > 1) {
            k_attn_combine<<<dim3((unsigned)n_dec, (unsigned)H), 128, 0, be->stream>>>(out, part_acc, part_ml, drows,
                                                                                       H, D, n_splits, io);
            if (!tuna_cuda_check_launch(be, "k_attn_combine")) return;
        }
    }
    if (n_tiles > 0)
        tuna_cuda_attn_prefill_launch(be,
                                      sizeof(KT) == 4                        ? 0
                                      : sizeof(KT) == 1                      ? KV_CODE_F8
                                      : std::is_same<KT, __half>::value ? 2
                                                                             : 1,
                                      out, q, kcache, vcache, md, dtiles, n_tiles, H, Hkv, D, BQ, vec, scale, io);
}

/* io: q and out float32 (0), bf16 (1) or f16 (2); float * either way (16-bit data read through a16_ld). */
static void attention_io(tuna_backend *be, float *out, const float *q, int io, const void *kcache, const void *vcache,
                         enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H, int64_t Hkv, int64_t D,
                         float scale)
{
    if (be->sticky || b->T <= 0) return;
    const int code = kv_code8(kv_dtype);
    if (code < 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "attention (KV cache dtype is not float32, bf16, f16 or fp8_e4m3)");
        return;
    }
    if (D <= 0 || D > ATT_MAX_D || Hkv <= 0 || H % Hkv != 0 || b->block_size <= 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "attention (head_dim over 256, H not a multiple of Hkv, or block size 0)");
        return;
    }
    const int64_t T = b->T, bs = b->block_size, MB = b->max_blocks_per_seq;
    int64_t maxpos = 0;
    for (int64_t t = 0; t < T; t++) maxpos = b->pos[t] > maxpos ? b->pos[t] : maxpos;
    if (MB > 0 && maxpos / bs + 1 > MB) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "attention (a position beyond max_blocks_per_seq blocks)");
        return;
    }
    if (b->tables_flat && MB <= 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "attention (tables_flat without max_blocks_per_seq)");
        return;
    }
    const int dev_major = be->cc_major, n_sm = be->sm_count > 0 ? be->sm_count : 1, max_smem = be->max_smem_optin;

    /* Split the batch: runs of >= PF_MIN_RUN consecutive positions of one sequence go to the
     * prefill kernel in tiles of BQ rows, every other token to the decode kernels. A step of
     * decode tokens only (one per sequence) never has such a run: rows stays NULL then. */
    const int esz = code == 0 ? 4 : code == KV_CODE_F8 ? 1 : 2; /* FP8: prefill only on the mma kernel */
    int BQ = tuna_cuda_attn_prefill_bq((int)D, esz, max_smem, dev_major);
    if (code == 1 && dev_major < 8) BQ = 0; /* bf16 WMMA needs 8.0 (never chosen there anyway) */
    int32_t *rows = NULL, *tiles = NULL;
    int64_t n_dec = 0, n_tiles = 0;
    if (BQ > 0 && T >= PF_MIN_RUN) {
        rows = (int32_t *)malloc((size_t)T * sizeof(int32_t));
        tiles = (int32_t *)malloc(((size_t)T / PF_MIN_RUN + (size_t)T / BQ + 2) * 2 * sizeof(int32_t));
        if (!rows || !tiles) {
            free(rows), free(tiles);
            tuna_cuda_check(be, cudaErrorMemoryAllocation, "attention token groups (host)");
            return;
        }
        for (int64_t t = 0; t < T;) {
            int64_t e = t + 1;
            while (e < T && b->block_tables[e] == b->block_tables[t] && b->pos[e] == b->pos[e - 1] + 1) e++;
            if (e - t >= PF_MIN_RUN) {
                for (int64_t r = t; r < e; r += BQ) {
                    tiles[2 * n_tiles] = (int32_t)r;
                    tiles[2 * n_tiles + 1] = (int32_t)(e - r < BQ ? e - r : BQ);
                    n_tiles++;
                }
            } else {
                for (int64_t r = t; r < e; r++) rows[n_dec++] = (int32_t)r;
            }
            t = e;
        }
        if (n_tiles == 0) { /* all decode: the identity, nothing to upload */
            free(rows), free(tiles);
            rows = tiles = NULL;
        }
    }
    if (!tiles) n_dec = T;

    /* block tables: the caller's [T, MB] copy, or flattened here (a run of tokens sharing a table
     * shares one copy of it, as long as its longest member needs) */
    int32_t *flat = NULL, *off = NULL;
    size_t flat_n = 0;
    if (!b->tables_flat) {
        off = (int32_t *)malloc((size_t)T * sizeof(int32_t));
        size_t cap = 0;
        for (int64_t t = 0; t < T; t++) cap += (size_t)(b->pos[t] / bs + 1);
        flat = (int32_t *)malloc((cap ? cap : 1) * sizeof(int32_t));
        if (!off || !flat) {
            free(off), free(flat), free(rows), free(tiles);
            tuna_cuda_check(be, cudaErrorMemoryAllocation, "attention block tables (host)");
            return;
        }
        for (int64_t t = 0; t < T;) {
            int64_t e = t, nb = 0;
            for (; e < T && b->block_tables[e] == b->block_tables[t]; e++)
                nb = b->pos[e] / bs + 1 > nb ? b->pos[e] / bs + 1 : nb;
            memcpy(flat + flat_n, b->block_tables[t], (size_t)nb * sizeof(int32_t));
            for (int64_t r = t; r < e; r++) off[r] = (int32_t)flat_n;
            flat_n += (size_t)nb;
            t = e;
        }
    }
    const size_t tab_bytes = b->tables_flat ? (size_t)T * (size_t)MB * 4 : (flat_n ? flat_n : 1) * 4;
    size_t upper = (size_t)T * 8 + tab_bytes + (off ? (size_t)T * 4 : 0) + (rows ? (size_t)n_dec * 4 + 4 : 0) +
                   (tiles ? (size_t)n_tiles * 8 : 0);
    struct cuda_meta mt = {0};
    bool ok = tuna_cuda_meta_begin(be, &mt, upper);
    size_t o_pos = 0, o_tab = 0, o_off = 0, o_rows = 0, o_tiles = 0;
    if (ok) {
        o_pos = (size_t)tuna_cuda_meta_stage(be, &mt, b->pos, (size_t)T * sizeof(int64_t));
        o_tab = (size_t)tuna_cuda_meta_stage(be, &mt, b->tables_flat ? (const void *)b->tables_flat : (const void *)flat,
                                             tab_bytes);
        if (off) o_off = (size_t)tuna_cuda_meta_stage(be, &mt, off, (size_t)T * sizeof(int32_t));
        if (rows && n_dec > 0) o_rows = (size_t)tuna_cuda_meta_stage(be, &mt, rows, (size_t)n_dec * sizeof(int32_t));
        if (tiles) o_tiles = (size_t)tuna_cuda_meta_stage(be, &mt, tiles, (size_t)n_tiles * 2 * sizeof(int32_t));
    }
    const bool have_rows = rows != NULL && n_dec > 0, have_tiles = tiles != NULL;
    free(flat), free(off), free(rows), free(tiles);
    if (!ok || be->sticky || !tuna_cuda_meta_flush(be, &mt)) return;
    char *base = (char *)be->meta.p;
    att_meta md;
    md.pos = (const int64_t *)(base + o_pos);
    md.tables = (const int32_t *)(base + o_tab);
    md.table_off = b->tables_flat ? NULL : (const int32_t *)(base + o_off);
    md.table_stride = b->tables_flat ? (int32_t)MB : 0;
    md.bs = (int32_t)bs;
    md.window = b->sliding_window;
    const int32_t *drows = have_rows ? (const int32_t *)(base + o_rows) : NULL;
    const int32_t *dtiles = have_tiles ? (const int32_t *)(base + o_tiles) : NULL;

    /* splits: from T (decode tokens), the head shape, the SM count and the context bound only */
    const int G = (int)(H / Hkv);
    /* the 16-bit kernel: bf16/f16 cache, D a multiple of 8 (FP8 cache: of 16), 16-byte aligned caches
     * (TUNA_ATTN_DEC_OLD=1 runs the general kernel instead, for comparisons) */
    static const int dec_old = env_int("TUNA_ATTN_DEC_OLD", 1, 1);
    /* TUNA_ATTN_PDL=1: with programmatic dependent launch always, =0 never; unset: after
     * rope_kv_store's own kernel for one token (be->attn_pdl_hint; see launch_kernels) */
    static const char *pdl_env = getenv("TUNA_ATTN_PDL");
    /* one token, 16-bit cache: the cluster kernel of attention_b1.cu where it runs */
    if (T == 1 && n_tiles == 0 && (code == 1 || code == 2) && (uintptr_t)kcache % 16 == 0 &&
        (uintptr_t)vcache % 16 == 0 && !dec_old && tuna_cuda_attn_b1_usable(be, code, (int)D, G)) {
        const struct tuna_l2pf pf = tuna_cuda_l2pf_take(be, TUNA_L2PF_ATTN, T);
        const bool pdl = pdl_env && *pdl_env ? pdl_env[0] == '1' : be->attn_pdl_hint;
        be->attn_pdl_hint = false;
        tuna_cuda_attn_b1_launch(be, code, out, q, kcache, vcache, md, (int)H, (int)Hkv, (int)D, scale, io, pdl, pf);
        return;
    }
    const int GM16 = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
    dec16_cfg c16 = {0, 0, 0, 0, 0, 0};
    /* FP8 with D = 64 or 128 on sm_80+: the tensor-core variant unless TUNA_ATTN_F8MMA=0 (H100,
     * batch 256 at context 1,000: 15.83 against 18.13 ms per step, the kernel 208 against 263 us) */
    static const int f8mma = !(getenv("TUNA_ATTN_F8MMA") && !strcmp(getenv("TUNA_ATTN_F8MMA"), "0"));
    const int tc = code == KV_CODE_F8 && (D == 64 || D == 128) && dev_major >= 8 ? f8mma : 0;
    if (n_dec > 0 && code != 0 && D % (code == KV_CODE_F8 ? 16 : 8) == 0 && (uintptr_t)kcache % 16 == 0 &&
        (uintptr_t)vcache % 16 == 0 && !dec_old)
        c16 = code == 1 ? dec16_config<__nv_bfloat16>(be, (int)D, GM16, max_smem, 0)
              : code == 2 ? dec16_config<__half>(be, (int)D, GM16, max_smem, 0)
                          : dec16_config<__nv_fp8_e4m3>(be, (int)D, GM16, max_smem, tc);
    const bool use16 = c16.bps > 0;
    const int GM = use16 ? GM16 : DEC_GM, n_hg = (G + GM - 1) / GM;
    int n_splits = 1;
    float *part_acc = NULL, *part_ml = NULL;
    unsigned *counters = NULL;
    if (n_dec > 0) {
        int64_t max_ctx = MB > 0 ? MB * bs : maxpos + 1;
        if (b->sliding_window > 0 && b->sliding_window < max_ctx) max_ctx = b->sliding_window;
        int64_t cap = (max_ctx + DEC_MIN_CHUNK - 1) / DEC_MIN_CHUNK;
        cap = cap < 1 ? 1 : cap > DEC_MAX_SPLITS ? DEC_MAX_SPLITS : cap;
        const int64_t units = n_dec * Hkv * n_hg;
        if (use16) {
            /* below 4 waves of resident blocks: the fewest splits that fill the waves they make
             * to within 5% of the best (the blocks of a batch run about as long: a last wave
             * of a few blocks costs a whole one — 400 blocks on 396 slots ran B=1 at 18%) */
            const int64_t wave = (int64_t)n_sm * (c16.bps < D16_MAX_BPS ? c16.bps : D16_MAX_BPS);
            if (units < 4 * wave) {
                double best = 0.0;
                for (int pass = 0; pass < 2; pass++)
                    for (int s = 1; s <= DEC_MAX_SPLITS && units * s <= 4 * wave; s++) {
                        const double w = (double)(units * s) / (double)wave, eff = w / ceil(w);
                        if (pass == 0 && eff > best) best = eff;
                        if (pass == 1 && eff >= best - 0.05) {
                            n_splits = s;
                            break;
                        }
                    }
            }
            const int es = env_int("TUNA_ATTN_DEC_SPLITS", 1, DEC_MAX_SPLITS);
            if (es && units * es <= 4 * wave) n_splits = es;
        } else {
            const int64_t target = (int64_t)n_sm * DEC_BLOCKS_PER_SM;
            if (units < target) n_splits = (int)((target + units - 1) / units);
        }
        if (n_splits > cap) n_splits = (int)cap;
        if (n_splits > 1) {
            /* rows of partials: fewer than n_dec * H * n_splits <= blocks * GM <= 4 * n_sm *
             * D16_MAX_BPS * 8 (or 2 * n_sm * DEC_BLOCKS_PER_SM * DEC_GM for the general kernel) =
             * 128 * n_sm; counters: units <= 4 waves <= 16 * n_sm. One buffer, sized once. */
            const size_t max_rows = DEC_PART_ROWS(n_sm);
            const size_t bytes = max_rows * (ATT_MAX_D + 2) * sizeof(float) + DEC_COUNTERS(n_sm) * sizeof(unsigned);
            void *before = be->attn.p;
            if (!tuna_cuda_grow(be, &be->attn, bytes, "cudaMalloc(attention splits)")) return;
            part_acc = (float *)be->attn.p;
            part_ml = part_acc + max_rows * ATT_MAX_D;
            counters = (unsigned *)(part_ml + 2 * max_rows);
            if (be->attn.p != before && /* a new buffer (never while capturing): counters start at 0 */
                !tuna_cuda_check(be, cudaMemsetAsync(counters, 0, DEC_COUNTERS(n_sm) * sizeof(unsigned), be->stream),
                                 "cudaMemsetAsync(attention split counters)"))
                return;
        }
    }
    const dec16_cfg *pc16 = use16 ? &c16 : NULL;
    const struct tuna_l2pf pf = tuna_cuda_l2pf_take(be, TUNA_L2PF_ATTN, T); /* the hint ends here either way */
    const bool hint = be->attn_pdl_hint;
    be->attn_pdl_hint = false;
    if (code == 0)
        launch_kernels<float>(be, out, q, kcache, vcache, md, drows, n_dec, dtiles, n_tiles, (int)H, (int)Hkv, (int)D,
                              n_hg, n_splits, BQ, scale, part_acc, part_ml, counters, pc16, GM, pf, io, hint);
    else if (code == 1)
        launch_kernels<__nv_bfloat16>(be, out, q, kcache, vcache, md, drows, n_dec, dtiles, n_tiles, (int)H, (int)Hkv,
                                      (int)D, n_hg, n_splits, BQ, scale, part_acc, part_ml, counters, pc16, GM, pf, io,
                               hint);
    else if (code == 2)
        launch_kernels<__half>(be, out, q, kcache, vcache, md, drows, n_dec, dtiles, n_tiles, (int)H, (int)Hkv,
                               (int)D, n_hg, n_splits, BQ, scale, part_acc, part_ml, counters, pc16, GM, pf, io,
                               hint);
    else
        launch_kernels<__nv_fp8_e4m3>(be, out, q, kcache, vcache, md, drows, n_dec, dtiles, n_tiles, (int)H, (int)Hkv,
                                      (int)D, n_hg, n_splits, BQ, scale, part_acc, part_ml, counters, pc16, GM, pf, io,
                               hint);
}

void tuna_cuda_attention(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                         enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H, int64_t Hkv, int64_t D,
                         float scale)
{
    attention_io(be, out, q, 0, kcache, vcache, kv_dtype, b, H, Hkv, D, scale);
}

void tuna_cuda_attention16(tuna_backend *be, void *out, const void *q, enum tuna_dtype adt, const void *kcache,
                           const void *vcache, enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H,
                           int64_t Hkv, int64_t D, float scale)
{
    if (be->sticky || b->T <= 0) return;
    if (adt != TUNA_DTYPE_BF16 && adt != TUNA_DTYPE_F16) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "attention16 (activations neither bf16 nor f16)");
        return;
    }
    attention_io(be, (float *)out, (const float *)q, adt == TUNA_DTYPE_BF16 ? 1 : 2, kcache, vcache, kv_dtype, b, H, Hkv,
                 D, scale);
}

bool tuna_cuda_b1_layer_fits(const struct tuna_decode_layer *a)
{
    const int code = kv_code(a->kv_dtype);
    const int64_t H = a->H, Hkv = a->Hkv, D = a->D;
    return (code == 1 || code == 2) && (D == 64 || D == 128) && a->rot_dim == D && Hkv > 0 && H % Hkv == 0 &&
           a->inv_freq && a->ab && a->ab->T == 1 && a->ab->block_size > 0 && (uintptr_t)a->kcache % 16 == 0 &&
           (uintptr_t)a->vcache % 16 == 0;
}

bool tuna_cuda_decode_meta(tuna_backend *be, const struct tuna_decode_layer *a, const char *what, att_meta *md,
                           const int64_t **slot, const float **inv_freq)
{
    const struct tuna_attn_batch *b = a->ab;
    const int64_t bs = b->block_size, MB = b->max_blocks_per_seq, p = b->pos[0], D = a->D;
    if (MB > 0 && p / bs + 1 > MB) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s (a position beyond max_blocks_per_seq blocks)", what);
        tuna_cuda_check(be, cudaErrorInvalidValue, msg);
        return false;
    }
    const size_t tab_n = b->tables_flat && MB > 0 ? (size_t)MB : (size_t)(p / bs + 1);
    const int32_t *tab = b->tables_flat && MB > 0 ? b->tables_flat : b->block_tables[0];
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, 16 + (size_t)(D / 2) * 4 + tab_n * 4 + 8)) return false;
    const size_t o_pos = (size_t)tuna_cuda_meta_stage(be, &m, a->pos, sizeof(int64_t));
    const size_t o_slot = (size_t)tuna_cuda_meta_stage(be, &m, a->slot, sizeof(int64_t));
    const size_t o_f = (size_t)tuna_cuda_meta_stage(be, &m, a->inv_freq, (size_t)(D / 2) * sizeof(float));
    const size_t o_tab = (size_t)tuna_cuda_meta_stage(be, &m, tab, tab_n * sizeof(int32_t));
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return false;
    char *base = (char *)be->meta.p;
    md->pos = (const int64_t *)(base + o_pos);
    md->tables = (const int32_t *)(base + o_tab);
    md->table_off = NULL;
    md->table_stride = 0;
    md->bs = (int32_t)bs;
    md->window = b->sliding_window;
    *slot = (const int64_t *)(base + o_slot);
    *inv_freq = (const float *)(base + o_f);
    return true;
}
