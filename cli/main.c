/* main.c — the tuna command line: a table of subcommands, each in cli/cmd_<name>.c. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static const struct tuna_cli_command k_commands[] = {
#define TUNA_CLI_ENTRY(name, fn, help) {name, fn, help},
#include "commands.def"
#undef TUNA_CLI_ENTRY
};

#define N_COMMANDS (sizeof k_commands / sizeof k_commands[0])

static void usage(FILE *f)
{
    fprintf(f, "tuna %s — load, fine-tune, export and serve Llama-family models\n\n", tuna_version());
    fprintf(f, "usage: tuna <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < N_COMMANDS; i++) fprintf(f, "  %-12s %s\n", k_commands[i].name, k_commands[i].help);
    fprintf(f, "\n'tuna <command> --help' describes a command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        printf("tuna %s\n", tuna_version());
        return 0;
    }
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (!strcmp(argv[1], k_commands[i].name)) return k_commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "tuna: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
