/* test_sampler.c — vLLM sampling semantics on small hand-made distributions, seeding, and
 * generation_config.json defaults. */
#include "testutil.h"

#include <math.h>

#include "model/sampler.h"

static tuna_sampler *make(struct tuna_sampling *p, int64_t V)
{
    tuna_sampler *s;
    TT_OK(tuna_sampler_new(p, V, &s));
    return s;
}

/* logits of the distribution probs (log) */
static void logp(const double *probs, float *lg, int n)
{
    for (int i = 0; i < n; i++) lg[i] = (float)log(probs[i]);
}

static void draw_hist(tuna_sampler *s, const float *base, int n, int draws, int *hist)
{
    float lg[16];
    memset(hist, 0, sizeof(int) * (size_t)n);
    for (int d = 0; d < draws; d++) {
        memcpy(lg, base, sizeof(float) * (size_t)n);
        int32_t id = tuna_sampler_sample(s, lg);
        assert_true(id >= 0 && id < n);
        hist[id]++;
    }
}

static void test_greedy_and_penalties(void **state)
{
    (void)state;
    struct tuna_sampling p;
    tuna_sampling_default(&p);
    tuna_sampler *s = make(&p, 4);
    float lg[4] = {0.5f, 2.0f, -1.0f, 1.9f};
    assert_int_equal(tuna_sampler_sample(s, lg), 1);
    tuna_sampler_free(s);

    p.repetition_penalty = 2.0f; /* token 1 in the prompt: 2.0 -> 1.0; token 2 negative: -1 -> -2 */
    s = make(&p, 4);
    int32_t prompt[2] = {1, 2};
    tuna_sampler_reset(s, prompt, 2);
    float lg2[4] = {0.5f, 2.0f, -1.0f, 1.9f};
    assert_int_equal(tuna_sampler_sample(s, lg2), 3);
    assert_true(lg2[1] == 1.0f && lg2[2] == -2.0f && lg2[3] == 1.9f);
    tuna_sampler_free(s);

    tuna_sampling_default(&p);
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    s = make(&p, 4);
    tuna_sampler_reset(s, prompt, 2); /* prompt tokens are not output: no frequency penalty */
    tuna_sampler_accept(s, 3);
    tuna_sampler_accept(s, 3);
    float lg3[4] = {0.5f, 2.0f, -1.0f, 1.9f};
    assert_int_equal(tuna_sampler_sample(s, lg3), 1);
    assert_true(fabsf(lg3[3] - (1.9f - 1.0f - 0.25f)) < 1e-6f);
    assert_true(lg3[1] == 2.0f);
    tuna_sampler_free(s);
}

static void test_distribution_and_seed(void **state)
{
    (void)state;
    const double probs[4] = {0.5, 0.3, 0.15, 0.05};
    float base[4];
    logp(probs, base, 4);
    struct tuna_sampling p;
    tuna_sampling_default(&p);
    p.temperature = 1.0f;
    p.seed = 1234;
    p.has_seed = true;
    tuna_sampler *s = make(&p, 4);
    int hist[4];
    const int N = 40000;
    draw_hist(s, base, 4, N, hist);
    for (int i = 0; i < 4; i++) {
        double f = (double)hist[i] / N, sd = sqrt(probs[i] * (1 - probs[i]) / N);
        assert_true(fabs(f - probs[i]) < 5 * sd);
    }
    tuna_sampler_free(s);
    /* same seed: same tokens; another seed: another sequence */
    int32_t a[64], b[64], c[64];
    for (int run = 0; run < 3; run++) {
        p.seed = run == 2 ? 99 : 1234;
        s = make(&p, 4);
        for (int i = 0; i < 64; i++) {
            float lg[4];
            memcpy(lg, base, sizeof lg);
            (run == 0 ? a : run == 1 ? b : c)[i] = tuna_sampler_sample(s, lg);
        }
        tuna_sampler_free(s);
    }
    assert_memory_equal(a, b, sizeof a);
    assert_memory_not_equal(a, c, sizeof a);
}

