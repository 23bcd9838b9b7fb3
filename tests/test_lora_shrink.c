/* test_lora_shrink.c — k_lora_shrink2 (src/backend/cuda/lora_shrink.cu, TUNA_LORA_SHRINK2) against
 * the dense form's definition on the CPU: hm[t, col] = (x16[t] . A[col]) * scale of the token's
 * slot, rounded once to 16 bits, where the token's slot holds the column within its rank; exactly
 * 0 elsewhere; columns outside the call untouched. The GPU sums in float32 in its own order, so a
 * kept value may sit one 16-bit ulp from the CPU's (double sums): each must be within that, and
 * nearly all equal. Every tile width and K split (1..16 CTAs per cluster, empty splits included),
 * partial token and column tiles, K not a multiple of the 64-wide k tiles, ranks below the slot
 * width, tokens without an adapter or past a linear's slots, f16; the same bits on a second run
 * and replayed from a CUDA graph; the arguments it refuses. Skips without a GPU of compute
 * capability 9.0+. */
#include "cuda_testutil.h"

#include <cuda_runtime_api.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cuda/lora_shrink.h"
#include "core/dtype.h"

#define SENT 0x7777u /* hm's preset: columns outside the call must keep it */

struct lin_spec {
    int n, rs;
};

static uint16_t to16(int dt, float v) { return dt == 1 ? tuna_f32_to_bf16(v) : tuna_f32_to_f16(v); }
static float from16(int dt, uint16_t h) { return dt == 1 ? tuna_bf16_to_f32(h) : tuna_f16_to_f32(h); }

static bool sm90(void)
{
    struct cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess || p.major < 9) {
        printf("SKIP: k_lora_shrink2 needs compute capability 9.0+\n");
        return false;
    }
    return true;
}

