/* test_dataset.c — src/train/dataset.c and batching.c against the fixtures.
 *
 * The reference: tokenizers/bpe-1k/cases.json chat[] (rendered strings and ids made by
 * transformers' apply_chat_template; bpe-1k is the tokenizer of models/llama-tiny) and
 * train/llama-tiny-{lora,lora-responses,qlora} (data.jsonl, trace.json: batch order), built by make_fixtures.py's
 * encode_example: ids = encode(render(messages)), prompt part = encode(render(messages[:-1],
 * add_generation_prompt=True)) masked with -100 when responses_only.
 */
#include "testutil.h"

#include <cjson/cJSON.h>

#include "chat/chat.h"
#include "core/file.h"
#include "core/json.h"
#include "tokenizer/tokenizer.h"
#include "train/dataset.h"

static tuna_tokenizer *g_tok;
static struct tuna_chat_template *g_tmpl;
static cJSON *g_cases; /* bpe-1k cases.json */
static char g_fix[4096];

static int setup(void **state)
{
    (void)state;
    char buf[4400];
    if (!tt_shared_path(g_fix, sizeof g_fix, "fixtures")) return 0;
    snprintf(buf, sizeof buf, "%s/models/llama-tiny", g_fix);
    if (tuna_tokenizer_load(buf, &g_tok) || tuna_chat_load(buf, &g_tmpl)) {
        fprintf(stderr, "loading %s: %s\n", buf, tuna_last_error());
        return -1;
    }
    snprintf(buf, sizeof buf, "%s/tokenizers/bpe-1k/cases.json", g_fix);
    if (tuna_json_load(buf, 0, &g_cases)) {
        fprintf(stderr, "%s\n", tuna_last_error());
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    tuna_tokenizer_free(g_tok);
    tuna_chat_free(g_tmpl);
    cJSON_Delete(g_cases);
    return 0;
}

#define NEED_FIXTURES()                                                                                                \
    do {                                                                                                               \
        if (!g_tok) skip();                                                                                            \
    } while (0)

static struct tuna_dataset_opts opts(bool responses_only, int64_t max, bool packing)
{
    struct tuna_dataset_opts o;
    tuna_dataset_opts_default(&o);
    o.train_on_responses_only = responses_only;
    o.max_seq_length = max;
    o.packing = packing;
    return o;
}

static tuna_status load_str(const char *jsonl, const struct tuna_dataset_opts *o, tuna_dataset **d)
{
    return tuna_dataset_load_text(jsonl, strlen(jsonl), "mem.jsonl", g_tok, g_tmpl, o, d);
}

static void ids_from_json(const cJSON *arr, int32_t **ids, int64_t *n)
{
    *n = cJSON_GetArraySize(arr);
    *ids = malloc((size_t)(*n ? *n : 1) * sizeof **ids);
    assert_non_null(*ids);
    for (int64_t i = 0; i < *n; i++)
        (*ids)[i] = (int32_t)cJSON_GetArrayItem(arr, (int)i)->valueint;
}

static void assert_ids_eq(const int32_t *a, int64_t na, const int32_t *b, int64_t nb)
{
    if (na != nb) print_error("length %lld vs %lld\n", (long long)na, (long long)nb);
    assert_int_equal(na, nb);
    for (int64_t i = 0; i < na; i++) {
        if (a[i] != b[i]) print_error("differs at %lld: %d vs %d\n", (long long)i, a[i], b[i]);
        assert_int_equal(a[i], b[i]);
    }
}

/* One JSONL line {"messages": msgs}. */
static char *messages_line(const cJSON *msgs)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "messages", cJSON_Duplicate(msgs, 1));
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

/* Every chat case without the generation prompt: the dataset's ids are transformers' ids. */
static void test_cases_ids(void **state)
{
    (void)state;
    NEED_FIXTURES();
    int checked = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, tuna_json_member(g_cases, "chat"))
    {
        if (cJSON_IsTrue(tuna_json_member(c, "add_generation_prompt"))) continue;
        char *line = messages_line(tuna_json_member(c, "messages"));
        struct tuna_dataset_opts o = opts(false, 0, false);
        tuna_dataset *d = NULL;
        TT_OK(load_str(line, &o, &d));
        assert_int_equal(tuna_dataset_size(d), 1);
        const struct tuna_train_example *e = tuna_dataset_at(d, 0);
        int32_t *want;
        int64_t nw;
        ids_from_json(tuna_json_member(c, "ids"), &want, &nw);
        assert_ids_eq(e->ids, e->n, want, nw);
        assert_ids_eq(e->labels, e->n, want, nw); /* no masking: labels = ids */
        /* and the text is the reference's rendering */
        char *text = NULL;
        TT_OK(tuna_tokenizer_decode(g_tok, e->ids, (size_t)e->n, false, &text));
        assert_string_equal(text, tuna_json_member(c, "rendered")->valuestring);
        free(text);
        free(want);
        free(line);
        tuna_dataset_free(d);
        checked++;
    }
    assert_int_equal(checked, 3);
}

