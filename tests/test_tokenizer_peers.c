/* test_tokenizer_peers.c — the tokenizer against third-party reference outputs made by HF
 * tokenizers / transformers (shared/peers; see its README):
 * - llama.cpp's .inp/.out vectors run against real tokenizer.json files (Llama 2 / TinyLlama,
 *   Phi-3, Phi-2, Falcon, RoBERTa), vocab+merges files (Llama 3, Qwen2, DeepSeek-R1-Qwen) and a
 *   GGUF vocabulary (BERT WordPiece),
 * - swift-transformers' and transformers.js' expected ids and decodes (Llama 2, Falcon, Qwen1.5,
 *   Llama 3, T5), onnxruntime-extensions' (Phi-3, T5), llama-models' (Llama 3). */
#include <stdbool.h>

#include "core/file.h"
#include "core/json.h"
#include "tokenizer_check.h"

/* ---------------- llama.cpp vectors ---------------- */

/* Runs .inp/.out pairs; returns the number of cases; *pass gets the matches. */
static size_t run_vectors(const tuna_tokenizer *t, const char *set, const char *inp_rel, size_t *pass)
{
    char ip[4096], op[4200];
    *pass = 0;
    if (!tt_shared_path(ip, sizeof ip, inp_rel)) return 0;
    snprintf(op, sizeof op, "%.*s.out", (int)(strlen(ip) - 4), ip);
    char *inp, *out;
    size_t ni, no;
    TT_OK(tuna_read_file(ip, 0, &inp, &ni));
    TT_OK(tuna_read_file(op, 0, &out, &no));
    static const char sep[] = "\n__ggml_vocab_test__\n";
    char *p = inp, *q = out;
    size_t total = 0;
    for (;;) {
        char *e = strstr(p, sep);
        if (!e) break;
        char *nl = strchr(q, '\n');
        if (!nl) {
            fprintf(stderr, "  %s: .out has fewer lines than .inp has cases\n", set);
            total++;
            break;
        }
        *nl = '\0';
        int32_t want[4096];
        size_t nw = 0;
        char *r = q;
        while (*r) {
            char *end;
            long v = strtol(r, &end, 10);
            if (end == r) break;
            if (nw < 4096) want[nw++] = (int32_t)v;
            r = end;
        }
        *pass += check_encode(t, set, total, p, (size_t)(e - p), false, want, nw);
        total++;
        p = e + sizeof sep - 1;
        q = nl + 1;
    }
    free(inp);
    free(out);
    printf("%s: %zu/%zu\n", set, *pass, total);
    return total;
}

static void vectors_json(const char *set, const char *tok_rel, const char *inp_rel)
{
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, tok_rel)) skip();
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load(dir, &t));
    size_t pass, total = run_vectors(t, set, inp_rel, &pass);
    tuna_tokenizer_free(t);
    if (!total) skip();
    assert_int_equal(pass, total);
}

#define ORT "peers/onnxruntime-extensions/test/data/"
#define LCPP "peers/llama.cpp/models/ggml-vocab-"
static void test_llama_spm(void **s) { (void)s, vectors_json("llama-spm", ORT "llama2", LCPP "llama-spm.gguf.inp"); }
/* TinyLlama's own tokenizer.json is the Llama 2 one with its special tokens saved as
 * "normalized": false (the expected ids match "</s>" inside "abc</s> def", which a normalized
 * token, matched as "\u2581</s>" after the Prepend normalizer, cannot). The stored Llama 2 file says
 * normalized: true, so the test writes that variant; HF semantics of both are kept. */
static void test_tinyllama(void **s)
{
    (void)s;
    char src[4096], path[4200];
    if (!tt_shared_path(src, sizeof src, ORT "llama2/tokenizer.json")) skip();
    cJSON *doc = NULL;
    TT_OK(tuna_json_load(src, 0, &doc));
    const cJSON *e;
    cJSON_ArrayForEach(e, cJSON_GetObjectItem(doc, "added_tokens"))
        cJSON_ReplaceItemInObject((cJSON *)e, "normalized", cJSON_CreateFalse());
    char *txt = cJSON_PrintUnformatted(doc);
    cJSON_Delete(doc);
    snprintf(path, sizeof path, "%s/tinyllama", tt_tmpdir());
    TT_OK(tuna_mkdir_p(path));
    snprintf(path, sizeof path, "%s/tinyllama/tokenizer.json", tt_tmpdir());
    tt_write(path, txt, strlen(txt));
    free(txt);
    snprintf(path, sizeof path, "%s/tinyllama", tt_tmpdir());
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load(path, &t));
    size_t pass, total = run_vectors(t, "tinyllama", "peers/llama.cpp/models-newer/ggml-vocab-tinyllama.gguf.inp", &pass);
    tuna_tokenizer_free(t);
    if (!total) skip();
    assert_int_equal(pass, total);
    /* the stored file (normalized: true): "</s>" right after text is not an added token there */
    TT_OK(tuna_tokenizer_load_file(src, NULL, &t));
    int32_t *ids = NULL;
    size_t n = 0;
    TT_OK(tuna_tokenizer_encode(t, "a</s>b", 6, false, true, &ids, &n));
    for (size_t i = 0; i < n; i++) assert_int_not_equal(ids[i], 2);
    free(ids);
    TT_OK(tuna_tokenizer_encode(t, "</s>b", 5, false, true, &ids, &n));
    assert_true(n >= 1);
    free(ids);
    tuna_tokenizer_free(t);
}
static void test_phi3(void **s) { (void)s, vectors_json("phi-3", ORT "phi-3", LCPP "phi-3.gguf.inp"); }
static void test_phi2(void **s) { (void)s, vectors_json("phi-2", ORT "phi-2", "peers/llama.cpp/models-extra/ggml-vocab-phi-2.gguf.inp"); }
static void test_falcon(void **s) { (void)s, vectors_json("falcon", ORT "falcon-tokenizer", LCPP "falcon.gguf.inp"); }
static void test_roberta(void **s) { (void)s, vectors_json("roberta-bpe", ORT "tokenizer/roberta-base", LCPP "roberta-bpe.gguf.inp"); }

