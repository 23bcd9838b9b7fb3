/* lexer.c — template source → tokens, applying Jinja2's whitespace rules while lexing:
 * `{%-`/`-%}` (and for `{{`, `{#`) strip all whitespace on that side; lstrip_blocks removes spaces
 * and tabs between a line's start and a block or comment tag (`{%+` opts out); trim_blocks drops
 * one newline after a block or comment tag (`+%}` opts out); one trailing newline of the
 * template goes unless keep_trailing_newline. Newlines are normalized to "\n" first, as Jinja2
 * does. `{% raw %}` bodies become text. Comments produce nothing. */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "tokenizer/jinja/internal.h"

void jpos(const struct tuna_jinja_template *t, size_t off, int *line, int *col)
{
    int l = 1, c = 1;
    for (size_t i = 0; i < off && i < t->srclen; i++) {
        if (t->src[i] == '\n') {
            l++;
            c = 1;
        } else if (((unsigned char)t->src[i] & 0xC0) != 0x80) {
            c++;
        }
    }
    *line = l;
    *col = c;
}

static tuna_status lex_fail(const struct tuna_jinja_template *t, size_t off, const char *what)
{
    int l, c;
    jpos(t, off, &l, &c);
    return tuna_fail(TUNA_E_FORMAT, "template syntax error at line %d, column %d: %s", l, c, what);
}

static bool push(struct tuna_jinja_template *t, struct jtoks *o, struct jtok k)
{
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 256;
        struct jtok *nv = realloc(o->v, cap * sizeof *nv);
        if (!nv) return false;
        o->v = nv;
        o->cap = cap;
    }
    o->v[o->n++] = k;
    return true;
}

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes a string literal body with Python's escapes into the arena. */
static tuna_status lex_string(struct tuna_jinja_template *t, size_t *pos, struct jtok *k)
{
    const char *s = t->src;
    char q = s[*pos];
    size_t i = *pos + 1, start = i;
    while (i < t->srclen && s[i] != q) {
        if (s[i] == '\\' && i + 1 < t->srclen) i++;
        i++;
    }
    if (i >= t->srclen) return lex_fail(t, *pos, "unterminated string literal");
    char *out = ja_alloc(&t->ar, i - start + 1);
    if (!out) return tuna_fail_oom("template string", i - start);
    size_t n = 0;
    for (size_t j = start; j < i; j++) {
        if (s[j] != '\\') {
            out[n++] = s[j];
            continue;
        }
        char e = s[++j];
        int digits = 0;
        switch (e) {
        case 'n': out[n++] = '\n'; break;
        case 't': out[n++] = '\t'; break;
        case 'r': out[n++] = '\r'; break;
        case '\\': out[n++] = '\\'; break;
        case '\'': out[n++] = '\''; break;
        case '"': out[n++] = '"'; break;
        case 'a': out[n++] = '\a'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'v': out[n++] = '\v'; break;
        case '0':
            if (j + 1 < i && s[j + 1] >= '0' && s[j + 1] <= '7')
                return lex_fail(t, j, "octal escapes in strings are not supported");
            out[n++] = '\0';
            break;
        case '\n': break; /* line continuation */
        case 'x': digits = 2; break;
        case 'u': digits = 4; break;
        case 'U': digits = 8; break;
        default:
            out[n++] = '\\';
            out[n++] = e;
            break;
        }
        if (digits) {
            uint32_t cp = 0;
            for (int d = 0; d < digits; d++) {
                int h = j + 1 < i ? hexval(s[j + 1]) : -1;
                if (h < 0) return lex_fail(t, j, "truncated \\x/\\u escape in a string literal");
                cp = cp * 16 + (uint32_t)h;
                j++;
            }
            if (cp > 0x10FFFF) return lex_fail(t, j, "escape out of the Unicode range");
            /* the decoded text is never longer than the escape that wrote it */
            n += (size_t)utf8proc_encode_char((utf8proc_int32_t)cp, (utf8proc_uint8_t *)out + n);
        }
    }
    out[n] = 0;
    k->t = JT_STRING;
    k->s = out;
    k->n = n;
    *pos = i + 1;
    return TUNA_OK;
}

static const char *const OPS3[] = {"//=", NULL};
static int digit_of(char c, int base)
{
    int v = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                   : 99;
    return v < base ? v : -1;
}

