/* test_export.c — exports, each re-loaded: PEFT adapter folders (round trip of the fixtures, the
 * float32 C API with rank/alpha patterns and target derivation), merged-16bit against PEFT's
 * merge_and_unload() (fixtures/lora/<name>/merged: every tensor equal or within 1 bf16 ulp),
 * sharding and index kept, merges from a 4-bit base (dequantized, or into --base-16bit), and
 * merged-4bit = `tuna quantize` of the 16-bit merge. */
#include "testutil.h"

#include <math.h>

#include "core/file.h"
#include "core/json.h"
#include "export/export.h"
#include "io/safetensors.h"
#include "lora/lora.h"
#include "model/model.h"
#include "quant/bnb.h"

static const char *k_adapters[] = {"llama-tiny", "llama-tiny-rslora"};

static char *read_all(const char *path, size_t *n)
{
    char *buf = NULL;
    TT_OK(tuna_read_file(path, 0, &buf, n));
    return buf;
}

static bool files_equal(const char *a, const char *b)
{
    size_t na, nb;
    char *x = read_all(a, &na), *y = read_all(b, &nb);
    bool eq = na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return eq;
}

static const char *fx(char *buf, size_t cap, const char *rel)
{
    return tt_shared_path(buf, cap, rel);
}

static void out_path(char *buf, size_t cap, const char *name)
{
    int n = snprintf(buf, cap, "%s/%s", tt_tmpdir(), name);
    assert_true(n > 0 && (size_t)n < cap);
}

/* --- adapters --- */

static void test_adapter_roundtrip(void **state)
{
    (void)state;
    for (int ai = 0; ai < 2; ai++) {
        char rel[256], dir[4096], out[4200], p1[4300], p2[4300];
        snprintf(rel, sizeof rel, "fixtures/lora/%s/adapter", k_adapters[ai]);
        if (!fx(dir, sizeof dir, rel)) skip();
        struct tuna_lora_adapter *a, *b;
        TT_OK(tuna_lora_load(dir, &a));
        snprintf(rel, sizeof rel, "adapter-%s", k_adapters[ai]);
        out_path(out, sizeof out, rel);
        TT_OK(tuna_export_adapter(a, out, false));
        TT_FAILS(tuna_export_adapter(a, out, false), TUNA_E_INVALID, "already exists");
        TT_OK(tuna_export_adapter(a, out, true));
        TT_OK(tuna_lora_load(out, &b));
        assert_int_equal(b->n_modules, a->n_modules);
        assert_int_equal(b->r, a->r);
        assert_true(b->alpha == a->alpha);
        assert_int_equal(b->use_rslora, a->use_rslora);
        assert_int_equal(b->n_targets, a->n_targets);
        assert_string_equal(b->base_model, a->base_model);
        for (int i = 0; i < a->n_modules; i++) {
            const struct tuna_lora_module *x = &a->modules[i], *y = &b->modules[i];
            assert_string_equal(x->name, y->name);
            assert_int_equal(x->r, y->r);
            assert_true(x->scale == y->scale);
            assert_memory_equal(x->A, y->A, sizeof(float) * (size_t)(x->r * x->in));
            assert_memory_equal(x->B, y->B, sizeof(float) * (size_t)(x->out * x->r));
        }
        /* the tensors are PEFT's, byte for byte (names, F32 data) */
        snprintf(p1, sizeof p1, "%s/adapter_model.safetensors", dir);
        snprintf(p2, sizeof p2, "%s/adapter_model.safetensors", out);
        tuna_st_set *s1, *s2;
        TT_OK(tuna_st_set_open_file(p1, &s1));
        TT_OK(tuna_st_set_open_file(p2, &s2));
        assert_int_equal(tuna_st_set_count(s1), tuna_st_set_count(s2));
        for (size_t i = 0; i < tuna_st_set_count(s1); i++) {
            const struct tuna_tensor_view *t = tuna_st_set_at(s1, i), *u = tuna_st_set_find(s2, t->name);
            assert_non_null(u);
            assert_int_equal(t->nbytes, u->nbytes);
            assert_memory_equal(t->data, u->data, t->nbytes);
        }
        assert_string_equal(tuna_st_metadata(tuna_st_set_file(s2, 0), "format"), "pt");
        tuna_st_set_close(s1);
        tuna_st_set_close(s2);
        /* the config has what PEFT needs */
        snprintf(p2, sizeof p2, "%s/adapter_config.json", out);
        cJSON *cfg;
        TT_OK(tuna_json_load(p2, 0, &cfg));
        static const char *k_keys[] = {"peft_type",
                                       "task_type",
                                       "r",
                                       "lora_alpha",
                                       "target_modules",
                                       "bias",
                                       "use_rslora",
                                       "use_dora",
                                       "fan_in_fan_out",
                                       "modules_to_save",
                                       "rank_pattern",
                                       "alpha_pattern",
                                       "inference_mode",
                                       "base_model_name_or_path"};
        for (size_t k = 0; k < sizeof k_keys / sizeof k_keys[0]; k++)
            assert_non_null(cJSON_GetObjectItemCaseSensitive(cfg, k_keys[k]));
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(cfg, "task_type")->valuestring, "CAUSAL_LM");
        /* keys sorted, as PEFT writes them */
        const cJSON *prev = NULL;
        for (const cJSON *it = cfg->child; it; prev = it, it = it->next)
            if (prev) assert_true(strcmp(prev->string, it->string) < 0);
        cJSON_Delete(cfg);
        tuna_lora_free(a);
        tuna_lora_free(b);
    }
}

