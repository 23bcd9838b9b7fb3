/* rope.c — rotary position embedding in transformers' rotate-half layout: for i < rot_dim/2,
 * (x[i], x[i+half]) -> (x[i] c - x[i+half] s, x[i+half] c + x[i] s) with angle pos * inv_freq[i]
 * computed in float32 (as transformers does), c and s times the attention factor (YaRN).
 * Dims past rot_dim (partial rotary) pass through. The inverse frequencies come from
 * src/model/rope_freq.c. */
#include <math.h>

#include "backend/cpu/cpu_internal.h"

struct rope_args {
    float *x;
    const int64_t *pos;
    int64_t H, D, rot_dim;
    const float *inv_freq;
    float attn_factor;
};

static void rope_task(void *arg, int64_t t, int thread)
{
    const struct rope_args *a = arg;
    int64_t half = a->rot_dim / 2;
    float c[TUNA_CPU_MAX_HEAD_DIM / 2], s[TUNA_CPU_MAX_HEAD_DIM / 2];
    float p = (float)a->pos[t];
    for (int64_t i = 0; i < half; i++) {
        float ang = a->inv_freq[i] * p;
        c[i] = cosf(ang) * a->attn_factor;
        s[i] = sinf(ang) * a->attn_factor;
    }
    for (int64_t h = 0; h < a->H; h++) {
        float *v = a->x + (t * a->H + h) * a->D;
        for (int64_t i = 0; i < half; i++) {
            float x1 = v[i], x2 = v[i + half];
            v[i] = x1 * c[i] - x2 * s[i];
            v[i + half] = x2 * c[i] + x1 * s[i];
        }
    }
    (void)thread;
}

void tuna_cpu_rope(tuna_backend *be, float *x, const int64_t *pos, int64_t T, int64_t H, int64_t D,
                   int64_t rot_dim, const float *inv_freq, float attn_factor)
{
    struct rope_args a = {x, pos, H, D, rot_dim, inv_freq, attn_factor};
    tuna_cpu_run(be, T, rope_task, &a, T * (H * D + rot_dim * 8));
}
