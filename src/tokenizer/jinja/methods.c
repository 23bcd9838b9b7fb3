/* methods.c — attribute access (Jinja2's getattr: a Python attribute first, then the item) and
 * the Python methods of str, dict and list that chat templates call: 'a'.strip(), d.items(),
 * l.append(x), ... Each method returns its result as Python would; strings are immutable
 * (new values), lists and dicts change in place. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "tokenizer/jinja/internal.h"

/* ---- string helpers shared with filters.c ---- */

/* byte length of the whitespace code point at s[i] (Python str.isspace), 0 if none */
size_t js_ws_at(const char *s, size_t n, size_t i)
{
    unsigned char c = (unsigned char)s[i];
    if (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f)) return 1;
    if (c < 0x80) return 0;
    utf8proc_int32_t cp;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
    if (k <= 0) return 0;
    if (cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
        cp == 0x202F || cp == 0x205F || cp == 0x3000)
        return (size_t)k;
    return 0;
}

static size_t cp_len_at(const char *s, size_t n, size_t i)
{
    size_t j = i + 1;
    while (j < n && ((unsigned char)s[j] & 0xC0) == 0x80)
        j++;
    return j - i;
}

static bool in_chars(const char *s, size_t len, struct jv chars)
{
    for (size_t i = 0; i < chars.n;) {
        size_t k = cp_len_at(chars.u.s, chars.n, i);
        if (k == len && memcmp(chars.u.s + i, s, len) == 0) return true;
        i += k;
    }
    return false;
}

/* Python str.strip/lstrip/rstrip; chars NONE = whitespace */
struct jv js_strip(struct jctx *x, struct jv s, struct jv chars, bool left, bool right)
{
    (void)x;
    size_t a = 0, b = s.n;
    bool ws = chars.t != JV_STR;
    if (left) {
        while (a < b) {
            size_t k = ws ? js_ws_at(s.u.s, b, a) : cp_len_at(s.u.s, b, a);
            if (!ws && !in_chars(s.u.s + a, k, chars)) k = 0;
            if (!k) break;
            a += k;
        }
    }
    if (right) {
        while (b > a) {
            size_t st = b - 1;
            while (st > a && ((unsigned char)s.u.s[st] & 0xC0) == 0x80)
                st--;
            size_t k = ws ? (js_ws_at(s.u.s, b, st) == b - st ? b - st : 0)
                          : (in_chars(s.u.s + st, b - st, chars) ? b - st : 0);
            if (!k) break;
            b = st;
        }
    }
    return jv_str_ref(s.u.s + a, b - a);
}

static struct jv case_map(struct jctx *x, struct jv s, int mode) /* 0 lower, 1 upper */
{
    struct jbuf b = {0};
    for (size_t i = 0; i < s.n;) {
        unsigned char c = (unsigned char)s.u.s[i];
        if (c < 0x80) {
            char o = (char)c;
            if (mode == 1 && c >= 'a' && c <= 'z') o = (char)(c - 32);
            if (mode == 0 && c >= 'A' && c <= 'Z') o = (char)(c + 32);
            jb_putc(&b, o);
            i++;
            continue;
        }
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s.u.s + i, (utf8proc_ssize_t)(s.n - i), &cp);
        if (k <= 0) {
            jb_putc(&b, (char)c);
            i++;
            continue;
        }
        cp = mode ? utf8proc_toupper(cp) : utf8proc_tolower(cp);
        utf8proc_uint8_t enc[4];
        utf8proc_ssize_t en = utf8proc_encode_char(cp, enc);
        jb_put(&b, (const char *)enc, (size_t)en);
        i += (size_t)k;
    }
    struct jv r = jv_str(x, b.p ? b.p : "", b.n);
    free(b.p);
    return r;
}

struct jv js_lower(struct jctx *x, struct jv s)
{
    return case_map(x, s, 0);
}
struct jv js_upper(struct jctx *x, struct jv s)
{
    return case_map(x, s, 1);
}

static bool is_cased_letter(const char *s, size_t n, size_t i)
{
    unsigned char c = (unsigned char)s[i];
    if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    utf8proc_int32_t cp;
    if (utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp) <= 0) return false;
    utf8proc_category_t cat = utf8proc_category(cp);
    return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT;
}

