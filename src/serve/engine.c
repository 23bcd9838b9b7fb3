/* engine.c — the engine thread. Spec: engine.h. Per sequence (one per choice of a request) it
 * keeps a sampler, a streaming detokenizer and the generated text; text that could still turn
 * into a stop string is held back, as generate.c does for `tuna generate`. */
#include "serve/engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "model/generate.h"
#include "serve/scheduler.h"

struct eseq {
    struct tuna_serve_req *req;
    int choice;
    struct tuna_sched_seq *q;
    tuna_sampler *smp;
    tuna_detok_stream *ds;
    char *text;               /* generated text so far (NUL-terminated) */
    size_t len, cap, emitted;
    size_t maxstop;
    int64_t n_out;            /* tokens sampled */
    double t_last;            /* when the last token was produced (0: none yet) */
    struct tuna_serve_token_lp *lps; /* logprobs not yet sent */
    int n_lps, cap_lps;
};

struct tuna_engine {
    struct tuna_model *m;
    const tuna_tokenizer *tok;
    struct tuna_engine_config cfg;
    struct tuna_metrics *metrics;
    tuna_kv_cache *kv;
    tuna_sched *sched;
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    struct tuna_serve_req **inbox;
    int64_t n_inbox, cap_inbox;
    int64_t n_pending;       /* requests submitted and not finished (under mu) */
    int64_t kv_used;         /* blocks in use after the last step (under mu) */
    struct tuna_engine_stats stats; /* under mu */
    /* engine thread only */
    struct eseq **seqs;
    int64_t n_seqs, cap_seqs;
    struct tuna_batch batch;
    float *logits;
    int64_t cap_logits;      /* rows */
    float *scratch;          /* [V] */
    int32_t *ids;            /* [cap_logits] greedy ids of a step where no row needs its logits */
    /* LoRA slots: changed only by the engine thread between steps */
    const struct tuna_lora_adapter **lslots; /* [cfg.max_loras] borrowed, NULL = empty */
    int32_t *lkeys;                          /* [cfg.max_loras] prefix-cache keys */
    tuna_lora_attachment *att;
    pthread_mutex_t op_mu;                   /* one tuna_engine_set_lora at a time */
    struct lora_op *op;                      /* under mu: waiting for the engine thread */
};

struct lora_op {
    int slot;
    const struct tuna_lora_adapter *ad;
    int32_t key;
    bool done;
    tuna_status st;
    char msg[1024];
};

static void push_event(struct eseq *s, const char *text, size_t len, const char *finish)
{
    struct tuna_serve_event *e = calloc(1, sizeof *e);
    char *t = e ? malloc(len + 1) : NULL;
    if (!t) { /* out of memory: drop the text; a finish still has to reach the reader */
        free(e);
        if (!finish || !(e = calloc(1, sizeof *e))) return;
        len = 0;
    } else {
        memcpy(t, text, len);
        t[len] = '\0';
    }
    e->text = t;
    e->len = len;
    e->choice = s->choice;
    e->finish = finish;
    e->lps = s->lps;
    e->n_lps = s->n_lps;
    s->lps = NULL;
    s->n_lps = s->cap_lps = 0;
    tuna_serve_req_push(s->req, e);
}

static void eseq_free(struct eseq *s)
{
    if (!s) return;
    tuna_sampler_free(s->smp);
    tuna_detok_stream_free(s->ds);
    tuna_sched_seq_free(s->q);
    free(s->text);
    free(s->lps);
    free(s);
}

/* Finishes a sequence: flushes held text (unless aborted), sends the finish event, updates the
 * metrics, releases its KV blocks and drops it from the engine's list (index i). */
