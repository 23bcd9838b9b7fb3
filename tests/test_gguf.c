/* test_gguf.c — GGUF reader and writer: round trip, every malformed case refused with a clear
 * message, llama.cpp's vocab files and the stories260K model open, GGUF v1 refused. */
#include "testutil.h"

#include "gguf/gguf.h"
#include "gguf/quants.h"

/* ---- a byte builder for hand-made files ---- */
struct bb {
    uint8_t *p;
    size_t n, cap;
};
static void bb_put(struct bb *b, const void *s, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}
static void bb_u32(struct bb *b, uint32_t v) { bb_put(b, &v, 4); }
static void bb_u64(struct bb *b, uint64_t v) { bb_put(b, &v, 8); }
static void bb_str(struct bb *b, const char *s)
{
    bb_u64(b, strlen(s));
    bb_put(b, s, strlen(s));
}
static void bb_pad(struct bb *b, size_t a)
{
    while (b->n % a) bb_put(b, "", 1);
}

/* A valid file: 2 kv (u32, string array), 2 f32 tensors [4] and [8,2]. Offsets of interesting
 * fields are returned for the mutation tests. */
struct layout {
    size_t nkv_at, nt_at, kv0_type_at, arr_n_at, str0_len_at, t0_name_len_at, t0_ndims_at, t0_ne0_at, t0_type_at,
        t0_off_at, t1_off_at, data_at;
};
static struct bb make_valid(struct layout *L)
{
    struct bb b = {0};
    bb_put(&b, "GGUF", 4);
    bb_u32(&b, 3);
    L->nt_at = b.n;
    bb_u64(&b, 2);
    L->nkv_at = b.n;
    bb_u64(&b, 2);
    bb_str(&b, "general.alignment");
    L->kv0_type_at = b.n;
    bb_u32(&b, TUNA_GGUF_UINT32);
    bb_u32(&b, 32);
    bb_str(&b, "tokenizer.ggml.tokens");
    bb_u32(&b, TUNA_GGUF_ARRAY);
    bb_u32(&b, TUNA_GGUF_STRING);
    L->arr_n_at = b.n;
    bb_u64(&b, 2);
    L->str0_len_at = b.n;
    bb_str(&b, "a");
    bb_str(&b, "bc");
    L->t0_name_len_at = b.n;
    bb_str(&b, "t0");
    L->t0_ndims_at = b.n;
    bb_u32(&b, 1);
    L->t0_ne0_at = b.n;
    bb_u64(&b, 4);
    L->t0_type_at = b.n;
    bb_u32(&b, TUNA_GGML_F32);
    L->t0_off_at = b.n;
    bb_u64(&b, 0);
    bb_str(&b, "t1");
    bb_u32(&b, 2);
    bb_u64(&b, 8);
    bb_u64(&b, 2);
    bb_u32(&b, TUNA_GGML_F32);
    L->t1_off_at = b.n;
    bb_u64(&b, 32);
    bb_pad(&b, 32);
    L->data_at = b.n;
    for (int i = 0; i < 8; i++) {
        float f = (float)i;
        bb_put(&b, &f, 4);
    }
    for (int i = 0; i < 16; i++) {
        float f = (float)(100 + i);
        bb_put(&b, &f, 4);
    }
    return b;
}

static void test_valid_handmade(void **state)
{
    (void)state;
    struct layout L;
    struct bb b = make_valid(&L);
    tuna_gguf *g = NULL;
    TT_OK(tuna_gguf_open_buffer(b.p, b.n, "hand.gguf", &g));
    assert_int_equal(tuna_gguf_version(g), 3);
    assert_int_equal(tuna_gguf_tensor_count(g), 2);
    const struct tuna_gguf_kv *kv;
    TT_OK(tuna_gguf_get_arr(g, "tokenizer.ggml.tokens", TUNA_GGUF_STRING, &kv));
    assert_int_equal(kv->n, 2);
    assert_memory_equal(kv->strs[1].p, "bc", 2);
    const struct tuna_gguf_tensor *t = tuna_gguf_find_tensor(g, "t1");
    assert_non_null(t);
    assert_int_equal(t->ne[0], 8);
    assert_int_equal(t->ne[1], 2);
    assert_int_equal(t->nbytes, 64);
    float f;
    memcpy(&f, (const char *)t->data + 4, 4);
    assert_true(f == 101.0f);
    uint32_t u;
    TT_OK(tuna_gguf_get_u32(g, "general.alignment", &u));
    assert_int_equal(u, 32);
    TT_FAILS(tuna_gguf_get_f32(g, "general.alignment", &f), TUNA_E_FORMAT, "expected float32");
    TT_FAILS(tuna_gguf_get_u32(g, "nope", &u), TUNA_E_NOT_FOUND, "'nope' is missing");
    tuna_gguf_close(g);
    free(b.p);
}

