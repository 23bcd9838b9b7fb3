/* safetensors_writer.c — writes safetensors files in the layout of the official library.
 *
 * The official writer (Rust `safetensors::serialize`) sorts tensors by dtype, descending in its
 * enum order, then by name; writes the header as compact JSON with __metadata__ first and the
 * tensors in offset order (keys dtype, shape, data_offsets); pads the header with spaces to a
 * multiple of 8; and lays the data out back to back. Re-writing a file made by transformers
 * therefore gives the same bytes (tests/test_safetensors.c checks this on the fixtures).
 * Files are written under a temporary name and renamed.
 */
#include "safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "core/strbuf.h"
#include "core/strmap.h"

struct st_entry {
    char *name;
    enum tuna_dtype dtype;
    int ndim;
    int64_t shape[TUNA_MAX_DIMS];
    const void *data;
    size_t nbytes;
    bool owned;
    size_t order; /* insertion order */
};

struct tuna_st_writer {
    struct st_entry *e;
    size_t n, cap;
    struct tuna_strmap names;
    char **meta_keys, **meta_vals;
    size_t n_meta;
};

/* Position of each dtype in the official Dtype enum (BOOL first, U64 last). */
static int official_rank(enum tuna_dtype t)
{
    switch (t) {
    case TUNA_DTYPE_BOOL: return 0;
    case TUNA_DTYPE_U8: return 4;
    case TUNA_DTYPE_I8: return 5;
    case TUNA_DTYPE_F8_E5M2: return 6;
    case TUNA_DTYPE_F8_E4M3: return 7;
    case TUNA_DTYPE_I16: return 9;
    case TUNA_DTYPE_U16: return 10;
    case TUNA_DTYPE_F16: return 11;
    case TUNA_DTYPE_BF16: return 12;
    case TUNA_DTYPE_I32: return 13;
    case TUNA_DTYPE_U32: return 14;
    case TUNA_DTYPE_F32: return 15;
    case TUNA_DTYPE_F64: return 17;
    case TUNA_DTYPE_I64: return 18;
    case TUNA_DTYPE_U64: return 19;
    default: return -1;
    }
}

tuna_status tuna_st_writer_new(tuna_st_writer **out)
{
    *out = calloc(1, sizeof **out);
    if (!*out) return tuna_fail_oom("safetensors writer", sizeof **out);
    tuna_strmap_init(&(*out)->names);
    return tuna_st_writer_set_metadata(*out, "format", "pt");
}

void tuna_st_writer_free(tuna_st_writer *w)
{
    if (!w) return;
    for (size_t i = 0; i < w->n; i++) {
        free(w->e[i].name);
        if (w->e[i].owned) free((void *)w->e[i].data);
    }
    free(w->e);
    for (size_t i = 0; i < w->n_meta; i++) {
        free(w->meta_keys[i]);
        free(w->meta_vals[i]);
    }
    free(w->meta_keys);
    free(w->meta_vals);
    tuna_strmap_free(&w->names);
    free(w);
}

tuna_status tuna_st_writer_set_metadata(tuna_st_writer *w, const char *key, const char *value)
{
    for (size_t i = 0; i < w->n_meta; i++) {
        if (!strcmp(w->meta_keys[i], key)) {
            char *v = strdup(value);
            if (!v) return tuna_fail_oom("metadata", strlen(value));
            free(w->meta_vals[i]);
            w->meta_vals[i] = v;
            return TUNA_OK;
        }
    }
    char **nk = realloc(w->meta_keys, (w->n_meta + 1) * sizeof *nk);
    if (!nk) return tuna_fail_oom("metadata", 0);
    w->meta_keys = nk;
    char **nv = realloc(w->meta_vals, (w->n_meta + 1) * sizeof *nv);
    if (!nv) return tuna_fail_oom("metadata", 0);
    w->meta_vals = nv;
    w->meta_keys[w->n_meta] = strdup(key);
    w->meta_vals[w->n_meta] = strdup(value);
    w->n_meta++;
    if (!w->meta_keys[w->n_meta - 1] || !w->meta_vals[w->n_meta - 1]) return tuna_fail_oom("metadata", 0);
    return TUNA_OK;
}