/* Python str.title(): a cased letter after an uncased character is upper, others lower */
static struct jv str_title(struct jctx *x, struct jv s)
{
    struct jbuf b = {0};
    bool prev_cased = false;
    for (size_t i = 0; i < s.n;) {
        size_t k = cp_len_at(s.u.s, s.n, i);
        struct jv ch = jv_str_ref(s.u.s + i, k);
        bool cased = is_cased_letter(s.u.s, s.n, i);
        struct jv m = cased ? case_map(x, ch, prev_cased ? 0 : 1) : ch;
        jb_put(&b, m.u.s, m.n);
        prev_cased = cased;
        i += k;
    }
    struct jv r = jv_str(x, b.p ? b.p : "", b.n);
    free(b.p);
    return r;
}

struct jv js_capitalize(struct jctx *x, struct jv s)
{
    if (s.n == 0) return s;
    size_t k = cp_len_at(s.u.s, s.n, 0);
    struct jv a = case_map(x, jv_str_ref(s.u.s, k), 1), b = case_map(x, jv_str_ref(s.u.s + k, s.n - k), 0);
    struct jbuf o = {0};
    jb_put(&o, a.u.s, a.n);
    jb_put(&o, b.u.s, b.n);
    struct jv r = jv_str(x, o.p ? o.p : "", o.n);
    free(o.p);
    return r;
}

static const char *find_sub(const char *h, size_t hn, const char *nd, size_t nn)
{
    if (nn == 0) return h;
    if (nn > hn) return NULL;
    for (size_t i = 0; i + nn <= hn; i++)
        if (memcmp(h + i, nd, nn) == 0) return h + i;
    return NULL;
}

struct jv js_replace(struct jctx *x, struct jv s, struct jv old, struct jv nw, int64_t count)
{
    struct jbuf b = {0};
    int64_t done = 0;
    if (old.n == 0) {
        /* inserts new before each code point and at the end, up to count times */
        size_t i = 0;
        while (i <= s.n) {
            if (count < 0 || done < count) {
                jb_put(&b, nw.u.s, nw.n);
                done++;
            }
            if (i == s.n) break;
            size_t k = cp_len_at(s.u.s, s.n, i);
            jb_put(&b, s.u.s + i, k);
            i += k;
        }
    } else {
        size_t i = 0;
        while (i < s.n) {
            const char *f = (count < 0 || done < count) ? find_sub(s.u.s + i, s.n - i, old.u.s, old.n) : NULL;
            if (!f) {
                jb_put(&b, s.u.s + i, s.n - i);
                break;
            }
            jb_put(&b, s.u.s + i, (size_t)(f - (s.u.s + i)));
            jb_put(&b, nw.u.s, nw.n);
            i = (size_t)(f - s.u.s) + old.n;
            done++;
        }
    }
    struct jv r = jv_str(x, b.p ? b.p : "", b.n);
    free(b.p);
    return r;
}

static void need_str(struct jctx *x, struct jv v, const char *what)
{
    if (v.t != JV_STR)
        jx_fail(x, x->at, TUNA_E_FORMAT, "%s: expected a string argument, got %s", what, jv_type_name(v));
}

