/* cli.h — what the subcommands share: the command table entry, status → exit code, option
 * parsing helpers. Only cli/ turns a tuna_status into an exit code. */
#ifndef TUNA_CLI_H
#define TUNA_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "tuna.h"

struct tuna_cli_command {
    const char *name;
    int (*run)(int argc, char **argv); /* argv[0] is the command name */
    const char *help;                  /* one line for `tuna --help` */
};

/* Declarations of every cmd_*() in commands.def. */
#define TUNA_CLI_ENTRY(name, fn, help) int fn(int argc, char **argv);
#include "commands.def"
#undef TUNA_CLI_ENTRY

/* Subcommands reached through another command: `tuna export gguf` (cli/cmd_export_gguf.c). */
int cmd_export_gguf(int argc, char **argv);

/* Prints "tuna <cmd>: <message>" for a failed status and returns the exit code (1 for input
 * problems, 3 for internal errors). */
int tuna_cli_fail(const char *cmd, tuna_status s);

/* Option helpers: when argv[*i] is `name` (or `name=value`), stores the value, advances *i and
 * returns true. On a missing or malformed value prints a message and sets *bad. */
bool tuna_cli_opt_str(int argc, char **argv, int *i, const char *name, const char **out, bool *bad);
bool tuna_cli_opt_int(int argc, char **argv, int *i, const char *name, long long *out, bool *bad);
bool tuna_cli_opt_float(int argc, char **argv, int *i, const char *name, double *out, bool *bad);
bool tuna_cli_flag(char **argv, int i, const char *name);

#endif
