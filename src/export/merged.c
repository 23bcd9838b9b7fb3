/* merged.c — merged model folders: `tuna export merged-16bit` (W + s·B·A rounded to the stored
 * dtype, same files and sharding as the base, config.json without quantization_config) and
 * `tuna export merged-4bit` (that, then quantized as `tuna quantize` does).
 *
 * A 4-bit (bitsandbytes) base is merged either into its original 16-bit weights (opts.base_16bit,
 * what Unsloth's merged_16bit does) or into the dequantized 4-bit weights (said in the report). */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "export/export.h"
#include "io/safetensors.h"

int tuna_export_strip_quant_config(cJSON *config)
{
    int n = 0;
    if (!config) return 0;
    cJSON *it = config->child;
    while (it) {
        cJSON *next = it->next;
        if (it->string && !strcmp(it->string, "quantization_config")) {
            cJSON_DeleteItemFromObjectCaseSensitive(config, "quantization_config");
            n++;
        } else if (cJSON_IsObject(it) || cJSON_IsArray(it)) {
            n += tuna_export_strip_quant_config(it);
        }
        it = next;
    }
    return n;
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static bool ends_with(const char *s, const char *suf)
{
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && !strcmp(s + n - m, suf);
}

/* Files copied as they are: everything but weights, indexes, config.json and adapter files. */
static bool copy_as_is(const char *name)
{
    if (name[0] == '.') return false;
    static const char *const k_skip_suffix[] = {".safetensors", ".safetensors.index.json",
                                                ".bin",         ".bin.index.json",
                                                ".pt",          ".pth",
                                                ".gguf",        ".ckpt",
                                                ".msgpack",     ".h5"};
    for (size_t i = 0; i < sizeof k_skip_suffix / sizeof k_skip_suffix[0]; i++)
        if (ends_with(name, k_skip_suffix[i])) return false;
    return strcmp(name, "config.json") != 0 && strncmp(name, "adapter_", 8) != 0;
}

static tuna_status copy_other_files(const char *src, const char *dst)
{
    DIR *d = opendir(src);
    if (!d) return tuna_fail(TUNA_E_IO, "cannot list %s", src);
    tuna_status st = TUNA_OK;
    struct dirent *e;
    while (!st && (e = readdir(d))) {
        if (!copy_as_is(e->d_name)) continue;
        char *from = tuna_path_join(src, e->d_name), *to = tuna_path_join(dst, e->d_name);
        if (!from || !to)
            st = tuna_fail_oom("path", 0);
        else if (!tuna_path_is_dir(from))
            st = tuna_copy_file(from, to);
        free(from);
        free(to);
    }
    closedir(d);
    return st;
}

static tuna_status write_config(const char *src, const char *dst)
{
    char *from = tuna_path_join(src, "config.json"), *to = tuna_path_join(dst, "config.json");
    cJSON *cfg = NULL;
    tuna_status st = (from && to) ? tuna_json_load(from, 0, &cfg) : tuna_fail_oom("path", 0);
    if (!st) {
        tuna_export_strip_quant_config(cfg);
        st = tuna_json_save(to, cfg);
    }
    cJSON_Delete(cfg);
    free(from);
    free(to);
    return st;
}

/* The index of a sharded base, with the 4-bit companion tensors dropped and total_size set. */
static tuna_status write_index(const char *src, const char *dst, uint64_t total, bool drop_state)
{
    char *from = tuna_path_join(src, "model.safetensors.index.json");
    char *to = tuna_path_join(dst, "model.safetensors.index.json");
    cJSON *idx = NULL;
    tuna_status st = (from && to) ? TUNA_OK : tuna_fail_oom("path", 0);
    if (!st && !tuna_path_exists(from)) goto done; /* one file, no index */
    if (!st) st = tuna_json_load(from, 0, &idx);
    if (st) goto done;
    cJSON *map = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
    if (!cJSON_IsObject(map)) {
        st = tuna_fail(TUNA_E_FORMAT, "%s: no weight_map object", from);
        goto done;
    }
    if (drop_state) {
        cJSON *it = map->child;
        while (it) {
            cJSON *next = it->next;
            if (tuna_bnb_is_state_tensor(it->string)) cJSON_Delete(cJSON_DetachItemViaPointer(map, it));
            it = next;
        }
    }
    cJSON *meta = cJSON_GetObjectItemCaseSensitive(idx, "metadata");
    if (!cJSON_IsObject(meta)) {
        cJSON_DeleteItemFromObjectCaseSensitive(idx, "metadata");
        meta = cJSON_CreateObject();
        if (!meta || !cJSON_AddItemToObject(idx, "metadata", meta)) {
            st = tuna_fail_oom("index", 0);
            goto done;
        }
    }
    cJSON_DeleteItemFromObjectCaseSensitive(meta, "total_size");
    if (!cJSON_AddNumberToObject(meta, "total_size", (double)total)) {
        st = tuna_fail_oom("index", 0);
        goto done;
    }
    st = tuna_json_save(to, idx);
done:
    cJSON_Delete(idx);
    free(from);
    free(to);
    return st;
}

/* The module a tensor name adapts ("<module>.weight"), or NULL. */
static const struct tuna_lora_module *module_for(const struct tuna_lora_adapter *a, const char *tensor)
{
    size_t n = strlen(tensor);
    if (n < 8 || strcmp(tensor + n - 7, ".weight") != 0 || n - 7 >= 1024) return NULL;
    char mod[1024];
    memcpy(mod, tensor, n - 7);
    mod[n - 7] = '\0';
    return tuna_lora_find(a, mod);
}

/* Buffers of merged tensors handed to the writer without a copy; freed once the shard is saved. */
struct bufs {
    void **p;
    size_t n, cap;
};

static tuna_status keep(struct bufs *b, void *p)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 64;
        void **q = realloc(b->p, cap * sizeof *q);
        if (!q) return tuna_fail_oom("buffer list", cap * sizeof *q);
        b->p = q;
        b->cap = cap;
    }
    b->p[b->n++] = p;
    return TUNA_OK;
}

