/* rmsnorm.c — y = x / sqrt(mean(x^2) + eps) * w, as transformers' LlamaRMSNorm computes it in
 * float32 (x * rsqrt(var + eps), then times the weight). Gemma's (1 + w) is folded into w by the
 * loader, which is the same float32 value transformers multiplies by. */
#include <math.h>

#include "backend/cpu/cpu_internal.h"

struct norm_args {
    float *y;
    const float *x, *w;
    int64_t C;
    float eps;
};

static void norm_task(void *arg, int64_t t, int thread)
{
    const struct norm_args *a = arg;
    const float *x = a->x + t * a->C;
    float *y = a->y + t * a->C;
    double ss = 0;
    for (int64_t i = 0; i < a->C; i++) ss += (double)x[i] * x[i];
    float var = (float)(ss / (double)a->C);
    float r = 1.0f / sqrtf(var + a->eps);
    for (int64_t i = 0; i < a->C; i++) y[i] = a->w[i] * (x[i] * r);
    (void)thread;
}

void tuna_cpu_rmsnorm(tuna_backend *be, float *y, const float *x, const float *w, int64_t T,
                      int64_t C, float eps)
{
    struct norm_args a = {y, x, w, C, eps};
    tuna_cpu_run(be, T, norm_task, &a, T * C * 4);
}
