/* q4.cu — bitsandbytes NF4/FP4 weights stay 4-bit on the GPU.
 *
 * Block scales: float32 absmax, or (what a double-quantized checkpoint uploads, src/model/device.c)
 * the nested form, rebuilt per block by q4_absmax bit-identical to the CPU's reconstruction.
 * Decode (T <= TUNA_CUDA_GEMV_MAX_T, and up to tuna_cuda_q4_tc_max_t() for k_q4_tc): fused
 * dequant-GEMVs that read each 4-bit matrix once per step (q/k/v, gate/up + GLU, o/down into the
 * residual, RMSNorm folded in): k_q4_h4 (q4_h4.cu) at T = 1 with 16-bit compute (default), k_q4_tc
 * (q4_tc.cu, tensor cores) at T = 2..8 with 16-bit compute where it fits, the grouped k_q4_tab
 * otherwise, k_q4_multi where k_q4_tab does not fit, and the first session's single-matrix kernels
 * (exact per-weight rounding to bf16/f16 for 16-bit checkpoints run in float32; TUNA_Q4_OLD=1).
 * Larger T (matmul.cu): up to tuna_cuda_q4_mm_max_t() tokens the 4-bit GEMM k_q4_mm (q4_mm.cu);
 * above, prefill, the matrix is dequantized into a scratch buffer of the compute dtype and handed
 * to cuBLAS; training dequantizes the same way (train_gemm.cu).
 */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"

/* Each lane owns a 16-entry table per row in shared memory, laid out [row][entry][lane] so that
 * lookups of a warp never share a bank; the table is rebuilt (16 multiply + round) per 32
 * weights, which all lie in one absmax block (blocksize a power of two >= 32 on the fast path).
 * R rows per warp let each x load serve R rows (x is 8x the bytes of 4-bit weights per token). */
template <int TT, int R>
__global__ void k_gemv_q4(float *y, const float *x, const uint8_t *codes, const struct q4_scales absmax, int bs_shift,
                          int mode, struct q4_lut lut_in, const float *bias, int64_t N, int64_t K, int vec, int bs)
{
    __shared__ float tab[4][R][16][32]; /* [warp][row][entry][lane] */
    __shared__ float slut[16];          /* for run-time indexing (a kernel parameter would go to the stack) */
    if (threadIdx.x == 0) {
#pragma unroll
        for (int c = 0; c < 16; c++) slut[c] = lut_in.v[c];
    }
    __syncthreads();
    int64_t n0 = ((int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5)) * R;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (n0 >= N) return;
    float acc[R][TT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) acc[r][t] = 0.0f;
    if (vec) {
        const int64_t K32 = K / 32;
        const uint4 *cr[R];
        int64_t e_row[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            int64_t n = n0 + r < N ? n0 + r : N - 1; /* rows past N compute garbage that is not stored */
            e_row[r] = n * K;
            cr[r] = reinterpret_cast<const uint4 *>(codes + e_row[r] / 2);
        }
        for (int64_t i = lane; i < K32; i += 32) {
            uint4 raw[R];
#pragma unroll
            for (int r = 0; r < R; r++) {
                raw[r] = __ldg(cr[r] + i);
                float am = q4_absmax(absmax, (e_row[r] + i * 32) >> bs_shift);
#pragma unroll
                for (int c = 0; c < 16; c++) tab[warp][r][c][lane] = q4_round(lut_in.v[c] * am, mode);
            }
#pragma unroll
            for (int wi = 0; wi < 4; wi++) {
                int64_t k0 = i * 32 + wi * 8;
                float wf[R][8];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    uint32_t word = wi == 0 ? raw[r].x : wi == 1 ? raw[r].y : wi == 2 ? raw[r].z : raw[r].w;
#pragma unroll
                    for (int b = 0; b < 4; b++) {
                        uint32_t byte = (word >> (8 * b)) & 0xffu;
                        wf[r][2 * b] = tab[warp][r][byte >> 4][lane];
                        wf[r][2 * b + 1] = tab[warp][r][byte & 15][lane];
                    }
                }
#pragma unroll
                for (int t = 0; t < TT; t++) {
                    const float4 *xp = reinterpret_cast<const float4 *>(x + t * K + k0);
                    float4 a = xp[0], b = xp[1];
#pragma unroll
                    for (int r = 0; r < R; r++)
                        acc[r][t] += wf[r][0] * a.x + wf[r][1] * a.y + wf[r][2] * a.z + wf[r][3] * a.w +
                                     wf[r][4] * b.x + wf[r][5] * b.y + wf[r][6] * b.z + wf[r][7] * b.w;
                }
            }
        }
    } else {
        for (int64_t k = lane; k < K; k += 32) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                int64_t n = n0 + r < N ? n0 + r : N - 1;
                int64_t e = n * K + k;
                uint8_t byte = codes[e >> 1];
                int c = (e & 1) ? (byte & 15) : (byte >> 4);
                float wv = q4_round(slut[c] * q4_absmax(absmax, e / bs), mode);
#pragma unroll
                for (int t = 0; t < TT; t++) acc[r][t] += wv * x[t * K + k];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float v = acc[r][t];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && n0 + r < N) y[t * N + n0 + r] = v + (bias ? bias[n0 + r] : 0.0f);
        }
}

/* The fast decode kernel (16-bit compute, or a checkpoint whose dequantized values need no
 * rounding): absmax is factored out of each group of 8 weights, acc += absmax · Σ lut[c]·x, so
 * a lane needs no table of its own. Lane i takes the 32-bit word i of each 128-byte run of codes
 * (8 weights) and x[8i .. 8i+8]: loads of codes and of x are both coalesced across the warp.
 * R rows per warp share each x load. Needs K % 8 == 0 and blocksize % 8 == 0. */
template <int TT, int R>
__global__ void k_gemv_q4_fast(float *y, const float *x, const uint8_t *codes, const struct q4_scales absmax, int bs_shift,
                               struct q4_lut lut_in, const float *bias, int64_t N, int64_t K)
{
    __shared__ float slut[16];
    if (threadIdx.x == 0) {
#pragma unroll
        for (int c = 0; c < 16; c++) slut[c] = lut_in.v[c];
    }
    __syncthreads();
    int64_t n0 = ((int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5)) * R;
    int lane = threadIdx.x & 31;
    if (n0 >= N) return;
    float acc[R][TT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) acc[r][t] = 0.0f;
    const int64_t K8 = K / 8;
    const uint32_t *cw[R];
    int64_t e_row[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        int64_t n = n0 + r < N ? n0 + r : N - 1;
        e_row[r] = n * K;
        cw[r] = reinterpret_cast<const uint32_t *>(codes + e_row[r] / 2);
    }
    for (int64_t g = lane; g < K8; g += 32) {
        float4 xa[TT], xb[TT];
#pragma unroll
        for (int t = 0; t < TT; t++) {
            const float4 *xp = reinterpret_cast<const float4 *>(x + t * K + g * 8);
            xa[t] = xp[0];
            xb[t] = xp[1];
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            uint32_t word = __ldg(cw[r] + g);
            float am = q4_absmax(absmax, (e_row[r] + g * 8) >> bs_shift);
            float wf[8];
#pragma unroll
            for (int b = 0; b < 4; b++) {
                uint32_t byte = (word >> (8 * b)) & 0xffu;
                wf[2 * b] = slut[byte >> 4];
                wf[2 * b + 1] = slut[byte & 15];
            }
#pragma unroll
            for (int t = 0; t < TT; t++) {
                float4 a = xa[t], b = xb[t];
                float d = wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x + wf[5] * b.y +
                          wf[6] * b.z + wf[7] * b.w;
                acc[r][t] += am * d;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float v = acc[r][t];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && n0 + r < N) y[t * N + n0 + r] = v + (bias ? bias[n0 + r] : 0.0f);
        }
}

/* 32 weights per thread (16-byte load, one absmax block when bs % 32 == 0), written as 16-bit
 * (4 x 16-byte stores) or float32; the scalar kernel below handles the rest. */
__global__ void k_dequant_q4_vec(void *out, int dtype, const uint8_t *codes, const struct q4_scales absmax, int bs, int mode,
                                 struct q4_lut lut, int64_t n32)
{
    __shared__ float slut[16];
    if (threadIdx.x == 0) {
#pragma unroll
        for (int c = 0; c < 16; c++) slut[c] = lut.v[c];
    }
    __syncthreads();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n32) return;
    uint4 raw = __ldg(reinterpret_cast<const uint4 *>(codes) + i);
    float am = q4_absmax(absmax, i * 32 / bs); /* once per 32 weights */
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    float v[32];
#pragma unroll
    for (int wi = 0; wi < 4; wi++)
#pragma unroll
        for (int b = 0; b < 4; b++) {
            uint32_t byte = (words[wi] >> (8 * b)) & 0xffu;
            v[wi * 8 + 2 * b] = q4_round(slut[byte >> 4] * am, mode);
            v[wi * 8 + 2 * b + 1] = q4_round(slut[byte & 15] * am, mode);
        }
    if (dtype == 0) {
        float4 *o = reinterpret_cast<float4 *>(out) + i * 8;
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
        return;
    }
    uint4 *o = reinterpret_cast<uint4 *>(out) + i * 4;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint32_t h[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float lo = v[8 * j + 2 * q], hi = v[8 * j + 2 * q + 1];
            if (dtype == 1) {
                __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
                h[q] = *reinterpret_cast<uint32_t *>(&p);
            } else {
                __half2 p = __floats2half2_rn(lo, hi);
                h[q] = *reinterpret_cast<uint32_t *>(&p);
            }
        }
        o[j] = make_uint4(h[0], h[1], h[2], h[3]);
    }
}

/* One thread per byte: two weights into out (dtype 0 f32, 1 bf16, 2 f16). */
__global__ void k_dequant_q4(void *out, int dtype, const uint8_t *codes, const struct q4_scales absmax, int bs, int mode,
                             struct q4_lut lut, int64_t numel)
{
    __shared__ float slut[16];
    if (threadIdx.x == 0) {
#pragma unroll
        for (int c = 0; c < 16; c++) slut[c] = lut.v[c];
    }
    __syncthreads();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; /* byte */
    if (2 * i >= numel) return;
    uint8_t byte = codes[i];
    for (int h = 0; h < 2; h++) {
        int64_t e = 2 * i + h;
        if (e >= numel) break;
        float v = q4_round(slut[h ? (byte & 15) : (byte >> 4)] * q4_absmax(absmax, e / bs), mode);
        if (dtype == 1) ((__nv_bfloat16 *)out)[e] = __float2bfloat16_rn(v);
        else if (dtype == 2) ((__half *)out)[e] = __float2half_rn(v);
        else ((float *)out)[e] = v;
    }
}

