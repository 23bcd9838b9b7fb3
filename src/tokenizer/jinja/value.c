/* value.c — Jinja values with Python semantics: the arena they live in, constructors, lists and
 * insertion-ordered dicts, truthiness, equality and ordering, and printing them as Python's
 * str()/repr() and as json.dumps does (for the tojson filter). */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/jinja/internal.h"

/* ---- arena ---- */
struct jarena_block {
    struct jarena_block *next;
    size_t used, cap;
    max_align_t data[];
};

void *ja_alloc(struct jarena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    struct jarena_block *b = a->head;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        b = malloc(sizeof *b + cap);
        if (!b) {
            a->failed = true;
            return NULL;
        }
        b->used = 0;
        b->cap = cap;
        b->next = a->head;
        a->head = b;
    }
    void *p = (char *)b->data + b->used;
    b->used += n;
    memset(p, 0, n);
    return p;
}

char *ja_strndup(struct jarena *a, const char *s, size_t n)
{
    char *p = ja_alloc(a, n + 1);
    if (p) {
        if (n) memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

void ja_free(struct jarena *a)
{
    struct jarena_block *b = a->head;
    while (b) {
        struct jarena_block *nx = b->next;
        free(b);
        b = nx;
    }
    a->head = NULL;
}

/* ---- byte buffer ---- */
void jb_put(struct jbuf *b, const char *s, size_t n)
{
    if (b->oom || n == 0) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

void jb_puts(struct jbuf *b, const char *s)
{
    jb_put(b, s, strlen(s));
}
void jb_putc(struct jbuf *b, char c)
{
    jb_put(b, &c, 1);
}

void jb_printf(struct jbuf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof tmp) {
        jb_put(b, tmp, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) {
        b->oom = true;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    jb_put(b, big, (size_t)n);
    free(big);
}

/* ---- constructors ---- */

static void *xalloc(struct jctx *x, size_t n)
{
    void *p = ja_alloc(x->ar, n);
    if (!p) jx_fail(x, x->at, TUNA_E_OOM, "out of memory while rendering (%zu bytes)", n);
    return p;
}

struct jv jv_undef(const char *name)
{
    struct jv v = {.t = JV_UNDEF};
    v.u.s = name;
    v.n = name ? strlen(name) : 0;
    return v;
}
struct jv jv_none(void)
{
    return (struct jv){.t = JV_NONE};
}
struct jv jv_bool(bool b)
{
    struct jv v = {.t = JV_BOOL};
    v.u.b = b;
    return v;
}
struct jv jv_int(int64_t i)
{
    struct jv v = {.t = JV_INT};
    v.u.i = i;
    return v;
}
struct jv jv_float(double f)
{
    struct jv v = {.t = JV_FLOAT};
    v.u.f = f;
    return v;
}
struct jv jv_str_ref(const char *s, size_t n)
{
    struct jv v = {.t = JV_STR, .n = n};
    v.u.s = s ? s : "";
    return v;
}
struct jv jv_str(struct jctx *x, const char *s, size_t n)
{
    char *p = xalloc(x, n + 1);
    if (n) memcpy(p, s, n);
    return jv_str_ref(p, n);
}
struct jv jv_strz(struct jctx *x, const char *s)
{
    return jv_str(x, s, strlen(s));
}

struct jv jv_list(struct jctx *x, size_t cap)
{
    struct jv v = {.t = JV_LIST};
    v.u.l = xalloc(x, sizeof *v.u.l);
    if (cap) {
        v.u.l->v = xalloc(x, cap * sizeof(struct jv));
        v.u.l->cap = cap;
    }
    return v;
}

struct jv jv_dict(struct jctx *x, size_t cap)
{
    struct jv v = {.t = JV_DICT};
    v.u.d = xalloc(x, sizeof *v.u.d);
    if (cap) {
        v.u.d->k = xalloc(x, cap * sizeof(struct jv));
        v.u.d->v = xalloc(x, cap * sizeof(struct jv));
        v.u.d->cap = cap;
    }
    return v;
}

struct jv jv_builtin(struct jctx *x, const char *name, jbuiltin_fn fn, struct jv self)
{
    struct jv v = {.t = JV_FUNC};
    v.u.fn = xalloc(x, sizeof *v.u.fn);
    v.u.fn->name = name;
    v.u.fn->fn = fn;
    v.u.fn->self = self;
    return v;
}

void jl_push(struct jctx *x, struct jlist *l, struct jv v)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        struct jv *nv = xalloc(x, cap * sizeof *nv);
        if (l->n) memcpy(nv, l->v, l->n * sizeof *nv);
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}

long jd_finds(const struct jdict *d, const char *k, size_t n)
{
    for (size_t i = 0; i < d->n; i++)
        if (d->k[i].t == JV_STR && d->k[i].n == n && memcmp(d->k[i].u.s, k, n) == 0) return (long)i;
    return -1;
}

long jd_find(const struct jdict *d, struct jv k)
{
    if (k.t == JV_STR) return jd_finds(d, k.u.s, k.n);
    for (size_t i = 0; i < d->n; i++)
        if (jv_equal(d->k[i], k)) return (long)i;
    return -1;
}

bool jd_gets(const struct jdict *d, const char *k, struct jv *out)
{
    long i = jd_finds(d, k, strlen(k));
    if (i < 0) return false;
    *out = d->v[i];
    return true;
}

void jd_set(struct jctx *x, struct jdict *d, struct jv k, struct jv v)
{
    long i = jd_find(d, k);
    if (i >= 0) {
        d->v[i] = v;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 8;
        struct jv *nk = xalloc(x, cap * sizeof *nk), *nv = xalloc(x, cap * sizeof *nv);
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof *nk);
            memcpy(nv, d->v, d->n * sizeof *nv);
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = k;
    d->v[d->n] = v;
    d->n++;
}

bool jd_del(struct jdict *d, struct jv k, struct jv *out)
{
    long i = jd_find(d, k);
    if (i < 0) return false;
    if (out) *out = d->v[i];
    memmove(d->k + i, d->k + i + 1, (d->n - (size_t)i - 1) * sizeof *d->k);
    memmove(d->v + i, d->v + i + 1, (d->n - (size_t)i - 1) * sizeof *d->v);
    d->n--;
    return true;
}

/* ---- semantics ---- */
bool jv_is_num(struct jv v)
{
    return v.t == JV_INT || v.t == JV_FLOAT || v.t == JV_BOOL;
}
bool jv_is_seq(struct jv v)
{
    return v.t == JV_LIST || v.t == JV_TUPLE;
}

static const char *kind_name(enum jl_kind k)
{
    switch (k) {
    case JL_GEN: return "generator";
    case JL_ITEMS: return "dict_items";
    case JL_KEYS: return "dict_keys";
    case JL_VALUES: return "dict_values";
    case JL_RANGE: return "range";
    default: return "list";
    }
}

struct jv jv_as_kind(struct jctx *x, struct jv list, enum jl_kind kind)
{
    struct jv out = jv_list(x, list.u.l->n);
    for (size_t i = 0; i < list.u.l->n; i++)
        jl_push(x, out.u.l, list.u.l->v[i]);
    out.u.l->kind = kind;
    return out;
}

double jv_num(struct jv v)
{
    if (v.t == JV_INT) return (double)v.u.i;
    if (v.t == JV_FLOAT) return v.u.f;
    if (v.t == JV_BOOL) return v.u.b ? 1 : 0;
    return 0;
}

const char *jv_type_name(struct jv v)
{
    switch (v.t) {
    case JV_UNDEF: return "undefined";
    case JV_NONE: return "NoneType";
    case JV_BOOL: return "bool";
    case JV_INT: return "int";
    case JV_FLOAT: return "float";
    case JV_STR: return "str";
    case JV_LIST: return kind_name(v.u.l->kind);
    case JV_TUPLE: return "tuple";
    case JV_DICT: return "dict";
    case JV_NS: return "Namespace";
    case JV_FUNC: return "function";
    }
    return "?";
}

bool jv_truthy(struct jv v)
{
    switch (v.t) {
    case JV_UNDEF:
    case JV_NONE: return false;
    case JV_BOOL: return v.u.b;
    case JV_INT: return v.u.i != 0;
    case JV_FLOAT: return v.u.f != 0;
    case JV_STR: return v.n != 0;
    case JV_LIST:
    case JV_TUPLE: return v.u.l->kind == JL_GEN || v.u.l->n != 0;
    case JV_DICT: return v.u.d->n != 0;
    case JV_NS:
    case JV_FUNC: return true;
    }
    return false;
}

bool jv_equal(struct jv a, struct jv b)
{
    if (jv_is_num(a) && jv_is_num(b)) {
        if (a.t != JV_FLOAT && b.t != JV_FLOAT) {
            int64_t ia = a.t == JV_BOOL ? a.u.b : a.u.i, ib = b.t == JV_BOOL ? b.u.b : b.u.i;
            return ia == ib;
        }
        return jv_num(a) == jv_num(b);
    }
    if (a.t != b.t) return false;
    switch (a.t) {
    case JV_UNDEF:
    case JV_NONE: return true;
    case JV_STR: return a.n == b.n && memcmp(a.u.s, b.u.s, a.n) == 0;
    case JV_LIST:
    case JV_TUPLE:
        if (a.u.l->kind == JL_GEN || b.u.l->kind == JL_GEN) return a.u.l == b.u.l;
        if (a.u.l->kind != b.u.l->kind) return false;
        if (a.u.l->n != b.u.l->n) return false;
        for (size_t i = 0; i < a.u.l->n; i++)
            if (!jv_equal(a.u.l->v[i], b.u.l->v[i])) return false;
        return true;
    case JV_DICT:
        if (a.u.d->n != b.u.d->n) return false;
        for (size_t i = 0; i < a.u.d->n; i++) {
            long j = jd_find(b.u.d, a.u.d->k[i]);
            if (j < 0 || !jv_equal(a.u.d->v[i], b.u.d->v[j])) return false;
        }
        return true;
    case JV_NS: return a.u.d == b.u.d;
    case JV_FUNC: return a.u.fn == b.u.fn;
    default: return false;
    }
}

static int lower_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    size_t n = an < bn ? an : bn;
    for (size_t i = 0; i < n; i++) {
        int ca = (unsigned char)a[i], cb = (unsigned char)b[i];
        if (ca >= 'A' && ca <= 'Z') ca += 32;
        if (cb >= 'A' && cb <= 'Z') cb += 32;
        if (ca != cb) return ca < cb ? -1 : 1;
    }
    return an < bn ? -1 : an > bn ? 1 : 0;
}

int jv_compare(struct jctx *x, struct jv a, struct jv b, bool case_sensitive)
{
    if (jv_is_num(a) && jv_is_num(b)) {
        if (a.t != JV_FLOAT && b.t != JV_FLOAT) {
            int64_t ia = a.t == JV_BOOL ? a.u.b : a.u.i, ib = b.t == JV_BOOL ? b.u.b : b.u.i;
            return ia < ib ? -1 : ia > ib;
        }
        double da = jv_num(a), db = jv_num(b);
        return da < db ? -1 : da > db;
    }
    if (a.t == JV_STR && b.t == JV_STR) {
        if (!case_sensitive) return lower_cmp(a.u.s, a.n, b.u.s, b.n);
        size_t n = a.n < b.n ? a.n : b.n;
        int c = n ? memcmp(a.u.s, b.u.s, n) : 0;
        if (c) return c < 0 ? -1 : 1;
        return a.n < b.n ? -1 : a.n > b.n;
    }
    if (jv_is_seq(a) && a.t == b.t) {
        size_t n = a.u.l->n < b.u.l->n ? a.u.l->n : b.u.l->n;
        for (size_t i = 0; i < n; i++) {
            if (jv_equal(a.u.l->v[i], b.u.l->v[i])) continue;
            return jv_compare(x, a.u.l->v[i], b.u.l->v[i], case_sensitive);
        }
        return a.u.l->n < b.u.l->n ? -1 : a.u.l->n > b.u.l->n;
    }
    jx_fail(x, x->at, TUNA_E_FORMAT, "cannot compare %s with %s ('<' not supported)", jv_type_name(a), jv_type_name(b));
}

/* ---- UTF-8 helpers (Python strings count code points) ---- */
bool ju_is_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80) return false;
    return true;
}

