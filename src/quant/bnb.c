/* bnb.c — reading bitsandbytes 4-bit weights (and refusing 8-bit ones) from a safetensors set.
 *
 * Follows docs/FORMATS.md §2.1–2.2 and bitsandbytes QuantState.from_dict: the quant_state JSON
 * blob gives quant_type, blocksize, dtype, shape and the nested fields; the tensors give the
 * codes, absmax (F32, or U8 when nested), quant_map, nested_absmax and nested_quant_map. Every
 * size is checked against the JSON before anything is read. Owns nothing beyond the
 * tuna_q4_weight it fills (codes stay in the set's mapping).
 */
#include "quant/bnb.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/json.h"
#include "core/status.h"

#define QS_TAG ".quant_state.bitsandbytes__"

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static bool ends_with_ci(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcasecmp(s + n - m, suffix) == 0;
}

bool tuna_bnb_is_4bit(const tuna_st_set *set)
{
    size_t n = tuna_st_set_count(set);
    for (size_t i = 0; i < n; i++) {
        const char *name = tuna_st_set_at(set, i)->name;
        if (ends_with(name, QS_TAG "nf4") || ends_with(name, QS_TAG "fp4")) return true;
    }
    return false;
}

bool tuna_bnb_is_state_tensor(const char *name)
{
    return ends_with(name, ".absmax") || ends_with(name, ".quant_map") || ends_with(name, ".nested_absmax") ||
           ends_with(name, ".nested_quant_map") || strstr(name, QS_TAG) != NULL;
}

static const struct tuna_tensor_view *find_sub(const tuna_st_set *set, const char *weight, const char *suffix)
{
    char name[1024];
    int k = snprintf(name, sizeof name, "%s.%s", weight, suffix);
    if (k < 0 || (size_t)k >= sizeof name) return NULL;
    return tuna_st_set_find(set, name);
}

bool tuna_bnb_is_quantized_weight(const tuna_st_set *set, const char *weight_name)
{
    return find_sub(set, weight_name, "quant_state.bitsandbytes__nf4") ||
           find_sub(set, weight_name, "quant_state.bitsandbytes__fp4");
}

tuna_status tuna_bnb_check_not_int8(const tuna_st_set *set)
{
    size_t n = tuna_st_set_count(set);
    for (size_t i = 0; i < n; i++) {
        const struct tuna_tensor_view *t = tuna_st_set_at(set, i);
        if (ends_with_ci(t->name, ".SCB") || ends_with_ci(t->name, ".weight_format"))
            return tuna_fail(TUNA_E_UNSUPPORTED,
                             "%s: tensor '%s' is LLM.int8 (bitsandbytes 8-bit) state; 8-bit checkpoints are not "
                             "supported: use the 16-bit model (tuna can quantize it to 4-bit with `tuna quantize` "
                             "or --load-in-4bit)",
                             t->file, t->name);
    }
    return TUNA_OK;
}

/* Checks dtype and element count of a companion tensor. */
static tuna_status expect(const struct tuna_tensor_view *t, const char *weight, const char *suffix,
                          enum tuna_dtype dtype, int64_t numel)
{
    if (!t)
        return tuna_fail(TUNA_E_FORMAT, "bitsandbytes weight '%s' has a quant_state but no '%s.%s' tensor", weight,
                         weight, suffix);
    if (t->dtype != dtype)
        return tuna_fail(TUNA_E_FORMAT, "%s: '%s' is %s, expected %s", t->file, t->name, tuna_dtype_name(t->dtype),
                         tuna_dtype_name(dtype));
    if ((int64_t)t->numel != numel)
        return tuna_fail(TUNA_E_FORMAT, "%s: '%s' has %llu elements, expected %lld for its quant_state", t->file,
                         t->name, (unsigned long long)t->numel, (long long)numel);
    return TUNA_OK;
}

static bool get_int(const cJSON *o, const char *k, int64_t *v)
{
    const cJSON *m = tuna_json_member(o, k);
    if (!cJSON_IsNumber(m) || m->valuedouble != (double)(int64_t)m->valuedouble) return false;
    *v = (int64_t)m->valuedouble;
    return true;
}

