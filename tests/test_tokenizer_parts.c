/* test_tokenizer_parts.c — the pipeline stages one by one (pretokenize.c, normalize.c,
 * decode.c, added_tokens.c) through the module's internal header.
 *
 * Expected values are those of HF tokenizers' own unit tests (pre_tokenizers/split.rs,
 * metaspace.rs, digits.rs, punctuation.rs, whitespace.rs, bert.rs, byte_level.rs,
 * decoders/byte_fallback.rs, fuse.rs, strip.rs), i.e. produced by the reference library. */
#include "testutil.h"
#include "tokenizer/tok_internal.h"

/* Splits text with the pre-tokenizer given as JSON and compares with want[] (NULL-ended). */
static void check_pre(const char *json, const char *text, const char *const *want)
{
    cJSON *j = cJSON_Parse(json);
    assert_non_null(j);
    struct tk_pre p;
    TT_OK(tk_pre_parse(j, &p));
    cJSON_Delete(j);
    tk_pieces l = {0};
    assert_true(tk_pieces_add(&l, text, strlen(text), true));
    TT_OK(tk_pre_apply(&p, &l));
    size_t n = 0;
    while (want[n]) n++;
    bool ok = l.n == n;
    for (size_t i = 0; ok && i < n; i++) ok = l.v[i].len == strlen(want[i]) && !memcmp(l.text.p + l.v[i].off, want[i], l.v[i].len);
    if (!ok) {
        fprintf(stderr, "pre-tokenizer %s on \"%s\":\n  got ", json, text);
        for (size_t i = 0; i < l.n; i++) fprintf(stderr, "[%.*s] ", (int)l.v[i].len, l.text.p + l.v[i].off);
        fprintf(stderr, "\n  want ");
        for (size_t i = 0; i < n; i++) fprintf(stderr, "[%s] ", want[i]);
        fprintf(stderr, "\n");
    }
    tk_pieces_free(&l);
    tk_pre_free(&p);
    assert_true(ok);
}

#define W(...) ((const char *const[]){__VA_ARGS__, NULL})
#define WS_RE "{\"Regex\": \"\\\\w+|[^\\\\w\\\\s]+\"}"

static void test_split_behaviors(void **s)
{
    (void)s;
    const char *t = "How are you doing?";
    check_pre("{\"type\":\"Split\",\"pattern\":" WS_RE ",\"behavior\":\"Removed\",\"invert\":true}", t,
              W("How", "are", "you", "doing", "?"));
    check_pre("{\"type\":\"Split\",\"pattern\":" WS_RE ",\"behavior\":\"Isolated\",\"invert\":true}", t,
              W("How", " ", "are", " ", "you", " ", "doing", "?"));
    check_pre("{\"type\":\"Split\",\"pattern\":" WS_RE ",\"behavior\":\"MergedWithPrevious\",\"invert\":true}", t,
              W("How ", "are ", "you ", "doing", "?"));
    check_pre("{\"type\":\"Split\",\"pattern\":" WS_RE ",\"behavior\":\"MergedWithNext\",\"invert\":true}", t,
              W("How", " are", " you", " doing", "?"));
    check_pre("{\"type\":\"Split\",\"pattern\":" WS_RE ",\"behavior\":\"Contiguous\",\"invert\":true}", t,
              W("How", " ", "are", " ", "you", " ", "doing?"));
    /* a string pattern, and invert: splitting on " " equals keeping "Hello" */
    check_pre("{\"type\":\"Split\",\"pattern\":{\"String\":\" \"},\"behavior\":\"Removed\",\"invert\":false}",
              "Hello Hello Hello", W("Hello", "Hello", "Hello"));
    check_pre("{\"type\":\"Split\",\"pattern\":{\"String\":\"Hello\"},\"behavior\":\"Removed\",\"invert\":true}",
              "Hello Hello Hello", W("Hello", "Hello", "Hello"));
    check_pre("{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\s+\"},\"behavior\":\"Removed\",\"invert\":false}", "Hey, man!",
              W("Hey,", "man!"));
}

