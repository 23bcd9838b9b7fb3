/* parser.c — tokens → AST, following the grammar of Jinja2's parser.py (the same precedence:
 * conditional < or < and < not < comparisons < + - < ~ < * / // % < ** < unary - + < filters,
 * tests and calls < postfix . [] ()). Syntax errors and unsupported tags stop the parse via
 * longjmp with the message set; all nodes live in the template arena. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/jinja/internal.h"

struct parser {
    struct tuna_jinja_template *t;
    const struct jtok *tk;
    size_t n, i;
    jmp_buf jb;
    tuna_status st;
    int depth;
};

TUNA_PRINTF(4, 5)
static _Noreturn void pfail(struct parser *p, tuna_status s, size_t off, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int l, c;
    jpos(p->t, off, &l, &c);
    p->st = tuna_fail(s, "template %s at line %d, column %d: %s",
                      s == TUNA_E_UNSUPPORTED ? "uses an unsupported feature" : "syntax error", l, c, msg);
    longjmp(p->jb, 1);
}

static const struct jtok *cur(struct parser *p)
{
    return &p->tk[p->i];
}
static const struct jtok *peek(struct parser *p, size_t k)
{
    return p->i + k < p->n ? &p->tk[p->i + k] : &p->tk[p->n - 1];
}
static void next(struct parser *p)
{
    if (p->i + 1 < p->n) p->i++;
}

static bool tok_is(const struct jtok *k, enum jtok_type t, const char *s)
{
    if (k->t != t) return false;
    if (!s) return true;
    return k->n == strlen(s) && memcmp(k->s, s, k->n) == 0;
}
static bool is_op(struct parser *p, const char *s)
{
    return tok_is(cur(p), JT_OP, s);
}
static bool is_name(struct parser *p, const char *s)
{
    return tok_is(cur(p), JT_NAME, s);
}

static const char *tok_desc(const struct jtok *k, char *buf, size_t cap)
{
    switch (k->t) {
    case JT_EOF: return "end of template";
    case JT_TEXT: return "text";
    case JT_VAR_BEGIN: return "'{{'";
    case JT_VAR_END: return "'}}'";
    case JT_BLOCK_BEGIN: return "'{%'";
    case JT_BLOCK_END: return "'%}'";
    case JT_STRING: return "a string";
    default: {
        size_t n = k->n > 40 ? 40 : k->n;
        while (n < k->n && n > 0 && ((unsigned char)k->s[n] & 0xC0) == 0x80)
            n--; /* whole characters */
        snprintf(buf, cap, "'%.*s'", (int)n, k->s);
        return buf;
    }
    }
}

static void expect_op(struct parser *p, const char *s)
{
    if (!is_op(p, s)) {
        char b[64];
        pfail(p, TUNA_E_FORMAT, cur(p)->off, "expected '%s', found %s", s, tok_desc(cur(p), b, sizeof b));
    }
    next(p);
}

static void expect_type(struct parser *p, enum jtok_type t, const char *what)
{
    if (cur(p)->t != t) {
        char b[64];
        pfail(p, TUNA_E_FORMAT, cur(p)->off, "expected %s, found %s", what, tok_desc(cur(p), b, sizeof b));
    }
    next(p);
}

static struct node *mk(struct parser *p, enum node_kind k, size_t off)
{
    struct node *n = ja_alloc(&p->t->ar, sizeof *n);
    if (!n) {
        p->st = tuna_fail_oom("template syntax tree", sizeof *n);
        longjmp(p->jb, 1);
    }
    n->k = k;
    n->off = off;
    return n;
}

static void nv_push(struct parser *p, struct nvec *v, struct node *n)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 4;
        struct node **nn = ja_alloc(&p->t->ar, cap * sizeof *nn);
        if (!nn) {
            p->st = tuna_fail_oom("template syntax tree", cap);
            longjmp(p->jb, 1);
        }
        if (v->n) memcpy(nn, v->v, v->n * sizeof *nn);
        v->v = nn;
        v->cap = cap;
    }
    v->v[v->n++] = n;
}

static struct node *parse_expression(struct parser *p, bool with_condexpr);
static struct node *parse_unary(struct parser *p, bool with_filter);
static struct node *parse_or(struct parser *p);
static struct node *parse_primary(struct parser *p);
static struct node *parse_postfix(struct parser *p, struct node *n);

