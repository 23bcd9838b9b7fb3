/* cmd_inspect.c — `tuna inspect DIR [--json]`: what a model or adapter folder holds. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "inspect/inspect.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna inspect DIR [--json]\n\n"
               "Reports what a Hugging Face model folder (or PEFT adapter folder) holds without loading it:\n"
               "architecture and sizes, parameters, tensors by dtype, quantization declared in config.json and\n"
               "found in the tensors, contradictions between them and what to do, tokenizer and chat template\n"
               "files, and memory (weights as stored and in NF4, KV cache per token).\n\n"
               "  --json   print the report as JSON\n\n"
               "Exit status: 0, or 1 when the report lists problems of level \"error\".\n");
}

int cmd_inspect(int argc, char **argv)
{
    const char *dir = NULL;
    bool json = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--json")) {
            json = true;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "tuna inspect: unknown option %s\n", argv[i]);
            usage(stderr);
            return 2;
        } else if (!dir) {
            dir = argv[i];
        } else {
            fprintf(stderr, "tuna inspect: one folder at a time (got %s and %s)\n", dir, argv[i]);
            return 2;
        }
    }
    if (!dir) {
        usage(stderr);
        return 2;
    }
    cJSON *report;
    tuna_status s = tuna_inspect(dir, &report);
    if (s) return tuna_cli_fail("inspect", s);
    if (json) {
        char *text = cJSON_Print(report);
        printf("%s\n", text ? text : "{}");
        free(text);
    } else {
        tuna_inspect_print(report, stdout);
    }
    int errors = tuna_inspect_error_count(report);
    cJSON_Delete(report);
    return errors ? 1 : 0;
}
