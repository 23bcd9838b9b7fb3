/* filters.c — Jinja2's builtin filters and tests (as in jinja2/filters.py and tests.py, with
 * transformers' own tojson), and the globals chat templates call: range, namespace, dict,
 * joiner, raise_exception, strftime_now. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tokenizer/jinja/internal.h"

/* ---- helpers ---- */
static struct jv str_of(struct jctx *x, struct jv v)
{
    return jv_to_str(x, v);
}

static struct jv buf_to_str(struct jctx *x, struct jbuf *b)
{
    if (b->oom) {
        free(b->p);
        jx_fail(x, x->at, TUNA_E_OOM, "out of memory");
    }
    struct jv r = jv_str(x, b->p ? b->p : "", b->n);
    free(b->p);
    return r;
}

/* environment.getitem with a dotted attribute path ("a.b.0") as map/sort/selectattr use */
static struct jv attr_path(struct jctx *x, struct jv obj, struct jv attr)
{
    if (attr.t == JV_INT) return jx_getitem(x, obj, attr, x->at);
    if (attr.t != JV_STR) jx_fail(x, x->at, TUNA_E_FORMAT, "attribute must be a string, not %s", jv_type_name(attr));
    size_t i = 0;
    while (i <= attr.n) {
        size_t j = i;
        while (j < attr.n && attr.u.s[j] != '.')
            j++;
        struct jv key = jv_str_ref(attr.u.s + i, j - i);
        bool digits = j > i;
        for (size_t k = i; k < j; k++)
            digits &= isdigit((unsigned char)attr.u.s[k]) != 0;
        if (digits) key = jv_int(strtoll(attr.u.s + i, NULL, 10));
        obj = jx_getitem(x, obj, key, x->at);
        i = j + 1;
    }
    return obj;
}

static struct jv new_list(struct jctx *x)
{
    return jv_list(x, 0);
}

static struct jv tuple2(struct jctx *x, struct jv a, struct jv b)
{
    struct jv t = jv_list(x, 2);
    t.t = JV_TUPLE;
    jl_push(x, t.u.l, a);
    jl_push(x, t.u.l, b);
    return t;
}

/* Stable merge sort of v[0..n) by key values k (parallel array). eq_first: keys that are equal
 * need no ordering (Jinja2's sort compares one-item lists [key], and Python's list comparison
 * tests equality first: [None, None] | sort works, [None, 1] | sort fails). */
static void msort(struct jctx *x, struct jv *v, struct jv *k, size_t n, bool cs, bool rev, bool eq_first, struct jv *tv,
                  struct jv *tk)
{
    if (n < 2) return;
    size_t h = n / 2;
    msort(x, v, k, h, cs, rev, eq_first, tv, tk);
    msort(x, v + h, k + h, n - h, cs, rev, eq_first, tv, tk);
    size_t i = 0, j = h, o = 0;
    while (i < h && j < n) {
        int c = eq_first && jv_equal(k[i], k[j]) ? 0 : jv_compare(x, k[i], k[j], cs);
        if (rev) c = -c;
        if (c <= 0) {
            tv[o] = v[i];
            tk[o++] = k[i++];
        } else {
            tv[o] = v[j];
            tk[o++] = k[j++];
        }
    }
    while (i < h) {
        tv[o] = v[i];
        tk[o++] = k[i++];
    }
    while (j < n) {
        tv[o] = v[j];
        tk[o++] = k[j++];
    }
    memcpy(v, tv, n * sizeof *v);
    memcpy(k, tk, n * sizeof *k);
}

static struct jv sorted(struct jctx *x, struct jlist *l, struct jv *keys, bool cs, bool rev, bool eq_first)
{
    struct jv out = jv_list(x, l->n);
    for (size_t i = 0; i < l->n; i++)
        jl_push(x, out.u.l, l->v[i]);
    struct jv *tv = ja_alloc(x->ar, (l->n + 1) * sizeof *tv), *tk = ja_alloc(x->ar, (l->n + 1) * sizeof *tk);
    if (!tv || !tk) jx_fail(x, x->at, TUNA_E_OOM, "out of memory");
    msort(x, out.u.l->v, keys, l->n, cs, rev, eq_first, tv, tk);
    return out;
}

/* ---- filters ---- */
typedef struct jv (*filter_fn)(struct jctx *x, struct jv in, struct jargs *a);

static struct jv f_abs(struct jctx *x, struct jv in, struct jargs *a)
{
    if (in.t == JV_INT) return jv_int(in.u.i < 0 ? -in.u.i : in.u.i);
    if (in.t == JV_BOOL) return jv_int(in.u.b);
    if (in.t == JV_FLOAT) return jv_float(fabs(in.u.f));
    jx_fail(x, x->at, TUNA_E_FORMAT, "bad operand type for abs(): '%s'", jv_type_name(in));
}

/* attr(): a Python attribute only (a method, or a namespace's attribute), never a dict item */
static struct jv f_attr(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv n = ja_arg(a, 0, "name", jv_none());
    if (n.t != JV_STR) jx_fail(x, x->at, TUNA_E_FORMAT, "attr(): name must be a string");
    if (in.t == JV_UNDEF || in.t == JV_NS) return jx_getattr(x, in, n.u.s, n.n, x->at);
    struct jv r = jx_getattr(x, in, n.u.s, n.n, x->at);
    return r.t == JV_FUNC ? r : jv_undef(NULL);
}

