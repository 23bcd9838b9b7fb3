/* lora.cu — unmerged LoRA on the GPU for a batch that mixes adapters, as segmented GEMMs (the
 * SGMV idea of Punica / S-LoRA): the tokens come grouped by adapter (order/start, built on the
 * host per step and uploaded with the step block), and each adapter's A and B are read once per
 * tile of its tokens instead of once per token. One call serves up to three linears that share
 * their input (q/k/v, gate/up): x is read once for all of them.
 *
 * 16-bit adapters (bf16/f16, the GPU views of a 16-bit model) on sm_80+: tensor cores
 * (mma.sync m16n8k16, float32 accumulators).
 *   shrink: u[t, off_i + j] = x[t] . A_i[j]   a block per (tile of 16 tokens of one adapter, K
 *           split); its 4 warps take every 4th k-step of 16, each for all the ranks of all the
 *           linears (x read once, rounded to the adapters' dtype as it is loaded), summed across
 *           the warps in order. With several K splits, each writes float32 partials and the last
 *           block of a tile to finish (a counter per tile, reset by that block) sums them in
 *           split order: the same bits whichever block is last. u is stored in the 16-bit type.
 *   expand: y_i[t, n] += scale * u[t, off_i:] . B_i[n]   a block per (128 outputs, tile of 32
 *           tokens of one adapter): u in shared memory, B's rows straight from global memory as
 *           the mma's column operand, the result added into y in the epilogue. The GLU form
 *           (gate/up) adds both LoRA terms and applies act(gate) * up in the same epilogue, and
 *           the residual form (o/down) adds y + LoRA into the residual stream, both over every
 *           token (the tile list then ends with the tokens without an adapter).
 *   Blocks walk a flat tile list (each adapter's tiles, then the rest), sized from T and the
 *   number of adapters only: ceil(T / tile) + n tiles at most, the ones past the list exit.
 * Float32 adapters (float32 mode), a GPU below sm_80, or TUNA_LORA_TC=0: the float32 kernels below, one linear
 * at a time (shrink per (token tile, adapter, K split) on CUDA cores with register tiling,
 * expand per (N tile, token tile, adapter)).
 *
 * Every sum has a fixed order and no float atomics, so a step replayed from a CUDA graph gives
 * the eager step's bits. The launch configuration depends only on T, the Ns, K, the sets' n and
 * max_r (never on which token uses which adapter). Adapter descriptors (set->w) are read from
 * device memory in place. */
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/act16.h"
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/mma.cuh"

#define LORA_MAX_R 256 /* --max-lora-rank's limit */
#define LORA_MAX_N 64  /* adapters per linear (--max-loras' limit) */
#define SH_TM 16       /* tokens per shrink block */
#define SH_SMAX 8      /* K splits at most */
#define SH_THREADS 256
#define EX_TM 32       /* tokens per expand block */
#define EX_NT 128      /* output features per expand block, one per thread */

/* element i of a float32 (DT 0), bf16 (1) or f16 (2) array */
template <int DT> __device__ __forceinline__ float lora_ld(const void *p, int64_t i)
{
    if (DT == 0) return ((const float *)p)[i];
    const unsigned short h = ((const unsigned short *)p)[i];
    if (DT == 1) return __uint_as_float((uint32_t)h << 16);
    return __half2float(__ushort_as_half(h));
}

/* 4 consecutive elements from a 16-byte (float32) or 8-byte (16-bit) aligned address */
template <int DT> __device__ __forceinline__ void lora_ld4(const void *p, int64_t i, float *f)
{
    if (DT == 0) {
        float4 v = *reinterpret_cast<const float4 *>((const float *)p + i);
        f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
        return;
    }
    uint2 v = *reinterpret_cast<const uint2 *>((const unsigned short *)p + i);
    const uint32_t w[2] = {v.x, v.y};
#pragma unroll
    for (int c = 0; c < 2; c++) {
        if (DT == 1) {
            f[2 * c] = __uint_as_float(w[c] << 16);
            f[2 * c + 1] = __uint_as_float(w[c] & 0xffff0000u);
        } else {
            float2 h = __half22float2(*reinterpret_cast<const __half2 *>(&w[c]));
            f[2 * c] = h.x, f[2 * c + 1] = h.y;
        }
    }
}

/* Shrink tiles in shared memory (floats): xs [SH_TM][SH_XS] (row-major, padded: the 4 token rows
 * a thread reads sit in different banks), then A^T as [KS][r4 + 4] (KS a power of two, KS * (r4 + 4)
 * <= SH_AS),
 * later reused for the per-slice sums red [NS][SH_TM][r4] (NS * r4 <= 256: 4096 floats). */
#define SH_KSMAX 128
#define SH_XS (SH_KSMAX + 1)
#define SH_AS 4096
#define SH_PX (SH_TM * SH_KSMAX / SH_THREADS) /* x elements a thread loads per sub-chunk */
#define SH_PA (SH_AS / SH_THREADS)            /* A elements a thread loads per sub-chunk, at most */

/* One sub-chunk [k0, k0 + kn) of the block's x rows and A rows into registers (all loads in
 * flight together; the next sub-chunk's are issued before this one is multiplied). */
template <int DT>
__device__ __forceinline__ void sh_load(float *px, float *pa, const float *x, const void *A, const int32_t *tok, int nt,
                                        int r, int r4, int64_t K, int64_t k0, int kn, int ks)
{
    const int KS = 1 << ks;
#pragma unroll
    for (int q = 0; q < SH_PX; q++) {
        const int i = (int)threadIdx.x + q * SH_THREADS, ti = i >> ks, kk = i & (KS - 1);
        px[q] = ti < nt && kk < kn ? x[(int64_t)tok[ti] * K + k0 + kk] : 0.0f;
    }
#pragma unroll
    for (int q = 0; q < SH_PA; q++) {
        const int i = (int)threadIdx.x + q * SH_THREADS, j = i >> ks, kk = i & (KS - 1);
        pa[q] = j < r && j < r4 && kk < kn ? lora_ld<DT>(A, (int64_t)j * K + k0 + kk) : 0.0f;
    }
}

/* part [S, T, R]: each split's partial u of the tokens of one (tile, adapter), as a register-tiled
 * GEMM: a thread owns 4 tokens x 4 ranks over every NS-th k of the block's K range; the NS slices
 * are summed in order at the end. */
template <int DT>
__global__ void __launch_bounds__(SH_THREADS)
    k_lora_shrink(float *part, const float *x, int64_t T, int64_t K, int64_t KC, int R, const struct tuna_lora_w *w,
                  const int32_t *order, const int32_t *start)
{
    __shared__ __align__(16) float sm[SH_TM * SH_XS + SH_AS];
    __shared__ int32_t tok[SH_TM];
    const int a = blockIdx.y;
    const int g0 = start[a], g1 = start[a + 1], i0 = g0 + (int)blockIdx.x * SH_TM;
    if (i0 >= g1) return;
    const int r = min((int)w[a].r, R);
    if (r <= 0) return;
    const int nt = min(SH_TM, g1 - i0), r4 = (r + 3) & ~3, RS = r4 + 4;
    int ks = 7; /* log2 of the sub-chunk KS: 128 at most, KS * RS <= SH_AS */
    while (ks > 0 && (RS << ks) > SH_AS) ks--;
    const int KS = 1 << ks;
    const int NS = SH_THREADS / r4; /* k slices: r4 threads each (4 token quads x r4/4 rank quads) */
    const int tid = threadIdx.x, sl = tid / r4, rq = (tid % r4) >> 2, tq = tid & 3;
    const bool active = sl < NS;
    const void *A = w[a].A;
    float *xs = sm, *as = sm + SH_TM * SH_XS;
    if (tid < SH_TM) tok[tid] = tid < nt ? order[i0 + tid] : 0;
    const int64_t k_begin = (int64_t)blockIdx.z * KC, k_end = min(K, k_begin + KC);
    float acc[4][4];
#pragma unroll
    for (int u = 0; u < 4; u++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[u][c] = 0.0f;
    __syncthreads(); /* tok */
    float px[SH_PX], pa[SH_PA];
    if (k_begin < k_end) sh_load<DT>(px, pa, x, A, tok, nt, r, r4, K, k_begin, (int)min((int64_t)KS, k_end - k_begin), ks);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += KS) {
        const int kn = (int)min((int64_t)KS, k_end - k0);
        __syncthreads(); /* the previous sub-chunk consumed */
#pragma unroll
        for (int q = 0; q < SH_PX; q++) {
            const int i = tid + q * SH_THREADS, ti = i >> ks, kk = i & (KS - 1);
            if (ti < SH_TM) xs[ti * SH_XS + kk] = px[q];
        }
#pragma unroll
        for (int q = 0; q < SH_PA; q++) {
            const int i = tid + q * SH_THREADS, j = i >> ks, kk = i & (KS - 1);
            if (j < r4) as[kk * RS + j] = pa[q];
        }
        __syncthreads();
        if (k0 + KS < k_end)
            sh_load<DT>(px, pa, x, A, tok, nt, r, r4, K, k0 + KS, (int)min((int64_t)KS, k_end - k0 - KS), ks);
        if (active) {
            for (int kk = sl; kk < kn; kk += NS) {
                float xv[4];
#pragma unroll
                for (int u = 0; u < 4; u++) xv[u] = xs[(4 * tq + u) * SH_XS + kk];
                const float4 av = *reinterpret_cast<const float4 *>(&as[kk * RS + 4 * rq]);
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    acc[u][0] += xv[u] * av.x;
                    acc[u][1] += xv[u] * av.y;
                    acc[u][2] += xv[u] * av.z;
                    acc[u][3] += xv[u] * av.w;
                }
            }
        }
    }
    __syncthreads();
    float *red = sm; /* [NS][SH_TM][r4], over the tiles */
    if (active)
#pragma unroll
        for (int u = 0; u < 4; u++)
#pragma unroll
            for (int c = 0; c < 4; c++) red[(sl * SH_TM + 4 * tq + u) * r4 + 4 * rq + c] = acc[u][c];
    __syncthreads();
    float *p = part + (int64_t)blockIdx.z * T * R;
    for (int i = tid; i < nt * r; i += SH_THREADS) {
        const int ti = i / r, j = i % r;
        float v = 0.0f;
        for (int q = 0; q < NS; q++) v += red[(q * SH_TM + ti) * r4 + j];
        p[(int64_t)tok[ti] * R + j] = v;
    }
}

