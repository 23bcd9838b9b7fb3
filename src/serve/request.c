/* request.c — request lifetime and its event queue. Spec: request.h. */
#include "serve/request.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/status.h"
#include "serve/loras.h"

double tuna_serve_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void tuna_serve_params_free(struct tuna_serve_params *p)
{
    if (p->loras && p->adapter >= 0) tuna_serve_loras_unpin(p->loras, p->adapter);
    free(p->model);
    free(p->prompt);
    for (int i = 0; i < p->n_stop; i++) free(p->stop[i]);
    memset(p, 0, sizeof *p);
}

tuna_status tuna_serve_req_new(struct tuna_serve_params *p, struct tuna_serve_req **out)
{
    static atomic_ullong counter;
    *out = NULL;
    struct tuna_serve_req *r = calloc(1, sizeof *r);
    if (!r) return tuna_fail_oom("request", sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    atomic_init(&r->refs, 1);
    atomic_init(&r->cancelled, false);
    r->p = *p;
    memset(p, 0, sizeof *p);
    unsigned long long k = atomic_fetch_add(&counter, 1) + 1;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(r->id, sizeof r->id, "%s-%llx%08llx", r->p.kind == TUNA_SERVE_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)ts.tv_sec, k);
    r->created = (int64_t)ts.tv_sec;
    r->t_arrival = tuna_serve_now();
    *out = r;
    return TUNA_OK;
}

void tuna_serve_req_ref(struct tuna_serve_req *r) { atomic_fetch_add(&r->refs, 1); }

void tuna_serve_event_free(struct tuna_serve_event *e)
{
    if (!e) return;
    free(e->text);
    free(e->lps);
    free(e);
}

void tuna_serve_req_unref(struct tuna_serve_req *r)
{
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1) return;
    struct tuna_serve_event *e = r->head;
    while (e) {
        struct tuna_serve_event *n = e->next;
        tuna_serve_event_free(e);
        e = n;
    }
    free(r->error);
    tuna_serve_params_free(&r->p);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

void tuna_serve_req_push(struct tuna_serve_req *r, struct tuna_serve_event *e)
{
    pthread_mutex_lock(&r->mu);
    e->next = NULL;
    if (r->tail) r->tail->next = e;
    else r->head = e;
    r->tail = e;
    if (e->finish) r->n_done++;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

struct tuna_serve_event *tuna_serve_req_pop(struct tuna_serve_req *r)
{
    bool to;
    return tuna_serve_req_pop_timed(r, -1, &to);
}

struct tuna_serve_event *tuna_serve_req_pop_timed(struct tuna_serve_req *r, int timeout_ms, bool *timed_out)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    if (timeout_ms > 0) {
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    *timed_out = false;
    pthread_mutex_lock(&r->mu);
    while (!r->head && r->n_done < r->p.n) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&r->cv, &r->mu);
        } else if (pthread_cond_timedwait(&r->cv, &r->mu, &dl) != 0 && !r->head && r->n_done < r->p.n) {
            *timed_out = true;
            break;
        }
    }
    struct tuna_serve_event *e = r->head;
    if (e) {
        r->head = e->next;
        if (!r->head) r->tail = NULL;
        e->next = NULL;
    }
    pthread_mutex_unlock(&r->mu);
    return e;
}
