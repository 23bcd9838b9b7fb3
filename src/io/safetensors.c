/* safetensors.c — validating mmap reader for one safetensors file.
 *
 * Layout: [u64 LE header length N][N bytes of JSON, padded with spaces][byte buffer].
 * Checks, in order: file ≥ 8 bytes; N ≤ 100 MB; 8 + N ≤ file size; header starts with '{';
 * valid JSON with nothing but spaces after it; no duplicate names; __metadata__ is a
 * string→string map; each tensor has a known dtype, a shape of non-negative integers and
 * data_offsets [begin, end] with begin ≤ end; end − begin = numel × dtype size; sorted by begin
 * the tensors tile the buffer from 0 with no gap or overlap, and the buffer ends exactly at EOF.
 * Only then are views handed out. Sharded folders and the writer are in safetensors_set.c and
 * safetensors_writer.c.
 */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "core/status.h"
#include "core/strmap.h"

struct tuna_st_file {
    char *path;
    int fd;
    const uint8_t *map; /* whole file */
    size_t size;
    struct tuna_tensor_view *tensors; /* [count], in offset order */
    size_t count;
    char **meta_keys, **meta_vals; /* [n_meta] */
    size_t n_meta;
    struct tuna_strmap index; /* name → position in tensors */
};

/* dtypes that are valid in the format but that tuna does not read */
static bool known_unsupported_dtype(const char *s)
{
    static const char *k[] = {"F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4", "F6_E2M3", "F6_E3M2", "C64"};
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
        if (!strcmp(k[i], s)) return true;
    return false;
}

void tuna_st_close(tuna_st_file *f)
{
    if (!f) return;
    for (size_t i = 0; i < f->count; i++) free((char *)f->tensors[i].name);
    free(f->tensors);
    for (size_t i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_vals[i]);
    }
    free(f->meta_keys);
    free(f->meta_vals);
    tuna_strmap_free(&f->index);
    if (f->map) munmap((void *)f->map, f->size);
    if (f->fd >= 0) close(f->fd);
    free(f->path);
    free(f);
}

static int cmp_by_offset(const void *a, const void *b)
{
    const struct tuna_tensor_view *x = a, *y = b;
    const uint8_t *px = x->data, *py = y->data;
    if (px != py) return px < py ? -1 : 1;
    /* equal begins: shorter first, so that an empty tensor before a full one is not an overlap */
    return x->nbytes < y->nbytes ? -1 : (x->nbytes > y->nbytes);
}

static tuna_status parse_metadata(tuna_st_file *f, const cJSON *meta)
{
    if (!cJSON_IsObject(meta))
        return tuna_fail(TUNA_E_FORMAT, "%s: __metadata__ must be an object of strings", f->path);
    size_t n = (size_t)cJSON_GetArraySize(meta);
    f->meta_keys = calloc(n ? n : 1, sizeof *f->meta_keys);
    f->meta_vals = calloc(n ? n : 1, sizeof *f->meta_vals);
    if (!f->meta_keys || !f->meta_vals) return tuna_fail_oom("safetensors metadata", n * sizeof(char *));
    for (const cJSON *m = meta->child; m; m = m->next) {
        if (!cJSON_IsString(m))
            return tuna_fail(TUNA_E_FORMAT, "%s: __metadata__ value of \"%s\" is not a string", f->path, m->string);
        f->meta_keys[f->n_meta] = strdup(m->string);
        f->meta_vals[f->n_meta] = strdup(m->valuestring);
        f->n_meta++;
        if (!f->meta_keys[f->n_meta - 1] || !f->meta_vals[f->n_meta - 1])
            return tuna_fail_oom("safetensors metadata", strlen(m->valuestring));
    }
    return TUNA_OK;
}