/* Ranks an expand thread loads before multiplying: B's row in registers, 8 per 16-byte load. */
#define EX_JB 32

/* y[t, n] += scale * u[t] . B[n] for the tokens of one (N tile, token tile, adapter). */
template <int DT>
__global__ void __launch_bounds__(EX_NT)
    k_lora_expand(float *y, const float *part, int64_t T, int64_t N, int S, int R, const struct tuna_lora_w *w,
                  const int32_t *order, const int32_t *start)
{
    __shared__ __align__(16) float us[EX_TM][LORA_MAX_R];
    __shared__ int32_t tok[EX_TM];
    const int a = blockIdx.z;
    const int g0 = start[a], g1 = start[a + 1], i0 = g0 + (int)blockIdx.y * EX_TM;
    if (i0 >= g1) return;
    const int r = min((int)w[a].r, R);
    if (r <= 0) return;
    const int nt = min(EX_TM, g1 - i0), r8 = (r + 7) & ~7;
    if (threadIdx.x < EX_TM) tok[threadIdx.x] = (int)threadIdx.x < nt ? order[i0 + threadIdx.x] : 0;
    __syncthreads();
    /* u = the splits summed in order; ranks r..r8 zero (the loop below reads 8 at a time) */
    for (int i = threadIdx.x; i < nt * r8; i += EX_NT) {
        const int ti = i / r8, j = i % r8;
        float v[SH_SMAX];
#pragma unroll
        for (int q = 0; q < SH_SMAX; q++) v[q] = q < S && j < r ? part[((int64_t)q * T + tok[ti]) * R + j] : 0.0f;
        float s = 0.0f;
#pragma unroll
        for (int q = 0; q < SH_SMAX; q++) s += v[q];
        us[ti][j] = s;
    }
    __syncthreads();
    const int64_t n = (int64_t)blockIdx.x * EX_NT + threadIdx.x;
    if (n >= N) return;
    const void *B = w[a].B;
    const int64_t ldb = w[a].ldb ? w[a].ldb : r; /* B's row stride */
    const bool vec = (r & 7) == 0 && (ldb & 7) == 0 && ((uintptr_t)B & 15) == 0;
    float acc[EX_TM];
#pragma unroll
    for (int ti = 0; ti < EX_TM; ti++) acc[ti] = 0.0f;
    for (int jb = 0; jb < r; jb += EX_JB) {
        float b[EX_JB];
#pragma unroll
        for (int c8 = 0; c8 < EX_JB; c8 += 8) {
            const int j0 = jb + c8;
            if (vec && j0 < r) {
                lora_ld4<DT>(B, n * ldb + j0, b + c8);
                lora_ld4<DT>(B, n * ldb + j0 + 4, b + c8 + 4);
            } else {
#pragma unroll
                for (int c = 0; c < 8; c++) b[c8 + c] = j0 + c < r ? lora_ld<DT>(B, n * ldb + j0 + c) : 0.0f;
            }
        }
#pragma unroll
        for (int c8 = 0; c8 < EX_JB; c8 += 8) {
            const int j0 = jb + c8;
            if (j0 >= r8) break;
#pragma unroll
            for (int ti = 0; ti < EX_TM; ti++) {
                if (ti < nt) {
                    const float4 u0 = *reinterpret_cast<const float4 *>(&us[ti][j0]);
                    const float4 u1 = *reinterpret_cast<const float4 *>(&us[ti][j0 + 4]);
                    acc[ti] += b[c8] * u0.x + b[c8 + 1] * u0.y + b[c8 + 2] * u0.z + b[c8 + 3] * u0.w +
                               b[c8 + 4] * u1.x + b[c8 + 5] * u1.y + b[c8 + 6] * u1.z + b[c8 + 7] * u1.w;
                }
            }
        }
    }
    const float scale = w[a].scale;
#pragma unroll
    for (int ti = 0; ti < EX_TM; ti++)
        if (ti < nt) y[(int64_t)tok[ti] * N + n] += scale * acc[ti];
}


/* ================= 16-bit adapters: tensor cores ================= */

#define TC_MAXB 3        /* linears sharing x */
#define TC_WARPS 4
#define TC_SH_TM 16      /* tokens per shrink tile: one mma row block */
#define TC_SH_CH 8       /* n-tiles (8 ranks each) a warp accumulates at once */
#define TC_SMAX 32       /* K splits at most */
#define TC_EX_TM 32      /* tokens per expand tile: two mma row blocks */
#define TC_EX_NB 128     /* outputs per expand block: 4 warps x 4 n-tiles of 8 */
#define TC_US (2 * LORA_MAX_R + 8) /* u columns an expand block holds (GLU: two linears), padded */
#define TC_COUNT_MAX 4096 /* per-tile split counters at the start of be->lora */

struct tc_banks {
    const struct tuna_lora_w *w[TC_MAXB]; /* descriptor tables (device), NULL = no adapters */
    int n[TC_MAXB];                       /* adapters of each (0 without) */
    int R[TC_MAXB];                       /* max_r of each */
    int off[TC_MAXB];                     /* linear i's ranks start at column off[i] of a u row */
    float *y[TC_MAXB];
    int64_t N[TC_MAXB];
    int nt0[TC_MAXB + 1];                 /* expand: the first N block of each output */
    int nb, RU, ng;                       /* linears; u row length; adapter groups (largest n) */
};

/* Tile `tile` of the flat list: group a's tokens order[start[a] .. start[a+1]) in tiles of TM for
 * a < ng, then (rest) the tokens order[start[ng] .. T) as a = -1. False past the list. */
template <int TM>
__device__ __forceinline__ bool tc_tile(int tile, const int32_t *start, int ng, int T, bool rest, int *a, int *i0,
                                        int *nt)
{
    for (int g = 0; g < ng; g++) {
        const int s0 = start[g], s1 = start[g + 1], c = (s1 - s0 + TM - 1) / TM;
        if (tile < c) {
            *a = g, *i0 = s0 + tile * TM, *nt = min(TM, s1 - *i0);
            return true;
        }
        tile -= c;
    }
    if (rest) {
        const int s0 = start[ng], c = (T - s0 + TM - 1) / TM;
        if (tile < c) {
            *a = -1, *i0 = s0 + tile * TM, *nt = min(TM, T - *i0);
            return true;
        }
    }
    return false;
}

/* The rank adapter a has on linear i (0: none) */
__device__ __forceinline__ int tc_rank(const tc_banks &b, int i, int a)
{
    if (a < 0 || i >= b.nb || a >= b.n[i] || !b.w[i]) return 0;
    return min((int)b.w[i][a].r, b.R[i]);
}

/* Two consecutive 16-bit elements p[i], p[i+1] as one register (low = p[i]); each one past its
 * bound reads as zero. vec: i even and p 4-byte aligned, both in bounds together. */
__device__ __forceinline__ uint32_t tc_pair(const uint16_t *p, int64_t i, bool ok0, bool ok1, bool vec)
{
    if (vec) return ok0 ? *reinterpret_cast<const uint32_t *>(p + i) : 0u;
    const uint32_t lo = ok0 ? p[i] : 0u, hi = ok1 ? p[i + 1] : 0u;
    return lo | hi << 16;
}

/* The shrink's fragments of the k-step at k0: x rows g and g+8 (ok0/ok1: real tokens) rounded to
 * HT as the mma's A operand, and the A rows of the nj n-tiles (arow[j] NULL: zeros) as its B
 * operands. The sum over k does not care which k sits in which fragment slot, so lane c takes
 * the 4 consecutive k0 + 4c .. 4c+3 for its slots (2c, 2c+1) and (2c+8, 2c+9), in x and in A
 * alike: one 16-byte load per x row and one 8-byte load per A row (xvec/avec: K % 4 == 0 and
 * aligned bases; the step whole). Elements at or past ke read as zero. */
/* The x part for an x already rounded to HT (XT == HT: the bf16/f16 copy the GEMM reads): the
 * same slots, 8-byte loads, no rounding (the copy was rounded as mma_pack rounds: same bits). */
__device__ __forceinline__ void sh_xfrag(uint32_t (&af)[4], const uint16_t *x0, const uint16_t *x1, bool ok0, bool ok1,
                                         int64_t kq, int64_t ke, bool xvec, bool whole)
{
    if (xvec && whole) {
        const uint2 z = make_uint2(0u, 0u);
        const uint2 v0 = ok0 ? *reinterpret_cast<const uint2 *>(x0 + kq) : z;
        const uint2 v1 = ok1 ? *reinterpret_cast<const uint2 *>(x1 + kq) : z;
        af[0] = v0.x, af[1] = v1.x, af[2] = v0.y, af[3] = v1.y;
        return;
    }
    af[0] = ok0 ? tc_pair(x0, kq, kq < ke, kq + 1 < ke, false) : 0u;
    af[1] = ok1 ? tc_pair(x1, kq, kq < ke, kq + 1 < ke, false) : 0u;
    af[2] = ok0 ? tc_pair(x0, kq + 2, kq + 2 < ke, kq + 3 < ke, false) : 0u;
    af[3] = ok1 ? tc_pair(x1, kq + 2, kq + 2 < ke, kq + 3 < ke, false) : 0u;
}