/* Applies a mutation to a fresh valid file and expects failure containing needle. */
static void expect_bad(const char *label, void (*mut)(struct bb *, const struct layout *), tuna_status want,
                       const char *needle)
{
    struct layout L;
    struct bb b = make_valid(&L);
    mut(&b, &L);
    tuna_gguf *g = NULL;
    tuna_clear_error();
    tuna_status st = tuna_gguf_open_buffer(b.p, b.n, "bad.gguf", &g);
    if (st != want || !strstr(tuna_last_error(), needle)) {
        print_error("%s: got %s \"%s\", wanted %s with \"%s\"\n", label, tuna_status_name(st), tuna_last_error(),
                    tuna_status_name(want), needle);
        fail();
    }
    assert_null(g);
    free(b.p);
}

static void set64(struct bb *b, size_t at, uint64_t v) { memcpy(b->p + at, &v, 8); }
static void set32(struct bb *b, size_t at, uint32_t v) { memcpy(b->p + at, &v, 4); }
static void m_magic(struct bb *b, const struct layout *L) { (void)L; b->p[0] = 'X'; }
static void m_v1(struct bb *b, const struct layout *L) { (void)L; set32(b, 4, 1); }
static void m_v9(struct bb *b, const struct layout *L) { (void)L; set32(b, 4, 9); }
static void m_bigendian(struct bb *b, const struct layout *L) { (void)L; set32(b, 4, 0x03000000u); }
static void m_huge_kv(struct bb *b, const struct layout *L) { set64(b, L->nkv_at, 1ull << 60); }
static void m_huge_t(struct bb *b, const struct layout *L) { set64(b, L->nt_at, 1ull << 59); }
static void m_bad_vtype(struct bb *b, const struct layout *L) { set32(b, L->kv0_type_at, 13); }
static void m_huge_arr(struct bb *b, const struct layout *L) { set64(b, L->arr_n_at, 1ull << 62); }
static void m_bad_strlen(struct bb *b, const struct layout *L) { set64(b, L->str0_len_at, 0xFFFFFFFFFFFFull); }
static void m_long_name(struct bb *b, const struct layout *L) { set64(b, L->t0_name_len_at, 64); }
static void m_dims5(struct bb *b, const struct layout *L) { set32(b, L->t0_ndims_at, 5); }
static void m_dims_overflow(struct bb *b, const struct layout *L) { set64(b, L->t0_ne0_at, 1ull << 63); }
static void m_bad_ttype(struct bb *b, const struct layout *L) { set32(b, L->t0_type_at, 99); }
static void m_block(struct bb *b, const struct layout *L) { set32(b, L->t0_type_at, TUNA_GGML_Q8_0); }
static void m_misaligned(struct bb *b, const struct layout *L) { set64(b, L->t1_off_at, 36); }
static void m_gap(struct bb *b, const struct layout *L) { set64(b, L->t1_off_at, 64); }
static void m_truncated(struct bb *b, const struct layout *L) { b->n = L->data_at + 40; }
static void m_trunc_header(struct bb *b, const struct layout *L) { b->n = L->t0_ne0_at + 3; }
static void m_empty(struct bb *b, const struct layout *L) { (void)L; b->n = 0; }
static void m_align(struct bb *b, const struct layout *L) { (void)L; set32(b, L->kv0_type_at + 4, 24); }
static void m_dup_key(struct bb *b, const struct layout *L)
{
    (void)L;
    /* rename the second key to the first: same length needed, so rewrite "tokenizer.ggml.tokens" (21) into
     * "general.alignment" can't fit; instead make the first key a duplicate of the second */
    memcpy(b->p + 24 + 8, "tokenizer.ggml.tokens", 17); /* first 17 bytes: "tokenizer.ggml.to" */
    memcpy(b->p + 24 + 8 + 17 + 4 + 4 + 8, "tokenizer.ggml.to", 17);
    set64(b, 24 + 8 + 17 + 4 + 4, 17);
}
static void m_dup_tensor(struct bb *b, const struct layout *L)
{
    (void)L;
    size_t t1 = L->t0_off_at + 8;
    memcpy(b->p + t1 + 8, "t0", 2);
}

