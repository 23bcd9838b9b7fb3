/* test_kv_cache.c — the paged KV allocator without tensors (n_layers = 0), then copy-on-write
 * with storage; prefix caching: hits, adapters, LRU eviction, registered blocks never rewritten,
 * storage through mem_ops, and a random walk checking every sequence's K against its tokens. */
#include "testutil.h"

#include "model/kv_cache.h"

static void test_alloc_and_free(void **state)
{
    (void)state;
    struct tuna_kv_config cfg = {.n_layers = 0, .n_kv_heads = 0, .head_dim = 0, .block_size = 4, .n_blocks = 8};
    tuna_kv_cache *kv;
    TT_OK(tuna_kv_new(&cfg, &kv));
    int32_t a, b;
    TT_OK(tuna_kv_seq_new(kv, &a));
    TT_OK(tuna_kv_seq_new(kv, &b));
    assert_int_not_equal(a, b);
    TT_OK(tuna_kv_seq_grow(kv, a, 5)); /* 2 blocks */
    assert_int_equal(tuna_kv_seq_nblocks(kv, a), 2);
    assert_int_equal(tuna_kv_free_blocks(kv), 6);
    TT_OK(tuna_kv_seq_grow(kv, a, 8)); /* still 2 */
    assert_int_equal(tuna_kv_seq_nblocks(kv, a), 2);
    TT_OK(tuna_kv_seq_grow(kv, b, 1));
    assert_int_equal(tuna_kv_free_blocks(kv), 5);
    /* slots: position p in block table[p/4] */
    const int32_t *bt = tuna_kv_seq_blocks(kv, a);
    assert_int_equal(tuna_kv_slot(kv, a, 6), bt[1] * 4 + 2);
    assert_int_not_equal(tuna_kv_seq_blocks(kv, b)[0], bt[0]);
    assert_int_not_equal(tuna_kv_seq_blocks(kv, b)[0], bt[1]);
    /* out of blocks: refused, sequence unchanged */
    TT_FAILS(tuna_kv_seq_grow(kv, b, 100), TUNA_E_OOM, "KV cache is full");
    assert_int_equal(tuna_kv_seq_len(kv, b), 1);
    assert_int_equal(tuna_kv_free_blocks(kv), 5);
    TT_FAILS(tuna_kv_seq_grow(kv, b, 0), TUNA_E_INVALID, "below the length");
    TT_OK(tuna_kv_seq_truncate(kv, a, 3));
    assert_int_equal(tuna_kv_seq_nblocks(kv, a), 1);
    assert_int_equal(tuna_kv_free_blocks(kv), 6);
    tuna_kv_seq_free(kv, a);
    tuna_kv_seq_free(kv, b);
    assert_int_equal(tuna_kv_free_blocks(kv), 8);
    assert_int_equal(tuna_kv_seq_len(kv, a), -1);
    /* ids are reused */
    int32_t c;
    TT_OK(tuna_kv_seq_new(kv, &c));
    assert_true(c == a || c == b);
    TT_FAILS(tuna_kv_seq_grow(kv, 77, 1), TUNA_E_INVALID, "unknown sequence");
    tuna_kv_free(kv);
}

static void test_many_sequences(void **state)
{
    (void)state;
    struct tuna_kv_config cfg = {.n_layers = 0, .n_kv_heads = 0, .head_dim = 0, .block_size = 16, .n_blocks = 64};
    tuna_kv_cache *kv;
    TT_OK(tuna_kv_new(&cfg, &kv));
    int32_t ids[20];
    for (int i = 0; i < 20; i++) {
        TT_OK(tuna_kv_seq_new(kv, &ids[i]));
        TT_OK(tuna_kv_seq_grow(kv, ids[i], 1 + i * 3));
    }
    int32_t used = 0;
    for (int i = 0; i < 20; i++) used += (int32_t)tuna_kv_seq_nblocks(kv, ids[i]);
    assert_int_equal(tuna_kv_free_blocks(kv), 64 - used);
    /* every block is owned once */
    for (int32_t blk = 0; blk < 64; blk++) assert_true(tuna_kv_block_refcount(kv, blk) <= 1);
    for (int i = 0; i < 20; i += 2) tuna_kv_seq_free(kv, ids[i]);
    for (int i = 1; i < 20; i += 2) tuna_kv_seq_free(kv, ids[i]);
    assert_int_equal(tuna_kv_free_blocks(kv), 64);
    tuna_kv_free(kv);
}

