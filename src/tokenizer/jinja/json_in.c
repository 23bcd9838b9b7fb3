/* json_in.c — a JSON reader that keeps what Python's json.loads keeps and cJSON_Parse loses:
 * whether a number was written as an int or a float (1 vs 1.0) and the exact digits of big
 * ints. It builds an ordinary cJSON tree; each number also carries its source text in
 * valuestring (cJSON frees and duplicates valuestring for every item type), which the template
 * context reads (jv from_json) so that `tojson` prints 1.0 where transformers prints 1.0. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "core/status.h"
#include "tokenizer/jinja/jinja.h"

struct jr {
    const char *s;
    size_t n, i;
    const char *where;
    int depth;
};

static tuna_status jr_fail(struct jr *r, const char *what)
{
    return tuna_fail(TUNA_E_FORMAT, "%s: invalid JSON at byte %zu: %s", r->where, r->i, what);
}

static void skip_ws(struct jr *r)
{
    while (r->i < r->n && (r->s[r->i] == ' ' || r->s[r->i] == '\t' || r->s[r->i] == '\n' || r->s[r->i] == '\r'))
        r->i++;
}

static int hex4(const char *p)
{
    int v = 0;
    for (int k = 0; k < 4; k++) {
        char c = p[k];
        int h = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    return v;
}

/* Reads a string at r->i (on the opening quote) into a malloc'd buffer. */
static tuna_status read_string(struct jr *r, char **out)
{
    size_t start = ++r->i, end = start;
    while (end < r->n && r->s[end] != '"') {
        if (r->s[end] == '\\') end++;
        end++;
    }
    if (end >= r->n) return jr_fail(r, "unterminated string");
    char *o = malloc(end - start + 1);
    if (!o) return tuna_fail_oom("JSON string", end - start);
    size_t k = 0;
    for (size_t i = start; i < end; i++) {
        unsigned char c = (unsigned char)r->s[i];
        if (c < 0x20) {
            free(o);
            r->i = i;
            return jr_fail(r, "control character in a string");
        }
        if (c != '\\') {
            o[k++] = (char)c;
            continue;
        }
        char e = r->s[++i];
        switch (e) {
        case '"': o[k++] = '"'; break;
        case '\\': o[k++] = '\\'; break;
        case '/': o[k++] = '/'; break;
        case 'b': o[k++] = '\b'; break;
        case 'f': o[k++] = '\f'; break;
        case 'n': o[k++] = '\n'; break;
        case 'r': o[k++] = '\r'; break;
        case 't': o[k++] = '\t'; break;
        case 'u': {
            int cp = i + 4 < end ? hex4(r->s + i + 1) : -1;
            if (cp < 0) {
                free(o);
                r->i = i;
                return jr_fail(r, "bad \\u escape");
            }
            i += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 < end + 0 && r->s[i + 1] == '\\' && r->s[i + 2] == 'u') {
                int lo = hex4(r->s + i + 3);
                if (lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    i += 6;
                }
            }
            if (cp == 0) {
                /* cJSON strings end at NUL: refuse rather than silently cut the text */
                free(o);
                r->i = i;
                return tuna_fail(TUNA_E_UNSUPPORTED, "%s: a string holds U+0000 (byte %zu), which tuna cannot carry",
                                 r->where, i);
            }
            /* "\uXXXX" (6 bytes) never decodes to more than 4 */
            k += (size_t)utf8proc_encode_char((utf8proc_int32_t)cp, (utf8proc_uint8_t *)o + k);
            break;
        }
        default:
            free(o);
            r->i = i;
            return jr_fail(r, "unknown escape");
        }
    }
    o[k] = 0;
    r->i = end + 1;
    *out = o;
    return TUNA_OK;
}

static tuna_status read_value(struct jr *r, cJSON **out);

static tuna_status read_number(struct jr *r, cJSON **out)
{
    size_t st = r->i;
    if (r->i < r->n && r->s[r->i] == '-') r->i++;
    if (r->i >= r->n || r->s[r->i] < '0' || r->s[r->i] > '9') return jr_fail(r, "expected a value");
    while (r->i < r->n && ((r->s[r->i] >= '0' && r->s[r->i] <= '9') || r->s[r->i] == '.' || r->s[r->i] == 'e' ||
                           r->s[r->i] == 'E' || r->s[r->i] == '+' || r->s[r->i] == '-'))
        r->i++;
    char tmp[128];
    size_t len = r->i - st;
    if (len >= sizeof tmp) return jr_fail(r, "number too long");
    memcpy(tmp, r->s + st, len);
    tmp[len] = 0;
    char *end;
    double d = strtod(tmp, &end);
    if (*end) return jr_fail(r, "malformed number");
    cJSON *c = cJSON_CreateNumber(d);
    if (!c) return tuna_fail_oom("JSON", 0);
    c->valuestring = malloc(len + 1);
    if (!c->valuestring) {
        cJSON_Delete(c);
        return tuna_fail_oom("JSON", 0);
    }
    memcpy(c->valuestring, tmp, len + 1);
    *out = c;
    return TUNA_OK;
}

