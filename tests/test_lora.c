/* test_lora.c — PEFT adapters: loading (config fields, rank/alpha patterns, rsLoRA scale,
 * refusals), applying unmerged against PEFT's reference logits (fixtures/lora/<name>/reference),
 * a mixed batch (adapter 0, adapter 1, base) against each sequence alone, and the merge of one
 * module against PEFT's merge_and_unload() output. */
#include "testutil.h"

#include <math.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "lora/lora.h"
#include "model/model.h"

static const char *k_adapters[] = {"llama-tiny", "llama-tiny-rslora"};

/* --- helpers --- */

static struct tuna_model *load_base(void)
{
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny")) return NULL;
    struct tuna_model *m;
    struct tuna_model_opts o = {.threads = 2, .max_model_len = 0};
    TT_OK(tuna_model_load(dir, &o, &m));
    return m;
}

static struct tuna_lora_adapter *load_fixture(const char *name)
{
    char rel[256], dir[4096];
    snprintf(rel, sizeof rel, "fixtures/lora/%s/adapter", name);
    if (!tt_shared_path(dir, sizeof dir, rel)) return NULL;
    struct tuna_lora_adapter *a;
    TT_OK(tuna_lora_load(dir, &a));
    return a;
}

/* Logits [T, V] of one sequence, all rows, with adapter ai (-1 = base). */
static float *run_alone(struct tuna_model *m, const int32_t *ids, int64_t T, int32_t ai)
{
    const int64_t V = m->arch.vocab_size;
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, T + 8, 0, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    struct tuna_batch b;
    tuna_batch_init(&b);
    TT_OK(tuna_batch_add_seq(&b, ids, T, seq, 0, true, false));
    tuna_lora_batch_use(&b, seq, ai);
    float *lg = malloc(sizeof(float) * (size_t)(T * V));
    TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    return lg;
}

/* A small adapter folder for llama-tiny: config text as given, modules with random A/B of rank
 * ranks[i] (F32), plus extra tensors named in `extra` (F32 [4]). */
static void write_adapter(const char *dir, const char *config, const char *const *mods, const int64_t *ranks,
                          const int64_t *ins, const int64_t *outs, int n, const char *const *extra, int n_extra)
{
    assert_int_equal(tuna_mkdir_p(dir), TUNA_OK);
    char path[4400];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    tt_write(path, config, strlen(config));
    tuna_st_writer *w;
    TT_OK(tuna_st_writer_new(&w));
    uint32_t seed = 12345;
    for (int i = 0; i < n; i++) {
        int64_t sa[2] = {ranks[i], ins[i]}, sb[2] = {outs[i], ranks[i]};
        size_t na = (size_t)(sa[0] * sa[1]), nb = (size_t)(sb[0] * sb[1]);
        float *A = malloc(sizeof(float) * na), *B = malloc(sizeof(float) * nb);
        for (size_t k = 0; k < na; k++)
            A[k] = (float)((seed = seed * 1664525u + 1013904223u) >> 8) / 16777216.0f - 0.5f;
        for (size_t k = 0; k < nb; k++)
            B[k] = (float)((seed = seed * 1664525u + 1013904223u) >> 8) / 16777216.0f - 0.5f;
        char name[512];
        snprintf(name, sizeof name, "base_model.model.%s.lora_A.weight", mods[i]);
        TT_OK(tuna_st_writer_add(w, name, TUNA_DTYPE_F32, 2, sa, A, sizeof(float) * na, true));
        snprintf(name, sizeof name, "base_model.model.%s.lora_B.weight", mods[i]);
        TT_OK(tuna_st_writer_add(w, name, TUNA_DTYPE_F32, 2, sb, B, sizeof(float) * nb, true));
        free(A);
        free(B);
    }
    float four[4] = {1, 2, 3, 4};
    int64_t s4 = 4;
    for (int i = 0; i < n_extra; i++)
        TT_OK(tuna_st_writer_add(w, extra[i], TUNA_DTYPE_F32, 1, &s4, four, sizeof four, true));
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    TT_OK(tuna_st_writer_save(w, path));
    tuna_st_writer_free(w);
}

#define CFG(extra)                                                                                                     \
    "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\", \"down_proj\", "          \
    "\"up_proj\"]" extra "}"

static const char *k_q0 = "model.layers.0.self_attn.q_proj";
static const char *k_q1 = "model.layers.1.self_attn.q_proj";

