/* safetensors_set.c — the weights of a model folder: one file, or shards named by an index.
 *
 * With "<prefix>.safetensors.index.json" only the shards its weight_map names are opened (a
 * stray consolidated file beside the shards is ignored, as vLLM does), every tensor it names
 * must be in its shard, shard names may not leave the folder, and no tensor may be in two
 * files. Without an index: "<prefix>.safetensors".
 */
#include "safetensors.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "core/strmap.h"

struct tuna_st_set {
    tuna_st_file **files;
    size_t n_files;
    const struct tuna_tensor_view **all; /* [n_all] by file, then offset */
    size_t n_all;
    struct tuna_strmap index; /* name → position in all */
    uint64_t total_bytes;
};

void tuna_st_set_close(tuna_st_set *s)
{
    if (!s) return;
    for (size_t i = 0; i < s->n_files; i++) tuna_st_close(s->files[i]);
    free(s->files);
    free(s->all);
    tuna_strmap_free(&s->index);
    free(s);
}

static tuna_status set_add_file(tuna_st_set *s, const char *path)
{
    tuna_st_file *f;
    tuna_status st = tuna_st_open(path, &f);
    if (st) return st;
    tuna_st_file **nf = realloc(s->files, (s->n_files + 1) * sizeof *nf);
    if (!nf) {
        tuna_st_close(f);
        return tuna_fail_oom("shard table", (s->n_files + 1) * sizeof *nf);
    }
    s->files = nf;
    s->files[s->n_files++] = f;
    size_t n = tuna_st_count(f);
    const struct tuna_tensor_view **na = realloc(s->all, (s->n_all + n + 1) * sizeof *na);
    if (!na) return tuna_fail_oom("tensor table", (s->n_all + n) * sizeof *na);
    s->all = na;
    for (size_t i = 0; i < n; i++) {
        const struct tuna_tensor_view *t = tuna_st_at(f, i);
        bool existed = false;
        if (!tuna_strmap_puts(&s->index, t->name, (int64_t)s->n_all, &existed))
            return tuna_fail_oom("tensor index", 64);
        if (existed) {
            int64_t j = 0;
            tuna_strmap_gets(&s->index, t->name, &j);
            return tuna_fail(TUNA_E_FORMAT, "tensor \"%s\" is in two files: %s and %s", t->name, s->all[j]->file,
                             path);
        }
        s->all[s->n_all++] = t;
        s->total_bytes += t->nbytes;
    }
    return TUNA_OK;
}

static tuna_status set_new(tuna_st_set **out)
{
    *out = calloc(1, sizeof **out);
    if (!*out) return tuna_fail_oom("tensor set", sizeof **out);
    tuna_strmap_init(&(*out)->index);
    return TUNA_OK;
}

tuna_status tuna_st_set_open_file(const char *path, tuna_st_set **out)
{
    tuna_st_set *s;
    tuna_status st = set_new(&s);
    if (st) return st;
    if ((st = set_add_file(s, path))) {
        tuna_st_set_close(s);
        return st;
    }
    *out = s;
    return TUNA_OK;
}

static bool safe_shard_name(const char *name)
{
    return name[0] && !strchr(name, '/') && !strchr(name, '\\') && strcmp(name, ".") && strcmp(name, "..");
}

