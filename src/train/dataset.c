/* dataset.c — JSONL training data → tokenized rows with HF-style labels (see dataset.h).
 *
 * Each line is parsed, turned into a messages array (or raw text), rendered with the chat
 * template and encoded exactly as make_fixtures.py's encode_example does
 * (apply_chat_template(tokenize=False) then encode(add_special_tokens=False)); responses-only
 * masks come from the token counts of rendered prefixes, as the reference computes n_prompt.
 * Truncation, dropping of untrained examples and packing follow. The dataset owns every row.
 */
#include "train/dataset.h"
#include "train/dataset_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/json.h"
#include "core/status.h"
#include "tokenizer/jinja/jinja.h"

enum ds_format { DS_MESSAGES = 0, DS_SHAREGPT, DS_ALPACA, DS_TEXT, DS_AUTO };

static const char *const k_format_names[] = {"messages", "sharegpt", "alpaca", "text"};

#define DS_FORMAT_LIST                                                                                                 \
    "messages ({\"messages\": [{\"role\", \"content\"}]}), sharegpt ({\"conversations\": "                             \
    "[{\"from\", \"value\"}]}), alpaca ({\"instruction\", \"input\", \"output\"}), text "                              \
    "({\"text\"})"

/* struct tuna_dataset is in train/dataset_internal.h (shared with batching.c). */

/* What one load call needs while it reads lines. */
struct ds_loader {
    const char *name;
    const tuna_tokenizer *tok;
    const struct tuna_chat_template *tmpl;
    struct tuna_dataset_opts o;
    enum ds_format fmt;
    int32_t eos_id;
    tuna_dataset *d;
};

void tuna_dataset_opts_default(struct tuna_dataset_opts *o)
{
    memset(o, 0, sizeof *o);
    o->format = "auto";
    o->add_eos_for_text = true;
    o->drop_untrained = true;
}

static void example_free(struct tuna_train_example *e)
{
    free(e->ids);
    free(e->labels);
    free(e->seg_start);
    memset(e, 0, sizeof *e);
}

void tuna_dataset_free(tuna_dataset *d)
{
    if (!d) return;
    for (size_t i = 0; i < d->n; i++)
        example_free(&d->rows[i]);
    free(d->rows);
    free(d->perm);
    pthread_mutex_destroy(&d->perm_mu);
    free(d);
}

size_t tuna_dataset_size(const tuna_dataset *d)
{
    return d ? d->n : 0;
}

const struct tuna_train_example *tuna_dataset_at(const tuna_dataset *d, size_t i)
{
    return (d && i < d->n) ? &d->rows[i] : NULL;
}

const struct tuna_dataset_stats *tuna_dataset_stats(const tuna_dataset *d)
{
    return &d->stats;
}

int32_t tuna_dataset_pad_id(const tuna_dataset *d)
{
    return d->pad_id;
}

static tuna_status push_row(tuna_dataset *d, struct tuna_train_example *e)
{
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 64;
        struct tuna_train_example *r = realloc(d->rows, cap * sizeof *r);
        if (!r) return tuna_fail_oom("dataset rows", cap * sizeof *r);
        d->rows = r;
        d->cap = cap;
    }
    d->rows[d->n++] = *e;
    memset(e, 0, sizeof *e);
    return TUNA_OK;
}

/* ---- turning a line into messages ---- */

/* ShareGPT speaker → chat role; NULL when unknown. */
static const char *sharegpt_role(const char *from)
{
    if (!strcmp(from, "human") || !strcmp(from, "user")) return "user";
    if (!strcmp(from, "gpt") || !strcmp(from, "assistant")) return "assistant";
    if (!strcmp(from, "system")) return "system";
    return NULL;
}

static cJSON *make_msg(const char *role, const char *content)
{
    cJSON *m = cJSON_CreateObject();
    if (!m) return NULL;
    if (!cJSON_AddStringToObject(m, "role", role) || !cJSON_AddStringToObject(m, "content", content)) {
        cJSON_Delete(m);
        return NULL;
    }
    return m;
}

