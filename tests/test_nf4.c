/* test_nf4.c — the NF4/FP4 quantizer and dequantizer against bitsandbytes' own outputs
 * (fixtures bnb/quantize_cases.safetensors: every {nf4,fp4}.{case}.bs{64,128}.{plain,nested}),
 * plus small synthetic checks of packing order, ties and all-zero blocks. */
#include "testutil.h"

#include <math.h>

#include "io/safetensors.h"
#include "quant/nf4.h"
#include "quant/rcp_approx.h"

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Compares n floats bit for bit (so -0.0 vs 0.0 and NaN payloads count); prints the first
 * differences and returns how many differ. */
static int64_t diff_f32(const char *what, const float *a, const void *ref_bytes, int64_t n)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        float r;
        memcpy(&r, (const char *)ref_bytes + 4 * i, 4);
        if (fbits(a[i]) != fbits(r)) {
            if (bad < 4) print_error("%s[%lld]: got %.9g (%08x), want %.9g (%08x)\n", what, (long long)i, a[i],
                                     fbits(a[i]), r, fbits(r));
            bad++;
        }
    }
    return bad;
}

static int64_t diff_u8(const char *what, const uint8_t *a, const uint8_t *b, int64_t n)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++)
        if (a[i] != b[i]) {
            if (bad < 4) print_error("%s[%lld]: got 0x%02x, want 0x%02x\n", what, (long long)i, a[i], b[i]);
            bad++;
        }
    return bad;
}

/* Compares packed codes, strictly: bitsandbytes computes 1/absmax with the GPU's approximate
 * reciprocal and tuna emulates it (quant/rcp_approx.h), so every code must be equal. */
static int64_t diff_packed(int64_t n, const uint8_t *ours, const uint8_t *ref)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        int sh = (i & 1) ? 0 : 4;
        uint8_t a = (uint8_t)((ours[i / 2] >> sh) & 15), b = (uint8_t)((ref[i / 2] >> sh) & 15);
        if (a == b) continue;
        if (bad < 4) print_error("packed element %lld: got code %d, want %d\n", (long long)i, a, b);
        bad++;
    }
    return bad;
}

/* The emulated GPU reciprocal: within 1 ulp of 1/x, exact on powers of two, scaled exactly by
 * the exponent, and rcp.approx.ftz's special cases. */
static void test_rcp_approx(void **state)
{
    (void)state;
    TT_OK(tuna_rcp_approx_init());
    uint32_t s = 12345;
    int off = 0;
    for (int i = 0; i < 200000; i++) {
        s = s * 1664525u + 1013904223u;
        float m = 1.0f + (float)(s >> 9) / 8388608.0f; /* [1, 2) */
        float r = tuna_rcp_approx(m), cr = 1.0f / m;
        if (r != cr) {
            off++;
            assert_true(r == nextafterf(cr, 0.0f) || r == nextafterf(cr, 2.0f));
        }
        assert_true(tuna_rcp_approx(m * 1024.0f) == r / 1024.0f);
        assert_true(tuna_rcp_approx(m / 65536.0f) == r * 65536.0f);
        assert_true(tuna_rcp_approx(-m) == -r);
    }
    /* about one mantissa in eight differs on the GPU measured; the table must not be all zeros */
    assert_true(off > 10000 && off < 40000);
    assert_true(tuna_rcp_approx(4.0f) == 0.25f);
    assert_true(isinf(tuna_rcp_approx(0.0f)) && tuna_rcp_approx(0.0f) > 0);
    assert_true(isinf(tuna_rcp_approx(1e-40f))); /* subnormal input is flushed to zero */
    assert_true(tuna_rcp_approx(INFINITY) == 0.0f);
    assert_true(tuna_rcp_approx(3e38f) == 0.0f); /* subnormal result is flushed */
    assert_true(isnan(tuna_rcp_approx(NAN)));
}

static const struct tuna_tensor_view *need(tuna_st_file *f, const char *prefix, const char *suffix)
{
    char name[512];
    snprintf(name, sizeof name, "%s.%s", prefix, suffix);
    const struct tuna_tensor_view *t = tuna_st_find(f, name);
    if (!t) print_error("fixture tensor %s is missing\n", name);
    assert_non_null(t);
    return t;
}