/* truncate(length=255, killwords=False, end='...', leeway=5) */
static struct jv f_truncate(struct jctx *x, struct jv in, struct jargs *a)
{
    int64_t length = ja_int(x, a, 0, "length", 255);
    bool killwords = ja_bool(a, 1, "killwords", false);
    struct jv end = str_of(x, ja_arg(a, 2, "end", jv_str_ref("...", 3)));
    int64_t leeway =
        ja_has(a, 3, "leeway") && ja_arg(a, 3, "leeway", jv_none()).t != JV_NONE ? ja_int(x, a, 3, "leeway", 5) : 5;
    int64_t elen = (int64_t)ju_len(end.u.s, end.n);
    if (length < elen)
        jx_fail(x, x->at, TUNA_E_FORMAT, "truncate(): expected length >= %lld, got %lld", (long long)elen,
                (long long)length);
    if (leeway < 0) jx_fail(x, x->at, TUNA_E_FORMAT, "truncate(): expected leeway >= 0, got %lld", (long long)leeway);
    if (in.t != JV_STR) {
        /* Jinja2 measures the value itself: short sequences and Undefined come back unchanged */
        if (in.t == JV_UNDEF || (jv_is_seq(in) && in.u.l->kind != JL_GEN && (int64_t)in.u.l->n <= length + leeway) ||
            ((in.t == JV_DICT) && (int64_t)in.u.d->n <= length + leeway))
            return in;
        jx_fail(x, x->at, TUNA_E_FORMAT, "truncate(): expected a string, got %s", jv_type_name(in));
    }
    struct jv s = in;
    int64_t slen = (int64_t)ju_len(s.u.s, s.n);
    if (slen <= length + leeway) return s;
    size_t cut = ju_offset(s.u.s, s.n, (size_t)(length - elen));
    if (!killwords) { /* s[:cut].rsplit(" ", 1)[0] */
        size_t sp = cut;
        while (sp > 0 && s.u.s[sp - 1] != ' ')
            sp--;
        if (sp > 0) cut = sp - 1;
    }
    struct jbuf b = {0};
    jb_put(&b, s.u.s, cut);
    jb_put(&b, end.u.s, end.n);
    return buf_to_str(x, &b);
}

static struct jv f_batch(struct jctx *x, struct jv in, struct jargs *a)
{
    int64_t n = ja_int(x, a, 0, "linecount", 1);
    if (n <= 0) jx_fail(x, x->at, TUNA_E_FORMAT, "batch(): linecount must be positive");
    bool fill = ja_has(a, 1, "fill_with");
    struct jv fv = ja_arg(a, 1, "fill_with", jv_none());
    struct jlist *l = jv_iterate(x, in, x->at);
    struct jv out = new_list(x), cur = new_list(x);
    for (size_t i = 0; i < l->n; i++) {
        jl_push(x, cur.u.l, l->v[i]);
        if ((int64_t)cur.u.l->n == n) {
            jl_push(x, out.u.l, cur);
            cur = new_list(x);
        }
    }
    if (cur.u.l->n) {
        if (fill)
            while ((int64_t)cur.u.l->n < n)
                jl_push(x, cur.u.l, fv);
        jl_push(x, out.u.l, cur);
    }
    out.u.l->kind = JL_GEN;
    return out;
}

/* Filters that keep a Markup string Markup (Jinja2's soft_str then a str method) */
static struct jv keep_safe(struct jv in, struct jv out)
{
    out.safe = in.t == JV_STR && in.safe;
    return out;
}

static struct jv f_capitalize(struct jctx *x, struct jv in, struct jargs *a)
{
    return keep_safe(in, js_capitalize(x, str_of(x, in)));
}

static struct jv f_default(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv d = ja_arg(a, 0, "default_value", jv_str_ref("", 0));
    bool boolean = ja_bool(a, 1, "boolean", false);
    if (in.t == JV_UNDEF || (boolean && !jv_truthy(in))) return d;
    return in;
}

static struct jv f_dictsort(struct jctx *x, struct jv in, struct jargs *a)
{
    bool cs = ja_bool(a, 0, "case_sensitive", false);
    struct jv by = ja_arg(a, 1, "by", jv_str_ref("key", 3));
    bool rev = ja_bool(a, 2, "reverse", false);
    if (in.t != JV_DICT && in.t != JV_NS)
        jx_fail(x, x->at, TUNA_E_FORMAT, "dictsort(): expected a dict, got %s", jv_type_name(in));
    bool by_value = by.t == JV_STR && by.n == 5 && !memcmp(by.u.s, "value", 5);
    if (!by_value && !(by.t == JV_STR && by.n == 3 && !memcmp(by.u.s, "key", 3)))
        jx_fail(x, x->at, TUNA_E_FORMAT, "dictsort(): 'by' must be 'key' or 'value'");
    struct jv items = jv_list(x, in.u.d->n);
    struct jv *keys = ja_alloc(x->ar, (in.u.d->n + 1) * sizeof *keys);
    if (!keys) jx_fail(x, x->at, TUNA_E_OOM, "out of memory");
    for (size_t i = 0; i < in.u.d->n; i++) {
        jl_push(x, items.u.l, tuple2(x, in.u.d->k[i], in.u.d->v[i]));
        keys[i] = by_value ? in.u.d->v[i] : in.u.d->k[i];
    }
    return sorted(x, items.u.l, keys, cs, rev, false);
}

