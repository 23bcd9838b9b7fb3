/* test_gguf_export.c — tuna export gguf / import round trips on every fixture model: the GGUF
 * file carries the metadata llama.cpp requires with the types it checks, the llama q/k rows are
 * permuted, and the file loaded back by tuna gives the logits of transformers (reference.safetensors)
 * at f32 (1e-5), f16, bf16, q8_0, q4_0 and q4_K_M (looser, quantization error). Also: the real
 * stories260K GGUF reproduces llama2.c's greedy text, and tokenizers built from GGUF metadata
 * match the fixture tokenizers and llama.cpp's vocab test vectors. */
#include "testutil.h"

#include <math.h>

#include <cjson/cJSON.h>

#include "core/file.h"
#include "core/json.h"
#include "gguf/export.h"
#include "gguf/import.h"
#include "gguf/quants.h"
#include "model/generate.h"
#include "model/rope_freq.h"

static const char *const k_models[] = {"llama-tiny", "qwen2-tiny", "mistral-tiny", "qwen3-tiny", "gemma-tiny"};

/* Logits of prompt0 through the imported model, relative error vs the reference. */
static double prompt_err(struct tuna_model *m, const char *model_dir)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/reference.safetensors", model_dir);
    tuna_st_set *ref;
    TT_OK(tuna_st_set_open_file(p, &ref));
    const struct tuna_tensor_view *ids = tuna_st_set_find(ref, "prompt0.input_ids");
    const struct tuna_tensor_view *lg = tuna_st_set_find(ref, "prompt0.logits");
    assert_non_null(ids);
    assert_non_null(lg);
    int64_t T = (int64_t)ids->numel, V = m->arch.vocab_size;
    assert_int_equal(lg->numel, (uint64_t)(T * V));
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, T + 8, 0, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    struct tuna_batch b;
    tuna_batch_init(&b);
    TT_OK(tuna_batch_add_seq(&b, ids->data, T, seq, 0, true, false));
    float *out = malloc(sizeof(float) * (size_t)(T * V));
    TT_OK(tuna_model_forward(m, kv, &b, out, NULL));
    double err = tt_rel_err(out, lg->data, (size_t)(T * V));
    free(out);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    tuna_st_set_close(ref);
    return err;
}

static void check_kv_type(tuna_gguf *g, const char *key, enum tuna_gguf_vtype t)
{
    const struct tuna_gguf_kv *kv = tuna_gguf_find(g, key);
    if (!kv || kv->type != t) {
        print_error("%s: key %s %s (wanted type %s)\n", tuna_gguf_path(g), key, kv ? tuna_gguf_vtype_name(kv->type) : "missing",
                    tuna_gguf_vtype_name(t));
        fail();
    }
}

