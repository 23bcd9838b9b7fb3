/* generate.h — the decode loop shared by `tuna generate`, `tuna chat` and the server: prefill a
 * prompt into a KV sequence, then sample one token per step until a stop condition.
 *
 * Text is optional and comes through a callback (detok), so this file does not depend on the
 * tokenizer: with detok set, stop strings are matched on the decoded text and the text handed to
 * on_text never contains a stop string (text that might begin one is held back until it is
 * clear), as vLLM returns it.
 */
#ifndef TUNA_MODEL_GENERATE_H
#define TUNA_MODEL_GENERATE_H

#include <stdbool.h>
#include <stdint.h>

#include "model/model.h"
#include "model/sampler.h"

struct tuna_gen_opts {
    struct tuna_sampling sampling;
    int64_t max_tokens;          /* <= 0: until the context limit */
    const int64_t *stop_ids;     /* EOS ids and --stop-token-ids; the token is not part of the text */
    int n_stop_ids;
    const char *const *stop;     /* stop strings (need detok) */
    int n_stop;
    /* Decoded text of one more id (malloc'd piece, taken); NULL: no text. */
    tuna_status (*detok)(void *ctx, int32_t id, char **piece);
    void *detok_ctx;
    /* Streams text as it becomes final; return non-zero to stop (finish reason "abort"). */
    int (*on_text)(void *ctx, const char *text, size_t len);
    void *on_text_ctx;
    /* LoRA adapter index (as attached to the model) + 1 for every token of this sequence; 0 =
     * the base model (zero-initialized options need no adapter) */
    int32_t adapter_plus1;
};

struct tuna_gen_result {
    int32_t *ids;              /* generated ids (malloc'd, taken), stop token excluded */
    int64_t n;
    char *text;                /* final text (malloc'd, taken) when detok was given, else NULL */
    const char *finish_reason; /* "stop", "length" or "abort" (static) */
    int64_t prompt_tokens;
    double prefill_seconds, decode_seconds;
};
void tuna_gen_result_free(struct tuna_gen_result *r);

/* True when sampling with s is a plain argmax of the raw logits: greedy (temperature < 1e-5, the
 * sampler's threshold) and no repetition/presence/frequency penalty. Such steps can take
 * tuna_model_forward_greedy (the argmax computed where the logits are). */
bool tuna_gen_is_plain_greedy(const struct tuna_sampling *s);

/* Appends prompt to sequence seq of kv (which may already hold earlier turns) and generates.
 * A prompt that does not fit the context is refused with TUNA_E_RANGE; generation that reaches
 * the context limit stops with finish reason "length". */
tuna_status tuna_generate(struct tuna_model *m, tuna_kv_cache *kv, int32_t seq, const int32_t *prompt,
                          int64_t n_prompt, const struct tuna_gen_opts *o, struct tuna_gen_result *res);

#endif