static void test_pre_tokenizers(void **s)
{
    (void)s;
    check_pre("{\"type\":\"Metaspace\",\"replacement\":\"\xE2\x96\x81\",\"add_prefix_space\":true}", "Hey friend!",
              W("\xE2\x96\x81Hey", "\xE2\x96\x81" "friend!"));
    check_pre("{\"type\":\"Metaspace\",\"replacement\":\"\xE2\x96\x81\",\"add_prefix_space\":true}", "Hey   friend!",
              W("\xE2\x96\x81Hey", "\xE2\x96\x81", "\xE2\x96\x81", "\xE2\x96\x81" "friend!"));
    check_pre("{\"type\":\"Metaspace\",\"replacement\":\"\xE2\x96\x81\",\"prepend_scheme\":\"never\",\"split\":false}",
              "Hey friend!", W("Hey\xE2\x96\x81" "friend!"));
    check_pre("{\"type\":\"Digits\",\"individual_digits\":false}", "Hey 123 friend!", W("Hey ", "123", " friend!"));
    check_pre("{\"type\":\"Digits\",\"individual_digits\":true}", "Hey 123 friend!", W("Hey ", "1", "2", "3", " friend!"));
    check_pre("{\"type\":\"Punctuation\",\"behavior\":\"Isolated\"}", "Hey friend!     How are you?!?",
              W("Hey friend", "!", "     How are you", "?", "!", "?"));
    check_pre("{\"type\":\"Whitespace\"}", "Hey man!", W("Hey", "man", "!"));
    check_pre("{\"type\":\"Whitespace\"}", "How are you doing?", W("How", "are", "you", "doing", "?"));
    check_pre("{\"type\":\"WhitespaceSplit\"}", "Hey man!", W("Hey", "man!"));
    check_pre("{\"type\":\"CharDelimiterSplit\",\"delimiter\":\" \"}", "Hey  man!", W("Hey", "man!"));
    check_pre("{\"type\":\"BertPreTokenizer\"}", "Hey friend!     How are you?!?",
              W("Hey", "friend", "!", "How", "are", "you", "?", "!", "?"));
    check_pre("{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true}", "Hello my friend, how is your day going?",
              W("Hello", "\xC4\xA0my", "\xC4\xA0" "friend", ",", "\xC4\xA0how", "\xC4\xA0is", "\xC4\xA0your", "\xC4\xA0" "day",
                "\xC4\xA0going", "?"));
    check_pre("{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"use_regex\":true}", "Hello my friend, how is your day going?",
              W("\xC4\xA0Hello", "\xC4\xA0my", "\xC4\xA0" "friend", ",", "\xC4\xA0how", "\xC4\xA0is", "\xC4\xA0your",
                "\xC4\xA0" "day", "\xC4\xA0going", "?"));
    check_pre("{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"WhitespaceSplit\"},{\"type\":\"Digits\",\"individual_digits\":true}]}",
              "Hey 123 friend!", W("Hey", "1", "2", "3", "friend!"));
}

static void check_dec(const char *json, const char *const *in, const char *const *want)
{
    cJSON *j = cJSON_Parse(json);
    assert_non_null(j);
    struct tk_dec d;
    TT_OK(tk_dec_parse(j, &d));
    cJSON_Delete(j);
    tk_pieces l = {0};
    for (size_t i = 0; in[i]; i++) assert_true(tk_pieces_add(&l, in[i], strlen(in[i]), false));
    TT_OK(tk_dec_apply(&d, &l));
    size_t n = 0;
    while (want[n]) n++;
    bool ok = l.n == n;
    for (size_t i = 0; ok && i < n; i++) ok = l.v[i].len == strlen(want[i]) && !memcmp(l.text.p + l.v[i].off, want[i], l.v[i].len);
    if (!ok) {
        fprintf(stderr, "decoder %s:\n  got ", json);
        for (size_t i = 0; i < l.n; i++) fprintf(stderr, "[%.*s] ", (int)l.v[i].len, l.text.p + l.v[i].off);
        fprintf(stderr, "\n");
    }
    tk_pieces_free(&l);
    tk_dec_free(&d);
    assert_true(ok);
}