static void test_malformed(void **state)
{
    (void)state;
    expect_bad("magic", m_magic, TUNA_E_FORMAT, "not a GGUF file");
    expect_bad("v1", m_v1, TUNA_E_UNSUPPORTED, "version 1");
    expect_bad("v9", m_v9, TUNA_E_UNSUPPORTED, "GGUF version 9");
    expect_bad("big-endian", m_bigendian, TUNA_E_UNSUPPORTED, "big-endian");
    expect_bad("huge kv count", m_huge_kv, TUNA_E_FORMAT, "metadata entries");
    expect_bad("huge tensor count", m_huge_t, TUNA_E_FORMAT, "tensors;");
    expect_bad("bad value type", m_bad_vtype, TUNA_E_FORMAT, "value type 13");
    expect_bad("huge array", m_huge_arr, TUNA_E_FORMAT, "claims 4611686018427387904 strings");
    expect_bad("bad string length", m_bad_strlen, TUNA_E_FORMAT, "claims a length of");
    expect_bad("long tensor name", m_long_name, TUNA_E_FORMAT, "invalid name");
    expect_bad("5 dims", m_dims5, TUNA_E_FORMAT, "5 dimensions");
    expect_bad("dims overflow", m_dims_overflow, TUNA_E_FORMAT, "overflow");
    expect_bad("bad tensor type", m_bad_ttype, TUNA_E_FORMAT, "unknown ggml type id 99");
    expect_bad("block size", m_block, TUNA_E_FORMAT, "not a multiple of the block size 32");
    expect_bad("misaligned offset", m_misaligned, TUNA_E_FORMAT, "not a multiple of the alignment");
    expect_bad("offset gap", m_gap, TUNA_E_FORMAT, "expected 32");
    expect_bad("truncated data", m_truncated, TUNA_E_FORMAT, "runs past the end");
    expect_bad("truncated header", m_trunc_header, TUNA_E_FORMAT, "truncated GGUF");
    expect_bad("empty", m_empty, TUNA_E_FORMAT, "not a GGUF file");
    expect_bad("alignment", m_align, TUNA_E_FORMAT, "power of two");
    expect_bad("duplicate key", m_dup_key, TUNA_E_FORMAT, "duplicate metadata key");
    expect_bad("duplicate tensor", m_dup_tensor, TUNA_E_FORMAT, "duplicate tensor name 't0'");
}

/* Every truncation of a valid file fails cleanly (no read past the buffer under ASan). */
static void test_every_truncation(void **state)
{
    (void)state;
    struct layout L;
    struct bb b = make_valid(&L);
    for (size_t n = 0; n < b.n; n++) {
        uint8_t *copy = malloc(n ? n : 1);
        memcpy(copy, b.p, n);
        tuna_gguf *g = NULL;
        tuna_status st = tuna_gguf_open_buffer(copy, n, "cut.gguf", &g);
        if (st == TUNA_OK) {
            print_error("truncation to %zu bytes was accepted\n", n);
            fail();
        }
        free(copy);
    }
    free(b.p);
}

