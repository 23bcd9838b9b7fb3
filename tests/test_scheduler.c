/* test_scheduler.c — continuous batching on an allocator-only KV cache (no tensors): the test
 * plays the forward pass (grows each sequence as the model would) and checks every step's
 * invariants: the token budget, max_num_seqs, positions that continue each sequence, a forward
 * pass that never runs out of blocks, chunked prefill, preemption by recompute, and every block
 * back in the free list at the end. The same loads run again with prefix caching; then prefix
 * caching on its own: skipped prefill, the last token always computed, adapters kept apart,
 * hit counters, preemption and cancellation releasing shared blocks. */
#include "testutil.h"

#include "serve/scheduler.h"

/* run() with prefix caching, and its counters after the last run */
static bool g_prefix;
static int64_t g_queries, g_hits;

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
    struct tuna_sched_config sc = {max_seqs, budget, g_prefix};
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
    assert_int_equal(tuna_kv_free_blocks(kv), n_blocks); /* cached blocks nobody holds count as free */
    if (!g_prefix) assert_int_equal(tuna_kv_cached_blocks(kv), 0);
    g_queries = tuna_sched_prefix_queries(s);
    g_hits = tuna_sched_prefix_hits(s);
    if (!g_prefix) assert_int_equal(g_queries + g_hits, 0);
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
    struct tuna_sched_config bad = {0, 10, false};
    TT_FAILS(tuna_sched_new(&bad, kv, &s), TUNA_E_INVALID, "--max-num-seqs");
    struct tuna_sched_config bad2 = {1025, 10, false};
    TT_FAILS(tuna_sched_new(&bad2, kv, &s), TUNA_E_INVALID, "1..1024");
    struct tuna_sched_config sc = {4, 10, false};
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

/* The loads above with prefix caching: same invariants (run() checks them), and hits. */
static void test_loads_with_prefix_caching(void **state)
{
    g_prefix = true;
    test_decode_batches_together(state); /* all admitted in one step: nothing cached yet */
    assert_int_equal(g_hits, 0);
    assert_int_equal(g_queries, 5 + 3 + 7 + 2);
    test_chunked_prefill(state);
    test_max_num_seqs(state);
    assert_int_equal(g_hits, 0); /* 2-token prompts fill no block of 4 */
    test_preemption_by_recompute(state);
    assert_true(g_hits > 0); /* preempted sequences find their own blocks again */
    test_random_loads(state);
    g_prefix = false;
}

/* One step's plan for a single new sequence; returns the plan's token count. */
static int64_t step_one(tuna_sched *s, tuna_kv_cache *kv, struct tuna_batch *b, struct tuna_sched_seq *q)
{
    struct tuna_sched_seq **plan;
    int64_t np;
    TT_OK(tuna_sched_schedule(s, b, &plan, &np));
    assert_int_equal(np, 1);
    assert_ptr_equal(plan[0], q);
    assert_int_equal(tuna_kv_seq_len(kv, q->kv_seq), q->n_computed);
    for (int64_t t = 0; t < b->n; t++) {
        assert_int_equal(b->pos[t], q->n_computed + t);
        assert_int_equal(b->tokens[t], q->tokens[q->n_computed + t]);
    }
    TT_OK(tuna_kv_seq_grow(kv, q->kv_seq, q->n_computed + q->step_tokens));
    tuna_sched_commit(s);
    return b->n;
}

/* Admits one sequence, prefills it in one step and finishes it; returns the prefilled tokens. */
static int64_t prefill_and_finish(tuna_sched *s, tuna_kv_cache *kv, struct tuna_batch *b, const int32_t *p, int64_t n,
                                  int32_t adapter)
{
    struct tuna_sched_seq *q;
    TT_OK(tuna_sched_seq_new(p, n, adapter, NULL, &q));
    TT_OK(tuna_sched_add(s, q));
    int64_t n_step = step_one(s, kv, b, q);
    assert_int_equal(q->n_cached + n_step, n);
    assert_int_equal(q->step_row, 0); /* the last token is computed: logits exist */
    assert_int_equal(q->n_computed, n);
    tuna_sched_finish(s, q);
    tuna_sched_seq_free(q);
    return n_step;
}

