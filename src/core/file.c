/* file.c — whole-file reads, atomic writes, directory helpers (POSIX). */
#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "status.h"

tuna_status tuna_read_file(const char *path, size_t max_bytes, char **out, size_t *len)
{
    *out = NULL;
    if (len) *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return tuna_fail(TUNA_E_IO, "cannot open %s: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return tuna_fail(TUNA_E_IO, "cannot seek in %s: %s", path, strerror(errno));
    }
    long sz = ftell(f);
    if (sz < 0) {
        fclose(f);
        return tuna_fail(TUNA_E_IO, "cannot size %s: %s", path, strerror(errno));
    }
    if (max_bytes && (size_t)sz > max_bytes) {
        fclose(f);
        return tuna_fail(TUNA_E_FORMAT, "%s is %ld bytes, over the limit of %zu bytes for this kind of file",
                         path, sz, max_bytes);
    }
    rewind(f);
    char *buf = malloc((size_t)sz + 1);
    if (!buf) {
        fclose(f);
        return tuna_fail_oom(path, (size_t)sz + 1);
    }
    size_t got = fread(buf, 1, (size_t)sz, f);
    int err = ferror(f);
    fclose(f);
    if (err || got != (size_t)sz) {
        free(buf);
        return tuna_fail(TUNA_E_IO, "short read of %s (%zu of %ld bytes)", path, got, sz);
    }
    buf[got] = '\0';
    *out = buf;
    if (len) *len = got;
    return TUNA_OK;
}

static char *tmp_name(const char *path)
{
    size_t n = strlen(path) + 32;
    char *t = malloc(n);
    if (t) snprintf(t, n, "%s.tmp.%ld", path, (long)getpid());
    return t;
}

tuna_status tuna_write_file_atomic(const char *path, const void *data, size_t len)
{
    char *tmp = tmp_name(path);
    if (!tmp) return tuna_fail_oom("file name", strlen(path) + 32);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        tuna_status s = tuna_fail(TUNA_E_IO, "cannot create %s: %s", tmp, strerror(errno));
        free(tmp);
        return s;
    }
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            tuna_status s = tuna_fail(TUNA_E_IO, "writing %s: %s (nothing was written to %s)", tmp,
                                      strerror(errno), path);
            close(fd);
            unlink(tmp);
            free(tmp);
            return s;
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        tuna_status s = tuna_fail(TUNA_E_IO, "flushing %s: %s", tmp, strerror(errno));
        unlink(tmp);
        free(tmp);
        return s;
    }
    if (rename(tmp, path) != 0) {
        tuna_status s = tuna_fail(TUNA_E_IO, "renaming %s to %s: %s", tmp, path, strerror(errno));
        unlink(tmp);
        free(tmp);
        return s;
    }
    free(tmp);
    return TUNA_OK;
}

char *tuna_path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t k = a;
    if (a > 0 && dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

bool tuna_path_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

bool tuna_path_is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

long long tuna_file_size(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return -1;
    return (long long)st.st_size;
}

tuna_status tuna_mkdir_p(const char *dir)
{
    char *p = strdup(dir);
    if (!p) return tuna_fail_oom("path", strlen(dir) + 1);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            tuna_status st = tuna_fail(TUNA_E_IO, "cannot create folder %s: %s", p, strerror(errno));
            free(p);
            return st;
        }
        *s = '/';
    }
    if (mkdir(p, 0755) != 0 && errno != EEXIST) {
        tuna_status st = tuna_fail(TUNA_E_IO, "cannot create folder %s: %s", p, strerror(errno));
        free(p);
        return st;
    }
    free(p);
    return TUNA_OK;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