static void test_quantize_cases(void **state)
{
    (void)state;
    char path[4096];
    if (!tt_shared_path(path, sizeof path, "fixtures/bnb/quantize_cases.safetensors")) skip();
    tuna_st_file *f = NULL;
    TT_OK(tuna_st_open(path, &f));
    int ncases = 0, nbad = 0, nnested = 0, nfp4 = 0;
    for (size_t i = 0; i < tuna_st_count(f); i++) {
        const struct tuna_tensor_view *in = tuna_st_at(f, i);
        size_t len = strlen(in->name);
        if (len < 6 || strcmp(in->name + len - 6, ".input") != 0) continue;
        char prefix[256];
        snprintf(prefix, sizeof prefix, "%.*s", (int)(len - 6), in->name);
        enum tuna_q4_type type = strncmp(prefix, "fp4.", 4) == 0 ? TUNA_Q4_FP4 : TUNA_Q4_NF4;
        int bs = strstr(prefix, ".bs128.") ? 128 : 64;
        bool nested = strstr(prefix, ".nested") != NULL;
        assert_int_equal(in->dtype, TUNA_DTYPE_BF16);
        assert_int_equal(in->ndim, 2);

        struct tuna_q4_weight w;
        TT_OK(tuna_q4_quantize(in->data, TUNA_DTYPE_BF16, in->shape[0], in->shape[1], type, bs, nested,
                               TUNA_DTYPE_BF16, &w));
        int64_t bad = 0;
        const struct tuna_tensor_view *packed = need(f, prefix, "packed");
        assert_int_equal((int64_t)packed->numel, (w.numel + 1) / 2);
        bad += diff_packed(w.numel, w.codes, packed->data);
        bad += diff_f32("code", tuna_q4_code_table(type), need(f, prefix, "code")->data, 16);
        const struct tuna_tensor_view *am = need(f, prefix, "absmax");
        assert_int_equal((int64_t)am->numel, w.n_blocks);
        if (nested) {
            nnested++;
            assert_int_equal(am->dtype, TUNA_DTYPE_U8);
            bad += diff_u8("qabsmax", w.qabsmax, am->data, w.n_blocks);
            const struct tuna_tensor_view *na = need(f, prefix, "nested_absmax");
            assert_int_equal((int64_t)na->numel, w.n_nested);
            bad += diff_f32("nested_absmax", w.nested_absmax, na->data, w.n_nested);
            bad += diff_f32("nested_code", tuna_q8_dynamic_map(), need(f, prefix, "nested_code")->data, 256);
            bad += diff_f32("offset", &w.nested_offset, need(f, prefix, "offset")->data, 1);
        } else {
            assert_int_equal(am->dtype, TUNA_DTYPE_F32);
            bad += diff_f32("absmax", w.absmax, am->data, w.n_blocks);
        }
        /* dequantize what bitsandbytes wrote (not our own output), row by row */
        struct tuna_q4_weight r = w;
        r.codes = packed->data;
        float *deq = malloc(sizeof(float) * (size_t)w.numel);
        assert_non_null(deq);
        for (int64_t row = 0; row < w.rows; row++) tuna_q4_dequantize_row(&r, row, deq + row * w.cols);
        bad += diff_f32("dequant", deq, need(f, prefix, "dequant")->data, w.numel);
        /* the tile variant gives the same */
        float *deq2 = malloc(sizeof(float) * (size_t)w.numel);
        assert_non_null(deq2);
        tuna_q4_dequantize_rows(&r, 0, w.rows, deq2);
        bad += diff_f32("dequant tile", deq2, deq, w.numel);
        free(deq2);
        free(deq);
        if (bad) {
            print_error("case %s: %lld mismatches\n", prefix, (long long)bad);
            nbad++;
        }
        if (type == TUNA_Q4_FP4) nfp4++;
        ncases++;
        tuna_q4_weight_free(&w);
    }
    tuna_st_close(f);
    print_message("quantize_cases: %d cases (%d nested, %d fp4), %d with mismatches\n", ncases, nnested, nfp4, nbad);
    assert_true(ncases >= 20);
    assert_true(nnested > 0 && nfp4 > 0);
    assert_int_equal(nbad, 0);
}