static void bufs_free(struct bufs *b)
{
    for (size_t i = 0; i < b->n; i++)
        free(b->p[i]);
    b->n = 0;
}

/* One 4-bit weight: dequantized (rounded to its quant_state dtype), merged when adapted. */
static tuna_status add_dequantized(tuna_st_writer *w, struct bufs *bufs, const tuna_st_set *set,
                                   const struct tuna_tensor_view *t, const struct tuna_lora_module *mod)
{
    struct tuna_q4_weight q;
    memset(&q, 0, sizeof q);
    tuna_status st = tuna_bnb_load_weight(set, t->name, &q);
    if (st) return st;
    size_t n = (size_t)q.numel;
    float *f = malloc(sizeof(float) * (n ? n : 1));
    size_t nb = tuna_dtype_nbytes(q.dtype, n);
    void *out = malloc(nb ? nb : 1);
    if (!f || !out) st = tuna_fail_oom("dequantized weight", sizeof(float) * n);
    if (!st && mod && (mod->out != q.rows || mod->in != q.cols))
        st = tuna_fail(TUNA_E_INVALID, "%s is [%lld, %lld] but the adapter's %s is [%lld, %lld]", t->name,
                       (long long)q.rows, (long long)q.cols, mod->name, (long long)mod->out, (long long)mod->in);
    if (!st) {
        tuna_q4_dequantize_rows(&q, 0, q.rows, f);
        if (mod) st = tuna_lora_merge_f32(mod, f);
    }
    if (!st && !tuna_convert_from_f32(q.dtype, f, out, n))
        st = tuna_fail(TUNA_E_FORMAT, "%s: quant_state dtype %s is not F32, F16 or BF16", t->name,
                       tuna_dtype_name(q.dtype));
    int64_t shape[2] = {q.rows, q.cols};
    if (!st && (st = keep(bufs, out)) == TUNA_OK) {
        out = NULL; /* owned by bufs now */
        st = tuna_st_writer_add(w, t->name, q.dtype, 2, shape, bufs->p[bufs->n - 1], nb, false);
    }
    free(out);
    free(f);
    tuna_q4_weight_free(&q);
    return st;
}

