/* openai.c — OpenAI / vLLM request parsing and response JSON. Spec: openai.h; field semantics
 * from vLLM's protocol.py (SERVING.md §4.2). */
#include "serve/openai.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "serve/loras.h"

tuna_status tuna_openai_fail(struct tuna_openai_error *err, int http, const char *param, const char *fmt, ...)
{
    err->http = http;
    err->type = http == 404 ? "NotFoundError" : http == 413 ? "RequestEntityTooLarge"
              : http == 429 ? "TooManyRequests" : http == 401 ? "AuthenticationError"
              : http >= 500 ? "InternalServerError" : "BadRequestError";
    snprintf(err->param, sizeof err->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return TUNA_E_INVALID;
}

char *tuna_openai_error_json(const struct tuna_openai_error *err)
{
    cJSON *o = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(e, "message", err->message);
    cJSON_AddStringToObject(e, "type", err->type ? err->type : "BadRequestError");
    if (err->param[0]) cJSON_AddStringToObject(e, "param", err->param);
    else cJSON_AddNullToObject(e, "param");
    cJSON_AddNumberToObject(e, "code", err->http);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

/* ---- typed field access: absent (and null) → false; wrong type → error ---- */

static const cJSON *field(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

static bool is_int(const cJSON *v)
{
    return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) && fabs(v->valuedouble) < 9.0e15;
}

/* 0 = absent, 1 = set, -1 = error (err set) */
static int get_int(const cJSON *o, const char *k, int64_t lo, int64_t hi, int64_t *out, struct tuna_openai_error *err)
{
    const cJSON *v = field(o, k);
    if (!v) return 0;
    if (!is_int(v)) {
        tuna_openai_fail(err, 400, k, "'%s' must be an integer", k);
        return -1;
    }
    int64_t x = (int64_t)v->valuedouble;
    if (x < lo || x > hi) {
        tuna_openai_fail(err, 400, k, "'%s' must be between %lld and %lld, got %lld", k, (long long)lo,
                         (long long)hi, (long long)x);
        return -1;
    }
    *out = x;
    return 1;
}

static int get_num(const cJSON *o, const char *k, double *out, struct tuna_openai_error *err)
{
    const cJSON *v = field(o, k);
    if (!v) return 0;
    if (!cJSON_IsNumber(v)) {
        tuna_openai_fail(err, 400, k, "'%s' must be a number", k);
        return -1;
    }
    *out = v->valuedouble;
    return 1;
}

static int get_bool(const cJSON *o, const char *k, bool *out, struct tuna_openai_error *err)
{
    const cJSON *v = field(o, k);
    if (!v) return 0;
    if (!cJSON_IsBool(v)) {
        tuna_openai_fail(err, 400, k, "'%s' must be true or false", k);
        return -1;
    }
    *out = cJSON_IsTrue(v);
    return 1;
}

static tuna_status parse_body(const char *body, size_t len, cJSON **out, struct tuna_openai_error *err)
{
    *out = NULL;
    const char *end = NULL;
    cJSON *doc = len ? cJSON_ParseWithLengthOpts(body, len, &end, false) : NULL;
    if (!doc) {
        size_t at = end && end >= body ? (size_t)(end - body) : 0;
        return tuna_openai_fail(err, 400, NULL, "the request body is not valid JSON (problem near byte %zu)", at);
    }
    if (!cJSON_IsObject(doc)) {
        cJSON_Delete(doc);
        return tuna_openai_fail(err, 400, NULL, "the request body must be a JSON object");
    }
    *out = doc;
    return TUNA_OK;
}

/* Token ids from a JSON array, each in [0, vocab). */
static tuna_status id_array(const struct tuna_openai_ctx *c, const cJSON *a, const char *k, int32_t **ids,
                            int64_t *n, struct tuna_openai_error *err)
{
    int64_t m = cJSON_GetArraySize(a), i = 0;
    int32_t *v = malloc(sizeof(int32_t) * (size_t)(m ? m : 1));
    if (!v) return tuna_openai_fail(err, 500, k, "out of memory");
    const cJSON *x;
    cJSON_ArrayForEach(x, a)
    {
        if (!is_int(x) || x->valuedouble < 0 || x->valuedouble >= (double)c->vocab_size) {
            free(v);
            return tuna_openai_fail(err, 400, k, "'%s' item %lld must be a token id in [0, %lld)", k, (long long)i,
                                    (long long)c->vocab_size);
        }
        v[i++] = (int32_t)x->valuedouble;
    }
    *ids = v;
    *n = i;
    return TUNA_OK;
}

static tuna_status encode(const struct tuna_openai_ctx *c, const char *text, bool add_special, const char *k,
                          int32_t **ids, int64_t *n, struct tuna_openai_error *err)
{
    size_t nn = 0;
    if (tuna_tokenizer_encode(c->tok, text, strlen(text), add_special, true, ids, &nn))
        return tuna_openai_fail(err, 400, k, "'%s' cannot be tokenized: %s", k, tuna_last_error());
    *n = (int64_t)nn;
    return TUNA_OK;
}

/* A chat body's messages (and tools, documents, chat_template_kwargs) → the chat template's
 * text → ids (no special tokens added: the template has them). jdoc is the body as
 * tuna_jinja_json_parse reads it, so numbers keep their source text (1.0 stays a float). */
static tuna_status chat_prompt(const struct tuna_openai_ctx *c, const cJSON *jdoc, bool add_gen, bool cont,
                               int32_t **ids, int64_t *n, struct tuna_openai_error *err)
{
    const cJSON *msgs = field(jdoc, "messages");
    if (!cJSON_IsArray(msgs) || cJSON_GetArraySize(msgs) == 0)
        return tuna_openai_fail(err, 400, "messages", "'messages' must be a non-empty array of {role, content}");
    if (!c->chat)
        return tuna_openai_fail(err, 400, "messages", "this model has no chat template (chat_template.jinja, "
                                "chat_template.json or tokenizer_config.json's chat_template); use /v1/completions");
    const cJSON *tools = field(jdoc, "tools"), *docs = field(jdoc, "documents"), *kw = field(jdoc, "chat_template_kwargs");
    if (tools && !cJSON_IsArray(tools))
        return tuna_openai_fail(err, 400, "tools", "'tools' must be a list of {\"type\": \"function\", \"function\": {...}}");
    if (docs && !cJSON_IsArray(docs))
        return tuna_openai_fail(err, 400, "documents", "'documents' must be a list of objects");
    if (kw && !cJSON_IsObject(kw))
        return tuna_openai_fail(err, 400, "chat_template_kwargs", "'chat_template_kwargs' must be an object");
    cJSON *list = cJSON_CreateArray();
    if (!list) return tuna_openai_fail(err, 500, NULL, "out of memory");
    const cJSON *m;
    int i = 0;
    tuna_status st = TUNA_OK;
    cJSON_ArrayForEach(m, msgs)
    {
        const cJSON *role = cJSON_IsObject(m) ? field(m, "role") : NULL, *content = cJSON_IsObject(m) ? field(m, "content") : NULL;
        if (!cJSON_IsString(role)) {
            st = tuna_openai_fail(err, 400, "messages", "messages[%d] needs a string 'role'", i);
            break;
        }
        cJSON *nm = cJSON_Duplicate(m, true); /* other fields (name, tool_calls, ...) pass to the template */
        if (!nm) {
            st = tuna_openai_fail(err, 500, NULL, "out of memory");
            break;
        }
        if (!content || cJSON_IsString(content)) {
            /* as given */
        } else if (cJSON_IsArray(content)) { /* [{type: text, text}] parts, joined with newlines as vLLM */
            size_t tl = 0;
            const cJSON *part;
            cJSON_ArrayForEach(part, content)
            {
                const cJSON *t = cJSON_IsObject(part) ? field(part, "text") : NULL;
                const cJSON *ty = cJSON_IsObject(part) ? field(part, "type") : NULL;
                if (!cJSON_IsString(t) || (ty && (!cJSON_IsString(ty) || strcmp(ty->valuestring, "text")))) {
                    st = tuna_openai_fail(err, 400, "messages", "messages[%d].content parts must be "
                                          "{\"type\": \"text\", \"text\": ...} (no images or audio here)", i);
                    break;
                }
                tl += strlen(t->valuestring) + 1;
            }
            char *joined = st ? NULL : calloc(1, tl + 1);
            if (!st && !joined) st = tuna_openai_fail(err, 500, NULL, "out of memory");
            if (!st) {
                int k = 0;
                cJSON_ArrayForEach(part, content)
                {
                    if (k++) strcat(joined, "\n");
                    strcat(joined, field(part, "text")->valuestring);
                }
                cJSON_ReplaceItemInObjectCaseSensitive(nm, "content", cJSON_CreateString(joined));
            }
            free(joined);
        } else {
            st = tuna_openai_fail(err, 400, "messages", "messages[%d].content must be a string or a list of text parts", i);
        }
        cJSON_AddItemToArray(list, nm);
        if (st) break;
        i++;
    }
    char *text = NULL;
    if (!st) {
        struct tuna_chat_render_opts ro = {.tools = tools, .documents = docs, .extra = kw,
                                           .add_generation_prompt = add_gen, .continue_final_message = cont};
        if (tuna_chat_render(c->chat, list, &ro, &text))
            st = tuna_openai_fail(err, 400, "messages", "the chat template failed on these messages: %s",
                                  tuna_last_error());
    }
    cJSON_Delete(list);
    if (!st) st = encode(c, text, false, "messages", ids, n, err);
    free(text);
    return st;
}

/* The body again, read as the template reads JSON (tuna_jinja_json_parse). */
static tuna_status template_body(const char *body, size_t len, cJSON **out, struct tuna_openai_error *err)
{
    if (tuna_jinja_json_parse(body, len, "the request body", out))
        return tuna_openai_fail(err, 400, "messages", "%s", tuna_last_error());
    return TUNA_OK;
}

/* Chat flags: add_generation_prompt (default true) and continue_final_message (default false). */
static tuna_status chat_flags(const cJSON *doc, bool *add_gen, bool *cont, struct tuna_openai_error *err)
{
    *add_gen = true;
    *cont = false;
    if (get_bool(doc, "add_generation_prompt", add_gen, err) < 0) return TUNA_E_INVALID;
    if (get_bool(doc, "continue_final_message", cont, err) < 0) return TUNA_E_INVALID;
    if (*cont && field(doc, "add_generation_prompt") && *add_gen)
        return tuna_openai_fail(err, 400, "continue_final_message", "'continue_final_message' and "
                                "'add_generation_prompt' cannot both be true");
    if (*cont) *add_gen = false;
    return TUNA_OK;
}

static tuna_status completion_prompt(const struct tuna_openai_ctx *c, const cJSON *pr, int32_t **ids, int64_t *n,
                                     struct tuna_openai_error *err)
{
    if (cJSON_IsString(pr)) return encode(c, pr->valuestring, true, "prompt", ids, n, err);
    if (cJSON_IsArray(pr) && cJSON_GetArraySize(pr) > 0) {
        const cJSON *first = cJSON_GetArrayItem(pr, 0);
        if (cJSON_IsNumber(first)) return id_array(c, pr, "prompt", ids, n, err);
        if (cJSON_GetArraySize(pr) > 1)
            return tuna_openai_fail(err, 400, "prompt", "one prompt per request: send a string, a list of token "
                                    "ids, or a list holding one of those (got a list of %d prompts)",
                                    cJSON_GetArraySize(pr));
        if (cJSON_IsString(first)) return encode(c, first->valuestring, true, "prompt", ids, n, err);
        if (cJSON_IsArray(first) && cJSON_GetArraySize(first) > 0) return id_array(c, first, "prompt", ids, n, err);
    }
    return tuna_openai_fail(err, 400, "prompt", "'prompt' must be a non-empty string, a list of token ids, or a "
                            "list holding one of those");
}

static tuna_status parse_stop(const cJSON *doc, struct tuna_serve_params *p, struct tuna_openai_error *err)
{
    const cJSON *s = field(doc, "stop");
    if (!s) return TUNA_OK;
    if (cJSON_IsString(s)) {
        if (s->valuestring[0]) p->stop[p->n_stop++] = strdup(s->valuestring);
        return TUNA_OK;
    }
    if (!cJSON_IsArray(s)) return tuna_openai_fail(err, 400, "stop", "'stop' must be a string or a list of strings");
    if (cJSON_GetArraySize(s) > TUNA_SERVE_MAX_STOP)
        return tuna_openai_fail(err, 400, "stop", "at most %d stop strings", TUNA_SERVE_MAX_STOP);
    const cJSON *x;
    cJSON_ArrayForEach(x, s)
    {
        if (!cJSON_IsString(x)) return tuna_openai_fail(err, 400, "stop", "'stop' must be a string or a list of strings");
        if (x->valuestring[0]) p->stop[p->n_stop++] = strdup(x->valuestring);
    }
    for (int i = 0; i < p->n_stop; i++)
        if (!p->stop[i]) return tuna_openai_fail(err, 500, NULL, "out of memory");
    return TUNA_OK;
}

static tuna_status parse_sampling(const struct tuna_openai_ctx *c, const cJSON *doc, struct tuna_serve_params *p,
                                  struct tuna_openai_error *err)
{
    struct tuna_sampling *s = &p->sampling;
    *s = c->defaults;
    double d;
    int64_t v;
    int r;
    if ((r = get_num(doc, "temperature", &d, err)) < 0) return TUNA_E_INVALID;
    if (r) s->temperature = (float)d;
    if ((r = get_num(doc, "top_p", &d, err)) < 0) return TUNA_E_INVALID;
    if (r) s->top_p = (float)d;
    if ((r = get_int(doc, "top_k", -1, INT32_MAX, &v, err)) < 0) return TUNA_E_INVALID;
    if (r) s->top_k = v;
    if ((r = get_num(doc, "min_p", &d, err)) < 0) return TUNA_E_INVALID;
    if (r) s->min_p = (float)d;
    if ((r = get_num(doc, "repetition_penalty", &d, err)) < 0) return TUNA_E_INVALID;
    if (r) s->repetition_penalty = (float)d;
    if ((r = get_num(doc, "presence_penalty", &d, err)) < 0) return TUNA_E_INVALID;
    if (r) s->presence_penalty = (float)d;
    if ((r = get_num(doc, "frequency_penalty", &d, err)) < 0) return TUNA_E_INVALID;
    if (r) s->frequency_penalty = (float)d;
    if ((r = get_int(doc, "seed", INT64_MIN / 2, INT64_MAX / 2, &v, err)) < 0) return TUNA_E_INVALID;
    if (r) {
        s->seed = (uint64_t)v;
        s->has_seed = true;
    }
    if (!(s->temperature >= 0)) return tuna_openai_fail(err, 400, "temperature", "'temperature' must be >= 0, got %g", s->temperature);
    if (!(s->top_p > 0 && s->top_p <= 1)) return tuna_openai_fail(err, 400, "top_p", "'top_p' must be in (0, 1], got %g", s->top_p);
    if (!(s->min_p >= 0 && s->min_p <= 1)) return tuna_openai_fail(err, 400, "min_p", "'min_p' must be in [0, 1], got %g", s->min_p);
    if (!(s->repetition_penalty > 0))
        return tuna_openai_fail(err, 400, "repetition_penalty", "'repetition_penalty' must be > 0, got %g", s->repetition_penalty);
    if (!(fabsf(s->presence_penalty) <= 2))
        return tuna_openai_fail(err, 400, "presence_penalty", "'presence_penalty' must be in [-2, 2], got %g", s->presence_penalty);
    if (!(fabsf(s->frequency_penalty) <= 2))
        return tuna_openai_fail(err, 400, "frequency_penalty", "'frequency_penalty' must be in [-2, 2], got %g", s->frequency_penalty);
    if (s->top_k < 0) s->top_k = 0; /* -1 = off, as vLLM */
    if (tuna_sampling_check(s)) return tuna_openai_fail(err, 400, NULL, "%s", tuna_last_error());
    return TUNA_OK;
}

static tuna_status parse_model(const struct tuna_openai_ctx *c, const cJSON *doc, struct tuna_serve_params *p,
                               struct tuna_openai_error *err)
{
    const cJSON *m = field(doc, "model");
    p->adapter = -1;
    if (!m) {
        p->model = strdup(c->model_name);
        return p->model ? TUNA_OK : tuna_openai_fail(err, 500, NULL, "out of memory");
    }
    if (!cJSON_IsString(m)) return tuna_openai_fail(err, 400, "model", "'model' must be a string");
    if (strcmp(m->valuestring, c->model_name) != 0 && c->loras) {
        int k = tuna_serve_loras_pin(c->loras, m->valuestring);
        if (k < 0)
            return tuna_openai_fail(err, 404, "model", "The model `%s` does not exist. Served: `%s` and the adapters "
                                    "GET /v1/models lists", m->valuestring, c->model_name);
        p->adapter = k;
        p->loras = c->loras;
    } else if (strcmp(m->valuestring, c->model_name) != 0) {
        int k = 0;
        while (k < c->n_adapters && strcmp(c->adapters[k], m->valuestring)) k++;
        if (k == c->n_adapters)
            return tuna_openai_fail(err, 404, "model", "The model `%s` does not exist. Served: `%s`%s (see GET "
                                    "/v1/models)", m->valuestring, c->model_name, c->n_adapters ? " and its adapters" : "");
        p->adapter = k;
    }
    p->model = strdup(m->valuestring);
    return p->model ? TUNA_OK : tuna_openai_fail(err, 500, NULL, "out of memory");
}

static tuna_status parse_options(const struct tuna_openai_ctx *c, enum tuna_serve_kind kind, const cJSON *doc,
                                 struct tuna_serve_params *p, struct tuna_openai_error *err)
{
    int64_t v;
    int r;
    p->max_tokens = -1;
    const char *mt = kind == TUNA_SERVE_CHAT && field(doc, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    if ((r = get_int(doc, mt, 1, INT32_MAX, &v, err)) < 0) return TUNA_E_INVALID;
    if (r) p->max_tokens = v;
    if ((r = get_int(doc, "min_tokens", 0, INT32_MAX, &v, err)) < 0) return TUNA_E_INVALID;
    if (r) p->min_tokens = v;
    p->n = 1;
    if ((r = get_int(doc, "n", 1, TUNA_SERVE_MAX_N, &v, err)) < 0) return TUNA_E_INVALID;
    if (r) p->n = (int)v;
    if (get_bool(doc, "ignore_eos", &p->ignore_eos, err) < 0) return TUNA_E_INVALID;
    p->skip_special = true;
    if (get_bool(doc, "skip_special_tokens", &p->skip_special, err) < 0) return TUNA_E_INVALID;
    if (get_bool(doc, "stream", &p->stream, err) < 0) return TUNA_E_INVALID;
    const cJSON *so = field(doc, "stream_options");
    if (so) {
        if (!cJSON_IsObject(so)) return tuna_openai_fail(err, 400, "stream_options", "'stream_options' must be an object");
        if (!p->stream)
            return tuna_openai_fail(err, 400, "stream_options", "Stream options can only be defined when `stream=True`.");
        if (get_bool(so, "include_usage", &p->include_usage, err) < 0) return TUNA_E_INVALID;
    }
    if (kind == TUNA_SERVE_CHAT) {
        if (get_bool(doc, "logprobs", &p->logprobs, err) < 0) return TUNA_E_INVALID;
        if ((r = get_int(doc, "top_logprobs", 0, TUNA_SERVE_MAX_TOP_LOGPROBS, &v, err)) < 0) return TUNA_E_INVALID;
        if (r && v > 0 && !p->logprobs)
            return tuna_openai_fail(err, 400, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
        if (r) p->top_logprobs = (int)v;
    } else {
        if ((r = get_int(doc, "logprobs", 0, TUNA_SERVE_MAX_TOP_LOGPROBS, &v, err)) < 0) return TUNA_E_INVALID;
        if (r) {
            p->logprobs = true;
            p->top_logprobs = (int)v;
        }
    }
    const cJSON *sti = field(doc, "stop_token_ids");
    if (sti) {
        if (!cJSON_IsArray(sti) || cJSON_GetArraySize(sti) > 16)
            return tuna_openai_fail(err, 400, "stop_token_ids", "'stop_token_ids' must be a list of at most 16 token ids");
        const cJSON *x;
        cJSON_ArrayForEach(x, sti)
        {
            if (!is_int(x) || x->valuedouble < 0 || x->valuedouble >= (double)c->vocab_size)
                return tuna_openai_fail(err, 400, "stop_token_ids", "'stop_token_ids' items must be token ids in [0, %lld)",
                                        (long long)c->vocab_size);
            p->stop_ids[p->n_stop_ids++] = (int64_t)x->valuedouble;
        }
    }
    if (!p->ignore_eos)
        for (int i = 0; i < c->n_eos && p->n_stop_ids < 32; i++) p->stop_ids[p->n_stop_ids++] = c->eos_ids[i];
    return parse_stop(doc, p, err);
}

tuna_status tuna_openai_parse(const struct tuna_openai_ctx *c, enum tuna_serve_kind kind, const char *body,
                              size_t len, struct tuna_serve_params *out, struct tuna_openai_error *err)
{
    memset(out, 0, sizeof *out);
    out->kind = kind;
    cJSON *doc;
    tuna_status st = parse_body(body, len, &doc, err);
    if (st) return st;
    st = parse_model(c, doc, out, err);
    if (!st) st = parse_sampling(c, doc, out, err);
    if (!st) st = parse_options(c, kind, doc, out, err);
    if (!st) {
        if (kind == TUNA_SERVE_CHAT) {
            bool add_gen, cont;
            cJSON *jdoc = NULL;
            st = chat_flags(doc, &add_gen, &cont, err);
            if (!st && !field(doc, "messages")) st = tuna_openai_fail(err, 400, "messages", "'messages' is required");
            if (!st) st = template_body(body, len, &jdoc, err);
            if (!st) st = chat_prompt(c, jdoc, add_gen, cont, &out->prompt, &out->n_prompt, err);
            cJSON_Delete(jdoc);
        } else {
            const cJSON *pr = field(doc, "prompt");
            if (!pr) st = tuna_openai_fail(err, 400, "prompt", "'prompt' is required");
            else st = completion_prompt(c, pr, &out->prompt, &out->n_prompt, err);
        }
    }
    if (!st && out->n_prompt == 0) st = tuna_openai_fail(err, 400, "prompt", "the prompt is empty after tokenization");
    if (!st) {
        int64_t room = c->max_model_len - out->n_prompt;
        if (out->max_tokens < 0 && room > 0) out->max_tokens = room;
        if (room <= 0 || out->max_tokens > room)
            st = tuna_openai_fail(err, 400, kind == TUNA_SERVE_CHAT ? "messages" : "prompt",
                                  "This model's maximum context length is %lld tokens. However, you requested %lld "
                                  "tokens (%lld in the %s, %lld in the completion). Please reduce the length of the "
                                  "%s or completion.", (long long)c->max_model_len,
                                  (long long)(out->n_prompt + (out->max_tokens > 0 ? out->max_tokens : 0)),
                                  (long long)out->n_prompt, kind == TUNA_SERVE_CHAT ? "messages" : "prompt",
                                  (long long)(out->max_tokens > 0 ? out->max_tokens : 0),
                                  kind == TUNA_SERVE_CHAT ? "messages" : "prompt");
    }
    cJSON_Delete(doc);
    if (st) tuna_serve_params_free(out);
    return st;
}

/* ---- responses ---- */

void tuna_openai_acc_init(struct tuna_openai_acc *a, int n)
{
    memset(a, 0, sizeof *a);
    a->n = n;
}

tuna_status tuna_openai_acc_add(struct tuna_openai_acc *a, const struct tuna_serve_event *e)
{
    if (e->choice < 0 || e->choice >= a->n) return TUNA_E_INTERNAL;
    struct tuna_openai_choice *c = &a->ch[e->choice];
    if (c->len + e->len + 1 > c->cap) {
        size_t cap = c->cap ? c->cap : 256;
        while (cap < c->len + e->len + 1) cap *= 2;
        char *t = realloc(c->text, cap);
        if (!t) return tuna_fail_oom("response text", cap);
        c->text = t;
        c->cap = cap;
    }
    if (e->len) memcpy(c->text + c->len, e->text, e->len);
    c->len += e->len;
    c->text[c->len] = '\0';
    if (e->n_lps) {
        if (c->n_lps + e->n_lps > c->cap_lps) {
            int cap = c->cap_lps ? c->cap_lps : 16;
            while (cap < c->n_lps + e->n_lps) cap *= 2;
            struct tuna_serve_token_lp *l = realloc(c->lps, (size_t)cap * sizeof *l);
            if (!l) return tuna_fail_oom("logprobs", (size_t)cap * sizeof *l);
            c->lps = l;
            c->cap_lps = cap;
        }
        memcpy(c->lps + c->n_lps, e->lps, (size_t)e->n_lps * sizeof *e->lps);
        c->n_lps += e->n_lps;
    }
    if (e->finish) c->finish = e->finish;
    return TUNA_OK;
}

void tuna_openai_acc_free(struct tuna_openai_acc *a)
{
    for (int i = 0; i < TUNA_SERVE_MAX_N; i++) {
        free(a->ch[i].text);
        free(a->ch[i].lps);
    }
    memset(a, 0, sizeof *a);
}

static char *tok_str(const struct tuna_openai_ctx *c, int32_t id)
{
    char *s = NULL;
    if (tuna_tokenizer_decode(c->tok, &id, 1, false, &s)) return strdup("");
    return s;
}

static void add_bytes(cJSON *o, const char *s)
{
    cJSON *b = cJSON_AddArrayToObject(o, "bytes");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) cJSON_AddItemToArray(b, cJSON_CreateNumber(*p));
}

static cJSON *logprobs_json(const struct tuna_openai_ctx *c, enum tuna_serve_kind kind,
                            const struct tuna_serve_token_lp *lps, int n, size_t *text_offset)
{
    if (kind == TUNA_SERVE_CHAT) {
        cJSON *o = cJSON_CreateObject(), *content = cJSON_AddArrayToObject(o, "content");
        for (int i = 0; i < n; i++) {
            cJSON *t = cJSON_CreateObject();
            char *s = tok_str(c, lps[i].id);
            cJSON_AddStringToObject(t, "token", s ? s : "");
            cJSON_AddNumberToObject(t, "logprob", fmax(lps[i].logprob, -9999.0));
            add_bytes(t, s ? s : "");
            free(s);
            cJSON *top = cJSON_AddArrayToObject(t, "top_logprobs");
            for (int k = 0; k < lps[i].n_top; k++) {
                cJSON *x = cJSON_CreateObject();
                char *ts = tok_str(c, lps[i].top_id[k]);
                cJSON_AddStringToObject(x, "token", ts ? ts : "");
                cJSON_AddNumberToObject(x, "logprob", fmax(lps[i].top_lp[k], -9999.0));
                add_bytes(x, ts ? ts : "");
                free(ts);
                cJSON_AddItemToArray(top, x);
            }
            cJSON_AddItemToArray(content, t);
        }
        return o;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON *offs = cJSON_AddArrayToObject(o, "text_offset"), *tlp = cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON *toks = cJSON_AddArrayToObject(o, "tokens"), *top = cJSON_AddArrayToObject(o, "top_logprobs");
    for (int i = 0; i < n; i++) {
        char *s = tok_str(c, lps[i].id);
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)*text_offset));
        *text_offset += s ? strlen(s) : 0;
        cJSON_AddItemToArray(tlp, cJSON_CreateNumber(fmax(lps[i].logprob, -9999.0)));
        cJSON_AddItemToArray(toks, cJSON_CreateString(s ? s : ""));
        free(s);
        cJSON *d = cJSON_CreateObject();
        for (int k = 0; k < lps[i].n_top; k++) {
            char *ts = tok_str(c, lps[i].top_id[k]);
            if (!cJSON_GetObjectItemCaseSensitive(d, ts ? ts : ""))
                cJSON_AddNumberToObject(d, ts ? ts : "", fmax(lps[i].top_lp[k], -9999.0));
            free(ts);
        }
        cJSON_AddItemToArray(top, d);
    }
    return o;
}

static void add_usage(cJSON *o, struct tuna_serve_req *r)
{
    pthread_mutex_lock(&r->mu);
    int64_t comp = r->completion_tokens;
    pthread_mutex_unlock(&r->mu);
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", (double)r->p.n_prompt);
    cJSON_AddNumberToObject(u, "total_tokens", (double)(r->p.n_prompt + comp));
    cJSON_AddNumberToObject(u, "completion_tokens", (double)comp);
}

static cJSON *head(struct tuna_serve_req *r, bool chunk)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", r->id);
    cJSON_AddStringToObject(o, "object", r->p.kind == TUNA_SERVE_CHAT ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                                                      : "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)r->created);
    cJSON_AddStringToObject(o, "model", r->p.model ? r->p.model : "");
    return o;
}

static const char *api_finish(const char *f)
{
    return f && !strcmp(f, "length") ? "length" : f && !strcmp(f, "stop") ? "stop" : f ? "abort" : NULL;
}

char *tuna_openai_response_json(const struct tuna_openai_ctx *c, struct tuna_serve_req *r,
                                const struct tuna_openai_acc *a)
{
    cJSON *o = head(r, false), *choices = cJSON_AddArrayToObject(o, "choices");
    for (int i = 0; i < a->n; i++) {
        const struct tuna_openai_choice *ch = &a->ch[i];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "index", i);
        if (r->p.kind == TUNA_SERVE_CHAT) {
            cJSON *m = cJSON_AddObjectToObject(x, "message");
            cJSON_AddStringToObject(m, "role", "assistant");
            cJSON_AddStringToObject(m, "content", ch->text ? ch->text : "");
        } else {
            cJSON_AddStringToObject(x, "text", ch->text ? ch->text : "");
        }
        size_t off = 0;
        if (r->p.logprobs) cJSON_AddItemToObject(x, "logprobs", logprobs_json(c, r->p.kind, ch->lps, ch->n_lps, &off));
        else cJSON_AddNullToObject(x, "logprobs");
        cJSON_AddStringToObject(x, "finish_reason", api_finish(ch->finish) ? api_finish(ch->finish) : "abort");
        cJSON_AddNullToObject(x, "stop_reason");
        cJSON_AddItemToArray(choices, x);
    }
    add_usage(o, r);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

static char *sse(cJSON *o)
{
    char *j = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!j) return NULL;
    size_t n = strlen(j);
    char *s = malloc(n + 9);
    if (s) {
        memcpy(s, "data: ", 6);
        memcpy(s + 6, j, n);
        memcpy(s + 6 + n, "\n\n", 3);
    }
    free(j);
    return s;
}

