/* cpu_internal.h — state shared by the CPU op files (not for use outside src/backend/cpu). */
#ifndef TUNA_BACKEND_CPU_INTERNAL_H
#define TUNA_BACKEND_CPU_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "backend/cpu/threadpool.h"

struct tuna_backend {
    tuna_pool *pool;
    int n_threads;
    float **scratch;       /* [n_threads] tiles of TUNA_CPU_TILE_ROWS x scratch_k floats */
    int64_t scratch_k;     /* 0 = none */
    int64_t min_parallel;  /* ops with less work than this run inline (see tuna_cpu_run) */
};

#define TUNA_CPU_TILE_ROWS 64

/* Portable 8-wide float vectors (GCC/Clang vector extensions): AVX2 in the x86-64-v3 clones of
 * the hot loops, two SSE registers otherwise. */
/* The helpers below are always inlined, so passing 32-byte vectors by value never crosses an ABI
 * boundary; GCC warns about it anyway. */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float tuna_v8f __attribute__((vector_size(32)));
typedef uint32_t tuna_v8u __attribute__((vector_size(32)));
typedef uint16_t tuna_v8h __attribute__((vector_size(16)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define TUNA_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TUNA_HOT
#endif

static inline __attribute__((always_inline)) tuna_v8f tuna_ld8(const float *p)
{
    tuna_v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) tuna_v8f tuna_ld8_bf16(const uint16_t *p)
{
    tuna_v8h h;
    memcpy(&h, p, sizeof h);
    tuna_v8u u = __builtin_convertvector(h, tuna_v8u) << 16;
    tuna_v8f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) float tuna_hsum8(tuna_v8f v)
{
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

static inline __attribute__((always_inline)) float tuna_bf16f(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* sum a[i]*b[i] over n floats. */
static inline __attribute__((always_inline)) float tuna_dot_f32(const float *a, const float *b, int64_t n)
{
    tuna_v8f acc0 = {0}, acc1 = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 += tuna_ld8(a + i) * tuna_ld8(b + i);
        acc1 += tuna_ld8(a + i + 8) * tuna_ld8(b + i + 8);
    }
    for (; i + 8 <= n; i += 8) acc0 += tuna_ld8(a + i) * tuna_ld8(b + i);
    float s = tuna_hsum8(acc0 + acc1);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Runs fn over n_tasks in the pool, or inline when the whole op is too small (`work`, roughly
 * multiply-adds) to pay for waking the other threads. */
static inline void tuna_cpu_run(tuna_backend *be, int64_t n_tasks, tuna_pool_fn fn, void *arg, int64_t work)
{
    if (work < be->min_parallel) {
        for (int64_t t = 0; t < n_tasks; t++) fn(arg, t, 0);
        return;
    }
    tuna_pool_run(be->pool, n_tasks, fn, arg);
}

/* Ops, one file per family. */
void tuna_cpu_matmul(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w,
                     const float *bias, int64_t T);
void tuna_cpu_rmsnorm(tuna_backend *be, float *y, const float *x, const float *w, int64_t T,
                      int64_t C, float eps);
void tuna_cpu_rope(tuna_backend *be, float *x, const int64_t *pos, int64_t T, int64_t H, int64_t D,
                   int64_t rot_dim, const float *inv_freq, float attn_factor);
void tuna_cpu_kv_store(tuna_backend *be, void *kcache, void *vcache, enum tuna_dtype kv_dtype, const float *k,
                       const float *v, const int64_t *slot, int64_t T, int64_t HkvD);
void tuna_cpu_attention(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                        enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H, int64_t Hkv,
                        int64_t D, float scale);
void tuna_cpu_glu(tuna_backend *be, float *out, const float *gate, const float *up, int64_t n, int act);
void tuna_cpu_embedding(tuna_backend *be, float *out, const int32_t *ids, int64_t T,
                        const struct tuna_weight *emb, float scale);
void tuna_cpu_add(tuna_backend *be, float *y, const float *x, int64_t n);
void tuna_cpu_lora(tuna_backend *be, int n, float *const *ys, const int64_t *Ns, const float *x, int64_t T, int64_t K,
                   const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok, float *glu_out, int act);
tuna_status tuna_cpu_argmax(tuna_backend *be, int32_t *out, const float *logits, int64_t T, int64_t V);

#endif