/* --- tests --- */

static void test_load_fixtures(void **state)
{
    (void)state;
    for (int i = 0; i < 2; i++) {
        struct tuna_lora_adapter *a = load_fixture(k_adapters[i]);
        if (!a) skip();
        assert_int_equal(a->n_modules, 14); /* 2 layers x 7 projections */
        assert_int_equal(a->n_targets, 7);
        assert_int_equal(a->use_rslora, i == 1);
        assert_int_equal(a->r, i == 0 ? 8 : 16);
        assert_true(a->alpha == (i == 0 ? 16.0 : 8.0));
        const struct tuna_lora_module *q = tuna_lora_find(a, k_q0);
        assert_non_null(q);
        assert_int_equal(q->r, a->r);
        assert_int_equal(q->in, 128);
        assert_int_equal(q->out, 128);
        const struct tuna_lora_module *d = tuna_lora_find(a, "model.layers.1.mlp.down_proj");
        assert_non_null(d);
        assert_int_equal(d->in, 256);
        assert_int_equal(d->out, 128);
        /* alpha/r = 16/8; rsLoRA alpha/sqrt(r) = 8/4 */
        assert_true(q->scale == 2.0f);
        assert_null(tuna_lora_find(a, "model.layers.2.self_attn.q_proj"));
        assert_null(tuna_lora_find(a, "lm_head"));
        tuna_lora_free(a);
    }
    assert_true(tuna_lora_scale(16, 16, true) == 4.0f);
    assert_true(tuna_lora_scale(16, 16, false) == 1.0f);
}

static void test_pattern_match(void **state)
{
    (void)state;
    bool m;
    TT_OK(tuna_lora_pattern_match("q_proj", k_q0, &m));
    assert_true(m);
    TT_OK(tuna_lora_pattern_match("proj", k_q0, &m));
    assert_false(m); /* only whole dotted components at the end */
    TT_OK(tuna_lora_pattern_match("layers.0.self_attn.q_proj", k_q0, &m));
    assert_true(m);
    TT_OK(tuna_lora_pattern_match("layers.0.self_attn.q_proj", k_q1, &m));
    assert_false(m);
    TT_OK(tuna_lora_pattern_match("layers\\.[01]\\..*q_proj", k_q1, &m));
    assert_true(m);
    TT_OK(tuna_lora_pattern_match(k_q0, k_q0, &m));
    assert_true(m);
    TT_FAILS(tuna_lora_pattern_match("q_proj(", k_q0, &m), TUNA_E_FORMAT, "not a valid regex");
}

static void test_rank_alpha_patterns(void **state)
{
    (void)state;
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/patterns", tt_tmpdir());
    const char *mods[3] = {k_q0, k_q1, "model.layers.0.mlp.down_proj"};
    int64_t ranks[3] = {2, 4, 4}, ins[3] = {128, 128, 256}, outs[3] = {128, 128, 128};
    write_adapter(dir,
                  CFG(", \"rank_pattern\": {\"layers.0.self_attn.q_proj\": 2}, \"alpha_pattern\": "
                      "{\"down_proj\": 2, \"q_proj\": 32}, \"use_rslora\": false, \"bias\": \"none\", "
                      "\"use_dora\": false, \"modules_to_save\": null"),
                  mods, ranks, ins, outs, 3, NULL, 0);
    struct tuna_lora_adapter *a;
    TT_OK(tuna_lora_load(dir, &a));
    assert_int_equal(a->n_modules, 3);
    const struct tuna_lora_module *q0 = tuna_lora_find(a, k_q0), *q1 = tuna_lora_find(a, k_q1),
                                  *d = tuna_lora_find(a, mods[2]);
    assert_int_equal(q0->r, 2);
    assert_true(q0->alpha == 32 && q0->scale == 16.0f);
    assert_int_equal(q1->r, 4);
    assert_true(q1->alpha == 32 && q1->scale == 8.0f);
    assert_true(d->alpha == 2 && d->scale == 0.5f);
    tuna_lora_free(a);

    /* rsLoRA with a rank pattern: alpha / sqrt(r_module) */
    snprintf(dir, sizeof dir, "%s/patterns-rs", tt_tmpdir());
    write_adapter(dir, CFG(", \"rank_pattern\": {\"layers.0.self_attn.q_proj\": 2}, \"use_rslora\": true"), mods, ranks,
                  ins, outs, 2, NULL, 0);
    TT_OK(tuna_lora_load(dir, &a));
    assert_true(tuna_lora_find(a, k_q0)->scale == (float)(8 / sqrt(2.0)));
    assert_true(tuna_lora_find(a, k_q1)->scale == 4.0f);
    tuna_lora_free(a);

    /* target_modules as a regex, "all-linear", layers_to_transform that includes the layer */
    static const char *k_ok[] = {
        "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": "
        "\"model\\\\.layers\\\\.[01]\\\\.self_attn\\\\.q_proj\"}",
        "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": \"all-linear\"}",
        CFG(", \"layers_to_transform\": [0, 1], \"exclude_modules\": [\"k_proj\"]"),
    };
    int64_t r4[2] = {4, 4};
    for (int i = 0; i < 3; i++) {
        snprintf(dir, sizeof dir, "%s/targets-ok-%d", tt_tmpdir(), i);
        write_adapter(dir, k_ok[i], mods, r4, ins, outs, 2, NULL, 0);
        TT_OK(tuna_lora_load(dir, &a));
        assert_int_equal(a->n_modules, 2);
        tuna_lora_free(a);
    }

    /* weights of rank 2 where the config says 4 */
    snprintf(dir, sizeof dir, "%s/rank-mismatch", tt_tmpdir());
    write_adapter(dir, CFG(""), mods, ranks, ins, outs, 1, NULL, 0);
    TT_FAILS(tuna_lora_load(dir, &a), TUNA_E_FORMAT, "rank 2 in the weights");
    assert_null(a);
}