size_t ju_len(const char *s, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)s[i] & 0xC0) != 0x80) c++;
    return c;
}

size_t ju_offset(const char *s, size_t n, size_t cp)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++) {
        if (((unsigned char)s[i] & 0xC0) != 0x80) {
            if (c == cp) return i;
            c++;
        }
    }
    return n;
}

/* ---- printing ---- */
void jv_write_float(struct jbuf *b, double f)
{
    if (isnan(f)) {
        jb_puts(b, "nan");
        return;
    }
    if (isinf(f)) {
        jb_puts(b, f < 0 ? "-inf" : "inf");
        return;
    }
    /* shortest digits that round-trip, as Python's repr */
    char tmp[64];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f) break;
    }
    /* tmp = [-]d.ddde[+-]XX */
    char digits[32];
    size_t nd = 0;
    const char *p = tmp;
    bool neg = false;
    if (*p == '-') {
        neg = true;
        p++;
    }
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9') digits[nd++] = *p;
    int e = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = 0;
    if (neg) jb_putc(b, '-');
    if (e < -4 || e >= 16) {
        jb_putc(b, digits[0]);
        if (nd > 1) {
            jb_putc(b, '.');
            jb_put(b, digits + 1, nd - 1);
        }
        jb_printf(b, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
    } else if (e < 0) {
        jb_puts(b, "0.");
        for (int i = 0; i < -e - 1; i++)
            jb_putc(b, '0');
        jb_put(b, digits, nd);
    } else {
        if ((size_t)e + 1 >= nd) {
            jb_put(b, digits, nd);
            for (size_t i = nd; i < (size_t)e + 1; i++)
                jb_putc(b, '0');
            jb_puts(b, ".0");
        } else {
            jb_put(b, digits, (size_t)e + 1);
            jb_putc(b, '.');
            jb_put(b, digits + e + 1, nd - (size_t)e - 1);
        }
    }
}

