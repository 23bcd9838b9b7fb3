/* interp.c — evaluating the AST: scopes, expressions with Python's operator semantics,
 * statements (if, for with loop.*, set, macro/call, filter blocks, break/continue), and the
 * public parse/render entry points. Render errors longjmp back to tuna_jinja_render. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tokenizer/jinja/internal.h"

enum { FLOW_NORMAL = 0, FLOW_BREAK, FLOW_CONTINUE };

_Noreturn void jx_fail(struct jctx *x, const struct node *at, tuna_status s, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (at) {
        int l, c;
        jpos(x->tpl, at->off, &l, &c);
        x->st = tuna_fail(s, "template error at line %d, column %d: %s", l, c, msg);
    } else {
        x->st = tuna_fail(s, "template error: %s", msg);
    }
    longjmp(x->jb, 1);
}

static struct jv eval(struct jctx *x, struct jscope *sc, const struct node *n);
static int exec_body(struct jctx *x, struct jscope *sc, const struct nvec *body);

/* ---- scopes ---- */
static struct jscope *scope_new(struct jctx *x, struct jscope *parent)
{
    struct jscope *s = ja_alloc(x->ar, sizeof *s);
    if (!s) jx_fail(x, x->at, TUNA_E_OOM, "out of memory");
    s->parent = parent;
    return s;
}

static struct jv lookup(struct jscope *sc, const char *name, size_t n)
{
    for (; sc; sc = sc->parent) {
        long i = jd_finds(&sc->vars, name, n);
        if (i >= 0) return sc->vars.v[i];
    }
    return jv_undef(name);
}

static void scope_set(struct jctx *x, struct jscope *sc, const char *name, size_t n, struct jv v)
{
    jd_set(x, &sc->vars, jv_str_ref(name, n), v);
}

/* ---- arguments ---- */
struct jv ja_arg(struct jargs *a, size_t i, const char *name, struct jv def)
{
    if (i < a->npos) return a->pos[i];
    if (name)
        for (size_t k = 0; k < a->nkw; k++)
            if (!strcmp(a->kwname[k], name)) return a->kw[k];
    return def;
}

bool ja_has(struct jargs *a, size_t i, const char *name)
{
    if (i < a->npos) return true;
    if (name)
        for (size_t k = 0; k < a->nkw; k++)
            if (!strcmp(a->kwname[k], name)) return true;
    return false;
}

bool ja_bool(struct jargs *a, size_t i, const char *name, bool def)
{
    if (!ja_has(a, i, name)) return def;
    return jv_truthy(ja_arg(a, i, name, jv_none()));
}

int64_t ja_int(struct jctx *x, struct jargs *a, size_t i, const char *name, int64_t def)
{
    if (!ja_has(a, i, name)) return def;
    struct jv v = ja_arg(a, i, name, jv_none());
    if (v.t == JV_INT) return v.u.i;
    if (v.t == JV_BOOL) return v.u.b;
    if (v.t == JV_FLOAT) return (int64_t)v.u.f;
    jx_fail(x, x->at, TUNA_E_FORMAT, "argument '%s' must be an integer, not %s", name ? name : "?", jv_type_name(v));
}

static void eval_args(struct jctx *x, struct jscope *sc, const struct node *n, struct jargs *a, size_t extra_kw)
{
    size_t npos = 0;
    struct jv *pos = NULL;
    size_t cap = n->l1.n;
    struct jv *tmp = cap ? ja_alloc(x->ar, cap * sizeof *tmp) : NULL;
    for (size_t i = 0; i < n->l1.n; i++) {
        const struct node *an = n->l1.v[i];
        if (an->k == N_STAR) {
            struct jv v = eval(x, sc, an->a);
            struct jlist *l = jv_iterate(x, v, an);
            struct jv *grow = ja_alloc(x->ar, (cap + l->n + 1) * sizeof *grow);
            if (!grow) jx_fail(x, an, TUNA_E_OOM, "out of memory");
            if (npos) memcpy(grow, tmp, npos * sizeof *grow);
            tmp = grow;
            cap += l->n;
            for (size_t j = 0; j < l->n; j++)
                tmp[npos++] = l->v[j];
        } else {
            tmp[npos++] = eval(x, sc, an);
        }
    }
    pos = tmp;
    a->npos = npos;
    a->pos = pos;
    a->nkw = n->l2.n;
    a->kwname = ja_alloc(x->ar, (n->l2.n + extra_kw + 1) * sizeof *a->kwname);
    a->kw = ja_alloc(x->ar, (n->l2.n + extra_kw + 1) * sizeof *a->kw);
    if (!a->kwname || !a->kw) jx_fail(x, n, TUNA_E_OOM, "out of memory");
    for (size_t i = 0; i < n->l2.n; i++) {
        a->kwname[i] = n->l2.v[i]->s;
        a->kw[i] = eval(x, sc, n->l2.v[i]->a);
    }
}

/* ---- scratch buffers ---- */
struct jbuf *jx_buf(struct jctx *x)
{
    struct jbuf_link *lk = ja_alloc(x->ar, sizeof *lk);
    if (!lk) jx_fail(x, x->at, TUNA_E_OOM, "out of memory");
    lk->next = x->open_bufs;
    x->open_bufs = lk;
    return &lk->b;
}

