/* threadpool.h — a fixed pool of worker threads that runs "task i of n" jobs (the CPU backend's
 * only source of parallelism besides nothing: OpenBLAS is kept single-threaded and called from
 * inside the tasks, so the machine is never oversubscribed).
 *
 * tuna_pool_run() blocks until every task ran; the calling thread works too (it is thread 0).
 * One run at a time per pool: the pool is not reentrant (a task must not call tuna_pool_run).
 */
#ifndef TUNA_BACKEND_CPU_THREADPOOL_H
#define TUNA_BACKEND_CPU_THREADPOOL_H

#include <stdint.h>

#include "tuna.h"

typedef struct tuna_pool tuna_pool;

/* fn(arg, task, thread): task in [0, n_tasks), thread in [0, tuna_pool_size()). */
typedef void (*tuna_pool_fn)(void *arg, int64_t task, int thread);

/* n_threads >= 1 (1 = no worker threads, everything runs in the caller). */
tuna_status tuna_pool_new(int n_threads, tuna_pool **out);
void tuna_pool_free(tuna_pool *p); /* accepts NULL; joins the workers */
int tuna_pool_size(const tuna_pool *p);
void tuna_pool_run(tuna_pool *p, int64_t n_tasks, tuna_pool_fn fn, void *arg);

#endif