char *tuna_openai_stream_chunk(const struct tuna_openai_ctx *c, struct tuna_serve_req *r,
                               const struct tuna_serve_event *e, bool first)
{
    cJSON *o = head(r, true), *choices = cJSON_AddArrayToObject(o, "choices"), *x = cJSON_CreateObject();
    cJSON_AddNumberToObject(x, "index", e->choice);
    if (r->p.kind == TUNA_SERVE_CHAT) {
        cJSON *d = cJSON_AddObjectToObject(x, "delta");
        if (first) cJSON_AddStringToObject(d, "role", "assistant");
        if (e->len || first || !e->finish) cJSON_AddStringToObject(d, "content", e->text ? e->text : "");
    } else {
        cJSON_AddStringToObject(x, "text", e->text ? e->text : "");
    }
    size_t off = 0;
    if (r->p.logprobs && e->n_lps) cJSON_AddItemToObject(x, "logprobs", logprobs_json(c, r->p.kind, e->lps, e->n_lps, &off));
    else cJSON_AddNullToObject(x, "logprobs");
    if (e->finish) cJSON_AddStringToObject(x, "finish_reason", api_finish(e->finish));
    else cJSON_AddNullToObject(x, "finish_reason");
    cJSON_AddItemToArray(choices, x);
    return sse(o);
}