/* TUNA_Q4_OLD=1: the single-matrix kernels above instead of the grouped one (for comparisons). */
bool tuna_cuda_q4_old(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_Q4_OLD");
        v = e && e[0] == '1';
    }
    return v == 1;
}

void tuna_cuda_gemv_q4(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                       int64_t T)
{
    const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)w->q4;
    const struct q4_scales sc = q4_scales_of(q);
    int64_t N = w->rows, K = w->cols;
    struct q4_lut lut;
    memcpy(lut.v, q->lut, sizeof lut.v);
    int shift = 0;
    while ((1 << shift) < q->blocksize) shift++;
    bool pow2 = (1 << shift) == q->blocksize;
    int vec = pow2 && K % 32 == 0 && q->blocksize >= 32 && ((uintptr_t)w->data % 16) == 0 && ((uintptr_t)x % 16) == 0;
    const int warps = 4;
    int R = T == 1 ? 1 : 2;
    unsigned blocks = (unsigned)((N + (int64_t)warps * R - 1) / ((int64_t)warps * R));
    /* factoring absmax out is exact up to float reassociation when no rounding to bf16/f16 is
     * asked for; with 16-bit compute the rounding of each dequantized weight is below the
     * compute's own rounding, so the fast kernel serves there too */
    bool fast = pow2 && K % 8 == 0 && q->blocksize >= 8 && ((uintptr_t)w->data % 4) == 0 &&
                ((uintptr_t)x % 16) == 0 && (q->round_mode == 0 || q->prefill != TUNA_DTYPE_F32);
    if (fast && !tuna_cuda_q4_old()) { /* the grouped kernel below with one matrix */
        struct gemv_job j;
        memset(&j, 0, sizeof j);
        j.nseg = 1;
        j.K = K;
        j.mode = GEMV_STORE;
        j.s[0].W = w->data;
        j.s[0].y = y;
        j.s[0].bias = bias;
        j.s[0].N = N;
        if (tuna_cuda_q4_multi(be, x, &j, &w, T)) return;
    }
    if (fast) {
#define Q4F_CASE(TT)                                                                                              \
    case TT:                                                                                                      \
        if (R == 1)                                                                                               \
            k_gemv_q4_fast<TT, 1><<<blocks, warps * 32, 0, be->stream>>>(y, x, (const uint8_t *)w->data,          \
                                                                         sc, shift, lut, bias, N, K);             \
        else                                                                                                      \
            k_gemv_q4_fast<TT, 2><<<blocks, warps * 32, 0, be->stream>>>(y, x, (const uint8_t *)w->data,          \
                                                                         sc, shift, lut, bias, N, K);             \
        break
        switch (T) {
            Q4F_CASE(1);
            Q4F_CASE(2);
            Q4F_CASE(3);
            Q4F_CASE(4);
            Q4F_CASE(5);
            Q4F_CASE(6);
            Q4F_CASE(7);
            Q4F_CASE(8);
        }
#undef Q4F_CASE
        tuna_cuda_check_launch(be, "k_gemv_q4_fast");
        return;
    }
#define Q4_CASE(TT)                                                                                            \
    case TT:                                                                                                   \
        if (R == 1)                                                                                            \
            k_gemv_q4<TT, 1><<<blocks, warps * 32, 0, be->stream>>>(y, x, (const uint8_t *)w->data, sc,        \
                                                                    shift, q->round_mode, lut, bias, N, K, vec, \
                                                                    q->blocksize);                              \
        else                                                                                                   \
            k_gemv_q4<TT, 2><<<blocks, warps * 32, 0, be->stream>>>(y, x, (const uint8_t *)w->data, sc,        \
                                                                    shift, q->round_mode, lut, bias, N, K, vec, \
                                                                    q->blocksize);                              \
        break
    switch (T) {
        Q4_CASE(1);
        Q4_CASE(2);
        Q4_CASE(3);
        Q4_CASE(4);
        Q4_CASE(5);
        Q4_CASE(6);
        Q4_CASE(7);
        Q4_CASE(8);
    }
#undef Q4_CASE
    tuna_cuda_check_launch(be, "k_gemv_q4");
}

bool tuna_cuda_dequant_q4(tuna_backend *be, const struct tuna_weight *w, void **out, enum tuna_dtype *dt)
{
    const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)w->q4;
    int64_t numel = w->rows * w->cols;
    int code = q->prefill == TUNA_DTYPE_BF16 ? 1 : q->prefill == TUNA_DTYPE_F16 ? 2 : 0;
    size_t bytes = (size_t)numel * (code ? 2 : 4);
    if (!tuna_cuda_grow(be, &be->wdeq, bytes, "cudaMalloc(4-bit weight dequantized for prefill)")) return false;
    struct q4_lut lut;
    memcpy(lut.v, q->lut, sizeof lut.v);
    const struct q4_scales sc = q4_scales_of(q);
    int64_t nbytes = (numel + 1) / 2;
    if (numel % 32 == 0 && q->blocksize % 32 == 0 && ((uintptr_t)w->data % 16) == 0) {
        int64_t n32 = numel / 32;
        k_dequant_q4_vec<<<tuna_cuda_blocks(n32, 256), 256, 0, be->stream>>>(
            be->wdeq.p, code, (const uint8_t *)w->data, sc, q->blocksize, q->round_mode, lut, n32);
    } else {
        k_dequant_q4<<<tuna_cuda_blocks(nbytes, 256), 256, 0, be->stream>>>(
            be->wdeq.p, code, (const uint8_t *)w->data, sc, q->blocksize, q->round_mode, lut, numel);
    }
    if (!tuna_cuda_check_launch(be, "k_dequant_q4")) return false;
    *out = be->wdeq.p;
    *dt = code == 1 ? TUNA_DTYPE_BF16 : code == 2 ? TUNA_DTYPE_F16 : TUNA_DTYPE_F32;
    return true;
}

extern "C" tuna_status tuna_cuda_q4_dequantize(tuna_backend *be, const struct tuna_weight *w, void *out)
{
    void *p;
    enum tuna_dtype dt;
    if (!be->sticky && tuna_cuda_dequant_q4(be, w, &p, &dt))
        tuna_cuda_check(be, cudaMemcpyAsync(out, p, (size_t)(w->rows * w->cols) * (dt == TUNA_DTYPE_F32 ? 4 : 2),
                                            cudaMemcpyDeviceToDevice, be->stream),
                        "cudaMemcpyAsync(dequantized 4-bit weight)");
    return tuna_cuda_status(be);
}

/* ---- the grouped 4-bit decode GEMV (gemv.cuh's job: q/k/v in one launch, gate/up with the GLU,
 * o/down added into the residual, the RMSNorm folded in) ----
 *
 * The fast kernel's arithmetic (absmax factored out of each group of 8 weights, acc += absmax ·
 * Σ lut[c]·x) with what limited it to ~0.8 TB/s fixed: a lane took one 4-byte word per loop
 * iteration, so a warp had 128 bytes in flight. Here a lane issues U words (and their absmax)
 * before using any — U × 128 bytes per warp and row in flight, coalesced across the warp (lane i
 * reads word base + i + 32u, and x[8 × that word ..]). The nibble table: LUT = 0, 16 floats in
 * shared memory (one load per weight); LUT = 1, a table of byte -> (value of the high nibble,
 * value of the low nibble) in 16 copies, [byte][copy] with copy = lane % 16, so the 64-bit loads
 * of a half-warp never share a bank (32 KiB of shared memory, one load per two weights).
 * TUNA_Q4_LUT=1 picks the pair table (default 0: measured faster end to end on an H100, 5.65 against
 * 6.92 ms per 8B decode step); the sums are the same either way. A version that staged x in shared
 * memory like the 16-bit kernel, with 4 rows per warp, measured slower (6.88 ms), so x comes
 * through L1 here. */
#define Q4M_U 8 /* words in flight per lane and row */

static int q4_lut_mode(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_Q4_LUT");
        v = e && e[0] == '1' ? 1 : 0;
    }
    return v;
}