static void write_str_repr(struct jbuf *b, const char *s, size_t n)
{
    bool has_sq = memchr(s, '\'', n) != NULL, has_dq = memchr(s, '"', n) != NULL;
    char q = (has_sq && !has_dq) ? '"' : '\'';
    jb_putc(b, q);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == (unsigned char)q || c == '\\') {
            jb_putc(b, '\\');
            jb_putc(b, (char)c);
        } else if (c == '\n')
            jb_puts(b, "\\n");
        else if (c == '\r')
            jb_puts(b, "\\r");
        else if (c == '\t')
            jb_puts(b, "\\t");
        else if (c < 0x20 || c == 0x7f)
            jb_printf(b, "\\x%02x", c);
        else
            jb_putc(b, (char)c);
    }
    jb_putc(b, q);
}

static void write_seq(struct jbuf *b, struct jv v)
{
    bool tuple = v.t == JV_TUPLE;
    enum jl_kind k = v.u.l->kind;
    if (k == JL_GEN) {
        jb_puts(b, "<generator object>"); /* only nested: top level fails in jx_write_str */
        return;
    }
    if (k == JL_RANGE) {
        if (v.u.l->rs == 1)
            jb_printf(b, "range(%lld, %lld)", (long long)v.u.l->r0, (long long)v.u.l->r1);
        else
            jb_printf(b, "range(%lld, %lld, %lld)", (long long)v.u.l->r0, (long long)v.u.l->r1, (long long)v.u.l->rs);
        return;
    }
    if (k != JL_LIST) {
        jb_puts(b, kind_name(k));
        jb_putc(b, '(');
    }
    jb_putc(b, tuple ? '(' : '[');
    for (size_t i = 0; i < v.u.l->n; i++) {
        if (i) jb_puts(b, ", ");
        jv_write_repr(b, v.u.l->v[i]);
    }
    if (tuple && v.u.l->n == 1) jb_putc(b, ',');
    jb_putc(b, tuple ? ')' : ']');
    if (k != JL_LIST) jb_putc(b, ')');
}

