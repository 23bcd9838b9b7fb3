/* engine.h — the inference thread: owns the model's KV cache and the scheduler, takes requests
 * from an inbox (mutex + condvar), runs one batched forward step at a time over every running
 * sequence, samples, detokenizes, applies stop conditions and pushes text events to each
 * request (request.h). A request whose connection set `cancelled` is finished at the next step
 * and its KV blocks freed.
 */
#ifndef TUNA_SERVE_ENGINE_H
#define TUNA_SERVE_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "lora/lora.h"
#include "model/model.h"
#include "serve/metrics.h"
#include "serve/request.h"
#include "tokenizer/tokenizer.h"

struct tuna_engine_config {
    int64_t kv_tokens;              /* KV cache capacity in tokens */
    int32_t block_size;             /* 0 = 16 */
    int64_t max_num_seqs;           /* running sequences at most (<= 256) */
    int64_t max_num_batched_tokens; /* tokens per step */
    int64_t max_pending;            /* requests queued or running at most; more are refused (429) */
    bool enable_prefix_caching;     /* reuse the KV blocks of earlier prompts (scheduler.h) */
    int max_loras;                  /* LoRA adapter slots (batch.adapter indices 0..max_loras-1); 0 = none */
    /* Optional observer for an in-process driver (tuna bench --serve), called on the engine
     * thread: on_token after each sampled token of a choice (n = its tokens so far), on_finish
     * once a request's last choice has finished (before the engine drops its reference). They
     * must be quick and must not call back into the engine. NULL = none. */
    void (*on_token)(void *ctx, struct tuna_serve_req *r, int choice, int32_t id, int64_t n);
    void (*on_finish)(void *ctx, struct tuna_serve_req *r);
    void *observer_ctx;
};

/* Counters since the engine started (tuna_engine_stats). */
struct tuna_engine_stats {
    int64_t steps;          /* forward steps run */
    int64_t step_tokens;    /* tokens over all steps (prefill chunks and decodes) */
    int64_t step_seqs;      /* sequences over all steps: step_seqs / steps is the mean batch */
    int64_t peak_kv_blocks; /* KV blocks referenced at most, measured right after a forward */
    int64_t kv_blocks;      /* KV blocks in total */
    int64_t preemptions;
    double forward_s;       /* wall seconds inside the forward pass (logits download included) */
    int64_t decode_steps;   /* steps where every sequence had one token (no prefill chunk) */
    int64_t decode_tokens;  /* step_tokens of those steps */
    double decode_forward_s; /* forward_s of those steps */
};

typedef struct tuna_engine tuna_engine;

/* Starts the engine thread. m, tok and metrics are borrowed and must outlive the engine. tok may
 * be NULL (benchmarks on synthetic models): no text is produced then, and stop strings never
 * match. */
tuna_status tuna_engine_start(struct tuna_model *m, const tuna_tokenizer *tok, const struct tuna_engine_config *cfg,
                              struct tuna_metrics *metrics, tuna_engine **out);
/* Stops the thread: requests in flight finish with "abort", later submits are refused. */
void tuna_engine_stop(tuna_engine *e); /* accepts NULL */
/* Stops (if still running) and frees everything. */
void tuna_engine_free(tuna_engine *e); /* accepts NULL */

/* Hands a request to the engine (it takes a reference); its parameters must be complete and
 * checked (openai.h fills in defaults and EOS ids). TUNA_E_OOM with a message when
 * max_pending requests are already in flight (answer 429). */
tuna_status tuna_engine_submit(tuna_engine *e, struct tuna_serve_req *r);

/* Puts adapter `ad` (borrowed; NULL = empty the slot) into LoRA slot `slot` and re-attaches the
 * slots' adapters to the model. Done by the engine thread between two steps (it owns the
 * model); the call waits for it. `key` is the adapter's id in the prefix cache, unique per load,
 * so KV blocks cached for an earlier adapter of the slot are never reused. The caller makes sure
 * no request uses the slot (loras.h pins). Fails (model unchanged) when the adapter does not fit
 * the model, or the engine has stopped. */
tuna_status tuna_engine_set_lora(tuna_engine *e, int slot, const struct tuna_lora_adapter *ad, int32_t key);

/* The counters above (thread-safe). */
void tuna_engine_stats(tuna_engine *e, struct tuna_engine_stats *out);

/* KV blocks in use (0 when idle) and in total. */
void tuna_engine_kv_usage(tuna_engine *e, int64_t *used, int64_t *total);

#endif
