/* peft.c — writing a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)
 * that PeftModel.from_pretrained and vLLM load. The trainer writes its adapters through
 * tuna_export_peft; `tuna export adapter` re-writes a loaded one. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "export/export.h"
#include "io/safetensors.h"

/* The key a rank/alpha pattern uses for a module: its path without a leading "model." (the
 * key is then matched both by PEFT's current "(.*\.)?(key)$" and by older ".*\.key$"). */
static const char *pattern_key(const char *name)
{
    return strncmp(name, "model.", 6) == 0 ? name + 6 : name;
}

static const char *leaf(const char *name)
{
    const char *d = strrchr(name, '.');
    return d ? d + 1 : name;
}

/* Layer index of "model.layers.N.…", or -1. */
static long layer_of(const char *name)
{
    static const char k[] = "model.layers.";
    if (strncmp(name, k, sizeof k - 1) != 0) return -1;
    char *end;
    long l = strtol(name + sizeof k - 1, &end, 10);
    return *end == '.' ? l : -1;
}

/* target_modules from the module names: a list of leaf names when they cover every layer
 * 0..max exactly, else a regex matching exactly these names. */
static tuna_status derive_targets(const struct tuna_peft_module *mods, int n, cJSON *cfg)
{
    const char **leaves = calloc((size_t)n, sizeof *leaves);
    bool *in_layers = calloc((size_t)n, sizeof *in_layers);
    if (!leaves || !in_layers) {
        free(leaves);
        free(in_layers);
        return tuna_fail_oom("targets", (size_t)n);
    }
    int nl = 0, n_layer_leaves = 0;
    long max_layer = -1, n_layer_mods = 0;
    bool clash = false;
    for (int i = 0; i < n; i++) {
        const char *lf = leaf(mods[i].name);
        long l = layer_of(mods[i].name);
        int j = 0;
        while (j < nl && strcmp(leaves[j], lf) != 0)
            j++;
        if (j == nl) {
            leaves[nl++] = lf;
            in_layers[j] = l >= 0;
            n_layer_leaves += l >= 0;
        } else if (in_layers[j] != (l >= 0)) {
            clash = true; /* the same leaf inside and outside the layers */
        }
        if (l >= 0) {
            n_layer_mods++;
            if (l > max_layer) max_layer = l;
        } else if (strcmp(mods[i].name, lf) != 0) {
            clash = true; /* a nested module outside the layers: a leaf name would over-match */
        }
    }
    bool list_ok = !clash && n_layer_mods == (max_layer + 1) * n_layer_leaves;
    tuna_status st = TUNA_OK;
    if (list_ok) {
        cJSON *arr = cJSON_AddArrayToObject(cfg, "target_modules");
        for (int j = 0; arr && j < nl; j++) {
            cJSON *s = cJSON_CreateString(leaves[j]);
            if (!s || !cJSON_AddItemToArray(arr, s)) arr = NULL;
        }
        if (!arr) st = tuna_fail_oom("target_modules", 0);
    } else {
        size_t cap = 1;
        for (int i = 0; i < n; i++)
            cap += 2 * strlen(mods[i].name) + 1;
        char *re = malloc(cap), *p = re;
        if (!re) st = tuna_fail_oom("target_modules", cap);
        for (int i = 0; re && i < n; i++) {
            if (i) *p++ = '|';
            for (const char *c = mods[i].name; *c; c++) {
                if (*c == '.') *p++ = '\\';
                *p++ = *c;
            }
        }
        if (re) {
            *p = '\0';
            if (!cJSON_AddStringToObject(cfg, "target_modules", re)) st = tuna_fail_oom("target_modules", cap);
        }
        free(re);
    }
    free(leaves);
    free(in_layers);
    return st;
}

static cJSON *number(double v)
{
    return cJSON_CreateNumber(v);
}

