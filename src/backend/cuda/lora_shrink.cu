/* lora_shrink.cu — the dense LoRA form's shrink and mask in ONE launch (issue #8; lora.cu's
 * dense_call takes it with TUNA_LORA_SHRINK2=1 on sm_90+).
 *
 * dense_call's default computes hm in three launches per projection group: cuBLAS h = x16 A_all^T
 * (float32 out: a split-K GEMM and its splitKreduce), then k_lora_mask (each token keeps its own
 * slot's columns times the slot's scale, rounded to 16 bits; every other column 0). Here:
 *   - a CTA per (64 tokens, bn = 64 or 128 columns of the slots, K range): every token times every
 *     slot column on tensor cores (mma.sync m16n8k16 from ldmatrix fragments, float32
 *     accumulators), x16 and A staged by cp.async in a 4-stage ring of 64-wide k tiles (16-byte
 *     chunks XOR-swizzled by row: ldmatrix without bank conflicts);
 *   - the K ranges of one output tile are the CTAs of one thread-block cluster (cs = 1..16, along
 *     grid x). Each CTA leaves its float32 partial tile in its own shared memory; after a cluster
 *     barrier CTA r adds rows r*64/cs.. of every CTA's tile (distributed shared memory: mapa +
 *     ld.shared::cluster) in rank order 0, 1, .., applies the mask/scale, rounds once and writes
 *     hm; a second barrier keeps every CTA's shared memory alive until all have read it.
 * No global scratch, no atomics, a fixed order of every sum: the same bits eager or replayed. The
 * sums differ from cuBLAS's in order only (the rounded hm can differ by one 16-bit ulp where the
 * float32 sum sits at a rounding boundary).
 * With pdl the kernel loads A's first tiles (weights) before griddepcontrol.wait, x after it. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "backend/backend.h"
#include "backend/cuda/lora_shrink.h"
#include "backend/cuda/mma.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TUNA_SHRINK_SM90 1
#else
#define TUNA_SHRINK_SM90 0
#endif

namespace {

constexpr int S2_BM = 64, S2_BK = 64, S2_STAGES = 6, S2_THREADS = 256;

struct s2_lins {
    tuna_shrink_lin l[3];
    int nl;
};

__device__ __forceinline__ void s2_put(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void s2_put(__half *p, float v) { *p = __float2half_rn(v); }

/* The mask of column col (absolute in hm) for a token of adapter a, k_lora_mask's test: h times
 * the slot's scale where the token's slot holds the column within its rank, else exactly 0. */
__device__ __forceinline__ float s2_mask(const s2_lins &L, int col, int a, float h)
{
    float v = 0.0f;
#pragma unroll
    for (int i = 0; i < 3; i++) {
        const tuna_shrink_lin &l = L.l[i];
        if (i < L.nl && l.w && col >= l.off && col < l.off + l.n * l.rs) {
            const int s = (col - l.off) / l.rs, c = col - l.off - s * l.rs;
            if (s == a && c < (int)l.w[a].r) v = h * l.w[a].scale;
        }
    }
    return v;
}

#if TUNA_SHRINK_SM90 /* the cluster helpers (PTX of sm_90) */
__device__ __forceinline__ uint32_t s2_cluster_rank(void)
{
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ void s2_cluster_sync(void)
{
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

/* the float4 at p in the shared memory of the cluster's CTA `rank` */
__device__ __forceinline__ float4 s2_ld_cluster(const void *p, uint32_t rank)
{
    float4 v;
    uint32_t ra;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(mma_smem(p)), "r"(rank));
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(ra)
                 : "memory");
    return v;
}

__device__ __forceinline__ void s2_pdl_wait(void) { asm volatile("griddepcontrol.wait;" ::: "memory"); }
#endif

/* grid (cs, ceil(M / BN), ceil(T / 64)), cluster (cs, 1, 1), 256 threads, dynamic shared memory
 * S2_STAGES * (64 + BN) * 128 bytes. */