static tuna_tokenizer *g_qwen2; /* shared by the Qwen2 tests */
static void vectors_vm(const char *set, const char *vocab_rel, const char *merges_rel, const char *re, bool nfc,
                       bool ignore_merges, const char *inp_rel)
{
    char v[4096], m[4096];
    if (!tt_shared_path(v, sizeof v, vocab_rel) || !tt_shared_path(m, sizeof m, merges_rel)) skip();
    bool qwen = re == QWEN2_RE;
    tuna_tokenizer *t = qwen ? g_qwen2 : NULL;
    if (!t) TT_OK(tuna_tokenizer_load_vocab_merges(v, m, re, nfc, ignore_merges, &t));
    if (qwen) g_qwen2 = t;
    size_t pass, total = run_vectors(t, set, inp_rel, &pass);
    if (!qwen) tuna_tokenizer_free(t);
    if (!total) skip();
    assert_int_equal(pass, total);
}

#define QWEN "peers/rtp-llm/rtp_llm/test/tokenizer_test/testdata/qwen2_tokenizer/"
static void test_llama3(void **s)
{
    (void)s;
    vectors_vm("llama-bpe", "peers/ollama/tokenizer/testdata/llama3.2/encoder.json", "peers/ollama/tokenizer/testdata/llama3.2/vocab.bpe",
               LLAMA3_RE, false, true, LCPP "llama-bpe.gguf.inp");
}
static void test_qwen2(void **s)
{
    (void)s, vectors_vm("qwen2", QWEN "vocab.json", QWEN "merges.txt", QWEN2_RE, true, false, LCPP "qwen2.gguf.inp");
}
static void test_deepseek_r1_qwen(void **s)
{
    (void)s;
    vectors_vm("deepseek-r1-qwen", QWEN "vocab.json", QWEN "merges.txt", QWEN2_RE, true, false,
               LCPP "deepseek-r1-qwen.gguf.inp");
}

/* BERT WordPiece (BAAI/bge-small-en-v1.5): llama.cpp's vocab-only GGUF keeps the vocabulary
 * with word starts written "\u2581x" and continuations "x" (its WPM form); undoing that gives the
 * HF WordPiece vocabulary ("x", "##x"), and bge's tokenizer.json pipeline (BertNormalizer with
 * lowercase, BertPreTokenizer, WordPiece) is rebuilt around it. The ids of the .out file come
 * from HF AutoTokenizer. */
/* The strings of the GGUF array key (GGUF v2/v3, little endian), read without the gguf module
 * so that this test depends on the tokenizer only. Returns the count, or 0 when not found. */
