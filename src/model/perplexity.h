/* perplexity.h — perplexity of a token stream, as transformers' eval loop of the fixtures
 * computes it (fixtures/models/pymini/eval.json): windows of ctx tokens starting at 0, stride,
 * 2·stride, … while start < n - ctx - 1; each window is a fresh sequence (no BOS added); with
 * stride >= ctx every window scores its ctx - 1 shifted targets; with stride < ctx a window after
 * the first scores only its last `stride` targets (the ones earlier windows did not).
 * ppl = exp(total nll / total targets). Log-softmax in double. */
#ifndef TUNA_MODEL_PERPLEXITY_H
#define TUNA_MODEL_PERPLEXITY_H

#include <stdint.h>

#include "model/model.h"

struct tuna_ppl_result {
    double nll;        /* summed negative log-likelihood (nats) */
    int64_t targets;   /* tokens scored */
    int64_t windows;
    double ppl;
};

/* progress (may be NULL) is called after each window with (done, total). */
tuna_status tuna_perplexity(struct tuna_model *m, const int32_t *ids, int64_t n, int64_t ctx, int64_t stride,
                            void (*progress)(void *arg, int64_t done, int64_t total), void *arg,
                            struct tuna_ppl_result *out);

#endif