static void test_refusals(void **state)
{
    (void)state;
    struct tuna_lora_adapter *a;
    const char *mods[1] = {k_q0};
    int64_t r[1] = {4}, in[1] = {128}, out[1] = {128};
    static const struct {
        const char *name, *config, *extra, *needle;
        tuna_status st;
    } k_cases[] = {
        {"dora", CFG(", \"use_dora\": true"), NULL, "DoRA", TUNA_E_UNSUPPORTED},
        {"save", CFG(", \"modules_to_save\": [\"lm_head\"]"), NULL, "modules_to_save", TUNA_E_UNSUPPORTED},
        {"bias", CFG(", \"bias\": \"all\""), NULL, "bias \"all\"", TUNA_E_UNSUPPORTED},
        {"lorabias", CFG(", \"lora_bias\": true"), NULL, "lora_bias", TUNA_E_UNSUPPORTED},
        {"fifo", CFG(", \"fan_in_fan_out\": true"), NULL, "fan_in_fan_out", TUNA_E_UNSUPPORTED},
        {"prefix", "{\"peft_type\": \"PREFIX_TUNING\"}", NULL, "only LORA", TUNA_E_UNSUPPORTED},
        {"notype", "{\"r\": 4}", NULL, "peft_type", TUNA_E_FORMAT},
        {"badr", "{\"peft_type\": \"LORA\", \"r\": 0}", NULL, "at least 1", TUNA_E_FORMAT},
        {"rtype", "{\"peft_type\": \"LORA\", \"r\": \"8\"}", NULL, "r", TUNA_E_FORMAT},
        {"json", "{\"peft_type\": \"LORA\",", NULL, "adapter_config.json", TUNA_E_FORMAT},
        {"magn", CFG(""), "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA",
         TUNA_E_UNSUPPORTED},
        {"mts", CFG(""), "base_model.model.lm_head.weight", "modules_to_save", TUNA_E_UNSUPPORTED},
        {"emb", CFG(""), "base_model.model.model.embed_tokens.lora_embedding_A", "embedding", TUNA_E_UNSUPPORTED},
        {"target", "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": [\"v_proj\"]}", NULL,
         "target_modules of adapter_config.json does not name", TUNA_E_FORMAT},
        {"target-re", "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": \"model\\\\.layers\\\\.1\\\\..*\"}",
         NULL, "does not name", TUNA_E_FORMAT},
        {"target-badre", "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": \"(q_proj\"}", NULL,
         "not a valid regex", TUNA_E_FORMAT},
        {"exclude", CFG(", \"exclude_modules\": [\"q_proj\"]"), NULL, "exclude_modules", TUNA_E_FORMAT},
        {"layers", CFG(", \"layers_to_transform\": [1]"), NULL, "layers_to_transform", TUNA_E_FORMAT},
        {"prefixkey", CFG(""), "model.layers.0.self_attn.q_proj.lora_A.weight", "does not start with", TUNA_E_FORMAT},
    };
    for (size_t i = 0; i < sizeof k_cases / sizeof k_cases[0]; i++) {
        char dir[4200];
        snprintf(dir, sizeof dir, "%s/refuse-%s", tt_tmpdir(), k_cases[i].name);
        const char *extra[1] = {k_cases[i].extra};
        write_adapter(dir, k_cases[i].config, mods, r, in, out, 1, extra, k_cases[i].extra ? 1 : 0);
        a = (struct tuna_lora_adapter *)1;
        TT_FAILS(tuna_lora_load(dir, &a), k_cases[i].st, k_cases[i].needle);
        assert_null(a);
    }
    /* lora_A without lora_B */
    char dir[4200], path[4300];
    snprintf(dir, sizeof dir, "%s/refuse-halfmodule", tt_tmpdir());
    write_adapter(dir, CFG(""), mods, r, in, out, 1, NULL, 0);
    tuna_st_writer *w;
    TT_OK(tuna_st_writer_new(&w));
    float x[4 * 128] = {0};
    int64_t s[2] = {4, 128};
    TT_OK(tuna_st_writer_add(w, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", TUNA_DTYPE_F32, 2, s,
                             x, sizeof x, false));
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    TT_OK(tuna_st_writer_save(w, path));
    tuna_st_writer_free(w);
    TT_FAILS(tuna_lora_load(dir, &a), TUNA_E_FORMAT, "no lora_B");
    /* no folder / no weights */
    snprintf(dir, sizeof dir, "%s/nothing-here", tt_tmpdir());
    TT_FAILS(tuna_lora_load(dir, &a), TUNA_E_NOT_FOUND, "adapter_config.json");
    snprintf(dir, sizeof dir, "%s/refuse-noweights", tt_tmpdir());
    assert_int_equal(tuna_mkdir_p(dir), TUNA_OK);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    tt_write(path, CFG(""), strlen(CFG("")));
    snprintf(path, sizeof path, "%s/adapter_model.bin", dir);
    tt_write(path, "x", 1);
    TT_FAILS(tuna_lora_load(dir, &a), TUNA_E_UNSUPPORTED, "adapter_model.bin");
}

static void test_reference_logits(void **state)
{
    (void)state;
    struct tuna_model *m = load_base();
    if (!m) skip();
    const int64_t V = m->arch.vocab_size;
    for (int ai = 0; ai < 2; ai++) {
        struct tuna_lora_adapter *a = load_fixture(k_adapters[ai]);
        char rel[256], refp[4096];
        snprintf(rel, sizeof rel, "fixtures/lora/%s/reference.safetensors", k_adapters[ai]);
        assert_non_null(tt_shared_path(refp, sizeof refp, rel));
        tuna_lora_attachment *att;
        const struct tuna_lora_adapter *list[1] = {a};
        TT_OK(tuna_lora_attach(m, list, 1, &att));
        tuna_st_set *ref;
        TT_OK(tuna_st_set_open_file(refp, &ref));
        int n = 0;
        for (int i = 0; i < 8; i++) {
            char name[64];
            snprintf(name, sizeof name, "prompt%d.input_ids", i);
            const struct tuna_tensor_view *ids = tuna_st_set_find(ref, name);
            if (!ids) break;
            snprintf(name, sizeof name, "prompt%d.logits", i);
            const struct tuna_tensor_view *lg = tuna_st_set_find(ref, name);
            assert_non_null(lg);
            int64_t T = (int64_t)ids->numel;
            assert_int_equal(lg->numel, (uint64_t)(T * V));
            int32_t *idv = malloc(ids->nbytes);
            memcpy(idv, ids->data, ids->nbytes);
            float *want = malloc(lg->nbytes);
            memcpy(want, lg->data, lg->nbytes);
            float *got = run_alone(m, idv, T, 0);
            double err = tt_rel_err(got, want, (size_t)(T * V));
            /* the same prompt on the base model must be far off: the adapter does something */
            float *base = run_alone(m, idv, T, -1);
            double base_err = tt_rel_err(base, want, (size_t)(T * V));
            printf("  %-18s prompt%d T=%-3lld rel err %.2e (base model: %.2e)\n", k_adapters[ai], i, (long long)T, err,
                   base_err);
            assert_true(err < 1e-4);
            assert_true(base_err > 1e-2);
            free(idv);
            free(want);
            free(got);
            free(base);
            n++;
        }
        assert_int_equal(n, 3);
        tuna_st_set_close(ref);
        tuna_lora_detach(m, att);
        assert_int_equal(m->layers[0].q.n_lora, 0);
        tuna_lora_free(a);
    }
    tuna_model_free(m);
}

/* Three sequences in one batch: adapter 0, adapter 1 (rsLoRA), none; prefill then decode steps
 * in the same batches, each row equal to the sequence run alone. */
static void test_mixed_batch(void **state)
{
    (void)state;
    struct tuna_model *m = load_base();
    if (!m) skip();
    const int64_t V = m->arch.vocab_size;
    struct tuna_lora_set *set;
    char d0[4096], d1[4096];
    assert_non_null(tt_shared_path(d0, sizeof d0, "fixtures/lora/llama-tiny/adapter"));
    assert_non_null(tt_shared_path(d1, sizeof d1, "fixtures/lora/llama-tiny-rslora/adapter"));
    const char *dirs[2] = {d0, d1};
    TT_OK(tuna_lora_set_open(m, dirs, 2, &set));
    assert_int_equal(set->n, 2);
    assert_int_equal(m->layers[1].down.n_lora, 2);
    /* attaching again while attached is refused */
    tuna_lora_attachment *att2;
    TT_FAILS(tuna_lora_attach(m, (const struct tuna_lora_adapter *const *)set->adapters, 1, &att2), TUNA_E_INVALID,
             "already has adapters");

    int32_t prompts[3][12];
    int64_t T = 12;
    for (int s = 0; s < 3; s++)
        for (int t = 0; t < T; t++)
            prompts[s][t] = (int32_t)((37 * s + 11 * t + 5) % 1000);
    const int32_t use[3] = {0, 1, -1};
    const int steps = 4;
    float *alone[3];
    for (int s = 0; s < 3; s++) {
        int32_t full[16];
        memcpy(full, prompts[s], sizeof prompts[s]);
        for (int k = 0; k < steps; k++)
            full[T + k] = (int32_t)((s * 101 + k * 7 + 1) % 1000);
        alone[s] = run_alone(m, full, T + steps, use[s]);
    }
    /* adapters 0 and 1 differ from each other and from the base */
    assert_true(tt_rel_err(alone[0], alone[2], (size_t)(T * V)) > 1e-2);
    assert_true(tt_rel_err(alone[1], alone[2], (size_t)(T * V)) > 1e-2);
    assert_true(tt_rel_err(alone[0], alone[1], (size_t)(T * V)) > 1e-2);

    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, 3 * 64, 4, &kv));
    int32_t seqs[3];
    for (int s = 0; s < 3; s++)
        TT_OK(tuna_kv_seq_new(kv, &seqs[s]));
    struct tuna_batch b;
    tuna_batch_init(&b);
    float *lg = malloc(sizeof(float) * (size_t)(3 * T * V));
    double worst = 0;
    /* step 0: all three prompts (every row's logits); then one decode token per sequence */
    for (int s = 2; s >= 0; s--) {
        TT_OK(tuna_batch_add_seq(&b, prompts[s], T, seqs[s], 0, true, false));
        tuna_lora_batch_use(&b, seqs[s], use[s]);
    }
    TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
    for (int s = 2, row = 0; s >= 0; s--, row += (int)T) {
        double e = tt_rel_err(lg + row * V, alone[s], (size_t)(T * V));
        if (e > worst) worst = e;
    }
    for (int k = 0; k < steps; k++) {
        tuna_batch_clear(&b);
        for (int s = 0; s < 3; s++) {
            TT_OK(tuna_batch_add(&b, (int32_t)((s * 101 + k * 7 + 1) % 1000), seqs[s], T + k, true));
            tuna_lora_batch_use(&b, seqs[s], use[s]);
        }
        TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
        for (int s = 0; s < 3; s++) {
            double e = tt_rel_err(lg + s * V, alone[s] + (T + k) * V, (size_t)V);
            if (e > worst) worst = e;
        }
    }
    printf("  mixed batch (adapter 0, adapter 1, base) vs alone: worst rel err %.2e\n", worst);
    assert_true(worst < 1e-5);
    free(lg);
    for (int s = 0; s < 3; s++)
        free(alone[s]);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    tuna_lora_set_free(m, set);
    assert_int_equal(m->layers[1].down.n_lora, 0);
    assert_null(m->layers[1].down.lora);
    tuna_model_free(m);
}

