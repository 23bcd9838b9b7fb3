/* test_tokenizer.c — tokenizer encode/decode against the project's fixtures (made by HF
 * tokenizers 0.23 / transformers 5): fixtures/tokenizers/{bpe-1k,bpe-4k,spm-1k}/cases.json and the
 * fixture model folders' reference prompt ids; special tokens, loading from memory, streaming
 * decode, invariants on random text, damaged files and bad input. The third-party references
 * (llama.cpp, transformers.js, swift-transformers, ...) are in test_tokenizer_peers.c. */
#include <stdbool.h>

#include "core/file.h"
#include "core/json.h"
#include "io/safetensors.h"
#include "tokenizer_check.h"

/* ---------------- fixtures/tokenizers ---------------- */

static void run_cases(const char *name)
{
    char buf[256], dir[4096], cpath[4200];
    snprintf(buf, sizeof buf, "fixtures/tokenizers/%s", name);
    if (!tt_shared_path(dir, sizeof dir, buf)) skip();
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load(dir, &t));
    snprintf(cpath, sizeof cpath, "%s/cases.json", dir);
    cJSON *doc = NULL;
    TT_OK(tuna_json_load(cpath, 0, &doc));
    const cJSON *c;
    size_t total = 0, pass = 0, idx = 0;
    cJSON_ArrayForEach(c, tuna_json_member(doc, "encode"))
    {
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
        int32_t *want, *want_sp;
        size_t nw, nws;
        assert_true(json_ids(cJSON_GetObjectItem(c, "ids"), &want, &nw));
        assert_true(json_ids(cJSON_GetObjectItem(c, "ids_with_special"), &want_sp, &nws));
        bool ok = check_encode(t, name, idx, text, strlen(text), false, want, nw);
        ok = check_encode(t, name, idx, text, strlen(text), true, want_sp, nws) && ok;
        char *dec = NULL;
        tuna_status st = tuna_tokenizer_decode(t, want, nw, false, &dec);
        const char *wd = cJSON_GetObjectItem(c, "decoded")->valuestring;
        if (st || strcmp(dec, wd) != 0) {
            fprintf(stderr, "  %s case %zu decode mismatch:\n    want \"%s\"\n    got  \"%s\"\n", name, idx, wd,
                    dec ? dec : tuna_last_error());
            ok = false;
        }
        free(dec);
        free(want);
        free(want_sp);
        total++;
        pass += ok;
        idx++;
    }
    /* chat[]: the rendered template, tokenized as apply_chat_template(tokenize=True) does
     * (special tokens in the text recognised, nothing added) */
    cJSON_ArrayForEach(c, tuna_json_member(doc, "chat"))
    {
        const char *text = cJSON_GetObjectItem(c, "rendered")->valuestring;
        int32_t *want;
        size_t nw;
        assert_true(json_ids(cJSON_GetObjectItem(c, "ids"), &want, &nw));
        pass += check_encode(t, name, idx, text, strlen(text), false, want, nw);
        free(want);
        total++;
        idx++;
    }
    /* vocab_size in cases.json is HF's len(tokenizer) */
    const cJSON *vs = tuna_json_member(doc, "vocab_size");
    if (cJSON_IsNumber(vs) && (int64_t)vs->valuedouble != tuna_tokenizer_vocab_size(t)) {
        fprintf(stderr, "  %s vocab size %lld, want %lld\n", name, (long long)tuna_tokenizer_vocab_size(t),
                (long long)vs->valuedouble);
        total++;
    }
    printf("%s: %zu/%zu cases\n", name, pass, total);
    cJSON_Delete(doc);
    tuna_tokenizer_free(t);
    assert_int_equal(pass, total);
    assert_true(total > 10);
}

static void test_fixture_bpe_1k(void **s) { (void)s, run_cases("bpe-1k"); }
static void test_fixture_bpe_4k(void **s) { (void)s, run_cases("bpe-4k"); }
static void test_fixture_spm_1k(void **s) { (void)s, run_cases("spm-1k"); }