void jx_write_str(struct jctx *x, struct jbuf *b, struct jv v)
{
    if (v.t == JV_FUNC)
        jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "printing the function or method '%s': Python prints its memory address",
                v.u.fn->name ? v.u.fn->name : "?");
    if (v.t == JV_DICT && v.u.d->is_loop) { /* repr(LoopContext) */
        struct jv i, n;
        if (jd_gets(v.u.d, "index", &i) && jd_gets(v.u.d, "length", &n))
            jb_printf(b, "<LoopContext %lld/%lld>", (long long)i.u.i, (long long)n.u.i);
        return;
    }
    if (jv_is_seq(v) && v.u.l->kind == JL_GEN)
        jx_fail(x, x->at, TUNA_E_UNSUPPORTED,
                "printing a generator (the result of map/select/reject/unique/reverse/items): Python prints "
                "its memory address; add '| list'");
    jv_write_str(b, v);
}

static void write_dict(struct jbuf *b, const struct jdict *d)
{
    jb_putc(b, '{');
    for (size_t i = 0; i < d->n; i++) {
        if (i) jb_puts(b, ", ");
        jv_write_repr(b, d->k[i]);
        jb_puts(b, ": ");
        jv_write_repr(b, d->v[i]);
    }
    jb_putc(b, '}');
}

