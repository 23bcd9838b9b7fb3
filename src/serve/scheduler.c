/* scheduler.c — continuous batching, chunked prefill, preemption by recompute, prefix caching. Spec:
 * scheduler.h. The forward pass grows each sequence's KV blocks itself (positions must continue
 * the cached length), so the plan only counts the blocks a step will take and makes sure they
 * are free before the step runs; the forward pass can then not run out of blocks. */
#include "serve/scheduler.h"

#include <stdlib.h>
#include <string.h>

#include "core/status.h"

struct tuna_sched {
    struct tuna_sched_config cfg;
    tuna_kv_cache *kv;
    struct tuna_sched_seq **running, **waiting, **step;
    int64_t n_running, n_waiting, n_step, cap_running, cap_waiting, cap_step;
    int64_t n_preemptions;
    int64_t prefix_queries, prefix_hits;
};

static tuna_status grow_list(struct tuna_sched_seq ***list, int64_t *cap, int64_t need)
{
    if (need <= *cap) return TUNA_OK;
    int64_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    struct tuna_sched_seq **n = realloc(*list, (size_t)c * sizeof *n);
    if (!n) return tuna_fail_oom("scheduler queue", (size_t)c * sizeof *n);
    *list = n;
    *cap = c;
    return TUNA_OK;
}

tuna_status tuna_sched_new(const struct tuna_sched_config *cfg, tuna_kv_cache *kv, tuna_sched **out)
{
    *out = NULL;
    if (cfg->max_num_seqs <= 0 || cfg->max_num_seqs > 1024 || cfg->max_num_batched_tokens <= 0)
        return tuna_fail(TUNA_E_INVALID, "scheduler: --max-num-seqs must be in 1..1024 (got %lld) and "
                         "--max-num-batched-tokens positive (got %lld)", (long long)cfg->max_num_seqs,
                         (long long)cfg->max_num_batched_tokens);
    tuna_sched *s = calloc(1, sizeof *s);
    if (!s) return tuna_fail_oom("scheduler", sizeof *s);
    s->cfg = *cfg;
    s->kv = kv;
    *out = s;
    return TUNA_OK;
}

void tuna_sched_free(tuna_sched *s)
{
    if (!s) return;
    free(s->running);
    free(s->waiting);
    free(s->step);
    free(s);
}

tuna_status tuna_sched_seq_new(const int32_t *prompt, int64_t n, int32_t adapter, void *user,
                               struct tuna_sched_seq **out)
{
    *out = NULL;
    if (n <= 0) return tuna_fail(TUNA_E_INVALID, "scheduler: empty prompt");
    struct tuna_sched_seq *q = calloc(1, sizeof *q);
    int64_t cap = n + 16;
    if (q) q->tokens = malloc((size_t)cap * sizeof *q->tokens);
    if (!q || !q->tokens) {
        free(q);
        return tuna_fail_oom("sequence", (size_t)cap * 4);
    }
    memcpy(q->tokens, prompt, (size_t)n * sizeof *prompt);
    q->n_tokens = q->n_prompt = n;
    q->cap = cap;
    q->kv_seq = -1;
    q->adapter = adapter;
    q->prefix_adapter = adapter;
    q->user = user;
    q->step_row = -1;
    *out = q;
    return TUNA_OK;
}

void tuna_sched_seq_free(struct tuna_sched_seq *q)
{
    if (!q) return;
    free(q->tokens);
    free(q);
}

tuna_status tuna_sched_add(tuna_sched *s, struct tuna_sched_seq *q)
{
    tuna_status st = grow_list(&s->waiting, &s->cap_waiting, s->n_waiting + 1);
    if (st) return st;
    q->state = TUNA_SCHED_WAITING;
    s->waiting[s->n_waiting++] = q;
    return TUNA_OK;
}

static void remove_at(struct tuna_sched_seq **list, int64_t *n, int64_t i)
{
    memmove(list + i, list + i + 1, (size_t)(*n - i - 1) * sizeof *list);
    (*n)--;
}

