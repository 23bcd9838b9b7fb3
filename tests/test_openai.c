/* test_openai.c — OpenAI request parsing and validation (every error case answers the right
 * status and names the field), prompt forms, defaults, chat prompts against the fixture
 * tokenizer's reference ids, and the response / stream / error JSON shapes. */
#include "testutil.h"

#include <math.h>

#include <cjson/cJSON.h>

#include "core/json.h"
#include "serve/openai.h"

static tuna_tokenizer *g_tok;
static struct tuna_chat_template *g_chat;
static struct tuna_openai_ctx g_ctx;
static const int64_t g_eos[1] = {4095};
static const char *g_adapters[1] = {"sql"};

static int setup(void **state)
{
    (void)state;
    if (tuna_tokenizer_load(TUNA_SOURCE_DIR "/models/pymini", &g_tok)) {
        fprintf(stderr, "%s\n", tuna_last_error());
        return -1;
    }
    if (tuna_chat_load(TUNA_SOURCE_DIR "/models/pymini", &g_chat)) return -1;
    memset(&g_ctx, 0, sizeof g_ctx);
    g_ctx.tok = g_tok;
    g_ctx.chat = g_chat;
    g_ctx.model_name = "pymini";
    g_ctx.model_root = "models/pymini";
    g_ctx.adapters = g_adapters;
    g_ctx.n_adapters = 1;
    g_ctx.max_model_len = 64;
    g_ctx.vocab_size = 4096;
    tuna_sampling_default(&g_ctx.defaults);
    g_ctx.eos_ids = g_eos;
    g_ctx.n_eos = 1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    tuna_chat_free(g_chat);
    tuna_tokenizer_free(g_tok);
    return 0;
}

/* Expects the body to be refused with http status and a message containing needle (and param). */
static void refuse(enum tuna_serve_kind kind, const char *body, int http, const char *param, const char *needle)
{
    struct tuna_serve_params p;
    struct tuna_openai_error err;
    tuna_status st = tuna_openai_parse(&g_ctx, kind, body, strlen(body), &p, &err);
    if (st == TUNA_OK || err.http != http || (param && strcmp(err.param, param)) || !strstr(err.message, needle)) {
        fprintf(stderr, "body %s: status %d http %d param '%s' message '%s'; wanted http %d param '%s' '%s'\n",
                body, st, st ? err.http : 200, st ? err.param : "", st ? err.message : "", http, param ? param : "",
                needle);
        if (!st) tuna_serve_params_free(&p);
        fail();
    }
    assert_null(p.prompt);
}

static void accept_(enum tuna_serve_kind kind, const char *body, struct tuna_serve_params *p)
{
    struct tuna_openai_error err;
    if (tuna_openai_parse(&g_ctx, kind, body, strlen(body), p, &err)) {
        fprintf(stderr, "body %s refused: %d %s\n", body, err.http, err.message);
        fail();
    }
}