static void finish_seq(tuna_engine *e, int64_t i, const char *reason)
{
    struct eseq *s = e->seqs[i];
    bool abort = !strcmp(reason, "abort") || !strcmp(reason, "error");
    size_t from = s->emitted, upto = abort ? s->emitted : s->len;
    push_event(s, s->text ? s->text + from : "", upto - from, reason);
    tuna_sched_finish(e->sched, s->q);
    pthread_mutex_lock(&e->metrics->mu);
    if (!strcmp(reason, "stop")) e->metrics->success_stop++;
    else if (!strcmp(reason, "length")) e->metrics->success_length++;
    else e->metrics->success_abort++;
    pthread_mutex_unlock(&e->metrics->mu);
    struct tuna_serve_req *r = s->req;
    bool last;
    pthread_mutex_lock(&r->mu);
    last = r->n_done == r->p.n;
    pthread_mutex_unlock(&r->mu);
    if (last) {
        pthread_mutex_lock(&e->metrics->mu);
        tuna_histogram_observe(&e->metrics->e2e, tuna_serve_now() - r->t_arrival);
        pthread_mutex_unlock(&e->metrics->mu);
        pthread_mutex_lock(&e->mu);
        e->n_pending--;
        pthread_mutex_unlock(&e->mu);
        if (e->cfg.on_finish) e->cfg.on_finish(e->cfg.observer_ctx, r);
    }
    eseq_free(s);
    memmove(e->seqs + i, e->seqs + i + 1, (size_t)(e->n_seqs - i - 1) * sizeof *e->seqs);
    e->n_seqs--;
    if (last) tuna_serve_req_unref(r);
}

/* Creates the n sequences of a request; on failure the request gets an error event per choice. */
static void intake(tuna_engine *e, struct tuna_serve_req *r)
{
    const struct tuna_serve_params *p = &r->p;
    if (e->n_seqs + p->n > e->cap_seqs) {
        int64_t c = e->cap_seqs ? e->cap_seqs : 64;
        while (c < e->n_seqs + p->n) c *= 2;
        struct eseq **ns = realloc(e->seqs, (size_t)c * sizeof *ns);
        if (ns) {
            e->seqs = ns;
            e->cap_seqs = c;
        }
    }
    for (int c = 0; c < p->n; c++) {
        struct eseq *s = calloc(1, sizeof *s);
        tuna_status st = s ? TUNA_OK : tuna_fail_oom("sequence", sizeof *s);
        if (!st && e->n_seqs == e->cap_seqs) st = tuna_fail_oom("sequence list", 0);
        struct tuna_sampling smp = p->sampling;
        if (smp.has_seed) smp.seed += (uint64_t)c; /* n > 1 with a seed: distinct, reproducible choices */
        if (!st) {
            s->req = r;
            s->choice = c;
            for (int k = 0; k < p->n_stop; k++)
                if (strlen(p->stop[k]) > s->maxstop) s->maxstop = strlen(p->stop[k]);
            st = tuna_sampler_new(&smp, e->m->arch.vocab_size, &s->smp);
        }
        if (!st && e->tok) st = tuna_detok_stream_new(e->tok, p->skip_special, &s->ds);
        if (!st) st = tuna_sched_seq_new(p->prompt, p->n_prompt, p->adapter, s, &s->q);
        if (!st && p->adapter >= 0 && p->adapter < e->cfg.max_loras) s->q->prefix_adapter = e->lkeys[p->adapter];
        if (!st) st = tuna_sched_add(e->sched, s->q);
        if (st) {
            pthread_mutex_lock(&r->mu);
            if (!r->error) r->error = strdup(tuna_last_error());
            pthread_mutex_unlock(&r->mu);
            if (s) {
                s->req = r;
                s->choice = c;
                push_event(s, "", 0, "error");
                tuna_sched_seq_free(s->q);
                s->q = NULL;
                eseq_free(s);
            } else {
                struct eseq tmp = {.req = r, .choice = c};
                push_event(&tmp, "", 0, "error");
            }
            continue;
        }
        tuna_sampler_reset(s->smp, p->prompt, p->n_prompt);
        e->seqs[e->n_seqs++] = s;
    }
    pthread_mutex_lock(&e->metrics->mu);
    e->metrics->prompt_tokens += (uint64_t)(p->n_prompt * p->n);
    pthread_mutex_unlock(&e->metrics->mu);
    bool none = true;
    for (int64_t i = 0; i < e->n_seqs; i++) none = none && e->seqs[i]->req != r;
    if (none) { /* every choice failed: the engine's reference goes now */
        pthread_mutex_lock(&e->mu);
        e->n_pending--;
        pthread_mutex_unlock(&e->mu);
        if (e->cfg.on_finish) e->cfg.on_finish(e->cfg.observer_ctx, r);
        tuna_serve_req_unref(r);
    }
}