static size_t gguf_strings(const unsigned char *d, size_t n, const char *key, const unsigned char ***ps, uint64_t **ls)
{
    size_t o = 24;
    if (n < 24 || memcmp(d, "GGUF", 4) != 0) return 0;
    uint64_t nkv;
    memcpy(&nkv, d + 16, 8);
#define NEED(k)                                                                                                        \
    do {                                                                                                               \
        if (o + (k) > n) return 0;                                                                                     \
    } while (0)
    static const size_t scalar[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    for (uint64_t i = 0; i < nkv; i++) {
        uint64_t kl, cnt = 1;
        uint32_t type, et;
        NEED(8);
        memcpy(&kl, d + o, 8);
        o += 8;
        NEED(kl + 4);
        bool hit = kl == strlen(key) && !memcmp(d + o, key, kl);
        o += kl;
        memcpy(&type, d + o, 4);
        o += 4;
        et = type;
        if (type == 9) {
            NEED(12);
            memcpy(&et, d + o, 4);
            memcpy(&cnt, d + o + 4, 8);
            o += 12;
        }
        if (et > 12) return 0;
        if (hit && et == 8) {
            *ps = malloc(cnt * sizeof **ps);
            *ls = malloc(cnt * sizeof **ls);
        }
        for (uint64_t k = 0; k < cnt; k++) {
            if (et == 8) {
                uint64_t sl;
                NEED(8);
                memcpy(&sl, d + o, 8);
                o += 8;
                NEED(sl);
                if (hit) (*ps)[k] = d + o, (*ls)[k] = sl;
                o += sl;
            } else {
                NEED(scalar[et]);
                o += scalar[et];
            }
        }
        if (hit) return et == 8 ? (size_t)cnt : 0;
    }
#undef NEED
    return 0;
}

/* BERT WordPiece (BAAI/bge-small-en-v1.5): llama.cpp's vocab-only GGUF keeps the vocabulary
 * with word starts written "\u2581x" and continuations "x" (its WPM form); undoing that gives the
 * HF WordPiece vocabulary ("x", "##x"), and bge's tokenizer.json pipeline (BertNormalizer with
 * lowercase, BertPreTokenizer, WordPiece) is rebuilt around it. The ids of the .out file come
 * from HF AutoTokenizer. */
static void test_bert_wordpiece(void **s)
{
    (void)s;
    char gp[4096];
    if (!tt_shared_path(gp, sizeof gp, LCPP "bert-bge.gguf")) skip();
    char *file;
    size_t flen;
    TT_OK(tuna_read_file(gp, 0, &file, &flen));
    const unsigned char **ps = NULL;
    uint64_t *ls = NULL;
    size_t ntok = gguf_strings((const unsigned char *)file, flen, "tokenizer.ggml.tokens", &ps, &ls);
    assert_true(ntok > 1000);
    cJSON *doc = cJSON_CreateObject(), *model = cJSON_AddObjectToObject(doc, "model"), *vocab;
    cJSON_AddStringToObject(model, "type", "WordPiece");
    cJSON_AddStringToObject(model, "unk_token", "[UNK]");
    cJSON_AddStringToObject(model, "continuing_subword_prefix", "##");
    cJSON_AddNumberToObject(model, "max_input_chars_per_word", 100);
    vocab = cJSON_AddObjectToObject(model, "vocab");
    char buf[1024];
    for (size_t i = 0; i < ntok; i++) {
        const char *p = (const char *)ps[i];
        size_t n = (size_t)ls[i];
        assert_true(n + 3 < sizeof buf);
        if (n >= 2 && p[0] == '[' && p[n - 1] == ']') snprintf(buf, sizeof buf, "%.*s", (int)n, p);
        else if (n >= 3 && !memcmp(p, "\xE2\x96\x81", 3)) snprintf(buf, sizeof buf, "%.*s", (int)(n - 3), p + 3);
        else snprintf(buf, sizeof buf, "##%.*s", (int)n, p);
        if (!cJSON_GetObjectItemCaseSensitive(vocab, buf)) cJSON_AddNumberToObject(vocab, buf, (double)i);
    }
    free(ps);
    free(ls);
    free(file);
    cJSON *norm = cJSON_AddObjectToObject(doc, "normalizer");
    cJSON_AddStringToObject(norm, "type", "BertNormalizer");
    cJSON_AddBoolToObject(norm, "clean_text", true);
    cJSON_AddBoolToObject(norm, "handle_chinese_chars", true);
    cJSON_AddNullToObject(norm, "strip_accents");
    cJSON_AddBoolToObject(norm, "lowercase", true);
    cJSON_AddStringToObject(cJSON_AddObjectToObject(doc, "pre_tokenizer"), "type", "BertPreTokenizer");
    char *txt = cJSON_PrintUnformatted(doc);
    cJSON_Delete(doc);
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load_json(txt, strlen(txt), NULL, 0, &t));
    free(txt);
    size_t pass, total = run_vectors(t, "bert-bge (WordPiece)", LCPP "bert-bge.gguf.inp", &pass);
    tuna_tokenizer_free(t);
    assert_true(total > 0);
    assert_int_equal(pass, total);
}

/* ---------------- SentencePiece tokenizer.model ---------------- */

/* Llama 2's tokenizer.model (from llama2.c) converted as transformers does: the llama.cpp
 * vectors, llama2.c's own prompt encodings (with BOS), and the same ids as the Llama 2
 * tokenizer.json on mixed text. */
static void test_sentencepiece_llama2(void **s)
{
    (void)s;
    char mp[4096], jp[4096];
    if (!tt_shared_path(mp, sizeof mp, "peers/llama2.c/tokenizer.model")) skip();
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load_sentencepiece(mp, NULL, &t));
    size_t pass, total = run_vectors(t, "llama-spm (tokenizer.model)", LCPP "llama-spm.gguf.inp", &pass);
    assert_int_equal(pass, total);
    if (tt_shared_path(jp, sizeof jp, "peers/extracted/llama2c_expected.json")) {
        cJSON *doc = NULL;
        TT_OK(tuna_json_load(jp, 0, &doc));
        const cJSON *c;
        size_t n = 0, ok = 0;
        cJSON_ArrayForEach(c, cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "llama2_tokenizer_cases"), "cases"))
        {
            const char *pr = cJSON_GetObjectItem(c, "prompt")->valuestring;
            int32_t *want;
            size_t nw;
            assert_true(json_ids(cJSON_GetObjectItem(c, "expected_ids_with_bos"), &want, &nw));
            ok += check_encode(t, "llama2.c prompts", n, pr, strlen(pr), true, want, nw);
            free(want);
            n++;
        }
        cJSON_Delete(doc);
        printf("llama2.c prompts (tokenizer.model): %zu/%zu\n", ok, n);
        assert_true(n > 0);
        assert_int_equal(ok, n);
    }
    tuna_tokenizer *j = load_rel(ORT "llama2");
    if (j) {
        /* (no special tokens in these texts: the stored tokenizer.json has them "normalized": true,
         * as older transformers wrote; today's converter writes false, as TinyLlama's file) */
        static const char *texts[] = {"Hello world! and   spaces\n\ttabs", "caf\xC3\xA9 \xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\xA4\x97",
                                      " leading", "def f(x):\n    return x ** 2  # square", "1234567890 3.14159"};
        for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
            int32_t *a, *b;
            size_t na, nb;
            TT_OK(tuna_tokenizer_encode(t, texts[i], strlen(texts[i]), true, true, &a, &na));
            TT_OK(tuna_tokenizer_encode(j, texts[i], strlen(texts[i]), true, true, &b, &nb));
            if (!same_ids(a, na, b, nb)) {
                fprintf(stderr, "tokenizer.model and tokenizer.json differ on \"%s\"\n", texts[i]);
                print_ids("model", a, na);
                print_ids("json ", b, nb);
                fail();
            }
            char *da, *db;
            TT_OK(tuna_tokenizer_decode(t, a, na, false, &da));
            TT_OK(tuna_tokenizer_decode(j, b, nb, false, &db));
            assert_string_equal(da, db);
            free(da);
            free(db);
            free(a);
            free(b);
        }
        tuna_tokenizer_free(j);
    }
    assert_int_equal(tuna_tokenizer_special_id(t, "bos_token"), 1);
    assert_int_equal(tuna_tokenizer_special_id(t, "eos_token"), 2);
    assert_true(tuna_tokenizer_is_special(t, 2));
    /* control pieces are non-normalized special tokens: the TinyLlama vectors hold */
    size_t tp, tt = run_vectors(t, "tinyllama (tokenizer.model)", "peers/llama.cpp/models-newer/ggml-vocab-tinyllama.gguf.inp", &tp);
    assert_int_equal(tp, tt);
    tuna_tokenizer_free(t);
}

