/* bench_serve.c — `tuna bench --serve [DIR | --synthetic NAME]`: the serving engine of `tuna serve`
 * (scheduler, continuous batching, paged KV cache, prefix caching) driven in-process without HTTP
 * (src/serve/bench.h). Offline load by default (every request at once), a closed loop with
 * --concurrency N; --loras K adds K synthetic adapters mixed round-robin in the batch. The engine
 * options are `tuna serve`'s, with its defaults, and the memory plan is the same. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "cli.h"
#include "core/file.h"
#include "core/status.h"
#include "engine_opts.h"
#include "serve/bench.h"
#include "serve/loras.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna bench --serve [DIR | --synthetic llama-3.2-1b|llama-3-8b] [options]\n\n"
               "Runs the serving engine of `tuna serve` in-process (no HTTP) on random-token prompts\n"
               "(distinct per request), greedy, ignore_eos, exactly --gen tokens each.\n\n"
               "  --requests N                  requests in all (default 1000)\n"
               "  --prompt-len N                prompt tokens per request (default 1000)\n"
               "  --gen N                       output tokens per request (default 1000)\n"
               "  --concurrency N               closed loop with N requests in flight; 0 = offline, all at once\n"
               "                                (default 0)\n"
               "  --loras K --lora-rank R       K synthetic adapters of rank R on all 7 projections, request i\n"
               "                                uses adapter i mod K (default: none; rank 16)\n"
               "  --seed S                      prompt ids (default 0)\n"
               "  --json FILE                   also write the results as one JSON object\n"
               "engine options, as `tuna serve` (same defaults):\n");
    engine_opts_help(f);
}

struct opts {
    const char *dir, *synth, *json;
    long long requests, plen, gen, conc, loras, rank, seed;
    struct engine_opts eng; /* `tuna serve`'s engine options and defaults */
};

static bool parse(int argc, char **argv, struct opts *o, bool *help)
{
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            *help = true;
            return true;
        }
        if (!strcmp(argv[i], "--serve")) continue;
        if (tuna_cli_opt_str(argc, argv, &i, "--synthetic", &o->synth, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--json", &o->json, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--requests", &o->requests, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--prompt-len", &o->plen, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--gen", &o->gen, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--concurrency", &o->conc, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--loras", &o->loras, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--lora-rank", &o->rank, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--seed", &o->seed, &bad) ||
            engine_opts_parse(&o->eng, argc, argv, &i, &bad))
            continue;
        if (argv[i][0] == '-' || o->dir) {
            fprintf(stderr, "tuna bench --serve: unexpected argument %s\n", argv[i]);
            bad = true;
        } else {
            o->dir = argv[i];
        }
    }
    if (!bad && !o->dir == !o->synth) {
        fprintf(stderr, "tuna bench --serve: give a model folder DIR or --synthetic NAME (one of them)\n");
        bad = true;
    }
    if (!bad && (o->requests < 1 || o->plen < 1 || o->gen < 1 || o->conc < 0 || o->loras < 0 || o->loras > 64 ||
                 o->rank < 1 || o->rank > 256 || o->seed < 0)) {
        fprintf(stderr, "tuna bench --serve: out of range: --requests, --prompt-len, --gen >= 1; --concurrency >= 0; "
                        "--loras 0..64; --lora-rank 1..256; --seed >= 0\n");
        bad = true;
    }
    if (!bad && !engine_opts_check(&o->eng, "tuna bench --serve")) bad = true;
    return !bad;
}

