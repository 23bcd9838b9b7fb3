/* batch.h — the tokens of one forward step: several sequences, each contributing a run of
 * positions (a prompt being prefilled, or one decode token), in any order. */
#ifndef TUNA_MODEL_BATCH_H
#define TUNA_MODEL_BATCH_H

#include <stdbool.h>
#include <stdint.h>

#include "tuna.h"

struct tuna_batch {
    int64_t n, cap;
    int32_t *tokens;  /* [n] */
    int64_t *pos;     /* [n] position in its sequence */
    int32_t *seq;     /* [n] KV cache sequence id */
    int32_t *adapter; /* [n] LoRA adapter index per token, -1 = base model */
    bool *logits;     /* [n] whether this row's logits are wanted */
    int64_t n_logits;
};

void tuna_batch_init(struct tuna_batch *b);
void tuna_batch_free(struct tuna_batch *b);
void tuna_batch_clear(struct tuna_batch *b);
tuna_status tuna_batch_add(struct tuna_batch *b, int32_t token, int32_t seq, int64_t pos, bool want_logits);
/* Adds n tokens of one sequence at positions pos0.. ; logits for the last one only when
 * last_logits, or for all when all_logits. */
tuna_status tuna_batch_add_seq(struct tuna_batch *b, const int32_t *tokens, int64_t n, int32_t seq,
                               int64_t pos0, bool all_logits, bool last_logits);

#endif