/* Mistral's tokenizer.model v1-v3 (mistral-common) convert, round-trip text, and match the
 * ids of their pieces as mistral-common writes them (text_vN.txt holds the pieces joined). */
static void test_sentencepiece_mistral(void **s)
{
    (void)s;
    static const char *files[] = {"tokenizer.model.v1", "mistral_instruct_tokenizer_240216.model.v2",
                                  "mistral_instruct_tokenizer_240323.model.v3"};
    size_t loaded = 0;
    for (size_t f = 0; f < sizeof files / sizeof files[0]; f++) {
        char rel[256], mp[4096];
        snprintf(rel, sizeof rel, "peers/mistral-common/src/mistral_common/data/%s", files[f]);
        if (!tt_shared_path(mp, sizeof mp, rel)) continue;
        tuna_tokenizer *t = NULL;
        TT_OK(tuna_tokenizer_load_sentencepiece(mp, NULL, &t));
        const char *text = "Hello, how are you? I'm fine: 42 caf\xC3\xA9s \xE6\x9D\xB1\xE4\xBA\xAC\n\tdone";
        int32_t *ids;
        size_t n;
        TT_OK(tuna_tokenizer_encode(t, text, strlen(text), false, true, &ids, &n));
        char *dec;
        TT_OK(tuna_tokenizer_decode(t, ids, n, false, &dec));
        assert_string_equal(dec, text);
        free(dec);
        free(ids);
        tuna_tokenizer_free(t);
        loaded++;
    }
    if (!loaded) skip();
    printf("mistral tokenizer.model: %zu loaded, round trips exact\n", loaded);
}

/* ---------------- swift-transformers paragraphs ---------------- */

static void swift_case(const char *tok_rel, const char *json_rel)
{
    char dir[4096], jp[4096];
    if (!tt_shared_path(dir, sizeof dir, tok_rel) || !tt_shared_path(jp, sizeof jp, json_rel)) skip();
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load(dir, &t));
    cJSON *doc = NULL;
    TT_OK(tuna_json_load(jp, 0, &doc));
    const char *text = cJSON_GetObjectItem(doc, "text")->valuestring;
    int32_t *want;
    size_t nw;
    assert_true(json_ids(cJSON_GetObjectItem(doc, "token_ids"), &want, &nw));
    bool ok = check_encode(t, json_rel, 0, text, strlen(text), true, want, nw);
    const cJSON *dt = cJSON_GetObjectItem(doc, "decoded_text");
    if (cJSON_IsString(dt)) {
        char *dec = NULL;
        TT_OK(tuna_tokenizer_decode(t, want, nw, false, &dec));
        if (strcmp(dec, dt->valuestring) != 0) {
            fprintf(stderr, "  %s decode mismatch:\n    want \"%s\"\n    got  \"%s\"\n", json_rel, dt->valuestring, dec);
            ok = false;
        }
        free(dec);
    }
    printf("%s: %d/1\n", json_rel, ok);
    free(want);
    cJSON_Delete(doc);
    tuna_tokenizer_free(t);
    assert_true(ok);
}

#define SWIFT "peers/swift-transformers/Tests/TokenizersTests/Resources/"
static void test_swift_llama2(void **s) { (void)s, swift_case(ORT "llama2", SWIFT "llama_encoded.json"); }
static void test_swift_falcon(void **s) { (void)s, swift_case(ORT "falcon-tokenizer", SWIFT "falcon_encoded.json"); }

/* ---------------- expected-id tables (swift-transformers, transformers.js, ort-extensions) ---------------- */

