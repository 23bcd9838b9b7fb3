/* test_scheduler.c — continuous batching on an allocator-only KV cache (no tensors): the test
 * plays the forward pass (grows each sequence as the model would) and checks every step's
 * invariants: the token budget, max_num_seqs, positions that continue each sequence, a forward
 * pass that never runs out of blocks, chunked prefill, preemption by recompute, and every block
 * back in the free list at the end. */
#include "testutil.h"

#include "serve/scheduler.h"

struct sim {
    int64_t want;   /* tokens to generate */
    int64_t gen;    /* generated so far */
    bool done;
};

/* Runs sequences with the given prompt lengths to completion; returns the number of steps. */
static int64_t run(int32_t n_blocks, int32_t bs, int64_t max_seqs, int64_t budget, int n, const int64_t *prompt_len,
                   const int64_t *gen_len, int64_t *preemptions, int64_t *max_chunks)
{
    struct tuna_kv_config cfg = {.n_layers = 0, .n_kv_heads = 0, .head_dim = 0, .block_size = bs, .n_blocks = n_blocks};
    tuna_kv_cache *kv;
    TT_OK(tuna_kv_new(&cfg, &kv));
    struct tuna_sched_config sc = {max_seqs, budget};
    tuna_sched *s;
    TT_OK(tuna_sched_new(&sc, kv, &s));
    struct tuna_sched_seq **q = calloc((size_t)n, sizeof *q);
    struct sim *sim = calloc((size_t)n, sizeof *sim);
    int32_t prompt[4096];
    for (int i = 0; i < 4096; i++) prompt[i] = i % 100;
    for (int i = 0; i < n; i++) {
        TT_OK(tuna_sched_seq_new(prompt, prompt_len[i], -1, &sim[i], &q[i]));
        TT_OK(tuna_sched_add(s, q[i]));
        sim[i].want = gen_len[i];
    }
    struct tuna_batch b;
    tuna_batch_init(&b);
    int64_t steps = 0, finished = 0;
    *max_chunks = 0;
    while (finished < n) {
        assert_true(++steps < 100000);
        struct tuna_sched_seq **plan;
        int64_t np;
        TT_OK(tuna_sched_schedule(s, &b, &plan, &np));
        assert_true(b.n > 0); /* something always fits: each sequence alone fits the cache */
        assert_true(b.n <= budget);
        assert_true(tuna_sched_n_running(s) <= max_seqs);
        /* positions continue each sequence; the model's grow never fails */
        int64_t row = 0, t = 0;
        for (int64_t k = 0; k < np; k++) {
            struct tuna_sched_seq *x = plan[k];
            assert_int_equal(x->state, TUNA_SCHED_RUNNING);
            assert_true(x->step_tokens > 0);
            for (int64_t j = 0; j < x->step_tokens; j++, t++) {
                assert_int_equal(b.seq[t], x->kv_seq);
                assert_int_equal(b.pos[t], x->n_computed + j);
                assert_int_equal(b.tokens[t], x->tokens[x->n_computed + j]);
            }
            if (x->step_row >= 0) assert_int_equal(x->step_row, row++);
            assert_int_equal(tuna_kv_seq_len(kv, x->kv_seq), x->n_computed);
            TT_OK(tuna_kv_seq_grow(kv, x->kv_seq, x->n_computed + x->step_tokens));
            if (x->step_tokens > 1 && x->n_computed + x->step_tokens < x->n_tokens) (*max_chunks)++;
        }
        assert_int_equal(t, b.n);
        assert_int_equal(row, b.n_logits);
        tuna_sched_commit(s);
        for (int64_t k = 0; k < np; k++) {
            struct tuna_sched_seq *x = plan[k];
            if (x->step_row < 0) continue;
            struct sim *m = x->user;
            m->gen++;
            if (m->gen == m->want) {
                tuna_sched_finish(s, x);
                m->done = true;
                finished++;
            } else {
                TT_OK(tuna_sched_append(x, (int32_t)(7 + m->gen)));
            }
        }
    }
    assert_int_equal(tuna_kv_free_blocks(kv), n_blocks);
    assert_int_equal(tuna_sched_n_running(s), 0);
    assert_int_equal(tuna_sched_n_waiting(s), 0);
    *preemptions = tuna_sched_n_preemptions(s);
    for (int i = 0; i < n; i++) {
        assert_true(sim[i].done);
        assert_int_equal(q[i]->n_tokens, prompt_len[i] + gen_len[i] - 1);
        for (int64_t j = prompt_len[i]; j < q[i]->n_tokens; j++) /* generated tokens survive preemption */
            assert_int_equal(q[i]->tokens[j], (int32_t)(7 + (j - prompt_len[i]) + 1));
        tuna_sched_seq_free(q[i]);
    }
    free(q);
    free(sim);
    tuna_batch_free(&b);
    tuna_sched_free(s);
    tuna_kv_free(kv);
    return steps;
}

static void test_decode_batches_together(void **state)
{
    (void)state;
    int64_t pl[4] = {5, 3, 7, 2}, gl[4] = {10, 10, 10, 10}, pre, chunks;
    int64_t steps = run(64, 4, 8, 64, 4, pl, gl, &pre, &chunks);
    /* one step prefills all four (17 tokens), then 9 decode steps of 4 tokens */
    assert_int_equal(steps, 10);
    assert_int_equal(pre, 0);
}

