/* writer.c — GGUF v3 writer: metadata and tensors collected in memory, then written in one pass
 * to a temporary file that is renamed into place. Spec: docs/FORMATS.md §7.1.
 * Owns copies of keys, names and metadata payloads; tensor data is taken or borrowed per tensor.
 */
#include "gguf/gguf.h"

#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/status.h"
#include "core/strmap.h"
#include "gguf/quants.h"

struct wkv {
    char *key;
    enum tuna_gguf_vtype type, arr_type;
    uint64_t n;
    uint8_t *payload; /* serialized value bytes after the type (and array header) */
    size_t len;
};

struct wtensor {
    char *name;
    uint32_t type;
    int n_dims;
    int64_t ne[TUNA_GGUF_MAX_DIMS];
    void *data;
    size_t nbytes;
    bool owned;
};

struct tuna_gguf_writer {
    struct wkv *kv;
    size_t nkv, kv_cap;
    struct wtensor *t;
    size_t nt, t_cap;
    struct tuna_strmap keys, names;
};

static const size_t k_es[TUNA_GGUF_VTYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

tuna_status tuna_gguf_writer_new(tuna_gguf_writer **out)
{
    *out = calloc(1, sizeof **out);
    if (!*out) return tuna_fail_oom("gguf writer", sizeof **out);
    tuna_strmap_init(&(*out)->keys);
    tuna_strmap_init(&(*out)->names);
    return TUNA_OK;
}

void tuna_gguf_writer_free(tuna_gguf_writer *w)
{
    if (!w) return;
    for (size_t i = 0; i < w->nkv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].payload);
    }
    for (size_t i = 0; i < w->nt; i++) {
        free(w->t[i].name);
        if (w->t[i].owned) free(w->t[i].data);
    }
    free(w->kv);
    free(w->t);
    tuna_strmap_free(&w->keys);
    tuna_strmap_free(&w->names);
    free(w);
}

/* Appends an entry; payload is taken (freed here on failure). */
static tuna_status add_kv(tuna_gguf_writer *w, const char *key, enum tuna_gguf_vtype type, enum tuna_gguf_vtype arr_type,
                          uint64_t n, uint8_t *payload, size_t len)
{
    size_t kl = strlen(key);
    bool existed = false;
    if (kl == 0 || kl > 65535) {
        free(payload);
        return tuna_fail(TUNA_E_INVALID, "GGUF key '%.40s' must be 1..65535 bytes", key);
    }
    if (tuna_strmap_gets(&w->keys, key, NULL)) {
        free(payload);
        return tuna_fail(TUNA_E_INVALID, "GGUF key '%s' set twice", key);
    }
    if (w->nkv == w->kv_cap) {
        size_t cap = w->kv_cap ? w->kv_cap * 2 : 32;
        struct wkv *nk = realloc(w->kv, cap * sizeof *nk);
        if (!nk) {
            free(payload);
            return tuna_fail_oom("gguf metadata", cap * sizeof *nk);
        }
        w->kv = nk;
        w->kv_cap = cap;
    }
    char *k = strdup(key);
    if (!k || !tuna_strmap_puts(&w->keys, key, (int64_t)w->nkv, &existed)) {
        free(k);
        free(payload);
        return tuna_fail_oom("gguf key", kl);
    }
    w->kv[w->nkv++] = (struct wkv){k, type, arr_type, n, payload, len};
    return TUNA_OK;
}

static tuna_status add_scalar(tuna_gguf_writer *w, const char *key, enum tuna_gguf_vtype t, const void *v)
{
    uint8_t *p = malloc(k_es[t]);
    if (!p) return tuna_fail_oom("gguf value", k_es[t]);
    memcpy(p, v, k_es[t]);
    return add_kv(w, key, t, t, 1, p, k_es[t]);
}

tuna_status tuna_gguf_set_u32(tuna_gguf_writer *w, const char *key, uint32_t v) { return add_scalar(w, key, TUNA_GGUF_UINT32, &v); }
tuna_status tuna_gguf_set_i32(tuna_gguf_writer *w, const char *key, int32_t v) { return add_scalar(w, key, TUNA_GGUF_INT32, &v); }
tuna_status tuna_gguf_set_f32(tuna_gguf_writer *w, const char *key, float v) { return add_scalar(w, key, TUNA_GGUF_FLOAT32, &v); }

tuna_status tuna_gguf_set_bool(tuna_gguf_writer *w, const char *key, bool v)
{
    uint8_t b = v ? 1 : 0;
    return add_scalar(w, key, TUNA_GGUF_BOOL, &b);
}