static void test_peft_c_api(void **state)
{
    (void)state;
    float A0[2 * 128], A1[4 * 128], A2[4 * 256], B0[128 * 2], B1[128 * 4], B2[128 * 4];
    float *arrs[6] = {A0, A1, A2, B0, B1, B2};
    size_t lens[6] = {2 * 128, 4 * 128, 4 * 256, 128 * 2, 128 * 4, 128 * 4};
    for (int k = 0; k < 6; k++)
        for (size_t i = 0; i < lens[k]; i++)
            arrs[k][i] = (float)sin(0.37 * (double)(i + 1000 * k)) * 0.1f;
    struct tuna_peft_module mods[3] = {
        {"model.layers.0.self_attn.q_proj", 2, 128, 128, 8, A0, B0},
        {"model.layers.1.self_attn.q_proj", 4, 128, 128, 32, A1, B1},
        {"model.layers.0.mlp.down_proj", 4, 256, 128, 8, A2, B2},
    };
    struct tuna_peft_config c = {.r = 4, .alpha = 8, .base_model = "models/llama-tiny"};
    char out[4200];
    out_path(out, sizeof out, "capi");
    TT_OK(tuna_export_peft(out, &c, mods, 3, false));
    struct tuna_lora_adapter *a;
    TT_OK(tuna_lora_load(out, &a));
    assert_int_equal(a->n_modules, 3);
    const struct tuna_lora_module *q0 = tuna_lora_find(a, mods[0].name), *q1 = tuna_lora_find(a, mods[1].name),
                                  *d0 = tuna_lora_find(a, mods[2].name);
    assert_int_equal(q0->r, 2);
    assert_true(q0->scale == 4.0f);                    /* 8 / 2 via rank_pattern */
    assert_true(q1->alpha == 32 && q1->scale == 8.0f); /* alpha_pattern */
    assert_true(d0->scale == 2.0f);
    assert_memory_equal(d0->A, A2, sizeof A2);
    assert_memory_equal(q0->B, B0, sizeof B0);
    /* down_proj only in layer 0: an exact regex, not a list that would adapt layer 1 too */
    assert_null(a->targets);
    assert_non_null(a->target_regex);
    assert_non_null(strstr(a->target_regex, "model\\.layers\\.0\\.mlp\\.down_proj"));
    tuna_lora_free(a);

    /* q_proj in every layer 0..1: the list PEFT users write; rsLoRA; BF16 file */
    c.use_rslora = true;
    c.dtype = TUNA_DTYPE_BF16;
    mods[0].r = 4;
    mods[0].A = A1;
    mods[0].B = B1;
    out_path(out, sizeof out, "capi-list");
    TT_OK(tuna_export_peft(out, &c, mods, 2, false));
    TT_OK(tuna_lora_load(out, &a));
    assert_int_equal(a->n_targets, 1);
    assert_string_equal(a->targets[0], "q_proj");
    assert_int_equal(a->file_dtype, TUNA_DTYPE_BF16);
    q0 = tuna_lora_find(a, mods[0].name);
    assert_true(q0->scale == 4.0f); /* 8 / sqrt(4) */
    for (size_t i = 0; i < sizeof A1 / sizeof A1[0]; i++)
        assert_true(q0->A[i] == tuna_bf16_to_f32(tuna_f32_to_bf16(A1[i])));
    tuna_lora_free(a);

    /* bad input */
    mods[1].name = mods[0].name;
    out_path(out, sizeof out, "capi-bad");
    TT_FAILS(tuna_export_peft(out, &c, mods, 2, false), TUNA_E_INVALID, "given twice");
    TT_FAILS(tuna_export_peft(out, &c, mods, 0, false), TUNA_E_INVALID, "no modules");
    assert_false(tuna_path_exists(out));
}

