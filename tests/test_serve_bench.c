/* test_serve_bench.c — the serving benchmark's driver (serve/bench.h) on models/pymini on the CPU:
 * every request completes with exactly `gen` tokens, the greedy outputs of the batched engine
 * equal tuna_generate run alone on the same prompt (offline, closed loop, a KV cache so small
 * that sequences wait and get preempted, and two synthetic LoRA adapters mixed in one batch),
 * the counters are consistent (tokens, steps, peak KV within the cache), and a prompt that does
 * not fit the context is refused. */
#include "testutil.h"

#include "lora/lora.h"
#include "model/generate.h"
#include "serve/bench.h"

static struct tuna_model *g_m;

static int setup(void **state)
{
    (void)state;
    struct tuna_model_opts o = {.threads = 1, .device = TUNA_DEVICE_CPU, .quiet = true};
    if (tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &o, &g_m)) {
        fprintf(stderr, "cannot load models/pymini: %s\n", tuna_last_error());
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    tuna_model_free(g_m);
    return 0;
}

static struct tuna_engine_config engine_cfg(int64_t kv_tokens, int64_t max_seqs)
{
    struct tuna_engine_config ec = {0};
    ec.kv_tokens = kv_tokens;
    ec.block_size = 4;
    ec.max_num_seqs = max_seqs;
    ec.max_num_batched_tokens = 64;
    ec.max_pending = 1;
    ec.enable_prefix_caching = true;
    return ec;
}

/* Each request's output must equal greedy tuna_generate of its prompt alone (adapter i % n_ad). */
static void check_outputs(const struct tuna_serve_bench_result *r, const struct tuna_serve_bench_config *c, int n_ad)
{
    tuna_kv_cache *kv = NULL;
    TT_OK(tuna_model_kv_new(g_m, c->prompt_len + c->gen + 8, 4, &kv));
    for (int64_t i = 0; i < r->n; i++) {
        int32_t seq;
        TT_OK(tuna_kv_seq_new(kv, &seq));
        struct tuna_gen_opts o;
        memset(&o, 0, sizeof o);
        tuna_sampling_default(&o.sampling);
        o.max_tokens = c->gen;
        o.adapter_plus1 = n_ad ? (int32_t)(i % n_ad) + 1 : 0;
        struct tuna_gen_result g;
        TT_OK(tuna_generate(g_m, kv, seq, r->prompts[i], c->prompt_len, &o, &g));
        assert_int_equal(g.n, c->gen);
        assert_int_equal(r->n_out[i], c->gen);
        for (int64_t t = 0; t < c->gen; t++) {
            if (g.ids[t] != r->outputs[i][t]) {
                print_error("request %lld token %lld: engine %d, generate alone %d\n", (long long)i, (long long)t,
                            r->outputs[i][t], g.ids[t]);
                fail();
            }
        }
        tuna_gen_result_free(&g);
        tuna_kv_seq_free(kv, seq);
    }
    tuna_kv_free(kv);
}

static void check_counts(const struct tuna_serve_bench_result *r, const struct tuna_serve_bench_config *c)
{
    assert_int_equal(r->completed, c->n_requests);
    assert_int_equal(r->failed, 0);
    assert_int_equal(r->output_tokens, c->n_requests * c->gen);
    assert_int_equal(r->prompt_tokens, c->n_requests * c->prompt_len);
    /* every token is computed once unless a preemption recomputes it */
    if (r->eng.preemptions == 0) assert_true(r->eng.step_tokens <= c->n_requests * (c->prompt_len + c->gen));
    assert_true(r->eng.steps >= c->gen);
    /* the step kinds (bench --serve's "step kinds" line): decode-only steps carry one token per
     * sequence, the other steps every prompt token */
    assert_true(r->eng.decode_steps > 0 && r->eng.decode_steps < r->eng.steps);
    assert_true(r->eng.decode_tokens >= r->eng.decode_steps && r->eng.decode_forward_s <= r->eng.forward_s);
    assert_true(r->eng.step_tokens - r->eng.decode_tokens >= c->n_requests * c->prompt_len);
    assert_true(r->eng.peak_kv_blocks > 0 && r->eng.peak_kv_blocks <= r->eng.kv_blocks);
    assert_true(r->wall_s > 0);
    assert_true(r->ttft_p50 > 0 && r->ttft_p50 <= r->ttft_p99);
    assert_true(r->itl_p50 > 0 && r->itl_p50 <= r->itl_p99);
}