char *tuna_openai_usage_chunk(const struct tuna_openai_ctx *c, struct tuna_serve_req *r)
{
    (void)c;
    cJSON *o = head(r, true);
    cJSON_AddArrayToObject(o, "choices");
    add_usage(o, r);
    return sse(o);
}

/* ---- vLLM extras ---- */

char *tuna_openai_tokenize(const struct tuna_openai_ctx *c, const char *body, size_t len, struct tuna_openai_error *err)
{
    cJSON *doc;
    if (parse_body(body, len, &doc, err)) return NULL;
    int32_t *ids = NULL;
    int64_t n = 0;
    tuna_status st = TUNA_OK;
    bool add_special = true, add_gen = true, cont = false;
    const cJSON *pr = field(doc, "prompt"), *msgs = field(doc, "messages");
    if (get_bool(doc, "add_special_tokens", &add_special, err) < 0 || chat_flags(doc, &add_gen, &cont, err))
        st = TUNA_E_INVALID;
    else if (msgs) {
        cJSON *jdoc = NULL;
        st = template_body(body, len, &jdoc, err);
        if (!st) st = chat_prompt(c, jdoc, add_gen, cont, &ids, &n, err);
        cJSON_Delete(jdoc);
    }
    else if (cJSON_IsString(pr)) st = encode(c, pr->valuestring, add_special, "prompt", &ids, &n, err);
    else st = tuna_openai_fail(err, 400, "prompt", "/tokenize needs 'prompt' (a string) or 'messages'");
    char *out = NULL;
    if (!st) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "count", (double)n);
        cJSON_AddNumberToObject(o, "max_model_len", (double)c->max_model_len);
        cJSON *t = cJSON_AddArrayToObject(o, "tokens");
        for (int64_t i = 0; i < n; i++) cJSON_AddItemToArray(t, cJSON_CreateNumber(ids[i]));
        out = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
    }
    free(ids);
    cJSON_Delete(doc);
    return out;
}

