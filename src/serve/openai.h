/* openai.h — the OpenAI-compatible request and response JSON, as vLLM's server reads and writes
 * it: /v1/completions and /v1/chat/completions bodies into tuna_serve_params (with the model's
 * generation_config.json defaults and EOS ids), the response objects, stream chunks
 * (Server-Sent Events), /tokenize, /detokenize, /v1/models and the error object
 * {"error": {"message", "type", "param", "code"}}.
 *
 * Nothing here touches the network or the engine, so every case is unit-tested (test_openai.c).
 */
#ifndef TUNA_SERVE_OPENAI_H
#define TUNA_SERVE_OPENAI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "serve/request.h"
#include "chat/chat.h"
#include "tokenizer/tokenizer.h"

struct tuna_serve_loras;

struct tuna_openai_ctx {
    const tuna_tokenizer *tok;
    const struct tuna_chat_template *chat;    /* chat.h; NULL: chat requests are refused */
    const char *model_name;                   /* served name of the base model */
    const char *model_root;                   /* its folder (shown in /v1/models) */
    struct tuna_serve_loras *loras;           /* loras.h: adapters that come and go (pinned per request);
                                               * when NULL, the fixed list below */
    const char *const *adapters;              /* [n_adapters] served LoRA adapter names */
    const char *const *adapter_roots;         /* [n_adapters] their folders, or NULL */
    int n_adapters;
    int64_t max_model_len;
    int64_t vocab_size;                       /* the model's: token ids must be below it */
    struct tuna_sampling defaults;            /* generation_config.json (greedy without) */
    const int64_t *eos_ids;                   /* stops unless ignore_eos */
    int n_eos;
};

struct tuna_openai_error {
    int http;            /* 400, 404, 413, 429, 500, ... */
    const char *type;    /* "BadRequestError", "NotFoundError", ... (static) */
    char param[64];      /* the offending field, "" when none */
    char message[1024];
};

/* Sets err (printf-style message) and returns TUNA_E_INVALID. */
tuna_status tuna_openai_fail(struct tuna_openai_error *err, int http, const char *param, const char *fmt, ...)
    TUNA_PRINTF(4, 5);

/* Parses and checks a completion (kind COMPLETION) or chat (CHAT) request body: renders the
 * chat template (chat.h: messages, tools, documents, chat_template_kwargs, continue_final_message;
 * the messages are read with tuna_jinja_json_parse so 1.0 stays a float in the template),
 * tokenizes, resolves the model/adapter (pinning it, see loras.h), fills defaults. On failure returns a
 * status and err says what to answer; out is left empty. */
tuna_status tuna_openai_parse(const struct tuna_openai_ctx *c, enum tuna_serve_kind kind, const char *body,
                              size_t len, struct tuna_serve_params *out, struct tuna_openai_error *err);

/* {"error": {...}} (malloc'd). */
char *tuna_openai_error_json(const struct tuna_openai_error *err);

/* Collects a request's events into the non-streamed response. */
struct tuna_openai_choice {
    char *text;
    size_t len, cap;
    const char *finish;
    struct tuna_serve_token_lp *lps;
    int n_lps, cap_lps;
};
struct tuna_openai_acc {
    struct tuna_openai_choice ch[TUNA_SERVE_MAX_N];
    int n;
};
void tuna_openai_acc_init(struct tuna_openai_acc *a, int n);
tuna_status tuna_openai_acc_add(struct tuna_openai_acc *a, const struct tuna_serve_event *e);
void tuna_openai_acc_free(struct tuna_openai_acc *a);
/* The whole response object (malloc'd), usage included. */
char *tuna_openai_response_json(const struct tuna_openai_ctx *c, struct tuna_serve_req *r,
                                const struct tuna_openai_acc *a);

/* "data: {...}\n\n" for one event (malloc'd); first: the choice's first chunk (chat: carries
 * the role). */
char *tuna_openai_stream_chunk(const struct tuna_openai_ctx *c, struct tuna_serve_req *r,
                               const struct tuna_serve_event *e, bool first);
/* The final usage chunk "data: {... "choices": [], "usage": {...}}\n\n" (malloc'd). */
char *tuna_openai_usage_chunk(const struct tuna_openai_ctx *c, struct tuna_serve_req *r);

/* /tokenize, /detokenize bodies → response JSON (malloc'd) or NULL with err set. */
char *tuna_openai_tokenize(const struct tuna_openai_ctx *c, const char *body, size_t len,
                           struct tuna_openai_error *err);
char *tuna_openai_detokenize(const struct tuna_openai_ctx *c, const char *body, size_t len,
                             struct tuna_openai_error *err);
/* /v1/models (malloc'd). */
char *tuna_openai_models_json(const struct tuna_openai_ctx *c, int64_t created);

#endif
