/* train_flash_mma.cu — the training flash attention (train_flash.cu's contract: bf16 mode, causal
 * training layout, optional sliding window) on mma.sync m16n8k16 with the fragments kept in
 * registers (mma.cuh), for head dims 64 and 128. The WMMA kernels of train_flash.cu round-tripped
 * every S, P and O tile through shared memory and ran the softmax row by row: ~14 TFLOP/s forward
 * at 7B shapes (H100 r1 profile: 2.5 ms forward, 5.9 ms backward per layer at 2048 tokens).
 *
 * Forward (one block of 4 warps per 64-query tile and head; warp w owns query rows 16w..16w+15):
 * Q fragments loaded once; for each 64-key tile: S = Q K^T (8 n-tiles of 8 keys), masked and
 * scaled, the online softmax on the fragments (each thread holds two rows; row max and sum over
 * the 4 threads of a quad), P rounded to bf16 straight into A fragments (the C layout of two
 * n-tiles is the A layout of one k-step), O += P V with V read by ldmatrix.trans. The denominator
 * sums the bf16-rounded P, as the WMMA kernel does. Writes O / l and lse = (m + log2 l) ln 2.
 *
 * Backward (FlashAttention-2; one block of 4 warps per 64-key tile and kv head; warp w owns key
 * rows 16w..16w+15 and accumulates their dK and dV in registers over every query head of the
 * GQA group and every query tile that sees the keys): S^T = K Q^T and dP^T = V dO^T, P^T =
 * exp2(S^T scale log2e - lse log2e), dS^T = P^T (dP^T - delta) scale with delta = rowsum(dO * O)
 * (float32, one small kernel before), dV += P^T dO, dK += dS^T Q; dS^T goes to shared memory and
 * warp w computes dQ for query rows 16w.. (dS K, read transposed), added to dq with float atomics.
 *
 * Inputs are the float32 activations, rounded to bf16 as tiles are loaded (float4 loads: rows
 * must be 16-byte aligned, which the caller checks). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/mma.cuh"
#include "backend/cuda/train_cuda.h"

typedef __nv_bfloat16 fm_bf16;

#define FM_T 64
#define FM_THREADS 128

template <int DP> static size_t fm_fwd_smem() { return (size_t)3 * FM_T * (DP + 8) * 2; }
template <int DP> static size_t fm_bwd_smem()
{
    return (size_t)4 * FM_T * (DP + 8) * 2 + (size_t)FM_T * (FM_T + 8) * 2 + 2 * FM_T * 4;
}

/* rows [r0, r0 + 64) of a [n, stride] float matrix (DP columns) into a bf16 tile [64, DP + 8];
 * zeros past n */
template <int DP> static __device__ __forceinline__ void fm_load(fm_bf16 *dst, const float *src, int64_t stride, int r0, int n)
{
    constexpr int LD = DP + 8, V4 = DP / 4;
    for (int idx = threadIdx.x; idx < FM_T * V4; idx += FM_THREADS) {
        const int r = idx / V4, c = (idx - r * V4) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r0 + r < n) x = *reinterpret_cast<const float4 *>(src + (int64_t)(r0 + r) * stride + c);
        uint2 u;
        u.x = mma_pack<fm_bf16>(x.x, x.y);
        u.y = mma_pack<fm_bf16>(x.z, x.w);
        *reinterpret_cast<uint2 *>(dst + r * LD + c) = u;
    }
}

static __device__ __forceinline__ bool fm_visible(int i, int j, int n, int window)
{
    return i < n && j <= i && (window <= 0 || j > i - window);
}

static __device__ __forceinline__ float fm_bf_lo(uint32_t u) { return __uint_as_float(u << 16); }
static __device__ __forceinline__ float fm_bf_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

