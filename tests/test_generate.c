/* test_generate.c — the decode loop on pymini: greedy output equals the reference's greedy tokens,
 * stop token ids, stop strings (cut before the string, streamed text = final text), seeds, the
 * token limit and the context limit. */
#include "testutil.h"

#include "io/safetensors.h"
#include "model/generate.h"
#include "tokenizer/tokenizer.h"

struct fx {
    struct tuna_model *m;
    tuna_tokenizer *tok;
    int32_t prompt[64];
    int64_t n_prompt;
    int32_t greedy[24];
};

static int setup(void **state)
{
    char dir[4096], refp[4200];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/pymini")) {
        *state = NULL;
        return 0;
    }
    struct fx *f = calloc(1, sizeof *f);
    struct tuna_model_opts o = {.threads = 2, .max_model_len = 0};
    if (tuna_model_load(dir, &o, &f->m) || tuna_tokenizer_load(dir, &f->tok)) return -1;
    snprintf(refp, sizeof refp, "%s/reference.safetensors", dir);
    tuna_st_set *ref;
    if (tuna_st_set_open_file(refp, &ref)) return -1;
    const struct tuna_tensor_view *ids = tuna_st_set_find(ref, "prompt0.input_ids");
    const struct tuna_tensor_view *gr = tuna_st_set_find(ref, "prompt0.greedy");
    if (!ids || !gr || ids->numel > 64 || gr->numel != 24) return -1;
    f->n_prompt = (int64_t)ids->numel;
    memcpy(f->prompt, ids->data, ids->nbytes);
    memcpy(f->greedy, gr->data, sizeof f->greedy);
    tuna_st_set_close(ref);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    if (!f) return 0;
    tuna_model_free(f->m);
    tuna_tokenizer_free(f->tok);
    free(f);
    return 0;
}

struct stream {
    tuna_detok_stream *ds;
    char text[8192];
    size_t len;
};

static tuna_status detok(void *ctx, int32_t id, char **piece)
{
    return tuna_detok_stream_push(((struct stream *)ctx)->ds, id, piece);
}

static int on_text(void *ctx, const char *t, size_t n)
{
    struct stream *s = ctx;
    assert_true(s->len + n < sizeof s->text);
    memcpy(s->text + s->len, t, n);
    s->len += n;
    s->text[s->len] = '\0';
    return 0;
}

/* Runs one generation on a fresh cache. */
static tuna_status run(struct fx *f, struct tuna_gen_opts *o, struct stream *s, struct tuna_gen_result *r)
{
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(f->m, 256, 0, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    if (s) {
        memset(s, 0, sizeof *s);
        TT_OK(tuna_detok_stream_new(f->tok, true, &s->ds));
        o->detok = detok;
        o->detok_ctx = s;
        o->on_text = on_text;
        o->on_text_ctx = s;
    } else {
        o->detok = NULL;
        o->on_text = NULL;
    }
    tuna_status st = tuna_generate(f->m, kv, seq, f->prompt, f->n_prompt, o, r);
    if (s) tuna_detok_stream_free(s->ds);
    tuna_kv_free(kv);
    return st;
}

static void test_greedy_and_stops(void **state)
{
    struct fx *f = *state;
    if (!f) skip();
    struct tuna_gen_opts o;
    memset(&o, 0, sizeof o);
    tuna_sampling_default(&o.sampling);
    o.max_tokens = 24;
    struct tuna_gen_result r;
    struct stream s;
    TT_OK(run(f, &o, &s, &r));
    assert_int_equal(r.n, 24);
    assert_memory_equal(r.ids, f->greedy, sizeof f->greedy);
    assert_string_equal(r.finish_reason, "length");
    assert_string_equal(s.text, r.text);
    char *full;
    TT_OK(tuna_tokenizer_decode(f->tok, f->greedy, 24, true, &full));
    assert_string_equal(r.text, full);
    tuna_gen_result_free(&r);

    /* a stop token: generation ends before it */
    int64_t stop_id = f->greedy[7];
    int first = 0;
    while (f->greedy[first] != stop_id) first++;
    o.stop_ids = &stop_id;
    o.n_stop_ids = 1;
    TT_OK(run(f, &o, NULL, &r));
    assert_int_equal(r.n, first);
    assert_string_equal(r.finish_reason, "stop");
    tuna_gen_result_free(&r);
    o.n_stop_ids = 0;

    /* a stop string from the middle of the text: output ends right before its first occurrence */
    size_t L = strlen(full);
    assert_true(L > 20);
    char stop[8];
    memcpy(stop, full + L / 2, 4);
    stop[4] = '\0';
    const char *stops[1] = {stop};
    o.stop = stops;
    o.n_stop = 1;
    TT_OK(run(f, &o, &s, &r));
    size_t cut = (size_t)(strstr(full, stop) - full);
    assert_int_equal(strlen(r.text), cut);
    assert_memory_equal(r.text, full, cut);
    assert_string_equal(s.text, r.text);
    assert_string_equal(r.finish_reason, "stop");
    tuna_gen_result_free(&r);
    free(full);
}

static void test_seed_and_limits(void **state)
{
    struct fx *f = *state;
    if (!f) skip();
    struct tuna_gen_opts o;
    memset(&o, 0, sizeof o);
    tuna_sampling_default(&o.sampling);
    o.sampling.temperature = 1.0f;
    o.sampling.has_seed = true;
    o.max_tokens = 16;
    struct tuna_gen_result a, b, c;
    o.sampling.seed = 42;
    TT_OK(run(f, &o, NULL, &a));
    TT_OK(run(f, &o, NULL, &b));
    o.sampling.seed = 43;
    TT_OK(run(f, &o, NULL, &c));
    assert_int_equal(a.n, 16);
    assert_memory_equal(a.ids, b.ids, sizeof(int32_t) * 16);
    assert_memory_not_equal(a.ids, c.ids, sizeof(int32_t) * 16);
    tuna_gen_result_free(&a);
    tuna_gen_result_free(&b);
    tuna_gen_result_free(&c);

    /* context limit: prompt + output never exceed it */
    int64_t saved = f->m->max_model_len;
    f->m->max_model_len = f->n_prompt + 5;
    o.max_tokens = 0;
    TT_OK(run(f, &o, NULL, &a));
    assert_int_equal(a.n, 5);
    assert_string_equal(a.finish_reason, "length");
    tuna_gen_result_free(&a);
    f->m->max_model_len = f->n_prompt;
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(f->m, 256, 0, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    TT_FAILS(tuna_generate(f->m, kv, seq, f->prompt, f->n_prompt, &o, &a), TUNA_E_RANGE, "leaves no room");
    tuna_kv_free(kv);
    f->m->max_model_len = saved;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_and_stops),
        cmocka_unit_test(test_seed_and_limits),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
