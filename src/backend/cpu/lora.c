/* lora.c — unmerged LoRA on the CPU: y[t] += scale · B (A x[t]) for each token's adapter.
 * A [r, K] row-wise dot products into a stack buffer of up to 256 ranks at a time (double
 * accumulation, the reference), then B [N, r]. */
#include "backend/cpu/cpu_internal.h"

void tuna_cpu_lora(tuna_backend *be, float *y, const float *x, int64_t T, int64_t N, int64_t K,
                   const struct tuna_lora *adapters, int n_adapters, const int32_t *adapter)
{
    (void)be;
    float ax[256];
    for (int64_t t = 0; t < T; t++) {
        int32_t ai = adapter[t];
        if (ai < 0 || ai >= n_adapters) continue;
        const struct tuna_lora *ad = &adapters[ai];
        for (int64_t r0 = 0; r0 < ad->r; r0 += 256) {
            int64_t nr = ad->r - r0 < 256 ? ad->r - r0 : 256;
            for (int64_t j = 0; j < nr; j++) {
                const float *arow = ad->A + (r0 + j) * K;
                double s = 0;
                for (int64_t k = 0; k < K; k++) s += (double)arow[k] * x[t * K + k];
                ax[j] = (float)s;
            }
            for (int64_t n = 0; n < N; n++) {
                float s = 0;
                for (int64_t j = 0; j < nr; j++) s += ad->B[n * ad->r + r0 + j] * ax[j];
                y[t * N + n] += ad->scale * s;
            }
        }
    }
}
