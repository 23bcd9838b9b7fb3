/* internal.h — the pieces of the Jinja interpreter shared between its files (not a public API).
 *
 * Memory: everything made while parsing lives in the template's arena, everything made while
 * rendering lives in the render's arena; both are freed as a whole. That is why values are plain
 * structs with pointers and no reference counts, and why a render error can unwind with longjmp
 * (jx_fail) without leaking: nothing outside the arena needs freeing.
 *
 * Semantics follow Python Jinja2 3.x as transformers configures it (see jinja.h).
 */
#ifndef TUNA_JINJA_INTERNAL_H
#define TUNA_JINJA_INTERNAL_H

#include <setjmp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "tokenizer/jinja/jinja.h"

/* ---- arena ---- */
struct jarena_block;
struct jarena {
    struct jarena_block *head;
    bool failed; /* an allocation failed (the caller reports OOM) */
};
void *ja_alloc(struct jarena *a, size_t n); /* zeroed; NULL only on OOM */
char *ja_strndup(struct jarena *a, const char *s, size_t n);
void ja_free(struct jarena *a);

/* ---- growable byte buffer (malloc'd) ---- */
struct jbuf {
    char *p;
    size_t n, cap;
    bool oom;
};
void jb_put(struct jbuf *b, const char *s, size_t n);
void jb_puts(struct jbuf *b, const char *s);
void jb_putc(struct jbuf *b, char c);
void jb_printf(struct jbuf *b, const char *fmt, ...) TUNA_PRINTF(2, 3);

/* ---- values ---- */
enum jv_type {
    JV_UNDEF = 0, /* u.s/n: the name that was not found (for messages), may be NULL */
    JV_NONE,
    JV_BOOL,
    JV_INT,
    JV_FLOAT,
    JV_STR, /* u.s, n: UTF-8 bytes, not NUL-terminated in general */
    JV_LIST,
    JV_TUPLE, /* a list that prints as (a, b) */
    JV_DICT,
    JV_NS,   /* namespace(): a dict whose attributes may be set */
    JV_FUNC, /* builtin, bound method or macro */
};

struct jlist;
struct jdict;
struct jfunc;

struct jv {
    enum jv_type t;
    bool safe; /* a string marked safe (Markup): `+` escapes the other side, `escape` keeps it */
    size_t n;
    union {
        bool b;
        int64_t i;
        double f;
        const char *s;
        struct jlist *l;
        struct jdict *d;
        struct jfunc *fn;
    } u;
};

/* What Python object a list value stands for. Jinja2's map/select/... return generators and
 * dict.items() returns a view; they iterate like lists but print, measure, index and serialize
 * differently (a generator has no len(), prints its address, is always true, is not JSON). */
enum jl_kind {
    JL_LIST = 0,
    JL_GEN,    /* generator or iterator (one pass) */
    JL_ITEMS,  /* dict_items */
    JL_KEYS,   /* dict_keys */
    JL_VALUES, /* dict_values */
    JL_RANGE,  /* range(r0, r1, rs) */
};

struct jlist {
    size_t n, cap;
    struct jv *v;
    enum jl_kind kind;
    bool consumed;      /* a generator that was iterated */
    int64_t r0, r1, rs; /* JL_RANGE */
};

struct jdict {
    size_t n, cap;
    struct jv *k, *v; /* insertion order */
    bool is_loop;     /* the `loop` object: attributes only (Jinja2's LoopContext is no dict) */
};

struct jctx;
struct node;

/* Arguments of a call: positional then keyword (names NUL-terminated). */
struct jargs {
    size_t npos, nkw;
    struct jv *pos;
    const char **kwname;
    struct jv *kw;
};

typedef struct jv (*jbuiltin_fn)(struct jctx *x, struct jv self, struct jargs *a);

struct jfunc {
    const char *name;
    jbuiltin_fn fn;         /* builtin or bound method (self below); NULL for macros */
    struct jv self;         /* bound object for methods */
    const struct node *mac; /* the macro definition (N_MACRO or the caller's N_CALLBLOCK) */
    struct jscope *closure; /* scope the macro was defined in */
    struct jv caller;       /* for {% call %}: the caller macro passed to the callee */
};

/* ---- scopes ---- */
struct jscope {
    struct jscope *parent;
    struct jdict vars;
};

