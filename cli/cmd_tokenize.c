/* cmd_tokenize.c — `tuna tokenize DIR (--text T | --file F) [--no-special] [--no-parse-special]
 * [--tokens]`: prints the ids as a JSON array (and with --tokens the vocabulary strings). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cli.h"
#include "core/file.h"
#include "core/status.h"
#include "tokenizer/tokenizer.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna tokenize DIR (--text TEXT | --file FILE) [--no-special] [--no-parse-special] [--tokens]\n"
               "  DIR                 a folder with tokenizer.json (a model folder)\n"
               "  --text TEXT         the text to encode\n"
               "  --file FILE         read the text from FILE (\"-\" = standard input)\n"
               "  --no-special        do not add BOS/EOS (HF add_special_tokens=False)\n"
               "  --no-parse-special  treat special tokens written in the text as plain text\n"
               "  --tokens            also print the token strings as a JSON array on a second line\n");
}

static char *read_stdin(size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    if (!buf) return NULL;
    size_t r;
    while ((r = fread(buf + n, 1, cap - n, stdin)) > 0) {
        n += r;
        if (n == cap) {
            char *b = realloc(buf, cap * 2 + 1);
            if (!b) {
                free(buf);
                return NULL;
            }
            buf = b;
            cap *= 2;
        }
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

int cmd_tokenize(int argc, char **argv)
{
    const char *dir = NULL, *text = NULL, *file = NULL;
    bool add_special = true, parse_special = true, show_tokens = false, bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (tuna_cli_flag(argv, i, "--help") || tuna_cli_flag(argv, i, "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--text", &text, &bad)) continue;
        if (tuna_cli_opt_str(argc, argv, &i, "--file", &file, &bad)) continue;
        if (tuna_cli_flag(argv, i, "--no-special")) add_special = false;
        else if (tuna_cli_flag(argv, i, "--no-parse-special")) parse_special = false;
        else if (tuna_cli_flag(argv, i, "--tokens")) show_tokens = true;
        else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "tuna tokenize: unknown option '%s'\n", argv[i]);
            bad = true;
        } else if (!dir) dir = argv[i];
        else {
            fprintf(stderr, "tuna tokenize: unexpected argument '%s'\n", argv[i]);
            bad = true;
        }
    }
    if (bad || !dir || (!text == !file)) {
        if (!bad) fprintf(stderr, "tuna tokenize: give a folder and exactly one of --text or --file\n");
        usage(stderr);
        return 2;
    }
    char *owned = NULL;
    size_t len = 0;
    tuna_status st;
    if (file && !strcmp(file, "-")) {
        if (!(owned = read_stdin(&len))) return tuna_cli_fail("tokenize", tuna_fail_oom("standard input", 0));
    } else if (file) {
        if ((st = tuna_read_file(file, 0, &owned, &len))) return tuna_cli_fail("tokenize", st);
    } else {
        len = strlen(text);
    }
    const char *t = owned ? owned : text;
    tuna_tokenizer *tok = NULL;
    if ((st = tuna_tokenizer_load(dir, &tok))) {
        free(owned);
        return tuna_cli_fail("tokenize", st);
    }
    int32_t *ids = NULL;
    size_t n = 0;
    st = tuna_tokenizer_encode(tok, t, len, add_special, parse_special, &ids, &n);
    free(owned);
    if (st) {
        tuna_tokenizer_free(tok);
        return tuna_cli_fail("tokenize", st);
    }
    putchar('[');
    for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
    printf("]\n");
    if (show_tokens) {
        cJSON *arr = cJSON_CreateArray();
        for (size_t i = 0; arr && i < n; i++) {
            const char *s = tuna_tokenizer_token_str(tok, ids[i]);
            cJSON_AddItemToArray(arr, cJSON_CreateString(s ? s : ""));
        }
        char *out = arr ? cJSON_PrintUnformatted(arr) : NULL;
        if (out) printf("%s\n", out);
        free(out);
        cJSON_Delete(arr);
    }
    free(ids);
    tuna_tokenizer_free(tok);
    return 0;
}