template <int TT, int R, bool NORM, int LUT>
__global__ void __launch_bounds__(128) k_q4_multi(const float *__restrict__ x, const struct gemv_job j,
                                                  const struct q4_lut lut_in)
{
    extern __shared__ float2 q4_tab2[]; /* LUT 1: [256][16] */
    __shared__ float slut[16];
    if (LUT == 0) {
        if (threadIdx.x == 0) {
#pragma unroll
            for (int c = 0; c < 16; c++) slut[c] = lut_in.v[c];
        }
    } else {
        if (threadIdx.x == 0) {
#pragma unroll
            for (int c = 0; c < 16; c++) slut[c] = lut_in.v[c];
        }
        __syncthreads();
        for (int e = threadIdx.x; e < 256 * 16; e += blockDim.x) q4_tab2[e] = make_float2(slut[e >> 8], slut[(e >> 4) & 15]);
    }
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int64_t w0 = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int64_t K = j.K, K8 = K / 8;
    /* the warps stride over the rows (fewer blocks than rows: the table is built once per block) */
    bool first = true;
    for (int64_t wid = w0; wid < j.nwarp; wid += (int64_t)gridDim.x * (blockDim.x / 32)) {
        int seg;
        int64_t n0;
        if (!gemv_rows(j, j.mode == GEMV_GLU ? 1 : R, wid, &seg, &n0)) continue; /* padding rows */
        const uint32_t *cw[R];
        const struct q4_scales *amp[R];
        int64_t e_row[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const struct gemv_seg *s = j.mode == GEMV_GLU ? &j.s[r == 0 ? 0 : 1] : &j.s[seg];
            int64_t n = j.mode == GEMV_GLU ? n0 : (n0 + r < s->N ? n0 + r : s->N - 1);
            e_row[r] = n * K;
            cw[r] = reinterpret_cast<const uint32_t *>((const uint8_t *)s->W + e_row[r] / 2);
            amp[r] = &s->sc;
        }
        float acc[R][TT], ss[TT];
#pragma unroll
        for (int t = 0; t < TT; t++) {
            ss[t] = 0.0f;
#pragma unroll
            for (int r = 0; r < R; r++) acc[r][t] = 0.0f;
        }
        uint32_t wv[Q4M_U][R];
        float av[Q4M_U][R];
        bool have = false;
        if (first && j.prefetch == 2)
#pragma unroll
            for (int r = 0; r < R; r++)
                for (int64_t l = (int64_t)lane * 32; l < K8; l += 32 * 32) tuna_prefetch_l2(cw[r] + l);
        if (first && j.prefetch >= 1) {
#pragma unroll
            for (int u = 0; u < Q4M_U; u++) {
                const int64_t g = lane + 32 * u;
#pragma unroll
                for (int r = 0; r < R; r++)
                    if (g < K8) {
                        wv[u][r] = __ldg(cw[r] + g);
                        av[u][r] = q4_absmax(*amp[r], (e_row[r] + g * 8) >> j.bs_shift);
                    }
            }
            have = true;
        }
        if (first) {
            tuna_pdl_wait();
            tuna_pdl_trigger();
            first = false;
        }
        const float2 *tab = q4_tab2 + (lane & 15);
        for (int64_t base = 0; base < K8; base += 32 * Q4M_U) {
            if (!have) {
#pragma unroll
                for (int u = 0; u < Q4M_U; u++) {
                    const int64_t g = base + lane + 32 * u;
#pragma unroll
                    for (int r = 0; r < R; r++)
                        if (g < K8) {
                            wv[u][r] = __ldg(cw[r] + g);
                            av[u][r] = q4_absmax(*amp[r], (e_row[r] + g * 8) >> j.bs_shift);
                        }
                }
            }
            have = false;
#pragma unroll
            for (int u = 0; u < Q4M_U; u++) {
                const int64_t g = base + lane + 32 * u;
                if (g >= K8) break;
                float4 xa[TT], xb[TT];
                float4 na = make_float4(0.f, 0.f, 0.f, 0.f), nb = na;
                if (NORM) {
                    const float4 *np = reinterpret_cast<const float4 *>(j.nw + g * 8);
                    na = __ldg(np);
                    nb = __ldg(np + 1);
                }
#pragma unroll
                for (int t = 0; t < TT; t++) {
                    const float4 *xp = reinterpret_cast<const float4 *>(x + t * K + g * 8);
                    xa[t] = __ldg(xp);
                    xb[t] = __ldg(xp + 1);
                    if (NORM) gemv_norm_x(xa[t], xb[t], na, nb, ss[t]);
                }
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const uint32_t word = wv[u][r];
                    float wf[8];
#pragma unroll
                    for (int b = 0; b < 4; b++) {
                        const uint32_t byte = (word >> (8 * b)) & 0xffu;
                        if (LUT == 0) {
                            wf[2 * b] = slut[byte >> 4];
                            wf[2 * b + 1] = slut[byte & 15];
                        } else {
                            const float2 p = tab[byte * 16];
                            wf[2 * b] = p.x;
                            wf[2 * b + 1] = p.y;
                        }
                    }
#pragma unroll
                    for (int t = 0; t < TT; t++) {
                        const float4 a = xa[t], b = xb[t];
                        const float d = wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x +
                                        wf[5] * b.y + wf[6] * b.z + wf[7] * b.w;
                        acc[r][t] += av[u][r] * d;
                    }
                }
            }
        }
        gemv_epilogue<TT, R, NORM>(j, acc, ss, x, seg, n0, wid == 0);
    }
}

template <int TT, int R, bool NORM, int LUT>
static void q4m_launch_one(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                           unsigned blocks)
{
    const size_t smem = LUT ? (size_t)256 * 16 * sizeof(float2) : 0;
    tuna_cuda_launch(be, "k_q4_multi", k_q4_multi<TT, R, NORM, LUT>, dim3(blocks), dim3(128), smem, x, *j, *lut);
}

template <int R, bool NORM, int LUT>
static void q4m_launch_tt(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                          unsigned blocks, int64_t T)
{
    switch (T) {
    case 1: q4m_launch_one<1, R, NORM, LUT>(be, x, j, lut, blocks); break;
    case 2: q4m_launch_one<2, R, NORM, LUT>(be, x, j, lut, blocks); break;
    case 3: q4m_launch_one<3, R, NORM, LUT>(be, x, j, lut, blocks); break;
    case 4: q4m_launch_one<4, R, NORM, LUT>(be, x, j, lut, blocks); break;
    case 5: q4m_launch_one<5, R, NORM, LUT>(be, x, j, lut, blocks); break;
    case 6: q4m_launch_one<6, R, NORM, LUT>(be, x, j, lut, blocks); break;
    case 7: q4m_launch_one<7, R, NORM, LUT>(be, x, j, lut, blocks); break;
    case 8: q4m_launch_one<8, R, NORM, LUT>(be, x, j, lut, blocks); break;
    }
}

template <int R, bool NORM>
static void q4m_launch_lut(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                           unsigned blocks, int64_t T)
{
    if (q4_lut_mode()) q4m_launch_tt<R, NORM, 1>(be, x, j, lut, blocks, T);
    else q4m_launch_tt<R, NORM, 0>(be, x, j, lut, blocks, T);
}

/* ---- k_q4_tab: the 4-bit decode GEMV with the nibble table in shared memory, x staged once ----
 *
 * What bounded k_q4_multi (30% of the copy rate): at T = 1 every lane read 32 bytes of x (and 32 of
 * the norm's weight) through L1 per 4 bytes of codes, plus one shared-memory load per weight for
 * the table: the L1/shared-memory pipe (128 bytes per clock per SM), not DRAM, was the limit.
 * Here:
 * - a lane loads 16 contiguous bytes of codes (32 weights, one absmax block) per row, U (2) such
 *   loads per row and 4 rows per warp in flight before any is used (GLU: gate and up of two
 *   outputs);
 * - x (normalized when the norm is folded in) is staged once per block in shared memory, with the
 *   16-byte pieces of each 128-byte run XOR-swizzled so that the 8 lanes of a quarter-warp, which
 *   read the same piece of their own 32 weights, hit 8 different bank groups; each x load serves
 *   the warp's 4 rows;
 * - the table maps a byte of codes to the values of its two nibbles (float2, exact: LUT 1; or
 *   half2, 2 bytes per weight of shared-memory traffic instead of 4: LUT 2, 16-bit compute only,
 *   the values rounded to f16, error below 2^-11 against the bf16 rounding of 2^-9 that the fast
 *   kernels already skip), one copy per lane: [byte][lane] with a 256-byte row, so the address
 *   is one byte permute (byte << 8 | lane * 8) and a warp's loads never share a bank;
 * - absmax is applied once per 32 weights (acc += absmax * sum lut[c] x), read as float32 or
 *   rebuilt from the double-quantized form (nested code table in shared memory).
 * One block of 16 warps per SM; item i (4 rows) goes to warp i / grid of block i % grid, so the
 * items spread over all SMs. Every sum is taken by one warp in a fixed order: deterministic. */
#define Q4T_THREADS 512
#define Q4T_R 4
#define Q4T_TAB_BYTES 65536
#define Q4T_NCODE_BYTES (GEMV_MAX_SEG * 256 * 4)

struct q4t_rows {
    const uint4 *c[Q4T_R];
    int64_t e0[Q4T_R]; /* element index of the row's first weight (for its absmax block) */
    int ns[Q4T_R];     /* segment of the row (its scales; its nested code table in shared memory) */
};

/* The rows of item `it`: false past the end (or a padding item). */
static __device__ __forceinline__ bool q4t_item(const struct gemv_job &j, int64_t it, struct q4t_rows &rw, int *seg,
                                                int64_t *n0)
{
    const int64_t K = j.K;
    int64_t n[Q4T_R];
    int sg[Q4T_R];
    if (j.mode == GEMV_GLU) {
        const int64_t N = j.s[0].N, a = 2 * it;
        if (a >= N) return false;
        const int64_t b = a + 1 < N ? a + 1 : a;
        *seg = 0;
        *n0 = a;
        n[0] = a, n[1] = a, n[2] = b, n[3] = b;
        sg[0] = 0, sg[1] = 1, sg[2] = 0, sg[3] = 1;
    } else {
        if (!gemv_rows(j, Q4T_R, it, seg, n0)) return false;
        const int64_t N = j.s[*seg].N;
#pragma unroll
        for (int r = 0; r < Q4T_R; r++) {
            n[r] = *n0 + r < N ? *n0 + r : N - 1; /* rows past N are computed, not stored */
            sg[r] = *seg;
        }
    }
#pragma unroll
    for (int r = 0; r < Q4T_R; r++) {
        rw.e0[r] = n[r] * K;
        rw.c[r] = reinterpret_cast<const uint4 *>((const uint8_t *)j.s[sg[r]].W + rw.e0[r] / 2);
        rw.ns[r] = sg[r];
    }
    return true;
}

/* Codes and scales of U 16-byte chunks per row: chunk base + lane + 32 u (zeros past the row). */
template <int U>
static __device__ __forceinline__ void q4t_load(const struct gemv_job &j, const struct q4t_rows &rw, int64_t base,
                                                int lane, int64_t K32, uint4 (&raw)[U][Q4T_R], float (&sa)[U][Q4T_R],
                                                uint32_t (&sq)[U][Q4T_R])
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int64_t gi = base + lane + 32 * u;
#pragma unroll
        for (int r = 0; r < Q4T_R; r++) {
            raw[u][r] = make_uint4(0u, 0u, 0u, 0u);
            sa[u][r] = 0.0f;
            sq[u][r] = 0u;
            if (gi < K32) {
                raw[u][r] = __ldg(rw.c[r] + gi);
                const struct q4_scales &sc = j.s[rw.ns[r]].sc;
                const int64_t b = (rw.e0[r] + gi * 32) >> j.bs_shift;
                if (sc.absmax) {
                    sa[u][r] = __ldg(sc.absmax + b);
                } else {
                    sq[u][r] = __ldg(sc.q + b);
                    sa[u][r] = __ldg(sc.nabs + (b >> sc.nshift));
                }
            }
        }
    }
}

/* The two values of byte b (0..3) of word w: the table entry at (byte << 8) | lane offset. */
template <int LUT>
static __device__ __forceinline__ float2 q4t_pair(const uint8_t *tab, uint32_t w, int b, uint32_t lane_off)
{
    const uint32_t off = __byte_perm(w, lane_off, 0x5504u | ((uint32_t)b << 4));
    if (LUT == 2) return __half22float2(*reinterpret_cast<const __half2 *>(tab + off));
    return *reinterpret_cast<const float2 *>(tab + off);
}