static bool is_stop_id(const struct tuna_serve_params *p, int32_t id)
{
    for (int i = 0; i < p->n_stop_ids; i++)
        if (p->stop_ids[i] == id) return true;
    return false;
}

/* log-softmax of raw logits, the chosen token's and the top-k (vLLM returns logprobs of the
 * model's distribution before penalties and temperature). */
static void record_logprobs(tuna_engine *e, struct eseq *s, const float *lg, int32_t id)
{
    const int64_t V = e->m->arch.vocab_size;
    if (s->n_lps == s->cap_lps) {
        int c = s->cap_lps ? s->cap_lps * 2 : 8;
        struct tuna_serve_token_lp *n = realloc(s->lps, (size_t)c * sizeof *n);
        if (!n) return;
        s->lps = n;
        s->cap_lps = c;
    }
    float mx = -INFINITY;
    for (int64_t v = 0; v < V; v++) mx = lg[v] > mx ? lg[v] : mx;
    double sum = 0;
    for (int64_t v = 0; v < V; v++) sum += exp((double)(lg[v] - mx));
    float lse = mx + (float)log(sum);
    struct tuna_serve_token_lp *t = &s->lps[s->n_lps++];
    memset(t, 0, sizeof *t);
    t->id = id;
    t->logprob = lg[id] - lse;
    int k = s->req->p.top_logprobs;
    for (int64_t v = 0; v < V && k > 0; v++) { /* insertion into a small sorted list */
        float x = lg[v] - lse;
        if (t->n_top == k && x <= t->top_lp[k - 1]) continue;
        int j = t->n_top < k ? t->n_top++ : k - 1;
        while (j > 0 && t->top_lp[j - 1] < x) {
            t->top_lp[j] = t->top_lp[j - 1];
            t->top_id[j] = t->top_id[j - 1];
            j--;
        }
        t->top_lp[j] = x;
        t->top_id[j] = (int32_t)v;
    }
}

static tuna_status text_append(struct eseq *s, const char *p, size_t n)
{
    if (s->len + n + 1 > s->cap) {
        size_t c = s->cap ? s->cap : 256;
        while (c < s->len + n + 1) c *= 2;
        char *nt = realloc(s->text, c);
        if (!nt) return tuna_fail_oom("generated text", c);
        s->text = nt;
        s->cap = c;
    }
    memcpy(s->text + s->len, p, n);
    s->len += n;
    s->text[s->len] = '\0';
    return TUNA_OK;
}

/* The first stop string that ends in text added from `from` on; its start or -1. */
static long find_stop(const struct tuna_serve_params *p, const struct eseq *s, size_t from)
{
    long best = -1;
    for (int i = 0; i < p->n_stop; i++) {
        size_t sl = strlen(p->stop[i]);
        if (!sl) continue;
        size_t start = from > sl ? from - sl + 1 : 0;
        const char *hit = s->len >= start ? strstr(s->text + start, p->stop[i]) : NULL;
        if (hit && (best < 0 || hit - s->text < best)) best = hit - s->text;
    }
    return best;
}

/* Whether the next token of s needs its logits row on the host: anything but a plain argmax
 * (sampling, penalties, logprobs, stop ids masked until min_tokens). */