/* Reference cases that the stored Llama 2 tokenizer.json pipeline cannot give: the expected ids
 * turn U+00A0 into "▁" as SentencePiece's nmt_nfkc normalizer does (so they were most likely
 * made with the slow SentencePiece tokenizer or a tokenizer.json with an NFKC step); this file's
 * normalizer (Prepend + Replace " ") keeps U+00A0 as byte tokens, as HF tokenizers does with it.
 * They are counted apart and must still differ, so a change in behaviour shows. */
static bool known_nbsp_case(const char *model, const char *text)
{
    return (!strcmp(model, "Xenova/llama-tokenizer") || !strcmp(model, "coreml-projects/Llama-2-7b-chat-coreml")) &&
           strstr(text, "\xC2\xA0");
}

/* swift-transformers tokenizer_tests.json: input → input_ids (with specials), decoded with and
 * without specials. */
static void swift_table(const char *tok_rel, const char *model, bool cleanup)
{
    char jp[4096];
    if (!tt_shared_path(jp, sizeof jp, "peers/swift-transformers/Tests/TokenizersTests/Resources/tokenizer_tests.json")) skip();
    tuna_tokenizer *t = load_rel(tok_rel);
    if (!t) skip();
    if (cleanup) tuna_tokenizer_set_clean_up_spaces(t, true);
    cJSON *doc = NULL;
    TT_OK(tuna_json_load(jp, 0, &doc));
    const cJSON *c;
    size_t total = 0, pass = 0, known = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(doc, model))
    {
        const char *in = cJSON_GetObjectItem(c, "input")->valuestring;
        if (known_nbsp_case(model, in)) {
            int32_t *want, *ids;
            size_t nw, n;
            assert_true(json_ids(cJSON_GetObjectItem(cJSON_GetObjectItem(c, "encoded"), "input_ids"), &want, &nw));
            TT_OK(tuna_tokenizer_encode(t, in, strlen(in), true, true, &ids, &n));
            assert_false(same_ids(ids, n, want, nw));
            free(want);
            free(ids);
            known++;
            continue;
        }
        int32_t *want;
        size_t nw;
        assert_true(json_ids(cJSON_GetObjectItem(cJSON_GetObjectItem(c, "encoded"), "input_ids"), &want, &nw));
        bool ok = check_encode(t, model, total, in, strlen(in), true, want, nw);
        ok = check_decode(t, model, in, want, nw, false, cJSON_GetObjectItem(c, "decoded_with_special")->valuestring) && ok;
        ok = check_decode(t, model, in, want, nw, true, cJSON_GetObjectItem(c, "decoded_without_special")->valuestring) && ok;
        free(want);
        pass += ok;
        total++;
    }
    printf("swift %s: %zu/%zu (+%zu known SentencePiece-normalizer cases)\n", model, pass, total, known);
    cJSON_Delete(doc);
    tuna_tokenizer_free(t);
    assert_true(total > 0);
    assert_int_equal(pass, total);
}

static void test_swift_table_llama2(void **s)
{
    (void)s, swift_table(ORT "llama2", "coreml-projects/Llama-2-7b-chat-coreml", false);
}
/* Falcon has no tokenizer_config.json: transformers 4, which made these, cleaned up spaces */
static void test_swift_table_falcon(void **s) { (void)s, swift_table(ORT "falcon-tokenizer", "tiiuae/falcon-7b", true); }

/* transformers.js tests: ids = encode(text) with specials, tokens = tokenize(text), decoded =
 * decode(ids). Cases with a text pair are left out (tuna encodes single sequences). */
static void tfjs_table(tuna_tokenizer *t, const char *model)
{
    char jp[4096];
    if (!tt_shared_path(jp, sizeof jp, "peers/extracted/tfjs_tokenization_tests.json")) skip();
    cJSON *doc = NULL;
    TT_OK(tuna_json_load(jp, 0, &doc));
    const cJSON *c;
    size_t total = 0, pass = 0, known = 0, skipped = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "models"), model))
    {
        const cJSON *text = cJSON_GetObjectItem(c, "text");
        int32_t *want;
        size_t nw;
        /* CONTROL_TOKENS holds U+0000, which cJSON strings cannot carry */
        if (!cJSON_IsString(text) || cJSON_GetObjectItem(c, "text_pair") || !strcmp(c->string, "CONTROL_TOKENS") ||
            !json_ids(cJSON_GetObjectItem(c, "ids"), &want, &nw)) {
            skipped++;
            continue;
        }
        const char *in = text->valuestring;
        if (known_nbsp_case(model, in)) {
            int32_t *ids;
            size_t n;
            TT_OK(tuna_tokenizer_encode(t, in, strlen(in), true, true, &ids, &n));
            assert_false(same_ids(ids, n, want, nw));
            free(want);
            free(ids);
            known++;
            continue;
        }
        bool ok = check_encode(t, model, total, in, strlen(in), true, want, nw);
        const cJSON *tokens = cJSON_GetObjectItem(c, "tokens");
        if (cJSON_IsArray(tokens)) {
            /* tokenize() shows an unknown piece as its text, tuna's token_str as the unk token */
            int32_t unk = tuna_tokenizer_special_id(t, "unk_token");
            int32_t *ids = NULL;
            size_t n = 0;
            TT_OK(tuna_tokenizer_encode(t, in, strlen(in), false, true, &ids, &n));
            bool same = (size_t)cJSON_GetArraySize(tokens) == n;
            for (size_t i = 0; same && i < n; i++)
                same = ids[i] == unk ||
                       !strcmp(tuna_tokenizer_token_str(t, ids[i]), cJSON_GetArrayItem(tokens, (int)i)->valuestring);
            if (!same) fprintf(stderr, "  %s %s: token strings differ\n", model, c->string);
            ok = ok && same;
            free(ids);
        }
        const cJSON *dec = cJSON_GetObjectItem(c, "decoded");
        if (cJSON_IsString(dec)) ok = check_decode(t, model, c->string, want, nw, false, dec->valuestring) && ok;
        free(want);
        pass += ok;
        total++;
    }
    printf("transformers.js %s: %zu/%zu (+%zu known SentencePiece-normalizer cases, %zu not runnable)\n", model, pass,
           total, known, skipped);
    cJSON_Delete(doc);
    assert_true(total > 0);
    assert_int_equal(pass, total);
}