tuna_status tuna_st_writer_add(tuna_st_writer *w, const char *name, enum tuna_dtype dtype, int ndim,
                               const int64_t *shape, const void *data, size_t nbytes, bool copy)
{
    if (official_rank(dtype) < 0)
        return tuna_fail(TUNA_E_INVALID, "tensor \"%s\": dtype %s cannot be stored in safetensors", name,
                         tuna_dtype_name(dtype));
    if (ndim < 0 || ndim > TUNA_MAX_DIMS)
        return tuna_fail(TUNA_E_INVALID, "tensor \"%s\": %d dimensions", name, ndim);
    if (!strcmp(name, "__metadata__"))
        return tuna_fail(TUNA_E_INVALID, "a tensor cannot be named __metadata__");
    uint64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return tuna_fail(TUNA_E_INVALID, "tensor \"%s\": negative dimension", name);
        numel *= (uint64_t)shape[i];
    }
    if (tuna_dtype_nbytes(dtype, numel) != nbytes)
        return tuna_fail(TUNA_E_INVALID, "tensor \"%s\": %zu bytes given for %llu elements of %s", name, nbytes,
                         (unsigned long long)numel, tuna_dtype_name(dtype));
    bool existed = false;
    if (!tuna_strmap_puts(&w->names, name, (int64_t)w->n, &existed)) return tuna_fail_oom("tensor names", 64);
    if (existed) return tuna_fail(TUNA_E_INVALID, "tensor \"%s\" added twice", name);
    if (w->n == w->cap) {
        size_t nc = w->cap ? w->cap * 2 : 64;
        struct st_entry *ne = realloc(w->e, nc * sizeof *ne);
        if (!ne) return tuna_fail_oom("tensor table", nc * sizeof *ne);
        w->e = ne;
        w->cap = nc;
    }
    struct st_entry *e = &w->e[w->n];
    memset(e, 0, sizeof *e);
    e->name = strdup(name);
    if (!e->name) return tuna_fail_oom("tensor name", strlen(name));
    e->dtype = dtype;
    e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    e->nbytes = nbytes;
    e->order = w->n;
    if (copy && nbytes) {
        void *c = malloc(nbytes);
        if (!c) {
            free(e->name);
            return tuna_fail_oom(name, nbytes);
        }
        memcpy(c, data, nbytes);
        e->data = c;
        e->owned = true;
    } else {
        e->data = data;
    }
    w->n++;
    return TUNA_OK;
}