template <typename HT, int BN>
__global__ void __launch_bounds__(S2_THREADS) k_lora_shrink2(HT *hm, int RU, const HT *x, int K, const HT *A, int c0,
                                                             int M, int T, const int32_t *adapter, s2_lins L)
{
#if TUNA_SHRINK_SM90
    constexpr int WN = BN / 4, NT = WN / 8; /* 8 warps: 2 (tokens, 32 each) x 4 (columns, WN each) */
    constexpr int XCH = S2_BM * 8, ACH = BN * 8, STAGE = XCH + ACH; /* 16-byte chunks per stage */
    extern __shared__ uint4 s2_smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wm = warp >> 2, wn = warp & 3;
    const int cs = (int)gridDim.x;
    const uint32_t rank = s2_cluster_rank();
    const int n0 = (int)blockIdx.y * BN, m0 = (int)blockIdx.z * S2_BM;
    /* this CTA's K range: 64-aligned pieces of K / cs */
    const int kc = ((K + cs - 1) / cs + S2_BK - 1) / S2_BK * S2_BK;
    const int kbeg = (int)rank * kc < K ? (int)rank * kc : K, kend = kbeg + kc < K ? kbeg + kc : K;
    const int nk = (kend - kbeg + S2_BK - 1) / S2_BK;

    auto load_a = [&](int s, int kt) {
        uint4 *dst = s2_smem + s * STAGE + XCH;
        const int k0 = kbeg + kt * S2_BK;
        for (int i = tid; i < ACH; i += S2_THREADS) {
            const int row = i >> 3, ch = i & 7, j = n0 + row, k = k0 + ch * 8;
            const bool full = j < M && k < kend;
            mma_cp_async16(dst + row * 8 + (ch ^ (row & 7)), full ? (const void *)(A + (size_t)j * K + k) : (const void *)A,
                           full);
        }
    };
    auto load_x = [&](int s, int kt) {
        uint4 *dst = s2_smem + s * STAGE;
        const int k0 = kbeg + kt * S2_BK;
        for (int i = tid; i < XCH; i += S2_THREADS) {
            const int row = i >> 3, ch = i & 7, t = m0 + row, k = k0 + ch * 8;
            const bool full = t < T && k < kend;
            mma_cp_async16(dst + row * 8 + (ch ^ (row & 7)), full ? (const void *)(x + (size_t)t * K + k) : (const void *)x,
                           full);
        }
    };

    for (int s = 0; s < S2_STAGES - 1; s++)
        if (s < nk) load_a(s, s);
    s2_pdl_wait(); /* x and hm belong to the kernels before this one */
    /* the epilogue's mask, read now (its loads overlap the pipeline's): per column of the tile the
     * slot that keeps it (-1: none) and that slot's scale; the adapters of this CTA's reduce rows */
    __shared__ int s_slot[BN], s_ad[S2_BM];
    __shared__ float s_scale[BN];
    const int rows = S2_BM / cs, r0 = (int)rank * rows;
    if (tid < BN) {
        const int col = c0 + n0 + tid;
        int slot = -1;
        float sc = 0.0f;
#pragma unroll
        for (int i = 0; i < 3; i++) {
            const tuna_shrink_lin &l = L.l[i];
            if (n0 + tid < M && i < L.nl && l.w && col >= l.off && col < l.off + l.n * l.rs) {
                const int sl = (col - l.off) / l.rs, c = col - l.off - sl * l.rs;
                if (c < (int)l.w[sl].r) slot = sl, sc = l.w[sl].scale;
            }
        }
        s_slot[tid] = slot;
        s_scale[tid] = sc;
    } else if (tid - BN < rows) {
        const int t = m0 + r0 + (tid - BN);
        s_ad[tid - BN] = t < T ? adapter[t] : -1;
    }
    for (int s = 0; s < S2_STAGES - 1; s++) {
        if (s < nk) load_x(s, s);
        mma_cp_async_commit();
    }

    float acc[2][NT][4];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < NT; ni++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[mi][ni][q] = 0.0f;

    for (int kt = 0; kt < nk; kt++) {
        mma_cp_async_wait<S2_STAGES - 2>();
        __syncthreads();
        const int pf = kt + S2_STAGES - 1;
        if (pf < nk) {
            load_a(pf % S2_STAGES, pf);
            load_x(pf % S2_STAGES, pf);
        }
        mma_cp_async_commit();
        const uint4 *xs = s2_smem + (kt % S2_STAGES) * STAGE, *as = xs + XCH;
#pragma unroll
        for (int kk = 0; kk < S2_BK / 16; kk++) {
            uint32_t af[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                const int row = wm * 32 + mi * 16 + (lane & 15), ch = kk * 2 + (lane >> 4);
                mma_ldsm_x4(af[mi], mma_smem(xs + row * 8 + (ch ^ (row & 7))));
            }
#pragma unroll
            for (int nj = 0; nj < NT / 2; nj++) {
                uint32_t bf[4];
                const int row = wn * WN + nj * 16 + (lane & 7) + ((lane >> 4) << 3), ch = kk * 2 + ((lane >> 3) & 1);
                mma_ldsm_x4(bf, mma_smem(as + row * 8 + (ch ^ (row & 7))));
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
                    mma_16816<HT>(acc[mi][2 * nj], af[mi], bf[0], bf[1]);
                    mma_16816<HT>(acc[mi][2 * nj + 1], af[mi], bf[2], bf[3]);
                }
            }
        }
    }
    mma_cp_async_wait<0>();
    __syncthreads();

    /* the partial tile [64][BN + 4] float32 in this CTA's shared memory */
    constexpr int LD = BN + 4;
    float *part = reinterpret_cast<float *>(s2_smem);
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < NT; ni++) {
            const int r = wm * 32 + mi * 16 + (lane >> 2), c = wn * WN + ni * 8 + 2 * (lane & 3);
            *reinterpret_cast<float2 *>(part + r * LD + c) = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
            *reinterpret_cast<float2 *>(part + (r + 8) * LD + c) = make_float2(acc[mi][ni][2], acc[mi][ni][3]);
        }
    s2_cluster_sync();
    /* rows rank * 64 / cs .. of the tile: the splits added in rank order, masked, rounded once */
    for (int i = tid; i < rows * (BN / 4); i += S2_THREADS) {
        const int r = r0 + i / (BN / 4), c = (i % (BN / 4)) * 4;
        const int t = m0 + r, j = n0 + c;
        const float *p = part + r * LD + c;
        float4 q4[16]; /* every split's piece in flight at once, then added in rank order */
#pragma unroll
        for (int q = 0; q < 16; q++)
            if (q < cs) q4[q] = s2_ld_cluster(p, (uint32_t)q);
        float4 v = q4[0];
#pragma unroll
        for (int q = 1; q < 16; q++)
            if (q < cs) v.x += q4[q].x, v.y += q4[q].y, v.z += q4[q].z, v.w += q4[q].w;
        if (t >= T || j >= M) continue;
        const int a = s_ad[r - r0], col = c0 + j;
        float m[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; e++) m[e] = a >= 0 && s_slot[c + e] == a ? m[e] * s_scale[c + e] : 0.0f;
        uint2 o;
        o.x = mma_pack<HT>(m[0], m[1]);
        o.y = mma_pack<HT>(m[2], m[3]);
        *reinterpret_cast<uint2 *>(hm + (size_t)t * RU + col) = o;
    }
    s2_cluster_sync(); /* the other CTAs may still read this one's tile */