struct jv jx_escape(struct jctx *x, struct jv s)
{
    if (s.t == JV_STR && s.safe) return s;
    if (s.t == JV_NONE) return jv_str_ref("None", 4);
    s = str_of(x, s);
    struct jbuf b = {0};
    for (size_t i = 0; i < s.n; i++) {
        switch (s.u.s[i]) {
        case '&': jb_puts(&b, "&amp;"); break;
        case '<': jb_puts(&b, "&lt;"); break;
        case '>': jb_puts(&b, "&gt;"); break;
        case '"': jb_puts(&b, "&#34;"); break;
        case '\'': jb_puts(&b, "&#39;"); break;
        default: jb_putc(&b, s.u.s[i]);
        }
    }
    struct jv r = buf_to_str(x, &b);
    r.safe = true;
    return r;
}

static struct jv f_escape(struct jctx *x, struct jv in, struct jargs *a)
{
    return jx_escape(x, in);
}

static struct jv f_forceescape(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv s = str_of(x, in);
    s.safe = false;
    return jx_escape(x, s);
}

static struct jv f_first(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jlist *l = jv_iterate(x, in, x->at);
    return l->n ? l->v[0] : jv_undef("first item");
}

static struct jv f_last(struct jctx *x, struct jv in, struct jargs *a)
{
    if (jv_is_seq(in) && in.u.l->kind == JL_GEN)
        jx_fail(x, x->at, TUNA_E_FORMAT, "'generator' object is not reversible");
    struct jlist *l = jv_iterate(x, in, x->at);
    return l->n ? l->v[l->n - 1] : jv_undef("last item");
}

/* Python float(str) */
static bool parse_float(struct jv s, double *out)
{
    char tmp[128];
    struct jv t = s;
    size_t a = 0, b = t.n;
    while (a < b && isspace((unsigned char)t.u.s[a]))
        a++;
    while (b > a && isspace((unsigned char)t.u.s[b - 1]))
        b--;
    if (b == a || b - a >= sizeof tmp) return false;
    size_t n = 0;
    for (size_t i = a; i < b; i++)
        if (t.u.s[i] != '_') tmp[n++] = t.u.s[i];
    tmp[n] = 0;
    if (strchr(tmp, 'x') || strchr(tmp, 'X')) return false;
    char *end;
    *out = strtod(tmp, &end);
    return *end == 0;
}

static struct jv f_float(struct jctx *x, struct jv in, struct jargs *a)
{
    if (in.t == JV_UNDEF) jx_fail(x, x->at, TUNA_E_FORMAT, "'%.*s' is undefined", (int)in.n, in.u.s ? in.u.s : "value");
    struct jv def = ja_arg(a, 0, "default", jv_float(0.0));
    double d;
    if (jv_is_num(in)) return jv_float(jv_num(in));
    if (in.t == JV_STR && parse_float(in, &d)) return jv_float(d);
    return def;
}

static struct jv f_int(struct jctx *x, struct jv in, struct jargs *a)
{
    if (in.t == JV_UNDEF) jx_fail(x, x->at, TUNA_E_FORMAT, "'%.*s' is undefined", (int)in.n, in.u.s ? in.u.s : "value");
    struct jv def = ja_arg(a, 0, "default", jv_int(0));
    int64_t base = ja_int(x, a, 1, "base", 10);
    if (in.t == JV_INT) return in;
    if (in.t == JV_BOOL) return jv_int(in.u.b);
    if (in.t == JV_FLOAT) {
        if (!isfinite(in.u.f)) return def;
        return jv_int((int64_t)in.u.f);
    }
    if (in.t == JV_STR) {
        char tmp[128];
        size_t s0 = 0, s1 = in.n;
        while (s0 < s1 && isspace((unsigned char)in.u.s[s0]))
            s0++;
        while (s1 > s0 && isspace((unsigned char)in.u.s[s1 - 1]))
            s1--;
        if (s1 > s0 && s1 - s0 < sizeof tmp) {
            size_t n = 0;
            for (size_t i = s0; i < s1; i++)
                if (in.u.s[i] != '_') tmp[n++] = in.u.s[i];
            tmp[n] = 0;
            char *end;
            long long v = strtoll(tmp, &end, (int)base);
            if (*end == 0 && n) return jv_int(v);
        }
        double d;
        if (parse_float(in, &d) && isfinite(d)) return jv_int((int64_t)d);
    }
    return def;
}