template <typename HT, typename XT>
__device__ __forceinline__ void sh_frag(uint32_t (&af)[4], uint32_t (&bf)[TC_SH_CH][2], const XT *x0,
                                        const XT *x1, bool ok0, bool ok1, const uint16_t *const (&arow)[TC_SH_CH],
                                        int nj, int64_t k0, int64_t ke, bool xvec, bool avec, int c)
{
    const int64_t kq = k0 + 4 * c;
    const bool whole = k0 + 16 <= ke;
    if constexpr (sizeof(XT) == 2) {
        sh_xfrag(af, reinterpret_cast<const uint16_t *>(x0), reinterpret_cast<const uint16_t *>(x1), ok0, ok1, kq, ke,
                 xvec, whole);
    } else {
    float4 v0, v1;
    if (xvec && whole) {
        const float4 z = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        v0 = ok0 ? *reinterpret_cast<const float4 *>(x0 + kq) : z;
        v1 = ok1 ? *reinterpret_cast<const float4 *>(x1 + kq) : z;
    } else {
        float e0[4], e1[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            e0[e] = ok0 && kq + e < ke ? x0[kq + e] : 0.0f;
            e1[e] = ok1 && kq + e < ke ? x1[kq + e] : 0.0f;
        }
        v0 = make_float4(e0[0], e0[1], e0[2], e0[3]);
        v1 = make_float4(e1[0], e1[1], e1[2], e1[3]);
    }
    af[0] = mma_pack<HT>(v0.x, v0.y);
    af[1] = mma_pack<HT>(v1.x, v1.y);
    af[2] = mma_pack<HT>(v0.z, v0.w);
    af[3] = mma_pack<HT>(v1.z, v1.w);
    }
#pragma unroll
    for (int j = 0; j < TC_SH_CH; j++) {
        bf[j][0] = bf[j][1] = 0u;
        if (j < nj && arow[j]) {
            if (avec && whole) {
                const uint2 w = *reinterpret_cast<const uint2 *>(arow[j] + kq);
                bf[j][0] = w.x, bf[j][1] = w.y;
            } else {
                bf[j][0] = tc_pair(arow[j], kq, kq < ke, kq + 1 < ke, false);
                bf[j][1] = tc_pair(arow[j], kq + 2, kq + 2 < ke, kq + 3 < ke, false);
            }
        }
    }
}

/* u rows of one tile (16 tokens) for every linear: see the header. part [S, T, RU] float32,
 * u [T, RU] 16-bit, count [tiles] split counters (zero between calls). */
template <typename HT, typename XT>
__global__ void __launch_bounds__(TC_WARPS * 32)
    k_lora_shrink_tc(float *part, HT *u, int *count, const XT *__restrict__ x, int T, int64_t K, int64_t KC,
                     int S, const int32_t *order, const int32_t *start, const tc_banks b)
{
    __shared__ int32_t tok[TC_SH_TM];
    __shared__ float red[TC_WARPS][TC_SH_TM][TC_SH_CH * 8 + 4];
    __shared__ int last;
    int a, i0, nt;
    if (!tc_tile<TC_SH_TM>((int)blockIdx.x, start, b.ng, T, false, &a, &i0, &nt)) return;
    int r[TC_MAXB], nts = 0; /* n-tiles over the linears: 2 per 16 ranks (ranks past r are zeros) */
#pragma unroll
    for (int i = 0; i < TC_MAXB; i++) {
        r[i] = tc_rank(b, i, a);
        nts += (r[i] + 15) / 16 * 2;
    }
    if (nts == 0) return; /* every S block of this tile leaves here: the counter stays */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    if (tid < TC_SH_TM) tok[tid] = tid < nt ? order[i0 + tid] : -1;
    __syncthreads();
    const int t0 = tok[g], t1 = tok[g + 8];
    const XT *x0 = x + (int64_t)(t0 < 0 ? 0 : t0) * K, *x1 = x + (int64_t)(t1 < 0 ? 0 : t1) * K;
    const int64_t kb = (int64_t)blockIdx.y * KC, ke = min(K, kb + KC);
    bool avec = (K & 3) == 0; /* 8-byte loads of A rows: K % 4 == 0 and every A base 8-byte aligned */
#pragma unroll
    for (int i = 0; i < TC_MAXB; i++)
        if (r[i] > 0 && ((uintptr_t)b.w[i][a].A & 7) != 0) avec = false;
    const bool xvec = (K & 3) == 0 && ((uintptr_t)x & (4 * sizeof(XT) - 1)) == 0;
    float *pp = part + (int64_t)blockIdx.y * T * b.RU;
    for (int ch = 0; ch < nts; ch += TC_SH_CH) {
        /* this lane's A row (rank 8p + g of linear i) in each n-tile of the chunk */
        const uint16_t *arow[TC_SH_CH];
#pragma unroll
        for (int j = 0; j < TC_SH_CH; j++) {
            int q = ch + j, i = 0;
            while (i < TC_MAXB - 1 && q >= (r[i] + 15) / 16 * 2) q -= (r[i] + 15) / 16 * 2, i++;
            const int row = 8 * q + g;
            arow[j] = ch + j < nts && row < r[i] ? (const uint16_t *)b.w[i][a].A + (int64_t)row * K : NULL;
        }
        float acc[TC_SH_CH][4];
#pragma unroll
        for (int j = 0; j < TC_SH_CH; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        /* two k-steps' fragments ahead (stages p and q, loaded alternately): the loads of the
         * next two steps are in flight during the mmas */
        const int nj = min(TC_SH_CH, nts - ch);
        constexpr int64_t KW = 16 * TC_WARPS; /* a warp's k stride */
        uint32_t ap[4], bp[TC_SH_CH][2], aq[4], bq[TC_SH_CH][2];
        int64_t k0 = kb + 16 * warp;
        if (k0 < ke) sh_frag<HT, XT>(ap, bp, x0, x1, t0 >= 0, t1 >= 0, arow, nj, k0, ke, xvec, avec, c);
        if (k0 + KW < ke) sh_frag<HT, XT>(aq, bq, x0, x1, t0 >= 0, t1 >= 0, arow, nj, k0 + KW, ke, xvec, avec, c);
        for (; k0 < ke; k0 += 2 * KW) {
#pragma unroll
            for (int jj = 0; jj < TC_SH_CH; jj++)
                if (jj < nj) mma_16816<HT>(acc[jj], ap, bp[jj][0], bp[jj][1]);
            if (k0 + 2 * KW < ke) sh_frag<HT, XT>(ap, bp, x0, x1, t0 >= 0, t1 >= 0, arow, nj, k0 + 2 * KW, ke, xvec, avec, c);
            if (k0 + KW >= ke) break;
#pragma unroll
            for (int jj = 0; jj < TC_SH_CH; jj++)
                if (jj < nj) mma_16816<HT>(acc[jj], aq, bq[jj][0], bq[jj][1]);
            if (k0 + 3 * KW < ke) sh_frag<HT, XT>(aq, bq, x0, x1, t0 >= 0, t1 >= 0, arow, nj, k0 + 3 * KW, ke, xvec, avec, c);
        }
        /* the warps' sums, added in warp order */
#pragma unroll
        for (int j = 0; j < TC_SH_CH; j++) {
            red[warp][g][8 * j + 2 * c] = acc[j][0];
            red[warp][g][8 * j + 2 * c + 1] = acc[j][1];
            red[warp][g + 8][8 * j + 2 * c] = acc[j][2];
            red[warp][g + 8][8 * j + 2 * c + 1] = acc[j][3];
        }
        __syncthreads();
        const int ncol = min(TC_SH_CH, nts - ch) * 8;
        for (int e = tid; e < nt * ncol; e += TC_WARPS * 32) {
            const int ti = e / ncol, cc = e % ncol;
            float s = red[0][ti][cc];
#pragma unroll
            for (int w = 1; w < TC_WARPS; w++) s += red[w][ti][cc];
            int q = ch + cc / 8, i = 0;
            while (i < TC_MAXB - 1 && q >= (r[i] + 15) / 16 * 2) q -= (r[i] + 15) / 16 * 2, i++;
            const int64_t at = (int64_t)tok[ti] * b.RU + b.off[i] + 8 * q + cc % 8;
            if (S == 1) u[at] = (HT)s;
            else pp[at] = s;
        }
        __syncthreads();
    }
    if (S == 1) return;
    /* the last split block of this tile sums the partials in split order */
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&count[blockIdx.x], 1) == S - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    /* the tile's u elements (token, column over the linears' r16 ranks), 4 per thread at once:
     * 4 x S loads in flight instead of S */
    int rc[TC_MAXB + 1];
    rc[0] = 0;
#pragma unroll
    for (int i = 0; i < TC_MAXB; i++) rc[i + 1] = rc[i] + (r[i] + 15) / 16 * 16;
    const int ncol = rc[TC_MAXB], nel = nt * ncol;
    for (int e0 = tid; e0 < nel; e0 += 4 * TC_WARPS * 32) {
        int64_t at[4];
        float sum[4];
#pragma unroll
        for (int v = 0; v < 4; v++) {
            const int e = e0 + v * TC_WARPS * 32, col = e % ncol;
            int i = 0;
            while (i < TC_MAXB - 1 && col >= rc[i + 1]) i++;
            at[v] = e < nel ? (int64_t)tok[e / ncol] * b.RU + b.off[i] + (col - rc[i]) : -1;
            sum[v] = 0.0f;
        }
#pragma unroll 4
        for (int q = 0; q < S; q++)
#pragma unroll
            for (int v = 0; v < 4; v++)
                if (at[v] >= 0) sum[v] += __ldcg(part + (int64_t)q * T * b.RU + at[v]);
#pragma unroll
        for (int v = 0; v < 4; v++)
            if (at[v] >= 0) u[at[v]] = (HT)sum[v];
    }
    if (tid == 0) count[blockIdx.x] = 0;
}

/* p[o], p[o + 1] (the second only when two; o < 0: nothing, zeros); pair: o even, one 8-byte load */
__device__ __forceinline__ float2 tc_ld2(const float *p, int64_t o, bool two, bool pair)
{
    if (o < 0) return make_float2(0.0f, 0.0f);
    if (pair) return *reinterpret_cast<const float2 *>(p + o);
    return make_float2(p[o], two ? p[o + 1] : 0.0f);
}

__device__ __forceinline__ void tc_st2(float *p, int64_t o, float2 v, bool two, bool pair)
{
    if (pair) {
        *reinterpret_cast<float2 *>(p + o) = v;
        return;
    }
    p[o] = v.x;
    if (two) p[o + 1] = v.y;
}

/* y_i[t, n] += scale * u[t] . B[n] over one block of 128 outputs and a tile of 32 tokens (MODE
 * EX_ADD); EX_GLU: out = act(gate + LoRA_0) * (up + LoRA_1) over TC_GLU_NP blocks of 128 outputs
 * in turn; EX_RESID: out += y_0 + LoRA_0 (the last two over every token: the tile list ends with
 * the tokens without an adapter).
 * EX_GLU with a next linear (nx.RD > 0: down, whose input is out): the block also multiplies its
 * out values (rounded to HT, as the shrink would load them) by that linear's A rows over its
 * outputs, on tensor cores: the C fragments of two n-tiles of out are the A fragment of one
 * k-step. The warps' sums are added in warp order into a partial of the block; the last block
 * of a tile to finish (a counter per tile, reset by that block) adds the partials of the tile's
 * blocks in block order into nx.u, so the down projection's LoRA needs no shrink over out. */
