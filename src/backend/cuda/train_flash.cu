/* train_flash.cu — flash attention for training (backend/train_ops.h's attention ops in the bf16
 * mode, head dim <= 128): causal attention over the training layout with no S x S scratch.
 *
 * Forward (one block per 64-query tile and query head): Q tile in shared memory as bf16, then
 * for each 64-key tile of the causal (and sliding-window) range: S = Q K^T on bf16 tensor cores
 * (WMMA 16x16x16, float accumulation), the online softmax per row (running max m and sum l in
 * float, base-2 exponentials), O = alpha O + P V with P rounded to bf16. Writes O / l and the
 * row's log-sum-exp lse = m + log l (natural log, [T, H]).
 *
 * Backward (FlashAttention-2; one block per 64-key tile and kv head, over every query head of
 * its GQA group and every query tile that sees the keys): P = exp(scale q.k - lse) recomputed
 * tile by tile, dV += P^T dO, dP = dO V^T, dS = P (dP - delta) scale with delta = rowsum(dO * O),
 * dK += dS^T Q (both accumulated in shared memory, added to dk/dv once at the end: a key row
 * belongs to one block), dQ += dS K added with float atomics (several key tiles add to one query
 * row). Activations are float32 in global memory and rounded to bf16 as tiles are loaded.
 *
 * 4 warps per block; warp w owns query rows 16w..16w+15 of a tile (forward: the softmax state;
 * backward: S, dP, dQ) or key rows 16w.. (backward: dK, dV). Shared memory: ~113 KB (forward)
 * and ~187 KB (backward) at D = 128, requested with cudaFuncAttributeMaxDynamicSharedMemorySize. */
#include <math.h>
#include <mma.h>
#include <stdlib.h>

#include "backend/cuda/train_cuda.h"

using namespace nvcuda;

#define FA_T 64      /* query and key rows per tile */
#define FA_THREADS 128
#define FA_LP (FA_T + 8) /* bf16 leading dimension of the [64, 64] P / dS tiles */
#define FA_LS (FA_T + 4) /* float leading dimension of the [64, 64] S / dP tiles */

/* bf16 WMMA fragments exist from compute capability 8.0; the sm_75 build compiles empty kernels
 * (the bf16 mode, the only user, is refused below 8.0) */
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FA_HAVE_BF16_MMA 1
#else
#define FA_HAVE_BF16_MMA 0
#endif

typedef __nv_bfloat16 bf16;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> fa_acc;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa_a_row;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> fa_a_col;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fa_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fa_b_col;

struct fa_geom {
    int D, Dp, lh, lf; /* head dim, padded to 16, bf16 / float leading dims of [64, Dp] tiles */
};

static __host__ __device__ fa_geom fa_make(int D)
{
    fa_geom g;
    g.D = D;
    g.Dp = (D + 15) & ~15;
    g.lh = g.Dp + 8;
    g.lf = g.Dp + 4;
    return g;
}

static size_t fa_fwd_smem(int D)
{
    fa_geom g = fa_make(D);
    return (size_t)3 * FA_T * g.lh * 2 + (size_t)FA_T * FA_LP * 2 + (size_t)FA_T * FA_LS * 4 +
           (size_t)FA_T * g.lf * 4 + 2 * FA_T * 4;
}

static size_t fa_bwd_smem(int D)
{
    fa_geom g = fa_make(D);
    return (size_t)4 * FA_T * g.lh * 2 + (size_t)2 * FA_T * FA_LP * 2 + (size_t)2 * FA_T * FA_LS * 4 +
           (size_t)2 * FA_T * g.lf * 4 + 2 * FA_T * 4;
}

#if FA_HAVE_BF16_MMA /* the device helpers below serve the bf16 kernels only */
/* rows [r0, r0 + 64) of a [n, stride] float matrix (column offset col0, D columns) into a bf16
 * tile [64, lh], zeros past n and past D. */
static __device__ void fa_load_tile(bf16 *dst, const float *src, int64_t stride, int r0, int n, const fa_geom &g)
{
    for (int idx = threadIdx.x; idx < FA_T * g.Dp; idx += FA_THREADS) {
        const int r = idx / g.Dp, c = idx - r * g.Dp;
        float x = 0.0f;
        if (r0 + r < n && c < g.D) x = src[(int64_t)(r0 + r) * stride + c];
        dst[r * g.lh + c] = __float2bfloat16_rn(x);
    }
}

