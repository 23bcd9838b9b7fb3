/* test_cuda_fused.c — the CUDA backend's optional fused ops (fused.cu) against the composition
 * of the CPU backend's plain ops: matmul_multi (q/k/v in one launch), matmul_glu (gate/up + GLU)
 * and matmul_add (projection into the residual). bf16/f16 weights run the grouped GEMV for
 * T <= 8 and the unfused fallback above; float32 weights always the fallback. Sizes and
 * alignments that are multiples of no tile. Skips without a GPU. */
#define CT_RNG_SEED 0x9E3779B97F4A7C15ull
#include "cuda_testutil.h"

#include "core/dtype.h"

static const struct tuna_backend_ops *g_cops, *g_gops;

static int setup(void **state)
{
    (void)state;
    g_cops = tuna_cpu_backend_ops();
    g_gops = tuna_cuda_backend_ops();
    return ct_backends_new();
}

static int teardown(void **state)
{
    (void)state;
    ct_backends_free();
    return 0;
}

/* A weight on both sides: host copy in dtype, device copy. */
struct wpair {
    struct tuna_weight c, g;
    float *bias, *dbias;
};

static void wpair_new(struct wpair *p, enum tuna_dtype dt, int64_t N, int64_t K, bool bias)
{
    float *wf = rnd((size_t)(N * K));
    size_t bytes = tuna_dtype_nbytes(dt, (uint64_t)(N * K));
    void *wh = malloc(bytes);
    assert_non_null(wh);
    tuna_convert_from_f32(dt, wf, wh, (size_t)(N * K));
    free(wf);
    p->c = (struct tuna_weight){dt, N, K, wh, NULL};
    p->g = (struct tuna_weight){dt, N, K, dev(wh, bytes), NULL};
    p->bias = bias ? rnd((size_t)N) : NULL;
    p->dbias = bias ? dev(p->bias, (size_t)N * 4) : NULL;
}

static void wpair_free(struct wpair *p)
{
    free((void *)p->c.data);
    tuna_cuda_free(g_gpu, (void *)p->g.data);
    free(p->bias);
    tuna_cuda_free(g_gpu, p->dbias);
}

static const enum tuna_dtype k_types[] = {TUNA_DTYPE_BF16, TUNA_DTYPE_F16, TUNA_DTYPE_F32};
static const int64_t k_Ts[] = {1, 2, 5, 8, 9, 20};

/* bf16/f16 above T = 8 go through cuBLAS with 16-bit activations */
static double tol_for(enum tuna_dtype dt, int64_t T)
{
    if (T > tuna_cuda_gemv_max_t16() && dt == TUNA_DTYPE_BF16) return 1e-2;
    if (T > tuna_cuda_gemv_max_t16() && dt == TUNA_DTYPE_F16) return 2e-3;
    return 1e-5;
}

static void test_matmul_multi(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][4] = {{3, 40, 24, 24}, {64, 136, 16, 16}, {300, 1024, 100, 100}, {17, 8, 5, 9}};
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < 4; si++) {
            int64_t K = shapes[si][1], N[3] = {shapes[si][0], shapes[si][2], shapes[si][3]};
            struct wpair w[3];
            for (int i = 0; i < 3; i++) wpair_new(&w[i], k_types[ti], N[i], K, si & 1);
            for (size_t tt = 0; tt < sizeof k_Ts / sizeof k_Ts[0]; tt++) {
                int64_t T = k_Ts[tt];
                float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                float *yc[3], *dy[3];
                for (int i = 0; i < 3; i++) {
                    yc[i] = malloc((size_t)(T * N[i]) * 4);
                    dy[i] = dev(NULL, (size_t)(T * N[i]) * 4);
                    g_cops->matmul(g_cpu, yc[i], x, &w[i].c, w[i].bias, T);
                }
                const struct tuna_weight *ws[3] = {&w[0].g, &w[1].g, &w[2].g};
                const float *bs[3] = {w[0].dbias, w[1].dbias, w[2].dbias};
                g_gops->matmul_multi(g_gpu, 3, dy, dx, ws, bs, T);
                for (int i = 0; i < 3; i++) {
                    float *yg = malloc((size_t)(T * N[i]) * 4);
                    back(yg, dy[i], (size_t)(T * N[i]) * 4);
                    char what[160];
                    snprintf(what, sizeof what, "matmul_multi %s T=%lld weight %d [%lld, %lld]",
                             tuna_dtype_name(k_types[ti]), (long long)T, i, (long long)N[i], (long long)K);
                    check(what, yg, yc[i], (size_t)(T * N[i]), tol_for(k_types[ti], T));
                    free(yg);
                    free(yc[i]);
                    tuna_cuda_free(g_gpu, dy[i]);
                }
                free(x);
                tuna_cuda_free(g_gpu, dx);
            }
            for (int i = 0; i < 3; i++) wpair_free(&w[i]);
        }
}

