/* act16.h — the CUDA backend's 16-bit activation ops (backend.h: rmsnorm16, matmul16,
 * rope_kv_store16, attention16, glu16, act16_min_t). act16.cu holds the norm, the GEMM and the
 * GLU; rope_kv.cu and attention.cu / attention_prefill.cu run their float32 kernels with 16-bit
 * loads and stores (act16.cuh). */
#ifndef TUNA_CUDA_ACT16_H
#define TUNA_CUDA_ACT16_H

#include "backend/cuda/cuda_internal.h"

void tuna_cuda_rmsnorm16(tuna_backend *be, void *y, int64_t ldy, const float *x, const float *w, int64_t T,
                         int64_t C, float eps, enum tuna_dtype adt);
bool tuna_cuda_matmul16(tuna_backend *be, void *y, enum tuna_dtype ydt, const void *x, enum tuna_dtype adt,
                        const struct tuna_weight *w, const float *bias, int64_t T, bool acc);
void tuna_cuda_rope_kv_store16(tuna_backend *be, void *q, void *k, const void *v, enum tuna_dtype adt,
                               const float *q_norm, const float *k_norm, float eps, void *kcache, void *vcache,
                               enum tuna_dtype kv_dtype, const int64_t *pos, const int64_t *slot, int64_t T, int64_t H,
                               int64_t Hkv, int64_t D, int64_t rot_dim, const float *inv_freq, float attn_factor);
void tuna_cuda_attention16(tuna_backend *be, void *out, const void *q, enum tuna_dtype adt, const void *kcache,
                           const void *vcache, enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H,
                           int64_t Hkv, int64_t D, float scale);
void tuna_cuda_glu16(tuna_backend *be, void *out, const void *gate, const void *up, int64_t n, int act,
                     enum tuna_dtype adt);
int64_t tuna_cuda_act16_min_t(tuna_backend *be);

#endif