static bool needs_logits(const struct eseq *s)
{
    const struct tuna_serve_params *p = &s->req->p;
    return p->logprobs || !tuna_gen_is_plain_greedy(&p->sampling) || (s->n_out < p->min_tokens && p->n_stop_ids > 0);
}

/* Samples the next token of sequence i from its logits row (lg), or takes the greedy id the
 * backend computed (lg NULL, needs_logits false); returns the finish reason or NULL. */
static const char *next_token(tuna_engine *e, struct eseq *s, float *lg, int32_t greedy_id, tuna_status *st)
{
    const struct tuna_serve_params *p = &s->req->p;
    const int64_t V = e->m->arch.vocab_size;
    *st = TUNA_OK;
    int32_t id = greedy_id;
    if (lg) {
        if (s->n_out < p->min_tokens) /* stop tokens are not allowed before min_tokens */
            for (int i = 0; i < p->n_stop_ids; i++)
                if (p->stop_ids[i] >= 0 && p->stop_ids[i] < V) lg[p->stop_ids[i]] = -INFINITY;
        if (p->logprobs) memcpy(e->scratch, lg, (size_t)V * sizeof *lg);
        id = tuna_sampler_sample(s->smp, lg);
        if (p->logprobs) record_logprobs(e, s, e->scratch, id);
    }
    if ((*st = tuna_sched_append(s->q, id))) return "error";
    s->n_out++;
    double now = tuna_serve_now();
    pthread_mutex_lock(&e->metrics->mu);
    e->metrics->generation_tokens++;
    if (s->t_last == 0) tuna_histogram_observe(&e->metrics->ttft, now - s->req->t_arrival);
    else tuna_histogram_observe(&e->metrics->itl, now - s->t_last);
    pthread_mutex_unlock(&e->metrics->mu);
    s->t_last = now;
    pthread_mutex_lock(&s->req->mu);
    s->req->completion_tokens++;
    pthread_mutex_unlock(&s->req->mu);
    if (e->cfg.on_token) e->cfg.on_token(e->cfg.observer_ctx, s->req, s->choice, id, s->n_out);
    if (is_stop_id(p, id)) return "stop";
    tuna_sampler_accept(s->smp, id);
    char *piece = NULL;
    if (s->ds && (*st = tuna_detok_stream_push(s->ds, id, &piece))) return "error";
    size_t before = s->len;
    *st = text_append(s, piece ? piece : "", piece ? strlen(piece) : 0);
    free(piece);
    if (*st) return "error";
    if (p->n_stop && s->n_out >= p->min_tokens) {
        long hit = find_stop(p, s, before);
        if (hit >= 0) {
            s->len = (size_t)hit;
            s->text[hit] = '\0';
            return "stop";
        }
    }
    bool at_limit = (p->max_tokens > 0 && s->n_out >= p->max_tokens) || s->q->n_tokens >= e->m->max_model_len;
    if (at_limit) return "length";
    /* hold back what could still become a stop string, on a UTF-8 boundary */
    size_t hold = s->maxstop ? s->maxstop - 1 : 0;
    size_t safe = s->len > hold ? s->len - hold : 0;
    while (safe > s->emitted && safe < s->len && ((unsigned char)s->text[safe] & 0xC0) == 0x80) safe--;
    if (safe > s->emitted || (s->n_lps && p->stream)) {
        size_t from = s->emitted;
        s->emitted = safe > s->emitted ? safe : s->emitted;
        push_event(s, s->text + from, s->emitted - from, NULL);
    }
    return NULL;
}

