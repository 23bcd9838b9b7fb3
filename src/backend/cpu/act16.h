/* act16.h — CPU twins of backend.h's 16-bit activation ops (rmsnorm16, matmul16,
 * rope_kv_store16, attention16, glu16): the 16-bit inputs widened to float32, the CPU backend's
 * float32 op, each output rounded to the activations' type adt (BF16 or F16) at the same points
 * as the GPU (nearest even). The reference of the op tests; not in the CPU op table (the CPU
 * forward stays float32). Same signatures as the op table's entries. */
#ifndef TUNA_BACKEND_CPU_ACT16_H
#define TUNA_BACKEND_CPU_ACT16_H

#include "backend/backend.h"

void tuna_cpu_rmsnorm16(tuna_backend *be, void *y, int64_t ldy, const float *x, const float *w, int64_t T,
                        int64_t C, float eps, enum tuna_dtype adt);
bool tuna_cpu_matmul16(tuna_backend *be, void *y, enum tuna_dtype ydt, const void *x, enum tuna_dtype adt,
                       const struct tuna_weight *w, const float *bias, int64_t T, bool acc);
void tuna_cpu_rope_kv_store16(tuna_backend *be, void *q, void *k, const void *v, enum tuna_dtype adt,
                              const float *q_norm, const float *k_norm, float eps, void *kcache, void *vcache,
                              enum tuna_dtype kv_dtype, const int64_t *pos, const int64_t *slot, int64_t T, int64_t H,
                              int64_t Hkv, int64_t D, int64_t rot_dim, const float *inv_freq, float attn_factor);
void tuna_cpu_attention16(tuna_backend *be, void *out, const void *q, enum tuna_dtype adt, const void *kcache,
                          const void *vcache, enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H,
                          int64_t Hkv, int64_t D, float scale);
void tuna_cpu_glu16(tuna_backend *be, void *out, const void *gate, const void *up, int64_t n, int act,
                    enum tuna_dtype adt);

#endif