static enum ds_format detect(const cJSON *obj)
{
    if (tuna_json_member(obj, "messages")) return DS_MESSAGES;
    if (tuna_json_member(obj, "conversations")) return DS_SHAREGPT;
    if (tuna_json_member(obj, "instruction")) return DS_ALPACA;
    if (tuna_json_member(obj, "text")) return DS_TEXT;
    return DS_AUTO;
}

/* Checks {"messages": [{"role": str, ...}, ...]} and returns the array (borrowed). */
static tuna_status messages_of(const struct ds_loader *L, int64_t line, const cJSON *obj, const cJSON **out)
{
    const cJSON *arr = tuna_json_member(obj, "messages");
    if (!cJSON_IsArray(arr))
        return tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": \"messages\" must be an array of {\"role\", \"content\"}",
                         L->name, line);
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, arr)
    {
        const cJSON *role = tuna_json_member(m, "role");
        if (!cJSON_IsString(role))
            return tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": messages[%d] has no string \"role\"", L->name, line, i);
        i++;
    }
    if (i == 0) return tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": \"messages\" is empty", L->name, line);
    *out = arr;
    return TUNA_OK;
}

/* ShareGPT conversations → a new messages array (*out taken by the caller). */
static tuna_status sharegpt_to_messages(const struct ds_loader *L, int64_t line, const cJSON *obj, cJSON **out)
{
    const cJSON *arr = tuna_json_member(obj, "conversations");
    if (!cJSON_IsArray(arr))
        return tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": \"conversations\" must be an array of {\"from\", \"value\"}",
                         L->name, line);
    cJSON *msgs = cJSON_CreateArray();
    if (!msgs) return tuna_fail_oom("messages", 64);
    int i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, arr)
    {
        const cJSON *from = tuna_json_member(t, "from");
        const cJSON *value = tuna_json_member(t, "value");
        if (!from) from = tuna_json_member(t, "role");
        if (!value) value = tuna_json_member(t, "content");
        if (!cJSON_IsString(from) || !cJSON_IsString(value)) {
            cJSON_Delete(msgs);
            return tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": conversations[%d] needs string \"from\" and \"value\"",
                             L->name, line, i);
        }
        const char *role = sharegpt_role(from->valuestring);
        if (!role) {
            cJSON_Delete(msgs);
            return tuna_fail(TUNA_E_FORMAT,
                             "%s:%" PRId64 ": conversations[%d] is from \"%s\"; ShareGPT speakers are human/user, "
                             "gpt/assistant and system",
                             L->name, line, i, from->valuestring);
        }
        cJSON *m = make_msg(role, value->valuestring);
        if (!m || !cJSON_AddItemToArray(msgs, m)) {
            cJSON_Delete(m);
            cJSON_Delete(msgs);
            return tuna_fail_oom("messages", 64);
        }
        i++;
    }
    if (i == 0) {
        cJSON_Delete(msgs);
        return tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": \"conversations\" is empty", L->name, line);
    }
    *out = msgs;
    return TUNA_OK;
}

static bool opt_str(const cJSON *obj, const char *key, const char **out, tuna_status *st, const char *where)
{
    *out = NULL;
    return tuna_json_get_str(obj, key, out, st, where);
}

