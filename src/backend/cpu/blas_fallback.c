/* blas_fallback.c — cblas_sgemm for builds without OpenBLAS (-DTUNA_BLAS=OFF, the small GPU-only
 * bundles): a plain triple loop with double accumulation, row- or column-major, any transposes.
 * Correct and slow; with OpenBLAS (the default) this file compiles to nothing. */
#ifdef TUNA_NO_BLAS
#include <cblas.h>
#include <stddef.h>

void cblas_sgemm(const enum CBLAS_ORDER order, const enum CBLAS_TRANSPOSE ta, const enum CBLAS_TRANSPOSE tb,
                 const blasint M, const blasint N, const blasint K, const float alpha, const float *A,
                 const blasint lda, const float *B, const blasint ldb, const float beta, float *C, const blasint ldc)
{
    for (blasint i = 0; i < M; i++) {
        for (blasint j = 0; j < N; j++) {
            double s = 0;
            for (blasint k = 0; k < K; k++) {
                float a, b;
                if (order == CblasRowMajor) {
                    a = ta == CblasNoTrans ? A[(size_t)i * lda + k] : A[(size_t)k * lda + i];
                    b = tb == CblasNoTrans ? B[(size_t)k * ldb + j] : B[(size_t)j * ldb + k];
                } else {
                    a = ta == CblasNoTrans ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                    b = tb == CblasNoTrans ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                }
                s += (double)a * b;
            }
            float *c = order == CblasRowMajor ? &C[(size_t)i * ldc + j] : &C[(size_t)j * ldc + i];
            *c = (float)(alpha * s + (beta == 0.0f ? 0.0 : (double)beta * *c));
        }
    }
}
#else
typedef int tuna_blas_fallback_unused; /* keeps the translation unit non-empty */
#endif