struct jv jx_buf_take(struct jctx *x, struct jbuf *b)
{
    if (b->oom) jx_fail(x, x->at, TUNA_E_OOM, "out of memory while rendering");
    struct jv r = jv_str(x, b->p ? b->p : "", b->n);
    free(b->p);
    memset(b, 0, sizeof *b);
    return r;
}

/* ---- macros ---- */
/* Renders body into a string. The temporary buffer is linked into x->open_bufs so that an
 * error unwinding past it still frees it. */
static struct jv render_to_string(struct jctx *x, struct jscope *sc, const struct nvec *body, const struct node *at)
{
    struct jbuf *saved = x->out, *b = jx_buf(x);
    x->out = b;
    exec_body(x, sc, body);
    x->out = saved;
    (void)at;
    return jx_buf_take(x, b);
}

static struct jv call_macro(struct jctx *x, struct jfunc *f, struct jargs *a, const struct node *at)
{
    const struct node *m = f->mac;
    const struct nvec *params = &m->l2;
    if (++x->depth > 100) jx_fail(x, at, TUNA_E_FORMAT, "macro '%s' recursed more than 100 levels", f->name);
    struct jscope *sc = scope_new(x, f->closure);
    if (a->npos > params->n)
        jx_fail(x, at, TUNA_E_FORMAT, "macro '%s' takes %zu arguments but got %zu", f->name, params->n, a->npos);
    for (size_t k = 0; k < a->nkw; k++) {
        if (!strcmp(a->kwname[k], "caller")) continue;
        bool found = false;
        for (size_t i = 0; i < params->n; i++)
            found |= !strcmp(params->v[i]->s, a->kwname[k]);
        if (!found) jx_fail(x, at, TUNA_E_FORMAT, "macro '%s' has no parameter named '%s'", f->name, a->kwname[k]);
    }
    for (size_t i = 0; i < params->n; i++) {
        const struct node *pa = params->v[i];
        struct jv v;
        if (ja_has(a, i, pa->s))
            v = ja_arg(a, i, pa->s, jv_none());
        else if (pa->a)
            v = eval(x, sc, pa->a); /* defaults are evaluated afresh at each call */
        else
            v = jv_undef(pa->s);
        scope_set(x, sc, pa->s, pa->sn, v);
    }
    if (ja_has(a, (size_t)-1, "caller")) {
        if (m->k == N_MACRO && !m->uses_caller)
            jx_fail(x, at, TUNA_E_FORMAT, "macro '%s' was called with a caller ({%% call %%}) but never calls caller()",
                    f->name);
        scope_set(x, sc, "caller", 6, ja_arg(a, (size_t)-1, "caller", jv_none()));
    }
    struct jv r = render_to_string(x, sc, &m->l1, at);
    x->depth--;
    return r;
}

struct jv jx_call(struct jctx *x, struct jv fn, struct jargs *a, const struct node *at)
{
    if (fn.t == JV_UNDEF)
        jx_fail(x, at, TUNA_E_FORMAT, "'%.*s' is undefined and cannot be called", (int)fn.n, fn.u.s ? fn.u.s : "value");
    if (fn.t != JV_FUNC) jx_fail(x, at, TUNA_E_FORMAT, "'%s' object is not callable", jv_type_name(fn));
    const struct node *saved = x->at;
    x->at = at;
    struct jv r = fn.u.fn->fn ? fn.u.fn->fn(x, fn.u.fn->self, a) : call_macro(x, fn.u.fn, a, at);
    x->at = saved;
    return r;
}

/* ---- operators ---- */
static _Noreturn void op_type_fail(struct jctx *x, const struct node *n, const char *op, struct jv a, struct jv b)
{
    if (a.t == JV_UNDEF || b.t == JV_UNDEF) {
        struct jv u = a.t == JV_UNDEF ? a : b;
        jx_fail(x, n, TUNA_E_FORMAT, "'%.*s' is undefined (used with '%s')", (int)u.n, u.u.s ? u.u.s : "value", op);
    }
    jx_fail(x, n, TUNA_E_FORMAT, "unsupported operand type(s) for %s: '%s' and '%s'", op, jv_type_name(a),
            jv_type_name(b));
}

static int64_t as_i64(struct jv v)
{
    return v.t == JV_BOOL ? v.u.b : v.u.i;
}

static struct jv repeat(struct jctx *x, struct jv s, int64_t k)
{
    if (jv_is_seq(s) && s.u.l->kind != JL_LIST)
        jx_fail(x, x->at, TUNA_E_FORMAT, "unsupported operand type(s) for *: '%s' and 'int'", jv_type_name(s));
    if (k <= 0) {
        if (s.t == JV_STR) return jv_str_ref("", 0);
        struct jv e = jv_list(x, 0);
        e.t = s.t; /* () stays a tuple */
        return e;
    }
    if (s.t == JV_STR) {
        if (s.n * (size_t)k > (64u << 20)) jx_fail(x, x->at, TUNA_E_RANGE, "string repetition too large");
        char *p = ja_alloc(x->ar, s.n * (size_t)k + 1);
        if (!p) jx_fail(x, x->at, TUNA_E_OOM, "out of memory");
        for (int64_t i = 0; i < k; i++)
            memcpy(p + (size_t)i * s.n, s.u.s, s.n);
        struct jv r = jv_str_ref(p, s.n * (size_t)k);
        r.safe = s.safe;
        return r;
    }
    struct jv r = jv_list(x, s.u.l->n * (size_t)k);
    for (int64_t i = 0; i < k; i++)
        for (size_t j = 0; j < s.u.l->n; j++)
            jl_push(x, r.u.l, s.u.l->v[j]);
    r.t = s.t;
    return r;
}