static struct jv f_indent(struct jctx *x, struct jv in, struct jargs *a)
{
    if (in.t != JV_STR) /* Jinja2 appends "\n" to the value itself */
        jx_fail(x, x->at, TUNA_E_FORMAT, "indent(): expected a string, got %s", jv_type_name(in));
    struct jv w = ja_arg(a, 0, "width", jv_int(4));
    bool first = ja_bool(a, 1, "first", false), blank = ja_bool(a, 2, "blank", false);
    struct jbuf *ind = jx_buf(x);
    if (w.t == JV_STR)
        jb_put(ind, w.u.s, w.n);
    else
        for (int64_t i = 0; i < ja_int(x, a, 0, "width", 4); i++)
            jb_putc(ind, ' ');
    struct jv s = str_of(x, in);
    /* s + "\n", then splitlines */
    struct jv lines = new_list(x);
    size_t st = 0;
    for (size_t i = 0; i < s.n; i++) {
        char c = s.u.s[i];
        if (c == '\n' || c == '\r' || c == '\v' || c == '\f' || (c >= 0x1c && c <= 0x1e)) {
            jl_push(x, lines.u.l, jv_str_ref(s.u.s + st, i - st));
            if (c == '\r' && i + 1 < s.n && s.u.s[i + 1] == '\n') i++;
            st = i + 1;
        }
    }
    jl_push(x, lines.u.l, jv_str_ref(s.u.s + st, s.n - st)); /* the part before the added "\n" */
    struct jbuf b = {0};
    if (first) jb_put(&b, ind->p, ind->n);
    for (size_t i = 0; i < lines.u.l->n; i++) {
        struct jv ln = lines.u.l->v[i];
        if (i) {
            jb_putc(&b, '\n');
            if (blank || ln.n) jb_put(&b, ind->p, ind->n);
        }
        jb_put(&b, ln.u.s, ln.n);
    }
    free(ind->p);
    memset(ind, 0, sizeof *ind);
    return keep_safe(in, buf_to_str(x, &b));
}

static struct jv f_items(struct jctx *x, struct jv in, struct jargs *a)
{
    if (in.t == JV_UNDEF) return new_list(x);
    if (in.t != JV_DICT && in.t != JV_NS)
        jx_fail(x, x->at, TUNA_E_FORMAT, "items(): expected a mapping, got %s", jv_type_name(in));
    struct jv out = jv_list(x, in.u.d->n);
    for (size_t i = 0; i < in.u.d->n; i++)
        jl_push(x, out.u.l, tuple2(x, in.u.d->k[i], in.u.d->v[i]));
    out.u.l->kind = JL_GEN; /* Jinja2's items filter is a generator */
    return out;
}

static struct jv f_join(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv sep = ja_arg(a, 0, "d", jv_str_ref("", 0));
    struct jv attr = ja_arg(a, 1, "attribute", jv_none());
    struct jlist *l = jv_iterate(x, in, x->at);
    struct jbuf *b = jx_buf(x);
    for (size_t i = 0; i < l->n; i++) {
        if (i) jx_write_str(x, b, sep);
        jx_write_str(x, b, attr.t == JV_NONE ? l->v[i] : attr_path(x, l->v[i], attr));
    }
    return jx_buf_take(x, b);
}

static struct jv f_length(struct jctx *x, struct jv in, struct jargs *a)
{
    switch (in.t) {
    case JV_UNDEF: return jv_int(0);
    case JV_STR: return jv_int((int64_t)ju_len(in.u.s, in.n));
    case JV_LIST:
    case JV_TUPLE:
        if (in.u.l->kind == JL_GEN) break;
        return jv_int((int64_t)in.u.l->n);
    case JV_DICT:
    case JV_NS: {
        struct jv len;
        if (in.u.d->is_loop && jd_gets(in.u.d, "length", &len)) return len; /* len(LoopContext) */
        return jv_int((int64_t)in.u.d->n);
    }
    default: break;
    }
    jx_fail(x, x->at, TUNA_E_FORMAT, "object of type '%s' has no len()%s", jv_type_name(in),
            jv_is_seq(in) ? " (add '| list' before '| length')" : "");
}

static struct jv f_list(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jlist *l = jv_iterate(x, in, x->at);
    struct jv out = jv_list(x, l->n);
    for (size_t i = 0; i < l->n; i++)
        jl_push(x, out.u.l, l->v[i]);
    return out;
}

static struct jv f_lower(struct jctx *x, struct jv in, struct jargs *a)
{
    return keep_safe(in, js_lower(x, str_of(x, in)));
}
static struct jv f_upper(struct jctx *x, struct jv in, struct jargs *a)
{
    return keep_safe(in, js_upper(x, str_of(x, in)));
}

/* the arguments after the first n positional ones, as a new jargs */
static struct jargs shift_args(struct jargs *a, size_t n)
{
    struct jargs r = *a;
    r.npos = a->npos > n ? a->npos - n : 0;
    r.pos = a->pos + (a->npos > n ? n : a->npos);
    return r;
}

