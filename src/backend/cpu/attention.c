/* attention.c — causal multi-head attention over the paged KV cache, one (token, head) per task.
 *
 * Softmax is computed online over chunks of 64 positions (running max and sum, the output
 * rescaled when a chunk raises the max), so no score buffer grows with the context length. Each token attends to positions
 * [max(0, pos - window + 1), pos] of its own sequence; with the cache written for the whole step
 * first, prefill tokens and decode tokens of different sequences mix freely in one call.
 * A 16-bit cache (bf16/f16) is converted to float32 one row at a time as it is read, so the
 * arithmetic is the same float32 arithmetic as with a float32 cache.
 */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"

struct attn_args {
    float *out;
    const float *q;
    const void *kc, *vc;
    enum tuna_dtype kv_dtype;
    const struct tuna_attn_batch *b;
    int64_t H, Hkv, D;
    float scale;
};

#define TUNA_ATTN_CHUNK 64

/* acc[D] = acc * c (D a multiple of 8 on the vector path) */
static inline __attribute__((always_inline)) void scale_acc(float *acc, int64_t D, float c)
{
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        tuna_v8f v = tuna_ld8(acc + d) * c;
        memcpy(acc + d, &v, sizeof v);
    }
    for (; d < D; d++) acc[d] *= c;
}

/* acc[D] += e * v[D] */
static inline __attribute__((always_inline)) void axpy(float *acc, const float *v, int64_t D, float e)
{
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        tuna_v8f r = tuna_ld8(acc + d) + e * tuna_ld8(v + d);
        memcpy(acc + d, &r, sizeof r);
    }
    for (; d < D; d++) acc[d] += e * v[d];
}

/* Row `off` (elements) of a cache as float32: the row itself for a float32 cache, else converted
 * into buf[D]. */
static inline const float *kv_row(const void *cache, enum tuna_dtype dt, int64_t off, int64_t D, float *buf)
{
    if (dt == TUNA_DTYPE_F32) return (const float *)cache + off;
    const uint16_t *h = (const uint16_t *)cache + off;
    if (dt == TUNA_DTYPE_BF16)
        for (int64_t d = 0; d < D; d++) buf[d] = tuna_bf16_to_f32(h[d]);
    else
        for (int64_t d = 0; d < D; d++) buf[d] = tuna_f16_to_f32(h[d]);
    return buf;
}

/* Positions are taken in chunks: the chunk's scores first, then one rescale of the running
 * output when the chunk raises the maximum, then the weighted values. */
TUNA_HOT static void attn_task(void *arg, int64_t task, int thread)
{
    const struct attn_args *a = arg;
    const int64_t D = a->D, t = task / a->H, h = task % a->H;
    const int64_t kvh = h / (a->H / a->Hkv), HkvD = a->Hkv * D;
    const float *q = a->q + (t * a->H + h) * D;
    const int32_t *bt = a->b->block_tables[t];
    const int64_t bs = a->b->block_size, pos = a->b->pos[t];
    int64_t start = 0;
    if (a->b->sliding_window > 0 && pos - a->b->sliding_window + 1 > 0) start = pos - a->b->sliding_window + 1;
    float acc[TUNA_CPU_MAX_HEAD_DIM], row[TUNA_CPU_MAX_HEAD_DIM], sc[TUNA_ATTN_CHUNK];
    int64_t slot[TUNA_ATTN_CHUNK];
    for (int64_t d = 0; d < D; d++) acc[d] = 0;
    float m = -INFINITY, l = 0;
    for (int64_t p0 = start; p0 <= pos; p0 += TUNA_ATTN_CHUNK) {
        int64_t n = pos + 1 - p0 < TUNA_ATTN_CHUNK ? pos + 1 - p0 : TUNA_ATTN_CHUNK;
        float cm = -INFINITY;
        for (int64_t i = 0; i < n; i++) {
            int64_t p = p0 + i;
            slot[i] = (int64_t)bt[p / bs] * bs + p % bs;
            sc[i] = tuna_dot_f32(q, kv_row(a->kc, a->kv_dtype, slot[i] * HkvD + kvh * D, D, row), D) * a->scale;
            cm = sc[i] > cm ? sc[i] : cm;
        }
        if (cm > m) {
            float corr = expf(m - cm); /* 0 on the first chunk */
            l *= corr;
            scale_acc(acc, D, corr);
            m = cm;
        }
        for (int64_t i = 0; i < n; i++) {
            float e = expf(sc[i] - m);
            l += e;
            axpy(acc, kv_row(a->vc, a->kv_dtype, slot[i] * HkvD + kvh * D, D, row), D, e);
        }
    }
    float *o = a->out + (t * a->H + h) * D;
    float inv = 1.0f / l;
    for (int64_t d = 0; d < D; d++) o[d] = acc[d] * inv;
    (void)thread;
}

void tuna_cpu_attention(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                        enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H, int64_t Hkv,
                        int64_t D, float scale)
{
    struct attn_args a = {out, q, kcache, vcache, kv_dtype, b, H, Hkv, D, scale};
    int64_t work = 0; /* positions attended x head dims, all heads */
    for (int64_t t = 0; t < b->T; t++) work += (b->pos[t] + 1) * H * D * 2;
    tuna_cpu_run(be, b->T * H, attn_task, &a, work);
}
