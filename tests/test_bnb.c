/* test_bnb.c — reading the pre-quantized bitsandbytes checkpoints of the fixtures, re-creating
 * them from the 16-bit models (tensor for tensor, byte for byte), `tuna quantize` on a folder,
 * and the refusals (8-bit, non-uint8 storage, bad quant_state). */
#include "testutil.h"

#include <math.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "quant/bnb.h"

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Quantizes the source weight with the checkpoint's settings and compares every stored byte: all
 * must be equal (the GPU's approximate reciprocal is emulated, see quant/rcp_approx.h). */
static void compare_requantized(const struct tuna_tensor_view *src, const struct tuna_q4_weight *ck)
{
    struct tuna_q4_weight w;
    assert_int_equal(src->ndim, 2);
    assert_int_equal(src->shape[0], ck->rows);
    assert_int_equal(src->shape[1], ck->cols);
    TT_OK(tuna_q4_quantize(src->data, src->dtype, ck->rows, ck->cols, ck->type, ck->blocksize, ck->nested, ck->dtype,
                           &w));
    int64_t bad = 0;
    float *x = malloc(sizeof(float) * (size_t)w.numel);
    assert_non_null(x);
    tuna_convert_to_f32(src->dtype, src->data, x, (size_t)w.numel);
    for (int64_t i = 0; i < w.numel; i++) {
        int sh = (i & 1) ? 0 : 4;
        int a = (w.codes[i / 2] >> sh) & 15, b = (ck->codes[i / 2] >> sh) & 15;
        if (a == b) continue;
        if (bad < 3) print_error("%s element %lld: code %d, checkpoint %d\n", src->name, (long long)i, a, b);
        bad++;
    }
    free(x);
    if (ck->nested) {
        assert_memory_equal(w.qabsmax, ck->qabsmax, (size_t)w.n_blocks);
        assert_memory_equal(w.nested_absmax, ck->nested_absmax, sizeof(float) * (size_t)w.n_nested);
        assert_memory_equal(w.nested_code, ck->nested_code, sizeof w.nested_code);
        assert_int_equal(fbits(w.nested_offset), fbits(ck->nested_offset));
    }
    for (int64_t b = 0; b < w.n_blocks; b++)
        if (fbits(w.absmax[b]) != fbits(ck->absmax[b])) {
            if (bad < 3) print_error("%s absmax[%lld]: %.9g vs %.9g\n", src->name, (long long)b, w.absmax[b], ck->absmax[b]);
            bad++;
        }
    assert_memory_equal(w.code, ck->code, sizeof w.code);
    char *js = tuna_bnb_quant_state_json(&w);
    char *jc = tuna_bnb_quant_state_json(ck);
    assert_string_equal(js, jc);
    free(js);
    free(jc);
    tuna_q4_weight_free(&w);
    if (bad) fail_msg("%s: %lld mismatches", src->name, (long long)bad);
}

/* Reads every quantized weight of a bnb fixture; checks its JSON round-trips byte for byte and
 * the dequantized values are finite and within the block scale; when src is given, re-quantizes
 * the 16-bit source weights and compares. */
static void check_checkpoint(const char *rel, const char *src_rel, int *nweights)
{
    char path[4096], spath[4096];
    if (!tt_shared_path(path, sizeof path, rel)) skip();
    tuna_st_set *set = NULL, *src = NULL;
    TT_OK(tuna_st_set_open(path, "model", &set));
    assert_true(tuna_bnb_is_4bit(set));
    TT_OK(tuna_bnb_check_not_int8(set));
    if (src_rel && tt_shared_path(spath, sizeof spath, src_rel)) TT_OK(tuna_st_set_open(spath, "model", &src));
    int n = 0;
    for (size_t i = 0; i < tuna_st_set_count(set); i++) {
        const struct tuna_tensor_view *t = tuna_st_set_at(set, i);
        if (!tuna_bnb_is_quantized_weight(set, t->name)) {
            if (!tuna_bnb_is_state_tensor(t->name)) assert_true(tuna_dtype_is_float(t->dtype));
            continue;
        }
        struct tuna_q4_weight w;
        TT_OK(tuna_bnb_load_weight(set, t->name, &w));
        /* the stored quant_state JSON is what we would write */
        char qs[1024];
        snprintf(qs, sizeof qs, "%s.quant_state.bitsandbytes__%s", t->name, tuna_q4_type_name(w.type));
        const struct tuna_tensor_view *q = tuna_st_set_find(set, qs);
        assert_non_null(q);
        char *js = tuna_bnb_quant_state_json(&w);
        assert_int_equal(strlen(js), q->nbytes);
        assert_memory_equal(js, q->data, q->nbytes);
        free(js);
        float *row = malloc(sizeof(float) * (size_t)w.cols);
        assert_non_null(row);
        for (int64_t r = 0; r < w.rows; r++) {
            tuna_q4_dequantize_row(&w, r, row);
            for (int64_t c = 0; c < w.cols; c++) {
                float a = w.absmax[(r * w.cols + c) / w.blocksize];
                if (!isfinite(row[c]) || fabsf(row[c]) > a * 1.0000001f) fail_msg("%s[%lld,%lld] = %g", t->name, (long long)r, (long long)c, row[c]);
            }
        }
        free(row);
        if (src) {
            const struct tuna_tensor_view *s = tuna_st_set_find(src, t->name);
            assert_non_null(s);
            compare_requantized(s, &w);
        }
        tuna_q4_weight_free(&w);
        n++;
    }
    print_message("%s: %d quantized weights%s\n", rel, n, src ? ", re-quantized from the 16-bit model, every byte equal" : "");
    assert_true(n > 0);
    *nweights += n;
    tuna_st_set_close(src);
    tuna_st_set_close(set);
}

static void test_read_fixtures(void **state)
{
    (void)state;
    int n = 0;
    check_checkpoint("fixtures/bnb/llama-tiny-bnb-nf4-dq", "fixtures/models/llama-tiny", &n);
    check_checkpoint("fixtures/bnb/llama-tiny-bnb-fp4", "fixtures/models/llama-tiny", &n);
    check_checkpoint("fixtures/bnb/qwen2-tiny-bnb-nf4-dq", "fixtures/models/qwen2-tiny", &n);
    check_checkpoint("fixtures/bnb/pymini-bnb-nf4-dq", "fixtures/models/pymini", &n);
    assert_true(n >= 4 * 14);
}

/* Quantizing a 16-bit fixture model reproduces its bnb fixture: every tensor, config.json and
 * model.safetensors byte for byte. */
static void quantize_and_compare(const char *src_rel, enum tuna_q4_type type, bool dq, const char *fixture)
{
    char src[4096], ref[4096], out[4200];
    if (!tt_shared_path(src, sizeof src, src_rel)) skip();
    if (!tt_shared_path(ref, sizeof ref, fixture)) skip();
    snprintf(out, sizeof out, "%s/q-%s-%d-%s", tt_tmpdir(), tuna_q4_type_name(type), dq, strrchr(src_rel, '/') + 1);
    struct tuna_bnb_quantize_opts o = {.type = type, .double_quant = dq, .blocksize = 64, .dtype = TUNA_DTYPE_F32};
    TT_OK(tuna_bnb_quantize_dir(src, out, &o));
    tuna_st_set *a = NULL, *b = NULL;
    TT_OK(tuna_st_set_open(out, "model", &a));
    TT_OK(tuna_st_set_open(ref, "model", &b));
    assert_int_equal(tuna_st_set_count(a), tuna_st_set_count(b));
    for (size_t i = 0; i < tuna_st_set_count(b); i++) {
        const struct tuna_tensor_view *tb = tuna_st_set_at(b, i), *ta = tuna_st_set_find(a, tb->name);
        if (!ta) fail_msg("%s missing from our output", tb->name);
        assert_int_equal(ta->dtype, tb->dtype);
        assert_int_equal(ta->ndim, tb->ndim);
        assert_memory_equal(ta->shape, tb->shape, sizeof(int64_t) * (size_t)tb->ndim);
        assert_int_equal(ta->nbytes, tb->nbytes);
        if (memcmp(ta->data, tb->data, tb->nbytes) != 0) fail_msg("%s differs from the bitsandbytes checkpoint", tb->name);
    }
    tuna_st_set_close(a);
    tuna_st_set_close(b);
    char pa[4300], pb[4300];
    snprintf(pa, sizeof pa, "%s/config.json", out);
    snprintf(pb, sizeof pb, "%s/config.json", ref);
    char *ta = NULL, *tb = NULL;
    size_t la, lb;
    TT_OK(tuna_read_file(pa, 0, &ta, &la));
    TT_OK(tuna_read_file(pb, 0, &tb, &lb));
    if (la != lb || memcmp(ta, tb, la) != 0) fail_msg("config.json differs:\n%s\n--- vs ---\n%s", ta, tb);
    free(ta);
    free(tb);
    { /* the whole file is the one transformers wrote */
        snprintf(pa, sizeof pa, "%s/model.safetensors", out);
        snprintf(pb, sizeof pb, "%s/model.safetensors", ref);
        TT_OK(tuna_read_file(pa, 0, &ta, &la));
        TT_OK(tuna_read_file(pb, 0, &tb, &lb));
        assert_int_equal(la, lb);
        assert_memory_equal(ta, tb, la);
        free(ta);
        free(tb);
    }
    snprintf(pa, sizeof pa, "%s/tokenizer.json", out);
    assert_true(tuna_path_exists(pa));
    print_message("quantize %s %s: model.safetensors and config.json byte-identical to %s\n", src_rel,
                  tuna_q4_type_name(type), fixture);
    /* the output folder must not be overwritten */
    TT_FAILS(tuna_bnb_quantize_dir(src, out, &o), TUNA_E_INVALID, "already exists");
}

static void test_quantize_dir(void **state)
{
    (void)state;
    quantize_and_compare("fixtures/models/llama-tiny", TUNA_Q4_NF4, true, "fixtures/bnb/llama-tiny-bnb-nf4-dq");
    quantize_and_compare("fixtures/models/llama-tiny", TUNA_Q4_FP4, false, "fixtures/bnb/llama-tiny-bnb-fp4");
    quantize_and_compare("fixtures/models/qwen2-tiny", TUNA_Q4_NF4, true, "fixtures/bnb/qwen2-tiny-bnb-nf4-dq");
    quantize_and_compare("fixtures/models/pymini", TUNA_Q4_NF4, true, "fixtures/bnb/pymini-bnb-nf4-dq");
}

/* writer → reader round trip for every layout: both types, plain and nested, several block
 * sizes, a shape whose blocks straddle rows and an odd element count. */
static void test_roundtrip(void **state)
{
    (void)state;
    int64_t rows = 7, cols = 301;
    float *x = malloc(sizeof(float) * (size_t)(rows * cols)), *a = malloc(sizeof(float) * (size_t)cols),
          *b = malloc(sizeof(float) * (size_t)cols);
    assert_non_null(x);
    assert_non_null(a);
    assert_non_null(b);
    uint32_t r = 7;
    for (int64_t i = 0; i < rows * cols; i++) {
        r = r * 1664525u + 1013904223u;
        x[i] = ((float)(r >> 8) / 16777216.0f - 0.5f) * (float)(1 + i % 5);
    }
    const int sizes[] = {32, 64, 128, 4096};
    int n = 0;
    for (int t = 0; t < 2; t++)
        for (int dq = 0; dq < 2; dq++)
            for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
                struct tuna_q4_weight w, g;
                TT_OK(tuna_q4_quantize(x, TUNA_DTYPE_F32, rows, cols, (enum tuna_q4_type)t, sizes[k], dq,
                                       TUNA_DTYPE_BF16, &w));
                tuna_st_writer *wr = NULL;
                TT_OK(tuna_st_writer_new(&wr));
                TT_OK(tuna_bnb_writer_add(wr, "model.layers.0.mlp.up_proj.weight", &w));
                char p[4200];
                snprintf(p, sizeof p, "%s/rt-%d-%d-%d.safetensors", tt_tmpdir(), t, dq, sizes[k]);
                TT_OK(tuna_st_writer_save(wr, p));
                tuna_st_writer_free(wr);
                tuna_st_set *s = NULL;
                TT_OK(tuna_st_set_open_file(p, &s));
                assert_true(tuna_bnb_is_4bit(s));
                TT_OK(tuna_bnb_load_weight(s, "model.layers.0.mlp.up_proj.weight", &g));
                assert_int_equal(g.type, w.type);
                assert_int_equal(g.blocksize, w.blocksize);
                assert_int_equal(g.nested, w.nested);
                assert_int_equal(g.dtype, TUNA_DTYPE_BF16);
                assert_memory_equal(g.codes, w.codes, (size_t)(w.numel + 1) / 2);
                assert_memory_equal(g.absmax, w.absmax, sizeof(float) * (size_t)w.n_blocks);
                if (dq) assert_int_equal(fbits(g.nested_offset), fbits(w.nested_offset));
                for (int64_t row = 0; row < rows; row++) {
                    tuna_q4_dequantize_row(&w, row, a);
                    tuna_q4_dequantize_row(&g, row, b);
                    assert_memory_equal(a, b, sizeof(float) * (size_t)cols);
                    /* bf16 output: every value is a bf16 */
                    for (int64_t c = 0; c < cols; c++) assert_true(tuna_bf16_to_f32(tuna_f32_to_bf16(b[c])) == b[c]);
                }
                tuna_q4_weight_free(&g);
                tuna_st_set_close(s);
                tuna_q4_weight_free(&w);
                n++;
            }
    assert_int_equal(n, 16);
    free(x);
    free(a);
    free(b);
}