static struct jv f_map(struct jctx *x, struct jv in, struct jargs *a)
{
    /* Jinja2: `if value: for item in value: ...` -- a false value maps to nothing */
    struct jlist *l = jv_truthy(in) ? jv_iterate(x, in, x->at) : jv_list(x, 0).u.l;
    struct jv out = jv_list(x, l->n);
    if (a->npos == 0 && ja_has(a, (size_t)-1, "attribute")) {
        struct jv attr = ja_arg(a, (size_t)-1, "attribute", jv_none());
        bool has_def = ja_has(a, (size_t)-1, "default");
        struct jv def = ja_arg(a, (size_t)-1, "default", jv_none());
        for (size_t i = 0; i < l->n; i++) {
            struct jv v = attr_path(x, l->v[i], attr);
            if (v.t == JV_UNDEF && has_def) v = def;
            jl_push(x, out.u.l, v);
        }
        out.u.l->kind = JL_GEN;
        return out;
    }
    if (a->npos == 0 || a->pos[0].t != JV_STR)
        jx_fail(x, x->at, TUNA_E_FORMAT, "map(): expected a filter name or attribute=");
    char name[64];
    snprintf(name, sizeof name, "%.*s", (int)(a->pos[0].n < 63 ? a->pos[0].n : 63), a->pos[0].u.s);
    /* an unknown filter name fails when first applied (jx_filter), as in Jinja2 */
    struct jargs rest = shift_args(a, 1);
    for (size_t i = 0; i < l->n; i++)
        jl_push(x, out.u.l, jx_filter(x, name, l->v[i], &rest, x->at));
    out.u.l->kind = JL_GEN;
    return out;
}

static struct jv select_impl(struct jctx *x, struct jv in, struct jargs *a, bool attr, bool want)
{
    struct jlist *l = jv_truthy(in) ? jv_iterate(x, in, x->at) : jv_list(x, 0).u.l; /* `if value:` as Jinja2 */
    struct jv out = new_list(x);
    size_t skip = attr ? 1 : 0;
    struct jv attrname = attr ? ja_arg(a, 0, NULL, jv_none()) : jv_none();
    if (attr && attrname.t == JV_NONE) jx_fail(x, x->at, TUNA_E_FORMAT, "selectattr/rejectattr need an attribute name");
    char test[64] = "";
    if (a->npos > skip) { /* looked up when first used, as Jinja2 does */
        struct jv t = a->pos[skip];
        if (t.t != JV_STR) jx_fail(x, x->at, TUNA_E_FORMAT, "the test name must be a string");
        snprintf(test, sizeof test, "%.*s", (int)(t.n < 63 ? t.n : 63), t.u.s);
    }
    struct jargs rest = shift_args(a, skip + 1);
    for (size_t i = 0; i < l->n; i++) {
        struct jv v = attr ? attr_path(x, l->v[i], attrname) : l->v[i];
        bool r = test[0] ? jx_test(x, test, v, &rest, x->at) : jv_truthy(v);
        if (r == want) jl_push(x, out.u.l, l->v[i]);
    }
    out.u.l->kind = JL_GEN;
    return out;
}

static struct jv f_select(struct jctx *x, struct jv in, struct jargs *a)
{
    return select_impl(x, in, a, false, true);
}
static struct jv f_reject(struct jctx *x, struct jv in, struct jargs *a)
{
    return select_impl(x, in, a, false, false);
}
static struct jv f_selectattr(struct jctx *x, struct jv in, struct jargs *a)
{
    return select_impl(x, in, a, true, true);
}
static struct jv f_rejectattr(struct jctx *x, struct jv in, struct jargs *a)
{
    return select_impl(x, in, a, true, false);
}

static struct jv minmax(struct jctx *x, struct jv in, struct jargs *a, int sign)
{
    bool cs = ja_bool(a, 0, "case_sensitive", false);
    struct jv attr = ja_arg(a, 1, "attribute", jv_none());
    struct jlist *l = jv_iterate(x, in, x->at);
    if (!l->n) return jv_undef("min/max of an empty sequence");
    size_t best = 0;
    for (size_t i = 1; i < l->n; i++) {
        struct jv kb = attr.t == JV_NONE ? l->v[best] : attr_path(x, l->v[best], attr);
        struct jv ki = attr.t == JV_NONE ? l->v[i] : attr_path(x, l->v[i], attr);
        if (jv_compare(x, ki, kb, cs) * sign > 0) best = i;
    }
    return l->v[best];
}
static struct jv f_max(struct jctx *x, struct jv in, struct jargs *a)
{
    return minmax(x, in, a, 1);
}
static struct jv f_min(struct jctx *x, struct jv in, struct jargs *a)
{
    return minmax(x, in, a, -1);
}

static struct jv f_replace(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv s = str_of(x, in);
    struct jv o = str_of(x, ja_arg(a, 0, "old", jv_str_ref("", 0))),
              n = str_of(x, ja_arg(a, 1, "new", jv_str_ref("", 0)));
    struct jv c = ja_arg(a, 2, "count", jv_none());
    return js_replace(x, s, o, n, c.t == JV_NONE ? -1 : ja_int(x, a, 2, "count", -1));
}

static struct jv f_reverse(struct jctx *x, struct jv in, struct jargs *a)
{
    if (in.t == JV_STR) {
        struct jlist *l = jv_iterate(x, in, x->at);
        struct jbuf b = {0};
        for (size_t i = l->n; i-- > 0;)
            jb_put(&b, l->v[i].u.s, l->v[i].n);
        return buf_to_str(x, &b);
    }
    /* reversed(list) is an iterator; a generator cannot be reversed, so Jinja2 makes a list */
    bool was_gen = jv_is_seq(in) && in.u.l->kind == JL_GEN;
    struct jlist *l = jv_iterate(x, in, x->at);
    struct jv out = jv_list(x, l->n);
    for (size_t i = l->n; i-- > 0;)
        jl_push(x, out.u.l, l->v[i]);
    if (!was_gen && in.t != JV_DICT) out.u.l->kind = JL_GEN;
    return out;
}

