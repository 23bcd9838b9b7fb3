/* test_gguf_lora.c — `tuna export gguf --lora` (merge, then convert) and GGUF LoRA adapter files
 * (`tuna export gguf-lora`), on the fixture PEFT adapters fixtures/lora/llama-tiny{,-rslora}:
 *  - the merged GGUF is byte-identical to `tuna export merged-16bit` followed by
 *    `tuna export gguf` on the merged folder (f32, q8_0, q4_k_m), and differs from the plain
 *    base export in exactly the adapted tensors;
 *  - the GGUF LoRA file read back with tuna's GGUF reader has llama.cpp's metadata (types
 *    included), names, ne, types, and values: lora_a = PEFT's A; llama.cpp's alpha/r · lora_b =
 *    PEFT's scale · B with llama q/k rows in the interleaved order (row 2i + s of a head = HF row
 *    i + s·head_dim/2), read from adapter_model.safetensors and adapter_config.json directly;
 *  - f16 files, a module with an alpha_pattern-like alpha, refusals.
 * The llama.cpp run of these files is scripts/check_gguf_llamacpp.sh (docs/GGUF.md). */
#include "testutil.h"

#include <math.h>

#include <cjson/cJSON.h>

#include "core/file.h"
#include "core/json.h"
#include "export/export.h"
#include "gguf/export.h"
#include "gguf/quants.h"

static const char *const k_adapters[] = {"llama-tiny", "llama-tiny-rslora"};

static bool paths(const char *adapter, char *model, char *ad, size_t cap)
{
    char rel[256];
    snprintf(rel, sizeof rel, "fixtures/lora/%s/adapter", adapter);
    if (!tt_shared_path(ad, cap, rel)) return false;
    return tt_shared_path(model, cap, "fixtures/models/llama-tiny") != NULL;
}

static void read_all(const char *path, char **data, size_t *len) { TT_OK(tuna_read_file(path, (size_t)1 << 30, data, len)); }

static void test_merge_equals_merged16(void **state)
{
    (void)state;
    char model[4096], ad[4096], merged[4300], a[4300], b[4300], c[4300];
    static const char *const quants[] = {"f32", "q8_0", "q4_k_m"};
    for (size_t ai = 0; ai < sizeof k_adapters / sizeof *k_adapters; ai++) {
        if (!paths(k_adapters[ai], model, ad, sizeof model)) skip();
        struct tuna_lora_adapter *lo;
        TT_OK(tuna_lora_load(ad, &lo));
        snprintf(merged, sizeof merged, "%s/merged-%s", tt_tmpdir(), k_adapters[ai]);
        struct tuna_merge_opts mo = {.replace = true};
        TT_OK(tuna_export_merged_16bit(model, lo, &mo, merged, NULL));
        for (size_t qi = 0; qi < sizeof quants / sizeof *quants; qi++) {
            struct tuna_gguf_export_opts o = {.name = "x", .quiet = true};
            assert_true(tuna_gguf_ftype_parse(quants[qi], &o.ftype));
            snprintf(c, sizeof c, "%s/base-%s.gguf", tt_tmpdir(), quants[qi]);
            TT_OK(tuna_gguf_export(model, &o, c));
            snprintf(b, sizeof b, "%s/m16-%s-%s.gguf", tt_tmpdir(), k_adapters[ai], quants[qi]);
            TT_OK(tuna_gguf_export(merged, &o, b));
            o.lora = lo;
            snprintf(a, sizeof a, "%s/lora-%s-%s.gguf", tt_tmpdir(), k_adapters[ai], quants[qi]);
            TT_OK(tuna_gguf_export(model, &o, a));
            char *da, *db;
            size_t la, lb;
            read_all(a, &da, &la);
            read_all(b, &db, &lb);
            if (la != lb || memcmp(da, db, la) != 0) {
                print_error("%s: export gguf --lora %s differs from merged-16bit + export gguf\n", k_adapters[ai], quants[qi]);
                fail();
            }
            free(da);
            free(db);
            /* the merge happened: exactly the adapted tensors differ from the base export */
            tuna_gguf *ga, *gc;
            TT_OK(tuna_gguf_open(a, &ga));
            TT_OK(tuna_gguf_open(c, &gc));
            assert_int_equal(tuna_gguf_tensor_count(ga), tuna_gguf_tensor_count(gc));
            int ndiff = 0;
            for (size_t i = 0; i < tuna_gguf_tensor_count(ga); i++) {
                const struct tuna_gguf_tensor *ta = tuna_gguf_tensor_at(ga, i);
                const struct tuna_gguf_tensor *tc = tuna_gguf_find_tensor(gc, ta->name);
                assert_non_null(tc);
                assert_int_equal(ta->type, tc->type);
                assert_int_equal(ta->nbytes, tc->nbytes);
                bool diff = memcmp(ta->data, tc->data, ta->nbytes) != 0;
                bool adapted = strstr(ta->name, "blk.") && !strstr(ta->name, "norm");
                if (diff != adapted) {
                    print_error("%s %s: tensor %s %s\n", k_adapters[ai], quants[qi], ta->name,
                                diff ? "changed but is not adapted" : "unchanged but is adapted");
                    fail();
                }
                ndiff += diff;
            }
            assert_int_equal(ndiff, lo->n_modules);
            tuna_gguf_close(ga);
            tuna_gguf_close(gc);
        }
        tuna_lora_free(lo);
    }
}