#else
    (void)hm, (void)RU, (void)x, (void)K, (void)A, (void)c0, (void)M, (void)T, (void)adapter, (void)L;
#endif
}

/* k_lora_mask's definition over columns c0.. c0 + M of hm (the benchmark's reference). */
template <typename HT>
__global__ void k_shrink2_mask_ref(HT *hm, const float *h, int RU, int c0, int M, const int32_t *adapter, s2_lins L)
{
    const int64_t t = blockIdx.x;
    const int j = (int)(blockIdx.y * blockDim.x + threadIdx.x);
    if (j >= M) return;
    const int col = c0 + j;
    s2_put(hm + t * RU + col, s2_mask(L, col, adapter[t], h[t * RU + col]));
}

} // namespace

template <typename HT, int BN>
static cudaError_t s2_launch(cudaStream_t st, bool pdl, HT *hm, int RU, const HT *x, int K, const HT *A, int c0, int M,
                             int T, const int32_t *adapter, const s2_lins &L, int cs)
{
    const size_t smem = (size_t)S2_STAGES * (size_t)(S2_BM + BN) * S2_BK * 2;
    void (*kern)(HT *, int, const HT *, int, const HT *, int, int, int, const int32_t *, s2_lins) =
        k_lora_shrink2<HT, BN>;
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e == cudaSuccess && cs > 8) e = cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return e;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)cs, (unsigned)((M + BN - 1) / BN), (unsigned)((T + S2_BM - 1) / S2_BM));
    cfg.blockDim = dim3(S2_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = (unsigned)cs;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 2 : 1;
    return cudaLaunchKernelEx(&cfg, kern, hm, RU, x, K, A, c0, M, T, adapter, L);
}