static void test_filters(void **state)
{
    (void)state;
    const double probs[4] = {0.5, 0.3, 0.15, 0.05};
    float base[4];
    logp(probs, base, 4);
    struct tuna_sampling p;
    int hist[4];
    /* top-p 0.7: the ascending tail 0.05 + 0.15 = 0.2 <= 0.3 goes, 0.3 more would not */
    tuna_sampling_default(&p);
    p.temperature = 1.0f;
    p.top_p = 0.7f;
    p.has_seed = true;
    tuna_sampler *s = make(&p, 4);
    draw_hist(s, base, 4, 20000, hist);
    assert_int_equal(hist[2] + hist[3], 0);
    assert_true(fabs((double)hist[0] / 20000 - 0.625) < 0.02);
    tuna_sampler_free(s);
    /* min-p 0.5: keep probs >= 0.25 */
    tuna_sampling_default(&p);
    p.temperature = 1.0f;
    p.min_p = 0.5f;
    s = make(&p, 4);
    draw_hist(s, base, 4, 5000, hist);
    assert_int_equal(hist[2] + hist[3], 0);
    assert_true(hist[1] > 0);
    tuna_sampler_free(s);
    /* top-k 1 with a high temperature is still greedy */
    tuna_sampling_default(&p);
    p.temperature = 5.0f;
    p.top_k = 1;
    s = make(&p, 4);
    draw_hist(s, base, 4, 1000, hist);
    assert_int_equal(hist[0], 1000);
    tuna_sampler_free(s);
    /* top-k 2 keeps ties with the 2nd value */
    float tie[4] = {3.0f, 1.0f, 1.0f, 0.0f};
    p.top_k = 2;
    p.temperature = 1.0f;
    s = make(&p, 4);
    draw_hist(s, tie, 4, 20000, hist);
    assert_true(hist[1] > 0 && hist[2] > 0);
    assert_int_equal(hist[3], 0);
    tuna_sampler_free(s);
    /* temperature sharpens: at 0.5 the probabilities are squared and renormalized */
    tuna_sampling_default(&p);
    p.temperature = 0.5f;
    s = make(&p, 4);
    draw_hist(s, base, 4, 40000, hist);
    double z = 0.25 + 0.09 + 0.0225 + 0.0025;
    assert_true(fabs((double)hist[0] / 40000 - 0.25 / z) < 0.015);
    tuna_sampler_free(s);
}

static void test_bad_settings(void **state)
{
    (void)state;
    struct tuna_sampling p;
    tuna_sampler *s;
    tuna_sampling_default(&p);
    p.top_p = 0;
    TT_FAILS(tuna_sampler_new(&p, 4, &s), TUNA_E_INVALID, "--top-p");
    tuna_sampling_default(&p);
    p.temperature = -1;
    TT_FAILS(tuna_sampler_new(&p, 4, &s), TUNA_E_INVALID, "--temperature");
    tuna_sampling_default(&p);
    p.presence_penalty = 3;
    TT_FAILS(tuna_sampler_new(&p, 4, &s), TUNA_E_INVALID, "--presence-penalty");
}

static void test_generation_config(void **state)
{
    (void)state;
    const char *dir = tt_tmpdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    const char *js = "{\"do_sample\": true, \"temperature\": 0.6, \"top_p\": 0.9, \"eos_token_id\": [128001, 128008, 128009]}";
    tt_write(path, js, strlen(js));
    struct tuna_gen_config gc;
    TT_OK(tuna_gen_config_load(dir, &gc));
    assert_true(gc.found);
    assert_int_equal(gc.n_eos, 3);
    assert_int_equal(gc.eos_ids[2], 128009);
    assert_true(fabsf(gc.sampling.temperature - 0.6f) < 1e-6f);
    assert_true(fabsf(gc.sampling.top_p - 0.9f) < 1e-6f);
    assert_int_equal(gc.sampling.top_k, 50); /* HF's default when do_sample */
    js = "{\"temperature\": 0.6, \"eos_token_id\": 7}";
    tt_write(path, js, strlen(js));
    TT_OK(tuna_gen_config_load(dir, &gc));
    assert_true(gc.sampling.temperature == 0.0f); /* do_sample absent: greedy */
    assert_int_equal(gc.n_eos, 1);
    assert_int_equal(gc.eos_ids[0], 7);
    js = "{\"eos_token_id\": \"x\"}";
    tt_write(path, js, strlen(js));
    TT_FAILS(tuna_gen_config_load(dir, &gc), TUNA_E_FORMAT, "eos_token_id");
    remove(path);
    TT_OK(tuna_gen_config_load(dir, &gc));
    assert_false(gc.found);
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_and_penalties),
        cmocka_unit_test(test_distribution_and_seed),
        cmocka_unit_test(test_filters),
        cmocka_unit_test(test_bad_settings),
        cmocka_unit_test(test_generation_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