#define FFFD "\xEF\xBF\xBD"
static void test_decoders(void **s)
{
    (void)s;
    const char *bf = "{\"type\":\"ByteFallback\"}";
    check_dec(bf, W("Hey", "friend!"), W("Hey", "friend!"));
    check_dec(bf, W("<0x61>"), W("a"));
    check_dec(bf, W("<0xE5>"), W(FFFD));
    check_dec(bf, W("<0xE5>", "<0x8f>"), W(FFFD, FFFD));
    check_dec(bf, W("<0xE5>", "<0x8f>", "<0xab>"), W("\xE5\x8F\xAB"));
    check_dec(bf, W("<0xE5>", "<0x8f>", "<0xab>", "a"), W("\xE5\x8F\xAB", "a"));
    check_dec(bf, W("<0xE5>", "<0x8f>", "a"), W(FFFD, FFFD, "a"));
    check_dec("{\"type\":\"Fuse\"}", W("Hey", " friend!"), W("Hey friend!"));
    check_dec("{\"type\":\"Strip\",\"content\":\"H\",\"start\":1,\"stop\":0}", W("Hey", " friend!", "HHH"),
              W("ey", " friend!", "HH"));
    check_dec("{\"type\":\"Strip\",\"content\":\"y\",\"start\":0,\"stop\":1}", W("Hey", " friend!"), W("He", " friend!"));
    check_dec("{\"type\":\"Metaspace\",\"replacement\":\"\xE2\x96\x81\",\"add_prefix_space\":true}",
              W("\xE2\x96\x81Hey", "\xE2\x96\x81" "friend!"), W("Hey", " friend!"));
    check_dec("{\"type\":\"ByteLevel\"}", W("Hello", "\xC4\xA0my", "\xC4\xA0" "friend"), W("Hello my friend"));
    check_dec("{\"type\":\"BPEDecoder\",\"suffix\":\"</w>\"}", W("My</w>", "na", "me</w>", "is</w>", "Jo", "hn</w>"),
              W("My ", "na", "me ", "is ", "Jo", "hn"));
    /* a token ending inside a UTF-8 character becomes U+FFFD, as from_utf8_lossy does */
    check_dec("{\"type\":\"ByteLevel\"}", W("\xC3\xA5\xC4\xB1"), W(FFFD));
    check_dec("{\"type\":\"Replace\",\"pattern\":{\"String\":\"\xE2\x96\x81\"},\"content\":\" \"}",
              W("\xE2\x96\x81Hey", "a\xE2\x96\x81\xE2\x96\x81"), W(" Hey", "a  "));
}

static void check_norm(const char *json, const char *in, const char *want)
{
    cJSON *j = cJSON_Parse(json);
    assert_non_null(j);
    struct tk_norm n;
    TT_OK(tk_norm_parse(j, &n));
    cJSON_Delete(j);
    tk_buf out = {0};
    TT_OK(tk_norm_apply(&n, in, strlen(in), &out));
    if (strcmp(out.p ? out.p : "", want) != 0) fprintf(stderr, "normalizer %s on \"%s\": got \"%s\"\n", json, in, out.p);
    assert_string_equal(out.p ? out.p : "", want);
    tk_buf_free(&out);
    tk_norm_free(&n);
}

static void test_normalizers(void **s)
{
    (void)s;
    check_norm("{\"type\":\"Lowercase\"}", "Hello WORLD \xC3\x89", "hello world \xC3\xA9");
    check_norm("{\"type\":\"Strip\",\"strip_left\":true,\"strip_right\":true}", "  \t Hey friend  \n", "Hey friend");
    check_norm("{\"type\":\"Strip\",\"strip_left\":false,\"strip_right\":true}", "  Hey  ", "  Hey");
    check_norm("{\"type\":\"NFD\"}", "\xC3\xA9", "e\xCC\x81");
    check_norm("{\"type\":\"NFC\"}", "e\xCC\x81", "\xC3\xA9");
    check_norm("{\"type\":\"NFKC\"}", "\xEF\xAC\x81", "fi");      /* the ﬁ ligature */
    check_norm("{\"type\":\"NFKD\"}", "\xC2\xBD", "1\xE2\x81\x84" "2"); /* ½ */
    check_norm("{\"type\":\"Prepend\",\"prepend\":\"\xE2\x96\x81\"}", "Hey", "\xE2\x96\x81Hey");
    /* HF normalizers/byte_level.rs: "Hello 我今天能为你做什么" */
    check_norm("{\"type\":\"ByteLevel\"}",
               "Hello \xE6\x88\x91\xE4\xBB\x8A\xE5\xA4\xA9\xE8\x83\xBD\xE4\xB8\xBA\xE4\xBD\xA0\xE5\x81\x9A\xE4\xBB\x80\xE4\xB9\x88",
               "Hello\xC4\xA0\xC3\xA6\xC4\xAA\xC4\xB3\xC3\xA4\xC2\xBB\xC4\xAC\xC3\xA5\xC2\xA4\xC2\xA9\xC3\xA8\xC4\xA5"
               "\xC2\xBD\xC3\xA4\xC2\xB8\xC2\xBA\xC3\xA4\xC2\xBD\xC5\x82\xC3\xA5\xC4\xA3\xC4\xBC\xC3\xA4\xC2\xBB"
               "\xC4\xA2\xC3\xA4\xC2\xB9\xC4\xAA");
    check_norm("{\"type\":\"Prepend\",\"prepend\":\"\xE2\x96\x81\"}", "", "");
    check_norm("{\"type\":\"Replace\",\"pattern\":{\"Regex\":\" {2,}\"},\"content\":\" \"}", "a   b  c d", "a b c d");
    check_norm("{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFD\"},{\"type\":\"StripAccents\"},{\"type\":\"Lowercase\"}]}",
               "H\xC3\xA9llo", "hello");
}