static void test_fixture_specials(void **s)
{
    (void)s;
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/tokenizers/bpe-1k")) skip();
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load(dir, &t));
    assert_string_equal(tuna_tokenizer_special_str(t, "bos_token"), "<|begin_of_text|>");
    assert_string_equal(tuna_tokenizer_special_str(t, "eos_token"), "<|eot_id|>");
    assert_int_equal(tuna_tokenizer_special_id(t, "bos_token"), tuna_tokenizer_token_id(t, "<|begin_of_text|>"));
    assert_true(tuna_tokenizer_special_id(t, "bos_token") >= 0);
    assert_null(tuna_tokenizer_special_str(t, "unk_token"));
    assert_int_equal(tuna_tokenizer_special_id(t, "unk_token"), -1);
    assert_true(tuna_tokenizer_is_special(t, tuna_tokenizer_special_id(t, "eos_token")));
    assert_false(tuna_tokenizer_is_special(t, 5));
    assert_non_null(tuna_tokenizer_chat_template(t));
    /* parse_special=false: the special token's text is tokenized as text */
    const char *txt = "<|eot_id|>";
    int32_t *a = NULL, *b = NULL;
    size_t na, nb;
    TT_OK(tuna_tokenizer_encode(t, txt, strlen(txt), false, true, &a, &na));
    TT_OK(tuna_tokenizer_encode(t, txt, strlen(txt), false, false, &b, &nb));
    assert_int_equal(na, 1);
    assert_int_equal(a[0], tuna_tokenizer_special_id(t, "eos_token"));
    assert_true(nb > 1);
    char *dec = NULL;
    TT_OK(tuna_tokenizer_decode(t, b, nb, true, &dec));
    assert_string_equal(dec, txt); /* no special ids inside, so nothing skipped */
    free(dec);
    TT_OK(tuna_tokenizer_decode(t, a, na, true, &dec));
    assert_string_equal(dec, "");
    free(dec);
    free(a);
    free(b);
    /* the same tokenizer from memory */
    char jp[4200], cp[4200], *js, *cs;
    size_t jl, cl;
    snprintf(jp, sizeof jp, "%s/tokenizer.json", dir);
    snprintf(cp, sizeof cp, "%s/tokenizer_config.json", dir);
    TT_OK(tuna_read_file(jp, 0, &js, &jl));
    TT_OK(tuna_read_file(cp, 0, &cs, &cl));
    tuna_tokenizer *m = NULL;
    TT_OK(tuna_tokenizer_load_json(js, jl, cs, cl, &m));
    const char *probe = "<|begin_of_text|>Hello, world! caf\xC3\xA9 12345";
    TT_OK(tuna_tokenizer_encode(t, probe, strlen(probe), true, true, &a, &na));
    TT_OK(tuna_tokenizer_encode(m, probe, strlen(probe), true, true, &b, &nb));
    assert_true(same_ids(a, na, b, nb));
    assert_string_equal(tuna_tokenizer_special_str(m, "eos_token"), "<|eot_id|>");
    free(a);
    free(b);
    tuna_tokenizer_free(m);
    TT_FAILS(tuna_tokenizer_load_json(js, jl / 2, NULL, 0, &m), TUNA_E_FORMAT, "tokenizer.json");
    free(js);
    free(cs);
    for (int32_t id = 0; id < (int32_t)tuna_tokenizer_vocab_size(t); id++) {
        const char *ts = tuna_tokenizer_token_str(t, id);
        assert_non_null(ts);
        assert_int_equal(tuna_tokenizer_token_id(t, ts), id);
    }
    assert_null(tuna_tokenizer_token_str(t, -1));
    assert_null(tuna_tokenizer_token_str(t, (int32_t)tuna_tokenizer_vocab_size(t)));
    tuna_tokenizer_free(t);
}

/* ---------------- fixture model folders ---------------- */

