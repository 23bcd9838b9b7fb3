/* cmd_perplexity.c — `tuna perplexity DIR FILE [--ctx 256 --stride 256]`: perplexity of a text
 * file (tokenized without special tokens), defined in src/model/perplexity.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "core/file.h"
#include "infer_common.h"
#include "model/perplexity.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna perplexity DIR FILE [--ctx 256] [--stride 256] [options]\n\n"
               "Perplexity of FILE: windows of --ctx tokens every --stride tokens (no BOS), loss over the\n"
               "shifted targets, ppl = exp(total nll / targets).\n");
    infer_flags_help(f, false);
}

static void progress(void *arg, int64_t done, int64_t total)
{
    (void)arg;
    fprintf(stderr, "\rwindow %lld/%lld", (long long)done, (long long)total);
    if (done == total) fprintf(stderr, "\n");
}

int cmd_perplexity(int argc, char **argv)
{
    const char *dir = NULL, *file = NULL;
    long long ctx = 256, stride = -1;
    struct infer_flags fl;
    infer_flags_init(&fl);
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_int(argc, argv, &i, "--ctx", &ctx, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--stride", &stride, &bad) || infer_flags_parse(&fl, argc, argv, &i, &bad))
            continue;
        if (argv[i][0] == '-') {
            fprintf(stderr, "tuna perplexity: unknown option %s\n", argv[i]);
            bad = true;
        } else if (!dir) {
            dir = argv[i];
        } else if (!file) {
            file = argv[i];
        } else {
            bad = true;
        }
    }
    if (bad || !dir || !file) {
        usage(stderr);
        return 2;
    }
    if (stride < 0) stride = ctx;
    char *text = NULL;
    size_t len = 0;
    int32_t *ids = NULL;
    size_t n = 0;
    tuna_tokenizer *tok = NULL;
    struct tuna_model *m = NULL;
    struct tuna_ppl_result r;
    tuna_status st = tuna_read_file(file, 0, &text, &len);
    if (!st) st = tuna_tokenizer_load(dir, &tok);
    if (!st) st = tuna_tokenizer_encode(tok, text, len, false, true, &ids, &n);
    if (!st) st = tuna_model_load(dir, &fl.model, &m);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (!st) st = tuna_perplexity(m, ids, (int64_t)n, ctx, stride, progress, NULL, &r);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (!st) {
        double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        printf("perplexity %.6f  (nll %.6f over %lld targets, %lld windows of %lld, stride %lld; %zu tokens; "
               "%.1f tok/s)\n", r.ppl, r.nll / (double)r.targets, (long long)r.targets, (long long)r.windows, ctx,
               stride, n, (double)(r.windows * ctx) / s);
    }
    free(text);
    free(ids);
    tuna_tokenizer_free(tok);
    tuna_model_free(m);
    return st ? tuna_cli_fail("perplexity", st) : 0;
}
