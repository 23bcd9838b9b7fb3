/* cli.c — shared helpers for subcommands: exit codes and option parsing. */
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tuna_cli_fail(const char *cmd, tuna_status s)
{
    fprintf(stderr, "tuna %s: %s\n", cmd, tuna_last_error()[0] ? tuna_last_error() : tuna_status_name(s));
    return s == TUNA_E_INTERNAL ? 3 : 1;
}

static const char *opt_value(int argc, char **argv, int *i, const char *name, bool *bad)
{
    size_t n = strlen(name);
    const char *a = argv[*i];
    if (strncmp(a, name, n) != 0) return NULL;
    if (a[n] == '=') return a + n + 1;
    if (a[n] != '\0') return NULL;
    if (*i + 1 >= argc) {
        fprintf(stderr, "option %s needs a value\n", name);
        *bad = true;
        return NULL;
    }
    (*i)++;
    return argv[*i];
}

bool tuna_cli_opt_str(int argc, char **argv, int *i, const char *name, const char **out, bool *bad)
{
    const char *v = opt_value(argc, argv, i, name, bad);
    if (!v) return false;
    *out = v;
    return true;
}

bool tuna_cli_opt_int(int argc, char **argv, int *i, const char *name, long long *out, bool *bad)
{
    const char *v = opt_value(argc, argv, i, name, bad);
    if (!v) return false;
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end) {
        fprintf(stderr, "option %s wants a whole number, got '%s'\n", name, v);
        *bad = true;
        return true;
    }
    *out = x;
    return true;
}

bool tuna_cli_opt_float(int argc, char **argv, int *i, const char *name, double *out, bool *bad)
{
    const char *v = opt_value(argc, argv, i, name, bad);
    if (!v) return false;
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end) {
        fprintf(stderr, "option %s wants a number, got '%s'\n", name, v);
        *bad = true;
        return true;
    }
    *out = x;
    return true;
}

bool tuna_cli_flag(char **argv, int i, const char *name) { return strcmp(argv[i], name) == 0; }