static struct jv f_round(struct jctx *x, struct jv in, struct jargs *a)
{
    int64_t prec = ja_int(x, a, 0, "precision", 0);
    struct jv m = ja_arg(a, 1, "method", jv_str_ref("common", 6));
    if (!jv_is_num(in)) jx_fail(x, x->at, TUNA_E_FORMAT, "round(): expected a number, got %s", jv_type_name(in));
    if (m.t != JV_STR) jx_fail(x, x->at, TUNA_E_FORMAT, "round(): method must be a string");
    double v = jv_num(in), p10 = pow(10, (double)prec);
    if (m.n == 4 && !memcmp(m.u.s, "ceil", 4)) return jv_float(ceil(v * p10) / p10);
    if (m.n == 5 && !memcmp(m.u.s, "floor", 5)) return jv_float(floor(v * p10) / p10);
    if (!(m.n == 6 && !memcmp(m.u.s, "common", 6)))
        jx_fail(x, x->at, TUNA_E_FORMAT, "round(): method must be 'common', 'ceil' or 'floor'");
    if (in.t != JV_FLOAT) return jv_int((int64_t)v); /* round(int, n) stays an int for n >= 0 */
    /* Python's round: correctly rounded, ties to even on the exact binary value */
    char tmp[400];
    if (prec < 0 || prec > 300) jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "round() with precision %lld", (long long)prec);
    snprintf(tmp, sizeof tmp, "%.*f", (int)prec, v);
    return jv_float(strtod(tmp, NULL));
}

static struct jv f_safe(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv s = str_of(x, in);
    s.safe = true;
    return s;
}

static struct jv f_sort(struct jctx *x, struct jv in, struct jargs *a)
{
    bool rev = ja_bool(a, 0, "reverse", false), cs = ja_bool(a, 1, "case_sensitive", false);
    struct jv attr = ja_arg(a, 2, "attribute", jv_none());
    struct jlist *l = jv_iterate(x, in, x->at);
    struct jv *keys = ja_alloc(x->ar, (l->n + 1) * sizeof *keys);
    if (!keys) jx_fail(x, x->at, TUNA_E_OOM, "out of memory");
    for (size_t i = 0; i < l->n; i++) {
        keys[i] = attr.t == JV_NONE ? l->v[i] : attr_path(x, l->v[i], attr);
        if (!cs && keys[i].t == JV_STR) keys[i] = js_lower(x, keys[i]);
    }
    return sorted(x, l, keys, true, rev, true);
}

static struct jv f_string(struct jctx *x, struct jv in, struct jargs *a)
{
    return keep_safe(in, str_of(x, in));
}

static struct jv f_sum(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv attr = ja_arg(a, 0, "attribute", jv_none());
    struct jv acc = ja_arg(a, 1, "start", jv_int(0));
    struct jlist *l = jv_iterate(x, in, x->at);
    for (size_t i = 0; i < l->n; i++) {
        struct jv v = attr.t == JV_NONE ? l->v[i] : attr_path(x, l->v[i], attr);
        if (!jv_is_num(v) || !jv_is_num(acc)) jx_fail(x, x->at, TUNA_E_FORMAT, "sum(): cannot add %s", jv_type_name(v));
        if (acc.t != JV_FLOAT && v.t != JV_FLOAT)
            acc = jv_int((int64_t)jv_num(acc) + (v.t == JV_BOOL ? v.u.b : v.u.i));
        else
            acc = jv_float(jv_num(acc) + jv_num(v));
    }
    return acc;
}

/* Jinja2's title filter: capitalize each piece split at runs of [-\s({[<] */
static struct jv f_title(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv s = str_of(x, in);
    struct jbuf b = {0};
    size_t i = 0;
    while (i < s.n) {
        size_t st = i;
        bool sep = false;
        while (i < s.n) {
            size_t w = js_ws_at(s.u.s, s.n, i);
            char c = s.u.s[i];
            bool is_sep = w || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
            if (i == st) sep = is_sep;
            if (is_sep != sep) break;
            i += w ? w : 1;
            while (!w && i < s.n && ((unsigned char)s.u.s[i] & 0xC0) == 0x80)
                i++;
        }
        struct jv piece = jv_str_ref(s.u.s + st, i - st);
        if (sep) {
            jb_put(&b, piece.u.s, piece.n);
        } else {
            struct jv c = js_capitalize(x, piece);
            /* capitalize lowercases the rest, as item[1:].lower() does */
            jb_put(&b, c.u.s, c.n);
        }
    }
    return keep_safe(in, buf_to_str(x, &b));
}