static void test_fork_cow(void **state)
{
    (void)state;
    struct tuna_kv_config cfg = {.n_layers = 2, .n_kv_heads = 1, .head_dim = 2, .block_size = 4, .n_blocks = 6}; /* storage: 2 layers, slot of 2 floats */
    tuna_kv_cache *kv;
    TT_OK(tuna_kv_new(&cfg, &kv));
    int32_t a, b;
    TT_OK(tuna_kv_seq_new(kv, &a));
    TT_OK(tuna_kv_seq_grow(kv, a, 6)); /* blocks: full + half */
    for (int64_t p = 0; p < 6; p++)
        for (int l = 0; l < 2; l++) {
            ((float *)tuna_kv_k(kv, l))[tuna_kv_slot(kv, a, p) * 2] = (float)(100 * l + p);
            ((float *)tuna_kv_v(kv, l))[tuna_kv_slot(kv, a, p) * 2 + 1] = (float)(-100 * l - p);
        }
    TT_OK(tuna_kv_seq_fork(kv, a, &b));
    assert_int_equal(tuna_kv_seq_len(kv, b), 6);
    assert_int_equal(tuna_kv_free_blocks(kv), 4);
    const int32_t *ba = tuna_kv_seq_blocks(kv, a);
    assert_int_equal(tuna_kv_block_refcount(kv, ba[0]), 2);
    assert_int_equal(tuna_kv_block_refcount(kv, ba[1]), 2);
    /* b appends: its half block is copied, the full one stays shared */
    TT_OK(tuna_kv_seq_grow(kv, b, 7));
    const int32_t *bb = tuna_kv_seq_blocks(kv, b);
    ba = tuna_kv_seq_blocks(kv, a);
    assert_int_equal(bb[0], ba[0]);
    assert_int_not_equal(bb[1], ba[1]);
    assert_int_equal(tuna_kv_block_refcount(kv, ba[1]), 1);
    assert_int_equal(tuna_kv_block_refcount(kv, bb[1]), 1);
    assert_int_equal(tuna_kv_free_blocks(kv), 3);
    for (int64_t p = 0; p < 6; p++)
        for (int l = 0; l < 2; l++) {
            assert_true(((float *)tuna_kv_k(kv, l))[tuna_kv_slot(kv, b, p) * 2] == (float)(100 * l + p));
            assert_true(((float *)tuna_kv_v(kv, l))[tuna_kv_slot(kv, b, p) * 2 + 1] == (float)(-100 * l - p));
        }
    /* writing b's copy leaves a alone */
    ((float *)tuna_kv_k(kv, 0))[tuna_kv_slot(kv, b, 5) * 2] = 42.0f;
    assert_true(((float *)tuna_kv_k(kv, 0))[tuna_kv_slot(kv, a, 5) * 2] == 5.0f);
    tuna_kv_seq_free(kv, a);
    assert_int_equal(tuna_kv_block_refcount(kv, bb[0]), 1);
    tuna_kv_seq_free(kv, b);
    assert_int_equal(tuna_kv_free_blocks(kv), 6);
    tuna_kv_free(kv);
}

static void test_bad_config(void **state)
{
    (void)state;
    struct tuna_kv_config cfg = {.n_layers = 2, .n_kv_heads = 0, .head_dim = 2, .block_size = 4, .n_blocks = 6};
    tuna_kv_cache *kv;
    TT_FAILS(tuna_kv_new(&cfg, &kv), TUNA_E_INVALID, "bad shape");
    cfg.n_kv_heads = 1;
    cfg.block_size = 0;
    TT_FAILS(tuna_kv_new(&cfg, &kv), TUNA_E_INVALID, "block size 0");
}

static tuna_kv_cache *new_alloc_only(int32_t bs, int32_t n_blocks)
{
    struct tuna_kv_config cfg = {.n_layers = 0, .block_size = bs, .n_blocks = n_blocks};
    tuna_kv_cache *kv;
    TT_OK(tuna_kv_new(&cfg, &kv));
    return kv;
}