#define TC_GLU_NP 4    /* GLU: 128-output passes per block */
#define TC_DS_MAXR 64  /* the next linear's largest rank the GLU folds its shrink for */

struct tc_next {
    const struct tuna_lora_w *w; /* descriptor table (device) */
    int n, R, RD;                /* adapters, max_r, max_r rounded up to 16 (0: no next linear) */
    float *part;                 /* [gridDim.x, T, RD] float32 partials */
    void *u;                     /* [T, RD] in the adapters' 16-bit type */
    int *count;                  /* per tile of the expand grid, zero between calls */
};

/* The GLU's fold of the next linear's shrink, after the passes: the warps' sums in warp order
 * (red), the block's partial, then the tile's last block adds the partials in block order. */
template <typename HT, int NQD>
__device__ __forceinline__ void next_finish(float (*red)[TC_DS_MAXR + 4], int &last, const float (&accd)[2][NQD][4],
                                            int nqd, int nt, const int32_t *tok, int T, const tc_next &nx, int tid,
                                            int warp, int g, int c)
{
    for (int w = 0; w < TC_WARPS; w++) {
        if (warp == w) {
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int q = 0; q < NQD; q++) {
                    if (q >= nqd) break;
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float *d = &red[mt * 16 + g + 8 * (e >> 1)][8 * q + 2 * c + (e & 1)];
                        *d = w ? *d + accd[mt][q][e] : accd[mt][q][e];
                    }
                }
        }
        __syncthreads();
    }
    const int rw = 8 * nqd; /* ranks written: rd rounded up to 16 (the rest are zeros) */
    float *pp = nx.part + (int64_t)blockIdx.x * T * nx.RD;
    for (int e = tid; e < nt * rw; e += TC_WARPS * 32) {
        const int ti = e / rw, j = e % rw;
        pp[(int64_t)tok[ti] * nx.RD + j] = red[ti][j];
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&nx.count[blockIdx.y], 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    HT *ud = (HT *)nx.u;
    const int nel = nt * rw;
    for (int e0 = tid; e0 < nel; e0 += 4 * TC_WARPS * 32) { /* 4 elements per thread at once */
        int64_t at[4];
        float sum[4];
#pragma unroll
        for (int v = 0; v < 4; v++) {
            const int e = e0 + v * TC_WARPS * 32;
            at[v] = e < nel ? (int64_t)tok[e / rw] * nx.RD + e % rw : -1;
            sum[v] = 0.0f;
        }
#pragma unroll 4
        for (int q = 0; q < (int)gridDim.x; q++)
#pragma unroll
            for (int v = 0; v < 4; v++)
                if (at[v] >= 0) sum[v] += __ldcg(nx.part + (int64_t)q * T * nx.RD + at[v]);
#pragma unroll
        for (int v = 0; v < 4; v++)
            if (at[v] >= 0) ud[at[v]] = (HT)sum[v];
    }
    if (tid == 0) nx.count[blockIdx.y] = 0;
}

enum { EX_ADD, EX_GLU, EX_RESID };
template <typename HT, int MODE>
__global__ void __launch_bounds__(TC_WARPS * 32)
    k_lora_expand_tc(const HT *__restrict__ u, int T, const int32_t *order, const int32_t *start, const tc_banks b,
                     float *glu_out, int act, const tc_next nx)
{
    constexpr bool GLU = MODE == EX_GLU, ALL = MODE != EX_ADD;
    constexpr int NP = GLU ? TC_GLU_NP : 1, NQD = GLU ? TC_DS_MAXR / 8 : 1;
    __shared__ int32_t tok[TC_EX_TM];
    __shared__ __align__(16) HT us[TC_EX_TM][TC_US];
    __shared__ float red[GLU ? TC_EX_TM : 1][TC_DS_MAXR + 4];
    __shared__ int last;
    int a, i0, nt;
    if (!tc_tile<TC_EX_TM>((int)blockIdx.y, start, b.ng, T, ALL, &a, &i0, &nt)) return;
    int li = 0; /* the output (GLU: gate; up is li + 1) */
    if (MODE == EX_ADD)
        while (li + 1 < b.nb && (int)blockIdx.x >= b.nt0[li + 1]) li++;
    const int64_t N = b.N[li], nbase = (int64_t)((int)blockIdx.x - b.nt0[li]) * TC_EX_NB * NP;
    if (nbase >= N) return;
    constexpr int NBK = GLU ? 2 : 1;
    int r[NBK], r16[NBK], uc[NBK];
    float sc[NBK];
    const uint16_t *B[NBK];
    int64_t ldb[NBK]; /* B's row stride */
#pragma unroll
    for (int q = 0; q < NBK; q++) {
        r[q] = tc_rank(b, li + q, a);
        r16[q] = (r[q] + 15) / 16 * 16;
        uc[q] = q ? r16[0] : 0;
        sc[q] = r[q] ? b.w[li + q][a].scale : 0.0f;
        B[q] = r[q] ? (const uint16_t *)b.w[li + q][a].B : NULL;
        ldb[q] = r[q] && b.w[li + q][a].ldb ? b.w[li + q][a].ldb : r[q];
    }
    if (!ALL && r[0] == 0) return;
    /* the next linear's rank for this tile's adapter (GLU), its n-tiles of 8 ranks in pairs */
    int rd = 0;
    const uint16_t *Ad = NULL;
    if (GLU && nx.RD > 0 && a >= 0 && a < nx.n) {
        rd = min((int)nx.w[a].r, nx.R);
        Ad = rd > 0 ? (const uint16_t *)nx.w[a].A : NULL;
    }
    const int nqd = (rd + 15) / 16 * 2;
    const bool avec = (N & 1) == 0 && ((uintptr_t)Ad & 3) == 0;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    if (tid < TC_EX_TM) tok[tid] = tid < nt ? order[i0 + tid] : -1;
    __syncthreads();
    const HT zero = (HT)0.0f;
#pragma unroll
    for (int q = 0; q < NBK; q++)
        for (int e = tid; e < TC_EX_TM * r16[q]; e += TC_WARPS * 32) {
            const int ti = e / r16[q], j = e % r16[q];
            us[ti][uc[q] + j] = tok[ti] >= 0 ? u[(int64_t)tok[ti] * b.RU + b.off[li + q] + j] : zero;
        }
    __syncthreads();
    float accd[2][NQD][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int q = 0; q < NQD; q++) accd[mt][q][0] = accd[mt][q][1] = accd[mt][q][2] = accd[mt][q][3] = 0.0f;
    const bool pair = (N & 1) == 0;
    for (int p = 0; p < NP; p++) {
        const int64_t n0 = nbase + (int64_t)p * TC_EX_NB + 32 * warp;
        if (nbase + (int64_t)p * TC_EX_NB >= N) break;
        float acc[NBK][2][4][4];
#pragma unroll
        for (int q = 0; q < NBK; q++)
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int jt = 0; jt < 4; jt++)
                    acc[q][mt][jt][0] = acc[q][mt][jt][1] = acc[q][mt][jt][2] = acc[q][mt][jt][3] = 0.0f;
#pragma unroll
        for (int q = 0; q < NBK; q++) {
            const bool bvec = ((r[q] | ldb[q]) & 1) == 0;
            for (int k0 = 0; k0 < r16[q]; k0 += 16) {
                uint32_t af[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    const int ra = mt * 16 + g, cb = uc[q] + k0 + 2 * c;
                    af[mt][0] = *reinterpret_cast<const uint32_t *>(&us[ra][cb]);
                    af[mt][1] = *reinterpret_cast<const uint32_t *>(&us[ra + 8][cb]);
                    af[mt][2] = *reinterpret_cast<const uint32_t *>(&us[ra][cb + 8]);
                    af[mt][3] = *reinterpret_cast<const uint32_t *>(&us[ra + 8][cb + 8]);
                }
                const int ka = k0 + 2 * c, kc = ka + 8;
#pragma unroll
                for (int jt = 0; jt < 4; jt++) {
                    const int64_t n = n0 + 8 * jt + g;
                    uint32_t b0 = 0u, b1 = 0u;
                    if (n < N) {
                        const uint16_t *br = B[q] + n * ldb[q];
                        b0 = tc_pair(br, ka, ka < r[q], ka + 1 < r[q], bvec);
                        b1 = tc_pair(br, kc, kc < r[q], kc + 1 < r[q], bvec);
                    }
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) mma_16816<HT>(acc[q][mt][jt], af[mt], b0, b1);
                }
            }
        }
        /* per row block: every load first (one round trip), then the sums and the stores */
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            float2 v[NBK][2][4], r0[2][4], ov[2][4];
            int64_t at[2][4];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int ti = mt * 16 + g + 8 * h;
