/* metrics.c — Prometheus text rendering. Spec: metrics.h; bucket bounds as vLLM's. */
#include "serve/metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"

static const double TTFT_B[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
static const double ITL_B[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0};
static const double E2E_B[] = {0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                               30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

void tuna_metrics_init(struct tuna_metrics *m)
{
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    m->ttft.bounds = TTFT_B;
    m->ttft.n_bounds = (int)(sizeof TTFT_B / sizeof *TTFT_B);
    m->itl.bounds = ITL_B;
    m->itl.n_bounds = (int)(sizeof ITL_B / sizeof *ITL_B);
    m->e2e.bounds = E2E_B;
    m->e2e.n_bounds = (int)(sizeof E2E_B / sizeof *E2E_B);
}

void tuna_metrics_destroy(struct tuna_metrics *m) { pthread_mutex_destroy(&m->mu); }

void tuna_histogram_observe(struct tuna_histogram *h, double v)
{
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i]) i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

struct sbuf {
    char *p;
    size_t n, cap;
    int oom;
};

static void sb_printf(struct sbuf *b, const char *fmt, ...) TUNA_PRINTF(2, 3);
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0) {
            b->oom = 1;
            return;
        }
        if (b->p && b->n + (size_t)k < b->cap) {
            b->n += (size_t)k;
            return;
        }
        size_t c = b->cap ? b->cap * 2 : 4096;
        while (c < b->n + (size_t)k + 1) c *= 2;
        char *np = realloc(b->p, c);
        if (!np) {
            b->oom = 1;
            return;
        }
        b->p = np;
        b->cap = c;
    }
}

static void hist(struct sbuf *b, const char *name, const char *help, const struct tuna_histogram *h,
                 const char *model)
{
    sb_printf(b, "# HELP vllm:%s %s\n# TYPE vllm:%s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        sb_printf(b, "vllm:%s_bucket{le=\"%g\",model_name=\"%s\"} %llu\n", name, h->bounds[i], model,
                  (unsigned long long)cum);
    }
    cum += h->counts[h->n_bounds];
    sb_printf(b, "vllm:%s_bucket{le=\"+Inf\",model_name=\"%s\"} %llu\n", name, model, (unsigned long long)cum);
    sb_printf(b, "vllm:%s_sum{model_name=\"%s\"} %.9g\n", name, model, h->sum);
    sb_printf(b, "vllm:%s_count{model_name=\"%s\"} %llu\n", name, model, (unsigned long long)h->count);
}

tuna_status tuna_metrics_render(struct tuna_metrics *m, const char *model, char **out)
{
    struct sbuf b = {0};
    pthread_mutex_lock(&m->mu);
    sb_printf(&b, "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                  "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"%s\"} %lld\n",
              model, (long long)m->running);
    sb_printf(&b, "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
                  "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"%s\"} %lld\n",
              model, (long long)m->waiting);
    sb_printf(&b, "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
                  "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name=\"%s\"} %.6g\n",
              model, m->kv_usage);
    sb_printf(&b, "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
                  "# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{model_name=\"%s\"} %llu\n",
              model, (unsigned long long)m->prompt_tokens);
    sb_printf(&b, "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
                  "# TYPE vllm:generation_tokens_total counter\n"
                  "vllm:generation_tokens_total{model_name=\"%s\"} %llu\n",
              model, (unsigned long long)m->generation_tokens);
    sb_printf(&b, "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.\n"
                  "# TYPE vllm:num_preemptions_total counter\n"
                  "vllm:num_preemptions_total{model_name=\"%s\"} %llu\n",
              model, (unsigned long long)m->preemptions);
    sb_printf(&b, "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried "
                  "tokens.\n# TYPE vllm:prefix_cache_queries_total counter\n"
                  "vllm:prefix_cache_queries_total{model_name=\"%s\"} %llu\n",
              model, (unsigned long long)m->prefix_cache_queries);
    sb_printf(&b, "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n"
                  "# TYPE vllm:prefix_cache_hits_total counter\n"
                  "vllm:prefix_cache_hits_total{model_name=\"%s\"} %llu\n",
              model, (unsigned long long)m->prefix_cache_hits);
    sb_printf(&b, "# HELP vllm:request_success_total Count of successfully processed requests.\n"
                  "# TYPE vllm:request_success_total counter\n");
    sb_printf(&b, "vllm:request_success_total{finished_reason=\"stop\",model_name=\"%s\"} %llu\n", model,
              (unsigned long long)m->success_stop);
    sb_printf(&b, "vllm:request_success_total{finished_reason=\"length\",model_name=\"%s\"} %llu\n", model,
              (unsigned long long)m->success_length);
    sb_printf(&b, "vllm:request_success_total{finished_reason=\"abort\",model_name=\"%s\"} %llu\n", model,
              (unsigned long long)m->success_abort);
    hist(&b, "time_to_first_token_seconds", "Histogram of time to first token in seconds.", &m->ttft, model);
    hist(&b, "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", &m->itl, model);
    hist(&b, "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", &m->e2e, model);
    pthread_mutex_unlock(&m->mu);
    if (b.oom) {
        free(b.p);
        return tuna_fail_oom("metrics text", b.cap);
    }
    *out = b.p;
    return TUNA_OK;
}