/* Alpaca → [system?] user "instruction\n\ninput" | "instruction", assistant "output". */
static tuna_status alpaca_to_messages(const struct ds_loader *L, int64_t line, const cJSON *obj, cJSON **out)
{
    char where[512];
    snprintf(where, sizeof where, "%s:%" PRId64, L->name, line);
    tuna_status st = TUNA_OK;
    const char *ins, *inp, *outp, *sys;
    if (!opt_str(obj, "instruction", &ins, &st, where))
        return st ? st : tuna_fail(TUNA_E_FORMAT, "%s: alpaca line without \"instruction\"", where);
    if (!opt_str(obj, "output", &outp, &st, where))
        return st ? st
                  : tuna_fail(TUNA_E_FORMAT, "%s: alpaca line without \"output\" (the response to train on)", where);
    if (!opt_str(obj, "input", &inp, &st, where) && st) return st;
    if (!opt_str(obj, "system", &sys, &st, where) && st) return st;

    size_t ni = strlen(ins), nn = inp ? strlen(inp) : 0;
    char *user = malloc(ni + nn + 3);
    if (!user) return tuna_fail_oom("alpaca prompt", ni + nn + 3);
    memcpy(user, ins, ni);
    if (nn) {
        memcpy(user + ni, "\n\n", 2);
        memcpy(user + ni + 2, inp, nn);
        user[ni + 2 + nn] = '\0';
    } else {
        user[ni] = '\0';
    }
    cJSON *msgs = cJSON_CreateArray();
    bool ok = msgs != NULL;
    if (ok && sys && *sys) ok = cJSON_AddItemToArray(msgs, make_msg("system", sys));
    if (ok) ok = cJSON_AddItemToArray(msgs, make_msg("user", user));
    if (ok) ok = cJSON_AddItemToArray(msgs, make_msg("assistant", outp));
    free(user);
    if (!ok) {
        cJSON_Delete(msgs);
        return tuna_fail_oom("messages", 64);
    }
    *out = msgs;
    return TUNA_OK;
}

/* ---- rendering and encoding ---- */

static tuna_status render(const struct ds_loader *L, int64_t line, const cJSON *msgs, bool agp, char **text)
{
    struct tuna_chat_render_opts ro = {0};
    ro.add_generation_prompt = agp;
    tuna_status st = tuna_chat_render(L->tmpl, msgs, &ro, text);
    if (st) return tuna_fail_prefix(st, "%s:%" PRId64 ": rendering the chat template", L->name, line);
    return TUNA_OK;
}

static tuna_status encode(const struct ds_loader *L, int64_t line, const char *text, bool add_special, int32_t **ids,
                          size_t *n)
{
    tuna_status st = tuna_tokenizer_encode(L->tok, text, strlen(text), add_special, true, ids, n);
    if (st) return tuna_fail_prefix(st, "%s:%" PRId64 ": tokenizing", L->name, line);
    return TUNA_OK;
}

/* Token count of the template applied to msgs[0..k) (a prefix of the conversation); *is_prefix
 * false when that text is not a prefix of full. */
static tuna_status prefix_count(const struct ds_loader *L, int64_t line, const cJSON *msgs, int k, bool agp,
                                const char *full, const struct tuna_train_example *e, size_t *count, bool *is_prefix)
{
    cJSON *sub = cJSON_CreateArray();
    if (!sub) return tuna_fail_oom("messages", 64);
    for (int i = 0; i < k; i++) {
        if (!cJSON_AddItemReferenceToArray(sub, cJSON_GetArrayItem(msgs, i))) {
            cJSON_Delete(sub);
            return tuna_fail_oom("messages", 64);
        }
    }
    char *text = NULL;
    int32_t *ids = NULL;
    tuna_status st = render(L, line, sub, agp, &text);
    cJSON_Delete(sub);
    if (!st) st = encode(L, line, text, false, &ids, count);
    if (!st) {
        /* the text, and its tokens, should begin the whole conversation; SentencePiece merges
         * across the boundary ("]" + "▁Sure" → "]▁" ...) break the second */
        *is_prefix = strncmp(full, text, strlen(text)) == 0 && (int64_t)*count <= e->n &&
                     (*count == 0 || !memcmp(ids, e->ids, *count * sizeof *ids));
    }
    free(text);
    free(ids);
    return st;
}