#pragma unroll
                for (int jt = 0; jt < 4; jt++) {
                    const int64_t n = n0 + 8 * jt + 2 * c;
                    at[h][jt] = ti < nt && n < N ? (int64_t)tok[ti] * N + n : -1;
#pragma unroll
                    for (int q = 0; q < NBK; q++) v[q][h][jt] = tc_ld2(b.y[li + q], at[h][jt], n + 1 < N, pair);
                    r0[h][jt] = MODE == EX_RESID ? tc_ld2(glu_out, at[h][jt], n + 1 < N, pair) : make_float2(0.0f, 0.0f);
                }
            }
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int jt = 0; jt < 4; jt++) {
                    const int64_t o = at[h][jt];
                    ov[h][jt] = make_float2(0.0f, 0.0f);
                    if (o < 0) continue;
                    const bool two = n0 + 8 * jt + 2 * c + 1 < N;
                    const float l0 = sc[0] * acc[0][mt][jt][2 * h], l1 = sc[0] * acc[0][mt][jt][2 * h + 1];
                    float2 out;
                    if (MODE == EX_ADD) {
                        out = make_float2(v[0][h][jt].x + l0, v[0][h][jt].y + l1);
                        tc_st2(b.y[li], o, out, two, pair);
                    } else if (MODE == EX_RESID) {
                        out = make_float2(r0[h][jt].x + v[0][h][jt].x + l0, r0[h][jt].y + v[0][h][jt].y + l1);
                        tc_st2(glu_out, o, out, two, pair);
                    } else {
                        const float m0 = sc[NBK - 1] * acc[NBK - 1][mt][jt][2 * h],
                                    m1 = sc[NBK - 1] * acc[NBK - 1][mt][jt][2 * h + 1];
                        out.x = tuna_cuda_act(v[0][h][jt].x + l0, act) * (v[NBK - 1][h][jt].x + m0);
                        out.y = tuna_cuda_act(v[0][h][jt].y + l1, act) * (v[NBK - 1][h][jt].y + m1);
                        tc_st2(glu_out, o, out, two, pair);
                        ov[h][jt] = make_float2(out.x, two ? out.y : 0.0f);
                    }
                }
            if (GLU && nqd > 0) {
                /* the next linear's shrink over these 32 outputs: two k-steps of 16 */
#pragma unroll
                for (int s = 0; s < 2; s++) {
                    uint32_t af[4];
                    af[0] = mma_pack<HT>(ov[0][2 * s].x, ov[0][2 * s].y);
                    af[1] = mma_pack<HT>(ov[1][2 * s].x, ov[1][2 * s].y);
                    af[2] = mma_pack<HT>(ov[0][2 * s + 1].x, ov[0][2 * s + 1].y);
                    af[3] = mma_pack<HT>(ov[1][2 * s + 1].x, ov[1][2 * s + 1].y);
                    const int64_t ka = n0 + 16 * s + 2 * c, kc = ka + 8;
#pragma unroll
                    for (int q = 0; q < NQD; q++) {
                        if (q >= nqd) break;
                        const int j = 8 * q + g;
                        uint32_t b0 = 0u, b1 = 0u;
                        if (j < rd) {
                            const uint16_t *ar = Ad + (int64_t)j * N;
                            b0 = tc_pair(ar, ka, ka < N, ka + 1 < N, avec);
                            b1 = tc_pair(ar, kc, kc < N, kc + 1 < N, avec);
                        }
                        mma_16816<HT>(accd[mt][q], af, b0, b1);
                    }
                }
            }
        }
    }
    if (GLU && nqd > 0) next_finish<HT, NQD>(red, last, accd, nqd, nt, tok, T, nx, tid, warp, g, c);
}

/* ================= host side ================= */

template <int DT>
static void launch_f32(tuna_backend *be, float *part, float *y, const float *x, int64_t T, int64_t N, int64_t K, int S,
                       int64_t KC, int R, int n, const struct tuna_lora_w *w, const int32_t *order, const int32_t *start)
{
    dim3 gs((unsigned)((T + SH_TM - 1) / SH_TM), (unsigned)n, (unsigned)S);
    k_lora_shrink<DT><<<gs, SH_THREADS, 0, be->stream>>>(part, x, T, K, KC, R, w, order, start);
    if (!tuna_cuda_check_launch(be, "k_lora_shrink")) return;
    dim3 ge((unsigned)((N + EX_NT - 1) / EX_NT), (unsigned)((T + EX_TM - 1) / EX_TM), (unsigned)n);
    k_lora_expand<DT><<<ge, EX_NT, 0, be->stream>>>(y, part, T, N, S, R, w, order, start);
    tuna_cuda_check_launch(be, "k_lora_expand");
}

/* be->lora: [split counters: TC_COUNT_MAX ints, zero between calls][the op's scratch]. Grows the
 * buffer to hold `bytes` of scratch; a new buffer gets its counters zeroed. */
static char *lora_scratch(tuna_backend *be, size_t bytes)
{
    const size_t head = TC_COUNT_MAX * sizeof(int);
    void *old = be->lora.p;
    if (!tuna_cuda_grow(be, &be->lora, head + bytes, "cudaMalloc(LoRA scratch)")) return NULL;
    if (be->lora.p != old && !tuna_cuda_check(be, cudaMemsetAsync(be->lora.p, 0, head, be->stream), "cudaMemsetAsync(LoRA counters)"))
        return NULL;
    return (char *)be->lora.p;
}

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

/* One float32 (or pre-sm_80) linear: the CUDA-core kernels. */
static void lora_f32(tuna_backend *be, float *y, const float *x, int64_t T, int64_t N, int64_t K,
                     const struct tuna_lora_bank *set, const int32_t *d_order, const int32_t *d_start, int dt)
{
    const int64_t nks = (K + SH_KSMAX - 1) / SH_KSMAX;
    const int S = (int)(nks < SH_SMAX ? nks : SH_SMAX);
    const int64_t KC = (nks + S - 1) / S * SH_KSMAX;
    const int R = (int)set->max_r;
    char *base = lora_scratch(be, (size_t)S * (size_t)T * (size_t)R * sizeof(float));
    if (!base) return;
    float *part = (float *)(base + TC_COUNT_MAX * sizeof(int));
    if (dt == 0) launch_f32<0>(be, part, y, x, T, N, K, S, KC, R, set->n, set->w, d_order, d_start);
    else if (dt == 1) launch_f32<1>(be, part, y, x, T, N, K, S, KC, R, set->n, set->w, d_order, d_start);
    else launch_f32<2>(be, part, y, x, T, N, K, S, KC, R, set->n, set->w, d_order, d_start);
}

/* The shrink of one call on stream st (the main stream, or the second one for lora_begin); xh:
 * x already rounded to HT (NULL: round x as it is loaded). */
template <typename HT>
static bool launch_shrink(tuna_backend *be, cudaStream_t st, const tc_banks &b, const float *x, const void *xh,
                          int64_t T, int64_t K, int S, int64_t KC, int sh_tiles, HT *u, float *part, int *count,
                          const int32_t *order, const int32_t *start)
{
    const dim3 grid((unsigned)sh_tiles, (unsigned)S);
    if (xh)
        k_lora_shrink_tc<HT, HT><<<grid, TC_WARPS * 32, 0, st>>>(part, u, count, (const HT *)xh, (int)T, K, KC, S,
                                                                order, start, b);
    else
        k_lora_shrink_tc<HT, float><<<grid, TC_WARPS * 32, 0, st>>>(part, u, count, x, (int)T, K, KC, S, order, start,
                                                                   b);
    return tuna_cuda_check_launch(be, "k_lora_shrink_tc");
}

/* The expand of one call (u made by its shrink, by lora_begin's, or by the GLU call before). */
template <typename HT>
static void launch_expand(tuna_backend *be, const tc_banks &b, const tc_next &nx, int64_t T, HT *u,
                          const int32_t *order, const int32_t *start, float *glu_out, int act)
{
    const unsigned ex_tiles = (unsigned)((T + TC_EX_TM - 1) / TC_EX_TM + b.ng + (glu_out ? 1 : 0));
    const dim3 blk(TC_WARPS * 32);
    if (glu_out && act == TUNA_LORA_RESIDUAL) {
        const unsigned nbx = (unsigned)((b.N[0] + TC_EX_NB - 1) / TC_EX_NB);
        k_lora_expand_tc<HT, EX_RESID><<<dim3(nbx, ex_tiles), blk, 0, be->stream>>>(u, (int)T, order, start, b,
                                                                                 glu_out, act, nx);
    } else if (glu_out) {
        const unsigned nbx = (unsigned)((b.N[0] + TC_EX_NB * TC_GLU_NP - 1) / (TC_EX_NB * TC_GLU_NP));
        k_lora_expand_tc<HT, EX_GLU><<<dim3(nbx, ex_tiles), blk, 0, be->stream>>>(u, (int)T, order, start, b, glu_out,
                                                                               act, nx);
    } else {
        k_lora_expand_tc<HT, EX_ADD><<<dim3((unsigned)b.nt0[b.nb], ex_tiles), blk, 0, be->stream>>>(
            u, (int)T, order, start, b, NULL, act, nx);
    }
    tuna_cuda_check_launch(be, "k_lora_expand_tc");
}

static bool bank_has(const struct tuna_lora_bank *s) { return s && s->n > 0 && s->max_r > 0; }

/* Everything one lora call (or its lora_begin) works out before launching. */
enum { PLAN_DONE, PLAN_NONE, PLAN_F32, PLAN_STASH, PLAN_TC };
struct lora_plan {
    int kind, dt, nl, S, sh_tiles;
    bool resid, glu, fold_next;
    int64_t KC;
    const int32_t *d_order, *d_start;
    bool order_in_block; /* order/start come from the step block (stay put until the step ends) */
    tc_banks b;
    tc_next nx;
    char *base;           /* be->lora.p */
    size_t u_off, p_off;  /* byte offsets of u and the shrink's partials in be->lora */
    const struct tuna_lora_bank *next;
};

/* Validates a call, groups/uploads its token order and sizes its launches and scratch (growing
 * be->lora). stash: the u a GLU call left for this call (lora_next). ys may be NULL (lora_begin). */