static void test_fixture_models(void **s)
{
    (void)s;
    static const char *models[] = {"llama-tiny", "qwen2-tiny", "mistral-tiny", "qwen3-tiny", "gemma-tiny", "pymini"};
    char rel[256], dir[4096];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/models")) skip();
    const char *text = "def main():\n    print(\"Hello, world! 123\")  # caf\xC3\xA9 \xF0\x9F\xA4\x97\n";
    for (size_t m = 0; m < sizeof models / sizeof models[0]; m++) {
        snprintf(rel, sizeof rel, "fixtures/models/%s", models[m]);
        if (!tt_shared_path(dir, sizeof dir, rel)) continue;
        tuna_tokenizer *t = NULL;
        TT_OK(tuna_tokenizer_load(dir, &t));
        int32_t *ids = NULL;
        size_t n = 0;
        TT_OK(tuna_tokenizer_encode(t, text, strlen(text), false, true, &ids, &n));
        assert_true(n > 5);
        char *dec = NULL;
        TT_OK(tuna_tokenizer_decode(t, ids, n, false, &dec));
        assert_string_equal(dec, text);
        /* the reference prompts, encoded by transformers with special tokens */
        static const char *prompts[3] = {
            "def forward(self, hidden_states):", "The quick brown fox",
            "import torch\nimport numpy as np\n\nclass Model(nn.Module):\n    def __init__(self, config):\n        super().__init__()"};
        char rp[4200];
        snprintf(rp, sizeof rp, "%s/reference.safetensors", dir);
        tuna_st_file *ref = NULL;
        TT_OK(tuna_st_open(rp, &ref));
        size_t pass = 0;
        for (int i = 0; i < 3; i++) {
            char name[64];
            snprintf(name, sizeof name, "prompt%d.input_ids", i);
            const struct tuna_tensor_view *v = tuna_st_find(ref, name);
            assert_non_null(v);
            assert_int_equal(v->dtype, TUNA_DTYPE_I32);
            pass += check_encode(t, models[m], (size_t)i, prompts[i], strlen(prompts[i]), true, (const int32_t *)v->data,
                                 (size_t)v->numel);
        }
        tuna_st_close(ref);
        assert_int_equal(pass, 3);
        printf("model %s: reference prompts %zu/3, round trip ok\n", models[m], pass);
        free(dec);
        free(ids);
        tuna_tokenizer_free(t);
    }
}

/* ---------------- streaming decode ---------------- */

static void stream_all(const tuna_tokenizer *t, const char *text)
{
    int32_t *ids = NULL;
    size_t n = 0;
    TT_OK(tuna_tokenizer_encode(t, text, strlen(text), false, true, &ids, &n));
    tuna_detok_stream *ds = NULL;
    TT_OK(tuna_detok_stream_new(t, false, &ds));
    char acc[8192] = "";
    for (size_t i = 0; i < n; i++) {
        char *piece = NULL;
        TT_OK(tuna_detok_stream_push(ds, ids[i], &piece));
        /* a piece never ends inside a UTF-8 character and never contains U+FFFD here */
        size_t pl = strlen(piece);
        assert_null(strstr(piece, "\xEF\xBF\xBD"));
        if (pl) {
            size_t k = pl - 1;
            while (k > 0 && ((unsigned char)piece[k] & 0xC0) == 0x80) k--;
            unsigned char lead = (unsigned char)piece[k];
            size_t need = lead < 0x80 ? 1 : lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
            assert_int_equal(pl - k, need);
        }
        strncat(acc, piece, sizeof acc - strlen(acc) - 1);
        free(piece);
    }
    assert_string_equal(acc, text);
    tuna_detok_stream_free(ds);
    free(ids);
}

static void test_stream(void **s)
{
    (void)s;
    char dir[4096];
    const char *text = "emoji \xF0\x9F\xA4\x97\xF0\x9F\x9A\x80 and \xE6\x9D\xB1\xE4\xBA\xAC, caf\xC3\xA9!";
    if (!tt_shared_path(dir, sizeof dir, "fixtures/tokenizers/bpe-1k")) skip();
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load(dir, &t));
    stream_all(t, text);
    /* with space clean-up a later token rewrites text already emitted (" ," → ","): the stream
     * neither repeats nor drops text (HF's DecodeStream raises InvalidPrefix here) */
    tuna_tokenizer_set_clean_up_spaces(t, true);
    stream_all(t, "x , y and a . b");
    tuna_tokenizer_free(t);
    if (!tt_shared_path(dir, sizeof dir, "fixtures/tokenizers/spm-1k")) skip();
    TT_OK(tuna_tokenizer_load(dir, &t));
    stream_all(t, text);
    tuna_tokenizer_free(t);
}

/* ---------------- invariants on random text, damaged files ---------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* Random valid UTF-8: ASCII words and punctuation, spaces and newlines, Latin-1, CJK, emoji,
 * controls. */
