/* test_backend_cpu.c — every CPU op against a naive double-precision version of its definition,
 * with odd sizes (not multiples of the vector width, the tile height or the task size), both
 * matmul paths (few tokens / tiled sgemm), every weight dtype, and 1 or 3 threads. */
#include "testutil.h"

#include <math.h>

#include "backend/cpu/cpu.h"
#include "core/dtype.h"
#include "io/hf_config.h"

static uint64_t g_rng = 12345;
static float frand(void) /* uniform in [-1, 1) */
{
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(g_rng >> 11) * 0x1.0p-53 * 2 - 1);
}

static void test_matmul(void **state)
{
    (void)state;
    const enum tuna_dtype dts[3] = {TUNA_DTYPE_BF16, TUNA_DTYPE_F16, TUNA_DTYPE_F32};
    const int64_t Ts[4] = {1, 3, 5, 37}, NK[2][2] = {{131, 77}, {517, 300}}; /* small ones run inline */
    for (int th = 1; th <= 3; th += 2)
    for (int sz = 0; sz < 2; sz++) {
        const int64_t N = NK[sz][0], K = NK[sz][1];
        tuna_backend *be;
        TT_OK(tuna_cpu_backend_new(th, &be));
        TT_OK(tuna_cpu_backend_reserve(be, K));
        if (th == 3) tuna_cpu_backend_set_min_parallel(be, 0);
        const struct tuna_backend_ops *op = tuna_cpu_backend_ops();
        for (int di = 0; di < 3; di++)
            for (int ti = 0; ti < 4; ti++) {
                int64_t T = Ts[ti];
                float *wf = malloc(sizeof(float) * N * K), *x = malloc(sizeof(float) * T * K);
                float *y = malloc(sizeof(float) * T * N), *ref = malloc(sizeof(float) * T * N), bias[517];
                void *wd = malloc(8 * N * K);
                for (int64_t i = 0; i < N * K; i++) wf[i] = frand();
                for (int64_t i = 0; i < T * K; i++) x[i] = frand();
                for (int64_t i = 0; i < N; i++) bias[i] = frand();
                /* stored weights, and the float values they hold */
                assert_true(tuna_convert_from_f32(dts[di], wf, wd, (size_t)(N * K)));
                assert_true(tuna_convert_to_f32(dts[di], wd, wf, (size_t)(N * K)));
                for (int64_t t = 0; t < T; t++)
                    for (int64_t n = 0; n < N; n++) {
                        double s = bias[n];
                        for (int64_t k = 0; k < K; k++) s += (double)x[t * K + k] * wf[n * K + k];
                        ref[t * N + n] = (float)s;
                    }
                struct tuna_weight w = {dts[di], N, K, wd, NULL, 0};
                op->matmul(be, y, x, &w, bias, T);
                double e = tt_rel_err(y, ref, (size_t)(T * N));
                if (e > 1e-6) print_error("matmul %s T=%lld N=%lld K=%lld threads=%d: rel err %g\n",
                                          tuna_dtype_name(dts[di]), (long long)T, (long long)N, (long long)K, th, e);
                assert_true(e < 1e-6);
                free(wf);
                free(x);
                free(y);
                free(ref);
                free(wd);
            }
        tuna_cpu_backend_free(be);
    }
}

static void test_rmsnorm_glu_embedding(void **state)
{
    (void)state;
    tuna_backend *be;
    TT_OK(tuna_cpu_backend_new(2, &be));
    const struct tuna_backend_ops *op = tuna_cpu_backend_ops();
    enum { T = 3, C = 45 };
    float x[T * C], w[C], y[T * C];
    for (int i = 0; i < T * C; i++) x[i] = frand() * 3;
    for (int i = 0; i < C; i++) w[i] = frand();
    op->rmsnorm(be, y, x, w, T, C, 1e-5f);
    for (int t = 0; t < T; t++) {
        double ss = 0;
        for (int i = 0; i < C; i++) ss += (double)x[t * C + i] * x[t * C + i];
        double r = 1 / sqrt(ss / C + 1e-5);
        for (int i = 0; i < C; i++) assert_true(fabs(y[t * C + i] - w[i] * x[t * C + i] * r) < 1e-5);
    }
    float g[C], u[C], o[C];
    for (int i = 0; i < C; i++) {
        g[i] = frand() * 6;
        u[i] = frand();
    }
    op->glu(be, o, g, u, C, TUNA_ACT_SILU);
    for (int i = 0; i < C; i++) assert_true(fabs(o[i] - g[i] / (1 + exp(-g[i])) * u[i]) < 1e-6);
    op->glu(be, o, g, u, C, TUNA_ACT_GELU_TANH);
    for (int i = 0; i < C; i++) {
        double v = g[i], ref = 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))) * u[i];
        assert_true(fabs(o[i] - ref) < 1e-6);
    }
    op->glu(be, o, g, u, C, TUNA_ACT_GELU);
    for (int i = 0; i < C; i++) assert_true(fabs(o[i] - 0.5 * g[i] * (1 + erf(g[i] / sqrt(2.0))) * u[i]) < 1e-6);
    /* embedding: bf16 rows, scaled */
    uint16_t emb[5 * 7];
    for (int i = 0; i < 35; i++) emb[i] = tuna_f32_to_bf16(frand());
    struct tuna_weight ew = {TUNA_DTYPE_BF16, 5, 7, emb, NULL, 0};
    int32_t ids[3] = {4, 0, 4};
    float e[21];
    op->embedding(be, e, ids, 3, &ew, 2.0f);
    for (int t = 0; t < 3; t++)
        for (int i = 0; i < 7; i++) assert_true(e[t * 7 + i] == 2.0f * tuna_bf16_to_f32(emb[ids[t] * 7 + i]));
    tuna_cpu_backend_free(be);
}