static void test_matmul_glu(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][2] = {{37, 40}, {300, 136}, {1000, 512}};
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < 3; si++)
            for (int act = 0; act < 3; act++) {
                int64_t I = shapes[si][0], K = shapes[si][1];
                struct wpair g, u;
                wpair_new(&g, k_types[ti], I, K, act == 1);
                wpair_new(&u, k_types[ti], I, K, act == 1);
                for (size_t tt = 0; tt < sizeof k_Ts / sizeof k_Ts[0]; tt++) {
                    int64_t T = k_Ts[tt];
                    float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                    float *gc = malloc((size_t)(T * I) * 4), *uc = malloc((size_t)(T * I) * 4);
                    float *og = malloc((size_t)(T * I) * 4), *dout = dev(NULL, (size_t)(T * I) * 4);
                    g_cops->matmul(g_cpu, gc, x, &g.c, g.bias, T);
                    g_cops->matmul(g_cpu, uc, x, &u.c, u.bias, T);
                    g_cops->glu(g_cpu, gc, gc, uc, T * I, act);
                    g_gops->matmul_glu(g_gpu, dout, dx, &g.g, g.dbias, &u.g, u.dbias, T, act);
                    back(og, dout, (size_t)(T * I) * 4);
                    char what[160];
                    snprintf(what, sizeof what, "matmul_glu %s act %d T=%lld [%lld, %lld]", tuna_dtype_name(k_types[ti]),
                             act, (long long)T, (long long)I, (long long)K);
                    check(what, og, gc, (size_t)(T * I), 2 * tol_for(k_types[ti], T));
                    free(x);
                    free(gc);
                    free(uc);
                    free(og);
                    tuna_cuda_free(g_gpu, dx);
                    tuna_cuda_free(g_gpu, dout);
                }
                wpair_free(&g);
                wpair_free(&u);
            }
}

static void test_matmul_add(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][2] = {{37, 40}, {256, 1032}, {129, 8}};
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < 3; si++) {
            int64_t N = shapes[si][0], K = shapes[si][1];
            struct wpair w;
            wpair_new(&w, k_types[ti], N, K, si == 1);
            for (size_t tt = 0; tt < sizeof k_Ts / sizeof k_Ts[0]; tt++) {
                int64_t T = k_Ts[tt];
                float *x = rnd((size_t)(T * K)), *dx = dev(x, (size_t)(T * K) * 4);
                float *y = rnd((size_t)(T * N)), *dy = dev(y, (size_t)(T * N) * 4);
                float *tmp = malloc((size_t)(T * N) * 4), *yg = malloc((size_t)(T * N) * 4);
                g_cops->matmul(g_cpu, tmp, x, &w.c, w.bias, T);
                g_cops->add(g_cpu, y, tmp, T * N);
                g_gops->matmul_add(g_gpu, dy, dx, &w.g, w.dbias, T);
                back(yg, dy, (size_t)(T * N) * 4);
                char what[160];
                snprintf(what, sizeof what, "matmul_add %s T=%lld [%lld, %lld]", tuna_dtype_name(k_types[ti]),
                         (long long)T, (long long)N, (long long)K);
                check(what, yg, y, (size_t)(T * N), tol_for(k_types[ti], T));
                free(x);
                free(y);
                free(tmp);
                free(yg);
                tuna_cuda_free(g_gpu, dx);
                tuna_cuda_free(g_gpu, dy);
            }
            wpair_free(&w);
        }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_multi),
        cmocka_unit_test(test_matmul_glu),
        cmocka_unit_test(test_matmul_add),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