static void update_gauges(tuna_engine *e)
{
    /* referenced blocks: cached blocks nobody holds are free (evictable) */
    int64_t used = tuna_kv_n_blocks(e->kv) - tuna_kv_free_blocks(e->kv);
    pthread_mutex_lock(&e->mu);
    e->kv_used = used;
    pthread_mutex_unlock(&e->mu);
    pthread_mutex_lock(&e->metrics->mu);
    e->metrics->running = 0;
    e->metrics->waiting = 0;
    /* count requests, not sequences: a request runs when any of its choices runs */
    for (int64_t i = 0; i < e->n_seqs; i++) {
        struct eseq *s = e->seqs[i];
        if (s->choice != 0 && i > 0 && e->seqs[i - 1]->req == s->req) continue;
        if (s->q->state == TUNA_SCHED_RUNNING) e->metrics->running++;
        else e->metrics->waiting++;
    }
    e->metrics->kv_usage = (double)used / (double)tuna_kv_n_blocks(e->kv);
    e->metrics->preemptions = (uint64_t)tuna_sched_n_preemptions(e->sched);
    e->metrics->prefix_cache_queries = (uint64_t)tuna_sched_prefix_queries(e->sched);
    e->metrics->prefix_cache_hits = (uint64_t)tuna_sched_prefix_hits(e->sched);
    pthread_mutex_unlock(&e->metrics->mu);
}

/* One engine step: cancellations, schedule, forward, sample. */
static void step(tuna_engine *e)
{
    for (int64_t i = 0; i < e->n_seqs;) {
        if (atomic_load(&e->seqs[i]->req->cancelled)) finish_seq(e, i, "abort");
        else i++;
    }
    if (!e->n_seqs) {
        update_gauges(e);
        return;
    }
    struct tuna_sched_seq **plan;
    int64_t n_plan;
    tuna_status st = tuna_sched_schedule(e->sched, &e->batch, &plan, &n_plan);
    if (!st && e->batch.n == 0) st = tuna_fail(TUNA_E_INTERNAL, "scheduler: nothing fits the KV cache");
    if (!st && e->batch.n_logits > e->cap_logits) {
        float *nl = realloc(e->logits, (size_t)e->batch.n_logits * (size_t)e->m->arch.vocab_size * sizeof(float));
        int32_t *ni = nl ? realloc(e->ids, (size_t)e->batch.n_logits * sizeof *ni) : NULL;
        if (nl) e->logits = nl;
        if (ni) e->ids = ni;
        if (!nl || !ni) st = tuna_fail_oom("logits", (size_t)e->batch.n_logits * (size_t)e->m->arch.vocab_size * 4);
        else e->cap_logits = e->batch.n_logits;
    }
    /* when every row of the step is a plain argmax, the backend computes it where the logits are
     * and only the ids come back (on a GPU: T ints instead of T x V floats) */
    bool greedy = true;
    for (int64_t k = 0; k < n_plan && greedy; k++)
        if (plan[k]->step_row >= 0) greedy = !needs_logits(plan[k]->user);
    double t_fwd = tuna_serve_now();
    if (!st) st = greedy ? tuna_model_forward_greedy(e->m, e->kv, &e->batch, e->ids)
                         : tuna_model_forward(e->m, e->kv, &e->batch, e->logits, NULL);
    if (!st) {
        int64_t used = tuna_kv_n_blocks(e->kv) - tuna_kv_free_blocks(e->kv);
        pthread_mutex_lock(&e->mu);
        e->stats.steps++;
        e->stats.step_tokens += e->batch.n;
        e->stats.step_seqs += n_plan;
        double dt = tuna_serve_now() - t_fwd;
        e->stats.forward_s += dt;
        if (e->batch.n == n_plan) {
            e->stats.decode_steps++;
            e->stats.decode_tokens += e->batch.n;
            e->stats.decode_forward_s += dt;
        }
        if (used > e->stats.peak_kv_blocks) e->stats.peak_kv_blocks = used;
        pthread_mutex_unlock(&e->mu);
    }
    if (st) { /* a failed step fails the sequences it held (or all, when nothing was planned) */
        fprintf(stderr, "tuna serve: step failed: %s\n", tuna_last_error());
        for (int64_t i = e->n_seqs - 1; i >= 0; i--) {
            struct eseq *s = e->seqs[i];
            bool in_plan = n_plan == 0;
            for (int64_t k = 0; k < n_plan && !in_plan; k++) in_plan = plan[k] == s->q;
            if (!in_plan) continue;
            pthread_mutex_lock(&s->req->mu);
            if (!s->req->error) s->req->error = strdup(tuna_last_error());
            pthread_mutex_unlock(&s->req->mu);
            finish_seq(e, i, "error");
        }
        update_gauges(e);
        return;
    }
    tuna_sched_commit(e->sched);
    const int64_t V = e->m->arch.vocab_size;
    for (int64_t k = 0; k < n_plan; k++) {
        struct tuna_sched_seq *q = plan[k];
        if (q->step_row < 0) continue;
        struct eseq *s = q->user;
        const char *fin = greedy ? next_token(e, s, NULL, e->ids[q->step_row], &st)
                                 : next_token(e, s, e->logits + q->step_row * V, 0, &st);
        if (!fin) continue;
        if (st) {
            pthread_mutex_lock(&s->req->mu);
            if (!s->req->error) s->req->error = strdup(tuna_last_error());
            pthread_mutex_unlock(&s->req->mu);
        }
        for (int64_t i = 0; i < e->n_seqs; i++)
            if (e->seqs[i] == s) {
                finish_seq(e, i, fin);
                break;
            }
    }
    update_gauges(e);
}

