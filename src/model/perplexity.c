/* perplexity.c — see perplexity.h. */
#include "model/perplexity.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"

tuna_status tuna_perplexity(struct tuna_model *m, const int32_t *ids, int64_t n, int64_t ctx, int64_t stride,
                            void (*progress)(void *arg, int64_t done, int64_t total), void *arg,
                            struct tuna_ppl_result *out)
{
    memset(out, 0, sizeof *out);
    if (ctx < 2 || stride < 1)
        return tuna_fail(TUNA_E_INVALID, "perplexity: --ctx must be >= 2 and --stride >= 1 (got %lld, %lld)",
                         (long long)ctx, (long long)stride);
    if (ctx > m->max_model_len)
        return tuna_fail(TUNA_E_RANGE, "perplexity: --ctx %lld is above the context limit %lld", (long long)ctx,
                         (long long)m->max_model_len);
    if (n - ctx - 1 <= 0)
        return tuna_fail(TUNA_E_INVALID, "perplexity: the text has %lld tokens, fewer than --ctx %lld + 2",
                         (long long)n, (long long)ctx);
    const int64_t V = m->arch.vocab_size, total = (n - ctx - 1 + stride - 1) / stride;
    float *logits = malloc(sizeof(float) * (size_t)(ctx * V));
    if (!logits) return tuna_fail_oom("perplexity logits", sizeof(float) * (size_t)(ctx * V));
    tuna_kv_cache *kv = NULL;
    struct tuna_batch b;
    tuna_batch_init(&b);
    tuna_status st = tuna_model_kv_new(m, ctx, 0, &kv);
    for (int64_t w = 0, start = 0; !st && start < n - ctx - 1; w++, start += stride) {
        int32_t seq;
        if ((st = tuna_kv_seq_new(kv, &seq))) break;
        tuna_batch_clear(&b);
        if ((st = tuna_batch_add_seq(&b, ids + start, ctx, seq, 0, true, false))) break;
        if ((st = tuna_model_forward(m, kv, &b, logits, NULL))) break;
        tuna_kv_seq_free(kv, seq);
        int64_t first = (w == 0 || stride >= ctx) ? 0 : ctx - 1 - stride;
        for (int64_t t = first; t < ctx - 1; t++) {
            const float *lg = logits + t * V;
            int32_t target = ids[start + t + 1];
            if (target < 0 || target >= V) {
                st = tuna_fail(TUNA_E_RANGE, "perplexity: token %d at %lld is outside the vocabulary", target,
                               (long long)(start + t + 1));
                break;
            }
            float mx = lg[0];
            for (int64_t v = 1; v < V; v++) mx = lg[v] > mx ? lg[v] : mx;
            double se = 0;
            for (int64_t v = 0; v < V; v++) se += exp((double)lg[v] - mx);
            out->nll += log(se) + mx - (double)lg[target];
            out->targets++;
        }
        out->windows++;
        if (progress) progress(arg, w + 1, total);
    }
    if (!st) out->ppl = exp(out->nll / (double)out->targets);
    free(logits);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    return st;
}
