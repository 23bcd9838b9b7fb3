/* test_greedy.c — device-side greedy: the CPU backend's argmax op (the reference of the CUDA twin,
 * tested against it in test_backend_cuda) picks what the sampler's greedy picks on crafted rows
 * (ties, NaN, -inf, odd widths) and on random ones; tuna_model_forward_greedy on models/pymini
 * gives, for a batch mixing prefills and decodes with several logits rows per sequence, the ids
 * the sampler picks from tuna_model_forward's logits; tuna_gen_is_plain_greedy says which
 * sampling settings may take that path. */
#include "testutil.h"

#include <math.h>

#include "backend/cpu/cpu.h"
#include "model/generate.h"
#include "model/sampler.h"

/* The sampler's answer at temperature 0 (it modifies its input: give it a copy). */
static int32_t sampler_greedy(const float *row, int64_t V)
{
    struct tuna_sampling p;
    tuna_sampling_default(&p);
    tuna_sampler *s = NULL;
    TT_OK(tuna_sampler_new(&p, V, &s));
    float *c = malloc((size_t)V * sizeof *c);
    memcpy(c, row, (size_t)V * sizeof *c);
    int32_t id = tuna_sampler_sample(s, c);
    free(c);
    tuna_sampler_free(s);
    return id;
}

static void test_cpu_op(void **state)
{
    (void)state;
    tuna_backend *be = NULL;
    TT_OK(tuna_cpu_backend_new(1, &be));
    const struct tuna_backend_ops *ops = tuna_cpu_backend_ops();
    assert_non_null(ops->argmax);
    enum { V = 37, T = 9 };
    float x[T * V];
    uint64_t r = 12345;
    for (int i = 0; i < T * V; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((r >> 40) % 7) - 3.0f; /* few distinct values: many ties */
    }
    for (int i = 0; i < V; i++)
        x[1 * V + i] = 2.0f; /* all equal: 0 */
    x[2 * V + 0] = NAN;      /* NaN first: 0 */
    x[3 * V + 5] = NAN;      /* NaN elsewhere never wins */
    x[3 * V + 6] = INFINITY;
    for (int i = 0; i < V; i++)
        x[4 * V + i] = -INFINITY; /* all -inf: 0 */
    x[4 * V + 30] = -1e30f;
    x[5 * V + V - 1] = 1e9f; /* the last column */
    int32_t want[T] = {0};
    for (int t = 0; t < T; t++)
        want[t] = sampler_greedy(x + t * V, V);
    assert_int_equal(want[1], 0);
    assert_int_equal(want[2], 0);
    assert_int_equal(want[3], 6);
    assert_int_equal(want[4], 30);
    assert_int_equal(want[5], V - 1);
    int32_t got[T];
    memset(got, 0xff, sizeof got);
    TT_OK(ops->argmax(be, got, x, T, V));
    for (int t = 0; t < T; t++) {
        if (got[t] != want[t]) {
            print_error("row %d: argmax %d, sampler %d\n", t, got[t], want[t]);
            fail();
        }
    }
    tuna_cpu_backend_free(be);
}

static void test_plain_greedy(void **state)
{
    (void)state;
    struct tuna_sampling p;
    tuna_sampling_default(&p);
    assert_true(tuna_gen_is_plain_greedy(&p));
    p.temperature = 0.7f;
    assert_false(tuna_gen_is_plain_greedy(&p));
    tuna_sampling_default(&p);
    p.repetition_penalty = 1.1f;
    assert_false(tuna_gen_is_plain_greedy(&p));
    tuna_sampling_default(&p);
    p.presence_penalty = 0.5f;
    assert_false(tuna_gen_is_plain_greedy(&p));
    tuna_sampling_default(&p);
    p.frequency_penalty = -0.5f;
    assert_false(tuna_gen_is_plain_greedy(&p));
    tuna_sampling_default(&p);
    p.top_k = 5; /* filters do not matter at temperature 0 */
    p.top_p = 0.5f;
    assert_true(tuna_gen_is_plain_greedy(&p));
}

/* Three sequences: a prefill with logits on every row, a prefill with the last row, and a decode. */
static void fill_batch(struct tuna_batch *b, const int32_t *seqs, int step)
{
    static const int32_t p0[] = {1, 17, 300, 4000, 52, 9}, p1[] = {77, 78, 79, 2048, 5};
    tuna_batch_clear(b);
    if (step == 0) {
        TT_OK(tuna_batch_add_seq(b, p0, 6, seqs[0], 0, true, true));
        TT_OK(tuna_batch_add_seq(b, p1, 5, seqs[1], 0, false, true));
        TT_OK(tuna_batch_add(b, 11, seqs[2], 0, true));
    } else {
        TT_OK(tuna_batch_add(b, 123, seqs[0], 6, true));
        TT_OK(tuna_batch_add(b, 1234, seqs[2], 1, true));
        TT_OK(tuna_batch_add_seq(b, p0, 3, seqs[1], 5, false, true));
    }
}

static void test_forward_greedy(void **state)
{
    (void)state;
    struct tuna_model *m = NULL;
    struct tuna_model_opts o = {.threads = 1, .device = TUNA_DEVICE_CPU, .quiet = true};
    TT_OK(tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &o, &m));
    const int64_t V = m->arch.vocab_size;
    tuna_kv_cache *kv1 = NULL, *kv2 = NULL;
    TT_OK(tuna_model_kv_new(m, 256, 4, &kv1));
    TT_OK(tuna_model_kv_new(m, 256, 4, &kv2));
    int32_t s1[3], s2[3];
    for (int i = 0; i < 3; i++) {
        TT_OK(tuna_kv_seq_new(kv1, &s1[i]));
        TT_OK(tuna_kv_seq_new(kv2, &s2[i]));
    }
    struct tuna_batch b1, b2;
    tuna_batch_init(&b1);
    tuna_batch_init(&b2);
    for (int step = 0; step < 2; step++) {
        fill_batch(&b1, s1, step);
        fill_batch(&b2, s2, step);
        float *lg = malloc((size_t)(b1.n_logits * V) * sizeof *lg);
        int32_t ids[16];
        assert_true(b2.n_logits <= 16);
        TT_OK(tuna_model_forward(m, kv1, &b1, lg, NULL));
        TT_OK(tuna_model_forward_greedy(m, kv2, &b2, ids));
        for (int64_t r = 0; r < b1.n_logits; r++) {
            int32_t want = sampler_greedy(lg + r * V, V);
            if (ids[r] != want) {
                print_error("step %d row %lld: forward_greedy %d, sampler on the logits %d\n", step, (long long)r,
                            ids[r], want);
                fail();
            }
        }
        free(lg);
    }
    /* no logits wanted: nothing written */
    tuna_batch_clear(&b2);
    TT_OK(tuna_batch_add(&b2, 5, s2[0], 7, false));
    int32_t sentinel = -7;
    TT_OK(tuna_model_forward_greedy(m, kv2, &b2, &sentinel));
    assert_int_equal(sentinel, -7);
    tuna_batch_free(&b1);
    tuna_batch_free(&b2);
    tuna_kv_free(kv1);
    tuna_kv_free(kv2);
    tuna_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu_op),
        cmocka_unit_test(test_plain_greedy),
        cmocka_unit_test(test_forward_greedy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