static void test_tfjs_llama2(void **s)
{
    (void)s;
    tuna_tokenizer *t = load_rel(ORT "llama2");
    if (!t) skip();
    tfjs_table(t, "Xenova/llama-tokenizer");
    tuna_tokenizer_free(t);
}

static void test_tfjs_falcon(void **s)
{
    (void)s;
    tuna_tokenizer *t = load_rel(ORT "falcon-tokenizer");
    if (!t) skip();
    tuna_tokenizer_set_clean_up_spaces(t, true); /* no tokenizer_config.json: transformers 4 default */
    tfjs_table(t, "tiiuae/falcon-7b");
    tuna_tokenizer_free(t);
}

static void test_tfjs_qwen(void **s)
{
    (void)s;
    char v[4096], m[4096];
    if (!tt_shared_path(v, sizeof v, QWEN "vocab.json") || !tt_shared_path(m, sizeof m, QWEN "merges.txt")) skip();
    if (!g_qwen2) TT_OK(tuna_tokenizer_load_vocab_merges(v, m, QWEN2_RE, true, false, &g_qwen2));
    tfjs_table(g_qwen2, "Xenova/Qwen1.5-0.5B-Chat");
}

static void test_tfjs_t5(void **s)
{
    (void)s;
    tuna_tokenizer *t = load_rel(ORT "tokenizer/t5-small");
    if (!t) skip();
    tfjs_table(t, "google-t5/t5-small");
    tfjs_table(t, "Xenova/t5-small");
    tuna_tokenizer_free(t);
}

static void test_swift_t5(void **s)
{
    (void)s;
    swift_case(ORT "tokenizer/t5-small", SWIFT "t5_base_encoded.json");
    swift_table(ORT "tokenizer/t5-small", "t5-base", false);
}

/* onnxruntime-extensions' expected ids (from HF AutoTokenizer, add_special_tokens as given). */
static void ortx_cases(const char *tok_rel, const char *dir_name)
{
    char jp[4096];
    if (!tt_shared_path(jp, sizeof jp, "peers/extracted/ortx_tokenizer_expected_ids.json")) skip();
    tuna_tokenizer *t = load_rel(tok_rel);
    if (!t) skip();
    cJSON *doc = NULL;
    TT_OK(tuna_json_load(jp, 0, &doc));
    const cJSON *c;
    size_t total = 0, pass = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(doc, "cases"))
    {
        const char *dir = cJSON_GetObjectItem(c, "tokenizer_dir")->valuestring;
        if (strcmp(dir, dir_name) != 0) continue;
        const char *in = cJSON_GetObjectItem(c, "input")->valuestring;
        int32_t *want;
        size_t nw;
        assert_true(json_ids(cJSON_GetObjectItem(c, "expected_ids"), &want, &nw));
        pass += check_encode(t, dir_name, total, in, strlen(in), cJSON_IsTrue(cJSON_GetObjectItem(c, "add_special_tokens")),
                             want, nw);
        free(want);
        total++;
    }
    printf("ortx %s: %zu/%zu\n", dir_name, pass, total);
    cJSON_Delete(doc);
    tuna_tokenizer_free(t);
    assert_true(total > 0);
    assert_int_equal(pass, total);
}

static void test_ortx_phi3(void **s) { (void)s, ortx_cases(ORT "phi-3", "onnxruntime-extensions/test/data/phi-3"); }
/* ort-extensions' T5 case was made with a t5-small tokenizer.json whose pre-tokenizer keeps the
 * space before "<extra_id_0>" as a "▁" piece (Metaspace alone); the stored file runs
 * WhitespaceSplit first, which drops it (and transformers.js' t5-small cases agree with the
 * stored file on double spaces). Checked as that one known difference: our ids equal the
 * expected ones without that "▁". */