static void test_attach_mismatch(void **state)
{
    (void)state;
    struct tuna_model *m = load_base();
    if (!m) skip();
    char dir[4200];
    struct tuna_lora_adapter *a;
    tuna_lora_attachment *att;
    const char *mods[1] = {"model.layers.2.self_attn.q_proj"};
    int64_t r[1] = {4}, in[1] = {128}, out[1] = {128};
    snprintf(dir, sizeof dir, "%s/other-model", tt_tmpdir());
    write_adapter(dir, CFG(""), mods, r, in, out, 1, NULL, 0);
    TT_OK(tuna_lora_load(dir, &a));
    TT_FAILS(tuna_lora_attach(m, (const struct tuna_lora_adapter *const *)&a, 1, &att), TUNA_E_INVALID,
             "does not have");
    tuna_lora_free(a);
    mods[0] = "model.layers.1.mlp.up_proj"; /* [256, 128] in the model */
    snprintf(dir, sizeof dir, "%s/other-shape", tt_tmpdir());
    write_adapter(dir, CFG(""), mods, r, in, out, 1, NULL, 0);
    TT_OK(tuna_lora_load(dir, &a));
    TT_FAILS(tuna_lora_attach(m, (const struct tuna_lora_adapter *const *)&a, 1, &att), TUNA_E_INVALID,
             "[256, 128] in the model");
    assert_int_equal(m->layers[1].up.n_lora, 0);
    tuna_lora_free(a);
    tuna_model_free(m);
}