static bool tuple_end(struct parser *p, const char *extra)
{
    const struct jtok *k = cur(p);
    if (k->t == JT_VAR_END || k->t == JT_BLOCK_END || k->t == JT_EOF || tok_is(k, JT_OP, ")")) return true;
    if (extra && tok_is(k, JT_NAME, extra)) return true;
    return false;
}

static struct node *parse_tuple(struct parser *p, bool simplified, bool with_condexpr, const char *extra,
                                bool explicit_parens)
{
    size_t off = cur(p)->off;
    struct node *t = mk(p, N_TUPLE, off);
    bool is_tuple = false;
    for (;;) {
        if (t->l1.n) expect_op(p, ",");
        /* an assignment target takes no trailing comma ({% for a, in x %} fails in Jinja2) */
        if (!(simplified && t->l1.n) && tuple_end(p, extra)) break;
        nv_push(p, &t->l1, simplified ? parse_postfix(p, parse_primary(p)) : parse_expression(p, with_condexpr));
        if (is_op(p, ","))
            is_tuple = true;
        else
            break;
    }
    if (!is_tuple) {
        if (t->l1.n) return t->l1.v[0];
        if (!explicit_parens) pfail(p, TUNA_E_FORMAT, off, "expected an expression");
    }
    return t;
}

static struct node *parse_expression(struct parser *p, bool with_condexpr)
{
    if (++p->depth > 200) pfail(p, TUNA_E_FORMAT, cur(p)->off, "expression nested too deeply");
    struct node *e = parse_or(p);
    if (with_condexpr) {
        while (is_name(p, "if")) {
            size_t off = cur(p)->off;
            next(p);
            struct node *c = mk(p, N_COND, off);
            c->b = e;
            c->a = parse_or(p);
            if (is_name(p, "else")) {
                next(p);
                c->c = parse_expression(p, true);
            }
            e = c;
        }
    }
    p->depth--;
    return e;
}

static struct node *bin(struct parser *p, enum node_kind k, const char *op, struct node *a, struct node *b, size_t off)
{
    struct node *n = mk(p, k, off);
    n->s = op;
    n->sn = strlen(op);
    n->a = a;
    n->b = b;
    return n;
}

static struct node *parse_not(struct parser *p);
static struct node *parse_and(struct parser *p)
{
    struct node *l = parse_not(p);
    while (is_name(p, "and")) {
        size_t off = cur(p)->off;
        next(p);
        l = bin(p, N_AND, "and", l, parse_not(p), off);
    }
    return l;
}

static struct node *parse_or(struct parser *p)
{
    struct node *l = parse_and(p);
    while (is_name(p, "or")) {
        size_t off = cur(p)->off;
        next(p);
        l = bin(p, N_OR, "or", l, parse_and(p), off);
    }
    return l;
}

static struct node *parse_math1(struct parser *p);
static struct node *parse_compare(struct parser *p)
{
    struct node *l = parse_math1(p);
    struct node *result = NULL;
    for (;;) {
        const char *op = NULL;
        size_t off = cur(p)->off;
        static const char *const cmp[] = {"==", "!=", "<", ">", "<=", ">=", NULL};
        for (int i = 0; cmp[i]; i++)
            if (is_op(p, cmp[i])) op = cmp[i];
        if (op)
            next(p);
        else if (is_name(p, "in")) {
            op = "in";
            next(p);
        } else if (is_name(p, "not") && tok_is(peek(p, 1), JT_NAME, "in")) {
            op = "not in";
            next(p);
            next(p);
        } else
            break;
        struct node *r = parse_math1(p);
        struct node *c = bin(p, N_COMPARE, op, l, r, off);
        /* a < b < c means (a < b) and (b < c) */
        result = result ? bin(p, N_AND, "and", result, c, off) : c;
        l = r;
    }
    return result ? result : l;
}

static struct node *parse_not(struct parser *p)
{
    if (is_name(p, "not")) {
        size_t off = cur(p)->off;
        next(p);
        struct node *n = mk(p, N_NOT, off);
        n->a = parse_not(p);
        return n;
    }
    return parse_compare(p);
}

static struct node *parse_pow(struct parser *p)
{
    struct node *l = parse_unary(p, true);
    while (is_op(p, "**")) {
        size_t off = cur(p)->off;
        next(p);
        l = bin(p, N_BINOP, "**", l, parse_unary(p, true), off);
    }
    return l;
}

