/* lora_expand.cu — the dense LoRA form's expands of a projection group in one launch (see
 * lora_expand.h for what it computes). Each token reads only its own slot's rs columns of hm, so
 * an output costs rs MACs; the cost is bytes: y once (written, or read and written with add), B_all
 * once per block.
 *
 * Blocks: grid x = 128-row blocks of the group's linears (rows numbered across them, q/k/v in one
 * launch), grid y = chunks of the tokens. A block stages its rows of B_all transposed in shared
 * memory (sB[c][row], c = slot * rs + j: a warp's lanes read 4 consecutive rows each, 256 bytes in
 * a row: no bank conflicts) together with the chunk's slots (<= 512 tokens; all these loads in
 * flight at once), then walks the chunk 64 tokens at a time: their rs values of hm (as float) into
 * shared memory (the next 64 tokens' loaded while these are computed), then each warp a token at a time: lane l computes
 * rows 4l..4l+3 (rs loads of 4 x 16 bits, 4 rs FMAs) and stores them together (a warp writes 256
 * contiguous bytes of y). Every output's sum runs in j order: the same bits eager or replayed. */
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "backend/cuda/lora_expand.h"

#define LE_NR 128      /* rows per block: 32 lanes x 4 */
#define LE_TS 64       /* tokens staged at a time */
#define LE_THREADS 256 /* 8 warps */
#define LE_SMEM_MAX 49152
#define LE_MMAX 192                               /* slot columns of a linear at most */
#define LE_BQ (LE_NR * LE_MMAX / 8 / LE_THREADS)  /* 16-byte B loads per thread */
#define LE_RSMAX 32
#define LE_HQ (LE_TS * LE_RSMAX / LE_THREADS)     /* hm values per thread per staged tokens */
#define LE_TCH 512                                /* tokens per chunk at most */

struct le_job {
    void *y[3];
    const uint16_t *B[3];
    int64_t N[3];
    int off[3], n[3], rs[3], vec[3];
    int rb0[4]; /* the first row block of each linear; rb0[nl] = all */
    int nl, RU, tch;
    int64_t T;
};

template <int HDT> __device__ __forceinline__ float le_f(uint32_t h)
{
    if (HDT == 1) return __uint_as_float(h << 16);
    return __half2float(__ushort_as_half((unsigned short)h));
}

template <int HDT> __device__ __forceinline__ uint32_t le_h(float v)
{
    if (HDT == 1) return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v));
    return (uint32_t)__half_as_ushort(__float2half_rn(v));
}

/* 4 outputs of one token: y[0..4) = acc (+ y with ADD); vec: one 8- or 16-byte access, else each
 * element below `lim` alone */
template <int HDT, bool ADD> __device__ __forceinline__ void le_store(uint16_t *y, const float *acc, bool vec, int lim)
{
    if (vec) {
        uint2 o;
        if (ADD) {
            const uint2 v = *reinterpret_cast<const uint2 *>(y);
            o.x = le_h<HDT>(le_f<HDT>(v.x & 0xffffu) + acc[0]) | le_h<HDT>(le_f<HDT>(v.x >> 16) + acc[1]) << 16;
            o.y = le_h<HDT>(le_f<HDT>(v.y & 0xffffu) + acc[2]) | le_h<HDT>(le_f<HDT>(v.y >> 16) + acc[3]) << 16;
        } else {
            o.x = le_h<HDT>(acc[0]) | le_h<HDT>(acc[1]) << 16;
            o.y = le_h<HDT>(acc[2]) | le_h<HDT>(acc[3]) << 16;
        }
        *reinterpret_cast<uint2 *>(y) = o;
        return;
    }
    for (int k = 0; k < 4 && k < lim; k++)
        y[k] = (uint16_t)(ADD ? le_h<HDT>(le_f<HDT>(y[k]) + acc[k]) : le_h<HDT>(acc[k]));
}

template <int HDT, bool ADD> __device__ __forceinline__ void le_store(float *y, const float *acc, bool vec, int lim)
{
    if (vec) {
        float4 o = make_float4(acc[0], acc[1], acc[2], acc[3]);
        if (ADD) {
            const float4 v = *reinterpret_cast<const float4 *>(y);
            o.x += v.x, o.y += v.y, o.z += v.z, o.w += v.w;
        }
        *reinterpret_cast<float4 *>(y) = o;
        return;
    }
    for (int k = 0; k < 4 && k < lim; k++) y[k] = ADD ? y[k] + acc[k] : acc[k];
}

/* hm values of tokens [tc, tc + nt) of the chunk (slots in sA, indexed from the chunk's start)
 * into registers: item i = threadIdx.x + q * LE_THREADS is token i / rs, rank i % rs; all loads
 * in flight together */
