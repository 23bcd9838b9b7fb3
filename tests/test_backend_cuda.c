/* test_backend_cuda.c — every op of the CUDA backend against the CPU backend (the reference) on
 * random inputs, with sizes that are multiples of no tile (ggml's test-backend-ops idea).
 * Tolerances: float32 paths 1e-5 relative; matmuls through cuBLAS with 16-bit weights round the
 * activations to 16 bits: 1e-2 (bf16) / 2e-3 (f16). Skips without a GPU. */
#include "testutil.h"

#include <math.h>

#include "backend/cpu/cpu.h"
#include "backend/cuda/cuda.h"
#include "backend/cuda/device.h"
#include "core/dtype.h"
#include "quant/nf4.h"

static tuna_backend *g_cpu, *g_gpu;
static const struct tuna_backend_ops *g_cops, *g_gops;
static uint64_t g_rng = 88172645463325252ull;

static float frand(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static float *rnd(size_t n)
{
    float *p = malloc(n * sizeof(float) + 16);
    for (size_t i = 0; i < n; i++) p[i] = frand();
    return p;
}

static void *dev(const void *host, size_t bytes)
{
    void *d;
    TT_OK(tuna_cuda_alloc(g_gpu, bytes, &d));
    if (host) TT_OK(tuna_cuda_upload(g_gpu, d, host, bytes));
    return d;
}

static void back(void *host, const void *d, size_t bytes)
{
    TT_OK(tuna_cuda_sync(g_gpu));
    TT_OK(tuna_cuda_download(g_gpu, host, d, bytes));
}

static void check(const char *what, const float *got, const float *want, size_t n, double tol)
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

static int setup(void **state)
{
    (void)state;
    if (tuna_cuda_device_count() == 0) return 0;
    if (tuna_cpu_backend_new(2, &g_cpu) || tuna_cuda_backend_new(0, &g_gpu)) return -1;
    tuna_cpu_backend_reserve(g_cpu, 8192);
    g_cops = tuna_cpu_backend_ops();
    g_gops = tuna_cuda_backend_ops();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    tuna_cpu_backend_free(g_cpu);
    tuna_cuda_backend_free(g_gpu);
    return 0;
}

#define NEED_GPU()                                                                                                     \
    do {                                                                                                               \
        if (!g_gpu) {                                                                                                  \
            fprintf(stderr, "SKIP: no CUDA device on this machine\n");                                                 \
            skip();                                                                                                    \
        }                                                                                                              \
    } while (0)

static void test_matmul(void **state)
{
    (void)state;
    NEED_GPU();
    const enum tuna_dtype types[] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    const int64_t Ts[] = {1, 3, 8, 9, 33};
    const int64_t NK[][2] = {{1, 8}, {37, 40}, {64, 129}, {256, 1024}, {300, 72}};
    for (size_t ti = 0; ti < 3; ti++) {
        for (size_t s = 0; s < sizeof NK / sizeof NK[0]; s++) {
            int64_t N = NK[s][0], K = NK[s][1];
            float *wf = rnd((size_t)(N * K));
            size_t wbytes = tuna_dtype_nbytes(types[ti], (uint64_t)(N * K));
            void *wh = malloc(wbytes);
            tuna_convert_from_f32(types[ti], wf, wh, (size_t)(N * K));
            struct tuna_weight wc = {types[ti], N, K, wh, NULL};
            struct tuna_weight wg = {types[ti], N, K, dev(wh, wbytes), NULL};
            float *bias = rnd((size_t)N);
            float *dbias = dev(bias, (size_t)N * 4);
            for (size_t tt = 0; tt < sizeof Ts / sizeof Ts[0]; tt++) {
                int64_t T = Ts[tt];
                float *x = rnd((size_t)(T * K));
                float *yc = malloc((size_t)(T * N) * 4), *yg = malloc((size_t)(T * N) * 4);
                float *dx = dev(x, (size_t)(T * K) * 4), *dy = dev(NULL, (size_t)(T * N) * 4);
                g_cops->matmul(g_cpu, yc, x, &wc, (tt & 1) ? bias : NULL, T);
                g_gops->matmul(g_gpu, dy, dx, &wg, (tt & 1) ? dbias : NULL, T);
                back(yg, dy, (size_t)(T * N) * 4);
                char what[128];
                snprintf(what, sizeof what, "matmul %s T=%lld N=%lld K=%lld", tuna_dtype_name(types[ti]),
                         (long long)T, (long long)N, (long long)K);
                double tol = 1e-5;
                if (T > TUNA_CUDA_GEMV_MAX_T && types[ti] == TUNA_DTYPE_BF16) tol = 1e-2;
                if (T > TUNA_CUDA_GEMV_MAX_T && types[ti] == TUNA_DTYPE_F16) tol = 2e-3;
                check(what, yg, yc, (size_t)(T * N), tol);
                tuna_cuda_free(g_gpu, dx);
                tuna_cuda_free(g_gpu, dy);
                free(x);
                free(yc);
                free(yg);
            }
            tuna_cuda_free(g_gpu, (void *)wg.data);
            tuna_cuda_free(g_gpu, dbias);
            free(bias);
            free(wf);
            free(wh);
        }
    }
}

/* 4-bit weights: the CPU matmul on the bitsandbytes state vs the GPU's fused GEMV (T <= 8) and
 * dequantize + cuBLAS path, NF4 and FP4, with the checkpoint dtype float32 and bfloat16. */
static void test_matmul_q4(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t NK[][2] = {{37, 64}, {256, 1024}, {130, 96}, {64, 200}};
    const int64_t Ts[] = {1, 3, 8, 9, 33};
    for (int type = 0; type < 2; type++) {
        for (int od = 0; od < 2; od++) {
            for (size_t s = 0; s < sizeof NK / sizeof NK[0]; s++) {
                int64_t N = NK[s][0], K = NK[s][1];
                float *wf = rnd((size_t)(N * K));
                struct tuna_q4_weight q;
                enum tuna_dtype orig = od ? TUNA_DTYPE_BF16 : TUNA_DTYPE_F32;
                TT_OK(tuna_q4_quantize(wf, TUNA_DTYPE_F32, N, K, type ? TUNA_Q4_FP4 : TUNA_Q4_NF4, 64, true, orig, &q));
                struct tuna_weight wc = {type ? TUNA_DTYPE_FP4 : TUNA_DTYPE_NF4, N, K, q.codes, &q};
                /* the GPU descriptor, with the CPU dequantizer's table (as src/model/device.c) */
                struct tuna_cuda_q4 d;
                tuna_q4_dequant_table(q.type, d.lut);
                d.blocksize = q.blocksize;
                d.round_mode = od ? 1 : 0;
                d.absmax = dev(q.absmax, (size_t)q.n_blocks * 4);
                struct tuna_weight wg = {wc.dtype, N, K, dev(q.codes, (size_t)((N * K + 1) / 2)), &d};
                /* float32 compute: exact kernels; bf16 compute: the fast kernel (absmax factored
                 * out) for T <= 8 and bf16 dequantization + cuBLAS above */
                for (size_t tt = 0; tt < 2 * sizeof Ts / sizeof Ts[0]; tt++) {
                    d.prefill = tt < sizeof Ts / sizeof Ts[0] ? TUNA_DTYPE_F32 : TUNA_DTYPE_BF16;
                    int64_t T = Ts[tt % (sizeof Ts / sizeof Ts[0])];
                    float *x = rnd((size_t)(T * K));
                    float *yc = malloc((size_t)(T * N) * 4), *yg = malloc((size_t)(T * N) * 4);
                    float *dx = dev(x, (size_t)(T * K) * 4), *dy = dev(NULL, (size_t)(T * N) * 4);
                    g_cops->matmul(g_cpu, yc, x, &wc, NULL, T);
                    g_gops->matmul(g_gpu, dy, dx, &wg, NULL, T);
                    back(yg, dy, (size_t)(T * N) * 4);
                    char what[160];
                    snprintf(what, sizeof what, "matmul %s (from %s, %s compute) T=%lld N=%lld K=%lld",
                             type ? "FP4" : "NF4", od ? "bf16" : "f32", tuna_dtype_name(d.prefill), (long long)T,
                             (long long)N, (long long)K);
                    double tol = 1e-5;
                    if (d.prefill == TUNA_DTYPE_BF16) tol = T > TUNA_CUDA_GEMV_MAX_T ? 1e-2 : 2e-3;
                    check(what, yg, yc, (size_t)(T * N), tol);
                    tuna_cuda_free(g_gpu, dx);
                    tuna_cuda_free(g_gpu, dy);
                    free(x), free(yc), free(yg);
                }
                tuna_cuda_free(g_gpu, (void *)wg.data);
                tuna_cuda_free(g_gpu, (void *)d.absmax);
                tuna_q4_weight_free(&q);
                free(wf);
            }
        }
    }
}

/* LoRA: tokens of one batch on adapter 0, adapter 1 (another rank) or none. */
static void test_lora(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 11, N = 300, K = 136;
    const int64_t ranks[2] = {8, 16};
    struct tuna_lora hc[2], hg[2];
    for (int a = 0; a < 2; a++) {
        float *A = rnd((size_t)(ranks[a] * K)), *B = rnd((size_t)(N * ranks[a]));
        hc[a] = (struct tuna_lora){ranks[a], A, B, a ? 0.25f : 2.0f};
        hg[a] = (struct tuna_lora){ranks[a], dev(A, (size_t)(ranks[a] * K) * 4), dev(B, (size_t)(N * ranks[a]) * 4),
                                   hc[a].scale};
    }
    int32_t idx[11] = {0, 1, -1, 1, 0, 0, -1, 1, 1, 0, 5};
    float *x = rnd((size_t)(T * K)), *y0 = rnd((size_t)(T * N));
    float *yc = malloc((size_t)(T * N) * 4), *yg = malloc((size_t)(T * N) * 4);
    memcpy(yc, y0, (size_t)(T * N) * 4);
    float *dx = dev(x, (size_t)(T * K) * 4), *dy = dev(y0, (size_t)(T * N) * 4);
    g_cops->lora(g_cpu, yc, x, T, N, K, hc, 2, idx);
    g_gops->lora(g_gpu, dy, dx, T, N, K, hg, 2, idx);
    back(yg, dy, (size_t)(T * N) * 4);
    check("lora (mixed adapters)", yg, yc, (size_t)(T * N), 1e-5);
    /* tokens without an adapter are untouched */
    assert_memory_equal(yg + 2 * N, y0 + 2 * N, (size_t)N * 4);
    for (int a = 0; a < 2; a++) {
        free((void *)hc[a].A), free((void *)hc[a].B);
        tuna_cuda_free(g_gpu, (void *)hg[a].A), tuna_cuda_free(g_gpu, (void *)hg[a].B);
    }
    free(x), free(y0), free(yc), free(yg);
    tuna_cuda_free(g_gpu, dx), tuna_cuda_free(g_gpu, dy);
}

/* argmax: random rows of odd width (wider than one block's stride), crafted ties (the lowest
 * index must win across threads and warps), NaN first (0) and elsewhere (skipped), all -inf. */
static void test_argmax(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 13, V = 128259;
    float *x = rnd((size_t)(T * V));
    for (int64_t i = 0; i < V; i++) x[1 * V + i] = 0.5f;           /* all equal: 0 */
    x[2 * V + 70001] = 3.0f, x[2 * V + 5] = 3.0f, x[2 * V + 99999] = 3.0f; /* ties in far apart threads */
    x[3 * V + 0] = NAN;                                               /* NaN first: 0 */
    x[4 * V + 7] = NAN, x[4 * V + 8] = 2.0f;                          /* NaN skipped */
    for (int64_t i = 0; i < V; i++) x[5 * V + i] = -INFINITY;        /* all -inf: 0 */
    x[5 * V + V - 1] = -1.0f;
    for (int64_t i = 0; i < V; i++) x[6 * V + i] = (float)(i % 1000); /* 128 tied maxima */
    int32_t want[13], got[13];
    TT_OK(g_cops->argmax(g_cpu, want, x, T, V));
    assert_int_equal(want[1], 0);
    assert_int_equal(want[2], 5);
    assert_int_equal(want[3], 0);
    assert_int_equal(want[4], 8);
    assert_int_equal(want[5], V - 1);
    assert_int_equal(want[6], 999);
    float *dx = dev(x, (size_t)(T * V) * 4);
    memset(got, 0xff, sizeof got);
    TT_OK(g_gops->argmax(g_gpu, got, dx, T, V));
    for (int64_t t = 0; t < T; t++) {
        if (got[t] != want[t]) {
            print_error("argmax row %lld: GPU %d, CPU %d\n", (long long)t, got[t], want[t]);
            fail();
        }
    }
    TT_OK(g_gops->argmax(g_gpu, got, dx, 1, 1)); /* V = 1 */
    assert_int_equal(got[0], 0);
    free(x);
    tuna_cuda_free(g_gpu, dx);
}

static void test_elementwise(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t T = 7, C = 333;
    size_t n = (size_t)(T * C);
    float *x = rnd(n), *w = rnd((size_t)C), *g = rnd(n), *u = rnd(n);
    float *yc = malloc(n * 4), *yg = malloc(n * 4);
    float *dx = dev(x, n * 4), *dw = dev(w, (size_t)C * 4), *dy = dev(NULL, n * 4);
    float *dg = dev(g, n * 4), *du = dev(u, n * 4);

    g_cops->rmsnorm(g_cpu, yc, x, w, T, C, 1e-5f);
    g_gops->rmsnorm(g_gpu, dy, dx, dw, T, C, 1e-5f);
    back(yg, dy, n * 4);
    check("rmsnorm", yg, yc, n, 1e-5);

    for (int act = 0; act < 3; act++) {
        g_cops->glu(g_cpu, yc, g, u, (int64_t)n, act);
        g_gops->glu(g_gpu, dy, dg, du, (int64_t)n, act);
        back(yg, dy, n * 4);
        check(act == 0 ? "glu silu" : act == 1 ? "glu gelu_tanh" : "glu gelu", yg, yc, n, 1e-5);
    }

    memcpy(yc, x, n * 4);
    g_cops->add(g_cpu, yc, g, (int64_t)n);
    TT_OK(tuna_cuda_upload(g_gpu, dy, x, n * 4));
    g_gops->add(g_gpu, dy, dg, (int64_t)n);
    back(yg, dy, n * 4);
    check("add", yg, yc, n, 1e-7);

    /* embedding from a bf16 table */
    const int64_t V = 50;
    float *ef = rnd((size_t)(V * C));
    uint16_t *eh = malloc((size_t)(V * C) * 2);
    tuna_convert_from_f32(TUNA_DTYPE_BF16, ef, eh, (size_t)(V * C));
    struct tuna_weight ec = {TUNA_DTYPE_BF16, V, C, eh, NULL};
    struct tuna_weight eg = {TUNA_DTYPE_BF16, V, C, dev(eh, (size_t)(V * C) * 2), NULL};
    int32_t ids[7] = {0, 49, 3, 3, 17, 25, 1};
    g_cops->embedding(g_cpu, yc, ids, T, &ec, 11.3137f);
    g_gops->embedding(g_gpu, dy, ids, T, &eg, 11.3137f);
    back(yg, dy, n * 4);
    check("embedding", yg, yc, n, 1e-7);

    /* rope: 5 heads of 48 dims, 32 rotated (partial), with an attention factor */
    const int64_t H = 5, D = 48, rot = 32;
    size_t nq = (size_t)(T * H * D);
    float *q = rnd(nq), *inv = malloc((size_t)rot / 2 * 4);
    for (int64_t i = 0; i < rot / 2; i++) inv[i] = powf(10000.0f, -2.0f * (float)i / (float)rot);
    int64_t pos[7] = {0, 1, 2, 100, 4095, 17, 9};
    float *qc = malloc(nq * 4), *qg = malloc(nq * 4);
    memcpy(qc, q, nq * 4);
    float *dq = dev(q, nq * 4);
    g_cops->rope(g_cpu, qc, pos, T, H, D, rot, inv, 1.1f);
    g_gops->rope(g_gpu, dq, pos, T, H, D, rot, inv, 1.1f);
    back(qg, dq, nq * 4);
    check("rope", qg, qc, nq, 1e-5);

    free(x), free(w), free(g), free(u), free(yc), free(yg), free(ef), free(eh), free(q), free(inv), free(qc), free(qg);
    tuna_cuda_free(g_gpu, dx), tuna_cuda_free(g_gpu, dw), tuna_cuda_free(g_gpu, dy), tuna_cuda_free(g_gpu, dg);
    tuna_cuda_free(g_gpu, du), tuna_cuda_free(g_gpu, (void *)eg.data), tuna_cuda_free(g_gpu, dq);
}

/* Paged attention: three sequences with scrambled block tables, prefill and decode rows mixed,
 * GQA, with and without a sliding window, head dims 64 and 80 and 256. */
static void test_attention(void **state)
{
    (void)state;
    NEED_GPU();
    const int32_t bs = 16;
    const int64_t n_blocks = 64, slots = n_blocks * bs;
    const int64_t Ds[] = {64, 80, 256};
    for (size_t di = 0; di < 3; di++) {
        const int64_t H = 6, Hkv = 2, D = Ds[di], HkvD = Hkv * D;
        float *kc = rnd((size_t)(slots * HkvD)), *vc = rnd((size_t)(slots * HkvD));
        float *dkc = dev(kc, (size_t)(slots * HkvD) * 4), *dvc = dev(vc, (size_t)(slots * HkvD) * 4);
        /* block tables: a permutation of the blocks split between sequences */
        int32_t perm[64];
        for (int i = 0; i < 64; i++) perm[i] = (int32_t)((i * 37 + 11) % 64);
        const int32_t *tabs[3] = {perm, perm + 20, perm + 40};
        /* seq 0: 5 prefill tokens at 0..4; seq 1: one decode at 300; seq 2: 3 tokens at 150..152 */
        int64_t pos[9] = {0, 1, 2, 3, 4, 300, 150, 151, 152};
        const int32_t *bt[9];
        for (int i = 0; i < 9; i++) bt[i] = i < 5 ? tabs[0] : i == 5 ? tabs[1] : tabs[2];
        const int64_t T = 9;
        size_t nq = (size_t)(T * H * D);
        float *q = rnd(nq), *oc = malloc(nq * 4), *og = malloc(nq * 4);
        float *dq = dev(q, nq * 4), *dout = dev(NULL, nq * 4);
        for (int win = 0; win < 2; win++) {
            struct tuna_attn_batch b = {T, pos, bt, bs, win ? 100 : 0, 64, NULL};
            float scale = 1.0f / sqrtf((float)D);
            g_cops->attention(g_cpu, oc, q, kc, vc, TUNA_DTYPE_F32, &b, H, Hkv, D, scale);
            g_gops->attention(g_gpu, dout, dq, dkc, dvc, TUNA_DTYPE_F32, &b, H, Hkv, D, scale);
            back(og, dout, nq * 4);
            char what[64];
            snprintf(what, sizeof what, "attention D=%lld window=%d", (long long)D, win ? 100 : 0);
            check(what, og, oc, nq, 1e-5);
        }
        /* kv_store into scattered slots */
        int64_t slot[9] = {5, 700, 33, 1023, 0, 512, 77, 78, 79};
        float *k = rnd((size_t)(T * HkvD)), *v = rnd((size_t)(T * HkvD));
        float *dk = dev(k, (size_t)(T * HkvD) * 4), *dv = dev(v, (size_t)(T * HkvD) * 4);
        g_cops->kv_store(g_cpu, kc, vc, TUNA_DTYPE_F32, k, v, slot, T, HkvD);
        g_gops->kv_store(g_gpu, dkc, dvc, TUNA_DTYPE_F32, dk, dv, slot, T, HkvD);
        float *kg = malloc((size_t)(slots * HkvD) * 4);
        back(kg, dkc, (size_t)(slots * HkvD) * 4);
        check("kv_store k", kg, kc, (size_t)(slots * HkvD), 0);
        back(kg, dvc, (size_t)(slots * HkvD) * 4);
        check("kv_store v", kg, vc, (size_t)(slots * HkvD), 0);
        free(kc), free(vc), free(q), free(oc), free(og), free(k), free(v), free(kg);
        tuna_cuda_free(g_gpu, dkc), tuna_cuda_free(g_gpu, dvc), tuna_cuda_free(g_gpu, dq);
        tuna_cuda_free(g_gpu, dout), tuna_cuda_free(g_gpu, dk), tuna_cuda_free(g_gpu, dv);
    }
    TT_OK(tuna_cuda_status(g_gpu));
}

/* A failed call makes the backend sticky-unusable with a message naming the call. */
static void test_sticky_error(void **state)
{
    (void)state;
    NEED_GPU();
    tuna_backend *be;
    TT_OK(tuna_cuda_backend_new(0, &be));
    struct tuna_weight w = {TUNA_DTYPE_I32, 4, 4, NULL, NULL};
    tuna_cuda_backend_ops()->matmul(be, NULL, NULL, &w, NULL, 1);
    TT_FAILS(tuna_cuda_status(be), TUNA_E_CUDA, "matmul");
    TT_FAILS(tuna_cuda_sync(be), TUNA_E_CUDA, "GPU engine stopped");
    tuna_cuda_backend_free(be);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_q4),
        cmocka_unit_test(test_lora),
        cmocka_unit_test(test_argmax),
        cmocka_unit_test(test_elementwise),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_sticky_error),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