/* Fills t from one header entry; data is set to buffer + begin (checked later). */
static tuna_status parse_entry(tuna_st_file *f, const cJSON *e, const uint8_t *buffer, uint64_t buf_len,
                               struct tuna_tensor_view *t)
{
    const char *name = e->string;
    if (!cJSON_IsObject(e))
        return tuna_fail(TUNA_E_FORMAT, "%s: header entry \"%s\" is not an object", f->path, name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt))
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor \"%s\" has no dtype string", f->path, name);
    t->dtype = tuna_dtype_from_name(dt->valuestring);
    if (t->dtype == TUNA_DTYPE_INVALID) {
        if (known_unsupported_dtype(dt->valuestring))
            return tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor \"%s\" has dtype %s, which tuna does not read", f->path,
                             name, dt->valuestring);
        return tuna_fail(TUNA_E_FORMAT,
                         "%s: tensor \"%s\" has unknown dtype \"%s\" (known: F64 F32 F16 BF16 I64 I32 I16 I8 U64 "
                         "U32 U16 U8 BOOL F8_E4M3 F8_E5M2)",
                         f->path, name, dt->valuestring);
    }
    if (!cJSON_IsArray(shape))
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor \"%s\" has no shape array", f->path, name);
    int nd = cJSON_GetArraySize(shape);
    if (nd > TUNA_MAX_DIMS)
        return tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor \"%s\" has %d dimensions (at most %d)", f->path, name, nd,
                         TUNA_MAX_DIMS);
    t->ndim = nd;
    uint64_t numel = 1;
    bool overflow = false;
    int k = 0;
    for (const cJSON *d = shape->child; d; d = d->next, k++) {
        double v = cJSON_IsNumber(d) ? d->valuedouble : -1;
        if (v < 0 || v != (double)(int64_t)v || v > 9.0e15)
            return tuna_fail(TUNA_E_FORMAT, "%s: tensor \"%s\" has a bad dimension %d in its shape", f->path, name, k);
        t->shape[k] = (int64_t)v;
        if (t->shape[k] != 0 && numel > UINT64_MAX / (uint64_t)t->shape[k]) overflow = true;
        numel *= (uint64_t)t->shape[k];
    }
    t->numel = numel;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !cJSON_IsNumber(offs->child) ||
        !cJSON_IsNumber(offs->child->next))
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor \"%s\" needs data_offsets [begin, end]", f->path, name);
    double b = offs->child->valuedouble, en = offs->child->next->valuedouble;
    if (b < 0 || en < 0 || b != (double)(uint64_t)b || en != (double)(uint64_t)en || b > en)
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor \"%s\" has bad data_offsets [%.0f, %.0f]", f->path, name, b, en);
    uint64_t begin = (uint64_t)b, end = (uint64_t)en;
    uint64_t bits = (uint64_t)tuna_dtype_bits(t->dtype);
    if (overflow || (numel && bits > UINT64_MAX / numel) || (numel * bits) % 8 != 0 ||
        (numel * bits) / 8 != end - begin)
        return tuna_fail(TUNA_E_FORMAT,
                         "%s: tensor \"%s\" is %s with %llu elements (%llu bytes) but its byte range [%llu, %llu) "
                         "holds %llu bytes",
                         f->path, name, tuna_dtype_name(t->dtype), (unsigned long long)numel,
                         overflow ? 0ull : (unsigned long long)(numel * bits / 8), (unsigned long long)begin,
                         (unsigned long long)end, (unsigned long long)(end - begin));
    if (end > buf_len)
        return tuna_fail(TUNA_E_FORMAT,
                         "%s: tensor \"%s\" ends at byte %llu of the data, past its end (%llu bytes): the file is "
                         "truncated or its header is wrong",
                         f->path, name, (unsigned long long)end, (unsigned long long)buf_len);
    t->data = buffer + begin;
    t->nbytes = (size_t)(end - begin);
    t->name = strdup(name);
    t->file = f->path;
    if (!t->name) return tuna_fail_oom("tensor name", strlen(name));
    return TUNA_OK;
}

static tuna_status parse_header(tuna_st_file *f, uint64_t n)
{
    const char *hdr = (const char *)f->map + 8;
    const uint8_t *buffer = f->map + 8 + n;
    uint64_t buf_len = f->size - 8 - n;
    if (n < 2 || hdr[0] != '{')
        return tuna_fail(TUNA_E_FORMAT, "%s: the header does not start with '{': this is not a safetensors file",
                         f->path);
    const char *end = NULL;
    cJSON *doc = cJSON_ParseWithLengthOpts(hdr, (size_t)n, &end, 0);
    if (!doc)
        return tuna_fail(TUNA_E_FORMAT, "%s: the header is not valid JSON (stopped at byte %lld of %llu)", f->path,
                         end ? (long long)(end - hdr) : -1ll, (unsigned long long)n);
    tuna_status s = TUNA_OK;
    for (const char *p = end; p && p < hdr + n; p++) {
        if (*p != ' ' && *p != '\0' && *p != '\n' && *p != '\t' && *p != '\r') {
            s = tuna_fail(TUNA_E_FORMAT, "%s: unexpected bytes after the header JSON (at byte %lld)", f->path,
                          (long long)(p - hdr));
            goto out;
        }
    }
    if (!cJSON_IsObject(doc)) {
        s = tuna_fail(TUNA_E_FORMAT, "%s: the header is not a JSON object", f->path);
        goto out;
    }
    size_t n_items = (size_t)cJSON_GetArraySize(doc);
    f->tensors = calloc(n_items ? n_items : 1, sizeof *f->tensors);
    if (!f->tensors) {
        s = tuna_fail_oom("tensor table", n_items * sizeof *f->tensors);
        goto out;
    }
    bool seen_meta = false;
    for (const cJSON *e = doc->child; e; e = e->next) {
        if (!e->string) {
            s = tuna_fail(TUNA_E_FORMAT, "%s: header entry without a name", f->path);
            goto out;
        }
        if (!strcmp(e->string, "__metadata__")) {
            if (seen_meta) {
                s = tuna_fail(TUNA_E_FORMAT, "%s: __metadata__ appears twice", f->path);
                goto out;
            }
            seen_meta = true;
            if ((s = parse_metadata(f, e))) goto out;
            continue;
        }
        bool existed = false;
        if (!tuna_strmap_puts(&f->index, e->string, (int64_t)f->count, &existed)) {
            s = tuna_fail_oom("tensor index", 64);
            goto out;
        }
        if (existed) {
            s = tuna_fail(TUNA_E_FORMAT, "%s: tensor \"%s\" appears twice in the header", f->path, e->string);
            goto out;
        }
        if ((s = parse_entry(f, e, buffer, buf_len, &f->tensors[f->count]))) goto out;
        f->count++;
    }
    /* the tensors must tile the buffer exactly */
    qsort(f->tensors, f->count, sizeof *f->tensors, cmp_by_offset);
    uint64_t pos = 0;
    for (size_t i = 0; i < f->count; i++) {
        const struct tuna_tensor_view *t = &f->tensors[i];
        uint64_t b = (uint64_t)((const uint8_t *)t->data - buffer);
        if (b < pos) {
            s = tuna_fail(TUNA_E_FORMAT, "%s: tensor \"%s\" [%llu, %llu) overlaps tensor \"%s\" that ends at %llu",
                          f->path, t->name, (unsigned long long)b, (unsigned long long)(b + t->nbytes),
                          f->tensors[i - 1].name, (unsigned long long)pos);
            goto out;
        }
        if (b > pos) {
            s = tuna_fail(TUNA_E_FORMAT, "%s: a gap of %llu unused bytes before tensor \"%s\" (at %llu)", f->path,
                          (unsigned long long)(b - pos), t->name, (unsigned long long)b);
            goto out;
        }
        pos = b + t->nbytes;
    }
    if (pos != buf_len) {
        s = tuna_fail(TUNA_E_FORMAT,
                      "%s: %llu trailing bytes after the last tensor (data is %llu bytes, tensors cover %llu)",
                      f->path, (unsigned long long)(buf_len - pos), (unsigned long long)buf_len,
                      (unsigned long long)pos);
        goto out;
    }
    /* positions changed with the sort: rebuild the index */
    for (size_t i = 0; i < f->count; i++) tuna_strmap_puts(&f->index, f->tensors[i].name, (int64_t)i, NULL);
out:
    cJSON_Delete(doc);
    return s;
}

