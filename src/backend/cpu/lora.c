/* lora.c — unmerged LoRA on the CPU, the reference of the GPU's segmented kernels (lora.cu):
 * y[t] += scale · B (A x[t]) for each token's adapter. A [r, K] row-wise dot products into a stack
 * buffer of up to 256 ranks at a time (double accumulation), then B [N, r] in float32. A and B may
 * be float32, bf16 or f16 (the GPU's views hold the compute dtype); elements are widened one at a
 * time. The grouping in tok (order/start) is not needed here: tokens are taken as they come.
 * Several outputs of one input are done one after the other; the GLU form (glu_out) adds the
 * LoRA terms into copies of gate and up and runs the GLU op on them (a third set, the next
 * linear's, is not used here: the residual-form call on glu_out computes it afresh), the
 * residual form adds the term into ys[0] and ys[0] into glu_out, as forward.c would with the
 * plain ops. */
#include <stdlib.h>

#include "backend/cpu/cpu_internal.h"
#include "core/status.h"

static inline float lora_elem(const void *p, int64_t i, enum tuna_dtype dt)
{
    if (dt == TUNA_DTYPE_BF16) return tuna_bf16_to_f32(((const uint16_t *)p)[i]);
    if (dt == TUNA_DTYPE_F16) return tuna_f16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* y[T, N] += the adapters of set, per token */
static void lora_one(float *y, const float *x, int64_t T, int64_t N, int64_t K, const struct tuna_lora_bank *set,
                     const struct tuna_lora_tokens *tok)
{
    const enum tuna_dtype dt = set->dtype;
    float ax[256];
    for (int64_t t = 0; t < T; t++) {
        int32_t ai = tok->adapter[t];
        if (ai < 0 || ai >= set->n) continue;
        const struct tuna_lora_w *ad = &set->w[ai];
        const int64_t ldb = ad->ldb ? ad->ldb : ad->r;
        for (int64_t r0 = 0; r0 < ad->r; r0 += 256) {
            int64_t nr = ad->r - r0 < 256 ? ad->r - r0 : 256;
            for (int64_t j = 0; j < nr; j++) {
                double s = 0;
                if (dt == TUNA_DTYPE_F32) {
                    const float *arow = (const float *)ad->A + (r0 + j) * K;
                    for (int64_t k = 0; k < K; k++) s += (double)arow[k] * x[t * K + k];
                } else {
                    for (int64_t k = 0; k < K; k++) s += (double)lora_elem(ad->A, (r0 + j) * K + k, dt) * x[t * K + k];
                }
                ax[j] = (float)s;
            }
            for (int64_t n = 0; n < N; n++) {
                float s = 0;
                for (int64_t j = 0; j < nr; j++) s += lora_elem(ad->B, n * ldb + r0 + j, dt) * ax[j];
                y[t * N + n] += ad->scale * s;
            }
        }
    }
}

void tuna_cpu_lora(tuna_backend *be, int n, float *const *ys, const int64_t *Ns, const float *x, int64_t T, int64_t K,
                   const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok, float *glu_out, int act)
{
    if (!glu_out || act == TUNA_LORA_RESIDUAL) {
        for (int i = 0; i < n; i++)
            if (sets[i]) lora_one(ys[i], x, T, Ns[i], K, sets[i], tok);
        if (glu_out) tuna_cpu_add(be, glu_out, ys[0], T * Ns[0]); /* the residual form */
        return;
    }
    /* act(gate + LoRA) * (up + LoRA): the sums in scratch copies, ys untouched */
    const size_t NT = (size_t)(T * Ns[0]);
    float *g = malloc(2 * NT * sizeof(float));
    if (!g) { /* ops do not fail: the GLU without the LoRA terms, and the error recorded */
        tuna_fail_oom("LoRA GLU scratch", 2 * NT * sizeof(float));
        tuna_cpu_glu(be, glu_out, ys[0], ys[1], (int64_t)NT, act);
        return;
    }
    for (int i = 0; i < 2; i++) {
        memcpy(g + (size_t)i * NT, ys[i], NT * sizeof(float));
        if (sets[i]) lora_one(g + (size_t)i * NT, x, T, Ns[0], K, sets[i], tok);
    }
    tuna_cpu_glu(be, glu_out, g, g + NT, (int64_t)NT, act);
    free(g);
}
