/* train_half.cu — the 16-bit operand path of the CUDA training table (backend/train_ops.h):
 * GEMMs that read their input already rounded to bf16/f16, the ops that write those operands
 * while producing their float32 result (the residual add + RMSNorm, the GLU, the RMSNorm, GLU
 * and RoPE backwards), and the trainer's own 4-bit dequantization (one thread per 8 weights,
 * loads and stores coalesced across the warp: the copy roofline, 2.5 bytes per weight).
 *
 * Every kernel's arithmetic is its float32 twin's (train_ops.cu, norm.cu, backend_cuda.cu's
 * k_glu) with one more store: the float32 results are those of the twin up to the order of a
 * block's sums. */
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/gemv.cuh"
#include "backend/cuda/rope.cuh"
#include "backend/cuda/train_cuda.h"

#define META(be, off, type) ((type *)((char *)(be)->meta.p + (size_t)(off)))

__device__ __forceinline__ void st16(void *p, int64_t i, float v, bool bf)
{
    if (bf)
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else
        ((__half *)p)[i] = __float2half_rn(v);
}

__global__ void k_train_to_half(void *dst, const float *src, int64_t n, bool bf);

static bool is_bf(enum tuna_dtype hdt)
{
    return hdt == TUNA_DTYPE_BF16;
}

/* ---------------------------------------------------------------- 4-bit dequantization */

/* One 32-bit word (8 weights, first in the high nibble of each byte) per thread and step, two
 * steps per block of 256 threads, words i and i + 256: every load and store of a warp is one
 * contiguous span. OUT: 0 float32, 1 bf16, 2 f16. Needs a power-of-two blocksize >= 8. */
template <int OUT, bool LD>
__global__ void __launch_bounds__(256) k_train_dequant(void *out, const uint32_t *codes, const struct q4_scales sc,
                                                       int bshift, int mode, struct q4_lut lut, int64_t nwords,
                                                       uint32_t wpr, uint32_t ldw)
{
    __shared__ float slut[16]; /* 16 entries in 16 banks: no conflicts whatever the codes */
    if (threadIdx.x < 16) slut[threadIdx.x] = lut.v[threadIdx.x];
    __syncthreads();
    const int64_t i0 = (int64_t)blockIdx.x * 512 + threadIdx.x;
    uint32_t wv[2];
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int64_t i = i0 + 256 * u;
        wv[u] = i < nwords ? __ldg(codes + i) : 0u;
    }
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int64_t i = i0 + 256 * u;
        if (i >= nwords) break;
        const float am = q4_absmax(sc, (i * 8) >> bshift);
        float v[8];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const uint32_t byte = (wv[u] >> (8 * b)) & 0xffu;
            v[2 * b] = q4_round(__fmul_rn(slut[byte >> 4], am), mode);
            v[2 * b + 1] = q4_round(__fmul_rn(slut[byte & 15], am), mode);
        }
        /* LD: the word's 8 weights go to row i / wpr (wpr = K / 8 words per row), words i % wpr ..
           of a matrix with rows ldw words apart (32-bit division: nwords < 2^32; the 64-bit one
           doubled the kernel's time) */
        int64_t o8 = i;
        if (LD) {
            const uint32_t ii = (uint32_t)i, r = ii / wpr;
            o8 = (int64_t)r * ldw + (ii - r * wpr);
        }
        if (OUT == 0) {
            float4 *o = reinterpret_cast<float4 *>(out) + o8 * 2;
            o[0] = make_float4(v[0], v[1], v[2], v[3]);
            o[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            uint32_t h[4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                if (OUT == 1) {
                    __nv_bfloat162 p = __floats2bfloat162_rn(v[2 * q], v[2 * q + 1]);
                    h[q] = *reinterpret_cast<uint32_t *>(&p);
                } else {
                    __half2 p = __floats2half2_rn(v[2 * q], v[2 * q + 1]);
                    h[q] = *reinterpret_cast<uint32_t *>(&p);
                }
            }
            reinterpret_cast<uint4 *>(out)[o8] = make_uint4(h[0], h[1], h[2], h[3]);
        }
    }
}

/* The fast kernel into be->wdeq with rows ld apart (ld == w->cols: contiguous); false (nothing
 * done, no error) when it does not apply. */
static bool dequant_ld_at(tuna_backend *be, const struct tuna_weight *w, int64_t ld, size_t off, void **out,
                          enum tuna_dtype *dt);
static bool dequant_ld(tuna_backend *be, const struct tuna_weight *w, int64_t ld, void **out, enum tuna_dtype *dt)
{
    return dequant_ld_at(be, w, ld, 0, out, dt);
}

