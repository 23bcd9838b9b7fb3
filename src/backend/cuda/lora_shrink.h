/* lora_shrink.h — the dense LoRA form's shrink and mask in one launch (sm_90: split-K inside a
 * thread-block cluster). See lora_shrink.cu. C API: lora.cu's dense_call and bench/bench_lora_shrink.c
 * call it. */
#ifndef TUNA_BACKEND_CUDA_LORA_SHRINK_H
#define TUNA_BACKEND_CUDA_LORA_SHRINK_H

#include <cuda_runtime_api.h>
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct tuna_lora_w;

/* One linear's slots in hm's columns: slot s of n takes columns off + s*rs .. off + (s+1)*rs; its
 * rank and scale are w[s].r and w[s].scale (device memory, read in place). */
struct tuna_shrink_lin {
    const struct tuna_lora_w *w;
    int off, n, rs;
};

/* hm[t, c0 + j] for j < M, t < T (row stride RU elements, 16-bit: dt 1 bf16, 2 f16):
 *   h = sum_k x16[t, k] A[j, k] (float32), then for the linear of lins[0..nl) holding column c0 + j
 *   (slot s, rank column c): h * w[s].scale rounded once to 16 bits when adapter[t] == s and
 *   c < w[s].r, else 0 (k_lora_mask's definition). A [M, K] row-major, x16 [T, K] row-major.
 * Needs a compute capability >= 9.0 device (clusters), K % 8 == 0, x16/A 16-byte aligned, RU, c0,
 * M multiples of 4. bn (64 or 128 output columns per tile) and cs (K splits = CTAs per cluster:
 * 1, 2, 4, 8 or 16): 0 picks them from T, M and K (tuna_cuda_shrink2_pick). pdl: launch with
 * programmatic stream serialization (A's first tiles load before the previous kernel ends).
 * The sums have a fixed order (each CTA's K range in order, then the splits added 0, 1, ..):
 * the same bits eager or replayed. Returns the launch's error (cudaErrorInvalidValue for
 * arguments outside the above). */
cudaError_t tuna_cuda_shrink2(cudaStream_t st, bool pdl, int dt, void *hm, int RU, const void *x16, int64_t K,
                              const void *A, int c0, int M, int64_t T, const int32_t *adapter,
                              const struct tuna_shrink_lin *lins, int nl, int bn, int cs);

/* The tile width and K split tuna_cuda_shrink2 takes when given 0 for them. */
void tuna_cuda_shrink2_pick(int64_t T, int M, int64_t K, int *bn, int *cs);

/* The reference mask (k_lora_mask's definition, for the benchmark): hm[t, c0 + j] from the float32
 * h[t, c0 + j] (row stride RU), j < M. */
cudaError_t tuna_cuda_shrink2_mask_ref(cudaStream_t st, int dt, void *hm, const float *h, int RU, int c0, int M,
                                       int64_t T, const int32_t *adapter, const struct tuna_shrink_lin *lins, int nl);

#ifdef __cplusplus
}
#endif

#endif