/* Python ints are unbounded; tuna's are 64-bit, so overflow is an error rather than a wrap */
static struct jv checked(struct jctx *x, const struct node *n, bool overflow, const int64_t *r)
{
    if (overflow) jx_fail(x, n, TUNA_E_RANGE, "integer overflow (tuna's template integers are 64-bit)");
    return jv_int(*r);
}

static struct jv binop(struct jctx *x, const struct node *n, struct jv a, struct jv b)
{
    int64_t r = 0;
    const char *op = n->s;
    bool nums = jv_is_num(a) && jv_is_num(b);
    bool ints = nums && a.t != JV_FLOAT && b.t != JV_FLOAT;
    switch (op[0]) {
    case '+':
        if (ints) return checked(x, n, __builtin_add_overflow(as_i64(a), as_i64(b), &r), &r);
        if (nums) return jv_float(jv_num(a) + jv_num(b));
        if (a.t == JV_STR && b.t == JV_STR) {
            /* Markup + str escapes the str (and str + Markup, through Markup.__radd__) */
            bool safe = a.safe || b.safe;
            if (safe && !a.safe) a = jx_escape(x, a);
            if (safe && !b.safe) b = jx_escape(x, b);
            char *p = ja_alloc(x->ar, a.n + b.n + 1);
            if (!p) jx_fail(x, n, TUNA_E_OOM, "out of memory");
            memcpy(p, a.u.s, a.n);
            memcpy(p + a.n, b.u.s, b.n);
            struct jv sr = jv_str_ref(p, a.n + b.n);
            sr.safe = safe;
            return sr;
        }
        if (jv_is_seq(a) && a.t == b.t && a.u.l->kind == JL_LIST && b.u.l->kind == JL_LIST) {
            struct jv l = jv_list(x, a.u.l->n + b.u.l->n);
            for (size_t i = 0; i < a.u.l->n; i++)
                jl_push(x, l.u.l, a.u.l->v[i]);
            for (size_t i = 0; i < b.u.l->n; i++)
                jl_push(x, l.u.l, b.u.l->v[i]);
            l.t = a.t;
            return l;
        }
        break;
    case '-':
        if (ints) return checked(x, n, __builtin_sub_overflow(as_i64(a), as_i64(b), &r), &r);
        if (nums) return jv_float(jv_num(a) - jv_num(b));
        break;
    case '*':
        if (op[1] == '*') {
            if (nums && jv_num(a) == 0 && jv_num(b) < 0)
                jx_fail(x, n, TUNA_E_FORMAT, "0.0 cannot be raised to a negative power");
            if (nums && jv_num(a) < 0 && b.t == JV_FLOAT && b.u.f != floor(b.u.f))
                jx_fail(x, n, TUNA_E_UNSUPPORTED,
                        "a negative number to a fractional power (Python gives a complex number)");
            if (ints && as_i64(b) >= 0) {
                int64_t base = as_i64(a);
                bool ovf = false;
                r = 1;
                for (int64_t e = as_i64(b); e > 0 && !ovf; e--)
                    ovf = __builtin_mul_overflow(r, base, &r);
                return checked(x, n, ovf, &r);
            }
            if (nums) return jv_float(pow(jv_num(a), jv_num(b)));
            break;
        }
        if (ints) return checked(x, n, __builtin_mul_overflow(as_i64(a), as_i64(b), &r), &r);
        if (nums) return jv_float(jv_num(a) * jv_num(b));
        if ((a.t == JV_STR || jv_is_seq(a)) && (b.t == JV_INT || b.t == JV_BOOL)) return repeat(x, a, as_i64(b));
        if ((b.t == JV_STR || jv_is_seq(b)) && (a.t == JV_INT || a.t == JV_BOOL)) return repeat(x, b, as_i64(a));
        break;
    case '/':
        if (!nums) break;
        if (jv_num(b) == 0) jx_fail(x, n, TUNA_E_FORMAT, "division by zero");
        if (op[1] == '/') {
            if (ints) {
                if (as_i64(a) == INT64_MIN && as_i64(b) == -1) checked(x, n, true, &r);
                int64_t q = as_i64(a) / as_i64(b);
                r = as_i64(a) % as_i64(b);
                if (r != 0 && ((r < 0) != (as_i64(b) < 0))) q--;
                return jv_int(q);
            }
            return jv_float(floor(jv_num(a) / jv_num(b)));
        }
        return jv_float(jv_num(a) / jv_num(b));
    case '%':
        if (nums) {
            if (jv_num(b) == 0) jx_fail(x, n, TUNA_E_FORMAT, "modulo by zero");
            if (ints) {
                if (as_i64(b) == -1) return jv_int(0);
                r = as_i64(a) % as_i64(b);
                if (r != 0 && ((r < 0) != (as_i64(b) < 0))) r += as_i64(b);
                return jv_int(r);
            }
            double fr = fmod(jv_num(a), jv_num(b));
            if (fr != 0 && ((fr < 0) != (jv_num(b) < 0))) fr += jv_num(b);
            if (fr == 0) fr = copysign(0.0, jv_num(b)); /* Python: the zero takes the divisor's sign */
            return jv_float(fr);
        }
        if (a.t == JV_STR && a.safe)
            jx_fail(x, n, TUNA_E_UNSUPPORTED, "'%%' formatting of a string marked safe (Markup escapes the arguments)");
        if (a.t == JV_STR) { /* 'text %s' % value */
            if (b.t == JV_TUPLE) return jx_printf(x, a, b.u.l->v, b.u.l->n, false);
            return jx_printf(x, a, &b, 1, true);
        }
        break;
    default: break;
    }
    op_type_fail(x, n, op, a, b);
}

