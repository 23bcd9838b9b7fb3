/* metrics.h — the server's Prometheus metrics with vLLM's names (prefix "vllm:", label
 * model_name): gauges of running/waiting requests and KV cache usage, counters of prompt and
 * generation tokens, finished requests by reason, preemptions and prefix cache queries and hits
 * (in tokens), histograms of time to first
 * token, inter-token latency and end-to-end latency. Thread-safe (one mutex). */
#ifndef TUNA_SERVE_METRICS_H
#define TUNA_SERVE_METRICS_H

#include <pthread.h>
#include <stdint.h>

#include "tuna.h"

#define TUNA_METRICS_MAX_BUCKETS 24

struct tuna_histogram {
    int n_bounds;
    const double *bounds;                      /* upper bounds, ascending (static) */
    uint64_t counts[TUNA_METRICS_MAX_BUCKETS]; /* per bucket (not cumulative); last = +Inf */
    double sum;
    uint64_t count;
};

struct tuna_metrics {
    pthread_mutex_t mu;
    int64_t running, waiting;
    double kv_usage;                  /* 0..1 */
    uint64_t prompt_tokens, generation_tokens, preemptions;
    uint64_t prefix_cache_queries, prefix_cache_hits; /* tokens looked up / found at admission */
    uint64_t success_stop, success_length, success_abort;
    struct tuna_histogram ttft, itl, e2e;
};

void tuna_metrics_init(struct tuna_metrics *m);
void tuna_metrics_destroy(struct tuna_metrics *m);
void tuna_histogram_observe(struct tuna_histogram *h, double v); /* caller holds m->mu */
/* Prometheus text exposition format; *out malloc'd, taken by the caller. */
tuna_status tuna_metrics_render(struct tuna_metrics *m, const char *model_name, char **out);

#endif
