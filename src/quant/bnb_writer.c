/* bnb_writer.c — writing bitsandbytes 4-bit weights the way transformers' save_pretrained
 * does (docs/FORMATS.md §2.1–2.4), and `tuna quantize`: a 16-bit model folder → a pre-quantized
 * bnb checkpoint (quantized tensors, quant_state JSON, quantization_config in config.json, the
 * other files copied), written to a temporary folder and renamed.
 */
#include "quant/bnb.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"

void tuna_py_float_repr(double d, char *buf, size_t cap)
{
    if (isnan(d)) {
        snprintf(buf, cap, "NaN");
        return;
    }
    if (isinf(d)) {
        snprintf(buf, cap, d > 0 ? "Infinity" : "-Infinity");
        return;
    }
    char tmp[64];
    int prec = 0;
    for (; prec < 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec, d);
        if (strtod(tmp, NULL) == d) break;
    }
    /* tmp = [-]D[.DDD]e±XX → digits and decimal exponent */
    char digits[32];
    int nd = 0;
    const char *p = tmp;
    bool neg = *p == '-';
    if (neg) p++;
    for (; *p && *p != 'e'; p++)
        if (*p != '.') digits[nd++] = *p;
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = '\0';
    int exp10 = atoi(p + 1);
    int decpt = exp10 + 1;
    char out[96];
    size_t o = 0;
    if (neg) out[o++] = '-';
    if (d == 0) {
        snprintf(buf, cap, "%s0.0", neg ? "-" : "");
        return;
    }
    if (decpt > -4 && decpt <= 16) {
        if (decpt <= 0) {
            out[o++] = '0';
            out[o++] = '.';
            for (int i = 0; i < -decpt; i++) out[o++] = '0';
            for (int i = 0; i < nd; i++) out[o++] = digits[i];
        } else if (decpt >= nd) {
            for (int i = 0; i < nd; i++) out[o++] = digits[i];
            for (int i = nd; i < decpt; i++) out[o++] = '0';
            out[o++] = '.';
            out[o++] = '0';
        } else {
            for (int i = 0; i < nd; i++) {
                if (i == decpt) out[o++] = '.';
                out[o++] = digits[i];
            }
        }
        out[o] = '\0';
    } else {
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++) out[o++] = digits[i];
        }
        snprintf(out + o, sizeof out - o, "e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
    }
    snprintf(buf, cap, "%s", out);
}

char *tuna_bnb_quant_state_json(const struct tuna_q4_weight *w)
{
    const char *dt = tuna_dtype_torch_name(w->dtype);
    char *s = malloc(512);
    if (!s) return NULL;
    int k;
    if (w->shape_1d)
        k = snprintf(s, 512, "{\"quant_type\": \"%s\", \"blocksize\": %d, \"dtype\": \"%s\", \"shape\": [%lld]",
                     tuna_q4_type_name(w->type), w->blocksize, dt ? dt : "float32", (long long)w->numel);
    else
        k = snprintf(s, 512, "{\"quant_type\": \"%s\", \"blocksize\": %d, \"dtype\": \"%s\", \"shape\": [%lld, %lld]",
                     tuna_q4_type_name(w->type), w->blocksize, dt ? dt : "float32", (long long)w->rows,
                     (long long)w->cols);
    if (w->nested) {
        char off[64];
        tuna_py_float_repr((double)w->nested_offset, off, sizeof off);
        k += snprintf(s + k, 512 - (size_t)k,
                      ", \"nested_blocksize\": %d, \"nested_dtype\": \"float32\", \"nested_offset\": %s",
                      w->nested_blocksize, off);
    }
    snprintf(s + k, 512 - (size_t)k, "}");
    return s;
}

static tuna_status add_sub(tuna_st_writer *wr, const char *weight, const char *suffix, enum tuna_dtype dt,
                           int ndim, const int64_t *shape, const void *data, size_t nbytes)
{
    char name[1024];
    int k = snprintf(name, sizeof name, "%s%s", weight, suffix);
    if (k < 0 || (size_t)k >= sizeof name) return tuna_fail(TUNA_E_INVALID, "tensor name too long: %s", weight);
    return tuna_st_writer_add(wr, name, dt, ndim, shape, data, nbytes, true);
}

