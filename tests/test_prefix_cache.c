/* test_prefix_cache.c — automatic prefix caching through the serving engine (engine.c, its
 * thread, scheduler and KV cache) on real models: requests sharing a long prefix give the same
 * greedy tokens with and without prefix caching and as tuna_generate, while the later ones
 * prefill only what is not cached (vllm:prefix_cache_hits); a LoRA adapter never shares the base
 * model's blocks (llama-tiny + its PEFT adapter). */
#include "testutil.h"

#include "lora/lora.h"
#include "model/generate.h"
#include "serve/engine.h"
#include "tokenizer/tokenizer.h"

enum { GEN = 12, MAXP = 256, BS = 16 };

struct req_spec {
    int32_t ids[MAXP];
    int64_t n;
    int32_t adapter;
};

struct run_out {
    int32_t ids[4][GEN];
    uint64_t queries, hits, prompt_tokens;
};

/* Runs the requests one after the other through an engine; collects each one's greedy ids (from
 * the logprobs records) and the prefix cache counters. */
static void run_engine(struct tuna_model *m, const tuna_tokenizer *tok, bool caching, const struct req_spec *rq,
                       int n_rq, struct run_out *out)
{
    struct tuna_metrics met;
    tuna_metrics_init(&met);
    struct tuna_engine_config ec = {.kv_tokens = 2048, .block_size = BS, .max_num_seqs = 4,
                                    .max_num_batched_tokens = 512, .max_pending = 8,
                                    .enable_prefix_caching = caching};
    tuna_engine *e;
    TT_OK(tuna_engine_start(m, tok, &ec, &met, &e));
    for (int k = 0; k < n_rq; k++) {
        struct tuna_serve_params p;
        memset(&p, 0, sizeof p);
        p.kind = TUNA_SERVE_COMPLETION;
        p.model = strdup("m");
        p.adapter = rq[k].adapter;
        p.prompt = malloc((size_t)rq[k].n * sizeof *p.prompt);
        assert_non_null(p.prompt);
        memcpy(p.prompt, rq[k].ids, (size_t)rq[k].n * sizeof *p.prompt);
        p.n_prompt = rq[k].n;
        tuna_sampling_default(&p.sampling);
        p.max_tokens = GEN;
        p.n = 1;
        p.logprobs = true; /* the records carry the ids */
        struct tuna_serve_req *r;
        TT_OK(tuna_serve_req_new(&p, &r));
        TT_OK(tuna_engine_submit(e, r));
        int got = 0;
        const char *finish = NULL;
        struct tuna_serve_event *ev;
        while ((ev = tuna_serve_req_pop(r))) {
            for (int i = 0; i < ev->n_lps; i++) {
                assert_true(got < GEN);
                out->ids[k][got++] = ev->lps[i].id;
            }
            if (ev->finish) finish = ev->finish;
            tuna_serve_event_free(ev);
        }
        assert_non_null(finish);
        assert_string_equal(finish, "length");
        assert_int_equal(got, GEN);
        tuna_serve_req_unref(r);
    }
    tuna_engine_stop(e); /* the thread has ended: the metrics are final */
    /* every request finished: no block is referenced, though cached ones remain (evictable = free) */
    int64_t used = -1, total = 0;
    tuna_engine_kv_usage(e, &used, &total);
    assert_int_equal(used, 0);
    assert_true(met.kv_usage == 0.0);
    out->queries = met.prefix_cache_queries;
    out->hits = met.prefix_cache_hits;
    out->prompt_tokens = met.prompt_tokens;
    char *text = NULL;
    TT_OK(tuna_metrics_render(&met, "m", &text));
    char line[128];
    snprintf(line, sizeof line, "vllm:prefix_cache_hits_total{model_name=\"m\"} %llu\n", (unsigned long long)out->hits);
    assert_non_null(strstr(text, line));
    snprintf(line, sizeof line, "vllm:prefix_cache_queries_total{model_name=\"m\"} %llu\n",
             (unsigned long long)out->queries);
    assert_non_null(strstr(text, line));
    free(text);
    tuna_engine_free(e);
    tuna_metrics_destroy(&met);
}