/* --- merged --- */

/* Compares every tensor of two model folders' weights: bf16/f16 within `max_ulp` units (< 0: any),
 * others counted. Returns the number of differing elements; *n_total the elements compared. */
static long long compare_models(const char *dir_a, const char *dir_b, int max_ulp, long long *n_total)
{
    tuna_st_set *a, *b;
    TT_OK(tuna_st_set_open(dir_a, "model", &a));
    TT_OK(tuna_st_set_open(dir_b, "model", &b));
    assert_int_equal(tuna_st_set_count(a), tuna_st_set_count(b));
    long long diff = 0, total = 0;
    for (size_t i = 0; i < tuna_st_set_count(a); i++) {
        const struct tuna_tensor_view *t = tuna_st_set_at(a, i), *u = tuna_st_set_find(b, t->name);
        if (!u) print_error("%s: tensor %s missing from %s\n", dir_a, t->name, dir_b);
        assert_non_null(u);
        assert_int_equal(t->dtype, u->dtype);
        assert_int_equal(t->nbytes, u->nbytes);
        if (t->dtype == TUNA_DTYPE_BF16 || t->dtype == TUNA_DTYPE_F16) {
            const uint16_t *x = t->data, *y = u->data;
            for (uint64_t k = 0; k < t->numel; k++) {
                int d = abs((int)x[k] - (int)y[k]);
                if (max_ulp >= 0 && d > max_ulp)
                    print_error("%s[%llu]: %04x vs %04x\n", t->name, (unsigned long long)k, x[k], y[k]);
                assert_true(max_ulp < 0 || d <= max_ulp);
                diff += d != 0;
            }
        } else {
            if (memcmp(t->data, u->data, t->nbytes) != 0) diff += (long long)t->numel;
        }
        total += (long long)t->numel;
    }
    tuna_st_set_close(a);
    tuna_st_set_close(b);
    *n_total = total;
    return diff;
}

static void assert_no_quant_config(const char *dir)
{
    char p[4300], *text;
    size_t n;
    snprintf(p, sizeof p, "%s/config.json", dir);
    text = read_all(p, &n);
    assert_null(strstr(text, "quantization_config"));
    free(text);
}

static float *logits_of(const char *dir, const int32_t *ids, int64_t T, int64_t *V)
{
    struct tuna_model *m;
    struct tuna_model_opts o = {.threads = 2, .max_model_len = 0};
    TT_OK(tuna_model_load(dir, &o, &m));
    *V = m->arch.vocab_size;
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, T, 0, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    struct tuna_batch b;
    tuna_batch_init(&b);
    TT_OK(tuna_batch_add_seq(&b, ids, T, seq, 0, true, false));
    float *lg = malloc(sizeof(float) * (size_t)(T * *V));
    TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    tuna_model_free(m);
    return lg;
}