static void test_prefix_hit_and_release(void **state)
{
    (void)state;
    tuna_kv_cache *kv = new_alloc_only(4, 8);
    int32_t t[12] = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    int32_t a, b, c;
    TT_OK(tuna_kv_seq_new(kv, &a));
    TT_OK(tuna_kv_seq_grow(kv, a, 10)); /* 2 full blocks + 2 tokens */
    assert_int_equal(tuna_kv_prefix_match(kv, t, 12, -1, NULL), 0); /* nothing registered yet */
    TT_OK(tuna_kv_seq_cache_blocks(kv, a, t, 12, -1)); /* only min(12, len 10) tokens: 2 blocks */
    assert_int_equal(tuna_kv_cached_blocks(kv), 2);
    int64_t ev = -1;
    assert_int_equal(tuna_kv_prefix_match(kv, t, 12, -1, &ev), 2);
    assert_int_equal(ev, 0);
    assert_int_equal(tuna_kv_prefix_match(kv, t, 7, -1, NULL), 1); /* whole blocks only */
    int32_t u[12];
    memcpy(u, t, sizeof u);
    u[5] = 99; /* block 1 differs */
    assert_int_equal(tuna_kv_prefix_match(kv, u, 12, -1, NULL), 1);
    u[5] = 10;
    u[0] = 99; /* block 0 differs: its children do not match either */
    assert_int_equal(tuna_kv_prefix_match(kv, u, 12, -1, NULL), 0);
    /* the adapter is part of the hash */
    assert_int_equal(tuna_kv_prefix_match(kv, t, 12, 0, NULL), 0);
    assert_int_equal(tuna_kv_prefix_match(kv, t, 12, 3, NULL), 0);
    TT_FAILS(tuna_kv_seq_cache_blocks(kv, a, t, 12, 2), TUNA_E_INVALID, "adapter");
    /* b shares a's two full blocks */
    TT_OK(tuna_kv_seq_new(kv, &b));
    TT_OK(tuna_kv_seq_take_prefix(kv, b, t, 2, -1));
    assert_int_equal(tuna_kv_seq_len(kv, b), 8);
    const int32_t *ba = tuna_kv_seq_blocks(kv, a), *bb = tuna_kv_seq_blocks(kv, b);
    assert_int_equal(bb[0], ba[0]);
    assert_int_equal(bb[1], ba[1]);
    assert_int_equal(tuna_kv_block_refcount(kv, ba[0]), 2);
    assert_int_equal(tuna_kv_free_blocks(kv), 5);
    TT_FAILS(tuna_kv_seq_take_prefix(kv, b, t, 1, -1), TUNA_E_INVALID, "empty sequence");
    /* b goes on in a new block: the shared full ones are not copied */
    TT_OK(tuna_kv_seq_grow(kv, b, 9));
    bb = tuna_kv_seq_blocks(kv, b);
    assert_int_equal(bb[1], ba[1]);
    assert_int_not_equal(bb[2], ba[2]);
    assert_int_equal(tuna_kv_free_blocks(kv), 4);
    /* freeing a keeps the shared blocks with b; freeing b makes them evictable: free, still cached */
    int32_t a0 = ba[0], a1 = ba[1];
    tuna_kv_seq_free(kv, a);
    assert_int_equal(tuna_kv_block_refcount(kv, a0), 1);
    tuna_kv_seq_free(kv, b);
    assert_int_equal(tuna_kv_free_blocks(kv), 8);
    assert_int_equal(tuna_kv_cached_blocks(kv), 2);
    assert_int_equal(tuna_kv_prefix_match(kv, t, 12, -1, &ev), 2);
    assert_int_equal(ev, 2);
    /* taking them back removes them from the free list */
    TT_OK(tuna_kv_seq_new(kv, &c));
    TT_OK(tuna_kv_seq_take_prefix(kv, c, t, 2, -1));
    assert_int_equal(tuna_kv_free_blocks(kv), 6);
    assert_int_equal(tuna_kv_seq_blocks(kv, c)[0], a0);
    assert_int_equal(tuna_kv_seq_blocks(kv, c)[1], a1);
    assert_int_equal(tuna_kv_prefix_match(kv, t, 12, -1, &ev), 2);
    assert_int_equal(ev, 0);
    tuna_kv_seq_free(kv, c);
    TT_FAILS(tuna_kv_seq_take_prefix(kv, 55, t, 1, -1), TUNA_E_INVALID, "unknown sequence");
    tuna_kv_free(kv);
}