static void test_chunked_prefill(void **state)
{
    (void)state;
    int64_t pl[2] = {100, 3}, gl[2] = {3, 3}, pre, chunks;
    int64_t steps = run(64, 4, 8, 16, 2, pl, gl, &pre, &chunks);
    assert_true(chunks >= 6); /* 100 tokens in chunks of at most 16 */
    assert_true(steps >= 100 / 16);
    assert_int_equal(pre, 0);
}

static void test_max_num_seqs(void **state)
{
    (void)state;
    int64_t pl[6] = {2, 2, 2, 2, 2, 2}, gl[6] = {5, 5, 5, 5, 5, 5}, pre, chunks;
    int64_t steps = run(64, 4, 2, 64, 6, pl, gl, &pre, &chunks);
    assert_int_equal(steps, 15); /* three waves of two */
}

static void test_preemption_by_recompute(void **state)
{
    (void)state;
    /* 12 blocks of 4 = 48 tokens; eight sequences of up to 30 tokens cannot all stay */
    int64_t pl[8] = {10, 12, 8, 9, 11, 7, 10, 6}, gl[8] = {20, 18, 22, 15, 19, 23, 12, 24}, pre, chunks;
    run(12, 4, 8, 32, 8, pl, gl, &pre, &chunks);
    assert_true(pre > 0);
}

static void test_random_loads(void **state)
{
    (void)state;
    uint64_t r = 12345;
    for (int trial = 0; trial < 40; trial++) {
        int64_t pl[24], gl[24], pre, chunks;
        int n = 1 + (int)((r >> 33) % 24);
        int32_t bs = 1 + (int32_t)((r >> 20) % 8);
        int64_t cap_tokens = 40 + (int64_t)((r >> 10) % 200);
        for (int i = 0; i < n; i++) {
            r = r * 6364136223846793005ULL + 1442695040888963407ULL;
            pl[i] = 1 + (int64_t)((r >> 33) % 30);
            gl[i] = 1 + (int64_t)((r >> 40) % 10);
            if (pl[i] + gl[i] > cap_tokens) gl[i] = 1;
        }
        int32_t blocks = (int32_t)((cap_tokens + bs - 1) / bs);
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        run(blocks, bs, 1 + (int64_t)((r >> 30) % 16), 1 + (int64_t)((r >> 40) % 64), n, pl, gl, &pre, &chunks);
    }
}

static void test_finish_waiting_and_bad_config(void **state)
{
    (void)state;
    struct tuna_kv_config cfg = {.n_layers = 0, .n_kv_heads = 0, .head_dim = 0, .block_size = 4, .n_blocks = 8};
    tuna_kv_cache *kv;
    TT_OK(tuna_kv_new(&cfg, &kv));
    tuna_sched *s;
    struct tuna_sched_config bad = {0, 10};
    TT_FAILS(tuna_sched_new(&bad, kv, &s), TUNA_E_INVALID, "--max-num-seqs");
    struct tuna_sched_config bad2 = {300, 10};
    TT_FAILS(tuna_sched_new(&bad2, kv, &s), TUNA_E_INVALID, "1..256");
    struct tuna_sched_config sc = {4, 10};
    TT_OK(tuna_sched_new(&sc, kv, &s));
    int32_t p[3] = {1, 2, 3};
    struct tuna_sched_seq *a, *c;
    TT_FAILS(tuna_sched_seq_new(p, 0, -1, NULL, &a), TUNA_E_INVALID, "empty");
    TT_OK(tuna_sched_seq_new(p, 3, 2, NULL, &a));
    TT_OK(tuna_sched_seq_new(p, 3, -1, NULL, &c));
    TT_OK(tuna_sched_add(s, a));
    TT_OK(tuna_sched_add(s, c));
    tuna_sched_finish(s, c); /* cancelled while waiting */
    assert_int_equal(tuna_sched_n_waiting(s), 1);
    struct tuna_batch b;
    tuna_batch_init(&b);
    struct tuna_sched_seq **plan;
    int64_t np;
    TT_OK(tuna_sched_schedule(s, &b, &plan, &np));
    assert_int_equal(np, 1);
    assert_int_equal(b.adapter[0], 2); /* the adapter index goes to every token */
    tuna_sched_finish(s, a); /* cancelled while running: its sequence is released */
    assert_int_equal(tuna_sched_n_running(s), 0);
    TT_OK(tuna_sched_schedule(s, &b, &plan, &np));
    assert_int_equal(b.n, 0);
    tuna_batch_free(&b);
    tuna_sched_seq_free(a);
    tuna_sched_seq_free(c);
    tuna_sched_free(s);
    tuna_kv_free(kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_batches_together), cmocka_unit_test(test_chunked_prefill),
        cmocka_unit_test(test_max_num_seqs), cmocka_unit_test(test_preemption_by_recompute),
        cmocka_unit_test(test_random_loads), cmocka_unit_test(test_finish_waiting_and_bad_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