template <int HDT>
__device__ __forceinline__ void le_load_h(float *hv, const uint16_t *hm, const int *sA, int64_t t_begin, int64_t tc,
                                          int nt, int rs, int RU, int off)
{
#pragma unroll
    for (int q = 0; q < LE_HQ; q++) {
        const int i = (int)threadIdx.x + q * LE_THREADS, tt = i / rs, j = i - tt * rs;
        const int a = tt < nt ? sA[tc - t_begin + tt] : -1;
        hv[q] = a >= 0 ? le_f<HDT>(hm[(tc + tt) * RU + off + a * rs + j]) : 0.0f;
    }
}

template <int HDT, typename YT, bool ADD>
__global__ void __launch_bounds__(LE_THREADS) k_lora_expand_group(le_job d, const uint16_t *hm, const int32_t *adapter)
{
    extern __shared__ __align__(16) unsigned char le_sm[];
    int li = 0;
    while (li + 1 < d.nl && (int)blockIdx.x >= d.rb0[li + 1]) li++;
    const int64_t N = d.N[li];
    const int n = d.n[li], rs = d.rs[li], M = n * rs, off = d.off[li];
    const int64_t r0 = (int64_t)((int)blockIdx.x - d.rb0[li]) * LE_NR;
    uint16_t *sB = reinterpret_cast<uint16_t *>(le_sm);                   /* [M][LE_NR] */
    float *sH = reinterpret_cast<float *>(le_sm + (size_t)M * LE_NR * 2); /* [LE_TS][rs] */
    int *sA = reinterpret_cast<int *>(sH + LE_TS * rs);                   /* [LE_TCH]: the chunk's slots */
    const uint16_t *B = d.B[li];
    const int m8 = M >> 3;
    const int64_t t_begin = (int64_t)blockIdx.y * d.tch, t_end = min(d.T, t_begin + d.tch);
    const int ntc = (int)(t_end - t_begin);
    /* the block's rows of B_all and the chunk's slots: every load issued before the first store */
    uint4 bv[LE_BQ];
    int av[LE_TCH / LE_THREADS];
#pragma unroll
    for (int q = 0; q < LE_BQ; q++) {
        const int i = (int)threadIdx.x + q * LE_THREADS, rr = i % LE_NR, c8 = i / LE_NR;
        bv[q] = make_uint4(0u, 0u, 0u, 0u);
        if (c8 < m8 && r0 + rr < N) bv[q] = *reinterpret_cast<const uint4 *>(B + (r0 + rr) * M + c8 * 8);
    }
#pragma unroll
    for (int q = 0; q < LE_TCH / LE_THREADS; q++) {
        const int i = (int)threadIdx.x + q * LE_THREADS;
        int a = i < ntc ? adapter[t_begin + i] : -1;
        av[q] = a >= n ? -1 : a;
    }
#pragma unroll
    for (int q = 0; q < LE_BQ; q++) {
        const int i = (int)threadIdx.x + q * LE_THREADS, rr = i % LE_NR, c8 = i / LE_NR;
        if (c8 >= m8) continue;
        const uint32_t w[4] = {bv[q].x, bv[q].y, bv[q].z, bv[q].w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            sB[(c8 * 8 + 2 * k) * LE_NR + rr] = (uint16_t)(w[k] & 0xffffu);
            sB[(c8 * 8 + 2 * k + 1) * LE_NR + rr] = (uint16_t)(w[k] >> 16);
        }
    }
#pragma unroll
    for (int q = 0; q < LE_TCH / LE_THREADS; q++) sA[(int)threadIdx.x + q * LE_THREADS] = av[q];
    __syncthreads();
    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int64_t rl = r0 + 4 * lane; /* this lane's first row */
    const bool vec = d.vec[li] && rl + 3 < N;
    const int lim = (int)min((int64_t)4, N - rl);
    YT *y = reinterpret_cast<YT *>(d.y[li]);
    float hv[LE_HQ];
    le_load_h<HDT>(hv, hm, sA, t_begin, t_begin, (int)min((int64_t)LE_TS, t_end - t_begin), rs, d.RU, off);
    for (int64_t tc = t_begin; tc < t_end; tc += LE_TS) {
        const int nt = (int)min((int64_t)LE_TS, t_end - tc);
        __syncthreads(); /* the previous tokens' sH consumed */
#pragma unroll
        for (int q = 0; q < LE_HQ; q++) {
            const int i = (int)threadIdx.x + q * LE_THREADS;
            if (i < LE_TS * rs) sH[i] = hv[q];
        }
        __syncthreads();
        if (tc + LE_TS < t_end) /* the next tokens' hm, in flight while these are computed */
            le_load_h<HDT>(hv, hm, sA, t_begin, tc + LE_TS, (int)min((int64_t)LE_TS, t_end - tc - LE_TS), rs, d.RU,
                           off);
        if (rl >= N) continue;
        for (int tt = warp; tt < nt; tt += LE_THREADS / 32) {
            const int a = sA[tc - t_begin + tt];
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            YT *yr = y + (tc + tt) * N + rl;
            if (a < 0) {
                if (!ADD) le_store<HDT, false>(yr, acc, vec, lim);
                continue;
            }
            const uint16_t *bp = sB + a * rs * LE_NR + 4 * lane;
            const float *hp = sH + tt * rs;
            for (int j0 = 0; j0 < rs; j0 += 8) {
#pragma unroll
                for (int q = 0; q < 8; q++) {
                    const float h = hp[j0 + q];
                    const uint2 b = *reinterpret_cast<const uint2 *>(bp + (j0 + q) * LE_NR);
                    acc[0] = fmaf(h, le_f<HDT>(b.x & 0xffffu), acc[0]);
                    acc[1] = fmaf(h, le_f<HDT>(b.x >> 16), acc[1]);
                    acc[2] = fmaf(h, le_f<HDT>(b.y & 0xffffu), acc[2]);
                    acc[3] = fmaf(h, le_f<HDT>(b.y >> 16), acc[3]);
                }
            }
            le_store<HDT, ADD>(yr, acc, vec, lim);
        }
    }
}