/* One module merged in bf16 against PEFT's merge_and_unload() (fixtures/lora/<name>/merged). */
static void test_merge_module(void **state)
{
    (void)state;
    char basep[4096], rel[256], mergedp[4096];
    if (!tt_shared_path(basep, sizeof basep, "fixtures/models/llama-tiny/model.safetensors")) skip();
    tuna_st_set *base;
    TT_OK(tuna_st_set_open_file(basep, &base));
    for (int ai = 0; ai < 2; ai++) {
        struct tuna_lora_adapter *a = load_fixture(k_adapters[ai]);
        snprintf(rel, sizeof rel, "fixtures/lora/%s/merged/model.safetensors", k_adapters[ai]);
        assert_non_null(tt_shared_path(mergedp, sizeof mergedp, rel));
        tuna_st_set *merged;
        TT_OK(tuna_st_set_open_file(mergedp, &merged));
        long long equal = 0, ulp1 = 0, total = 0, changed = 0;
        for (int k = 0; k < a->n_modules; k++) {
            const struct tuna_lora_module *mod = &a->modules[k];
            char name[512];
            snprintf(name, sizeof name, "%s.weight", mod->name);
            const struct tuna_tensor_view *w = tuna_st_set_find(base, name), *ref = tuna_st_set_find(merged, name);
            assert_non_null(w);
            assert_non_null(ref);
            assert_int_equal(w->dtype, TUNA_DTYPE_BF16);
            uint16_t *out = malloc(w->nbytes);
            TT_OK(tuna_lora_merge_stored(mod, w->dtype, w->data, out));
            const uint16_t *want = ref->data, *orig = w->data;
            for (uint64_t i = 0; i < w->numel; i++) {
                int d = abs((int)out[i] - (int)want[i]);
                equal += d == 0;
                ulp1 += d == 1;
                changed += want[i] != orig[i];
            }
            total += (long long)w->numel;
            free(out);
        }
        printf("  %-18s merged bf16: %lld of %lld equal, %lld within 1 ulp, %lld beyond (PEFT changed %lld)\n",
               k_adapters[ai], equal, total, ulp1, total - equal - ulp1, changed);
        assert_int_equal(equal + ulp1, total);
        assert_true(changed > total / 2); /* the merge moved most weights: the check is not vacuous */
        assert_true(equal > total * 99 / 100);
        /* float32 in place gives the same as the stored-dtype path before rounding */
        const struct tuna_lora_module *mod = &a->modules[0];
        float *W = calloc((size_t)(mod->out * mod->in), sizeof(float)),
              *D = malloc(sizeof(float) * (size_t)(mod->out * mod->in));
        TT_OK(tuna_lora_merge_f32(mod, W));
        TT_OK(tuna_lora_delta(mod, D));
        assert_memory_equal(W, D, sizeof(float) * (size_t)(mod->out * mod->in));
        free(W);
        free(D);
        tuna_st_set_close(merged);
        tuna_lora_free(a);
    }
    tuna_st_set_close(base);
}