static bool contains(struct jctx *x, const struct node *n, struct jv hay, struct jv needle)
{
    switch (hay.t) {
    case JV_STR:
        if (needle.t != JV_STR)
            jx_fail(x, n, TUNA_E_FORMAT, "'in <string>' requires string as left operand, not %s", jv_type_name(needle));
        if (needle.n == 0) return true;
        if (needle.n > hay.n) return false;
        for (size_t i = 0; i + needle.n <= hay.n; i++)
            if (memcmp(hay.u.s + i, needle.u.s, needle.n) == 0) return true;
        return false;
    case JV_LIST:
    case JV_TUPLE:
        for (size_t i = 0; i < hay.u.l->n; i++)
            if (jv_equal(hay.u.l->v[i], needle)) return true;
        return false;
    case JV_DICT:
    case JV_NS:
        if (needle.t == JV_LIST || needle.t == JV_DICT || needle.t == JV_NS)
            jx_fail(x, n, TUNA_E_FORMAT, "unhashable type: '%s'", jv_type_name(needle));
        return jd_find(hay.u.d, needle) >= 0;
    case JV_UNDEF: return false;
    default: jx_fail(x, n, TUNA_E_FORMAT, "argument of type '%s' is not iterable", jv_type_name(hay));
    }
}

static struct jv compare(struct jctx *x, const struct node *n, struct jv a, struct jv b)
{
    const char *op = n->s;
    if (!strcmp(op, "==")) return jv_bool(jv_equal(a, b));
    if (!strcmp(op, "!=")) return jv_bool(!jv_equal(a, b));
    if (!strcmp(op, "in")) return jv_bool(contains(x, n, b, a));
    if (!strcmp(op, "not in")) return jv_bool(!contains(x, n, b, a));
    if (a.t == JV_UNDEF || b.t == JV_UNDEF ||
        !((jv_is_num(a) && jv_is_num(b)) || (a.t == b.t && (a.t == JV_STR || jv_is_seq(a)))))
        op_type_fail(x, n, op, a, b);
    x->at = n;
    int c = jv_compare(x, a, b, true);
    if (!strcmp(op, "<")) return jv_bool(c < 0);
    if (!strcmp(op, ">")) return jv_bool(c > 0);
    if (!strcmp(op, "<=")) return jv_bool(c <= 0);
    return jv_bool(c >= 0);
}

/* ---- subscripts ---- */
static bool norm_index(int64_t *i, size_t n)
{
    if (*i < 0) *i += (int64_t)n;
    return *i >= 0 && (uint64_t)*i < n;
}

struct jv jx_getitem(struct jctx *x, struct jv obj, struct jv key, const struct node *at)
{
    if (obj.t == JV_UNDEF)
        jx_fail(x, at, TUNA_E_FORMAT, "'%.*s' is undefined", (int)obj.n, obj.u.s ? obj.u.s : "value");
    if ((obj.t == JV_DICT || obj.t == JV_NS)) {
        long i = jd_find(obj.u.d, key);
        if (i >= 0) return obj.u.d->v[i];
        if (key.t == JV_STR) return jx_getattr(x, obj, key.u.s, key.n, at);
        return jv_undef(NULL);
    }
    if (jv_is_seq(obj) && obj.u.l->kind != JL_LIST && obj.u.l->kind != JL_RANGE)
        return jv_undef(NULL); /* not subscriptable */
    if ((jv_is_seq(obj) || obj.t == JV_STR) && (key.t == JV_INT || key.t == JV_BOOL)) {
        int64_t i = as_i64(key);
        if (obj.t == JV_STR) {
            size_t len = ju_len(obj.u.s, obj.n);
            if (!norm_index(&i, len)) return jv_undef(NULL);
            size_t b = ju_offset(obj.u.s, obj.n, (size_t)i), e = ju_offset(obj.u.s, obj.n, (size_t)i + 1);
            return jv_str_ref(obj.u.s + b, e - b);
        }
        if (!norm_index(&i, obj.u.l->n)) return jv_undef(NULL);
        return obj.u.l->v[i];
    }
    if (key.t == JV_STR) return jx_getattr(x, obj, key.u.s, key.n, at);
    return jv_undef(NULL);
}

