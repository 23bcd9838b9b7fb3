/* bench.c — the serving benchmark's driver (spec: bench.h). The engine thread reports each token
 * and each finished request through the engine's observer hooks; timestamps go into arrays
 * sized up front, so the hooks never allocate. The driver thread submits requests (all at once,
 * or one per finished request in the closed loop), drains the text events as an HTTP connection
 * would, and frees finished requests. */
#include "serve/bench.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "model/sampler.h"

struct breq {
    struct tuna_serve_req *r; /* NULL once freed */
    double t_submit, t_first, t_last, t_end;
    int64_t n; /* tokens seen */
    bool finished, ok;
};

struct bench {
    const struct tuna_serve_bench_config *cfg;
    struct breq *rq;   /* [n_requests] */
    double *itl;       /* [n_requests * (gen - 1)] */
    int32_t **outputs; /* keep_outputs: [n_requests][gen] */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int64_t n_finished; /* under mu */
};

static void on_token(void *ctx, struct tuna_serve_req *r, int choice, int32_t id, int64_t n)
{
    struct bench *b = ctx;
    (void)choice;
    int64_t i = (int64_t)(intptr_t)r->user;
    struct breq *q = &b->rq[i];
    double now = tuna_serve_now();
    if (n == 1)
        q->t_first = now;
    else if (n - 2 < b->cfg->gen - 1)
        b->itl[i * (b->cfg->gen - 1) + (n - 2)] = now - q->t_last;
    q->t_last = now;
    if (b->outputs && n <= b->cfg->gen) b->outputs[i][n - 1] = id;
    q->n = n;
}

