/* activation.c — the gated MLP nonlinearity out = act(gate) * up, float32 as torch computes it:
 * SiLU x / (1 + e^-x); GELU with the tanh approximation (gelu_pytorch_tanh); exact erf GELU. */
#include <math.h>

#include "backend/cpu/cpu_internal.h"
#include "io/hf_config.h"

struct glu_args {
    float *out;
    const float *gate, *up;
    int64_t n, chunk;
    int act;
};

static void glu_task(void *arg, int64_t task, int thread)
{
    const struct glu_args *a = arg;
    int64_t i0 = task * a->chunk, i1 = i0 + a->chunk;
    if (i1 > a->n) i1 = a->n;
    const float kBeta = (float)(M_SQRT2 * M_2_SQRTPI * 0.5), kKappa = 0.044715f;
    for (int64_t i = i0; i < i1; i++) {
        float x = a->gate[i], g;
        switch (a->act) {
        case TUNA_ACT_GELU_TANH: {
            float inner = kBeta * (x + kKappa * x * x * x);
            g = 0.5f * x * (1.0f + tanhf(inner));
            break;
        }
        case TUNA_ACT_GELU:
            g = 0.5f * x * (1.0f + erff(x * (float)M_SQRT1_2));
            break;
        default:
            g = x / (1.0f + expf(-x));
            break;
        }
        a->out[i] = g * a->up[i];
    }
    (void)thread;
}

void tuna_cpu_glu(tuna_backend *be, float *out, const float *gate, const float *up, int64_t n, int act)
{
    struct glu_args a = {out, gate, up, n, 16384, act};
    tuna_cpu_run(be, (n + a.chunk - 1) / a.chunk, glu_task, &a, n * 16);
}