tuna_status tuna_st_open(const char *path, tuna_st_file **out)
{
    *out = NULL;
    tuna_st_file *f = calloc(1, sizeof *f);
    if (!f) return tuna_fail_oom("safetensors file", sizeof *f);
    f->fd = -1;
    tuna_strmap_init(&f->index);
    f->path = strdup(path);
    tuna_status s;
    if (!f->path) {
        s = tuna_fail_oom("path", strlen(path));
        goto fail;
    }
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) {
        s = tuna_fail(TUNA_E_IO, "cannot open %s: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(f->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        s = tuna_fail(TUNA_E_IO, "%s is not a regular file", path);
        goto fail;
    }
    if (st.st_size < 8) {
        s = tuna_fail(TUNA_E_FORMAT, "%s is %lld bytes: too short for a safetensors file (at least 8)", path,
                      (long long)st.st_size);
        goto fail;
    }
    f->size = (size_t)st.st_size;
    void *m = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, f->fd, 0);
    if (m == MAP_FAILED) {
        s = tuna_fail(TUNA_E_IO, "cannot map %s (%zu bytes): %s", path, f->size, strerror(errno));
        goto fail;
    }
    f->map = m;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | f->map[i];
    if (n > TUNA_ST_MAX_HEADER) {
        s = tuna_fail(TUNA_E_FORMAT, "%s: header length %llu is over the 100 MB limit: not a safetensors file?", path,
                      (unsigned long long)n);
        goto fail;
    }
    if (n > f->size - 8) {
        s = tuna_fail(TUNA_E_FORMAT, "%s: header length %llu runs past the end of the file (%zu bytes): truncated?",
                      path, (unsigned long long)n, f->size);
        goto fail;
    }
    if ((s = parse_header(f, n))) goto fail;
    *out = f;
    return TUNA_OK;
fail:
    tuna_st_close(f);
    return s;
}

size_t tuna_st_count(const tuna_st_file *f) { return f->count; }

const struct tuna_tensor_view *tuna_st_at(const tuna_st_file *f, size_t i)
{
    return i < f->count ? &f->tensors[i] : NULL;
}

const struct tuna_tensor_view *tuna_st_find(const tuna_st_file *f, const char *name)
{
    int64_t i;
    if (!tuna_strmap_gets(&f->index, name, &i)) return NULL;
    return &f->tensors[i];
}

const char *tuna_st_metadata(const tuna_st_file *f, const char *key)
{
    for (size_t i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta_keys[i], key)) return f->meta_vals[i];
    return NULL;
}

const char *tuna_st_path(const tuna_st_file *f) { return f->path; }

tuna_status tuna_tensor_to_f32(const struct tuna_tensor_view *t, float *dst)
{
    if (!tuna_convert_to_f32(t->dtype, t->data, dst, (size_t)t->numel))
        return tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor \"%s\" of dtype %s cannot be converted to float32", t->file,
                         t->name, tuna_dtype_name(t->dtype));
    return TUNA_OK;
}