/* Python str.split / rsplit */
static struct jv str_split(struct jctx *x, struct jv s, struct jv sep, int64_t maxsplit, bool from_right)
{
    struct jv out = jv_list(x, 0);
    if (sep.t == JV_STR) {
        if (sep.n == 0) jx_fail(x, x->at, TUNA_E_FORMAT, "split(): empty separator");
        if (!from_right) {
            size_t i = 0;
            int64_t k = 0;
            for (;;) {
                const char *f = (maxsplit < 0 || k < maxsplit) ? find_sub(s.u.s + i, s.n - i, sep.u.s, sep.n) : NULL;
                if (!f) {
                    jl_push(x, out.u.l, jv_str_ref(s.u.s + i, s.n - i));
                    break;
                }
                jl_push(x, out.u.l, jv_str_ref(s.u.s + i, (size_t)(f - (s.u.s + i))));
                i = (size_t)(f - s.u.s) + sep.n;
                k++;
            }
            return out;
        }
        /* rsplit: collect from the right then reverse */
        size_t end = s.n;
        int64_t k = 0;
        struct jv tmp = jv_list(x, 0);
        for (;;) {
            size_t found = (size_t)-1;
            if ((maxsplit < 0 || k < maxsplit) && end >= sep.n)
                for (size_t i = end - sep.n + 1; i-- > 0;)
                    if (memcmp(s.u.s + i, sep.u.s, sep.n) == 0) {
                        found = i;
                        break;
                    }
            if (found == (size_t)-1) {
                jl_push(x, tmp.u.l, jv_str_ref(s.u.s, end));
                break;
            }
            jl_push(x, tmp.u.l, jv_str_ref(s.u.s + found + sep.n, end - found - sep.n));
            end = found;
            k++;
        }
        for (size_t i = tmp.u.l->n; i-- > 0;)
            jl_push(x, out.u.l, tmp.u.l->v[i]);
        return out;
    }
    if (from_right && maxsplit >= 0) jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "rsplit() on whitespace with maxsplit");
    size_t i = 0;
    int64_t k = 0;
    for (;;) {
        size_t w;
        while (i < s.n && (w = js_ws_at(s.u.s, s.n, i)))
            i += w;
        if (i >= s.n) break;
        if (maxsplit >= 0 && k >= maxsplit) {
            /* the rest, trailing whitespace included (as CPython) */
            jl_push(x, out.u.l, jv_str_ref(s.u.s + i, s.n - i));
            break;
        }
        size_t st = i;
        while (i < s.n && !js_ws_at(s.u.s, s.n, i))
            i++;
        jl_push(x, out.u.l, jv_str_ref(s.u.s + st, i - st));
        k++;
    }
    return out;
}

static bool affix(struct jctx *x, struct jv s, struct jv p, bool end)
{
    if (jv_is_seq(p)) {
        for (size_t i = 0; i < p.u.l->n; i++)
            if (affix(x, s, p.u.l->v[i], end)) return true;
        return false;
    }
    need_str(x, p, end ? "endswith()" : "startswith()");
    if (p.n > s.n) return false;
    return memcmp(end ? s.u.s + s.n - p.n : s.u.s, p.u.s, p.n) == 0;
}

static int64_t int_arg(struct jctx *x, struct jv v, const char *what)
{
    if (v.t == JV_INT) return v.u.i;
    if (v.t == JV_BOOL) return v.u.b;
    if (v.t == JV_NONE) return -1;
    jx_fail(x, x->at, TUNA_E_FORMAT, "%s: expected an integer, got %s", what, jv_type_name(v));
}

/* '{} {name} {0}'.format(...) without format specs */
static struct jv str_format(struct jctx *x, struct jv s, struct jargs *a)
{
    struct jbuf b = {0};
    size_t auto_idx = 0;
    for (size_t i = 0; i < s.n; i++) {
        char c = s.u.s[i];
        if (c == '{' && i + 1 < s.n && s.u.s[i + 1] == '{') {
            jb_putc(&b, '{');
            i++;
            continue;
        }
        if (c == '}' && i + 1 < s.n && s.u.s[i + 1] == '}') {
            jb_putc(&b, '}');
            i++;
            continue;
        }
        if (c != '{') {
            jb_putc(&b, c);
            continue;
        }
        size_t j = i + 1;
        while (j < s.n && s.u.s[j] != '}')
            j++;
        if (j >= s.n) {
            free(b.p);
            jx_fail(x, x->at, TUNA_E_FORMAT, "format(): single '{' in format string");
        }
        const char *f = s.u.s + i + 1;
        size_t fn = j - i - 1;
        struct jv v;
        if (memchr(f, ':', fn) || memchr(f, '!', fn) || memchr(f, '.', fn) || memchr(f, '[', fn)) {
            free(b.p);
            jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "format(): format specs and conversions ('%.*s')", (int)fn, f);
        }
        if (fn == 0) {
            v = ja_arg(a, auto_idx++, NULL, jv_undef("format argument"));
        } else if (f[0] >= '0' && f[0] <= '9') {
            v = ja_arg(a, (size_t)atoi(f), NULL, jv_undef("format argument"));
        } else {
            char name[128];
            snprintf(name, sizeof name, "%.*s", (int)fn, f);
            v = ja_arg(a, (size_t)-1, name, jv_undef("format argument"));
        }
        if (v.t == JV_UNDEF) {
            free(b.p);
            jx_fail(x, x->at, TUNA_E_FORMAT, "format(): no argument for field '{%.*s}'", (int)fn, f);
        }
        jv_write_str(&b, v);
        i = j;
    }
    struct jv r = jv_str(x, b.p ? b.p : "", b.n);
    free(b.p);
    return r;
}