static tuna_status add_merged(tuna_st_writer *w, struct bufs *bufs, const struct tuna_tensor_view *t,
                              const struct tuna_lora_module *mod)
{
    if (t->ndim != 2 || t->shape[0] != mod->out || t->shape[1] != mod->in)
        return tuna_fail(TUNA_E_INVALID, "%s has shape [%lld%s] but the adapter's %s is [%lld, %lld]", t->name,
                         (long long)(t->ndim ? t->shape[0] : 0), t->ndim == 2 ? ", ..." : "", mod->name,
                         (long long)mod->out, (long long)mod->in);
    void *out = malloc(t->nbytes ? t->nbytes : 1);
    if (!out) return tuna_fail_oom("merged weight", t->nbytes);
    tuna_status st = keep(bufs, out);
    if (st) {
        free(out);
        return st;
    }
    st = tuna_lora_merge_stored(mod, t->dtype, t->data, out);
    if (!st) st = tuna_st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, out, t->nbytes, false);
    return st;
}

/* Writes the merged shards of `set` into dir (same file names); counts into rep; *total = bytes
 * of all tensors written (the index's metadata.total_size). */
static tuna_status write_shards(const tuna_st_set *set, bool is4, const struct tuna_lora_adapter *a, const char *dir,
                                struct tuna_merge_report *rep, uint64_t *total)
{
    tuna_status st = TUNA_OK;
    struct bufs bufs = {0};
    *total = 0;
    for (size_t fi = 0; !st && fi < tuna_st_set_nfiles(set); fi++) {
        const tuna_st_file *f = tuna_st_set_file(set, fi);
        tuna_st_writer *w = NULL;
        if ((st = tuna_st_writer_new(&w))) break;
        for (size_t i = 0; !st && i < tuna_st_count(f); i++) {
            const struct tuna_tensor_view *t = tuna_st_at(f, i);
            if (is4 && tuna_bnb_is_state_tensor(t->name)) continue;
            const struct tuna_lora_module *mod = module_for(a, t->name);
            if (is4 && tuna_bnb_is_quantized_weight(set, t->name)) {
                st = add_dequantized(w, &bufs, set, t, mod);
                rep->dequantized = true;
            } else if (mod) {
                st = add_merged(w, &bufs, t, mod);
            } else {
                st = tuna_st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, false);
            }
            rep->n_merged += mod && !st;
            rep->n_tensors += !st;
        }
        char *path = st ? NULL : tuna_path_join(dir, base_name(tuna_st_path(f)));
        if (!st) st = path ? tuna_st_writer_save(w, path) : tuna_fail_oom("path", 0);
        tuna_st_file *back = NULL;
        if (!st) st = tuna_st_open(path, &back); /* re-read: checks the file and sums its tensor bytes */
        for (size_t i = 0; back && i < tuna_st_count(back); i++)
            *total += tuna_st_at(back, i)->nbytes;
        tuna_st_close(back);
        free(path);
        tuna_st_writer_free(w);
        bufs_free(&bufs);
        rep->n_files += !st;
    }
    free(bufs.p);
    return st;
}

/* Every module of the adapter must name a weight of the base. */
static tuna_status check_covered(const tuna_st_set *set, const struct tuna_lora_adapter *a, const char *dir)
{
    for (int i = 0; i < a->n_modules; i++) {
        char name[1100];
        snprintf(name, sizeof name, "%s.weight", a->modules[i].name);
        if (tuna_st_set_find(set, name)) continue;
        if (!strcmp(a->modules[i].name, "lm_head"))
            return tuna_fail(TUNA_E_UNSUPPORTED,
                             "the adapter adapts lm_head but %s has no lm_head.weight (its embeddings are tied); "
                             "merging would untie them, which tuna does not do",
                             dir);
        return tuna_fail(TUNA_E_INVALID,
                         "the adapter adapts %s but %s has no tensor %s: is it an adapter for another "
                         "base model?",
                         a->modules[i].name, dir, name);
    }
    return TUNA_OK;
}

