/* infer_common.h — what the inference commands (generate, chat, logits, perplexity, bench) share:
 * model/tokenizer loading options and the sampling flags, named as vLLM names them. */
#ifndef TUNA_CLI_INFER_COMMON_H
#define TUNA_CLI_INFER_COMMON_H

#include <stdbool.h>
#include <stdio.h>

#include <cjson/cJSON.h>

#include "chat/chat.h"

#include "model/generate.h"
#include "model/model.h"
#include "model/sampler.h"
#include "tokenizer/tokenizer.h"

struct infer_flags {
    struct tuna_model_opts model;   /* --threads, --max-model-len */
    struct tuna_sampling sampling;  /* generation_config.json defaults, then flags */
    bool set_temperature, set_top_k, set_top_p, set_min_p, set_rep;
    int64_t max_tokens;             /* --max-tokens (default 256) */
    const char *stop[16];           /* --stop (repeatable) */
    int n_stop;
    int64_t stop_ids[32];           /* --stop-token-ids 1,2 (+ EOS unless --ignore-eos) */
    int n_stop_ids;
    bool ignore_eos;
};

void infer_flags_init(struct infer_flags *f);
/* Consumes argv[*i] when it is one of the shared flags; sets *bad on a malformed value. */
/* --device cpu|cuda|cuda:N|auto and --dtype auto|bfloat16|float16|float32 into o (also used by
 * commands with their own option lists, e.g. serve). */
bool infer_device_parse(struct tuna_model_opts *o, int argc, char **argv, int *i, bool *bad);

bool infer_flags_parse(struct infer_flags *f, int argc, char **argv, int *i, bool *bad);
void infer_flags_help(FILE *out, bool sampling);
/* Applies generation_config.json of dir under the flags given, adds its EOS ids (or config.json's)
 * unless --ignore-eos; checks the sampling values. */
tuna_status infer_flags_finish(struct infer_flags *f, const char *dir, const struct tuna_model *m,
                               struct tuna_gen_opts *o);

/* Parses "1,2,3" into a malloc'd array. */
tuna_status parse_id_list(const char *s, int32_t **ids, int64_t *n);

/* detok callback over a tuna_detok_stream (ctx). */
tuna_status detok_stream_cb(void *ctx, int32_t id, char **piece);
/* on_text callback: writes to stdout and flushes. */
int print_text_cb(void *ctx, const char *text, size_t len);

/* Renders messages with the chat template (add_generation_prompt) and tokenizes the text without
 * adding special tokens (the template has them), as transformers' apply_chat_template. */
tuna_status render_chat_ids(const tuna_tokenizer *tok, const struct tuna_chat_template *ct, const cJSON *messages,
                            int32_t **ids, int64_t *n);
#endif
