/* reader.c — validating GGUF reader over an mmap'd file (or a caller's buffer).
 * Spec: docs/FORMATS.md §7.1. Owns the mapping, the kv and tensor tables and their names.
 *
 * Every read goes through a cursor that checks the bytes left first; counts are bounded by
 * what the remaining bytes could hold before anything is allocated, so a file claiming 2^60
 * tensors fails with a message instead of an allocation of that size.
 */
#include "gguf/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/status.h"
#include "core/strmap.h"
#include "gguf/quants.h"

struct tuna_gguf {
    char *path;
    const uint8_t *base;
    size_t size;
    bool mapped;
    uint32_t version;
    uint32_t alignment;
    struct tuna_gguf_kv *kv;
    size_t nkv;
    struct tuna_gguf_tensor *t;
    size_t nt;
    struct tuna_strmap kv_map, t_map;
};

struct cur {
    const uint8_t *p;
    size_t pos, size;
    const char *what;
};

static const size_t k_vsize[TUNA_GGUF_VTYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
static const char *const k_vname[TUNA_GGUF_VTYPE_COUNT] = {"uint8", "int8", "uint16", "int16", "uint32",
                                                           "int32", "float32", "bool", "string", "array",
                                                           "uint64", "int64", "float64"};

const char *tuna_gguf_vtype_name(uint32_t t) { return t < TUNA_GGUF_VTYPE_COUNT ? k_vname[t] : "invalid"; }

static tuna_status truncated(const struct cur *c, size_t need, const char *item)
{
    return tuna_fail(TUNA_E_FORMAT,
                     "%s: truncated GGUF: %s needs %zu bytes at offset %zu but the file has %zu bytes left "
                     "(the file is incomplete: download or export it again)",
                     c->what, item, need, c->pos, c->size - c->pos);
}

static tuna_status rd(struct cur *c, void *dst, size_t n, const char *item)
{
    if (c->size - c->pos < n) {
        memset(dst, 0, n); /* every path writes dst (keeps -O3's uninitialized analysis quiet) */
        return truncated(c, n, item);
    }
    memcpy(dst, c->p + c->pos, n);
    c->pos += n;
    return TUNA_OK;
}

static tuna_status rd_u32(struct cur *c, uint32_t *v, const char *item) { return rd(c, v, 4, item); }
static tuna_status rd_u64(struct cur *c, uint64_t *v, const char *item) { return rd(c, v, 8, item); }

/* A string: u64 length + bytes. The view points into the buffer. */
static tuna_status rd_str(struct cur *c, struct tuna_gguf_str *s, const char *item)
{
    size_t at = c->pos;
    s->p = NULL;
    tuna_status st = rd_u64(c, &s->len, item);
    if (st) return st;
    if (s->len > c->size - c->pos)
        return tuna_fail(TUNA_E_FORMAT,
                         "%s: %s at offset %zu claims a length of %" PRIu64 " bytes but only %zu bytes are left "
                         "(corrupt or truncated file)",
                         c->what, item, at, s->len, c->size - c->pos);
    s->p = (const char *)c->p + c->pos;
    c->pos += (size_t)s->len;
    return TUNA_OK;
}

static char *dup_str(const struct tuna_gguf_str *s)
{
    char *r = malloc((size_t)s->len + 1);
    if (!r) return NULL;
    memcpy(r, s->p, (size_t)s->len);
    r[s->len] = '\0';
    return r;
}

void tuna_gguf_close(tuna_gguf *g)
{
    if (!g) return;
    for (size_t i = 0; i < g->nkv; i++) {
        free((char *)g->kv[i].key);
        free(g->kv[i].strs);
    }
    free(g->kv);
    for (size_t i = 0; i < g->nt; i++) free((char *)g->t[i].name);
    free(g->t);
    tuna_strmap_free(&g->kv_map);
    tuna_strmap_free(&g->t_map);
    if (g->mapped && g->base) munmap((void *)g->base, g->size);
    free(g->path);
    free(g);
}

static tuna_status parse_kv(tuna_gguf *g, struct cur *c, struct tuna_gguf_kv *kv, uint64_t index)
{
    struct tuna_gguf_str key = {0};
    char item[96];
    snprintf(item, sizeof item, "key of metadata entry %" PRIu64, index);
    size_t key_at = c->pos;
    tuna_status st = rd_str(c, &key, item);
    if (st) return st;
    if (key.len == 0 || key.len > 65535 || memchr(key.p, 0, (size_t)key.len))
        return tuna_fail(TUNA_E_FORMAT, "%s: metadata entry %" PRIu64 " at offset %zu has an invalid key (%s)", c->what,
                         index, key_at, key.len == 0 ? "empty" : key.len > 65535 ? "longer than 65535 bytes" : "holds NUL");
    if (!(kv->key = dup_str(&key))) return tuna_fail_oom("gguf key", (size_t)key.len + 1);
    bool existed = false;
    if (!tuna_strmap_put(&g->kv_map, kv->key, (size_t)key.len, (int64_t)index, &existed))
        return tuna_fail_oom("gguf key map", 0);
    if (existed)
        return tuna_fail(TUNA_E_FORMAT, "%s: duplicate metadata key '%s' (entry %" PRIu64 " at offset %zu)", c->what,
                         kv->key, index, key_at);
    uint32_t type;
    if ((st = rd_u32(c, &type, "metadata value type"))) return st;
    if (type >= TUNA_GGUF_VTYPE_COUNT)
        return tuna_fail(TUNA_E_FORMAT, "%s: metadata key '%s' has value type %u at offset %zu; valid types are 0..12",
                         c->what, kv->key, type, c->pos - 4);
    kv->type = (enum tuna_gguf_vtype)type;
    kv->n = 1;
    uint32_t et = type;
    if (type == TUNA_GGUF_ARRAY) {
        if ((st = rd_u32(c, &et, "array element type"))) return st;
        if (et >= TUNA_GGUF_VTYPE_COUNT || et == TUNA_GGUF_ARRAY)
            return tuna_fail(TUNA_E_FORMAT, "%s: metadata array '%s' has element type %u at offset %zu (%s)", c->what,
                             kv->key, et, c->pos - 4, et == TUNA_GGUF_ARRAY ? "nested arrays are not supported" : "valid types are 0..12");
        kv->arr_type = (enum tuna_gguf_vtype)et;
        if ((st = rd_u64(c, &kv->n, "array length"))) return st;
    }
    kv->data = c->p + c->pos;
    if (et == TUNA_GGUF_STRING) {
        /* each string needs at least its 8-byte length: bound n before allocating */
        if (kv->n > (c->size - c->pos) / 8)
            return tuna_fail(TUNA_E_FORMAT, "%s: metadata '%s' claims %" PRIu64 " strings at offset %zu but only %zu bytes are left",
                             c->what, kv->key, kv->n, c->pos, c->size - c->pos);
        kv->strs = malloc((size_t)(kv->n ? kv->n : 1) * sizeof *kv->strs);
        if (!kv->strs) return tuna_fail_oom("gguf string array", (size_t)kv->n * sizeof *kv->strs);
        for (uint64_t i = 0; i < kv->n; i++) {
            snprintf(item, sizeof item, "string %" PRIu64 " of '%.40s'", i, kv->key);
            if ((st = rd_str(c, &kv->strs[i], item))) return st;
        }
        return TUNA_OK;
    }
    size_t es = k_vsize[et];
    if (kv->n > (c->size - c->pos) / es)
        return tuna_fail(TUNA_E_FORMAT, "%s: metadata '%s' claims %" PRIu64 " %s values at offset %zu but only %zu bytes are left",
                         c->what, kv->key, kv->n, k_vname[et], c->pos, c->size - c->pos);
    if (et == TUNA_GGUF_BOOL)
        for (uint64_t i = 0; i < kv->n; i++)
            if (kv->data[i] > 1)
                return tuna_fail(TUNA_E_FORMAT, "%s: metadata '%s' holds bool byte %u at offset %zu (must be 0 or 1)",
                                 c->what, kv->key, kv->data[i], c->pos + (size_t)i);
    c->pos += (size_t)kv->n * es;
    return TUNA_OK;
}

static tuna_status parse_tensor(tuna_gguf *g, struct cur *c, struct tuna_gguf_tensor *t, uint64_t index)
{
    struct tuna_gguf_str name;
    char item[64];
    snprintf(item, sizeof item, "name of tensor %" PRIu64, index);
    size_t at = c->pos;
    tuna_status st = rd_str(c, &name, item);
    if (st) return st;
    if (name.len == 0 || name.len >= TUNA_GGUF_MAX_NAME || memchr(name.p, 0, (size_t)name.len))
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor %" PRIu64 " at offset %zu has an invalid name (%" PRIu64
                         " bytes; names are 1..%d bytes without NUL)",
                         c->what, index, at, name.len, TUNA_GGUF_MAX_NAME - 1);
    if (!(t->name = dup_str(&name))) return tuna_fail_oom("gguf tensor name", (size_t)name.len + 1);
    bool existed = false;
    if (!tuna_strmap_put(&g->t_map, t->name, (size_t)name.len, (int64_t)index, &existed))
        return tuna_fail_oom("gguf tensor map", 0);
    if (existed) return tuna_fail(TUNA_E_FORMAT, "%s: duplicate tensor name '%s' (tensor %" PRIu64 ")", c->what, t->name, index);
    uint32_t nd;
    if ((st = rd_u32(c, &nd, "tensor dimension count"))) return st;
    if (nd > TUNA_GGUF_MAX_DIMS)
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s' has %u dimensions (at most %d)", c->what, t->name, nd, TUNA_GGUF_MAX_DIMS);
    t->n_dims = (int)nd;
    uint64_t nel = 1;
    for (int d = 0; d < TUNA_GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < nd; d++) {
        uint64_t v;
        if ((st = rd_u64(c, &v, "tensor dimension"))) return st;
        if (v > (uint64_t)INT64_MAX || (v && nel > (uint64_t)INT64_MAX / v))
            return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s': dimension %u (%" PRIu64 ") makes the element count overflow",
                             c->what, t->name, d, v);
        t->ne[d] = (int64_t)v;
        nel *= v;
    }
    t->nelements = nel;
    if ((st = rd_u32(c, &t->type, "tensor type"))) return st;
    int64_t blck;
    size_t bb;
    if (!tuna_ggml_type_size(t->type, &blck, &bb))
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s' has unknown ggml type id %u", c->what, t->name, t->type);
    if (t->ne[0] % blck)
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s' (%s): ne[0] = %" PRId64 " is not a multiple of the block size %" PRId64,
                         c->what, t->name, tuna_ggml_type_name(t->type), t->ne[0], blck);
    /* nbytes = (ne0/blck)*bb * ne1*ne2*ne3, checked */
    uint64_t nb = (uint64_t)(t->ne[0] / blck);
    if (bb && nb > SIZE_MAX / bb) goto overflow;
    uint64_t bytes = nb * bb;
    for (int d = 1; d < TUNA_GGUF_MAX_DIMS; d++) {
        if (t->ne[d] && bytes > SIZE_MAX / (uint64_t)t->ne[d]) goto overflow;
        bytes *= (uint64_t)t->ne[d];
    }
    t->nbytes = (size_t)bytes;
    if ((st = rd_u64(c, &t->offset, "tensor data offset"))) return st;
    return TUNA_OK;