template <int DP>
__global__ void __launch_bounds__(FM_THREADS) k_flash_fwd_mma(float *out, float *lse, const float *q, const float *k,
                                                               const float *v, int n, int H, int Hkv, float scale2,
                                                               int window)
{
#if TUNA_MMA_SM80
    constexpr int LD = DP + 8, NK = DP / 16, ND = DP / 8;
    extern __shared__ __align__(128) unsigned char fm_smem[];
    fm_bf16 *sQ = (fm_bf16 *)fm_smem, *sK = sQ + FM_T * LD, *sV = sK + FM_T * LD;
    const int qt = (int)gridDim.x - 1 - (int)blockIdx.x; /* longest tiles first */
    const int h = blockIdx.y, kvh = h / (H / Hkv), i0 = qt * FM_T;
    const int64_t HD = (int64_t)H * DP, KD = (int64_t)Hkv * DP;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, li = lane >> 3;
    fm_load<DP>(sQ, q + (int64_t)h * DP, HD, i0, n);
    __syncthreads();
    uint32_t qf[NK][4];
#pragma unroll
    for (int kk = 0; kk < NK; kk++)
        mma_ldsm_x4(qf[kk], mma_smem(sQ + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
    float o[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++)
        o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; /* rows g and g + 8 of the warp */
    const int ia = i0 + warp * 16 + g, ib = ia + 8;
    const int ilast = min(i0 + FM_T - 1, n - 1);
    const int jlo = window > 0 ? max(0, i0 - window + 1) : 0;
    for (int kt = jlo / FM_T; kt <= ilast / FM_T; kt++) {
        const int j0 = kt * FM_T;
        __syncthreads(); /* the previous tile's K and V are no longer read */
        fm_load<DP>(sK, k + (int64_t)kvh * DP, KD, j0, n);
        fm_load<DP>(sV, v + (int64_t)kvh * DP, KD, j0, n);
        __syncthreads();
        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < NK; kk++)
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                uint32_t b[4];
                mma_ldsm_x4(b, mma_smem(sK + ((nt + (li >> 1)) * 8 + (lane & 7)) * LD + kk * 16 + (li & 1) * 8));
                mma_16816<fm_bf16>(s[nt], qf[kk], b[0], b[1]);
                mma_16816<fm_bf16>(s[nt + 1], qf[kk], b[2], b[3]);
            }
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + nt * 8 + 2 * c + (e & 1), i = e < 2 ? ia : ib;
                const float x = fm_visible(i, j, n, window) ? s[nt][e] * scale2 : -INFINITY;
                s[nt][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x);
                else mx1 = fmaxf(mx1, x);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float al0 = m0 == -INFINITY ? 0.0f : exp2f(m0 - mx0), al1 = m1 == -INFINITY ? 0.0f : exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        l0 *= al0;
        l1 *= al1;
#pragma unroll
        for (int nd = 0; nd < ND; nd++) {
            o[nd][0] *= al0;
            o[nd][1] *= al0;
            o[nd][2] *= al1;
            o[nd][3] *= al1;
        }
        uint32_t pa[4][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            const float p0 = s[nt][0] == -INFINITY ? 0.0f : exp2f(s[nt][0] - m0);
            const float p1 = s[nt][1] == -INFINITY ? 0.0f : exp2f(s[nt][1] - m0);
            const float p2 = s[nt][2] == -INFINITY ? 0.0f : exp2f(s[nt][2] - m1);
            const float p3 = s[nt][3] == -INFINITY ? 0.0f : exp2f(s[nt][3] - m1);
            const uint32_t lo = mma_pack<fm_bf16>(p0, p1), hi = mma_pack<fm_bf16>(p2, p3);
            l0 += fm_bf_lo(lo) + fm_bf_hi(lo);
            l1 += fm_bf_lo(hi) + fm_bf_hi(hi);
            pa[nt >> 1][(nt & 1) * 2] = lo;
            pa[nt >> 1][(nt & 1) * 2 + 1] = hi;
        }
#pragma unroll
        for (int ks = 0; ks < 4; ks++)
#pragma unroll
            for (int nd = 0; nd < ND; nd += 2) {
                uint32_t b[4];
                mma_ldsm_x4_t(b, mma_smem(sV + (ks * 16 + (li & 1) * 8 + (lane & 7)) * LD + (nd + (li >> 1)) * 8));
                mma_16816<fm_bf16>(o[nd], pa[ks], b[0], b[1]);
                mma_16816<fm_bf16>(o[nd + 1], pa[ks], b[2], b[3]);
            }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int nd = 0; nd < ND; nd++) {
        if (ia < n)
            *reinterpret_cast<float2 *>(out + (int64_t)ia * HD + (int64_t)h * DP + nd * 8 + 2 * c) =
                make_float2(o[nd][0] * inv0, o[nd][1] * inv0);
        if (ib < n)
            *reinterpret_cast<float2 *>(out + (int64_t)ib * HD + (int64_t)h * DP + nd * 8 + 2 * c) =
                make_float2(o[nd][2] * inv1, o[nd][3] * inv1);
    }
    if (lse && c == 0) {
        if (ia < n) lse[(int64_t)ia * H + h] = (m0 + log2f(l0)) * 0.69314718055994531f;
        if (ib < n) lse[(int64_t)ib * H + h] = (m1 + log2f(l1)) * 0.69314718055994531f;
    }
#endif
}

/* delta[i, h] = sum_d dout[i, h, d] out[i, h, d] (float32), one warp per (row, head) */
__global__ void k_flash_delta(float *delta, const float *dout, const float *out, int64_t rows, int D)
{
    const int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= rows) return;
    float d = 0.0f;
    for (int c = lane; c < D; c += 32)
        d += dout[w * D + c] * out[w * D + c];
    d = tuna_warp_sum(d);
    if (lane == 0) delta[w] = d;
}

static __device__ __forceinline__ void fm_atomic_add2(float *p, float a, float b)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2 *>(p), make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

