/* cmd_serve.c — `tuna serve DIR`: the OpenAI-compatible HTTP server (src/serve/) with continuous
 * batching on the CPU or GPU engine. Prints the memory plan, serves until SIGINT/SIGTERM. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "engine_opts.h"
#include "core/status.h"
#include "lora/lora.h"
#include "model/model.h"
#include "model/sampler.h"
#include "serve/engine.h"
#include "serve/http.h"
#include "serve/loras.h"
#include "serve/openai.h"
#include "chat/chat.h"
#include "tokenizer/tokenizer.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna serve DIR [options]\n\n"
               "Serves the model in DIR over an OpenAI-compatible HTTP API (/v1/completions,\n"
               "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, /metrics).\n\n"
               "  --host ADDR                   address to bind (default 127.0.0.1)\n"
               "  --port N                      port (default 8000; 0 = any free port, printed at start)\n"
               "  --api-key KEY                 require 'Authorization: Bearer KEY' on /v1/ routes\n"
               "  --served-model-name NAME      model name in the API (default: DIR's last component)\n"
               "  --max-pending N               requests queued or running at most; more get 429 (default 1024)\n"
               "  --max-request-bytes N         request bodies above this get 413 (default 4194304)\n"
               "  --lora-modules NAME=DIR       serve a PEFT LoRA adapter as model NAME (repeatable, up to 16);\n"
               "                                requests pick it with \"model\": \"NAME\"\n"
               "  --lora-root DIR               allow POST /v1/load_lora_adapter {\"lora_name\", \"lora_path\"} and\n"
               "                                /v1/unload_lora_adapter {\"lora_name\"} for adapter folders under DIR\n"
               "                                (paths leaving DIR, by .. or symlinks, are refused)\n"
               "  --max-loras N                 adapters resident at once (default: 1, or the --lora-modules count);\n"
               "                                loading one more is refused (400): unload one first\n"
               "  --max-lora-rank R             refuse adapters of higher rank (default 16, as vLLM)\n"
               "engine:\n");
    engine_opts_help(f);
}

struct serve_opts {
    const char *dir, *host, *api_key, *name;
    long long port, max_pending, max_body;
    const char *lora_names[16], *lora_dirs[16];
    int n_lora;
    const char *lora_root;
    long long max_loras, max_lora_rank;
    struct engine_opts eng; /* the engine's options, shared with `tuna bench --serve` */
};

/* NAME=DIR into the adapter table (strings point into argv). */
static bool add_lora(struct serve_opts *o, char *spec)
{
    char *eq = strchr(spec, '=');
    if (!eq || eq == spec || !eq[1] || o->n_lora == 16) {
        fprintf(stderr, "tuna serve: --lora-modules wants NAME=DIR (at most 16), got '%s'\n", spec);
        return false;
    }
    *eq = '\0';
    o->lora_names[o->n_lora] = spec;
    o->lora_dirs[o->n_lora++] = eq + 1;
    return true;
}

static bool parse_args(int argc, char **argv, struct serve_opts *o, bool *help)
{
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            *help = true;
            return true;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--host", &o->host, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--api-key", &o->api_key, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--served-model-name", &o->name, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--lora-root", &o->lora_root, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--max-loras", &o->max_loras, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--max-lora-rank", &o->max_lora_rank, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--port", &o->port, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--max-pending", &o->max_pending, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--max-request-bytes", &o->max_body, &bad) ||
            engine_opts_parse(&o->eng, argc, argv, &i, &bad))
            continue;
        const char *spec = NULL;
        if (tuna_cli_opt_str(argc, argv, &i, "--lora-modules", &spec, &bad)) {
            if (!bad && !add_lora(o, (char *)spec)) bad = true;
            continue;
        }
        if (argv[i][0] == '-' || o->dir) {
            fprintf(stderr, "tuna serve: unexpected argument %s\n", argv[i]);
            bad = true;
        } else {
            o->dir = argv[i];
        }
    }
    if (!bad && o->max_loras == 0) o->max_loras = o->n_lora > 1 ? o->n_lora : 1;
    if (!bad && (o->max_loras < 1 || o->max_loras > 64 || o->max_loras < o->n_lora || o->max_lora_rank < 1)) {
        fprintf(stderr, "tuna serve: --max-loras must be 1..64 and at least the %d --lora-modules; --max-lora-rank >= 1\n",
                o->n_lora);
        bad = true;
    }
    if (!bad && !o->dir) {
        fprintf(stderr, "tuna serve: need the model folder DIR\n");
        bad = true;
    }
    if (!bad && (o->port < 0 || o->port > 65535 || o->max_pending <= 0 || o->max_body <= 0)) {
        fprintf(stderr, "tuna serve: out of range: --port 0..65535, --max-pending and --max-request-bytes > 0\n");
        bad = true;
    }
    if (!bad && !engine_opts_check(&o->eng, "tuna serve")) bad = true;
    return !bad;
}

