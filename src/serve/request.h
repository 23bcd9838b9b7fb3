/* request.h — one API request as the HTTP side and the engine share it: the parsed parameters,
 * and the events (text deltas, finish) the engine produces for each of its n choices.
 *
 * Ownership: a request is reference-counted (the HTTP connection and the engine each hold one);
 * tuna_serve_req_unref frees it with the last reference. Events are pushed by the engine and
 * popped by the connection under the request's mutex; the condvar signals new events.
 */
#ifndef TUNA_SERVE_REQUEST_H
#define TUNA_SERVE_REQUEST_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/sampler.h"

#define TUNA_SERVE_MAX_TOP_LOGPROBS 20
#define TUNA_SERVE_MAX_STOP 16
#define TUNA_SERVE_MAX_N 16

enum tuna_serve_kind { TUNA_SERVE_COMPLETION = 0, TUNA_SERVE_CHAT };

struct tuna_serve_loras;

/* What a request asks for, as OpenAI / vLLM name it. */
struct tuna_serve_params {
    enum tuna_serve_kind kind;
    char *model;                 /* owned */
    int32_t adapter;             /* -1 = base model, else the adapter slot (loras.h) */
    struct tuna_serve_loras *loras; /* the registry whose slot `adapter` is pinned (unpinned on free) */
    int32_t *prompt;             /* [n_prompt] owned, after templating and tokenization */
    int64_t n_prompt;
    struct tuna_sampling sampling;
    bool set_temperature, set_top_k, set_top_p, set_min_p, set_rep;
    int64_t max_tokens;          /* -1: until the context limit */
    int64_t min_tokens;
    char *stop[TUNA_SERVE_MAX_STOP]; /* owned */
    int n_stop;
    int64_t stop_ids[32];
    int n_stop_ids;
    bool ignore_eos;
    int n;                       /* choices */
    bool logprobs;
    int top_logprobs;
    bool stream, include_usage;
    bool skip_special;
};
void tuna_serve_params_free(struct tuna_serve_params *p); /* unpins the adapter */

struct tuna_serve_token_lp {
    int32_t id;
    float logprob;
    int n_top;
    int32_t top_id[TUNA_SERVE_MAX_TOP_LOGPROBS];
    float top_lp[TUNA_SERVE_MAX_TOP_LOGPROBS];
};

struct tuna_serve_event {
    struct tuna_serve_event *next;
    int choice;
    char *text;                        /* owned, NUL-terminated, may be "" */
    size_t len;
    struct tuna_serve_token_lp *lps;   /* [n_lps] owned, when logprobs were asked */
    int n_lps;
    const char *finish;                /* "stop", "length", "abort", "error" when the choice ended */
};

struct tuna_serve_req {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int refs;
    atomic_bool cancelled;             /* set by the connection: the client went away */
    struct tuna_serve_params p;
    char id[48];                       /* "cmpl-..." / "chatcmpl-..." */
    int64_t created;                   /* unix seconds */
    double t_arrival;                  /* monotonic seconds */
    /* under mu */
    struct tuna_serve_event *head, *tail;
    int n_done;                        /* choices finished */
    int64_t completion_tokens;
    char *error;                       /* engine failure message (owned) */
    void *user;                        /* an in-process caller's (bench); never read by the engine */
};

/* A new request with refs = 1 taking the parameters (*p is zeroed). */
tuna_status tuna_serve_req_new(struct tuna_serve_params *p, struct tuna_serve_req **out);
void tuna_serve_req_ref(struct tuna_serve_req *r);
void tuna_serve_req_unref(struct tuna_serve_req *r); /* accepts NULL */

/* Engine side: appends an event (taken) and wakes the reader. */
void tuna_serve_req_push(struct tuna_serve_req *r, struct tuna_serve_event *e);
/* Reader side: the next event (taken; free with tuna_serve_event_free), waiting for one when
 * none is queued; NULL when every choice has finished and all events were read. */
struct tuna_serve_event *tuna_serve_req_pop(struct tuna_serve_req *r);
/* The same, waiting at most timeout_ms; *timed_out says whether it gave up (returns NULL then). */
struct tuna_serve_event *tuna_serve_req_pop_timed(struct tuna_serve_req *r, int timeout_ms, bool *timed_out);
void tuna_serve_event_free(struct tuna_serve_event *e);

double tuna_serve_now(void); /* monotonic seconds */

#endif
