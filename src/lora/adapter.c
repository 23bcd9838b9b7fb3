/* adapter.c — loading a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)
 * into float32 A/B per module, with PEFT's rank/alpha patterns and scaling. Refuses, with a
 * message, what the forward pass and the merge do not implement (see lora.h). */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "core/strmap.h"
#include "io/safetensors.h"
#include "lora/lora.h"

#define KEY_PREFIX "base_model.model."

float tuna_lora_scale(double alpha, int64_t r, bool use_rslora)
{
    return (float)(use_rslora ? alpha / sqrt((double)r) : alpha / (double)r);
}

tuna_status tuna_lora_pattern_match(const char *key, const char *name, bool *match)
{
    *match = false;
    size_t n = strlen(key) + 32;
    char *re = malloc(n);
    if (!re) return tuna_fail_oom("pattern", n);
    snprintf(re, n, "(.*\\.)?(%s)$", key);
    int err;
    PCRE2_SIZE off;
    pcre2_code *code =
        pcre2_compile((PCRE2_SPTR)re, PCRE2_ZERO_TERMINATED, PCRE2_ANCHORED | PCRE2_UTF, &err, &off, NULL);
    free(re);
    if (!code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return tuna_fail(TUNA_E_FORMAT, "rank/alpha pattern \"%s\" is not a valid regex: %s", key, (const char *)msg);
    }
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(code, NULL);
    if (!md) {
        pcre2_code_free(code);
        return tuna_fail_oom("regex match data", 0);
    }
    int rc = pcre2_match(code, (PCRE2_SPTR)name, strlen(name), 0, 0, md, NULL);
    pcre2_match_data_free(md);
    pcre2_code_free(code);
    *match = rc >= 0;
    return TUNA_OK;
}

void tuna_lora_free(struct tuna_lora_adapter *a)
{
    if (!a) return;
    for (int i = 0; i < a->n_modules; i++) {
        free(a->modules[i].name);
        free(a->modules[i].A);
        free(a->modules[i].B);
    }
    free(a->modules);
    for (int i = 0; i < a->n_targets; i++)
        free(a->targets[i]);
    free(a->targets);
    free(a->target_regex);
    free(a->base_model);
    free(a->dir);
    free(a);
}

const struct tuna_lora_module *tuna_lora_find(const struct tuna_lora_adapter *a, const char *name)
{
    int lo = 0, hi = a->n_modules - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        int c = strcmp(a->modules[mid].name, name);
        if (c == 0) return &a->modules[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return NULL;
}

/* --- adapter_config.json --- */

/* A member that is present, not null and not an empty list/object/false/"none". */
static bool is_set(const cJSON *v)
{
    if (!v || cJSON_IsNull(v)) return false;
    if (cJSON_IsFalse(v)) return false;
    if ((cJSON_IsArray(v) || cJSON_IsObject(v)) && cJSON_GetArraySize(v) == 0) return false;
    return true;
}

static tuna_status refuse_unsupported(const cJSON *cfg, const char *where)
{
    static const struct {
        const char *key, *what;
    } k_refused[] = {
        {"use_dora",
         "DoRA (use_dora: true) is not supported; merge it with PEFT (merge_and_unload) or train a plain LoRA"},
        {"modules_to_save",
         "modules_to_save (full copies of extra modules) is not supported; only LoRA A/B weights are"},
        {"lora_bias", "lora_bias: true (a bias on lora_B) is not supported"},
        {"fan_in_fan_out", "fan_in_fan_out: true (Conv1D-style weights) is not supported for Llama-family models"},
        {"layer_replication", "layer_replication is not supported"},
        {"use_qalora", "QA-LoRA (use_qalora: true) is not supported"},
        {"alora_invocation_tokens", "aLoRA (alora_invocation_tokens) is not supported"},
        {"trainable_token_indices", "trainable_token_indices (trainable tokens) is not supported"},
        {"target_parameters", "target_parameters (LoRA on parameters, MoE experts) is not supported"},
    };
    for (size_t i = 0; i < sizeof k_refused / sizeof k_refused[0]; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, k_refused[i].key);
        if (is_set(v)) return tuna_fail(TUNA_E_UNSUPPORTED, "%s: %s", where, k_refused[i].what);
    }
    const cJSON *bias = cJSON_GetObjectItemCaseSensitive(cfg, "bias");
    if (bias && !cJSON_IsNull(bias)) {
        if (!cJSON_IsString(bias))
            return tuna_fail(TUNA_E_FORMAT, "%s: \"bias\" should be a string (\"none\", \"all\", \"lora_only\")",
                             where);
        if (strcmp(bias->valuestring, "none") != 0)
            return tuna_fail(TUNA_E_UNSUPPORTED,
                             "%s: bias \"%s\" is not supported (the adapter trains biases); only \"none\" is", where,
                             bias->valuestring);
    }
    return TUNA_OK;
}