/* HF's AddedVocabulary tests (added_vocabulary.rs): the splits of extract_and_normalize with a
 * Lowercase normalizer. Tokens made with AddedToken::from(s, false) are normalized, special ones
 * are not. Each split is its normalized text and its added token id or -1. */
static void check_extract(const char *added_json, const char *text, const char *const *want_s, const int *want_id)
{
    char json[2048];
    snprintf(json, sizeof json,
             "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"normalizer\":{\"type\":\"Lowercase\"},"
             "\"added_tokens\":%s}",
             added_json);
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load_json(json, strlen(json), NULL, 0, &t));
    tk_aseg *raw = NULL, *sub = NULL;
    size_t nraw, nsub, k = 0;
    bool ok = true;
    TT_OK(tk_added_split(t, &t->match_raw, true, text, strlen(text), &raw, &nraw));
    for (size_t i = 0; i < nraw; i++) {
        if (raw[i].added >= 0) {
            ok = ok && want_s[k] && strlen(want_s[k]) == raw[i].end - raw[i].start &&
                 !memcmp(want_s[k], text + raw[i].start, raw[i].end - raw[i].start) && want_id[k] == t->added[raw[i].added].id;
            k++;
            continue;
        }
        tk_buf nb = {0};
        TT_OK(tk_norm_apply(t->norm, text + raw[i].start, raw[i].end - raw[i].start, &nb));
        TT_OK(tk_added_split(t, &t->match_norm, true, nb.p, nb.n, &sub, &nsub));
        for (size_t j = 0; j < nsub; j++) {
            size_t l = sub[j].end - sub[j].start;
            if (l == 0) continue;
            int id = sub[j].added >= 0 ? t->added[sub[j].added].id : -1;
            if (!want_s[k] || strlen(want_s[k]) != l || memcmp(want_s[k], nb.p + sub[j].start, l) || want_id[k] != id) {
                fprintf(stderr, "split %zu: got \"%.*s\" (%d)\n", k, (int)l, nb.p + sub[j].start, id);
                ok = false;
            }
            k++;
        }
        free(sub);
        tk_buf_free(&nb);
    }
    ok = ok && want_s[k] == NULL;
    free(raw);
    tuna_tokenizer_free(t);
    if (!ok) fprintf(stderr, "added-token splits of \"%s\" differ\n", text);
    assert_true(ok);
}

static void test_added_tokens(void **s)
{
    (void)s;
    /* AddedToken::from(s, special) is normalized when not special */
    const char *opts = "[{\"id\":0,\"content\":\"my\",\"special\":false,\"normalized\":true,\"lstrip\":true,\"rstrip\":true},"
                       "{\"id\":1,\"content\":\"name\",\"special\":false,\"normalized\":true},"
                       "{\"id\":2,\"content\":\"ony\",\"special\":false,\"normalized\":true,\"single_word\":true},"
                       "{\"id\":3,\"content\":\"[CLS]\",\"special\":true,\"normalized\":false},"
                       "{\"id\":4,\"content\":\"[SEP]\",\"special\":true,\"normalized\":false}]";
    check_extract(opts, "[CLS] My name is Anthony [SEP]", W("[CLS]", " my ", "name", " is anthony ", "[SEP]"),
                  (const int[]){3, 0, 1, -1, 4});
    const char *mask_sw = "[{\"id\":0,\"content\":\"<mask>\",\"special\":false,\"normalized\":true,\"single_word\":true}]";
    check_extract(mask_sw, "<mask> My name <mask> A<mask> <mask>ony <mask>",
                  W("<mask>", " my name ", "<mask>", " a<mask> <mask>ony ", "<mask>"), (const int[]){0, -1, 0, -1, 0});
    check_extract(mask_sw, "<mask>, <mask>- \xE2\x97\x8C\xCC\xB0<mask>", W("<mask>", ", ", "<mask>", "- \xE2\x97\x8C\xCC\xB0<mask>"),
                  (const int[]){0, -1, 0, -1});
    const char *mask_all = "[{\"id\":0,\"content\":\"<mask>\",\"special\":false,\"normalized\":true,\"single_word\":true,"
                           "\"lstrip\":true,\"rstrip\":true}]";
    check_extract(mask_all, "Hi <mask> there\t<mask>\t<mask>\xE2\x80\x80",
                  W("hi", " <mask> ", "there", "\t<mask>\t", "<mask>\xE2\x80\x80"), (const int[]){-1, 0, -1, 0, 0});
}

