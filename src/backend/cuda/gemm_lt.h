/* gemm_lt.h — an opt-in per-shape GEMM algorithm choice for the 16-bit activation GEMMs
 * (matmul16, act16.cu): TUNA_GEMM_LT=1 times the algorithms cublasLt's heuristic offers for a
 * (N, K, T bucket, output type, beta) the first time it is met outside a graph capture and keeps
 * the fastest; later calls of that bucket (and captures) run it through cublasLtMatmul. Unset or
 * 0: never used (matmul16 calls cublasGemmEx with CUBLAS_GEMM_DEFAULT, as before).
 * See docs/PERFORMANCE.md "Offline load, ninth session". */
#ifndef TUNA_CUDA_GEMM_LT_H
#define TUNA_CUDA_GEMM_LT_H

#include "backend/cuda/cuda_internal.h"

/* y^T[N,T] = W[N,K] x^T[K,T] (+ y when acc), column-major as matmul16's cublasGemmEx call: W and x
 * 16-bit of type dt, y of type yt (float32 or dt), float32 accumulation. True when it ran (or
 * failed: the failure is sticky); false: not enabled or no algorithm known for this call in a
 * capture: the caller runs its own GEMM. */
bool tuna_cuda_gemm_lt(tuna_backend *be, void *y, cudaDataType_t yt, const void *x, const void *w, cudaDataType_t dt,
                       int64_t N, int64_t K, int64_t T, bool acc);

#endif