extern "C" void tuna_cuda_shrink2_pick(int64_t T, int M, int64_t K, int *bn, int *cs)
{
    /* per wave of 132 CTAs: the bytes one CTA streams in (its x and A tiles) plus a fixed cost
     * (launch, first load, reduce, stores) worth ~110 KB at the ~23 GB/s one CTA streamed in the
     * first H100 round (4-stage version) */
    double best = 0.0;
    int bb = 128, bc = 1;
    for (int b = 64; b <= 128; b += 64)
        for (int c = 1; c <= 16; c *= 2) {
            const int64_t tiles = (T + S2_BM - 1) / S2_BM * ((M + b - 1) / b), grid = tiles * c;
            const int64_t kc = ((K + c - 1) / c + S2_BK - 1) / S2_BK * S2_BK;
            if (kc * c - K >= kc) continue; /* an empty split */
            const double per = (double)(S2_BM + b) * (double)kc * 2.0 + 110000.0;
            const double cost = (double)((grid + 131) / 132) * per;
            if (best == 0.0 || cost < best) best = cost, bb = b, bc = c;
        }
    *bn = bb;
    *cs = bc;
}

static bool s2_lins_of(s2_lins *L, const struct tuna_shrink_lin *lins, int nl)
{
    if (nl < 1 || nl > 3 || !lins) return false;
    *L = s2_lins{};
    L->nl = nl;
    for (int i = 0; i < nl; i++) {
        L->l[i] = lins[i];
        if (lins[i].w && (lins[i].rs <= 0 || lins[i].n <= 0)) return false;
    }
    return true;
}

extern "C" cudaError_t tuna_cuda_shrink2(cudaStream_t st, bool pdl, int dt, void *hm, int RU, const void *x16, int64_t K,
                                         const void *A, int c0, int M, int64_t T, const int32_t *adapter,
                                         const struct tuna_shrink_lin *lins, int nl, int bn, int cs)
{
    s2_lins L;
    if (!s2_lins_of(&L, lins, nl) || (dt != 1 && dt != 2) || !hm || !x16 || !A || !adapter || K <= 0 || K % 8 ||
        K > INT32_MAX / 2 || T <= 0 || T > 65535LL * S2_BM || M <= 0 || M % 4 || RU % 4 || c0 % 4 || c0 < 0 ||
        (int64_t)c0 + M > RU || ((uintptr_t)x16 | (uintptr_t)A) % 16 || (uintptr_t)hm % 8)
        return cudaErrorInvalidValue;
    if (bn == 0 || cs == 0) tuna_cuda_shrink2_pick(T, M, K, &bn, &cs);
    if ((bn != 64 && bn != 128) || (cs != 1 && cs != 2 && cs != 4 && cs != 8 && cs != 16))
        return cudaErrorInvalidValue;
    const int Ti = (int)T, Ki = (int)K;
    if (dt == 1) {
        const __nv_bfloat16 *x = (const __nv_bfloat16 *)x16, *a = (const __nv_bfloat16 *)A;
        __nv_bfloat16 *h = (__nv_bfloat16 *)hm;
        return bn == 64 ? s2_launch<__nv_bfloat16, 64>(st, pdl, h, RU, x, Ki, a, c0, M, Ti, adapter, L, cs)
                        : s2_launch<__nv_bfloat16, 128>(st, pdl, h, RU, x, Ki, a, c0, M, Ti, adapter, L, cs);
    }
    const __half *x = (const __half *)x16, *a = (const __half *)A;
    __half *h = (__half *)hm;
    return bn == 64 ? s2_launch<__half, 64>(st, pdl, h, RU, x, Ki, a, c0, M, Ti, adapter, L, cs)
                    : s2_launch<__half, 128>(st, pdl, h, RU, x, Ki, a, c0, M, Ti, adapter, L, cs);
}

extern "C" cudaError_t tuna_cuda_shrink2_mask_ref(cudaStream_t st, int dt, void *hm, const float *h, int RU, int c0,
                                                  int M, int64_t T, const int32_t *adapter,
                                                  const struct tuna_shrink_lin *lins, int nl)
{
    s2_lins L;
    if (!s2_lins_of(&L, lins, nl) || (dt != 1 && dt != 2) || T <= 0 || M <= 0 || c0 < 0 || (int64_t)c0 + M > RU)
        return cudaErrorInvalidValue;
    const dim3 grid((unsigned)T, (unsigned)((M + 127) / 128));
    if (dt == 1) k_shrink2_mask_ref<__nv_bfloat16><<<grid, 128, 0, st>>>((__nv_bfloat16 *)hm, h, RU, c0, M, adapter, L);
    else k_shrink2_mask_ref<__half><<<grid, 128, 0, st>>>((__half *)hm, h, RU, c0, M, adapter, L);
    return cudaGetLastError();
}