static void test_export_import_fixtures(void **state)
{
    (void)state;
    char dir[4096], out[4200];
    static const struct {
        const char *q;
        double tol;
    } quants[] = {{"f32", 1e-5}, {"f16", 2e-3}, {"bf16", 1e-2}, {"q8_0", 5e-2}, {"q4_0", 0.4}, {"q4_k_m", 0.4}};
    for (size_t mi = 0; mi < sizeof k_models / sizeof *k_models; mi++) {
        char rel[128];
        snprintf(rel, sizeof rel, "fixtures/models/%s", k_models[mi]);
        if (!tt_shared_path(dir, sizeof dir, rel)) skip();
        for (size_t qi = 0; qi < sizeof quants / sizeof *quants; qi++) {
            struct tuna_gguf_export_opts o = {0};
            assert_true(tuna_gguf_ftype_parse(quants[qi].q, &o.ftype));
            o.quiet = true;
            snprintf(out, sizeof out, "%s/%s-%s.gguf", tt_tmpdir(), k_models[mi], quants[qi].q);
            TT_OK(tuna_gguf_export(dir, &o, out));
            tuna_gguf *g;
            TT_OK(tuna_gguf_open(out, &g));
            struct tuna_gguf_str arch;
            TT_OK(tuna_gguf_get_str(g, "general.architecture", &arch));
            char k[128];
            static const char *const u32keys[] = {"context_length", "embedding_length", "block_count",
                                                  "feed_forward_length", "attention.head_count",
                                                  "attention.head_count_kv", "rope.dimension_count"};
            for (size_t i = 0; i < sizeof u32keys / sizeof *u32keys; i++) {
                snprintf(k, sizeof k, "%.*s.%s", (int)arch.len, arch.p, u32keys[i]);
                check_kv_type(g, k, TUNA_GGUF_UINT32);
            }
            snprintf(k, sizeof k, "%.*s.attention.layer_norm_rms_epsilon", (int)arch.len, arch.p);
            check_kv_type(g, k, TUNA_GGUF_FLOAT32);
            check_kv_type(g, "general.file_type", TUNA_GGUF_UINT32);
            check_kv_type(g, "tokenizer.ggml.model", TUNA_GGUF_STRING);
            check_kv_type(g, "tokenizer.ggml.tokens", TUNA_GGUF_ARRAY);
            check_kv_type(g, "tokenizer.ggml.token_type", TUNA_GGUF_ARRAY);
            check_kv_type(g, "tokenizer.ggml.bos_token_id", TUNA_GGUF_UINT32);
            check_kv_type(g, "tokenizer.ggml.eos_token_id", TUNA_GGUF_UINT32);
            check_kv_type(g, "tokenizer.chat_template", TUNA_GGUF_STRING);
            struct tuna_gguf_str tm;
            TT_OK(tuna_gguf_get_str(g, "tokenizer.ggml.model", &tm));
            if (tm.len == 4) { /* gpt2 */
                check_kv_type(g, "tokenizer.ggml.pre", TUNA_GGUF_STRING);
                check_kv_type(g, "tokenizer.ggml.merges", TUNA_GGUF_ARRAY);
            } else {
                check_kv_type(g, "tokenizer.ggml.scores", TUNA_GGUF_ARRAY);
            }
            const struct tuna_gguf_tensor *tn = tuna_gguf_find_tensor(g, "blk.0.attn_norm.weight");
            assert_non_null(tn);
            assert_int_equal(tn->type, TUNA_GGML_F32);
            const struct tuna_gguf_tensor *tq = tuna_gguf_find_tensor(g, "blk.0.attn_q.weight");
            assert_non_null(tq);
            uint32_t want_q = o.ftype == TUNA_GGUF_FT_F32    ? TUNA_GGML_F32
                              : o.ftype == TUNA_GGUF_FT_F16  ? TUNA_GGML_F16
                              : o.ftype == TUNA_GGUF_FT_BF16 ? TUNA_GGML_BF16
                              : o.ftype == TUNA_GGUF_FT_Q8_0 ? TUNA_GGML_Q8_0
                              : o.ftype == TUNA_GGUF_FT_Q4_0 ? TUNA_GGML_Q4_0
                                                             : TUNA_GGML_Q5_0; /* q4_K falls back: 128 % 256 */
            assert_int_equal(tq->type, want_q);
            tuna_gguf_close(g);

            struct tuna_gguf_model *gm;
            struct tuna_model_opts mo = {.threads = 2};
            TT_OK(tuna_gguf_model_load(out, &mo, &gm));
            double err = prompt_err(gm->model, dir);
            printf("  %-13s %-7s logits rel err %.2e\n", k_models[mi], quants[qi].q, err);
            if (!(err <= quants[qi].tol)) {
                print_error("%s %s: logits rel err %g > %g\n", k_models[mi], quants[qi].q, err, quants[qi].tol);
                fail();
            }
            assert_non_null(gm->tokenizer);
            assert_non_null(gm->chat_template);
            tuna_gguf_model_free(gm);
        }
    }
}

/* The llama q rows in the file are llama.cpp's interleaved order: GGUF row 2i+1 of head 0 is HF
 * row i + head_dim/2. */
