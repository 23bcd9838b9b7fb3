/* strmap.c — open-addressing string hash map with linear probing. */
#include "strmap.h"

#include <stdlib.h>
#include <string.h>

uint64_t tuna_hash_bytes(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    /* final mix so that low bits depend on all input bits */
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

void tuna_strmap_init(struct tuna_strmap *m) { memset(m, 0, sizeof *m); }

void tuna_strmap_free(struct tuna_strmap *m)
{
    if (!m) return;
    for (size_t i = 0; i < m->cap; i++) free(m->keys[i]);
    free(m->keys);
    free(m->lens);
    free(m->values);
    memset(m, 0, sizeof *m);
}

static size_t find_slot(const struct tuna_strmap *m, const char *key, size_t len, bool *found)
{
    size_t mask = m->cap - 1;
    size_t i = (size_t)tuna_hash_bytes(key, len) & mask;
    for (;;) {
        if (!m->keys[i]) {
            *found = false;
            return i;
        }
        if (m->lens[i] == len && memcmp(m->keys[i], key, len) == 0) {
            *found = true;
            return i;
        }
        i = (i + 1) & mask;
    }
}

static bool grow(struct tuna_strmap *m)
{
    size_t ncap = m->cap ? m->cap * 2 : 64;
    struct tuna_strmap n = {0};
    n.cap = ncap;
    n.keys = calloc(ncap, sizeof *n.keys);
    n.lens = calloc(ncap, sizeof *n.lens);
    n.values = calloc(ncap, sizeof *n.values);
    if (!n.keys || !n.lens || !n.values) {
        free(n.keys);
        free(n.lens);
        free(n.values);
        return false;
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->keys[i]) continue;
        bool found;
        size_t j = find_slot(&n, m->keys[i], m->lens[i], &found);
        n.keys[j] = m->keys[i];
        n.lens[j] = m->lens[i];
        n.values[j] = m->values[i];
    }
    n.count = m->count;
    free(m->keys);
    free(m->lens);
    free(m->values);
    *m = n;
    return true;
}

bool tuna_strmap_put(struct tuna_strmap *m, const char *key, size_t len, int64_t value, bool *existed)
{
    if (existed) *existed = false;
    if ((m->count + 1) * 4 > m->cap * 3 && !grow(m)) return false;
    bool found;
    size_t i = find_slot(m, key, len, &found);
    if (found) {
        m->values[i] = value;
        if (existed) *existed = true;
        return true;
    }
    char *k = malloc(len + 1);
    if (!k) return false;
    memcpy(k, key, len);
    k[len] = '\0';
    m->keys[i] = k;
    m->lens[i] = len;
    m->values[i] = value;
    m->count++;
    return true;
}

bool tuna_strmap_get(const struct tuna_strmap *m, const char *key, size_t len, int64_t *value)
{
    if (m->cap == 0) return false;
    bool found;
    size_t i = find_slot(m, key, len, &found);
    if (found && value) *value = m->values[i];
    return found;
}

bool tuna_strmap_puts(struct tuna_strmap *m, const char *key, int64_t value, bool *existed)
{
    return tuna_strmap_put(m, key, strlen(key), value, existed);
}

bool tuna_strmap_gets(const struct tuna_strmap *m, const char *key, int64_t *value)
{
    return tuna_strmap_get(m, key, strlen(key), value);
}
