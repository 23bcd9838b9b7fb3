/* test_safetensors.c — src/io/safetensors*.c: round trips, the official layout, sharding, and
 * every malformed case the reader must refuse (the tests build the bad files). */
#include "testutil.h"

#include <fcntl.h>

#include "core/file.h"
#include "io/safetensors.h"

static char g_path[4200];

static const char *tmp_path(const char *name)
{
    snprintf(g_path, sizeof g_path, "%s/%s", tt_tmpdir(), name);
    return g_path;
}

/* Writes [u64 len][header][data] with the header's real length. */
static const char *make_file(const char *name, const char *header, const void *data, size_t n)
{
    const char *path = tmp_path(name);
    size_t hl = strlen(header);
    uint8_t *buf = malloc(8 + hl + n + 1);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (n) memcpy(buf + 8 + hl, data, n);
    tt_write(path, buf, 8 + hl + n);
    free(buf);
    return path;
}

static void expect_bad(const char *name, const char *header, size_t data_len, tuna_status want, const char *needle)
{
    uint8_t data[256] = {0};
    const char *path = make_file(name, header, data, data_len);
    tuna_st_file *f = (tuna_st_file *)0x1;
    TT_FAILS(tuna_st_open(path, &f), want, needle);
    assert_null(f);
    /* the message names the file */
    assert_non_null(strstr(tuna_last_error(), name));
}

static void test_roundtrip_all_dtypes(void **state)
{
    (void)state;
    const enum tuna_dtype types[] = {TUNA_DTYPE_F64, TUNA_DTYPE_F32,  TUNA_DTYPE_F16,     TUNA_DTYPE_BF16,
                                     TUNA_DTYPE_I64, TUNA_DTYPE_I32,  TUNA_DTYPE_I16,     TUNA_DTYPE_I8,
                                     TUNA_DTYPE_U8,  TUNA_DTYPE_BOOL, TUNA_DTYPE_F8_E4M3, TUNA_DTYPE_F8_E5M2};
    const size_t nt = sizeof types / sizeof types[0];
    tuna_st_writer *w;
    TT_OK(tuna_st_writer_new(&w));
    uint8_t payload[2 * 3 * 8];
    for (size_t i = 0; i < sizeof payload; i++) payload[i] = (uint8_t)(i * 7 + 1);
    for (size_t i = 0; i < nt; i++) {
        char name[32];
        snprintf(name, sizeof name, "t.%s", tuna_dtype_name(types[i]));
        int64_t shape[2] = {2, 3};
        TT_OK(tuna_st_writer_add(w, name, types[i], 2, shape, payload, tuna_dtype_nbytes(types[i], 6), true));
    }
    int64_t sc[1] = {0};
    TT_OK(tuna_st_writer_add(w, "scalar", TUNA_DTYPE_F32, 0, sc, payload, 4, true));
    TT_OK(tuna_st_writer_add(w, "empty", TUNA_DTYPE_F32, 1, sc, payload, 0, true));
    TT_FAILS(tuna_st_writer_add(w, "scalar", TUNA_DTYPE_F32, 0, sc, payload, 4, true), TUNA_E_INVALID, "twice");
    TT_OK(tuna_st_writer_set_metadata(w, "extra", "value \"quoted\""));
    const char *path = tmp_path("all.safetensors");
    TT_OK(tuna_st_writer_save(w, path));
    tuna_st_writer_free(w);

    tuna_st_file *f;
    TT_OK(tuna_st_open(path, &f));
    assert_int_equal(tuna_st_count(f), nt + 2);
    assert_string_equal(tuna_st_metadata(f, "format"), "pt");
    assert_string_equal(tuna_st_metadata(f, "extra"), "value \"quoted\"");
    for (size_t i = 0; i < nt; i++) {
        char name[32];
        snprintf(name, sizeof name, "t.%s", tuna_dtype_name(types[i]));
        const struct tuna_tensor_view *t = tuna_st_find(f, name);
        assert_non_null(t);
        assert_int_equal(t->dtype, types[i]);
        assert_int_equal(t->ndim, 2);
        assert_int_equal(t->shape[0], 2);
        assert_int_equal(t->shape[1], 3);
        assert_int_equal(t->numel, 6);
        assert_memory_equal(t->data, payload, t->nbytes);
    }
    const struct tuna_tensor_view *s = tuna_st_find(f, "scalar");
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->numel, 1);
    assert_int_equal(tuna_st_find(f, "empty")->nbytes, 0);
    assert_null(tuna_st_find(f, "absent"));
    /* official layout: sorted by dtype descending (F64 first, BOOL last), header a multiple of 8 */
    assert_string_equal(tuna_st_at(f, 0)->name, "t.I64");
    assert_string_equal(tuna_st_at(f, 1)->name, "t.F64");
    assert_string_equal(tuna_st_at(f, tuna_st_count(f) - 1)->name, "t.BOOL");
    tuna_st_close(f);
    char *raw;
    size_t len;
    TT_OK(tuna_read_file(path, 0, &raw, &len));
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | (uint8_t)raw[i];
    assert_int_equal(hl % 8, 0);
    assert_true(strncmp(raw + 8, "{\"__metadata__\":{\"extra\":", 25) == 0);
    free(raw);
}