/* The same for every tokenizer fixture with its own template (byte-level BPE 1k/4k with a
 * Llama 3 style template, SentencePiece-style BPE with a Mistral [INST] template). */
static void test_cases_all_tokenizers(void **state)
{
    (void)state;
    NEED_FIXTURES();
    const char *names[] = {"bpe-1k", "bpe-4k", "spm-1k"};
    for (int k = 0; k < 3; k++) {
        char dir[4400], path[4500];
        snprintf(dir, sizeof dir, "%s/tokenizers/%s", g_fix, names[k]);
        snprintf(path, sizeof path, "%s/cases.json", dir);
        tuna_tokenizer *tok = NULL;
        struct tuna_chat_template *tmpl = NULL;
        cJSON *cases = NULL;
        TT_OK(tuna_tokenizer_load(dir, &tok));
        TT_OK(tuna_chat_load(dir, &tmpl));
        TT_OK(tuna_json_load(path, 0, &cases));
        int checked = 0;
        const cJSON *c;
        cJSON_ArrayForEach(c, tuna_json_member(cases, "chat"))
        {
            bool agp = cJSON_IsTrue(tuna_json_member(c, "add_generation_prompt"));
            const cJSON *msgs = tuna_json_member(c, "messages");
            const cJSON *last = cJSON_GetArrayItem(msgs, cJSON_GetArraySize(msgs) - 1);
            if (agp && !strcmp(tuna_json_member(last, "role")->valuestring, "user")) {
                /* the generation-prompt rendering is the masked prompt part of the conversation
                 * with an answer (no earlier assistant turn in these cases: checked by counting) */
                cJSON *full = cJSON_Duplicate(msgs, 1);
                cJSON *a = cJSON_CreateObject();
                cJSON_AddStringToObject(a, "role", "assistant");
                cJSON_AddStringToObject(a, "content", "Sure: 4.");
                cJSON_AddItemToArray(full, a);
                char *line = messages_line(full);
                struct tuna_dataset_opts o = opts(true, 0, false);
                tuna_dataset *d = NULL;
                TT_OK(tuna_dataset_load_text(line, strlen(line), names[k], tok, tmpl, &o, &d));
                const struct tuna_train_example *e = tuna_dataset_at(d, 0);
                int32_t *want;
                int64_t nw;
                ids_from_json(tuna_json_member(c, "ids"), &want, &nw);
                assert_true(e->n > nw);
                /* the prompt's tokens begin the conversation's, except that SentencePiece may
                 * merge the last one with the answer ("]" + "▁Sure"): counted, and the mask
                 * still covers the prompt's token count, as the reference computes it */
                assert_ids_eq(e->ids, nw - 1, want, nw - 1);
                bool merged = e->ids[nw - 1] != want[nw - 1];
                assert_int_equal(tuna_dataset_stats(d)->prefix_mismatches, merged ? 1 : 0);
                int64_t masked = 0;
                for (int64_t i = 0; i < e->n; i++)
                    masked += e->labels[i] == TUNA_LABEL_IGNORE;
                bool earlier = false;
                const cJSON *m;
                cJSON_ArrayForEach(m, msgs) earlier |= !strcmp(tuna_json_member(m, "role")->valuestring, "assistant");
                if (!earlier)
                    assert_int_equal(masked, nw);
                else
                    assert_true(masked < nw);
                free(want);
                free(line);
                cJSON_Delete(full);
                tuna_dataset_free(d);
                continue;
            }
            if (agp) continue;
            char *line = messages_line(msgs);
            struct tuna_dataset_opts o = opts(false, 0, false);
            tuna_dataset *d = NULL;
            TT_OK(tuna_dataset_load_text(line, strlen(line), names[k], tok, tmpl, &o, &d));
            const struct tuna_train_example *e = tuna_dataset_at(d, 0);
            int32_t *want;
            int64_t nw;
            ids_from_json(tuna_json_member(c, "ids"), &want, &nw);
            assert_ids_eq(e->ids, e->n, want, nw);
            free(want);
            free(line);
            tuna_dataset_free(d);
            checked++;
        }
        assert_int_equal(checked, 3);
        cJSON_Delete(cases);
        tuna_chat_free(tmpl);
        tuna_tokenizer_free(tok);
    }
}

/* The prompt part of [messages of a case, assistant "..."] is the case rendered with the
 * generation prompt: its ids are the reference's and they are exactly the masked ones. */
