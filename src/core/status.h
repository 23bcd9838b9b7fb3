/* status.h — setting the per-thread error message that goes with a tuna_status.
 *
 * Library code reports a failure as
 *     return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s' ends at byte %llu, past the data (%llu bytes)", ...);
 * and a caller that wants to add where it happened uses tuna_fail_prefix():
 *     if (st) return tuna_fail_prefix(st, "loading %s", dir);
 * Messages say what was found, where, and what to do.
 */
#ifndef TUNA_CORE_STATUS_H
#define TUNA_CORE_STATUS_H

#include "tuna.h"

#if defined(__GNUC__)
#define TUNA_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define TUNA_PRINTF(a, b)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Sets this thread's message (printf format) and returns s. */
tuna_status tuna_fail(tuna_status s, const char *fmt, ...) TUNA_PRINTF(2, 3);

/* Puts "<context>: " in front of the current message and returns s. */
tuna_status tuna_fail_prefix(tuna_status s, const char *fmt, ...) TUNA_PRINTF(2, 3);

/* Reports an allocation failure of n bytes for what (e.g. "tensor table") and returns TUNA_E_OOM. */
tuna_status tuna_fail_oom(const char *what, size_t n);

#ifdef __cplusplus
}
#endif

#endif