/* Re-writing a file made by transformers gives the same bytes. */
static void test_rewrite_fixture_identical(void **state)
{
    (void)state;
    const char *rels[] = {"fixtures/models/llama-tiny/model.safetensors",
                          "fixtures/bnb/llama-tiny-bnb-nf4-dq/model.safetensors",
                          "fixtures/lora/llama-tiny/adapter/adapter_model.safetensors"};
    int ran = 0;
    for (size_t r = 0; r < sizeof rels / sizeof rels[0]; r++) {
        char src[4200];
        if (!tt_shared_path(src, sizeof src, rels[r])) continue;
        tuna_st_file *f;
        TT_OK(tuna_st_open(src, &f));
        tuna_st_writer *w;
        TT_OK(tuna_st_writer_new(&w));
        for (size_t i = 0; i < tuna_st_count(f); i++) {
            const struct tuna_tensor_view *t = tuna_st_at(f, i);
            TT_OK(tuna_st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, false));
        }
        const char *out = tmp_path("rewrite.safetensors");
        TT_OK(tuna_st_writer_save(w, out));
        tuna_st_writer_free(w);
        tuna_st_close(f);
        char *a, *b;
        size_t la, lb;
        TT_OK(tuna_read_file(src, 0, &a, &la));
        TT_OK(tuna_read_file(out, 0, &b, &lb));
        assert_int_equal(la, lb);
        assert_memory_equal(a, b, la);
        free(a);
        free(b);
        ran++;
    }
    if (!ran) skip();
}

static void test_sharded(void **state)
{
    (void)state;
    tuna_st_writer *w;
    TT_OK(tuna_st_writer_new(&w));
    float vals[100];
    for (int i = 0; i < 100; i++) vals[i] = (float)i;
    for (int i = 0; i < 10; i++) {
        char name[32];
        snprintf(name, sizeof name, "layer.%d.weight", i);
        int64_t shape[1] = {10 + i};
        TT_OK(tuna_st_writer_add(w, name, TUNA_DTYPE_F32, 1, shape, vals, (size_t)(10 + i) * 4, true));
    }
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/sharded", tt_tmpdir());
    TT_OK(tuna_mkdir_p(dir));
    TT_OK(tuna_st_writer_save_dir(w, dir, "model", 200));
    tuna_st_writer_free(w);
    char p[4300];
    snprintf(p, sizeof p, "%s/model-00001-of-00004.safetensors", dir); /* 184+180+140+76 bytes */
    assert_true(tuna_path_exists(p));
    tuna_st_set *s;
    TT_OK(tuna_st_set_open(dir, "model", &s));
    assert_int_equal(tuna_st_set_count(s), 10);
    assert_true(tuna_st_set_nfiles(s) > 1);
    const struct tuna_tensor_view *t = tuna_st_set_find(s, "layer.7.weight");
    assert_non_null(t);
    assert_int_equal(t->shape[0], 17);
    float got[17];
    TT_OK(tuna_tensor_to_f32(t, got));
    assert_true(got[16] == 16.0f);
    tuna_st_set_close(s);

    /* an index that names a missing shard */
    char idx[4300];
    snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", dir);
    const char *bad_shard = "{\"weight_map\": {\"a\": \"model-00009-of-00009.safetensors\"}}";
    tt_write(idx, bad_shard, strlen(bad_shard));
    TT_FAILS(tuna_st_set_open(dir, "model", &s), TUNA_E_NOT_FOUND, "model-00009-of-00009.safetensors");
    /* an index that names a tensor its shard does not hold */
    const char *bad_tensor = "{\"weight_map\": {\"nope\": \"model-00001-of-00004.safetensors\"}}";
    tt_write(idx, bad_tensor, strlen(bad_tensor));
    TT_FAILS(tuna_st_set_open(dir, "model", &s), TUNA_E_NOT_FOUND, "\"nope\"");
    /* a shard name that leaves the folder */
    const char *traversal = "{\"weight_map\": {\"a\": \"../../etc/passwd\"}}";
    tt_write(idx, traversal, strlen(traversal));
    TT_FAILS(tuna_st_set_open(dir, "model", &s), TUNA_E_FORMAT, "not a plain file name");
    const char *no_map = "{\"metadata\": {}}";
    tt_write(idx, no_map, strlen(no_map));
    TT_FAILS(tuna_st_set_open(dir, "model", &s), TUNA_E_FORMAT, "weight_map");
    TT_FAILS(tuna_st_set_open(tt_tmpdir(), "nothing", &s), TUNA_E_NOT_FOUND, "no nothing.safetensors");
}