template <int DP>
__global__ void __launch_bounds__(FM_THREADS) k_flash_bwd_mma(float *dq, float *dk, float *dv, const float *dout,
                                                               const float *lse, const float *delta, const float *q,
                                                               const float *k, const float *v, int n, int H, int Hkv,
                                                               float scale, int window)
{
#if TUNA_MMA_SM80
    constexpr int LD = DP + 8, NK = DP / 16, ND = DP / 8, LS = FM_T + 8;
    extern __shared__ __align__(128) unsigned char fm_smem[];
    fm_bf16 *sK = (fm_bf16 *)fm_smem, *sV = sK + FM_T * LD, *sQ = sV + FM_T * LD, *sdO = sQ + FM_T * LD;
    fm_bf16 *sdS = sdO + FM_T * LD; /* [64 keys, LS] */
    float *sLse = (float *)(sdS + FM_T * LS), *sDelta = sLse + FM_T;
    const int group = H / Hkv, kvh = blockIdx.y, j0 = blockIdx.x * FM_T;
    const int64_t HD = (int64_t)H * DP, KD = (int64_t)Hkv * DP;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, li = lane >> 3;
    const float log2e = 1.4426950408889634f, scale2 = scale * log2e;
    fm_load<DP>(sK, k + (int64_t)kvh * DP, KD, j0, n);
    fm_load<DP>(sV, v + (int64_t)kvh * DP, KD, j0, n);
    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            dka[nd][e] = dva[nd][e] = 0.0f;
    const int ka = j0 + warp * 16 + g, kb = ka + 8; /* this thread's key rows */
    const int jlast = min(j0 + FM_T - 1, n - 1);
    const int ilast = window > 0 ? min(n - 1, jlast + window - 1) : n - 1;
    for (int gi = 0; gi < group; gi++) {
        const int h = kvh * group + gi;
        for (int qt = j0 / FM_T; qt <= ilast / FM_T; qt++) {
            const int i0 = qt * FM_T;
            __syncthreads(); /* the previous tile's Q, dO and dS are no longer read */
            fm_load<DP>(sQ, q + (int64_t)h * DP, HD, i0, n);
            fm_load<DP>(sdO, dout + (int64_t)h * DP, HD, i0, n);
            if (threadIdx.x < FM_T) {
                const int i = i0 + threadIdx.x;
                sLse[threadIdx.x] = i < n ? lse[(int64_t)i * H + h] * log2e : 0.0f;
                sDelta[threadIdx.x] = i < n ? delta[(int64_t)i * H + h] : 0.0f;
            }
            __syncthreads();
            /* S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the tile's 64 queries */
            float s[8][4], dp[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < NK; kk++) {
                uint32_t ak[4], av[4];
                mma_ldsm_x4(ak, mma_smem(sK + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
                mma_ldsm_x4(av, mma_smem(sV + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
#pragma unroll
                for (int nt = 0; nt < 8; nt += 2) {
                    uint32_t b[4];
                    const int row = (nt + (li >> 1)) * 8 + (lane & 7), col = kk * 16 + (li & 1) * 8;
                    mma_ldsm_x4(b, mma_smem(sQ + row * LD + col));
                    mma_16816<fm_bf16>(s[nt], ak, b[0], b[1]);
                    mma_16816<fm_bf16>(s[nt + 1], ak, b[2], b[3]);
                    mma_ldsm_x4(b, mma_smem(sdO + row * LD + col));
                    mma_16816<fm_bf16>(dp[nt], av, b[0], b[1]);
                    mma_16816<fm_bf16>(dp[nt + 1], av, b[2], b[3]);
                }
            }
            /* P^T and dS^T as bf16 A fragments (keys x queries); dS^T also to shared memory */
            uint32_t pf[4][4], dsf[4][4];
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                float p[4], ds[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qc = nt * 8 + 2 * c + (e & 1), key = e < 2 ? ka : kb;
                    p[e] = fm_visible(i0 + qc, key, n, window) ? exp2f(s[nt][e] * scale2 - sLse[qc]) : 0.0f;
                    ds[e] = p[e] * (dp[nt][e] - sDelta[qc]) * scale;
                }
                pf[nt >> 1][(nt & 1) * 2] = mma_pack<fm_bf16>(p[0], p[1]);
                pf[nt >> 1][(nt & 1) * 2 + 1] = mma_pack<fm_bf16>(p[2], p[3]);
                const uint32_t d01 = mma_pack<fm_bf16>(ds[0], ds[1]), d23 = mma_pack<fm_bf16>(ds[2], ds[3]);
                dsf[nt >> 1][(nt & 1) * 2] = d01;
                dsf[nt >> 1][(nt & 1) * 2 + 1] = d23;
                *reinterpret_cast<uint32_t *>(sdS + (warp * 16 + g) * LS + nt * 8 + 2 * c) = d01;
                *reinterpret_cast<uint32_t *>(sdS + (warp * 16 + g + 8) * LS + nt * 8 + 2 * c) = d23;
            }
            /* dV += P^T dO, dK += dS^T Q (B read transposed: queries are the k dimension) */
#pragma unroll
            for (int ks = 0; ks < 4; ks++)
#pragma unroll
                for (int nd = 0; nd < ND; nd += 2) {
                    uint32_t b[4];
                    const int row = ks * 16 + (li & 1) * 8 + (lane & 7), col = (nd + (li >> 1)) * 8;
                    mma_ldsm_x4_t(b, mma_smem(sdO + row * LD + col));
                    mma_16816<fm_bf16>(dva[nd], pf[ks], b[0], b[1]);
                    mma_16816<fm_bf16>(dva[nd + 1], pf[ks], b[2], b[3]);
                    mma_ldsm_x4_t(b, mma_smem(sQ + row * LD + col));
                    mma_16816<fm_bf16>(dka[nd], dsf[ks], b[0], b[1]);
                    mma_16816<fm_bf16>(dka[nd + 1], dsf[ks], b[2], b[3]);
                }
            __syncthreads(); /* every warp's dS^T rows are in shared memory */
            /* dQ rows 16w..16w+15 of the tile = dS K over the block's 64 keys, in two halves of D */
            const int qa = i0 + warp * 16 + g, qb = qa + 8;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                float acc[ND / 2][4];
#pragma unroll
                for (int nd = 0; nd < ND / 2; nd++)
                    acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;
#pragma unroll
                for (int ks = 0; ks < 4; ks++) {
                    uint32_t a[4];
                    /* A = dS [queries, keys] from sdS [keys, queries]: transposed 8x8 tiles */
                    mma_ldsm_x4_t(a, mma_smem(sdS + (ks * 16 + (li >> 1) * 8 + (lane & 7)) * LS + warp * 16 +
                                              (li & 1) * 8));
#pragma unroll
                    for (int nd = 0; nd < ND / 2; nd += 2) {
                        uint32_t b[4];
                        const int row = ks * 16 + (li & 1) * 8 + (lane & 7), col = (half * ND / 2 + nd + (li >> 1)) * 8;
                        mma_ldsm_x4_t(b, mma_smem(sK + row * LD + col));
                        mma_16816<fm_bf16>(acc[nd], a, b[0], b[1]);
                        mma_16816<fm_bf16>(acc[nd + 1], a, b[2], b[3]);
                    }
                }
#pragma unroll
                for (int nd = 0; nd < ND / 2; nd++) {
                    const int col = (half * ND / 2 + nd) * 8 + 2 * c;
                    if (qa < n) fm_atomic_add2(dq + (int64_t)qa * HD + (int64_t)h * DP + col, acc[nd][0], acc[nd][1]);
                    if (qb < n) fm_atomic_add2(dq + (int64_t)qb * HD + (int64_t)h * DP + col, acc[nd][2], acc[nd][3]);
                }
            }
        }
    }
    /* dK, dV of the warp's key rows (a key row belongs to one block: plain adds) */
#pragma unroll
    for (int nd = 0; nd < ND; nd++) {
        const int64_t col = (int64_t)kvh * DP + nd * 8 + 2 * c;
        if (ka < n) {
            float2 *pk = reinterpret_cast<float2 *>(dk + (int64_t)ka * KD + col);
            float2 *pv = reinterpret_cast<float2 *>(dv + (int64_t)ka * KD + col);
            float2 a = *pk, b = *pv;
            *pk = make_float2(a.x + dka[nd][0], a.y + dka[nd][1]);
            *pv = make_float2(b.x + dva[nd][0], b.y + dva[nd][1]);
        }
        if (kb < n) {
            float2 *pk = reinterpret_cast<float2 *>(dk + (int64_t)kb * KD + col);
            float2 *pv = reinterpret_cast<float2 *>(dv + (int64_t)kb * KD + col);
            float2 a = *pk, b = *pv;
            *pk = make_float2(a.x + dka[nd][2], a.y + dka[nd][3]);
            *pv = make_float2(b.x + dva[nd][2], b.y + dva[nd][3]);
        }
    }
#endif
}

/* ------------------------------------------------------------------------------------------
 * Version 2 (the default; TUNA_TRAIN_FLASH=mma1 keeps the kernels above for comparisons). The
 * kernels above load float32 tiles synchronously (convert, store, barrier, compute: no overlap)
 * and twice the bytes of a bf16 tile, test the mask on every score and use the exact exp2f. Here:
 * - the operands a block loops over (K and V in the forward, Q and dO in the backward) are
 *   converted to bf16 once per call by a small kernel (the backward's also computes delta) and
 *   arrive by cp.async into a double buffer: the next tile loads while this one is computed;
 * - the mask is applied only on tiles that need it (the diagonal, the window's edge, rows or keys
 *   past the sequence); a forward warp skips tiles wholly outside its rows;
 * - exponentials by ex2.approx, the forward's O rescaled only when some row's max moved;
 * - the grids take all heads of the longest tiles first (forward: (H, q tiles) from the last
 *   tile; backward: (Hkv, key tiles) from the first, whose loop over query tiles is longest).
 * Fragment addressing is that of the kernels above. */

/* dst[i] = bf16(src[i]), 4 at a time (count % 4 == 0, 16-byte aligned src) */
__global__ void k_flash_to_bf16(fm_bf16 *dst, const float *src, int64_t count4)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count4; i += (int64_t)gridDim.x * blockDim.x) {
        const float4 x = reinterpret_cast<const float4 *>(src)[i];
        uint2 u;
        u.x = mma_pack<fm_bf16>(x.x, x.y);
        u.y = mma_pack<fm_bf16>(x.z, x.w);
        reinterpret_cast<uint2 *>(dst)[i] = u;
    }
}