/* transformers' tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) */
static struct jv f_tojson(struct jctx *x, struct jv in, struct jargs *a)
{
    struct tojson_opts o = {.indent = -1, .item_sep = ", ", .key_sep = ": "};
    o.ensure_ascii = ja_bool(a, 0, "ensure_ascii", false);
    struct jv ind = ja_arg(a, 1, "indent", jv_none());
    if (ind.t == JV_INT) {
        o.indent = ind.u.i < 0 ? 0 : (int)ind.u.i;
        o.item_sep = ",";
    } else if (ind.t != JV_NONE) {
        jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "tojson(): indent must be an integer or None, not %s", jv_type_name(ind));
    }
    struct jv sep = ja_arg(a, 2, "separators", jv_none());
    if (sep.t == JV_STR && ju_len(sep.u.s, sep.n) == 2) { /* json.dumps unpacks any pair, even ",:" */
        size_t half = ju_offset(sep.u.s, sep.n, 1);
        o.item_sep = ja_strndup(x->ar, sep.u.s, half);
        o.key_sep = ja_strndup(x->ar, sep.u.s + half, sep.n - half);
    } else if (sep.t != JV_NONE) {
        if (!jv_is_seq(sep) || sep.u.l->n != 2 || sep.u.l->v[0].t != JV_STR || sep.u.l->v[1].t != JV_STR)
            jx_fail(x, x->at, TUNA_E_FORMAT, "tojson(): separators must be a pair of strings");
        o.item_sep = ja_strndup(x->ar, sep.u.l->v[0].u.s, sep.u.l->v[0].n);
        o.key_sep = ja_strndup(x->ar, sep.u.l->v[1].u.s, sep.u.l->v[1].n);
    }
    o.sort_keys = ja_bool(a, 3, "sort_keys", false);
    struct jbuf *b = jx_buf(x);
    jv_write_json(x, b, in, &o, 0);
    return jx_buf_take(x, b);
}

static struct jv f_trim(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv chars = ja_arg(a, 0, "chars", jv_none());
    return keep_safe(in, js_strip(x, str_of(x, in), chars, true, true));
}

static struct jv f_unique(struct jctx *x, struct jv in, struct jargs *a)
{
    bool cs = ja_bool(a, 0, "case_sensitive", false);
    struct jv attr = ja_arg(a, 1, "attribute", jv_none());
    struct jlist *l = jv_iterate(x, in, x->at);
    struct jv out = new_list(x), seen = new_list(x);
    for (size_t i = 0; i < l->n; i++) {
        struct jv k = attr.t == JV_NONE ? l->v[i] : attr_path(x, l->v[i], attr);
        if (k.t == JV_DICT || k.t == JV_NS || (k.t == JV_LIST))
            jx_fail(x, x->at, TUNA_E_FORMAT, "unique(): unhashable type: '%s'", jv_type_name(k));
        if (!cs && k.t == JV_STR) k = js_lower(x, k);
        bool dup = false;
        for (size_t j = 0; j < seen.u.l->n && !dup; j++)
            dup = jv_equal(seen.u.l->v[j], k);
        if (dup) continue;
        jl_push(x, seen.u.l, k);
        jl_push(x, out.u.l, l->v[i]);
    }
    out.u.l->kind = JL_GEN;
    return out;
}

static struct jv f_wordcount(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv s = str_of(x, in);
    int64_t c = 0;
    bool inw = false;
    for (size_t i = 0; i < s.n; i++) {
        unsigned char ch = (unsigned char)s.u.s[i];
        bool w = isalnum(ch) || ch == '_' || ch >= 0x80;
        if (w && !inw) c++;
        inw = w;
    }
    return jv_int(c);
}

static struct jv f_center(struct jctx *x, struct jv in, struct jargs *a)
{
    struct jv s = str_of(x, in);
    int64_t w = ja_int(x, a, 0, "width", 80), len = (int64_t)ju_len(s.u.s, s.n);
    if (w <= len) return s;
    int64_t pad = w - len, left = pad / 2 + (pad & w & 1);
    struct jbuf b = {0};
    for (int64_t i = 0; i < left; i++)
        jb_putc(&b, ' ');
    jb_put(&b, s.u.s, s.n);
    for (int64_t i = 0; i < pad - left; i++)
        jb_putc(&b, ' ');
    return buf_to_str(x, &b);
}

/* Python's `s % args` for %s %d %i %r %% only. lenient: a single non-tuple argument that is a
 * list or dict may go unused (Python treats it as a mapping); otherwise unused arguments fail. */
struct jv jx_printf(struct jctx *x, struct jv s, const struct jv *args, size_t nargs, bool lenient)
{
    struct jbuf *b = jx_buf(x);
    size_t k = 0;
    for (size_t i = 0; i < s.n; i++) {
        if (s.u.s[i] != '%') {
            jb_putc(b, s.u.s[i]);
            continue;
        }
        char c = i + 1 < s.n ? s.u.s[++i] : 0;
        if (c == '%') {
            jb_putc(b, '%');
            continue;
        }
        if (c != 's' && c != 'd' && c != 'i' && c != 'r') {
            jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "format filter: conversion '%%%c'", c);
        }
        if (k >= nargs) {
            jx_fail(x, x->at, TUNA_E_FORMAT, "not enough arguments for format string");
        }
        struct jv v = args[k++];
        if (c == 'r')
            jv_write_repr(b, v);
        else if (c == 's')
            jx_write_str(x, b, v);
        else if (jv_is_num(v))
            jb_printf(b, "%lld", (long long)(v.t == JV_FLOAT ? (int64_t)v.u.f : (int64_t)jv_num(v)));
        else {
            jx_fail(x, x->at, TUNA_E_FORMAT, "%%%c format: a real number is required, not %s", c, jv_type_name(v));
        }
    }
    if (k < nargs &&
        !(lenient && nargs == 1 && (args[0].t == JV_DICT || args[0].t == JV_LIST || args[0].t == JV_UNDEF))) {
        jx_fail(x, x->at, TUNA_E_FORMAT, "not all arguments converted during string formatting");
    }
    return jx_buf_take(x, b);
}