static void test_prefix_lru_eviction(void **state)
{
    (void)state;
    tuna_kv_cache *kv = new_alloc_only(2, 4);
    int32_t ta[4] = {1, 2, 3, 4}, tb[4] = {5, 6, 7, 8}, tc[2] = {9, 10};
    int32_t a, b, c;
    TT_OK(tuna_kv_seq_new(kv, &a));
    TT_OK(tuna_kv_seq_grow(kv, a, 4));
    TT_OK(tuna_kv_seq_cache_blocks(kv, a, ta, 4, -1));
    int32_t a0 = tuna_kv_seq_blocks(kv, a)[0], a1 = tuna_kv_seq_blocks(kv, a)[1];
    tuna_kv_seq_free(kv, a);
    /* b takes the two never-used blocks, not a's cached ones */
    TT_OK(tuna_kv_seq_new(kv, &b));
    TT_OK(tuna_kv_seq_grow(kv, b, 4));
    for (int i = 0; i < 2; i++) {
        assert_int_not_equal(tuna_kv_seq_blocks(kv, b)[i], a0);
        assert_int_not_equal(tuna_kv_seq_blocks(kv, b)[i], a1);
    }
    assert_int_equal(tuna_kv_prefix_match(kv, ta, 4, -1, NULL), 2);
    TT_OK(tuna_kv_seq_cache_blocks(kv, b, tb, 4, -1));
    tuna_kv_seq_free(kv, b);
    assert_int_equal(tuna_kv_cached_blocks(kv), 4);
    assert_int_equal(tuna_kv_free_blocks(kv), 4);
    /* a new block evicts the least recently freed: a's last block first (freed in reverse) */
    TT_OK(tuna_kv_seq_new(kv, &c));
    TT_OK(tuna_kv_seq_grow(kv, c, 2));
    assert_int_equal(tuna_kv_seq_blocks(kv, c)[0], a1);
    assert_int_equal(tuna_kv_cached_blocks(kv), 3);
    assert_int_equal(tuna_kv_prefix_match(kv, ta, 4, -1, NULL), 1);
    assert_int_equal(tuna_kv_prefix_match(kv, tb, 4, -1, NULL), 2);
    int32_t d;
    TT_OK(tuna_kv_seq_new(kv, &d));
    TT_FAILS(tuna_kv_seq_take_prefix(kv, d, ta, 2, -1), TUNA_E_INVALID, "not cached");
    assert_int_equal(tuna_kv_seq_len(kv, d), 0);
    assert_int_equal(tuna_kv_free_blocks(kv), 3); /* the failed take changed nothing */
    /* c's block registers; then it fills up: every other cached block is evicted */
    TT_OK(tuna_kv_seq_cache_blocks(kv, c, tc, 2, -1));
    assert_int_equal(tuna_kv_prefix_match(kv, tc, 2, -1, NULL), 1);
    TT_OK(tuna_kv_seq_grow(kv, d, 6));
    assert_int_equal(tuna_kv_free_blocks(kv), 0);
    assert_int_equal(tuna_kv_cached_blocks(kv), 1);
    assert_int_equal(tuna_kv_prefix_match(kv, ta, 4, -1, NULL), 0);
    assert_int_equal(tuna_kv_prefix_match(kv, tb, 4, -1, NULL), 0);
    TT_FAILS(tuna_kv_seq_grow(kv, d, 7), TUNA_E_OOM, "KV cache is full");
    tuna_kv_seq_free(kv, c);
    tuna_kv_seq_free(kv, d);
    assert_int_equal(tuna_kv_free_blocks(kv), 4);
    tuna_kv_free(kv);
}

/* A host "device" through mem_ops that counts copies. */
static int g_copies;
static tuna_status fake_alloc(tuna_backend *be, size_t bytes, void **out)
{
    (void)be;
    *out = calloc(1, bytes);
    return *out ? TUNA_OK : TUNA_E_OOM;
}
static void fake_release(tuna_backend *be, void *p)
{
    (void)be;
    free(p);
}
static void fake_copy(tuna_backend *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    g_copies++;
    memcpy(dst, src, bytes);
}

/* A registered block is never written: growing into it after a truncate copies it (through
 * mem_ops when set), and the cached copy keeps its K/V. */