static size_t random_text(char *buf, size_t cap)
{
    size_t n = 0;
    size_t len = 1 + rnd() % 60;
    for (size_t i = 0; i < len && n + 5 < cap; i++) {
        uint32_t k = rnd() % 10, cp;
        if (k < 4) cp = 'a' + rnd() % 26;
        else if (k == 4) cp = " \n\t!.,'0123456789"[rnd() % 17];
        else if (k == 5) cp = 0xA0 + rnd() % 0x60;
        else if (k == 6) cp = 0x4E00 + rnd() % 0x5000;
        else if (k == 7) cp = 0x1F600 + rnd() % 0x50;
        else if (k == 8) cp = 1 + rnd() % 31;
        else cp = 0x400 + rnd() % 0x100;
        if (cp < 0x80) buf[n++] = (char)cp;
        else if (cp < 0x800) {
            buf[n++] = (char)(0xC0 | (cp >> 6));
            buf[n++] = (char)(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            buf[n++] = (char)(0xE0 | (cp >> 12));
            buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3F));
            buf[n++] = (char)(0x80 | (cp & 0x3F));
        } else {
            buf[n++] = (char)(0xF0 | (cp >> 18));
            buf[n++] = (char)(0x80 | ((cp >> 12) & 0x3F));
            buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3F));
            buf[n++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    buf[n] = '\0';
    return n;
}

/* Byte-level and byte-fallback tokenizers without normalizing steps that lose information give
 * the text back exactly, and streaming gives the same text piece by piece. */
static void test_round_trip_random(void **s)
{
    (void)s;
    static const char *dirs[] = {"fixtures/tokenizers/bpe-4k", "fixtures/tokenizers/spm-1k", "fixtures/models/qwen2-tiny",
                                 "fixtures/models/gemma-tiny"};
    for (size_t d = 0; d < sizeof dirs / sizeof dirs[0]; d++) {
        char dir[4096];
        if (!tt_shared_path(dir, sizeof dir, dirs[d])) continue;
        tuna_tokenizer *t = NULL;
        TT_OK(tuna_tokenizer_load(dir, &t));
        for (int r = 0; r < 300; r++) {
            char text[512];
            size_t n = random_text(text, sizeof text);
            int32_t *ids = NULL;
            size_t k = 0;
            TT_OK(tuna_tokenizer_encode(t, text, n, false, false, &ids, &k));
            char *dec = NULL;
            TT_OK(tuna_tokenizer_decode(t, ids, k, false, &dec));
            if (strcmp(dec, text) != 0) {
                fprintf(stderr, "%s: round trip of \"%s\" gave \"%s\"\n", dirs[d], text, dec);
                fail();
            }
            tuna_detok_stream *ds = NULL;
            TT_OK(tuna_detok_stream_new(t, false, &ds));
            char acc[2048] = "";
            for (size_t i = 0; i < k; i++) {
                char *piece = NULL;
                TT_OK(tuna_detok_stream_push(ds, ids[i], &piece));
                strncat(acc, piece, sizeof acc - strlen(acc) - 1);
                free(piece);
            }
            if (strcmp(acc, text) != 0) {
                fprintf(stderr, "%s: stream of \"%s\" gave \"%s\"\n", dirs[d], text, acc);
                fail();
            }
            tuna_detok_stream_free(ds);
            free(dec);
            free(ids);
        }
        tuna_tokenizer_free(t);
    }
}

/* Truncated and corrupted tokenizer.json files fail with a message (or load and still encode);
 * nothing crashes or reads out of bounds (the sanitizer build checks the latter). */
static void test_damaged_files(void **s)
{
    (void)s;
    char src[4096], path[4200];
    if (!tt_shared_path(src, sizeof src, "fixtures/tokenizers/spm-1k/tokenizer.json")) skip();
    char *orig;
    size_t len;
    TT_OK(tuna_read_file(src, 0, &orig, &len));
    snprintf(path, sizeof path, "%s/damaged", tt_tmpdir());
    TT_OK(tuna_mkdir_p(path));
    snprintf(path, sizeof path, "%s/damaged/tokenizer.json", tt_tmpdir());
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/damaged", tt_tmpdir());
    char *buf = malloc(len + 1);
    size_t loaded = 0;
    for (int r = 0; r < 60; r++) {
        memcpy(buf, orig, len);
        size_t n = len;
        if (r < 20) n = rnd() % len; /* truncated */
        else if (r < 30)                /* broken syntax */
            for (int k = 0; k < 1 + r % 4; k++) buf[rnd() % len] = "{}[]\",:0a\\ "[rnd() % 11];
        else /* still JSON, wrong content: digits and letters changed (ids, tokens, type names) */
            for (int k = 0; k < 1 + r % 8;) {
                size_t at = rnd() % len;
                char c = buf[at];
                if (c >= '0' && c <= '9') buf[at] = (char)('0' + rnd() % 10), k++;
                else if (c >= 'a' && c <= 'z') buf[at] = (char)('a' + rnd() % 26), k++;
            }
        tt_write(path, buf, n);
        tuna_tokenizer *t = NULL;
        tuna_clear_error();
        tuna_status st = tuna_tokenizer_load(dir, &t);
        if (st) {
            assert_null(t);
            assert_true(strlen(tuna_last_error()) > 0);
            continue;
        }
        loaded++;
        int32_t *ids = NULL;
        size_t k = 0;
        const char *probe = "Hello world <s> caf\xC3\xA9 \xF0\x9F\xA4\x97";
        if (tuna_tokenizer_encode(t, probe, strlen(probe), true, true, &ids, &k) == TUNA_OK) {
            char *dec = NULL;
            if (tuna_tokenizer_decode(t, ids, k, false, &dec) == TUNA_OK) free(dec);
            free(ids);
        }
        tuna_tokenizer_free(t);
    }
    printf("damaged tokenizer.json: %zu of 60 still loaded, the rest failed cleanly\n", loaded);
    free(buf);
    free(orig);
}

