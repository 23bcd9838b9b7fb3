/* argmax.c — greedy token ids on the CPU: the reference of the argmax op (backend.h). The same
 * loop as the sampler's greedy (model/sampler.c): the first index whose value is larger than
 * every earlier one, so ties go to the lowest index, NaN never wins, and a NaN in column 0 makes
 * the row's answer 0. */
#include "backend/cpu/cpu_internal.h"
#include "core/status.h"

tuna_status tuna_cpu_argmax(tuna_backend *be, int32_t *out, const float *logits, int64_t T, int64_t V)
{
    (void)be;
    for (int64_t t = 0; t < T; t++) {
        const float *x = logits + t * V;
        int64_t best = 0;
        for (int64_t i = 1; i < V; i++)
            if (x[i] > x[best]) best = i;
        out[t] = (int32_t)best;
    }
    return TUNA_OK;
}