static void test_offline(void **state)
{
    (void)state;
    struct tuna_engine_config ec = engine_cfg(512, 8);
    struct tuna_serve_bench_config c = {.n_requests = 6, .prompt_len = 13, .gen = 9, .seed = 5, .keep_outputs = true};
    struct tuna_serve_bench_result r;
    TT_OK(tuna_serve_bench_run(g_m, NULL, &ec, NULL, 0, &c, &r));
    check_counts(&r, &c);
    /* all at once: the decode steps batch every request */
    assert_true((double)r.eng.step_seqs / (double)r.eng.steps > 3.0);
    /* prompts differ per request */
    assert_memory_not_equal(r.prompts[0], r.prompts[1], (size_t)c.prompt_len * sizeof(int32_t));
    check_outputs(&r, &c, 0);
    tuna_serve_bench_result_free(&r);
}

static void test_closed_loop(void **state)
{
    (void)state;
    struct tuna_engine_config ec = engine_cfg(512, 8);
    struct tuna_serve_bench_config c = {
        .n_requests = 5, .prompt_len = 7, .gen = 6, .concurrency = 2, .seed = 9, .keep_outputs = true};
    struct tuna_serve_bench_result r;
    TT_OK(tuna_serve_bench_run(g_m, NULL, &ec, NULL, 0, &c, &r));
    check_counts(&r, &c);
    /* at most 2 in flight: never more than 2 sequences in a step */
    assert_true(r.eng.step_seqs <= 2 * r.eng.steps);
    check_outputs(&r, &c, 0);
    tuna_serve_bench_result_free(&r);
}

static void test_preemption(void **state)
{
    (void)state;
    /* 10 blocks of 4 tokens; 4 requests of 9 + 12 tokens need 6 blocks each at the end */
    struct tuna_engine_config ec = engine_cfg(40, 4);
    struct tuna_serve_bench_config c = {.n_requests = 4, .prompt_len = 9, .gen = 12, .seed = 3, .keep_outputs = true};
    struct tuna_serve_bench_result r;
    TT_OK(tuna_serve_bench_run(g_m, NULL, &ec, NULL, 0, &c, &r));
    check_counts(&r, &c);
    assert_int_equal(r.eng.kv_blocks, 10);
    check_outputs(&r, &c, 0);
    tuna_serve_bench_result_free(&r);
}

static void test_loras(void **state)
{
    (void)state;
    struct tuna_lora_adapter *ads[2];
    TT_OK(tuna_serve_bench_make_adapters(g_m, 2, 4, 11, ads));
    assert_int_equal(ads[0]->n_modules, 7 * g_m->arch.n_layers);
    assert_non_null(tuna_lora_find(ads[0], "model.layers.0.mlp.down_proj"));
    struct tuna_engine_config ec = engine_cfg(512, 8);
    struct tuna_serve_bench_config c = {.n_requests = 4, .prompt_len = 10, .gen = 6, .seed = 1, .keep_outputs = true};
    struct tuna_serve_bench_result r;
    TT_OK(tuna_serve_bench_run(g_m, NULL, &ec, (const struct tuna_lora_adapter *const *)ads, 2, &c, &r));
    check_counts(&r, &c);
    /* the engine detached them when it stopped: attach here for the reference */
    tuna_lora_attachment *att = NULL;
    TT_OK(tuna_lora_attach(g_m, (const struct tuna_lora_adapter *const *)ads, 2, &att));
    check_outputs(&r, &c, 2);
    /* the adapters change the outputs (else this test could not tell) */
    struct tuna_serve_bench_result base;
    tuna_lora_detach(g_m, att);
    TT_OK(tuna_serve_bench_run(g_m, NULL, &ec, NULL, 0, &c, &base));
    int differ = 0;
    for (int64_t i = 0; i < c.n_requests; i++)
        differ += memcmp(base.outputs[i], r.outputs[i], (size_t)c.gen * sizeof(int32_t)) != 0;
    assert_true(differ > 0);
    tuna_serve_bench_result_free(&base);
    tuna_serve_bench_result_free(&r);
    tuna_lora_free(ads[0]);
    tuna_lora_free(ads[1]);
}

static void test_refusals(void **state)
{
    (void)state;
    struct tuna_engine_config ec = engine_cfg(512, 8);
    struct tuna_serve_bench_config c = {.n_requests = 1, .prompt_len = g_m->max_model_len, .gen = 4};
    struct tuna_serve_bench_result r;
    TT_FAILS(tuna_serve_bench_run(g_m, NULL, &ec, NULL, 0, &c, &r), TUNA_E_RANGE, "exceed the context");
    c.prompt_len = 4;
    c.n_requests = 0;
    TT_FAILS(tuna_serve_bench_run(g_m, NULL, &ec, NULL, 0, &c, &r), TUNA_E_INVALID, "requests >= 1");
    struct tuna_lora_adapter *ads[1];
    TT_FAILS(tuna_serve_bench_make_adapters(g_m, 1, 0, 1, ads), TUNA_E_INVALID, "--lora-rank");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_offline), cmocka_unit_test(test_closed_loop), cmocka_unit_test(test_preemption),
        cmocka_unit_test(test_loras),   cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
