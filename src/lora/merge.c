/* merge.c — W' = W + scale · B·A for one module, in float32 as PEFT's merge computes it
 * (delta = (B @ A) · scale in float32; `weight.data += delta` adds in float32 and rounds once
 * to the stored dtype). B @ A is summed in double and rounded once, which is what any float32
 * GEMM approximates; the remaining difference to PyTorch is its own summation order. */
#include <stdlib.h>

#include "core/status.h"
#include "lora/lora.h"

/* One row of delta: out[K] = scale · Σ_j B[n, j] A[j, :]. acc [K] doubles of scratch. */
static void delta_row(const struct tuna_lora_module *mod, int64_t n, double *acc, float *out)
{
    const int64_t K = mod->in, R = mod->r;
    for (int64_t k = 0; k < K; k++) acc[k] = 0;
    for (int64_t j = 0; j < R; j++) {
        const double b = mod->B[n * R + j];
        const float *a = mod->A + j * K;
        for (int64_t k = 0; k < K; k++) acc[k] += b * (double)a[k];
    }
    for (int64_t k = 0; k < K; k++) out[k] = (float)acc[k] * mod->scale;
}

tuna_status tuna_lora_delta(const struct tuna_lora_module *mod, float *delta)
{
    double *acc = malloc(sizeof(double) * (size_t)mod->in);
    if (!acc) return tuna_fail_oom("merge row", sizeof(double) * (size_t)mod->in);
    for (int64_t n = 0; n < mod->out; n++) delta_row(mod, n, acc, delta + n * mod->in);
    free(acc);
    return TUNA_OK;
}

tuna_status tuna_lora_merge_f32(const struct tuna_lora_module *mod, float *W)
{
    return tuna_lora_merge_stored(mod, TUNA_DTYPE_F32, W, W);
}

tuna_status tuna_lora_merge_stored(const struct tuna_lora_module *mod, enum tuna_dtype dtype, const void *src,
                                   void *dst)
{
    if (dtype != TUNA_DTYPE_F32 && dtype != TUNA_DTYPE_BF16 && dtype != TUNA_DTYPE_F16)
        return tuna_fail(TUNA_E_UNSUPPORTED, "merge into %s: the weight must be F32, BF16 or F16 (dequantize 4-bit first)",
                         mod->name);
    const int64_t K = mod->in;
    double *acc = malloc(sizeof(double) * (size_t)K);
    float *row = malloc(sizeof(float) * (size_t)K * 2);
    if (!acc || !row) {
        free(acc);
        free(row);
        return tuna_fail_oom("merge row", sizeof(float) * (size_t)K * 4);
    }
    float *w = row + K;
    const size_t esz = tuna_dtype_nbytes(dtype, 1);
    for (int64_t n = 0; n < mod->out; n++) {
        const char *s = (const char *)src + (size_t)(n * K) * esz;
        char *d = (char *)dst + (size_t)(n * K) * esz;
        tuna_convert_to_f32(dtype, s, w, (size_t)K);
        delta_row(mod, n, acc, row);
        for (int64_t k = 0; k < K; k++) w[k] = w[k] + row[k];
        tuna_convert_from_f32(dtype, w, d, (size_t)K);
    }
    free(acc);
    free(row);
    return TUNA_OK;
}
