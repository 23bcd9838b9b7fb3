/* test_lora_expand.c — k_lora_expand_group (src/backend/cuda/lora_expand.cu, TUNA_LORA_EXPAND2)
 * against the same sums on the CPU: each output is a float32 fmaf chain in rank order over the
 * token's own slot, then rounded once (or added onto y), so the GPU must give the CPU's bits.
 * Shapes cover the edges the Llama shapes of bench_lora_expand do not: rows not a multiple of
 * 128 or of 4 (the scalar stores), a linear without adapters (skipped: its y untouched), tokens
 * without an adapter (written 0, or left alone when adding), a slot past the linear's n, token
 * chunks longer than the 64 staged at a time, f16, float32 outputs; and the shapes it declines.
 * Skips without a GPU. */
#include "cuda_testutil.h"

#include <cuda_runtime_api.h>
#include <string.h>

#include "backend/cuda/lora_expand.h"
#include "core/dtype.h"

#define NL 3

struct lin_spec {
    int64_t N;
    int n, rs;
};

static uint16_t to16(int hdt, float v) { return hdt == 1 ? tuna_f32_to_bf16(v) : tuna_f32_to_f16(v); }
static float from16(int hdt, uint16_t h) { return hdt == 1 ? tuna_bf16_to_f32(h) : tuna_f16_to_f32(h); }

/* One run: random hm (each token's own slot only) and B_all per linear, y preset to a pattern;
 * the GPU's y against the CPU's, bit for bit. */
static void run_case(const struct lin_spec *ls, int hdt, int yf32, int add, int64_t T, int chunks)
{
    int RU = 0, off[NL];
    for (int i = 0; i < NL; i++) {
        off[i] = RU;
        RU += ls[i].n * ls[i].rs;
    }
    int32_t *ad = malloc((size_t)T * 4);
    uint16_t *hm = calloc((size_t)T * RU, 2);
    assert_non_null(ad);
    assert_non_null(hm);
    for (int64_t t = 0; t < T; t++) {
        ad[t] = (int32_t)((t * 7 + 2) % 6) - 1; /* -1 .. 4: 3 and 4 are past n = 3 */
        for (int i = 0; i < NL; i++)
            if (ad[t] >= 0 && ad[t] < ls[i].n)
                for (int j = 0; j < ls[i].rs; j++)
                    hm[t * RU + off[i] + ad[t] * ls[i].rs + j] = to16(hdt, frand() * 0.5f);
    }
    struct tuna_lora_expand_lin lin[NL];
    uint16_t *B[NL];
    void *yh[NL], *yg[NL];
    const size_t es = yf32 ? 4 : 2;
    for (int i = 0; i < NL; i++) {
        const size_t nb = (size_t)ls[i].N * (size_t)(ls[i].n * ls[i].rs), ny = (size_t)T * (size_t)ls[i].N;
        B[i] = malloc(nb * 2 + 2);
        yh[i] = malloc(ny * es);
        yg[i] = malloc(ny * es);
        assert_non_null(B[i]);
        assert_non_null(yh[i]);
        assert_non_null(yg[i]);
        for (size_t k = 0; k < nb; k++) B[i][k] = to16(hdt, frand() * 0.5f);
        for (size_t k = 0; k < ny; k++) {
            if (yf32) ((float *)yh[i])[k] = frand();
            else ((uint16_t *)yh[i])[k] = to16(hdt, frand());
        }
        memset(&lin[i], 0, sizeof lin[i]);
        lin[i].y = dev(yh[i], ny * es);
        lin[i].B = ls[i].n ? dev(B[i], nb * 2) : NULL;
        lin[i].N = ls[i].N;
        lin[i].off = off[i];
        lin[i].n = ls[i].n;
        lin[i].rs = ls[i].rs;
    }
    void *d_hm = dev(hm, (size_t)T * RU * 2), *d_ad = dev(ad, (size_t)T * 4);
    assert_int_equal(tuna_cuda_lora_expand(NULL, 132, NL, lin, d_hm, RU, (const int32_t *)d_ad, T, hdt, yf32, add, chunks),
                     0);
    assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
    long bad = 0;
    for (int i = 0; i < NL; i++) {
        const int64_t N = ls[i].N;
        back(yg[i], lin[i].y, (size_t)T * N * es);
        for (int64_t t = 0; t < T; t++)
            for (int64_t r = 0; r < N; r++) {
                const size_t k = (size_t)(t * N + r);
                if (ls[i].n == 0) { /* skipped: untouched */
                    bad += memcmp((char *)yh[i] + k * es, (char *)yg[i] + k * es, es) != 0;
                    continue;
                }
                const int a = ad[t] < ls[i].n ? ad[t] : -1;
                float acc = 0.0f;
                for (int j = 0; a >= 0 && j < ls[i].rs; j++)
                    acc = fmaf(from16(hdt, hm[t * RU + off[i] + a * ls[i].rs + j]),
                               from16(hdt, B[i][(size_t)r * (size_t)(ls[i].n * ls[i].rs) + (size_t)(a * ls[i].rs + j)]),
                               acc);
                if (yf32) {
                    const float y0 = ((float *)yh[i])[k];
                    const float want = add ? (a >= 0 ? y0 + acc : y0) : acc;
                    const float got = ((float *)yg[i])[k];
                    bad += memcmp(&want, &got, 4) != 0;
                } else {
                    const uint16_t y0 = ((uint16_t *)yh[i])[k];
                    const uint16_t want = add ? (a >= 0 ? to16(hdt, from16(hdt, y0) + acc) : y0) : to16(hdt, acc);
                    bad += want != ((uint16_t *)yg[i])[k];
                }
            }
    }
    if (bad) print_error("hdt %d yf32 %d add %d T %lld chunks %d: %ld outputs differ from the CPU\n", hdt, yf32, add,
                         (long long)T, chunks, bad);
    assert_int_equal(bad, 0);
    for (int i = 0; i < NL; i++) {
        tuna_cuda_free(g_gpu, lin[i].y);
        if (lin[i].B) tuna_cuda_free(g_gpu, (void *)lin[i].B);
        free(B[i]);
        free(yh[i]);
        free(yg[i]);
    }
    tuna_cuda_free(g_gpu, d_hm);
    tuna_cuda_free(g_gpu, d_ad);
    free(hm);
    free(ad);
}