static void test_ortx_t5(void **s)
{
    (void)s;
    char jp[4096];
    if (!tt_shared_path(jp, sizeof jp, "peers/extracted/ortx_tokenizer_expected_ids.json")) skip();
    tuna_tokenizer *t = load_rel(ORT "tokenizer/t5-small");
    if (!t) skip();
    cJSON *doc = NULL;
    TT_OK(tuna_json_load(jp, 0, &doc));
    const cJSON *c;
    size_t total = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(doc, "cases"))
    {
        if (strcmp(cJSON_GetObjectItem(c, "tokenizer_dir")->valuestring, "onnxruntime-extensions/test/data/tokenizer/t5-small"))
            continue;
        const char *in = cJSON_GetObjectItem(c, "input")->valuestring;
        int32_t *want;
        size_t nw;
        assert_true(json_ids(cJSON_GetObjectItem(c, "expected_ids"), &want, &nw));
        assert_true(nw > 3 && want[1] == tuna_tokenizer_token_id(t, "\xE2\x96\x81") &&
                    want[2] == tuna_tokenizer_token_id(t, "<extra_id_0>"));
        memmove(want + 1, want + 2, (nw - 2) * sizeof *want);
        assert_true(check_encode(t, "ortx t5-small (less the known space piece)", total, in, strlen(in), true, want, nw - 1));
        free(want);
        total++;
    }
    printf("ortx t5-small: %zu/%zu with the one known pre-tokenizer difference\n", total, total);
    cJSON_Delete(doc);
    tuna_tokenizer_free(t);
    assert_int_equal(total, 1);
}

/* Llama 3 as its tokenizer.json lays it out, rebuilt from the GPT-2-format vocab + merges that
 * ollama keeps (the tokenizer.json itself is over 4 MiB and not stored): ignore_merges BPE, the
 * Llama 3 split regex + ByteLevel, the special tokens Meta documents (ids from the
 * llama-models reference), BOS by TemplateProcessing when bos is true. */
static tuna_tokenizer *build_llama3_uncached(bool bos);
static tuna_tokenizer *g_llama3[2]; /* built once: the 128k vocabulary takes a while under ASan */
static tuna_tokenizer *build_llama3(bool bos)
{
    if (!g_llama3[bos]) g_llama3[bos] = build_llama3_uncached(bos);
    return g_llama3[bos];
}

static tuna_tokenizer *build_llama3_uncached(bool bos)
{
    char vp[4096], mp[4096];
    if (!tt_shared_path(vp, sizeof vp, "peers/ollama/tokenizer/testdata/llama3.2/encoder.json") ||
        !tt_shared_path(mp, sizeof mp, "peers/ollama/tokenizer/testdata/llama3.2/vocab.bpe"))
        return NULL;
    cJSON *vocab = NULL;
    TT_OK(tuna_json_load(vp, 0, &vocab));
    char *merges;
    size_t ml;
    TT_OK(tuna_read_file(mp, 0, &merges, &ml));
    cJSON *doc = cJSON_CreateObject(), *model = cJSON_AddObjectToObject(doc, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddBoolToObject(model, "ignore_merges", true);
    cJSON_AddItemToObject(model, "vocab", vocab);
    cJSON *marr = cJSON_AddArrayToObject(model, "merges");
    for (char *line = strtok(merges, "\n"); line; line = strtok(NULL, "\n"))
        if (strncmp(line, "#version", 8) != 0 && *line) cJSON_AddItemToArray(marr, cJSON_CreateString(line));
    free(merges);
    cJSON *pre = cJSON_AddObjectToObject(doc, "pre_tokenizer"), *pl;
    cJSON_AddStringToObject(pre, "type", "Sequence");
    pl = cJSON_AddArrayToObject(pre, "pretokenizers");
    cJSON *split = cJSON_CreateObject(), *bl = cJSON_CreateObject();
    cJSON_AddStringToObject(split, "type", "Split");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(split, "pattern"), "Regex", LLAMA3_RE);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddBoolToObject(split, "invert", false);
    cJSON_AddStringToObject(bl, "type", "ByteLevel");
    cJSON_AddBoolToObject(bl, "add_prefix_space", false);
    cJSON_AddBoolToObject(bl, "use_regex", false);
    cJSON_AddItemToArray(pl, split);
    cJSON_AddItemToArray(pl, bl);
    cJSON_AddStringToObject(cJSON_AddObjectToObject(doc, "decoder"), "type", "ByteLevel");
    static const struct { int id; const char *s; } sp[] = {{128000, "<|begin_of_text|>"}, {128001, "<|end_of_text|>"},
                                                           {128006, "<|start_header_id|>"}, {128007, "<|end_header_id|>"},
                                                           {128009, "<|eot_id|>"}};
    cJSON *added = cJSON_AddArrayToObject(doc, "added_tokens");
    for (size_t i = 0; i < sizeof sp / sizeof sp[0]; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddNumberToObject(a, "id", sp[i].id);
        cJSON_AddStringToObject(a, "content", sp[i].s);
        cJSON_AddBoolToObject(a, "normalized", false);
        cJSON_AddBoolToObject(a, "special", true);
        cJSON_AddItemToArray(added, a);
    }
    if (bos) {
        char tmpl[] = "{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<|begin_of_text|>\",\"type_id\":0}},"
                      "{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],\"special_tokens\":{\"<|begin_of_text|>\":{\"id\":"
                      "\"<|begin_of_text|>\",\"ids\":[128000],\"tokens\":[\"<|begin_of_text|>\"]}}}";
        cJSON_AddItemToObject(doc, "post_processor", cJSON_Parse(tmpl));
    }
    char *txt = cJSON_PrintUnformatted(doc);
    cJSON_Delete(doc);
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load_json(txt, strlen(txt), NULL, 0, &t));
    free(txt);
    return t;
}