static void test_prefix_skips_prefill(void **state)
{
    (void)state;
    struct tuna_kv_config cfg = {.n_layers = 0, .block_size = 4, .n_blocks = 16};
    tuna_kv_cache *kv;
    TT_OK(tuna_kv_new(&cfg, &kv));
    struct tuna_sched_config sc = {4, 64, true};
    tuna_sched *s;
    TT_OK(tuna_sched_new(&sc, kv, &s));
    struct tuna_batch b;
    tuna_batch_init(&b);
    int32_t p[20], p2[20];
    for (int i = 0; i < 20; i++) p[i] = p2[i] = 100 + i;
    p2[18] = 7; /* same first 16 tokens, another tail */
    assert_int_equal(prefill_and_finish(s, kv, &b, p, 20, -1), 20);        /* cold */
    assert_int_equal(tuna_kv_cached_blocks(kv), 5);
    assert_int_equal(tuna_kv_free_blocks(kv), 16);                         /* all evictable */
    assert_int_equal(prefill_and_finish(s, kv, &b, p2, 20, -1), 4);        /* 4 blocks hit */
    assert_int_equal(prefill_and_finish(s, kv, &b, p, 20, -1), 4);         /* hits stop at 19 tokens */
    assert_int_equal(prefill_and_finish(s, kv, &b, p, 16, -1), 4);         /* 16 tokens: 3 blocks, last computed */
    assert_int_equal(prefill_and_finish(s, kv, &b, p, 3, -1), 3);          /* no full block */
    assert_int_equal(prefill_and_finish(s, kv, &b, p, 20, 1), 20);         /* another adapter shares nothing */
    assert_int_equal(prefill_and_finish(s, kv, &b, p, 20, 1), 4);          /* but finds its own */
    assert_int_equal(prefill_and_finish(s, kv, &b, p, 20, -1), 4);         /* the base model's blocks are still there */
    assert_int_equal(tuna_sched_prefix_queries(s), 20 * 6 + 16 + 3);
    assert_int_equal(tuna_sched_prefix_hits(s), 16 + 16 + 12 + 16 + 16);
    /* prefix caching off: the same prompt prefills in full, even with cached blocks around */
    tuna_sched *off;
    struct tuna_sched_config sc_off = {4, 64, false};
    TT_OK(tuna_sched_new(&sc_off, kv, &off));
    assert_int_equal(prefill_and_finish(off, kv, &b, p, 20, -1), 20);
    assert_int_equal(tuna_sched_prefix_queries(off), 0);
    tuna_sched_free(off);
    assert_int_equal(tuna_kv_free_blocks(kv), 16);
    tuna_batch_free(&b);
    tuna_sched_free(s);
    tuna_kv_free(kv);
}

/* Two running sequences share a cached prefix; cancelling one, preempting the other and
 * finishing everything leaves every block free; generated tokens' blocks are cached too. */