static __device__ __forceinline__ bool fa_visible(int i, int j, int n, int window)
{
    return i < n && j <= i && (window <= 0 || j > i - window);
}

static __device__ __forceinline__ float fa_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

static __device__ __forceinline__ float fa_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* C[16 rows of warp, 64 cols] = A[16, Dp] B^T with B stored [64, Dp] (row-major, ld lh): the
 * warp's rows of S = Q K^T (or dP = dO V^T) into float smem [.., FA_LS]. */
static __device__ void fa_rows_times_t(float *C, const bf16 *A, const bf16 *B, const fa_geom &g)
{
    for (int cb = 0; cb < FA_T / 16; cb++) {
        fa_acc acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int kk = 0; kk < g.Dp; kk += 16) {
            fa_a_row a;
            fa_b_col b;
            wmma::load_matrix_sync(a, A + kk, g.lh);
            wmma::load_matrix_sync(b, B + cb * 16 * g.lh + kk, g.lh);
            wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(C + cb * 16, acc, FA_LS, wmma::mem_row_major);
    }
}
#endif

__global__ void __launch_bounds__(FA_THREADS) k_flash_fwd(float *out, float *lse, const float *q, const float *k,
                                                           const float *v, int n, int H, int Hkv, int D, float scale2,
                                                           int window)
{
#if FA_HAVE_BF16_MMA /* bf16 WMMA needs sm_80; never launched below (bf16 mode only) */
    extern __shared__ __align__(128) unsigned char fa_smem[];
    const fa_geom g = fa_make(D);
    bf16 *sQ = (bf16 *)fa_smem, *sK = sQ + FA_T * g.lh, *sV = sK + FA_T * g.lh, *sP = sV + FA_T * g.lh;
    float *sS = (float *)(sP + FA_T * FA_LP), *sO = sS + FA_T * FA_LS, *sM = sO + FA_T * g.lf, *sL = sM + FA_T;
    const int qt = (int)gridDim.x - 1 - (int)blockIdx.x; /* longest tiles first */
    const int h = blockIdx.y, kvh = h / (H / Hkv), i0 = qt * FA_T;
    const int64_t HD = (int64_t)H * D, KD = (int64_t)Hkv * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    fa_load_tile(sQ, q + h * D, HD, i0, n, g);
    for (int idx = threadIdx.x; idx < FA_T * g.lf; idx += FA_THREADS)
        sO[idx] = 0.0f;
    if (threadIdx.x < FA_T) {
        sM[threadIdx.x] = -INFINITY;
        sL[threadIdx.x] = 0.0f;
    }
    const int ilast = min(i0 + FA_T - 1, n - 1);
    const int jlo = window > 0 ? max(0, i0 - window + 1) : 0;
    for (int kt = jlo / FA_T; kt <= ilast / FA_T; kt++) {
        const int j0 = kt * FA_T;
        __syncthreads(); /* the previous tile's K, V and P are no longer read */
        fa_load_tile(sK, k + kvh * D, KD, j0, n, g);
        fa_load_tile(sV, v + kvh * D, KD, j0, n, g);
        __syncthreads();
        fa_rows_times_t(sS + warp * 16 * FA_LS, sQ + warp * 16 * g.lh, sK, g);
        __syncwarp();
        for (int rr = 0; rr < 16; rr++) {
            const int r = warp * 16 + rr, i = i0 + r;
            const float *srow = sS + r * FA_LS;
            const int ja = j0 + lane, jb = j0 + lane + 32;
            const float sa = fa_visible(i, ja, n, window) ? srow[lane] * scale2 : -INFINITY;
            const float sb = fa_visible(i, jb, n, window) ? srow[lane + 32] * scale2 : -INFINITY;
            const float mold = sM[r], mnew = fmaxf(mold, fa_warp_max(fmaxf(sa, sb)));
            /* P is rounded to bf16 for P V; the denominator sums the rounded values, so each
               output row is an exact convex combination of the rows of V the GEMM saw */
            const bf16 pa = __float2bfloat16_rn(sa == -INFINITY ? 0.0f : exp2f(sa - mnew));
            const bf16 pb = __float2bfloat16_rn(sb == -INFINITY ? 0.0f : exp2f(sb - mnew));
            const float sum = fa_warp_sum(__bfloat162float(pa) + __bfloat162float(pb));
            const float alpha = mold == -INFINITY ? 0.0f : exp2f(mold - mnew);
            sP[r * FA_LP + lane] = pa;
            sP[r * FA_LP + lane + 32] = pb;
            for (int c = lane; c < g.Dp; c += 32)
                sO[r * g.lf + c] *= alpha;
            __syncwarp();
            if (lane == 0) {
                sM[r] = mnew;
                sL[r] = sL[r] * alpha + sum;
            }
        }
        __syncwarp();
        /* O[warp rows] += P V */
        for (int cb = 0; cb < g.Dp / 16; cb++) {
            fa_acc acc;
            float *o = sO + warp * 16 * g.lf + cb * 16;
            wmma::load_matrix_sync(acc, o, g.lf, wmma::mem_row_major);
            for (int kk = 0; kk < FA_T; kk += 16) {
                fa_a_row a;
                fa_b_row b;
                wmma::load_matrix_sync(a, sP + warp * 16 * FA_LP + kk, FA_LP);
                wmma::load_matrix_sync(b, sV + kk * g.lh + cb * 16, g.lh);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(o, acc, g.lf, wmma::mem_row_major);
        }
    }
    __syncwarp();
    for (int rr = 0; rr < 16; rr++) {
        const int r = warp * 16 + rr, i = i0 + r;
        if (i >= n) break;
        const float l = sL[r], inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int c = lane; c < D; c += 32)
            out[(int64_t)i * HD + h * D + c] = sO[r * g.lf + c] * inv;
        if (lse && lane == 0) lse[(int64_t)i * H + h] = (sM[r] + log2f(l)) * 0.69314718055994531f;
    }
#endif
}