/* End of an integer literal at i as Jinja2 reads it: 0b/0o/0x with digits (single '_' between),
 * [1-9] then digits, or zeros; so "01" is the two tokens 0 and 1. Sets the base and where the
 * digits start. */
static size_t lex_int_end(const char *s, size_t n, size_t i, int *base, size_t *digits_at)
{
    *base = 10;
    *digits_at = i;
    if (s[i] == '0' && i + 2 < n + 1 && i + 1 < n && strchr("bBoOxX", s[i + 1])) {
        int b = (s[i + 1] | 32) == 'b' ? 2 : (s[i + 1] | 32) == 'o' ? 8 : 16;
        size_t j = i + 2, digits = 0;
        for (;;) {
            if (j < n && s[j] == '_' && j + 1 < n && digit_of(s[j + 1], b) >= 0)
                j += 2, digits++;
            else if (j < n && digit_of(s[j], b) >= 0)
                j++, digits++;
            else
                break;
        }
        if (digits) {
            *base = b;
            *digits_at = i + 2;
            return j;
        }
    }
    char first = s[i];
    size_t j = i + 1;
    for (;;) {
        bool ok_digit = first == '0' ? (j < n && s[j] == '0') : (j < n && isdigit((unsigned char)s[j]));
        bool ok_us = j + 1 < n && s[j] == '_' && (first == '0' ? s[j + 1] == '0' : isdigit((unsigned char)s[j + 1]));
        if (ok_us)
            j += 2;
        else if (ok_digit)
            j++;
        else
            break;
    }
    return j;
}

static const char *const OPS2[] = {"//", "**", "==", "!=", "<=", ">=", NULL};
static const char OPS1[] = "+-*/%~()[]{},.:|=<>;";

/* Lexes the inside of a {{ }} or {% %} tag starting at *pos; stops after the end marker.
 * *strip_after: the tag ended with '-'; *plus_after: ended with '+'. */
static tuna_status lex_tag(struct tuna_jinja_template *t, struct jtoks *o, size_t *pos, bool block, bool *strip_after,
                           bool *plus_after, size_t open_off)
{
    const char *s = t->src;
    size_t n = t->srclen, i = *pos;
    int depth = 0;
    (void)OPS3;
    for (;;) {
        while (i < n && is_ws(s[i]))
            i++;
        if (i >= n) return lex_fail(t, open_off, block ? "unclosed '{%' tag" : "unclosed '{{' tag");
        char endc = block ? '%' : '}';
        if (depth == 0) {
            size_t j = i;
            bool minus = false, plus = false;
            if (s[j] == '-' && j + 2 < n + 0 && s[j + 1] == endc && s[j + 2] == '}') {
                minus = true;
                j++;
            } else if (block && s[j] == '+' && j + 2 < n && s[j + 1] == '%' && s[j + 2] == '}') {
                plus = true;
                j++;
            }
            if (j + 1 < n && s[j] == endc && s[j + 1] == '}') {
                struct jtok k = {.t = block ? JT_BLOCK_END : JT_VAR_END, .off = i};
                if (!push(t, o, k)) return tuna_fail_oom("template tokens", 0);
                *strip_after = minus;
                *plus_after = plus;
                *pos = j + 2;
                return TUNA_OK;
            }
        }
        struct jtok k = {.off = i};
        char c = s[i];
        if (c == '\'' || c == '"') {
            tuna_status st = lex_string(t, &i, &k);
            if (st) return st;
        } else if (isdigit((unsigned char)c)) {
            size_t j = i;
            bool isf = false;
            while (j < n && (isdigit((unsigned char)s[j]) || s[j] == '_'))
                j++;
            /* no float right after '.': matrix.0.1 is two subscripts (Jinja2's (?<!\.)) */
            bool after_dot = i > 0 && s[i - 1] == '.';
            if (!after_dot && j + 1 < n && s[j] == '.' && isdigit((unsigned char)s[j + 1])) {
                isf = true;
                j++;
                while (j < n && (isdigit((unsigned char)s[j]) || s[j] == '_'))
                    j++;
            }
            if (!after_dot && j < n && (s[j] == 'e' || s[j] == 'E')) {
                size_t e = j + 1;
                if (e < n && (s[e] == '+' || s[e] == '-')) e++;
                if (e < n && isdigit((unsigned char)s[e])) {
                    isf = true;
                    j = e;
                    while (j < n && isdigit((unsigned char)s[j]))
                        j++;
                }
            }
            int base = 10;
            size_t digits_at = i;
            if (!isf) j = lex_int_end(s, n, i, &base, &digits_at); /* Jinja2's integer_re */
            char buf[128];
            size_t bn = 0;
            for (size_t q = digits_at; q < j && bn + 1 < sizeof buf; q++)
                if (s[q] != '_') buf[bn++] = s[q];
            buf[bn] = 0;
            if (isf) {
                k.t = JT_FLOAT;
                k.f = strtod(buf, NULL);
            } else {
                k.t = JT_INT;
                char *end;
                errno = 0;
                long long v = strtoll(buf, &end, base);
                if (errno) return lex_fail(t, i, "integer literal does not fit in 64 bits");
                k.i = v;
            }
            k.s = s + i;
            k.n = j - i;
            i = j;
        } else if (isalpha((unsigned char)c) || c == '_') {
            size_t j = i;
            while (j < n && (isalnum((unsigned char)s[j]) || s[j] == '_'))
                j++;
            k.t = JT_NAME;
            k.s = s + i;
            k.n = j - i;
            i = j;
        } else {
            k.t = JT_OP;
            k.s = s + i;
            k.n = 0;
            for (int q = 0; OPS2[q]; q++)
                if (i + 1 < n && s[i] == OPS2[q][0] && s[i + 1] == OPS2[q][1]) k.n = 2;
            if (!k.n && strchr(OPS1, c) && c) k.n = 1;
            if (!k.n) {
                char msg[64];
                size_t cl = 1; /* the whole UTF-8 character, so that the message stays valid text */
                while (i + cl < n && cl < 4 && ((unsigned char)s[i + cl] & 0xC0) == 0x80)
                    cl++;
                snprintf(msg, sizeof msg, "unexpected character '%.*s'", (int)cl, s + i);
                return lex_fail(t, i, msg);
            }
            if (k.n == 1) {
                if (c == '(' || c == '[' || c == '{') depth++;
                if (c == ')' || c == ']' || c == '}') {
                    if (depth == 0) return lex_fail(t, i, "unbalanced closing bracket");
                    depth--;
                }
            }
            i += k.n;
        }
        if (!push(t, o, k)) return tuna_fail_oom("template tokens", 0);
    }
}