template <int TT, bool NORM, int LUT, int U>
__global__ void __launch_bounds__(Q4T_THREADS, 1)
    k_q4_tab(const float *__restrict__ x, const __grid_constant__ struct gemv_job j, const struct q4_lut lut_in,
             int64_t nitems)
{
    /* U: 16-byte chunks per row in flight (2; TUNA_Q4_U=4: 4 at T <= 2) */
    extern __shared__ float4 q4t_smem4[];
    uint8_t *tab = reinterpret_cast<uint8_t *>(q4t_smem4);              /* [256][256 bytes] */
    float *ncode = reinterpret_cast<float *>(tab + Q4T_TAB_BYTES);       /* [GEMV_MAX_SEG][256] */
    float4 *xs4 = reinterpret_cast<float4 *>(tab + Q4T_TAB_BYTES + Q4T_NCODE_BYTES); /* [TT, K] swizzled */
    __shared__ float slut[16];
    __shared__ float red[TT * 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int c = 0; c < 16; c++) slut[c] = lut_in.v[c];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < 256 * 32; e += blockDim.x) {
        const int byte = e >> 5, l = e & 31;
        const float hi = slut[byte >> 4], lo = slut[byte & 15];
        if (LUT == 2) *reinterpret_cast<__half2 *>(tab + byte * 256 + l * 4) = __floats2half2_rn(hi, lo);
        else *reinterpret_cast<float2 *>(tab + byte * 256 + l * 8) = make_float2(hi, lo);
    }
    for (int s = 0; s < j.nseg; s++)
        if (!j.s[s].sc.absmax)
            for (int e = threadIdx.x; e < 256; e += blockDim.x) ncode[s * 256 + e] = __ldg(j.s[s].sc.ncode + e);
    const int64_t K = j.K, K32 = K / 32, K4 = K / 4;
    const int64_t gstride = (int64_t)gridDim.x * (blockDim.x / 32);
    const uint32_t lane_off = (uint32_t)lane * (LUT == 2 ? 4u : 8u);
    const int sw = lane & 7;
    /* the first item's first codes before waiting for the previous kernel (weights are not written) */
    int64_t it = blockIdx.x + (int64_t)gridDim.x * warp;
    struct q4t_rows rw;
    int seg = 0;
    int64_t n0 = 0;
    uint4 raw[U][Q4T_R];
    float sa[U][Q4T_R];
    uint32_t sq[U][Q4T_R];
    bool have = false;
    while (it < nitems && !q4t_item(j, it, rw, &seg, &n0)) it += gstride;
    if (it < nitems && j.prefetch >= 1) {
        q4t_load<U>(j, rw, 0, lane, K32, raw, sa, sq);
        have = true;
    }
    tuna_pdl_wait();
    tuna_pdl_trigger();
    gemv_stage_x_at<TT, NORM, true>(xs4, x, j, red); /* ends with __syncthreads: table and codes ready too */
    for (; it < nitems; it += gstride) {
        if (!have && !q4t_item(j, it, rw, &seg, &n0)) continue; /* padding item */
        float acc[Q4T_R][TT];
#pragma unroll
        for (int r = 0; r < Q4T_R; r++)
#pragma unroll
            for (int t = 0; t < TT; t++) acc[r][t] = 0.0f;
        for (int64_t base = 0; base < K32; base += 32 * U) {
            if (!have) q4t_load<U>(j, rw, base, lane, K32, raw, sa, sq);
            have = false;
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int64_t gi = base + lane + 32 * u;
                if (gi >= K32) break;
                const float4 *xg = xs4 + 8 * gi;
                float d[Q4T_R][TT];
#pragma unroll
                for (int r = 0; r < Q4T_R; r++)
#pragma unroll
                    for (int t = 0; t < TT; t++) d[r][t] = 0.0f;
#pragma unroll
                for (int p = 0; p < 8; p++) {
                    float4 xv[TT];
#pragma unroll
                    for (int t = 0; t < TT; t++) xv[t] = xg[t * K4 + (p ^ sw)];
#pragma unroll
                    for (int r = 0; r < Q4T_R; r++) {
                        const uint4 c4 = raw[u][r];
                        const uint32_t w = (p >> 1) == 0 ? c4.x : (p >> 1) == 1 ? c4.y : (p >> 1) == 2 ? c4.z : c4.w;
                        const float2 v0 = q4t_pair<LUT>(tab, w, 2 * (p & 1), lane_off);
                        const float2 v1 = q4t_pair<LUT>(tab, w, 2 * (p & 1) + 1, lane_off);
#pragma unroll
                        for (int t = 0; t < TT; t++)
                            d[r][t] += v0.x * xv[t].x + v0.y * xv[t].y + v1.x * xv[t].z + v1.y * xv[t].w;
                    }
                }
#pragma unroll
                for (int r = 0; r < Q4T_R; r++) {
                    const struct q4_scales &sc = j.s[rw.ns[r]].sc;
                    const float am = sc.absmax ? sa[u][r]
                                               : q4_nested(ncode[rw.ns[r] * 256 + sq[u][r]], sa[u][r], sc.noff);
#pragma unroll
                    for (int t = 0; t < TT; t++) acc[r][t] += am * d[r][t];
                }
            }
        }
        /* the warp's sums, then lane 0 stores */
#pragma unroll
        for (int r = 0; r < Q4T_R; r++)
#pragma unroll
            for (int t = 0; t < TT; t++)
                for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
        if (lane == 0) {
            if (j.mode == GEMV_GLU) {
                const int64_t N = j.s[0].N;
                const float *bg = j.s[0].bias, *bu = j.s[1].bias;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int64_t n = n0 + h;
                    if (n >= N) break;
                    const float g0 = bg ? bg[n] : 0.0f, u0 = bu ? bu[n] : 0.0f;
#pragma unroll
                    for (int t = 0; t < TT; t++)
                        j.s[0].y[t * N + n] = tuna_cuda_act(acc[2 * h][t] + g0, j.act) * (acc[2 * h + 1][t] + u0);
                }
            } else {
                const struct gemv_seg &s = j.s[seg];
#pragma unroll
                for (int r = 0; r < Q4T_R; r++) {
                    if (n0 + r >= s.N) break;
                    const float b = s.bias ? s.bias[n0 + r] : 0.0f;
#pragma unroll
                    for (int t = 0; t < TT; t++) {
                        float *yp = s.y + t * s.N + n0 + r;
                        if (j.mode == GEMV_ADD) *yp += acc[r][t] + b;
                        else *yp = acc[r][t] + b;
                    }
                }
            }
        }
    }
}

/* TUNA_Q4_K: 0 the k_q4_multi kernel above, 1 k_q4_tab with the float2 table, 2 with the half2
 * table where the compute is 16-bit (float32 compute takes the float2 table), 4 k_q4_h2 (the default until the twelfth session)
 * (below) at T = 1 where the compute is 16-bit and it fits, else as 2; 5 k_q4_s (q4_stream.cu,
 * seventh session: bulk copies into a ring of shared-memory stages, sm_90+) where it fits, else
 * as 4; 6 k_q4_v (q4_stream.cu, eighth session: balanced unit streams per warp; opt-in, chain 75.5
 * against 77.1 us/layer with TUNA_Q4_VR=64 TUNA_Q4_VB=2, within the noise) where it fits, else as 4; 3 k_q4_mma
 * (below) where the compute is 16-bit and it fits, else as 2 (fifth session's H100 round: chain
 * 125.7 us/layer against 84.8 for 2, end to end 4.79 against 3.54 ms: opt-in only). Measured on
 * the H100 (docs/PERFORMANCE.md): 32-layer NF4 chain 139.6 us/layer with 2, 142.1 with 1, 184.5
 * with 0. 8 (default): k_q4_h4 (q4_h4.cu, twelfth session: k_q4_h2 with items of 4 rows, the same
 * bits; chain 67.3 against 73.4 us/layer, end to end 2.95 against 3.14 ms/step) where it fits, else as 4;
 * At T = 2..8, 8 also runs k_q4_tc (q4_tc.cu, twentieth session: the products on the tensor cores, up
 * to 8 tokens per launch) where it fits, else k_q4_tab; at T = 9..tuna_cuda_q4_tc_max_t() only
 * k_q4_tc (else the caller's dequantize + GEMM). 9: k_q4_tc at T = 1 too, where it fits, else as 8.
 * 7: k_q4_sk (q4_sk.cu, twenty-first session: the tensor cores, the units spread evenly over the
 * warps) at T = 1 where it fits, else as 8. */
static int q4_kernel_mode(void)
{
    /* read at every call (a getenv per launch; graphs capture once) so tests can compare kernels */
    const char *e = getenv("TUNA_Q4_K");
    return e && e[0] >= '0' && e[0] <= '9' ? e[0] - '0' : 8;
}

/* Chunks per row in flight at T <= 2: 2 (default), TUNA_Q4_U=4 for 4. ptxas (sm_90a, 128 registers
 * at 512 threads): U = 4 spills 300-600 bytes per thread at T = 1 and 2 (the H100 round's numbers
 * were taken with it), U = 2 spills nothing. */
static int q4_u_mode(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_Q4_U");
        v = e && e[0] == '4' ? 4 : 2;
    }
    return v;
}

template <int TT, bool NORM, int LUT>
static bool q4t_launch_one(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                           unsigned blocks, size_t smem, int64_t nitems)
{
    if constexpr (TT <= 2) {
        if (q4_u_mode() == 4)
            return tuna_cuda_launch(be, "k_q4_tab", k_q4_tab<TT, NORM, LUT, 4>, dim3(blocks), dim3(Q4T_THREADS), smem,
                                    x, *j, *lut, nitems);
    }
    return tuna_cuda_launch(be, "k_q4_tab", k_q4_tab<TT, NORM, LUT, 2>, dim3(blocks), dim3(Q4T_THREADS), smem, x, *j,
                            *lut, nitems);
}

template <bool NORM, int LUT>
static bool q4t_launch_tt(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                          unsigned blocks, size_t smem, int64_t nitems, int64_t T)
{
    switch (T) {
    case 1: return q4t_launch_one<1, NORM, LUT>(be, x, j, lut, blocks, smem, nitems);
    case 2: return q4t_launch_one<2, NORM, LUT>(be, x, j, lut, blocks, smem, nitems);
    case 3: return q4t_launch_one<3, NORM, LUT>(be, x, j, lut, blocks, smem, nitems);
    case 4: return q4t_launch_one<4, NORM, LUT>(be, x, j, lut, blocks, smem, nitems);
    case 5: return q4t_launch_one<5, NORM, LUT>(be, x, j, lut, blocks, smem, nitems);
    case 6: return q4t_launch_one<6, NORM, LUT>(be, x, j, lut, blocks, smem, nitems);
    case 7: return q4t_launch_one<7, NORM, LUT>(be, x, j, lut, blocks, smem, nitems);
    case 8: return q4t_launch_one<8, NORM, LUT>(be, x, j, lut, blocks, smem, nitems);
    }
    return false;
}

/* k_q4_tab for job j when it fits (K % 32 == 0, blocksize >= 32, 16-byte aligned rows, x and
 * the table within the opt-in shared memory); false: the caller runs k_q4_multi. */