static void test_malformed(void **state)
{
    (void)state;
    /* shorter than the length prefix */
    tt_write(tmp_path("short.safetensors"), "\x01\x02\x03", 3);
    tuna_st_file *f;
    TT_FAILS(tuna_st_open(g_path, &f), TUNA_E_FORMAT, "too short");

    /* header length beyond the file */
    uint8_t hdr[16] = {0x00, 0x10, 0, 0, 0, 0, 0, 0, '{', '}'};
    tt_write(tmp_path("beyond.safetensors"), hdr, 10);
    TT_FAILS(tuna_st_open(g_path, &f), TUNA_E_FORMAT, "runs past the end");

    /* header over 100 MB (a sparse file, so the length is really there) */
    const char *big = tmp_path("big.safetensors");
    uint64_t n = 150000000ull;
    uint8_t le[8];
    for (int i = 0; i < 8; i++) le[i] = (uint8_t)(n >> (8 * i));
    tt_write(big, le, 8);
    assert_int_equal(truncate(big, (off_t)(8 + n + 8)), 0);
    TT_FAILS(tuna_st_open(big, &f), TUNA_E_FORMAT, "100 MB");
    unlink(big);

    expect_bad("notjson.safetensors", "{\"a\": [1, 2", 0, TUNA_E_FORMAT, "not valid JSON");
    expect_bad("nobrace.safetensors", "[1,2,3]  ", 0, TUNA_E_FORMAT, "does not start with '{'");
    expect_bad("trailing_json.safetensors", "{} xx   ", 0, TUNA_E_FORMAT, "unexpected bytes");
    expect_bad("dtype.safetensors", "{\"w\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2,
               TUNA_E_FORMAT, "unknown dtype \"Q4\"");
    expect_bad("dtype2.safetensors", "{\"w\":{\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[0,1]}}", 1,
               TUNA_E_UNSUPPORTED, "F4");
    expect_bad("size.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 20,
               TUNA_E_FORMAT, "holds 20 bytes");
    expect_bad("oob.safetensors", "{\"w\":{\"dtype\":\"U8\",\"shape\":[64],\"data_offsets\":[0,64]}}", 10,
               TUNA_E_FORMAT, "past its end");
    expect_bad("overlap.safetensors",
               "{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[4,12]}}",
               12, TUNA_E_FORMAT, "overlaps");
    expect_bad("gap.safetensors",
               "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,12]}}",
               12, TUNA_E_FORMAT, "gap of 4");
    expect_bad("trailing.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 9,
               TUNA_E_FORMAT, "5 trailing bytes");
    expect_bad("dup.safetensors",
               "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
               "\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}",
               8, TUNA_E_FORMAT, "appears twice");
    expect_bad("negshape.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[-4],\"data_offsets\":[0,4]}}", 4,
               TUNA_E_FORMAT, "bad dimension");
    expect_bad("badoffs.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,0]}}", 4,
               TUNA_E_FORMAT, "bad data_offsets");
    expect_bad("nooffs.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4]}}", 4, TUNA_E_FORMAT, "data_offsets");
    expect_bad("meta.safetensors", "{\"__metadata__\":{\"format\":3}}", 0, TUNA_E_FORMAT, "not a string");
    expect_bad("huge.safetensors",
               "{\"a\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,8]}}", 8,
               TUNA_E_FORMAT, "byte range");
    /* a valid minimal file still opens after all that */
    const char *ok = make_file("ok.safetensors", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}  ",
                               "abcd", 4);
    TT_OK(tuna_st_open(ok, &f));
    assert_memory_equal(tuna_st_find(f, "a")->data, "abcd", 4);
    tuna_st_close(f);
}

/* Truncating a real file at every length never crashes the reader. */
static void test_truncations(void **state)
{
    (void)state;
    char src[4200];
    if (!tt_shared_path(src, sizeof src, "fixtures/models/gemma-tiny/model.safetensors")) skip();
    char *a;
    size_t la;
    TT_OK(tuna_read_file(src, 0, &a, &la));
    const char *p = tmp_path("trunc.safetensors");
    for (size_t cut = 0; cut < la; cut += (cut < 4096 ? 97 : 50021)) {
        tt_write(p, a, cut);
        tuna_st_file *f;
        assert_int_not_equal(tuna_st_open(p, &f), TUNA_OK);
    }
    free(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_all_dtypes), cmocka_unit_test(test_rewrite_fixture_identical),
        cmocka_unit_test(test_sharded),             cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_truncations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