/* ... at byte `off` of be->wdeq (grown to hold it; a grow loses what was there) */
static bool dequant_ld_at(tuna_backend *be, const struct tuna_weight *w, int64_t ld, size_t off, void **out,
                          enum tuna_dtype *dt)
{
    const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)w->q4;
    const int64_t numel = w->rows * w->cols;
    int shift = 0;
    while ((1 << shift) < q->blocksize) shift++;
    const char *env = getenv("TUNA_TRAIN_DEQUANT"); /* "old": q4.cu's kernel, for comparisons */
    if ((1 << shift) != q->blocksize || q->blocksize < 8 || numel % 8 != 0 || ((uintptr_t)w->data % 4) != 0 ||
        (env && !strcmp(env, "old")))
        return false;
    if (ld != w->cols && (w->cols % 8 != 0 || ld % 8 != 0 || ld < w->cols || numel / 8 >= ((int64_t)1 << 32)))
        return false;
    const int code = q->prefill == TUNA_DTYPE_BF16 ? 1 : q->prefill == TUNA_DTYPE_F16 ? 2 : 0;
    const size_t bytes = (size_t)(w->rows * ld) * (code ? 2 : 4);
    if (!tuna_cuda_grow(be, &be->wdeq, off + bytes, "cudaMalloc(4-bit weight dequantized for training)")) return false;
    void *dst = (char *)be->wdeq.p + off;
    struct q4_lut lut;
    memcpy(lut.v, q->lut, sizeof lut.v);
    const struct q4_scales sc = q4_scales_of(q);
    const int64_t nwords = numel / 8;
    const unsigned blocks = (unsigned)((nwords + 511) / 512);
    const uint32_t *codes = (const uint32_t *)w->data;
    const uint32_t wpr = (uint32_t)(w->cols / 8), ldw = (uint32_t)(ld / 8);
#define TQ_LAUNCH(O, L)                                                                                                  \
    k_train_dequant<O, L><<<blocks, 256, 0, be->stream>>>(dst, codes, sc, shift, q->round_mode, lut, nwords, wpr, ldw)
    if (ld == w->cols) {
        if (code == 1) TQ_LAUNCH(1, false);
        else if (code == 2) TQ_LAUNCH(2, false);
        else TQ_LAUNCH(0, false);
    } else {
        if (code == 1) TQ_LAUNCH(1, true);
        else if (code == 2) TQ_LAUNCH(2, true);
        else TQ_LAUNCH(0, true);
    }
#undef TQ_LAUNCH
    tuna_cuda_check_launch(be, "k_train_dequant");
    *out = dst;
    *dt = code == 1 ? TUNA_DTYPE_BF16 : code == 2 ? TUNA_DTYPE_F16 : TUNA_DTYPE_F32;
    return true;
}

bool tuna_cuda_train_dequant(tuna_backend *be, const struct tuna_weight *w, void **out, enum tuna_dtype *dt)
{
    if (!dequant_ld(be, w, w->cols, out, dt)) return tuna_cuda_dequant_q4(be, w, out, dt);
    return !be->sticky;
}

/* ---------------------------------------------------------------- GEMMs on 16-bit operands */

enum tuna_dtype tuna_cuda_train_half_dtype(tuna_backend *be, const struct tuna_weight *w)
{
    (void)be;
    if (w->dtype == TUNA_DTYPE_BF16 || w->dtype == TUNA_DTYPE_F16) return w->dtype;
    if ((w->dtype == TUNA_DTYPE_NF4 || w->dtype == TUNA_DTYPE_FP4) && w->q4) {
        const enum tuna_dtype p = ((const struct tuna_cuda_q4 *)w->q4)->prefill;
        if (p == TUNA_DTYPE_BF16 || p == TUNA_DTYPE_F16) return p;
    }
    return TUNA_DTYPE_F32;
}

/* W as a 16-bit matrix (4-bit ones dequantized into be->wdeq); NULL after a failure. */
static const void *weight16(tuna_backend *be, const struct tuna_weight *w, cudaDataType_t *ct, const char *what)
{
    const void *W = w->data;
    enum tuna_dtype dt = w->dtype;
    if (dt == TUNA_DTYPE_NF4 || dt == TUNA_DTYPE_FP4) {
        void *p;
        if (!w->q4 || !tuna_cuda_train_dequant(be, w, &p, &dt)) {
            if (!w->q4) tuna_cuda_check(be, cudaErrorInvalidValue, what);
            return NULL;
        }
        W = p;
    }
    if (dt != TUNA_DTYPE_BF16 && dt != TUNA_DTYPE_F16) {
        tuna_cuda_check(be, cudaErrorInvalidValue, what);
        return NULL;
    }
    *ct = dt == TUNA_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_16F;
    return W;
}

__global__ void k_train_add_bias(float *y, const float *bias, int64_t T, int64_t N)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < T * N) y[i] += bias[i % N];
}

void tuna_cuda_train_matmul16(tuna_backend *be, float *y, const void *x16, const struct tuna_weight *w,
                              const float *bias, int64_t T)
{
    if (be->sticky || T <= 0) return;
    const int64_t N = w->rows, K = w->cols;
    cudaDataType_t ct;
    const void *W = weight16(be, w, &ct, "matmul16 (weight without a 16-bit compute dtype)");
    if (!W) return;
    const float one = 1.0f, zero = 0.0f;
    /* column-major: y^T[N,T] = W^T (row-major [N,K] read as K x N, transposed) x16^T[K,T] */
    if (!tuna_cuda_check_blas(be,
                              cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)T, (int)K, &one, W, ct,
                                           (int)K, x16, ct, (int)K, &zero, y, CUDA_R_32F, (int)N, CUBLAS_COMPUTE_32F,
                                           CUBLAS_GEMM_DEFAULT),
                              "cublasGemmEx(matmul16)"))
        return;
    if (bias) {
        k_train_add_bias<<<tuna_cuda_blocks(T * N, 256), 256, 0, be->stream>>>(y, bias, T, N);
        tuna_cuda_check_launch(be, "k_train_add_bias");
    }
}

