/* lora.cu — unmerged LoRA on the GPU for a batch that mixes adapters, as a segmented GEMM (the
 * SGMV idea of Punica / S-LoRA): the tokens come grouped by adapter (order/start, built on the
 * host per step and uploaded with the step block), and each adapter's A and B are read once per
 * tile of its tokens instead of once per token.
 *
 *   shrink: part[s, t, :r] = x[t, Ks] A[:r, Ks]^T   block per (token tile, adapter, K split s):
 *           x tile in shared memory, A rows in registers (a warp per rank row, 4 K per lane),
 *           warp sums added in a fixed order into a shared [tile, r] accumulator.
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
#define SH_KS 128      /* K per shrink sub-chunk: 4 per lane */
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

/* The x tile of one sub-chunk [k0, k0 + SH_KS) of the block's tokens, SH_TM * SH_KS / SH_THREADS
 * = 8 floats per thread, loaded into registers one sub-chunk ahead (the loads of the next chunk
 * are in flight while this one is multiplied). vec: float4 loads (K % 4 == 0, aligned x). */
struct x_prefetch {
    float v[8];
};

__device__ __forceinline__ void x_load(struct x_prefetch *p, const float *x, const int32_t *tok, int nt, int64_t K,
                                       int64_t k0, int64_t k_end, bool vec)
{
    if (vec) {
#pragma unroll
        for (int q = 0; q < 2; q++) {
            const int i4 = (int)threadIdx.x + q * SH_THREADS, ti = i4 / (SH_KS / 4), c = (i4 % (SH_KS / 4)) * 4;
            const int64_t k = k0 + c;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (ti < nt && k < k_end) v = *reinterpret_cast<const float4 *>(x + (int64_t)tok[ti] * K + k);
            p->v[4 * q] = v.x, p->v[4 * q + 1] = v.y, p->v[4 * q + 2] = v.z, p->v[4 * q + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int q = 0; q < 8; q++) {
            const int i = (int)threadIdx.x + q * SH_THREADS, ti = i / SH_KS, c = i % SH_KS;
            const int64_t k = k0 + c;
            p->v[q] = ti < nt && k < k_end ? x[(int64_t)tok[ti] * K + k] : 0.0f;
        }
    }
}

__device__ __forceinline__ void x_store(const struct x_prefetch *p, float (*xs)[SH_KS], bool vec)
{
    if (vec) {
#pragma unroll
        for (int q = 0; q < 2; q++) {
            const int i4 = (int)threadIdx.x + q * SH_THREADS, ti = i4 / (SH_KS / 4), c = (i4 % (SH_KS / 4)) * 4;
            *reinterpret_cast<float4 *>(&xs[ti][c]) =
                make_float4(p->v[4 * q], p->v[4 * q + 1], p->v[4 * q + 2], p->v[4 * q + 3]);
        }
    } else {
#pragma unroll
        for (int q = 0; q < 8; q++) {
            const int i = (int)threadIdx.x + q * SH_THREADS;
            xs[i / SH_KS][i % SH_KS] = p->v[q];
        }
    }
}

/* Rank rows a warp multiplies together: their A loads are issued before any of the products. */
#define SH_JU 4

/* part [S, T, R]: each split's partial u of the tokens of one (tile, adapter). */
template <int DT>
__global__ void __launch_bounds__(SH_THREADS)
    k_lora_shrink(float *part, const float *x, int64_t T, int64_t K, int64_t KC, int R, const struct tuna_lora_w *w,
                  const int32_t *order, const int32_t *start)
{
    __shared__ __align__(16) float xs[SH_TM][SH_KS];
    __shared__ float us[SH_TM][LORA_MAX_R];
    __shared__ int32_t tok[SH_TM];
    const int a = blockIdx.y;
    const int g0 = start[a], g1 = start[a + 1], i0 = g0 + (int)blockIdx.x * SH_TM;
    if (i0 >= g1) return;
    const int r = min((int)w[a].r, R);
    if (r <= 0) return;
    const int nt = min(SH_TM, g1 - i0);
    const void *A = w[a].A;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x < SH_TM) tok[threadIdx.x] = (int)threadIdx.x < nt ? order[i0 + threadIdx.x] : 0;
    for (int i = threadIdx.x; i < SH_TM * r; i += SH_THREADS) us[i / r][i % r] = 0.0f;
    const int64_t k_begin = (int64_t)blockIdx.z * KC, k_end = min(K, k_begin + KC);
    /* 4-element loads when every row starts aligned (K a multiple of 4, aligned bases) */
    const bool vec = (K & 3) == 0 && ((uintptr_t)A & (DT == 0 ? 15 : 7)) == 0 && ((uintptr_t)x & 15) == 0;
    __syncthreads(); /* tok */
    struct x_prefetch pf;
    if (k_begin < k_end) x_load(&pf, x, tok, nt, K, k_begin, k_end, vec);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += SH_KS) {
        __syncthreads(); /* the previous chunk consumed */
        x_store(&pf, xs, vec);
        __syncthreads();
        if (k0 + SH_KS < k_end) x_load(&pf, x, tok, nt, K, k0 + SH_KS, k_end, vec);
        const int64_t kl = k0 + lane * 4;
        for (int j0 = warp; j0 < r; j0 += SH_JU * (SH_THREADS / 32)) {
            float av[SH_JU][4];
#pragma unroll
            for (int u = 0; u < SH_JU; u++) {
                const int j = j0 + u * (SH_THREADS / 32);
                if (j < r && vec && kl < k_end) {
                    lora_ld4<DT>(A, (int64_t)j * K + kl, av[u]);
                } else {
#pragma unroll
                    for (int c = 0; c < 4; c++)
                        av[u][c] = j < r && kl + c < k_end ? lora_ld<DT>(A, (int64_t)j * K + kl + c) : 0.0f;
                }
            }
#pragma unroll
            for (int u = 0; u < SH_JU; u++) {
                const int j = j0 + u * (SH_THREADS / 32);
                if (j >= r) break;
                float acc[SH_TM];
#pragma unroll
                for (int ti = 0; ti < SH_TM; ti++) {
                    const float4 xv = *reinterpret_cast<const float4 *>(&xs[ti][lane * 4]);
                    acc[ti] = av[u][0] * xv.x + av[u][1] * xv.y + av[u][2] * xv.z + av[u][3] * xv.w;
                }
#pragma unroll
                for (int ti = 0; ti < SH_TM; ti++)
                    for (int o = 16; o > 0; o >>= 1) acc[ti] += __shfl_xor_sync(0xffffffffu, acc[ti], o);
                if (lane == 0) {
#pragma unroll
                    for (int ti = 0; ti < SH_TM; ti++)
                        if (ti < nt) us[ti][j] += acc[ti]; /* row j belongs to this warp: no race */
                }
            }
        }
    }
    __syncthreads();
    float *p = part + (int64_t)blockIdx.z * T * R;
    for (int i = threadIdx.x; i < nt * r; i += SH_THREADS) p[(int64_t)tok[i / r] * R + i % r] = us[i / r][i % r];
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
    const int64_t nks = (K + SH_KS - 1) / SH_KS;
    const int S = (int)(nks < SH_SMAX ? nks : SH_SMAX);
    const int64_t KC = (nks + S - 1) / S * SH_KS;
    const int R = (int)set->max_r;
    if (!tuna_cuda_grow(be, &be->lora, (size_t)S * (size_t)T * (size_t)R * sizeof(float), "cudaMalloc(LoRA partials)"))
        return;
    char *base = (char *)be->meta.p;
    const int32_t *d_order = (const int32_t *)(base + o_o), *d_start = (const int32_t *)(base + o_s);
    if (dt == 0) launch<0>(be, y, x, T, N, K, S, KC, R, set->n, set->w, d_order, d_start);
    else if (dt == 1) launch<1>(be, y, x, T, N, K, S, KC, R, set->n, set->w, d_order, d_start);
    else launch<2>(be, y, x, T, N, K, S, KC, R, set->n, set->w, d_order, d_start);
}
