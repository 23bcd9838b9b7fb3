/* gguf.h — the GGUF container (llama.cpp's model file): a validating mmap reader and a writer.
 *
 * Spec: docs/FORMATS.md §7.1 (header, key/value metadata, tensor infos, aligned data section).
 * The reader never trusts the file: every count, string length, type id, dimension, offset and
 * the alignment is checked with overflow-safe arithmetic before anything is handed out, and
 * each problem is a TUNA_E_FORMAT (or TUNA_E_UNSUPPORTED) naming the file, the byte offset and
 * the item. GGUF v2 and v3 (little-endian) are read; v1 and big-endian files are refused.
 *
 * Ownership: keys, tensor names and the kv/tensor structs are owned by the tuna_gguf; value
 * strings and tensor data point into the mapping. All live until tuna_gguf_close.
 */
#ifndef TUNA_GGUF_H
#define TUNA_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tuna.h"

enum tuna_gguf_vtype {
    TUNA_GGUF_UINT8 = 0,
    TUNA_GGUF_INT8 = 1,
    TUNA_GGUF_UINT16 = 2,
    TUNA_GGUF_INT16 = 3,
    TUNA_GGUF_UINT32 = 4,
    TUNA_GGUF_INT32 = 5,
    TUNA_GGUF_FLOAT32 = 6,
    TUNA_GGUF_BOOL = 7,
    TUNA_GGUF_STRING = 8,
    TUNA_GGUF_ARRAY = 9,
    TUNA_GGUF_UINT64 = 10,
    TUNA_GGUF_INT64 = 11,
    TUNA_GGUF_FLOAT64 = 12,
    TUNA_GGUF_VTYPE_COUNT
};

#define TUNA_GGUF_DEFAULT_ALIGNMENT 32
#define TUNA_GGUF_MAX_NAME 64 /* tensor names are shorter than this (ggml's GGML_MAX_NAME) */
#define TUNA_GGUF_MAX_DIMS 4

struct tuna_gguf_str {
    const char *p; /* not NUL-terminated; into the mapping */
    uint64_t len;
};

struct tuna_gguf_kv {
    const char *key;        /* NUL-terminated, owned */
    enum tuna_gguf_vtype type;
    enum tuna_gguf_vtype arr_type; /* element type when type == ARRAY */
    uint64_t n;             /* array length (1 for scalars) */
    const uint8_t *data;    /* scalar value or first array element (unaligned; use the getters) */
    struct tuna_gguf_str *strs; /* [n] for STRING and ARRAY of STRING, owned */
};

struct tuna_gguf_tensor {
    const char *name;       /* NUL-terminated, owned */
    uint32_t type;          /* ggml type id (gguf/quants.h) */
    int n_dims;
    int64_t ne[TUNA_GGUF_MAX_DIMS]; /* ne[0] fastest varying (PyTorch's last dim); unused dims 1 */
    uint64_t nelements;
    uint64_t offset;        /* relative to the data section */
    const void *data;       /* into the mapping */
    size_t nbytes;
};

typedef struct tuna_gguf tuna_gguf;

/* Maps and validates path. *out is taken by the caller (tuna_gguf_close). */
tuna_status tuna_gguf_open(const char *path, tuna_gguf **out);
/* Parses a buffer the caller keeps alive until close (tests, in-memory files); `what` names it. */
tuna_status tuna_gguf_open_buffer(const void *data, size_t len, const char *what, tuna_gguf **out);
void tuna_gguf_close(tuna_gguf *g); /* accepts NULL */

uint32_t tuna_gguf_version(const tuna_gguf *g);
uint32_t tuna_gguf_alignment(const tuna_gguf *g);
const char *tuna_gguf_path(const tuna_gguf *g);

size_t tuna_gguf_kv_count(const tuna_gguf *g);
const struct tuna_gguf_kv *tuna_gguf_kv_at(const tuna_gguf *g, size_t i);
const struct tuna_gguf_kv *tuna_gguf_find(const tuna_gguf *g, const char *key); /* NULL when absent */

/* Typed getters: TUNA_E_NOT_FOUND when absent; TUNA_E_FORMAT when the value has another type
 * (integers of any width are accepted when the value fits; floats accept FLOAT32/FLOAT64). */