void tuna_cuda_train_matmul_backward16(tuna_backend *be, float *dx, const void *dy16, const struct tuna_weight *w,
                                       int64_t T, bool acc)
{
    if (be->sticky || T <= 0) return;
    const int64_t N = w->rows, K = w->cols;
    cudaDataType_t ct;
    const void *W = weight16(be, w, &ct, "matmul_backward16 (weight without a 16-bit compute dtype)");
    if (!W) return;
    const float one = 1.0f, beta = acc ? 1.0f : 0.0f;
    /* column-major: dx^T[K,T] (+)= W^T[K,N] (W row-major [N,K] read as K x N) dy^T[N,T] */
    tuna_cuda_check_blas(be,
                         cublasGemmEx(be->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)K, (int)T, (int)N, &one, W, ct, (int)K,
                                      dy16, ct, (int)N, &beta, dx, CUDA_R_32F, (int)K, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT),
                         "cublasGemmEx(matmul_backward16)");
}

/* ---------------------------------------------------------------- LoRA folded into the frozen GEMM */

/* A16[R*K] = A rounded; W[n, K + j] = s B[n, j] rounded (W's rows ld apart) */
__global__ void k_train_lora_prep(void *A16, const float *A, int64_t RK, void *W, int64_t ld, int64_t K,
                                  const float *B, int64_t NR, int64_t R, float s, bool bf)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < RK) {
        st16(A16, i, A[i], bf);
        return;
    }
    i -= RK;
    if (i >= NR) return;
    const int64_t n = i / R, j = i - n * R;
    st16(W, n * ld + K + j, s * B[i], bf);
}

/* h[t, j] = sum_s P[s][t, j] in order (float32) and x16[t, K + j] = h rounded */
__global__ void k_train_lora_hsum(float *h, void *x16, int64_t ldx, int64_t K, const float *P, int64_t T, int64_t R,
                                  int S, bool bf)
{
    const int64_t TR = T * R;
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= TR) return;
    float a = 0.0f;
    for (int s = 0; s < S; s++)
        a += P[(int64_t)s * TR + i];
    h[i] = a;
    const int64_t t = i / R;
    st16(x16, t * ldx + K + (i - t * R), a, bf);
}

/* K splits of the shrink x16 A^T ([T, R], a reduction of K): the output is T/128 tiles of one
 * column, so the reduction is split into S chunks (each a multiple of 8 elements, >= 256). */
static int lora_splits(tuna_backend *be, int64_t T, int64_t K)
{
    const int64_t tiles = (T + 127) / 128, sms = be->sm_count > 0 ? be->sm_count : 132;
    for (int S = 16; S >= 2; S /= 2)
        if (K % (8 * S) == 0 && K / S >= 256 && tiles * S <= 2 * sms) return S;
    return 1;
}

