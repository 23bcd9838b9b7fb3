/* train_gemm.cu — the training GEMMs on cuBLAS: the frozen matmul's input gradient
 * dx[T,K] += dy[T,N] W[N,K] with W in its stored dtype (16-bit: dy rounded to W's type, float32
 * accumulation, as the forward's prefill GEMM; float32: SGEMM without TF32; NF4/FP4: the weight
 * dequantized once per GEMM, as the forward does for T > TUNA_CUDA_GEMV_MAX_T), and the LoRA
 * forward and backward (float32 A, B: SGEMM; ranks are small). */
#include "backend/cuda/train_cuda.h"

/* C[m, n] = sum_s P[s][m, n] (+ beta C[m, n]): the split-K partials summed in a fixed order */
__global__ void k_train_splitk_sum(float *C, int64_t ldc, const float *P, int64_t M, int64_t N, int S, float beta)
{
    const int64_t MN = M * N;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < MN; i += (int64_t)gridDim.x * blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < S; s++)
            a += P[(int64_t)s * MN + i];
        const int64_t m = i / N, n = i - m * N;
        float *c = C + m * ldc + n;
        *c = beta == 0.0f ? a : a + beta * *c;
    }
}

/* K splits for a skinny GEMM of the fast mode (1: none). The LoRA GEMMs have an output of T x r,
 * r x K or N x r (r <= 64) and a long reduction (K, N or T in the thousands): cuBLAS tiles the
 * output only, ~16-32 blocks on a GPU of 132 SMs (H100 r1: ~0.8 TB/s). With S splits the
 * partials [S, M, N] come from one strided batched GEMM and a small kernel sums them in order
 * (deterministic). TUNA_TRAIN_SPLITK=0 turns it off (comparisons). */
static int tg_splits(tuna_backend *be, int64_t M, int64_t N, int64_t K, bool fast)
{
    static int off = -1;
    if (off < 0) {
        const char *e = getenv("TUNA_TRAIN_SPLITK");
        off = e && e[0] == '0';
    }
    if (off || !fast || K < 1024 || (M > 64 && N > 64)) return 1;
    const int64_t tiles = ((M + 127) / 128) * ((N + 127) / 128);
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    if (tiles * 2 > sms) return 1;
    for (int S = 16; S >= 2; S /= 2)
        if (K % (16 * S) == 0 && tiles * S <= 2 * sms) return S;
    return 1;
}

/* The split-K form of both wrappers below: S chunks of the reduction (Kc = K / S) as one strided
 * batched GEMM into float32 partials [S, M, N], then k_train_splitk_sum adds them in chunk order
 * into C (C = their sum + beta C). et: A and B's element type; what: the call named in errors. */
static bool tg_splitk(tuna_backend *be, bool ta, bool tb, int64_t M, int64_t N, int64_t K, int S, float alpha,
                      const void *A, int64_t lda, const void *B, int64_t ldb, float beta, float *C, int64_t ldc,
                      cudaDataType_t et, cublasComputeType_t compute, const char *what)
{
    cublasOperation_t opB = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opA = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    float *P = NULL;
    const int64_t Kc = K / S;
    if (!tuna_cuda_check(be, cudaMallocAsync((void **)&P, (size_t)(S * M * N) * sizeof(float), be->stream),
                         "cudaMallocAsync(training GEMM split-K partials)"))
        return false;
    const float zero = 0.0f;
    /* chunk s of the reduction: columns s Kc.. of a row-major operand read untransposed
       (A) / transposed (B), rows s Kc.. otherwise */
    const long long sA = ta ? Kc * lda : Kc, sB = tb ? Kc : Kc * ldb;
    bool ok = tuna_cuda_check_blas(be,
                                   cublasGemmStridedBatchedEx(be->blas, opB, opA, (int)N, (int)M, (int)Kc, &alpha, B, et,
                                                              (int)ldb, sB, A, et, (int)lda, sA, &zero, P, CUDA_R_32F,
                                                              (int)N, (long long)(M * N), S, compute,
                                                              CUBLAS_GEMM_DEFAULT),
                                   what);
    if (ok) {
        const int64_t MN = M * N;
        const unsigned nb = (unsigned)((MN + 255) / 256 < 1024 ? (MN + 255) / 256 : 1024);
        k_train_splitk_sum<<<nb, 256, 0, be->stream>>>(C, ldc, P, M, N, S, beta);
        ok = tuna_cuda_check_launch(be, "k_train_splitk_sum");
    }
    tuna_cuda_check(be, cudaFreeAsync(P, be->stream), "cudaFreeAsync(training GEMM split-K partials)");
    return ok && !be->sticky;
}