static int lora_plan_make(tuna_backend *be, struct lora_plan *p, int n, float *const *ys, const int64_t *Ns,
                          const float *x, int64_t T, int64_t K, const struct tuna_lora_bank *const *sets,
                          const struct tuna_lora_tokens *tok, float *glu_out, int act, const void *stash_x,
                          bool *stash_hit)
{
    memset(p, 0, sizeof *p);
    *stash_hit = false;
    if (be->sticky || T <= 0 || K <= 0 || n <= 0) return PLAN_DONE;
    p->resid = glu_out && act == TUNA_LORA_RESIDUAL;
    p->glu = glu_out && !p->resid;
    if (n > TC_MAXB || (p->glu && (n < 2 || Ns[0] != Ns[1])) || (p->resid && n != 1)) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "lora (more than 3 linears, a GLU form that is not gate/up, or a residual form of several)");
        return PLAN_DONE;
    }
    /* the linears of x; the GLU form's third set is the next linear's (down: its input is glu_out) */
    const int nl = p->glu ? 2 : n;
    p->nl = nl;
    const struct tuna_lora_bank *next = p->glu && n == 3 && bank_has(sets[2]) ? sets[2] : NULL;
    int dt = -1, ng = 0;
    bool any = false;
    for (int i = 0; i < n; i++) {
        const struct tuna_lora_bank *s = i < nl ? sets[i] : next;
        if (!bank_has(s)) continue;
        if (s->n > LORA_MAX_N || s->max_r > LORA_MAX_R) {
            tuna_cuda_check(be, cudaErrorInvalidValue, "lora (more than 64 adapters or a rank over 256 on one layer)");
            return PLAN_DONE;
        }
        const int d = s->dtype == TUNA_DTYPE_F32 ? 0 : s->dtype == TUNA_DTYPE_BF16 ? 1 : s->dtype == TUNA_DTYPE_F16 ? 2 : -1;
        if (d < 0 || (dt >= 0 && d != dt) || Ns[i] <= 0) {
            tuna_cuda_check(be, cudaErrorInvalidValue, "lora (adapter dtype, or linears of different dtypes)");
            return PLAN_DONE;
        }
        dt = d;
        if (i < nl) any = true;
        if (s->n > ng) ng = s->n;
    }
    p->dt = dt;
    if (!any) return PLAN_NONE; /* no adapters at all (the next linear then shrinks its input itself) */
    if (T > INT32_MAX / 2) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "lora (token count)");
        return PLAN_DONE;
    }
    /* the tokens grouped by adapter: the caller's (step block) or made here */
    const int32_t *order = tok->order, *start = tok->start;
    int ngr = tok->n_groups;
    int32_t *own = NULL;
    if (!order || !start || ngr < ng) {
        ngr = ng;
        own = (int32_t *)malloc((size_t)(T + ngr + 1) * sizeof(int32_t));
        if (!own) {
            tuna_cuda_check(be, cudaErrorMemoryAllocation, "lora (host grouping buffer)");
            return PLAN_DONE;
        }
        tuna_lora_group(tok->adapter, T, ngr, own, own + T);
        order = own;
        start = own + T;
    }
    const char *hb = (const char *)be->host_meta;
    p->order_in_block = !own && be->step_used && (const char *)order >= hb &&
                        (const char *)(order + T) <= hb + be->step_used && (const char *)start >= hb &&
                        (const char *)(start + ngr + 1) <= hb + be->step_used;
    struct cuda_meta m = {0};
    bool ok = tuna_cuda_meta_begin(be, &m, (size_t)(T + ngr + 1) * sizeof(int32_t));
    size_t o_o = ok ? (size_t)tuna_cuda_meta_stage(be, &m, order, (size_t)T * sizeof(int32_t)) : 0;
    size_t o_s = ok ? (size_t)tuna_cuda_meta_stage(be, &m, start, (size_t)(ngr + 1) * sizeof(int32_t)) : 0;
    free(own); /* staged: copied into the pinned arena */
    if (!ok || be->sticky || !tuna_cuda_meta_flush(be, &m)) return PLAN_DONE;
    char *mb = (char *)be->meta.p;
    p->d_order = (const int32_t *)(mb + o_o);
    p->d_start = (const int32_t *)(mb + o_s);

    static int tc = -1; /* TUNA_LORA_TC=0: 16-bit adapters on the CUDA-core kernels too (for measurement) */
    if (tc < 0) {
        const char *e = getenv("TUNA_LORA_TC");
        tc = !(e && e[0] == '0');
    }
    /* TUNA_LORA_FOLD=0: down shrinks the GLU output itself instead of the GLU expand folding it
     * (the folded expand takes 381 us per call at 2048 tokens against k_glu's 157, yet the H100
     * measured the fold faster end to end: 5,366 vs 5,292 tok/s). Read at every call (tests). */
    const char *fe = getenv("TUNA_LORA_FOLD");
    const bool fold = !(fe && fe[0] == '0');
    if (dt == 0 || be->cc_major < 8 || !tc) return PLAN_F32;
    tc_banks &b = p->b;
    b.nb = nl;
    b.ng = ng;
    int off = 0, nt0 = 0;
    for (int i = 0; i < nl; i++) {
        const struct tuna_lora_bank *s = sets[i];
        const bool has = bank_has(s);
        b.w[i] = has ? s->w : NULL;
        b.n[i] = has ? s->n : 0;
        b.R[i] = has ? (int)s->max_r : 0;
        b.off[i] = off;
        off += (b.R[i] + 15) / 16 * 16;
        b.y[i] = ys ? ys[i] : NULL;
        b.N[i] = Ns[i];
        b.nt0[i] = nt0;
        nt0 += (int)((Ns[i] + TC_EX_NB - 1) / TC_EX_NB);
    }
    b.nt0[nl] = nt0;
    b.RU = off;
    /* the plain or residual form of the linear whose u the GLU call before made: no shrink */
    const auto &st = be->lora_next;
    if (!p->glu && n == 1 && stash_x && stash_x == x && st.T == T && st.K == K && st.base == be->lora.p && sets[0] &&
        sets[0]->w == st.w && sets[0]->n == st.n && (int)sets[0]->max_r == st.R) {
        *stash_hit = true;
        p->base = (char *)be->lora.p;
        p->u_off = st.off;
        return PLAN_STASH;
    }
    /* K splits: about four blocks per SM over the shrink's tiles (few k-steps per warp: the loop
     * is latency-bound at decode sizes), k ranges of whole 64-k steps */
    const int sh_tiles = (int)((T + TC_SH_TM - 1) / TC_SH_TM) + ng;
    int S = 1;
    if (sh_tiles <= TC_COUNT_MAX) {
        const int want = (4 * (be->sm_count > 0 ? be->sm_count : 132) + sh_tiles - 1) / sh_tiles;
        S = want < 1 ? 1 : want > TC_SMAX ? TC_SMAX : want;
    }
    /* at least kmin k per split (512: 8 k-steps per warp; TUNA_LORA_KMIN=64 is the previous
     * rule): the last block's sum of the S partials is on the kernel's critical path */
    static int kmin = 0;
    if (kmin == 0) {
        const char *e = getenv("TUNA_LORA_KMIN");
        const int v = e ? atoi(e) : 0;
        kmin = v >= 64 && v <= 65536 ? v : 512;
    }
    const int smax = (int)((K + kmin - 1) / kmin);
    if (S > smax) S = smax < 1 ? 1 : smax;
    int64_t KC = ((K + S - 1) / S + 63) / 64 * 64;
    S = (int)((K + KC - 1) / KC);
    p->S = S;
    p->KC = KC;
    p->sh_tiles = sh_tiles;
    const size_t head = TC_COUNT_MAX * sizeof(int);
    const size_t ub = align256((size_t)T * (size_t)b.RU * 2),
                 pb = align256(S > 1 ? (size_t)S * (size_t)T * (size_t)b.RU * sizeof(float) : 0);
    /* GLU: the next linear's shrink folded into the GLU (its u and the blocks' partials) */
    const int64_t ex_tiles = (T + TC_EX_TM - 1) / TC_EX_TM + ng + 1;
    const int64_t nbx = (Ns[0] + TC_EX_NB * TC_GLU_NP - 1) / (TC_EX_NB * TC_GLU_NP);
    p->fold_next = next && fold && next->max_r <= TC_DS_MAXR && ex_tiles <= TC_COUNT_MAX;
    const int RD = p->fold_next ? (int)(next->max_r + 15) / 16 * 16 : 0;
    const size_t udb = align256((size_t)T * (size_t)RD * 2), pdb = (size_t)nbx * (size_t)T * (size_t)RD * sizeof(float);
    char *base = lora_scratch(be, ub + pb + (p->fold_next ? udb + pdb : 0));
    if (!base) return PLAN_DONE;
    p->base = base;
    p->u_off = head;
    p->p_off = head + ub;
    p->next = next;
    if (p->fold_next) {
        tc_next &nx = p->nx;
        nx.w = next->w;
        nx.n = next->n;
        nx.R = (int)next->max_r;
        nx.RD = RD;
        nx.u = base + head + ub + pb;
        nx.part = (float *)(base + head + ub + pb + udb);
        nx.count = (int *)base;
    }
    return PLAN_TC;
}

/* Whether the shrink lora_begin started is this plan's (same input, adapters, token order,
 * launch and scratch). */
static bool pre_matches(const tuna_backend *be, const struct lora_plan *p, const float *x, int64_t T, int64_t K)
{
    const auto &q = be->lora_pre;
    if (!q.valid || q.x != x || q.T != T || q.K != K || q.base != p->base || q.order != p->d_order ||
        q.start != p->d_start || q.nb != p->b.nb || q.S != p->S || q.KC != p->KC || q.dt != p->dt ||
        q.sh_tiles != p->sh_tiles)
        return false;
    for (int i = 0; i < p->b.nb; i++)
        if (q.w[i] != p->b.w[i] || q.n[i] != p->b.n[i] || q.R[i] != p->b.R[i]) return false;
    return true;
}

/* Where lora_begin runs the shrink (TUNA_LORA_BEGIN, read at every call: test_cuda_graphs switches
 * it): 0 (default) nowhere, the lora call after the GEMM shrinks float32 x; 1 on the main stream
 * before the GEMMs, reading the 16-bit copy of x they use; 2 on a second stream beside the GEMMs.
 * The H100 measured both slower end to end (docs/PERFORMANCE.md, Multi-LoRA, sixth session:
 * 5,292 and 5,246 output tok/s against 5,552 with 0). */
static int begin_mode(void)
{
    const char *e = getenv("TUNA_LORA_BEGIN");
    return e && (e[0] == '1' || e[0] == '2') ? e[0] - '0' : 0;
}

