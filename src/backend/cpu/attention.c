/* attention.c — causal multi-head attention over the paged KV cache, one (token, head) per task.
 *
 * Softmax is computed online (running max and sum, accumulator rescaled when the max grows), so
 * no score buffer is needed for any context length. Each token attends to positions
 * [max(0, pos - window + 1), pos] of its own sequence; with the cache written for the whole step
 * first, prefill tokens and decode tokens of different sequences mix freely in one call.
 */
#include <math.h>

#include "backend/cpu/cpu_internal.h"

struct attn_args {
    float *out;
    const float *q, *kc, *vc;
    const struct tuna_attn_batch *b;
    int64_t H, Hkv, D;
    float scale;
};

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
    float acc[TUNA_CPU_MAX_HEAD_DIM];
    for (int64_t d = 0; d < D; d++) acc[d] = 0;
    float m = -INFINITY, l = 0;
    for (int64_t p = start; p <= pos; p++) {
        int64_t slot = (int64_t)bt[p / bs] * bs + p % bs;
        const float *k = a->kc + slot * HkvD + kvh * D;
        const float *v = a->vc + slot * HkvD + kvh * D;
        float s = tuna_dot_f32(q, k, D) * a->scale;
        if (s > m) {
            float corr = expf(m - s); /* 0 on the first position */
            l *= corr;
            for (int64_t d = 0; d < D; d++) acc[d] *= corr;
            m = s;
        }
        float e = expf(s - m);
        l += e;
        for (int64_t d = 0; d < D; d++) acc[d] += e * v[d];
    }
    float *o = a->out + (t * a->H + h) * D;
    float inv = 1.0f / l;
    for (int64_t d = 0; d < D; d++) o[d] = acc[d] * inv;
    (void)thread;
}

void tuna_cpu_attention(tuna_backend *be, float *out, const float *q, const float *kcache,
                        const float *vcache, const struct tuna_attn_batch *b, int64_t H,
                        int64_t Hkv, int64_t D, float scale)
{
    struct attn_args a = {out, q, kcache, vcache, b, H, Hkv, D, scale};
    int64_t work = 0; /* positions attended x head dims, all heads */
    for (int64_t t = 0; t < b->T; t++) work += (b->pos[t] + 1) * H * D * 2;
    tuna_cpu_run(be, b->T * H, attn_task, &a, work);
}