static void test_cases_prompt_mask(void **state)
{
    (void)state;
    NEED_FIXTURES();
    int checked = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, tuna_json_member(g_cases, "chat"))
    {
        if (!cJSON_IsTrue(tuna_json_member(c, "add_generation_prompt"))) continue;
        cJSON *msgs = cJSON_Duplicate(tuna_json_member(c, "messages"), 1);
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "role", "assistant");
        cJSON_AddStringToObject(a, "content", "Sure: 4.");
        cJSON_AddItemToArray(msgs, a);
        char *line = messages_line(msgs);
        struct tuna_dataset_opts o = opts(true, 0, false);
        tuna_dataset *d = NULL;
        TT_OK(load_str(line, &o, &d));
        const struct tuna_train_example *e = tuna_dataset_at(d, 0);
        int32_t *prompt;
        int64_t np;
        ids_from_json(tuna_json_member(c, "ids"), &prompt, &np);
        assert_true(e->n > np);
        assert_ids_eq(e->ids, np, prompt, np);
        /* with an earlier assistant turn in the prompt part, that turn is a target too (multi-turn
         * masking, checked in test_multiturn_mask); otherwise the whole prompt part is masked */
        bool earlier = false;
        const cJSON *m;
        cJSON_ArrayForEach(m, tuna_json_member(c, "messages")) earlier |=
            !strcmp(tuna_json_member(m, "role")->valuestring, "assistant");
        int64_t masked = 0;
        for (int64_t i = 0; i < e->n; i++) {
            if (i >= np)
                assert_int_equal(e->labels[i], e->ids[i]);
            else if (!earlier)
                assert_int_equal(e->labels[i], TUNA_LABEL_IGNORE);
            masked += e->labels[i] == TUNA_LABEL_IGNORE;
        }
        if (earlier) assert_true(masked > 0 && masked < np);
        char *resp = NULL;
        TT_OK(tuna_tokenizer_decode(g_tok, e->ids + np, (size_t)(e->n - np), false, &resp));
        assert_string_equal(resp, "Sure: 4.<|eot_id|>");
        free(resp);
        free(prompt);
        free(line);
        cJSON_Delete(msgs);
        tuna_dataset_free(d);
        checked++;
    }
    assert_int_equal(checked, 3);
}

/* The fixture runs: data.jsonl, the batch order of trace.json, padding and masks as
 * make_fixtures.py builds them. */
static void check_train_fixture(const char *name)
{
    char dir[4200], path[4300];
    snprintf(dir, sizeof dir, "%s/train/%s", g_fix, name);
    snprintf(path, sizeof path, "%s/trace.json", dir);
    cJSON *trace = NULL;
    TT_OK(tuna_json_load(path, 0, &trace));
    bool ro = cJSON_IsTrue(tuna_json_member(trace, "responses_only"));
    int64_t B = (int64_t)tuna_json_member(trace, "batch_size")->valuedouble;
    snprintf(path, sizeof path, "%s/data.jsonl", dir);
    struct tuna_dataset_opts o = opts(ro, 0, false);
    o.format = "messages";
    tuna_dataset *d = NULL;
    TT_OK(tuna_dataset_load(path, g_tok, g_tmpl, &o, &d));
    assert_int_equal(tuna_dataset_size(d), 8);

    /* the reference's ingredients, encoded the way encode_example does */
    char *text = NULL;
    size_t len = 0;
    TT_OK(tuna_read_file(path, 0, &text, &len));
    const char *p = text;
    for (size_t i = 0; i < tuna_dataset_size(d); i++) {
        const char *nl = strchr(p, '\n');
        cJSON *ex = NULL;
        TT_OK(tuna_json_parse(p, (size_t)(nl - p), "line", &ex));
        p = nl + 1;
        const cJSON *msgs = tuna_json_member(ex, "messages");
        cJSON *head = cJSON_Duplicate(msgs, 1);
        cJSON_DeleteItemFromArray(head, cJSON_GetArraySize(head) - 1);
        struct tuna_chat_render_opts full_o = {0}, prompt_o = {.add_generation_prompt = true};
        char *full = NULL, *prompt = NULL;
        int32_t *ids = NULL, *pids = NULL;
        size_t n = 0, np = 0;
        TT_OK(tuna_chat_render(g_tmpl, msgs, &full_o, &full));
        TT_OK(tuna_chat_render(g_tmpl, head, &prompt_o, &prompt));
        TT_OK(tuna_tokenizer_encode(g_tok, full, strlen(full), false, true, &ids, &n));
        TT_OK(tuna_tokenizer_encode(g_tok, prompt, strlen(prompt), false, true, &pids, &np));
        const struct tuna_train_example *e = tuna_dataset_at(d, i);
        assert_ids_eq(e->ids, e->n, ids, (int64_t)n);
        assert_int_equal(e->line, (int64_t)i + 1);
        for (size_t t = 0; t < n; t++)
            assert_int_equal(e->labels[t], (ro && t < np) ? TUNA_LABEL_IGNORE : ids[t]);
        /* the rendering has the reference's shape: BOS + header ids from cases.json */
        const cJSON *c0 = cJSON_GetArrayItem(tuna_json_member(g_cases, "chat"), 0);
        const cJSON *ref = tuna_json_member(c0, "ids");
        for (int k = 0; k < 6; k++)
            assert_int_equal(e->ids[k], cJSON_GetArrayItem(ref, k)->valueint);
        free(full);
        free(prompt);
        free(ids);
        free(pids);
        cJSON_Delete(head);
        cJSON_Delete(ex);
    }
    free(text);

    /* batches: the order of trace.json; right padding with the pad token, -100 on padding */
    int32_t pad = tuna_tokenizer_special_id(g_tok, "pad_token");
    assert_true(pad >= 0);
    assert_int_equal(tuna_dataset_pad_id(d), pad);
    int steps = 0;
    const cJSON *st;
    cJSON_ArrayForEach(st, tuna_json_member(trace, "trace"))
    {
        int64_t s = (int64_t)tuna_json_member(st, "step")->valuedouble - 1;
        size_t idx[8];
        tuna_dataset_batch_indices(d, s, B, false, 0, idx);
        const cJSON *want = tuna_json_member(st, "examples");
        assert_int_equal(cJSON_GetArraySize(want), B);
        for (int64_t j = 0; j < B; j++)
            assert_int_equal(idx[j], cJSON_GetArrayItem(want, (int)j)->valueint);
        struct tuna_train_batch b;
        TT_OK(tuna_dataset_make_batch(d, idx, B, &b));
        int64_t T = 0, targets = 0;
        for (int64_t j = 0; j < B; j++)
            T = tuna_dataset_at(d, idx[j])->n > T ? tuna_dataset_at(d, idx[j])->n : T;
        assert_int_equal(b.T, T);
        for (int64_t j = 0; j < B; j++) {
            const struct tuna_train_example *e = tuna_dataset_at(d, idx[j]);
            assert_int_equal(b.len[j], e->n);
            for (int64_t t = 0; t < T; t++) {
                bool in = t < e->n;
                assert_int_equal(b.ids[j * T + t], in ? e->ids[t] : pad);
                assert_int_equal(b.labels[j * T + t], in ? e->labels[t] : TUNA_LABEL_IGNORE);
                assert_int_equal(b.attn[j * T + t], in ? 1 : 0);
                if (t >= 1 && in && e->labels[t] != TUNA_LABEL_IGNORE) targets++;
            }
        }
        assert_int_equal(b.n_targets, targets);
        assert_true(targets > 0);
        tuna_train_batch_free(&b);
        steps++;
    }
    assert_int_equal(steps, 12);
    cJSON_Delete(trace);
    tuna_dataset_free(d);
}