static void test_errors(void **state)
{
    (void)state;
    const enum tuna_serve_kind C = TUNA_SERVE_COMPLETION, H = TUNA_SERVE_CHAT;
    refuse(C, "{\"prompt\": \"a\"", 400, NULL, "not valid JSON");
    refuse(C, "", 400, NULL, "not valid JSON");
    refuse(C, "[1, 2]", 400, NULL, "must be a JSON object");
    refuse(C, "{}", 400, "prompt", "'prompt' is required");
    refuse(H, "{\"model\": \"pymini\"}", 400, "messages", "'messages' is required");
    refuse(H, "{\"messages\": []}", 400, "messages", "non-empty array");
    refuse(H, "{\"messages\": [{\"content\": \"x\"}]}", 400, "messages", "messages[0] needs a string 'role'");
    refuse(H, "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", 400, "messages", "string or a list");
    refuse(H, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {}}]}]}", 400,
           "messages", "no images");
    refuse(H, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"tools\": {}}", 400, "tools", "must be a list");
    refuse(H, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"documents\": 1}", 400, "documents",
           "must be a list");
    refuse(H, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"chat_template_kwargs\": []}", 400,
           "chat_template_kwargs", "must be an object");
    refuse(H, "{\"messages\": [{\"role\": \"assistant\", \"content\": \"hi\"}], \"continue_final_message\": true, "
           "\"add_generation_prompt\": true}", 400, "continue_final_message", "cannot both be true");
    refuse(H, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\\u0000b\"}]}", 400, "messages", "U+0000");
    refuse(C, "{\"prompt\": \"a\", \"model\": \"gpt-4\"}", 404, "model", "The model `gpt-4` does not exist");
    refuse(C, "{\"prompt\": \"a\", \"model\": 3}", 400, "model", "must be a string");
    refuse(C, "{\"prompt\": \"a\", \"temperature\": \"hot\"}", 400, "temperature", "must be a number");
    refuse(C, "{\"prompt\": \"a\", \"temperature\": -1}", 400, "temperature", "must be >= 0");
    refuse(C, "{\"prompt\": \"a\", \"top_p\": 0}", 400, "top_p", "(0, 1]");
    refuse(C, "{\"prompt\": \"a\", \"presence_penalty\": 3}", 400, "presence_penalty", "[-2, 2]");
    refuse(C, "{\"prompt\": \"a\", \"max_tokens\": 2.5}", 400, "max_tokens", "must be an integer");
    refuse(C, "{\"prompt\": \"a\", \"max_tokens\": 0}", 400, "max_tokens", "between 1 and");
    refuse(C, "{\"prompt\": \"a\", \"max_tokens\": 63}", 400, "prompt", "maximum context length is 64 tokens");
    refuse(H, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_completion_tokens\": 64}", 400,
           "messages", "maximum context length is 64 tokens");
    refuse(C, "{\"prompt\": \"a\", \"n\": 0}", 400, "n", "between 1 and 16");
    refuse(C, "{\"prompt\": \"a\", \"n\": 17}", 400, "n", "between 1 and 16");
    refuse(C, "{\"prompt\": \"a\", \"stream\": \"yes\"}", 400, "stream", "true or false");
    refuse(C, "{\"prompt\": \"a\", \"stream_options\": {\"include_usage\": true}}", 400, "stream_options",
           "only be defined when `stream=True`");
    refuse(C, "{\"prompt\": \"a\", \"stop\": [1]}", 400, "stop", "list of strings");
    refuse(C, "{\"prompt\": \"a\", \"stop_token_ids\": [5000]}", 400, "stop_token_ids", "[0, 4096)");
    refuse(C, "{\"prompt\": [1, 2, 99999]}", 400, "prompt", "item 2 must be a token id");
    refuse(C, "{\"prompt\": [\"a\", \"b\"]}", 400, "prompt", "one prompt per request");
    refuse(C, "{\"prompt\": 7}", 400, "prompt", "non-empty string");
    refuse(C, "{\"prompt\": \"a\", \"logprobs\": 21}", 400, "logprobs", "between 0 and 20");
    refuse(H, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_logprobs\": 2}", 400, "top_logprobs",
           "needs 'logprobs': true");
    /* a prompt that fills the context */
    char big[2048];
    strcpy(big, "{\"prompt\": \"");
    for (int i = 0; i < 100; i++) strcat(big, "hello world ");
    strcat(big, "\"}");
    refuse(C, big, 400, "prompt", "maximum context length");
}