bool tuna_cuda_train_matmul16_lora(tuna_backend *be, float *y, void *x16, int64_t ldx, const struct tuna_weight *w,
                                   const float *bias, const struct tuna_lora *l, float *h, int64_t T)
{
    if (be->sticky || T <= 0) return true;
    const int64_t N = w->rows, K = w->cols, R = l ? l->r : 0;
    if (ldx < K + R || ldx % 8 != 0 || K % 8 != 0 || (R > 0 && !h)) return false;
    /* W into be->wdeq with rows ldx apart (a 16-bit weight copied there) */
    void *W = NULL;
    enum tuna_dtype dt = w->dtype;
    if (dt == TUNA_DTYPE_NF4 || dt == TUNA_DTYPE_FP4) {
        if (!w->q4 || !dequant_ld(be, w, ldx, &W, &dt)) return false;
        if (be->sticky) return true;
    } else if (dt == TUNA_DTYPE_BF16 || dt == TUNA_DTYPE_F16) {
        if (!tuna_cuda_grow(be, &be->wdeq, (size_t)(N * ldx) * 2, "cudaMalloc(weight with its LoRA columns)"))
            return true;
        W = be->wdeq.p;
        if (!tuna_cuda_check(be,
                             cudaMemcpy2DAsync(W, (size_t)ldx * 2, w->data, (size_t)K * 2, (size_t)K * 2, (size_t)N,
                                               cudaMemcpyDeviceToDevice, be->stream),
                             "cudaMemcpy2DAsync(weight with its LoRA columns)"))
            return true;
    } else {
        return false;
    }
    if (dt != TUNA_DTYPE_BF16 && dt != TUNA_DTYPE_F16) return false; /* not reached: dequant_ld gave F32 */
    const bool bf = dt == TUNA_DTYPE_BF16;
    const cudaDataType_t ct = bf ? CUDA_R_16BF : CUDA_R_16F;
    const float one = 1.0f, zero = 0.0f;
    if (R > 0) {
        const int S = lora_splits(be, T, K);
        const int64_t Kc = K / S;
        const size_t a16b = ((size_t)(R * K) * 2 + 255) & ~(size_t)255;
        char *scr = NULL;
        if (!tuna_cuda_check(be, cudaMallocAsync((void **)&scr, a16b + (size_t)(S * T * R) * sizeof(float), be->stream),
                             "cudaMallocAsync(LoRA shrink scratch)"))
            return true;
        void *A16 = scr;
        float *P = (float *)(scr + a16b);
        const int64_t nprep = R * K + N * R;
        k_train_lora_prep<<<tuna_cuda_blocks(nprep, 256), 256, 0, be->stream>>>(A16, l->A, R * K, W, ldx, K, l->B, N * R,
                                                                                R, l->scale, bf);
        bool ok = tuna_cuda_check_launch(be, "k_train_lora_prep");
        /* P[s] = x16[:, s Kc ..] A16[:, s Kc ..]^T: column-major P^T[R, T] = A16 (read transposed) x16^T */
        ok = ok && tuna_cuda_check_blas(be,
                                        cublasGemmStridedBatchedEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)R, (int)T,
                                                                   (int)Kc, &one, A16, ct, (int)K, (long long)Kc, x16,
                                                                   ct, (int)ldx, (long long)Kc, &zero, P, CUDA_R_32F,
                                                                   (int)R, (long long)(T * R), S, CUBLAS_COMPUTE_32F,
                                                                   CUBLAS_GEMM_DEFAULT),
                                        "cublasGemmStridedBatchedEx(LoRA shrink, 16-bit)");
        if (ok) {
            k_train_lora_hsum<<<tuna_cuda_blocks(T * R, 256), 256, 0, be->stream>>>(h, x16, ldx, K, P, T, R, S, bf);
            tuna_cuda_check_launch(be, "k_train_lora_hsum");
        }
        tuna_cuda_check(be, cudaFreeAsync(scr, be->stream), "cudaFreeAsync(LoRA shrink scratch)");
        if (be->sticky) return true;
    }
    /* column-major: y^T[N,T] = [W | sB] (row-major [N, K+R], rows ldx apart, read transposed) [x16 | h16]^T */
    if (!tuna_cuda_check_blas(be,
                              cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)T, (int)(K + R), &one, W,
                                           ct, (int)ldx, x16, ct, (int)ldx, &zero, y, CUDA_R_32F, (int)N,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                              "cublasGemmEx(matmul16 with LoRA)"))
        return true;
    if (bias) {
        k_train_add_bias<<<tuna_cuda_blocks(T * N, 256), 256, 0, be->stream>>>(y, bias, T, N);
        tuna_cuda_check_launch(be, "k_train_add_bias");
    }
    return true;
}

/* W's rows N .. N+P-1 (WA = W16 + N*K): s A rounded, then zeros (P - R rows); B16 = B rounded */
__global__ void k_train_lora_bprep(void *WA, const float *A, int64_t RK, int64_t PK, float s, void *B16,
                                   const float *B, int64_t NR, bool bf)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < PK) {
        st16(WA, i, i < RK ? s * A[i] : 0.0f, bf);
        return;
    }
    i -= PK;
    if (i < NR) st16(B16, i, B[i], bf);
}

/* u[t, j] = sum_s P[s][t, j] in order (float32) and dy16[t, N + j] = u rounded for j < R, 0 for
 * R <= j < Pc */
__global__ void k_train_lora_usum(float *u, void *dy16, int64_t lddy, int64_t N, const float *P, int64_t T,
                                  int64_t R, int64_t Pc, int S, bool bf)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * Pc) return;
    const int64_t t = i / Pc, j = i - t * Pc;
    float a = 0.0f;
    if (j < R) {
        const int64_t TR = T * R, e = t * R + j;
        for (int s = 0; s < S; s++)
            a += P[(int64_t)s * TR + e];
        u[e] = a;
    }
    st16(dy16, t * lddy + N + j, a, bf);
}

/* The backward of n linears that share the input x (q, k, v), or of one: block i of dy16's rows
 * (columns off_i .., off_i = sum_{j<i} (N_j + P_j)) is [dy_i (N_i) | P_i spare], P_i = pad >= 0 ?
 * pad : R_i. Every adapter's u_i = dy_i B_i goes into its spare columns (zeros after R_i), its dA_i
 * and dB_i are accumulated, then ONE GEMM dx (+)= dy16[:, :off_n] [W_0 ; s A_0 ; 0 ; W_1 ; ...].
 * false: not for these weights (nothing done). */