static void test_train_fixtures(void **state)
{
    (void)state;
    NEED_FIXTURES();
    check_train_fixture("llama-tiny-lora");
    check_train_fixture("llama-tiny-lora-responses");
    check_train_fixture("llama-tiny-qlora");
}

/* Loads one line in the given format and returns its (only) example's ids and labels. */
static void one(const char *line, const char *format, bool ro, int32_t **ids, int32_t **labels, int64_t *n)
{
    struct tuna_dataset_opts o = opts(ro, 0, false);
    o.format = format;
    tuna_dataset *d = NULL;
    TT_OK(load_str(line, &o, &d));
    assert_int_equal(tuna_dataset_size(d), 1);
    const struct tuna_train_example *e = tuna_dataset_at(d, 0);
    *n = e->n;
    *ids = malloc((size_t)e->n * sizeof **ids);
    *labels = malloc((size_t)e->n * sizeof **labels);
    memcpy(*ids, e->ids, (size_t)e->n * sizeof **ids);
    memcpy(*labels, e->labels, (size_t)e->n * sizeof **labels);
    tuna_dataset_free(d);
}

static void same_example(const char *a, const char *fa, const char *b, const char *fb, bool ro)
{
    int32_t *ia, *la, *ib, *lb;
    int64_t na, nb;
    one(a, fa, ro, &ia, &la, &na);
    one(b, fb, ro, &ib, &lb, &nb);
    assert_ids_eq(ia, na, ib, nb);
    assert_ids_eq(la, na, lb, nb);
    free(ia);
    free(la);
    free(ib);
    free(lb);
}