static void print_results(const struct opts *o, const struct tuna_model *m, const struct tuna_serve_bench_result *r,
                          double load_s)
{
    const struct tuna_engine_stats *e = &r->eng;
    printf("model        %s (%s)\n", o->synth ? o->synth : o->dir, m->arch.architecture);
    printf("device       %s   (load %.2f s)\n", m->device_desc, load_s);
    printf("load         %s, %lld requests x (%lld prompt + %lld output) tokens", o->conc ? "online" : "offline",
           o->requests, o->plen, o->gen);
    if (o->conc) printf(", concurrency %lld", o->conc);
    if (o->loras) printf(", %lld LoRA adapters of rank %lld", o->loras, o->rank);
    printf("\n");
    printf("requests     %lld completed, %lld failed\n", (long long)r->completed, (long long)r->failed);
    printf("tokens       %lld prompt, %lld output\n", (long long)r->prompt_tokens, (long long)r->output_tokens);
    printf("wall         %.3f s\n", r->wall_s);
    printf("throughput   %.1f output tok/s, %.1f total tok/s, %.2f requests/s\n", (double)r->output_tokens / r->wall_s,
           (double)(r->output_tokens + r->prompt_tokens) / r->wall_s, (double)r->completed / r->wall_s);
    printf("ttft         mean %.1f ms, p50 %.1f ms, p99 %.1f ms\n", 1e3 * r->ttft_mean, 1e3 * r->ttft_p50,
           1e3 * r->ttft_p99);
    printf("itl          mean %.2f ms, p50 %.2f ms, p99 %.2f ms\n", 1e3 * r->itl_mean, 1e3 * r->itl_p50,
           1e3 * r->itl_p99);
    printf("latency      mean %.3f s per request\n", r->e2e_mean);
    double steps = e->steps ? (double)e->steps : 1;
    printf("steps        %lld, mean batch %.1f sequences / %.1f tokens, %.2f ms per step in the forward\n",
           (long long)e->steps, (double)e->step_seqs / steps, (double)e->step_tokens / steps,
           1e3 * e->forward_s / steps);
    int64_t mixed = e->steps - e->decode_steps;
    printf("step kinds   %lld decode-only at %.2f ms, %lld with prefill at %.2f ms (%.1f tokens) per step\n",
           (long long)e->decode_steps, e->decode_steps ? 1e3 * e->decode_forward_s / (double)e->decode_steps : 0.0,
           (long long)mixed, mixed ? 1e3 * (e->forward_s - e->decode_forward_s) / (double)mixed : 0.0,
           mixed ? (double)(e->step_tokens - e->decode_tokens) / (double)mixed : 0.0);
    printf("kv cache     peak %lld of %lld blocks (%.1f%%), %lld preemptions\n", (long long)e->peak_kv_blocks,
           (long long)e->kv_blocks, 100.0 * (double)e->peak_kv_blocks / (double)(e->kv_blocks ? e->kv_blocks : 1),
           (long long)e->preemptions);
}