/* The HF row of GGUF row g of a llama q/k weight with heads of hd rows (llama.cpp's order). */
static int64_t hf_row(int64_t g, int64_t hd)
{
    int64_t h = g / hd, j = g % hd;
    return h * hd + j / 2 + (j % 2) * (hd / 2);
}

static void check_kv_str(tuna_gguf *g, const char *key, const char *want)
{
    struct tuna_gguf_str s;
    TT_OK(tuna_gguf_get_str(g, key, &s));
    if (s.len != strlen(want) || memcmp(s.p, want, s.len) != 0) {
        print_error("%s = '%.*s', wanted '%s'\n", key, (int)s.len, s.p, want);
        fail();
    }
}

static float tensor_val(const struct tuna_gguf_tensor *t, size_t i)
{
    if (t->type == TUNA_GGML_F32) return ((const float *)t->data)[i];
    if (t->type == TUNA_GGML_F16) return tuna_f16_to_f32(((const uint16_t *)t->data)[i]);
    return tuna_bf16_to_f32(((const uint16_t *)t->data)[i]);
}

/* Checks file `path` against the PEFT adapter folder ad (read directly), for the base llama-tiny.
 * alpha_mul: module `odd` has alpha × alpha_mul in the exported adapter. tol: relative value
 * tolerance, atol: absolute (f16 subnormals). */
