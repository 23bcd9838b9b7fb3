/* json.c — loading JSON files with located errors, typed getters, a Python-style pretty printer. */
#include "json.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "file.h"
#include "status.h"
#include "strbuf.h"

tuna_status tuna_json_parse(const char *text, size_t len, const char *what, cJSON **out)
{
    const char *end = NULL;
    *out = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!*out) {
        size_t off = end && end >= text ? (size_t)(end - text) : 0;
        /* line and column of the failure, for a human */
        size_t line = 1, col = 1;
        for (size_t i = 0; i < off && i < len; i++) {
            if (text[i] == '\n') {
                line++;
                col = 1;
            } else {
                col++;
            }
        }
        return tuna_fail(TUNA_E_FORMAT, "%s is not valid JSON: parsing stopped at line %zu, column %zu (byte %zu)",
                         what, line, col, off);
    }
    return TUNA_OK;
}

tuna_status tuna_json_load(const char *path, size_t max_bytes, cJSON **out)
{
    char *buf;
    size_t len;
    *out = NULL;
    tuna_status s = tuna_read_file(path, max_bytes ? max_bytes : (64u << 20), &buf, &len);
    if (s) return s;
    s = tuna_json_parse(buf, len, path, out);
    free(buf);
    return s;
}

const cJSON *tuna_json_member(const cJSON *obj, const char *key)
{
    if (!obj || !cJSON_IsObject(obj)) return NULL;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) return NULL;
    return v;
}

static bool wrong_type(tuna_status *st, const char *where, const char *key, const char *want)
{
    *st = tuna_fail(TUNA_E_FORMAT, "%s: \"%s\" should be %s", where ? where : "JSON", key, want);
    return false;
}

bool tuna_json_get_int(const cJSON *obj, const char *key, int64_t *out, tuna_status *st, const char *where)
{
    *st = TUNA_OK;
    const cJSON *v = tuna_json_member(obj, key);
    if (!v) return false;
    if (!cJSON_IsNumber(v)) return wrong_type(st, where, key, "an integer");
    double d = v->valuedouble;
    if (d != floor(d) || d < -9.2e18 || d > 9.2e18) return wrong_type(st, where, key, "an integer");
    *out = (int64_t)d;
    return true;
}

bool tuna_json_get_num(const cJSON *obj, const char *key, double *out, tuna_status *st, const char *where)
{
    *st = TUNA_OK;
    const cJSON *v = tuna_json_member(obj, key);
    if (!v) return false;
    if (!cJSON_IsNumber(v)) return wrong_type(st, where, key, "a number");
    *out = v->valuedouble;
    return true;
}

bool tuna_json_get_bool(const cJSON *obj, const char *key, bool *out, tuna_status *st, const char *where)
{
    *st = TUNA_OK;
    const cJSON *v = tuna_json_member(obj, key);
    if (!v) return false;
    if (!cJSON_IsBool(v)) return wrong_type(st, where, key, "true or false");
    *out = cJSON_IsTrue(v);
    return true;
}

bool tuna_json_get_str(const cJSON *obj, const char *key, const char **out, tuna_status *st, const char *where)
{
    *st = TUNA_OK;
    const cJSON *v = tuna_json_member(obj, key);
    if (!v) return false;
    if (!cJSON_IsString(v)) return wrong_type(st, where, key, "a string");
    *out = v->valuestring;
    return true;
}

/* --- printer: Python json.dumps(indent=2) layout --- */

static void put_indent(struct tuna_strbuf *b, int depth)
{
    for (int i = 0; i < depth; i++) tuna_sb_put(b, "  ", 2);
}

static void put_number(struct tuna_strbuf *b, double d)
{
    char tmp[64];
    if (!isfinite(d)) {
        tuna_sb_puts(b, isnan(d) ? "NaN" : (d > 0 ? "Infinity" : "-Infinity"));
        return;
    }
    if (d == floor(d) && fabs(d) < 1e15) {
        snprintf(tmp, sizeof tmp, "%.0f", d);
    } else {
        /* shortest representation that reads back the same double */
        for (int prec = 1; prec <= 17; prec++) {
            snprintf(tmp, sizeof tmp, "%.*g", prec, d);
            if (strtod(tmp, NULL) == d) break;
        }
    }
    tuna_sb_puts(b, tmp);
}

static void put_value(struct tuna_strbuf *b, const cJSON *v, int depth)
{
    if (cJSON_IsObject(v) || cJSON_IsArray(v)) {
        bool obj = cJSON_IsObject(v);
        const cJSON *c = v->child;
        if (!c) {
            tuna_sb_puts(b, obj ? "{}" : "[]");
            return;
        }
        tuna_sb_puts(b, obj ? "{\n" : "[\n");
        for (; c; c = c->next) {
            put_indent(b, depth + 1);
            if (obj) {
                tuna_sb_json_string(b, c->string ? c->string : "");
                tuna_sb_puts(b, ": ");
            }
            put_value(b, c, depth + 1);
            tuna_sb_puts(b, c->next ? ",\n" : "\n");
        }
        put_indent(b, depth);
        tuna_sb_puts(b, obj ? "}" : "]");
    } else if (cJSON_IsString(v)) {
        tuna_sb_json_string(b, v->valuestring);
    } else if (cJSON_IsNumber(v)) {
        put_number(b, v->valuedouble);
    } else if (cJSON_IsBool(v)) {
        tuna_sb_puts(b, cJSON_IsTrue(v) ? "true" : "false");
    } else if (cJSON_IsRaw(v)) {
        tuna_sb_puts(b, v->valuestring);
    } else {
        tuna_sb_puts(b, "null");
    }
}

tuna_status tuna_json_save(const char *path, const cJSON *doc)
{
    struct tuna_strbuf b = {0};
    put_value(&b, doc, 0);
    tuna_sb_put(&b, "\n", 1);
    if (b.oom) {
        free(b.p);
        return tuna_fail_oom("JSON text", b.cap);
    }
    tuna_status s = tuna_write_file_atomic(path, b.p, b.len);
    free(b.p);
    return s;
}
