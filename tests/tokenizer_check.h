/* tokenizer_check.h — helpers shared by the tokenizer test programs (header-only): id lists
 * from JSON, encode/decode checks that print what differs, the split regexes of Llama 3 and
 * Qwen2 as their tokenizer.json files write them. */
#ifndef TUNA_TOKENIZER_CHECK_H
#define TUNA_TOKENIZER_CHECK_H

#include <stdbool.h>

#include "core/json.h"
#include "testutil.h"
#include "tokenizer/tokenizer.h"

static const char LLAMA3_RE[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char QWEN2_RE[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                               "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static inline void print_ids(const char *what, const int32_t *ids, size_t n)
{
    fprintf(stderr, "    %s:", what);
    for (size_t i = 0; i < n && i < 64; i++) fprintf(stderr, " %d", ids[i]);
    if (n > 64) fprintf(stderr, " ... (%zu)", n);
    fprintf(stderr, "\n");
}

static inline bool json_ids(const cJSON *arr, int32_t **ids, size_t *n)
{
    *n = 0;
    *ids = NULL;
    if (!cJSON_IsArray(arr)) return false;
    size_t k = (size_t)cJSON_GetArraySize(arr);
    *ids = malloc((k ? k : 1) * sizeof **ids);
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)(*ids)[(*n)++] = (int32_t)e->valuedouble;
    return true;
}

static inline bool same_ids(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

/* Encodes text and compares; prints a mismatch. Returns true on a match. */
static inline bool check_encode(const tuna_tokenizer *t, const char *set, size_t idx, const char *text, size_t len, bool add_special,
                         const int32_t *want, size_t nwant)
{
    int32_t *ids = NULL;
    size_t n = 0;
    tuna_status st = tuna_tokenizer_encode(t, text, len, add_special, true, &ids, &n);
    bool ok = st == TUNA_OK && same_ids(ids, n, want, nwant);
    if (!ok) {
        fprintf(stderr, "  %s case %zu (%s) mismatch: text \"%.*s\"%s\n", set, idx, add_special ? "with specials" : "plain",
                (int)(len > 80 ? 80 : len), text, len > 80 ? "..." : "");
        if (st) fprintf(stderr, "    error: %s\n", tuna_last_error());
        print_ids("want", want, nwant);
        print_ids("got ", ids, n);
    }
    free(ids);
    return ok;
}

/* Loads the tokenizer folder at shared/<rel>; NULL (after saying why) when absent. */
static inline tuna_tokenizer *load_rel(const char *rel)
{
    char dir[4096];
    if (!tt_shared_path(dir, sizeof dir, rel)) return NULL;
    tuna_tokenizer *t = NULL;
    TT_OK(tuna_tokenizer_load(dir, &t));
    return t;
}

static inline bool check_decode(const tuna_tokenizer *t, const char *set, const char *name, const int32_t *ids, size_t n, bool skip,
                         const char *want)
{
    char *dec = NULL;
    tuna_status st = tuna_tokenizer_decode(t, ids, n, skip, &dec);
    bool ok = st == TUNA_OK && strcmp(dec, want) == 0;
    if (!ok)
        fprintf(stderr, "  %s %s decode(skip_special=%d) mismatch:\n    want \"%s\"\n    got  \"%s\"\n", set, name, skip, want,
                dec ? dec : tuna_last_error());
    free(dec);
    return ok;
}

#endif