/* A matrix large enough for the threaded merge: every row equal to the same row merged alone. */
static void test_merge_threaded(void **state)
{
    (void)state;
    struct tuna_lora_module mod = {.name = "big", .r = 32, .in = 1024, .out = 2048, .alpha = 16, .scale = 0.5f};
    size_t na = (size_t)(mod.r * mod.in), nb = (size_t)(mod.out * mod.r), nw = (size_t)(mod.out * mod.in);
    float *A = malloc(sizeof(float) * na), *B = malloc(sizeof(float) * nb);
    for (size_t i = 0; i < na; i++)
        A[i] = (float)sin(0.01 * (double)i);
    for (size_t i = 0; i < nb; i++)
        B[i] = (float)cos(0.013 * (double)i);
    mod.A = A;
    mod.B = B;
    uint16_t *W = malloc(2 * nw), *out = malloc(2 * nw), *row = malloc(2 * (size_t)mod.in);
    for (size_t i = 0; i < nw; i++)
        W[i] = tuna_f32_to_bf16((float)sin(0.7 * (double)i));
    TT_OK(tuna_lora_merge_stored(&mod, TUNA_DTYPE_BF16, W, out));
    float *delta = malloc(sizeof(float) * nw), *drow = malloc(sizeof(float) * (size_t)mod.in);
    TT_OK(tuna_lora_delta(&mod, delta));
    long long changed = 0;
    for (int64_t n = 0; n < mod.out; n++) {
        struct tuna_lora_module one = mod;
        one.out = 1;
        one.B = B + n * mod.r;
        TT_OK(tuna_lora_merge_stored(&one, TUNA_DTYPE_BF16, W + n * mod.in, row));
        assert_memory_equal(row, out + n * mod.in, 2 * (size_t)mod.in);
        TT_OK(tuna_lora_delta(&one, drow));
        assert_memory_equal(drow, delta + n * mod.in, sizeof(float) * (size_t)mod.in);
        for (int64_t k = 0; k < mod.in; k++)
            changed += row[k] != W[n * mod.in + k];
    }
    assert_true(changed > (long long)nw / 2);
    TT_FAILS(tuna_lora_merge_stored(&mod, TUNA_DTYPE_U8, W, out), TUNA_E_UNSUPPORTED, "F32, BF16 or F16");
    free(A);
    free(B);
    free(W);
    free(out);
    free(row);
    free(delta);
    free(drow);
}