static tuna_status read_container(struct jr *r, bool obj, cJSON **out)
{
    if (++r->depth > 512) return jr_fail(r, "nested too deeply");
    cJSON *c = obj ? cJSON_CreateObject() : cJSON_CreateArray();
    if (!c) return tuna_fail_oom("JSON", 0);
    char close = obj ? '}' : ']';
    r->i++;
    skip_ws(r);
    tuna_status st = TUNA_OK;
    if (r->i < r->n && r->s[r->i] == close) {
        r->i++;
        goto done;
    }
    for (;;) {
        char *key = NULL;
        skip_ws(r);
        if (obj) {
            if (r->i >= r->n || r->s[r->i] != '"') {
                st = jr_fail(r, "expected a key string");
                goto done;
            }
            if ((st = read_string(r, &key))) goto done;
            skip_ws(r);
            if (r->i >= r->n || r->s[r->i] != ':') {
                free(key);
                st = jr_fail(r, "expected ':'");
                goto done;
            }
            r->i++;
        }
        cJSON *v = NULL;
        if ((st = read_value(r, &v))) {
            free(key);
            goto done;
        }
        if (obj) {
            /* a repeated key keeps the last value, as json.loads */
            cJSON_DeleteItemFromObjectCaseSensitive(c, key);
            cJSON_AddItemToObject(c, key, v);
            free(key);
        } else {
            cJSON_AddItemToArray(c, v);
        }
        skip_ws(r);
        if (r->i < r->n && r->s[r->i] == ',') {
            r->i++;
            continue;
        }
        if (r->i < r->n && r->s[r->i] == close) {
            r->i++;
            break;
        }
        st = jr_fail(r, obj ? "expected ',' or '}'" : "expected ',' or ']'");
        goto done;
    }
done:
    r->depth--;
    if (st) {
        cJSON_Delete(c);
        return st;
    }
    *out = c;
    return TUNA_OK;
}

static tuna_status read_value(struct jr *r, cJSON **out)
{
    skip_ws(r);
    if (r->i >= r->n) return jr_fail(r, "unexpected end");
    char c = r->s[r->i];
    if (c == '{' || c == '[') return read_container(r, c == '{', out);
    if (c == '"') {
        char *s = NULL;
        tuna_status st = read_string(r, &s);
        if (st) return st;
        *out = cJSON_CreateString(s);
        free(s);
        return *out ? TUNA_OK : tuna_fail_oom("JSON", 0);
    }
    static const struct {
        const char *w;
        int kind;
    } words[] = {{"true", 1}, {"false", 2}, {"null", 3}, {"NaN", 4}, {"Infinity", 5}, {"-Infinity", 6}};
    for (size_t k = 0; k < sizeof words / sizeof *words; k++) {
        size_t l = strlen(words[k].w);
        if (r->n - r->i >= l && !memcmp(r->s + r->i, words[k].w, l)) {
            r->i += l;
            switch (words[k].kind) {
            case 1: *out = cJSON_CreateTrue(); break;
            case 2: *out = cJSON_CreateFalse(); break;
            case 3: *out = cJSON_CreateNull(); break;
            case 4: *out = cJSON_CreateNumber(NAN); break;
            case 5: *out = cJSON_CreateNumber(INFINITY); break;
            default: *out = cJSON_CreateNumber(-INFINITY); break;
            }
            if (*out && words[k].kind >= 4) (*out)->valuestring = strdup("1.0"); /* marks a float */
            return *out ? TUNA_OK : tuna_fail_oom("JSON", 0);
        }
    }
    return read_number(r, out);
}

tuna_status tuna_jinja_json_parse(const char *text, size_t len, const char *where, cJSON **out)
{
    *out = NULL;
    struct jr r = {.s = text, .n = len, .where = where ? where : "JSON"};
    cJSON *v = NULL;
    tuna_status st = read_value(&r, &v);
    if (st) return st;
    skip_ws(&r);
    if (r.i != r.n) {
        cJSON_Delete(v);
        return jr_fail(&r, "extra data after the value");
    }
    *out = v;
    return TUNA_OK;
}