static void test_formats(void **state)
{
    (void)state;
    NEED_FIXTURES();
    const char *msgs = "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", "
                       "\"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]}";
    const char *sgpt = "{\"conversations\": [{\"from\": \"system\", \"value\": \"Be brief.\"}, {\"from\": \"human\", "
                       "\"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Hello!\"}]}";
    const char *sgpt2 = "{\"conversations\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": "
                        "\"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]}";
    for (int ro = 0; ro < 2; ro++) {
        same_example(msgs, "auto", sgpt, "auto", ro);
        same_example(msgs, "messages", sgpt, "sharegpt", ro);
        same_example(msgs, "auto", sgpt2, "sharegpt", ro);
        /* alpaca: "instruction\n\ninput", instruction alone without input, optional system */
        same_example("{\"messages\": [{\"role\": \"user\", \"content\": \"Sum\\n\\n2 3\"}, {\"role\": \"assistant\", "
                     "\"content\": \"5\"}]}",
                     "auto", "{\"instruction\": \"Sum\", \"input\": \"2 3\", \"output\": \"5\"}", "alpaca", ro);
        same_example("{\"messages\": [{\"role\": \"user\", \"content\": \"Sum\"}, {\"role\": \"assistant\", "
                     "\"content\": \"5\"}]}",
                     "auto", "{\"instruction\": \"Sum\", \"input\": \"\", \"output\": \"5\"}", "auto", ro);
        same_example("{\"messages\": [{\"role\": \"user\", \"content\": \"Sum\"}, {\"role\": \"assistant\", "
                     "\"content\": \"5\"}]}",
                     "auto", "{\"instruction\": \"Sum\", \"output\": \"5\"}", "auto", ro);
        same_example(msgs, "auto", "{\"system\": \"Be brief.\", \"instruction\": \"Hi\", \"output\": \"Hello!\"}",
                     "alpaca", ro);
    }
    /* text: the tokenizer's own encoding with specials (BOS), then EOS */
    const char *txt = "def f(x):\n    return x * 2  # double\n";
    int32_t *ref = NULL, *ids, *labels;
    size_t nref = 0;
    int64_t n;
    TT_OK(tuna_tokenizer_encode(g_tok, txt, strlen(txt), true, true, &ref, &nref));
    assert_int_equal(ref[0], tuna_tokenizer_special_id(g_tok, "bos_token"));
    one("{\"text\": \"def f(x):\\n    return x * 2  # double\\n\"}", "auto", false, &ids, &labels, &n);
    assert_int_equal(n, (int64_t)nref + 1);
    assert_ids_eq(ids, (int64_t)nref, ref, (int64_t)nref);
    assert_int_equal(ids[nref], tuna_tokenizer_special_id(g_tok, "eos_token"));
    assert_ids_eq(labels, n, ids, n);
    free(ids);
    free(labels);
    /* without EOS */
    struct tuna_dataset_opts o = opts(false, 0, false);
    o.add_eos_for_text = false;
    tuna_dataset *d = NULL;
    TT_OK(load_str("{\"text\": \"def f(x):\\n    return x * 2  # double\\n\"}", &o, &d));
    assert_ids_eq(tuna_dataset_at(d, 0)->ids, tuna_dataset_at(d, 0)->n, ref, (int64_t)nref);
    tuna_dataset_free(d);
    free(ref);

    /* mixed formats in one file, CRLF line ends, blank lines, a UTF-8 BOM */
    char *mixed = NULL;
    assert_true(asprintf(&mixed,
                         "\xEF\xBB\xBF%s\r\n\r\n%s\n  \n{\"text\": \"x\"}\n{\"instruction\": \"a\", "
                         "\"output\": \"b\"}",
                         msgs, sgpt) > 0);
    o = opts(false, 0, false);
    TT_OK(load_str(mixed, &o, &d));
    assert_int_equal(tuna_dataset_size(d), 4);
    const struct tuna_dataset_stats *S = tuna_dataset_stats(d);
    assert_int_equal(S->lines, 4);
    assert_int_equal(S->by_format[0], 1);
    assert_int_equal(S->by_format[1], 1);
    assert_int_equal(S->by_format[2], 1);
    assert_int_equal(S->by_format[3], 1);
    assert_int_equal(tuna_dataset_at(d, 1)->line, 3);
    assert_int_equal(tuna_dataset_at(d, 3)->line, 6);
    char desc[512];
    tuna_dataset_describe(d, desc, sizeof desc);
    assert_non_null(strstr(desc, "4 examples"));
    tuna_dataset_free(d);
    free(mixed);
}