static struct node *parse_math2(struct parser *p)
{
    struct node *l = parse_pow(p);
    for (;;) {
        const char *op = is_op(p, "*") ? "*" : is_op(p, "/") ? "/" : is_op(p, "//") ? "//" : is_op(p, "%") ? "%" : NULL;
        if (!op) break;
        size_t off = cur(p)->off;
        next(p);
        l = bin(p, N_BINOP, op, l, parse_pow(p), off);
    }
    return l;
}

static struct node *parse_concat(struct parser *p)
{
    struct node *l = parse_math2(p);
    if (!is_op(p, "~")) return l;
    struct node *c = mk(p, N_CONCAT, cur(p)->off);
    nv_push(p, &c->l1, l);
    while (is_op(p, "~")) {
        next(p);
        nv_push(p, &c->l1, parse_math2(p));
    }
    return c;
}

static struct node *parse_math1(struct parser *p)
{
    struct node *l = parse_concat(p);
    for (;;) {
        const char *op = is_op(p, "+") ? "+" : is_op(p, "-") ? "-" : NULL;
        if (!op) break;
        size_t off = cur(p)->off;
        next(p);
        l = bin(p, N_BINOP, op, l, parse_concat(p), off);
    }
    return l;
}

/* (args) of a call, filter or test: positional in n->l1, keywords (N_KW) in n->l2 */
static void parse_call_args(struct parser *p, struct node *n)
{
    expect_op(p, "(");
    bool first = true, star = false;
    while (!is_op(p, ")")) {
        if (!first) {
            expect_op(p, ",");
            if (is_op(p, ")")) break;
        }
        first = false;
        size_t off = cur(p)->off;
        if (is_op(p, "*")) {
            if (star) pfail(p, TUNA_E_FORMAT, off, "invalid syntax for function call expression (a second *args)");
            star = true;
            next(p);
            struct node *s = mk(p, N_STAR, off);
            s->a = parse_expression(p, true);
            nv_push(p, &n->l1, s);
        } else if (is_op(p, "**")) {
            pfail(p, TUNA_E_UNSUPPORTED, off, "'**kwargs' in calls");
        } else if (cur(p)->t == JT_NAME && tok_is(peek(p, 1), JT_OP, "=")) {
            struct node *kw = mk(p, N_KW, off);
            kw->s = ja_strndup(&p->t->ar, cur(p)->s, cur(p)->n);
            kw->sn = cur(p)->n;
            next(p);
            next(p);
            kw->a = parse_expression(p, true);
            nv_push(p, &n->l2, kw);
        } else {
            if (n->l2.n || star)
                pfail(p, TUNA_E_FORMAT, off,
                      "invalid syntax for function call expression (a positional argument after *args or a keyword)");
            nv_push(p, &n->l1, parse_expression(p, true));
        }
    }
    next(p);
}

static char *dotted_name(struct parser *p, size_t *len)
{
    const struct jtok *k = cur(p);
    if (k->t != JT_NAME) {
        char b[64];
        pfail(p, TUNA_E_FORMAT, k->off, "expected a name, found %s", tok_desc(k, b, sizeof b));
    }
    size_t start = k->off, end = k->off + k->n;
    next(p);
    while (is_op(p, ".") && peek(p, 1)->t == JT_NAME) {
        next(p);
        end = cur(p)->off + cur(p)->n;
        next(p);
    }
    *len = end - start;
    return ja_strndup(&p->t->ar, p->t->src + start, end - start);
}

static struct node *parse_filter(struct parser *p, struct node *in)
{
    size_t off = cur(p)->off;
    struct node *f = mk(p, N_FILTER, off);
    f->a = in;
    f->s = dotted_name(p, &f->sn);
    if (is_op(p, "(")) parse_call_args(p, f);
    return f;
}