static void check_lora_file(const char *path, const char *ad, uint32_t type, double tol, double atol, const char *odd, double alpha_mul,
                            int *n_folded_expected)
{
    char p[4300];
    snprintf(p, sizeof p, "%s/adapter_config.json", ad);
    cJSON *cfg;
    TT_OK(tuna_json_load(p, 0, &cfg));
    double alpha = cJSON_GetObjectItem(cfg, "lora_alpha")->valuedouble;
    int64_t r = (int64_t)cJSON_GetObjectItem(cfg, "r")->valuedouble;
    cJSON *rs = cJSON_GetObjectItem(cfg, "use_rslora");
    bool rslora = cJSON_IsTrue(rs);
    cJSON_Delete(cfg);
    tuna_st_set *st;
    TT_OK(tuna_st_set_open(ad, "adapter_model", &st));
    tuna_gguf *g;
    TT_OK(tuna_gguf_open(path, &g));
    check_kv_str(g, "general.type", "adapter");
    check_kv_str(g, "adapter.type", "lora");
    check_kv_str(g, "general.architecture", "llama");
    const struct tuna_gguf_kv *kv = tuna_gguf_find(g, "adapter.lora.alpha");
    assert_non_null(kv);
    assert_int_equal(kv->type, TUNA_GGUF_FLOAT32);
    float falpha;
    TT_OK(tuna_gguf_get_f32(g, "adapter.lora.alpha", &falpha));
    assert_true(falpha == (float)alpha);
    size_t n_st = tuna_st_set_count(st);
    assert_int_equal(tuna_gguf_tensor_count(g), n_st);
    char model[4096];
    assert_non_null(tt_shared_path(model, sizeof model, "fixtures/models/llama-tiny"));
    struct tuna_arch arch;
    memset(&arch, 0, sizeof arch);
    TT_OK(tuna_arch_load(model, &arch));
    int64_t hd = arch.head_dim;
    tuna_arch_free(&arch);
    int folded = 0;
    for (size_t i = 0; i < n_st; i++) {
        const struct tuna_tensor_view *tA = tuna_st_set_at(st, i);
        const char *pre = "base_model.model.", *suf = ".lora_A.weight";
        if (!strstr(tA->name, suf)) continue;
        char mod[256], hf[300], gg[64], name[80], bname[300];
        size_t ml = strlen(tA->name) - strlen(pre) - strlen(suf);
        memcpy(mod, tA->name + strlen(pre), ml);
        mod[ml] = '\0';
        snprintf(bname, sizeof bname, "%s%s.lora_B.weight", pre, mod);
        const struct tuna_tensor_view *tB = tuna_st_set_find(st, bname);
        assert_non_null(tB);
        snprintf(hf, sizeof hf, "%s.weight", mod);
        assert_true(tuna_gguf_tensor_name(hf, gg, sizeof gg));
        snprintf(name, sizeof name, "%s.lora_a", gg);
        const struct tuna_gguf_tensor *ga = tuna_gguf_find_tensor(g, name);
        snprintf(name, sizeof name, "%s.lora_b", gg);
        const struct tuna_gguf_tensor *gb = tuna_gguf_find_tensor(g, name);
        assert_non_null(ga);
        assert_non_null(gb);
        int64_t rk = tA->shape[0], in = tA->shape[1], out = tB->shape[0];
        assert_int_equal(rk, r);
        assert_int_equal(ga->type, type);
        assert_int_equal(gb->type, type);
        assert_int_equal(ga->n_dims, 2);
        assert_int_equal(gb->n_dims, 2);
        assert_int_equal(ga->ne[0], in);
        assert_int_equal(ga->ne[1], rk);
        assert_int_equal(gb->ne[0], rk);
        assert_int_equal(gb->ne[1], out);
        float *A = malloc(sizeof(float) * tA->numel), *B = malloc(sizeof(float) * tB->numel);
        TT_OK(tuna_tensor_to_f32(tA, A));
        TT_OK(tuna_tensor_to_f32(tB, B));
        double mal = odd && !strcmp(mod, odd) ? alpha_mul : 1.0;
        double peft = alpha * mal / (rslora ? sqrt((double)rk) : (double)rk);
        double lcpp = (double)(falpha / (float)rk);
        for (int64_t k = 0; k < rk * in; k++)
            if (fabs(tensor_val(ga, (size_t)k) - A[k]) > tol * fabs(A[k]) + atol) {
                print_error("%s lora_a[%lld]: %g, PEFT %g\n", mod, (long long)k, (double)tensor_val(ga, (size_t)k), (double)A[k]);
                fail();
            }
        bool qk = strstr(mod, "q_proj") || strstr(mod, "k_proj");
        int nbad = 0;
        for (int64_t row = 0; row < out; row++)
            for (int64_t j = 0; j < rk; j++) {
                double want = peft * B[(qk ? hf_row(row, hd) : row) * rk + j];
                double got = lcpp * tensor_val(gb, (size_t)(row * rk + j));
                nbad += fabs(got - want) > tol * fabs(want) + atol * lcpp;
            }
        if (nbad) {
            print_error("%s: llama.cpp's scale × lora_b vs PEFT's scale × B: %d values differ by more than %g relative\n",
                        mod, nbad, tol);
            fail();
        }
        folded += fabs(peft - lcpp) > 1e-7 * peft;
        free(A);
        free(B);
    }
    *n_folded_expected = folded;
    tuna_gguf_close(g);
    tuna_st_set_close(st);
}

static void test_lora_file(void **state)
{
    (void)state;
    char model[4096], ad[4096], out[4300];
    for (size_t ai = 0; ai < sizeof k_adapters / sizeof *k_adapters; ai++) {
        if (!paths(k_adapters[ai], model, ad, sizeof model)) skip();
        struct tuna_lora_adapter *lo;
        TT_OK(tuna_lora_load(ad, &lo));
        static const struct {
            enum tuna_gguf_ftype ft;
            uint32_t type;
            double tol, atol;
        } types[] = {{TUNA_GGUF_FT_F32, TUNA_GGML_F32, 1e-6, 0},
                     {TUNA_GGUF_FT_F16, TUNA_GGML_F16, 1e-3, 3e-8}, /* half the f16 subnormal step */
                     {TUNA_GGUF_FT_BF16, TUNA_GGML_BF16, 8e-3, 0}};
        for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++) {
            struct tuna_gguf_lora_opts o = {.ftype = types[ti].ft, .quiet = true};
            struct tuna_gguf_lora_report rep;
            snprintf(out, sizeof out, "%s/%s-%zu.lora.gguf", tt_tmpdir(), k_adapters[ai], ti);
            TT_OK(tuna_gguf_export_lora(model, lo, &o, out, &rep));
            assert_int_equal(rep.n_modules, lo->n_modules);
            int folded;
            check_lora_file(out, ad, types[ti].type, types[ti].tol, types[ti].atol, NULL, 1.0, &folded);
            assert_int_equal(rep.n_folded, folded);
            /* rsLoRA (r=16, alpha=8): PEFT's 8/4 vs llama.cpp's 8/16 in every module */
            assert_int_equal(folded, ai == 1 ? lo->n_modules : 0);
        }
        tuna_lora_free(lo);
    }
}