/* format(value, *args): str(value) % args */
static struct jv f_format(struct jctx *x, struct jv in, struct jargs *a)
{
    if (a->nkw) jx_fail(x, x->at, TUNA_E_UNSUPPORTED, "format filter with keyword arguments (%%(name)s)");
    return jx_printf(x, str_of(x, in), a->pos, a->npos, false);
}

/* name, function, parameter names after the value as Jinja2 declares them ("*": any) */
static const struct {
    const char *name;
    filter_fn fn;
    const char *params;
} FILTERS[] = {
    {"abs", f_abs, ""},
    {"attr", f_attr, "name"},
    {"batch", f_batch, "linecount,fill_with"},
    {"capitalize", f_capitalize, ""},
    {"center", f_center, "width"},
    {"count", f_length, ""},
    {"d", f_default, "default_value,boolean"},
    {"default", f_default, "default_value,boolean"},
    {"dictsort", f_dictsort, "case_sensitive,by,reverse"},
    {"e", f_escape, ""},
    {"escape", f_escape, ""},
    {"first", f_first, ""},
    {"float", f_float, "default"},
    {"forceescape", f_forceescape, ""},
    {"format", f_format, "*"},
    {"indent", f_indent, "width,first,blank"},
    {"int", f_int, "default,base"},
    {"items", f_items, ""},
    {"join", f_join, "d,attribute"},
    {"last", f_last, ""},
    {"length", f_length, ""},
    {"list", f_list, ""},
    {"lower", f_lower, ""},
    {"map", f_map, "*"},
    {"max", f_max, "case_sensitive,attribute"},
    {"min", f_min, "case_sensitive,attribute"},
    {"reject", f_reject, "*"},
    {"rejectattr", f_rejectattr, "*"},
    {"replace", f_replace, "old,new,count"},
    {"reverse", f_reverse, ""},
    {"round", f_round, "precision,method"},
    {"safe", f_safe, ""},
    {"select", f_select, "*"},
    {"selectattr", f_selectattr, "*"},
    {"sort", f_sort, "reverse,case_sensitive,attribute"},
    {"string", f_string, ""},
    {"sum", f_sum, "attribute,start"},
    {"title", f_title, ""},
    {"tojson", f_tojson, "ensure_ascii,indent,separators,sort_keys"},
    {"trim", f_trim, "chars"},
    {"truncate", f_truncate, "length,killwords,end,leeway"},
    {"unique", f_unique, "case_sensitive,attribute"},
    {"upper", f_upper, ""},
    {"wordcount", f_wordcount, ""},
};

bool jx_has_filter(const char *name)
{
    for (size_t i = 0; i < sizeof FILTERS / sizeof *FILTERS; i++)
        if (!strcmp(FILTERS[i].name, name)) return true;
    return false;
}

/* Is `name` among the comma-separated params? */
static bool has_param(const char *params, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = params; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !memcmp(p, name, n)) return true;
        if (!e) break;
        p = e + 1;
    }
    return false;
}

/* Python's own argument checks: too many positional arguments or an unknown keyword fail */
static void check_args(struct jctx *x, const char *filter, const char *params, const struct jargs *a)
{
    if (!strcmp(params, "*")) return;
    size_t np = params[0] ? 1 : 0;
    for (const char *p = params; *p; p++)
        np += *p == ',';
    if (a->npos > np)
        jx_fail(x, x->at, TUNA_E_FORMAT, "filter '%s' takes at most %zu arguments (%zu given)", filter, np, a->npos);
    for (size_t k = 0; k < a->nkw; k++)
        if (!has_param(params, a->kwname[k]))
            jx_fail(x, x->at, TUNA_E_FORMAT, "filter '%s' got an unexpected keyword argument '%s'", filter,
                    a->kwname[k]);
}

struct jv jx_filter(struct jctx *x, const char *name, struct jv in, struct jargs *a, const struct node *at)
{
    for (size_t i = 0; i < sizeof FILTERS / sizeof *FILTERS; i++)
        if (!strcmp(FILTERS[i].name, name)) {
            x->at = at;
            check_args(x, name, FILTERS[i].params, a);
            const struct node *saved = x->at;
            x->at = at;
            struct jv r = FILTERS[i].fn(x, in, a);
            x->at = saved;
            return r;
        }
    jx_fail(x, at, TUNA_E_UNSUPPORTED, "no filter named '%s' (not a Jinja2 filter, or one tuna does not implement)",
            name);
}