/* --base-16bit must be a 16-bit folder holding every 4-bit weight of the base, same shapes. */
static tuna_status check_base16(const tuna_st_set *q4, const tuna_st_set *b16, const char *qdir, const char *bdir)
{
    if (tuna_bnb_is_4bit(b16))
        return tuna_fail(TUNA_E_INVALID,
                         "--base-16bit %s holds bitsandbytes 4-bit weights; give the original 16-bit model", bdir);
    for (size_t i = 0; i < tuna_st_set_count(q4); i++) {
        const struct tuna_tensor_view *t = tuna_st_set_at(q4, i);
        if (tuna_bnb_is_state_tensor(t->name)) continue;
        const struct tuna_tensor_view *u = tuna_st_set_find(b16, t->name);
        if (!u)
            return tuna_fail(TUNA_E_INVALID, "--base-16bit %s has no tensor %s, which %s has: not the same model", bdir,
                             t->name, qdir);
        if (!tuna_bnb_is_quantized_weight(q4, t->name)) continue;
        struct tuna_q4_weight q;
        memset(&q, 0, sizeof q);
        tuna_status st = tuna_bnb_load_weight(q4, t->name, &q);
        if (st) return st;
        bool same = u->ndim == 2 && u->shape[0] == q.rows && u->shape[1] == q.cols;
        tuna_q4_weight_free(&q);
        if (!same)
            return tuna_fail(TUNA_E_INVALID, "--base-16bit %s: %s has another shape than in %s: not the same model",
                             bdir, t->name, qdir);
    }
    return TUNA_OK;
}

/* The 16-bit merge into out_dir (atomically); the folder whose weights and files are used is
 * model_dir, or opts->base_16bit for a 4-bit base. */
static tuna_status merge16(const char *model_dir, const struct tuna_lora_adapter *a, const struct tuna_merge_opts *o,
                           const char *out_dir, bool replace, struct tuna_merge_report *rep)
{
    tuna_st_set *set = NULL, *b16 = NULL;
    char *tmp = NULL;
    const char *src = model_dir;
    tuna_status st = tuna_st_set_open(model_dir, "model", &set);
    if (!st) st = tuna_bnb_check_not_int8(set);
    bool is4 = !st && tuna_bnb_is_4bit(set);
    if (!st && o && o->base_16bit) {
        if (!is4) {
            st = tuna_fail(TUNA_E_INVALID,
                           "--base-16bit is for a 4-bit base, but %s holds 16-bit weights: merge into "
                           "it directly",
                           model_dir);
        } else {
            st = tuna_st_set_open(o->base_16bit, "model", &b16);
            if (!st) st = check_base16(set, b16, model_dir, o->base_16bit);
            if (!st) {
                tuna_st_set_close(set);
                set = b16;
                b16 = NULL;
                is4 = false;
                src = o->base_16bit;
                rep->used_base_16bit = true;
            }
        }
    }
    if (!st) st = check_covered(set, a, src);
    if (!st && !replace && tuna_path_exists(out_dir))
        st = tuna_fail(TUNA_E_INVALID, "%s already exists: choose a new output folder (or replace it: --force)",
                       out_dir);
    if (!st) st = tuna_atomic_dir_begin(out_dir, &tmp);
    uint64_t total = 0;
    if (!st) st = write_shards(set, is4, a, tmp, rep, &total);
    if (!st && rep->n_merged != a->n_modules)
        st = tuna_fail(TUNA_E_INTERNAL, "merged %d weights for %d adapter modules", rep->n_merged, a->n_modules);
    if (!st) st = write_index(src, tmp, total, is4);
    if (!st) st = write_config(src, tmp);
    if (!st) st = copy_other_files(src, tmp);
    if (!st) st = tuna_atomic_dir_commit(tmp, out_dir, replace);
    if (st && tmp) tuna_atomic_dir_abort(tmp);
    free(tmp);
    tuna_st_set_close(set);
    tuna_st_set_close(b16);
    return st;
}

