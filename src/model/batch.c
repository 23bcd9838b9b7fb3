/* batch.c — growing arrays for struct tuna_batch. */
#include "model/batch.h"

#include <stdlib.h>
#include <string.h>

#include "core/status.h"

void tuna_batch_init(struct tuna_batch *b) { memset(b, 0, sizeof *b); }

void tuna_batch_free(struct tuna_batch *b)
{
    free(b->tokens);
    free(b->pos);
    free(b->seq);
    free(b->adapter);
    free(b->logits);
    memset(b, 0, sizeof *b);
}

void tuna_batch_clear(struct tuna_batch *b)
{
    b->n = 0;
    b->n_logits = 0;
}

#define GROW(p, n) do { void *q_ = realloc((p), (size_t)(n) * sizeof *(p)); if (!q_) goto oom; (p) = q_; } while (0)

static tuna_status reserve(struct tuna_batch *b, int64_t n)
{
    if (n <= b->cap) return TUNA_OK;
    int64_t c = b->cap ? b->cap : 64;
    while (c < n) c *= 2;
    GROW(b->tokens, c);
    GROW(b->pos, c);
    GROW(b->seq, c);
    GROW(b->adapter, c);
    GROW(b->logits, c);
    b->cap = c;
    return TUNA_OK;
oom:
    return tuna_fail_oom("batch", (size_t)c * 32);
}

tuna_status tuna_batch_add(struct tuna_batch *b, int32_t token, int32_t seq, int64_t pos, bool want_logits)
{
    tuna_status st = reserve(b, b->n + 1);
    if (st) return st;
    b->tokens[b->n] = token;
    b->seq[b->n] = seq;
    b->pos[b->n] = pos;
    b->adapter[b->n] = -1;
    b->logits[b->n] = want_logits;
    b->n_logits += want_logits;
    b->n++;
    return TUNA_OK;
}

tuna_status tuna_batch_add_seq(struct tuna_batch *b, const int32_t *tokens, int64_t n, int32_t seq,
                               int64_t pos0, bool all_logits, bool last_logits)
{
    tuna_status st = reserve(b, b->n + n);
    if (st) return st;
    for (int64_t i = 0; i < n; i++) {
        st = tuna_batch_add(b, tokens[i], seq, pos0 + i, all_logits || (last_logits && i == n - 1));
        if (st) return st;
    }
    return TUNA_OK;
}