tuna_status tuna_bnb_writer_add(tuna_st_writer *wr, const char *weight_name, const struct tuna_q4_weight *w)
{
    tuna_status st;
    int64_t shp[2] = {(w->numel + 1) / 2, 1};
    if ((st = add_sub(wr, weight_name, "", TUNA_DTYPE_U8, 2, shp, w->codes, (size_t)shp[0]))) return st;
    int64_t nb = w->n_blocks;
    if (w->nested) {
        if ((st = add_sub(wr, weight_name, ".absmax", TUNA_DTYPE_U8, 1, &nb, w->qabsmax, (size_t)nb))) return st;
        int64_t nn = w->n_nested, n256 = 256;
        if ((st = add_sub(wr, weight_name, ".nested_absmax", TUNA_DTYPE_F32, 1, &nn, w->nested_absmax,
                          sizeof(float) * (size_t)nn)))
            return st;
        if ((st = add_sub(wr, weight_name, ".nested_quant_map", TUNA_DTYPE_F32, 1, &n256, w->nested_code,
                          sizeof w->nested_code)))
            return st;
    } else if ((st = add_sub(wr, weight_name, ".absmax", TUNA_DTYPE_F32, 1, &nb, w->absmax, sizeof(float) * (size_t)nb))) {
        return st;
    }
    int64_t n16 = 16;
    if ((st = add_sub(wr, weight_name, ".quant_map", TUNA_DTYPE_F32, 1, &n16, w->code, sizeof w->code))) return st;
    char *js = tuna_bnb_quant_state_json(w);
    if (!js) return tuna_fail_oom("quant_state JSON", 512);
    int64_t len = (int64_t)strlen(js);
    st = add_sub(wr, weight_name, w->type == TUNA_Q4_FP4 ? ".quant_state.bitsandbytes__fp4" : ".quant_state.bitsandbytes__nf4",
                 TUNA_DTYPE_U8, 1, &len, js, (size_t)len);
    free(js);
    return st;
}

bool tuna_bnb_should_quantize(const char *name, int ndim, const char *const *skip, int n_skip)
{
    static const char *const dflt[] = {"lm_head"};
    size_t n = strlen(name);
    if (ndim != 2 || n < 8 || strcmp(name + n - 7, ".weight") != 0) return false;
    /* decoder layers of the llama family only (GPT-2 style Conv1D weights would need a transpose) */
    if (!strstr(name, ".layers.")) return false;
    if (strstr(name, "norm") || strstr(name, "embed")) return false;
    if (!skip) {
        skip = dflt;
        n_skip = 1;
    }
    for (int i = 0; i < n_skip; i++) {
        size_t m = strlen(skip[i]);
        /* substring of the module name (the name without ".weight") */
        for (size_t j = 0; m && j + m <= n - 7; j++)
            if (memcmp(name + j, skip[i], m) == 0) return false;
    }
    return true;
}

/* --- config.json --- */

/* Replaces every number of the parsed document by its literal from the source text (as raw
 * JSON), so that 500000.0 stays 500000.0 and 1e-05 stays 1e-05 when written back. */
static const char *next_number(const char *p, const char *end, const char **lit_end)
{
    while (p < end) {
        if (*p == '"') {
            for (p++; p < end && *p != '"'; p++)
                if (*p == '\\') p++;
            p++;
            continue;
        }
        if (*p == '-' || (*p >= '0' && *p <= '9')) {
            const char *s = p;
            while (p < end && strchr("+-0123456789.eE", *p)) p++;
            *lit_end = p;
            return s;
        }
        p++;
    }
    return NULL;
}

static bool keep_literals(cJSON *node, const char **pos, const char *end)
{
    for (cJSON *c = node->child; c; c = c->next) {
        if (cJSON_IsNumber(c)) {
            const char *le;
            const char *s = next_number(*pos, end, &le);
            if (!s) return false;
            char *lit = malloc((size_t)(le - s) + 1);
            if (!lit) return false;
            memcpy(lit, s, (size_t)(le - s));
            lit[le - s] = '\0';
            c->type = cJSON_Raw;
            c->valuestring = lit;
            *pos = le;
        } else if (cJSON_IsObject(c) || cJSON_IsArray(c)) {
            if (!keep_literals(c, pos, end)) return false;
        }
    }
    return true;
}