/* Matches "{%" [-+]? ws* name ws* [-+]? "%}" at i; returns the offset after it or 0, with the
 * whitespace-control signs ('-', '+' or 0) on each side. */
static size_t match_simple_tag(const char *s, size_t n, size_t i, const char *name, char *lsign, char *rsign)
{
    size_t j = i + 2;
    *lsign = *rsign = 0;
    if (j < n && (s[j] == '-' || s[j] == '+')) *lsign = s[j++];
    while (j < n && is_ws(s[j]))
        j++;
    size_t ln = strlen(name);
    if (j + ln > n || memcmp(s + j, name, ln) != 0) return 0;
    j += ln;
    if (j < n && (isalnum((unsigned char)s[j]) || s[j] == '_')) return 0;
    while (j < n && is_ws(s[j]))
        j++;
    if (j < n && (s[j] == '-' || s[j] == '+')) *rsign = s[j++];
    if (j + 1 < n && s[j] == '%' && s[j + 1] == '}') return j + 2;
    return 0;
}

tuna_status jlex(struct tuna_jinja_template *t, struct jtoks *o)
{
    const char *s = t->src;
    size_t n = t->srclen, pos = 0;
    bool strip_next = false; /* previous tag ended with '-' */
    bool trim_next = false;  /* previous block tag asks trim_blocks */
    bool line_starting = true;
    for (;;) {
        /* find the next tag opener */
        size_t i = pos;
        while (i + 1 < n && !(s[i] == '{' && (s[i + 1] == '{' || s[i + 1] == '%' || s[i + 1] == '#')))
            i++;
        size_t tstart = pos, tend = (i + 1 < n) ? i : n;
        if (strip_next) {
            while (tstart < tend && is_ws(s[tstart]))
                tstart++;
        } else if (trim_next && tstart < tend && s[tstart] == '\n') {
            tstart++;
        }
        bool at_end = tend >= n;
        char kind = at_end ? 0 : s[i + 1];
        char mod = (!at_end && i + 2 < n) ? s[i + 2] : 0;
        if (!at_end) {
            if (mod == '-') {
                while (tend > tstart && is_ws(s[tend - 1]))
                    tend--;
            } else if (t->opt.lstrip_blocks && mod != '+' && (kind == '%' || kind == '#')) {
                size_t l = tend;
                while (l > tstart && (s[l - 1] == ' ' || s[l - 1] == '\t'))
                    l--;
                bool at_line_start = (l > tstart && s[l - 1] == '\n') ||
                                     (l == tstart && (tstart > pos ? s[tstart - 1] == '\n' : line_starting));
                if (at_line_start) tend = l;
            }
        }
        if (tend > tstart) {
            struct jtok k = {.t = JT_TEXT, .off = tstart, .s = s + tstart, .n = tend - tstart};
            if (!push(t, o, k)) return tuna_fail_oom("template tokens", 0);
        }
        if (at_end) break;
        size_t open_off = i;
        size_t body = i + 2 + ((mod == '-' || mod == '+') ? 1 : 0);
        bool strip_after = false, plus_after = false;
        if (kind == '#') {
            size_t j = body;
            while (j + 1 < n && !(s[j] == '#' && s[j + 1] == '}'))
                j++;
            if (j + 1 >= n) return lex_fail(t, open_off, "unclosed comment '{#'");
            strip_after = j > body && s[j - 1] == '-';
            plus_after = j > body && s[j - 1] == '+';
            pos = j + 2;
            strip_next = strip_after;
            trim_next = t->opt.trim_blocks && !plus_after;
            line_starting = s[pos - 1] == '\n';
            continue;
        }
        bool block = kind == '%';
        struct jtok k = {.t = block ? JT_BLOCK_BEGIN : JT_VAR_BEGIN, .off = open_off};
        if (!push(t, o, k)) return tuna_fail_oom("template tokens", 0);
        size_t first_tok = o->n;
        pos = body;
        tuna_status st = lex_tag(t, o, &pos, block, &strip_after, &plus_after, open_off);
        if (st) return st;
        strip_next = strip_after;
        trim_next = block && t->opt.trim_blocks && !plus_after;
        line_starting = false;
        /* {% raw %}: the text up to {% endraw %} is data. As Jinja2's lexer: no trim_blocks after
         * the raw tag (only "-%}" strips), "+%}" is not a raw tag; before endraw "-" strips, "+"
         * keeps, else lstrip_blocks applies; after endraw the usual rules. */
        if (block && o->n == first_tok + 2 && o->v[first_tok].t == JT_NAME && o->v[first_tok].n == 3 &&
            memcmp(o->v[first_tok].s, "raw", 3) == 0) {
            if (plus_after)
                return lex_fail(t, open_off, "'{% raw +%}' is not a raw tag (Jinja2 says: unknown tag 'raw')");
            o->n = first_tok - 1; /* drop the raw tag's tokens */
            size_t j = pos, end = 0;
            char ls = 0, rs = 0;
            for (; j + 1 < n; j++) {
                if (s[j] == '{' && s[j + 1] == '%' && (end = match_simple_tag(s, n, j, "endraw", &ls, &rs))) break;
            }
            if (!end) return lex_fail(t, open_off, "'{% raw %}' without '{% endraw %}'");
            size_t a = pos, b = j;
            bool raw_line_start = false;
            if (strip_after) {
                while (a < b && is_ws(s[a]))
                    a++;
                raw_line_start = a > pos && s[a - 1] == '\n';
            }
            if (ls == '-') {
                while (b > a && is_ws(s[b - 1]))
                    b--;
            } else if (ls != '+' && t->opt.lstrip_blocks) {
                size_t l = b;
                while (l > a && (s[l - 1] == ' ' || s[l - 1] == '\t'))
                    l--;
                if ((l > a && s[l - 1] == '\n') || (l == a && raw_line_start)) b = l;
            }
            if (b > a) {
                struct jtok tk = {.t = JT_TEXT, .off = a, .s = s + a, .n = b - a};
                if (!push(t, o, tk)) return tuna_fail_oom("template tokens", 0);
            }
            pos = end;
            strip_next = rs == '-';
            trim_next = t->opt.trim_blocks && rs != '+';
        }
    }
    struct jtok e = {.t = JT_EOF, .off = n};
    if (!push(t, o, e)) return tuna_fail_oom("template tokens", 0);
    return TUNA_OK;
}