/* r and alpha of module `name`: rank_pattern / alpha_pattern, else the config's. */
static tuna_status module_r_alpha(const cJSON *cfg, const struct tuna_lora_adapter *a, const char *name,
                                  const char *where, int64_t *r, double *alpha)
{
    *r = a->r;
    *alpha = a->alpha;
    const char *names[2] = {"rank_pattern", "alpha_pattern"};
    for (int p = 0; p < 2; p++) {
        const cJSON *pat = tuna_json_member(cfg, names[p]);
        if (!pat) continue;
        if (!cJSON_IsObject(pat)) return tuna_fail(TUNA_E_FORMAT, "%s: \"%s\" should be an object", where, names[p]);
        const cJSON *it;
        cJSON_ArrayForEach(it, pat)
        {
            bool m;
            tuna_status st = tuna_lora_pattern_match(it->string, name, &m);
            if (st) return tuna_fail_prefix(st, "%s: %s", where, names[p]);
            if (!m) continue;
            if (!cJSON_IsNumber(it))
                return tuna_fail(TUNA_E_FORMAT, "%s: %s[\"%s\"] should be a number", where, names[p], it->string);
            if (p == 0) {
                if (it->valuedouble != floor(it->valuedouble) || it->valuedouble < 1)
                    return tuna_fail(TUNA_E_FORMAT, "%s: rank_pattern[\"%s\"] = %g is not a positive integer", where,
                                     it->string, it->valuedouble);
                *r = (int64_t)it->valuedouble;
            } else {
                *alpha = it->valuedouble;
            }
            break;
        }
    }
    return TUNA_OK;
}

static tuna_status parse_config(const char *dir, cJSON **cfg_out, struct tuna_lora_adapter *a)
{
    char *path = tuna_path_join(dir, "adapter_config.json");
    if (!path) return tuna_fail_oom("path", 0);
    if (!tuna_path_exists(path)) {
        tuna_status st = tuna_fail(TUNA_E_NOT_FOUND,
                                   "%s not found: an adapter folder holds adapter_config.json and "
                                   "adapter_model.safetensors (as PEFT's save_pretrained writes them)",
                                   path);
        free(path);
        return st;
    }
    cJSON *cfg = NULL;
    tuna_status st = tuna_json_load(path, 0, &cfg);
    if (st) goto out;
    if (!cJSON_IsObject(cfg)) {
        st = tuna_fail(TUNA_E_FORMAT, "%s: expected a JSON object", path);
        goto out;
    }
    const char *pt = NULL;
    if (!tuna_json_get_str(cfg, "peft_type", &pt, &st, path)) {
        if (!st)
            st = tuna_fail(TUNA_E_FORMAT, "%s: no \"peft_type\"; a PEFT LoRA adapter says \"peft_type\": \"LORA\"",
                           path);
        goto out;
    }
    if (strcmp(pt, "LORA") != 0) {
        st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: peft_type \"%s\" is not supported; only LORA adapters are", path, pt);
        goto out;
    }
    if ((st = refuse_unsupported(cfg, path))) goto out;
    a->r = 8;
    a->alpha = 8;
    if (!tuna_json_get_int(cfg, "r", &a->r, &st, path) && st) goto out;
    if (a->r < 1) {
        st = tuna_fail(TUNA_E_FORMAT, "%s: r = %lld; the rank must be at least 1", path, (long long)a->r);
        goto out;
    }
    if (!tuna_json_get_num(cfg, "lora_alpha", &a->alpha, &st, path) && st) goto out;
    if (!tuna_json_get_bool(cfg, "use_rslora", &a->use_rslora, &st, path) && st) goto out;
    const char *bm = NULL;
    if (tuna_json_get_str(cfg, "base_model_name_or_path", &bm, &st, path)) {
        a->base_model = strdup(bm);
        if (!a->base_model) st = tuna_fail_oom("base model name", strlen(bm));
    }
    if (st) goto out;
    const cJSON *tm = tuna_json_member(cfg, "target_modules");
    if (cJSON_IsString(tm)) {
        a->target_regex = strdup(tm->valuestring);
        if (!a->target_regex) st = tuna_fail_oom("target_modules", 0);
    } else if (cJSON_IsArray(tm)) {
        int n = cJSON_GetArraySize(tm);
        a->targets = calloc((size_t)(n ? n : 1), sizeof(char *));
        if (!a->targets) st = tuna_fail_oom("target_modules", 0);
        const cJSON *it;
        cJSON_ArrayForEach(it, tm)
        {
            if (st) break;
            if (!cJSON_IsString(it)) {
                st = tuna_fail(TUNA_E_FORMAT, "%s: target_modules should hold strings", path);
                break;
            }
            a->targets[a->n_targets] = strdup(it->valuestring);
            if (!a->targets[a->n_targets]) st = tuna_fail_oom("target_modules", 0);
            a->n_targets++;
        }
    } else if (tm) {
        st = tuna_fail(TUNA_E_FORMAT, "%s: target_modules should be a list of names or a regex string", path);
    }
