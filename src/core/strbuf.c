/* strbuf.c — see strbuf.h. */
#include "strbuf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tuna_sb_put(struct tuna_strbuf *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 1024;
        while (nc < b->len + n + 1) nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void tuna_sb_puts(struct tuna_strbuf *b, const char *s) { tuna_sb_put(b, s, strlen(s)); }

void tuna_sb_u64(struct tuna_strbuf *b, unsigned long long v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%llu", v);
    tuna_sb_put(b, tmp, (size_t)n);
}

void tuna_sb_json_string(struct tuna_strbuf *b, const char *s)
{
    tuna_sb_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        const char *named = NULL;
        switch (*p) {
        case '"': named = "\\\""; break;
        case '\\': named = "\\\\"; break;
        case '\n': named = "\\n"; break;
        case '\r': named = "\\r"; break;
        case '\t': named = "\\t"; break;
        case '\b': named = "\\b"; break;
        case '\f': named = "\\f"; break;
        default: break;
        }
        if (named) {
            tuna_sb_put(b, named, 2);
        } else if (*p < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", *p);
            tuna_sb_put(b, esc, 6);
        } else {
            tuna_sb_put(b, (const char *)p, 1);
        }
    }
    tuna_sb_put(b, "\"", 1);
}
