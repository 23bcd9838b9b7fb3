/* cmd_generate.c — `tuna generate DIR --prompt T [sampling flags]`: streams the continuation of a
 * prompt (or of --ids) to stdout as it is produced; timing to stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gguf/import.h"
#include "lora/lora.h"
#include "core/status.h"
#include "infer_common.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna generate DIR|FILE.gguf (--prompt TEXT | --ids 1,2,3) [options]\n\n"
               "Generates a continuation and streams it to stdout.\n\n"
               "  --prompt TEXT   prompt text (tokenized with special tokens, as HF encode())\n"
               "  --ids LIST      prompt as token ids\n"
               "  --chat          wrap the prompt as a user message in the model's chat template\n"
               "  --system TEXT   with --chat: a system message first\n"
               "  --print-ids     also print the generated ids (to stderr)\n"
               "  --lora DIR      apply a PEFT LoRA adapter folder (unmerged)\n");
    infer_flags_help(f, true);
}

int cmd_generate(int argc, char **argv)
{
    const char *dir = NULL, *prompt = NULL, *ids_s = NULL, *system = NULL, *lora = NULL;
    bool print_ids = false, chat = false;
    struct infer_flags fl;
    infer_flags_init(&fl);
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_flag(argv, i, "--print-ids")) {
            print_ids = true;
            continue;
        }
        if (tuna_cli_flag(argv, i, "--chat")) {
            chat = true;
            continue;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--system", &system, &bad)) continue;
        if (tuna_cli_opt_str(argc, argv, &i, "--lora", &lora, &bad)) continue;
        if (tuna_cli_opt_str(argc, argv, &i, "--prompt", &prompt, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--ids", &ids_s, &bad) || infer_flags_parse(&fl, argc, argv, &i, &bad))
            continue;
        if (argv[i][0] == '-' || dir) {
            fprintf(stderr, "tuna generate: unexpected argument %s\n", argv[i]);
            bad = true;
        } else {
            dir = argv[i];
        }
    }
    if (bad || !dir || (!prompt == !ids_s)) {
        if (!bad) fprintf(stderr, "tuna generate: need DIR and one of --prompt / --ids\n");
        usage(stderr);
        return 2;
    }
    tuna_tokenizer *tok = NULL;
    tuna_detok_stream *ds = NULL;
    struct tuna_model *m = NULL;
    tuna_kv_cache *kv = NULL;
    int32_t *ids = NULL;
    int64_t n = 0;
    struct tuna_gen_opts o;
    struct tuna_gen_result r = {0};
    /* a GGUF file carries the model, its tokenizer and its template (src/gguf/import.c) */
    struct tuna_gguf_model *gm = NULL;
    size_t dl = strlen(dir);
    bool is_gguf = dl > 5 && !strcmp(dir + dl - 5, ".gguf");
    tuna_status st;
    if (is_gguf) {
        if (chat) return tuna_cli_fail("generate", tuna_fail(TUNA_E_UNSUPPORTED, "--chat with a GGUF file is not "
                                                              "supported yet; use the Hugging Face folder"));
        st = tuna_gguf_model_load(dir, &fl.model, &gm);
        if (st) return tuna_cli_fail("generate", st);
        m = gm->model;
        tok = gm->tokenizer;
        if (!tok) st = tuna_fail(TUNA_E_NOT_FOUND, "%s has no tokenizer.ggml.tokens", dir);
    } else {
        st = tuna_tokenizer_load(dir, &tok);
    }
    if (st && prompt) {
        tuna_gguf_model_free(gm);
        return tuna_cli_fail("generate", st);
    }
    if (st) { /* ids only: generate without text */
        fprintf(stderr, "tuna generate: no tokenizer (%s); printing ids only\n", tuna_last_error());
        tok = NULL;
        print_ids = true;
        st = TUNA_OK;
    }
    if (prompt && chat) {
        struct tuna_chat_template *ct = NULL;
        cJSON *msgs = cJSON_CreateArray();
        if (system) {
            cJSON *sm = cJSON_CreateObject();
            cJSON_AddStringToObject(sm, "role", "system");
            cJSON_AddStringToObject(sm, "content", system);
            cJSON_AddItemToArray(msgs, sm);
        }
        cJSON *um = cJSON_CreateObject();
        cJSON_AddStringToObject(um, "role", "user");
        cJSON_AddStringToObject(um, "content", prompt);
        cJSON_AddItemToArray(msgs, um);
        st = tuna_chat_load(dir, &ct);
        if (!st) st = render_chat_ids(tok, ct, msgs, &ids, &n);
        tuna_chat_free(ct);
        cJSON_Delete(msgs);
    } else if (chat) {
        st = tuna_fail(TUNA_E_INVALID, "--chat needs --prompt");
    } else if (prompt) {
        size_t nn = 0;
        st = tuna_tokenizer_encode(tok, prompt, strlen(prompt), true, true, &ids, &nn);
        n = (int64_t)nn;
    } else {
        st = parse_id_list(ids_s, &ids, &n);
    }
    if (!st && !m) st = tuna_model_load(dir, &fl.model, &m);
    if (!st) st = infer_flags_finish(&fl, dir, m, &o);
    struct tuna_lora_set *ls = NULL;
    if (!st && lora) {
        st = tuna_lora_set_open(m, &lora, 1, &ls);
        o.adapter_plus1 = 1;
    }
    if (!st && !tok && fl.n_stop)
        st = tuna_fail(TUNA_E_INVALID, "--stop needs the tokenizer, which did not load");
    int64_t room = 0;
    if (!st) {
        room = fl.max_tokens > 0 ? n + fl.max_tokens : m->max_model_len;
        if (room > m->max_model_len) room = m->max_model_len;
        st = tuna_model_kv_new(m, room, 0, &kv);
    }
    int32_t seq = 0;
    if (!st) st = tuna_kv_seq_new(kv, &seq);
    if (!st && tok) st = tuna_detok_stream_new(tok, true, &ds);
    if (!st && tok) {
        o.detok = detok_stream_cb;
        o.detok_ctx = ds;
        o.on_text = print_text_cb;
    }
    if (!st) st = tuna_generate(m, kv, seq, ids, n, &o, &r);
    if (!st) {
        printf("\n");
        if (print_ids) {
            fprintf(stderr, "ids:");
            for (int64_t i = 0; i < r.n; i++) fprintf(stderr, "%s%d", i ? "," : " ", r.ids[i]);
            fprintf(stderr, "\n");
        }
        fprintf(stderr, "[%lld prompt tokens in %.3f s (%.1f tok/s), %lld generated in %.3f s (%.1f tok/s), "
                "finish: %s]\n", (long long)n, r.prefill_seconds, (double)n / (r.prefill_seconds + 1e-12),
                (long long)r.n, r.decode_seconds, (double)(r.n > 1 ? r.n - 1 : 0) / (r.decode_seconds + 1e-12),
                r.finish_reason);
    }
    tuna_gen_result_free(&r);
    if (ls) tuna_lora_set_free(m, ls);
    tuna_detok_stream_free(ds);
    free(ids);
    tuna_kv_free(kv);
    if (gm) {
        tuna_gguf_model_free(gm); /* owns the model and the tokenizer */
    } else {
        tuna_tokenizer_free(tok);
        tuna_model_free(m);
    }
    return st ? tuna_cli_fail("generate", st) : 0;
}