/* One dispatcher per type: the method name is the builtin's name. */
static struct jv str_method(struct jctx *x, struct jv s, struct jargs *a, const char *m)
{
    if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
        struct jv chars = ja_arg(a, 0, "chars", jv_none());
        if (chars.t != JV_NONE) need_str(x, chars, m);
        return js_strip(x, s, chars, m[0] != 'r', m[0] != 'l');
    }
    if (!strcmp(m, "upper")) return js_upper(x, s);
    if (!strcmp(m, "lower")) return js_lower(x, s);
    if (!strcmp(m, "title")) return str_title(x, s);
    if (!strcmp(m, "capitalize")) return js_capitalize(x, s);
    if (!strcmp(m, "split") || !strcmp(m, "rsplit")) {
        struct jv sep = ja_arg(a, 0, "sep", jv_none());
        if (sep.t != JV_NONE) need_str(x, sep, m);
        return str_split(x, s, sep, int_arg(x, ja_arg(a, 1, "maxsplit", jv_int(-1)), m), m[0] == 'r');
    }
    if (!strcmp(m, "startswith") || !strcmp(m, "endswith")) {
        if (a->npos < 1) jx_fail(x, x->at, TUNA_E_FORMAT, "%s() needs an argument", m);
        return jv_bool(affix(x, s, a->pos[0], m[0] == 'e'));
    }
    if (!strcmp(m, "replace")) {
        struct jv o = ja_arg(a, 0, "old", jv_undef("old")), n = ja_arg(a, 1, "new", jv_undef("new"));
        need_str(x, o, "replace()");
        need_str(x, n, "replace()");
        return js_replace(x, s, o, n, int_arg(x, ja_arg(a, 2, "count", jv_int(-1)), "replace()"));
    }
    if (!strcmp(m, "format")) return str_format(x, s, a);
    if (!strcmp(m, "join")) {
        struct jlist *l = jv_iterate(x, ja_arg(a, 0, NULL, jv_list(x, 0)), x->at);
        struct jbuf b = {0};
        for (size_t i = 0; i < l->n; i++) {
            if (l->v[i].t != JV_STR) {
                free(b.p);
                jx_fail(x, x->at, TUNA_E_FORMAT, "join(): sequence item %zu: expected str instance, %s found", i,
                        jv_type_name(l->v[i]));
            }
            if (i) jb_put(&b, s.u.s, s.n);
            jb_put(&b, l->v[i].u.s, l->v[i].n);
        }
        struct jv r = jv_str(x, b.p ? b.p : "", b.n);
        free(b.p);
        return r;
    }
    if (!strcmp(m, "find") || !strcmp(m, "index") || !strcmp(m, "rfind") || !strcmp(m, "count")) {
        struct jv sub = ja_arg(a, 0, NULL, jv_undef("sub"));
        need_str(x, sub, m);
        if (!strcmp(m, "count")) {
            if (sub.n == 0) return jv_int((int64_t)ju_len(s.u.s, s.n) + 1);
            int64_t c = 0;
            for (size_t i = 0; i + sub.n <= s.n;) {
                if (memcmp(s.u.s + i, sub.u.s, sub.n) == 0) {
                    c++;
                    i += sub.n;
                } else
                    i++;
            }
            return jv_int(c);
        }
        long pos = -1;
        if (m[0] == 'r') {
            for (size_t i = s.n + 1; i-- > 0;)
                if (i + sub.n <= s.n && memcmp(s.u.s + i, sub.u.s, sub.n) == 0) {
                    pos = (long)i;
                    break;
                }
        } else {
            const char *f = find_sub(s.u.s, s.n, sub.u.s, sub.n);
            if (f) pos = (long)(f - s.u.s);
        }
        if (pos < 0 && m[0] == 'i') jx_fail(x, x->at, TUNA_E_FORMAT, "index(): substring not found");
        return jv_int(pos < 0 ? -1 : (int64_t)ju_len(s.u.s, (size_t)pos));
    }
    if (!strcmp(m, "splitlines")) {
        struct jv out = jv_list(x, 0);
        size_t st = 0;
        for (size_t i = 0; i < s.n; i++) {
            char c = s.u.s[i];
            if (c == '\n' || c == '\r' || c == '\v' || c == '\f' || (c >= 0x1c && c <= 0x1e)) {
                jl_push(x, out.u.l, jv_str_ref(s.u.s + st, i - st));
                if (c == '\r' && i + 1 < s.n && s.u.s[i + 1] == '\n') i++;
                st = i + 1;
            }
        }
        if (st < s.n) jl_push(x, out.u.l, jv_str_ref(s.u.s + st, s.n - st));
        return out;
    }
    if (!strncmp(m, "is", 2)) {
        if (s.n == 0) return jv_bool(false);
        bool all = true, any_cased = false;
        for (size_t i = 0; i < s.n; i++) {
            unsigned char c = (unsigned char)s.u.s[i];
            bool dig = c >= '0' && c <= '9', lo = c >= 'a' && c <= 'z', up = c >= 'A' && c <= 'Z';
            if (c >= 0x80) jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "%s() on non-ASCII text", m);
            if (!strcmp(m, "isdigit") || !strcmp(m, "isnumeric") || !strcmp(m, "isdecimal"))
                all &= dig;
            else if (!strcmp(m, "isalpha"))
                all &= lo || up;
            else if (!strcmp(m, "isalnum"))
                all &= lo || up || dig;
            else if (!strcmp(m, "isspace"))
                all &= js_ws_at(s.u.s, s.n, i) > 0;
            else if (!strcmp(m, "islower")) {
                all &= !up;
                any_cased |= lo;
            } else if (!strcmp(m, "isupper")) {
                all &= !lo;
                any_cased |= up;
            }
        }
        if (!strcmp(m, "islower") || !strcmp(m, "isupper")) return jv_bool(all && any_cased);
        return jv_bool(all);
    }
    jx_fail(x, x->at, TUNA_E_INTERNAL, "str.%s", m);
}