static tuna_status write_config(const char *src, const char *dst_dir, const struct tuna_bnb_quantize_opts *o,
                                enum tuna_dtype dtype)
{
    char *path = tuna_path_join(src, "config.json");
    char *text = NULL;
    size_t len = 0;
    cJSON *doc = NULL;
    tuna_status st = path ? tuna_read_file(path, 64 << 20, &text, &len) : tuna_fail_oom("path", 0);
    if (!st) st = tuna_json_parse(text, len, path, &doc);
    if (!st && !cJSON_IsObject(doc)) st = tuna_fail(TUNA_E_FORMAT, "%s is not a JSON object", path);
    const char *pos = text;
    if (!st && !keep_literals(doc, &pos, text + len)) st = tuna_fail(TUNA_E_FORMAT, "%s: cannot re-read numbers", path);
    free(path);
    free(text);
    if (st) goto done;
    const char *dkey = tuna_json_member(doc, "torch_dtype") ? "torch_dtype" : "dtype";
    const char *dname = tuna_dtype_torch_name(dtype);
    if (dname) {
        cJSON *dv = cJSON_CreateString(dname);
        if (cJSON_GetObjectItemCaseSensitive(doc, dkey))
            cJSON_ReplaceItemInObjectCaseSensitive(doc, dkey, dv);
        else
            cJSON_AddItemToObject(doc, dkey, dv);
    }
    enum tuna_dtype cd = o->compute_dtype != TUNA_DTYPE_INVALID ? o->compute_dtype : dtype;
    cJSON *q = cJSON_CreateObject();
    cJSON_AddBoolToObject(q, "_load_in_4bit", 1);
    cJSON_AddBoolToObject(q, "_load_in_8bit", 0);
    cJSON_AddStringToObject(q, "bnb_4bit_compute_dtype", tuna_dtype_torch_name(cd) ? tuna_dtype_torch_name(cd) : "float32");
    cJSON_AddStringToObject(q, "bnb_4bit_quant_storage", "uint8");
    cJSON_AddStringToObject(q, "bnb_4bit_quant_type", tuna_q4_type_name(o->type));
    cJSON_AddBoolToObject(q, "bnb_4bit_use_double_quant", o->double_quant);
    cJSON_AddBoolToObject(q, "llm_int8_enable_fp32_cpu_offload", 0);
    cJSON_AddBoolToObject(q, "llm_int8_has_fp16_weight", 0);
    if (o->skip_modules) {
        cJSON *l = cJSON_AddArrayToObject(q, "llm_int8_skip_modules");
        for (int i = 0; i < o->n_skip_modules; i++) cJSON_AddItemToArray(l, cJSON_CreateString(o->skip_modules[i]));
    } else {
        cJSON_AddNullToObject(q, "llm_int8_skip_modules");
    }
    cJSON_AddRawToObject(q, "llm_int8_threshold", "6.0");
    cJSON_AddBoolToObject(q, "load_in_4bit", 1);
    cJSON_AddBoolToObject(q, "load_in_8bit", 0);
    cJSON_AddStringToObject(q, "quant_method", "bitsandbytes");
    cJSON_DeleteItemFromObjectCaseSensitive(doc, "quantization_config");
    /* keys in sorted order, as transformers writes config.json (sort_keys=True) */
    int idx = 0;
    for (cJSON *c = doc->child; c && strcmp(c->string, "quantization_config") < 0; c = c->next) idx++;
    /* link q in by hand before the first key that sorts after it (cJSON has no keyed insert) */
    q->string = strdup("quantization_config");
    if (!q->string) {
        cJSON_Delete(q);
        st = tuna_fail_oom("config", 32);
        goto done;
    }
    cJSON *after = doc->child;
    for (int i = 0; i < idx && after; i++) after = after->next;
    if (!after) {
        cJSON_AddItemToArray(doc, q);
    } else {
        q->next = after;
        q->prev = after->prev;
        if (after == doc->child) {
            q->prev = after->prev; /* the head's prev points at the tail */
            doc->child = q;
        } else {
            after->prev->next = q;
        }
        after->prev = q;
    }
    char *out = tuna_path_join(dst_dir, "config.json");
    st = out ? tuna_json_save(out, doc) : tuna_fail_oom("path", 0);
    free(out);
done:
    cJSON_Delete(doc);
    return st;
}

static bool is_weight_file(const char *n)
{
    size_t l = strlen(n);
    return (l > 12 && strcmp(n + l - 12, ".safetensors") == 0) || strcmp(n, "model.safetensors.index.json") == 0 ||
           strcmp(n, "config.json") == 0;
}

static tuna_status copy_other_files(const char *src, const char *dst)
{
    DIR *d = opendir(src);
    if (!d) return tuna_fail(TUNA_E_IO, "cannot list %s", src);
    tuna_status st = TUNA_OK;
    struct dirent *e;
    while (!st && (e = readdir(d))) {
        if (e->d_name[0] == '.' || is_weight_file(e->d_name)) continue;
        char *a = tuna_path_join(src, e->d_name), *b = tuna_path_join(dst, e->d_name);
        if (!a || !b)
            st = tuna_fail_oom("path", 0);
        else if (!tuna_path_is_dir(a))
            st = tuna_copy_file(a, b);
        free(a);
        free(b);
    }
    closedir(d);
    return st;
}

