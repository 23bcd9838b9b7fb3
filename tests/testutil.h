/* testutil.h — helpers shared by the test programs (header-only, static functions).
 *
 * Fixtures: tests look for ../shared beside the checkout (or $TUNA_SHARED_DIR). When it is absent
 * a test that needs it calls skip() after printing why, so CI without shared/ stays green and
 * says so, and a machine with it runs everything.
 */
#ifndef TUNA_TESTUTIL_H
#define TUNA_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "tuna.h"

/* Path of the shared folder (fixtures, peers), or NULL when absent. */
static inline const char *tt_shared_dir(void)
{
    static char path[4096];
    static int done = 0;
    struct stat st;
    if (done) return path[0] ? path : NULL;
    done = 1;
    const char *env = getenv("TUNA_SHARED_DIR");
    if (env && stat(env, &st) == 0) {
        snprintf(path, sizeof path, "%s", env);
        return path;
    }
    snprintf(path, sizeof path, "%s/../shared", TUNA_SOURCE_DIR);
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return path;
    path[0] = '\0';
    return NULL;
}

/* Builds "<shared>/<rel>" into buf; returns NULL (after printing why) when shared/ or the path
 * is absent, so the caller can skip(). */
static inline const char *tt_shared_path(char *buf, size_t cap, const char *rel)
{
    const char *s = tt_shared_dir();
    struct stat st;
    if (!s) {
        fprintf(stderr, "SKIP: ../shared not found (set TUNA_SHARED_DIR); needed for %s\n", rel);
        return NULL;
    }
    snprintf(buf, cap, "%s/%s", s, rel);
    if (stat(buf, &st) != 0) {
        fprintf(stderr, "SKIP: %s not found\n", buf);
        return NULL;
    }
    return buf;
}

/* Makes a fresh temporary folder for this test run; returns its path (static buffer). */
static inline const char *tt_tmpdir(void)
{
    static char dir[4096];
    if (dir[0]) return dir;
    const char *base = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/tuna-test-XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(dir)) {
        fprintf(stderr, "cannot create a temporary folder under %s\n", base ? base : "/tmp");
        abort();
    }
    return dir;
}

static inline void tt_write(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", path);
        abort();
    }
    if (n && fwrite(data, 1, n, f) != n) abort();
    fclose(f);
}

/* Asserts a tuna call succeeded, printing the error message when it did not. */
#define TT_OK(expr)                                                                                \
    do {                                                                                           \
        tuna_status tt_s_ = (expr);                                                                \
        if (tt_s_ != TUNA_OK) {                                                                    \
            print_error("%s failed: %s: %s\n", #expr, tuna_status_name(tt_s_), tuna_last_error()); \
            fail();                                                                                \
        }                                                                                          \
    } while (0)

/* Asserts a tuna call failed with status `want` and that its message contains `needle`. */
#define TT_FAILS(expr, want, needle)                                                               \
    do {                                                                                           \
        tuna_clear_error();                                                                        \
        tuna_status tt_s_ = (expr);                                                                \
        if (tt_s_ != (want) || !strstr(tuna_last_error(), (needle))) {                             \
            print_error("%s: got %s \"%s\", wanted %s containing \"%s\"\n", #expr,                 \
                        tuna_status_name(tt_s_), tuna_last_error(), tuna_status_name(want), (needle)); \
            fail();                                                                                \
        }                                                                                          \
    } while (0)

/* Relative error ||a-b|| / ||b|| over n floats. */
static inline double tt_rel_err(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    if (den == 0) return num == 0 ? 0 : 1e30;
    return __builtin_sqrt(num / den);
}

#endif