static struct jv dict_method(struct jctx *x, struct jv d, struct jargs *a, const char *m)
{
    struct jdict *dd = d.u.d;
    if (!strcmp(m, "items") || !strcmp(m, "keys") || !strcmp(m, "values")) {
        struct jv out = jv_list(x, dd->n);
        for (size_t i = 0; i < dd->n; i++) {
            if (m[0] == 'k')
                jl_push(x, out.u.l, dd->k[i]);
            else if (m[0] == 'v')
                jl_push(x, out.u.l, dd->v[i]);
            else {
                struct jv t = jv_list(x, 2);
                t.t = JV_TUPLE;
                jl_push(x, t.u.l, dd->k[i]);
                jl_push(x, t.u.l, dd->v[i]);
                jl_push(x, out.u.l, t);
            }
        }
        out.u.l->kind = m[0] == 'k' ? JL_KEYS : m[0] == 'v' ? JL_VALUES : JL_ITEMS;
        return out;
    }
    if (!strcmp(m, "get")) {
        long i = jd_find(dd, ja_arg(a, 0, "key", jv_none()));
        return i >= 0 ? dd->v[i] : ja_arg(a, 1, "default", jv_none());
    }
    if (!strcmp(m, "pop")) {
        struct jv out;
        if (jd_del(dd, ja_arg(a, 0, NULL, jv_none()), &out)) return out;
        if (a->npos > 1) return a->pos[1];
        jx_fail(x, x->at, TUNA_E_FORMAT, "dict.pop(): key not found");
    }
    if (!strcmp(m, "setdefault")) {
        struct jv k = ja_arg(a, 0, NULL, jv_none());
        long i = jd_find(dd, k);
        if (i >= 0) return dd->v[i];
        struct jv v = ja_arg(a, 1, NULL, jv_none());
        jd_set(x, dd, k, v);
        return v;
    }
    if (!strcmp(m, "update")) {
        if (a->npos) {
            struct jv o = a->pos[0];
            if (o.t != JV_DICT) jx_fail(x, x->at, TUNA_E_FORMAT, "dict.update() needs a dict");
            for (size_t i = 0; i < o.u.d->n; i++)
                jd_set(x, dd, o.u.d->k[i], o.u.d->v[i]);
        }
        for (size_t i = 0; i < a->nkw; i++)
            jd_set(x, dd, jv_strz(x, a->kwname[i]), a->kw[i]);
        return jv_none();
    }
    if (!strcmp(m, "copy")) {
        struct jv c = jv_dict(x, dd->n);
        for (size_t i = 0; i < dd->n; i++)
            jd_set(x, c.u.d, dd->k[i], dd->v[i]);
        return c;
    }
    jx_fail(x, x->at, TUNA_E_INTERNAL, "dict.%s", m);
}