static struct jv slice(struct jctx *x, const struct node *n, struct jv obj, struct jv vs, struct jv ve, struct jv vst)
{
    if (obj.t == JV_UNDEF) jx_fail(x, n, TUNA_E_FORMAT, "'%.*s' is undefined", (int)obj.n, obj.u.s ? obj.u.s : "value");
    size_t len;
    /* Jinja2 compiles a slice to a plain Python subscript: no Undefined fallback */
    if (jv_is_seq(obj) && obj.u.l->kind != JL_LIST && obj.u.l->kind != JL_RANGE)
        jx_fail(x, n, TUNA_E_FORMAT, "'%s' object is not subscriptable (add '| list' before slicing)",
                jv_type_name(obj));
    if (obj.t == JV_STR)
        len = ju_len(obj.u.s, obj.n);
    else if (jv_is_seq(obj))
        len = obj.u.l->n;
    else
        jx_fail(x, n, TUNA_E_FORMAT, "'%s' object cannot be sliced", jv_type_name(obj));
    for (int k = 0; k < 3; k++) {
        struct jv v = k == 0 ? vs : k == 1 ? ve : vst;
        if (v.t != JV_NONE && v.t != JV_INT && v.t != JV_BOOL)
            jx_fail(x, n, TUNA_E_FORMAT, "slice indices must be integers or None, not %s", jv_type_name(v));
    }
    int64_t step = vst.t == JV_NONE ? 1 : as_i64(vst);
    if (step == 0) jx_fail(x, n, TUNA_E_FORMAT, "slice step cannot be zero");
    int64_t L = (int64_t)len, start, stop;
    if (step > 0) {
        start = vs.t == JV_NONE ? 0 : as_i64(vs);
        stop = ve.t == JV_NONE ? L : as_i64(ve);
        if (start < 0) start = start + L < 0 ? 0 : start + L;
        if (stop < 0) stop = stop + L < 0 ? 0 : stop + L;
        if (start > L) start = L;
        if (stop > L) stop = L;
    } else {
        start = vs.t == JV_NONE ? L - 1 : as_i64(vs);
        stop = ve.t == JV_NONE ? -1 : as_i64(ve);
        if (vs.t != JV_NONE) {
            if (start < 0) start = start + L < 0 ? -1 : start + L;
            if (start >= L) start = L - 1;
        }
        if (ve.t != JV_NONE) {
            if (stop < 0) stop = stop + L < 0 ? -1 : stop + L;
            if (stop >= L) stop = L - 1;
        }
    }
    if (obj.t == JV_STR) {
        bool ascii = ju_is_ascii(obj.u.s, obj.n);
        struct jbuf b = {0};
        for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
            size_t o0 = ascii ? (size_t)i : ju_offset(obj.u.s, obj.n, (size_t)i);
            size_t o1 = ascii ? (size_t)i + 1 : ju_offset(obj.u.s, obj.n, (size_t)i + 1);
            jb_put(&b, obj.u.s + o0, o1 - o0);
        }
        struct jv r = jv_str(x, b.p ? b.p : "", b.n);
        free(b.p);
        return r;
    }
    struct jv r = jv_list(x, 0);
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step)
        jl_push(x, r.u.l, obj.u.l->v[i]);
    r.t = obj.t;
    return r;
}

/* ---- expressions ---- */

/* Would Jinja2's optimizer fold this expression to a constant at compile time? */
static bool is_const(const struct node *n)
{
    switch (n->k) {
    case N_LIT: return true;
    case N_NEG:
    case N_POS:
    case N_NOT: return is_const(n->a);
    case N_BINOP:
    case N_AND:
    case N_OR: return is_const(n->a) && is_const(n->b);
    default: return false;
    }
}
static struct jv apply_filter_node(struct jctx *x, struct jscope *sc, const struct node *f, struct jv in)
{
    struct jargs a;
    eval_args(x, sc, f, &a, 0);
    x->at = f;
    return jx_filter(x, f->s, in, &a, f);
}

/* A filter chain from a {% filter %} or {% set x | f %} block: the innermost has a == NULL. */
static struct jv apply_chain(struct jctx *x, struct jscope *sc, const struct node *f, struct jv in)
{
    if (f->a) in = apply_chain(x, sc, f->a, in);
    return apply_filter_node(x, sc, f, in);
}