static void test_writer_roundtrip(void **state)
{
    (void)state;
    tuna_gguf_writer *w;
    TT_OK(tuna_gguf_writer_new(&w));
    TT_OK(tuna_gguf_set_str(w, "general.architecture", "llama"));
    TT_OK(tuna_gguf_set_u32(w, "llama.block_count", 7));
    TT_OK(tuna_gguf_set_f32(w, "llama.rope.freq_base", 10000.5f));
    TT_OK(tuna_gguf_set_bool(w, "tokenizer.ggml.add_bos_token", true));
    const char *toks[3] = {"<s>", "▁hi", ""};
    TT_OK(tuna_gguf_set_arr_str(w, "tokenizer.ggml.tokens", toks, 3));
    float sc[3] = {0, -1.5f, 2};
    TT_OK(tuna_gguf_set_arr_f32(w, "tokenizer.ggml.scores", sc, 3));
    int32_t tt[3] = {3, 1, 1};
    TT_OK(tuna_gguf_set_arr_i32(w, "tokenizer.ggml.token_type", tt, 3));
    TT_FAILS(tuna_gguf_set_u32(w, "llama.block_count", 8), TUNA_E_INVALID, "set twice");
    float x[64];
    for (int i = 0; i < 64; i++) x[i] = (float)i * 0.25f - 3;
    uint8_t *q = malloc(tuna_ggml_row_size(TUNA_GGML_Q8_0, 64));
    TT_OK(tuna_ggml_quantize(TUNA_GGML_Q8_0, x, q, 64));
    int64_t ne[2] = {32, 2};
    TT_OK(tuna_gguf_add_tensor(w, "blk.0.attn_q.weight", TUNA_GGML_Q8_0, 2, ne, q, 68, true));
    int64_t ne1[1] = {3};
    TT_OK(tuna_gguf_add_tensor(w, "v", TUNA_GGML_F32, 1, ne1, sc, 12, false));
    TT_FAILS(tuna_gguf_add_tensor(w, "v", TUNA_GGML_F32, 1, ne1, sc, 12, false), TUNA_E_INVALID, "added twice");
    int64_t bad[1] = {33};
    TT_FAILS(tuna_gguf_add_tensor(w, "w", TUNA_GGML_Q8_0, 1, bad, sc, 12, false), TUNA_E_INVALID, "multiple of 32");
    char path[4200];
    snprintf(path, sizeof path, "%s/rt.gguf", tt_tmpdir());
    TT_OK(tuna_gguf_writer_save(w, path));
    tuna_gguf_writer_free(w);

    tuna_gguf *g;
    TT_OK(tuna_gguf_open(path, &g));
    char *arch;
    TT_OK(tuna_gguf_get_strdup(g, "general.architecture", &arch));
    assert_string_equal(arch, "llama");
    free(arch);
    uint32_t u;
    TT_OK(tuna_gguf_get_u32(g, "llama.block_count", &u));
    assert_int_equal(u, 7);
    float f;
    TT_OK(tuna_gguf_get_f32(g, "llama.rope.freq_base", &f));
    assert_true(f == 10000.5f);
    bool bo;
    TT_OK(tuna_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &bo));
    assert_true(bo);
    const struct tuna_gguf_kv *kv;
    TT_OK(tuna_gguf_get_arr(g, "tokenizer.ggml.tokens", TUNA_GGUF_STRING, &kv));
    assert_int_equal(kv->n, 3);
    assert_int_equal(kv->strs[1].len, strlen("▁hi"));
    assert_int_equal(kv->strs[2].len, 0);
    TT_OK(tuna_gguf_get_arr(g, "tokenizer.ggml.scores", TUNA_GGUF_FLOAT32, &kv));
    assert_true(tuna_gguf_arr_num(kv, 1) == -1.5);
    TT_FAILS(tuna_gguf_get_arr(g, "tokenizer.ggml.token_type", TUNA_GGUF_UINT32, &kv), TUNA_E_FORMAT, "array of int32");
    const struct tuna_gguf_tensor *t = tuna_gguf_find_tensor(g, "blk.0.attn_q.weight");
    assert_non_null(t);
    assert_int_equal(t->type, TUNA_GGML_Q8_0);
    assert_int_equal((uintptr_t)t->data % 32, 0);
    float y[64];
    TT_OK(tuna_ggml_dequantize(t->type, t->data, y, 64));
    assert_true(tt_rel_err(y, x, 64) < 0.01);
    t = tuna_gguf_find_tensor(g, "v");
    assert_int_equal(t->offset, 96);
    assert_memory_equal(t->data, sc, 12);
    tuna_gguf_close(g);
}

static void test_peer_files(void **state)
{
    (void)state;
    char p[4096];
    if (!tt_shared_path(p, sizeof p, "peers/llama.cpp/gguf-v1/ggml-vocab-llama.gguf")) skip();
    tuna_gguf *g = NULL;
    TT_FAILS(tuna_gguf_open(p, &g), TUNA_E_UNSUPPORTED, "GGUF version 1");
    const char *vocab[] = {"peers/llama.cpp/models/ggml-vocab-gpt-2.gguf", "peers/llama.cpp/models/ggml-vocab-phi-3.gguf",
                           "peers/llama.cpp/models/ggml-vocab-starcoder.gguf",
                           "peers/llama.cpp/models/ggml-vocab-deepseek-llm.gguf"};
    for (size_t i = 0; i < sizeof vocab / sizeof *vocab; i++) {
        if (!tt_shared_path(p, sizeof p, vocab[i])) continue;
        TT_OK(tuna_gguf_open(p, &g));
        const struct tuna_gguf_kv *kv;
        TT_OK(tuna_gguf_get_arr(g, "tokenizer.ggml.tokens", TUNA_GGUF_STRING, &kv));
        assert_true(kv->n > 1000);
        assert_int_equal(tuna_gguf_tensor_count(g), 0);
        tuna_gguf_close(g);
    }
    if (!tt_shared_path(p, sizeof p, "peers/python-gen-worker/tests/testdata/stories260K.gguf")) return;
    TT_OK(tuna_gguf_open(p, &g));
    assert_non_null(tuna_gguf_find_tensor(g, "token_embd.weight"));
    uint32_t n;
    TT_OK(tuna_gguf_get_u32(g, "llama.block_count", &n));
    assert_int_equal(n, 5);
    tuna_gguf_close(g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_handmade),    cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_every_truncation),  cmocka_unit_test(test_writer_roundtrip),
        cmocka_unit_test(test_peer_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