static void test_prompts_and_defaults(void **state)
{
    (void)state;
    struct tuna_serve_params p;
    int32_t *ids;
    size_t n;
    TT_OK(tuna_tokenizer_encode(g_tok, "def f(x):", 9, true, true, &ids, &n));
    accept_(TUNA_SERVE_COMPLETION, "{\"prompt\": \"def f(x):\"}", &p);
    assert_int_equal(p.n_prompt, (int64_t)n);
    assert_memory_equal(p.prompt, ids, n * sizeof *ids);
    assert_int_equal(p.max_tokens, 64 - (int64_t)n); /* the rest of the context */
    assert_int_equal(p.n, 1);
    assert_int_equal(p.adapter, -1);
    assert_string_equal(p.model, "pymini");
    assert_int_equal(p.n_stop_ids, 1); /* EOS */
    assert_int_equal(p.stop_ids[0], 4095);
    assert_true(p.skip_special);
    assert_false(p.stream);
    tuna_serve_params_free(&p);
    accept_(TUNA_SERVE_COMPLETION, "{\"prompt\": [\"def f(x):\"], \"model\": \"sql\", \"ignore_eos\": true, "
            "\"stop\": \"\\n\", \"stop_token_ids\": [7, 8], \"seed\": 42, \"temperature\": 0.7, \"top_k\": 5, "
            "\"top_p\": 0.9, \"min_p\": 0.1, \"repetition_penalty\": 1.1, \"presence_penalty\": 0.5, "
            "\"frequency_penalty\": -0.5, \"max_tokens\": 7, \"min_tokens\": 2, \"n\": 3, \"logprobs\": 2, "
            "\"stream\": true, \"stream_options\": {\"include_usage\": true}}", &p);
    assert_memory_equal(p.prompt, ids, n * sizeof *ids);
    assert_int_equal(p.adapter, 0);
    assert_int_equal(p.n_stop_ids, 2);
    assert_int_equal(p.n_stop, 1);
    assert_string_equal(p.stop[0], "\n");
    assert_true(p.sampling.has_seed);
    assert_int_equal(p.sampling.seed, 42);
    assert_true(p.sampling.temperature > 0.69f && p.sampling.temperature < 0.71f);
    assert_int_equal(p.sampling.top_k, 5);
    assert_int_equal(p.max_tokens, 7);
    assert_int_equal(p.min_tokens, 2);
    assert_int_equal(p.n, 3);
    assert_true(p.logprobs);
    assert_int_equal(p.top_logprobs, 2);
    assert_true(p.stream && p.include_usage);
    tuna_serve_params_free(&p);
    accept_(TUNA_SERVE_COMPLETION, "{\"prompt\": [[5, 6, 7]], \"stop\": [\"a\", \"bc\"]}", &p);
    assert_int_equal(p.n_prompt, 3);
    assert_int_equal(p.prompt[2], 7);
    assert_int_equal(p.n_stop, 2);
    tuna_serve_params_free(&p);
    accept_(TUNA_SERVE_COMPLETION, "{\"prompt\": [5, 6], \"max_tokens\": 62}", &p); /* exactly fills the context */
    assert_int_equal(p.max_tokens, 62);
    tuna_serve_params_free(&p);
    free(ids);
    /* chat: the template's text tokenized without adding specials; list content joined */
    accept_(TUNA_SERVE_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"hi\"}]}], "
            "\"max_completion_tokens\": 3, \"logprobs\": true, \"top_logprobs\": 4}", &p);
    struct tuna_serve_params q;
    accept_(TUNA_SERVE_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 3}", &q);
    assert_int_equal(p.n_prompt, q.n_prompt);
    assert_memory_equal(p.prompt, q.prompt, (size_t)p.n_prompt * sizeof *p.prompt);
    assert_int_equal(p.max_tokens, 3);
    assert_true(p.logprobs);
    assert_int_equal(p.top_logprobs, 4);
    tuna_serve_params_free(&p);
    tuna_serve_params_free(&q);
}

/* The chat prompt ids equal transformers' apply_chat_template(tokenize=True) on the fixture. */
static void test_chat_matches_fixture(void **state)
{
    (void)state;
    char dir[4096], path[4200];
    if (!tt_shared_path(dir, sizeof dir, "fixtures/tokenizers/bpe-1k")) skip();
    tuna_tokenizer *tok;
    TT_OK(tuna_tokenizer_load(dir, &tok));
    struct tuna_chat_template *ct;
    TT_OK(tuna_chat_load(dir, &ct));
    struct tuna_openai_ctx c = g_ctx;
    c.tok = tok;
    c.chat = ct;
    c.max_model_len = 4096;
    c.vocab_size = tuna_tokenizer_vocab_size(tok);
    snprintf(path, sizeof path, "%s/cases.json", dir);
    cJSON *doc;
    TT_OK(tuna_json_load(path, 0, &doc));
    const cJSON *chat = cJSON_GetObjectItem(doc, "chat"), *cs;
    int checked = 0;
    cJSON_ArrayForEach(cs, chat)
    {
        cJSON *body = cJSON_CreateObject();
        cJSON_AddItemToObject(body, "messages", cJSON_Duplicate(cJSON_GetObjectItem(cs, "messages"), true));
        cJSON_AddItemToObject(body, "add_generation_prompt",
                              cJSON_Duplicate(cJSON_GetObjectItem(cs, "add_generation_prompt"), true));
        cJSON_AddNumberToObject(body, "max_tokens", 1);
        char *text = cJSON_PrintUnformatted(body);
        struct tuna_serve_params p;
        struct tuna_openai_error err;
        if (tuna_openai_parse(&c, TUNA_SERVE_CHAT, text, strlen(text), &p, &err)) {
            fprintf(stderr, "chat case %d refused: %s\n", checked, err.message);
            fail();
        }
        const cJSON *ids = cJSON_GetObjectItem(cs, "ids");
        assert_int_equal(p.n_prompt, cJSON_GetArraySize(ids));
        for (int i = 0; i < p.n_prompt; i++) assert_int_equal(p.prompt[i], cJSON_GetArrayItem(ids, i)->valueint);
        tuna_serve_params_free(&p);
        free(text);
        cJSON_Delete(body);
        checked++;
    }
    assert_true(checked >= 1);
    cJSON_Delete(doc);
    tuna_chat_free(ct);
    tuna_tokenizer_free(tok);
}