static tuna_status open_indexed(tuna_st_set *s, const char *dir, const char *index_path)
{
    cJSON *doc;
    tuna_status st = tuna_json_load(index_path, 256u << 20, &doc);
    if (st) return st;
    const cJSON *wm = tuna_json_member(doc, "weight_map");
    if (!wm || !cJSON_IsObject(wm)) {
        cJSON_Delete(doc);
        return tuna_fail(TUNA_E_FORMAT, "%s has no \"weight_map\" object", index_path);
    }
    /* open each distinct shard once, in order of first mention */
    struct tuna_strmap opened;
    tuna_strmap_init(&opened);
    for (const cJSON *e = wm->child; e && !st; e = e->next) {
        if (!cJSON_IsString(e)) {
            st = tuna_fail(TUNA_E_FORMAT, "%s: weight_map entry \"%s\" is not a file name", index_path, e->string);
            break;
        }
        const char *shard = e->valuestring;
        if (!safe_shard_name(shard)) {
            st = tuna_fail(TUNA_E_FORMAT, "%s: shard name \"%s\" for \"%s\" is not a plain file name in the folder",
                           index_path, shard, e->string);
            break;
        }
        if (tuna_strmap_gets(&opened, shard, NULL)) continue;
        char *path = tuna_path_join(dir, shard);
        if (!path) {
            st = tuna_fail_oom("path", strlen(dir) + strlen(shard));
            break;
        }
        if (!tuna_path_exists(path)) {
            st = tuna_fail(TUNA_E_NOT_FOUND, "%s names shard %s (for tensor \"%s\"), which is not in %s", index_path,
                           shard, e->string, dir);
        } else {
            st = set_add_file(s, path);
            if (!tuna_strmap_puts(&opened, shard, 1, NULL) && !st) st = tuna_fail_oom("shard set", 64);
        }
        free(path);
    }
    /* every tensor the index names must be in the shard it names */
    for (const cJSON *e = wm->child; e && !st; e = e->next) {
        int64_t j;
        if (!tuna_strmap_gets(&s->index, e->string, &j)) {
            st = tuna_fail(TUNA_E_NOT_FOUND, "%s names tensor \"%s\" in %s, but that shard does not hold it",
                           index_path, e->string, e->valuestring);
            break;
        }
        const char *file = s->all[j]->file;
        const char *base = strrchr(file, '/');
        base = base ? base + 1 : file;
        if (strcmp(base, e->valuestring) != 0)
            st = tuna_fail(TUNA_E_FORMAT, "%s puts tensor \"%s\" in %s but it is in %s", index_path, e->string,
                           e->valuestring, base);
    }
    tuna_strmap_free(&opened);
    cJSON_Delete(doc);
    return st;
}

tuna_status tuna_st_set_open(const char *dir, const char *prefix, tuna_st_set **out)
{
    *out = NULL;
    char name[512];
    tuna_st_set *s;
    tuna_status st = set_new(&s);
    if (st) return st;
    snprintf(name, sizeof name, "%s.safetensors.index.json", prefix);
    char *index_path = tuna_path_join(dir, name);
    snprintf(name, sizeof name, "%s.safetensors", prefix);
    char *single = tuna_path_join(dir, name);
    if (!index_path || !single) {
        st = tuna_fail_oom("path", strlen(dir) + 64);
    } else if (tuna_path_exists(index_path)) {
        st = open_indexed(s, dir, index_path);
    } else if (tuna_path_exists(single)) {
        st = set_add_file(s, single);
    } else if (!tuna_path_is_dir(dir)) {
        st = tuna_fail(TUNA_E_NOT_FOUND, "%s is not a folder", dir);
    } else {
        st = tuna_fail(TUNA_E_NOT_FOUND, "no %s.safetensors or %s.safetensors.index.json in %s", prefix, prefix, dir);
    }
    free(index_path);
    free(single);
    if (st) {
        tuna_st_set_close(s);
        return st;
    }
    *out = s;
    return TUNA_OK;
}

size_t tuna_st_set_count(const tuna_st_set *s) { return s->n_all; }

const struct tuna_tensor_view *tuna_st_set_at(const tuna_st_set *s, size_t i)
{
    return i < s->n_all ? s->all[i] : NULL;
}

const struct tuna_tensor_view *tuna_st_set_find(const tuna_st_set *s, const char *name)
{
    int64_t i;
    if (!tuna_strmap_gets(&s->index, name, &i)) return NULL;
    return s->all[i];
}

size_t tuna_st_set_nfiles(const tuna_st_set *s) { return s->n_files; }

const tuna_st_file *tuna_st_set_file(const tuna_st_set *s, size_t i) { return i < s->n_files ? s->files[i] : NULL; }

uint64_t tuna_st_set_total_bytes(const tuna_st_set *s) { return s->total_bytes; }