void tuna_cuda_lora_begin(tuna_backend *be, int n, const int64_t *Ns, const float *x, int64_t T, int64_t K,
                          const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok, float *glu_out,
                          int act)
{
    auto &q = be->lora_pre;
    if (q.pending) { /* a begin without its lora call: the main stream waits for it all the same */
        tuna_cuda_check(be, cudaStreamWaitEvent(be->stream, q.side.join, 0), "cudaStreamWaitEvent(LoRA shrink)");
        q.pending = false;
    }
    q.valid = false;
    const int mode = begin_mode();
    if (mode == 0 || be->sticky) return;
    if (mode == 2 && !tuna_cuda_side_make(be, &q.side)) return;
    struct lora_plan p;
    bool hit;
    const int kind = lora_plan_make(be, &p, n, NULL, Ns, x, T, K, sets, tok, glu_out, act, be->lora_next.x, &hit);
    if (kind != PLAN_TC || !p.order_in_block) return;
    /* at the GEMM sizes: x rounded to the adapters' 16-bit type into be->half once, here, for the
     * shrink and the GEMMs that follow (they find it there: tuna_cuda_to_half) */
    const void *xh = NULL;
    if (tuna_cuda_half_once() && T > tuna_cuda_gemv_max_t16()) {
        if (!tuna_cuda_to_half(be, x, T * K, p.dt, true)) return;
        xh = be->half.p;
    }
    const bool side = mode == 2 && q.side.made;
    if (side && !tuna_cuda_side_fork(be, &q.side, "LoRA")) return;
    const cudaStream_t st = side ? q.side.stream : be->stream;
    bool ok;
    if (p.dt == 1)
        ok = launch_shrink<__nv_bfloat16>(be, st, p.b, x, xh, T, K, p.S, p.KC, p.sh_tiles,
                                          (__nv_bfloat16 *)(p.base + p.u_off), (float *)(p.base + p.p_off),
                                          (int *)p.base, p.d_order, p.d_start);
    else
        ok = launch_shrink<__half>(be, st, p.b, x, xh, T, K, p.S, p.KC, p.sh_tiles, (__half *)(p.base + p.u_off),
                                   (float *)(p.base + p.p_off), (int *)p.base, p.d_order, p.d_start);
    if (side) {
        if (!tuna_cuda_check(be, cudaEventRecord(q.side.join, q.side.stream), "cudaEventRecord(LoRA join)")) return;
        q.pending = true;
        q.reads_half = xh != NULL;
    }
    if (!ok) return;
    q.valid = true;
    q.x = x;
    q.T = T;
    q.K = K;
    q.base = p.base;
    q.order = p.d_order;
    q.start = p.d_start;
    q.nb = p.b.nb;
    q.S = p.S;
    q.KC = p.KC;
    q.dt = p.dt;
    q.sh_tiles = p.sh_tiles;
    for (int i = 0; i < 3; i++) {
        q.w[i] = i < p.b.nb ? p.b.w[i] : NULL;
        q.n[i] = i < p.b.nb ? p.b.n[i] : 0;
        q.R[i] = i < p.b.nb ? p.b.R[i] : 0;
    }
}

void tuna_cuda_lora_free(tuna_backend *be)
{
    auto &q = be->lora_pre;
    tuna_cuda_side_free(&q.side);
    q.pending = q.valid = false;
}

void tuna_cuda_lora(tuna_backend *be, int n, float *const *ys, const int64_t *Ns, const float *x, int64_t T, int64_t K,
                    const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok, float *glu_out, int act)
{
    /* a shrink lora_begin started: the main stream waits for it first, whatever this call is */
    auto &q = be->lora_pre;
    if (q.pending) {
        tuna_cuda_check(be, cudaStreamWaitEvent(be->stream, q.side.join, 0), "cudaStreamWaitEvent(LoRA shrink)");
        q.pending = false;
    }
    const bool pre = q.valid;
    q.valid = false;
    be->half_of = NULL; /* lora_begin's x copy serves only the GEMMs between it and this call */
    /* the next linear's u left by the previous call (GLU form): valid for this call only */
    const void *stash_x = be->lora_next.x;
    struct lora_plan p;
    bool hit;
    const int kind = lora_plan_make(be, &p, n, ys, Ns, x, T, K, sets, tok, glu_out, act, stash_x, &hit);
    be->lora_next.x = NULL;
    if (kind == PLAN_DONE) return;
    const bool resid = p.resid, glu = p.glu;
    if (kind == PLAN_NONE) {
        if (resid) tuna_cuda_add(be, glu_out, ys[0], T * Ns[0]);
        else if (glu) tuna_cuda_glu(be, glu_out, ys[0], ys[1], T * Ns[0], act);
        return;
    }
    if (kind == PLAN_F32) { /* float32 adapters: one linear at a time, then the GLU */
        for (int i = 0; i < p.nl; i++)
            if (bank_has(sets[i])) lora_f32(be, ys[i], x, T, Ns[i], K, sets[i], p.d_order, p.d_start, p.dt);
        if (resid) tuna_cuda_add(be, glu_out, ys[0], T * Ns[0]);
        else if (glu) tuna_cuda_glu(be, glu_out, ys[0], ys[1], T * Ns[0], act);
        return;
    }
    char *base = p.base;
    if (kind == PLAN_TC && !(pre && pre_matches(be, &p, x, T, K))) {
        if (p.dt == 1)
            launch_shrink<__nv_bfloat16>(be, be->stream, p.b, x, NULL, T, K, p.S, p.KC, p.sh_tiles,
                                         (__nv_bfloat16 *)(base + p.u_off), (float *)(base + p.p_off), (int *)base,
                                         p.d_order, p.d_start);
        else
            launch_shrink<__half>(be, be->stream, p.b, x, NULL, T, K, p.S, p.KC, p.sh_tiles, (__half *)(base + p.u_off),
                                  (float *)(base + p.p_off), (int *)base, p.d_order, p.d_start);
        if (be->sticky) return;
    }
    if (p.dt == 1)
        launch_expand<__nv_bfloat16>(be, p.b, p.nx, T, (__nv_bfloat16 *)(base + p.u_off), p.d_order, p.d_start,
                                     glu_out, act);
    else
        launch_expand<__half>(be, p.b, p.nx, T, (__half *)(base + p.u_off), p.d_order, p.d_start, glu_out, act);
    if (kind == PLAN_TC && p.fold_next && !be->sticky) {
        be->lora_next.x = glu_out;
        be->lora_next.w = p.next->w;
        be->lora_next.base = base;
        be->lora_next.T = T;
        be->lora_next.K = Ns[0];
        be->lora_next.n = p.next->n;
        be->lora_next.R = (int)p.next->max_r;
        be->lora_next.off = (size_t)((char *)p.nx.u - base);
    }
}

/* ================= the dense form (lora_matmul) =================
 * Every adapter of a linear sits in a slot of rs ranks of A_all [n * rs, K] and B_all [N, n * rs]
 * (device.c). For a call of n <= 3 projections of one x:
 *   h[T, RU] = x16 A_all_i^T for every linear at once per GEMM (cuBLAS, float32 out; linear i's
 *              slots in columns off_i..), RU = sum of n_i * rs_i
 *   hm       = h with each token's own slot kept, times its scale, rounded to 16 bits, every other
 *              column zero (k_lora_mask: one small pass)
 *   y_i      = hm_i B_all_i^T (cuBLAS, beta 0; beta 1 with acc), then the projection's GEMM onto
 *              it (beta 1, x16 reused).
 * No grouping, no atomics, no K splits: the same bits eager or replayed, for any mix. */
struct dense_lin {
    const struct tuna_lora_w *w; /* descriptors (device): r and scale per slot; NULL: no adapters */
    int off, n, rs;
    int hcol; /* the fold: this linear's hm in the packed rows (column) */
};
struct dense_job {
    dense_lin l[3];
    int nl, RU;
};

__device__ __forceinline__ void dense_put(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void dense_put(__half *p, float v) { *p = __float2half_rn(v); }

/* The fold's hm columns of the packed rows (see dense_call): row t of xa [T, stride] holds x at
 * columns xcol..xcol + K (the norm wrote it there) and each folded linear's hm at its hcol: the
 * token's own slot of h times its scale, rounded to 16 bits; every other slot zero. A thread per 8
 * of the row's stride - K other columns: xcol, K, the hcols and the slots' widths are multiples
 * of 8, so 8 columns never straddle two parts. */
template <typename HT>
__global__ void k_lora_pack(HT *xa, int64_t stride, int64_t K, int64_t xcol, const float *h, const int32_t *adapter,
                            dense_job d)
{
    const int64_t t = blockIdx.x;
    int64_t c0 = 8 * ((int64_t)blockIdx.y * blockDim.x + threadIdx.x);
    if (c0 >= stride - K) return;
    if (c0 >= xcol) c0 += K; /* past x */
    const int a = adapter[t];
    float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < 3; i++) {
        const dense_lin &l = d.l[i];
        if (i >= d.nl || !l.w || c0 < l.hcol || c0 >= l.hcol + (int64_t)l.n * l.rs) continue;
        const int j0 = (int)(c0 - l.hcol), s = j0 / l.rs; /* 8 columns of slot s (rs % 8 == 0) */
        if (s != a) break;
        const int r = (int)l.w[a].r;
        const float sc = l.w[a].scale;
#pragma unroll
        for (int e = 0; e < 8; e++)
            if (j0 - s * l.rs + e < r) v[e] = h[t * d.RU + l.off + j0 + e] * sc;
        break;
    }
    HT o[8];
#pragma unroll
    for (int e = 0; e < 8; e++) dense_put(&o[e], v[e]);
    *reinterpret_cast<uint4 *>(xa + t * stride + c0) = *reinterpret_cast<const uint4 *>(o);
}

template <typename HT> __global__ void k_lora_mask(HT *hm, const float *h, const int32_t *adapter, dense_job d)
{
    const int64_t t = blockIdx.x;
    const int j = (int)(blockIdx.y * blockDim.x + threadIdx.x);
    if (j >= d.RU) return;
    const int a = adapter[t];
    float v = 0.0f;
#pragma unroll
    for (int i = 0; i < 3; i++) {
        const dense_lin &l = d.l[i];
        if (i < d.nl && l.w && j >= l.off && j < l.off + l.n * l.rs) {
            const int s = (j - l.off) / l.rs, c = j - l.off - s * l.rs;
            if (s == a && c < (int)l.w[a].r) v = h[t * d.RU + j] * l.w[a].scale;
        }
    }
    dense_put(hm + t * d.RU + j, v);
}

/* TUNA_LORA_DENSE=0: decline every call (forward.c then takes the lora op's segmented kernels);
 * read at every call (tests switch it). */
static bool dense_on(void)
{
    const char *e = getenv("TUNA_LORA_DENSE");
    return !(e && e[0] == '0');
}

/* The dense call of lora_matmul (x32: float32 x, rounded here; ydt F32) and lora_matmul16 (x32
 * NULL: x16 already in D; ydt F32 with acc, or D). */