/* adapter_config.json with PEFT's field names, keys in sorted order. */
static tuna_status build_config(const struct tuna_peft_config *c, const struct tuna_peft_module *mods, int n,
                                cJSON **out)
{
    cJSON *cfg = cJSON_CreateObject();
    cJSON *rank = cJSON_CreateObject(), *alpha = cJSON_CreateObject();
    tuna_status st = (cfg && rank && alpha) ? TUNA_OK : tuna_fail_oom("adapter config", 0);
    for (int i = 0; !st && i < n; i++) {
        if (mods[i].r != c->r && !cJSON_AddItemToObject(rank, pattern_key(mods[i].name), number((double)mods[i].r)))
            st = tuna_fail_oom("rank_pattern", 0);
        if (mods[i].alpha != c->alpha &&
            !cJSON_AddItemToObject(alpha, pattern_key(mods[i].name), number(mods[i].alpha)))
            st = tuna_fail_oom("alpha_pattern", 0);
    }
    if (st) {
        cJSON_Delete(cfg);
        cJSON_Delete(rank);
        cJSON_Delete(alpha);
        return st;
    }
    bool ok = cJSON_AddItemToObject(cfg, "alpha_pattern", alpha);
    ok = ok && cJSON_AddNullToObject(cfg, "auto_mapping");
    ok = ok && (c->base_model ? cJSON_AddStringToObject(cfg, "base_model_name_or_path", c->base_model) != NULL
                              : cJSON_AddNullToObject(cfg, "base_model_name_or_path") != NULL);
    ok = ok && cJSON_AddStringToObject(cfg, "bias", "none");
    ok = ok && cJSON_AddFalseToObject(cfg, "fan_in_fan_out");
    ok = ok && cJSON_AddTrueToObject(cfg, "inference_mode");
    ok = ok && cJSON_AddTrueToObject(cfg, "init_lora_weights");
    ok = ok && cJSON_AddNullToObject(cfg, "layer_replication");
    ok = ok && cJSON_AddNullToObject(cfg, "layers_pattern");
    ok = ok && cJSON_AddNullToObject(cfg, "layers_to_transform");
    ok = ok && cJSON_AddObjectToObject(cfg, "loftq_config");
    ok = ok && cJSON_AddNumberToObject(cfg, "lora_alpha", c->alpha);
    ok = ok && cJSON_AddNumberToObject(cfg, "lora_dropout", c->dropout);
    ok = ok && cJSON_AddNullToObject(cfg, "megatron_config");
    ok = ok && cJSON_AddStringToObject(cfg, "megatron_core", "megatron.core");
    ok = ok && cJSON_AddNullToObject(cfg, "modules_to_save");
    ok = ok && cJSON_AddStringToObject(cfg, "peft_type", "LORA");
    ok = ok && cJSON_AddNumberToObject(cfg, "r", (double)c->r);
    ok = ok && cJSON_AddItemToObject(cfg, "rank_pattern", rank);
    ok = ok && cJSON_AddNullToObject(cfg, "revision");
    if (!ok) {
        cJSON_Delete(cfg);
        return tuna_fail_oom("adapter config", 0);
    }
    if (c->targets) {
        cJSON *arr = cJSON_AddArrayToObject(cfg, "target_modules");
        for (int i = 0; arr && i < c->n_targets; i++) {
            cJSON *s = cJSON_CreateString(c->targets[i]);
            if (!s || !cJSON_AddItemToArray(arr, s)) arr = NULL;
        }
        if (!arr) st = tuna_fail_oom("target_modules", 0);
    } else if (c->target_regex) {
        if (!cJSON_AddStringToObject(cfg, "target_modules", c->target_regex)) st = tuna_fail_oom("target_modules", 0);
    } else {
        st = derive_targets(mods, n, cfg);
    }
    ok = !st && cJSON_AddStringToObject(cfg, "task_type", "CAUSAL_LM");
    ok = ok && cJSON_AddFalseToObject(cfg, "use_dora");
    ok = ok && cJSON_AddBoolToObject(cfg, "use_rslora", c->use_rslora);
    if (!ok) {
        cJSON_Delete(cfg);
        return st ? st : tuna_fail_oom("adapter config", 0);
    }
    *out = cfg;
    return TUNA_OK;
}

static tuna_status check_modules(const struct tuna_peft_config *c, const struct tuna_peft_module *mods, int n)
{
    if (n < 1) return tuna_fail(TUNA_E_INVALID, "export adapter: no modules to write");
    if (c->r < 1)
        return tuna_fail(TUNA_E_INVALID, "export adapter: r = %lld; the rank must be at least 1", (long long)c->r);
    if (c->dtype != TUNA_DTYPE_INVALID && c->dtype != TUNA_DTYPE_F32 && c->dtype != TUNA_DTYPE_BF16 &&
        c->dtype != TUNA_DTYPE_F16)
        return tuna_fail(TUNA_E_INVALID, "export adapter: dtype %s; adapters are written as F32, BF16 or F16",
                         tuna_dtype_name(c->dtype));
    for (int i = 0; i < n; i++) {
        const struct tuna_peft_module *m = &mods[i];
        if (!m->name || !m->name[0] || !m->A || !m->B || m->r < 1 || m->in < 1 || m->out < 1)
            return tuna_fail(TUNA_E_INVALID, "export adapter: module %d (%s) has no name, no weights or an empty shape",
                             i, m->name ? m->name : "?");
        for (int j = 0; j < i; j++)
            if (!strcmp(mods[j].name, m->name))
                return tuna_fail(TUNA_E_INVALID, "export adapter: module %s is given twice", m->name);
    }
    return TUNA_OK;
}