static void on_finish(void *ctx, struct tuna_serve_req *r)
{
    struct bench *b = ctx;
    int64_t i = (int64_t)(intptr_t)r->user;
    pthread_mutex_lock(&r->mu);
    bool err = r->error != NULL;
    pthread_mutex_unlock(&r->mu);
    pthread_mutex_lock(&b->mu);
    b->rq[i].t_end = tuna_serve_now();
    b->rq[i].ok = !err && b->rq[i].n == b->cfg->gen;
    b->rq[i].finished = true;
    b->n_finished++;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Request i: a prompt of random ids (distinct per request), greedy, exactly gen tokens. */
static tuna_status submit(tuna_engine *e, struct bench *b, int64_t i, int n_adapters, int64_t vocab, int32_t *keep)
{
    const struct tuna_serve_bench_config *c = b->cfg;
    struct tuna_serve_params p;
    memset(&p, 0, sizeof p);
    p.kind = TUNA_SERVE_COMPLETION;
    p.adapter = n_adapters > 0 ? (int32_t)(i % n_adapters) : -1;
    p.prompt = malloc((size_t)c->prompt_len * sizeof *p.prompt);
    if (!p.prompt) return tuna_fail_oom("bench prompt", (size_t)c->prompt_len * 4);
    uint64_t s = mix64(c->seed ^ mix64((uint64_t)i + 1));
    for (int64_t t = 0; t < c->prompt_len; t++) {
        s = mix64(s);
        p.prompt[t] = (int32_t)(s % (uint64_t)vocab);
    }
    if (keep) memcpy(keep, p.prompt, (size_t)c->prompt_len * sizeof *keep);
    p.n_prompt = c->prompt_len;
    tuna_sampling_default(&p.sampling);
    p.max_tokens = c->gen;
    p.ignore_eos = true;
    p.n = 1;
    struct tuna_serve_req *r = NULL;
    tuna_status st = tuna_serve_req_new(&p, &r);
    if (st) {
        tuna_serve_params_free(&p);
        return st;
    }
    r->user = (void *)(intptr_t)i;
    b->rq[i].r = r;
    b->rq[i].t_submit = r->t_arrival;
    if ((st = tuna_engine_submit(e, r))) {
        tuna_serve_req_unref(r);
        b->rq[i].r = NULL;
    }
    return st;
}

/* Pops the queued events of every live request (text the HTTP side would send) and frees the
 * finished ones; returns the requests finished so far. */
static int64_t drain(struct bench *b, int64_t submitted)
{
    for (int64_t i = 0; i < submitted; i++) {
        struct breq *q = &b->rq[i];
        if (!q->r) continue;
        bool to = false;
        struct tuna_serve_event *ev;
        while ((ev = tuna_serve_req_pop_timed(q->r, 0, &to)) != NULL)
            tuna_serve_event_free(ev);
        pthread_mutex_lock(&b->mu);
        bool fin = q->finished;
        pthread_mutex_unlock(&b->mu);
        if (fin) {
            tuna_serve_req_unref(q->r);
            q->r = NULL;
        }
    }
    pthread_mutex_lock(&b->mu);
    int64_t n = b->n_finished;
    pthread_mutex_unlock(&b->mu);
    return n;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Percentile by nearest rank of a sorted array. */
static double pct(const double *v, int64_t n, double p)
{
    if (n == 0) return 0;
    int64_t k = (int64_t)ceil(p / 100.0 * (double)n) - 1;
    if (k < 0) k = 0;
    if (k >= n) k = n - 1;
    return v[k];
}

static void summarize(struct bench *b, struct tuna_serve_bench_result *out, double t0, double t1)
{
    const struct tuna_serve_bench_config *c = b->cfg;
    const int64_t N = c->n_requests;
    double *ttft = malloc((size_t)N * sizeof *ttft);
    int64_t n_ttft = 0, n_itl = 0;
    double s_e2e = 0, s_ttft = 0, s_itl = 0;
    out->wall_s = t1 - t0;
    for (int64_t i = 0; i < N; i++) {
        struct breq *q = &b->rq[i];
        if (q->ok)
            out->completed++;
        else
            out->failed++;
        out->prompt_tokens += c->prompt_len;
        out->output_tokens += q->n;
        s_e2e += q->t_end - q->t_submit;
        if (q->n >= 1 && ttft) {
            ttft[n_ttft++] = q->t_first - q->t_submit;
            s_ttft += q->t_first - q->t_submit;
        }
        int64_t k = q->n - 1 < c->gen - 1 ? q->n - 1 : c->gen - 1;
        for (int64_t j = 0; j < k; j++) { /* compact the measured gaps to the front */
            double d = b->itl[i * (c->gen - 1) + j];
            s_itl += d;
            b->itl[n_itl++] = d;
        }
    }
    out->e2e_mean = N ? s_e2e / (double)N : 0;
    if (ttft) {
        qsort(ttft, (size_t)n_ttft, sizeof *ttft, cmp_double);
        out->ttft_mean = n_ttft ? s_ttft / (double)n_ttft : 0;
        out->ttft_p50 = pct(ttft, n_ttft, 50);
        out->ttft_p99 = pct(ttft, n_ttft, 99);
    }
    qsort(b->itl, (size_t)n_itl, sizeof *b->itl, cmp_double);
    out->itl_mean = n_itl ? s_itl / (double)n_itl : 0;
    out->itl_p50 = pct(b->itl, n_itl, 50);
    out->itl_p99 = pct(b->itl, n_itl, 99);
    free(ttft);
}

tuna_status tuna_serve_bench_run(struct tuna_model *m, const tuna_tokenizer *tok, const struct tuna_engine_config *ec,
                                 const struct tuna_lora_adapter *const *adapters, int n_adapters,
                                 const struct tuna_serve_bench_config *cfg, struct tuna_serve_bench_result *out)
{
    memset(out, 0, sizeof *out);
    const int64_t N = cfg->n_requests;
    if (N < 1 || cfg->prompt_len < 1 || cfg->gen < 1 || cfg->concurrency < 0 || n_adapters < 0 || n_adapters > 64)
        return tuna_fail(TUNA_E_INVALID, "bench: need requests >= 1, prompt length >= 1, gen >= 1, concurrency >= 0 "
                                         "and 0..64 adapters");
    if (cfg->prompt_len + cfg->gen > m->max_model_len)
        return tuna_fail(TUNA_E_RANGE,
                         "bench: prompt %lld + gen %lld tokens exceed the context of %lld tokens; "
                         "shorten them or raise --max-model-len",
                         (long long)cfg->prompt_len, (long long)cfg->gen, (long long)m->max_model_len);
    struct bench b;
    memset(&b, 0, sizeof b);
    b.cfg = cfg;
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    b.rq = calloc((size_t)N, sizeof *b.rq);
    b.itl = malloc((size_t)(N * (cfg->gen > 1 ? cfg->gen - 1 : 1)) * sizeof *b.itl);
    tuna_status st = (!b.rq || !b.itl) ? tuna_fail_oom("bench timing arrays", (size_t)(N * cfg->gen) * 8) : TUNA_OK;
    if (!st && cfg->keep_outputs) {
        out->n = N;
        out->prompts = calloc((size_t)N, sizeof *out->prompts);
        out->outputs = calloc((size_t)N, sizeof *out->outputs);
        out->n_out = calloc((size_t)N, sizeof *out->n_out);
        b.outputs = out->outputs;
        bool ok = out->prompts && out->outputs && out->n_out;
        for (int64_t i = 0; ok && i < N; i++) {
            out->prompts[i] = malloc((size_t)cfg->prompt_len * sizeof(int32_t));
            out->outputs[i] = calloc((size_t)cfg->gen, sizeof(int32_t));
            ok = out->prompts[i] && out->outputs[i];
        }
        if (!ok) st = tuna_fail_oom("bench outputs", (size_t)(N * (cfg->gen + cfg->prompt_len)) * 4);
    }
    struct tuna_engine_config c = *ec;
    c.on_token = on_token;
    c.on_finish = on_finish;
    c.observer_ctx = &b;
    c.max_loras = n_adapters;
    if (c.max_pending < N) c.max_pending = N;
    struct tuna_metrics metrics;
    tuna_metrics_init(&metrics);
    tuna_engine *e = NULL;
    if (!st) st = tuna_engine_start(m, tok, &c, &metrics, &e);
    for (int i = 0; !st && i < n_adapters; i++)
        st = tuna_engine_set_lora(e, i, adapters[i], i);
    int64_t submitted = 0;
    double t0 = tuna_serve_now(), t1 = t0;
    if (!st) {
        int64_t window = cfg->concurrency > 0 && cfg->concurrency < N ? cfg->concurrency : N;
        for (; !st && submitted < window; submitted++)
            st =
                submit(e, &b, submitted, n_adapters, m->arch.vocab_size, out->prompts ? out->prompts[submitted] : NULL);
        int64_t done = 0;
        while (!st && done < N) {
            pthread_mutex_lock(&b.mu);
            if (b.n_finished == done) { /* wake for a finish, or every 20 ms to drain text events */
                struct timespec dl;
                clock_gettime(CLOCK_REALTIME, &dl);
                dl.tv_nsec += 20000000L;
                if (dl.tv_nsec >= 1000000000L) {
                    dl.tv_sec++;
                    dl.tv_nsec -= 1000000000L;
                }
                pthread_cond_timedwait(&b.cv, &b.mu, &dl);
            }
            pthread_mutex_unlock(&b.mu);
            done = drain(&b, submitted);
            /* closed loop: one new request per finished one */
            while (!st && submitted < N && submitted - done < window) {
                st = submit(e, &b, submitted, n_adapters, m->arch.vocab_size,
                            out->prompts ? out->prompts[submitted] : NULL);
                submitted++;
            }
        }
        t1 = tuna_serve_now();
    }
    if (e) tuna_engine_stats(e, &out->eng);
    tuna_engine_free(e); /* aborts whatever still runs (only after a failure) */
    for (int64_t i = 0; i < submitted; i++)
        tuna_serve_req_unref(b.rq[i].r);
    if (!st) {
        summarize(&b, out, t0, t1);
        for (int64_t i = 0; out->n_out && i < N; i++)
            out->n_out[i] = b.rq[i].n < cfg->gen ? b.rq[i].n : cfg->gen;
    }
    tuna_metrics_destroy(&metrics);
    free(b.rq);
    free(b.itl);
    pthread_mutex_destroy(&b.mu);
    pthread_cond_destroy(&b.cv);
    if (st) tuna_serve_bench_result_free(out);
    return st;
}

void tuna_serve_bench_result_free(struct tuna_serve_bench_result *r)
{
    for (int64_t i = 0; i < r->n; i++) {
        if (r->prompts) free(r->prompts[i]);
        if (r->outputs) free(r->outputs[i]);
    }
    free(r->prompts);
    free(r->outputs);
    free(r->n_out);
    memset(r, 0, sizeof *r);
}

/* --- synthetic adapters --- */

static const char *const k_proj[7] = {"mlp.down_proj",    "mlp.gate_proj",    "mlp.up_proj",     "self_attn.k_proj",
                                      "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"};

static tuna_status make_adapter(const struct tuna_model *m, int64_t r, uint64_t seed, struct tuna_lora_adapter **out)
{
    struct tuna_lora_adapter *a = calloc(1, sizeof *a);
    if (!a) return tuna_fail_oom("adapter", sizeof *a);
    const int64_t L = m->arch.n_layers;
    a->r = r;
    a->alpha = (double)r;
    a->file_dtype = TUNA_DTYPE_F32;
    a->modules = calloc((size_t)(L * 7), sizeof *a->modules);
    tuna_status st = a->modules ? TUNA_OK : tuna_fail_oom("adapter modules", (size_t)(L * 7) * sizeof *a->modules);
    uint64_t s = mix64(seed);
    for (int64_t l = 0; !st && l < L; l++) {
        const struct tuna_layer *ly = &m->layers[l];
        const struct tuna_linear *lins[7] = {&ly->down, &ly->gate, &ly->up, &ly->k, &ly->o, &ly->q, &ly->v};
        for (int k = 0; !st && k < 7; k++) {
            struct tuna_lora_module *mod = &a->modules[a->n_modules];
            char name[96];
            snprintf(name, sizeof name, "model.layers.%lld.%s", (long long)l, k_proj[k]);
            mod->name = strdup(name);
            mod->r = r;
            mod->in = lins[k]->w.cols;
            mod->out = lins[k]->w.rows;
            mod->alpha = (double)r;
            mod->scale = tuna_lora_scale(mod->alpha, r, false);
            mod->A = malloc((size_t)(r * mod->in) * sizeof(float));
            mod->B = malloc((size_t)(mod->out * r) * sizeof(float));
            a->n_modules++;
            if (!mod->name || !mod->A || !mod->B) {
                st = tuna_fail_oom("adapter weights", (size_t)(r * (mod->in + mod->out)) * 4);
                break;
            }
            /* A ~ U(-1/sqrt(K), 1/sqrt(K)) as PEFT's kaiming init; B ~ U(-0.2, 0.2): a trained-like change of a few %
             */
            float sa = 1.0f / sqrtf((float)mod->in), sb = 0.2f;
            for (int64_t i = 0; i < r * mod->in; i++) {
                s = mix64(s);
                mod->A[i] = sa * ((float)(s >> 40) * 0x1.0p-23f - 1.0f);
            }
            for (int64_t i = 0; i < mod->out * r; i++) {
                s = mix64(s);
                mod->B[i] = sb * ((float)(s >> 40) * 0x1.0p-23f - 1.0f);
            }
        }
    }
    /* tuna_lora_find wants the modules sorted by name ("model.layers.10" < "model.layers.2") */
    for (int i = 1; !st && i < a->n_modules; i++) {
        struct tuna_lora_module t = a->modules[i];
        int j = i;
        while (j > 0 && strcmp(a->modules[j - 1].name, t.name) > 0) {
            a->modules[j] = a->modules[j - 1];
            j--;
        }
        a->modules[j] = t;
    }
    if (st) {
        tuna_lora_free(a);
        return st;
    }
    *out = a;
    return TUNA_OK;
}

tuna_status tuna_serve_bench_make_adapters(const struct tuna_model *m, int k, int64_t r, uint64_t seed,
                                           struct tuna_lora_adapter **out)
{
    if (k < 1 || k > 64 || r < 1 || r > 256)
        return tuna_fail(TUNA_E_INVALID, "bench: --loras must be 1..64 and --lora-rank 1..256 (got %d, %lld)", k,
                         (long long)r);
    for (int i = 0; i < k; i++)
        out[i] = NULL;
    for (int i = 0; i < k; i++) {
        tuna_status st = make_adapter(m, r, seed + (uint64_t)i * 7919u, &out[i]);
        if (st) {
            for (int j = 0; j < i; j++)
                tuna_lora_free(out[j]);
            return st;
        }
    }
    return TUNA_OK;
}