overflow:
    return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s': its byte size overflows", c->what, t->name);
}

static tuna_status parse(tuna_gguf *g)
{
    struct cur c = {g->base, 0, g->size, g->path};
    uint32_t magic, version;
    uint64_t nt, nkv;
    tuna_status st;
    if (g->size < 4 || memcmp(g->base, "GGUF", 4) != 0) {
        if (g->size >= 4 && (memcmp(g->base, "ggjt", 4) == 0 || memcmp(g->base, "tjgg", 4) == 0 ||
                             memcmp(g->base, "ggml", 4) == 0 || memcmp(g->base, "lmgg", 4) == 0))
            return tuna_fail(TUNA_E_UNSUPPORTED, "%s: this is a pre-GGUF ggml/ggjt file; convert it to GGUF with llama.cpp",
                             g->path);
        return tuna_fail(TUNA_E_FORMAT, "%s: not a GGUF file (the first 4 bytes are not \"GGUF\")", g->path);
    }
    c.pos = 4;
    (void)magic;
    if ((st = rd_u32(&c, &version, "version"))) return st;
    if (version == 1)
        return tuna_fail(TUNA_E_UNSUPPORTED,
                         "%s: GGUF version 1 (2023, 32-bit counts) is not supported; re-convert the model with a current "
                         "llama.cpp (convert_hf_to_gguf.py) or tuna export gguf",
                         g->path);
    if (version != 2 && version != 3) {
        if ((version & 0xFFFF) == 0 && version >> 24 && (version >> 24) <= 3)
            return tuna_fail(TUNA_E_UNSUPPORTED, "%s: big-endian GGUF (version bytes %08x) is not supported", g->path, version);
        return tuna_fail(TUNA_E_UNSUPPORTED, "%s: GGUF version %u; tuna reads versions 2 and 3", g->path, version);
    }
    g->version = version;
    if ((st = rd_u64(&c, &nt, "tensor count")) || (st = rd_u64(&c, &nkv, "metadata count"))) return st;
    /* a metadata entry takes at least 8+1+4+1 bytes, a tensor info at least 8+1+4+4+8 */
    if (nkv > (c.size - c.pos) / 14)
        return tuna_fail(TUNA_E_FORMAT, "%s: header claims %" PRIu64 " metadata entries; %zu bytes cannot hold that many",
                         g->path, nkv, c.size - c.pos);
    if (nt > (c.size - c.pos) / 25)
        return tuna_fail(TUNA_E_FORMAT, "%s: header claims %" PRIu64 " tensors; %zu bytes cannot hold that many", g->path,
                         nt, c.size - c.pos);
    g->kv = calloc((size_t)(nkv ? nkv : 1), sizeof *g->kv);
    g->t = calloc((size_t)(nt ? nt : 1), sizeof *g->t);
    if (!g->kv || !g->t) return tuna_fail_oom("gguf tables", 0);
    for (uint64_t i = 0; i < nkv; i++) {
        g->nkv = (size_t)i + 1;
        if ((st = parse_kv(g, &c, &g->kv[i], i))) return st;
    }
    g->alignment = TUNA_GGUF_DEFAULT_ALIGNMENT;
    const struct tuna_gguf_kv *al = tuna_gguf_find(g, "general.alignment");
    if (al) {
        uint32_t a = 0;
        if (al->type != TUNA_GGUF_UINT32 || (memcpy(&a, al->data, 4), a == 0) || (a & (a - 1)))
            return tuna_fail(TUNA_E_FORMAT, "%s: general.alignment must be a uint32 power of two (found %s %u)", g->path,
                             k_vname[al->type], al->type == TUNA_GGUF_UINT32 ? a : 0);
        g->alignment = a;
    }
    for (uint64_t i = 0; i < nt; i++) {
        g->nt = (size_t)i + 1;
        if ((st = parse_tensor(g, &c, &g->t[i], i))) return st;
    }
    if (nt == 0) return TUNA_OK; /* vocab-only files may end right after the header */
    size_t data_start = c.pos + (g->alignment - c.pos % g->alignment) % g->alignment;
    if (data_start > g->size)
        return tuna_fail(TUNA_E_FORMAT, "%s: truncated GGUF: the data section would start at %zu, past the end (%zu bytes)",
                         g->path, data_start, g->size);
    size_t avail = g->size - data_start;
    uint64_t expect = 0;
    for (size_t i = 0; i < g->nt; i++) {
        struct tuna_gguf_tensor *t = &g->t[i];
        if (t->offset % g->alignment)
            return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s' data offset %" PRIu64 " is not a multiple of the alignment %u",
                             g->path, t->name, t->offset, g->alignment);
        if (t->offset != expect)
            return tuna_fail(TUNA_E_FORMAT,
                             "%s: tensor '%s' data offset %" PRIu64 ", expected %" PRIu64
                             " (tensors must be stored in info order, each padded to %u bytes)",
                             g->path, t->name, t->offset, expect, g->alignment);
        if (t->offset > avail || t->nbytes > avail - t->offset)
            return tuna_fail(TUNA_E_FORMAT,
                             "%s: tensor '%s' (%zu bytes at data offset %" PRIu64 ") runs past the end of the file "
                             "(data section holds %zu bytes): the file is truncated or corrupt",
                             g->path, t->name, t->nbytes, t->offset, avail);
        t->data = g->base + data_start + t->offset;
        uint64_t padded = (uint64_t)t->nbytes + (g->alignment - t->nbytes % g->alignment) % g->alignment;
        expect = t->offset + padded;
    }
    return TUNA_OK;
}