/* Serializes n strings as (u64 len, bytes)*. */
static tuna_status pack_strs(const char *const *v, size_t n, uint8_t **out, size_t *len)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += 8 + strlen(v[i]);
    uint8_t *p = malloc(total ? total : 1);
    if (!p) return tuna_fail_oom("gguf strings", total);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t l = strlen(v[i]);
        memcpy(p + o, &l, 8);
        memcpy(p + o + 8, v[i], (size_t)l);
        o += 8 + (size_t)l;
    }
    *out = p;
    *len = total;
    return TUNA_OK;
}

tuna_status tuna_gguf_set_str(tuna_gguf_writer *w, const char *key, const char *v)
{
    uint8_t *p = NULL;
    size_t len = 0;
    tuna_status st = pack_strs(&v, 1, &p, &len);
    return st ? st : add_kv(w, key, TUNA_GGUF_STRING, TUNA_GGUF_STRING, 1, p, len);
}

tuna_status tuna_gguf_set_arr_str(tuna_gguf_writer *w, const char *key, const char *const *v, size_t n)
{
    uint8_t *p = NULL;
    size_t len = 0;
    tuna_status st = pack_strs(v, n, &p, &len);
    return st ? st : add_kv(w, key, TUNA_GGUF_ARRAY, TUNA_GGUF_STRING, n, p, len);
}

tuna_status tuna_gguf_set_raw(tuna_gguf_writer *w, const char *key, enum tuna_gguf_vtype type,
                              enum tuna_gguf_vtype arr_type, uint64_t n, const void *payload, size_t len)
{
    enum tuna_gguf_vtype et = type == TUNA_GGUF_ARRAY ? arr_type : type;
    if (type >= TUNA_GGUF_VTYPE_COUNT || et >= TUNA_GGUF_VTYPE_COUNT || et == TUNA_GGUF_STRING || et == TUNA_GGUF_ARRAY ||
        (type != TUNA_GGUF_ARRAY && n != 1) || len != n * k_es[et])
        return tuna_fail(TUNA_E_INVALID, "GGUF key '%s': raw value of type %u/%u with %llu elements in %zu bytes is invalid",
                         key, type, arr_type, (unsigned long long)n, len);
    uint8_t *p = malloc(len ? len : 1);
    if (!p) return tuna_fail_oom("gguf value", len);
    memcpy(p, payload, len);
    return add_kv(w, key, type, et, n, p, len);
}

tuna_status tuna_gguf_set_arr_f32(tuna_gguf_writer *w, const char *key, const float *v, size_t n)
{
    return tuna_gguf_set_raw(w, key, TUNA_GGUF_ARRAY, TUNA_GGUF_FLOAT32, n, v, n * 4);
}

tuna_status tuna_gguf_set_arr_i32(tuna_gguf_writer *w, const char *key, const int32_t *v, size_t n)
{
    return tuna_gguf_set_raw(w, key, TUNA_GGUF_ARRAY, TUNA_GGUF_INT32, n, v, n * 4);
}

tuna_status tuna_gguf_add_tensor(tuna_gguf_writer *w, const char *name, uint32_t type, int n_dims,
                                 const int64_t *ne, void *data, size_t nbytes, bool take)
{
    tuna_status st = TUNA_OK;
    size_t nl = strlen(name);
    int64_t blck;
    size_t bb;
    if (nl == 0 || nl >= TUNA_GGUF_MAX_NAME) {
        st = tuna_fail(TUNA_E_INVALID, "GGUF tensor name '%s' must be 1..%d bytes", name, TUNA_GGUF_MAX_NAME - 1);
        goto fail;
    }
    if (n_dims < 1 || n_dims > TUNA_GGUF_MAX_DIMS || !tuna_ggml_type_size(type, &blck, &bb)) {
        st = tuna_fail(TUNA_E_INVALID, "GGUF tensor '%s': %d dims / type %u not writable", name, n_dims, type);
        goto fail;
    }
    uint64_t rows = 1;
    for (int d = 1; d < n_dims; d++) rows *= (uint64_t)ne[d];
    if (ne[0] <= 0 || ne[0] % blck || tuna_ggml_row_size(type, ne[0]) * rows != nbytes) {
        st = tuna_fail(TUNA_E_INVALID, "GGUF tensor '%s' (%s): ne[0]=%lld must be a multiple of %lld and the data %zu bytes",
                       name, tuna_ggml_type_name(type), (long long)ne[0], (long long)blck, nbytes);
        goto fail;
    }
    if (tuna_strmap_gets(&w->names, name, NULL)) {
        st = tuna_fail(TUNA_E_INVALID, "GGUF tensor '%s' added twice", name);
        goto fail;
    }
    if (w->nt == w->t_cap) {
        size_t cap = w->t_cap ? w->t_cap * 2 : 64;
        struct wtensor *nt = realloc(w->t, cap * sizeof *nt);
        if (!nt) {
            st = tuna_fail_oom("gguf tensors", cap * sizeof *nt);
            goto fail;
        }
        w->t = nt;
        w->t_cap = cap;
    }
    struct wtensor *t = &w->t[w->nt];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name)) || !tuna_strmap_puts(&w->names, name, (int64_t)w->nt, NULL)) {
        free(t->name);
        st = tuna_fail_oom("gguf tensor name", nl);
        goto fail;
    }
    t->type = type;
    t->n_dims = n_dims;
    for (int d = 0; d < TUNA_GGUF_MAX_DIMS; d++) t->ne[d] = d < n_dims ? ne[d] : 1;
    t->data = data;
    t->nbytes = nbytes;
    t->owned = take;
    w->nt++;
    return TUNA_OK;