/* Packing order, ties and the all-zero block, on numbers worked out by hand from FORMATS §1.3. */
static void test_synthetic(void **state)
{
    (void)state;
    float x[64] = {0};
    x[0] = 1.0f;   /* absmax → code 15, high nibble of byte 0 */
    x[1] = -1.0f;  /* code 0, low nibble */
    x[2] = 0.0f;   /* NF4 code 7 */
    x[3] = 0.03979014977812767f; /* exactly on the 7/8 threshold: ties go to the lower code */
    uint8_t packed[32];
    float absmax[1];
    tuna_q4_quantize_flat(TUNA_Q4_NF4, x, 64, 64, packed, absmax);
    assert_true(absmax[0] == 1.0f);
    assert_int_equal(packed[0], 0xF0);
    assert_int_equal(packed[1], 0x77);

    /* all-zero block: absmax 0, x * inf = NaN → code 0 everywhere; dequant gives zeros */
    float z[65] = {0};
    uint8_t pz[33];
    float az[2];
    tuna_q4_quantize_flat(TUNA_Q4_NF4, z, 65, 64, pz, az);
    assert_true(az[0] == 0.0f && az[1] == 0.0f);
    assert_int_equal(pz[0], 0x00);
    assert_int_equal(pz[32], 0x00); /* odd count: padded element normalised to NaN as well */

    /* odd count with a non-zero last block: the padding nibble is the code of 0 */
    float o[3] = {0.5f, -0.25f, 0.125f};
    uint8_t po[2];
    float ao[1];
    tuna_q4_quantize_flat(TUNA_Q4_NF4, o, 3, 64, po, ao);
    assert_int_equal(po[1] & 15, 7);
    tuna_q4_quantize_flat(TUNA_Q4_FP4, o, 3, 64, po, ao);
    assert_int_equal(po[0] >> 4, 3); /* 1.0 → 0b0011 */
    assert_int_equal(po[1] & 15, 0);

    /* FP4: -0.001 after normalisation is negative zero (0b1000) */
    float s[2] = {1.0f, -0.001f};
    tuna_q4_quantize_flat(TUNA_Q4_FP4, s, 2, 64, po, ao);
    assert_int_equal(po[0], 0x38);
}

/* Round trip on a larger random matrix with rows that straddle blocks: the dequantized value is
 * the nearest code times absmax, so the error per element is at most half the widest code gap. */
static void test_roundtrip_bound(void **state)
{
    (void)state;
    int64_t rows = 7, cols = 100; /* 700 elements: blocks straddle rows, odd last block */
    float *x = malloc(sizeof(float) * 700), *y = malloc(sizeof(float) * 700);
    assert_non_null(x);
    assert_non_null(y);
    uint32_t s = 12345;
    for (int i = 0; i < 700; i++) {
        s = s * 1664525u + 1013904223u;
        x[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * 0.1f;
    }
    for (int t = 0; t < 2; t++) {
        for (int dq = 0; dq < 2; dq++) {
            struct tuna_q4_weight w;
            TT_OK(tuna_q4_quantize(x, TUNA_DTYPE_F32, rows, cols, (enum tuna_q4_type)t, 64, dq, TUNA_DTYPE_F32, &w));
            tuna_q4_dequantize_rows(&w, 0, rows, y);
            for (int i = 0; i < 700; i++) {
                float a = w.absmax[i / 64];
                if (fabsf(x[i] - y[i]) > 0.17f * a + 1e-6f) {
                    print_error("type %d dq %d: x[%d] = %g dequantized to %g (absmax %g)\n", t, dq, i, x[i], y[i], a);
                    fail();
                }
            }
            /* row variant at an odd element offset (row 3 starts at element 300 = block 4 + 44) */
            float row[100];
            tuna_q4_dequantize_row(&w, 3, row);
            assert_memory_equal(row, y + 300, sizeof row);
            tuna_q4_weight_free(&w);
        }
    }
    TT_FAILS(tuna_q4_quantize(x, TUNA_DTYPE_F32, rows, cols, TUNA_Q4_NF4, 48, false, TUNA_DTYPE_F32,
                              &(struct tuna_q4_weight){0}),
             TUNA_E_INVALID, "block size 48");
    free(x);
    free(y);
}

/* Matrices over 1M elements are quantized on several threads: the bytes must equal the
 * single-threaded flat quantizer's. */
static void test_parallel_same(void **state)
{
    (void)state;
    int64_t rows = 1100, cols = 1000, n = rows * cols;
    float *x = malloc(sizeof(float) * (size_t)n), *am = malloc(sizeof(float) * (size_t)(n / 64 + 1));
    uint8_t *p = malloc((size_t)n / 2 + 1);
    assert_non_null(x);
    assert_non_null(am);
    assert_non_null(p);
    uint32_t s = 99;
    for (int64_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        x[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * (float)(1 + (i / 640) % 7);
    }
    struct tuna_q4_weight w;
    TT_OK(tuna_q4_quantize(x, TUNA_DTYPE_F32, rows, cols, TUNA_Q4_FP4, 64, false, TUNA_DTYPE_F32, &w));
    tuna_q4_quantize_flat(TUNA_Q4_FP4, x, n, 64, p, am);
    assert_memory_equal(w.codes, p, (size_t)n / 2);
    assert_memory_equal(w.absmax, am, sizeof(float) * (size_t)w.n_blocks);
    tuna_q4_weight_free(&w);
    free(x);
    free(am);
    free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synthetic),
        cmocka_unit_test(test_roundtrip_bound),
        cmocka_unit_test(test_parallel_same),
        cmocka_unit_test(test_rcp_approx),
        cmocka_unit_test(test_quantize_cases),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
