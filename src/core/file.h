/* file.h — file helpers: whole-file reads, path joins, directories, atomic writes.
 *
 * Atomic writes: every output of tuna is written to "<path>.tmp.<pid>" and renamed over <path>
 * only when complete, so a crash or a full disk never leaves a half-written file under the
 * final name. Folders are written the same way (tuna_atomic_dir_begin/commit).
 */
#ifndef TUNA_CORE_FILE_H
#define TUNA_CORE_FILE_H

#include <stdbool.h>
#include <stddef.h>

#include "tuna.h"

/* Reads the whole file into a NUL-terminated malloc'd buffer (*out, taken by the caller).
 * Files over max_bytes are refused with TUNA_E_FORMAT (max_bytes 0 = no limit). */
tuna_status tuna_read_file(const char *path, size_t max_bytes, char **out, size_t *len);

/* Writes len bytes to path atomically (temporary name, fsync, rename). */
tuna_status tuna_write_file_atomic(const char *path, const void *data, size_t len);

/* Joins dir and name with one '/', into a malloc'd string (NULL on OOM). */
char *tuna_path_join(const char *dir, const char *name);

bool tuna_path_exists(const char *path);
bool tuna_path_is_dir(const char *path);

/* Size of a regular file, or -1. */
long long tuna_file_size(const char *path);

/* Creates dir and its parents (like mkdir -p). */
tuna_status tuna_mkdir_p(const char *dir);

/* Removes a folder and everything under it (used to clean temporary export folders). */
tuna_status tuna_remove_tree(const char *path);

/* Copies a file (atomically at dst). */
tuna_status tuna_copy_file(const char *src, const char *dst);

/* Writing a large file atomically as a stream: begin opens "<path>.tmp.<pid>" for writing,
 * commit flushes, fsyncs and renames it to path, abort closes and removes it. */
struct tuna_atomic_file {
    void *fp;   /* FILE * */
    char *tmp;  /* temporary path (owned) */
    char *path; /* final path (owned) */
};
tuna_status tuna_atomic_file_begin(const char *path, struct tuna_atomic_file *af);
tuna_status tuna_atomic_file_write(struct tuna_atomic_file *af, const void *data, size_t len);
tuna_status tuna_atomic_file_commit(struct tuna_atomic_file *af);
void tuna_atomic_file_abort(struct tuna_atomic_file *af);

/* Writing a folder atomically: begin makes "<final>.tmp.<pid>" and returns its path (malloc'd)
 * in *tmp_dir; commit renames it to final (replacing an existing folder of that name only when
 * replace is true); abort removes it. */
tuna_status tuna_atomic_dir_begin(const char *final_dir, char **tmp_dir);
tuna_status tuna_atomic_dir_commit(const char *tmp_dir, const char *final_dir, bool replace);
void tuna_atomic_dir_abort(const char *tmp_dir);

#endif