static struct node *parse_test(struct parser *p, struct node *in)
{
    size_t off = cur(p)->off;
    struct node *t = mk(p, N_TEST, off);
    t->a = in;
    if (is_name(p, "not")) {
        t->neg = true;
        next(p);
    }
    t->s = dotted_name(p, &t->sn);
    const struct jtok *k = cur(p);
    if (is_op(p, "(")) {
        parse_call_args(p, t);
    } else if ((k->t == JT_NAME || k->t == JT_STRING || k->t == JT_INT || k->t == JT_FLOAT || tok_is(k, JT_OP, "[") ||
                tok_is(k, JT_OP, "{")) &&
               !tok_is(k, JT_NAME, "else") && !tok_is(k, JT_NAME, "or") && !tok_is(k, JT_NAME, "and") &&
               !tok_is(k, JT_NAME, "if")) {
        if (tok_is(k, JT_NAME, "is")) pfail(p, TUNA_E_FORMAT, k->off, "you cannot chain multiple tests with is");
        nv_push(p, &t->l1, parse_postfix(p, parse_primary(p)));
    }
    return t;
}

static struct node *parse_filter_expr(struct parser *p, struct node *n)
{
    for (;;) {
        if (is_op(p, "|")) {
            next(p);
            n = parse_filter(p, n);
        } else if (is_name(p, "is")) {
            next(p);
            n = parse_test(p, n);
        } else if (is_op(p, "(")) {
            struct node *c = mk(p, N_CALL, cur(p)->off);
            c->a = n;
            parse_call_args(p, c);
            n = c;
        } else {
            return n;
        }
    }
}

static struct node *parse_unary(struct parser *p, bool with_filter)
{
    size_t off = cur(p)->off;
    struct node *n;
    if (is_op(p, "-") || is_op(p, "+")) {
        n = mk(p, is_op(p, "-") ? N_NEG : N_POS, off);
        next(p);
        n->a = parse_unary(p, false);
    } else {
        n = parse_primary(p);
    }
    n = parse_postfix(p, n);
    if (with_filter) n = parse_filter_expr(p, n);
    return n;
}

static struct node *parse_subscribed(struct parser *p)
{
    size_t off = cur(p)->off;
    struct node *args[3] = {NULL, NULL, NULL};
    if (!is_op(p, ":")) {
        struct node *e = parse_expression(p, true);
        if (!is_op(p, ":")) return e;
        args[0] = e;
    }
    next(p); /* ':' */
    if (!is_op(p, "]") && !is_op(p, ",") && !is_op(p, ":")) args[1] = parse_expression(p, true);
    if (is_op(p, ":")) {
        next(p);
        if (!is_op(p, "]") && !is_op(p, ",")) args[2] = parse_expression(p, true);
    }
    struct node *s = mk(p, N_SLICE, off);
    s->b = args[0];
    s->c = args[1];
    s->d = args[2];
    return s;
}

static struct node *parse_postfix(struct parser *p, struct node *n)
{
    for (;;) {
        size_t off = cur(p)->off;
        if (is_op(p, ".")) {
            next(p);
            const struct jtok *k = cur(p);
            if (k->t == JT_NAME) {
                struct node *g = mk(p, N_GETATTR, off);
                g->a = n;
                g->s = ja_strndup(&p->t->ar, k->s, k->n);
                g->sn = k->n;
                next(p);
                n = g;
            } else if (k->t == JT_INT) {
                struct node *g = mk(p, N_GETITEM, off);
                g->a = n;
                g->b = mk(p, N_LIT, k->off);
                g->b->lit = jv_int(k->i);
                next(p);
                n = g;
            } else {
                pfail(p, TUNA_E_FORMAT, k->off, "expected a name or number after '.'");
            }
        } else if (is_op(p, "[")) {
            next(p);
            struct node *g = mk(p, N_GETITEM, off);
            g->a = n;
            if (is_op(p, "]")) { /* x[] indexes with an empty tuple in Jinja2 (and finds nothing) */
                next(p);
                g->b = mk(p, N_TUPLE, off);
                n = g;
                continue;
            }
            struct node *idx = parse_subscribed(p);
            if (is_op(p, ",")) {
                struct node *tup = mk(p, N_TUPLE, off);
                nv_push(p, &tup->l1, idx);
                while (is_op(p, ",")) { /* no trailing comma here, as Jinja2 */
                    next(p);
                    nv_push(p, &tup->l1, parse_subscribed(p));
                }
                idx = tup;
            }
            expect_op(p, "]");
            if (idx->k == N_SLICE) {
                idx->a = n;
                n = idx;
            } else {
                g->b = idx;
                n = g;
            }
        } else if (is_op(p, "(")) {
            struct node *c = mk(p, N_CALL, off);
            c->a = n;
            parse_call_args(p, c);
            n = c;
        } else {
            return n;
        }
    }
}