/* ---------------- bad input ---------------- */

static void test_bad_input(void **s)
{
    (void)s;
    const char *tmp = tt_tmpdir();
    char path[4200];
    tuna_tokenizer *t = NULL;
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_NOT_FOUND, "tokenizer.json");
    assert_null(t);
    snprintf(path, sizeof path, "%s/tokenizer.json", tmp);
    const char *wl = "{\"model\": {\"type\": \"Mystery\", \"vocab\": {\"a\": 0}, \"unk_token\": \"a\"}}";
    tt_write(path, wl, strlen(wl));
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_UNSUPPORTED, "model type Mystery");
    const char *uni = "{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0], [\"b\"]]}}";
    tt_write(path, uni, strlen(uni));
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_FORMAT, "[piece, score]");
    const char *uni2 = "{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]], \"unk_id\": 5}}";
    tt_write(path, uni2, strlen(uni2));
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_FORMAT, "unk_id");
    const char *badmerge = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}}";
    tt_write(path, badmerge, strlen(badmerge));
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_FORMAT, "missing from the vocabulary");
    const char *badnorm = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []},"
                          " \"normalizer\": {\"type\": \"Mystery\"}}";
    tt_write(path, badnorm, strlen(badnorm));
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_UNSUPPORTED, "normalizer type \"Mystery\"");
    const char *badpre = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []},"
                         " \"pre_tokenizer\": {\"type\": \"UnicodeScripts\"}}";
    tt_write(path, badpre, strlen(badpre));
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_UNSUPPORTED, "pre-tokenizer type \"UnicodeScripts\"");
    const char *baddec = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []},"
                         " \"decoder\": {\"type\": \"CTC\"}}";
    tt_write(path, baddec, strlen(baddec));
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_UNSUPPORTED, "decoder type \"CTC\"");
    const char *badmap = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []},"
                         " \"normalizer\": {\"type\": \"Precompiled\", \"precompiled_charsmap\": \"AAAA\"}}";
    tt_write(path, badmap, strlen(badmap));
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_FORMAT, "precompiled_charsmap");
    const char *badre = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []},"
                        " \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}}";
    tt_write(path, badre, strlen(badre));
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_UNSUPPORTED, "regex");
    tt_write(path, "{\"model\": 3", 11);
    TT_FAILS(tuna_tokenizer_load(tmp, &t), TUNA_E_FORMAT, "tokenizer.json");

    /* a folder with only tokenizer.model: damaged protobuf, and a Unigram model, are refused */
    char spm_dir[4200], spm_path[4300];
    snprintf(spm_dir, sizeof spm_dir, "%s/spm-only", tmp);
    TT_OK(tuna_mkdir_p(spm_dir));
    snprintf(spm_path, sizeof spm_path, "%s/tokenizer.model", spm_dir);
    tt_write(spm_path, "\x0A\x7F\x0A", 3); /* a piece whose length runs past the end */
    TT_FAILS(tuna_tokenizer_load(spm_dir, &t), TUNA_E_FORMAT, "protobuf");
    static const unsigned char unigram[] = {0x0A, 0x03, 0x0A, 0x01, 'a', 0x0A, 0x03, 0x0A, 0x01, 'b',
                                            0x0A, 0x03, 0x0A, 0x01, 'c', 0x12, 0x02, 0x18, 0x01};
    tt_write(spm_path, unigram, sizeof unigram);
    TT_FAILS(tuna_tokenizer_load(spm_dir, &t), TUNA_E_UNSUPPORTED, "Unigram");
    /* WordLevel (HF models/wordlevel): a known word is its id, anything else the unk id */
    const char *wlv = "{\"model\": {\"type\": \"WordLevel\", \"vocab\": {\"<unk>\": 0, \"a\": 1, \"b\": 2},"
                      " \"unk_token\": \"<unk>\"}, \"pre_tokenizer\": {\"type\": \"WhitespaceSplit\"}}";
    tt_write(path, wlv, strlen(wlv));
    TT_OK(tuna_tokenizer_load(tmp, &t));
    int32_t *wids = NULL;
    size_t wn = 0;
    TT_OK(tuna_tokenizer_encode(t, "a b c", 5, false, true, &wids, &wn));
    assert_int_equal(wn, 3);
    assert_int_equal(wids[0], 1);
    assert_int_equal(wids[1], 2);
    assert_int_equal(wids[2], 0);
    free(wids);
    tuna_tokenizer_free(t);
    /* a minimal valid tokenizer: bad UTF-8 in, unknown ids in */
    const char *ok = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [[\"a\", \"b\"]]}}";
    tt_write(path, ok, strlen(ok));
    TT_OK(tuna_tokenizer_load(tmp, &t));
    int32_t *ids = NULL;
    size_t n = 0;
    TT_FAILS(tuna_tokenizer_encode(t, "a\xFF", 2, false, true, &ids, &n), TUNA_E_INVALID, "UTF-8");
    TT_OK(tuna_tokenizer_encode(t, "abab", 4, true, true, &ids, &n));
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 2);
    free(ids);
    int32_t bad[2] = {0, 7};
    char *dec = NULL;
    TT_FAILS(tuna_tokenizer_decode(t, bad, 2, false, &dec), TUNA_E_RANGE, "id 7");
    assert_null(dec);
    tuna_tokenizer_free(t);

    /* post-processors: a Sequence applies its processors in order (Llama 3 writes
     * [ByteLevel, TemplateProcessing]); RobertaProcessing puts cls first and sep last */
    const char *seq = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]},"
                      " \"added_tokens\": [{\"id\": 3, \"content\": \"<s>\", \"special\": true, \"normalized\": false},"
                      " {\"id\": 4, \"content\": \"</s>\", \"special\": true, \"normalized\": false}],"
                      " \"post_processor\": {\"type\": \"Sequence\", \"processors\": [{\"type\": \"ByteLevel\"},"
                      " {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}},"
                      " {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], \"special_tokens\": {\"<s>\": {\"id\": \"<s>\","
                      " \"ids\": [3], \"tokens\": [\"<s>\"]}}}]}}";
    TT_OK(tuna_tokenizer_load_json(seq, strlen(seq), NULL, 0, &t));
    TT_OK(tuna_tokenizer_encode(t, "ab</s>", 6, true, true, &ids, &n));
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 3);
    assert_int_equal(ids[1], 2);
    assert_int_equal(ids[2], 4);
    free(ids);
    TT_OK(tuna_tokenizer_decode(t, (const int32_t[]){3, 2, 4}, 3, true, &dec));
    assert_string_equal(dec, "ab");
    free(dec);
    tuna_tokenizer_free(t);
    const char *rob = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2, \"<s>\": 3, \"</s>\": 4},"
                      " \"merges\": [\"a b\"]}, \"post_processor\": {\"type\": \"RobertaProcessing\", \"sep\": [\"</s>\", 4],"
                      " \"cls\": [\"<s>\", 3]}}";
    TT_OK(tuna_tokenizer_load_json(rob, strlen(rob), NULL, 0, &t));
    TT_OK(tuna_tokenizer_encode(t, "ab", 2, true, true, &ids, &n));
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 3);
    assert_int_equal(ids[1], 2);
    assert_int_equal(ids[2], 4);
    free(ids);
    tuna_tokenizer_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixture_bpe_1k),
        cmocka_unit_test(test_fixture_bpe_4k),
        cmocka_unit_test(test_fixture_spm_1k),
        cmocka_unit_test(test_fixture_specials),
        cmocka_unit_test(test_fixture_models),
        cmocka_unit_test(test_stream),
        cmocka_unit_test(test_round_trip_random),
        cmocka_unit_test(test_damaged_files),
        cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