static void test_merged16_fixture(void **state)
{
    (void)state;
    char base[4096], rel[256], adir[4096], ref[4096], out[4200], p1[4300], p2[4300];
    if (!fx(base, sizeof base, "fixtures/models/llama-tiny")) skip();
    for (int ai = 0; ai < 2; ai++) {
        snprintf(rel, sizeof rel, "fixtures/lora/%s/adapter", k_adapters[ai]);
        assert_non_null(fx(adir, sizeof adir, rel));
        snprintf(rel, sizeof rel, "fixtures/lora/%s/merged", k_adapters[ai]);
        assert_non_null(fx(ref, sizeof ref, rel));
        struct tuna_lora_adapter *a;
        TT_OK(tuna_lora_load(adir, &a));
        snprintf(rel, sizeof rel, "merged16-%s", k_adapters[ai]);
        out_path(out, sizeof out, rel);
        struct tuna_merge_report rep;
        struct tuna_merge_opts o = {0};
        TT_OK(tuna_export_merged_16bit(base, a, &o, out, &rep));
        assert_int_equal(rep.n_merged, 14);
        assert_int_equal(rep.n_files, 1);
        assert_false(rep.dequantized);
        long long total, diff = compare_models(out, ref, 1, &total);
        printf("  %-18s merged-16bit vs PEFT: %lld of %lld elements differ (each by 1 bf16 ulp)\n", k_adapters[ai],
               diff, total);
        /* and the export differs from the base: the merge happened */
        long long t2, changed = compare_models(out, base, -1, &t2);
        assert_true(changed > total / 2);
        assert_no_quant_config(out);
        static const char *k_copied[] = {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                         "chat_template.jinja"};
        for (size_t k = 0; k < sizeof k_copied / sizeof k_copied[0]; k++) {
            snprintf(p1, sizeof p1, "%s/%s", base, k_copied[k]);
            snprintf(p2, sizeof p2, "%s/%s", out, k_copied[k]);
            assert_true(files_equal(p1, p2));
        }
        snprintf(p2, sizeof p2, "%s/reference.safetensors", out);
        assert_false(tuna_path_exists(p2));
        /* the export loads and runs like PEFT's merged model */
        int32_t ids[9] = {1019, 5, 77, 300, 12, 999, 4, 18, 640};
        int64_t V;
        float *x = logits_of(out, ids, 9, &V), *y = logits_of(ref, ids, 9, &V);
        double err = tt_rel_err(x, y, (size_t)(9 * V));
        printf("  %-18s logits of the export vs PEFT's merged folder: rel err %.2e\n", k_adapters[ai], err);
        assert_true(err < 1e-4);
        free(x);
        free(y);
        TT_FAILS(tuna_export_merged_16bit(base, a, &o, out, NULL), TUNA_E_INVALID, "already exists");
        tuna_lora_free(a);
    }
}

/* Copies the small files of a model folder (config, tokenizer) to dst. */
static void copy_small_files(const char *src, const char *dst)
{
    static const char *k_files[] = {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                    "chat_template.jinja"};
    for (size_t k = 0; k < sizeof k_files / sizeof k_files[0]; k++) {
        char a[4300], b[4300];
        snprintf(a, sizeof a, "%s/%s", src, k_files[k]);
        snprintf(b, sizeof b, "%s/%s", dst, k_files[k]);
        TT_OK(tuna_copy_file(a, b));
    }
}

