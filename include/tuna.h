/* tuna.h — the public C API of tuna.
 *
 * Conventions (see docs/ARCHITECTURE.md):
 * - Every function that can fail returns a tuna_status. On failure a message that says what was
 *   found, where, and what to do is kept per thread: read it with tuna_last_error().
 * - Handles are opaque; each tuna_x_open/new has a tuna_x_close/free that accepts NULL.
 * - Pointer parameters are borrowed unless the comment says "taken" or "retained".
 */
#ifndef TUNA_H
#define TUNA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TUNA_VERSION_MAJOR 0
#define TUNA_VERSION_MINOR 1
#define TUNA_VERSION_PATCH 0
#define TUNA_VERSION_STRING "0.1.0"

typedef enum tuna_status {
    TUNA_OK = 0,
    TUNA_E_INVALID,     /* a bad argument or option from the caller */
    TUNA_E_IO,          /* a file could not be opened, read, mapped or written */
    TUNA_E_FORMAT,      /* a file's content is malformed or contradicts itself */
    TUNA_E_UNSUPPORTED, /* well-formed, but something tuna does not handle (yet) */
    TUNA_E_NOT_FOUND,   /* a named tensor, file, key or adapter is absent */
    TUNA_E_OOM,         /* an allocation failed or a memory plan does not fit */
    TUNA_E_RANGE,       /* a value out of its allowed range (context length, ids, ...) */
    TUNA_E_CUDA,        /* a CUDA / cuBLAS call failed; the message names the call */
    TUNA_E_INTERNAL     /* a bug in tuna: please report it */
} tuna_status;

/* Short stable name of a status, e.g. "TUNA_E_FORMAT". Never NULL. */
const char *tuna_status_name(tuna_status s);

/* The message of the most recent failure on this thread ("" if none). The pointer stays valid
 * until the next failing tuna call on the same thread. */
const char *tuna_last_error(void);

/* Clears this thread's error message. */
void tuna_clear_error(void);

/* The library version string, e.g. "0.1.0". */
const char *tuna_version(void);

#ifdef __cplusplus
}
#endif
#endif /* TUNA_H */
