/* cuda_testutil.h — what every "CUDA op against the CPU op" test needs: a CPU and a GPU backend
 * (ct_backends_new / ct_backends_free in the cmocka group fixtures; g_gpu stays NULL without a
 * GPU and NEED_GPU() then skips), random inputs, device copies and the relative-error check.
 * Define CT_RNG_SEED before including it to give a test file its own random data. */
#ifndef TUNA_TESTS_CUDA_TESTUTIL_H
#define TUNA_TESTS_CUDA_TESTUTIL_H

#include "testutil.h"

#include <math.h>

#include "backend/cpu/cpu.h"
#include "backend/cuda/cuda.h"
#include "backend/cuda/device.h"

#ifndef CT_RNG_SEED
#define CT_RNG_SEED 88172645463325252ull
#endif

static tuna_backend *g_cpu, *g_gpu;
static uint64_t g_rng = CT_RNG_SEED;

/* uniform in [-1, 1) (xorshift64) */
static inline float frand(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static inline float *rnd(size_t n)
{
    float *p = malloc(n * sizeof(float) + 16);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = frand();
    return p;
}

/* a device buffer of `bytes` (at least 4), holding a copy of `host` when given */
static inline void *dev(const void *host, size_t bytes)
{
    void *d;
    TT_OK(tuna_cuda_alloc(g_gpu, bytes ? bytes : 4, &d));
    if (host && bytes) TT_OK(tuna_cuda_upload(g_gpu, d, host, bytes));
    return d;
}

/* waits for the GPU, then copies `bytes` of d into host */
static inline void back(void *host, const void *d, size_t bytes)
{
    TT_OK(tuna_cuda_sync(g_gpu));
    TT_OK(tuna_cuda_download(g_gpu, host, d, bytes));
}

/* every element finite and the relative error of the whole array within tol */
static inline void check(const char *what, const float *got, const float *want, size_t n, double tol)
{
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) {
            print_error("%s: element %zu is %f\n", what, i, got[i]);
            fail();
        }
    }
    double e = tt_rel_err(got, want, n);
    if (!(e <= tol)) {
        print_error("%s: relative error %.3g over %.1g\n", what, e, tol);
        fail();
    }
}

/* 0 with both backends (or none without a GPU), -1 when a backend cannot be made */
static inline int ct_backends_new(void)
{
    if (tuna_cuda_device_count() == 0) return 0;
    if (tuna_cpu_backend_new(2, &g_cpu) || tuna_cuda_backend_new(0, &g_gpu)) return -1;
    tuna_cpu_backend_reserve(g_cpu, 8192);
    return 0;
}

static inline void ct_backends_free(void)
{
    tuna_cpu_backend_free(g_cpu);
    tuna_cuda_backend_free(g_gpu);
    g_cpu = g_gpu = NULL;
}

/* The op tables of both backends, and the cmocka group fixtures of an op-table test: both
 * backends made in ct_ops_setup, freed in ct_ops_teardown. */
static const struct tuna_backend_ops *g_cops, *g_gops;

static inline int ct_ops_setup(void **state)
{
    (void)state;
    g_cops = tuna_cpu_backend_ops();
    g_gops = tuna_cuda_backend_ops();
    return ct_backends_new();
}

static inline int ct_ops_teardown(void **state)
{
    (void)state;
    ct_backends_free();
    return 0;
}

#define NEED_GPU()                                                                                                     \
    do {                                                                                                               \
        if (!g_gpu) {                                                                                                  \
            fprintf(stderr, "SKIP: no CUDA device on this machine\n");                                                 \
            skip();                                                                                                    \
        }                                                                                                              \
    } while (0)

#endif