static void test_prefix_shared_preempt_cancel(void **state)
{
    (void)state;
    struct tuna_kv_config cfg = {.n_layers = 0, .block_size = 2, .n_blocks = 8};
    tuna_kv_cache *kv;
    TT_OK(tuna_kv_new(&cfg, &kv));
    struct tuna_sched_config sc = {4, 64, true};
    tuna_sched *s;
    TT_OK(tuna_sched_new(&sc, kv, &s));
    struct tuna_batch b;
    tuna_batch_init(&b);
    int32_t p[7] = {1, 2, 3, 4, 5, 6, 7};
    struct tuna_sched_seq *a, *c, *d;
    TT_OK(tuna_sched_seq_new(p, 5, -1, NULL, &a));
    TT_OK(tuna_sched_add(s, a));
    assert_int_equal(step_one(s, kv, &b, a), 5);
    TT_OK(tuna_sched_append(a, 6)); /* a generates 6, 7: its blocks [5,6] fill as it decodes */
    assert_int_equal(step_one(s, kv, &b, a), 1);
    TT_OK(tuna_sched_append(a, 7));
    assert_int_equal(tuna_kv_cached_blocks(kv), 3); /* [1,2] [3,4] [5,6] */
    /* c: the same 7 tokens as a prompt: 3 blocks shared with the running a */
    TT_OK(tuna_sched_seq_new(p, 7, -1, NULL, &c));
    TT_OK(tuna_sched_add(s, c));
    struct tuna_sched_seq **plan;
    int64_t np;
    TT_OK(tuna_sched_schedule(s, &b, &plan, &np));
    assert_int_equal(np, 2);
    assert_int_equal(c->n_cached, 6);
    assert_int_equal(c->step_tokens, 1);
    for (int i = 0; i < 3; i++) assert_int_equal(tuna_kv_seq_blocks(kv, c->kv_seq)[i], tuna_kv_seq_blocks(kv, a->kv_seq)[i]);
    for (int64_t k = 0; k < np; k++) TT_OK(tuna_kv_seq_grow(kv, plan[k]->kv_seq, plan[k]->n_computed + plan[k]->step_tokens));
    tuna_sched_commit(s);
    assert_int_equal(tuna_kv_block_refcount(kv, tuna_kv_seq_blocks(kv, a->kv_seq)[0]), 2);
    /* cancel a while running: c keeps the shared blocks */
    int32_t shared0 = tuna_kv_seq_blocks(kv, a->kv_seq)[0];
    tuna_sched_finish(s, a);
    assert_int_equal(tuna_kv_block_refcount(kv, shared0), 1);
    /* d takes the shared prefix too (3 blocks of its 5), then both growing forces a preemption */
    int32_t big[10];
    for (int i = 0; i < 10; i++) big[i] = i < 6 ? p[i] : 50 + i;
    TT_OK(tuna_sched_seq_new(big, 10, -1, NULL, &d));
    TT_OK(tuna_sched_add(s, d));
    TT_OK(tuna_sched_append(c, 9));
    int64_t pre = tuna_sched_n_preemptions(s);
    for (int guard = 0; guard < 50 && (c->state != TUNA_SCHED_FINISHED || d->state != TUNA_SCHED_FINISHED); guard++) {
        TT_OK(tuna_sched_schedule(s, &b, &plan, &np));
        assert_true(np > 0);
        for (int64_t k = 0; k < np; k++) TT_OK(tuna_kv_seq_grow(kv, plan[k]->kv_seq, plan[k]->n_computed + plan[k]->step_tokens));
        tuna_sched_commit(s);
        for (int64_t k = 0; k < np; k++) {
            struct tuna_sched_seq *x = plan[k];
            if (x->step_row < 0) continue;
            if (x->n_tokens >= 14) tuna_sched_finish(s, x); /* 7 blocks each, 3 shared: 11 > 8 */
            else TT_OK(tuna_sched_append(x, 60 + (int32_t)x->n_tokens));
        }
    }
    assert_int_equal(c->state, TUNA_SCHED_FINISHED);
    assert_int_equal(d->state, TUNA_SCHED_FINISHED);
    assert_true(tuna_sched_n_preemptions(s) > pre);
    assert_true(tuna_sched_prefix_hits(s) > 12);
    assert_int_equal(tuna_kv_free_blocks(kv), 8);
    for (int32_t blk = 0; blk < 8; blk++) assert_int_equal(tuna_kv_block_refcount(kv, blk), 0);
    tuna_sched_seq_free(a);
    tuna_sched_seq_free(c);
    tuna_sched_seq_free(d);
    tuna_batch_free(&b);
    tuna_sched_free(s);
    tuna_kv_free(kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_batches_together), cmocka_unit_test(test_chunked_prefill),
        cmocka_unit_test(test_max_num_seqs), cmocka_unit_test(test_preemption_by_recompute),
        cmocka_unit_test(test_random_loads), cmocka_unit_test(test_finish_waiting_and_bad_config),
        cmocka_unit_test(test_loads_with_prefix_caching), cmocka_unit_test(test_prefix_skips_prefill),
        cmocka_unit_test(test_prefix_shared_preempt_cancel),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