__global__ void __launch_bounds__(FA_THREADS) k_flash_bwd(float *dq, float *dk, float *dv, const float *dout,
                                                           const float *out, const float *lse, const float *q,
                                                           const float *k, const float *v, int n, int H, int Hkv,
                                                           int D, float scale, int window)
{
#if FA_HAVE_BF16_MMA /* bf16 WMMA needs sm_80; never launched below (bf16 mode only) */
    extern __shared__ __align__(128) unsigned char fa_smem[];
    const fa_geom g = fa_make(D);
    bf16 *sK = (bf16 *)fa_smem, *sV = sK + FA_T * g.lh, *sQ = sV + FA_T * g.lh, *sdO = sQ + FA_T * g.lh;
    bf16 *sP = sdO + FA_T * g.lh, *sdS = sP + FA_T * FA_LP;
    float *sS = (float *)(sdS + FA_T * FA_LP), *sdP = sS + FA_T * FA_LS, *sdK = sdP + FA_T * FA_LS;
    float *sdV = sdK + FA_T * g.lf, *sLse = sdV + FA_T * g.lf, *sDelta = sLse + FA_T;
    float *sdQ = sS; /* [64, lf] after S and dP are spent (2 * 64 * FA_LS >= 64 * lf for Dp <= 128) */
    const int group = H / Hkv, kvh = blockIdx.y, j0 = blockIdx.x * FA_T; /* most work first */
    const int64_t HD = (int64_t)H * D, KD = (int64_t)Hkv * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float log2e = 1.4426950408889634f, scale2 = scale * log2e;
    fa_load_tile(sK, k + kvh * D, KD, j0, n, g);
    fa_load_tile(sV, v + kvh * D, KD, j0, n, g);
    for (int idx = threadIdx.x; idx < FA_T * g.lf; idx += FA_THREADS) {
        sdK[idx] = 0.0f;
        sdV[idx] = 0.0f;
    }
    const int jlast = min(j0 + FA_T - 1, n - 1);
    const int ilast = window > 0 ? min(n - 1, jlast + window - 1) : n - 1;
    for (int gi = 0; gi < group; gi++) {
        const int h = kvh * group + gi;
        for (int qt = j0 / FA_T; qt <= ilast / FA_T; qt++) {
            const int i0 = qt * FA_T;
            __syncthreads(); /* the previous tile's Q, dO, P, dS and dQ are no longer read */
            fa_load_tile(sQ, q + h * D, HD, i0, n, g);
            fa_load_tile(sdO, dout + h * D, HD, i0, n, g);
            for (int rr = 0; rr < 16; rr++) {
                const int r = warp * 16 + rr, i = i0 + r;
                float d = 0.0f;
                if (i < n)
                    for (int c = lane; c < D; c += 32)
                        d += dout[(int64_t)i * HD + h * D + c] * out[(int64_t)i * HD + h * D + c];
                d = fa_warp_sum(d);
                if (lane == 0) {
                    sDelta[r] = d;
                    sLse[r] = i < n ? lse[(int64_t)i * H + h] * log2e : 0.0f;
                }
            }
            __syncthreads();
            fa_rows_times_t(sS + warp * 16 * FA_LS, sQ + warp * 16 * g.lh, sK, g);
            fa_rows_times_t(sdP + warp * 16 * FA_LS, sdO + warp * 16 * g.lh, sV, g);
            __syncwarp();
            for (int rr = 0; rr < 16; rr++) {
                const int r = warp * 16 + rr, i = i0 + r;
                const float l2 = sLse[r], delta = sDelta[r];
                for (int c = lane; c < FA_T; c += 32) {
                    const float p = fa_visible(i, j0 + c, n, window) ? exp2f(sS[r * FA_LS + c] * scale2 - l2) : 0.0f;
                    const float ds = p * (sdP[r * FA_LS + c] - delta) * scale;
                    sP[r * FA_LP + c] = __float2bfloat16_rn(p);
                    sdS[r * FA_LP + c] = __float2bfloat16_rn(ds);
                }
            }
            __syncthreads(); /* every row of P and dS is written; S and dP are spent */
            /* key rows 16w..: dV += P^T dO, dK += dS^T Q */
            for (int cb = 0; cb < g.Dp / 16; cb++) {
                fa_acc accv, acck;
                float *pv = sdV + warp * 16 * g.lf + cb * 16, *pk = sdK + warp * 16 * g.lf + cb * 16;
                wmma::load_matrix_sync(accv, pv, g.lf, wmma::mem_row_major);
                wmma::load_matrix_sync(acck, pk, g.lf, wmma::mem_row_major);
                for (int kk = 0; kk < FA_T; kk += 16) {
                    fa_a_col pt, dst;
                    fa_b_row bo, bq;
                    wmma::load_matrix_sync(pt, sP + kk * FA_LP + warp * 16, FA_LP);
                    wmma::load_matrix_sync(bo, sdO + kk * g.lh + cb * 16, g.lh);
                    wmma::mma_sync(accv, pt, bo, accv);
                    wmma::load_matrix_sync(dst, sdS + kk * FA_LP + warp * 16, FA_LP);
                    wmma::load_matrix_sync(bq, sQ + kk * g.lh + cb * 16, g.lh);
                    wmma::mma_sync(acck, dst, bq, acck);
                }
                wmma::store_matrix_sync(pv, accv, g.lf, wmma::mem_row_major);
                wmma::store_matrix_sync(pk, acck, g.lf, wmma::mem_row_major);
            }
            /* query rows 16w..: dQ = dS K, then added to dq */
            for (int cb = 0; cb < g.Dp / 16; cb++) {
                fa_acc acc;
                wmma::fill_fragment(acc, 0.0f);
                for (int kk = 0; kk < FA_T; kk += 16) {
                    fa_a_row a;
                    fa_b_row b;
                    wmma::load_matrix_sync(a, sdS + warp * 16 * FA_LP + kk, FA_LP);
                    wmma::load_matrix_sync(b, sK + kk * g.lh + cb * 16, g.lh);
                    wmma::mma_sync(acc, a, b, acc);
                }
                wmma::store_matrix_sync(sdQ + warp * 16 * g.lf + cb * 16, acc, g.lf, wmma::mem_row_major);
            }
            __syncwarp();
            for (int rr = 0; rr < 16; rr++) {
                const int r = warp * 16 + rr, i = i0 + r;
                if (i >= n) break;
                for (int c = lane; c < D; c += 32)
                    atomicAdd(&dq[(int64_t)i * HD + h * D + c], sdQ[r * g.lf + c]);
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < FA_T * D; idx += FA_THREADS) {
        const int r = idx / D, c = idx - r * D;
        if (j0 + r >= n) break;
        dk[(int64_t)(j0 + r) * KD + kvh * D + c] += sdK[r * g.lf + c];
        dv[(int64_t)(j0 + r) * KD + kvh * D + c] += sdV[r * g.lf + c];
    }
#endif
}

bool tuna_cuda_train_flash_ok(int64_t D)
{
    /* TUNA_TRAIN_FLASH=0: the batched-GEMM path in the bf16 mode too (comparisons) */
    static int off = -1;
    if (off < 0) {
        const char *e = getenv("TUNA_TRAIN_FLASH");
        off = e && e[0] == '0';
    }
    return !off && D >= 1 && D <= TUNA_CUDA_FLASH_MAX_D;
}

/* First rows of the sequences of the training layout (host; rows with pos 0 start one). Returns
 * the count and fills *starts (malloc'ed, count + 1 entries, the last = T); -1 on OOM. */
static int64_t fa_seqs(const int64_t *pos, int64_t T, int64_t **starts)
{
    int64_t ns = 0;
    for (int64_t t = 0; t < T; t++)
        ns += pos[t] == 0 || t == 0;
    int64_t *s = (int64_t *)malloc((size_t)(ns + 1) * sizeof *s);
    if (!s) return -1;
    for (int64_t t = 0, i = 0; t < T; t++)
        if (pos[t] == 0 || t == 0) s[i++] = t;
    s[ns] = T;
    *starts = s;
    return ns;
}

static bool fa_setup(tuna_backend *be, const void *kernel, size_t smem, const char *what)
{
    return tuna_cuda_check(be, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                           what);
}

void tuna_cuda_train_flash_forward(tuna_backend *be, float *out, float *lse, const float *q, const float *k,
                                   const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                                   float scale, int64_t window)
{
    if (be->sticky || T <= 0) return;
    int64_t *starts = NULL;
    const int64_t ns = fa_seqs(pos, T, &starts);
    if (ns < 0) {
        tuna_cuda_check(be, cudaErrorMemoryAllocation, "flash attention (host sequence list)");
        return;
    }
    if (tuna_cuda_train_flash_mma_forward(be, out, lse, q, k, v, starts, ns, H, Hkv, D, scale, window)) {
        free(starts);
        return;
    }
    const size_t smem = fa_fwd_smem((int)D);
    if (fa_setup(be, (const void *)k_flash_fwd, smem, "cudaFuncSetAttribute(k_flash_fwd)")) {
        const int64_t HD = H * D, KD = Hkv * D;
        for (int64_t s = 0; s < ns && !be->sticky; s++) {
            const int64_t s0 = starts[s], n = starts[s + 1] - s0;
            dim3 grid((unsigned)((n + FA_T - 1) / FA_T), (unsigned)H);
            k_flash_fwd<<<grid, FA_THREADS, smem, be->stream>>>(out + s0 * HD, lse ? lse + s0 * H : NULL, q + s0 * HD,
                                                                k + s0 * KD, v + s0 * KD, (int)n, (int)H, (int)Hkv,
                                                                (int)D, scale * 1.4426950408889634f, (int)window);
            tuna_cuda_check_launch(be, "k_flash_fwd");
        }
    }
    free(starts);
}

void tuna_cuda_train_flash_backward(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                    const float *out, const float *lse, const float *q, const float *k, const float *v,
                                    const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale,
                                    int64_t window)
{
    if (be->sticky || T <= 0) return;
    if (!out || !lse) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "flash attention backward (the forward's out and lse are needed)");
        return;
    }
    int64_t *starts = NULL;
    const int64_t ns = fa_seqs(pos, T, &starts);
    if (ns < 0) {
        tuna_cuda_check(be, cudaErrorMemoryAllocation, "flash attention (host sequence list)");
        return;
    }
    if (tuna_cuda_train_flash_mma_backward(be, dq, dk, dv, dout, out, lse, q, k, v, starts, ns, T, H, Hkv, D, scale,
                                           window)) {
        free(starts);
        return;
    }
    const size_t smem = fa_bwd_smem((int)D);
    if (fa_setup(be, (const void *)k_flash_bwd, smem, "cudaFuncSetAttribute(k_flash_bwd)")) {
        const int64_t HD = H * D, KD = Hkv * D;
        for (int64_t s = 0; s < ns && !be->sticky; s++) {
            const int64_t s0 = starts[s], n = starts[s + 1] - s0;
            dim3 grid((unsigned)((n + FA_T - 1) / FA_T), (unsigned)Hkv);
            k_flash_bwd<<<grid, FA_THREADS, smem, be->stream>>>(dq + s0 * HD, dk + s0 * KD, dv + s0 * KD,
                                                                dout + s0 * HD, out + s0 * HD, lse + s0 * H,
                                                                q + s0 * HD, k + s0 * KD, v + s0 * KD, (int)n, (int)H,
                                                                (int)Hkv, (int)D, scale, (int)window);
            tuna_cuda_check_launch(be, "k_flash_bwd");
        }
    }
    free(starts);
}