/* Renders and encodes a conversation into e (ids, labels). */
static tuna_status encode_conversation(struct ds_loader *L, int64_t line, const cJSON *msgs,
                                       struct tuna_train_example *e)
{
    if (!L->tmpl)
        return tuna_fail(TUNA_E_INVALID,
                         "%s:%" PRId64 ": a conversation needs the model's chat template, and this model has "
                         "none; give one (chat_template.jinja) or use raw {\"text\"} lines",
                         L->name, line);
    char *full = NULL;
    size_t n = 0;
    tuna_status st = render(L, line, msgs, false, &full);
    if (!st) st = encode(L, line, full, false, &e->ids, &n);
    if (st) goto done;
    e->n = (int64_t)n;
    e->labels = malloc((n ? n : 1) * sizeof *e->labels);
    if (!e->labels) {
        st = tuna_fail_oom("labels", n * sizeof *e->labels);
        goto done;
    }
    if (!L->o.train_on_responses_only) {
        memcpy(e->labels, e->ids, n * sizeof *e->ids);
        goto done;
    }
    for (size_t i = 0; i < n; i++)
        e->labels[i] = TUNA_LABEL_IGNORE;
    int nm = cJSON_GetArraySize(msgs);
    bool mismatch = false;
    for (int k = 0; k < nm; k++) {
        const cJSON *role = tuna_json_member(cJSON_GetArrayItem(msgs, k), "role");
        if (!cJSON_IsString(role) || strcmp(role->valuestring, "assistant") != 0) continue;
        size_t start, end = n;
        bool pre = true;
        if ((st = prefix_count(L, line, msgs, k, true, full, e, &start, &pre))) goto done;
        mismatch |= !pre;
        if (k + 1 < nm) {
            if ((st = prefix_count(L, line, msgs, k + 1, false, full, e, &end, &pre))) goto done;
            mismatch |= !pre;
        }
        if (end > n) end = n;
        for (size_t i = start; i < end; i++)
            e->labels[i] = e->ids[i];
    }
    if (mismatch) L->d->stats.prefix_mismatches++;
done:
    free(full);
    return st;
}

static tuna_status encode_text(struct ds_loader *L, int64_t line, const cJSON *obj, struct tuna_train_example *e)
{
    const cJSON *t = tuna_json_member(obj, "text");
    if (!cJSON_IsString(t)) return tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": \"text\" must be a string", L->name, line);
    if (L->o.train_on_responses_only)
        return tuna_fail(TUNA_E_INVALID,
                         "%s:%" PRId64 ": raw text has no assistant responses to train on; drop "
                         "--train-on-responses-only or give conversations",
                         L->name, line);
    if (L->o.add_eos_for_text && L->eos_id < 0)
        return tuna_fail(TUNA_E_INVALID,
                         "%s:%" PRId64 ": the tokenizer names no eos_token, needed to end raw text examples; add "
                         "one to tokenizer_config.json or turn off the EOS for text",
                         L->name, line);
    size_t n = 0;
    tuna_status st = encode(L, line, t->valuestring, true, &e->ids, &n);
    if (st) return st;
    if (L->o.add_eos_for_text) {
        int32_t *r = realloc(e->ids, (n + 1) * sizeof *r);
        if (!r) return tuna_fail_oom("ids", (n + 1) * sizeof *r);
        e->ids = r;
        e->ids[n++] = L->eos_id;
    }
    e->n = (int64_t)n;
    e->labels = malloc((n ? n : 1) * sizeof *e->labels);
    if (!e->labels) return tuna_fail_oom("labels", n * sizeof *e->labels);
    memcpy(e->labels, e->ids, n * sizeof *e->ids);
    return TUNA_OK;
}

static bool has_target(const struct tuna_train_example *e)
{
    for (int64_t i = 1; i < e->n; i++)
        if (e->labels[i] != TUNA_LABEL_IGNORE) return true;
    return false;
}