/* Cutting SentencePiece-style words at "▁" (metaspace_cut) gives exactly the ids of merging
 * the whole word: checked on long random texts with the cut on and off (Llama 2 vocabulary). */
static void test_metaspace_cut_exact(void **s)
{
    (void)s;
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, "peers/onnxruntime-extensions/test/data/llama2")) skip();
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load(dir, &t));
    assert_true(t->model.metaspace_cut);
    uint64_t x = 12345;
    static const char *words[] = {"the", "  ", "caf\xC3\xA9", "\xE6\x9D\xB1\xE4\xBA\xAC", "\xF0\x9F\xA4\x97", "123",
                                  "don't", "\n", "\t", "tokenization", "x", " ", "\xE2\x96\x81", "<s>", "a.b,c"};
    for (int r = 0; r < 40; r++) {
        char text[8192];
        size_t n = 0;
        int nw = 20 + r * 10;
        for (int i = 0; i < nw; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            const char *w = words[x % (sizeof words / sizeof words[0])];
            size_t l = strlen(w);
            if (n + l + 2 >= sizeof text) break;
            memcpy(text + n, w, l);
            n += l;
            if (x & 16) text[n++] = ' ';
        }
        int32_t *a = NULL, *b = NULL;
        size_t na, nb;
        t->model.metaspace_cut = true;
        TT_OK(tuna_tokenizer_encode(t, text, n, false, false, &a, &na));
        t->model.metaspace_cut = false;
        TT_OK(tuna_tokenizer_encode(t, text, n, false, false, &b, &nb));
        assert_int_equal(na, nb);
        assert_memory_equal(a, b, na * sizeof *a);
        free(a);
        free(b);
    }
    tuna_tokenizer_free(t);
    /* a vocabulary with "▁" inside tokens (the fixture's own SentencePiece-style BPE) is not cut */
    if (!tt_shared_path(dir, sizeof dir, "fixtures/tokenizers/spm-1k")) return;
    TT_OK(tuna_tokenizer_load(dir, &t));
    int32_t id = -1;
    for (int32_t i = 0; i < tuna_tokenizer_vocab_size(t) && id < 0; i++) {
        const char *ts = tuna_tokenizer_token_str(t, i);
        const char *m = ts && ts[0] ? strstr(ts + 1, "\xE2\x96\x81") : NULL;
        size_t k = m ? (size_t)(m - ts) : 0;
        if (m && (k < 3 || memcmp(ts + k - 3, "\xE2\x96\x81", 3) != 0)) id = i;
    }
    assert_true(id >= 0);
    assert_false(t->model.metaspace_cut);
    tuna_tokenizer_free(t);
}

/* Many threads encoding at once share the word cache. */
#include <pthread.h>
static tuna_tokenizer *g_tok;
static const int32_t *g_want;
static size_t g_nwant;
static const char *g_text;
static void *encode_many(void *arg)
{
    (void)arg;
    for (int r = 0; r < 50; r++) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (tuna_tokenizer_encode(g_tok, g_text, strlen(g_text), true, true, &ids, &n) != TUNA_OK) return (void *)1;
        bool same = n == g_nwant && !memcmp(ids, g_want, n * sizeof *ids);
        free(ids);
        if (!same) return (void *)1;
    }
    return NULL;
}

static void test_threads(void **s)
{
    (void)s;
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/tokenizers/bpe-4k")) skip();
    TT_OK(tuna_tokenizer_load(dir, &g_tok));
    g_text = "def forward(self, hidden_states):\n    return self.mlp(self.norm(hidden_states)) + 42  # caf\xC3\xA9\n";
    int32_t *want = NULL;
    TT_OK(tuna_tokenizer_encode(g_tok, g_text, strlen(g_text), true, true, &want, &g_nwant));
    g_want = want;
    tuna_tokenizer_free(g_tok); /* start again with a cold cache so the threads fill it together */
    TT_OK(tuna_tokenizer_load(dir, &g_tok));
    pthread_t th[4];
    for (int i = 0; i < 4; i++) assert_int_equal(pthread_create(&th[i], NULL, encode_many, NULL), 0);
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(th[i], &r);
        assert_null(r);
    }
    free(want);
    tuna_tokenizer_free(g_tok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split_behaviors), cmocka_unit_test(test_pre_tokenizers), cmocka_unit_test(test_decoders),
        cmocka_unit_test(test_normalizers),     cmocka_unit_test(test_threads), cmocka_unit_test(test_metaspace_cut_exact),
        cmocka_unit_test(test_added_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