tuna_status tuna_export_merged_16bit(const char *model_dir, const struct tuna_lora_adapter *a,
                                     const struct tuna_merge_opts *opts, const char *out_dir,
                                     struct tuna_merge_report *report)
{
    struct tuna_merge_report r;
    memset(&r, 0, sizeof r);
    tuna_status st = merge16(model_dir, a, opts, out_dir, opts && opts->replace, &r);
    if (report) *report = r;
    return st ? tuna_fail_prefix(st, "export merged-16bit of %s", model_dir) : TUNA_OK;
}

/* Quantization settings of a 4-bit base: its config's quantization_config, the block size of
 * its first 4-bit weight. Returns false when the base is not 4-bit. */
static tuna_status base_quant_opts(const char *model_dir, struct tuna_bnb_quantize_opts *q, struct tuna_arch *arch,
                                   bool *is4)
{
    tuna_st_set *set = NULL;
    *is4 = false;
    tuna_status st = tuna_st_set_open(model_dir, "model", &set);
    if (st) return st;
    if (tuna_bnb_is_4bit(set)) {
        *is4 = true;
        st = tuna_arch_load(model_dir, arch);
        if (!st) {
            q->type = arch->quant.bnb_4bit_quant_type_nf4 ? TUNA_Q4_NF4 : TUNA_Q4_FP4;
            q->double_quant = arch->quant.bnb_double_quant;
            q->compute_dtype = arch->quant.bnb_compute_dtype;
            q->skip_modules = (const char *const *)arch->quant.skip_modules;
            q->n_skip_modules = arch->quant.n_skip_modules;
        }
        for (size_t i = 0; !st && i < tuna_st_set_count(set); i++) {
            const struct tuna_tensor_view *t = tuna_st_set_at(set, i);
            if (tuna_bnb_is_state_tensor(t->name) || !tuna_bnb_is_quantized_weight(set, t->name)) continue;
            struct tuna_q4_weight w;
            memset(&w, 0, sizeof w);
            st = tuna_bnb_load_weight(set, t->name, &w);
            if (!st) {
                q->blocksize = w.blocksize;
                q->type = w.type;
                q->double_quant = w.nested;
            }
            tuna_q4_weight_free(&w);
            break;
        }
    }
    tuna_st_set_close(set);
    return st;
}

tuna_status tuna_export_merged_4bit(const char *model_dir, const struct tuna_lora_adapter *a,
                                    const struct tuna_merge_opts *opts, const char *out_dir,
                                    struct tuna_merge_report *report)
{
    struct tuna_merge_report r;
    memset(&r, 0, sizeof r);
    bool replace = opts && opts->replace;
    struct tuna_arch arch;
    memset(&arch, 0, sizeof arch);
    struct tuna_bnb_quantize_opts q = {.type = TUNA_Q4_NF4, .double_quant = true, .blocksize = 64};
    bool is4 = false;
    tuna_status st = TUNA_OK;
    if (opts && opts->quant)
        q = *opts->quant;
    else
        st = base_quant_opts(model_dir, &q, &arch, &is4);
    if (!st && !replace && tuna_path_exists(out_dir))
        st = tuna_fail(TUNA_E_INVALID, "%s already exists: choose a new output folder (or replace it: --force)",
                       out_dir);
    size_t n = strlen(out_dir) + 48;
    char *tmp16 = malloc(n), *tmpq = malloc(n);
    if (!st && (!tmp16 || !tmpq)) st = tuna_fail_oom("path", n);
    if (!st) {
        snprintf(tmp16, n, "%s.merged16.%ld", out_dir, (long)getpid());
        snprintf(tmpq, n, "%s.quantized.%ld", out_dir, (long)getpid());
        tuna_remove_tree(tmp16);
        tuna_remove_tree(tmpq);
        st = merge16(model_dir, a, opts, tmp16, false, &r);
    }
    if (!st) st = tuna_bnb_quantize_dir(tmp16, tmpq, &q);
    if (!st) st = tuna_atomic_dir_commit(tmpq, out_dir, replace);
    if (tmp16) tuna_remove_tree(tmp16);
    if (st && tmpq) tuna_remove_tree(tmpq);
    free(tmp16);
    free(tmpq);
    tuna_arch_free(&arch);
    if (report) *report = r;
    return st ? tuna_fail_prefix(st, "export merged-4bit of %s", model_dir) : TUNA_OK;
}
