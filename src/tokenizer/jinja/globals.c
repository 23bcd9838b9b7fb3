/* globals.c — the functions every template sees: Jinja2's range, dict, namespace, joiner and
 * transformers' raise_exception and strftime_now. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "tokenizer/jinja/internal.h"

static struct jv g_range(struct jctx *x, struct jv self, struct jargs *a)
{
    int64_t start = 0, stop, step = 1;
    if (a->npos == 1)
        stop = ja_int(x, a, 0, NULL, 0);
    else if (a->npos >= 2) {
        start = ja_int(x, a, 0, NULL, 0);
        stop = ja_int(x, a, 1, NULL, 0);
        if (a->npos >= 3) step = ja_int(x, a, 2, NULL, 1);
    } else
        jx_fail(x, x->at, TUNA_E_FORMAT, "range() needs 1 to 3 integer arguments");
    if (step == 0) jx_fail(x, x->at, TUNA_E_FORMAT, "range() step must not be zero");
    struct jv out = jv_list(x, 0);
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (out.u.l->n > 10000000) jx_fail(x, x->at, TUNA_E_RANGE, "range() too long");
        jl_push(x, out.u.l, jv_int(i));
    }
    out.u.l->kind = JL_RANGE;
    out.u.l->r0 = start;
    out.u.l->r1 = stop;
    out.u.l->rs = step;
    return out;
}

static struct jv g_dict(struct jctx *x, struct jv self, struct jargs *a)
{
    struct jv d = jv_dict(x, a->nkw);
    if (a->npos) {
        struct jv src = a->pos[0];
        if (src.t == JV_UNDEF)
            jx_fail(x, x->at, TUNA_E_FORMAT, "'%.*s' is undefined", (int)src.n, src.u.s ? src.u.s : "value");
        if (src.t == JV_DICT || src.t == JV_NS) {
            for (size_t i = 0; i < src.u.d->n; i++)
                jd_set(x, d.u.d, src.u.d->k[i], src.u.d->v[i]);
        } else {
            struct jlist *l = jv_iterate(x, src, x->at);
            for (size_t i = 0; i < l->n; i++) {
                struct jv p = l->v[i];
                if (!jv_is_seq(p) || p.u.l->n != 2) jx_fail(x, x->at, TUNA_E_FORMAT, "dict(): items must be pairs");
                jd_set(x, d.u.d, p.u.l->v[0], p.u.l->v[1]);
            }
        }
    }
    for (size_t i = 0; i < a->nkw; i++)
        jd_set(x, d.u.d, jv_strz(x, a->kwname[i]), a->kw[i]);
    return d;
}

static struct jv g_namespace(struct jctx *x, struct jv self, struct jargs *a)
{
    struct jv d = g_dict(x, self, a);
    d.t = JV_NS;
    return d;
}

static struct jv g_raise(struct jctx *x, struct jv self, struct jargs *a)
{
    struct jv m = a->npos ? jv_to_str(x, a->pos[0]) : jv_str_ref("", 0);
    jx_fail(x, x->at, TUNA_E_INVALID, "the template raised an exception: %.*s", (int)m.n, m.u.s);
}

static struct jv g_strftime_now(struct jctx *x, struct jv self, struct jargs *a)
{
    struct jv f = ja_arg(a, 0, "format", jv_none());
    if (f.t != JV_STR) jx_fail(x, x->at, TUNA_E_FORMAT, "strftime_now() needs a format string");
    time_t t = (time_t)x->now;
    struct tm tm;
    localtime_r(&t, &tm);
    char fmt[256], out[512];
    snprintf(fmt, sizeof fmt, "%.*s", (int)(f.n < 255 ? f.n : 255), f.u.s);
    /* the format comes from the template, as transformers passes it to datetime.strftime */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
    size_t n = strftime(out, sizeof out, fmt, &tm);
#pragma GCC diagnostic pop
    return jv_str(x, out, n);
}

static struct jv joiner_call(struct jctx *x, struct jv self, struct jargs *a)
{
    /* self: [separator, used] */
    struct jlist *st = self.u.l;
    if (!jv_truthy(st->v[1])) {
        st->v[1] = jv_bool(true);
        return jv_str_ref("", 0);
    }
    return st->v[0];
}

static struct jv g_joiner(struct jctx *x, struct jv self, struct jargs *a)
{
    struct jv st = jv_list(x, 2);
    jl_push(x, st.u.l, jv_to_str(x, ja_arg(a, 0, "sep", jv_str_ref(", ", 2))));
    jl_push(x, st.u.l, jv_bool(false));
    return jv_builtin(x, "joiner", joiner_call, st);
}

void jx_add_globals(struct jctx *x, struct jdict *g)
{
    static const struct {
        const char *name;
        jbuiltin_fn fn;
    } G[] = {{"range", g_range},           {"dict", g_dict},     {"namespace", g_namespace},
             {"raise_exception", g_raise}, {"joiner", g_joiner}, {"strftime_now", g_strftime_now}};
    for (size_t i = 0; i < sizeof G / sizeof *G; i++)
        jd_set(x, g, jv_str_ref(G[i].name, strlen(G[i].name)), jv_builtin(x, G[i].name, G[i].fn, jv_none()));
}
