/* chat.c — finding a model folder's chat template and special tokens, and rendering messages
 * with them as transformers' apply_chat_template does (see chat.h). */
#include "chat/chat.h"

#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"

static const char *const SPECIAL_NAMES[] = {"bos_token", "eos_token", "unk_token",  "pad_token",
                                            "sep_token", "cls_token", "mask_token", NULL};

void tuna_chat_free(struct tuna_chat_template *ct)
{
    if (!ct) return;
    for (int i = 0; i < ct->n; i++) {
        free(ct->templates[i].name);
        free(ct->templates[i].source);
        tuna_jinja_free(ct->templates[i].tpl);
    }
    free(ct->templates);
    free(ct->origin);
    cJSON_Delete(ct->specials);
    free(ct);
}

static tuna_status add_template(struct tuna_chat_template *ct, const char *name, const char *src)
{
    struct tuna_chat_named *nt = realloc(ct->templates, (size_t)(ct->n + 1) * sizeof *nt);
    if (!nt) return tuna_fail_oom("chat templates", 0);
    ct->templates = nt;
    struct tuna_chat_named *t = &nt[ct->n];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    t->source = strdup(src);
    ct->n++;
    if (!t->name || !t->source) return tuna_fail_oom("chat template", strlen(src));
    struct tuna_jinja_options o = tuna_jinja_hf_options();
    tuna_status st = tuna_jinja_parse(src, strlen(src), &o, &t->tpl);
    if (st) return tuna_fail_prefix(st, "chat template '%s' of %s", name, ct->origin ? ct->origin : "(text)");
    return TUNA_OK;
}

/* A special token as tokenizer_config.json writes it: "text" or {"content": "text", ...}. */
static const char *token_text(const cJSON *v)
{
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsObject(v)) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(v, "content");
        if (cJSON_IsString(c)) return c->valuestring;
    }
    return NULL;
}

static void take_specials(struct tuna_chat_template *ct, const cJSON *cfg)
{
    for (int i = 0; SPECIAL_NAMES[i]; i++) {
        if (cJSON_GetObjectItemCaseSensitive(ct->specials, SPECIAL_NAMES[i])) continue;
        const char *t = token_text(cJSON_GetObjectItemCaseSensitive(cfg, SPECIAL_NAMES[i]));
        if (t) cJSON_AddStringToObject(ct->specials, SPECIAL_NAMES[i], t);
    }
}

/* tokenizer_config.json's chat_template: a string or a list of {name, template} */
static tuna_status templates_from_field(struct tuna_chat_template *ct, const cJSON *f, const char *path)
{
    if (cJSON_IsString(f)) return add_template(ct, "default", f->valuestring);
    if (!cJSON_IsArray(f))
        return tuna_fail(TUNA_E_FORMAT, "%s: \"chat_template\" must be a string or a list of {name, template}", path);
    const cJSON *e;
    cJSON_ArrayForEach(e, f)
    {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(e, "name");
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(e, "template");
        if (!cJSON_IsString(n) || !cJSON_IsString(t))
            return tuna_fail(TUNA_E_FORMAT, "%s: a \"chat_template\" list entry lacks a string name or template", path);
        tuna_status st = add_template(ct, n->valuestring, t->valuestring);
        if (st) return st;
    }
    return TUNA_OK;
}