/* tuna_lora_set_open with a folder that does not load: nothing stays attached. */
static void test_set_open_failure(void **state)
{
    (void)state;
    struct tuna_model *m = load_base();
    if (!m) skip();
    char d0[4096], bad[4200];
    assert_non_null(tt_shared_path(d0, sizeof d0, "fixtures/lora/llama-tiny/adapter"));
    snprintf(bad, sizeof bad, "%s/no-such-adapter", tt_tmpdir());
    const char *dirs[2] = {d0, bad};
    struct tuna_lora_set *set = (struct tuna_lora_set *)1;
    TT_FAILS(tuna_lora_set_open(m, dirs, 2, &set), TUNA_E_NOT_FOUND, "no-such-adapter");
    assert_null(set);
    assert_int_equal(m->layers[0].q.n_lora, 0);
    TT_OK(tuna_lora_set_open(m, dirs, 1, &set));
    assert_int_equal(m->layers[0].q.n_lora, 1);
    tuna_lora_set_free(m, set);
    tuna_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load_fixtures),       cmocka_unit_test(test_pattern_match),
        cmocka_unit_test(test_rank_alpha_patterns), cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_reference_logits),    cmocka_unit_test(test_mixed_batch),
        cmocka_unit_test(test_attach_mismatch),     cmocka_unit_test(test_merge_module),
        cmocka_unit_test(test_merge_threaded),      cmocka_unit_test(test_set_open_failure),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