tuna_status tuna_remove_tree(const char *path)
{
    if (!tuna_path_exists(path)) return TUNA_OK;
    if (nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
        return tuna_fail(TUNA_E_IO, "cannot remove %s: %s", path, strerror(errno));
    return TUNA_OK;
}

tuna_status tuna_copy_file(const char *src, const char *dst)
{
    char *buf;
    size_t len;
    tuna_status s = tuna_read_file(src, 0, &buf, &len);
    if (s) return s;
    s = tuna_write_file_atomic(dst, buf, len);
    free(buf);
    return s;
}

tuna_status tuna_atomic_dir_begin(const char *final_dir, char **tmp_dir)
{
    *tmp_dir = tmp_name(final_dir);
    if (!*tmp_dir) return tuna_fail_oom("folder name", strlen(final_dir) + 32);
    tuna_status s = tuna_remove_tree(*tmp_dir);
    if (!s) s = tuna_mkdir_p(*tmp_dir);
    if (s) {
        free(*tmp_dir);
        *tmp_dir = NULL;
    }
    return s;
}

tuna_status tuna_atomic_dir_commit(const char *tmp_dir, const char *final_dir, bool replace)
{
    if (tuna_path_exists(final_dir)) {
        if (!replace)
            return tuna_fail(TUNA_E_IO, "%s already exists; choose another output or remove it first",
                             final_dir);
        /* move the old folder aside first so that a failure leaves one complete copy */
        char *old = tmp_name(final_dir);
        if (!old) return tuna_fail_oom("folder name", strlen(final_dir) + 32);
        size_t n = strlen(old) + 5;
        char *aside = malloc(n);
        if (!aside) {
            free(old);
            return tuna_fail_oom("folder name", n);
        }
        snprintf(aside, n, "%s.old", old);
        free(old);
        tuna_remove_tree(aside);
        if (rename(final_dir, aside) != 0) {
            tuna_status s = tuna_fail(TUNA_E_IO, "cannot move old %s aside: %s", final_dir, strerror(errno));
            free(aside);
            return s;
        }
        if (rename(tmp_dir, final_dir) != 0) {
            tuna_status s = tuna_fail(TUNA_E_IO, "renaming %s to %s: %s", tmp_dir, final_dir, strerror(errno));
            rename(aside, final_dir);
            free(aside);
            return s;
        }
        tuna_remove_tree(aside);
        free(aside);
        return TUNA_OK;
    }
    if (rename(tmp_dir, final_dir) != 0)
        return tuna_fail(TUNA_E_IO, "renaming %s to %s: %s", tmp_dir, final_dir, strerror(errno));
    return TUNA_OK;
}

void tuna_atomic_dir_abort(const char *tmp_dir)
{
    if (tmp_dir) tuna_remove_tree(tmp_dir);
}

tuna_status tuna_atomic_file_begin(const char *path, struct tuna_atomic_file *af)
{
    memset(af, 0, sizeof *af);
    af->tmp = tmp_name(path);
    af->path = strdup(path);
    if (!af->tmp || !af->path) {
        tuna_atomic_file_abort(af);
        return tuna_fail_oom("file name", strlen(path) + 32);
    }
    FILE *f = fopen(af->tmp, "wb");
    if (!f) {
        tuna_status s = tuna_fail(TUNA_E_IO, "cannot create %s: %s", af->tmp, strerror(errno));
        tuna_atomic_file_abort(af);
        return s;
    }
    setvbuf(f, NULL, _IOFBF, 1 << 20);
    af->fp = f;
    return TUNA_OK;
}

tuna_status tuna_atomic_file_write(struct tuna_atomic_file *af, const void *data, size_t len)
{
    if (len == 0) return TUNA_OK;
    if (fwrite(data, 1, len, (FILE *)af->fp) != len)
        return tuna_fail(TUNA_E_IO, "writing %s: %s (nothing was written to %s)", af->tmp, strerror(errno),
                         af->path);
    return TUNA_OK;
}

tuna_status tuna_atomic_file_commit(struct tuna_atomic_file *af)
{
    FILE *f = af->fp;
    tuna_status s = TUNA_OK;
    af->fp = NULL;
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) s = tuna_fail(TUNA_E_IO, "flushing %s: %s", af->tmp, strerror(errno));
    if (fclose(f) != 0 && !s) s = tuna_fail(TUNA_E_IO, "closing %s: %s", af->tmp, strerror(errno));
    if (!s && rename(af->tmp, af->path) != 0)
        s = tuna_fail(TUNA_E_IO, "renaming %s to %s: %s", af->tmp, af->path, strerror(errno));
    if (s) unlink(af->tmp);
    free(af->tmp);
    free(af->path);
    af->tmp = af->path = NULL;
    return s;
}

void tuna_atomic_file_abort(struct tuna_atomic_file *af)
{
    if (af->fp) fclose((FILE *)af->fp);
    if (af->tmp) unlink(af->tmp);
    free(af->tmp);
    free(af->path);
    memset(af, 0, sizeof *af);
}