static bool lora_backward_multi(tuna_backend *be, float *dx, void *dy16, int64_t lddy, int n,
                                const struct tuna_weight *const *w, const struct tuna_lora *const *l,
                                float *const *dA, float *const *dB, const float *x, const float *const *h,
                                int64_t T, bool acc, int64_t pad)
{
    if (be->sticky || T <= 0) return true;
    const int64_t K = w[0]->cols;
    int64_t off[4], Rr[4], Pp[4], tot = 0, maxNR = 0, maxN = 0;
    if (n < 1 || n > 3 || lddy % 8 != 0 || K % 8 != 0) return false;
    const bool q4 = w[0]->dtype == TUNA_DTYPE_NF4 || w[0]->dtype == TUNA_DTYPE_FP4;
    enum tuna_dtype dt = q4 ? TUNA_DTYPE_F32 : w[0]->dtype;
    for (int i = 0; i < n; i++) {
        const struct tuna_weight *wi = w[i];
        if (wi->cols != K || wi->rows % 8 != 0 || (wi->dtype == TUNA_DTYPE_NF4 || wi->dtype == TUNA_DTYPE_FP4) != q4)
            return false;
        enum tuna_dtype d = wi->dtype;
        if (q4) {
            if (!wi->q4) return false;
            d = ((const struct tuna_cuda_q4 *)wi->q4)->prefill;
            if (i == 0) dt = d;
        }
        if ((d != TUNA_DTYPE_BF16 && d != TUNA_DTYPE_F16) || d != dt) return false;
        Rr[i] = l[i] ? l[i]->r : 0;
        Pp[i] = pad >= 0 ? pad : Rr[i];
        if (Rr[i] > Pp[i] || (Rr[i] > 0 && (!x || !h[i] || !dA[i] || !dB[i]))) return false;
        if (n > 1 && Pp[i] % 8 != 0) return false;
        off[i] = tot;
        tot += wi->rows + Pp[i];
        if (wi->rows * Rr[i] > maxNR) maxNR = wi->rows * Rr[i];
        if (wi->rows > maxN) maxN = wi->rows;
    }
    if (lddy < tot) return false;
    const bool bf = dt == TUNA_DTYPE_BF16;
    const cudaDataType_t ct = bf ? CUDA_R_16BF : CUDA_R_16F;
    /* the stacked weight [tot, K]; one 16-bit weight without an adapter is used as stored */
    void *W = NULL;
    if (n == 1 && !q4 && Pp[0] == 0) {
        W = (void *)w[0]->data;
    } else {
        if (!tuna_cuda_grow(be, &be->wdeq, (size_t)(tot * K) * 2, "cudaMalloc(weights with their LoRA rows)"))
            return true;
        W = be->wdeq.p;
        for (int i = 0; i < n; i++) {
            const size_t o = (size_t)(off[i] * K) * 2;
            if (q4) {
                void *p;
                enum tuna_dtype d2;
                if (!dequant_ld_at(be, w[i], K, o, &p, &d2) || d2 != dt)
                    return be->sticky; /* not for the fast dequantizer: nothing of use done */
            } else if (!tuna_cuda_check(be,
                                        cudaMemcpyAsync((char *)W + o, w[i]->data, (size_t)(w[i]->rows * K) * 2,
                                                        cudaMemcpyDeviceToDevice, be->stream),
                                        "cudaMemcpyAsync(weight with its LoRA rows)")) {
                return true;
            }
        }
    }
    int64_t maxR = 0;
    for (int i = 0; i < n; i++)
        maxR = Rr[i] > maxR ? Rr[i] : maxR;
    if (maxR > 0) {
        const int S = lora_splits(be, T, maxN); /* at most this many partials (fewer for a short N_i) */
        const size_t b16b = ((size_t)maxNR * 2 + 255) & ~(size_t)255, ub = ((size_t)(T * maxR) * 4 + 255) & ~(size_t)255;
        const size_t h16b = ((size_t)(T * maxR) * 2 + 255) & ~(size_t)255;
        char *scr = NULL;
        if (!tuna_cuda_check(be,
                             cudaMallocAsync((void **)&scr, b16b + ub + h16b + (size_t)(S * T * maxR) * sizeof(float),
                                             be->stream),
                             "cudaMallocAsync(LoRA backward scratch)"))
            return true;
        void *B16 = scr, *h16 = scr + b16b;
        float *u = (float *)(scr + b16b + h16b), *P = (float *)(scr + b16b + h16b + ub);
        const float one = 1.0f, zero = 0.0f;
        for (int i = 0; i < n && !be->sticky; i++) {
            const int64_t N = w[i]->rows, R = Rr[i], Pc = Pp[i];
            char *WA = (char *)W + (size_t)((off[i] + N) * K) * 2;
            void *dyi = (char *)dy16 + (size_t)off[i] * 2;
            if (R == 0) {
                if (Pc > 0) { /* zero rows and columns: nothing of this block's spare part counts */
                    k_train_lora_bprep<<<tuna_cuda_blocks(Pc * K, 256), 256, 0, be->stream>>>(WA, NULL, 0, Pc * K, 0.0f,
                                                                                            NULL, NULL, 0, bf);
                    tuna_cuda_check_launch(be, "k_train_lora_bprep");
                    k_train_lora_usum<<<tuna_cuda_blocks(T * Pc, 256), 256, 0, be->stream>>>(NULL, dy16, lddy,
                                                                                            off[i] + N, NULL, T, 0, Pc,
                                                                                            0, bf);
                    tuna_cuda_check_launch(be, "k_train_lora_usum");
                }
                continue;
            }
            int Si = S;
            while (Si > 1 && (N % (8 * Si) != 0 || N / Si < 256))
                Si /= 2;
            const int64_t Nc = N / Si;
            k_train_lora_bprep<<<tuna_cuda_blocks(Pc * K + N * R, 256), 256, 0, be->stream>>>(
                WA, l[i]->A, R * K, Pc * K, l[i]->scale, B16, l[i]->B, N * R, bf);
            bool ok = tuna_cuda_check_launch(be, "k_train_lora_bprep");
            /* P[s] = dy_i[:, s Nc ..] B16[s Nc .., :]: column-major P^T[R, T] = B16^T (row-major [N, R] read as
               R x N) dy_i^T */
            ok = ok && tuna_cuda_check_blas(be,
                                            cublasGemmStridedBatchedEx(be->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)R, (int)T,
                                                                       (int)Nc, &one, B16, ct, (int)R,
                                                                       (long long)(Nc * R), dyi, ct, (int)lddy,
                                                                       (long long)Nc, &zero, P, CUDA_R_32F, (int)R,
                                                                       (long long)(T * R), Si, CUBLAS_COMPUTE_32F,
                                                                       CUBLAS_GEMM_DEFAULT),
                                            "cublasGemmStridedBatchedEx(LoRA u = dy B, 16-bit)");
            if (ok) { /* u, and u16 into the block's spare columns */
                k_train_lora_usum<<<tuna_cuda_blocks(T * Pc, 256), 256, 0, be->stream>>>(u, dy16, lddy, off[i] + N, P,
                                                                                        T, R, Pc, Si, bf);
                ok = tuna_cuda_check_launch(be, "k_train_lora_usum");
            }
            if (ok) {
                k_train_to_half<<<tuna_cuda_blocks(T * R, 256), 256, 0, be->stream>>>(h16, h[i], T * R, bf);
                ok = tuna_cuda_check_launch(be, "k_train_to_half");
            }
            if (ok) { /* dA[R,K] += s u^T x (float32 x: TF32), dB[N,R] += s dy_i^T h16 */
                const float sc = l[i]->scale;
                tuna_cuda_train_gemm(be, true, false, R, K, T, sc, u, R, x, K, 1.0f, dA[i], K, true);
                tuna_cuda_train_gemm16(be, true, false, N, R, T, sc, dyi, lddy, h16, R, 1.0f, dB[i], R, ct);
            }
        }
        tuna_cuda_check(be, cudaFreeAsync(scr, be->stream), "cudaFreeAsync(LoRA backward scratch)");
        if (be->sticky) return true;
    }
    const float one = 1.0f, beta = acc ? 1.0f : 0.0f;
    /* column-major: dx^T[K,T] (+)= W^T ([tot, K] row-major read as K x tot) dy16[:, :tot]^T */
    tuna_cuda_check_blas(be,
                         cublasGemmEx(be->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)K, (int)T, (int)tot, &one, W, ct,
                                      (int)K, dy16, ct, (int)lddy, &beta, dx, CUDA_R_32F, (int)K, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT),
                         "cublasGemmEx(matmul_backward16 with LoRA)");
    return true;
}