void jv_write_repr(struct jbuf *b, struct jv v)
{
    if (v.t == JV_UNDEF)
        jb_puts(b, "Undefined"); /* repr(Undefined), e.g. inside a list */
    else if (v.t == JV_STR)
        write_str_repr(b, v.u.s, v.n);
    else
        jv_write_str(b, v);
}

void jv_write_str(struct jbuf *b, struct jv v)
{
    switch (v.t) {
    case JV_UNDEF: break;
    case JV_NONE: jb_puts(b, "None"); break;
    case JV_BOOL: jb_puts(b, v.u.b ? "True" : "False"); break;
    case JV_INT: jb_printf(b, "%lld", (long long)v.u.i); break;
    case JV_FLOAT: jv_write_float(b, v.u.f); break;
    case JV_STR: jb_put(b, v.u.s, v.n); break;
    case JV_LIST:
    case JV_TUPLE: write_seq(b, v); break;
    case JV_DICT: write_dict(b, v.u.d); break;
    case JV_NS:
        jb_puts(b, "<Namespace ");
        write_dict(b, v.u.d);
        jb_putc(b, '>');
        break;
    case JV_FUNC: jb_printf(b, "<function %s>", v.u.fn->name ? v.u.fn->name : "?"); break;
    }
}

struct jv jv_to_str(struct jctx *x, struct jv v)
{
    if (v.t == JV_STR) return v;
    struct jbuf b = {0};
    jx_write_str(x, &b, v);
    if (b.oom) {
        free(b.p);
        jx_fail(x, x->at, TUNA_E_OOM, "out of memory while rendering");
    }
    struct jv r = jv_str(x, b.p ? b.p : "", b.n);
    free(b.p);
    return r;
}

/* ---- json.dumps ---- */
static void json_str(struct jbuf *b, const char *s, size_t n, bool ensure_ascii)
{
    jb_putc(b, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': jb_puts(b, "\\\""); continue;
        case '\\': jb_puts(b, "\\\\"); continue;
        case '\n': jb_puts(b, "\\n"); continue;
        case '\r': jb_puts(b, "\\r"); continue;
        case '\t': jb_puts(b, "\\t"); continue;
        case '\b': jb_puts(b, "\\b"); continue;
        case '\f': jb_puts(b, "\\f"); continue;
        default: break;
        }
        if (c < 0x20) {
            jb_printf(b, "\\u%04x", c);
        } else if (c >= 0x80 && ensure_ascii) {
            /* decode one UTF-8 sequence */
            uint32_t cp = 0;
            int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : 0;
            cp = c & (0x3F >> extra);
            for (int k = 0; k < extra && i + 1 < n; k++)
                cp = (cp << 6) | ((unsigned char)s[++i] & 0x3F);
            if (cp >= 0x10000) {
                cp -= 0x10000;
                jb_printf(b, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
            } else {
                jb_printf(b, "\\u%04x", cp);
            }
        } else {
            jb_putc(b, (char)c);
        }
    }
    jb_putc(b, '"');
}

static void json_nl(struct jbuf *b, const struct tojson_opts *o, int level)
{
    jb_putc(b, '\n');
    for (int i = 0; i < o->indent * level; i++)
        jb_putc(b, ' ');
}