/* Applies a LoRA slot change (engine thread, between steps): detach, swap, attach all slots. */
static void apply_lora_op(tuna_engine *e, struct lora_op *op)
{
    tuna_status st = TUNA_OK;
    if (op->slot < 0 || op->slot >= e->cfg.max_loras)
        st = tuna_fail(TUNA_E_INVALID, "LoRA slot %d is outside 0..%d", op->slot, e->cfg.max_loras - 1);
    for (int64_t i = 0; !st && i < e->n_seqs; i++)
        if (e->seqs[i]->q->adapter == op->slot && e->lslots[op->slot])
            st = tuna_fail(TUNA_E_INVALID, "LoRA slot %d is still used by a running request", op->slot);
    if (!st) {
        const struct tuna_lora_adapter *old = e->lslots[op->slot];
        static const struct tuna_lora_adapter empty; /* rank 0 everywhere */
        const struct tuna_lora_adapter *list[64];
        int n = e->cfg.max_loras, used = 0;
        e->lslots[op->slot] = op->ad;
        for (int i = 0; i < n; i++) {
            list[i] = e->lslots[i] ? e->lslots[i] : &empty;
            used += e->lslots[i] != NULL;
        }
        tuna_lora_detach(e->m, e->att);
        e->att = NULL;
        if (used) st = tuna_lora_attach(e->m, list, n, &e->att);
        if (!st && used && (st = tuna_model_lora_prepare(e->m))) { /* GPU: upload now, fail here */
            tuna_lora_detach(e->m, e->att);
            e->att = NULL;
        }
        if (st) { /* put the previous set back (it attached before, so it attaches again) */
            e->lslots[op->slot] = old;
            used = 0;
            for (int i = 0; i < n; i++) {
                list[i] = e->lslots[i] ? e->lslots[i] : &empty;
                used += e->lslots[i] != NULL;
            }
            tuna_status st2 = TUNA_OK;
            snprintf(op->msg, sizeof op->msg, "%s", tuna_last_error());
            if (used) st2 = tuna_lora_attach(e->m, list, n, &e->att);
            if (st2) fprintf(stderr, "tuna serve: re-attaching the previous adapters failed: %s\n", tuna_last_error());
        } else {
            e->lkeys[op->slot] = op->ad ? op->key : -1;
        }
    } else {
        snprintf(op->msg, sizeof op->msg, "%s", tuna_last_error());
    }
    op->st = st;
}

