/* cmd_detokenize.c — `tuna detokenize DIR --ids 1,2,3 [--skip-special]`: prints the decoded text. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "core/status.h"
#include "tokenizer/tokenizer.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna detokenize DIR --ids ID,ID,... [--skip-special]\n"
               "  DIR             a folder with tokenizer.json (a model folder)\n"
               "  --ids LIST      token ids separated by commas or spaces (a JSON array works too)\n"
               "  --skip-special  leave special tokens out (HF skip_special_tokens=True)\n");
}

/* Parses "1,2,3", "1 2 3" or "[1, 2, 3]" into a malloc'd array. */
static tuna_status parse_ids(const char *s, int32_t **out, size_t *n)
{
    size_t cap = 16;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v) return tuna_fail_oom("ids", cap);
    *n = 0;
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '[' || *p == ']' || *p == '\t' || *p == '\n') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long long x = strtoll(p, &end, 10);
        if (end == p || errno || x < 0 || x > INT32_MAX) {
            free(v);
            return tuna_fail(TUNA_E_INVALID, "--ids: '%.20s' at offset %zu is not a token id (a whole number >= 0)", p,
                             (size_t)(p - s));
        }
        if (*n == cap) {
            cap *= 2;
            int32_t *w = realloc(v, cap * sizeof *w);
            if (!w) {
                free(v);
                return tuna_fail_oom("ids", cap);
            }
            v = w;
        }
        v[(*n)++] = (int32_t)x;
        p = end;
    }
    *out = v;
    return TUNA_OK;
}

int cmd_detokenize(int argc, char **argv)
{
    const char *dir = NULL, *ids_s = NULL;
    bool skip = false, bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (tuna_cli_flag(argv, i, "--help") || tuna_cli_flag(argv, i, "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--ids", &ids_s, &bad)) continue;
        if (tuna_cli_flag(argv, i, "--skip-special")) skip = true;
        else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "tuna detokenize: unknown option '%s'\n", argv[i]);
            bad = true;
        } else if (!dir) dir = argv[i];
        else {
            fprintf(stderr, "tuna detokenize: unexpected argument '%s'\n", argv[i]);
            bad = true;
        }
    }
    if (bad || !dir || !ids_s) {
        if (!bad) fprintf(stderr, "tuna detokenize: give a folder and --ids\n");
        usage(stderr);
        return 2;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    tuna_status st = parse_ids(ids_s, &ids, &n);
    if (st) return tuna_cli_fail("detokenize", st);
    tuna_tokenizer *tok = NULL;
    if ((st = tuna_tokenizer_load(dir, &tok))) {
        free(ids);
        return tuna_cli_fail("detokenize", st);
    }
    char *text = NULL;
    st = tuna_tokenizer_decode(tok, ids, n, skip, &text);
    free(ids);
    tuna_tokenizer_free(tok);
    if (st) return tuna_cli_fail("detokenize", st);
    fputs(text, stdout);
    putchar('\n');
    free(text);
    return 0;
}