static void test_llama3_full(void **s)
{
    (void)s;
    char jp[4096];
    tuna_tokenizer *t = build_llama3(false);
    if (!t) skip();
    /* Meta-Llama-3's tokenizer_config.json sets clean_up_tokenization_spaces: true */
    tuna_tokenizer_set_clean_up_spaces(t, true);
    tfjs_table(t, "Xenova/llama3-tokenizer");
    t = build_llama3(true);
    tuna_tokenizer_set_clean_up_spaces(t, true);
    tfjs_table(t, "Xenova/llama3-tokenizer-new");
    tuna_tokenizer_set_clean_up_spaces(t, false);
    /* llama-models' own tests (tiktoken reference) */
    if (tt_shared_path(jp, sizeof jp, "peers/extracted/llama_models_llama3_tokenizer_expected.json")) {
        cJSON *doc = NULL;
        TT_OK(tuna_json_load(jp, 0, &doc));
        const cJSON *cs = cJSON_GetObjectItem(doc, "cases");
        int32_t *want, *ids;
        size_t nw, n;
        const char *txt = "This is a test sentence.";
        assert_true(json_ids(cJSON_GetObjectItem(cJSON_GetArrayItem(cs, 0), "expected"), &want, &nw));
        TT_OK(tuna_tokenizer_encode(t, txt, strlen(txt), true, true, &ids, &n)); /* BOS ... then EOS by hand */
        ids = realloc(ids, (n + 1) * sizeof *ids);
        ids[n++] = tuna_tokenizer_token_id(t, "<|end_of_text|>");
        if (!same_ids(ids, n, want, nw)) {
            print_ids("want", want, nw);
            print_ids("got ", ids, n);
            fail();
        }
        char *dec = NULL;
        TT_OK(tuna_tokenizer_decode(t, want, nw, false, &dec));
        assert_string_equal(dec, cJSON_GetObjectItem(cJSON_GetArrayItem(cs, 1), "expected")->valuestring);
        free(dec);
        free(ids);
        free(want);
        const char *msg = "<|start_header_id|>user<|end_header_id|>\n\nThis is a test sentence.<|eot_id|>";
        assert_true(json_ids(cJSON_GetObjectItem(cJSON_GetArrayItem(cs, 2), "expected"), &want, &nw));
        assert_true(check_encode(t, "llama-models", 2, msg, strlen(msg), false, want, nw));
        free(want);
        const char *dlg = "<|start_header_id|>system<|end_header_id|>\n\nThis is a test sentence.<|eot_id|>"
                          "<|start_header_id|>user<|end_header_id|>\n\nThis is a response.<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n";
        assert_true(json_ids(cJSON_GetObjectItem(cJSON_GetArrayItem(cs, 3), "expected"), &want, &nw));
        assert_true(check_encode(t, "llama-models", 3, dlg, strlen(dlg), true, want, nw));
        free(want);
        printf("llama-models llama3: 4/4\n");
        cJSON_Delete(doc);
    }
}

static void test_swift_llama32(void **s)
{
    (void)s;
    char jp[4096];
    if (!tt_shared_path(jp, sizeof jp, "peers/swift-transformers/Tests/TokenizersTests/Resources/llama_3.2_encoded.json")) skip();
    tuna_tokenizer *t = build_llama3(true);
    if (!t) skip();
    cJSON *doc = NULL;
    TT_OK(tuna_json_load(jp, 0, &doc));
    const char *text = cJSON_GetObjectItem(doc, "text")->valuestring;
    int32_t *want;
    size_t nw;
    assert_true(json_ids(cJSON_GetObjectItem(doc, "token_ids"), &want, &nw));
    bool ok = check_encode(t, "swift llama-3.2", 0, text, strlen(text), true, want, nw);
    char *dec = NULL;
    TT_OK(tuna_tokenizer_decode(t, want, nw, false, &dec));
    ok = ok && !strcmp(dec, cJSON_GetObjectItem(doc, "decoded_text")->valuestring);
    free(dec);
    free(want);
    cJSON_Delete(doc);
    printf("swift llama_3.2_encoded.json: %d/1\n", ok);
    assert_true(ok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_spm),
        cmocka_unit_test(test_tinyllama),
        cmocka_unit_test(test_phi3),
        cmocka_unit_test(test_phi2),
        cmocka_unit_test(test_falcon),
        cmocka_unit_test(test_roberta),
        cmocka_unit_test(test_llama3),
        cmocka_unit_test(test_qwen2),
        cmocka_unit_test(test_deepseek_r1_qwen),
        cmocka_unit_test(test_swift_llama2),
        cmocka_unit_test(test_swift_falcon),
        cmocka_unit_test(test_swift_table_llama2),
        cmocka_unit_test(test_swift_table_falcon),
        cmocka_unit_test(test_tfjs_llama2),
        cmocka_unit_test(test_tfjs_falcon),
        cmocka_unit_test(test_tfjs_qwen),
        cmocka_unit_test(test_ortx_phi3),
        cmocka_unit_test(test_ortx_t5),
        cmocka_unit_test(test_bert_wordpiece),
        cmocka_unit_test(test_llama3_full),
        cmocka_unit_test(test_swift_llama32),
        cmocka_unit_test(test_tfjs_t5),
        cmocka_unit_test(test_swift_t5),
        cmocka_unit_test(test_sentencepiece_llama2),
        cmocka_unit_test(test_sentencepiece_mistral),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    tuna_tokenizer_free(g_qwen2);
    tuna_tokenizer_free(g_llama3[0]);
    tuna_tokenizer_free(g_llama3[1]);
    return r;
}