static void *engine_main(void *arg)
{
    tuna_engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stop && e->n_inbox == 0 && e->n_seqs == 0 && !e->op) pthread_cond_wait(&e->cv, &e->mu);
        if (e->stop) {
            pthread_mutex_unlock(&e->mu);
            break;
        }
        struct lora_op *op = e->op;
        pthread_mutex_unlock(&e->mu);
        if (op) { /* between steps: nothing runs the model now */
            apply_lora_op(e, op);
            pthread_mutex_lock(&e->mu);
            op->done = true;
            e->op = NULL;
            pthread_cond_broadcast(&e->cv);
            pthread_mutex_unlock(&e->mu);
        }
        pthread_mutex_lock(&e->mu);
        int64_t n = e->n_inbox;
        struct tuna_serve_req *local[64];
        if (n > 64) n = 64;
        if (n) { /* the inbox may not exist yet when an adapter change woke the thread */
            memcpy(local, e->inbox, (size_t)n * sizeof *local);
            memmove(e->inbox, e->inbox + n, (size_t)(e->n_inbox - n) * sizeof *e->inbox);
        }
        e->n_inbox -= n;
        pthread_mutex_unlock(&e->mu);
        for (int64_t i = 0; i < n; i++) intake(e, local[i]);
        step(e);
    }
    while (e->n_seqs) finish_seq(e, e->n_seqs - 1, "abort");
    return NULL;
}

tuna_status tuna_engine_start(struct tuna_model *m, const tuna_tokenizer *tok, const struct tuna_engine_config *cfg,
                              struct tuna_metrics *metrics, tuna_engine **out)
{
    *out = NULL;
    tuna_engine *e = calloc(1, sizeof *e);
    if (!e) return tuna_fail_oom("engine", sizeof *e);
    e->m = m;
    e->tok = tok;
    e->cfg = *cfg;
    e->metrics = metrics;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    tuna_batch_init(&e->batch);
    struct tuna_sched_config sc = {.max_num_seqs = cfg->max_num_seqs,
                                   .max_num_batched_tokens = cfg->max_num_batched_tokens,
                                   .enable_prefix_caching = cfg->enable_prefix_caching};
    tuna_status st = tuna_model_kv_new(m, cfg->kv_tokens, cfg->block_size, &e->kv);
    if (!st) st = tuna_sched_new(&sc, e->kv, &e->sched);
    e->scratch = malloc((size_t)m->arch.vocab_size * sizeof(float));
    pthread_mutex_init(&e->op_mu, NULL);
    if (!st && (cfg->max_loras < 0 || cfg->max_loras > 64))
        st = tuna_fail(TUNA_E_INVALID, "--max-loras must be 0..64, got %d", cfg->max_loras);
    if (!st && cfg->max_loras > 0) {
        e->lslots = calloc((size_t)cfg->max_loras, sizeof *e->lslots);
        e->lkeys = malloc((size_t)cfg->max_loras * sizeof *e->lkeys);
        if (!e->lslots || !e->lkeys) st = tuna_fail_oom("LoRA slots", (size_t)cfg->max_loras);
        for (int i = 0; !st && i < cfg->max_loras; i++) e->lkeys[i] = -1;
    }
    if (!st && !e->scratch) st = tuna_fail_oom("engine scratch", (size_t)m->arch.vocab_size * 4);
    if (!st && pthread_create(&e->thread, NULL, engine_main, e) != 0)
        st = tuna_fail(TUNA_E_INTERNAL, "cannot start the engine thread");
    if (st) {
        tuna_engine_free(e);
        return st;
    }
    e->started = true;
    *out = e;
    return TUNA_OK;
}