static struct jv list_method(struct jctx *x, struct jv l, struct jargs *a, const char *m)
{
    struct jlist *ll = l.u.l;
    if (l.t == JV_TUPLE && strcmp(m, "index") && strcmp(m, "count"))
        jx_fail(x, x->at, TUNA_E_FORMAT, "'tuple' object has no attribute '%s'", m);
    if (!strcmp(m, "append")) {
        jl_push(x, ll, ja_arg(a, 0, NULL, jv_none()));
        return jv_none();
    }
    if (!strcmp(m, "extend")) {
        struct jlist *o = jv_iterate(x, ja_arg(a, 0, NULL, jv_list(x, 0)), x->at);
        size_t n = o->n;
        for (size_t i = 0; i < n; i++)
            jl_push(x, ll, o->v[i]);
        return jv_none();
    }
    if (!strcmp(m, "pop")) {
        if (ll->n == 0) jx_fail(x, x->at, TUNA_E_FORMAT, "pop from empty list");
        int64_t i = a->npos ? int_arg(x, a->pos[0], "pop()") : -1;
        if (i < 0) i += (int64_t)ll->n;
        if (i < 0 || (size_t)i >= ll->n) jx_fail(x, x->at, TUNA_E_FORMAT, "pop index out of range");
        struct jv v = ll->v[i];
        memmove(ll->v + i, ll->v + i + 1, (ll->n - (size_t)i - 1) * sizeof *ll->v);
        ll->n--;
        return v;
    }
    if (!strcmp(m, "insert")) {
        int64_t i = int_arg(x, ja_arg(a, 0, NULL, jv_int(0)), "insert()");
        if (i < 0) i += (int64_t)ll->n;
        if (i < 0) i = 0;
        if ((size_t)i > ll->n) i = (int64_t)ll->n;
        jl_push(x, ll, jv_none());
        memmove(ll->v + i + 1, ll->v + i, (ll->n - (size_t)i - 1) * sizeof *ll->v);
        ll->v[i] = ja_arg(a, 1, NULL, jv_none());
        return jv_none();
    }
    if (!strcmp(m, "index") || !strcmp(m, "count") || !strcmp(m, "remove")) {
        struct jv v = ja_arg(a, 0, NULL, jv_none());
        int64_t c = 0;
        for (size_t i = 0; i < ll->n; i++) {
            if (!jv_equal(ll->v[i], v)) continue;
            if (m[0] == 'i') return jv_int((int64_t)i);
            if (m[0] == 'r') {
                memmove(ll->v + i, ll->v + i + 1, (ll->n - i - 1) * sizeof *ll->v);
                ll->n--;
                return jv_none();
            }
            c++;
        }
        if (m[0] == 'c') return jv_int(c);
        jx_fail(x, x->at, TUNA_E_FORMAT, "list.%s(x): x not in list", m);
    }
    if (!strcmp(m, "reverse")) {
        for (size_t i = 0; i < ll->n / 2; i++) {
            struct jv t = ll->v[i];
            ll->v[i] = ll->v[ll->n - 1 - i];
            ll->v[ll->n - 1 - i] = t;
        }
        return jv_none();
    }
    if (!strcmp(m, "copy")) {
        struct jv c = jv_list(x, ll->n);
        for (size_t i = 0; i < ll->n; i++)
            jl_push(x, c.u.l, ll->v[i]);
        return c;
    }
    jx_fail(x, x->at, TUNA_E_INTERNAL, "list.%s", m);
}