/* rows 200 (one full and one partial block), 70 (not a multiple of 4: scalar stores), and a
 * linear without adapters */
static const struct lin_spec g_mix[NL] = {{200, 3, 16}, {70, 3, 8}, {96, 0, 0}};

static void test_write_bf16(void **state)
{
    (void)state;
    NEED_GPU();
    run_case(g_mix, 1, 0, 0, 150, 1); /* one chunk: 3 sub-chunks of the 64 staged */
    run_case(g_mix, 1, 0, 0, 150, 0);
    run_case(g_mix, 1, 0, 0, 3, 0);
}

static void test_add_bf16(void **state)
{
    (void)state;
    NEED_GPU();
    run_case(g_mix, 1, 0, 1, 150, 2);
}

static void test_f16_and_f32(void **state)
{
    (void)state;
    NEED_GPU();
    const struct lin_spec one[NL] = {{256, 4, 32}, {4, 0, 0}, {4, 0, 0}};
    run_case(g_mix, 2, 0, 0, 97, 0);
    run_case(g_mix, 1, 1, 1, 97, 0); /* onto a float32 residual */
    run_case(one, 2, 1, 0, 130, 3);
}

static void test_declines(void **state)
{
    (void)state;
    NEED_GPU();
    struct tuna_lora_expand_lin l;
    memset(&l, 0, sizeof l);
    l.y = (void *)(uintptr_t)256;
    l.B = (const void *)(uintptr_t)256;
    l.N = 128;
    l.n = 8;
    l.rs = 12; /* not a multiple of 8 */
    const int32_t *ad = (const int32_t *)(uintptr_t)256;
    assert_int_equal(tuna_cuda_lora_expand(NULL, -1, 1, &l, (const void *)(uintptr_t)256, 96, ad, 16, 1, 0, 0, 0), 1);
    l.rs = 32; /* 8 x 32 = 256 columns: too wide for shared memory */
    assert_int_equal(tuna_cuda_lora_expand(NULL, -1, 1, &l, (const void *)(uintptr_t)256, 256, ad, 16, 1, 0, 0, 0), 1);
    l.rs = 16;
    assert_int_equal(tuna_cuda_lora_expand(NULL, -1, 1, &l, (const void *)(uintptr_t)256, 64, ad, 16, 1, 0, 0, 0), 1);
    assert_int_equal(tuna_cuda_lora_expand(NULL, -1, 1, &l, (const void *)(uintptr_t)256, 128, ad, 16, 1, 0, 0, 0), 0);
    l.B = (const void *)(uintptr_t)258; /* misaligned */
    assert_int_equal(tuna_cuda_lora_expand(NULL, -1, 1, &l, (const void *)(uintptr_t)256, 128, ad, 16, 1, 0, 0, 0), 1);
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
        cmocka_unit_test(test_write_bf16),
        cmocka_unit_test(test_add_bf16),
        cmocka_unit_test(test_f16_and_f32),
        cmocka_unit_test(test_declines),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