/* The served name: DIR's last path component. */
static const char *base_name(const char *dir, char *buf, size_t cap)
{
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;
    size_t b = n;
    while (b > 0 && dir[b - 1] != '/') b--;
    snprintf(buf, cap, "%.*s", (int)(n - b), dir + b);
    return buf;
}

int cmd_serve(int argc, char **argv)
{
    struct serve_opts o = {.host = "127.0.0.1", .port = 8000, .max_pending = 1024, .max_body = 4 << 20,
                           .max_lora_rank = 16};
    engine_opts_init(&o.eng);
    bool help = false;
    if (!parse_args(argc, argv, &o, &help)) {
        usage(stderr);
        return 2;
    }
    if (help) {
        usage(stdout);
        return 0;
    }
    char namebuf[256];
    if (!o.name) o.name = base_name(o.dir, namebuf, sizeof namebuf);

    /* signals go to the main thread only: block them before any thread starts */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    tuna_tokenizer *tok = NULL;
    struct tuna_model *m = NULL;
    struct tuna_chat_template *chat = NULL;
    struct tuna_serve_loras loras;
    memset(&loras, 0, sizeof loras);
    tuna_engine *eng = NULL;
    tuna_server *srv = NULL;
    struct tuna_metrics metrics;
    tuna_metrics_init(&metrics);
    struct tuna_gen_config gc;
    struct tuna_model_opts mo = engine_opts_model(&o.eng);
    /* the LoRA fold (model.h): room for every slot at the rank limit beside q/k/v/gate/up's rows */
    if (o.n_lora || o.lora_root) mo.lora_fold = tuna_lora_fold_for(o.max_loras, o.max_lora_rank);
    /* adapters run on either backend: each attach gives the GPU fresh copies (model.h, lora_dev) */
    tuna_status st = TUNA_OK;
    if (!st) st = tuna_serve_loras_init(&loras, (int)o.max_loras, o.max_lora_rank, o.lora_root);
    if (!st) st = tuna_tokenizer_load(o.dir, &tok);
    if (!st) st = tuna_model_load(o.dir, &mo, &m);
    if (!st) st = tuna_gen_config_load(o.dir, &gc);
    if (!st && o.n_lora) {
        for (int i = 0; i < o.n_lora && !st; i++)
            for (int k = 0; k < i; k++)
                if (!strcmp(o.lora_names[i], o.lora_names[k]))
                    st = tuna_fail(TUNA_E_INVALID, "--lora-modules: the name '%s' is given twice", o.lora_names[i]);
        for (int i = 0; i < o.n_lora && !st; i++)
            if (!strcmp(o.lora_names[i], o.name))
                st = tuna_fail(TUNA_E_INVALID, "--lora-modules: '%s' is the base model's name", o.name);
    }
    if (!st) {
        tuna_status cst = tuna_chat_load(o.dir, &chat);
        if (cst && cst != TUNA_E_NOT_FOUND)
            fprintf(stderr, "tuna serve: warning: the chat template does not load (%s); /v1/chat/completions is off\n",
                    tuna_last_error());
        if (cst) chat = NULL;
    }
    struct tuna_engine_config ec = {0};
    if (!st) {
        st = engine_opts_plan(&o.eng, m, o.n_lora || o.lora_root ? (int)o.max_loras : 0, o.max_lora_rank, &ec);
        ec.max_pending = o.max_pending;
        ec.max_loras = (int)o.max_loras;
    }
    int64_t eos[16];
    int n_eos = 0;
    if (!st) {
        if (gc.n_eos) for (int i = 0; i < gc.n_eos && i < 16; i++) eos[n_eos++] = gc.eos_ids[i];
        else for (int i = 0; i < m->arch.n_eos && i < 16; i++) eos[n_eos++] = m->arch.eos_token_ids[i];
    }
    struct tuna_openai_ctx ctx = {0};
    if (!st) {
        ctx.tok = tok;
        ctx.chat = chat;
        ctx.model_name = o.name;
        ctx.model_root = o.dir;
        ctx.max_model_len = m->max_model_len;
        ctx.vocab_size = m->arch.vocab_size;
        if (gc.found) ctx.defaults = gc.sampling;
        else tuna_sampling_default(&ctx.defaults);
        ctx.loras = &loras;
        ctx.eos_ids = eos;
        ctx.n_eos = n_eos;
        st = tuna_engine_start(m, tok, &ec, &metrics, &eng);
    }
    for (int i = 0; i < o.n_lora && !st; i++) { /* --lora-modules: the first slots */
        struct tuna_openai_error err;
        int slot;
        int32_t key;
        struct tuna_lora_adapter *ad = NULL;
        char *real = realpath(o.lora_dirs[i], NULL);
        if (tuna_serve_loras_begin_load(&loras, o.lora_names[i], o.name, &slot, &key, &err))
            st = tuna_fail(TUNA_E_INVALID, "--lora-modules %s: %s", o.lora_names[i], err.message);
        if (!st) st = tuna_lora_load(o.lora_dirs[i], &ad);
        if (!st && tuna_serve_loras_check_rank(&loras, ad, &err))
            st = tuna_fail(TUNA_E_INVALID, "--lora-modules %s: %s", o.lora_names[i], err.message);
        if (!st) st = tuna_engine_set_lora(eng, slot, ad, key);
        if (!st) {
            if (!tuna_serve_loras_finish_load(&loras, slot, ad, real ? real : o.lora_dirs[i]))
                st = tuna_fail_oom("adapter", 0);
            else
                fprintf(stderr, "tuna serve: adapter '%s' from %s (slot %d)\n", o.lora_names[i], o.lora_dirs[i], slot);
        } else if (slot >= 0) {
            tuna_serve_loras_finish_load(&loras, slot, NULL, NULL);
            tuna_lora_free(ad);
        }
        free(real);
    }
    if (!st && o.lora_root)
        fprintf(stderr, "tuna serve: adapters load at run time from %s (--max-loras %lld, --max-lora-rank %lld)\n",
                loras.root, o.max_loras, o.max_lora_rank);
    if (!st) {
        struct tuna_http_config hc = {.host = o.host, .port = (int)o.port, .api_key = o.api_key,
                                      .max_body = (size_t)o.max_body, .max_connections = 1024};
        st = tuna_server_start(&hc, &ctx, eng, &metrics, &srv);
    }
    if (!st) {
        printf("tuna serve: serving %s as '%s' on http://%s:%d (Ctrl-C to stop)\n", o.dir, o.name, o.host,
               tuna_server_port(srv));
        fflush(stdout);
        int sig = 0;
        sigwait(&sigs, &sig);
        fprintf(stderr, "tuna serve: signal %d, shutting down\n", sig);
    }
    tuna_server_quiesce(srv);
    tuna_engine_stop(eng);
    tuna_server_stop(srv);
    tuna_engine_free(eng);
    tuna_chat_free(chat);
    tuna_serve_loras_destroy(&loras); /* the engine detached them */
    tuna_model_free(m);
    tuna_tokenizer_free(tok);
    tuna_metrics_destroy(&metrics);
    return st ? tuna_cli_fail("serve", st) : 0;
}
