/* test_core.c — src/core: dtype conversions, string map, JSON helpers, atomic files. */
#include "testutil.h"

#include <math.h>

#include "core/dtype.h"
#include "core/file.h"
#include "core/json.h"
#include "core/strmap.h"

static void test_bf16_roundtrip(void **state)
{
    (void)state;
    assert_int_equal(tuna_f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(tuna_f32_to_bf16(-2.0f), 0xc000);
    /* 1 + 2^-8 is halfway between two bf16 values: ties to even (down) */
    assert_int_equal(tuna_f32_to_bf16(1.00390625f), 0x3f80);
    /* 1 + 3*2^-8 is halfway: ties to even (up) */
    assert_int_equal(tuna_f32_to_bf16(1.01171875f), 0x3f82);
    assert_true(isnan(tuna_bf16_to_f32(tuna_f32_to_bf16(NAN))));
    for (uint32_t h = 0; h < 0x10000; h += 7) {
        float f = tuna_bf16_to_f32((uint16_t)h);
        if (isnan(f)) continue;
        assert_int_equal(tuna_f32_to_bf16(f), h);
    }
}

static void test_f16_roundtrip(void **state)
{
    (void)state;
    assert_int_equal(tuna_f32_to_f16(1.0f), 0x3c00);
    assert_int_equal(tuna_f32_to_f16(65504.0f), 0x7bff);
    assert_int_equal(tuna_f32_to_f16(65520.0f), 0x7c00); /* rounds to inf */
    assert_int_equal(tuna_f32_to_f16(5.9604644775390625e-08f), 0x0001); /* smallest subnormal */
    assert_int_equal(tuna_f32_to_f16(2.9802322387695312e-08f), 0x0000); /* half of it: ties to even */
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue; /* NaN */
        float f = tuna_f16_to_f32((uint16_t)h);
        assert_int_equal(tuna_f32_to_f16(f), h);
    }
}

static void test_f8(void **state)
{
    (void)state;
    assert_true(tuna_f8e4m3_to_f32(0x38) == 1.0f);  /* 0.0111.000 */
    assert_true(tuna_f8e4m3_to_f32(0x7e) == 448.0f); /* largest */
    assert_true(isnan(tuna_f8e4m3_to_f32(0x7f)));
    assert_true(tuna_f8e4m3_to_f32(0x01) == ldexpf(1.0f, -9));
    assert_true(tuna_f8e5m2_to_f32(0x3c) == 1.0f);
    assert_true(tuna_f8e5m2_to_f32(0x7b) == 57344.0f);
    assert_true(isinf(tuna_f8e5m2_to_f32(0x7c)));
}

static void test_dtype_names(void **state)
{
    (void)state;
    const char *names[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        enum tuna_dtype t = tuna_dtype_from_name(names[i]);
        assert_int_not_equal(t, TUNA_DTYPE_INVALID);
        assert_string_equal(tuna_dtype_name(t), names[i]);
    }
    assert_int_equal(tuna_dtype_from_name("NF4"), TUNA_DTYPE_INVALID);
    assert_int_equal(tuna_dtype_from_name("Q4"), TUNA_DTYPE_INVALID);
    assert_int_equal(tuna_dtype_from_torch("torch.bfloat16"), TUNA_DTYPE_BF16);
    assert_int_equal(tuna_dtype_nbytes(TUNA_DTYPE_NF4, 7), 4);
}

static void test_strmap(void **state)
{
    (void)state;
    struct tuna_strmap m;
    tuna_strmap_init(&m);
    char key[32];
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof key, "k%d", i);
        assert_true(tuna_strmap_puts(&m, key, i * 3, NULL));
    }
    bool existed = false;
    assert_true(tuna_strmap_puts(&m, "k10", -1, &existed));
    assert_true(existed);
    int64_t v;
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof key, "k%d", i);
        assert_true(tuna_strmap_gets(&m, key, &v));
        assert_int_equal(v, i == 10 ? -1 : i * 3);
    }
    assert_false(tuna_strmap_gets(&m, "absent", &v));
    /* keys with NUL bytes */
    assert_true(tuna_strmap_put(&m, "a\0b", 3, 77, NULL));
    assert_true(tuna_strmap_get(&m, "a\0b", 3, &v));
    assert_int_equal(v, 77);
    assert_false(tuna_strmap_get(&m, "a", 1, &v));
    assert_int_equal(m.count, 5001);
    tuna_strmap_free(&m);
}