tuna_status tuna_chat_load(const char *dir, struct tuna_chat_template **out)
{
    *out = NULL;
    struct tuna_chat_template *ct = calloc(1, sizeof *ct);
    if (!ct || !(ct->specials = cJSON_CreateObject())) {
        free(ct);
        return tuna_fail_oom("chat template", sizeof *ct);
    }
    tuna_status st = TUNA_OK;
    cJSON *cfg = NULL, *map = NULL, *ctj = NULL;
    char *jinja_path = tuna_path_join(dir, "chat_template.jinja");
    char *json_path = tuna_path_join(dir, "chat_template.json");
    char *cfg_path = tuna_path_join(dir, "tokenizer_config.json");
    char *map_path = tuna_path_join(dir, "special_tokens_map.json");
    char *text = NULL;
    if (!jinja_path || !json_path || !cfg_path || !map_path) {
        st = tuna_fail_oom("paths", 0);
        goto done;
    }
    if (tuna_path_exists(cfg_path) && (st = tuna_json_load(cfg_path, 0, &cfg))) goto done;
    if (tuna_path_exists(map_path) && (st = tuna_json_load(map_path, 0, &map))) goto done;
    if (cfg) take_specials(ct, cfg);
    if (map) take_specials(ct, map);

    if (tuna_path_exists(jinja_path)) {
        size_t len;
        if ((st = tuna_read_file(jinja_path, 16u << 20, &text, &len))) goto done;
        ct->origin = strdup(jinja_path);
        st = add_template(ct, "default", text);
    } else if (tuna_path_exists(json_path)) {
        if ((st = tuna_json_load(json_path, 0, &ctj))) goto done;
        ct->origin = strdup(json_path);
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(ctj, "chat_template");
        if (!f) {
            st = tuna_fail(TUNA_E_FORMAT, "%s has no \"chat_template\" key", json_path);
            goto done;
        }
        st = templates_from_field(ct, f, json_path);
    } else if (cfg && tuna_json_member(cfg, "chat_template")) {
        ct->origin = strdup(cfg_path);
        st = templates_from_field(ct, tuna_json_member(cfg, "chat_template"), cfg_path);
    } else {
        st = tuna_fail(TUNA_E_NOT_FOUND,
                       "%s has no chat template (looked for chat_template.jinja, chat_template.json and "
                       "\"chat_template\" in tokenizer_config.json); pass one explicitly or use a chat model's folder",
                       dir);
    }
done:
    free(jinja_path);
    free(json_path);
    free(cfg_path);
    free(map_path);
    free(text);
    cJSON_Delete(cfg);
    cJSON_Delete(map);
    cJSON_Delete(ctj);
    if (st) {
        tuna_chat_free(ct);
        return st;
    }
    *out = ct;
    return TUNA_OK;
}

tuna_status tuna_chat_from_source(const char *source, const cJSON *specials, struct tuna_chat_template **out)
{
    *out = NULL;
    struct tuna_chat_template *ct = calloc(1, sizeof *ct);
    if (!ct) return tuna_fail_oom("chat template", sizeof *ct);
    ct->specials = specials ? cJSON_Duplicate(specials, 1) : cJSON_CreateObject();
    tuna_status st = ct->specials ? add_template(ct, "default", source) : tuna_fail_oom("chat template", 0);
    if (st) {
        tuna_chat_free(ct);
        return st;
    }
    *out = ct;
    return TUNA_OK;
}

static const struct tuna_chat_named *pick(const struct tuna_chat_template *ct, const struct tuna_chat_render_opts *o)
{
    const char *want = o && o->template_name ? o->template_name : NULL;
    if (!want && ct->n == 1) return &ct->templates[0];
    if (!want && o && o->tools && cJSON_IsArray(o->tools))
        for (int i = 0; i < ct->n; i++)
            if (!strcmp(ct->templates[i].name, "tool_use")) return &ct->templates[i];
    if (!want) want = "default";
    for (int i = 0; i < ct->n; i++)
        if (!strcmp(ct->templates[i].name, want)) return &ct->templates[i];
    return NULL;
}

