/* bench.h — the serving engine (engine.h: scheduler, continuous batching, paged KV, prefix
 * caching, the same code `tuna serve` runs) driven in-process without HTTP, for `tuna bench
 * --serve`. Requests are random token prompts, distinct per request (so prefix caching finds
 * nothing to share), greedy, with ignore_eos and exactly `gen` output tokens each.
 *
 * Two loads, as vLLM's benchmarks name them:
 *   offline (concurrency 0): every request is submitted at once; throughput is what counts;
 *   online (concurrency N): a closed loop, a new request starts when one finishes, N in flight;
 *   time to first token and inter-token latency are measured per token on the engine thread.
 * With adapters, request i uses adapter i mod n_adapters (slots 0..n-1), so every step mixes them.
 */
#ifndef TUNA_SERVE_BENCH_H
#define TUNA_SERVE_BENCH_H

#include <stdbool.h>
#include <stdint.h>

#include "lora/lora.h"
#include "model/model.h"
#include "serve/engine.h"
#include "tokenizer/tokenizer.h"

struct tuna_serve_bench_config {
    int64_t n_requests;  /* >= 1 */
    int64_t prompt_len;  /* tokens per prompt, >= 1 */
    int64_t gen;         /* output tokens per request, >= 1 */
    int64_t concurrency; /* 0 = offline (all at once), else requests in flight at most */
    uint64_t seed;       /* prompts: token ids drawn from a PRNG seeded with (seed, request index) */
    bool keep_outputs;   /* record every request's prompt and output ids (tests) */
};

struct tuna_serve_bench_result {
    int64_t completed; /* requests that finished with "length" after gen tokens */
    int64_t failed;    /* requests that ended otherwise (error, abort, wrong count) */
    int64_t prompt_tokens, output_tokens;
    double wall_s;                        /* first submit to last finish */
    double ttft_mean, ttft_p50, ttft_p99; /* seconds, from submit to the first token */
    double itl_mean, itl_p50, itl_p99;    /* seconds between two tokens of one request */
    double e2e_mean;                      /* seconds from submit to finish */
    struct tuna_engine_stats eng;         /* steps, mean batch, peak KV, preemptions */
    /* keep_outputs: [n_requests] each, malloc'd; prompts[i] has prompt_len ids, outputs[i] n_out[i] */
    int32_t **prompts, **outputs;
    int64_t *n_out;
    int64_t n; /* entries in the arrays above */
};

/* Starts an engine on m (ec as `tuna serve` would configure it; the observer fields, max_pending
 * and max_loras are set here), puts adapters[i] (borrowed, may be NULL when n_adapters is 0) into
 * LoRA slot i, runs the load and stops the engine. tok may be NULL (synthetic models: no text).
 * The result is filled even when some requests failed (see failed); a status is returned only
 * when the run could not take place (bad config, out of memory, an adapter that does not fit). */
tuna_status tuna_serve_bench_run(struct tuna_model *m, const tuna_tokenizer *tok, const struct tuna_engine_config *ec,
                                 const struct tuna_lora_adapter *const *adapters, int n_adapters,
                                 const struct tuna_serve_bench_config *cfg, struct tuna_serve_bench_result *out);
void tuna_serve_bench_result_free(struct tuna_serve_bench_result *r); /* accepts a zeroed result */

/* K adapters of rank r on all seven projections of every layer of m, with random A and B
 * (uniform, scaled so the update stays small): the multi-LoRA cost without adapter files.
 * out[K] receives adapters owned by the caller (tuna_lora_free each). */
tuna_status tuna_serve_bench_make_adapters(const struct tuna_model *m, int k, int64_t r, uint64_t seed,
                                           struct tuna_lora_adapter **out);

#endif