static struct node *parse_primary(struct parser *p)
{
    const struct jtok *k = cur(p);
    struct node *n;
    if (k->t == JT_NAME) {
        n = mk(p, N_LIT, k->off);
        if (tok_is(k, JT_NAME, "true") || tok_is(k, JT_NAME, "True"))
            n->lit = jv_bool(true);
        else if (tok_is(k, JT_NAME, "false") || tok_is(k, JT_NAME, "False"))
            n->lit = jv_bool(false);
        else if (tok_is(k, JT_NAME, "none") || tok_is(k, JT_NAME, "None"))
            n->lit = jv_none();
        else {
            n->k = N_NAME;
            n->s = ja_strndup(&p->t->ar, k->s, k->n);
            n->sn = k->n;
        }
        next(p);
        return n;
    }
    if (k->t == JT_STRING) {
        n = mk(p, N_LIT, k->off);
        size_t total = 0, j = p->i;
        while (p->tk[j].t == JT_STRING)
            total += p->tk[j++].n;
        char *s = ja_alloc(&p->t->ar, total + 1);
        if (!s) pfail(p, TUNA_E_OOM, k->off, "out of memory");
        size_t o = 0;
        while (cur(p)->t == JT_STRING) {
            memcpy(s + o, cur(p)->s, cur(p)->n);
            o += cur(p)->n;
            next(p);
        }
        n->lit = jv_str_ref(s, total);
        return n;
    }
    if (k->t == JT_INT || k->t == JT_FLOAT) {
        n = mk(p, N_LIT, k->off);
        n->lit = k->t == JT_INT ? jv_int(k->i) : jv_float(k->f);
        next(p);
        return n;
    }
    if (tok_is(k, JT_OP, "(")) {
        next(p);
        n = parse_tuple(p, false, true, NULL, true);
        expect_op(p, ")");
        return n;
    }
    if (tok_is(k, JT_OP, "[")) {
        n = mk(p, N_LIST, k->off);
        next(p);
        while (!is_op(p, "]")) {
            if (n->l1.n) {
                expect_op(p, ",");
                if (is_op(p, "]")) break;
            }
            nv_push(p, &n->l1, parse_expression(p, true));
        }
        next(p);
        return n;
    }
    if (tok_is(k, JT_OP, "{")) {
        n = mk(p, N_DICT, k->off);
        next(p);
        while (!is_op(p, "}")) {
            if (n->l1.n) {
                expect_op(p, ",");
                if (is_op(p, "}")) break;
            }
            nv_push(p, &n->l1, parse_expression(p, true));
            expect_op(p, ":");
            nv_push(p, &n->l1, parse_expression(p, true));
        }
        next(p);
        return n;
    }
    char b[64];
    pfail(p, TUNA_E_FORMAT, k->off, "unexpected %s", tok_desc(k, b, sizeof b));
}

/* ---- statements ---- */
static void parse_body(struct parser *p, struct nvec *body, const char *const *ends);

/* Before a body, Jinja2's parse_statements allows one ':' ({% if x: %}, {% else: %}) */
static void body_start(struct parser *p)
{
    if (is_op(p, ":")) next(p);
    expect_type(p, JT_BLOCK_END, "'%}'");
}

static void expect_block_end(struct parser *p)
{
    expect_type(p, JT_BLOCK_END, "'%}'");
}

static bool at_end_tag(struct parser *p, const char *const *ends)
{
    for (int i = 0; ends[i]; i++)
        if (is_name(p, ends[i])) return true;
    return false;
}

static void check_target(struct parser *p, struct node *t, bool with_ns)
{
    if (t->k == N_NAME) return;
    if (with_ns && t->k == N_GETATTR && t->a->k == N_NAME) return; /* ns.attr, also inside a tuple */
    if (t->k == N_TUPLE) {
        for (size_t i = 0; i < t->l1.n; i++)
            check_target(p, t->l1.v[i], with_ns);
        return;
    }
    pfail(p, TUNA_E_FORMAT, t->off, "can only assign to names or tuples of names here");
}