static bool add_copy(cJSON *obj, const char *key, const cJSON *v)
{
    cJSON *c = v ? cJSON_Duplicate(v, 1) : cJSON_CreateNull();
    if (!c) return false;
    cJSON_DeleteItemFromObjectCaseSensitive(obj, key);
    return cJSON_AddItemToObject(obj, key, c);
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* transformers' continue_final_message: the last occurrence of the last message's content
 * (stripped) ends the text: text[:loc + len(content)] when the template kept the content whole
 * (no leading spaces, trailing ones kept), else text[:loc + len(content.strip())]. Whitespace is
 * ASCII here (Python strips Unicode spaces too). */
static tuna_status cut_after_final_message(const cJSON *messages, char *text)
{
    const cJSON *last = cJSON_GetArrayItem(messages, cJSON_GetArraySize(messages) - 1);
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(last, "content");
    const char *msg = NULL;
    if (cJSON_IsString(content)) {
        msg = content->valuestring;
    } else if (cJSON_IsArray(content)) { /* the last block that has "text" */
        for (int i = cJSON_GetArraySize(content) - 1; i >= 0 && !msg; i--) {
            const cJSON *tx = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(content, i), "text");
            if (cJSON_IsString(tx)) msg = tx->valuestring;
        }
    }
    if (!msg)
        return tuna_fail(TUNA_E_INVALID, "continue_final_message: the last message has no text content to continue");
    size_t n = strlen(msg), a = 0, b = n, tl = strlen(text);
    while (a < b && is_space(msg[a]))
        a++;
    while (b > a && is_space(msg[b - 1]))
        b--;
    size_t sl = b - a; /* the stripped content is msg[a, b) */
    bool found = false;
    size_t loc = 0;
    for (size_t i = tl >= sl ? tl - sl + 1 : 0; i-- > 0;) /* rindex */
        if (!memcmp(text + i, msg + a, sl)) {
            found = true;
            loc = i;
            break;
        }
    if (!found)
        return tuna_fail(TUNA_E_INVALID, "continue_final_message is set but the final message does not appear in the "
                                         "rendered chat (the template changes it), so it cannot be continued");
    size_t keep = (a == 0 && tl - loc >= n && !memcmp(text + loc, msg, n)) ? n : sl;
    text[loc + keep] = 0;
    return TUNA_OK;
}

tuna_status tuna_chat_render(const struct tuna_chat_template *ct, const cJSON *messages,
                             const struct tuna_chat_render_opts *opt, char **out)
{
    if (opt && opt->continue_final_message && opt->add_generation_prompt)
        return tuna_fail(TUNA_E_INVALID, "continue_final_message and add_generation_prompt cannot both be set: the "
                                         "first continues the last message, the second starts a new one");
    *out = NULL;
    if (!cJSON_IsArray(messages))
        return tuna_fail(TUNA_E_INVALID, "chat messages must be a JSON array of {\"role\", \"content\"} objects");
    const struct tuna_chat_named *t = pick(ct, opt);
    if (!t) {
        char names[512] = "";
        for (int i = 0; i < ct->n; i++) {
            strncat(names, i ? ", " : "", sizeof names - strlen(names) - 1);
            strncat(names, ct->templates[i].name, sizeof names - strlen(names) - 1);
        }
        return tuna_fail(TUNA_E_NOT_FOUND, "%s has no chat template named '%s' (it has: %s)",
                         ct->origin ? ct->origin : "template",
                         opt && opt->template_name ? opt->template_name : "default", names);
    }
    cJSON *ctx = cJSON_Duplicate(ct->specials, 1);
    if (!ctx) return tuna_fail_oom("template context", 0);
    bool ok = true;
    if (opt && opt->extra && cJSON_IsObject(opt->extra)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, opt->extra) ok &= add_copy(ctx, e->string, e);
    }
    ok &= add_copy(ctx, "messages", messages);
    ok &= add_copy(ctx, "tools", opt ? opt->tools : NULL);
    ok &= add_copy(ctx, "documents", opt ? opt->documents : NULL);
    cJSON_DeleteItemFromObjectCaseSensitive(ctx, "add_generation_prompt");
    ok &= cJSON_AddBoolToObject(ctx, "add_generation_prompt", opt && opt->add_generation_prompt) != NULL;
    if (!ok) {
        cJSON_Delete(ctx);
        return tuna_fail_oom("template context", 0);
    }
    struct tuna_jinja_render_opts ro = {.now = opt ? opt->now : 0};
    tuna_status st = tuna_jinja_render(t->tpl, ctx, &ro, out, NULL);
    cJSON_Delete(ctx);
    if (st) return tuna_fail_prefix(st, "rendering the chat template of %s", ct->origin ? ct->origin : "(text)");
    if (opt && opt->continue_final_message) {
        st = cut_after_final_message(messages, *out);
        if (st) {
            free(*out);
            *out = NULL;
            return st;
        }
    }
    return TUNA_OK;
}