static tuna_status write_json(const char *path, const struct opts *o, const struct tuna_model *m,
                              const struct tuna_serve_bench_result *r)
{
    const struct tuna_engine_stats *e = &r->eng;
    double steps = e->steps ? (double)e->steps : 1;
    cJSON *j = cJSON_CreateObject();
    if (!j) return tuna_fail_oom("JSON report", 0);
    cJSON_AddStringToObject(j, "model", o->synth ? o->synth : o->dir);
    cJSON_AddStringToObject(j, "device", m->device_desc);
    cJSON_AddStringToObject(j, "mode", o->conc ? "online" : "offline");
    const struct {
        const char *k;
        double v;
    } nums[] = {{"requests", (double)o->requests},
                {"prompt_len", (double)o->plen},
                {"gen", (double)o->gen},
                {"concurrency", (double)o->conc},
                {"loras", (double)o->loras},
                {"lora_rank", o->loras ? (double)o->rank : 0},
                {"completed", (double)r->completed},
                {"failed", (double)r->failed},
                {"prompt_tokens", (double)r->prompt_tokens},
                {"output_tokens", (double)r->output_tokens},
                {"wall_s", r->wall_s},
                {"output_tok_s", (double)r->output_tokens / r->wall_s},
                {"total_tok_s", (double)(r->output_tokens + r->prompt_tokens) / r->wall_s},
                {"ttft_mean_ms", 1e3 * r->ttft_mean},
                {"ttft_p50_ms", 1e3 * r->ttft_p50},
                {"ttft_p99_ms", 1e3 * r->ttft_p99},
                {"itl_mean_ms", 1e3 * r->itl_mean},
                {"itl_p50_ms", 1e3 * r->itl_p50},
                {"itl_p99_ms", 1e3 * r->itl_p99},
                {"steps", (double)e->steps},
                {"mean_batch_seqs", (double)e->step_seqs / steps},
                {"mean_batch_tokens", (double)e->step_tokens / steps},
                {"forward_ms_per_step", 1e3 * e->forward_s / steps},
                {"decode_only_steps", (double)e->decode_steps},
                {"decode_only_forward_ms_per_step",
                 e->decode_steps ? 1e3 * e->decode_forward_s / (double)e->decode_steps : 0.0},
                {"peak_kv_blocks", (double)e->peak_kv_blocks},
                {"kv_blocks", (double)e->kv_blocks},
                {"preemptions", (double)e->preemptions}};
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++)
        cJSON_AddNumberToObject(j, nums[i].k, nums[i].v);
    char *text = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!text) return tuna_fail_oom("JSON report", 0);
    size_t n = strlen(text);
    text[n] = '\n'; /* replaces the NUL: written with its length */
    tuna_status st = tuna_write_file_atomic(path, text, n + 1);
    free(text);
    return st;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int bench_serve_main(int argc, char **argv)
{
    struct opts o = {.requests = 1000, .plen = 1000, .gen = 1000, .rank = 16};
    engine_opts_init(&o.eng);
    bool help = false;
    if (!parse(argc, argv, &o, &help)) {
        usage(stderr);
        return 2;
    }
    if (help) {
        usage(stdout);
        return 0;
    }
    struct tuna_model_opts mo = engine_opts_model(&o.eng);
    mo.lora_fold = tuna_lora_fold_for(o.loras, o.rank); /* the LoRA fold's columns (model.h) */
    struct synth syn = {0};
    struct tuna_model *m = NULL;
    tuna_tokenizer *tok = NULL;
    struct tuna_lora_adapter *ads[64] = {0};
    double t0 = now_s();
    tuna_status st = o.synth ? bench_synth_model(o.synth, &mo, &syn, &m) : tuna_model_load(o.dir, &mo, &m);
    /* a model folder's tokenizer makes the engine detokenize as it does when serving */
    if (!st && o.dir && tuna_tokenizer_load(o.dir, &tok) != TUNA_OK) {
        fprintf(stderr, "tuna bench --serve: no tokenizer in %s (%s): no text is produced\n", o.dir, tuna_last_error());
        tok = NULL;
    }
    double load_s = now_s() - t0;
    struct tuna_engine_config ec = {0};
    if (!st) {
        st = engine_opts_plan(&o.eng, m, (int)o.loras, o.rank, &ec); /* as tuna serve: adapters out of the KV share */
        ec.max_pending = o.requests;
    }
    if (!st && o.loras) st = tuna_serve_bench_make_adapters(m, (int)o.loras, o.rank, (uint64_t)o.seed + 1, ads);
    struct tuna_serve_bench_config bc = {
        .n_requests = o.requests, .prompt_len = o.plen, .gen = o.gen, .concurrency = o.conc, .seed = (uint64_t)o.seed};
    struct tuna_serve_bench_result res;
    memset(&res, 0, sizeof res);
    if (!st) {
        fprintf(stderr, "tuna bench --serve: %lld requests, %s...\n", o.requests,
                o.conc ? "closed loop" : "all submitted at once");
        st = tuna_serve_bench_run(m, tok, &ec, (const struct tuna_lora_adapter *const *)ads, (int)o.loras, &bc, &res);
    }
    if (!st) {
        print_results(&o, m, &res, load_s);
        if (o.json) st = write_json(o.json, &o, m, &res);
    }
    int rc = st ? tuna_cli_fail("bench", st) : (res.failed ? 1 : 0);
    if (!st && res.failed) fprintf(stderr, "tuna bench --serve: %lld requests failed\n", (long long)res.failed);
    tuna_serve_bench_result_free(&res);
    for (int i = 0; i < 64; i++)
        tuna_lora_free(ads[i]);
    tuna_tokenizer_free(tok);
    tuna_model_free(m);
    bench_synth_free(&syn);
    return rc;
}