static struct jv eval(struct jctx *x, struct jscope *sc, const struct node *n)
{
    x->at = n;
    switch (n->k) {
    case N_LIT: return n->lit;
    case N_NAME: return lookup(sc, n->s, n->sn);
    case N_LIST:
    case N_TUPLE: {
        struct jv l = jv_list(x, n->l1.n);
        for (size_t i = 0; i < n->l1.n; i++)
            jl_push(x, l.u.l, eval(x, sc, n->l1.v[i]));
        l.t = n->k == N_LIST ? JV_LIST : JV_TUPLE;
        return l;
    }
    case N_DICT: {
        struct jv d = jv_dict(x, n->l1.n / 2);
        for (size_t i = 0; i + 1 < n->l1.n; i += 2) {
            struct jv k = eval(x, sc, n->l1.v[i]);
            if (k.t == JV_LIST || k.t == JV_DICT || k.t == JV_NS)
                jx_fail(x, n->l1.v[i], TUNA_E_FORMAT, "unhashable type: '%s'", jv_type_name(k));
            jd_set(x, d.u.d, k, eval(x, sc, n->l1.v[i + 1]));
        }
        return d;
    }
    case N_GETATTR: {
        struct jv o = eval(x, sc, n->a);
        x->at = n;
        return jx_getattr(x, o, n->s, n->sn, n);
    }
    case N_GETITEM: {
        struct jv o = eval(x, sc, n->a);
        struct jv k = eval(x, sc, n->b);
        x->at = n;
        return jx_getitem(x, o, k, n);
    }
    case N_SLICE: {
        struct jv o = eval(x, sc, n->a);
        struct jv s = n->b ? eval(x, sc, n->b) : jv_none();
        struct jv e = n->c ? eval(x, sc, n->c) : jv_none();
        struct jv st = n->d ? eval(x, sc, n->d) : jv_none();
        return slice(x, n, o, s, e, st);
    }
    case N_CALL: {
        struct jv fn = eval(x, sc, n->a);
        struct jargs a;
        eval_args(x, sc, n, &a, 0);
        return jx_call(x, fn, &a, n);
    }
    case N_FILTER: return apply_filter_node(x, sc, n, eval(x, sc, n->a));
    case N_TEST: {
        struct jv in = eval(x, sc, n->a);
        struct jargs a;
        eval_args(x, sc, n, &a, 0);
        x->at = n;
        bool r = jx_test(x, n->s, in, &a, n);
        return jv_bool(n->neg ? !r : r);
    }
    case N_NEG:
    case N_POS: {
        struct jv v = eval(x, sc, n->a);
        if (v.t == JV_INT || v.t == JV_BOOL) {
            if (n->k == N_NEG && as_i64(v) == INT64_MIN) jx_fail(x, n, TUNA_E_RANGE, "integer overflow");
            return jv_int(n->k == N_NEG ? -as_i64(v) : as_i64(v));
        }
        if (v.t == JV_FLOAT) return jv_float(n->k == N_NEG ? -v.u.f : v.u.f);
        if (v.t == JV_UNDEF) jx_fail(x, n, TUNA_E_FORMAT, "'%.*s' is undefined", (int)v.n, v.u.s ? v.u.s : "value");
        jx_fail(x, n, TUNA_E_FORMAT, "bad operand type for unary %c: '%s'", n->k == N_NEG ? '-' : '+', jv_type_name(v));
    }
    case N_NOT: return jv_bool(!jv_truthy(eval(x, sc, n->a)));
    case N_AND: {
        struct jv a = eval(x, sc, n->a);
        return jv_truthy(a) ? eval(x, sc, n->b) : a;
    }
    case N_OR: {
        struct jv a = eval(x, sc, n->a);
        return jv_truthy(a) ? a : eval(x, sc, n->b);
    }
    case N_COND:
        if (jv_truthy(eval(x, sc, n->a))) return eval(x, sc, n->b);
        return n->c ? eval(x, sc, n->c) : jv_undef(NULL);
    case N_BINOP: {
        struct jv a = eval(x, sc, n->a);
        struct jv b = eval(x, sc, n->b);
        x->at = n;
        /* Jinja2 folds a constant base such as `-2` into the literal -2 and writes `-2 ** x` into
         * Python, where it means -(2 ** x); with a constant exponent it folds all of (-2) ** x */
        if (n->s[0] == '*' && n->s[1] == '*' && is_const(n->a) && !is_const(n->b) && jv_is_num(a) && jv_num(a) < 0) {
            struct jv pa = a.t == JV_FLOAT ? jv_float(-a.u.f) : jv_int(-as_i64(a));
            struct jv r = binop(x, n, pa, b);
            return r.t == JV_FLOAT ? jv_float(-r.u.f) : jv_int(-r.u.i);
        }
        return binop(x, n, a, b);
    }
    case N_COMPARE: {
        struct jv a = eval(x, sc, n->a);
        struct jv b = eval(x, sc, n->b);
        return compare(x, n, a, b);
    }
    case N_CONCAT: {
        struct jbuf *b = jx_buf(x);
        for (size_t i = 0; i < n->l1.n; i++)
            jx_write_str(x, b, eval(x, sc, n->l1.v[i]));
        return jx_buf_take(x, b);
    }
    default: jx_fail(x, n, TUNA_E_INTERNAL, "node kind %d is not an expression", (int)n->k);
    }
}

/* ---- statements ---- */
static void assign(struct jctx *x, struct jscope *sc, const struct node *t, struct jv v)
{
    if (t->k == N_NAME) {
        scope_set(x, sc, t->s, t->sn, v);
        return;
    }
    if (t->k == N_TUPLE) {
        if (!jv_is_seq(v) && v.t != JV_STR && v.t != JV_DICT)
            jx_fail(x, t, TUNA_E_FORMAT, "cannot unpack '%s' into %zu names", jv_type_name(v), t->l1.n);
        struct jlist *l = jv_iterate(x, v, t);
        if (l->n != t->l1.n) jx_fail(x, t, TUNA_E_FORMAT, "cannot unpack %zu values into %zu names", l->n, t->l1.n);
        for (size_t i = 0; i < l->n; i++)
            assign(x, sc, t->l1.v[i], l->v[i]);
        return;
    }
    if (t->k == N_GETATTR) {
        struct jv ns = eval(x, sc, t->a);
        if (ns.t != JV_NS)
            jx_fail(x, t, TUNA_E_FORMAT, "cannot assign attribute on non-namespace object ('%s')", jv_type_name(ns));
        jd_set(x, ns.u.d, jv_str_ref(t->s, t->sn), v);
        return;
    }
    jx_fail(x, t, TUNA_E_FORMAT, "cannot assign to this expression");
}