static void test_merged16_sharded(void **state)
{
    (void)state;
    char base[4096], adir[4096], sharded[4200], out[4200], out1[4200], p1[4300], p2[4300];
    if (!fx(base, sizeof base, "fixtures/models/llama-tiny")) skip();
    assert_non_null(fx(adir, sizeof adir, "fixtures/lora/llama-tiny/adapter"));
    /* the base re-written in shards of ~300 kB with an index */
    out_path(sharded, sizeof sharded, "llama-tiny-sharded");
    assert_int_equal(tuna_mkdir_p(sharded), TUNA_OK);
    tuna_st_set *s;
    TT_OK(tuna_st_set_open(base, "model", &s));
    tuna_st_writer *w;
    TT_OK(tuna_st_writer_new(&w));
    for (size_t i = 0; i < tuna_st_set_count(s); i++) {
        const struct tuna_tensor_view *t = tuna_st_set_at(s, i);
        TT_OK(tuna_st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, false));
    }
    TT_OK(tuna_st_writer_save_dir(w, sharded, "model", 300000));
    tuna_st_writer_free(w);
    tuna_st_set_close(s);
    copy_small_files(base, sharded);
    snprintf(p1, sizeof p1, "%s/model.safetensors.index.json", sharded);
    assert_true(tuna_path_exists(p1));

    struct tuna_lora_adapter *a;
    TT_OK(tuna_lora_load(adir, &a));
    struct tuna_merge_report rep;
    out_path(out, sizeof out, "merged16-sharded");
    TT_OK(tuna_export_merged_16bit(sharded, a, NULL, out, &rep));
    assert_true(rep.n_files > 1);
    /* same shard names, same index */
    snprintf(p2, sizeof p2, "%s/model.safetensors.index.json", out);
    cJSON *i1, *i2;
    TT_OK(tuna_json_load(p1, 0, &i1));
    TT_OK(tuna_json_load(p2, 0, &i2));
    const cJSON *m1 = cJSON_GetObjectItem(i1, "weight_map"), *m2 = cJSON_GetObjectItem(i2, "weight_map");
    assert_int_equal(cJSON_GetArraySize(m1), cJSON_GetArraySize(m2));
    for (const cJSON *it = m1->child; it; it = it->next) {
        const cJSON *o = cJSON_GetObjectItemCaseSensitive(m2, it->string);
        assert_non_null(o);
        assert_string_equal(o->valuestring, it->valuestring);
        snprintf(p2, sizeof p2, "%s/%s", out, it->valuestring);
        assert_true(tuna_path_exists(p2));
    }
    assert_true(cJSON_GetObjectItem(cJSON_GetObjectItem(i1, "metadata"), "total_size")->valuedouble ==
                cJSON_GetObjectItem(cJSON_GetObjectItem(i2, "metadata"), "total_size")->valuedouble);
    cJSON_Delete(i1);
    cJSON_Delete(i2);
    /* same tensors as the merge of the single-file base */
    out_path(out1, sizeof out1, "merged16-single");
    TT_OK(tuna_export_merged_16bit(base, a, NULL, out1, NULL));
    long long total;
    assert_int_equal(compare_models(out, out1, 0, &total), 0);
    tuna_lora_free(a);
}

