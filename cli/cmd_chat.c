/* cmd_chat.c — `tuna chat DIR`: an interactive terminal chat. Each turn renders the whole
 * conversation with the model's chat template, keeps the KV cache of the longest common prefix
 * with the previous turn (so history is not recomputed), streams the reply, and adds it to the
 * history. Commands: /reset (forget the conversation), /exit (or end of input). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "core/status.h"
#include "infer_common.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna chat DIR [--system TEXT] [options]\n\n"
               "Interactive chat with the model's chat template; the reply streams as it is produced.\n"
               "Type /reset to start over, /exit (or Ctrl-D) to leave.\n\n"
               "  --system TEXT   a system message first\n");
    infer_flags_help(f, true);
}

struct chat_state {
    struct tuna_model *m;
    tuna_tokenizer *tok;
    struct tuna_chat_template *ct;
    tuna_kv_cache *kv;
    int32_t seq;
    int32_t *cached;   /* the tokens whose K/V are in the cache, in order */
    int64_t n_cached, cap_cached;
    cJSON *messages;
    const char *system;
};

static tuna_status reset(struct chat_state *c)
{
    tuna_kv_seq_free(c->kv, c->seq);
    c->n_cached = 0;
    cJSON_Delete(c->messages);
    c->messages = cJSON_CreateArray();
    if (!c->messages) return tuna_fail_oom("chat history", 64);
    if (c->system) {
        cJSON *msg = cJSON_CreateObject();
        cJSON_AddStringToObject(msg, "role", "system");
        cJSON_AddStringToObject(msg, "content", c->system);
        cJSON_AddItemToArray(c->messages, msg);
    }
    return tuna_kv_seq_new(c->kv, &c->seq);
}

static tuna_status remember(struct chat_state *c, const int32_t *ids, int64_t n)
{
    if (c->n_cached + n > c->cap_cached) {
        int64_t cap = (c->n_cached + n) * 2;
        int32_t *nc = realloc(c->cached, sizeof(int32_t) * (size_t)cap);
        if (!nc) return tuna_fail_oom("chat token history", sizeof(int32_t) * (size_t)cap);
        c->cached = nc;
        c->cap_cached = cap;
    }
    memcpy(c->cached + c->n_cached, ids, sizeof(int32_t) * (size_t)n);
    c->n_cached += n;
    return TUNA_OK;
}

static tuna_status turn(struct chat_state *c, const char *user, const struct tuna_gen_opts *base)
{
    cJSON *msg = cJSON_CreateObject();
    cJSON_AddStringToObject(msg, "role", "user");
    cJSON_AddStringToObject(msg, "content", user);
    cJSON_AddItemToArray(c->messages, msg);
    int32_t *ids = NULL;
    int64_t n = 0;
    tuna_status st = render_chat_ids(c->tok, c->ct, c->messages, &ids, &n);
    if (st) {
        cJSON_DeleteItemFromArray(c->messages, cJSON_GetArraySize(c->messages) - 1);
        return st;
    }
    /* keep the cached prefix that the new rendering shares; feed the rest */
    int64_t p = 0;
    while (p < c->n_cached && p < n && c->cached[p] == ids[p]) p++;
    if (p == n) p--; /* always feed at least one token */
    if ((st = tuna_kv_seq_truncate(c->kv, c->seq, p))) goto out;
    c->n_cached = p;
    tuna_detok_stream *ds = NULL;
    if ((st = tuna_detok_stream_new(c->tok, true, &ds))) goto out;
    struct tuna_gen_opts o = *base;
    o.detok = detok_stream_cb;
    o.detok_ctx = ds;
    o.on_text = print_text_cb;
    struct tuna_gen_result r;
    st = tuna_generate(c->m, c->kv, c->seq, ids + p, n - p, &o, &r);
    tuna_detok_stream_free(ds);
    if (st) {
        cJSON_DeleteItemFromArray(c->messages, cJSON_GetArraySize(c->messages) - 1);
        tuna_kv_seq_truncate(c->kv, c->seq, c->n_cached);
        goto out;
    }
    printf("\n");
    if (!strcmp(r.finish_reason, "length")) fprintf(stderr, "[reply cut at the token limit]\n");
    /* what the cache now holds: the prompt and the generated tokens that were fed back */
    int64_t kvlen = tuna_kv_seq_len(c->kv, c->seq);
    st = remember(c, ids + p, n - p);
    if (!st) st = remember(c, r.ids, r.n);
    if (c->n_cached > kvlen) c->n_cached = kvlen;
    cJSON *reply = cJSON_CreateObject();
    cJSON_AddStringToObject(reply, "role", "assistant");
    cJSON_AddStringToObject(reply, "content", r.text ? r.text : "");
    cJSON_AddItemToArray(c->messages, reply);
    tuna_gen_result_free(&r);
out:
    free(ids);
    return st;
}

int cmd_chat(int argc, char **argv)
{
    const char *dir = NULL;
    struct infer_flags fl;
    infer_flags_init(&fl);
    fl.max_tokens = 1024;
    struct chat_state c;
    memset(&c, 0, sizeof c);
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--system", &c.system, &bad) || infer_flags_parse(&fl, argc, argv, &i, &bad))
            continue;
        if (argv[i][0] == '-' || dir) {
            fprintf(stderr, "tuna chat: unexpected argument %s\n", argv[i]);
            bad = true;
        } else {
            dir = argv[i];
        }
    }
    if (bad || !dir) {
        usage(stderr);
        return 2;
    }
    struct tuna_gen_opts o;
    tuna_status st = tuna_tokenizer_load(dir, &c.tok);
    if (!st) st = tuna_chat_load(dir, &c.ct);
    if (!st) st = tuna_model_load(dir, &fl.model, &c.m);
    if (!st) st = infer_flags_finish(&fl, dir, c.m, &o);
    if (!st) st = tuna_model_kv_new(c.m, c.m->max_model_len < 32768 ? c.m->max_model_len : 32768, 0, &c.kv);
    if (!st) st = reset(&c);
    bool tty = isatty(0);
    char *line = NULL;
    size_t cap = 0;
    while (!st) {
        if (tty) {
            printf("> ");
            fflush(stdout);
        }
        ssize_t len = getline(&line, &cap, stdin);
        if (len < 0) break;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if (len == 0) continue;
        if (!strcmp(line, "/exit") || !strcmp(line, "/quit")) break;
        if (!strcmp(line, "/reset")) {
            st = reset(&c);
            fprintf(stderr, "[conversation reset]\n");
            continue;
        }
        tuna_status ts = turn(&c, line, &o);
        if (ts == TUNA_E_RANGE) { /* context full: say so and keep the session */
            fprintf(stderr, "tuna chat: %s\n(type /reset to start over)\n", tuna_last_error());
            continue;
        }
        st = ts;
    }
    free(line);
    free(c.cached);
    cJSON_Delete(c.messages);
    tuna_kv_free(c.kv);
    tuna_model_free(c.m);
    tuna_chat_free(c.ct);
    tuna_tokenizer_free(c.tok);
    return st ? tuna_cli_fail("chat", st) : 0;
}