static void test_prefix_registered_blocks_are_immutable(void **state)
{
    (void)state;
    static const struct tuna_backend_ops fake = {.alloc = fake_alloc, .release = fake_release, .copy = fake_copy};
    for (int use_ops = 0; use_ops < 2; use_ops++) {
        struct tuna_kv_config cfg = {.n_layers = 1, .n_kv_heads = 1, .head_dim = 1, .block_size = 4, .n_blocks = 4,
                                     .mem_ops = use_ops ? &fake : NULL};
        tuna_kv_cache *kv;
        TT_OK(tuna_kv_new(&cfg, &kv));
        g_copies = 0;
        int32_t t[4] = {3, 1, 4, 1}, a, b;
        TT_OK(tuna_kv_seq_new(kv, &a));
        TT_OK(tuna_kv_seq_grow(kv, a, 4));
        for (int p = 0; p < 4; p++) ((float *)tuna_kv_k(kv, 0))[tuna_kv_slot(kv, a, p)] = (float)t[p];
        TT_OK(tuna_kv_seq_cache_blocks(kv, a, t, 4, 7));
        int32_t old = tuna_kv_seq_blocks(kv, a)[0];
        TT_OK(tuna_kv_seq_truncate(kv, a, 2));
        TT_OK(tuna_kv_seq_grow(kv, a, 3)); /* position 2 is in the registered block: copy first */
        assert_int_not_equal(tuna_kv_seq_blocks(kv, a)[0], old);
        assert_int_equal(g_copies, use_ops ? 2 : 0); /* K and V of one layer */
        assert_int_equal(tuna_kv_block_refcount(kv, old), 0);
        ((float *)tuna_kv_k(kv, 0))[tuna_kv_slot(kv, a, 2)] = 42.0f;
        assert_true(((float *)tuna_kv_k(kv, 0))[tuna_kv_slot(kv, a, 1)] == 1.0f); /* the copy kept the first tokens */
        /* the cached block is intact and found again */
        assert_int_equal(tuna_kv_prefix_match(kv, t, 4, 7, NULL), 1);
        TT_OK(tuna_kv_seq_new(kv, &b));
        TT_OK(tuna_kv_seq_take_prefix(kv, b, t, 1, 7));
        assert_int_equal(tuna_kv_seq_blocks(kv, b)[0], old);
        for (int p = 0; p < 4; p++) assert_true(((float *)tuna_kv_k(kv, 0))[tuna_kv_slot(kv, b, p)] == (float)t[p]);
        /* a's new contents register as their own block */
        int32_t t2[4] = {3, 1, 9, 9};
        TT_OK(tuna_kv_seq_grow(kv, a, 4));
        TT_OK(tuna_kv_seq_cache_blocks(kv, a, t2, 4, 7));
        assert_int_equal(tuna_kv_cached_blocks(kv), 2);
        assert_int_equal(tuna_kv_prefix_match(kv, t2, 4, 7, NULL), 1);
        tuna_kv_seq_free(kv, a);
        tuna_kv_seq_free(kv, b);
        assert_int_equal(tuna_kv_free_blocks(kv), 4);
        tuna_kv_free(kv);
    }
}

/* Random sequences over a 3-token vocabulary (so prefixes repeat) with random prefix takes,
 * grows, truncates, forks and frees. K holds the token id of each position, written only when a
 * position is new to its sequence, as the forward pass does: every sequence must always read its
 * own tokens back, and the allocator's counts must add up. */