static struct jv loop_cycle(struct jctx *x, struct jv self, struct jargs *a)
{
    if (a->npos == 0) jx_fail(x, x->at, TUNA_E_FORMAT, "loop.cycle() needs at least one value");
    return a->pos[(size_t)self.u.i % a->npos];
}

static int exec_for(struct jctx *x, struct jscope *sc, const struct node *n)
{
    struct jv it = eval(x, sc, n->b);
    if (it.t == JV_NONE) jx_fail(x, n->b, TUNA_E_FORMAT, "'NoneType' object is not iterable");
    struct jlist *src = jv_iterate(x, it, n->b);
    struct jlist *items = src;
    if (n->c) {
        items = jv_list(x, src->n).u.l;
        for (size_t i = 0; i < src->n; i++) {
            struct jscope *f = scope_new(x, sc);
            assign(x, f, n->a, src->v[i]);
            if (jv_truthy(eval(x, f, n->c))) jl_push(x, items, src->v[i]);
        }
    } else {
        /* iterate over a snapshot: the body may append to the list */
        struct jlist *copy = jv_list(x, src->n).u.l;
        for (size_t i = 0; i < src->n; i++)
            jl_push(x, copy, src->v[i]);
        items = copy;
    }
    if (items->n == 0) return n->l2.n ? exec_body(x, sc, &n->l2) : FLOW_NORMAL;
    struct jv outer_loop = lookup(sc, "loop", 4);
    size_t len = items->n;
    for (size_t i = 0; i < len; i++) {
        struct jscope *f = scope_new(x, sc);
        struct jv loop = jv_dict(x, 16);
        struct jdict *d = loop.u.d;
        d->is_loop = true;
#define LSET(k, v) jd_set(x, d, jv_str_ref(k, sizeof(k) - 1), v)
        LSET("index", jv_int((int64_t)i + 1));
        LSET("index0", jv_int((int64_t)i));
        LSET("revindex", jv_int((int64_t)(len - i)));
        LSET("revindex0", jv_int((int64_t)(len - i - 1)));
        LSET("first", jv_bool(i == 0));
        LSET("last", jv_bool(i + 1 == len));
        LSET("length", jv_int((int64_t)len));
        LSET("previtem", i > 0 ? items->v[i - 1] : jv_undef("previtem"));
        LSET("nextitem", i + 1 < len ? items->v[i + 1] : jv_undef("nextitem"));
        LSET("depth", jv_int(1));
        LSET("depth0", jv_int(0));
        LSET("cycle", jv_builtin(x, "cycle", loop_cycle, jv_int((int64_t)i)));
#undef LSET
        (void)outer_loop;
        scope_set(x, f, "loop", 4, loop);
        assign(x, f, n->a, items->v[i]);
        int fl = exec_body(x, f, &n->l1);
        if (fl == FLOW_BREAK) break;
    }
    return FLOW_NORMAL;
}

static int exec_stmt(struct jctx *x, struct jscope *sc, const struct node *n)
{
    x->at = n;
    if (++x->steps > 50000000) jx_fail(x, n, TUNA_E_RANGE, "template ran more than 50 million steps");
    switch (n->k) {
    case N_TEXT: jb_put(x->out, n->s, n->sn); return FLOW_NORMAL;
    case N_OUTPUT: {
        struct jv v = eval(x, sc, n->a);
        jx_write_str(x, x->out, v);
        return FLOW_NORMAL;
    }
    case N_IF:
        if (jv_truthy(eval(x, sc, n->a))) return exec_body(x, sc, &n->l1);
        return exec_body(x, sc, &n->l2);
    case N_FOR: return exec_for(x, sc, n);
    case N_SET: assign(x, sc, n->a, eval(x, sc, n->b)); return FLOW_NORMAL;
    case N_SETBLOCK: { /* the body is an inner scope in Jinja2: its sets stay inside */
        struct jv v = render_to_string(x, scope_new(x, sc), &n->l1, n);
        if (n->c) v = apply_chain(x, sc, n->c, v);
        assign(x, sc, n->a, v);
        return FLOW_NORMAL;
    }
    case N_MACRO: {
        struct jv f = jv_builtin(x, n->s, NULL, jv_none());
        f.u.fn->mac = n;
        f.u.fn->closure = sc;
        scope_set(x, sc, n->s, n->sn, f);
        return FLOW_NORMAL;
    }
    case N_CALLBLOCK: {
        struct jv caller = jv_builtin(x, "caller", NULL, jv_none());
        caller.u.fn->mac = n;
        caller.u.fn->closure = sc;
        const struct node *call = n->a;
        struct jv fn = eval(x, sc, call->a);
        struct jargs a;
        eval_args(x, sc, call, &a, 1);
        a.kwname[a.nkw] = "caller";
        a.kw[a.nkw] = caller;
        a.nkw++;
        jx_write_str(x, x->out, jx_call(x, fn, &a, call));
        return FLOW_NORMAL;
    }
    case N_FILTERBLOCK: {
        struct jv v = render_to_string(x, scope_new(x, sc), &n->l1, n);
        jx_write_str(x, x->out, apply_chain(x, sc, n->a, v));
        return FLOW_NORMAL;
    }
    case N_BREAK: return FLOW_BREAK;
    case N_CONTINUE: return FLOW_CONTINUE;
    case N_BODY: return exec_body(x, sc, &n->l1);
    default: jx_fail(x, n, TUNA_E_INTERNAL, "node kind %d is not a statement", (int)n->k);
    }
}