/* x as a KV cache of dtype dt stores it */
static double kv_round(enum tuna_dtype dt, float x)
{
    if (dt == TUNA_DTYPE_BF16) return tuna_bf16_to_f32(tuna_f32_to_bf16(x));
    if (dt == TUNA_DTYPE_F16) return tuna_f16_to_f32(tuna_f32_to_f16(x));
    return x;
}

/* Attention over a scrambled block table against a dense softmax, GQA 6 heads over 2, with a
 * float32, bf16 and f16 cache (the reference reads the values the 16-bit caches hold). */
static void test_attention(void **state)
{
    (void)state;
    tuna_backend *be;
    TT_OK(tuna_cpu_backend_new(3, &be));
    tuna_cpu_backend_set_min_parallel(be, 0); /* threads even for this small case */
    const struct tuna_backend_ops *op = tuna_cpu_backend_ops();
    enum { H = 6, Hkv = 2, D = 20, BS = 3, L = 150, NB = 53 }; /* L spans several 64-position chunks */
    int32_t table[NB];
    for (int i = 0; i < NB; i++) table[i] = (int32_t)((i * 7) % NB); /* scrambled blocks */
    float *kc = calloc(NB * BS * Hkv * D, sizeof(float)), *vc = calloc(NB * BS * Hkv * D, sizeof(float));
    static float k[L][Hkv * D], v[L][Hkv * D], q[L][H * D], out[L][H * D];
    int64_t slot[L], pos[L];
    const int32_t *bts[L];
    for (int p = 0; p < L; p++) {
        for (int i = 0; i < Hkv * D; i++) {
            k[p][i] = frand();
            v[p][i] = frand();
        }
        for (int i = 0; i < H * D; i++) q[p][i] = frand() * 2;
        slot[p] = table[p / BS] * BS + p % BS;
        pos[p] = p;
        bts[p] = table;
    }
    const enum tuna_dtype dts[3] = {TUNA_DTYPE_F32, TUNA_DTYPE_BF16, TUNA_DTYPE_F16};
    for (int di = 0; di < 3; di++)
    for (int window = 0; window <= 70; window += 70) {
        const enum tuna_dtype dt = dts[di];
        op->kv_store(be, kc, vc, dt, &k[0][0], &v[0][0], slot, L, Hkv * D);
        if (dt != TUNA_DTYPE_F32) { /* the stored bits are the rounded values */
            const uint16_t *kh = (const uint16_t *)kc;
            uint16_t want = dt == TUNA_DTYPE_BF16 ? tuna_f32_to_bf16(k[5][3]) : tuna_f32_to_f16(k[5][3]);
            assert_int_equal(kh[slot[5] * Hkv * D + 3], want);
        }
        struct tuna_attn_batch b = {L, pos, bts, BS, window, NB, NULL};
        float scale = 1.0f / sqrtf(D);
        op->attention(be, &out[0][0], &q[0][0], kc, vc, dt, &b, H, Hkv, D, scale);
        double worst = 0;
        for (int t = 0; t < L; t++)
            for (int h = 0; h < H; h++) {
                int kvh = h / (H / Hkv), start = window && t - window + 1 > 0 ? t - window + 1 : 0;
                double s[L], mx = -1e300, z = 0;
                for (int p = start; p <= t; p++) {
                    double d = 0;
                    for (int i = 0; i < D; i++) d += (double)q[t][h * D + i] * kv_round(dt, k[p][kvh * D + i]);
                    s[p] = d * scale;
                    mx = s[p] > mx ? s[p] : mx;
                }
                for (int p = start; p <= t; p++) z += exp(s[p] - mx);
                for (int i = 0; i < D; i++) {
                    double o = 0;
                    for (int p = start; p <= t; p++) o += exp(s[p] - mx) / z * kv_round(dt, v[p][kvh * D + i]);
                    double e = fabs(o - out[t][h * D + i]);
                    worst = e > worst ? e : worst;
                }
            }
        printf("  attention %s cache, window %d: max abs err %.2e\n", tuna_dtype_name(dt), window, worst);
        assert_true(worst < 1e-5);
    }
    free(kc);
    free(vc);
    tuna_cpu_backend_free(be);
}

static void test_bad_threads(void **state)
{
    (void)state;
    tuna_backend *be;
    TT_FAILS(tuna_cpu_backend_new(5000, &be), TUNA_E_INVALID, "thread count");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_rmsnorm_glu_embedding),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_bad_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
