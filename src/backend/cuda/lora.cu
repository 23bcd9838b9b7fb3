/* lora.cu — unmerged LoRA on the GPU for a batch that mixes adapters, as a segmented GEMM (the
 * SGMV idea of Punica / S-LoRA): the tokens come grouped by adapter (order/start, built on the
 * host per step and uploaded with the step block), and each adapter's A and B are read once per
 * tile of its tokens instead of once per token.
 *
 *   shrink: part[s, t, :r] = x[t, Ks] A[:r, Ks]^T   block per (token tile, adapter, K split s):
 *           x and A^T sub-chunks staged in shared memory (the next one's loads in flight while
 *           this one is multiplied), a thread owns 4 tokens x 4 ranks over every NS-th k
 *           (register tiling: 16 FMAs per 5 shared loads, no shuffles), slices summed in order.
 *   expand: y[t, n] += scale * sum_s part[s, t, :r] . B[n, :r]   block per (N tile, token tile,
 *           adapter): u = the K splits summed in order, in shared memory; a thread per output
 *           feature n holds B's row in registers for the whole token tile.
 *
 * A and B are in the view's dtype (bf16/f16 in 16-bit mode, float32 in float32 mode), products
 * and sums in float32, activations float32. Every sum has a fixed order and no atomics, so a
 * step replayed from a CUDA graph gives the eager step's bits. The launch configuration depends
 * only on T, N, K, set->n and set->max_r (never on which token uses which adapter): blocks whose
 * tile lies past their adapter's group exit at once. Adapter descriptors (set->w) are read from
 * device memory in place. */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

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
    const bool vec = (r & 7) == 0 && ((uintptr_t)B & 15) == 0;
    float acc[EX_TM];
#pragma unroll
    for (int ti = 0; ti < EX_TM; ti++) acc[ti] = 0.0f;
    for (int jb = 0; jb < r; jb += EX_JB) {
        float b[EX_JB];
#pragma unroll
        for (int c8 = 0; c8 < EX_JB; c8 += 8) {
            const int j0 = jb + c8;
            if (vec && j0 < r) {
                lora_ld4<DT>(B, n * r + j0, b + c8);
                lora_ld4<DT>(B, n * r + j0 + 4, b + c8 + 4);
            } else {
#pragma unroll
                for (int c = 0; c < 8; c++) b[c8 + c] = j0 + c < r ? lora_ld<DT>(B, n * r + j0 + c) : 0.0f;
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

template <int DT>
static void launch(tuna_backend *be, float *y, const float *x, int64_t T, int64_t N, int64_t K, int S, int64_t KC,
                   int R, int n, const struct tuna_lora_w *w, const int32_t *order, const int32_t *start)
{
    float *part = (float *)be->lora.p;
    dim3 gs((unsigned)((T + SH_TM - 1) / SH_TM), (unsigned)n, (unsigned)S);
    k_lora_shrink<DT><<<gs, SH_THREADS, 0, be->stream>>>(part, x, T, K, KC, R, w, order, start);
    if (!tuna_cuda_check_launch(be, "k_lora_shrink")) return;
    dim3 ge((unsigned)((N + EX_NT - 1) / EX_NT), (unsigned)((T + EX_TM - 1) / EX_TM), (unsigned)n);
    k_lora_expand<DT><<<ge, EX_NT, 0, be->stream>>>(y, part, T, N, S, R, w, order, start);
    tuna_cuda_check_launch(be, "k_lora_expand");
}

void tuna_cuda_lora(tuna_backend *be, float *y, const float *x, int64_t T, int64_t N, int64_t K,
                    const struct tuna_lora_bank *set, const struct tuna_lora_tokens *tok)
{
    if (be->sticky || T <= 0 || N <= 0 || K <= 0 || set->n <= 0 || set->max_r <= 0) return;
    if (set->n > LORA_MAX_N || set->max_r > LORA_MAX_R) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "lora (more than 64 adapters or a rank over 256 on one layer)");
        return;
    }
    const int dt = set->dtype == TUNA_DTYPE_F32 ? 0 : set->dtype == TUNA_DTYPE_BF16 ? 1 : set->dtype == TUNA_DTYPE_F16 ? 2 : -1;
    if (dt < 0 || T > INT32_MAX / 2) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "lora (adapter dtype or token count)");
        return;
    }
    /* the tokens grouped by adapter: the caller's (step block) or made here */
    const int32_t *order = tok->order, *start = tok->start;
    int ng = tok->n_groups;
    int32_t *own = NULL;
    if (!order || !start || ng < set->n) {
        ng = set->n;
        own = (int32_t *)malloc((size_t)(T + ng + 1) * sizeof(int32_t));
        if (!own) {
            tuna_cuda_check(be, cudaErrorMemoryAllocation, "lora (host grouping buffer)");
            return;
        }
        tuna_lora_group(tok->adapter, T, ng, own, own + T);
        order = own;
        start = own + T;
    }
    struct cuda_meta m = {0};
    bool ok = tuna_cuda_meta_begin(be, &m, (size_t)(T + ng + 1) * sizeof(int32_t));
    size_t o_o = ok ? (size_t)tuna_cuda_meta_stage(be, &m, order, (size_t)T * sizeof(int32_t)) : 0;
    size_t o_s = ok ? (size_t)tuna_cuda_meta_stage(be, &m, start, (size_t)(ng + 1) * sizeof(int32_t)) : 0;
    free(own); /* staged: copied into the pinned arena */
    if (!ok || be->sticky || !tuna_cuda_meta_flush(be, &m)) return;
    /* K split into S ranges of whole sub-chunks */
    const int64_t nks = (K + SH_KSMAX - 1) / SH_KSMAX;
    const int S = (int)(nks < SH_SMAX ? nks : SH_SMAX);
    const int64_t KC = (nks + S - 1) / S * SH_KSMAX;
    const int R = (int)set->max_r;
    if (!tuna_cuda_grow(be, &be->lora, (size_t)S * (size_t)T * (size_t)R * sizeof(float), "cudaMalloc(LoRA partials)"))
        return;
    char *base = (char *)be->meta.p;
    const int32_t *d_order = (const int32_t *)(base + o_o), *d_start = (const int32_t *)(base + o_s);
    if (dt == 0) launch<0>(be, y, x, T, N, K, S, KC, R, set->n, set->w, d_order, d_start);
    else if (dt == 1) launch<1>(be, y, x, T, N, K, S, KC, R, set->n, set->w, d_order, d_start);
    else launch<2>(be, y, x, T, N, K, S, KC, R, set->n, set->w, d_order, d_start);
}