static int cmp_official(const void *a, const void *b)
{
    const struct st_entry *x = *(const struct st_entry *const *)a, *y = *(const struct st_entry *const *)b;
    int rx = official_rank(x->dtype), ry = official_rank(y->dtype);
    if (rx != ry) return ry - rx; /* descending dtype */
    return strcmp(x->name, y->name);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Writes entries list[0..n) (already in file order) to path. */
static tuna_status write_file(tuna_st_writer *w, struct st_entry **list, size_t n, const char *path)
{
    struct tuna_strbuf h = {0};
    tuna_sb_put(&h, "{", 1);
    if (w->n_meta) {
        /* metadata keys sorted, for a reproducible header */
        char **keys = malloc(w->n_meta * sizeof *keys);
        if (!keys) return tuna_fail_oom("metadata", 0);
        memcpy(keys, w->meta_keys, w->n_meta * sizeof *keys);
        qsort(keys, w->n_meta, sizeof *keys, cmp_str);
        tuna_sb_put(&h, "\"__metadata__\":{", 16);
        for (size_t i = 0; i < w->n_meta; i++) {
            size_t j = 0;
            while (strcmp(w->meta_keys[j], keys[i])) j++;
            if (i) tuna_sb_put(&h, ",", 1);
            tuna_sb_json_string(&h, w->meta_keys[j]);
            tuna_sb_put(&h, ":", 1);
            tuna_sb_json_string(&h, w->meta_vals[j]);
        }
        tuna_sb_put(&h, "}", 1);
        free(keys);
    }
    unsigned long long off = 0;
    for (size_t i = 0; i < n; i++) {
        const struct st_entry *e = list[i];
        if (i || w->n_meta) tuna_sb_put(&h, ",", 1);
        tuna_sb_json_string(&h, e->name);
        tuna_sb_put(&h, ":{\"dtype\":", 10);
        tuna_sb_json_string(&h, tuna_dtype_name(e->dtype));
        tuna_sb_put(&h, ",\"shape\":[", 10);
        for (int d = 0; d < e->ndim; d++) {
            if (d) tuna_sb_put(&h, ",", 1);
            tuna_sb_u64(&h, (unsigned long long)e->shape[d]);
        }
        tuna_sb_put(&h, "],\"data_offsets\":[", 18);
        tuna_sb_u64(&h, off);
        tuna_sb_put(&h, ",", 1);
        off += e->nbytes;
        tuna_sb_u64(&h, off);
        tuna_sb_put(&h, "]}", 2);
    }
    tuna_sb_put(&h, "}", 1);
    while (!h.oom && h.len % 8) tuna_sb_put(&h, " ", 1);
    if (h.oom) {
        free(h.p);
        return tuna_fail_oom("safetensors header", h.cap);
    }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((unsigned long long)h.len >> (8 * i));
    struct tuna_atomic_file af;
    tuna_status s = tuna_atomic_file_begin(path, &af);
    if (!s) s = tuna_atomic_file_write(&af, len8, 8);
    if (!s) s = tuna_atomic_file_write(&af, h.p, h.len);
    for (size_t i = 0; i < n && !s; i++) s = tuna_atomic_file_write(&af, list[i]->data, list[i]->nbytes);
    free(h.p);
    if (s) {
        tuna_atomic_file_abort(&af);
        return s;
    }
    return tuna_atomic_file_commit(&af);
}

static int cmp_entry_name(const void *a, const void *b)
{
    return strcmp((*(const struct st_entry *const *)a)->name, (*(const struct st_entry *const *)b)->name);
}

static struct st_entry **sorted_entries(tuna_st_writer *w, size_t from, size_t to)
{
    struct st_entry **list = malloc((to - from + 1) * sizeof *list);
    if (!list) return NULL;
    for (size_t i = from; i < to; i++) list[i - from] = &w->e[i];
    qsort(list, to - from, sizeof *list, cmp_official);
    return list;
}

tuna_status tuna_st_writer_save(tuna_st_writer *w, const char *path)
{
    struct st_entry **list = sorted_entries(w, 0, w->n);
    if (!list) return tuna_fail_oom("tensor list", w->n * sizeof *list);
    tuna_status s = write_file(w, list, w->n, path);
    free(list);
    return s;
}

tuna_status tuna_st_writer_save_dir(tuna_st_writer *w, const char *dir, const char *prefix,
                                    uint64_t max_shard_bytes)
{
    char name[600];
    uint64_t total = 0;
    for (size_t i = 0; i < w->n; i++) total += w->e[i].nbytes;
    if (max_shard_bytes == 0 || total <= max_shard_bytes) {
        snprintf(name, sizeof name, "%s.safetensors", prefix);
        char *path = tuna_path_join(dir, name);
        if (!path) return tuna_fail_oom("path", strlen(dir));
        tuna_status s = tuna_st_writer_save(w, path);
        free(path);
        return s;
    }
    /* greedy shards in insertion order: [start[k], start[k+1]) */
    size_t *start = malloc((w->n + 2) * sizeof *start);
    if (!start) return tuna_fail_oom("shard plan", w->n);
    size_t n_shards = 0;
    uint64_t cur = 0;
    for (size_t i = 0; i < w->n; i++) {
        if (i == 0 || (cur > 0 && cur + w->e[i].nbytes > max_shard_bytes)) {
            start[n_shards++] = i;
            cur = 0;
        }
        cur += w->e[i].nbytes;
    }
    start[n_shards] = w->n;
    tuna_status s = TUNA_OK;
    cJSON *index = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(index, "metadata");
    cJSON_AddNumberToObject(meta, "total_size", (double)total);
    cJSON *wm = cJSON_AddObjectToObject(index, "weight_map");
    /* weight_map sorted by tensor name, as transformers writes it */
    struct st_entry **by_name = malloc((w->n + 1) * sizeof *by_name);
    char **shard_of = calloc(w->n + 1, sizeof *shard_of);
    if (!index || !wm || !by_name || !shard_of) s = tuna_fail_oom("shard index", w->n);
    for (size_t k = 0; k < n_shards && !s; k++) {
        snprintf(name, sizeof name, "%s-%05zu-of-%05zu.safetensors", prefix, k + 1, n_shards);
        for (size_t i = start[k]; i < start[k + 1]; i++) shard_of[i] = strdup(name);
        char *path = tuna_path_join(dir, name);
        struct st_entry **list = sorted_entries(w, start[k], start[k + 1]);
        if (!path || !list) s = tuna_fail_oom("shard", 0);
        else s = write_file(w, list, start[k + 1] - start[k], path);
        free(path);
        free(list);
    }
    if (!s) {
        for (size_t i = 0; i < w->n; i++) by_name[i] = &w->e[i];
        qsort(by_name, w->n, sizeof *by_name, cmp_entry_name);
        for (size_t i = 0; i < w->n; i++) {
            size_t idx = (size_t)(by_name[i] - w->e);
            cJSON_AddStringToObject(wm, by_name[i]->name, shard_of[idx] ? shard_of[idx] : "");
        }
        snprintf(name, sizeof name, "%s.safetensors.index.json", prefix);
        char *path = tuna_path_join(dir, name);
        s = path ? tuna_json_save(path, index) : tuna_fail_oom("path", 0);
        free(path);
    }
    for (size_t i = 0; i < w->n && shard_of; i++) free(shard_of[i]);
    free(shard_of);
    free(by_name);
    free(start);
    cJSON_Delete(index);
    return s;
}