void jv_write_json(struct jctx *x, struct jbuf *b, struct jv v, const struct tojson_opts *o, int level)
{
    switch (v.t) {
    case JV_NONE: jb_puts(b, "null"); return;
    case JV_BOOL: jb_puts(b, v.u.b ? "true" : "false"); return;
    case JV_INT: jb_printf(b, "%lld", (long long)v.u.i); return;
    case JV_FLOAT:
        if (isnan(v.u.f))
            jb_puts(b, "NaN");
        else if (isinf(v.u.f))
            jb_puts(b, v.u.f < 0 ? "-Infinity" : "Infinity");
        else
            jv_write_float(b, v.u.f);
        return;
    case JV_STR: json_str(b, v.u.s, v.n, o->ensure_ascii); return;
    case JV_LIST:
    case JV_TUPLE:
        if (v.u.l->kind != JL_LIST)
            jx_fail(x, x->at, TUNA_E_FORMAT, "tojson: Object of type %s is not JSON serializable%s", jv_type_name(v),
                    v.u.l->kind == JL_GEN ? " (add '| list' before tojson)" : "");
        if (v.u.l->n == 0) {
            jb_puts(b, "[]");
            return;
        }
        jb_putc(b, '[');
        for (size_t i = 0; i < v.u.l->n; i++) {
            if (i) jb_puts(b, o->item_sep);
            if (o->indent >= 0) json_nl(b, o, level + 1);
            jv_write_json(x, b, v.u.l->v[i], o, level + 1);
        }
        if (o->indent >= 0) json_nl(b, o, level);
        jb_putc(b, ']');
        return;
    case JV_DICT:
    case JV_NS: {
        const struct jdict *d = v.u.d;
        if (d->n == 0) {
            jb_puts(b, "{}");
            return;
        }
        /* pairs (key, value) in output order */
        struct jv *pairs = ja_alloc(x->ar, d->n * 2 * sizeof *pairs);
        if (!pairs) jx_fail(x, x->at, TUNA_E_OOM, "out of memory in tojson");
        for (size_t i = 0; i < d->n; i++) {
            pairs[2 * i] = d->k[i];
            pairs[2 * i + 1] = d->v[i];
        }
        if (o->sort_keys) { /* insertion sort of the (key, value) pairs: dicts here are small */
            for (size_t i = 1; i < d->n; i++) {
                struct jv k = pairs[2 * i], kv = pairs[2 * i + 1];
                size_t j = i;
                while (j > 0 && jv_compare(x, pairs[2 * (j - 1)], k, true) > 0) {
                    pairs[2 * j] = pairs[2 * (j - 1)];
                    pairs[2 * j + 1] = pairs[2 * (j - 1) + 1];
                    j--;
                }
                pairs[2 * j] = k;
                pairs[2 * j + 1] = kv;
            }
        }
        jb_putc(b, '{');
        for (size_t i = 0; i < d->n; i++) {
            if (i) jb_puts(b, o->item_sep);
            if (o->indent >= 0) json_nl(b, o, level + 1);
            struct jv k = pairs[2 * i];
            if (k.t == JV_STR)
                json_str(b, k.u.s, k.n, o->ensure_ascii);
            else if (k.t == JV_NONE)
                jb_puts(b, "\"null\"");
            else if (k.t == JV_BOOL)
                jb_puts(b, k.u.b ? "\"true\"" : "\"false\"");
            else if (k.t == JV_INT || k.t == JV_FLOAT) {
                jb_putc(b, '"');
                jv_write_json(x, b, k, o, level + 1);
                jb_putc(b, '"');
            } else
                jx_fail(x, x->at, TUNA_E_FORMAT, "tojson: keys must be str, int, float, bool or None, not %s",
                        jv_type_name(k));
            jb_puts(b, o->key_sep);
            jv_write_json(x, b, pairs[2 * i + 1], o, level + 1);
        }
        if (o->indent >= 0) json_nl(b, o, level);
        jb_putc(b, '}');
        return;
    }
    case JV_UNDEF:
        jx_fail(x, x->at, TUNA_E_FORMAT,
                "tojson: '%.*s' is undefined (Object of type Undefined is not JSON serializable)", (int)v.n,
                v.u.s ? v.u.s : "value");
    case JV_FUNC: jx_fail(x, x->at, TUNA_E_FORMAT, "tojson: a function is not JSON serializable");
    }
}

/* ---- iteration ---- */
struct jlist *jv_iterate(struct jctx *x, struct jv v, const struct node *at)
{
    struct jv out;
    switch (v.t) {
    case JV_LIST:
    case JV_TUPLE:
        if (v.u.l->kind == JL_GEN) {
            /* a generator runs once: a second pass sees nothing, as in Python */
            if (v.u.l->consumed) return jv_list(x, 0).u.l;
            v.u.l->consumed = true;
        }
        return v.u.l;
    case JV_UNDEF: return jv_list(x, 0).u.l;
    case JV_DICT:
    case JV_NS:
        if (v.u.d->is_loop) /* LoopContext iterates the loop itself; nothing a template should do */
            jx_fail(x, at, TUNA_E_UNSUPPORTED, "iterating over the loop object");
        out = jv_list(x, v.u.d->n);
        for (size_t i = 0; i < v.u.d->n; i++)
            jl_push(x, out.u.l, v.u.d->k[i]);
        return out.u.l;
    case JV_STR:
        out = jv_list(x, v.n);
        for (size_t i = 0; i < v.n;) {
            size_t j = i + 1;
            while (j < v.n && ((unsigned char)v.u.s[j] & 0xC0) == 0x80)
                j++;
            jl_push(x, out.u.l, jv_str_ref(v.u.s + i, j - i));
            i = j;
        }
        return out.u.l;
    default: jx_fail(x, at, TUNA_E_FORMAT, "'%s' object is not iterable", jv_type_name(v));
    }
}
