/* test_tokenizer.c — tokenizer encode/decode against reference outputs:
 * - fixtures/tokenizers/{bpe-1k,bpe-4k,spm-1k}/cases.json (made by HF tokenizers 0.23),
 * - the fixture model folders' tokenizers (load, encode, round trip),
 * - llama.cpp's .inp/.out vectors (ids from HF AutoTokenizer) run against real tokenizer.json
 *   files (Llama 2 / TinyLlama, Phi-3, Phi-2, Falcon, RoBERTa) and vocab+merges files (Llama 3,
 *   Qwen2, DeepSeek-R1-Qwen),
 * - swift-transformers' encoded paragraphs (Llama 2, Falcon),
 * - streaming decode and bad input. */
#include <stdbool.h>

#include "core/file.h"
#include "core/json.h"
#include "io/safetensors.h"
#include "testutil.h"
#include "tokenizer/tokenizer.h"

static const char LLAMA3_RE[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char QWEN2_RE[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                               "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static void print_ids(const char *what, const int32_t *ids, size_t n)
{
    fprintf(stderr, "    %s:", what);
    for (size_t i = 0; i < n && i < 64; i++) fprintf(stderr, " %d", ids[i]);
    if (n > 64) fprintf(stderr, " ... (%zu)", n);
    fprintf(stderr, "\n");
}

static bool json_ids(const cJSON *arr, int32_t **ids, size_t *n)
{
    *n = 0;
    *ids = NULL;
    if (!cJSON_IsArray(arr)) return false;
    size_t k = (size_t)cJSON_GetArraySize(arr);
    *ids = malloc((k ? k : 1) * sizeof **ids);
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)(*ids)[(*n)++] = (int32_t)e->valuedouble;
    return true;
}

static bool same_ids(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

/* Encodes text and compares; prints a mismatch. Returns true on a match. */
static bool check_encode(const tuna_tokenizer *t, const char *set, size_t idx, const char *text, size_t len, bool add_special,
                         const int32_t *want, size_t nwant)
{
    int32_t *ids = NULL;
    size_t n = 0;
    tuna_status st = tuna_tokenizer_encode(t, text, len, add_special, true, &ids, &n);
    bool ok = st == TUNA_OK && same_ids(ids, n, want, nwant);
    if (!ok) {
        fprintf(stderr, "  %s case %zu (%s) mismatch: text \"%.*s\"%s\n", set, idx, add_special ? "with specials" : "plain",
                (int)(len > 80 ? 80 : len), text, len > 80 ? "..." : "");
        if (st) fprintf(stderr, "    error: %s\n", tuna_last_error());
        print_ids("want", want, nwant);
        print_ids("got ", ids, n);
    }
    free(ids);
    return ok;
}

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

static tuna_tokenizer *load_rel(const char *rel)
{
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, rel)) return NULL;
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load(dir, &t));
    return t;
}

static bool check_decode(const tuna_tokenizer *t, const char *set, const char *name, const int32_t *ids, size_t n, bool skip,
                         const char *want)
{
    char *dec = NULL;
    tuna_status st = tuna_tokenizer_decode(t, ids, n, skip, &dec);
    bool ok = st == TUNA_OK && strcmp(dec, want) == 0;
    if (!ok)
        fprintf(stderr, "  %s %s decode(skip_special=%d) mismatch:\n    want \"%s\"\n    got  \"%s\"\n", set, name, skip, want,
                dec ? dec : tuna_last_error());
    free(dec);
    return ok;
}

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
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixture_bpe_1k), cmocka_unit_test(test_fixture_bpe_4k), cmocka_unit_test(test_fixture_spm_1k),
        cmocka_unit_test(test_fixture_specials), cmocka_unit_test(test_fixture_models), cmocka_unit_test(test_llama_spm),
        cmocka_unit_test(test_tinyllama), cmocka_unit_test(test_phi3), cmocka_unit_test(test_phi2),
        cmocka_unit_test(test_falcon), cmocka_unit_test(test_roberta), cmocka_unit_test(test_llama3),
        cmocka_unit_test(test_qwen2), cmocka_unit_test(test_deepseek_r1_qwen), cmocka_unit_test(test_swift_llama2),
        cmocka_unit_test(test_swift_falcon), cmocka_unit_test(test_swift_table_llama2),
        cmocka_unit_test(test_swift_table_falcon), cmocka_unit_test(test_tfjs_llama2), cmocka_unit_test(test_tfjs_falcon),
        cmocka_unit_test(test_tfjs_qwen), cmocka_unit_test(test_ortx_phi3), cmocka_unit_test(test_ortx_t5), cmocka_unit_test(test_bert_wordpiece),
        cmocka_unit_test(test_llama3_full), cmocka_unit_test(test_swift_llama32),
        cmocka_unit_test(test_tfjs_t5), cmocka_unit_test(test_swift_t5), cmocka_unit_test(test_stream),
        cmocka_unit_test(test_round_trip_random), cmocka_unit_test(test_damaged_files), cmocka_unit_test(test_bad_input),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    tuna_tokenizer_free(g_qwen2);
    tuna_tokenizer_free(g_llama3[0]);
    tuna_tokenizer_free(g_llama3[1]);
    return r;
}
