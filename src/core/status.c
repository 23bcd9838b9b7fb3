/* status.c — per-thread error messages for tuna_status results. */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define TUNA_ERR_CAP 4096

static _Thread_local char g_err[TUNA_ERR_CAP];

const char *tuna_status_name(tuna_status s)
{
    switch (s) {
    case TUNA_OK: return "TUNA_OK";
    case TUNA_E_INVALID: return "TUNA_E_INVALID";
    case TUNA_E_IO: return "TUNA_E_IO";
    case TUNA_E_FORMAT: return "TUNA_E_FORMAT";
    case TUNA_E_UNSUPPORTED: return "TUNA_E_UNSUPPORTED";
    case TUNA_E_NOT_FOUND: return "TUNA_E_NOT_FOUND";
    case TUNA_E_OOM: return "TUNA_E_OOM";
    case TUNA_E_RANGE: return "TUNA_E_RANGE";
    case TUNA_E_CUDA: return "TUNA_E_CUDA";
    case TUNA_E_INTERNAL: return "TUNA_E_INTERNAL";
    }
    return "TUNA_E_UNKNOWN";
}

const char *tuna_last_error(void) { return g_err; }

void tuna_clear_error(void) { g_err[0] = '\0'; }

const char *tuna_version(void) { return TUNA_VERSION_STRING; }

tuna_status tuna_fail(tuna_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    return s;
}

tuna_status tuna_fail_prefix(tuna_status s, const char *fmt, ...)
{
    char prefix[1024];
    char old[TUNA_ERR_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, g_err, sizeof old);
    size_t n = strlen(prefix);
    if (n > sizeof g_err - 3) n = sizeof g_err - 3;
    memcpy(g_err, prefix, n);
    g_err[n] = ':';
    g_err[n + 1] = ' ';
    size_t m = strlen(old);
    if (m > sizeof g_err - n - 3) m = sizeof g_err - n - 3;
    memcpy(g_err + n + 2, old, m);
    g_err[n + 2 + m] = '\0';
    return s;
}

tuna_status tuna_fail_oom(const char *what, size_t n)
{
    return tuna_fail(TUNA_E_OOM, "out of memory allocating %zu bytes for %s", n, what);
}