static bool dense_call(tuna_backend *be, int n, void *const *ys, enum tuna_dtype ydt, const float *x32, const void *x16,
                       enum tuna_dtype D, const struct tuna_weight *const *ws, const float *const *biases, int64_t T,
                       const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok, bool acc)
{
    if (n == 0) /* lora_matmul16's query: whether calls for steps of T tokens are taken */
        return dense_on() && be->cc_major >= 8 && T > tuna_cuda_gemv_max_t16() && T <= INT32_MAX / 2 &&
               (D == TUNA_DTYPE_BF16 || D == TUNA_DTYPE_F16);
    if (!dense_on() || n < 1 || n > 3 || T <= 0 || T > INT32_MAX / 2 || be->cc_major < 8 || !tok || !tok->adapter)
        return false;
    if (T <= tuna_cuda_gemv_max_t16()) return false; /* decode of 1-2 tokens: the GEMV + lora op */
    if (D != TUNA_DTYPE_BF16 && D != TUNA_DTYPE_F16) return false;
    if (ydt != TUNA_DTYPE_F32 && (ydt != D || acc)) return false;
    const int64_t K = ws[0]->cols;
    dense_job d;
    memset(&d, 0, sizeof d);
    d.nl = n;
    int64_t RU = 0;
    for (int i = 0; i < n; i++) {
        if (ws[i]->dtype != D || ws[i]->cols != K) return false;
        if (ydt != TUNA_DTYPE_F32 && biases && biases[i]) return false;
        const struct tuna_lora_bank *s = sets[i];
        d.l[i].off = (int)RU;
        if (!s || s->n <= 0 || s->max_r <= 0) continue;
        if (s->dtype != D || !s->A_all || !s->B_all || s->rs < s->max_r || s->rs % 8 || s->n > LORA_MAX_N ||
            s->rs > LORA_MAX_R)
            return false;
        d.l[i].w = s->w;
        d.l[i].n = s->n;
        d.l[i].rs = (int)s->rs;
        RU += (int64_t)s->n * s->rs;
    }
    if (RU == 0) return false;
    d.RU = (int)RU;
    /* the fold (backend.h lora_matmul16): x16 is then the packed rows, x at column fxcol */
    int64_t fxcol = 0;
    const int64_t fstride = !x32 && ydt == D && !acc ? tuna_lora_fold_stride(n, sets, &fxcol) : 0;
    const bool fold = fstride > 0;
    for (int i = 0; i < n && fold; i++)
        if (d.l[i].w) d.l[i].hcol = (int)sets[i]->fold_hcol;
    if (fold && (((uintptr_t)x16 % 16) != 0 || K % 8 != 0 || fstride % 8 != 0 || fxcol % 8 != 0)) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "LoRA fold (packed rows not 16-byte aligned)");
        return true;
    }
    if (be->sticky) return true;
    /* the step's adapter per token on the device (the step block's mirror: no upload) */
    struct cuda_meta mt = {0};
    if (!tuna_cuda_meta_begin(be, &mt, (size_t)T * sizeof(int32_t))) return true;
    const size_t o_ad = (size_t)tuna_cuda_meta_stage(be, &mt, tok->adapter, (size_t)T * sizeof(int32_t));
    if (be->sticky || !tuna_cuda_meta_flush(be, &mt)) return true;
    const int32_t *d_ad = (const int32_t *)((const char *)be->meta.p + o_ad);
    const size_t head = TC_COUNT_MAX * sizeof(int), hb = align256((size_t)T * (size_t)RU * sizeof(float));
    char *base = lora_scratch(be, hb + (fold ? 0 : align256((size_t)T * (size_t)RU * 2)));
    if (!base) return true;
    float *h = (float *)(base + head);
    char *hm = base + head + hb;
    be->lora_next.x = NULL; /* no lora call follows that could use a GLU call's u */
    const int dt = D == TUNA_DTYPE_BF16 ? 1 : 2;
    const void *xh = fold ? (const void *)((const char *)x16 + (size_t)fxcol * 2) : x16; /* x's first column */
    const int64_t ldx = fold ? fstride : K;
    if (x32) { /* x in 16 bits once: the shrinks and the projections' GEMMs read it */
        if (!tuna_cuda_to_half(be, x32, T * K, dt, true)) return true;
        xh = be->half.p;
    }
    const cudaDataType_t ct = dt == 1 ? CUDA_R_16BF : CUDA_R_16F, yt = ydt == TUNA_DTYPE_F32 ? CUDA_R_32F : ct;
    const float one = 1.0f, zero = 0.0f;
    /* the shrinks: linears whose A_all lie back to back (device.c groups q/k/v and gate/up) in one
     * GEMM, their h columns being back to back too */
    for (int i = 0; i < n && !be->sticky; i++) {
        if (!d.l[i].w) continue;
        int M = d.l[i].n * d.l[i].rs, j = i + 1;
        for (; j < n; j++) {
            if (!d.l[j].w) continue;
            if ((const char *)sets[j]->A_all != (const char *)sets[i]->A_all + (size_t)M * (size_t)K * 2) break;
            M += d.l[j].n * d.l[j].rs;
        }
        tuna_cuda_check_blas(be,
                             cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, M, (int)T, (int)K, &one, sets[i]->A_all, ct,
                                          (int)K, xh, ct, (int)ldx, &zero, h + d.l[i].off, CUDA_R_32F, (int)RU,
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                             "cublasGemmEx(LoRA shrink, all slots)");
        i = j - 1;
    }
    if (be->sticky) return true;
    if (fold) {
        /* each folded linear's hm into the packed rows, then its GEMM over its folded rows: x W^T
         * and the LoRA term summed in one float32 accumulator, rounded once; no expand GEMMs */
        char *xa = (char *)(uintptr_t)x16; /* the caller's packed rows: the op writes their hm columns */
        const dim3 pg((unsigned)T, (unsigned)(((fstride - K) / 8 + 127) / 128));
        if (dt == 1)
            k_lora_pack<__nv_bfloat16><<<pg, 128, 0, be->stream>>>((__nv_bfloat16 *)xa, fstride, K, fxcol, h, d_ad, d);
        else
            k_lora_pack<__half><<<pg, 128, 0, be->stream>>>((__half *)xa, fstride, K, fxcol, h, d_ad, d);
        if (!tuna_cuda_check_launch(be, "k_lora_pack")) return true;
        for (int i = 0; i < n && !be->sticky; i++) {
            const int64_t N = ws[i]->rows;
            const struct tuna_lora_bank *s = sets[i];
            const bool on = d.l[i].w != NULL;
            tuna_cuda_check_blas(
                be,
                cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)T, (int)(on ? s->fold_k : K), &one,
                             on ? s->fold_w : ws[i]->data, ct, (int)(on ? s->fold_ld : tuna_weight_ld(ws[i])),
                             on ? (const void *)(xa + (size_t)s->fold_xoff * 2) : xh, ct, (int)fstride, &zero, ys[i],
                             ct, (int)N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                on ? "cublasGemmEx(16-bit projection, LoRA folded in)" : "cublasGemmEx(16-bit projection)");
        }
        return true;
    }
    const dim3 grid((unsigned)T, (unsigned)((RU + 127) / 128));
    if (dt == 1) k_lora_mask<__nv_bfloat16><<<grid, 128, 0, be->stream>>>((__nv_bfloat16 *)hm, h, d_ad, d);
    else k_lora_mask<__half><<<grid, 128, 0, be->stream>>>((__half *)hm, h, d_ad, d);
    if (!tuna_cuda_check_launch(be, "k_lora_mask")) return true;
    for (int i = 0; i < n && !be->sticky; i++) {
        const float *bias = biases ? biases[i] : NULL;
        const int64_t N = ws[i]->rows;
        if (d.l[i].w) { /* the LoRA term over the slots (beta 0, or 1 onto the residual stream) */
            const int M = d.l[i].n * d.l[i].rs;
            const int ldb = (int)(sets[i]->fold_ld > 0 ? sets[i]->fold_ld : M); /* B_all in folded rows */
            tuna_cuda_check_blas(be,
                                 cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)T, M, &one, sets[i]->B_all,
                                              ct, ldb, hm + (size_t)d.l[i].off * 2, ct, (int)RU, acc ? &one : &zero,
                                              ys[i], yt, (int)N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                                 "cublasGemmEx(LoRA expand, all slots)");
        }
        const bool onto = acc || d.l[i].w != NULL; /* the projection onto y (beta 1) or into it */
        if (x32) {
            if (onto) (void)tuna_cuda_matmul_onto(be, (float *)ys[i], x32, ws[i], bias, T);
            else tuna_cuda_matmul(be, (float *)ys[i], x32, ws[i], bias, T);
        } else if (ydt == TUNA_DTYPE_F32) {
            (void)tuna_cuda_matmul16(be, ys[i], ydt, x16, D, ws[i], bias, T, onto);
        } else { /* 16-bit y (no bias): cuBLAS rounds x W^T + the LoRA term once */
            tuna_cuda_check_blas(be,
                                 cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)T, (int)K, &one,
                                              ws[i]->data, ct, (int)tuna_weight_ld(ws[i]), x16, ct, (int)K,
                                              onto ? &one : &zero, ys[i], ct,
                                              (int)N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                                 "cublasGemmEx(16-bit projection onto its LoRA term)");
        }
    }
    if (x32) be->half_of = NULL;
    return true;
}

bool tuna_cuda_lora_matmul(tuna_backend *be, int n, float *const *ys, const float *x, const struct tuna_weight *const *ws,
                           const float *const *biases, int64_t T, const struct tuna_lora_bank *const *sets,
                           const struct tuna_lora_tokens *tok, bool acc)
{
    void *yv[3] = {NULL, NULL, NULL};
    for (int i = 0; i < n && i < 3; i++) yv[i] = ys[i];
    return dense_call(be, n, yv, TUNA_DTYPE_F32, x, NULL, n > 0 ? ws[0]->dtype : TUNA_DTYPE_INVALID, ws, biases, T,
                      sets, tok, acc);
}

bool tuna_cuda_lora_matmul16(tuna_backend *be, int n, void *const *ys, enum tuna_dtype ydt, const void *x,
                             enum tuna_dtype adt, const struct tuna_weight *const *ws, const float *const *biases,
                             int64_t T, const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok,
                             bool acc)
{
    return dense_call(be, n, ys, ydt, NULL, x, adt, ws, biases, T, sets, tok, acc);
}