/* Multi-turn responses-only: exactly the assistant turns (with their <|eot_id|>) are targets. */
static void test_multiturn_mask(void **state)
{
    (void)state;
    NEED_FIXTURES();
    const char *line = "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", "
                       "\"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello! How can I help?\"}, "
                       "{\"role\": \"user\", \"content\": \"Tell me a joke.\"}, {\"role\": \"assistant\", "
                       "\"content\": \"No.\"}, {\"role\": \"user\", \"content\": \"Why?\"}]}";
    const char *want[] = {"Hello! How can I help?<|eot_id|>", "No.<|eot_id|>"};
    int32_t *ids, *labels;
    int64_t n;
    one(line, "auto", true, &ids, &labels, &n);
    int runs = 0;
    for (int64_t i = 0; i < n;) {
        if (labels[i] == TUNA_LABEL_IGNORE) {
            i++;
            continue;
        }
        int64_t j = i;
        while (j < n && labels[j] != TUNA_LABEL_IGNORE) {
            assert_int_equal(labels[j], ids[j]);
            j++;
        }
        assert_true(runs < 2);
        char *s = NULL, *before = NULL;
        TT_OK(tuna_tokenizer_decode(g_tok, ids + i, (size_t)(j - i), false, &s));
        assert_string_equal(s, want[runs]);
        TT_OK(tuna_tokenizer_decode(g_tok, ids, (size_t)i, false, &before));
        const char *hdr = "<|start_header_id|>assistant<|end_header_id|>\n\n";
        assert_true(strlen(before) >= strlen(hdr));
        assert_string_equal(before + strlen(before) - strlen(hdr), hdr);
        free(s);
        free(before);
        runs++;
        i = j;
    }
    assert_int_equal(runs, 2);
    /* the trailing user turn stays masked */
    assert_int_equal(labels[n - 1], TUNA_LABEL_IGNORE);
    free(ids);
    free(labels);

    /* no assistant turn: nothing to learn; dropped (counted), or refused */
    struct tuna_dataset_opts o = opts(true, 0, false);
    tuna_dataset *d = NULL;
    const char *two = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n{\"messages\": [{\"role\": "
                      "\"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}\n";
    TT_OK(load_str(two, &o, &d));
    assert_int_equal(tuna_dataset_size(d), 1);
    assert_int_equal(tuna_dataset_stats(d)->dropped_untrained, 1);
    assert_int_equal(tuna_dataset_at(d, 0)->line, 2);
    tuna_dataset_free(d);
    o.drop_untrained = false;
    TT_FAILS(load_str(two, &o, &d), TUNA_E_FORMAT, "mem.jsonl:1: no token");
    assert_null(d);
}

static tuna_dataset *load_fixture_data(bool ro, int64_t max, bool packing)
{
    char path[4300];
    snprintf(path, sizeof path, "%s/train/llama-tiny-lora/data.jsonl", g_fix);
    struct tuna_dataset_opts o = opts(ro, max, packing);
    tuna_dataset *d = NULL;
    TT_OK(tuna_dataset_load(path, g_tok, g_tmpl, &o, &d));
    return d;
}

static void test_truncation(void **state)
{
    (void)state;
    NEED_FIXTURES();
    tuna_dataset *full = load_fixture_data(false, 0, false);
    int64_t longest = tuna_dataset_stats(full)->max_len;
    assert_true(longest > 12);
    for (int64_t max = 12; max <= longest + 1; max += 5) {
        tuna_dataset *d = load_fixture_data(false, max, false);
        assert_int_equal(tuna_dataset_size(d), tuna_dataset_size(full));
        int64_t cut_ex = 0, cut_tok = 0;
        for (size_t i = 0; i < tuna_dataset_size(d); i++) {
            const struct tuna_train_example *a = tuna_dataset_at(full, i), *b = tuna_dataset_at(d, i);
            int64_t keep = a->n < max ? a->n : max;
            assert_int_equal(b->n, keep);
            assert_ids_eq(b->ids, b->n, a->ids, keep);
            assert_ids_eq(b->labels, b->n, a->labels, keep);
            if (a->n > max) {
                cut_ex++;
                cut_tok += a->n - max;
            }
        }
        const struct tuna_dataset_stats *S = tuna_dataset_stats(d);
        assert_int_equal(S->truncated_examples, cut_ex);
        assert_int_equal(S->truncated_tokens, cut_tok);
        assert_true(S->max_len <= max);
        tuna_dataset_free(d);
    }
    /* responses-only with a limit shorter than every prompt: nothing left to train on */
    char path[4300];
    snprintf(path, sizeof path, "%s/train/llama-tiny-lora/data.jsonl", g_fix);
    struct tuna_dataset_opts o = opts(true, 8, false);
    tuna_dataset *d = NULL;
    TT_FAILS(tuna_dataset_load(path, g_tok, g_tmpl, &o, &d), TUNA_E_FORMAT, "all 8 examples were dropped");
    tuna_dataset_free(full);
}

static void test_packing(void **state)
{
    (void)state;
    NEED_FIXTURES();
    for (int ro = 0; ro < 2; ro++) {
        tuna_dataset *ex = load_fixture_data(ro, 0, false);
        for (int64_t max = 20; max <= 200; max += 30) {
            tuna_dataset *d = load_fixture_data(ro, max, true);
            tuna_dataset *t = load_fixture_data(ro, max, false); /* truncated, unpacked */
            assert_true(tuna_dataset_size(d) <= tuna_dataset_size(t));
            size_t k = 0;
            int64_t targets = 0;
            for (size_t r = 0; r < tuna_dataset_size(d); r++) {
                const struct tuna_train_example *row = tuna_dataset_at(d, r);
                assert_true(row->n <= max);
                assert_int_equal(row->line, tuna_dataset_at(t, k)->line);
                for (int64_t s = 0; s < row->n_seg; s++, k++) {
                    const struct tuna_train_example *e = tuna_dataset_at(t, k);
                    int64_t at = row->seg_start[s];
                    assert_int_equal(at + e->n, s + 1 < row->n_seg ? row->seg_start[s + 1] : row->n);
                    assert_ids_eq(row->ids + at, e->n, e->ids, e->n);
                    assert_int_equal(row->labels[at], TUNA_LABEL_IGNORE);
                    assert_ids_eq(row->labels + at + 1, e->n - 1, e->labels + 1, e->n - 1);
                }
                /* greedy: the next example would not have fit */
                if (k < tuna_dataset_size(t)) assert_true(row->n + tuna_dataset_at(t, k)->n > max);
            }
            assert_int_equal(k, tuna_dataset_size(t));
            for (size_t i = 0; i < tuna_dataset_size(t); i++) {
                const struct tuna_train_example *e = tuna_dataset_at(t, i);
                for (int64_t j = 1; j < e->n; j++)
                    targets += e->labels[j] != TUNA_LABEL_IGNORE;
            }
            /* packing neither adds nor loses a target */
            assert_int_equal(tuna_dataset_stats(d)->target_tokens, targets);
            assert_int_equal(tuna_dataset_stats(t)->target_tokens, targets);
            if (max >= tuna_dataset_stats(ex)->max_len * 2) assert_true(tuna_dataset_size(d) < tuna_dataset_size(t));
            tuna_dataset_free(d);
            tuna_dataset_free(t);
        }
        tuna_dataset_free(ex);
    }
}

static void test_batch_order(void **state)
{
    (void)state;
    NEED_FIXTURES();
    tuna_dataset *d = load_fixture_data(false, 0, false);
    size_t N = tuna_dataset_size(d);
    assert_int_equal(N, 8);
    size_t idx[5];
    /* file order wraps: step 3 of batch 3 = positions 9, 10, 11 */
    tuna_dataset_batch_indices(d, 3, 3, false, 0, idx);
    assert_int_equal(idx[0], 1);
    assert_int_equal(idx[1], 2);
    assert_int_equal(idx[2], 3);
    /* shuffled: each epoch is a permutation, reproducible, seed-dependent, not file order */
    size_t seq[40], seq2[40], seq3[40];
    for (int s = 0; s < 8; s++) {
        tuna_dataset_batch_indices(d, s, 5, true, 42, seq + s * 5);
        tuna_dataset_batch_indices(d, s, 5, true, 42, seq2 + s * 5);
        tuna_dataset_batch_indices(d, s, 5, true, 43, seq3 + s * 5);
    }
    bool differs_seed = false, differs_order = false, differs_epoch = false;
    for (int e = 0; e < 5; e++) {
        int seen[8] = {0};
        for (int k = 0; k < 8; k++) {
            size_t v = seq[e * 8 + k];
            assert_true(v < N);
            seen[v]++;
            differs_order |= v != (size_t)k;
            if (e > 0) differs_epoch |= v != seq[k];
        }
        for (int k = 0; k < 8; k++)
            assert_int_equal(seen[k], 1);
    }
    for (int i = 0; i < 40; i++) {
        assert_int_equal(seq[i], seq2[i]);
        differs_seed |= seq[i] != seq3[i];
    }
    assert_true(differs_seed);
    assert_true(differs_order);
    assert_true(differs_epoch);
    /* the order does not depend on the calls before (the epoch's permutation is cached) */
    for (int st = 7; st >= 0; st--) {
        size_t again[5];
        tuna_dataset_batch_indices(d, st, 5, true, st % 2 ? 43 : 42, again);
        for (int j = 0; j < 5; j++)
            assert_int_equal(again[j], (st % 2 ? seq3 : seq)[st * 5 + j]);
    }
    /* a batch that straddles epochs takes the end of one permutation and the start of the next */
    tuna_dataset_batch_indices(d, 1, 5, true, 42, idx); /* positions 5..9 */
    for (int j = 0; j < 5; j++)
        assert_int_equal(idx[j], seq[5 + j]);

    size_t bad = N;
    struct tuna_train_batch b;
    TT_FAILS(tuna_dataset_make_batch(d, &bad, 1, &b), TUNA_E_RANGE, "dataset of 8");
    TT_FAILS(tuna_dataset_make_batch(d, idx, 0, &b), TUNA_E_INVALID, "batch size");
    tuna_train_batch_free(&b);
    tuna_dataset_free(d);
}

static void test_bad_input(void **state)
{
    (void)state;
    NEED_FIXTURES();
    struct tuna_dataset_opts o = opts(false, 0, false);
    tuna_dataset *d = NULL;
    const char *ok = "{\"text\": \"a\"}\n";
    char buf[512];
    snprintf(buf, sizeof buf, "%s%s{\"text\": \"b\", }\n", ok, ok);
    TT_FAILS(load_str(buf, &o, &d), TUNA_E_FORMAT, "mem.jsonl:3: invalid JSON");
    assert_null(d);
    TT_FAILS(load_str("{\"text\": \"a\"} {\"text\": \"b\"}", &o, &d), TUNA_E_FORMAT,
             "mem.jsonl:1: invalid JSON at byte 14: extra data");
    TT_FAILS(load_str("[{\"text\": \"a\"}]", &o, &d), TUNA_E_FORMAT, "jq -c");
    TT_FAILS(load_str("{\"prompt\": \"a\", \"answer\": \"b\"}", &o, &d), TUNA_E_FORMAT, "mem.jsonl:1: no known format");
    TT_FAILS(load_str("{\"prompt\": \"a\"}", &o, &d), TUNA_E_FORMAT, "sharegpt");
    TT_FAILS(load_str("", &o, &d), TUNA_E_FORMAT, "empty");
    TT_FAILS(load_str("\n  \n\r\n", &o, &d), TUNA_E_FORMAT, "empty");
    TT_FAILS(load_str("{\"text\": 3}", &o, &d), TUNA_E_FORMAT, "\"text\" must be a string");
    TT_FAILS(load_str("{\"messages\": {}}", &o, &d), TUNA_E_FORMAT, "must be an array");
    TT_FAILS(load_str("{\"messages\": []}", &o, &d), TUNA_E_FORMAT, "is empty");
    TT_FAILS(load_str("{\"messages\": [{\"content\": \"x\"}]}", &o, &d), TUNA_E_FORMAT, "messages[0] has no string");
    TT_FAILS(load_str("{\"conversations\": [{\"from\": \"bot\", \"value\": \"x\"}]}", &o, &d), TUNA_E_FORMAT,
             "from \"bot\"");
    TT_FAILS(load_str("{\"instruction\": \"x\"}", &o, &d), TUNA_E_FORMAT, "without \"output\"");
    TT_FAILS(load_str("{\"instruction\": \"x\", \"input\": 2, \"output\": \"y\"}", &o, &d), TUNA_E_FORMAT, "input");
    o.format = "csv";
    TT_FAILS(load_str(ok, &o, &d), TUNA_E_INVALID, "unknown dataset format \"csv\"");
    TT_FAILS(load_str(ok, &o, &d), TUNA_E_INVALID, "alpaca");
    o.format = "alpaca";
    TT_FAILS(load_str(ok, &o, &d), TUNA_E_FORMAT, "mem.jsonl:1: alpaca line without \"instruction\"");
    o = opts(true, 0, false);
    TT_FAILS(load_str(ok, &o, &d), TUNA_E_INVALID, "raw text has no assistant");
    o = opts(false, 0, true);
    TT_FAILS(load_str(ok, &o, &d), TUNA_E_INVALID, "packing needs");
    o = opts(false, 0, false);
    const char *conv = "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}";
    TT_FAILS(tuna_dataset_load_text(conv, strlen(conv), "m", g_tok, NULL, &o, &d), TUNA_E_INVALID, "chat template");
    TT_FAILS(tuna_dataset_load_text(ok, strlen(ok), "m", NULL, NULL, &o, &d), TUNA_E_INVALID, "tokenizer");
    TT_FAILS(tuna_dataset_load("/nonexistent/data.jsonl", g_tok, g_tmpl, &o, &d), TUNA_E_IO, "/nonexistent/data.jsonl");
    /* a file: the message names it */
    char path[4300];
    snprintf(path, sizeof path, "%s/bad.jsonl", tt_tmpdir());
    tt_write(path, buf, strlen(buf));
    TT_FAILS(tuna_dataset_load(path, g_tok, g_tmpl, &o, &d), TUNA_E_FORMAT, "bad.jsonl:3:");
    remove(path);
    rmdir(tt_tmpdir());
    assert_null(d);
}

/* Every prefix of a mixed file, and every single-byte corruption of it, either loads or fails
 * with a message that names the file (never a crash: run under the sanitizers in CI). */
static void test_robustness(void **state)
{
    (void)state;
    NEED_FIXTURES();
    const char *text = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi \\u00e9\"}, {\"role\": "
                       "\"assistant\", \"content\": \"Yo\"}]}\n{\"conversations\": [{\"from\": \"human\", "
                       "\"value\": \"a\"}, {\"from\": \"gpt\", \"value\": \"b\"}]}\n{\"instruction\": \"i\", "
                       "\"input\": \"j\", \"output\": \"k\"}\n{\"text\": \"t\"}\n";
    size_t n = strlen(text);
    const char junk[] = {'"', '{', '}', '[', ']', ',', ':', '\\', '\n', 'x', '\0', (char)0xff};
    char *buf = malloc(n);
    assert_non_null(buf);
    int ok = 0, failed = 0;
    for (int ro = 0; ro < 2; ro++) {
        struct tuna_dataset_opts o = opts(ro, ro ? 12 : 0, ro);
        for (size_t cut = 0; cut <= n; cut++) {
            tuna_dataset *d = NULL;
            tuna_clear_error();
            tuna_status st = tuna_dataset_load_text(text, cut, "mem.jsonl", g_tok, g_tmpl, &o, &d);
            if (st) {
                assert_non_null(strstr(tuna_last_error(), "mem.jsonl"));
                assert_null(d);
                failed++;
            } else {
                assert_true(tuna_dataset_size(d) > 0);
                ok++;
            }
            tuna_dataset_free(d);
        }
        for (size_t i = 0; i < n; i++) {
            for (size_t k = 0; k < sizeof junk; k++) {
                memcpy(buf, text, n);
                buf[i] = junk[k];
                tuna_dataset *d = NULL;
                tuna_clear_error();
                tuna_status st = tuna_dataset_load_text(buf, n, "mem.jsonl", g_tok, g_tmpl, &o, &d);
                if (st) {
                    assert_true(tuna_last_error()[0] != '\0');
                    failed++;
                } else {
                    ok++;
                }
                tuna_dataset_free(d);
            }
        }
    }
    assert_true(ok > 0 && failed > 0);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cases_ids),         cmocka_unit_test(test_cases_all_tokenizers),
        cmocka_unit_test(test_cases_prompt_mask), cmocka_unit_test(test_train_fixtures),
        cmocka_unit_test(test_formats),           cmocka_unit_test(test_multiturn_mask),
        cmocka_unit_test(test_truncation),        cmocka_unit_test(test_packing),
        cmocka_unit_test(test_batch_order),       cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_robustness),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
