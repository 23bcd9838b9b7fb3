/* backend_cpu.c — the CPU backend object (thread pool, matmul scratch) and its op table; the small
 * memory ops (KV store, residual add) live here too. */
#ifndef TUNA_NO_BLAS
#include <cblas.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/cpu/cpu_internal.h"
#include "core/status.h"

tuna_status tuna_cpu_backend_new(int n_threads, tuna_backend **out)
{
    *out = NULL;
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    struct tuna_backend *be = calloc(1, sizeof *be);
    if (!be) return tuna_fail_oom("CPU backend", sizeof *be);
    tuna_status st = tuna_pool_new(n_threads, &be->pool);
    if (st) {
        free(be);
        return st;
    }
    be->n_threads = n_threads;
    be->min_parallel = TUNA_CPU_MIN_PARALLEL_WORK;
    /* OpenBLAS runs inside our pool's tasks: one thread each, never a second pool. */
#ifndef TUNA_NO_BLAS
    openblas_set_num_threads(1);
#endif
    *out = be;
    return TUNA_OK;
}

static void free_scratch(tuna_backend *be)
{
    if (!be->scratch) return;
    for (int i = 0; i < be->n_threads; i++) free(be->scratch[i]);
    free(be->scratch);
    be->scratch = NULL;
    be->scratch_k = 0;
}

void tuna_cpu_backend_free(tuna_backend *be)
{
    if (!be) return;
    tuna_pool_free(be->pool);
    free_scratch(be);
    free(be);
}

int tuna_cpu_backend_threads(const tuna_backend *be) { return be->n_threads; }

void tuna_cpu_backend_set_min_parallel(tuna_backend *be, int64_t work) { be->min_parallel = work; }

tuna_status tuna_cpu_backend_reserve(tuna_backend *be, int64_t max_k)
{
    if (max_k <= be->scratch_k) return TUNA_OK;
    free_scratch(be);
    be->scratch = calloc((size_t)be->n_threads, sizeof *be->scratch);
    if (!be->scratch) return tuna_fail_oom("matmul scratch table", sizeof(float *) * (size_t)be->n_threads);
    size_t n = (size_t)TUNA_CPU_TILE_ROWS * (size_t)max_k;
    for (int i = 0; i < be->n_threads; i++) {
        be->scratch[i] = malloc(n * sizeof(float));
        if (!be->scratch[i]) {
            free_scratch(be);
            return tuna_fail_oom("matmul scratch tile", n * sizeof(float));
        }
    }
    be->scratch_k = max_k;
    return TUNA_OK;
}

void tuna_cpu_kv_store(tuna_backend *be, void *kcache, void *vcache, enum tuna_dtype kv_dtype, const float *k,
                       const float *v, const int64_t *slot, int64_t T, int64_t HkvD)
{
    /* 16-bit caches: rounded to nearest even, as the GPU's __float2bfloat16_rn / __float2half_rn */
    const size_t esz = tuna_dtype_nbytes(kv_dtype, 1);
    for (int64_t t = 0; t < T; t++) {
        char *kd = (char *)kcache + (size_t)(slot[t] * HkvD) * esz, *vd = (char *)vcache + (size_t)(slot[t] * HkvD) * esz;
        if (kv_dtype == TUNA_DTYPE_F32) {
            memcpy(kd, k + t * HkvD, (size_t)HkvD * sizeof(float));
            memcpy(vd, v + t * HkvD, (size_t)HkvD * sizeof(float));
        } else {
            tuna_convert_from_f32(kv_dtype, k + t * HkvD, kd, (size_t)HkvD);
            tuna_convert_from_f32(kv_dtype, v + t * HkvD, vd, (size_t)HkvD);
        }
    }
    (void)be;
}

void tuna_cpu_add(tuna_backend *be, float *y, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
    (void)be;
}

/* --- memory: plain host memory --- */
static tuna_status cpu_alloc(tuna_backend *be, size_t bytes, void **out)
{
    (void)be;
    *out = malloc(bytes ? bytes : 1);
    return *out ? TUNA_OK : tuna_fail_oom("CPU backend buffer", bytes);
}

static void cpu_release(tuna_backend *be, void *p)
{
    (void)be;
    free(p);
}

static tuna_status cpu_upload(tuna_backend *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    memcpy(dst, src, bytes);
    return TUNA_OK;
}

static void cpu_copy(tuna_backend *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    memmove(dst, src, bytes);
}

static tuna_status cpu_sync(tuna_backend *be)
{
    (void)be;
    return TUNA_OK;
}

static const struct tuna_backend_ops k_cpu_ops = {
    .name = "cpu",
    .matmul = tuna_cpu_matmul,
    .rmsnorm = tuna_cpu_rmsnorm,
    .rope = tuna_cpu_rope,
    .kv_store = tuna_cpu_kv_store,
    .attention = tuna_cpu_attention,
    .glu = tuna_cpu_glu,
    .embedding = tuna_cpu_embedding,
    .add = tuna_cpu_add,
    .lora = tuna_cpu_lora,
    .argmax = tuna_cpu_argmax,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .upload = cpu_upload,
    .download = cpu_upload,
    .copy = cpu_copy,
    .sync = cpu_sync,
    .host_memory = true,
};

const struct tuna_backend_ops *tuna_cpu_backend_ops(void) { return &k_cpu_ops; }