/* The backward's preparation, one warp per (row, head) of D values: delta = sum dout * out
 * (float32), and bf16 copies of q and dout. */
__global__ void k_flash_prep(float *delta, fm_bf16 *q16, fm_bf16 *do16, const float *dout, const float *out,
                             const float *q, int64_t rows, int D)
{
    const int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= rows) return;
    float d = 0.0f;
    for (int c = lane * 4; c < D; c += 128) {
        const int64_t o = w * D + c;
        const float4 a = *reinterpret_cast<const float4 *>(dout + o), b = *reinterpret_cast<const float4 *>(out + o);
        const float4 x = *reinterpret_cast<const float4 *>(q + o);
        d += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        *reinterpret_cast<uint2 *>(do16 + o) = make_uint2(mma_pack<fm_bf16>(a.x, a.y), mma_pack<fm_bf16>(a.z, a.w));
        *reinterpret_cast<uint2 *>(q16 + o) = make_uint2(mma_pack<fm_bf16>(x.x, x.y), mma_pack<fm_bf16>(x.z, x.w));
    }
    d = tuna_warp_sum(d);
    if (lane == 0) delta[w] = d;
}

/* 4 bytes global -> shared, asynchronous; !full writes zero and reads nothing */
static __device__ __forceinline__ void fm_cp_async4(void *dst, const void *src, bool full)
{
#if TUNA_MMA_SM80
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(mma_smem(dst)), "l"(src),
                 "r"(full ? 4 : 0));
#else
    (void)dst, (void)src, (void)full;
#endif
}

template <int DP> static size_t fm2_fwd_smem() { return (size_t)4 * FM_T * (DP + 8) * 2; }
template <int DP> static size_t fm2_bwd_smem()
{
    return (size_t)6 * FM_T * (DP + 8) * 2 + (size_t)FM_T * (FM_T + 8) * 2 + 4 * FM_T * 4;
}

