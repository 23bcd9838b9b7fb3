/* lora_expand.h — the dense LoRA form's expand of a projection group in one launch (lora.cu's
 * dense_call under TUNA_LORA_EXPAND2; bench/bench_lora_expand times it against cuBLAS).
 *
 * hm [T, RU] (bf16 or f16) holds, for each token, its own slot's ranks times the scale (every other
 * column zero; k_lora_mask). For each linear i of the group (B_all_i [N_i, n_i * rs_i], slot a in
 * columns a * rs_i ..) and token t of slot a_t:
 *   term[t, n] = sum_{j < rs_i} hm[t, off_i + a_t * rs_i + j] * B_all_i[n, a_t * rs_i + j]
 * (float32 sums in j order; only the token's own slot is read: rs MACs per output, not n * rs).
 * add 0: y = term (rounded to y's type; tokens without a slot of that linear: 0), the semantics
 *        of the cuBLAS expand with beta 0;
 * add 1: y = y + term, in place (16-bit y: rounded once more; float32 y: the residual stream).
 * A block stages 128 rows of one linear's B_all transposed in shared memory and walks a chunk of
 * the tokens; no atomics: the same bits eager or replayed, for any mix. Plain C (the bench). */
#ifndef TUNA_CUDA_LORA_EXPAND_H
#define TUNA_CUDA_LORA_EXPAND_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct tuna_lora_expand_lin {
    void *y;        /* [T, N]: hm's 16-bit type, or float32 (yf32) */
    const void *B;  /* B_all [N, n * rs] in hm's type, 16-byte aligned */
    int64_t N;
    int off;        /* the linear's first column in hm */
    int n, rs;      /* slots and ranks per slot; n 0: the linear is skipped (no adapters) */
};

/* Enqueues the expand of nl <= 3 linears on `stream` (a cudaStream_t). hdt: 1 bf16, 2 f16 (hm and
 * B); yf32: y is float32; chunks: token chunks (grid y; 0: chosen from T and sm_count);
 * sm_count < 0: only the check (nothing enqueued; 0 = it would launch).
 * Returns 0 when launched, 1 when the shapes are not served (nothing enqueued: the caller runs
 * cuBLAS; rs not a multiple of 8 or > 32, n * rs > 192, misaligned B), -1 on a launch error. */
int tuna_cuda_lora_expand(void *stream, int sm_count, int nl, const struct tuna_lora_expand_lin *lin, const void *hm,
                          int RU, const int32_t *adapter, int64_t T, int hdt, int yf32, int add, int chunks);

#ifdef __cplusplus
}
#endif

#endif