/* Parses one line (len bytes, not NUL-terminated) and appends its example. */
static tuna_status process_line(struct ds_loader *L, const char *s, size_t len, int64_t line)
{
    while (len && (s[len - 1] == '\r' || s[len - 1] == '\n' || s[len - 1] == ' ' || s[len - 1] == '\t'))
        len--;
    size_t skip = 0;
    if (line == 1 && len >= 3 && !memcmp(s, "\xEF\xBB\xBF", 3)) skip = 3; /* UTF-8 BOM */
    while (skip < len && (s[skip] == ' ' || s[skip] == '\t'))
        skip++;
    s += skip;
    len -= skip;
    if (len == 0) return TUNA_OK;
    L->d->stats.lines++;

    /* parsed as Python's json.loads (numbers keep their text: 1.0 stays a float in the template) */
    char where[512];
    snprintf(where, sizeof where, "%s:%" PRId64, L->name, line);
    cJSON *obj = NULL;
    tuna_status st = tuna_jinja_json_parse(s, len, where, &obj);
    if (st) return st; /* "<file>:<line>: invalid JSON at byte N: what" */
    cJSON *owned = NULL;
    struct tuna_train_example e = {0};
    if (!cJSON_IsObject(obj)) {
        st = tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": %s, not a JSON object; tuna reads JSONL, one object per line%s",
                       L->name, line, cJSON_IsArray(obj) ? "an array" : "a scalar",
                       cJSON_IsArray(obj) ? " (a .json array converts with: jq -c '.[]')" : "");
        goto done;
    }
    enum ds_format f = L->fmt == DS_AUTO ? detect(obj) : L->fmt;
    if (f == DS_AUTO) {
        st =
            tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": no known format; the formats are " DS_FORMAT_LIST, L->name, line);
        goto done;
    }
    const cJSON *msgs = NULL;
    switch (f) {
    case DS_MESSAGES: st = messages_of(L, line, obj, &msgs); break;
    case DS_SHAREGPT:
        st = sharegpt_to_messages(L, line, obj, &owned);
        msgs = owned;
        break;
    case DS_ALPACA:
        st = alpaca_to_messages(L, line, obj, &owned);
        msgs = owned;
        break;
    default: break;
    }
    if (st) goto done;
    if (f == DS_TEXT && L->fmt == DS_TEXT && !tuna_json_member(obj, "text")) {
        st = tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": format text needs a \"text\" string", L->name, line);
        goto done;
    }
    st = f == DS_TEXT ? encode_text(L, line, obj, &e) : encode_conversation(L, line, msgs, &e);
    if (st) goto done;
    e.line = line;

    struct tuna_dataset_stats *S = &L->d->stats;
    int64_t max = L->o.max_seq_length;
    if (max > 0 && e.n > max) {
        S->truncated_examples++;
        S->truncated_tokens += e.n - max;
        e.n = max;
    }
    if (!has_target(&e)) {
        if (!L->o.drop_untrained) {
            st = tuna_fail(TUNA_E_FORMAT, "%s:%" PRId64 ": no token of this example is a target%s (%" PRId64 " tokens)",
                           L->name, line, L->o.train_on_responses_only ? " (no assistant turn survives)" : "", e.n);
            goto done;
        }
        S->dropped_untrained++;
        goto done;
    }
    e.seg_start = malloc(sizeof *e.seg_start);
    if (!e.seg_start) {
        st = tuna_fail_oom("segments", sizeof *e.seg_start);
        goto done;
    }
    e.seg_start[0] = 0;
    e.n_seg = 1;
    S->by_format[f]++;
    S->examples++;
    st = push_row(L->d, &e);
done:
    example_free(&e);
    cJSON_Delete(owned);
    cJSON_Delete(obj);
    return st;
}

