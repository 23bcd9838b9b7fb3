/* safetensors.h — the safetensors format: a validating mmap reader (single files and sharded
 * folders) and a writer with the official library's layout.
 *
 * Spec: docs/FORMATS.md §safetensors (header = u64 LE length + JSON, then a byte buffer the
 * tensors tile exactly). The reader never trusts the file: every size and offset is checked
 * before a tensor view is handed out, and each problem is a TUNA_E_FORMAT naming the file, the
 * tensor and what is wrong.
 *
 * Ownership: tensor views (and their names) point into the mapping and live as long as the
 * tuna_st_file / tuna_st_set that produced them.
 */
#ifndef TUNA_IO_SAFETENSORS_H
#define TUNA_IO_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "tuna.h"

#define TUNA_MAX_DIMS 8
#define TUNA_ST_MAX_HEADER 100000000ull /* as the official reader */

struct tuna_tensor_view {
    const char *name;          /* NUL-terminated, owned by the file */
    enum tuna_dtype dtype;     /* a file dtype (never NF4/FP4) */
    int ndim;                  /* 0 for a scalar */
    int64_t shape[TUNA_MAX_DIMS];
    uint64_t numel;            /* product of shape (1 for a scalar) */
    const void *data;          /* into the mapping; read-only */
    size_t nbytes;
    const char *file;          /* path of the file it lives in */
};

/* --- one file --- */
typedef struct tuna_st_file tuna_st_file;

/* Maps and validates path. On failure *out is NULL and the message names the problem. */
tuna_status tuna_st_open(const char *path, tuna_st_file **out);
void tuna_st_close(tuna_st_file *f);

size_t tuna_st_count(const tuna_st_file *f);
/* Tensors in file (offset) order. */
const struct tuna_tensor_view *tuna_st_at(const tuna_st_file *f, size_t i);
/* NULL when absent. */
const struct tuna_tensor_view *tuna_st_find(const tuna_st_file *f, const char *name);
/* A __metadata__ value, NULL when absent. */
const char *tuna_st_metadata(const tuna_st_file *f, const char *key);
const char *tuna_st_path(const tuna_st_file *f);

/* --- a model folder: model.safetensors, or model.safetensors.index.json + shards, or any
 * single *.safetensors file when it is the only one (adapter_model.safetensors, ...) --- */
typedef struct tuna_st_set tuna_st_set;

/* Opens the weights of a folder. With an index, only the shards it names are opened, every
 * tensor it names must exist in its shard, and no tensor may be in two files.
 * `prefix` picks the file family: "model" for model weights, "adapter_model" for PEFT. */
tuna_status tuna_st_set_open(const char *dir, const char *prefix, tuna_st_set **out);
/* Opens one file as a set (for uniform handling). */
tuna_status tuna_st_set_open_file(const char *path, tuna_st_set **out);
void tuna_st_set_close(tuna_st_set *s);

size_t tuna_st_set_count(const tuna_st_set *s);
const struct tuna_tensor_view *tuna_st_set_at(const tuna_st_set *s, size_t i); /* by file, then offset */
const struct tuna_tensor_view *tuna_st_set_find(const tuna_st_set *s, const char *name);
size_t tuna_st_set_nfiles(const tuna_st_set *s);
const tuna_st_file *tuna_st_set_file(const tuna_st_set *s, size_t i);
/* Sum of all tensor bytes. */
uint64_t tuna_st_set_total_bytes(const tuna_st_set *s);

/* Copies a tensor converted to float32 into dst (numel floats). Float and integer dtypes. */
tuna_status tuna_tensor_to_f32(const struct tuna_tensor_view *t, float *dst);

/* --- writer --- */
typedef struct tuna_st_writer tuna_st_writer;

tuna_status tuna_st_writer_new(tuna_st_writer **out);
void tuna_st_writer_free(tuna_st_writer *w);

/* Adds a tensor. The data is copied when copy is true, else borrowed until the writer is saved
 * or freed. Duplicate names are refused. nbytes must equal numel × dtype size. */
tuna_status tuna_st_writer_add(tuna_st_writer *w, const char *name, enum tuna_dtype dtype, int ndim,
                               const int64_t *shape, const void *data, size_t nbytes, bool copy);
/* Sets a __metadata__ entry (the default is {"format":"pt"}). */
tuna_status tuna_st_writer_set_metadata(tuna_st_writer *w, const char *key, const char *value);

/* Writes one file atomically, in the official layout: header sorted (dtype descending in
 * the official enum order, then name), padded with spaces to a multiple of 8, no gaps. */
tuna_status tuna_st_writer_save(tuna_st_writer *w, const char *path);

/* Writes into dir as "<prefix>.safetensors", or, when the tensors exceed max_shard_bytes (> 0),
 * as "<prefix>-0000i-of-0000n.safetensors" shards filled greedily in insertion order plus
 * "<prefix>.safetensors.index.json" (metadata.total_size, weight_map sorted by name). */
tuna_status tuna_st_writer_save_dir(tuna_st_writer *w, const char *dir, const char *prefix,
                                    uint64_t max_shard_bytes);

#endif