template <int HDT, typename YT, bool ADD>
static int le_launch(cudaStream_t st, dim3 grid, size_t smem, const le_job &d, const void *hm, const int32_t *adapter)
{
    k_lora_expand_group<HDT, YT, ADD>
        <<<grid, LE_THREADS, smem, st>>>(d, reinterpret_cast<const uint16_t *>(hm), adapter);
    return cudaGetLastError() == cudaSuccess ? 0 : -1;
}

extern "C" int tuna_cuda_lora_expand(void *stream, int sm_count, int nl, const struct tuna_lora_expand_lin *lin,
                                     const void *hm, int RU, const int32_t *adapter, int64_t T, int hdt, int yf32,
                                     int add, int chunks)
{
    if (nl < 1 || nl > 3 || (hdt != 1 && hdt != 2) || T <= 0 || T > INT32_MAX / 2 || RU <= 0 || !hm || !adapter)
        return 1;
    le_job d = {};
    int rb = 0, mmax = 0, rsmax = 0;
    for (int i = 0; i < nl; i++) {
        const struct tuna_lora_expand_lin &l = lin[i];
        if (l.n <= 0) continue;
        const int64_t M = (int64_t)l.n * l.rs;
        if (l.rs < 8 || l.rs > LE_RSMAX || l.rs % 8 || M > LE_MMAX || l.off < 0 || l.off + M > RU || !l.y || !l.B ||
            ((uintptr_t)l.B & 15) || l.N <= 0 || l.N > ((int64_t)1 << 30))
            return 1;
        const int k = d.nl++;
        d.y[k] = l.y;
        d.B[k] = (const uint16_t *)l.B;
        d.N[k] = l.N;
        d.off[k] = l.off, d.n[k] = l.n, d.rs[k] = l.rs;
        d.vec[k] = l.N % 4 == 0 && ((uintptr_t)l.y % (yf32 ? 16 : 8)) == 0;
        d.rb0[k] = rb;
        rb += (int)((l.N + LE_NR - 1) / LE_NR);
        mmax = M > mmax ? (int)M : mmax;
        rsmax = l.rs > rsmax ? l.rs : rsmax;
    }
    if (d.nl == 0) return 0;
    d.rb0[d.nl] = rb;
    const size_t smem = (size_t)mmax * LE_NR * 2 + (size_t)LE_TS * rsmax * 4 + LE_TCH * 4;
    if (smem > LE_SMEM_MAX) return 1;
    d.RU = RU;
    d.T = T;
    if (chunks <= 0) { /* about two blocks per SM, at least 16 and at most LE_TCH tokens per chunk */
        const int target = 2 * (sm_count > 0 ? sm_count : 132);
        chunks = (target + rb - 1) / rb;
    }
    const int64_t cmax = (T + 15) / 16, cmin = (T + LE_TCH - 1) / LE_TCH;
    if (chunks > cmax) chunks = (int)cmax;
    if (chunks < cmin) chunks = (int)cmin;
    if (chunks > 65535) return 1;
    if (sm_count < 0) return 0; /* the check only */
    d.tch = (int)((T + chunks - 1) / chunks);
    const dim3 grid((unsigned)rb, (unsigned)((T + d.tch - 1) / d.tch));
    const cudaStream_t st = (cudaStream_t)stream;
    if (hdt == 1) {
        if (yf32) return add ? le_launch<1, float, true>(st, grid, smem, d, hm, adapter)
                             : le_launch<1, float, false>(st, grid, smem, d, hm, adapter);
        return add ? le_launch<1, uint16_t, true>(st, grid, smem, d, hm, adapter)
                   : le_launch<1, uint16_t, false>(st, grid, smem, d, hm, adapter);
    }
    if (yf32) return add ? le_launch<2, float, true>(st, grid, smem, d, hm, adapter)
                         : le_launch<2, float, false>(st, grid, smem, d, hm, adapter);
    return add ? le_launch<2, uint16_t, true>(st, grid, smem, d, hm, adapter)
               : le_launch<2, uint16_t, false>(st, grid, smem, d, hm, adapter);
}