static struct node *parse_target(struct parser *p, const char *extra, bool with_ns)
{
    /* names, and with_ns also ns.attr, alone or in a tuple (Jinja2 3.1 parse_assign_target) */
    struct node *t = parse_tuple(p, true, false, extra, false);
    check_target(p, t, with_ns);
    return t;
}

static void parse_params(struct parser *p, struct nvec *params)
{
    expect_op(p, "(");
    while (!is_op(p, ")")) {
        if (params->n) expect_op(p, ",");
        const struct jtok *k = cur(p);
        if (k->t != JT_NAME) pfail(p, TUNA_E_FORMAT, k->off, "expected a parameter name");
        struct node *pa = mk(p, N_PARAM, k->off);
        pa->s = ja_strndup(&p->t->ar, k->s, k->n);
        pa->sn = k->n;
        next(p);
        if (is_op(p, "=")) {
            next(p);
            pa->a = parse_expression(p, true);
        } else if (params->n && params->v[params->n - 1]->a) {
            pfail(p, TUNA_E_FORMAT, pa->off, "non-default argument follows default argument");
        }
        nv_push(p, params, pa);
    }
    next(p);
}

static struct node *parse_filter_chain(struct parser *p)
{
    struct node *f = NULL;
    do {
        f = parse_filter(p, f);
    } while (is_op(p, "|") && (next(p), true));
    return f;
}

/* Does the subtree refer to the variable `name`? Like Jinja2's find_undeclared, this looks into
 * nested macros and call blocks too. */
static bool refers_to(const struct node *n, const char *name)
{
    if (!n) return false;
    if (n->k == N_NAME && !strcmp(n->s, name)) return true;
    if (refers_to(n->a, name) || refers_to(n->b, name) || refers_to(n->c, name) || refers_to(n->d, name)) return true;
    const struct nvec *lists[3] = {&n->l1, &n->l2, &n->l3};
    for (int k = 0; k < 3; k++) {
        for (size_t i = 0; i < lists[k]->n; i++)
            if (refers_to(lists[k]->v[i], name)) return true;
    }
    return false;
}

static const char *const END_IF[] = {"elif", "else", "endif", NULL};
static const char *const END_ENDIF[] = {"endif", NULL};
static const char *const END_FOR[] = {"else", "endfor", NULL};
static const char *const END_ENDFOR[] = {"endfor", NULL};
static const char *const END_SET[] = {"endset", NULL};
static const char *const END_MACRO[] = {"endmacro", NULL};
static const char *const END_CALL[] = {"endcall", NULL};
static const char *const END_FILTER[] = {"endfilter", NULL};
static const char *const END_GEN[] = {"endgeneration", NULL};

static struct node *parse_if(struct parser *p, size_t off)
{
    struct node *n = mk(p, N_IF, off);
    n->a = parse_tuple(p, false, true, NULL, false);
    body_start(p);
    parse_body(p, &n->l1, END_IF);
    if (is_name(p, "elif")) {
        size_t o2 = cur(p)->off;
        next(p);
        nv_push(p, &n->l2, parse_if(p, o2));
        return n; /* the nested if consumed endif */
    }
    if (is_name(p, "else")) {
        next(p);
        body_start(p);
        parse_body(p, &n->l2, END_ENDIF);
    }
    next(p); /* endif */
    expect_block_end(p);
    return n;
}