out:
    if (st) {
        cJSON_Delete(cfg);
        cfg = NULL;
    }
    *cfg_out = cfg;
    free(path);
    return st;
}

/* --- adapter_model.safetensors --- */

enum part { PART_A, PART_B };

/* Classifies a tensor name: on success (*mod, *mlen) is the module path and *part A or B. */
static tuna_status classify(const char *file, const char *name, const char **mod, size_t *mlen, enum part *part)
{
    if (strncmp(name, KEY_PREFIX, strlen(KEY_PREFIX)) != 0)
        return tuna_fail(TUNA_E_FORMAT,
                         "%s: tensor \"%s\" does not start with \"" KEY_PREFIX "\" as PEFT names LoRA weights", file,
                         name);
    const char *p = name + strlen(KEY_PREFIX);
    static const struct {
        const char *suffix;
        int part;
    } k_suffix[] = {
        {".lora_A.weight", PART_A},
        {".lora_B.weight", PART_B},
        {".lora_A.default.weight", PART_A},
        {".lora_B.default.weight", PART_B},
    };
    size_t n = strlen(p);
    for (size_t i = 0; i < sizeof k_suffix / sizeof k_suffix[0]; i++) {
        size_t sl = strlen(k_suffix[i].suffix);
        if (n > sl && !strcmp(p + n - sl, k_suffix[i].suffix)) {
            *mod = p;
            *mlen = n - sl;
            *part = (enum part)k_suffix[i].part;
            return TUNA_OK;
        }
    }
    if (strstr(p, "lora_magnitude_vector"))
        return tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor \"%s\" is a DoRA magnitude vector; DoRA is not supported",
                         file, name);
    if (strstr(p, "lora_embedding_"))
        return tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor \"%s\" is LoRA on an embedding layer, which is not supported",
                         file, name);
    if (strstr(p, ".lora_B.") && n > 5 && !strcmp(p + n - 5, ".bias"))
        return tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor \"%s\" is a lora_B bias (lora_bias); not supported", file,
                         name);
    return tuna_fail(TUNA_E_UNSUPPORTED,
                     "%s: tensor \"%s\" is not a LoRA A/B weight (modules_to_save or a trained bias?); tuna loads "
                     "only \"*.lora_A.weight\" / \"*.lora_B.weight\"",
                     file, name);
}

static int cmp_module(const void *x, const void *y)
{
    return strcmp(((const struct tuna_lora_module *)x)->name, ((const struct tuna_lora_module *)y)->name);
}

/* re.fullmatch(re, name) */
static tuna_status full_match(const char *re, const char *name, const char *what, bool *match)
{
    int err;
    PCRE2_SIZE off;
    *match = false;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)re, PCRE2_ZERO_TERMINATED,
                                     PCRE2_ANCHORED | PCRE2_ENDANCHORED | PCRE2_UTF, &err, &off, NULL);
    if (!code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return tuna_fail(TUNA_E_FORMAT, "%s \"%s\" is not a valid regex: %s", what, re, (const char *)msg);
    }
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(code, NULL);
    if (!md) {
        pcre2_code_free(code);
        return tuna_fail_oom("regex match data", 0);
    }
    *match = pcre2_match(code, (PCRE2_SPTR)name, strlen(name), 0, 0, md, NULL) >= 0;
    pcre2_match_data_free(md);
    pcre2_code_free(code);
    return TUNA_OK;
}

/* Whether PEFT's check_target_module_exists would pick module `name` for a target spec (a list:
 * equal or ending in "." + entry; a string: "all-linear" or a regex that fully matches). */