/* A module whose alpha differs from lora_alpha (as alpha_pattern gives it): its B is scaled. */
static void test_lora_alpha_pattern(void **state)
{
    (void)state;
    char model[4096], ad[4096], out[4300];
    if (!paths("llama-tiny", model, ad, sizeof model)) skip();
    struct tuna_lora_adapter *lo;
    TT_OK(tuna_lora_load(ad, &lo));
    struct tuna_lora_module *m = &lo->modules[1];
    m->alpha *= 3;
    m->scale = tuna_lora_scale(m->alpha, m->r, lo->use_rslora);
    struct tuna_gguf_lora_opts o = {.ftype = TUNA_GGUF_FT_F32, .quiet = true};
    struct tuna_gguf_lora_report rep;
    snprintf(out, sizeof out, "%s/alpha-pattern.lora.gguf", tt_tmpdir());
    TT_OK(tuna_gguf_export_lora(model, lo, &o, out, &rep));
    assert_int_equal(rep.n_folded, 1);
    int folded;
    check_lora_file(out, ad, TUNA_GGML_F32, 1e-6, 0, m->name, 3.0, &folded);
    assert_int_equal(folded, 1);
    tuna_lora_free(lo);
}

static void test_lora_refusals(void **state)
{
    (void)state;
    char model[4096], ad[4096], out[4300], tied[4096];
    if (!paths("llama-tiny", model, ad, sizeof model)) skip();
    if (!tt_shared_path(tied, sizeof tied, "fixtures/models/qwen2-tiny")) skip();
    struct tuna_lora_adapter *lo;
    TT_OK(tuna_lora_load(ad, &lo));
    struct tuna_gguf_lora_opts o = {.ftype = TUNA_GGUF_FT_Q8_0, .quiet = true};
    snprintf(out, sizeof out, "%s/refused.gguf", tt_tmpdir());
    TT_FAILS(tuna_gguf_export_lora(model, lo, &o, out, NULL), TUNA_E_UNSUPPORTED, "f32, f16 or bf16");
    o.ftype = TUNA_GGUF_FT_F32;
    /* a module the base does not have */
    free(lo->modules[0].name);
    lo->modules[0].name = strdup("model.layers.7.mlp.down_proj");
    TT_FAILS(tuna_gguf_export_lora(model, lo, &o, out, NULL), TUNA_E_INVALID, "has no tensor model.layers.7.mlp.down_proj.weight");
    struct tuna_gguf_export_opts eo = {.ftype = TUNA_GGUF_FT_F32, .quiet = true, .lora = lo};
    TT_FAILS(tuna_gguf_export(model, &eo, out), TUNA_E_INVALID, "has no tensor model.layers.7.mlp.down_proj.weight");
    tuna_lora_free(lo);
    /* a module of another shape: the llama-tiny adapter on qwen2-tiny, whose shapes differ or match */
    TT_OK(tuna_lora_load(ad, &lo));
    char out2[4300];
    snprintf(out2, sizeof out2, "%s/other-base.gguf", tt_tmpdir());
    tuna_status st = tuna_gguf_export_lora(tied, lo, &o, out2, NULL);
    if (st) assert_non_null(strstr(tuna_last_error(), "another base model"));
    tuna_lora_free(lo);
    /* lm_head on a model whose output is tied to the embeddings (qwen2-tiny) */
    float one = 1.0f;
    struct tuna_lora_module lm = {.name = (char *)"lm_head", .r = 1, .in = 1, .out = 1, .alpha = 1, .scale = 1, .A = &one, .B = &one};
    struct tuna_lora_adapter fake = {.r = 1, .alpha = 1, .modules = &lm, .n_modules = 1};
    TT_FAILS(tuna_gguf_export_lora(tied, &fake, &o, out, NULL), TUNA_E_UNSUPPORTED, "ties its output");
    eo.lora = &fake;
    TT_FAILS(tuna_gguf_export(tied, &eo, out), TUNA_E_UNSUPPORTED, "ties its output");
    assert_false(tuna_path_exists(out));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_merge_equals_merged16),
        cmocka_unit_test(test_lora_file),
        cmocka_unit_test(test_lora_alpha_pattern),
        cmocka_unit_test(test_lora_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