/* Python's signatures: positional arguments min..max (max -1: any), keywords allowed ("*": any).
 * `start`/`end` of find/startswith & co. are refused (tuna does not implement them). */
struct method_sig {
    char type; /* 's' str, 'd' dict, 'l' list */
    const char *name;
    int min, max;
    const char *kw;
};
static const struct method_sig SIGS[] = {
    {'s', "strip", 0, 1, ""},
    {'s', "lstrip", 0, 1, ""},
    {'s', "rstrip", 0, 1, ""},
    {'s', "upper", 0, 0, ""},
    {'s', "lower", 0, 0, ""},
    {'s', "title", 0, 0, ""},
    {'s', "capitalize", 0, 0, ""},
    {'s', "split", 0, 2, "sep,maxsplit"},
    {'s', "rsplit", 0, 2, "sep,maxsplit"},
    {'s', "startswith", 1, 3, ""},
    {'s', "endswith", 1, 3, ""},
    {'s', "replace", 2, 3, "count"},
    {'s', "format", 0, -1, "*"},
    {'s', "join", 1, 1, ""},
    {'s', "find", 1, 3, ""},
    {'s', "rfind", 1, 3, ""},
    {'s', "index", 1, 3, ""},
    {'s', "count", 1, 3, ""},
    {'s', "splitlines", 0, 1, "keepends"},
    {'s', "isdigit", 0, 0, ""},
    {'s', "isnumeric", 0, 0, ""},
    {'s', "isdecimal", 0, 0, ""},
    {'s', "isalpha", 0, 0, ""},
    {'s', "isalnum", 0, 0, ""},
    {'s', "isspace", 0, 0, ""},
    {'s', "islower", 0, 0, ""},
    {'s', "isupper", 0, 0, ""},
    {'d', "items", 0, 0, ""},
    {'d', "keys", 0, 0, ""},
    {'d', "values", 0, 0, ""},
    {'d', "get", 1, 2, ""},
    {'d', "pop", 1, 2, ""},
    {'d', "setdefault", 1, 2, ""},
    {'d', "update", 0, 1, "*"},
    {'d', "copy", 0, 0, ""},
    {'l', "append", 1, 1, ""},
    {'l', "extend", 1, 1, ""},
    {'l', "pop", 0, 1, ""},
    {'l', "insert", 2, 2, ""},
    {'l', "index", 1, 1, ""},
    {'l', "count", 1, 1, ""},
    {'l', "remove", 1, 1, ""},
    {'l', "reverse", 0, 0, ""},
    {'l', "copy", 0, 0, ""},
};