static tuna_status open_common(tuna_gguf *g, tuna_gguf **out)
{
    tuna_status st = parse(g);
    if (st) {
        tuna_gguf_close(g);
        return st;
    }
    *out = g;
    return TUNA_OK;
}

static tuna_gguf *new_g(const char *what)
{
    tuna_gguf *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    tuna_strmap_init(&g->kv_map);
    tuna_strmap_init(&g->t_map);
    g->path = strdup(what ? what : "(buffer)");
    if (!g->path) {
        free(g);
        return NULL;
    }
    return g;
}

tuna_status tuna_gguf_open_buffer(const void *data, size_t len, const char *what, tuna_gguf **out)
{
    *out = NULL;
    tuna_gguf *g = new_g(what);
    if (!g) return tuna_fail_oom("gguf", sizeof *g);
    g->base = data;
    g->size = len;
    return open_common(g, out);
}

tuna_status tuna_gguf_open(const char *path, tuna_gguf **out)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return tuna_fail(errno == ENOENT ? TUNA_E_NOT_FOUND : TUNA_E_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return tuna_fail(TUNA_E_IO, "%s is not a regular file", path);
    }
    tuna_gguf *g = new_g(path);
    if (!g) {
        close(fd);
        return tuna_fail_oom("gguf", sizeof *g);
    }
    g->size = (size_t)sb.st_size;
    if (g->size) {
        void *m = mmap(NULL, g->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            tuna_gguf_close(g);
            return tuna_fail(TUNA_E_IO, "cannot map %s: %s", path, strerror(e));
        }
        g->base = m;
        g->mapped = true;
    } else {
        g->base = (const uint8_t *)"";
    }
    close(fd);
    return open_common(g, out);
}

