/* strmap.h — a string → int64 hash map (open addressing, FNV-1a), owning copies of its keys.
 *
 * Used for tensor-name lookup, tokenizer vocabularies and merges. Keys are byte strings with an
 * explicit length, so they may hold any bytes (including NUL).
 */
#ifndef TUNA_CORE_STRMAP_H
#define TUNA_CORE_STRMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tuna_strmap {
    char **keys;     /* [cap] owned copies, NULL = empty slot */
    size_t *lens;    /* [cap] */
    int64_t *values; /* [cap] */
    size_t cap;      /* power of two */
    size_t count;
};

/* Initializes an empty map. Free with tuna_strmap_free. */
void tuna_strmap_init(struct tuna_strmap *m);
void tuna_strmap_free(struct tuna_strmap *m);

/* Inserts or replaces key → value. Returns false only when out of memory. If the key was already
 * present and existed is non-NULL, *existed is set to true (and the value replaced). */
bool tuna_strmap_put(struct tuna_strmap *m, const char *key, size_t len, int64_t value, bool *existed);

/* Looks up key; returns true and sets *value when present. */
bool tuna_strmap_get(const struct tuna_strmap *m, const char *key, size_t len, int64_t *value);

/* Convenience for NUL-terminated keys. */
bool tuna_strmap_puts(struct tuna_strmap *m, const char *key, int64_t value, bool *existed);
bool tuna_strmap_gets(const struct tuna_strmap *m, const char *key, int64_t *value);

uint64_t tuna_hash_bytes(const void *data, size_t len);

#endif
