/* test_gguf_quants.c — Q8_0, Q4_0, Q5_0, Q4_K and Q6_K quantizers against ggml's own reference
 * quantizers, byte for byte, and the K-quant dequantizers against ggml's dequantizers.
 *
 * tests/data/gguf/quant_ref.bin holds numbers only, produced by ggml's quantize_row_*_ref and
 * dequantize_row_q{4,6}_K compiled outside this repository (docs/GGUF.md says how):
 *   u32 magic "TQV1", u32 ncases, u32 n; then per case: f32 input[n], q8_0, q4_0, q5_0, q4_K,
 *   q6_K blocks of the input, f32 dequant_q4_K[n], f32 dequant_q6_K[n].
 * The cases cover Gaussian weights, bf16-rounded weights, uniform, all-zero blocks, outliers,
 * exact grid values (rounding ties), all-positive, all-negative, tiny and large values.
 */
#include "testutil.h"

#include <math.h>

#include "core/file.h"
#include "gguf/quants.h"

static char *g_ref;
static size_t g_len;

static int setup(void **state)
{
    (void)state;
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/data/gguf/quant_ref.bin", TUNA_SOURCE_DIR);
    if (tuna_read_file(path, 0, &g_ref, &g_len)) {
        fprintf(stderr, "cannot read %s: %s\n", path, tuna_last_error());
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    free(g_ref);
    return 0;
}

static const uint32_t k_types[] = {TUNA_GGML_Q8_0, TUNA_GGML_Q4_0, TUNA_GGML_Q5_0, TUNA_GGML_Q4_K, TUNA_GGML_Q6_K};

static void test_bit_exact(void **state)
{
    (void)state;
    uint32_t hdr[3];
    assert_true(g_len >= sizeof hdr);
    memcpy(hdr, g_ref, sizeof hdr);
    assert_int_equal(hdr[0], 0x31565154u);
    uint32_t nc = hdr[1], n = hdr[2];
    size_t per = (size_t)n * 4 * 3;
    for (size_t t = 0; t < 5; t++) per += tuna_ggml_row_size(k_types[t], n);
    assert_int_equal(g_len, 12 + per * nc);
    const char *p = g_ref + 12;
    float *x = malloc((size_t)n * 4), *ref_deq = malloc((size_t)n * 4), *deq = malloc((size_t)n * 4);
    uint8_t *q = malloc((size_t)n * 4);
    int mismatches = 0;
    for (uint32_t c = 0; c < nc; c++) {
        memcpy(x, p, (size_t)n * 4);
        p += (size_t)n * 4;
        for (size_t t = 0; t < 5; t++) {
            size_t rs = tuna_ggml_row_size(k_types[t], n);
            TT_OK(tuna_ggml_quantize(k_types[t], x, q, n));
            if (memcmp(q, p, rs) != 0) {
                size_t at = 0;
                while (q[at] == (uint8_t)p[at]) at++;
                print_error("case %u %s: first differing byte %zu (ours %02x, ggml %02x)\n", c,
                            tuna_ggml_type_name(k_types[t]), at, q[at], (uint8_t)p[at]);
                mismatches++;
            }
            /* dequantizing ggml's bytes */
            TT_OK(tuna_ggml_dequantize(k_types[t], p, deq, n));
            /* quality: every type reconstructs within its step size (not for the tiny case,
             * whose scales underflow fp16 in ggml too) */
            float amax = 0;
            for (uint32_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
            double err = amax < 1e-3f ? 0 : tt_rel_err(deq, x, n);
            double bound = k_types[t] == TUNA_GGML_Q8_0 ? 0.02 : k_types[t] == TUNA_GGML_Q6_K ? 0.05 : 0.2;
            if (!(err <= bound)) {
                print_error("case %u %s: relative reconstruction error %g > %g\n", c, tuna_ggml_type_name(k_types[t]),
                            err, bound);
                mismatches++;
            }
            p += rs;
        }
        /* ggml's own dequantization of its q4_K and q6_K bytes */
        const char *k4 = p - tuna_ggml_row_size(TUNA_GGML_Q6_K, n) - tuna_ggml_row_size(TUNA_GGML_Q4_K, n);
        const char *k6 = p - tuna_ggml_row_size(TUNA_GGML_Q6_K, n);
        const uint32_t kt[2] = {TUNA_GGML_Q4_K, TUNA_GGML_Q6_K};
        const char *kb[2] = {k4, k6};
        for (int k = 0; k < 2; k++) {
            memcpy(ref_deq, p, (size_t)n * 4);
            p += (size_t)n * 4;
            TT_OK(tuna_ggml_dequantize(kt[k], kb[k], deq, n));
            if (memcmp(deq, ref_deq, (size_t)n * 4) != 0) {
                print_error("case %u: dequantized %s differs from ggml's\n", c, tuna_ggml_type_name(kt[k]));
                mismatches++;
            }
        }
    }
    free(x);
    free(ref_deq);
    free(deq);
    free(q);
    assert_int_equal(mismatches, 0);
}

static void test_zero_and_bad_sizes(void **state)
{
    (void)state;
    float x[256] = {0};
    uint8_t q[300];
    float y[256];
    for (size_t t = 0; t < 5; t++) {
        TT_OK(tuna_ggml_quantize(k_types[t], x, q, 256));
        TT_OK(tuna_ggml_dequantize(k_types[t], q, y, 256));
        for (int i = 0; i < 256; i++) assert_true(y[i] == 0.0f);
    }
    TT_FAILS(tuna_ggml_quantize(TUNA_GGML_Q8_0, x, q, 33), TUNA_E_INVALID, "whole number of q8_0 blocks");
    TT_FAILS(tuna_ggml_quantize(TUNA_GGML_Q4_K, x, q, 128), TUNA_E_INVALID, "q4_K");
    TT_FAILS(tuna_ggml_quantize(TUNA_GGML_Q2_K, x, q, 256), TUNA_E_UNSUPPORTED, "q2_K");
    TT_FAILS(tuna_ggml_dequantize(77, q, y, 256), TUNA_E_UNSUPPORTED, "unknown");
    assert_int_equal(tuna_ggml_row_size(TUNA_GGML_Q4_K, 512), 288);
    assert_int_equal(tuna_ggml_row_size(TUNA_GGML_Q4_K, 100), 0);
    assert_string_equal(tuna_ggml_type_name(TUNA_GGML_BF16), "bf16");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bit_exact),
        cmocka_unit_test(test_zero_and_bad_sizes),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