static struct node *parse_statement(struct parser *p)
{
    size_t off = cur(p)->off;
    const struct jtok *k = cur(p);
    if (k->t != JT_NAME) pfail(p, TUNA_E_FORMAT, off, "expected a tag name after '{%%'");
    char name[32];
    snprintf(name, sizeof name, "%.*s", (int)(k->n < 31 ? k->n : 31), k->s);
    next(p);
    struct node *n;
    if (!strcmp(name, "if")) return parse_if(p, off);
    if (!strcmp(name, "for")) {
        n = mk(p, N_FOR, off);
        n->a = parse_target(p, "in", false);
        if (!is_name(p, "in")) pfail(p, TUNA_E_FORMAT, cur(p)->off, "expected 'in' in for loop");
        next(p);
        n->b = parse_tuple(p, false, false, "recursive", false);
        if (is_name(p, "if")) {
            next(p);
            n->c = parse_expression(p, true);
        }
        if (is_name(p, "recursive")) pfail(p, TUNA_E_UNSUPPORTED, cur(p)->off, "recursive for loops");
        body_start(p);
        parse_body(p, &n->l1, END_FOR);
        if (is_name(p, "else")) {
            next(p);
            body_start(p);
            parse_body(p, &n->l2, END_ENDFOR);
        }
        next(p);
        expect_block_end(p);
        return n;
    }
    if (!strcmp(name, "set")) {
        struct node *target = parse_target(p, NULL, true);
        if (is_op(p, "=")) {
            next(p);
            n = mk(p, N_SET, off);
            n->a = target;
            n->b = parse_tuple(p, false, true, NULL, false);
            expect_block_end(p);
            return n;
        }
        n = mk(p, N_SETBLOCK, off);
        n->a = target;
        if (is_op(p, "|")) {
            next(p);
            n->c = parse_filter_chain(p);
        }
        body_start(p);
        parse_body(p, &n->l1, END_SET);
        next(p);
        expect_block_end(p);
        return n;
    }
    if (!strcmp(name, "macro")) {
        n = mk(p, N_MACRO, off);
        if (cur(p)->t != JT_NAME) pfail(p, TUNA_E_FORMAT, cur(p)->off, "expected the macro's name");
        n->s = ja_strndup(&p->t->ar, cur(p)->s, cur(p)->n);
        n->sn = cur(p)->n;
        next(p);
        parse_params(p, &n->l2);
        body_start(p);
        parse_body(p, &n->l1, END_MACRO);
        for (size_t i = 0; i < n->l1.n; i++) {
            n->uses_caller |= refers_to(n->l1.v[i], "caller");
            if (refers_to(n->l1.v[i], "varargs") || refers_to(n->l1.v[i], "kwargs"))
                pfail(p, TUNA_E_UNSUPPORTED, off, "macro '%s' uses varargs/kwargs", n->s);
        }
        next(p);
        expect_block_end(p);
        return n;
    }
    if (!strcmp(name, "call")) {
        n = mk(p, N_CALLBLOCK, off);
        n->s = "caller";
        n->sn = 6;
        if (is_op(p, "(")) parse_params(p, &n->l2);
        n->a = parse_expression(p, true);
        if (n->a->k != N_CALL) pfail(p, TUNA_E_FORMAT, n->a->off, "'{%% call %%}' needs a macro call");
        body_start(p);
        parse_body(p, &n->l1, END_CALL);
        next(p);
        expect_block_end(p);
        return n;
    }
    if (!strcmp(name, "filter")) {
        n = mk(p, N_FILTERBLOCK, off);
        n->a = parse_filter_chain(p);
        body_start(p);
        parse_body(p, &n->l1, END_FILTER);
        next(p);
        expect_block_end(p);
        return n;
    }
    if (!strcmp(name, "generation")) {
        n = mk(p, N_BODY, off);
        body_start(p);
        parse_body(p, &n->l1, END_GEN);
        next(p);
        expect_block_end(p);
        return n;
    }
    if (!strcmp(name, "break") || !strcmp(name, "continue")) {
        n = mk(p, name[0] == 'b' ? N_BREAK : N_CONTINUE, off);
        expect_block_end(p);
        return n;
    }
    static const char *const unsupported[] = {"extends",    "include", "import", "from",      "block", "with",
                                              "autoescape", "do",      "trans",  "pluralize", NULL};
    for (int i = 0; unsupported[i]; i++)
        if (!strcmp(name, unsupported[i])) pfail(p, TUNA_E_UNSUPPORTED, off, "the '{%% %s %%}' tag", name);
    pfail(p, TUNA_E_FORMAT, off, "unknown or misplaced tag '%s'", name);
}

static void parse_body(struct parser *p, struct nvec *body, const char *const *ends)
{
    for (;;) {
        const struct jtok *k = cur(p);
        switch (k->t) {
        case JT_EOF:
            if (ends) {
                size_t last = 0;
                while (ends[last + 1])
                    last++;
                pfail(p, TUNA_E_FORMAT, k->off, "unexpected end of template: missing '{%% %s %%}'", ends[last]);
            }
            return;
        case JT_TEXT: {
            struct node *n = mk(p, N_TEXT, k->off);
            n->s = k->s;
            n->sn = k->n;
            nv_push(p, body, n);
            next(p);
            break;
        }
        case JT_VAR_BEGIN: {
            next(p);
            struct node *n = mk(p, N_OUTPUT, k->off);
            n->a = parse_tuple(p, false, true, NULL, false);
            expect_type(p, JT_VAR_END, "'}}'");
            nv_push(p, body, n);
            break;
        }
        case JT_BLOCK_BEGIN:
            next(p);
            if (ends && at_end_tag(p, ends)) return;
            nv_push(p, body, parse_statement(p));
            break;
        default: {
            char b[64];
            pfail(p, TUNA_E_FORMAT, k->off, "unexpected %s", tok_desc(k, b, sizeof b));
        }
        }
    }
}