/* Greedy ids of `tuna generate` (one sequence in a fresh cache, the prompt prefilled at once). */
static void generate_ref(struct tuna_model *m, const struct req_spec *rq, int32_t *ids)
{
    tuna_kv_cache *kv;
    TT_OK(tuna_model_kv_new(m, 1024, BS, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    struct tuna_gen_opts o;
    memset(&o, 0, sizeof o);
    tuna_sampling_default(&o.sampling);
    o.max_tokens = GEN;
    struct tuna_gen_result res;
    TT_OK(tuna_generate(m, kv, seq, rq->ids, rq->n, &o, &res));
    assert_int_equal(res.n, GEN);
    memcpy(ids, res.ids, GEN * sizeof *ids);
    tuna_gen_result_free(&res);
    tuna_kv_free(kv);
}

/* A = P + tail1, B = P + tail2 (first tail tokens differ), C = A again. */
static void make_requests(const int32_t *text_ids, size_t n_text, int64_t n_p, int32_t adapter_b,
                          struct req_spec *rq)
{
    assert_true((int64_t)n_text >= n_p + 40);
    for (int k = 0; k < 3; k++) {
        memcpy(rq[k].ids, text_ids, (size_t)n_p * sizeof *text_ids);
        rq[k].adapter = -1;
    }
    memcpy(rq[0].ids + n_p, text_ids + n_p, 10 * sizeof *text_ids);
    memcpy(rq[1].ids + n_p, text_ids + n_p + 20, 13 * sizeof *text_ids);
    if (rq[1].ids[n_p] == rq[0].ids[n_p]) rq[1].ids[n_p] = (rq[1].ids[n_p] + 1) % 100;
    rq[0].n = n_p + 10;
    rq[1].n = n_p + 13;
    rq[1].adapter = adapter_b;
    rq[2] = rq[0];
}

static void test_pymini_same_tokens_fewer_prefills(void **state)
{
    (void)state;
    char dir[4096], path[4200];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/pymini")) skip();
    struct tuna_model_opts mo = {.threads = 2, .max_model_len = 0};
    struct tuna_model *m;
    tuna_tokenizer *tok;
    TT_OK(tuna_model_load(dir, &mo, &m));
    TT_OK(tuna_tokenizer_load(dir, &tok));
    snprintf(path, sizeof path, "%s/heldout.txt", dir);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char text[3000];
    size_t nt = fread(text, 1, sizeof text, f);
    fclose(f);
    int32_t *tids;
    size_t n_tids;
    TT_OK(tuna_tokenizer_encode(tok, text, nt, true, false, &tids, &n_tids));
    struct req_spec rq[3];
    const int64_t n_p = 101; /* 6 full blocks and 5 tokens */
    make_requests(tids, n_tids, n_p, -1, rq);
    free(tids);

    struct run_out on, off;
    run_engine(m, tok, true, rq, 3, &on);
    run_engine(m, tok, false, rq, 3, &off);
    for (int k = 0; k < 3; k++) {
        int32_t ref[GEN];
        generate_ref(m, &rq[k], ref);
        assert_memory_equal(on.ids[k], ref, sizeof ref);
        assert_memory_equal(off.ids[k], ref, sizeof ref);
    }
    /* B shares P's 6 full blocks; C (= A) finds A's blocks up to its last prompt token */
    uint64_t b_hits = (uint64_t)(n_p / BS * BS), c_hits = (uint64_t)((rq[2].n - 1) / BS * BS);
    assert_int_equal(on.hits, b_hits + c_hits);
    assert_int_equal(on.queries, (uint64_t)(rq[0].n + rq[1].n + rq[2].n));
    assert_int_equal(off.hits, 0);
    assert_int_equal(off.queries, 0);
    assert_int_equal(on.prompt_tokens, off.prompt_tokens); /* vllm:prompt_tokens_total counts whole prompts */
    tuna_tokenizer_free(tok);
    tuna_model_free(m);
}

static void test_lora_adapter_never_shares(void **state)
{
    (void)state;
    char dir[4096], adir[4096];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models/llama-tiny") ||
        !tt_shared_path(adir, sizeof adir, "fixtures/lora/llama-tiny/adapter"))
        skip();
    struct tuna_model_opts mo = {.threads = 2, .max_model_len = 0};
    struct tuna_model *m;
    tuna_tokenizer *tok;
    TT_OK(tuna_model_load(dir, &mo, &m));
    TT_OK(tuna_tokenizer_load(dir, &tok));
    const char *dirs[1] = {adir};
    struct tuna_lora_set *set;
    TT_OK(tuna_lora_set_open(m, dirs, 1, &set));
    int32_t ids[200];
    for (int i = 0; i < 200; i++) ids[i] = (int32_t)((i * 37 + 11) % (m->arch.vocab_size - 1)) + 1;
    struct req_spec rq[4];
    const int64_t n_p = 48; /* 3 full blocks */
    make_requests(ids, 200, n_p, 0, rq);
    rq[2].adapter = 0; /* A with the adapter: finds B's blocks (P), none of the base model's A */
    rq[3] = rq[1];
    rq[3].adapter = -1; /* B on the base model: finds A's P blocks */
    struct run_out on, off;
    run_engine(m, tok, true, rq, 4, &on);
    run_engine(m, tok, false, rq, 4, &off);
    for (int k = 0; k < 4; k++) assert_memory_equal(on.ids[k], off.ids[k], sizeof on.ids[k]);
    /* A(base): 0; B(adapter): 0 — the base model's P blocks are not shared; A(adapter): P from B;
     * B(base): P from A */
    assert_int_equal(on.hits, (uint64_t)(2 * n_p));
    assert_int_equal(on.queries, (uint64_t)(rq[0].n + rq[1].n + rq[2].n + rq[3].n));
    tuna_lora_set_free(m, set);
    tuna_tokenizer_free(tok);
    tuna_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pymini_same_tokens_fewer_prefills),
        cmocka_unit_test(test_lora_adapter_never_shares),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