static bool q4t_try(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                    const struct q4_lut *lut, int blocksize, int64_t T, int lut_mode)
{
    const int64_t K = j->K;
    if (K % 32 != 0 || blocksize < 32) return false;
    for (int i = 0; i < j->nseg; i++)
        if (((uintptr_t)ws[i]->data % 16) != 0) return false;
    const size_t smem = (size_t)Q4T_TAB_BYTES + Q4T_NCODE_BYTES + (size_t)T * (size_t)K * sizeof(float);
    if (be->max_smem_optin <= 0 || smem + 2048 > (size_t)be->max_smem_optin) return false; /* + static */
    const int64_t nitems = j->mode == GEMV_GLU ? (j->s[0].N + 1) / 2 : gemv_number_rows(j, Q4T_R) / Q4T_R;
    /* one block per SM (fewer when there are fewer items); the items spread over all of them */
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    int64_t blocks = nitems < sms ? nitems : sms;
    if (blocks < 1) return true; /* nothing to do */
    j->prefetch = tuna_cuda_gemv_prefetch();
    const bool norm = j->nw != NULL;
    if (lut_mode == 2) {
        if (norm) return q4t_launch_tt<true, 2>(be, x, j, lut, (unsigned)blocks, smem, nitems, T);
        return q4t_launch_tt<false, 2>(be, x, j, lut, (unsigned)blocks, smem, nitems, T);
    }
    if (norm) return q4t_launch_tt<true, 1>(be, x, j, lut, (unsigned)blocks, smem, nitems, T);
    return q4t_launch_tt<false, 1>(be, x, j, lut, (unsigned)blocks, smem, nitems, T);
}

static bool q4m_try(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                    const struct q4_lut *lut, int blocksize, int64_t T);
static bool q4h_try(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                    const struct q4_lut *lut, int blocksize, int64_t T);

bool tuna_cuda_q4_multi(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                        int64_t T)
{
    const struct tuna_cuda_q4 *q0 = (const struct tuna_cuda_q4 *)ws[0]->q4;
    const int64_t K = j->K;
    int shift = 0;
    while ((1 << shift) < q0->blocksize) shift++;
    /* the fast kernel's conditions (tuna_cuda_gemv_q4), the same table and blocksize everywhere */
    /* above TUNA_CUDA_GEMV_MAX_T only k_q4_tc (tuna_cuda_q4_tc_max_t tokens at most) */
    if ((1 << shift) != q0->blocksize || q0->blocksize < 8 || K % 8 != 0 || T > tuna_cuda_q4_gemv_max_t())
        return false;
    for (int i = 0; i < j->nseg; i++) {
        const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)ws[i]->q4;
        if (q->blocksize != q0->blocksize || memcmp(q->lut, q0->lut, sizeof q->lut) != 0 ||
            ((uintptr_t)ws[i]->data % 4) != 0 || (q->round_mode != 0 && q->prefill == TUNA_DTYPE_F32))
            return false;
        j->s[i].sc = q4_scales_of(q);
    }
    struct q4_lut lut;
    memcpy(lut.v, q0->lut, sizeof lut.v);
    j->bs_shift = shift;
    const int km = q4_kernel_mode();
    bool half_ok = true; /* the half2 table only where the compute is 16-bit */
    for (int i = 0; i < j->nseg; i++)
        if (((const struct tuna_cuda_q4 *)ws[i]->q4)->prefill == TUNA_DTYPE_F32) half_ok = false;
    /* x's or y's pending part (racc.cu): only k_q4_h4 reads it; elsewhere it is folded first */
    if ((j->xacc || j->yacc) && !(T == 1 && km == 8 && half_ok && !tuna_cuda_q4_ring_on(j))) gemv_job_settle(be, j);
    if (T > TUNA_CUDA_GEMV_MAX_T)
        return km >= 7 && half_ok && tuna_cuda_q4_tc(be, x, j, ws, &lut, q0->blocksize, T);
    if (km) {
        if (km == 3 && half_ok && q4m_try(be, x, j, ws, &lut, q0->blocksize, T)) return true;
        if (km == 5 && half_ok && tuna_cuda_q4_stream(be, x, j, ws, &lut, q0->blocksize, T)) return true;
        if (km == 6 && half_ok && tuna_cuda_q4_lean(be, x, j, ws, &lut, q0->blocksize, T)) return true;
        if (km == 7 && half_ok && tuna_cuda_q4_sk(be, x, j, ws, &lut, q0->blocksize, T)) return true;
        if ((km == 9 || ((km == 8 || km == 7) && T > 1)) && half_ok && tuna_cuda_q4_tc(be, x, j, ws, &lut, q0->blocksize, T))
            return true;
        if (km == 8 && T == 1 && half_ok && tuna_cuda_q4_ring_on(j) && tuna_cuda_q4_r(be, x, j, ws, &lut, q0->blocksize, T))
            return true;
        if (km >= 7 && half_ok && tuna_cuda_q4_h4(be, x, j, ws, &lut, q0->blocksize, T)) return true;
        if (j->xacc || j->yacc) gemv_job_settle(be, j); /* k_q4_h4 declined: the others read plain x */
        if (km >= 4 && half_ok && q4h_try(be, x, j, ws, &lut, q0->blocksize, T)) return true;
        if (q4t_try(be, x, j, ws, &lut, q0->blocksize, T, km >= 2 && half_ok ? 2 : 1)) return true;
    }
    j->prefetch = tuna_cuda_gemv_prefetch();
    const int warps = 4;
    const int R = j->mode == GEMV_GLU || T > 1 ? 2 : 1;
    const bool norm = j->nw != NULL;
    int64_t rows = j->mode == GEMV_GLU ? j->s[0].N : gemv_number_rows(j, R);
    const int64_t per_warp = j->mode == GEMV_GLU ? 1 : R;
    j->nwarp = (rows + per_warp - 1) / per_warp;
    unsigned blocks = (unsigned)((j->nwarp + warps - 1) / warps);
    /* the table of LUT 1 is 32 KiB per block: about one wave of blocks, each taking several rows */
    const unsigned cap = (unsigned)(be->sm_count * 6);
    if (q4_lut_mode() && cap > 0 && blocks > cap) blocks = cap;
    if (R == 1) {
        if (norm) q4m_launch_lut<1, true>(be, x, j, &lut, blocks, T);
        else q4m_launch_lut<1, false>(be, x, j, &lut, blocks, T);
    } else {
        if (norm) q4m_launch_lut<2, true>(be, x, j, &lut, blocks, T);
        else q4m_launch_lut<2, false>(be, x, j, &lut, blocks, T);
    }
    return true;
}

/* ---- k_q4_mma: the 4-bit decode GEMV on tensor cores (16-bit compute; TUNA_Q4_K=3) ----
 *
 * What limited k_q4_tab (fourth session): each warp loaded a 4-row item, waited, then spent ~3
 * instructions per weight on it (table lookup, f16 -> f32, one FMA per weight and token) with
 * nothing in flight meanwhile, and the 4096-row matrices left most warps idle. Here:
 * - a block (16 warps, one per SM) takes an item of 16 rows (GLU: 8 outputs, gate and up); its
 *   warps split K: warp w takes the 64-weight columns w, w + 16, ... of the item (one absmax block
 *   each), so every SM streams about the same bytes whatever N is; the warps' partial sums meet in
 *   shared memory and are added in a fixed order (deterministic), once per item;
 * - each warp keeps D stages (one 64-column block of its 16 rows: 8 bytes of codes per lane and
 *   row, with the rows' block scales) in flight in a ring of registers: a stage is loaded as
 *   soon as the one in its registers has been computed, across items;
 * - the products run on mma.sync m16n8k16 (f16 in, f32 accumulate): the 16 rows are the MMA's M,
 *   the tokens its N (T <= 8: one MMA serves every token), K the weights. Lane (g, t) holds
 *   weights 16t..16t+15 of the block of rows g and g + 8, four per MMA: the byte -> half2 table
 *   (one prmt + one shared-memory load per two weights) gives the A fragment as it is; x, staged
 *   once per block as f16 (normalized first when the norm is folded in), gives the B fragment with
 *   one 16-byte load per two MMAs (the MMA's k order is permuted the same way on both sides);
 * - absmax multiplies the block's four MMAs' sum once (acc += absmax * sum), rebuilt from the
 *   double-quantized form as q4_absmax does.
 * Rounding: x to f16 (2^-11 relative; |x| must stay below 65504), the NF4 values to f16 as the
 * half2 table of k_q4_tab; float32 compute never comes here.
 * Measured on the H100 (docs/PERFORMANCE.md, fifth session): slower than k_q4_tab on every large
 * matrix (gate/up 70.6 against 55.0 us), and slower with more stages (D = 4 < 6 < 8): its SASS is
 * dominated by the integer bookkeeping that each of the D unrolled stages carries. */
#define Q4M_THREADS 512
#define Q4M_WARPS 16
#define Q4M_ROWS 16

struct q4m_stage {
    uint2 c[2];    /* codes of rows g and g + 8: weights 16t..16t+15 of the block */
    uint32_t q[2]; /* nested: the blocks' 8-bit absmax codes */
    float a[2];    /* nested: the nested absmax; else the float32 absmax */
};

struct q4m_src {
    const uint2 *c;   /* the row's codes as 8-byte words, + t */
    const uint8_t *q; /* nested 8-bit codes, or NULL (float32 absmax) */
    const float *a;   /* nested absmax, or the float32 absmax */
    int64_t e0;       /* element index of the row's first weight */
    int nshift;
};

/* Rows of item `it` for lane group g: the segment and first row (n0) of the item, and the two rows
 * (segments sg) the lane reads (clamped to the segment: rows past N are computed, not stored). */
static __device__ __forceinline__ void q4m_item(const struct gemv_job &j, int64_t it, int g, int *seg, int64_t *n0,
                                                int (&sg)[2], int64_t (&row)[2])
{
    if (j.mode == GEMV_GLU) {
        const int64_t N = j.s[0].N;
        *seg = 0;
        *n0 = it * 8;
        const int64_t n = *n0 + g < N ? *n0 + g : N - 1;
        row[0] = n, row[1] = n;
        sg[0] = 0, sg[1] = 1;
        return;
    }
    gemv_rows(j, Q4M_ROWS, it, seg, n0);
    const int64_t N = j.s[*seg].N;
    row[0] = *n0 + g < N ? *n0 + g : N - 1;
    row[1] = *n0 + g + 8 < N ? *n0 + g + 8 : N - 1;
    sg[0] = *seg, sg[1] = *seg;
}

static __device__ __forceinline__ void q4m_mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1)
{
#if TUNA_MMA_SM80
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    (void)c, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
    __trap(); /* sm_75 code: q4m_try never launches it below compute capability 8.0 */
#endif
}