static int exec_body(struct jctx *x, struct jscope *sc, const struct nvec *body)
{
    for (size_t i = 0; i < body->n; i++) {
        int fl = exec_stmt(x, sc, body->v[i]);
        if (fl != FLOW_NORMAL) return fl;
    }
    return FLOW_NORMAL;
}

/* ---- context from JSON ---- */
static struct jv from_json(struct jctx *x, const cJSON *j)
{
    if (!j || cJSON_IsNull(j)) return jv_none();
    if (cJSON_IsBool(j)) return jv_bool(cJSON_IsTrue(j));
    if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (j->valuestring) { /* from tuna_jinja_json_parse: the number's source text */
            const char *t = j->valuestring;
            if (strpbrk(t, ".eE") || !isfinite(d)) return jv_float(d);
            errno = 0;
            long long v = strtoll(t, NULL, 10);
            if (!errno) return jv_int(v);
            return jv_float(d);
        }
        /* plain cJSON keeps no int/float distinction: an integral value is taken as an int */
        if (d == floor(d) && fabs(d) < 9.007199254740992e15) return jv_int((int64_t)d);
        return jv_float(d);
    }
    if (cJSON_IsString(j)) return jv_strz(x, j->valuestring);
    if (cJSON_IsArray(j)) {
        struct jv l = jv_list(x, (size_t)cJSON_GetArraySize(j));
        for (const cJSON *c = j->child; c; c = c->next)
            jl_push(x, l.u.l, from_json(x, c));
        return l;
    }
    if (cJSON_IsObject(j)) {
        struct jv d = jv_dict(x, (size_t)cJSON_GetArraySize(j));
        for (const cJSON *c = j->child; c; c = c->next)
            jd_set(x, d.u.d, jv_strz(x, c->string), from_json(x, c));
        return d;
    }
    return jv_none();
}

/* ---- public API ---- */
struct tuna_jinja_options tuna_jinja_hf_options(void)
{
    struct tuna_jinja_options o = {.trim_blocks = true, .lstrip_blocks = true, .keep_trailing_newline = false};
    return o;
}

tuna_status tuna_jinja_parse(const char *src, size_t len, const struct tuna_jinja_options *opt,
                             tuna_jinja_template **out)
{
    *out = NULL;
    struct tuna_jinja_template *t = calloc(1, sizeof *t);
    if (!t) return tuna_fail_oom("template", sizeof *t);
    t->opt = opt ? *opt : tuna_jinja_hf_options();
    t->src = ja_alloc(&t->ar, len + 1);
    if (!t->src) {
        tuna_jinja_free(t);
        return tuna_fail_oom("template source", len);
    }
    /* newlines normalized to \n as Jinja2 does */
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            t->src[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') i++;
        } else {
            t->src[n++] = src[i];
        }
    }
    if (!t->opt.keep_trailing_newline && n > 0 && t->src[n - 1] == '\n') n--;
    t->src[n] = 0;
    t->srclen = n;
    struct jtoks toks = {0};
    tuna_status st = jlex(t, &toks);
    if (!st) st = jparse(t, &toks);
    free(toks.v);
    if (st) {
        tuna_jinja_free(t);
        return st;
    }
    *out = t;
    return TUNA_OK;
}

void tuna_jinja_free(tuna_jinja_template *t)
{
    if (!t) return;
    ja_free(&t->ar);
    free(t);
}

tuna_status tuna_jinja_render(const tuna_jinja_template *t, const cJSON *context,
                              const struct tuna_jinja_render_opts *ro, char **out, size_t *len)
{
    *out = NULL;
    if (len) *len = 0;
    struct jarena ar = {0};
    struct jbuf buf = {0};
    struct jctx *x = calloc(1, sizeof *x);
    if (!x) return tuna_fail_oom("render state", sizeof *x);
    x->ar = &ar;
    x->tpl = t;
    x->out = &buf;
    x->now = (ro && ro->now) ? ro->now : (int64_t)time(NULL);
    if (setjmp(x->jb)) {
        tuna_status st = x->st;
        for (struct jbuf_link *lk = x->open_bufs; lk; lk = lk->next)
            free(lk->b.p);
        free(buf.p);
        ja_free(&ar);
        free(x);
        return st;
    }
    x->globals = scope_new(x, NULL);
    jx_add_globals(x, &x->globals->vars);
    if (context) {
        if (!cJSON_IsObject(context)) jx_fail(x, NULL, TUNA_E_INVALID, "the render context must be a JSON object");
        for (const cJSON *c = context->child; c; c = c->next)
            jd_set(x, &x->globals->vars, jv_strz(x, c->string), from_json(x, c));
    }
    exec_body(x, x->globals, &t->root->l1);
    tuna_status st = TUNA_OK;
    if (buf.oom) st = tuna_fail_oom("rendered text", buf.n);
    ja_free(&ar);
    free(x);
    if (st) {
        free(buf.p);
        return st;
    }
    if (!buf.p) buf.p = calloc(1, 1);
    if (!buf.p) return tuna_fail_oom("rendered text", 1);
    *out = buf.p;
    if (len) *len = buf.n;
    return TUNA_OK;
}