static cJSON *parse_json(const char *s)
{
    assert_non_null(s);
    cJSON *j = cJSON_Parse(s);
    assert_non_null(j);
    return j;
}

static void test_responses(void **state)
{
    (void)state;
    struct tuna_serve_params p;
    accept_(TUNA_SERVE_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"n\": 2, \"max_tokens\": 4, "
            "\"logprobs\": true, \"top_logprobs\": 2}", &p);
    int64_t n_prompt = p.n_prompt;
    struct tuna_serve_req *r;
    TT_OK(tuna_serve_req_new(&p, &r));
    assert_non_null(strstr(r->id, "chatcmpl-"));
    /* what the engine would push */
    for (int c = 0; c < 2; c++) {
        struct tuna_serve_event *e = calloc(1, sizeof *e);
        e->choice = c;
        e->text = strdup(c ? "abc" : "x");
        e->len = strlen(e->text);
        e->lps = calloc(1, sizeof *e->lps);
        e->lps[0].id = 300;
        e->lps[0].logprob = -0.5f;
        e->lps[0].n_top = 2;
        e->lps[0].top_id[0] = 300;
        e->lps[0].top_lp[0] = -0.5f;
        e->lps[0].top_id[1] = 301;
        e->lps[0].top_lp[1] = -1.5f;
        e->n_lps = 1;
        e->finish = c ? "length" : "stop";
        tuna_serve_req_push(r, e);
        r->completion_tokens += 2;
    }
    struct tuna_openai_acc acc;
    tuna_openai_acc_init(&acc, 2);
    struct tuna_serve_event *e;
    while ((e = tuna_serve_req_pop(r))) {
        if (e->choice == 1) { /* check the stream chunk on the way */
            char *chunk = tuna_openai_stream_chunk(&g_ctx, r, e, true);
            assert_true(!strncmp(chunk, "data: {", 7));
            assert_true(!strcmp(chunk + strlen(chunk) - 2, "\n\n"));
            cJSON *j = parse_json(chunk + 6);
            assert_string_equal(cJSON_GetObjectItem(j, "object")->valuestring, "chat.completion.chunk");
            cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
            assert_int_equal(cJSON_GetObjectItem(c0, "index")->valueint, 1);
            cJSON *d = cJSON_GetObjectItem(c0, "delta");
            assert_string_equal(cJSON_GetObjectItem(d, "role")->valuestring, "assistant");
            assert_string_equal(cJSON_GetObjectItem(d, "content")->valuestring, "abc");
            assert_string_equal(cJSON_GetObjectItem(c0, "finish_reason")->valuestring, "length");
            cJSON_Delete(j);
            free(chunk);
        }
        TT_OK(tuna_openai_acc_add(&acc, e));
        tuna_serve_event_free(e);
    }
    char *s = tuna_openai_response_json(&g_ctx, r, &acc);
    cJSON *j = parse_json(s);
    assert_string_equal(cJSON_GetObjectItem(j, "object")->valuestring, "chat.completion");
    assert_string_equal(cJSON_GetObjectItem(j, "model")->valuestring, "pymini");
    cJSON *ch = cJSON_GetObjectItem(j, "choices");
    assert_int_equal(cJSON_GetArraySize(ch), 2);
    cJSON *c1 = cJSON_GetArrayItem(ch, 1);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(c1, "message"), "content")->valuestring, "abc");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(ch, 0), "finish_reason")->valuestring, "stop");
    cJSON *lp = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetObjectItem(c1, "logprobs"), "content"), 0);
    assert_true(fabs(cJSON_GetObjectItem(lp, "logprob")->valuedouble + 0.5) < 1e-6);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(lp, "top_logprobs")), 2);
    cJSON *u = cJSON_GetObjectItem(j, "usage");
    assert_int_equal(cJSON_GetObjectItem(u, "prompt_tokens")->valueint, n_prompt);
    assert_int_equal(cJSON_GetObjectItem(u, "completion_tokens")->valueint, 4);
    assert_int_equal(cJSON_GetObjectItem(u, "total_tokens")->valueint, n_prompt + 4);
    cJSON_Delete(j);
    free(s);
    s = tuna_openai_usage_chunk(&g_ctx, r);
    j = parse_json(s + 6);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "choices")), 0);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "usage"), "completion_tokens")->valueint, 4);
    cJSON_Delete(j);
    free(s);
    tuna_openai_acc_free(&acc);
    tuna_serve_req_unref(r);

    struct tuna_openai_error err;
    tuna_openai_fail(&err, 404, "model", "The model `%s` does not exist.", "x");
    s = tuna_openai_error_json(&err);
    j = parse_json(s);
    cJSON *eo = cJSON_GetObjectItem(j, "error");
    assert_string_equal(cJSON_GetObjectItem(eo, "message")->valuestring, "The model `x` does not exist.");
    assert_string_equal(cJSON_GetObjectItem(eo, "type")->valuestring, "NotFoundError");
    assert_string_equal(cJSON_GetObjectItem(eo, "param")->valuestring, "model");
    assert_int_equal(cJSON_GetObjectItem(eo, "code")->valueint, 404);
    cJSON_Delete(j);
    free(s);

    s = tuna_openai_models_json(&g_ctx, 1);
    j = parse_json(s);
    cJSON *d = cJSON_GetObjectItem(j, "data");
    assert_int_equal(cJSON_GetArraySize(d), 2);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetArrayItem(d, 0), "parent")));
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(d, 1), "id")->valuestring, "sql");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(d, 1), "parent")->valuestring, "pymini");
    cJSON_Delete(j);
    free(s);
}