/* x [TT, K] into shared memory as f16, rows of K + 8 (the pad keeps the B-fragment loads of 8
 * tokens off each other's banks); NORM: x * r * nw first (the CPU rmsnorm's formula; block 0 writes
 * it to j.xn in float32). Ends with __syncthreads. */
template <int TT, bool NORM>
static __device__ __forceinline__ void q4m_stage_x(__half *xs, const float *x, const struct gemv_job &j, float *red)
{
    const int64_t K = j.K, K4 = K / 4, XS = K + 8;
    const float4 *x4 = reinterpret_cast<const float4 *>(x);
    float r[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) r[t] = 1.0f;
    if (NORM) {
        float ss[TT];
#pragma unroll
        for (int t = 0; t < TT; t++) ss[t] = 0.0f;
        for (int64_t f = threadIdx.x; f < K4; f += blockDim.x)
#pragma unroll
            for (int t = 0; t < TT; t++) {
                const float4 a = x4[t * K4 + f];
                ss[t] += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
            }
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
        for (int t = 0; t < TT; t++) {
            for (int o = 16; o > 0; o >>= 1) ss[t] += __shfl_xor_sync(0xffffffffu, ss[t], o);
            if (lane == 0) red[t * 32 + warp] = ss[t];
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float a = 0.0f;
            for (int w = 0; w < nw; w++) a += red[t * 32 + w];
            r[t] = 1.0f / sqrtf(a / (float)K + j.eps);
        }
    }
    const float4 *n4 = reinterpret_cast<const float4 *>(j.nw);
    float4 *xn4 = reinterpret_cast<float4 *>(j.xn);
    const bool write = NORM && j.xn && blockIdx.x == 0;
    for (int64_t f = threadIdx.x; f < K4; f += blockDim.x) {
        float4 w = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
        if (NORM) w = __ldg(n4 + f);
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float4 a = x4[t * K4 + f];
            if (NORM) {
                a = make_float4(a.x * r[t] * w.x, a.y * r[t] * w.y, a.z * r[t] * w.z, a.w * r[t] * w.w);
                if (write) xn4[t * K4 + f] = a;
            }
            const __half2 lo = __floats2half2_rn(a.x, a.y), hi = __floats2half2_rn(a.z, a.w);
            uint2 v;
            v.x = *reinterpret_cast<const uint32_t *>(&lo);
            v.y = *reinterpret_cast<const uint32_t *>(&hi);
            *reinterpret_cast<uint2 *>(xs + t * XS + 4 * f) = v;
        }
    }
    __syncthreads();
}

template <int TT, bool NORM, int D>
__global__ void __launch_bounds__(Q4M_THREADS, 1)
    k_q4_mma(const float *__restrict__ x, const __grid_constant__ struct gemv_job j, const struct q4_lut lut_in,
             int64_t nitems)
{
    extern __shared__ float4 q4m_smem4[];
    uint8_t *tab = reinterpret_cast<uint8_t *>(q4m_smem4);                   /* [256][256 bytes], half2 at lane * 4 */
    float *ncode = reinterpret_cast<float *>(tab + Q4T_TAB_BYTES);            /* [GEMV_MAX_SEG][256] */
    float *part = ncode + GEMV_MAX_SEG * 256;                                /* [2][warp][16 rows][TT] */
    __half *xs = reinterpret_cast<__half *>(part + 2 * Q4M_WARPS * Q4M_ROWS * TT); /* [TT][K + 8] */
    __shared__ float slut[16];
    __shared__ float red[TT * 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    if (threadIdx.x < 16) slut[threadIdx.x] = lut_in.v[threadIdx.x];
    __syncthreads();
    for (int e = threadIdx.x; e < 256 * 32; e += blockDim.x) {
        const int byte = e >> 5, l = e & 31;
        *reinterpret_cast<__half2 *>(tab + byte * 256 + l * 4) = __floats2half2_rn(slut[byte >> 4], slut[byte & 15]);
    }
    for (int s = 0; s < j.nseg; s++)
        if (!j.s[s].sc.absmax)
            for (int e = threadIdx.x; e < 256; e += blockDim.x) ncode[s * 256 + e] = __ldg(j.s[s].sc.ncode + e);

    const int64_t K = j.K, KB = K / 64, XS = K + 8;
    const int ncb = (int)((KB + Q4M_WARPS - 1) / Q4M_WARPS); /* stages per item and warp */
    const int64_t gstride = gridDim.x;
    const int64_t nmy = (int64_t)blockIdx.x < nitems ? (nitems - 1 - blockIdx.x) / gstride + 1 : 0;
    const int64_t total = nmy * ncb;
    const uint32_t lane_off = (uint32_t)lane * 4u;
    const int bs_shift = j.bs_shift;

    /* the load side: item l_ii, stage l_c, the lane's two rows */
    int64_t l_ii = 0;
    int l_c = 0;
    struct q4m_src src[2];
    auto set_src = [&](int64_t ii) {
        int seg, sg[2];
        int64_t n0, row[2];
        q4m_item(j, blockIdx.x + ii * gstride, g, &seg, &n0, sg, row);
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const struct gemv_seg &s = j.s[sg[r]];
            src[r].e0 = row[r] * K;
            src[r].c = reinterpret_cast<const uint2 *>((const uint8_t *)s.W + src[r].e0 / 2) + t;
            src[r].q = s.sc.absmax ? NULL : s.sc.q;
            src[r].a = s.sc.absmax ? s.sc.absmax : s.sc.nabs;
            src[r].nshift = s.sc.absmax ? 0 : s.sc.nshift;
        }
    };
    auto load_next = [&](struct q4m_stage &st) {
        if (l_ii >= nmy) return;
        const int64_t cb = warp + (int64_t)Q4M_WARPS * l_c;
        if (cb < KB) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                st.c[r] = __ldg(src[r].c + cb * 4);
                const int64_t b = (src[r].e0 + cb * 64) >> bs_shift;
                if (src[r].q) {
                    st.q[r] = __ldg(src[r].q + b);
                    st.a[r] = __ldg(src[r].a + (b >> src[r].nshift));
                } else {
                    st.a[r] = __ldg(src[r].a + b);
                }
            }
        }
        if (++l_c == ncb) {
            l_c = 0;
            if (++l_ii < nmy) set_src(l_ii);
        }
    };

    struct q4m_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++) st[u].q[0] = st[u].q[1] = 0u, st[u].a[0] = st[u].a[1] = 0.0f;
    if (nmy > 0) set_src(0);
    if (j.prefetch >= 1)
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);
    tuna_pdl_wait();
    tuna_pdl_trigger();
    q4m_stage_x<TT, NORM>(xs, x, j, red); /* ends with __syncthreads: the tables are ready too */
    if (j.prefetch < 1)
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);

    /* the compute side: item c_ii, stage c_c */
    int64_t c_ii = 0;
    int c_c = 0;
    int c_seg = 0, c_ncoff[2] = {0, 0};
    int64_t c_n0 = 0;
    bool c_nested[2] = {false, false};
    float c_noff[2] = {0.0f, 0.0f};
    /* the item's output this thread adds up (o = lane * 16 + warp: every warp takes a share, so no
     * warp falls behind the others at the next barrier): its index in y (-1: none), its bias (GLU:
     * gate's and up's) and, when adding, y's value, loaded at the item's start */
    const int o = lane * Q4M_WARPS + warp, o_i = o / TT, o_t = o % TT;
    const int nout = (j.mode == GEMV_GLU ? 8 : Q4M_ROWS) * TT;
    int64_t c_yi = -1;
    float c_b0 = 0.0f, c_b1 = 0.0f, c_yv = 0.0f;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const __half *xrow = xs + (g < TT ? g : 0) * XS + 16 * t;

    for (int64_t q0 = 0; q0 < total; q0 += D) {
#pragma unroll
        for (int u = 0; u < D; u++) {
            if (q0 + u >= total) break;
            if (c_c == 0) { /* a new item: the scales' form and where its sums go */
                int sg[2];
                int64_t row[2];
                q4m_item(j, blockIdx.x + c_ii * gstride, g, &c_seg, &c_n0, sg, row);
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    c_nested[r] = j.s[sg[r]].sc.absmax == NULL;
                    c_noff[r] = j.s[sg[r]].sc.noff;
                    c_ncoff[r] = sg[r] * 256;
                }
                c_yi = -1;
                if (o < nout) {
                    const struct gemv_seg &sy = j.s[c_seg];
                    const int64_t n = c_n0 + o_i;
                    if (n < sy.N) {
                        c_yi = o_t * sy.N + n;
                        c_b0 = sy.bias ? sy.bias[n] : 0.0f;
                        if (j.mode == GEMV_GLU) c_b1 = j.s[1].bias ? j.s[1].bias[n] : 0.0f;
                        if (j.mode == GEMV_ADD) c_yv = sy.y[c_yi];
                    }
                }
            }
            const int64_t cb = warp + (int64_t)Q4M_WARPS * c_c;
            if (cb < KB) {
                uint4 xa = make_uint4(0u, 0u, 0u, 0u), xb = xa;
                if (g < TT) {
                    const uint4 *xp = reinterpret_cast<const uint4 *>(xrow + cb * 64);
                    xa = xp[0];
                    xb = xp[1];
                }
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int s = 0; s < 4; s++) {
                    const uint32_t wg = s < 2 ? st[u].c[0].x : st[u].c[0].y;
                    const uint32_t wh = s < 2 ? st[u].c[1].x : st[u].c[1].y;
                    const uint32_t b0 = (uint32_t)(2 * (s & 1)), b1 = b0 + 1;
                    const uint32_t a0 = *reinterpret_cast<const uint32_t *>(tab + __byte_perm(wg, lane_off, 0x5504u | (b0 << 4)));
                    const uint32_t a1 = *reinterpret_cast<const uint32_t *>(tab + __byte_perm(wh, lane_off, 0x5504u | (b0 << 4)));
                    const uint32_t a2 = *reinterpret_cast<const uint32_t *>(tab + __byte_perm(wg, lane_off, 0x5504u | (b1 << 4)));
                    const uint32_t a3 = *reinterpret_cast<const uint32_t *>(tab + __byte_perm(wh, lane_off, 0x5504u | (b1 << 4)));
                    const uint32_t x0 = s == 0 ? xa.x : s == 1 ? xa.z : s == 2 ? xb.x : xb.z;
                    const uint32_t x1 = s == 0 ? xa.y : s == 1 ? xa.w : s == 2 ? xb.y : xb.w;
                    q4m_mma(c, a0, a1, a2, a3, x0, x1);
                }
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const float am = c_nested[r] ? q4_nested(ncode[c_ncoff[r] + st[u].q[r]], st[u].a[r], c_noff[r])
                                                 : st[u].a[r];
                    acc[2 * r] += am * c[2 * r];
                    acc[2 * r + 1] += am * c[2 * r + 1];
                }
            }
            load_next(st[u]);
            if (++c_c == ncb) { /* the item's last stage: the block's sums */
                c_c = 0;
                float *pp = part + ((c_ii & 1) * Q4M_WARPS + warp) * Q4M_ROWS * TT;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    if (2 * t + h < TT) {
                        pp[g * TT + 2 * t + h] = acc[h];
                        pp[(g + 8) * TT + 2 * t + h] = acc[2 + h];
                    }
                }
                acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
                __syncthreads();
                const float *pb = part + (c_ii & 1) * Q4M_WARPS * Q4M_ROWS * TT;
                if (c_yi >= 0) {
                    float v = 0.0f, vu = 0.0f;
                    for (int w = 0; w < Q4M_WARPS; w++) v += pb[(w * Q4M_ROWS + o_i) * TT + o_t];
                    if (j.mode == GEMV_GLU) {
                        for (int w = 0; w < Q4M_WARPS; w++) vu += pb[(w * Q4M_ROWS + 8 + o_i) * TT + o_t];
                        j.s[0].y[c_yi] = tuna_cuda_act(v + c_b0, j.act) * (vu + c_b1);
                    } else {
                        v += c_b0;
                        j.s[c_seg].y[c_yi] = j.mode == GEMV_ADD ? c_yv + v : v;
                    }
                }
                c_ii++;
            }
        }
    }
}