static tuna_status add_matrix(tuna_st_writer *w, const char *name, const char *part, enum tuna_dtype dt, int64_t rows,
                              int64_t cols, const float *data)
{
    char key[1024];
    if ((size_t)snprintf(key, sizeof key, "base_model.model.%s.lora_%s.weight", name, part) >= sizeof key)
        return tuna_fail(TUNA_E_INVALID, "export adapter: module name %s is too long", name);
    int64_t shape[2] = {rows, cols};
    size_t n = (size_t)(rows * cols);
    if (dt == TUNA_DTYPE_F32) return tuna_st_writer_add(w, key, dt, 2, shape, data, n * sizeof(float), true);
    size_t nb = tuna_dtype_nbytes(dt, n);
    void *buf = malloc(nb);
    if (!buf) return tuna_fail_oom("adapter tensor", nb);
    tuna_convert_from_f32(dt, data, buf, n);
    tuna_status st = tuna_st_writer_add(w, key, dt, 2, shape, buf, nb, true);
    free(buf);
    return st;
}

tuna_status tuna_export_peft(const char *out_dir, const struct tuna_peft_config *c, const struct tuna_peft_module *mods,
                             int n, bool replace)
{
    tuna_status st = check_modules(c, mods, n);
    if (st) return st;
    if (!replace && tuna_path_exists(out_dir))
        return tuna_fail(TUNA_E_INVALID, "%s already exists: choose a new output folder (or replace it: --force)",
                         out_dir);
    enum tuna_dtype dt = c->dtype == TUNA_DTYPE_INVALID ? TUNA_DTYPE_F32 : c->dtype;
    cJSON *cfg = NULL;
    tuna_st_writer *w = NULL;
    char *tmp = NULL, *path = NULL;
    if ((st = build_config(c, mods, n, &cfg))) return st;
    if ((st = tuna_st_writer_new(&w))) goto done;
    for (int i = 0; !st && i < n; i++) {
        st = add_matrix(w, mods[i].name, "A", dt, mods[i].r, mods[i].in, mods[i].A);
        if (!st) st = add_matrix(w, mods[i].name, "B", dt, mods[i].out, mods[i].r, mods[i].B);
    }
    if (st) goto done;
    if ((st = tuna_atomic_dir_begin(out_dir, &tmp))) goto done;
    path = tuna_path_join(tmp, "adapter_model.safetensors");
    st = path ? tuna_st_writer_save(w, path) : tuna_fail_oom("path", 0);
    free(path);
    path = tuna_path_join(tmp, "adapter_config.json");
    if (!st) st = path ? tuna_json_save(path, cfg) : tuna_fail_oom("path", 0);
    if (!st) st = tuna_atomic_dir_commit(tmp, out_dir, replace);
    if (st) tuna_atomic_dir_abort(tmp);
done:
    free(path);
    free(tmp);
    tuna_st_writer_free(w);
    cJSON_Delete(cfg);
    return st ? tuna_fail_prefix(st, "exporting adapter to %s", out_dir) : TUNA_OK;
}

tuna_status tuna_export_adapter(const struct tuna_lora_adapter *a, const char *out_dir, bool replace)
{
    struct tuna_peft_module *mods = calloc((size_t)(a->n_modules ? a->n_modules : 1), sizeof *mods);
    if (!mods) return tuna_fail_oom("modules", (size_t)a->n_modules);
    for (int i = 0; i < a->n_modules; i++) {
        const struct tuna_lora_module *m = &a->modules[i];
        mods[i] = (struct tuna_peft_module){m->name, m->r, m->in, m->out, m->alpha, m->A, m->B};
    }
    struct tuna_peft_config c = {
        .r = a->r,
        .alpha = a->alpha,
        .use_rslora = a->use_rslora,
        .base_model = a->base_model,
        .targets = a->targets ? (const char *const *)a->targets : NULL,
        .n_targets = a->n_targets,
        .target_regex = a->target_regex,
        .dtype = a->file_dtype,
    };
    tuna_status st = tuna_export_peft(out_dir, &c, mods, a->n_modules, replace);
    free(mods);
    return st;
}