static void test_qk_permutation(void **state)
{
    (void)state;
    char dir[4096], out[4200];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny")) skip();
    struct tuna_gguf_export_opts o = {.ftype = TUNA_GGUF_FT_F32, .quiet = true};
    snprintf(out, sizeof out, "%s/perm.gguf", tt_tmpdir());
    TT_OK(tuna_gguf_export(dir, &o, out));
    tuna_gguf *g;
    TT_OK(tuna_gguf_open(out, &g));
    tuna_st_set *st;
    TT_OK(tuna_st_set_open(dir, "model", &st));
    const char *hfn[2] = {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"};
    const char *ggn[2] = {"blk.1.attn_q.weight", "blk.1.attn_k.weight"};
    for (int w = 0; w < 2; w++) {
        const struct tuna_tensor_view *hv = tuna_st_set_find(st, hfn[w]);
        const struct tuna_gguf_tensor *gt = tuna_gguf_find_tensor(g, ggn[w]);
        assert_non_null(hv);
        assert_non_null(gt);
        int64_t rows = hv->shape[0], cols = hv->shape[1], D = 32;
        assert_int_equal(gt->ne[0], cols);
        assert_int_equal(gt->ne[1], rows);
        float *hf = malloc(hv->numel * sizeof *hf);
        TT_OK(tuna_tensor_to_f32(hv, hf));
        const float *gd = gt->data;
        for (int64_t h = 0; h < rows / D; h++)
            for (int64_t i = 0; i < D / 2; i++) {
                assert_memory_equal(gd + (h * D + 2 * i) * cols, hf + (h * D + i) * cols, (size_t)cols * 4);
                assert_memory_equal(gd + (h * D + 2 * i + 1) * cols, hf + (h * D + i + D / 2) * cols, (size_t)cols * 4);
            }
        free(hf);
    }
    tuna_st_set_close(st);
    tuna_gguf_close(g);
}

/* A tokenizer rebuilt from the exported GGUF metadata encodes like the folder's tokenizer.json. */
static void test_tokenizer_roundtrip(void **state)
{
    (void)state;
    char dir[4096], out[4200], cases[4096];
    const char *models[2] = {"llama-tiny", "mistral-tiny"}; /* gpt2 BPE and SentencePiece-style */
    const char *casef[2] = {"fixtures/tokenizers/bpe-1k/cases.json", "fixtures/tokenizers/spm-1k/cases.json"};
    for (int mi = 0; mi < 2; mi++) {
        char rel[128];
        snprintf(rel, sizeof rel, "fixtures/models/%s", models[mi]);
        if (!tt_shared_path(dir, sizeof dir, rel) || !tt_shared_path(cases, sizeof cases, casef[mi])) skip();
        struct tuna_gguf_export_opts o = {.ftype = TUNA_GGUF_FT_Q8_0, .quiet = true};
        snprintf(out, sizeof out, "%s/tok-%s.gguf", tt_tmpdir(), models[mi]);
        TT_OK(tuna_gguf_export(dir, &o, out));
        tuna_gguf *g;
        TT_OK(tuna_gguf_open(out, &g));
        tuna_tokenizer *tg, *th;
        TT_OK(tuna_gguf_tokenizer_load(g, &tg));
        TT_OK(tuna_tokenizer_load(dir, &th));
        cJSON *doc;
        TT_OK(tuna_json_load(cases, 0, &doc));
        const cJSON *e;
        int n = 0, same = 0;
        cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(doc, "encode"))
        {
            const char *text = cJSON_GetObjectItemCaseSensitive(e, "text")->valuestring;
            for (int sp = 0; sp < 2; sp++) {
                int32_t *a = NULL, *b = NULL;
                size_t na = 0, nb = 0;
                TT_OK(tuna_tokenizer_encode(tg, text, strlen(text), sp, true, &a, &na));
                TT_OK(tuna_tokenizer_encode(th, text, strlen(text), sp, true, &b, &nb));
                n++;
                if (na == nb && (na == 0 || memcmp(a, b, na * 4) == 0)) same++;
                else print_error("%s: '%.60s' (specials %d) differs\n", models[mi], text, sp);
                free(a);
                free(b);
            }
        }
        printf("  %s: GGUF tokenizer equals tokenizer.json on %d/%d encodings\n", models[mi], same, n);
        assert_int_equal(same, n);
        assert_true(n > 0);
        cJSON_Delete(doc);
        tuna_tokenizer_free(tg);
        tuna_tokenizer_free(th);
        tuna_gguf_close(g);
    }
}

static tuna_status detok_cb(void *ctx, int32_t id, char **piece) { return tuna_detok_stream_push(ctx, id, piece); }