fail:
    if (take) free(data);
    return st;
}

static tuna_status put(struct tuna_atomic_file *af, const void *p, size_t n) { return tuna_atomic_file_write(af, p, n); }

static tuna_status put_str(struct tuna_atomic_file *af, const char *s)
{
    uint64_t l = strlen(s);
    tuna_status st = put(af, &l, 8);
    return st ? st : put(af, s, (size_t)l);
}

static tuna_status put_zeros(struct tuna_atomic_file *af, size_t n)
{
    static const uint8_t z[64];
    while (n) {
        size_t k = n < sizeof z ? n : sizeof z;
        tuna_status st = put(af, z, k);
        if (st) return st;
        n -= k;
    }
    return TUNA_OK;
}

tuna_status tuna_gguf_writer_save(tuna_gguf_writer *w, const char *path)
{
    uint32_t align = TUNA_GGUF_DEFAULT_ALIGNMENT;
    int64_t ai;
    if (tuna_strmap_gets(&w->keys, "general.alignment", &ai)) {
        const struct wkv *k = &w->kv[ai];
        if (k->type != TUNA_GGUF_UINT32) return tuna_fail(TUNA_E_INVALID, "general.alignment must be uint32");
        memcpy(&align, k->payload, 4);
        if (!align || (align & (align - 1))) return tuna_fail(TUNA_E_INVALID, "general.alignment %u is not a power of two", align);
    }
    struct tuna_atomic_file af;
    tuna_status st = tuna_atomic_file_begin(path, &af);
    if (st) return st;
    uint32_t hdr[2] = {0x46554747u, 3};
    uint64_t counts[2] = {w->nt, w->nkv};
    size_t pos = 24;
    if ((st = put(&af, hdr, 8)) || (st = put(&af, counts, 16))) goto fail;
    for (size_t i = 0; i < w->nkv; i++) {
        const struct wkv *k = &w->kv[i];
        uint32_t t = k->type;
        if ((st = put_str(&af, k->key)) || (st = put(&af, &t, 4))) goto fail;
        pos += 8 + strlen(k->key) + 4;
        if (k->type == TUNA_GGUF_ARRAY) {
            uint32_t et = k->arr_type;
            if ((st = put(&af, &et, 4)) || (st = put(&af, &k->n, 8))) goto fail;
            pos += 12;
        }
        if ((st = put(&af, k->payload, k->len))) goto fail;
        pos += k->len;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < w->nt; i++) {
        const struct wtensor *t = &w->t[i];
        uint32_t nd = (uint32_t)t->n_dims;
        if ((st = put_str(&af, t->name)) || (st = put(&af, &nd, 4))) goto fail;
        for (int d = 0; d < t->n_dims; d++) {
            uint64_t v = (uint64_t)t->ne[d];
            if ((st = put(&af, &v, 8))) goto fail;
        }
        if ((st = put(&af, &t->type, 4)) || (st = put(&af, &off, 8))) goto fail;
        pos += 8 + strlen(t->name) + 4 + 8 * (size_t)t->n_dims + 4 + 8;
        off += t->nbytes + (align - t->nbytes % align) % align;
    }
    if (w->nt && (st = put_zeros(&af, (align - pos % align) % align))) goto fail;
    for (size_t i = 0; i < w->nt; i++) {
        const struct wtensor *t = &w->t[i];
        if ((st = put(&af, t->data, t->nbytes)) || (st = put_zeros(&af, (align - t->nbytes % align) % align))) goto fail;
    }
    return tuna_atomic_file_commit(&af);
fail:
    tuna_atomic_file_abort(&af);
    return st;
}