bool tuna_cuda_train_matmul_backward16_lora(tuna_backend *be, float *dx, void *dy16, int64_t lddy,
                                            const struct tuna_weight *w, bool acc, const struct tuna_lora *l,
                                            float *dA, float *dB, const float *x, const float *h, int64_t T)
{
    return lora_backward_multi(be, dx, dy16, lddy, 1, &w, &l, &dA, &dB, x, &h, T, acc, -1);
}

bool tuna_cuda_train_matmul_backward16_lora3(tuna_backend *be, float *dx, void *dy16, int64_t lddy, int n,
                                             const struct tuna_weight *const *w, const struct tuna_lora *const *l,
                                             float *const *dA, float *const *dB, const float *x,
                                             const float *const *h, int64_t T, int64_t pad)
{
    if (pad < 0) return false;
    return lora_backward_multi(be, dx, dy16, lddy, n, w, l, dA, dB, x, h, T, false, pad);
}

/* ---------------------------------------------------------------- element-wise producers */

/* 4 elements per thread where n, src and dst allow it */
__global__ void k_train_to_half4(void *dst, const float4 *src, int64_t n4, bool bf)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    const float4 v = src[i];
    uint2 o;
    if (bf) {
        __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
        o.x = *reinterpret_cast<uint32_t *>(&a);
        o.y = *reinterpret_cast<uint32_t *>(&b);
    } else {
        __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
        o.x = *reinterpret_cast<uint32_t *>(&a);
        o.y = *reinterpret_cast<uint32_t *>(&b);
    }
    reinterpret_cast<uint2 *>(dst)[i] = o;
}

__global__ void k_train_to_half(void *dst, const float *src, int64_t n, bool bf)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) st16(dst, i, src[i], bf);
}

/* rows of `cols` elements, ld16 apart in dst: 4 elements per thread (cols % 4 == 0) */
__global__ void k_train_to_half_ld4(void *dst, const float4 *src, int64_t n4, int64_t cols4, int64_t ld16, bool bf)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    const float4 v = src[i];
    const int64_t r = i / cols4, c = (i - r * cols4) * 4, o = r * ld16 + c;
    st16(dst, o, v.x, bf);
    st16(dst, o + 1, v.y, bf);
    st16(dst, o + 2, v.z, bf);
    st16(dst, o + 3, v.w, bf);
}