/* hm of one launch (host copy of the whole [T, RU]); graph: captured on a stream and replayed */
static void launch(uint16_t *out, void *d_hm, const uint16_t *preset, int dt, int RU, const void *d_x, int64_t K,
                   const void *d_A, int c0, int M, int64_t T, const int32_t *d_ad, const struct tuna_shrink_lin *lins,
                   int nl, int bn, int cs, bool graph)
{
    const size_t bytes = (size_t)T * (size_t)RU * 2;
    assert_int_equal(cudaMemcpy(d_hm, preset, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    if (!graph) {
        assert_int_equal(tuna_cuda_shrink2(NULL, false, dt, d_hm, RU, d_x, K, d_A, c0, M, T, d_ad, lins, nl, bn, cs),
                         cudaSuccess);
    } else {
        cudaStream_t st;
        cudaGraph_t g;
        cudaGraphExec_t x;
        assert_int_equal(cudaStreamCreate(&st), cudaSuccess);
        assert_int_equal(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
        assert_int_equal(tuna_cuda_shrink2(st, true, dt, d_hm, RU, d_x, K, d_A, c0, M, T, d_ad, lins, nl, bn, cs),
                         cudaSuccess);
        assert_int_equal(cudaStreamEndCapture(st, &g), cudaSuccess);
        assert_int_equal(cudaGraphInstantiate(&x, g, 0), cudaSuccess);
        assert_int_equal(cudaGraphLaunch(x, st), cudaSuccess);
        assert_int_equal(cudaStreamSynchronize(st), cudaSuccess);
        cudaGraphExecDestroy(x);
        cudaGraphDestroy(g);
        cudaStreamDestroy(st);
    }
    assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
    assert_int_equal(cudaMemcpy(out, d_hm, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
}

/* One shape: nl linears (slots of ls[i]) in columns c0.. of hm rows RU = c0 + M + 8 wide; every
 * (bn, cs) of the list (0, 0: the kernel's own pick). */
static void run_case(int dt, const struct lin_spec *ls, int nl, int64_t T, int64_t K, int c0, const int (*cfgs)[2],
                     int ncfg)
{
    int M = 0, off[3];
    for (int i = 0; i < nl; i++) {
        off[i] = c0 + M;
        M += ls[i].n * ls[i].rs;
    }
    const int RU = c0 + M + 8;
    uint16_t *x = malloc((size_t)T * K * 2), *A = malloc((size_t)M * K * 2);
    int32_t *ad = malloc((size_t)T * 4);
    uint16_t *pre = malloc((size_t)T * RU * 2), *got = malloc((size_t)T * RU * 2), *again = malloc((size_t)T * RU * 2);
    double *h = malloc((size_t)T * M * sizeof(double));
    assert_true(x && A && ad && pre && got && again && h);
    for (size_t i = 0; i < (size_t)T * K; i++) x[i] = to16(dt, frand());
    for (size_t i = 0; i < (size_t)M * K; i++) A[i] = to16(dt, frand() * 0.25f);
    for (size_t i = 0; i < (size_t)T * RU; i++) pre[i] = SENT;
    int nmax = 0;
    for (int i = 0; i < nl; i++) nmax = ls[i].n > nmax ? ls[i].n : nmax;
    for (int64_t t = 0; t < T; t++) ad[t] = (int32_t)((t * 5 + 1) % (nmax + 2)) - 1; /* -1 .. nmax */
    /* descriptors: rank rs, or rs - 3 / rs / 2 in some slots; scales per slot */
    struct tuna_lora_w w[3][16];
    memset(w, 0, sizeof w);
    struct tuna_shrink_lin lins[3];
    memset(lins, 0, sizeof lins);
    void *d_w = dev(NULL, sizeof w);
    for (int i = 0; i < nl; i++) {
        for (int s = 0; s < ls[i].n; s++) {
            w[i][s].r = s % 3 == 1 ? ls[i].rs - 3 : s % 3 == 2 ? ls[i].rs / 2 : ls[i].rs;
            w[i][s].scale = 0.5f + 0.375f * (float)s - 0.25f * (float)i;
        }
        lins[i].w = ls[i].n ? (const struct tuna_lora_w *)((char *)d_w + sizeof w[0] * (size_t)i) : NULL;
        lins[i].off = off[i];
        lins[i].n = ls[i].n;
        lins[i].rs = ls[i].rs;
    }
    TT_OK(tuna_cuda_upload(g_gpu, d_w, w, sizeof w));
    TT_OK(tuna_cuda_sync(g_gpu));
    for (int64_t t = 0; t < T; t++)
        for (int j = 0; j < M; j++) {
            double s = 0.0;
            for (int64_t k = 0; k < K; k++) s += (double)from16(dt, x[t * K + k]) * (double)from16(dt, A[(size_t)j * K + k]);
            h[t * M + j] = s;
        }
    void *d_x = dev(x, (size_t)T * K * 2), *d_A = dev(A, (size_t)M * K * 2), *d_ad = dev(ad, (size_t)T * 4);
    void *d_hm = dev(NULL, (size_t)T * RU * 2);
    for (int ci = 0; ci < ncfg; ci++) {
        const int bn = cfgs[ci][0], cs = cfgs[ci][1];
        launch(got, d_hm, pre, dt, RU, d_x, K, d_A, c0, M, T, (const int32_t *)d_ad, lins, nl, bn, cs, false);
        long kept = 0, exact = 0, bad = 0;
        for (int64_t t = 0; t < T; t++)
            for (int col = 0; col < RU; col++) {
                const uint16_t g = got[t * RU + col];
                if (col < c0 || col >= c0 + M) {
                    bad += g != SENT;
                    continue;
                }
                int li = 0;
                while (li + 1 < nl && col >= off[li + 1]) li++;
                const int s = (col - off[li]) / ls[li].rs, c = col - off[li] - s * ls[li].rs;
                if (ad[t] != s || c >= w[li][s].r) {
                    bad += g != 0;
                    continue;
                }
                kept++;
                const float f = (float)h[t * M + (col - c0)] * w[li][s].scale;
                const uint16_t want = to16(dt, f);
                if (g == want) {
                    exact++;
                    continue;
                }
                const float gv = from16(dt, g), ulp = fabsf(from16(dt, want)) * (dt == 1 ? 0x1p-7f : 0x1p-10f);
                if (fabsf(gv - f) > ulp + 1e-4f) {
                    if (bad < 5)
                        printf("  dt %d bn %d cs %d: t %lld col %d got %g want %g (%g)\n", dt, bn, cs, (long long)t, col,
                               (double)gv, (double)from16(dt, want), (double)f);
                    bad++;
                }
            }
        printf("  dt %d T %lld K %lld M %d bn %d cs %d: %ld kept, %ld bit-equal to the CPU, %ld wrong\n", dt, (long long)T,
               (long long)K, M, bn, cs, kept, exact, bad);
        assert_int_equal(bad, 0);
        assert_true(kept > 0);
        assert_true(exact * 100 >= kept * 95);
        launch(again, d_hm, pre, dt, RU, d_x, K, d_A, c0, M, T, (const int32_t *)d_ad, lins, nl, bn, cs, false);
        assert_memory_equal(got, again, (size_t)T * RU * 2);
        if (ci == 0) {
            launch(again, d_hm, pre, dt, RU, d_x, K, d_A, c0, M, T, (const int32_t *)d_ad, lins, nl, bn, cs, true);
            assert_memory_equal(got, again, (size_t)T * RU * 2);
        }
    }
    tuna_cuda_free(g_gpu, d_x);
    tuna_cuda_free(g_gpu, d_A);
    tuna_cuda_free(g_gpu, d_ad);
    tuna_cuda_free(g_gpu, d_hm);
    tuna_cuda_free(g_gpu, d_w);
    free(x), free(A), free(ad), free(pre), free(got), free(again), free(h);
}

static const int g_all[][2] = {{0, 0},   {64, 1},   {64, 2},  {64, 4},  {64, 8},
                               {64, 16}, {128, 1}, {128, 4}, {128, 8}, {128, 16}};

static void test_bf16_every_split(void **state)
{
    (void)state;
    NEED_GPU();
    if (!sm90()) skip();
    const struct lin_spec ls[3] = {{8, 16}, {3, 8}, {5, 16}}; /* M = 232: partial column tiles */
    run_case(1, ls, 3, 100, 1000, 8, g_all, (int)(sizeof g_all / sizeof g_all[0]));
}

static void test_f16_small(void **state)
{
    (void)state;
    NEED_GPU();
    if (!sm90()) skip();
    const struct lin_spec one[1] = {{2, 8}};
    static const int cf[][2] = {{0, 0}, {64, 16}, {128, 2}};
    run_case(2, one, 1, 1, 264, 0, cf, 3);  /* one token; 16 splits of a 264-long K: most empty */
    run_case(2, one, 1, 65, 264, 4, cf, 3); /* a second, nearly empty token tile */
    const struct lin_spec two[2] = {{4, 16}, {4, 16}};
    run_case(1, two, 2, 130, 512, 0, g_all, 2);
}

static void test_refuses(void **state)
{
    (void)state;
    NEED_GPU();
    if (!sm90()) skip();
    struct tuna_shrink_lin l = {(const struct tuna_lora_w *)(uintptr_t)256, 0, 8, 16};
    const void *p = (const void *)(uintptr_t)256;
    void *hm = (void *)(uintptr_t)256;
    const int32_t *ad = (const int32_t *)(uintptr_t)256;
    assert_int_equal(tuna_cuda_shrink2(NULL, false, 1, hm, 128, p, 100, p, 0, 128, 16, ad, &l, 1, 0, 0),
                     cudaErrorInvalidValue); /* K % 8 */
    assert_int_equal(tuna_cuda_shrink2(NULL, false, 1, hm, 128, p, 128, p, 0, 128, 16, ad, &l, 1, 96, 4),
                     cudaErrorInvalidValue); /* tile width */
    assert_int_equal(tuna_cuda_shrink2(NULL, false, 1, hm, 128, p, 128, p, 0, 128, 16, ad, &l, 1, 64, 3),
                     cudaErrorInvalidValue); /* split count */
    assert_int_equal(tuna_cuda_shrink2(NULL, false, 1, hm, 128, (const char *)p + 8, 128, p, 0, 128, 16, ad, &l, 1, 0,
                                       0),
                     cudaErrorInvalidValue); /* x not 16-byte aligned */
    assert_int_equal(tuna_cuda_shrink2(NULL, false, 1, hm, 128, p, 128, p, 4, 128, 16, ad, &l, 1, 0, 0),
                     cudaErrorInvalidValue); /* columns past the row */
    assert_int_equal(tuna_cuda_shrink2(NULL, false, 3, hm, 128, p, 128, p, 0, 128, 16, ad, &l, 1, 0, 0),
                     cudaErrorInvalidValue); /* dtype */
    int bn = 0, cs = 0;
    tuna_cuda_shrink2_pick(256, 384, 4096, &bn, &cs);
    assert_true((bn == 64 || bn == 128) && cs >= 1 && cs <= 16);
}

static int setup(void **state)
{
    (void)state;
    return ct_backends_new();
}

static int teardown(void **state)
{
    (void)state;
    ct_backends_free();
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_every_split),
        cmocka_unit_test(test_f16_small),
        cmocka_unit_test(test_refuses),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