template <int DP>
__global__ void __launch_bounds__(FM_THREADS) k_flash_fwd_mma2(float *out, float *lse, const float *q,
                                                                const fm_bf16 *k16, const fm_bf16 *v16, int n, int H,
                                                                int Hkv, float sl2, int window)
{
#if TUNA_MMA_SM80
    constexpr int LD = DP + 8, NK = DP / 16, ND = DP / 8, CH = DP / 8, STAGE = FM_T * LD;
    extern __shared__ __align__(128) unsigned char fm_smem[];
    fm_bf16 *sb = (fm_bf16 *)fm_smem; /* [K0][V0][K1][V1]; Q staged in [K1] first */
    const int qt = (int)gridDim.y - 1 - (int)blockIdx.y; /* longest tiles first */
    const int h = blockIdx.x, kvh = h / (H / Hkv), i0 = qt * FM_T;
    const int64_t HD = (int64_t)H * DP, KD = (int64_t)Hkv * DP;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, li = lane >> 3;
    const fm_bf16 *kg = k16 + (int64_t)kvh * DP, *vg = v16 + (int64_t)kvh * DP;
    const int ilast = min(i0 + FM_T - 1, n - 1);
    const int jlo = window > 0 ? max(0, i0 - window + 1) : 0;
    const int kt0 = jlo / FM_T, kt1 = ilast / FM_T;
    auto load_tile = [&](int kt) {
        fm_bf16 *kd = sb + ((kt - kt0) & 1) * 2 * STAGE, *vd = kd + STAGE;
        const int j0 = kt * FM_T;
        for (int x = threadIdx.x; x < FM_T * CH; x += FM_THREADS) {
            const int r = x / CH, u = x - r * CH;
            const bool ok = j0 + r < n;
            const int64_t off = ok ? (int64_t)(j0 + r) * KD + u * 8 : 0;
            mma_cp_async16(kd + r * LD + u * 8, kg + off, ok);
            mma_cp_async16(vd + r * LD + u * 8, vg + off, ok);
        }
        mma_cp_async_commit();
    };
    fm_load<DP>(sb + 2 * STAGE, q + (int64_t)h * DP, HD, i0, n);
    load_tile(kt0);
    __syncthreads();
    uint32_t qf[NK][4];
#pragma unroll
    for (int kk = 0; kk < NK; kk++)
        mma_ldsm_x4(qf[kk], mma_smem(sb + 2 * STAGE + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
    float o[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++)
        o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; /* rows g and g + 8 of the warp (raw scores) */
    const int wlo = i0 + warp * 16, whi = min(wlo + 15, n - 1);
    const int ia = wlo + g, ib = ia + 8;
    /* a row takes local keys j in [lo, hi] of a tile at j0: hi = i - j0 (none past n), lo = i - window + 1 - j0 */
    const int ha = ia < n ? ia : -1000000000, hb = ib < n ? ib : -1000000000;
    const int la = window > 0 ? ia - window + 1 : -1000000000, lb = window > 0 ? ib - window + 1 : -1000000000;
    for (int kt = kt0; kt <= kt1; kt++) {
        mma_cp_async_wait<0>();
        __syncthreads(); /* tile kt is in; every warp is done with the other buffer */
        if (kt < kt1) load_tile(kt + 1);
        const int j0 = kt * FM_T;
        if (wlo >= n || j0 > whi || (window > 0 && j0 + FM_T - 1 < wlo - window + 1)) continue;
        const bool need_mask = j0 + FM_T - 1 > wlo || wlo + 15 >= n || (window > 0 && j0 <= wlo + 15 - window);
        const fm_bf16 *sK = sb + ((kt - kt0) & 1) * 2 * STAGE, *sV = sK + STAGE;
        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < NK; kk++)
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                uint32_t b[4];
                mma_ldsm_x4(b, mma_smem(sK + ((nt + (li >> 1)) * 8 + (lane & 7)) * LD + kk * 16 + (li & 1) * 8));
                mma_16816<fm_bf16>(s[nt], qf[kk], b[0], b[1]);
                mma_16816<fm_bf16>(s[nt + 1], qf[kk], b[2], b[3]);
            }
        if (need_mask) {
            const int hia = ha - j0, hib = hb - j0, loa = la - j0, lob = lb - j0;
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = nt * 8 + 2 * c + (e & 1);
                    if (e < 2 ? (j > hia || j < loa) : (j > hib || j < lob)) s[nt][e] = -INFINITY;
                }
        }
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float ms0 = mx0 == -INFINITY ? 0.0f : mx0 * sl2, ms1 = mx1 == -INFINITY ? 0.0f : mx1 * sl2;
        const bool rescale = !__all_sync(0xffffffffu, mx0 == m0 && mx1 == m1);
        if (rescale) {
            const float al0 = mma_exp2(m0 * sl2 - ms0), al1 = mma_exp2(m1 * sl2 - ms1); /* 0 for -inf */
            l0 *= al0;
            l1 *= al1;
#pragma unroll
            for (int nd = 0; nd < ND; nd++) {
                o[nd][0] *= al0;
                o[nd][1] *= al0;
                o[nd][2] *= al1;
                o[nd][3] *= al1;
            }
        }
        m0 = mx0;
        m1 = mx1;
        uint32_t pa[4][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            const float p0 = mma_exp2(fmaf(s[nt][0], sl2, -ms0)), p1 = mma_exp2(fmaf(s[nt][1], sl2, -ms0));
            const float p2 = mma_exp2(fmaf(s[nt][2], sl2, -ms1)), p3 = mma_exp2(fmaf(s[nt][3], sl2, -ms1));
            const uint32_t lo = mma_pack<fm_bf16>(p0, p1), hi = mma_pack<fm_bf16>(p2, p3);
            l0 += fm_bf_lo(lo) + fm_bf_hi(lo); /* the sum of what multiplies V */
            l1 += fm_bf_lo(hi) + fm_bf_hi(hi);
            pa[nt >> 1][(nt & 1) * 2] = lo;
            pa[nt >> 1][(nt & 1) * 2 + 1] = hi;
        }
#pragma unroll
        for (int ks = 0; ks < 4; ks++)
#pragma unroll
            for (int nd = 0; nd < ND; nd += 2) {
                uint32_t b[4];
                mma_ldsm_x4_t(b, mma_smem(sV + (ks * 16 + (li & 1) * 8 + (lane & 7)) * LD + (nd + (li >> 1)) * 8));
                mma_16816<fm_bf16>(o[nd], pa[ks], b[0], b[1]);
                mma_16816<fm_bf16>(o[nd + 1], pa[ks], b[2], b[3]);
            }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int nd = 0; nd < ND; nd++) {
        if (ia < n)
            *reinterpret_cast<float2 *>(out + (int64_t)ia * HD + (int64_t)h * DP + nd * 8 + 2 * c) =
                make_float2(o[nd][0] * inv0, o[nd][1] * inv0);
        if (ib < n)
            *reinterpret_cast<float2 *>(out + (int64_t)ib * HD + (int64_t)h * DP + nd * 8 + 2 * c) =
                make_float2(o[nd][2] * inv1, o[nd][3] * inv1);
    }
    if (lse && c == 0) {
        if (ia < n) lse[(int64_t)ia * H + h] = (m0 * sl2 + log2f(l0)) * 0.69314718055994531f;
        if (ib < n) lse[(int64_t)ib * H + h] = (m1 * sl2 + log2f(l1)) * 0.69314718055994531f;
    }
#endif
}

