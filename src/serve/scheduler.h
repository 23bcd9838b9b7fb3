/* scheduler.h — continuous batching over a paged KV cache, as vLLM V1 schedules:
 * every step gives each running sequence the tokens it still needs (one for a decode, a chunk
 * for a prompt being prefilled) under a token budget (max_num_batched_tokens), running ones
 * first, then admits waiting sequences (FCFS) while the budget, max_num_seqs and the KV blocks
 * allow. When a running sequence cannot get a KV block, the last running sequence is preempted
 * by recompute: its blocks are freed, its computed count reset to 0 and it goes to the front of
 * the waiting queue (its prompt and generated tokens are kept, so it resumes where it was).
 *
 * With prefix caching (vLLM's automatic prefix caching, SERVING.md §3.4), a sequence being
 * admitted first takes the longest chain of cached full KV blocks matching its tokens (same
 * adapter) and skips their prefill; at most n_tokens - 1 tokens come from the cache, so the last
 * one is always computed and its logits exist. After each step the sequences' newly filled
 * blocks are registered (kv_cache.h), prompt and generated tokens alike, so a sequence preempted
 * by recompute usually finds its own blocks again. Cached blocks nobody references count as free.
 *
 * The scheduler only plans: the caller runs the forward pass over the batch it built, then
 * calls tuna_sched_commit, samples a token for each sequence whose step wants logits and
 * appends it (tuna_sched_append), or finishes it (tuna_sched_finish).
 * Not thread-safe: one engine thread owns a scheduler and its KV cache.
 */
#ifndef TUNA_SERVE_SCHEDULER_H
#define TUNA_SERVE_SCHEDULER_H

#include <stdbool.h>
#include <stdint.h>

#include "model/batch.h"
#include "model/kv_cache.h"

enum tuna_sched_state {
    TUNA_SCHED_WAITING = 0,
    TUNA_SCHED_RUNNING,
    TUNA_SCHED_FINISHED,
};

struct tuna_sched_seq {
    int32_t *tokens;      /* [n_tokens] prompt then generated tokens; owned */
    int64_t n_tokens, cap;
    int64_t n_prompt;
    int64_t n_computed;   /* tokens whose K/V are in the cache */
    int32_t kv_seq;       /* KV cache sequence, -1 when it holds none */
    int32_t adapter;      /* LoRA adapter index, -1 = base model */
    int32_t prefix_adapter; /* the adapter's id in the prefix cache (= adapter unless the caller sets a
                             * per-load id, so a slot reused by another adapter never shares blocks) */
    enum tuna_sched_state state;
    int64_t n_preempted;
    int64_t n_cached;     /* tokens taken from the prefix cache at its last admission */
    /* the plan of the current step (valid between schedule and commit) */
    int64_t step_tokens;  /* tokens of this sequence in the batch */
    int64_t step_row;     /* its logits row, -1 when the step does not finish its known tokens */
    void *user;           /* the caller's (engine) */
};

struct tuna_sched_config {
    int64_t max_num_seqs;           /* running sequences at most */
    int64_t max_num_batched_tokens; /* tokens per step at most */
    bool enable_prefix_caching;     /* reuse cached KV blocks of earlier sequences (0 = off) */
};

typedef struct tuna_sched tuna_sched;

tuna_status tuna_sched_new(const struct tuna_sched_config *cfg, tuna_kv_cache *kv, tuna_sched **out);
void tuna_sched_free(tuna_sched *s); /* accepts NULL; frees no sequences (the caller owns them) */

/* A sequence with its prompt (copied); *out is owned by the caller (tuna_sched_seq_free after
 * it is finished). */
tuna_status tuna_sched_seq_new(const int32_t *prompt, int64_t n, int32_t adapter, void *user,
                               struct tuna_sched_seq **out);
void tuna_sched_seq_free(struct tuna_sched_seq *q); /* accepts NULL */

/* Queues a new sequence at the back of the waiting queue (borrowed until finished). */
tuna_status tuna_sched_add(tuna_sched *s, struct tuna_sched_seq *q);

/* Plans one step into b (cleared first). *n_out receives the sequences in the step, in batch
 * order, in a borrowed array valid until the next call. Returns TUNA_OK with b->n == 0 when
 * there is nothing to run. */
tuna_status tuna_sched_schedule(tuna_sched *s, struct tuna_batch *b, struct tuna_sched_seq ***out, int64_t *n_out);

/* After the forward pass: the step's tokens count as computed. */
void tuna_sched_commit(tuna_sched *s);

/* Appends a sampled token to a running sequence. */
tuna_status tuna_sched_append(struct tuna_sched_seq *q, int32_t token);

/* Removes a sequence (waiting or running) and frees its KV blocks; state becomes FINISHED. */
void tuna_sched_finish(tuna_sched *s, struct tuna_sched_seq *q);

int64_t tuna_sched_n_running(const tuna_sched *s);
int64_t tuna_sched_n_waiting(const tuna_sched *s);
int64_t tuna_sched_n_preemptions(const tuna_sched *s); /* since creation */
/* Prefix cache counters since creation, in tokens as vLLM counts them: queried = tokens of the
 * sequences admitted (re-admissions after preemption included), hits = those taken from the cache. */
int64_t tuna_sched_prefix_queries(const tuna_sched *s);
int64_t tuna_sched_prefix_hits(const tuna_sched *s);

#endif