tuna_status tuna_gguf_get_u32(const tuna_gguf *g, const char *key, uint32_t *v);
tuna_status tuna_gguf_get_i64(const tuna_gguf *g, const char *key, int64_t *v);
tuna_status tuna_gguf_get_f32(const tuna_gguf *g, const char *key, float *v);
tuna_status tuna_gguf_get_bool(const tuna_gguf *g, const char *key, bool *v);
/* *s points into the mapping (not NUL-terminated). */
tuna_status tuna_gguf_get_str(const tuna_gguf *g, const char *key, struct tuna_gguf_str *s);
/* A malloc'd NUL-terminated copy (taken by the caller); strings holding NUL are refused. */
tuna_status tuna_gguf_get_strdup(const tuna_gguf *g, const char *key, char **out);
/* An array whose elements have type elem (STRING arrays: use kv->strs). */
tuna_status tuna_gguf_get_arr(const tuna_gguf *g, const char *key, enum tuna_gguf_vtype elem,
                              const struct tuna_gguf_kv **kv);

/* Element i of a numeric array (any integer or float element type) as double. */
double tuna_gguf_arr_num(const struct tuna_gguf_kv *kv, uint64_t i);
/* Name of a value type ("uint32", "array", ...) or "invalid". */
const char *tuna_gguf_vtype_name(uint32_t t);

size_t tuna_gguf_tensor_count(const tuna_gguf *g);
const struct tuna_gguf_tensor *tuna_gguf_tensor_at(const tuna_gguf *g, size_t i);
const struct tuna_gguf_tensor *tuna_gguf_find_tensor(const tuna_gguf *g, const char *name);

/* --- writer --- */
typedef struct tuna_gguf_writer tuna_gguf_writer;

tuna_status tuna_gguf_writer_new(tuna_gguf_writer **out);
void tuna_gguf_writer_free(tuna_gguf_writer *w);

/* Metadata, written in the order set. A key set twice is refused (TUNA_E_INVALID). Strings are
 * copied. */
tuna_status tuna_gguf_set_u32(tuna_gguf_writer *w, const char *key, uint32_t v);
tuna_status tuna_gguf_set_i32(tuna_gguf_writer *w, const char *key, int32_t v);
tuna_status tuna_gguf_set_f32(tuna_gguf_writer *w, const char *key, float v);
tuna_status tuna_gguf_set_bool(tuna_gguf_writer *w, const char *key, bool v);
tuna_status tuna_gguf_set_str(tuna_gguf_writer *w, const char *key, const char *v);
tuna_status tuna_gguf_set_arr_str(tuna_gguf_writer *w, const char *key, const char *const *v, size_t n);
tuna_status tuna_gguf_set_arr_f32(tuna_gguf_writer *w, const char *key, const float *v, size_t n);
tuna_status tuna_gguf_set_arr_i32(tuna_gguf_writer *w, const char *key, const int32_t *v, size_t n);
/* Any scalar or array value given as its little-endian payload bytes (as the file stores it,
 * strings excluded); used to copy keys between files. */
tuna_status tuna_gguf_set_raw(tuna_gguf_writer *w, const char *key, enum tuna_gguf_vtype type,
                              enum tuna_gguf_vtype arr_type, uint64_t n, const void *payload, size_t len);

/* Adds a tensor (ne[0] fastest). data (nbytes, which must equal the row size × rows of the type)
 * is taken when take is true (freed with the writer), else borrowed until save/free. Duplicate
 * names, names of 64 bytes or more, and ne[0] not a multiple of the block size are refused. */
tuna_status tuna_gguf_add_tensor(tuna_gguf_writer *w, const char *name, uint32_t type, int n_dims,
                                 const int64_t *ne, void *data, size_t nbytes, bool take);

/* Writes the file atomically (temporary name, rename): header, metadata, tensor infos, zero
 * padding to the alignment (general.alignment when set as u32, else 32), then each tensor's
 * data padded to the alignment, in the order added. */
tuna_status tuna_gguf_writer_save(tuna_gguf_writer *w, const char *path);

#endif
