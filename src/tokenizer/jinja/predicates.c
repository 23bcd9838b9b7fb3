/* predicates.c — Jinja2's tests (`x is defined`, `n is divisibleby 3`, ...) with the semantics of
 * jinja2/tests.py on Python values. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "tokenizer/jinja/internal.h"

static struct jv targ(struct jctx *x, struct jargs *a, const char *what)
{
    if (a->npos < 1) jx_fail(x, x->at, TUNA_E_FORMAT, "test '%s' needs an argument", what);
    return a->pos[0];
}

static bool run_test(struct jctx *x, const char *t, struct jv v, struct jargs *a, bool *known)
{
    *known = true;
    if (!strcmp(t, "defined")) return v.t != JV_UNDEF;
    if (!strcmp(t, "undefined")) return v.t == JV_UNDEF;
    if (!strcmp(t, "none")) return v.t == JV_NONE;
    if (!strcmp(t, "boolean")) return v.t == JV_BOOL;
    if (!strcmp(t, "true")) return v.t == JV_BOOL && v.u.b;
    if (!strcmp(t, "false")) return v.t == JV_BOOL && !v.u.b;
    if (!strcmp(t, "integer")) return v.t == JV_INT;
    if (!strcmp(t, "float")) return v.t == JV_FLOAT;
    if (!strcmp(t, "number")) return jv_is_num(v);
    if (!strcmp(t, "string")) return v.t == JV_STR;
    if (!strcmp(t, "mapping")) return v.t == JV_DICT;
    if (!strcmp(t, "iterable")) return v.t == JV_STR || jv_is_seq(v) || v.t == JV_DICT || v.t == JV_UNDEF;
    if (!strcmp(t, "sequence"))
        return v.t == JV_STR || (jv_is_seq(v) && (v.u.l->kind == JL_LIST || v.u.l->kind == JL_RANGE)) ||
               v.t == JV_DICT || v.t == JV_UNDEF;
    if (!strcmp(t, "callable")) return v.t == JV_FUNC;
    if (!strcmp(t, "escaped")) return false;
    if (!strcmp(t, "lower") || !strcmp(t, "upper")) { /* str(value).islower() / isupper() */
        struct jv s = jv_to_str(x, v);
        struct jv c = t[0] == 'l' ? js_lower(x, s) : js_upper(x, s);
        struct jv o = t[0] == 'l' ? js_upper(x, s) : js_lower(x, s);
        return jv_equal(c, s) && !jv_equal(o, s); /* no wrong-case letter, at least one cased one */
    }
    if (!strcmp(t, "even") || !strcmp(t, "odd")) { /* value % 2 == 0 / == 1 */
        if (!jv_is_num(v)) jx_fail(x, x->at, TUNA_E_FORMAT, "test '%s' needs a number, got %s", t, jv_type_name(v));
        double r = fmod(jv_num(v), 2);
        if (r < 0) r += 2;
        return t[0] == 'e' ? r == 0 : r == 1;
    }
    if (!strcmp(t, "divisibleby")) {
        struct jv d = targ(x, a, t);
        if (!jv_is_num(v) || !jv_is_num(d) || jv_num(d) == 0)
            jx_fail(x, x->at, TUNA_E_FORMAT, "divisibleby: bad operands");
        return fmod(jv_num(v), jv_num(d)) == 0;
    }
    if (!strcmp(t, "eq") || !strcmp(t, "equalto") || !strcmp(t, "==")) return jv_equal(v, targ(x, a, t));
    if (!strcmp(t, "ne") || !strcmp(t, "!=")) return !jv_equal(v, targ(x, a, t));
    if (!strcmp(t, "sameas")) {
        struct jv o = targ(x, a, t);
        if (v.t != o.t) return false;
        if (v.t == JV_NONE || v.t == JV_UNDEF) return true;
        if (v.t == JV_BOOL) return v.u.b == o.u.b;
        if (v.t == JV_LIST || v.t == JV_TUPLE) return v.u.l == o.u.l;
        if (v.t == JV_DICT || v.t == JV_NS) return v.u.d == o.u.d;
        return jv_equal(v, o);
    }
    const char *cmp = NULL;
    if (!strcmp(t, "lt") || !strcmp(t, "lessthan") || !strcmp(t, "<"))
        cmp = "<";
    else if (!strcmp(t, "le") || !strcmp(t, "<="))
        cmp = "<=";
    else if (!strcmp(t, "gt") || !strcmp(t, "greaterthan") || !strcmp(t, ">"))
        cmp = ">";
    else if (!strcmp(t, "ge") || !strcmp(t, ">="))
        cmp = ">=";
    if (cmp) {
        int c = jv_compare(x, v, targ(x, a, t), true);
        if (!strcmp(cmp, "<")) return c < 0;
        if (!strcmp(cmp, "<=")) return c <= 0;
        if (!strcmp(cmp, ">")) return c > 0;
        return c >= 0;
    }
    if (!strcmp(t, "in")) {
        struct jv h = targ(x, a, t);
        if (h.t == JV_STR && v.t == JV_STR) {
            if (v.n == 0) return true;
            for (size_t i = 0; i + v.n <= h.n; i++)
                if (!memcmp(h.u.s + i, v.u.s, v.n)) return true;
            return false;
        }
        if (jv_is_seq(h)) {
            for (size_t i = 0; i < h.u.l->n; i++)
                if (jv_equal(h.u.l->v[i], v)) return true;
            return false;
        }
        if (h.t == JV_DICT) return jd_find(h.u.d, v) >= 0;
        jx_fail(x, x->at, TUNA_E_FORMAT, "test 'in': cannot search a %s", jv_type_name(h));
    }
    if (!strcmp(t, "filter")) { /* is `v` the name of a filter */
        struct jv n = v;
        char b[64];
        snprintf(b, sizeof b, "%.*s", (int)(n.n < 63 ? n.n : 63), n.t == JV_STR ? n.u.s : "");
        return n.t == JV_STR && jx_has_filter(b);
    }
    if (!strcmp(t, "test")) {
        struct jv n = v;
        char b[64];
        snprintf(b, sizeof b, "%.*s", (int)(n.n < 63 ? n.n : 63), n.t == JV_STR ? n.u.s : "");
        return n.t == JV_STR && jx_has_test(b);
    }
    *known = false;
    return false;
}