bool tuna_cuda_train_gemm(tuna_backend *be, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                          const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc,
                          bool fast)
{
    if (be->sticky) return false;
    if (M <= 0 || N <= 0) return true;
    const int S = tg_splits(be, M, N, K, fast);
    if (S > 1)
        return tg_splitk(be, ta, tb, M, N, K, S, alpha, A, lda, B, ldb, beta, C, ldc, CUDA_R_32F,
                         CUBLAS_COMPUTE_32F_FAST_TF32, "cublasGemmStridedBatchedEx(training, split-K)");
    /* column-major view: C^T[N,M] = op(B)^T op(A)^T, the stored row-major arrays read as their
       transposes, so the transpose flags carry over unchanged */
    cublasOperation_t opB = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opA = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    return tuna_cuda_check_blas(be,
                                cublasGemmEx(be->blas, opB, opA, (int)N, (int)M, (int)K, &alpha, B, CUDA_R_32F,
                                             (int)ldb, A, CUDA_R_32F, (int)lda, &beta, C, CUDA_R_32F, (int)ldc,
                                             fast ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT),
                                "cublasGemmEx(training, float32)");
}

/* C[M,N] = alpha op(A) op(B) + beta C as tuna_cuda_train_gemm, with A and B 16-bit (ct: CUDA_R_16BF
 * or CUDA_R_16F, float32 accumulation and output C), split over a long reduction the same way */
bool tuna_cuda_train_gemm16(tuna_backend *be, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                            const void *A, int64_t lda, const void *B, int64_t ldb, float beta, float *C, int64_t ldc,
                            cudaDataType_t ct)
{
    if (be->sticky) return false;
    if (M <= 0 || N <= 0) return true;
    int S = tg_splits(be, M, N, K, true);
    while (S > 1 && (K / S) % 8 != 0) /* 16-byte aligned chunks */
        S /= 2;
    if (S > 1)
        return tg_splitk(be, ta, tb, M, N, K, S, alpha, A, lda, B, ldb, beta, C, ldc, ct, CUBLAS_COMPUTE_32F,
                         "cublasGemmStridedBatchedEx(training, 16-bit, split-K)");
    cublasOperation_t opB = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opA = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    return tuna_cuda_check_blas(be,
                                cublasGemmEx(be->blas, opB, opA, (int)N, (int)M, (int)K, &alpha, B, ct, (int)ldb, A, ct,
                                             (int)lda, &beta, C, CUDA_R_32F, (int)ldc, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT),
                                "cublasGemmEx(training, 16-bit)");
}

__global__ void k_train_to_bf16(__nv_bfloat16 *dst, const float *src, int64_t n)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void k_train_to_f16(__half *dst, const float *src, int64_t n)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2half_rn(src[i]);
}

