/* chat.h — a model folder's chat template: finding it, its special tokens, rendering messages.
 *
 * Where the template comes from, in transformers' order of precedence:
 *   1. chat_template.jinja           (the template text)
 *   2. chat_template.json            ({"chat_template": "..."}, as processors save it)
 *   3. tokenizer_config.json's "chat_template": a string, or a list of {"name", "template"}
 * Special tokens (bos_token, eos_token, unk_token, pad_token, sep_token, cls_token, mask_token)
 * come from tokenizer_config.json (a plain string or {"__type": "AddedToken", "content": ...}),
 * else from special_tokens_map.json.
 *
 * Rendering passes what transformers' apply_chat_template passes: messages, tools (None when
 * absent), documents (None when absent), add_generation_prompt, the special tokens, and any
 * extra variables.
 */
#ifndef TUNA_CHAT_H
#define TUNA_CHAT_H

#include <stdbool.h>

#include <cjson/cJSON.h>

#include "tokenizer/jinja/jinja.h"
#include "tuna.h"

struct tuna_chat_named {
    char *name;               /* "default", "tool_use", ... */
    char *source;             /* template text */
    tuna_jinja_template *tpl; /* parsed with transformers' options */
};

struct tuna_chat_template {
    struct tuna_chat_named *templates; /* [n] */
    int n;
    char *origin;    /* the file the template came from, for messages */
    cJSON *specials; /* object: bos_token, eos_token, ... (strings) that were found */
};

/* Loads and parses the chat template and special tokens of a model folder. TUNA_E_NOT_FOUND when
 * the folder has no chat template; a template that does not parse fails here, naming the file. *out is taken by the
 * caller (tuna_chat_free). */
tuna_status tuna_chat_load(const char *dir, struct tuna_chat_template **out);

/* Builds one from template text (special tokens from `specials`, may be NULL; copied). */
tuna_status tuna_chat_from_source(const char *source, const cJSON *specials, struct tuna_chat_template **out);

void tuna_chat_free(struct tuna_chat_template *ct);

struct tuna_chat_render_opts {
    const cJSON *tools;        /* array or NULL */
    const cJSON *documents;    /* array or NULL */
    const cJSON *extra;        /* object of further template variables or NULL */
    const char *template_name; /* NULL: "tool_use" when tools are given and it exists, else "default" */
    bool add_generation_prompt;
    bool continue_final_message; /* end the text right after the last message's content, as
                                  * transformers' continue_final_message (assistant prefill) */
    int64_t now;                 /* for strftime_now; 0 = current time */
};

/* Renders `messages` (a JSON array of {"role", "content", ...}). *out is malloc'd, taken by the
 * caller. Errors name the template's origin and the line and column in it. */
tuna_status tuna_chat_render(const struct tuna_chat_template *ct, const cJSON *messages,
                             const struct tuna_chat_render_opts *opt, char **out);

#endif