/* Packs the examples greedily, in order, into rows of at most max tokens. */
static tuna_status pack(tuna_dataset *d, int64_t max)
{
    struct tuna_dataset packed = {0};
    struct tuna_train_example cur = {0};
    tuna_status st = TUNA_OK;
    size_t i = 0;
    while (i < d->n) {
        size_t j = i;
        int64_t total = 0;
        while (j < d->n && (j == i || total + d->rows[j].n <= max))
            total += d->rows[j++].n;
        cur.ids = malloc((size_t)total * sizeof *cur.ids);
        cur.labels = malloc((size_t)total * sizeof *cur.labels);
        cur.seg_start = malloc((j - i) * sizeof *cur.seg_start);
        if (!cur.ids || !cur.labels || !cur.seg_start) {
            st = tuna_fail_oom("packed row", (size_t)total * 8);
            break;
        }
        cur.n = 0;
        cur.n_seg = 0;
        cur.line = d->rows[i].line;
        for (size_t k = i; k < j; k++) {
            const struct tuna_train_example *e = &d->rows[k];
            memcpy(cur.ids + cur.n, e->ids, (size_t)e->n * sizeof *e->ids);
            memcpy(cur.labels + cur.n, e->labels, (size_t)e->n * sizeof *e->labels);
            cur.labels[cur.n] = TUNA_LABEL_IGNORE; /* never predict an example's first token */
            cur.seg_start[cur.n_seg++] = cur.n;
            cur.n += e->n;
        }
        if ((st = push_row(&packed, &cur))) break;
        i = j;
    }
    example_free(&cur);
    if (st) {
        for (size_t k = 0; k < packed.n; k++)
            example_free(&packed.rows[k]);
        free(packed.rows);
        return st;
    }
    for (size_t k = 0; k < d->n; k++)
        example_free(&d->rows[k]);
    free(d->rows);
    d->rows = packed.rows;
    d->n = packed.n;
    d->cap = packed.cap;
    return TUNA_OK;
}

static tuna_status loader_begin(struct ds_loader *L, const char *name, const tuna_tokenizer *tok,
                                const struct tuna_chat_template *tmpl, const struct tuna_dataset_opts *o)
{
    memset(L, 0, sizeof *L);
    L->name = name ? name : "dataset";
    L->tok = tok;
    L->tmpl = tmpl;
    if (o)
        L->o = *o;
    else
        tuna_dataset_opts_default(&L->o);
    if (!tok) return tuna_fail(TUNA_E_INVALID, "%s: a tokenizer is needed to load a dataset", L->name);
    const char *f = L->o.format ? L->o.format : "auto";
    L->fmt = DS_AUTO;
    if (strcmp(f, "auto") != 0) {
        int k = 0;
        while (k < 4 && strcmp(f, k_format_names[k]) != 0)
            k++;
        if (k == 4)
            return tuna_fail(TUNA_E_INVALID,
                             "unknown dataset format \"%s\"; the formats are auto (detect per line), " DS_FORMAT_LIST,
                             f);
        L->fmt = (enum ds_format)k;
    }
    if (L->o.packing && L->o.max_seq_length <= 0)
        return tuna_fail(TUNA_E_INVALID, "packing needs a --max-seq-length (the length of a packed row)");
    L->eos_id = tuna_tokenizer_special_id(tok, "eos_token");
    L->d = calloc(1, sizeof *L->d);
    if (!L->d) return tuna_fail_oom("dataset", sizeof *L->d);
    pthread_mutex_init(&L->d->perm_mu, NULL);
    int32_t pad = tuna_tokenizer_special_id(tok, "pad_token");
    L->d->pad_id = pad >= 0 ? pad : 0;
    return TUNA_OK;
}