/* stories260K.gguf (llama2.c's model converted by llama.cpp) gives llama2.c's greedy text. */
static void test_stories260k(void **state)
{
    (void)state;
    char p[4096], ej[4096];
    if (!tt_shared_path(p, sizeof p, "peers/python-gen-worker/tests/testdata/stories260K.gguf") ||
        !tt_shared_path(ej, sizeof ej, "peers/extracted/llama2c_expected.json"))
        skip();
    cJSON *doc;
    TT_OK(tuna_json_load(ej, 0, &doc));
    const cJSON *exp = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(doc, "stories260K_greedy"),
                                                        "expected_stdout");
    assert_true(cJSON_IsString(exp));
    struct tuna_gguf_model *gm;
    struct tuna_model_opts mo = {.threads = 2};
    TT_OK(tuna_gguf_model_load(p, &mo, &gm));
    assert_non_null(gm->tokenizer);
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(gm->model, 256, 0, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    tuna_detok_stream *ds;
    TT_OK(tuna_detok_stream_new(gm->tokenizer, true, &ds));
    struct tuna_gen_opts go;
    memset(&go, 0, sizeof go);
    tuna_sampling_default(&go.sampling);
    go.max_tokens = 200; /* llama2.c -n 200: 200 forward steps from BOS, each prints one token */
    int64_t stop = 1;    /* llama2.c stops at BOS */
    go.stop_ids = &stop;
    go.n_stop_ids = 1;
    go.detok = detok_cb;
    go.detok_ctx = ds;
    struct tuna_gen_result r;
    int32_t bos = 1;
    TT_OK(tuna_generate(gm->model, kv, seq, &bos, 1, &go, &r));
    assert_non_null(r.text);
    if (strcmp(r.text, exp->valuestring) != 0) {
        print_error("stories260K greedy text differs:\n ours: %s\n want: %s\n", r.text, exp->valuestring);
        fail();
    }
    printf("  stories260K: %lld greedy tokens equal llama2.c's text\n", (long long)r.n);
    tuna_gen_result_free(&r);
    tuna_detok_stream_free(ds);
    tuna_kv_free(kv);
    tuna_gguf_model_free(gm);
    cJSON_Delete(doc);
}

/* llama.cpp's vocab-only GGUFs against their .inp/.out vectors (HF ids, no specials). */
static void test_vocab_files(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        bool must_pass; /* the vocabularies tuna claims to handle exactly */
    } vocabs[] = {{"models/ggml-vocab-gpt-2", true},     {"models/ggml-vocab-llama-spm", true},
                  {"models/ggml-vocab-phi-3", false},    {"models/ggml-vocab-starcoder", false},
                  {"models/ggml-vocab-refact", false},   {"models-extra/ggml-vocab-dbrx", false}};
    char base[4096];
    if (!tt_shared_path(base, sizeof base, "peers/llama.cpp")) skip();
    for (size_t v = 0; v < sizeof vocabs / sizeof *vocabs; v++) {
        char gp[4300], ip[4400], op[4400];
        snprintf(gp, sizeof gp, "%s/%s.gguf", base, vocabs[v].name);
        snprintf(ip, sizeof ip, "%s.inp", gp);
        snprintf(op, sizeof op, "%s.out", gp);
        if (!tuna_path_exists(gp) || !tuna_path_exists(ip) || !tuna_path_exists(op)) continue;
        tuna_gguf *g;
        if (tuna_gguf_open(gp, &g) != TUNA_OK) {
            /* the dbrx file (an old llama.cpp PR branch) repeats general.file_type: refused, as
             * current llama.cpp refuses duplicate keys */
            printf("  %-30s refused: %s\n", vocabs[v].name, tuna_last_error());
            if (vocabs[v].must_pass || !strstr(tuna_last_error(), "duplicate metadata key")) fail();
            continue;
        }
        tuna_tokenizer *tk = NULL;
        tuna_status st = tuna_gguf_tokenizer_load(g, &tk);
        if (st) {
            printf("  %-30s not loaded: %s\n", vocabs[v].name, tuna_last_error());
            if (vocabs[v].must_pass) fail();
            tuna_gguf_close(g);
            continue;
        }
        char *inp, *outp;
        size_t il, ol;
        TT_OK(tuna_read_file(ip, 0, &inp, &il));
        TT_OK(tuna_read_file(op, 0, &outp, &ol));
        const char *sep = "\n__ggml_vocab_test__\n";
        char *cur = inp, *line = outp;
        int n = 0, ok = 0;
        for (;;) {
            char *e = strstr(cur, sep);
            if (!e) break;
            *e = '\0';
            char *nl = strchr(line, '\n');
            if (!nl) break;
            *nl = '\0';
            int32_t *ids = NULL;
            size_t nid = 0;
            bool match = false;
            if (tuna_tokenizer_encode(tk, cur, strlen(cur), false, false, &ids, &nid) == TUNA_OK) {
                char *q = line;
                size_t k = 0;
                match = true;
                while (*q) {
                    while (*q == ' ') q++;
                    if (!*q) break;
                    long x = strtol(q, &q, 10);
                    if (k >= nid || ids[k] != x) match = false;
                    k++;
                }
                if (k != nid) match = false;
            }
            free(ids);
            n++;
            ok += match;
            cur = e + strlen(sep);
            line = nl + 1;
        }
        printf("  %-30s %d/%d\n", vocabs[v].name, ok, n);
        if (vocabs[v].must_pass && (ok != n || n == 0)) {
            print_error("%s: %d of %d vectors differ\n", vocabs[v].name, n - ok, n);
            fail();
        }
        free(inp);
        free(outp);
        tuna_tokenizer_free(tk);
        tuna_gguf_close(g);
    }
}