__global__ void k_train_to_half_ld(void *dst, const float *src, int64_t n, int64_t cols, int64_t ld16, bool bf)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int64_t r = i / cols;
    st16(dst, r * ld16 + (i - r * cols), src[i], bf);
}

void tuna_cuda_train_to_half(tuna_backend *be, void *dst16, const float *src, int64_t n, int64_t cols, int64_t ld16,
                             enum tuna_dtype hdt)
{
    if (be->sticky || n <= 0) return;
    if (cols > 0 && ld16 != cols) {
        if (cols % 4 == 0 && (uintptr_t)src % 16 == 0)
            k_train_to_half_ld4<<<tuna_cuda_blocks(n / 4, 256), 256, 0, be->stream>>>(
                dst16, (const float4 *)src, n / 4, cols / 4, ld16, is_bf(hdt));
        else
            k_train_to_half_ld<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(dst16, src, n, cols, ld16,
                                                                                  is_bf(hdt));
        tuna_cuda_check_launch(be, "k_train_to_half_ld");
        return;
    }
    if (n % 4 == 0 && (uintptr_t)src % 16 == 0 && (uintptr_t)dst16 % 8 == 0)
        k_train_to_half4<<<tuna_cuda_blocks(n / 4, 256), 256, 0, be->stream>>>(dst16, (const float4 *)src, n / 4,
                                                                               is_bf(hdt));
    else
        k_train_to_half<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(dst16, src, n, is_bf(hdt));
    tuna_cuda_check_launch(be, "k_train_to_half");
}

/* One block per row: x += d, the copy, the sum of squares; then y and y16 (norm.cu's k_rmsnorm). */
__global__ void __launch_bounds__(256) k_train_add_rmsnorm16(float *x, const float *d, float *x_copy, float *y,
                                                              void *y16, int64_t ld16, const float *w, int64_t C,
                                                              float eps, bool bf)
{
    __shared__ float red[64];
    const int64_t off = (int64_t)blockIdx.x * C;
    float *xr = x + off;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
        float v = xr[i];
        if (d) {
            v += d[off + i];
            xr[i] = v;
        }
        if (x_copy) x_copy[off + i] = v;
        ss += v * v;
    }
    ss = tuna_block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)C + eps);
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
        const float v = xr[i] * r * w[i]; /* this thread wrote xr[i] itself */
        if (y) y[off + i] = v;
        st16(y16, (int64_t)blockIdx.x * ld16 + i, v, bf);
    }
}

void tuna_cuda_train_add_rmsnorm16(tuna_backend *be, float *x, const float *d, float *x_copy, float *y, void *y16,
                                   int64_t ld16, const float *w, int64_t T, int64_t C, float eps, enum tuna_dtype hdt)
{
    if (be->sticky || T <= 0) return;
    k_train_add_rmsnorm16<<<(unsigned)T, 256, 0, be->stream>>>(x, d, x_copy, y, y16, ld16, w, C, eps, is_bf(hdt));
    tuna_cuda_check_launch(be, "k_train_add_rmsnorm16");
}

__global__ void k_train_glu16(float *out, void *out16, const float *gate, const float *up, int64_t n, int64_t cols,
                              int64_t ld16, int act, bool bf)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = tuna_cuda_act(gate[i], act) * up[i];
    if (out) out[i] = v;
    int64_t o = i;
    if (ld16 != cols) {
        const int64_t r = i / cols;
        o = r * ld16 + (i - r * cols);
    }
    st16(out16, o, v, bf);
}

void tuna_cuda_train_glu16(tuna_backend *be, float *out, void *out16, const float *gate, const float *up, int64_t n,
                           int64_t cols, int64_t ld16, int act, enum tuna_dtype hdt)
{
    if (be->sticky || n <= 0) return;
    if (cols <= 0) cols = ld16 = n;
    k_train_glu16<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(out, out16, gate, up, n, cols, ld16, act,
                                                                     is_bf(hdt));
    tuna_cuda_check_launch(be, "k_train_glu16");
}

/* train_ops.cu's k_train_rmsnorm_backward, and the rounded result */
__global__ void __launch_bounds__(256) k_train_rmsnorm_backward16(float *dx, void *dx16, int64_t ld16,
                                                                   const float *dy, const float *x, const float *w,
                                                                   int64_t C, float eps, bool bf)
{
    __shared__ float red[64];
    const int64_t off = (int64_t)blockIdx.x * C;
    const float *xr = x + off, *g = dy + off;
    float *o = dx + off;
    float ss = 0.0f, dot = 0.0f;
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
        ss += xr[i] * xr[i];
        dot += w[i] * g[i] * xr[i];
    }
    ss = tuna_block_sum(ss, red);
    dot = tuna_block_sum(dot, red);
    const float r = 1.0f / sqrtf(ss / (float)C + eps);
    const float c = dot * r * r * r / (float)C;
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
        const float v = o[i] + (r * w[i] * g[i] - c * xr[i]);
        o[i] = v;
        st16(dx16, (int64_t)blockIdx.x * ld16 + i, v, bf);
    }
}