static void remove_from(struct tuna_sched_seq **list, int64_t *n, const struct tuna_sched_seq *q)
{
    for (int64_t i = 0; i < *n; i++)
        if (list[i] == q) {
            remove_at(list, n, i);
            return;
        }
}

/* Blocks a sequence will need beyond the ones it holds to cache `len` tokens. */
static int64_t blocks_needed(const tuna_sched *s, const struct tuna_sched_seq *q, int64_t len)
{
    int64_t bs = tuna_kv_block_size(s->kv);
    int64_t have = q->kv_seq >= 0 ? tuna_kv_seq_nblocks(s->kv, q->kv_seq) : 0;
    int64_t need = (len + bs - 1) / bs - have;
    return need > 0 ? need : 0;
}

/* Frees the last running sequence's blocks and puts it at the front of the waiting queue.
 * Capacity for the waiting list is reserved before scheduling starts. */
static void preempt_last(tuna_sched *s)
{
    struct tuna_sched_seq *v = s->running[--s->n_running];
    tuna_kv_seq_free(s->kv, v->kv_seq);
    v->kv_seq = -1;
    v->n_computed = 0;
    v->n_preempted++;
    v->state = TUNA_SCHED_WAITING;
    memmove(s->waiting + 1, s->waiting, (size_t)s->n_waiting * sizeof *s->waiting);
    s->waiting[0] = v;
    s->n_waiting++;
    s->n_preemptions++;
}

static tuna_status add_step(tuna_sched *s, struct tuna_batch *b, struct tuna_sched_seq *q, int64_t chunk)
{
    bool finishes = q->n_computed + chunk == q->n_tokens; /* its next token is sampled after this step */
    tuna_status st = tuna_batch_add_seq(b, q->tokens + q->n_computed, chunk, q->kv_seq, q->n_computed, false, finishes);
    if (st) return st;
    for (int64_t t = b->n - chunk; t < b->n; t++) b->adapter[t] = q->adapter;
    q->step_tokens = chunk;
    q->step_row = finishes ? b->n_logits - 1 : -1;
    s->step[s->n_step++] = q;
    return TUNA_OK;
}