/* ---- render context ---- */
struct jbuf_link {
    struct jbuf b;
    struct jbuf_link *next;
};

struct jctx {
    struct jbuf_link *open_bufs; /* buffers of macros / block sets being rendered */
    struct jarena *ar;
    const struct tuna_jinja_template *tpl;
    struct jscope *globals;
    struct jbuf *out;
    jmp_buf jb;
    tuna_status st;
    int depth; /* macro call depth, against runaway recursion */
    long long steps;
    int64_t now;           /* seconds since the epoch for strftime_now */
    const struct node *at; /* the node being evaluated, for messages from builtins */
};

/* Fails the render: sets the message (prefixed by the template position when known) and
 * longjmps to the render's entry. */
_Noreturn void jx_fail(struct jctx *x, const struct node *at, tuna_status s, const char *fmt, ...) TUNA_PRINTF(4, 5);

/* value constructors (allocate in x->ar; they fail the render on OOM) */
struct jv jv_undef(const char *name);
struct jv jv_none(void);
struct jv jv_bool(bool b);
struct jv jv_int(int64_t i);
struct jv jv_float(double f);
struct jv jv_str(struct jctx *x, const char *s, size_t n); /* copies */
struct jv jv_strz(struct jctx *x, const char *s);
struct jv jv_str_ref(const char *s, size_t n); /* no copy: s must outlive the render */
struct jv jv_list(struct jctx *x, size_t cap);
struct jv jv_dict(struct jctx *x, size_t cap);
struct jv jv_builtin(struct jctx *x, const char *name, jbuiltin_fn fn, struct jv self);

void jl_push(struct jctx *x, struct jlist *l, struct jv v);
void jd_set(struct jctx *x, struct jdict *d, struct jv k, struct jv v);
/* index of key or -1 */
long jd_find(const struct jdict *d, struct jv k);
long jd_finds(const struct jdict *d, const char *k, size_t n);
bool jd_gets(const struct jdict *d, const char *k, struct jv *out);
bool jd_del(struct jdict *d, struct jv k, struct jv *out);

bool jv_truthy(struct jv v);
bool jv_equal(struct jv a, struct jv b);
/* -1/0/1 ordering for <, sort; fails the render for unorderable types */
int jv_compare(struct jctx *x, struct jv a, struct jv b, bool case_sensitive);
bool jv_is_num(struct jv v);
double jv_num(struct jv v);
const char *jv_type_name(struct jv v);
bool jv_is_seq(struct jv v); /* list or tuple */

/* str(v) as Python prints it into b; repr(v) likewise */
void jv_write_str(struct jbuf *b, struct jv v);
void jv_write_repr(struct jbuf *b, struct jv v);
void jv_write_float(struct jbuf *b, double f);
/* str(v) into b, failing the render where Python would print an object address */
void jx_write_str(struct jctx *x, struct jbuf *b, struct jv v);
/* the same items as a new list of the given kind */
struct jv jv_as_kind(struct jctx *x, struct jv list, enum jl_kind kind);
/* Markup escaping of str(v) (& < > " ') */
struct jv jx_escape(struct jctx *x, struct jv v);
/* A scratch buffer that the render frees even when it fails (jx_fail longjmps past the code
 * that made it); jx_buf_take returns its text as a string and frees it. */
struct jbuf *jx_buf(struct jctx *x);
struct jv jx_buf_take(struct jctx *x, struct jbuf *b);
/* Python's `s % args` (the %s %d %i %r %% subset) */
struct jv jx_printf(struct jctx *x, struct jv s, const struct jv *args, size_t nargs, bool lenient);
/* str(v) as a string value (no copy when v is a string) */
struct jv jv_to_str(struct jctx *x, struct jv v);

struct tojson_opts {
    int indent; /* <0: none */
    const char *item_sep, *key_sep;
    bool sort_keys, ensure_ascii;
};
void jv_write_json(struct jctx *x, struct jbuf *b, struct jv v, const struct tojson_opts *o, int level);

/* Python str semantics on code points */
size_t ju_len(const char *s, size_t n);               /* code points */
size_t ju_offset(const char *s, size_t n, size_t cp); /* byte offset of code point cp */
bool ju_is_ascii(const char *s, size_t n);
/* Materializes an iterable (list, tuple, dict keys, string chars, undefined → empty) as a list. */
struct jlist *jv_iterate(struct jctx *x, struct jv v, const struct node *at);