/* Logits [T, vocab] of the ids through m. */
static float *run_logits(struct tuna_model *m, const int32_t *ids, int64_t T)
{
    int64_t V = m->arch.vocab_size;
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, T + 8, 0, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    struct tuna_batch b;
    tuna_batch_init(&b);
    TT_OK(tuna_batch_add_seq(&b, ids, T, seq, 0, true, false));
    float *out = malloc(sizeof(float) * (size_t)(T * V));
    assert_non_null(out);
    TT_OK(tuna_model_forward(m, kv, &b, out, NULL));
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    return out;
}

/* dst: a copy of the fixture folder src whose config.json rope_parameters get the members of
 * rope_json (same weights). */
static void make_rope_variant(const char *src, const char *dst, const char *rope_json)
{
    static const char *const files[] = {"model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                        "chat_template.jinja", "generation_config.json"};
    char a[4300], b[4300];
    TT_OK(tuna_mkdir_p(dst));
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(a, sizeof a, "%s/%s", src, files[i]);
        snprintf(b, sizeof b, "%s/%s", dst, files[i]);
        if (tuna_path_exists(a)) TT_OK(tuna_copy_file(a, b));
    }
    snprintf(a, sizeof a, "%s/config.json", src);
    cJSON *c, *upd = cJSON_Parse(rope_json);
    assert_non_null(upd);
    TT_OK(tuna_json_load(a, 1 << 20, &c));
    cJSON *rp = cJSON_GetObjectItemCaseSensitive(c, "rope_parameters");
    assert_non_null(rp);
    cJSON *it;
    cJSON_ArrayForEach(it, upd)
    {
        cJSON_DeleteItemFromObjectCaseSensitive(rp, it->string);
        cJSON_AddItemToObject(rp, it->string, cJSON_Duplicate(it, true));
    }
    char *txt = cJSON_Print(c);
    snprintf(b, sizeof b, "%s/config.json", dst);
    TT_OK(tuna_write_file_atomic(b, txt, strlen(txt)));
    free(txt);
    cJSON_Delete(c);
    cJSON_Delete(upd);
}

/* RoPE scaling survives export: YaRN's attention factor is written as llama.cpp reads it
 * (rope.scaling.attn_factor) and read back, llama3 scaling becomes rope_freqs.weight with
 * convert_hf_to_gguf's factors (base frequency / factor = transformers' llama3 frequency), YaRN
 * settings llama.cpp cannot run are refused. The llama.cpp side: scripts/check_gguf_llamacpp.sh. */
static void test_rope_yarn_attention_factor(void **state)
{
    (void)state;
    char dir[4096], var[4200], out[4300], ref[4300];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny")) skip();
    snprintf(ref, sizeof ref, "%s/reference.safetensors", dir);
    tuna_st_set *rs;
    TT_OK(tuna_st_set_open_file(ref, &rs));
    const struct tuna_tensor_view *ids = tuna_st_set_find(rs, "prompt0.input_ids");
    assert_non_null(ids);
    int64_t T = (int64_t)ids->numel;
    struct tuna_model_opts mo = {.threads = 2};
    struct tuna_gguf_export_opts o = {.ftype = TUNA_GGUF_FT_F32, .quiet = true};

    /* YaRN with an explicit attention_factor: the imported file computes what the folder does */
    snprintf(var, sizeof var, "%s/rope-yarn-attn", tt_tmpdir());
    make_rope_variant(dir, var,
                      "{\"rope_type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":128,"
                      "\"attention_factor\":1.3}");
    snprintf(out, sizeof out, "%s.gguf", var);
    TT_OK(tuna_gguf_export(var, &o, out));
    tuna_gguf *g;
    TT_OK(tuna_gguf_open(out, &g));
    float af;
    TT_OK(tuna_gguf_get_f32(g, "llama.rope.scaling.attn_factor", &af));
    assert_true(fabs(af - 1.3 / (0.1 * log(4.0) + 1.0)) < 1e-6);
    tuna_gguf_close(g);
    struct tuna_model *m;
    TT_OK(tuna_model_load(var, &mo, &m));
    float *want = run_logits(m, ids->data, T);
    int64_t V = m->arch.vocab_size;
    tuna_model_free(m);
    struct tuna_gguf_model *gm;
    TT_OK(tuna_gguf_model_load(out, &mo, &gm));
    float *got = run_logits(gm->model, ids->data, T);
    double err = tt_rel_err(got, want, (size_t)(T * V));
    printf("  yarn attention_factor 1.3: GGUF vs folder logits rel err %.2e\n", err);
    assert_true(err < 1e-5);
    free(got);
    free(want);
    tuna_gguf_model_free(gm);
    tuna_st_set_close(rs);
}