static void test_tokenize_detokenize(void **state)
{
    (void)state;
    struct tuna_openai_error err;
    const char *b = "{\"prompt\": \"def f(x):\"}";
    char *s = tuna_openai_tokenize(&g_ctx, b, strlen(b), &err);
    cJSON *j = parse_json(s);
    cJSON *t = cJSON_GetObjectItem(j, "tokens");
    assert_int_equal(cJSON_GetObjectItem(j, "count")->valueint, cJSON_GetArraySize(t));
    assert_int_equal(cJSON_GetArrayItem(t, 0)->valueint, 4091); /* BOS */
    cJSON *body = cJSON_CreateObject();
    cJSON_AddItemToObject(body, "tokens", cJSON_Duplicate(t, true));
    char *bt = cJSON_PrintUnformatted(body);
    char *d = tuna_openai_detokenize(&g_ctx, bt, strlen(bt), &err);
    cJSON *dj = parse_json(d);
    assert_non_null(strstr(cJSON_GetObjectItem(dj, "prompt")->valuestring, "def f(x):"));
    cJSON_Delete(dj);
    free(d);
    free(bt);
    cJSON_Delete(body);
    cJSON_Delete(j);
    free(s);
    b = "{\"tokens\": [1, -2]}";
    assert_null(tuna_openai_detokenize(&g_ctx, b, strlen(b), &err));
    assert_int_equal(err.http, 400);
    b = "{\"text\": 1}";
    assert_null(tuna_openai_tokenize(&g_ctx, b, strlen(b), &err));
    assert_string_equal(err.param, "prompt");
    b = "{";
    assert_null(tuna_openai_tokenize(&g_ctx, b, strlen(b), &err));
    assert_non_null(strstr(err.message, "not valid JSON"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_errors),          cmocka_unit_test(test_prompts_and_defaults),
        cmocka_unit_test(test_chat_matches_fixture), cmocka_unit_test(test_responses),
        cmocka_unit_test(test_tokenize_detokenize),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
