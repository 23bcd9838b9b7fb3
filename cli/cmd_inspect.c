/* cmd_inspect.c — `tuna inspect DIR [--json]` (being written). */
#include <stdio.h>

#include "cli.h"

int cmd_inspect(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    fprintf(stderr, "tuna inspect: not written yet\n");
    return 1;
}