static tuna_status loader_end(struct ds_loader *L, tuna_dataset **out)
{
    tuna_dataset *d = L->d;
    struct tuna_dataset_stats *S = &d->stats;
    if (d->n == 0) {
        if (S->lines == 0) return tuna_fail(TUNA_E_FORMAT, "%s: the dataset is empty (no JSON lines)", L->name);
        return tuna_fail(TUNA_E_FORMAT,
                         "%s: the dataset is empty: all %" PRId64 " examples were dropped because no token was a "
                         "target%s",
                         L->name, S->dropped_untrained,
                         L->o.train_on_responses_only ? " (responses-only masking and truncation left none)" : "");
    }
    tuna_status st = TUNA_OK;
    if (L->o.packing && (st = pack(d, L->o.max_seq_length))) return st;
    S->rows = (int64_t)d->n;
    for (size_t i = 0; i < d->n; i++) {
        const struct tuna_train_example *e = &d->rows[i];
        S->tokens += e->n;
        if (e->n > S->max_len) S->max_len = e->n;
        for (int64_t t = 1; t < e->n; t++)
            S->target_tokens += e->labels[t] != TUNA_LABEL_IGNORE;
    }
    *out = d;
    L->d = NULL;
    return TUNA_OK;
}

tuna_status tuna_dataset_load_text(const char *text, size_t len, const char *name, const tuna_tokenizer *tok,
                                   const struct tuna_chat_template *tmpl, const struct tuna_dataset_opts *o,
                                   tuna_dataset **out)
{
    *out = NULL;
    struct ds_loader L;
    tuna_status st = loader_begin(&L, name, tok, tmpl, o);
    int64_t line = 0;
    size_t pos = 0;
    while (!st && pos < len) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
        line++;
        st = process_line(&L, text + pos, n, line);
        pos += n + 1;
    }
    if (!st) st = loader_end(&L, out);
    tuna_dataset_free(L.d);
    return st;
}

tuna_status tuna_dataset_load(const char *jsonl_path, const tuna_tokenizer *tok, const struct tuna_chat_template *tmpl,
                              const struct tuna_dataset_opts *o, tuna_dataset **out)
{
    *out = NULL;
    FILE *f = fopen(jsonl_path, "rb");
    if (!f) return tuna_fail(TUNA_E_IO, "cannot open the dataset %s: %s", jsonl_path, strerror(errno));
    struct ds_loader L;
    tuna_status st = loader_begin(&L, jsonl_path, tok, tmpl, o);
    char *buf = NULL;
    size_t cap = 0;
    ssize_t n;
    int64_t line = 0;
    while (!st && (n = getline(&buf, &cap, f)) >= 0) {
        line++;
        st = process_line(&L, buf, (size_t)n, line);
    }
    if (!st && ferror(f)) st = tuna_fail(TUNA_E_IO, "reading %s: %s", jsonl_path, strerror(errno));
    free(buf);
    fclose(f);
    if (!st) st = loader_end(&L, out);
    tuna_dataset_free(L.d);
    return st;
}

void tuna_dataset_describe(const tuna_dataset *d, char *buf, size_t cap)
{
    const struct tuna_dataset_stats *S = &d->stats;
    int w = snprintf(
        buf, cap,
        "%" PRId64 " examples (messages %" PRId64 ", sharegpt %" PRId64 ", alpaca %" PRId64 ", text %" PRId64
        ") in %" PRId64 " rows, %" PRId64 " tokens (longest %" PRId64 "), %" PRId64 " targets; truncated %" PRId64
        " examples (%" PRId64 " tokens cut); dropped %" PRId64 " without targets",
        S->examples, S->by_format[0], S->by_format[1], S->by_format[2], S->by_format[3], S->rows, S->tokens, S->max_len,
        S->target_tokens, S->truncated_examples, S->truncated_tokens, S->dropped_untrained);
    if (S->prefix_mismatches && w > 0 && (size_t)w < cap)
        snprintf(buf + w, cap - (size_t)w,
                 "; %" PRId64 " conversations where a prompt's text or tokens do not begin the whole (template "
                 "rewrites, or tokens merging across the boundary; masks follow token counts)",
                 S->prefix_mismatches);
}