static void test_merged_from_4bit(void **state)
{
    (void)state;
    char q4[4096], base[4096], adir[4096], out[4200], out16[4200];
    if (!fx(q4, sizeof q4, "fixtures/bnb/llama-tiny-bnb-nf4-dq")) skip();
    assert_non_null(fx(base, sizeof base, "fixtures/models/llama-tiny"));
    assert_non_null(fx(adir, sizeof adir, "fixtures/lora/llama-tiny/adapter"));
    struct tuna_lora_adapter *a;
    TT_OK(tuna_lora_load(adir, &a));
    /* dequantize-and-merge */
    struct tuna_merge_report rep;
    out_path(out, sizeof out, "merged16-from-nf4");
    TT_OK(tuna_export_merged_16bit(q4, a, NULL, out, &rep));
    assert_true(rep.dequantized);
    assert_false(rep.used_base_16bit);
    assert_int_equal(rep.n_merged, 14);
    assert_no_quant_config(out);
    tuna_st_set *qs, *os;
    TT_OK(tuna_st_set_open(q4, "model", &qs));
    TT_OK(tuna_st_set_open(out, "model", &os));
    assert_false(tuna_bnb_is_4bit(os));
    for (size_t i = 0; i < tuna_st_set_count(os); i++)
        assert_false(tuna_bnb_is_state_tensor(tuna_st_set_at(os, i)->name));
    int checked = 0;
    for (int k = 0; k < a->n_modules; k++) {
        const struct tuna_lora_module *mod = &a->modules[k];
        char name[512];
        snprintf(name, sizeof name, "%s.weight", mod->name);
        struct tuna_q4_weight w;
        memset(&w, 0, sizeof w);
        TT_OK(tuna_bnb_load_weight(qs, name, &w));
        size_t n = (size_t)w.numel;
        float *deq = malloc(sizeof(float) * n), *delta = malloc(sizeof(float) * n), *got = malloc(sizeof(float) * n);
        tuna_q4_dequantize_rows(&w, 0, w.rows, deq);
        TT_OK(tuna_lora_delta(mod, delta));
        const struct tuna_tensor_view *t = tuna_st_set_find(os, name);
        assert_non_null(t);
        assert_int_equal(t->dtype, w.dtype);
        TT_OK(tuna_tensor_to_f32(t, got));
        for (size_t i = 0; i < n; i++) {
            float want = deq[i] + delta[i];
            if (w.dtype == TUNA_DTYPE_BF16) want = tuna_bf16_to_f32(tuna_f32_to_bf16(want));
            if (w.dtype == TUNA_DTYPE_F16) want = tuna_f16_to_f32(tuna_f32_to_f16(want));
            assert_true(got[i] == want);
        }
        checked++;
        free(deq);
        free(delta);
        free(got);
        tuna_q4_weight_free(&w);
    }
    assert_int_equal(checked, 14);
    tuna_st_set_close(os);
    tuna_st_set_close(qs);
    /* the export is a plain model folder that loads */
    int32_t ids[4] = {1019, 3, 4, 5};
    int64_t V;
    free(logits_of(out, ids, 4, &V));

    /* into the original 16-bit weights: the same as merging the 16-bit base */
    struct tuna_merge_opts o = {.base_16bit = base};
    out_path(out, sizeof out, "merged16-from-nf4-base16");
    TT_OK(tuna_export_merged_16bit(q4, a, &o, out, &rep));
    assert_true(rep.used_base_16bit);
    assert_false(rep.dequantized);
    out_path(out16, sizeof out16, "merged16-plain");
    TT_OK(tuna_export_merged_16bit(base, a, NULL, out16, NULL));
    long long total;
    assert_int_equal(compare_models(out, out16, 0, &total), 0);
    /* --base-16bit that is 4-bit, or given for a 16-bit base */
    o.base_16bit = q4;
    out_path(out, sizeof out, "merged16-bad");
    TT_FAILS(tuna_export_merged_16bit(q4, a, &o, out, NULL), TUNA_E_INVALID, "holds bitsandbytes 4-bit");
    o.base_16bit = base;
    TT_FAILS(tuna_export_merged_16bit(base, a, &o, out, NULL), TUNA_E_INVALID, "is for a 4-bit base");
    /* an adapter of another model */
    char other[4096];
    assert_non_null(fx(other, sizeof other, "fixtures/models/qwen3-tiny"));
    TT_FAILS(tuna_export_merged_16bit(other, a, NULL, out, NULL), TUNA_E_INVALID, "");
    assert_false(tuna_path_exists(out));
    tuna_lora_free(a);
}