static void check_call(struct jctx *x, struct jv obj, const char *m, const struct jargs *a)
{
    char type = obj.t == JV_STR ? 's' : obj.t == JV_DICT ? 'd' : 'l';
    for (size_t i = 0; i < sizeof SIGS / sizeof *SIGS; i++) {
        const struct method_sig *g = &SIGS[i];
        if (g->type != type || strcmp(g->name, m)) continue;
        if ((int)a->npos < g->min || (g->max >= 0 && (int)a->npos > g->max))
            jx_fail(x, x->at, TUNA_E_FORMAT, "%s.%s() takes %d to %d positional arguments (%zu given)",
                    jv_type_name(obj), m, g->min, g->max, a->npos);
        for (size_t k = 0; k < a->nkw && strcmp(g->kw, "*"); k++) {
            const char *kw = a->kwname[k];
            const char *hit = strstr(g->kw, kw);
            size_t n = strlen(kw);
            if (!hit || (hit != g->kw && hit[-1] != ',') || (hit[n] != ',' && hit[n] != 0))
                jx_fail(x, x->at, TUNA_E_FORMAT, "%s.%s() got an unexpected keyword argument '%s'", jv_type_name(obj),
                        m, kw);
        }
        if (type == 's' && a->npos > 1 && g->max == 3 && strcmp(m, "replace"))
            jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "the start/end arguments of str.%s()", m);
        if (type == 's' && !strcmp(m, "splitlines") && (a->npos || a->nkw))
            jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "str.splitlines(keepends)");
        /* dict keys must be hashable */
        if (type == 'd' && a->npos && (a->pos[0].t == JV_LIST || a->pos[0].t == JV_DICT) && strcmp(m, "update"))
            jx_fail(x, x->at, TUNA_E_FORMAT, "unhashable type: '%s'", jv_type_name(a->pos[0]));
        return;
    }
}

static struct jv call_method(struct jctx *x, struct jv self, struct jargs *a)
{
    /* self is a 2-item tuple: (object, method name) */
    struct jv obj = self.u.l->v[0];
    const char *m = self.u.l->v[1].u.s;
    check_call(x, obj, m, a);
    if (obj.t == JV_STR) {
        struct jv r = str_method(x, obj, a, m);
        /* Markup's own methods keep it Markup */
        if (obj.safe && r.t == JV_STR &&
            (strstr(m, "strip") || !strcmp(m, "upper") || !strcmp(m, "lower") || !strcmp(m, "title") ||
             !strcmp(m, "capitalize")))
            r.safe = true;
        return r;
    }
    if (obj.t == JV_DICT) return dict_method(x, obj, a, m);
    return list_method(x, obj, a, m);
}

static const char *const STR_METHODS[] = {"strip",      "lstrip",  "rstrip",    "upper",      "lower",    "title",
                                          "capitalize", "split",   "rsplit",    "startswith", "endswith", "replace",
                                          "format",     "join",    "find",      "rfind",      "index",    "count",
                                          "splitlines", "isdigit", "isnumeric", "isdecimal",  "isalpha",  "isalnum",
                                          "isspace",    "islower", "isupper",   NULL};
static const char *const DICT_METHODS[] = {"items",      "keys",   "values", "get", "pop",
                                           "setdefault", "update", "copy",   NULL};
static const char *const LIST_METHODS[] = {"append", "extend", "pop",     "insert", "index",
                                           "count",  "remove", "reverse", "copy",   NULL};

static const char *find_name(const char *const *tab, const char *name, size_t n)
{
    for (int i = 0; tab[i]; i++)
        if (strlen(tab[i]) == n && memcmp(tab[i], name, n) == 0) return tab[i];
    return NULL;
}

struct jv jx_getattr(struct jctx *x, struct jv obj, const char *name, size_t n, const struct node *at)
{
    const char *m = NULL;
    switch (obj.t) {
    case JV_UNDEF:
        jx_fail(x, at, TUNA_E_FORMAT, "'%.*s' is undefined (while reading its attribute '%.*s')", (int)obj.n,
                obj.u.s ? obj.u.s : "value", (int)n, name);
    case JV_STR: m = find_name(STR_METHODS, name, n); break;
    case JV_DICT: m = find_name(DICT_METHODS, name, n); break;
    case JV_LIST:
    case JV_TUPLE: m = find_name(LIST_METHODS, name, n); break;
    default: break;
    }
    if (m) {
        struct jv t = jv_list(x, 2);
        t.t = JV_TUPLE;
        jl_push(x, t.u.l, obj);
        jl_push(x, t.u.l, jv_str_ref(m, strlen(m)));
        return jv_builtin(x, m, call_method, t);
    }
    if (obj.t == JV_DICT || obj.t == JV_NS) {
        long i = jd_finds(obj.u.d, name, n);
        if (i >= 0) return obj.u.d->v[i];
    }
    struct jv u = {.t = JV_UNDEF, .n = n};
    u.u.s = name;
    return u;
}
