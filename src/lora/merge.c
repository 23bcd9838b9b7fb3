/* merge.c — W' = W + scale · B·A for one module, in float32 as PEFT's merge computes it
 * (delta = (B @ A) · scale in float32; `weight.data += delta` adds in float32 and rounds once
 * to the stored dtype). B @ A is summed in double and rounded once, which is what any float32
 * GEMM approximates; the remaining difference to PyTorch is its own summation order.
 * Large matrices are split by rows over a few threads (each row is independent, so the result
 * does not depend on the thread count). */
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/status.h"
#include "lora/lora.h"

/* One row of delta: out[K] = scale · Σ_j B[n, j] A[j, :]. acc [K] doubles of scratch. */
static void delta_row(const struct tuna_lora_module *mod, int64_t n, double *acc, float *out)
{
    const int64_t K = mod->in, R = mod->r;
    for (int64_t k = 0; k < K; k++)
        acc[k] = 0;
    for (int64_t j = 0; j < R; j++) {
        const double b = mod->B[n * R + j];
        const float *a = mod->A + j * K;
        for (int64_t k = 0; k < K; k++)
            acc[k] += b * (double)a[k];
    }
    for (int64_t k = 0; k < K; k++)
        out[k] = (float)acc[k] * mod->scale;
}

struct merge_job {
    const struct tuna_lora_module *mod;
    enum tuna_dtype dtype; /* INVALID: write delta (float32) to dst instead of merging */
    const void *src;
    void *dst;
    int64_t row0, row1;
    int failed;
};

static void *merge_rows(void *arg)
{
    struct merge_job *j = arg;
    const int64_t K = j->mod->in;
    double *acc = malloc(sizeof(double) * (size_t)K);
    float *row = malloc(sizeof(float) * (size_t)K * 2);
    if (!acc || !row) {
        j->failed = 1;
        free(acc);
        free(row);
        return NULL;
    }
    float *w = row + K;
    if (j->dtype == TUNA_DTYPE_INVALID) {
        for (int64_t n = j->row0; n < j->row1; n++)
            delta_row(j->mod, n, acc, (float *)j->dst + n * K);
    } else {
        const size_t esz = tuna_dtype_nbytes(j->dtype, 1);
        for (int64_t n = j->row0; n < j->row1; n++) {
            const char *s = (const char *)j->src + (size_t)(n * K) * esz;
            char *d = (char *)j->dst + (size_t)(n * K) * esz;
            tuna_convert_to_f32(j->dtype, s, w, (size_t)K);
            delta_row(j->mod, n, acc, row);
            for (int64_t k = 0; k < K; k++)
                w[k] = w[k] + row[k];
            tuna_convert_from_f32(j->dtype, w, d, (size_t)K);
        }
    }
    free(acc);
    free(row);
    return NULL;
}

/* Runs merge_rows over all rows, on up to 8 threads when the matrix is large. */
static tuna_status run_rows(const struct tuna_lora_module *mod, enum tuna_dtype dtype, const void *src, void *dst)
{
    enum { MAXT = 8 };
    int nt = 1;
    if ((double)mod->out * (double)mod->in * (double)mod->r > 4e7) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        nt = cpus < 1 ? 1 : cpus > MAXT ? MAXT : (int)cpus;
        if (nt > mod->out) nt = (int)mod->out;
    }
    struct merge_job jobs[MAXT];
    pthread_t th[MAXT];
    bool started[MAXT] = {false};
    for (int i = 0; i < nt; i++) {
        jobs[i] = (struct merge_job){mod, dtype, src, dst, mod->out * i / nt, mod->out * (i + 1) / nt, 0};
        if (i > 0) started[i] = pthread_create(&th[i], NULL, merge_rows, &jobs[i]) == 0;
        if (i > 0 && !started[i]) merge_rows(&jobs[i]); /* no thread: do it here */
    }
    merge_rows(&jobs[0]);
    int failed = 0;
    for (int i = 0; i < nt; i++) {
        if (started[i]) pthread_join(th[i], NULL);
        failed |= jobs[i].failed;
    }
    return failed ? tuna_fail_oom("merge rows", sizeof(double) * (size_t)mod->in * 3) : TUNA_OK;
}

tuna_status tuna_lora_delta(const struct tuna_lora_module *mod, float *delta)
{
    return run_rows(mod, TUNA_DTYPE_INVALID, NULL, delta);
}

tuna_status tuna_lora_merge_f32(const struct tuna_lora_module *mod, float *W)
{
    return tuna_lora_merge_stored(mod, TUNA_DTYPE_F32, W, W);
}

tuna_status tuna_lora_merge_stored(const struct tuna_lora_module *mod, enum tuna_dtype dtype, const void *src,
                                   void *dst)
{
    if (dtype != TUNA_DTYPE_F32 && dtype != TUNA_DTYPE_BF16 && dtype != TUNA_DTYPE_F16)
        return tuna_fail(TUNA_E_UNSUPPORTED,
                         "merge into %s: the weight is %s; it must be F32, BF16 or F16 (dequantize "
                         "4-bit weights first)",
                         mod->name, tuna_dtype_name(dtype));
    return run_rows(mod, dtype, src, dst);
}