static void test_json(void **state)
{
    (void)state;
    cJSON *doc;
    const char *bad = "{\n  \"a\": 1,\n  \"b\": }";
    TT_FAILS(tuna_json_parse(bad, strlen(bad), "x.json", &doc), TUNA_E_FORMAT, "line 3");
    const char *good = "{\"n\": 3, \"f\": 0.5, \"s\": \"hi\", \"t\": true, \"z\": null}";
    TT_OK(tuna_json_parse(good, strlen(good), "x.json", &doc));
    tuna_status st;
    int64_t n = 0;
    double f = 0;
    const char *s = NULL;
    bool t = false;
    assert_true(tuna_json_get_int(doc, "n", &n, &st, "x.json"));
    assert_int_equal(n, 3);
    assert_false(tuna_json_get_int(doc, "f", &n, &st, "x.json"));
    assert_int_equal(st, TUNA_E_FORMAT);
    assert_true(tuna_json_get_num(doc, "f", &f, &st, "x.json"));
    assert_true(tuna_json_get_str(doc, "s", &s, &st, "x.json"));
    assert_string_equal(s, "hi");
    assert_true(tuna_json_get_bool(doc, "t", &t, &st, "x.json"));
    assert_false(tuna_json_get_int(doc, "z", &n, &st, "x.json")); /* null counts as absent */
    assert_int_equal(st, TUNA_OK);
    assert_false(tuna_json_get_str(doc, "n", &s, &st, "x.json"));
    assert_int_equal(st, TUNA_E_FORMAT);
    assert_non_null(strstr(tuna_last_error(), "\"n\" should be a string"));

    char path[4200];
    snprintf(path, sizeof path, "%s/out.json", tt_tmpdir());
    TT_OK(tuna_json_save(path, doc));
    char *text;
    size_t len;
    TT_OK(tuna_read_file(path, 0, &text, &len));
    assert_string_equal(text, "{\n  \"n\": 3,\n  \"f\": 0.5,\n  \"s\": \"hi\",\n  \"t\": true,\n  \"z\": null\n}\n");
    free(text);
    cJSON_Delete(doc);
}

static void test_atomic_dir(void **state)
{
    (void)state;
    char final[4200], *tmp = NULL;
    snprintf(final, sizeof final, "%s/outdir", tt_tmpdir());
    TT_OK(tuna_atomic_dir_begin(final, &tmp));
    char *f = tuna_path_join(tmp, "a.txt");
    TT_OK(tuna_write_file_atomic(f, "hello", 5));
    free(f);
    assert_false(tuna_path_exists(final));
    TT_OK(tuna_atomic_dir_commit(tmp, final, false));
    assert_true(tuna_path_is_dir(final));
    free(tmp);
    /* a second export to the same name is refused unless replace is asked for */
    TT_OK(tuna_atomic_dir_begin(final, &tmp));
    TT_FAILS(tuna_atomic_dir_commit(tmp, final, false), TUNA_E_IO, "already exists");
    TT_OK(tuna_atomic_dir_commit(tmp, final, true));
    free(tmp);
    TT_OK(tuna_remove_tree(final));
    assert_false(tuna_path_exists(final));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_roundtrip), cmocka_unit_test(test_f16_roundtrip),
        cmocka_unit_test(test_f8),             cmocka_unit_test(test_dtype_names),
        cmocka_unit_test(test_strmap),         cmocka_unit_test(test_json),
        cmocka_unit_test(test_atomic_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