/* builtins (methods.c, filters.c) */
struct jv jx_getattr(struct jctx *x, struct jv obj, const char *name, size_t n, const struct node *at);
struct jv jx_filter(struct jctx *x, const char *name, struct jv in, struct jargs *a, const struct node *at);
bool jx_test(struct jctx *x, const char *name, struct jv in, struct jargs *a, const struct node *at);
bool jx_has_filter(const char *name);
bool jx_has_test(const char *name);
void jx_add_globals(struct jctx *x, struct jdict *g);
struct jv jx_call(struct jctx *x, struct jv fn, struct jargs *a, const struct node *at);
/* argument helpers: the i-th positional or the keyword `name`, else def */
struct jv ja_arg(struct jargs *a, size_t i, const char *name, struct jv def);
bool ja_has(struct jargs *a, size_t i, const char *name);
/* the argument as Python truth / as an int (failing the render for other types) */
bool ja_bool(struct jargs *a, size_t i, const char *name, bool def);
int64_t ja_int(struct jctx *x, struct jargs *a, size_t i, const char *name, int64_t def);

/* Python str methods shared by methods.c and filters.c */
size_t js_ws_at(const char *s, size_t n, size_t i);
struct jv js_strip(struct jctx *x, struct jv s, struct jv chars, bool left, bool right);
struct jv js_lower(struct jctx *x, struct jv s);
struct jv js_upper(struct jctx *x, struct jv s);
struct jv js_capitalize(struct jctx *x, struct jv s);
struct jv js_replace(struct jctx *x, struct jv s, struct jv old, struct jv nw, int64_t count);
struct jv jx_getitem(struct jctx *x, struct jv obj, struct jv key, const struct node *at);

/* ---- lexer ---- */
enum jtok_type {
    JT_EOF = 0,
    JT_TEXT,
    JT_VAR_BEGIN,
    JT_VAR_END,
    JT_BLOCK_BEGIN,
    JT_BLOCK_END,
    JT_NAME,
    JT_STRING,
    JT_INT,
    JT_FLOAT,
    JT_OP,
};

struct jtok {
    enum jtok_type t;
    size_t off; /* byte offset in the (newline-normalized) source */
    const char *s;
    size_t n; /* text/name/op/decoded string */
    int64_t i;
    double f;
};

struct jtoks {
    struct jtok *v;
    size_t n, cap;
};

/* ---- AST ---- */
enum node_kind {
    /* expressions */
    N_LIT,
    N_NAME,
    N_LIST,
    N_TUPLE,
    N_DICT,
    N_GETATTR,
    N_GETITEM,
    N_SLICE,
    N_CALL,
    N_KW,
    N_STAR,
    N_FILTER,
    N_TEST,
    N_NEG,
    N_POS,
    N_NOT,
    N_BINOP,
    N_AND,
    N_OR,
    N_COND,
    N_CONCAT,
    N_COMPARE,
    /* statements */
    N_TEXT,
    N_OUTPUT,
    N_IF,
    N_FOR,
    N_SET,
    N_SETBLOCK,
    N_MACRO,
    N_CALLBLOCK,
    N_FILTERBLOCK,
    N_BREAK,
    N_CONTINUE,
    N_BODY,
    N_PARAM,
};

struct nvec {
    struct node **v;
    size_t n, cap;
};

struct node {
    enum node_kind k;
    size_t off;
    const char *s; /* name, operator, text */
    size_t sn;
    struct node *a, *b, *c, *d;
    struct nvec l1, l2, l3;
    struct jv lit;
    bool neg;         /* `is not`, `not in` */
    bool uses_caller; /* N_MACRO: its body refers to caller (else Jinja2 refuses a {% call %}) */
};

struct tuna_jinja_template {
    struct jarena ar;
    char *src; /* normalized source */
    size_t srclen;
    struct tuna_jinja_options opt;
    struct node *root; /* N_BODY */
};

tuna_status jlex(struct tuna_jinja_template *t, struct jtoks *out);
tuna_status jparse(struct tuna_jinja_template *t, const struct jtoks *toks);
/* "line L, column C" of a source offset */
void jpos(const struct tuna_jinja_template *t, size_t off, int *line, int *col);

#endif
