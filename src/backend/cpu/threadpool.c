/* threadpool.c — worker threads that spin briefly and then sleep on a condition variable; tasks
 * are handed out through an atomic counter so uneven tasks balance themselves. The short spin
 * matters for decode, where one token is dozens of small parallel ops: a futex wake-up per op
 * would cost more than the op. */
#include "backend/cpu/threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "core/status.h"

struct tuna_worker {
    struct tuna_pool *pool;
    int index;
    pthread_t th;
};

struct tuna_pool {
    int n;                       /* threads including the caller */
    struct tuna_worker *workers; /* n - 1 */
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    atomic_ullong generation;    /* bumped per run (under mu, so sleepers never miss it) */
    atomic_int busy;             /* workers still in the current run */
    atomic_int quit;
    /* the current run */
    tuna_pool_fn fn;
    void *arg;
    int64_t n_tasks;
    atomic_llong next;
};

static void drain(struct tuna_pool *p, int thread)
{
    for (;;) {
        long long t = atomic_fetch_add(&p->next, 1);
        if (t >= p->n_tasks) break;
        p->fn(p->arg, (int64_t)t, thread);
    }
}

#define TUNA_POOL_SPIN 1000

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *a)
{
    struct tuna_worker *w = a;
    struct tuna_pool *p = w->pool;
    unsigned long long seen = 0;
    for (;;) {
        for (int i = 0; i < TUNA_POOL_SPIN && atomic_load(&p->generation) == seen; i++) cpu_relax();
        if (atomic_load(&p->generation) == seen) {
            pthread_mutex_lock(&p->mu);
            while (!p->quit && atomic_load(&p->generation) == seen) pthread_cond_wait(&p->wake, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (p->quit) break;
        seen = atomic_load(&p->generation);
        drain(p, w->index);
        if (atomic_fetch_sub(&p->busy, 1) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

tuna_status tuna_pool_new(int n_threads, tuna_pool **out)
{
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return tuna_fail(TUNA_E_INVALID, "thread count %d is out of range (1..1024)", n_threads);
    struct tuna_pool *p = calloc(1, sizeof *p);
    if (!p) return tuna_fail_oom("thread pool", sizeof *p);
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    if (n_threads > 1) {
        p->workers = calloc((size_t)n_threads - 1, sizeof *p->workers);
        if (!p->workers) {
            tuna_pool_free(p);
            return tuna_fail_oom("thread pool workers", sizeof *p->workers * (size_t)n_threads);
        }
        for (int i = 0; i < n_threads - 1; i++) {
            p->workers[i].pool = p;
            p->workers[i].index = i + 1;
            if (pthread_create(&p->workers[i].th, NULL, worker_main, &p->workers[i]) != 0) {
                p->n = i + 1; /* only join the ones that started */
                tuna_pool_free(p);
                return tuna_fail(TUNA_E_OOM, "could not start worker thread %d of %d", i + 1, n_threads);
            }
        }
    }
    *out = p;
    return TUNA_OK;
}

void tuna_pool_free(tuna_pool *p)
{
    if (!p) return;
    if (p->workers) {
        pthread_mutex_lock(&p->mu);
        p->quit = 1;
        atomic_fetch_add(&p->generation, 1);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->mu);
        for (int i = 0; i < p->n - 1; i++) pthread_join(p->workers[i].th, NULL);
        free(p->workers);
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p);
}

int tuna_pool_size(const tuna_pool *p) { return p ? p->n : 1; }

void tuna_pool_run(tuna_pool *p, int64_t n_tasks, tuna_pool_fn fn, void *arg)
{
    if (n_tasks <= 0) return;
    if (!p || p->n == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++) fn(arg, t, 0);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store(&p->next, 0);
    atomic_store(&p->busy, p->n - 1);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->generation, 1); /* publishes the run (seq_cst) */
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    drain(p, 0);
    for (int i = 0; i < TUNA_POOL_SPIN && atomic_load(&p->busy) > 0; i++) cpu_relax();
    if (atomic_load(&p->busy) > 0) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->busy) > 0) pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}