static void test_py_repr(void **state)
{
    (void)state;
    char b[64];
    struct { double d; const char *s; } cases[] = {
        {0.20469284057617188, "0.20469284057617188"}, {6.0, "6.0"}, {1e-05, "1e-05"}, {0.0001, "0.0001"},
        {500000.0, "500000.0"}, {1e16, "1e+16"}, {-0.5, "-0.5"}, {0.0, "0.0"}, {123.25, "123.25"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tuna_py_float_repr(cases[i].d, b, sizeof b);
        assert_string_equal(b, cases[i].s);
    }
}

/* Hand-made bad checkpoints: 8-bit, bf16 storage, bad JSON, sizes that disagree. */
static void write_case(const char *path, const char *json, enum tuna_dtype wdtype, int64_t wbytes, bool scb)
{
    tuna_st_writer *w = NULL;
    TT_OK(tuna_st_writer_new(&w));
    static uint8_t codes[4096];
    static float f[256];
    int64_t shp[2] = {wbytes / (wdtype == TUNA_DTYPE_BF16 ? 2 : 1), 1};
    TT_OK(tuna_st_writer_add(w, "l.weight", wdtype, 2, shp, codes, (size_t)wbytes, true));
    int64_t n = 2, n16 = 16;
    TT_OK(tuna_st_writer_add(w, "l.weight.absmax", TUNA_DTYPE_F32, 1, &n, f, 8, true));
    TT_OK(tuna_st_writer_add(w, "l.weight.quant_map", TUNA_DTYPE_F32, 1, &n16, f, 64, true));
    int64_t len = (int64_t)strlen(json);
    TT_OK(tuna_st_writer_add(w, "l.weight.quant_state.bitsandbytes__nf4", TUNA_DTYPE_U8, 1, &len, json, (size_t)len, true));
    if (scb) {
        int64_t one = 1;
        TT_OK(tuna_st_writer_add(w, "k.SCB", TUNA_DTYPE_F32, 1, &one, f, 4, true));
    }
    TT_OK(tuna_st_writer_save(w, path));
    tuna_st_writer_free(w);
}

static void test_refusals(void **state)
{
    (void)state;
    char p[4200];
    const char *ok = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [2, 64]}";
    struct tuna_q4_weight w;
    tuna_st_set *s = NULL;

    snprintf(p, sizeof p, "%s/good.safetensors", tt_tmpdir());
    write_case(p, ok, TUNA_DTYPE_U8, 64, false);
    TT_OK(tuna_st_set_open_file(p, &s));
    TT_OK(tuna_bnb_load_weight(s, "l.weight", &w));
    assert_int_equal(w.rows, 2);
    assert_int_equal(w.cols, 64);
    assert_int_equal(w.dtype, TUNA_DTYPE_BF16);
    tuna_q4_weight_free(&w);
    TT_FAILS(tuna_bnb_load_weight(s, "l.weight.absmax", &w), TUNA_E_FORMAT, "not a bitsandbytes 4-bit weight");
    TT_FAILS(tuna_bnb_load_weight(s, "nope.weight", &w), TUNA_E_NOT_FOUND, "nope.weight");
    tuna_st_set_close(s);

    snprintf(p, sizeof p, "%s/scb.safetensors", tt_tmpdir());
    write_case(p, ok, TUNA_DTYPE_U8, 64, true);
    TT_OK(tuna_st_set_open_file(p, &s));
    TT_FAILS(tuna_bnb_check_not_int8(s), TUNA_E_UNSUPPORTED, "k.SCB");
    tuna_st_set_close(s);

    snprintf(p, sizeof p, "%s/bf16.safetensors", tt_tmpdir());
    write_case(p, ok, TUNA_DTYPE_BF16, 64, false);
    TT_OK(tuna_st_set_open_file(p, &s));
    TT_FAILS(tuna_bnb_load_weight(s, "l.weight", &w), TUNA_E_UNSUPPORTED, "uint8");
    tuna_st_set_close(s);

    snprintf(p, sizeof p, "%s/short.safetensors", tt_tmpdir());
    write_case(p, ok, TUNA_DTYPE_U8, 62, false);
    TT_OK(tuna_st_set_open_file(p, &s));
    TT_FAILS(tuna_bnb_load_weight(s, "l.weight", &w), TUNA_E_FORMAT, "has 62 bytes");
    tuna_st_set_close(s);

    const char *bad[][2] = {
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [2, 64], \"x\": 1}", "unknown key"},
        {"{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [2, 64]}", "quant_type fp4"},
        {"{\"quant_type\": \"nf4\", \"dtype\": \"bfloat16\", \"shape\": [2, 64]}", "blocksize"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [2, 64]}", "dtype int8"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [2, -64]}", "shape"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 32, \"dtype\": \"bfloat16\", \"shape\": [2, 64]}", "absmax"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [2, 64], "
         "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.1}", "absmax"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64", "JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(p, sizeof p, "%s/bad%zu.safetensors", tt_tmpdir(), i);
        write_case(p, bad[i][0], TUNA_DTYPE_U8, 64, false);
        TT_OK(tuna_st_set_open_file(p, &s));
        tuna_clear_error();
        tuna_status st = tuna_bnb_load_weight(s, "l.weight", &w);
        if (st == TUNA_OK || !strstr(tuna_last_error(), bad[i][1]))
            fail_msg("case %zu: got %s \"%s\", wanted a message with \"%s\"", i, tuna_status_name(st), tuna_last_error(),
                     bad[i][1]);
        tuna_st_set_close(s);
    }
}