/* Stages in flight per warp (TUNA_Q4_D=4 or 8 at T = 1 for comparisons; 6 otherwise). */
static int q4_d_mode(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_Q4_D");
        v = e && e[0] == '4' ? 4 : e && e[0] == '8' ? 8 : 6;
    }
    return v;
}

template <int TT, bool NORM>
static bool q4m_launch_one(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                           unsigned blocks, size_t smem, int64_t nitems)
{
    if constexpr (TT == 1) {
        const int d = q4_d_mode();
        if (d == 4)
            return tuna_cuda_launch(be, "k_q4_mma", k_q4_mma<TT, NORM, 4>, dim3(blocks), dim3(Q4M_THREADS), smem, x,
                                    *j, *lut, nitems);
        if (d == 8)
            return tuna_cuda_launch(be, "k_q4_mma", k_q4_mma<TT, NORM, 8>, dim3(blocks), dim3(Q4M_THREADS), smem, x,
                                    *j, *lut, nitems);
    }
    return tuna_cuda_launch(be, "k_q4_mma", k_q4_mma<TT, NORM, 6>, dim3(blocks), dim3(Q4M_THREADS), smem, x, *j,
                            *lut, nitems);
}

template <bool NORM>
static bool q4m_launch_tt(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                          unsigned blocks, size_t smem, int64_t nitems, int64_t T)
{
    switch (T) {
    case 1: return q4m_launch_one<1, NORM>(be, x, j, lut, blocks, smem, nitems);
    case 2: return q4m_launch_one<2, NORM>(be, x, j, lut, blocks, smem, nitems);
    case 3: return q4m_launch_one<3, NORM>(be, x, j, lut, blocks, smem, nitems);
    case 4: return q4m_launch_one<4, NORM>(be, x, j, lut, blocks, smem, nitems);
    case 5: return q4m_launch_one<5, NORM>(be, x, j, lut, blocks, smem, nitems);
    case 6: return q4m_launch_one<6, NORM>(be, x, j, lut, blocks, smem, nitems);
    case 7: return q4m_launch_one<7, NORM>(be, x, j, lut, blocks, smem, nitems);
    case 8: return q4m_launch_one<8, NORM>(be, x, j, lut, blocks, smem, nitems);
    }
    return false;
}

/* k_q4_mma for job j when it fits (K % 64 == 0, blocksize >= 64, 8-byte aligned codes, x and the
 * table within the opt-in shared memory); false: the caller tries k_q4_tab. */
static bool q4m_try(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                    const struct q4_lut *lut, int blocksize, int64_t T)
{
    const int64_t K = j->K;
    if (be->cc_major < 8 || K % 64 != 0 || blocksize < 64 || T < 1 || T > 8) return false; /* mma.sync m16n8k16 */
    for (int i = 0; i < j->nseg; i++)
        if (((uintptr_t)ws[i]->data % 8) != 0) return false;
    const size_t smem = (size_t)Q4T_TAB_BYTES + Q4T_NCODE_BYTES + (size_t)2 * Q4M_WARPS * Q4M_ROWS * T * sizeof(float) +
                        (size_t)T * (size_t)(K + 8) * sizeof(__half);
    if (be->max_smem_optin <= 0 || smem + 2048 > (size_t)be->max_smem_optin) return false; /* + static */
    const int64_t nitems = j->mode == GEMV_GLU ? (j->s[0].N + 7) / 8 : gemv_number_rows(j, Q4M_ROWS) / Q4M_ROWS;
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    const int64_t blocks = nitems < sms ? nitems : sms;
    if (blocks < 1) return true; /* nothing to do */
    j->prefetch = tuna_cuda_gemv_prefetch();
    if (j->nw) return q4m_launch_tt<true>(be, x, j, lut, (unsigned)blocks, smem, nitems, T);
    return q4m_launch_tt<false>(be, x, j, lut, (unsigned)blocks, smem, nitems, T);
}

/* ---- k_q4_h2: the batch-1 4-bit decode GEMV in f16 pairs (sixth session; TUNA_Q4_K=4; the default
 * until the twelfth session: k_q4_h4 runs where it fits and this kernel where it does not) ----
 *
 * What bounded k_q4_tab at T = 1 (ncu, r0 of the sixth session): ~6.2 thread instructions per
 * weight (table load, f16 -> f32 conversion, one FMA per weight, 64-bit index math) issued by
 * warps that loaded their chunks, waited, then computed with nothing in flight; long-scoreboard
 * the top stall with ~1 eligible warp per scheduler. Here:
 * - products in half2: the byte -> half2 table (one prmt for the address, one 32-bit
 *   shared-memory load per two weights, [byte][lane] so a warp's loads never share a bank) times
 *   x staged once per block as f16 pairs (HFMA2: one instruction per two weights), summed in f16
 *   over one lane's 32 weights (16 pairs in two partial sums), converted to float32 and scaled by
 *   the block's absmax in float32 (acc += absmax * float(sum)): about 2 instructions per weight;
 * - a software pipeline: each warp keeps D steps (D = 2; TUNA_Q4_P=4 for 4) of codes and scales
 *   in registers, the load of a step issued as soon as the step before it in the ring has been
 *   computed, across items, so every warp has its next bytes in flight while it computes;
 * - items of 2 rows (GLU: the gate and up rows of one output) shared by a pair of warps of the
 *   block that split K (warp h of the pair takes the 1024-weight units h, h + 2, ...; each lane a
 *   16-byte chunk of codes per row and unit), each pair a contiguous range of items (adjacent
 *   rows: the next item's pointers are the last ones plus a constant): every x load serves 2 rows, and the work comes in
 *   units of about one row per warp, so the 4096-row matrices (2048 items for 1056 pairs) keep
 *   every warp busy to within one row; the pair's two sums meet in shared memory (a named barrier
 *   per item) and are added in a fixed order: deterministic;
 * - the first D steps' codes are loaded and the table built before the PDL wait.
 * Range of f16: x is staged scaled by a power of two s (exact) chosen from the block's max |x|
 * (normalized x when the norm is folded in) and the table's max |value| L so that |x * s| * L lies
 * in [1024, 2048): a product is at most 2048, a partial sum of 8 at most 16384 and the chunk's sum
 * of 16 at most 32768, below f16's 65504 whatever the magnitude of x (GLU outputs feeding down
 * included); small entries stay normal f16 down to 2^-25 of the max. The sums are multiplied by
 * 1/s (exact) before the bias. Rounding: x to f16 (2^-11 relative), the table values to f16 (as
 * k_q4_tab's half2 table), the f16 sums over 16 products (about 2^-11 each step): within the bf16
 * tolerance of the tests (16-bit compute only; float32 compute keeps k_q4_tab's float2 table).
 * Needs T = 1, K % 32 == 0, blocksize >= 32, 16-byte aligned codes, N * K < 2^31 per matrix. */
#define Q4H_THREADS 512
#define Q4H_PAIRS 8
#define Q4H_XOFF (Q4T_TAB_BYTES + Q4T_NCODE_BYTES) /* x after the table and the nested code tables */

struct q4h_stage {
    uint4 c[2];    /* the lane's 16 bytes of codes of each row */
    float a[2];    /* float32 absmax, or the nested absmax */
    uint32_t q[2]; /* nested: the 8-bit code of the absmax */
};