static const char *const TESTS[] = {
    "defined",     "undefined", "none",    "boolean",     "true",     "false",    "integer", "float",
    "number",      "string",    "mapping", "iterable",    "sequence", "callable", "escaped", "lower",
    "upper",       "even",      "odd",     "divisibleby", "eq",       "equalto",  "==",      "ne",
    "!=",          "sameas",    "lt",      "lessthan",    "<",        "le",       "<=",      "gt",
    "greaterthan", ">",         "ge",      ">=",          "in",       "filter",   "test",    NULL};

bool jx_has_test(const char *name)
{
    for (int i = 0; TESTS[i]; i++)
        if (!strcmp(TESTS[i], name)) return true;
    return false;
}

/* tests that take one argument besides the value; the others take none */
static const char *const ONE_ARG[] = {"divisibleby", "eq",       "equalto", "==", "ne", "!=", "sameas",
                                      "lt",          "lessthan", "<",       "le", "<=", "gt", "greaterthan",
                                      ">",           "ge",       ">=",      "in", NULL};

bool jx_test(struct jctx *x, const char *name, struct jv in, struct jargs *a, const struct node *at)
{
    bool known;
    const struct node *saved = x->at;
    x->at = at;
    size_t want = 0;
    for (int i = 0; ONE_ARG[i]; i++)
        if (!strcmp(ONE_ARG[i], name)) want = 1;
    if (a->npos + a->nkw > want)
        jx_fail(x, at, TUNA_E_FORMAT, "test '%s' takes %zu argument%s besides the value (%zu given)", name, want,
                want == 1 ? "" : "s", a->npos + a->nkw);
    bool r = run_test(x, name, in, a, &known);
    x->at = saved;
    if (!known)
        jx_fail(x, at, TUNA_E_UNSUPPORTED, "no test named '%s' (not a Jinja2 test, or one tuna does not implement)",
                name);
    return r;
}