static void test_should_quantize(void **state)
{
    (void)state;
    assert_true(tuna_bnb_should_quantize("model.layers.0.self_attn.q_proj.weight", 2, NULL, 0));
    assert_false(tuna_bnb_should_quantize("model.layers.0.self_attn.q_proj.bias", 1, NULL, 0));
    assert_false(tuna_bnb_should_quantize("model.layers.0.input_layernorm.weight", 1, NULL, 0));
    assert_false(tuna_bnb_should_quantize("model.embed_tokens.weight", 2, NULL, 0));
    assert_false(tuna_bnb_should_quantize("lm_head.weight", 2, NULL, 0));
    assert_false(tuna_bnb_should_quantize("model.layers.0.self_attn.q_norm.weight", 1, NULL, 0));
    const char *skip[] = {"model.layers.0.self_attn", "mlp.down_proj"};
    assert_false(tuna_bnb_should_quantize("model.layers.0.self_attn.k_proj.weight", 2, skip, 2));
    assert_true(tuna_bnb_should_quantize("model.layers.1.self_attn.k_proj.weight", 2, skip, 2));
    assert_false(tuna_bnb_should_quantize("model.layers.1.mlp.down_proj.weight", 2, skip, 2));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_py_repr),
        cmocka_unit_test(test_should_quantize),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_read_fixtures),
        cmocka_unit_test(test_quantize_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
