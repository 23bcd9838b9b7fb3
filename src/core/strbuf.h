/* strbuf.h — a growable byte string for building text (JSON headers, reports). Appends never
 * fail: an allocation failure sets `oom` and later appends do nothing, so a builder checks once
 * at the end. */
#ifndef TUNA_CORE_STRBUF_H
#define TUNA_CORE_STRBUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tuna_strbuf {
    char *p; /* NUL-terminated when len > 0; owned (free) */
    size_t len, cap;
    bool oom;
};

void tuna_sb_put(struct tuna_strbuf *b, const char *s, size_t n);
void tuna_sb_puts(struct tuna_strbuf *b, const char *s);
void tuna_sb_u64(struct tuna_strbuf *b, unsigned long long v);
/* A JSON string literal: quotes, \" \\ \n \r \t \b \f, other control bytes as \u00XX, UTF-8 kept
 * as is (as Python's json.dumps(ensure_ascii=False) and serde_json write it). */
void tuna_sb_json_string(struct tuna_strbuf *b, const char *s);

#endif