void tuna_cuda_train_matmul_backward(tuna_backend *be, float *dx, const float *dy, const struct tuna_weight *w,
                                     int64_t T)
{
    if (be->sticky || T <= 0) return;
    const int64_t N = w->rows, K = w->cols;
    const void *W = w->data;
    enum tuna_dtype dt = w->dtype;
    if (dt == TUNA_DTYPE_NF4 || dt == TUNA_DTYPE_FP4) {
        if (!w->q4) {
            tuna_cuda_check(be, cudaErrorInvalidValue, "matmul_backward (4-bit weight without its GPU quant state)");
            return;
        }
        void *p;
        if (!tuna_cuda_train_dequant(be, w, &p, &dt)) return;
        W = p;
    }
    if (dt == TUNA_DTYPE_F32) {
        /* dx[T,K] += dy[T,N] W[N,K] */
        tuna_cuda_train_gemm(be, false, false, T, K, N, 1.0f, dy, N, (const float *)W, K, 1.0f, dx, K, false);
        return;
    }
    if (dt != TUNA_DTYPE_BF16 && dt != TUNA_DTYPE_F16) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "matmul_backward (weight dtype not supported on the GPU)");
        return;
    }
    const int64_t n = T * N;
    if (!tuna_cuda_grow(be, &be->half, (size_t)n * 2, "cudaMalloc(gradients in 16-bit)")) return;
    if (dt == TUNA_DTYPE_BF16)
        k_train_to_bf16<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>((__nv_bfloat16 *)be->half.p, dy, n);
    else
        k_train_to_f16<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>((__half *)be->half.p, dy, n);
    if (!tuna_cuda_check_launch(be, "k_train_to_16bit")) return;
    const cudaDataType_t ct = dt == TUNA_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_16F;
    const float one = 1.0f;
    /* column-major: dx^T[K,T] += W^T[K,N] (W row-major [N,K] read as K x N) * dy^T[N,T] */
    tuna_cuda_check_blas(be,
                         cublasGemmEx(be->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)K, (int)T, (int)N, &one, W, ct, (int)K,
                                      be->half.p, ct, (int)N, &one, dx, CUDA_R_32F, (int)K, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT),
                         "cublasGemmEx(matmul_backward)");
}

void tuna_cuda_train_lora_forward(tuna_backend *be, float *y, const float *x, const struct tuna_lora *l, int64_t T,
                                  int64_t N, int64_t K, float *h, bool fast)
{
    const int64_t R = l->r;
    if (be->sticky || T <= 0 || R <= 0) return;
    /* h[T,R] = x A^T; y += s h B^T */
    if (!tuna_cuda_train_gemm(be, false, true, T, R, K, 1.0f, x, K, l->A, K, 0.0f, h, R, fast)) return;
    tuna_cuda_train_gemm(be, false, true, T, N, R, l->scale, h, R, l->B, R, 1.0f, y, N, fast);
}

void tuna_cuda_train_lora_backward(tuna_backend *be, float *dx, float *dA, float *dB, const float *dy, const float *x,
                                   const struct tuna_lora *l, int64_t T, int64_t N, int64_t K, float *work, bool fast)
{
    const int64_t R = l->r;
    if (be->sticky || T <= 0 || R <= 0) return;
    float *u = work, *hx = work + T * R;
    const float s = l->scale;
    tuna_cuda_train_gemm(be, false, false, T, R, N, 1.0f, dy, N, l->B, R, 0.0f, u, R, fast);      /* u = dy B */
    tuna_cuda_train_gemm(be, false, true, T, R, K, 1.0f, x, K, l->A, K, 0.0f, hx, R, fast);       /* hx = x A^T */
    if (dx) tuna_cuda_train_gemm(be, false, false, T, K, R, s, u, R, l->A, K, 1.0f, dx, K, fast); /* dx += s u A */
    tuna_cuda_train_gemm(be, true, false, R, K, T, s, u, R, x, K, 1.0f, dA, K, fast);             /* dA += s u^T x */
    tuna_cuda_train_gemm(be, true, false, N, R, T, s, dy, N, hx, R, 1.0f, dB, R, fast);           /* dB += s dy^T hx */
}

void tuna_cuda_train_lora_backward_h(tuna_backend *be, float *dx, float *dA, float *dB, const float *dy, const float *x,
                                     const float *h, const struct tuna_lora *l, int64_t T, int64_t N, int64_t K,
                                     float *work, bool fast)
{
    const int64_t R = l->r;
    if (be->sticky || T <= 0 || R <= 0) return;
    float *u = work;
    const float s = l->scale;
    tuna_cuda_train_gemm(be, false, false, T, R, N, 1.0f, dy, N, l->B, R, 0.0f, u, R, fast);      /* u = dy B */
    if (dx) tuna_cuda_train_gemm(be, false, false, T, K, R, s, u, R, l->A, K, 1.0f, dx, K, fast); /* dx += s u A */
    tuna_cuda_train_gemm(be, true, false, R, K, T, s, u, R, x, K, 1.0f, dA, K, fast);             /* dA += s u^T x */
    tuna_cuda_train_gemm(be, true, false, N, R, T, s, dy, N, h, R, 1.0f, dB, R, fast);            /* dB += s dy^T h */
}