template <int DP>
__global__ void __launch_bounds__(FM_THREADS) k_flash_bwd_mma2(float *dq, float *dk, float *dv, const fm_bf16 *do16,
                                                                const float *lse, const float *delta,
                                                                const fm_bf16 *q16, const float *k, const float *v,
                                                                int n, int H, int Hkv, float scale, int window)
{
#if TUNA_MMA_SM80
    constexpr int LD = DP + 8, NK = DP / 16, ND = DP / 8, LS = FM_T + 8, CH = DP / 8, STAGE = FM_T * LD;
    extern __shared__ __align__(128) unsigned char fm_smem[];
    fm_bf16 *sK = (fm_bf16 *)fm_smem, *sV = sK + STAGE, *sQD = sV + STAGE; /* sQD: [Q0][dO0][Q1][dO1] */
    fm_bf16 *sdS = sQD + 4 * STAGE;                                       /* [64 keys, LS] */
    float *sLD = (float *)(sdS + FM_T * LS);                              /* [stage][lse 64 | delta 64] */
    const int group = H / Hkv, kvh = blockIdx.x, j0 = blockIdx.y * FM_T;
    const int64_t HD = (int64_t)H * DP, KD = (int64_t)Hkv * DP;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, li = lane >> 3;
    const float log2e = 1.4426950408889634f, scale2 = scale * log2e;
    const int jlast = min(j0 + FM_T - 1, n - 1);
    const int ilast = window > 0 ? min(n - 1, jlast + window - 1) : n - 1;
    const int qt0 = j0 / FM_T, nqt = ilast / FM_T - qt0 + 1, total = group * nqt;
    auto load_tile = [&](int it) {
        const int h = kvh * group + it / nqt, i0 = (qt0 + it % nqt) * FM_T;
        fm_bf16 *qd = sQD + (it & 1) * 2 * STAGE, *dd = qd + STAGE;
        for (int x = threadIdx.x; x < FM_T * CH; x += FM_THREADS) {
            const int r = x / CH, u = x - r * CH;
            const bool ok = i0 + r < n;
            const int64_t off = ok ? (int64_t)(i0 + r) * HD + (int64_t)h * DP + u * 8 : 0;
            mma_cp_async16(qd + r * LD + u * 8, q16 + off, ok);
            mma_cp_async16(dd + r * LD + u * 8, do16 + off, ok);
        }
        {
            const int r = threadIdx.x & (FM_T - 1);
            const bool ok = i0 + r < n;
            const int64_t off = ok ? (int64_t)(i0 + r) * H + h : 0;
            fm_cp_async4(sLD + (it & 1) * 2 * FM_T + threadIdx.x, (threadIdx.x < FM_T ? lse : delta) + off, ok);
        }
        mma_cp_async_commit();
    };
    load_tile(0);
    fm_load<DP>(sK, k + (int64_t)kvh * DP, KD, j0, n);
    fm_load<DP>(sV, v + (int64_t)kvh * DP, KD, j0, n);
    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            dka[nd][e] = dva[nd][e] = 0.0f;
    const int ka = j0 + warp * 16 + g, kb = ka + 8; /* this thread's key rows */
    for (int it = 0; it < total; it++) {
        const int h = kvh * group + it / nqt, i0 = (qt0 + it % nqt) * FM_T;
        mma_cp_async_wait<0>();
        __syncthreads(); /* tile it is in; the other buffers and dS are no longer read */
        if (it + 1 < total) load_tile(it + 1);
        const fm_bf16 *sQ = sQD + (it & 1) * 2 * STAGE, *sdO = sQ + STAGE;
        const float *sLse = sLD + (it & 1) * 2 * FM_T, *sDelta = sLse + FM_T;
        const bool need_mask = i0 == j0 || i0 + FM_T - 1 >= n || (window > 0 && i0 + FM_T - 1 - j0 >= window);
        /* S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the tile's 64 queries */
        float s[8][4], dp[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < NK; kk++) {
            uint32_t ak[4], av[4];
            mma_ldsm_x4(ak, mma_smem(sK + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
            mma_ldsm_x4(av, mma_smem(sV + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                uint32_t b[4];
                const int row = (nt + (li >> 1)) * 8 + (lane & 7), col = kk * 16 + (li & 1) * 8;
                mma_ldsm_x4(b, mma_smem(sQ + row * LD + col));
                mma_16816<fm_bf16>(s[nt], ak, b[0], b[1]);
                mma_16816<fm_bf16>(s[nt + 1], ak, b[2], b[3]);
                mma_ldsm_x4(b, mma_smem(sdO + row * LD + col));
                mma_16816<fm_bf16>(dp[nt], av, b[0], b[1]);
                mma_16816<fm_bf16>(dp[nt + 1], av, b[2], b[3]);
            }
        }
        /* P^T and dS^T as bf16 A fragments (keys x queries); dS^T also to shared memory */
        uint32_t pf[4][4], dsf[4][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            float p[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qc = nt * 8 + 2 * c + (e & 1), key = e < 2 ? ka : kb;
                const float x = mma_exp2(fmaf(s[nt][e], scale2, -sLse[qc] * log2e));
                p[e] = !need_mask || fm_visible(i0 + qc, key, n, window) ? x : 0.0f;
                ds[e] = p[e] * (dp[nt][e] - sDelta[qc]) * scale;
            }
            pf[nt >> 1][(nt & 1) * 2] = mma_pack<fm_bf16>(p[0], p[1]);
            pf[nt >> 1][(nt & 1) * 2 + 1] = mma_pack<fm_bf16>(p[2], p[3]);
            const uint32_t d01 = mma_pack<fm_bf16>(ds[0], ds[1]), d23 = mma_pack<fm_bf16>(ds[2], ds[3]);
            dsf[nt >> 1][(nt & 1) * 2] = d01;
            dsf[nt >> 1][(nt & 1) * 2 + 1] = d23;
            *reinterpret_cast<uint32_t *>(sdS + (warp * 16 + g) * LS + nt * 8 + 2 * c) = d01;
            *reinterpret_cast<uint32_t *>(sdS + (warp * 16 + g + 8) * LS + nt * 8 + 2 * c) = d23;
        }
        /* dV += P^T dO, dK += dS^T Q (B read transposed: queries are the k dimension) */
#pragma unroll
        for (int ks = 0; ks < 4; ks++)
#pragma unroll
            for (int nd = 0; nd < ND; nd += 2) {
                uint32_t b[4];
                const int row = ks * 16 + (li & 1) * 8 + (lane & 7), col = (nd + (li >> 1)) * 8;
                mma_ldsm_x4_t(b, mma_smem(sdO + row * LD + col));
                mma_16816<fm_bf16>(dva[nd], pf[ks], b[0], b[1]);
                mma_16816<fm_bf16>(dva[nd + 1], pf[ks], b[2], b[3]);
                mma_ldsm_x4_t(b, mma_smem(sQ + row * LD + col));
                mma_16816<fm_bf16>(dka[nd], dsf[ks], b[0], b[1]);
                mma_16816<fm_bf16>(dka[nd + 1], dsf[ks], b[2], b[3]);
            }
        __syncthreads(); /* every warp's dS^T rows are in shared memory */
        /* dQ rows 16w..16w+15 of the tile = dS K over the block's 64 keys, in two halves of D */
        const int qa = i0 + warp * 16 + g, qb = qa + 8;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float acc[ND / 2][4];
#pragma unroll
            for (int nd = 0; nd < ND / 2; nd++)
                acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < 4; ks++) {
                uint32_t a[4];
                mma_ldsm_x4_t(a, mma_smem(sdS + (ks * 16 + (li >> 1) * 8 + (lane & 7)) * LS + warp * 16 + (li & 1) * 8));
#pragma unroll
                for (int nd = 0; nd < ND / 2; nd += 2) {
                    uint32_t b[4];
                    const int row = ks * 16 + (li & 1) * 8 + (lane & 7), col = (half * ND / 2 + nd + (li >> 1)) * 8;
                    mma_ldsm_x4_t(b, mma_smem(sK + row * LD + col));
                    mma_16816<fm_bf16>(acc[nd], a, b[0], b[1]);
                    mma_16816<fm_bf16>(acc[nd + 1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int nd = 0; nd < ND / 2; nd++) {
                const int col = (half * ND / 2 + nd) * 8 + 2 * c;
                if (qa < n) fm_atomic_add2(dq + (int64_t)qa * HD + (int64_t)h * DP + col, acc[nd][0], acc[nd][1]);
                if (qb < n) fm_atomic_add2(dq + (int64_t)qb * HD + (int64_t)h * DP + col, acc[nd][2], acc[nd][3]);
            }
        }
    }
    /* dK, dV of the warp's key rows (a key row belongs to one block: plain adds) */
#pragma unroll
    for (int nd = 0; nd < ND; nd++) {
        const int64_t col = (int64_t)kvh * DP + nd * 8 + 2 * c;
        if (ka < n) {
            float2 *pk = reinterpret_cast<float2 *>(dk + (int64_t)ka * KD + col);
            float2 *pv = reinterpret_cast<float2 *>(dv + (int64_t)ka * KD + col);
            float2 a = *pk, b = *pv;
            *pk = make_float2(a.x + dka[nd][0], a.y + dka[nd][1]);
            *pv = make_float2(b.x + dva[nd][0], b.y + dva[nd][1]);
        }
        if (kb < n) {
            float2 *pk = reinterpret_cast<float2 *>(dk + (int64_t)kb * KD + col);
            float2 *pv = reinterpret_cast<float2 *>(dv + (int64_t)kb * KD + col);
            float2 a = *pk, b = *pv;
            *pk = make_float2(a.x + dka[nd][2], a.y + dka[nd][3]);
            *pv = make_float2(b.x + dva[nd][2], b.y + dva[nd][3]);
        }
    }
#endif
}

/* Which mma kernels take this call (0: none): D 64 or 128, bf16 mma hardware, 16-byte aligned
 * rows, and not turned off. TUNA_TRAIN_FLASH=wmma keeps train_flash.cu's WMMA kernels,
 * TUNA_TRAIN_FLASH=mma1 the first mma kernels (1); else version 2. */
static int fm_ok(tuna_backend *be, int64_t D, const void *const *ptrs, int np)
{
    static int ver = -1;
    if (ver < 0) {
        const char *e = getenv("TUNA_TRAIN_FLASH");
        ver = e && !strcmp(e, "wmma") ? 0 : e && !strcmp(e, "mma1") ? 1 : 2;
    }
    if (!ver || (D != 64 && D != 128) || be->cc_major < 8) return 0;
    for (int i = 0; i < np; i++)
        if ((uintptr_t)ptrs[i] & 15) return 0;
    return ver;
}

template <int DP>
static void fm_forward(tuna_backend *be, float *out, float *lse, const float *q, const float *k, const float *v,
                       const int64_t *starts, int64_t ns, int64_t H, int64_t Hkv, float scale, int64_t window)
{
    const size_t smem = fm_fwd_smem<DP>();
    if (!tuna_cuda_check(be, cudaFuncSetAttribute((const void *)k_flash_fwd_mma<DP>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                         "cudaFuncSetAttribute(k_flash_fwd_mma)"))
        return;
    const int64_t HD = H * DP, KD = Hkv * DP;
    for (int64_t s = 0; s < ns && !be->sticky; s++) {
        const int64_t s0 = starts[s], n = starts[s + 1] - s0;
        dim3 grid((unsigned)((n + FM_T - 1) / FM_T), (unsigned)H);
        k_flash_fwd_mma<DP><<<grid, FM_THREADS, smem, be->stream>>>(out + s0 * HD, lse ? lse + s0 * H : NULL,
                                                                     q + s0 * HD, k + s0 * KD, v + s0 * KD, (int)n,
                                                                     (int)H, (int)Hkv, scale * 1.4426950408889634f,
                                                                     (int)window);
        tuna_cuda_check_launch(be, "k_flash_fwd_mma");
    }
}

template <int DP>
static void fm_backward(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout, const float *out,
                        const float *lse, const float *q, const float *k, const float *v, const int64_t *starts,
                        int64_t ns, int64_t T, int64_t H, int64_t Hkv, float scale, int64_t window)
{
    const size_t smem = fm_bwd_smem<DP>();
    if (!tuna_cuda_check(be, cudaFuncSetAttribute((const void *)k_flash_bwd_mma<DP>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                         "cudaFuncSetAttribute(k_flash_bwd_mma)"))
        return;
    float *delta = NULL;
    if (!tuna_cuda_check(be, cudaMallocAsync((void **)&delta, (size_t)(T * H) * sizeof(float), be->stream),
                         "cudaMallocAsync(attention backward row sums)"))
        return;
    const int64_t rows = T * H;
    k_flash_delta<<<(unsigned)((rows + 3) / 4), 128, 0, be->stream>>>(delta, dout, out, rows, DP);
    tuna_cuda_check_launch(be, "k_flash_delta");
    const int64_t HD = H * DP, KD = Hkv * DP;
    for (int64_t s = 0; s < ns && !be->sticky; s++) {
        const int64_t s0 = starts[s], n = starts[s + 1] - s0;
        dim3 grid((unsigned)((n + FM_T - 1) / FM_T), (unsigned)Hkv);
        k_flash_bwd_mma<DP><<<grid, FM_THREADS, smem, be->stream>>>(
            dq + s0 * HD, dk + s0 * KD, dv + s0 * KD, dout + s0 * HD, lse + s0 * H, delta + s0 * H, q + s0 * HD,
            k + s0 * KD, v + s0 * KD, (int)n, (int)H, (int)Hkv, scale, (int)window);
        tuna_cuda_check_launch(be, "k_flash_bwd_mma");
    }
    tuna_cuda_check(be, cudaFreeAsync(delta, be->stream), "cudaFreeAsync(attention backward row sums)");
}

/* version 2: K and V converted to bf16 once (a work buffer of 2 T Hkv D bf16) */
template <int DP>
static void fm2_forward(tuna_backend *be, float *out, float *lse, const float *q, const float *k, const float *v,
                        const int64_t *starts, int64_t ns, int64_t H, int64_t Hkv, float scale, int64_t window)
{
    const size_t smem = fm2_fwd_smem<DP>();
    if (!tuna_cuda_check(be, cudaFuncSetAttribute((const void *)k_flash_fwd_mma2<DP>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                         "cudaFuncSetAttribute(k_flash_fwd_mma2)"))
        return;
    const int64_t T = starts[ns], HD = H * DP, KD = Hkv * DP;
    fm_bf16 *k16 = NULL;
    if (!tuna_cuda_check(be, cudaMallocAsync((void **)&k16, (size_t)(2 * T * KD) * sizeof(fm_bf16), be->stream),
                         "cudaMallocAsync(attention forward bf16 K and V)"))
        return;
    fm_bf16 *v16 = k16 + T * KD;
    const int64_t c4 = T * KD / 4;
    const unsigned nb = (unsigned)((c4 + 255) / 256 < 4096 ? (c4 + 255) / 256 : 4096);
    k_flash_to_bf16<<<nb, 256, 0, be->stream>>>(k16, k, c4);
    tuna_cuda_check_launch(be, "k_flash_to_bf16");
    k_flash_to_bf16<<<nb, 256, 0, be->stream>>>(v16, v, c4);
    tuna_cuda_check_launch(be, "k_flash_to_bf16");
    for (int64_t s = 0; s < ns && !be->sticky; s++) {
        const int64_t s0 = starts[s], n = starts[s + 1] - s0;
        dim3 grid((unsigned)H, (unsigned)((n + FM_T - 1) / FM_T));
        k_flash_fwd_mma2<DP><<<grid, FM_THREADS, smem, be->stream>>>(out + s0 * HD, lse ? lse + s0 * H : NULL,
                                                                      q + s0 * HD, k16 + s0 * KD, v16 + s0 * KD,
                                                                      (int)n, (int)H, (int)Hkv,
                                                                      scale * 1.4426950408889634f, (int)window);
        tuna_cuda_check_launch(be, "k_flash_fwd_mma2");
    }
    tuna_cuda_check(be, cudaFreeAsync(k16, be->stream), "cudaFreeAsync(attention forward bf16 K and V)");
}

/* version 2: delta and bf16 copies of Q and dO first (a work buffer of T H floats + 2 T H D bf16) */
template <int DP>
static void fm2_backward(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout, const float *out,
                         const float *lse, const float *q, const float *k, const float *v, const int64_t *starts,
                         int64_t ns, int64_t T, int64_t H, int64_t Hkv, float scale, int64_t window)
{
    const size_t smem = fm2_bwd_smem<DP>();
    if (!tuna_cuda_check(be, cudaFuncSetAttribute((const void *)k_flash_bwd_mma2<DP>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                         "cudaFuncSetAttribute(k_flash_bwd_mma2)"))
        return;
    const int64_t rows = T * H, HD = H * DP, KD = Hkv * DP;
    const size_t dbytes = ((size_t)rows * sizeof(float) + 255) & ~(size_t)255;
    unsigned char *work = NULL;
    if (!tuna_cuda_check(be, cudaMallocAsync((void **)&work, dbytes + (size_t)(2 * T * HD) * sizeof(fm_bf16), be->stream),
                         "cudaMallocAsync(attention backward row sums and bf16 Q, dO)"))
        return;
    float *delta = (float *)work;
    fm_bf16 *q16 = (fm_bf16 *)(work + dbytes), *do16 = q16 + T * HD;
    k_flash_prep<<<(unsigned)((rows + 3) / 4), 128, 0, be->stream>>>(delta, q16, do16, dout, out, q, rows, DP);
    tuna_cuda_check_launch(be, "k_flash_prep");
    for (int64_t s = 0; s < ns && !be->sticky; s++) {
        const int64_t s0 = starts[s], n = starts[s + 1] - s0;
        dim3 grid((unsigned)Hkv, (unsigned)((n + FM_T - 1) / FM_T));
        k_flash_bwd_mma2<DP><<<grid, FM_THREADS, smem, be->stream>>>(
            dq + s0 * HD, dk + s0 * KD, dv + s0 * KD, do16 + s0 * HD, lse + s0 * H, delta + s0 * H, q16 + s0 * HD,
            k + s0 * KD, v + s0 * KD, (int)n, (int)H, (int)Hkv, scale, (int)window);
        tuna_cuda_check_launch(be, "k_flash_bwd_mma2");
    }
    tuna_cuda_check(be, cudaFreeAsync(work, be->stream), "cudaFreeAsync(attention backward row sums and bf16 Q, dO)");
}

bool tuna_cuda_train_flash_mma_forward(tuna_backend *be, float *out, float *lse, const float *q, const float *k,
                                       const float *v, const int64_t *starts, int64_t ns, int64_t H, int64_t Hkv,
                                       int64_t D, float scale, int64_t window)
{
    const void *ptrs[] = {out, q, k, v};
    const int ver = fm_ok(be, D, ptrs, 4);
    if (!ver) return false;
    if (ver == 2) {
        if (D == 128) fm2_forward<128>(be, out, lse, q, k, v, starts, ns, H, Hkv, scale, window);
        else fm2_forward<64>(be, out, lse, q, k, v, starts, ns, H, Hkv, scale, window);
        return true;
    }
    if (D == 128) fm_forward<128>(be, out, lse, q, k, v, starts, ns, H, Hkv, scale, window);
    else fm_forward<64>(be, out, lse, q, k, v, starts, ns, H, Hkv, scale, window);
    return true;
}

bool tuna_cuda_train_flash_mma_backward(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                        const float *out, const float *lse, const float *q, const float *k,
                                        const float *v, const int64_t *starts, int64_t ns, int64_t T, int64_t H,
                                        int64_t Hkv, int64_t D, float scale, int64_t window)
{
    const void *ptrs[] = {dq, dk, dv, dout, out, q, k, v};
    const int ver = fm_ok(be, D, ptrs, 8);
    if (!ver) return false;
    if (ver == 2) {
        if (D == 128) fm2_backward<128>(be, dq, dk, dv, dout, out, lse, q, k, v, starts, ns, T, H, Hkv, scale, window);
        else fm2_backward<64>(be, dq, dk, dv, dout, out, lse, q, k, v, starts, ns, T, H, Hkv, scale, window);
        return true;
    }
    if (D == 128) fm_backward<128>(be, dq, dk, dv, dout, out, lse, q, k, v, starts, ns, T, H, Hkv, scale, window);
    else fm_backward<64>(be, dq, dk, dv, dout, out, lse, q, k, v, starts, ns, T, H, Hkv, scale, window);
    return true;
}