tuna_status tuna_bnb_quantize_dir(const char *src, const char *dst, const struct tuna_bnb_quantize_opts *o)
{
    int bs = o->blocksize ? o->blocksize : 64;
    if (!tuna_q4_blocksize_ok(bs))
        return tuna_fail(TUNA_E_INVALID, "--blocksize %d: bitsandbytes accepts 32, 64, 128, ..., 4096 (64 is what "
                                         "transformers writes)", bs);
    if (tuna_path_exists(dst))
        return tuna_fail(TUNA_E_INVALID, "%s already exists: choose a new output folder", dst);
    tuna_st_set *set = NULL;
    tuna_st_writer *wr = NULL;
    char *tmp = NULL;
    float *buf = NULL;
    tuna_status st = tuna_st_set_open(src, "model", &set);
    if (st) return st;
    if ((st = tuna_bnb_check_not_int8(set))) goto done;
    if (tuna_bnb_is_4bit(set)) {
        st = tuna_fail(TUNA_E_INVALID, "%s already holds bitsandbytes 4-bit weights: quantize the 16-bit model", src);
        goto done;
    }
    /* the dtype the quant_state records: --dtype, else config.json's */
    enum tuna_dtype dtype = o->dtype;
    if (dtype == TUNA_DTYPE_INVALID) {
        char *cp = tuna_path_join(src, "config.json");
        cJSON *cfg = NULL;
        if (cp && tuna_json_load(cp, 0, &cfg) == TUNA_OK) {
            const cJSON *d = tuna_json_member(cfg, "torch_dtype");
            if (!d) d = tuna_json_member(cfg, "dtype");
            if (cJSON_IsString(d)) dtype = tuna_dtype_from_torch(d->valuestring);
        }
        cJSON_Delete(cfg);
        free(cp);
        if (dtype != TUNA_DTYPE_F32 && dtype != TUNA_DTYPE_F16) dtype = TUNA_DTYPE_BF16;
    }
    if ((st = tuna_st_writer_new(&wr))) goto done;
    int nq = 0;
    for (size_t i = 0; i < tuna_st_set_count(set) && !st; i++) {
        const struct tuna_tensor_view *t = tuna_st_set_at(set, i);
        bool fl = t->dtype == TUNA_DTYPE_F32 || t->dtype == TUNA_DTYPE_BF16 || t->dtype == TUNA_DTYPE_F16;
        if (fl && tuna_bnb_should_quantize(t->name, t->ndim, o->skip_modules, o->n_skip_modules)) {
            struct tuna_q4_weight w;
            /* transformers casts the weight to the load dtype first, then bitsandbytes quantizes it */
            const void *x = t->data;
            enum tuna_dtype xd = t->dtype;
            free(buf);
            buf = malloc(sizeof(float) * t->numel);
            if (!buf) {
                st = tuna_fail_oom("weight", sizeof(float) * t->numel);
                break;
            }
            tuna_convert_to_f32(t->dtype, t->data, buf, t->numel);
            if (dtype != TUNA_DTYPE_F32 && xd != dtype) /* round to the load dtype */
                for (uint64_t k = 0; k < t->numel; k++)
                    buf[k] = dtype == TUNA_DTYPE_BF16 ? tuna_bf16_to_f32(tuna_f32_to_bf16(buf[k]))
                                                      : tuna_f16_to_f32(tuna_f32_to_f16(buf[k]));
            x = buf;
            xd = TUNA_DTYPE_F32;
            st = tuna_q4_quantize(x, xd, t->shape[0], t->shape[1], o->type, bs, o->double_quant, dtype, &w);
            if (!st) st = tuna_bnb_writer_add(wr, t->name, &w);
            tuna_q4_weight_free(&w);
            nq++;
        } else if (fl && o->dtype != TUNA_DTYPE_INVALID && t->dtype != o->dtype) {
            size_t nb = tuna_dtype_nbytes(o->dtype, t->numel);
            void *cv = malloc(nb ? nb : 1);
            free(buf);
            buf = malloc(sizeof(float) * (t->numel ? t->numel : 1));
            if (!cv || !buf) {
                free(cv);
                st = tuna_fail_oom("tensor", nb);
                break;
            }
            tuna_convert_to_f32(t->dtype, t->data, buf, t->numel);
            tuna_convert_from_f32(o->dtype, buf, cv, t->numel);
            st = tuna_st_writer_add(wr, t->name, o->dtype, t->ndim, t->shape, cv, nb, true);
            free(cv);
        } else {
            st = tuna_st_writer_add(wr, t->name, t->dtype, t->ndim, t->shape, t->data, t->nbytes, false);
        }
    }
    if (st) goto done;
    if (nq == 0) {
        st = tuna_fail(TUNA_E_INVALID, "%s: no Linear weight of a decoder layer found to quantize", src);
        goto done;
    }
    if ((st = tuna_atomic_dir_begin(dst, &tmp))) goto done;
    if (!st) st = tuna_st_writer_save_dir(wr, tmp, "model", 5000000000ull);
    if (!st) st = write_config(src, tmp, o, dtype);
    if (!st) st = copy_other_files(src, tmp);
    if (!st) st = tuna_atomic_dir_commit(tmp, dst, false);
    if (st) tuna_atomic_dir_abort(tmp);
done:
    free(buf);
    free(tmp);
    tuna_st_writer_free(wr);
    tuna_st_set_close(set);
    return st;
}