void tuna_cuda_train_rmsnorm_backward16(tuna_backend *be, float *dx, void *dx16, int64_t ld16, const float *dy,
                                        const float *x, const float *w, int64_t T, int64_t C, float eps,
                                        enum tuna_dtype hdt)
{
    if (be->sticky || T <= 0) return;
    k_train_rmsnorm_backward16<<<(unsigned)T, 256, 0, be->stream>>>(dx, dx16, ld16, dy, x, w, C, eps, is_bf(hdt));
    tuna_cuda_check_launch(be, "k_train_rmsnorm_backward16");
}

/* train_ops.cu's k_train_glu_backward in float32 arithmetic (that kernel's double made it
 * compute-bound: 242 us per [2048, 11008] call on an H100, this one is a pass over memory),
 * overwriting; the 16-bit mode only, where the results are rounded to bf16/f16 anyway */
__global__ void k_train_glu_backward16(float *dgate, float *dup, void *dgate16, void *dup16, const float *dout,
                                       const float *gate, const float *up, int64_t n, int64_t cols, int64_t ld16,
                                       int act, bool bf)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
    const float x = gate[i];
    float g, dg;
    if (act == 1) {
        const float th = tanhf(kBeta * (x + kKappa * x * x * x));
        g = 0.5f * x * (1.0f + th);
        dg = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kBeta * (1.0f + 3.0f * kKappa * x * x);
    } else if (act == 2) {
        const float e = erff(x * 0.7071067811865476f);
        g = 0.5f * x * (1.0f + e);
        dg = 0.5f * (1.0f + e) + x * expf(-0.5f * x * x) * 0.3989422804014327f;
    } else {
        const float sg = 1.0f / (1.0f + expf(-x));
        g = x * sg;
        dg = sg * (1.0f + x * (1.0f - sg));
    }
    const float d = dout[i], a = d * up[i] * dg, b = d * g;
    dgate[i] = a;
    dup[i] = b;
    int64_t o = i;
    if (ld16 != cols) {
        const int64_t r = i / cols;
        o = r * ld16 + (i - r * cols);
    }
    st16(dgate16, o, a, bf);
    st16(dup16, o, b, bf);
}

void tuna_cuda_train_glu_backward16(tuna_backend *be, float *dgate, float *dup, void *dgate16, void *dup16,
                                    const float *dout, const float *gate, const float *up, int64_t n, int64_t cols,
                                    int64_t ld16, int act, enum tuna_dtype hdt)
{
    if (be->sticky || n <= 0) return;
    if (cols <= 0) cols = ld16 = n;
    k_train_glu_backward16<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(dgate, dup, dgate16, dup16, dout, gate,
                                                                             up, n, cols, ld16, act, is_bf(hdt));
    tuna_cuda_check_launch(be, "k_train_glu_backward16");
}

/* Thread (row th, e): e < half rotates the pair (e, e + half) as k_train_rope_backward; the
 * others round the unrotated element e + half (partial rotary) */
__global__ void k_train_rope_backward16(float *d, void *d16, int64_t ld16, const int64_t *pos, int64_t T, int64_t H,
                                        int64_t D, int64_t half, const float *inv_freq, float attn_factor, bool bf)
{
    const int64_t per = D - half;
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * H * per) return;
    const int64_t e = i % per, th = i / per, t = th / H;
    float *v = d + th * D;
    const int64_t o16 = t * ld16 + (th - t * H) * D; /* this head's row in d16 */
    if (e >= half) {
        if (d16) st16(d16, o16 + e + half, v[e + half], bf);
        return;
    }
    float s, c;
    rope_cos_sin(inv_freq, e, (float)pos[t], attn_factor, &c, &s);
    const float g1 = v[e], g2 = v[e + half];
    const float r1 = g1 * c + g2 * s, r2 = g2 * c - g1 * s;
    v[e] = r1;
    v[e + half] = r2;
    if (d16) {
        st16(d16, o16 + e, r1, bf);
        st16(d16, o16 + e + half, r2, bf);
    }
}

void tuna_cuda_train_rope_backward16(tuna_backend *be, float *d, void *d16, int64_t ld16, const int64_t *pos,
                                     int64_t T, int64_t H, int64_t D, int64_t rot_dim, const float *inv_freq,
                                     float attn_factor, enum tuna_dtype hdt)
{
    const int64_t half = rot_dim / 2;
    if (be->sticky || T <= 0) return;
    if (half <= 0) {
        if (d16) tuna_cuda_train_to_half(be, d16, d, T * H * D, H * D, ld16, hdt);
        return;
    }
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, (size_t)T * sizeof(int64_t) + (size_t)half * sizeof(float))) return;
    size_t op = (size_t)tuna_cuda_meta_stage(be, &m, pos, (size_t)T * sizeof(int64_t));
    size_t of = (size_t)tuna_cuda_meta_stage(be, &m, inv_freq, (size_t)half * sizeof(float));
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return;
    const int64_t n = T * H * (D - half);
    k_train_rope_backward16<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(
        d, d16, ld16, META(be, op, const int64_t), T, H, D, half, META(be, of, const float), attn_factor, is_bf(hdt));
    tuna_cuda_check_launch(be, "k_train_rope_backward16");
}
