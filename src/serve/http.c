/* http.c — libmicrohttpd glue. Spec: http.h. Thread-per-connection, so a handler may block
 * while the engine works: a non-streamed request waits for all its events; a streamed one
 * produces its body from a content-reader callback that waits for the next event. Both wait in
 * short slices and peek at the socket between them, so a client that disconnects cancels its
 * request (and frees its KV blocks) within a fraction of a second. */
#include "serve/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <microhttpd.h>

#include "core/status.h"
#include "serve/loras.h"

struct tuna_server {
    struct MHD_Daemon *d;
    struct tuna_http_config cfg;
    const struct tuna_openai_ctx *ctx;
    tuna_engine *engine;
    struct tuna_metrics *metrics;
    int port;
    int64_t started;
};

struct conn {
    char *body;
    size_t len, cap;
    bool too_big;
    struct tuna_serve_req *req; /* a finished non-streamed request, released once its response is sent */
};

/* true when the peer closed its end (orderly or not) */
static bool peer_gone(int fd)
{
    if (fd < 0) return false;
    char c;
    ssize_t k = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static int conn_fd(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

static enum MHD_Result send_text(struct MHD_Connection *c, unsigned code, char *text, const char *type)
{
    if (!text) {
        text = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"InternalServerError\",\"param\":null,\"code\":500}}");
        code = 500;
        if (!text) return MHD_NO;
    }
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    enum MHD_Result ret = MHD_queue_response(c, code, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_error(struct MHD_Connection *c, const struct tuna_openai_error *err)
{
    return send_text(c, (unsigned)err->http, tuna_openai_error_json(err), "application/json");
}

static enum MHD_Result fail(struct MHD_Connection *c, int http, const char *param, const char *msg)
{
    struct tuna_openai_error err;
    tuna_openai_fail(&err, http, param, "%s", msg);
    return send_error(c, &err);
}

/* ---- streaming ---- */

struct stream {
    tuna_server *srv;
    struct tuna_serve_req *req;
    int fd;
    char *pending;
    size_t off, len;
    bool first[TUNA_SERVE_MAX_N];
    int phase; /* 0 events, 1 usage + [DONE] sent, 2 end */
};

static void set_pending(struct stream *s, char *text)
{
    free(s->pending);
    s->pending = text;
    s->off = 0;
    s->len = text ? strlen(text) : 0;
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    struct stream *s = cls;
    for (;;) {
        if (s->off < s->len) {
            size_t n = s->len - s->off < max ? s->len - s->off : max;
            memcpy(buf, s->pending + s->off, n);
            s->off += n;
            return (ssize_t)n;
        }
        if (s->phase == 2) return MHD_CONTENT_READER_END_OF_STREAM;
        if (s->phase == 1) {
            set_pending(s, strdup("data: [DONE]\n\n"));
            s->phase = 2;
            continue;
        }
        bool timed_out;
        struct tuna_serve_event *e = tuna_serve_req_pop_timed(s->req, 200, &timed_out);
        if (timed_out) {
            if (peer_gone(s->fd)) {
                atomic_store(&s->req->cancelled, true);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
            continue;
        }
        if (!e) { /* every choice finished */
            set_pending(s, s->req->p.include_usage ? tuna_openai_usage_chunk(s->srv->ctx, s->req) : NULL);
            s->phase = 1;
            continue;
        }
        if (e->finish && !strcmp(e->finish, "error")) {
            struct tuna_openai_error err;
            pthread_mutex_lock(&s->req->mu);
            tuna_openai_fail(&err, 500, NULL, "generation failed: %s", s->req->error ? s->req->error : "unknown error");
            pthread_mutex_unlock(&s->req->mu);
            char *j = tuna_openai_error_json(&err);
            char *t = j ? malloc(strlen(j) + 9) : NULL;
            if (t) sprintf(t, "data: %s\n\n", j);
            free(j);
            set_pending(s, t);
        } else {
            int ch = e->choice >= 0 && e->choice < TUNA_SERVE_MAX_N ? e->choice : 0;
            set_pending(s, tuna_openai_stream_chunk(s->srv->ctx, s->req, e, !s->first[ch]));
            s->first[ch] = true;
        }
        tuna_serve_event_free(e);
    }
}

static void stream_free(void *cls)
{
    struct stream *s = cls;
    atomic_store(&s->req->cancelled, true); /* no effect when it has finished */
    tuna_serve_req_unref(s->req);
    free(s->pending);
    free(s);
}

/* ---- generation endpoints ---- */

static enum MHD_Result generate(tuna_server *srv, struct MHD_Connection *c, enum tuna_serve_kind kind, struct conn *cn)
{
    struct tuna_openai_error err;
    struct tuna_serve_params p;
    if (tuna_openai_parse(srv->ctx, kind, cn->body, cn->len, &p, &err)) return send_error(c, &err);
    struct tuna_serve_req *r;
    if (tuna_serve_req_new(&p, &r)) {
        tuna_serve_params_free(&p);
        return fail(c, 500, NULL, tuna_last_error());
    }
    if (tuna_engine_submit(srv->engine, r)) {
        enum MHD_Result ret = fail(c, 429, NULL, tuna_last_error());
        tuna_serve_req_unref(r);
        return ret;
    }
    int fd = conn_fd(c);
    if (r->p.stream) {
        struct stream *s = calloc(1, sizeof *s);
        struct MHD_Response *resp = s ? MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_read, s, stream_free) : NULL;
        if (!resp) {
            atomic_store(&r->cancelled, true);
            tuna_serve_req_unref(r);
            free(s);
            return MHD_NO;
        }
        s->srv = srv;
        s->req = r;
        s->fd = fd;
        MHD_add_response_header(resp, "Content-Type", "text/event-stream; charset=utf-8");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
        enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    struct tuna_openai_acc acc;
    tuna_openai_acc_init(&acc, r->p.n);
    bool failed = false, gone = false;
    for (;;) {
        bool timed_out;
        struct tuna_serve_event *e = tuna_serve_req_pop_timed(r, 200, &timed_out);
        if (timed_out) {
            if (!gone && peer_gone(fd)) {
                gone = true;
                atomic_store(&r->cancelled, true);
            }
            continue;
        }
        if (!e) break;
        if (e->finish && !strcmp(e->finish, "error")) failed = true;
        if (tuna_openai_acc_add(&acc, e)) failed = true;
        tuna_serve_event_free(e);
    }
    enum MHD_Result ret;
    if (gone) {
        ret = MHD_NO;
    } else if (failed) {
        pthread_mutex_lock(&r->mu);
        tuna_openai_fail(&err, 500, NULL, "generation failed: %s", r->error ? r->error : "out of memory");
        pthread_mutex_unlock(&r->mu);
        ret = send_error(c, &err);
    } else {
        ret = send_text(c, 200, tuna_openai_response_json(srv->ctx, r, &acc), "application/json");
    }
    tuna_openai_acc_free(&acc);
    /* the handler's reference (and with it the request's pin on its adapter) goes when the response
       has been sent (completed()), as a stream's does: an unload waiting for the adapter answers
       after the response of the request that used it */
    cn->req = r;
    return ret;
}

/* ---- runtime LoRA adapters (vLLM's /v1/load_lora_adapter, /v1/unload_lora_adapter) ---- */

/* The body's string field k, or NULL with err set. */
static const char *body_str(const cJSON *doc, const char *k, struct tuna_openai_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(doc, k);
    if (cJSON_IsString(v) && v->valuestring[0]) return v->valuestring;
    tuna_openai_fail(err, 400, k, "'%s' is required (a non-empty string)", k);
    return NULL;
}

static char *success_text(const char *name, const char *what)
{
    size_t n = strlen(name) + 64;
    char *t = malloc(n);
    if (t) snprintf(t, n, "Success: LoRA adapter '%s' %s successfully.", name, what);
    return t;
}

static enum MHD_Result lora_endpoint(tuna_server *srv, struct MHD_Connection *c, struct conn *cn, bool load)
{
    struct tuna_openai_error err;
    struct tuna_serve_loras *L = srv->ctx->loras;
    if (!L || !L->root)
        return fail(c, 400, NULL, "loading and unloading adapters at run time is off: start tuna serve with "
                    "--lora-root DIR (adapters are loaded only from folders under DIR)");
    cJSON *doc = cn->len ? cJSON_ParseWithLength(cn->body, cn->len) : NULL;
    if (!cJSON_IsObject(doc)) {
        cJSON_Delete(doc);
        return fail(c, 400, NULL, load ? "the body must be a JSON object {\"lora_name\": ..., \"lora_path\": ...}"
                                       : "the body must be a JSON object {\"lora_name\": ...}");
    }
    const char *name = body_str(doc, "lora_name", &err);
    enum MHD_Result ret;
    if (!name) {
        ret = send_error(c, &err);
    } else if (load) {
        const char *path = body_str(doc, "lora_path", &err);
        char *real = NULL;
        int slot = -1;
        int32_t key = -1;
        struct tuna_lora_adapter *ad = NULL;
        tuna_status st = path ? tuna_serve_lora_path(L->root, path, &real, &err) : TUNA_E_INVALID;
        if (!st) st = tuna_serve_loras_begin_load(L, name, srv->ctx->model_name, &slot, &key, &err);
        if (!st && tuna_lora_load(real, &ad))
            st = tuna_openai_fail(&err, 400, "lora_path", "cannot load the adapter in %s: %s", real, tuna_last_error());
        if (!st) st = tuna_serve_loras_check_rank(L, ad, &err);
        if (!st && tuna_engine_set_lora(srv->engine, slot, ad, key))
            st = tuna_openai_fail(&err, 400, "lora_path", "the adapter in %s does not fit this model: %s", real,
                                  tuna_last_error());
        if (slot >= 0) {
            if (!tuna_serve_loras_finish_load(L, slot, st ? NULL : ad, real) && !st) {
                (void)tuna_engine_set_lora(srv->engine, slot, NULL, -1);
                st = tuna_openai_fail(&err, 500, NULL, "out of memory");
            }
            ad = NULL; /* taken */
        }
        tuna_lora_free(ad);
        if (!st) fprintf(stderr, "tuna serve: loaded adapter '%s' from %s (slot %d)\n", name, real, slot);
        free(real);
        ret = st ? send_error(c, &err) : send_text(c, 200, success_text(name, "added"), "text/plain");
    } else {
        int slot = -1;
        tuna_status st = tuna_serve_loras_begin_unload(L, name, &slot, &err);
        if (!st) {
            tuna_serve_loras_wait_unpinned(L, slot); /* requests already using it finish first */
            if (tuna_engine_set_lora(srv->engine, slot, NULL, -1))
                st = tuna_openai_fail(&err, 500, NULL, "cannot unload '%s': %s", name, tuna_last_error());
            tuna_serve_loras_finish_unload(L, slot, !st);
        }
        if (!st) fprintf(stderr, "tuna serve: unloaded adapter '%s' (slot %d)\n", name, slot);
        ret = st ? send_error(c, &err) : send_text(c, 200, success_text(name, "removed"), "text/plain");
    }
    cJSON_Delete(doc);
    return ret;
}

/* ---- routing ---- */

static bool authorized(tuna_server *srv, struct MHD_Connection *c)
{
    if (!srv->cfg.api_key) return true;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    return h && !strncmp(h, "Bearer ", 7) && !strcmp(h + 7, srv->cfg.api_key);
}

static enum MHD_Result route(tuna_server *srv, struct MHD_Connection *c, const char *url, const char *method,
                             struct conn *cn)
{
    bool get = !strcmp(method, "GET"), post = !strcmp(method, "POST");
    struct tuna_openai_error err;
    if (!strncmp(url, "/v1/", 4) && !authorized(srv, c)) return fail(c, 401, NULL, "Unauthorized: send the API key as 'Authorization: Bearer KEY'");
    if (cn->too_big) {
        tuna_openai_fail(&err, 413, NULL, "the request body is larger than the limit of %zu bytes (--max-request-bytes)",
                         srv->cfg.max_body);
        return send_error(c, &err);
    }
    if (!strcmp(url, "/health") && get) return send_text(c, 200, strdup(""), "text/plain");
    if (!strcmp(url, "/version") && get) return send_text(c, 200, strdup("{\"version\":\"" TUNA_VERSION_STRING "\"}"), "application/json");
    if (!strcmp(url, "/metrics") && get) {
        char *t = NULL;
        tuna_metrics_render(srv->metrics, srv->ctx->model_name, &t);
        return send_text(c, 200, t, "text/plain; version=0.0.4");
    }
    if (!strcmp(url, "/v1/models") && get) return send_text(c, 200, tuna_openai_models_json(srv->ctx, srv->started), "application/json");
    if (!strcmp(url, "/v1/completions") && post) return generate(srv, c, TUNA_SERVE_COMPLETION, cn);
    if (!strcmp(url, "/v1/chat/completions") && post) return generate(srv, c, TUNA_SERVE_CHAT, cn);
    if (!strcmp(url, "/v1/load_lora_adapter") && post) return lora_endpoint(srv, c, cn, true);
    if (!strcmp(url, "/v1/unload_lora_adapter") && post) return lora_endpoint(srv, c, cn, false);
    if ((!strcmp(url, "/tokenize") || !strcmp(url, "/detokenize")) && post) {
        char *out = url[1] == 't' ? tuna_openai_tokenize(srv->ctx, cn->body, cn->len, &err)
                                  : tuna_openai_detokenize(srv->ctx, cn->body, cn->len, &err);
        return out ? send_text(c, 200, out, "application/json") : send_error(c, &err);
    }
    static const char *known[] = {"/health", "/version", "/metrics", "/v1/models", "/v1/completions",
                                  "/v1/chat/completions", "/tokenize", "/detokenize",
                                  "/v1/load_lora_adapter", "/v1/unload_lora_adapter"};
    for (size_t i = 0; i < sizeof known / sizeof *known; i++)
        if (!strcmp(url, known[i])) {
            tuna_openai_fail(&err, 405, NULL, "method %s is not allowed on %s", method, url);
            return send_error(c, &err);
        }
    tuna_openai_fail(&err, 404, NULL, "no route %s %s", method, url);
    return send_error(c, &err);
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                               const char *version, const char *upload_data, size_t *upload_data_size, void **con_cls)
{
    (void)version;
    tuna_server *srv = cls;
    struct conn *cn = *con_cls;
    if (!cn) {
        cn = calloc(1, sizeof *cn);
        if (!cn) return MHD_NO;
        *con_cls = cn;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > srv->cfg.max_body) cn->too_big = true;
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (cn->too_big) return MHD_YES;
        if (cn->len + n > srv->cfg.max_body) {
            cn->too_big = true;
            free(cn->body);
            cn->body = NULL;
            cn->len = cn->cap = 0;
            return MHD_YES;
        }
        if (cn->len + n + 1 > cn->cap) {
            size_t cap = cn->cap ? cn->cap : 4096;
            while (cap < cn->len + n + 1) cap *= 2;
            char *b = realloc(cn->body, cap);
            if (!b) return MHD_NO;
            cn->body = b;
            cn->cap = cap;
        }
        memcpy(cn->body + cn->len, upload_data, n);
        cn->len += n;
        cn->body[cn->len] = '\0';
        return MHD_YES;
    }
    return route(srv, c, url, method, cn);
}

static void completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)c;
    (void)toe;
    struct conn *cn = *con_cls;
    if (cn) {
        tuna_serve_req_unref(cn->req);
        free(cn->body);
        free(cn);
    }
    *con_cls = NULL;
}

tuna_status tuna_server_start(const struct tuna_http_config *cfg, const struct tuna_openai_ctx *ctx, tuna_engine *e,
                              struct tuna_metrics *metrics, tuna_server **out)
{
    *out = NULL;
    tuna_server *s = calloc(1, sizeof *s);
    if (!s) return tuna_fail_oom("server", sizeof *s);
    s->cfg = *cfg;
    s->ctx = ctx;
    s->engine = e;
    s->metrics = metrics;
    s->started = (int64_t)time(NULL);
    const char *host = !cfg->host || !strcmp(cfg->host, "localhost") ? "127.0.0.1" : cfg->host;
    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    struct sockaddr *addr;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG;
    memset(&a4, 0, sizeof a4);
    memset(&a6, 0, sizeof a6);
    if (inet_pton(AF_INET, host, &a4.sin_addr) == 1) {
        a4.sin_family = AF_INET;
        a4.sin_port = htons((uint16_t)cfg->port);
        addr = (struct sockaddr *)&a4;
    } else if (inet_pton(AF_INET6, host, &a6.sin6_addr) == 1) {
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)cfg->port);
        addr = (struct sockaddr *)&a6;
        flags |= MHD_USE_IPv6;
    } else {
        free(s);
        return tuna_fail(TUNA_E_INVALID, "--host '%s' is not an IP address (use e.g. 127.0.0.1, ::1 or 0.0.0.0)", cfg->host);
    }
    if (cfg->port < 0 || cfg->port > 65535) {
        free(s);
        return tuna_fail(TUNA_E_INVALID, "--port %d is outside 0..65535", cfg->port);
    }
    s->d = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, handler, s, MHD_OPTION_SOCK_ADDR, addr,
                            MHD_OPTION_CONNECTION_LIMIT, cfg->max_connections ? cfg->max_connections : 512u,
                            MHD_OPTION_NOTIFY_COMPLETED, completed, s, MHD_OPTION_END);
    if (!s->d) {
        free(s);
        return tuna_fail(TUNA_E_IO, "cannot listen on %s port %d (in use, or not allowed); pick another --port",
                         host, cfg->port);
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : cfg->port;
    *out = s;
    return TUNA_OK;
}

int tuna_server_port(const tuna_server *s) { return s->port; }

void tuna_server_quiesce(tuna_server *s)
{
    if (s && s->d) MHD_quiesce_daemon(s->d);
}

void tuna_server_stop(tuna_server *s)
{
    if (!s) return;
    if (s->d) MHD_stop_daemon(s->d);
    free(s);
}
