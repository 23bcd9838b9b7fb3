/* cmd_dataset.c — `tuna dataset --model DIR --data FILE.jsonl [--format F]
 * [--train-on-responses-only] [--max-seq-length N] [--packing] [--show K] [--ids]`: loads a
 * training dataset exactly as `tuna finetune` would (same flags) and prints what it became: the
 * counts (examples per format, tokens, targets, truncation, dropped examples), then the first K
 * rows decoded with the trained tokens between ⟦ ⟧ — the check that masking does what you meant —
 * or, with --ids, the rows as JSON lines {"line", "ids", "labels"} (HF labels, -100 = ignored). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/chat.h"
#include "cli.h"
#include "tokenizer/tokenizer.h"
#include "train/dataset.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna dataset --model DIR --data FILE.jsonl [--format F] [--train-on-responses-only]\n"
               "                    [--max-seq-length N] [--packing] [--show K] [--ids]\n"
               "  --model DIR                the model folder (tokenizer and chat template)\n"
               "  --data FILE                JSONL: messages, sharegpt, alpaca or text lines\n"
               "  --format F                 auto (default, per line) | messages | sharegpt | alpaca | text\n"
               "  --train-on-responses-only  only assistant turns are targets\n"
               "  --max-seq-length N         truncate examples to N tokens (counted)\n"
               "  --packing                  pack examples into rows of N tokens\n"
               "  --show K                   print the first K rows, targets between \xe2\x9f\xa6 \xe2\x9f\xa7 (default 1)\n"
               "  --ids                      print the first K rows as JSON lines of ids and labels\n");
}

/* Prints ids[a, b) decoded (special tokens kept). */
static tuna_status put_span(const tuna_tokenizer *tok, const int32_t *ids, int64_t a, int64_t b)
{
    char *s = NULL;
    tuna_status st = tuna_tokenizer_decode(tok, ids + a, (size_t)(b - a), false, &s);
    if (!st) fputs(s, stdout);
    free(s);
    return st;
}

static tuna_status show_row(const tuna_tokenizer *tok, const struct tuna_train_example *e, size_t i)
{
    int64_t targets = 0;
    for (int64_t t = 1; t < e->n; t++) targets += e->labels[t] != TUNA_LABEL_IGNORE;
    printf("--- row %zu (line %lld, %lld tokens, %lld targets%s)\n", i, (long long)e->line, (long long)e->n,
           (long long)targets, e->n_seg > 1 ? ", packed" : "");
    tuna_status st = TUNA_OK;
    for (int64_t a = 0; a < e->n && !st;) {
        bool on = e->labels[a] != TUNA_LABEL_IGNORE;
        int64_t b = a + 1;
        while (b < e->n && (e->labels[b] != TUNA_LABEL_IGNORE) == on)
            b++;
        if (on) fputs("\xe2\x9f\xa6", stdout);
        st = put_span(tok, e->ids, a, b);
        if (on) fputs("\xe2\x9f\xa7", stdout);
        a = b;
    }
    putchar('\n');
    return st;
}

static void print_ids(const struct tuna_train_example *e)
{
    printf("{\"line\": %lld, \"ids\": [", (long long)e->line);
    for (int64_t t = 0; t < e->n; t++)
        printf(t ? ", %d" : "%d", e->ids[t]);
    printf("], \"labels\": [");
    for (int64_t t = 0; t < e->n; t++)
        printf(t ? ", %d" : "%d", e->labels[t]);
    printf("]}\n");
}

int cmd_dataset(int argc, char **argv)
{
    const char *model = NULL, *data = NULL, *format = "auto";
    long long max_seq = 0, show = 1;
    bool ro = false, packing = false, ids = false, bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (tuna_cli_flag(argv, i, "--help") || tuna_cli_flag(argv, i, "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--model", &model, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--data", &data, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--format", &format, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--max-seq-length", &max_seq, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--show", &show, &bad))
            continue;
        if (tuna_cli_flag(argv, i, "--train-on-responses-only"))
            ro = true;
        else if (tuna_cli_flag(argv, i, "--packing"))
            packing = true;
        else if (tuna_cli_flag(argv, i, "--ids"))
            ids = true;
        else {
            fprintf(stderr, "tuna dataset: unknown argument '%s'\n", argv[i]);
            bad = true;
        }
    }
    if (bad || !model || !data || show < 0) {
        if (!bad) fprintf(stderr, "tuna dataset: give --model DIR and --data FILE (--show not negative)\n");
        usage(stderr);
        return 2;
    }
    tuna_tokenizer *tok = NULL;
    struct tuna_chat_template *tmpl = NULL;
    tuna_dataset *ds = NULL;
    tuna_status st = tuna_tokenizer_load(model, &tok);
    if (!st) {
        tuna_status cs = tuna_chat_load(model, &tmpl);
        if (cs == TUNA_E_NOT_FOUND) tmpl = NULL; /* text-only data needs no template */
        else st = cs;
    }
    if (!st) {
        struct tuna_dataset_opts o;
        tuna_dataset_opts_default(&o);
        o.format = format;
        o.train_on_responses_only = ro;
        o.max_seq_length = max_seq;
        o.packing = packing;
        st = tuna_dataset_load(data, tok, tmpl, &o, &ds);
    }
    if (!st) {
        char desc[1024];
        tuna_dataset_describe(ds, desc, sizeof desc);
        fprintf(ids ? stderr : stdout, "%s: %s\n", data, desc);
        size_t n = tuna_dataset_size(ds);
        for (size_t i = 0; i < n && i < (size_t)show && !st; i++) {
            if (ids) print_ids(tuna_dataset_at(ds, i));
            else st = show_row(tok, tuna_dataset_at(ds, i), i);
        }
    }
    int rc = st ? tuna_cli_fail("dataset", st) : 0;
    tuna_dataset_free(ds);
    tuna_chat_free(tmpl);
    tuna_tokenizer_free(tok);
    return rc;
}