/* Parses and validates the quant_state JSON into w (type, blocksize, dtype, shape, nested). */
static tuna_status parse_state(const struct tuna_tensor_view *qs, enum tuna_q4_type type,
                               struct tuna_q4_weight *w)
{
    static const char *const known[] = {"quant_type",       "blocksize",    "dtype",        "shape",
                                        "nested_blocksize", "nested_dtype", "nested_offset", NULL};
    cJSON *doc = NULL;
    tuna_status st = tuna_json_parse(qs->data, qs->nbytes, qs->name, &doc);
    if (st) return tuna_fail_prefix(st, "%s", qs->file);
    const char *where = qs->name;
    st = TUNA_E_FORMAT;
    if (!cJSON_IsObject(doc)) {
        tuna_fail(st, "%s: '%s' is not a JSON object", qs->file, where);
        goto done;
    }
    for (const cJSON *c = doc->child; c; c = c->next) {
        bool ok = false;
        for (int i = 0; known[i]; i++) ok = ok || strcmp(c->string, known[i]) == 0;
        if (!ok) {
            tuna_fail(st, "%s: '%s' has the unknown key \"%s\"", qs->file, where, c->string);
            goto done;
        }
    }
    const cJSON *qt = tuna_json_member(doc, "quant_type");
    if (qt && (!cJSON_IsString(qt) || strcmp(qt->valuestring, tuna_q4_type_name(type)) != 0)) {
        tuna_fail(st, "%s: '%s' says quant_type %s, but the tensor name says %s", qs->file, where,
                  cJSON_IsString(qt) ? qt->valuestring : "(not a string)", tuna_q4_type_name(type));
        goto done;
    }
    int64_t bs;
    if (!get_int(doc, "blocksize", &bs) || bs < 2 || bs > (1 << 20)) {
        tuna_fail(st, "%s: '%s' has no valid \"blocksize\"", qs->file, where);
        goto done;
    }
    const cJSON *dt = tuna_json_member(doc, "dtype");
    enum tuna_dtype dtype = cJSON_IsString(dt) ? tuna_dtype_from_torch(dt->valuestring) : TUNA_DTYPE_INVALID;
    if (dtype != TUNA_DTYPE_F32 && dtype != TUNA_DTYPE_BF16 && dtype != TUNA_DTYPE_F16) {
        tuna_fail(st, "%s: '%s' has dtype %s; expected float32, bfloat16 or float16", qs->file, where,
                  cJSON_IsString(dt) ? dt->valuestring : "(missing)");
        goto done;
    }
    const cJSON *shape = tuna_json_member(doc, "shape");
    int nd = cJSON_IsArray(shape) ? cJSON_GetArraySize(shape) : 0;
    if (nd < 1 || nd > 2) {
        tuna_fail(st, "%s: '%s' has no valid \"shape\" list (1 or 2 dimensions)", qs->file, where);
        goto done;
    }
    int64_t dims[2], numel = 1;
    for (int i = 0; i < nd; i++) {
        const cJSON *d = cJSON_GetArrayItem(shape, i);
        if (!cJSON_IsNumber(d) || d->valuedouble < 1 || d->valuedouble > 1e12 ||
            d->valuedouble != (double)(int64_t)d->valuedouble || (numel *= (int64_t)d->valuedouble) > (1LL << 50)) {
            tuna_fail(st, "%s: '%s' has a bad shape entry %d", qs->file, where, i);
            goto done;
        }
        dims[i] = (int64_t)d->valuedouble;
    }
    w->type = type;
    w->shape_1d = nd == 1;
    w->rows = nd == 1 ? 1 : dims[0];
    w->cols = numel / w->rows;
    w->numel = numel;
    w->blocksize = (int)bs;
    w->n_blocks = (numel + bs - 1) / bs;
    w->dtype = dtype;
    int64_t nbs;
    w->nested = get_int(doc, "nested_blocksize", &nbs);
    if (w->nested) {
        const cJSON *off = tuna_json_member(doc, "nested_offset");
        const cJSON *ndt = tuna_json_member(doc, "nested_dtype");
        if (nbs < 1 || nbs > (1 << 20) || !cJSON_IsNumber(off)) {
            tuna_fail(st, "%s: '%s' has nested_blocksize but no valid nested_offset", qs->file, where);
            goto done;
        }
        if (ndt && (!cJSON_IsString(ndt) || strcmp(ndt->valuestring, "float32") != 0)) {
            tuna_fail(TUNA_E_UNSUPPORTED, "%s: '%s' has nested_dtype %s; only float32 is supported", qs->file, where,
                      cJSON_IsString(ndt) ? ndt->valuestring : "(not a string)");
            st = TUNA_E_UNSUPPORTED;
            goto done;
        }
        w->nested_blocksize = (int)nbs;
        w->nested_offset = (float)off->valuedouble;
        w->n_nested = (w->n_blocks + nbs - 1) / nbs;
    }
    st = TUNA_OK;
done:
    cJSON_Delete(doc);
    return st;
}