void tuna_engine_stop(tuna_engine *e)
{
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    e->stop = true;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->started) pthread_join(e->thread, NULL);
    e->started = false;
    pthread_mutex_lock(&e->mu);
    for (int64_t i = 0; i < e->n_inbox; i++) { /* never taken in: end them as aborted */
        struct tuna_serve_req *r = e->inbox[i];
        for (int c = 0; c < r->p.n; c++) {
            struct eseq tmp = {.req = r, .choice = c};
            push_event(&tmp, "", 0, "abort");
        }
        tuna_serve_req_unref(r);
    }
    e->n_inbox = 0;
    if (e->op) { /* the thread is gone: answer a waiting set_lora */
        e->op->st = tuna_fail(TUNA_E_INVALID, "the server is shutting down");
        snprintf(e->op->msg, sizeof e->op->msg, "the server is shutting down");
        e->op->done = true;
        e->op = NULL;
        pthread_cond_broadcast(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
}

tuna_status tuna_engine_set_lora(tuna_engine *e, int slot, const struct tuna_lora_adapter *ad, int32_t key)
{
    if (slot < 0 || slot >= e->cfg.max_loras)
        return tuna_fail(TUNA_E_INVALID, "LoRA slot %d is outside 0..%d (--max-loras)", slot, e->cfg.max_loras - 1);
    struct lora_op op = {.slot = slot, .ad = ad, .key = key};
    pthread_mutex_lock(&e->op_mu);
    pthread_mutex_lock(&e->mu);
    if (e->stop || !e->started) {
        op.done = true;
        op.st = tuna_fail(TUNA_E_INVALID, "the server is shutting down");
        snprintf(op.msg, sizeof op.msg, "%s", tuna_last_error());
    } else {
        e->op = &op;
        pthread_cond_broadcast(&e->cv);
    }
    while (!op.done) pthread_cond_wait(&e->cv, &e->mu);
    pthread_mutex_unlock(&e->mu);
    pthread_mutex_unlock(&e->op_mu);
    return op.st ? tuna_fail(op.st, "%s", op.msg) : TUNA_OK;
}

void tuna_engine_free(tuna_engine *e)
{
    if (!e) return;
    tuna_engine_stop(e);
    free(e->inbox);
    free(e->seqs);
    tuna_batch_free(&e->batch);
    free(e->logits);
    free(e->ids);
    free(e->scratch);
    if (e->att) tuna_lora_detach(e->m, e->att);
    free(e->lslots);
    free(e->lkeys);
    pthread_mutex_destroy(&e->op_mu);
    tuna_sched_free(e->sched);
    tuna_kv_free(e->kv);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

tuna_status tuna_engine_submit(tuna_engine *e, struct tuna_serve_req *r)
{
    pthread_mutex_lock(&e->mu);
    tuna_status st = TUNA_OK;
    if (e->stop) {
        st = tuna_fail(TUNA_E_INVALID, "the server is shutting down");
    } else if (e->n_pending >= e->cfg.max_pending) {
        st = tuna_fail(TUNA_E_OOM, "the server is busy: %lld requests are already queued or running "
                       "(--max-pending); retry later", (long long)e->n_pending);
    } else if (e->n_inbox == e->cap_inbox) {
        int64_t c = e->cap_inbox ? e->cap_inbox * 2 : 64;
        struct tuna_serve_req **n = realloc(e->inbox, (size_t)c * sizeof *n);
        if (!n) st = tuna_fail_oom("engine inbox", (size_t)c * sizeof *n);
        else {
            e->inbox = n;
            e->cap_inbox = c;
        }
    }
    if (!st) {
        tuna_serve_req_ref(r);
        e->inbox[e->n_inbox++] = r;
        e->n_pending++;
        pthread_cond_broadcast(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    return st;
}

void tuna_engine_stats(tuna_engine *e, struct tuna_engine_stats *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    pthread_mutex_unlock(&e->mu);
    out->kv_blocks = tuna_kv_n_blocks(e->kv);
    pthread_mutex_lock(&e->metrics->mu);
    out->preemptions = (int64_t)e->metrics->preemptions;
    pthread_mutex_unlock(&e->metrics->mu);
}

void tuna_engine_kv_usage(tuna_engine *e, int64_t *used, int64_t *total)
{
    pthread_mutex_lock(&e->mu);
    *used = e->kv_used;
    pthread_mutex_unlock(&e->mu);
    *total = tuna_kv_n_blocks(e->kv);
}