/* Jinja2's builtin filters and tests: a name outside these is an error in Jinja2 too; a name
 * inside them that tuna lacks is unsupported. */
static const char *const JINJA2_FILTERS[] = {
    "abs",    "attr",       "batch",       "capitalize", "center",   "count",
    "d",      "default",    "dictsort",    "e",          "escape",   "filesizeformat",
    "first",  "float",      "forceescape", "format",     "groupby",  "indent",
    "int",    "items",      "join",        "last",       "length",   "list",
    "lower",  "map",        "max",         "min",        "pprint",   "random",
    "reject", "rejectattr", "replace",     "reverse",    "round",    "safe",
    "select", "selectattr", "slice",       "sort",       "string",   "striptags",
    "sum",    "title",      "tojson",      "trim",       "truncate", "unique",
    "upper",  "urlencode",  "urlize",      "wordcount",  "wordwrap", "xmlattr",
    NULL};

static bool in_list(const char *const *l, const char *name)
{
    for (int i = 0; l[i]; i++)
        if (!strcmp(l[i], name)) return true;
    return false;
}

/* Jinja2 checks filter and test names when it compiles, except inside an `if` (its test and
 * branches) or a conditional expression, where an unknown name fails only if it runs. This walk
 * does the same: `soft` is true inside those; loop, macro, call and block bodies reset it. */
static void check_names(struct parser *p, const struct node *n, bool soft)
{
    if (!n) return;
    if ((n->k == N_FILTER && !jx_has_filter(n->s)) || (n->k == N_TEST && !jx_has_test(n->s))) {
        if (!soft) {
            bool filter = n->k == N_FILTER;
            if (filter && in_list(JINJA2_FILTERS, n->s)) pfail(p, TUNA_E_UNSUPPORTED, n->off, "the filter '%s'", n->s);
            pfail(p, TUNA_E_FORMAT, n->off, "no %s named '%s'", filter ? "filter" : "test", n->s);
        }
    }
    bool child_soft = soft || n->k == N_IF || n->k == N_COND;
    switch (n->k) {
    case N_FOR: /* the iterable is in the outer frame; filter, body and else in the loop's */
        check_names(p, n->b, soft);
        check_names(p, n->a, false);
        check_names(p, n->c, false);
        for (size_t i = 0; i < n->l1.n; i++)
            check_names(p, n->l1.v[i], false);
        for (size_t i = 0; i < n->l2.n; i++)
            check_names(p, n->l2.v[i], false);
        return;
    case N_MACRO:
    case N_SETBLOCK:
    case N_FILTERBLOCK: child_soft = false; break;
    case N_CALLBLOCK: /* the call's arguments are in the outer frame, the caller body is a macro */
        check_names(p, n->a, soft);
        for (size_t i = 0; i < n->l1.n; i++)
            check_names(p, n->l1.v[i], false);
        for (size_t i = 0; i < n->l2.n; i++)
            check_names(p, n->l2.v[i], false);
        return;
    default: break;
    }
    check_names(p, n->a, child_soft);
    check_names(p, n->b, child_soft);
    check_names(p, n->c, child_soft);
    check_names(p, n->d, child_soft);
    const struct nvec *lists[3] = {&n->l1, &n->l2, &n->l3};
    for (int k = 0; k < 3; k++)
        for (size_t i = 0; i < lists[k]->n; i++)
            check_names(p, lists[k]->v[i], child_soft);
}

tuna_status jparse(struct tuna_jinja_template *t, const struct jtoks *toks)
{
    struct parser p = {.t = t, .tk = toks->v, .n = toks->n};
    if (setjmp(p.jb)) return p.st;
    t->root = mk(&p, N_BODY, 0);
    parse_body(&p, &t->root->l1, NULL);
    check_names(&p, t->root, false);
    return TUNA_OK;
}