uint32_t tuna_gguf_version(const tuna_gguf *g) { return g->version; }
uint32_t tuna_gguf_alignment(const tuna_gguf *g) { return g->alignment; }
const char *tuna_gguf_path(const tuna_gguf *g) { return g->path; }
size_t tuna_gguf_kv_count(const tuna_gguf *g) { return g->nkv; }
const struct tuna_gguf_kv *tuna_gguf_kv_at(const tuna_gguf *g, size_t i) { return i < g->nkv ? &g->kv[i] : NULL; }
size_t tuna_gguf_tensor_count(const tuna_gguf *g) { return g->nt; }
const struct tuna_gguf_tensor *tuna_gguf_tensor_at(const tuna_gguf *g, size_t i) { return i < g->nt ? &g->t[i] : NULL; }

const struct tuna_gguf_kv *tuna_gguf_find(const tuna_gguf *g, const char *key)
{
    int64_t i;
    return tuna_strmap_gets(&g->kv_map, key, &i) ? &g->kv[i] : NULL;
}

const struct tuna_gguf_tensor *tuna_gguf_find_tensor(const tuna_gguf *g, const char *name)
{
    int64_t i;
    return tuna_strmap_gets(&g->t_map, name, &i) ? &g->t[i] : NULL;
}

/* ---------------- typed getters ---------------- */

