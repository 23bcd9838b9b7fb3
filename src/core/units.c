/* units.c — human-readable byte sizes and counts. */
#include "units.h"

#include <stdio.h>

const char *tuna_fmt_bytes(char *buf, size_t cap, double b)
{
    static const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (b >= 1024.0 && i < 4) {
        b /= 1024.0;
        i++;
    }
    if (i == 0) snprintf(buf, cap, "%.0f B", b);
    else snprintf(buf, cap, "%.2f %s", b, u[i]);
    return buf;
}

const char *tuna_fmt_count(char *buf, size_t cap, double n)
{
    if (n >= 1e9) snprintf(buf, cap, "%.2f B", n / 1e9);
    else if (n >= 1e6) snprintf(buf, cap, "%.2f M", n / 1e6);
    else if (n >= 1e3) snprintf(buf, cap, "%.1f K", n / 1e3);
    else snprintf(buf, cap, "%.0f", n);
    return buf;
}