static tuna_status spec_matches(const cJSON *spec, const char *name, const char *what, bool *match)
{
    *match = false;
    if (cJSON_IsString(spec)) {
        if (!strcmp(spec->valuestring, "all-linear")) {
            *match = strcmp(name, "lm_head") != 0;
            return TUNA_OK;
        }
        return full_match(spec->valuestring, name, what, match);
    }
    const cJSON *it;
    size_t n = strlen(name);
    cJSON_ArrayForEach(it, spec)
    {
        if (!cJSON_IsString(it)) continue;
        size_t m = strlen(it->valuestring);
        if (!strcmp(name, it->valuestring) ||
            (n > m && name[n - m - 1] == '.' && !strcmp(name + n - m, it->valuestring))) {
            *match = true;
            break;
        }
    }
    return TUNA_OK;
}

/* Every module with weights in the file must be one PEFT adapts under this config, else PEFT
 * would silently drop its weights and tuna would compute something else. */
static tuna_status check_targets(const cJSON *cfg, const struct tuna_lora_module *m, const char *file)
{
    const cJSON *tm = tuna_json_member(cfg, "target_modules");
    const cJSON *ex = tuna_json_member(cfg, "exclude_modules");
    const cJSON *lt = tuna_json_member(cfg, "layers_to_transform");
    bool match;
    tuna_status st;
    if (tm) {
        if ((st = spec_matches(tm, m->name, "target_modules", &match))) return st;
        if (!match)
            return tuna_fail(TUNA_E_FORMAT,
                             "%s has weights for %s, which target_modules of adapter_config.json does not name; PEFT "
                             "would ignore them. Fix target_modules or remove the tensors",
                             file, m->name);
    }
    if (ex && (cJSON_IsString(ex) || cJSON_IsArray(ex))) {
        if ((st = spec_matches(ex, m->name, "exclude_modules", &match))) return st;
        if (match)
            return tuna_fail(TUNA_E_FORMAT,
                             "%s has weights for %s, which exclude_modules excludes; PEFT would ignore them", file,
                             m->name);
    }
    if (lt && (cJSON_IsNumber(lt) || cJSON_IsArray(lt))) {
        const char *p = strstr(m->name, "layers.");
        long layer = -1;
        if (p) {
            char *end;
            layer = strtol(p + 7, &end, 10);
            if (end == p + 7 || *end != '.') layer = -1;
        }
        bool in = false;
        if (cJSON_IsNumber(lt)) {
            in = layer == (long)lt->valuedouble;
        } else {
            const cJSON *it;
            cJSON_ArrayForEach(it, lt) in = in || (cJSON_IsNumber(it) && layer == (long)it->valuedouble);
        }
        if (!in)
            return tuna_fail(TUNA_E_FORMAT,
                             "%s has weights for %s, outside layers_to_transform of adapter_config.json; PEFT would "
                             "ignore them",
                             file, m->name);
    }
    return TUNA_OK;
}

