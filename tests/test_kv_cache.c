/* test_kv_cache.c — the paged KV allocator without tensors (n_layers = 0), then copy-on-write
 * with storage. */
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
            tuna_kv_k(kv, l)[tuna_kv_slot(kv, a, p) * 2] = (float)(100 * l + p);
            tuna_kv_v(kv, l)[tuna_kv_slot(kv, a, p) * 2 + 1] = (float)(-100 * l - p);
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
            assert_true(tuna_kv_k(kv, l)[tuna_kv_slot(kv, b, p) * 2] == (float)(100 * l + p));
            assert_true(tuna_kv_v(kv, l)[tuna_kv_slot(kv, b, p) * 2 + 1] == (float)(-100 * l - p));
        }
    /* writing b's copy leaves a alone */
    tuna_kv_k(kv, 0)[tuna_kv_slot(kv, b, 5) * 2] = 42.0f;
    assert_true(tuna_kv_k(kv, 0)[tuna_kv_slot(kv, a, 5) * 2] == 5.0f);
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alloc_and_free),
        cmocka_unit_test(test_many_sequences),
        cmocka_unit_test(test_fork_cow),
        cmocka_unit_test(test_bad_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