template <bool NORM, int D>
__global__ void __launch_bounds__(Q4H_THREADS, 1)
    k_q4_h2(const float *__restrict__ x, const __grid_constant__ struct gemv_job j, const struct q4_lut lut_in,
            int64_t nitems, float lmax, int solo)
{
    extern __shared__ float4 q4h_smem4[];
    uint8_t *tab = reinterpret_cast<uint8_t *>(q4h_smem4);          /* [256][256 bytes], half2 at lane * 4 */
    float *ncode = reinterpret_cast<float *>(tab + Q4T_TAB_BYTES);  /* [GEMV_MAX_SEG][256] */
    uint8_t *xs = tab + Q4H_XOFF;                                    /* [K] f16, swizzled pieces */
    __shared__ float slut[16];
    __shared__ float red[64];
    __shared__ float part[Q4H_PAIRS][2][2]; /* [pair][item parity][row]: warp 1's sums */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, pair = warp >> 1, h = warp & 1;
    if (threadIdx.x < 16) slut[threadIdx.x] = lut_in.v[threadIdx.x];
    __syncthreads();
    for (int e = threadIdx.x; e < 256 * 32; e += blockDim.x) {
        const int byte = e >> 5, l = e & 31;
        *reinterpret_cast<__half2 *>(tab + byte * 256 + l * 4) = __floats2half2_rn(slut[byte >> 4], slut[byte & 15]);
    }
    for (int s = 0; s < j.nseg; s++)
        if (!j.s[s].sc.absmax)
            for (int e = threadIdx.x; e < 256; e += blockDim.x) ncode[s * 256 + e] = __ldg(j.s[s].sc.ncode + e);

    const int K32 = (int)(j.K / 32);
    /* steps per item and warp: units h, h + 2, ... (solo, TUNA_Q4_S=1: every unit, each warp alone) */
    const int KU = (K32 + 31) / 32, upw = solo ? KU : (KU + 1) / 2, cstep = solo ? 32 : 64;
    /* pair P (spread over the blocks first; solo: warp P) takes a contiguous range of items:
     * adjacent rows, the first (nitems % pairs) pairs one more */
    const int64_t P = blockIdx.x + (int64_t)gridDim.x * (solo ? warp : pair);
    const int64_t npairs = (int64_t)gridDim.x * (solo ? 2 * Q4H_PAIRS : Q4H_PAIRS);
    const int64_t ibase = (uint32_t)nitems / (uint32_t)npairs, iextra = (uint32_t)nitems % (uint32_t)npairs; /* < 2^31 */
    const int64_t it0 = P * ibase + (P < iextra ? P : iextra), nmy = ibase + (P < iextra ? 1 : 0);
    const int64_t itend = it0 + nmy;
    const int64_t total = nmy * upw;
    const int bs_shift = j.bs_shift;
    const int chunk0 = (solo ? 0 : h * 32) + lane; /* the lane's chunk (16 bytes, 32 weights) in the item's first step */

    /* the load side: the step after the last one loaded */
    struct {
        const uint4 *c;
        const float *a;
        const uint8_t *q;
        uint32_t e; /* element index of the lane's first weight in its matrix */
        int nshift;
    } src[2];
    /* the next item of the pair is rstep rows further: in the same matrix (both rows before its
     * end) the pointers move by a constant (dc chunks, de weights, less the steps already taken) */
    const bool glu = j.mode == GEMV_GLU;
    const int64_t rstep = glu ? 1 : 2;
    const int64_t dc = rstep * j.K / 32 - (int64_t)cstep * (upw - 1);
    const uint32_t de = (uint32_t)(rstep * j.K - (int64_t)cstep * 32 * (upw - 1));
    int64_t l_it = it0, l_n = 0, l_N = 0;
    int l_chunk = chunk0, l_m = 0;
    auto set_src = [&](int64_t it) {
        int seg, sg[2];
        int64_t row[2];
        q4_item_rows(j, it, &seg, &l_n, sg, row);
        l_N = j.s[seg].N;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const struct gemv_seg &s = j.s[sg[r]];
            const int64_t e0 = row[r] * j.K;
            src[r].c = reinterpret_cast<const uint4 *>(s.W) + e0 / 32 + chunk0;
            src[r].e = (uint32_t)e0 + (uint32_t)chunk0 * 32u;
            src[r].q = s.sc.absmax ? NULL : s.sc.q;
            src[r].a = s.sc.absmax ? s.sc.absmax : s.sc.nabs;
            src[r].nshift = s.sc.absmax ? 0 : s.sc.nshift;
        }
    };
    auto load_next = [&](struct q4h_stage &st) {
        if (l_it >= itend) return;
        if (l_chunk < K32) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                st.c[r] = __ldg(src[r].c);
                const uint32_t b = src[r].e >> bs_shift;
                if (src[r].q) {
                    st.q[r] = __ldg(src[r].q + b);
                    st.a[r] = __ldg(src[r].a + (b >> src[r].nshift));
                } else {
                    st.a[r] = __ldg(src[r].a + b);
                }
            }
        }
        if (++l_m == upw) {
            l_m = 0;
            l_chunk = chunk0;
            l_it++;
            if (l_it < itend) {
                l_n += rstep;
                if (l_n + (glu ? 0 : 1) < l_N) {
#pragma unroll
                    for (int r = 0; r < 2; r++) src[r].c += dc, src[r].e += de;
                } else {
                    set_src(l_it);
                }
            }
        } else {
            l_chunk += cstep;
#pragma unroll
            for (int r = 0; r < 2; r++) src[r].c += cstep, src[r].e += (uint32_t)cstep * 32u;
        }
    };

    struct q4h_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++) st[u].q[0] = st[u].q[1] = 0u, st[u].a[0] = st[u].a[1] = 0.0f;
    if (nmy > 0) set_src(it0);
    if (j.prefetch >= 1)
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);
    tuna_pdl_wait();
    tuna_pdl_trigger();
    const float inv_s = q4h_stage_x<NORM>(xs, x, j, lmax, red); /* ends with __syncthreads: tables ready */
    if (j.prefetch < 1)
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);

    /* the compute side: item c_it, step c_m */
    const uint32_t lane_off = (uint32_t)lane * 4u;
    const uint32_t xsw = (uint32_t)((lane >> 1) & 7) * 16u; /* gemv_x_pos's swizzle of the lane's pieces */
    int64_t c_it = it0, c_k = 0;
    int c_m = 0, c_chunk = chunk0;
    int c_seg = 0, c_ncoff[2] = {0, 0};
    int64_t c_n0 = 0, c_N = 0;
    bool c_nested[2] = {false, false};
    float c_noff[2] = {0.0f, 0.0f};
    float acc[2] = {0.0f, 0.0f};
    auto set_cmp = [&](int64_t it) {
        int sg[2];
        int64_t row[2];
        q4_item_rows(j, it, &c_seg, &c_n0, sg, row);
        c_N = j.s[c_seg].N;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            c_nested[r] = j.s[sg[r]].sc.absmax == NULL;
            c_noff[r] = j.s[sg[r]].sc.noff;
            c_ncoff[r] = sg[r] * 256;
        }
    };
    if (nmy > 0) set_cmp(it0);
    for (int64_t q0 = 0; q0 < total; q0 += D) {
#pragma unroll
        for (int u = 0; u < D; u++) {
            if (q0 + u >= total) break;
            if (c_chunk < K32) {
                uint4 xv[4];
                q4h_x_pieces(xs, (uint32_t)c_chunk, xsw, xv);
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const float d = q4h_dot(tab, st[u].c[r], xv, lane_off);
                    const float am = c_nested[r] ? q4_nested(ncode[c_ncoff[r] + st[u].q[r]], st[u].a[r], c_noff[r])
                                                 : st[u].a[r];
                    acc[r] += am * d;
                }
            }
            load_next(st[u]);
            if (++c_m < upw) {
                c_chunk += cstep;
                continue;
            }
            /* the item's last step: the pair's sums */
            c_m = 0;
            c_chunk = chunk0;
#pragma unroll
            for (int r = 0; r < 2; r++)
                for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
            float p0 = 0.0f, p1 = 0.0f;
            if (!solo) {
                float *pp = part[pair][c_k & 1];
                if (h == 1 && lane == 0) pp[0] = acc[0], pp[1] = acc[1];
                asm volatile("bar.sync %0, 64;" ::"r"(1 + pair) : "memory");
                if (h == 0) p0 = pp[0], p1 = pp[1];
            }
            if ((solo || h == 0) && lane == 0) {
                const float v0 = (acc[0] + p0) * inv_s, v1 = (acc[1] + p1) * inv_s;
                const float a2[2][1] = {{v0}, {v1}}, one[1] = {1.0f};
                if (j.mode != GEMV_GLU || c_n0 < j.s[0].N) gemv_store<1, 2>(j, a2, one, c_seg, c_n0);
            }
            acc[0] = acc[1] = 0.0f;
            c_k++;
            c_it++;
            c_n0 += rstep;
            if (c_it < itend && c_n0 + (glu ? 0 : 1) >= c_N) set_cmp(c_it); /* a new matrix, or its end */
        }
    }
}

/* Steps in flight per warp of k_q4_h2: 2 (default), TUNA_Q4_P=4 for 4 (sixth session's first H100
 * round: chain 77.4 us/layer with 2 against 82.3 with 4). */
static int q4_p_mode(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_Q4_P");
        v = e && e[0] == '4' ? 4 : 2;
    }
    return v;
}

/* TUNA_Q4_S=1: k_q4_h2 may run each warp alone (see q4h_try); default 0. */
static int q4_s_mode(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_Q4_S");
        v = e && e[0] == '1';
    }
    return v;
}

/* k_q4_h2 for job j when it fits (T = 1, K % 32 == 0, blocksize >= 32, 16-byte aligned codes,
 * N * K < 2^31 per matrix, x and the table within the opt-in shared memory); false: the caller
 * tries k_q4_tab. */
static bool q4h_try(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                    const struct q4_lut *lut, int blocksize, int64_t T)
{
    const int64_t K = j->K;
    if (T != 1 || K % 32 != 0 || K <= 0 || blocksize < 32) return false;
    for (int i = 0; i < j->nseg; i++)
        if (((uintptr_t)ws[i]->data % 16) != 0 || j->s[i].N * K >= ((int64_t)1 << 31)) return false;
    const size_t smem = (size_t)Q4H_XOFF + ((size_t)K * 2 + 127) / 128 * 128;
    if (be->max_smem_optin <= 0 || smem + 2048 > (size_t)be->max_smem_optin) return false; /* + static */
    const int64_t nitems = j->mode == GEMV_GLU ? j->s[0].N : gemv_number_rows(j, 2) / 2;
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    const int64_t want = (nitems + Q4H_PAIRS - 1) / Q4H_PAIRS;
    const int64_t blocks = want < sms ? want : sms;
    if (blocks < 1) return true; /* nothing to do */
    /* TUNA_Q4_S=1: each warp alone over the whole K (no pair barrier, half the items) where that
     * gives no warp more steps than the pairs do (gate/up, o and down at 8B shapes; q/k/v stays
     * split); default: always pairs */
    int solo = 0;
    if (q4_s_mode()) {
        const int64_t KU = (K / 32 + 31) / 32, pairs = blocks * Q4H_PAIRS;
        solo = (nitems + 2 * pairs - 1) / (2 * pairs) * KU <= (nitems + pairs - 1) / pairs * ((KU + 1) / 2);
    }
    const float lmax = q4_lut_absmax(lut);
    j->prefetch = tuna_cuda_gemv_prefetch();
    const bool norm = j->nw != NULL, d2 = q4_p_mode() == 2;
    const dim3 grid((unsigned)blocks), block(Q4H_THREADS);
    if (norm)
        return d2 ? tuna_cuda_launch(be, "k_q4_h2", k_q4_h2<true, 2>, grid, block, smem, x, *j, *lut, nitems, lmax, solo)
                  : tuna_cuda_launch(be, "k_q4_h2", k_q4_h2<true, 4>, grid, block, smem, x, *j, *lut, nitems, lmax, solo);
    return d2 ? tuna_cuda_launch(be, "k_q4_h2", k_q4_h2<false, 2>, grid, block, smem, x, *j, *lut, nitems, lmax, solo)
              : tuna_cuda_launch(be, "k_q4_h2", k_q4_h2<false, 4>, grid, block, smem, x, *j, *lut, nitems, lmax, solo);
}