static tuna_status load_weights(const char *dir, const cJSON *cfg, struct tuna_lora_adapter *a)
{
    char *bin = tuna_path_join(dir, "adapter_model.bin");
    char *sf = tuna_path_join(dir, "adapter_model.safetensors");
    tuna_status st = TUNA_OK;
    if (!bin || !sf) st = tuna_fail_oom("path", 0);
    if (!st && !tuna_path_exists(sf)) {
        if (tuna_path_exists(bin))
            st = tuna_fail(TUNA_E_UNSUPPORTED,
                           "%s holds adapter_model.bin (a pickle); tuna reads adapter_model.safetensors only. Re-save "
                           "with PEFT's save_pretrained(safe_serialization=True)",
                           dir);
        else
            st = tuna_fail(TUNA_E_NOT_FOUND, "%s not found", sf);
    }
    tuna_st_set *set = NULL;
    if (!st) st = tuna_st_set_open_file(sf, &set);
    const char *file = sf;
    struct tuna_strmap idx;
    tuna_strmap_init(&idx);
    size_t nt = set ? tuna_st_set_count(set) : 0;
    /* views of A and B per module, in first-seen order */
    const struct tuna_tensor_view **views = NULL;
    if (!st) {
        views = calloc(2 * (nt ? nt : 1), sizeof *views);
        a->modules = calloc(nt ? nt : 1, sizeof *a->modules);
        if (!views || !a->modules) st = tuna_fail_oom("adapter modules", nt);
    }
    for (size_t i = 0; !st && i < nt; i++) {
        const struct tuna_tensor_view *t = tuna_st_set_at(set, i);
        const char *mod = NULL;
        size_t mlen = 0;
        enum part part = PART_A;
        if ((st = classify(file, t->name, &mod, &mlen, &part))) break;
        int64_t mi;
        if (!tuna_strmap_get(&idx, mod, mlen, &mi)) {
            mi = a->n_modules++;
            a->modules[mi].name = strndup(mod, mlen);
            if (!a->modules[mi].name || !tuna_strmap_put(&idx, mod, mlen, mi, NULL)) {
                st = tuna_fail_oom("module name", mlen);
                break;
            }
        }
        if (views[2 * mi + part]) {
            st = tuna_fail(TUNA_E_FORMAT, "%s: module %s has two lora_%c tensors (\"%s\")", file, a->modules[mi].name,
                           part == PART_A ? 'A' : 'B', t->name);
            break;
        }
        if (t->dtype != TUNA_DTYPE_F32 && t->dtype != TUNA_DTYPE_BF16 && t->dtype != TUNA_DTYPE_F16) {
            st = tuna_fail(TUNA_E_FORMAT, "%s: tensor \"%s\" has dtype %s; LoRA weights must be F32, BF16 or F16", file,
                           t->name, tuna_dtype_name(t->dtype));
            break;
        }
        if (t->ndim != 2) {
            st = tuna_fail(TUNA_E_FORMAT, "%s: tensor \"%s\" has %d dimensions; LoRA A/B weights are 2-D", file,
                           t->name, t->ndim);
            break;
        }
        a->file_dtype = t->dtype;
        views[2 * mi + part] = t;
    }
    if (!st && a->n_modules == 0)
        st = tuna_fail(TUNA_E_FORMAT, "%s holds no LoRA weights (no \"*.lora_A.weight\" tensors)", file);
    for (int i = 0; !st && i < a->n_modules; i++) {
        struct tuna_lora_module *m = &a->modules[i];
        const struct tuna_tensor_view *A = views[2 * i], *B = views[2 * i + 1];
        if (!A || !B) {
            st = tuna_fail(TUNA_E_FORMAT, "%s: module %s has lora_%c but no lora_%c weight", file, m->name,
                           A ? 'A' : 'B', A ? 'B' : 'A');
            break;
        }
        if (A->shape[0] != B->shape[1]) {
            st = tuna_fail(TUNA_E_FORMAT,
                           "%s: module %s: lora_A is [%lld, %lld] but lora_B is [%lld, %lld]; the ranks differ", file,
                           m->name, (long long)A->shape[0], (long long)A->shape[1], (long long)B->shape[0],
                           (long long)B->shape[1]);
            break;
        }
        m->r = A->shape[0];
        m->in = A->shape[1];
        m->out = B->shape[0];
        if ((st = check_targets(cfg, m, file))) break;
        int64_t want_r;
        if ((st = module_r_alpha(cfg, a, m->name, "adapter_config.json", &want_r, &m->alpha))) break;
        if (want_r != m->r) {
            st = tuna_fail(TUNA_E_FORMAT,
                           "%s: module %s has rank %lld in the weights, but adapter_config.json gives it r = %lld "
                           "(r / rank_pattern); the config does not belong to these weights",
                           file, m->name, (long long)m->r, (long long)want_r);
            break;
        }
        if (m->r < 1 || m->in < 1 || m->out < 1) {
            st = tuna_fail(TUNA_E_FORMAT, "%s: module %s has an empty dimension", file, m->name);
            break;
        }
        m->scale = tuna_lora_scale(m->alpha, m->r, a->use_rslora);
        m->A = malloc(sizeof(float) * A->numel);
        m->B = malloc(sizeof(float) * B->numel);
        if (!m->A || !m->B) {
            st = tuna_fail_oom("LoRA weights", sizeof(float) * (A->numel + B->numel));
            break;
        }
        if ((st = tuna_tensor_to_f32(A, m->A)) || (st = tuna_tensor_to_f32(B, m->B))) break;
    }
    if (!st) qsort(a->modules, (size_t)a->n_modules, sizeof *a->modules, cmp_module);
    tuna_strmap_free(&idx);
    free(views);
    tuna_st_set_close(set);
    free(bin);
    free(sf);
    return st;
}

tuna_status tuna_lora_load(const char *dir, struct tuna_lora_adapter **out)
{
    *out = NULL;
    struct tuna_lora_adapter *a = calloc(1, sizeof *a);
    if (!a) return tuna_fail_oom("adapter", sizeof *a);
    a->dir = strdup(dir);
    cJSON *cfg = NULL;
    tuna_status st = a->dir ? parse_config(dir, &cfg, a) : tuna_fail_oom("path", 0);
    if (!st) st = load_weights(dir, cfg, a);
    cJSON_Delete(cfg);
    if (st) {
        tuna_lora_free(a);
        return tuna_fail_prefix(st, "loading adapter %s", dir);
    }
    *out = a;
    return TUNA_OK;
}