tuna_status tuna_bnb_load_weight(const tuna_st_set *set, const char *weight_name, struct tuna_q4_weight *out)
{
    memset(out, 0, sizeof *out);
    const struct tuna_tensor_view *wt = tuna_st_set_find(set, weight_name);
    if (!wt) return tuna_fail(TUNA_E_NOT_FOUND, "tensor '%s' is not in the checkpoint", weight_name);
    const struct tuna_tensor_view *qn = find_sub(set, weight_name, "quant_state.bitsandbytes__nf4");
    const struct tuna_tensor_view *qf = find_sub(set, weight_name, "quant_state.bitsandbytes__fp4");
    if (!qn && !qf)
        return tuna_fail(TUNA_E_FORMAT,
                         "%s: '%s' has no '%s.quant_state.bitsandbytes__nf4' (or __fp4) tensor: it is not a "
                         "bitsandbytes 4-bit weight",
                         wt->file, weight_name, weight_name);
    if (qn && qf)
        return tuna_fail(TUNA_E_FORMAT, "%s: '%s' has both an nf4 and an fp4 quant_state", wt->file, weight_name);
    const struct tuna_tensor_view *qs = qn ? qn : qf;
    if (qs->dtype != TUNA_DTYPE_U8 || qs->ndim != 1)
        return tuna_fail(TUNA_E_FORMAT, "%s: '%s' must be a 1-D U8 tensor holding JSON", qs->file, qs->name);
    tuna_status st = parse_state(qs, qn ? TUNA_Q4_NF4 : TUNA_Q4_FP4, out);
    if (st) return st;

    if (wt->dtype != TUNA_DTYPE_U8) {
        st = tuna_fail(TUNA_E_UNSUPPORTED,
                       "%s: 4-bit weight '%s' is stored as %s (bnb_4bit_quant_storage other than uint8); only uint8 "
                       "storage is supported: re-save the model with bnb_4bit_quant_storage=torch.uint8",
                       wt->file, weight_name, tuna_dtype_name(wt->dtype));
        goto fail;
    }
    if ((int64_t)wt->numel != (out->numel + 1) / 2) {
        st = tuna_fail(TUNA_E_FORMAT, "%s: 4-bit weight '%s' has %llu bytes, but its quant_state shape needs %lld",
                       wt->file, weight_name, (unsigned long long)wt->numel, (long long)(out->numel + 1) / 2);
        goto fail;
    }
    out->codes = wt->data;

    const struct tuna_tensor_view *qm = find_sub(set, weight_name, "quant_map");
    if ((st = expect(qm, weight_name, "quant_map", TUNA_DTYPE_F32, 16))) goto fail;
    memcpy(out->code, qm->data, sizeof out->code);

    const struct tuna_tensor_view *am = find_sub(set, weight_name, "absmax");
    out->absmax = malloc(sizeof(float) * (size_t)out->n_blocks);
    if (!out->absmax) {
        st = tuna_fail_oom("absmax", sizeof(float) * (size_t)out->n_blocks);
        goto fail;
    }
    if (!out->nested) {
        if ((st = expect(am, weight_name, "absmax", TUNA_DTYPE_F32, out->n_blocks))) goto fail;
        memcpy(out->absmax, am->data, sizeof(float) * (size_t)out->n_blocks);
        return TUNA_OK;
    }
    if ((st = expect(am, weight_name, "absmax", TUNA_DTYPE_U8, out->n_blocks))) goto fail;
    const struct tuna_tensor_view *na = find_sub(set, weight_name, "nested_absmax");
    if ((st = expect(na, weight_name, "nested_absmax", TUNA_DTYPE_F32, out->n_nested))) goto fail;
    const struct tuna_tensor_view *nm = find_sub(set, weight_name, "nested_quant_map");
    if ((st = expect(nm, weight_name, "nested_quant_map", TUNA_DTYPE_F32, 256))) goto fail;
    out->qabsmax = malloc((size_t)out->n_blocks);
    out->nested_absmax = malloc(sizeof(float) * (size_t)out->n_nested);
    if (!out->qabsmax || !out->nested_absmax) {
        st = tuna_fail_oom("nested absmax", (size_t)out->n_blocks);
        goto fail;
    }
    memcpy(out->qabsmax, am->data, (size_t)out->n_blocks);
    memcpy(out->nested_absmax, na->data, sizeof(float) * (size_t)out->n_nested);
    memcpy(out->nested_code, nm->data, sizeof out->nested_code);
    tuna_q4_undo_double_quant(out);
    return TUNA_OK;
fail:
    out->codes = NULL;
    tuna_q4_weight_free(out);
    return st;
}