tuna_status tuna_sched_schedule(tuna_sched *s, struct tuna_batch *b, struct tuna_sched_seq ***out, int64_t *n_out)
{
    tuna_batch_clear(b);
    s->n_step = 0;
    *out = s->step;
    *n_out = 0;
    int64_t total = s->n_running + s->n_waiting;
    tuna_status st = grow_list(&s->step, &s->cap_step, total + 1);
    if (!st) st = grow_list(&s->waiting, &s->cap_waiting, total + 1);
    if (st) return st;
    *out = s->step;
    int64_t budget = s->cfg.max_num_batched_tokens;
    int64_t reserved = 0; /* blocks this step's tokens will take */
    bool preempted = false;
    /* running sequences first, in order; victims come from the back, so they are never ones
     * already placed in this step */
    for (int64_t i = 0; i < s->n_running && budget > 0; i++) {
        struct tuna_sched_seq *q = s->running[i];
        q->step_tokens = 0;
        q->step_row = -1;
        int64_t chunk = q->n_tokens - q->n_computed;
        if (chunk > budget) chunk = budget;
        if (chunk <= 0) continue;
        int64_t need = blocks_needed(s, q, q->n_computed + chunk);
        while (need > tuna_kv_free_blocks(s->kv) - reserved) {
            bool self = s->running[s->n_running - 1] == q;
            preempt_last(s);
            preempted = true;
            if (self) break;
        }
        if (q->state != TUNA_SCHED_RUNNING) break; /* it was the victim: nothing else can run */
        reserved += need;
        if ((st = add_step(s, b, q, chunk))) return st;
        budget -= chunk;
    }
    /* then waiting ones, while there is room (not in a step that had to preempt) */
    const int64_t bs = tuna_kv_block_size(s->kv);
    while (!preempted && budget > 0 && s->n_waiting > 0 && s->n_running < s->cfg.max_num_seqs) {
        struct tuna_sched_seq *q = s->waiting[0]; /* holds no KV: n_computed is 0 */
        /* cached full blocks of its tokens, all but the last token; taking the unreferenced ones
         * uses free blocks too */
        int64_t hit = 0, evictable = 0;
        if (s->cfg.enable_prefix_caching)
            hit = tuna_kv_prefix_match(s->kv, q->tokens, q->n_tokens - 1, q->prefix_adapter, &evictable);
        int64_t start = hit * bs;
        int64_t chunk = q->n_tokens - start;
        if (chunk > budget) chunk = budget;
        int64_t need = (start + chunk + bs - 1) / bs - hit + evictable;
        if (need > tuna_kv_free_blocks(s->kv) - reserved) break;
        if ((st = grow_list(&s->running, &s->cap_running, s->n_running + 1))) return st;
        if ((st = tuna_kv_seq_new(s->kv, &q->kv_seq))) return st;
        if ((st = tuna_kv_seq_take_prefix(s->kv, q->kv_seq, q->tokens, hit, q->prefix_adapter))) {
            tuna_kv_seq_free(s->kv, q->kv_seq);
            q->kv_seq = -1;
            return st;
        }
        q->n_computed = q->n_cached = start;
        if (s->cfg.enable_prefix_caching) {
            s->prefix_queries += q->n_tokens;
            s->prefix_hits += start;
        }
        remove_at(s->waiting, &s->n_waiting, 0);
        q->state = TUNA_SCHED_RUNNING;
        s->running[s->n_running++] = q;
        reserved += need;
        if ((st = add_step(s, b, q, chunk))) return st;
        budget -= chunk;
    }
    *n_out = s->n_step;
    return TUNA_OK;
}

void tuna_sched_commit(tuna_sched *s)
{
    for (int64_t i = 0; i < s->n_step; i++) {
        struct tuna_sched_seq *q = s->step[i];
        q->n_computed += q->step_tokens;
        q->step_tokens = 0;
        /* its K/V up to n_computed are written now: register the blocks that filled up (cannot
         * fail for a live sequence with its own adapter; a failure only loses a cache entry) */
        if (s->cfg.enable_prefix_caching && q->kv_seq >= 0)
            (void)tuna_kv_seq_cache_blocks(s->kv, q->kv_seq, q->tokens, q->n_computed, q->prefix_adapter);
    }
}

tuna_status tuna_sched_append(struct tuna_sched_seq *q, int32_t token)
{
    if (q->n_tokens == q->cap) {
        int64_t c = q->cap * 2;
        int32_t *n = realloc(q->tokens, (size_t)c * sizeof *n);
        if (!n) return tuna_fail_oom("sequence tokens", (size_t)c * sizeof *n);
        q->tokens = n;
        q->cap = c;
    }
    q->tokens[q->n_tokens++] = token;
    return TUNA_OK;
}

void tuna_sched_finish(tuna_sched *s, struct tuna_sched_seq *q)
{
    if (q->state == TUNA_SCHED_RUNNING) remove_from(s->running, &s->n_running, q);
    else if (q->state == TUNA_SCHED_WAITING) remove_from(s->waiting, &s->n_waiting, q);
    if (q->kv_seq >= 0) tuna_kv_seq_free(s->kv, q->kv_seq);
    q->kv_seq = -1;
    q->state = TUNA_SCHED_FINISHED;
}

int64_t tuna_sched_n_running(const tuna_sched *s) { return s->n_running; }
int64_t tuna_sched_n_waiting(const tuna_sched *s) { return s->n_waiting; }
int64_t tuna_sched_n_preemptions(const tuna_sched *s) { return s->n_preemptions; }
int64_t tuna_sched_prefix_queries(const tuna_sched *s) { return s->prefix_queries; }
int64_t tuna_sched_prefix_hits(const tuna_sched *s) { return s->prefix_hits; }