static void test_merged4(void **state)
{
    (void)state;
    char base[4096], q4[4096], adir[4096], out[4200], out16[4200], ref4[4200], p1[4300], p2[4300];
    if (!fx(base, sizeof base, "fixtures/models/llama-tiny")) skip();
    assert_non_null(fx(q4, sizeof q4, "fixtures/bnb/llama-tiny-bnb-nf4-dq"));
    assert_non_null(fx(adir, sizeof adir, "fixtures/lora/llama-tiny/adapter"));
    struct tuna_lora_adapter *a;
    TT_OK(tuna_lora_load(adir, &a));
    /* 16-bit base: NF4 + double quant, = tuna quantize of the 16-bit merge */
    out_path(out, sizeof out, "merged4");
    struct tuna_merge_report rep;
    TT_OK(tuna_export_merged_4bit(base, a, NULL, out, &rep));
    assert_int_equal(rep.n_merged, 14);
    out_path(out16, sizeof out16, "merged4-ref16");
    TT_OK(tuna_export_merged_16bit(base, a, NULL, out16, NULL));
    out_path(ref4, sizeof ref4, "merged4-ref4");
    struct tuna_bnb_quantize_opts qo = {.type = TUNA_Q4_NF4, .double_quant = true, .blocksize = 64};
    TT_OK(tuna_bnb_quantize_dir(out16, ref4, &qo));
    snprintf(p1, sizeof p1, "%s/model.safetensors", out);
    snprintf(p2, sizeof p2, "%s/model.safetensors", ref4);
    assert_true(files_equal(p1, p2));
    snprintf(p1, sizeof p1, "%s/config.json", out);
    snprintf(p2, sizeof p2, "%s/config.json", ref4);
    assert_true(files_equal(p1, p2));
    tuna_st_set *s;
    TT_OK(tuna_st_set_open(out, "model", &s));
    assert_true(tuna_bnb_is_4bit(s));
    assert_true(tuna_bnb_is_quantized_weight(s, "model.layers.0.self_attn.q_proj.weight"));
    tuna_st_set_close(s);
    /* no temporaries left beside the output */
    snprintf(p1, sizeof p1, "%s.merged16.%ld", out, (long)getpid());
    assert_false(tuna_path_exists(p1));

    /* 4-bit base: its own settings (nf4, double quant, block 64) */
    out_path(out, sizeof out, "merged4-from-nf4");
    TT_OK(tuna_export_merged_4bit(q4, a, NULL, out, &rep));
    assert_true(rep.dequantized);
    TT_OK(tuna_st_set_open(out, "model", &s));
    struct tuna_q4_weight w;
    memset(&w, 0, sizeof w);
    TT_OK(tuna_bnb_load_weight(s, "model.layers.1.mlp.down_proj.weight", &w));
    assert_int_equal(w.type, TUNA_Q4_NF4);
    assert_true(w.nested);
    assert_int_equal(w.blocksize, 64);
    /* dequantized merged-4bit is near the merge */
    const struct tuna_lora_module *mod = tuna_lora_find(a, "model.layers.1.mlp.down_proj");
    tuna_st_set *q;
    TT_OK(tuna_st_set_open(q4, "model", &q));
    struct tuna_q4_weight w0;
    memset(&w0, 0, sizeof w0);
    TT_OK(tuna_bnb_load_weight(q, "model.layers.1.mlp.down_proj.weight", &w0));
    size_t n = (size_t)w.numel;
    float *x = malloc(sizeof(float) * n), *y = malloc(sizeof(float) * n);
    tuna_q4_dequantize_rows(&w, 0, w.rows, x);
    tuna_q4_dequantize_rows(&w0, 0, w0.rows, y);
    TT_OK(tuna_lora_merge_f32(mod, y));
    double err = tt_rel_err(x, y, n);
    printf("  merged-4bit from NF4 base: down_proj dequantized vs merged rel err %.3f\n", err);
    assert_true(err < 0.15);
    free(x);
    free(y);
    tuna_q4_weight_free(&w);
    tuna_q4_weight_free(&w0);
    tuna_st_set_close(q);
    tuna_st_set_close(s);
    TT_FAILS(tuna_export_merged_4bit(q4, a, NULL, out, NULL), TUNA_E_INVALID, "already exists");
    struct tuna_merge_opts o = {.replace = true};
    TT_OK(tuna_export_merged_4bit(q4, a, &o, out, NULL));
    tuna_lora_free(a);
}

static void test_strip_quant_config(void **state)
{
    (void)state;
    const char *text = "{\"a\": 1, \"quantization_config\": {\"x\": 1}, \"text_config\": {\"quantization_config\": "
                       "{}, \"b\": [ {\"quantization_config\": 2} ]}}";
    cJSON *doc;
    TT_OK(tuna_json_parse(text, strlen(text), "test", &doc));
    assert_int_equal(tuna_export_strip_quant_config(doc), 3);
    char *s = cJSON_PrintUnformatted(doc);
    assert_string_equal(s, "{\"a\":1,\"text_config\":{\"b\":[{}]}}");
    free(s);
    cJSON_Delete(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adapter_roundtrip),  cmocka_unit_test(test_peft_c_api),
        cmocka_unit_test(test_merged16_fixture),   cmocka_unit_test(test_merged16_sharded),
        cmocka_unit_test(test_merged_from_4bit),   cmocka_unit_test(test_merged4),
        cmocka_unit_test(test_strip_quant_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