char *tuna_openai_detokenize(const struct tuna_openai_ctx *c, const char *body, size_t len, struct tuna_openai_error *err)
{
    cJSON *doc;
    if (parse_body(body, len, &doc, err)) return NULL;
    const cJSON *t = field(doc, "tokens");
    int32_t *ids = NULL;
    int64_t n = 0;
    char *text = NULL, *out = NULL;
    tuna_status st = cJSON_IsArray(t) ? id_array(c, t, "tokens", &ids, &n, err)
                                      : tuna_openai_fail(err, 400, "tokens", "/detokenize needs 'tokens' (a list of ids)");
    if (!st && tuna_tokenizer_decode(c->tok, ids, (size_t)n, false, &text))
        st = tuna_openai_fail(err, 400, "tokens", "%s", tuna_last_error());
    if (!st) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "prompt", text);
        out = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
    }
    free(text);
    free(ids);
    cJSON_Delete(doc);
    return out;
}

static cJSON *model_entry(const struct tuna_openai_ctx *c, const char *id, const char *root, const char *parent,
                          int64_t created)
{
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", id);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)created);
    cJSON_AddStringToObject(m, "owned_by", "tuna");
    cJSON_AddStringToObject(m, "root", root ? root : id);
    if (parent) cJSON_AddStringToObject(m, "parent", parent);
    else cJSON_AddNullToObject(m, "parent");
    cJSON_AddNumberToObject(m, "max_model_len", (double)c->max_model_len);
    return m;
}

struct models_arg {
    const struct tuna_openai_ctx *c;
    cJSON *data;
    int64_t created;
};

static void add_adapter_entry(void *arg, const char *name, const char *root)
{
    struct models_arg *a = arg;
    cJSON_AddItemToArray(a->data, model_entry(a->c, name, root, a->c->model_name, a->created));
}

char *tuna_openai_models_json(const struct tuna_openai_ctx *c, int64_t created)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *d = cJSON_AddArrayToObject(o, "data");
    cJSON_AddItemToArray(d, model_entry(c, c->model_name, c->model_root, NULL, created));
    if (c->loras) {
        struct models_arg ma = {c, d, created};
        tuna_serve_loras_each(c->loras, add_adapter_entry, &ma);
    }
    for (int i = 0; i < c->n_adapters; i++)
        cJSON_AddItemToArray(d, model_entry(c, c->adapters[i], c->adapter_roots ? c->adapter_roots[i] : NULL,
                                            c->model_name, created));
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}