static double num_at(enum tuna_gguf_vtype t, const uint8_t *p)
{
    union {
        uint8_t u8;
        int8_t i8;
        uint16_t u16;
        int16_t i16;
        uint32_t u32;
        int32_t i32;
        float f32;
        uint64_t u64;
        int64_t i64;
        double f64;
    } v;
    memcpy(&v, p, k_vsize[t] ? k_vsize[t] : 1);
    switch (t) {
    case TUNA_GGUF_UINT8: return v.u8;
    case TUNA_GGUF_INT8: return v.i8;
    case TUNA_GGUF_UINT16: return v.u16;
    case TUNA_GGUF_INT16: return v.i16;
    case TUNA_GGUF_UINT32: return v.u32;
    case TUNA_GGUF_INT32: return v.i32;
    case TUNA_GGUF_FLOAT32: return v.f32;
    case TUNA_GGUF_BOOL: return v.u8;
    case TUNA_GGUF_UINT64: return (double)v.u64;
    case TUNA_GGUF_INT64: return (double)v.i64;
    case TUNA_GGUF_FLOAT64: return v.f64;
    default: return 0;
    }
}

double tuna_gguf_arr_num(const struct tuna_gguf_kv *kv, uint64_t i)
{
    enum tuna_gguf_vtype t = kv->type == TUNA_GGUF_ARRAY ? kv->arr_type : kv->type;
    if (t == TUNA_GGUF_STRING || t >= TUNA_GGUF_VTYPE_COUNT || i >= kv->n) return 0;
    return num_at(t, kv->data + i * k_vsize[t]);
}

static tuna_status want(const tuna_gguf *g, const char *key, const struct tuna_gguf_kv **kv)
{
    *kv = tuna_gguf_find(g, key);
    if (!*kv) return tuna_fail(TUNA_E_NOT_FOUND, "%s: metadata key '%s' is missing", g->path, key);
    return TUNA_OK;
}

