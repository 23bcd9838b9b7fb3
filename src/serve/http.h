/* http.h — the HTTP server (libmicrohttpd, one thread per connection): routes the OpenAI
 * endpoints to openai.h and the engine, streams Server-Sent Events, checks the API key, limits
 * body size and notices clients that go away (their requests are cancelled).
 *
 * Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize,
 * POST /detokenize, GET /health, GET /metrics, GET /version, and with --lora-root POST
 * /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter {"lora_name"}
 * (answers "Success: ..." text as vLLM; loras.h has the rules). With an API key, every /v1/ route needs
 * "Authorization: Bearer KEY" (as vLLM).
 */
#ifndef TUNA_SERVE_HTTP_H
#define TUNA_SERVE_HTTP_H

#include <stddef.h>

#include "serve/engine.h"
#include "serve/metrics.h"
#include "serve/openai.h"

struct tuna_http_config {
    const char *host;       /* an IPv4 or IPv6 address, or "localhost" */
    int port;               /* 0: any free port (see tuna_server_port) */
    const char *api_key;    /* NULL: no authentication */
    size_t max_body;        /* larger bodies get 413 */
    unsigned max_connections;
};

typedef struct tuna_server tuna_server;

/* Starts listening. ctx, e and metrics are borrowed and must outlive the server. */
tuna_status tuna_server_start(const struct tuna_http_config *cfg, const struct tuna_openai_ctx *ctx, tuna_engine *e,
                              struct tuna_metrics *metrics, tuna_server **out);
int tuna_server_port(const tuna_server *s);
/* Stops accepting, ends requests in flight (the engine must be stopped first or they wait),
 * joins connection threads, frees. */
void tuna_server_stop(tuna_server *s); /* accepts NULL */
/* Stop accepting new connections (first step of shutdown). */
void tuna_server_quiesce(tuna_server *s);

#endif