static void test_prefix_random_walk(void **state)
{
    (void)state;
    enum { NS = 6, MAXT = 40, NB = 24, BS = 3 };
    struct tuna_kv_config cfg = {.n_layers = 1, .n_kv_heads = 1, .head_dim = 1, .block_size = BS, .n_blocks = NB};
    tuna_kv_cache *kv;
    TT_OK(tuna_kv_new(&cfg, &kv));
    int32_t id[NS], tok[NS][MAXT], adapter[NS];
    int64_t len[NS];
    for (int i = 0; i < NS; i++) id[i] = -1;
    uint64_t r = 77;
    int64_t hits = 0;
    for (int it = 0; it < 20000; it++) {
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        int i = (int)((r >> 33) % NS), op = (int)((r >> 40) % 8);
        if (id[i] < 0) { /* start: a random token list, its cached prefix taken */
            adapter[i] = (int32_t)((r >> 50) % 2) - 1;
            for (int p = 0; p < MAXT; p++) {
                r = r * 6364136223846793005ULL + 1442695040888963407ULL;
                tok[i][p] = (int32_t)((r >> 33) % 3);
            }
            TT_OK(tuna_kv_seq_new(kv, &id[i]));
            int64_t ev;
            int64_t hit = tuna_kv_prefix_match(kv, tok[i], MAXT - 1, adapter[i], &ev);
            assert_true(ev <= hit && ev <= tuna_kv_free_blocks(kv));
            int32_t before = tuna_kv_free_blocks(kv);
            TT_OK(tuna_kv_seq_take_prefix(kv, id[i], tok[i], hit, adapter[i]));
            assert_int_equal(tuna_kv_free_blocks(kv), before - ev);
            len[i] = hit * BS;
            hits += hit;
        } else if (op < 4) { /* grow by a few tokens, write them, register full blocks */
            int64_t to = len[i] + 1 + (int64_t)((r >> 45) % 5);
            if (to > MAXT) to = MAXT;
            tuna_status st = tuna_kv_seq_grow(kv, id[i], to);
            if (st == TUNA_OK) {
                for (int64_t p = len[i]; p < to; p++) ((float *)tuna_kv_k(kv, 0))[tuna_kv_slot(kv, id[i], p)] = (float)tok[i][p];
                len[i] = to;
                TT_OK(tuna_kv_seq_cache_blocks(kv, id[i], tok[i], to, adapter[i]));
            } else {
                assert_int_equal(st, TUNA_E_OOM);
                assert_int_equal(tuna_kv_seq_len(kv, id[i]), len[i]);
            }
        } else if (op == 4) { /* truncate, then new tokens after the cut */
            int64_t to = len[i] ? (int64_t)((r >> 45) % (uint64_t)len[i]) : 0;
            TT_OK(tuna_kv_seq_truncate(kv, id[i], to));
            len[i] = to;
            for (int p = (int)to; p < MAXT; p++) tok[i][p] = (tok[i][p] + 1) % 3;
        } else if (op == 5) { /* fork into a free slot */
            int j = 0;
            while (j < NS && id[j] >= 0) j++;
            if (j < NS) {
                TT_OK(tuna_kv_seq_fork(kv, id[i], &id[j]));
                memcpy(tok[j], tok[i], sizeof tok[i]);
                len[j] = len[i];
                adapter[j] = adapter[i];
            }
        } else {
            tuna_kv_seq_free(kv, id[i]);
            id[i] = -1;
        }
        /* invariants */
        int32_t refs[NB] = {0};
        for (int k = 0; k < NS; k++) {
            if (id[k] < 0) continue;
            assert_int_equal(tuna_kv_seq_len(kv, id[k]), len[k]);
            for (int64_t p = 0; p < len[k]; p++) assert_true(((float *)tuna_kv_k(kv, 0))[tuna_kv_slot(kv, id[k], p)] == (float)tok[k][p]);
            for (int64_t bi = 0; bi < tuna_kv_seq_nblocks(kv, id[k]); bi++) refs[tuna_kv_seq_blocks(kv, id[k])[bi]]++;
        }
        int32_t unref = 0;
        for (int32_t blk = 0; blk < NB; blk++) {
            assert_int_equal(tuna_kv_block_refcount(kv, blk), refs[blk]);
            unref += refs[blk] == 0;
        }
        assert_int_equal(tuna_kv_free_blocks(kv), unref);
        assert_true(tuna_kv_cached_blocks(kv) <= NB);
    }
    assert_true(hits > 100); /* the walk did exercise prefix hits */
    for (int i = 0; i < NS; i++) tuna_kv_seq_free(kv, id[i]);
    assert_int_equal(tuna_kv_free_blocks(kv), NB);
    tuna_kv_free(kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alloc_and_free),
        cmocka_unit_test(test_many_sequences),
        cmocka_unit_test(test_fork_cow),
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_prefix_hit_and_release),
        cmocka_unit_test(test_prefix_lru_eviction),
        cmocka_unit_test(test_prefix_registered_blocks_are_immutable),
        cmocka_unit_test(test_prefix_random_walk),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