static void test_rope_llama3(void **state)
{
    (void)state;
    char dir[4096], var[4200], out[4300];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny")) skip();
    struct tuna_model_opts mo = {.threads = 2};
    struct tuna_gguf_export_opts o = {.ftype = TUNA_GGUF_FT_F32, .quiet = true};
    tuna_gguf *g;
    struct tuna_gguf_model *gm;
    snprintf(var, sizeof var, "%s/rope-llama3", tt_tmpdir());
    make_rope_variant(dir, var,
                      "{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,"
                      "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":64}");
    snprintf(out, sizeof out, "%s.gguf", var);
    TT_OK(tuna_gguf_export(var, &o, out));
    TT_OK(tuna_gguf_open(out, &g));
    const struct tuna_gguf_tensor *rf = tuna_gguf_find_tensor(g, "rope_freqs.weight");
    assert_non_null(rf);
    assert_int_equal(rf->type, TUNA_GGML_F32);
    assert_int_equal(rf->n_dims, 1);
    struct tuna_arch a;
    TT_OK(tuna_arch_load(var, &a));
    int64_t rot = tuna_rope_rot_dim(&a);
    assert_int_equal(rf->ne[0], rot / 2);
    float *inv = malloc(sizeof(float) * (size_t)rot), attn;
    assert_non_null(inv);
    tuna_rope_inv_freq(&a, 0, inv, &attn);
    const float *f = rf->data;
    int n1 = 0, nf = 0, nmid = 0;
    for (int64_t i = 0; i < rot / 2; i++) {
        double base = 1.0 / pow(a.rope.theta, (double)(2 * i) / (double)rot);
        assert_true(fabs(base / f[i] - inv[i]) <= 1e-6 * inv[i]);
        n1 += f[i] == 1.0f;
        nf += f[i] == 8.0f;
        nmid += f[i] > 1.0f && f[i] < 8.0f;
    }
    printf("  llama3 rope_freqs: %d × 1, %d smoothed, %d × factor\n", n1, nmid, nf);
    assert_true(n1 > 0 && nf > 0 && nmid > 0); /* the variant exercises all three bands */
    free(inv);
    tuna_arch_free(&a);
    tuna_gguf_close(g);
    TT_FAILS(tuna_gguf_model_load(out, &mo, &gm), TUNA_E_UNSUPPORTED, "rope_freqs");
}

/* YaRN settings llama.cpp does not read for these architectures are refused, no file written */
static void test_rope_yarn_refused(void **state)
{
    (void)state;
    char dir[4096], var[4200], out[4300];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny")) skip();
    struct tuna_gguf_export_opts o = {.ftype = TUNA_GGUF_FT_F32, .quiet = true};
    snprintf(var, sizeof var, "%s/rope-yarn-beta", tt_tmpdir());
    make_rope_variant(dir, var, "{\"rope_type\":\"yarn\",\"factor\":4.0,\"beta_fast\":16.0}");
    snprintf(out, sizeof out, "%s.gguf", var);
    TT_FAILS(tuna_gguf_export(var, &o, out), TUNA_E_UNSUPPORTED, "beta_fast 16");
    assert_false(tuna_path_exists(out));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_export_import_fixtures),
        cmocka_unit_test(test_qk_permutation),
        cmocka_unit_test(test_tokenizer_roundtrip),
        cmocka_unit_test(test_stories260k),
        cmocka_unit_test(test_vocab_files),
        cmocka_unit_test(test_rope_yarn_attention_factor),
        cmocka_unit_test(test_rope_llama3),
        cmocka_unit_test(test_rope_yarn_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