static tuna_status wrong(const tuna_gguf *g, const struct tuna_gguf_kv *kv, const char *expected)
{
    return tuna_fail(TUNA_E_FORMAT, "%s: metadata key '%s' has type %s, expected %s", g->path, kv->key,
                     k_vname[kv->type], expected);
}

static bool is_int(enum tuna_gguf_vtype t)
{
    return t <= TUNA_GGUF_INT32 || t == TUNA_GGUF_UINT64 || t == TUNA_GGUF_INT64;
}

tuna_status tuna_gguf_get_i64(const tuna_gguf *g, const char *key, int64_t *v)
{
    const struct tuna_gguf_kv *kv;
    tuna_status st = want(g, key, &kv);
    if (st) return st;
    if (!is_int(kv->type)) return wrong(g, kv, "an integer");
    if (kv->type == TUNA_GGUF_UINT64) {
        uint64_t u;
        memcpy(&u, kv->data, 8);
        if (u > (uint64_t)INT64_MAX) return tuna_fail(TUNA_E_RANGE, "%s: '%s' = %" PRIu64 " is too large", g->path, key, u);
        *v = (int64_t)u;
    } else if (kv->type == TUNA_GGUF_INT64) {
        memcpy(v, kv->data, 8);
    } else {
        *v = (int64_t)num_at(kv->type, kv->data);
    }
    return TUNA_OK;
}

tuna_status tuna_gguf_get_u32(const tuna_gguf *g, const char *key, uint32_t *v)
{
    int64_t x = 0;
    tuna_status st = tuna_gguf_get_i64(g, key, &x);
    if (st) return st;
    if (x < 0 || x > (int64_t)UINT32_MAX)
        return tuna_fail(TUNA_E_RANGE, "%s: '%s' = %" PRId64 " is outside 0..4294967295", g->path, key, x);
    *v = (uint32_t)x;
    return TUNA_OK;
}

tuna_status tuna_gguf_get_f32(const tuna_gguf *g, const char *key, float *v)
{
    const struct tuna_gguf_kv *kv;
    tuna_status st = want(g, key, &kv);
    if (st) return st;
    if (kv->type != TUNA_GGUF_FLOAT32 && kv->type != TUNA_GGUF_FLOAT64) return wrong(g, kv, "float32");
    *v = (float)num_at(kv->type, kv->data);
    return TUNA_OK;
}

tuna_status tuna_gguf_get_bool(const tuna_gguf *g, const char *key, bool *v)
{
    const struct tuna_gguf_kv *kv;
    tuna_status st = want(g, key, &kv);
    if (st) return st;
    if (kv->type != TUNA_GGUF_BOOL) return wrong(g, kv, "bool");
    *v = kv->data[0] != 0;
    return TUNA_OK;
}

tuna_status tuna_gguf_get_str(const tuna_gguf *g, const char *key, struct tuna_gguf_str *s)
{
    const struct tuna_gguf_kv *kv;
    tuna_status st = want(g, key, &kv);
    if (st) return st;
    if (kv->type != TUNA_GGUF_STRING) return wrong(g, kv, "string");
    *s = kv->strs[0];
    return TUNA_OK;
}

tuna_status tuna_gguf_get_strdup(const tuna_gguf *g, const char *key, char **out)
{
    struct tuna_gguf_str s = {0};
    *out = NULL;
    tuna_status st = tuna_gguf_get_str(g, key, &s);
    if (st) return st;
    if (memchr(s.p, 0, (size_t)s.len)) return tuna_fail(TUNA_E_FORMAT, "%s: string '%s' holds a NUL byte", g->path, key);
    if (!(*out = dup_str(&s))) return tuna_fail_oom("gguf string", (size_t)s.len + 1);
    return TUNA_OK;
}

tuna_status tuna_gguf_get_arr(const tuna_gguf *g, const char *key, enum tuna_gguf_vtype elem,
                              const struct tuna_gguf_kv **kv)
{
    tuna_status st = want(g, key, kv);
    if (st) return st;
    if ((*kv)->type != TUNA_GGUF_ARRAY || (*kv)->arr_type != elem)
        return tuna_fail(TUNA_E_FORMAT, "%s: metadata key '%s' has type %s%s%s, expected array of %s", g->path, key,
                         k_vname[(*kv)->type], (*kv)->type == TUNA_GGUF_ARRAY ? " of " : "",
                         (*kv)->type == TUNA_GGUF_ARRAY ? k_vname[(*kv)->arr_type] : "", k_vname[elem]);
    return TUNA_OK;
}
