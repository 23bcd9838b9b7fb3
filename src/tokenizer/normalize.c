/* normalize.c — HF tokenizers normalizers: NFC NFD NFKC NFKD (utf8proc), Lowercase, Strip,
 * Prepend, Replace, StripAccents, BertNormalizer and Sequence. A normalizer maps one string to
 * another; offsets are not tracked (tuna needs ids, not alignments). */
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "core/json.h"
#include "core/status.h"
#include "tokenizer/tok_internal.h"

static char *dup_str(const char *s) { return s ? strdup(s) : NULL; }

/* ---- Precompiled: SentencePiece's normalization charsmap ----
 * precompiled_charsmap is base64 of: u32 (little endian) trie size in bytes, the darts-clone
 * double array (u32 units), then NUL-separated replacement strings; a trie value is the offset
 * of the replacement. */

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
}

static unsigned char *b64_decode(const char *s, size_t *out_len)
{
    size_t n = strlen(s);
    unsigned char *out = malloc(n / 4 * 3 + 3);
    if (!out) return NULL;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '=') break;
        int v = b64_value((unsigned char)s[i]);
        if (v < 0) {
            free(out);
            return NULL;
        }
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    *out_len = o;
    return out;
}

static tuna_status parse_precompiled(const cJSON *j, struct tk_norm *n)
{
    const cJSON *m = tuna_json_member(j, "precompiled_charsmap");
    if (!m) return TUNA_OK; /* null charsmap: identity */
    if (!cJSON_IsString(m)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Precompiled normalizer's precompiled_charsmap is not a string");
    size_t len;
    unsigned char *b = b64_decode(m->valuestring, &len);
    if (!b) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Precompiled normalizer's precompiled_charsmap is not base64");
    uint32_t tsize = len >= 4 ? (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24 : 0;
    if (len < 4 || tsize % 4 || tsize > len - 4 || tsize < 4) {
        free(b);
        return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: precompiled_charsmap is malformed (trie of %u bytes in %zu bytes)", tsize, len);
    }
    n->nunits = tsize / 4;
    n->units = malloc(tsize);
    n->repl_len = len - 4 - tsize;
    n->repl_blob = malloc(n->repl_len + 1);
    if (!n->units || !n->repl_blob) {
        free(b);
        return tuna_fail_oom("charsmap", len);
    }
    for (size_t i = 0; i < n->nunits; i++) {
        const unsigned char *p = b + 4 + 4 * i;
        n->units[i] = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    }
    memcpy(n->repl_blob, b + 4 + tsize, n->repl_len);
    n->repl_blob[n->repl_len] = '\0';
    free(b);
    return TUNA_OK;
}

/* darts-clone common prefix search: the value of the shortest key that is a prefix of s (what
 * SentencePiece's precompiled normalizer takes, results[0]), or -1. */
static int64_t darts_first_prefix(const struct tk_norm *n, const unsigned char *s, size_t len)
{
    const uint32_t *u = n->units;
    size_t pos = 0;
#define D_OFFSET(x) (((x) >> 10) << (((x) & (1u << 9)) >> 6))
#define D_HAS_LEAF(x) (((x) >> 8) & 1u)
#define D_LABEL(x) ((x) & ((1u << 31) | 0xFFu))
#define D_VALUE(x) ((x) & ((1u << 31) - 1))
    pos ^= D_OFFSET(u[0]);
    for (size_t i = 0; i < len; i++) {
        pos ^= s[i];
        if (pos >= n->nunits) return -1;
        uint32_t unit = u[pos];
        if (D_LABEL(unit) != s[i]) return -1;
        pos ^= D_OFFSET(unit);
        if (pos >= n->nunits) return -1;
        if (D_HAS_LEAF(unit)) return (int64_t)D_VALUE(u[pos]);
    }
    return -1;
#undef D_OFFSET
#undef D_HAS_LEAF
#undef D_LABEL
#undef D_VALUE
}

/* The replacement for chunk, or NULL. */
static const char *precompiled_lookup(const struct tk_norm *n, const char *s, size_t len, size_t *rlen)
{
    if (!n->units) return NULL;
    int64_t v = darts_first_prefix(n, (const unsigned char *)s, len);
    if (v < 0 || (size_t)v >= n->repl_len) return NULL;
    const char *r = n->repl_blob + v;
    *rlen = strlen(r);
    return r;
}

/* HF's Precompiled::normalize: per extended grapheme cluster, the cluster's replacement when
 * it is under 6 bytes and has one, else each character's replacement or the character. */
static tuna_status apply_precompiled(const struct tk_norm *n, const char *s, size_t len, tk_buf *out)
{
    size_t i = 0;
    while (i < len) {
        /* one grapheme cluster: s[i..g) */
        int32_t c0;
        size_t g = i + tk_utf8_next(s + i, len - i, &c0);
        utf8proc_int32_t state = 0;
        int32_t prev = c0;
        while (g < len) {
            int32_t c;
            size_t k = tk_utf8_next(s + g, len - g, &c);
            if (utf8proc_grapheme_break_stateful(prev, c, &state)) break;
            prev = c;
            g += k;
        }
        size_t rl;
        const char *r = g - i < 6 ? precompiled_lookup(n, s + i, g - i, &rl) : NULL;
        if (r) {
            if (!tk_buf_put(out, r, rl)) return tuna_fail_oom("normalizer", len);
        } else {
            for (size_t k = i; k < g;) {
                int32_t c;
                size_t w = tk_utf8_next(s + k, g - k, &c);
                const char *cr = precompiled_lookup(n, s + k, w, &rl);
                if (!(cr ? tk_buf_put(out, cr, rl) : tk_buf_put(out, s + k, w))) return tuna_fail_oom("normalizer", len);
                k += w;
            }
        }
        i = g;
    }
    return tk_buf_put(out, "", 0) ? TUNA_OK : tuna_fail_oom("normalizer", 0);
}

tuna_status tk_norm_parse(const cJSON *j, struct tk_norm *n)
{
    memset(n, 0, sizeof *n);
    const cJSON *ty = tuna_json_member(j, "type");
    if (!cJSON_IsString(ty)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: normalizer without a \"type\"");
    const char *t = ty->valuestring;
    if (!strcmp(t, "NFC")) n->type = TK_NORM_NFC;
    else if (!strcmp(t, "NFD")) n->type = TK_NORM_NFD;
    else if (!strcmp(t, "NFKC")) n->type = TK_NORM_NFKC;
    else if (!strcmp(t, "NFKD")) n->type = TK_NORM_NFKD;
    else if (!strcmp(t, "Lowercase")) n->type = TK_NORM_LOWERCASE;
    else if (!strcmp(t, "StripAccents")) n->type = TK_NORM_STRIP_ACCENTS;
    else if (!strcmp(t, "Strip")) {
        n->type = TK_NORM_STRIP;
        /* HF writes strip_left / strip_right ("left" / "right" accepted too) */
        n->left = cJSON_IsTrue(tuna_json_member(j, "strip_left")) || cJSON_IsTrue(tuna_json_member(j, "left"));
        n->right = cJSON_IsTrue(tuna_json_member(j, "strip_right")) || cJSON_IsTrue(tuna_json_member(j, "right"));
    } else if (!strcmp(t, "Prepend")) {
        n->type = TK_NORM_PREPEND;
        const cJSON *p = tuna_json_member(j, "prepend");
        if (!cJSON_IsString(p)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Prepend normalizer without a \"prepend\" string");
        n->content = dup_str(p->valuestring);
        if (!n->content) return tuna_fail_oom("normalizer", 0);
    } else if (!strcmp(t, "Replace")) {
        n->type = TK_NORM_REPLACE;
        const cJSON *c = tuna_json_member(j, "content");
        if (!cJSON_IsString(c)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Replace normalizer without a \"content\" string");
        n->content = dup_str(c->valuestring);
        if (!n->content) return tuna_fail_oom("normalizer", 0);
        return tk_pattern_parse(tuna_json_member(j, "pattern"), &n->pat, "Replace normalizer");
    } else if (!strcmp(t, "BertNormalizer")) {
        n->type = TK_NORM_BERT;
        const cJSON *v;
        n->clean_text = !cJSON_IsFalse(tuna_json_member(j, "clean_text"));
        n->chinese = !cJSON_IsFalse(tuna_json_member(j, "handle_chinese_chars"));
        n->lowercase = !cJSON_IsFalse(tuna_json_member(j, "lowercase"));
        v = tuna_json_member(j, "strip_accents");
        n->strip_accents = v ? cJSON_IsTrue(v) : n->lowercase;
    } else if (!strcmp(t, "ByteLevel")) {
        n->type = TK_NORM_BYTELEVEL;
    } else if (!strcmp(t, "Precompiled")) {
        n->type = TK_NORM_PRECOMPILED;
        return parse_precompiled(j, n);
    } else if (!strcmp(t, "Sequence")) {
        n->type = TK_NORM_SEQUENCE;
        const cJSON *arr = tuna_json_member(j, "normalizers");
        if (!cJSON_IsArray(arr)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Sequence normalizer without a \"normalizers\" array");
        int k = cJSON_GetArraySize(arr);
        n->kids = calloc(k ? (size_t)k : 1, sizeof *n->kids);
        if (!n->kids) return tuna_fail_oom("normalizer", 0);
        const cJSON *e;
        cJSON_ArrayForEach(e, arr)
        {
            tuna_status st = tk_norm_parse(e, &n->kids[n->nkids]);
            n->nkids++;
            if (st) return st;
        }
    } else {
        return tuna_fail(TUNA_E_UNSUPPORTED,
                         "tokenizer.json: normalizer type \"%s\" is not supported (tuna handles NFC, NFD, "
                         "NFKC, NFKD, Lowercase, Strip, StripAccents, Prepend, Replace, BertNormalizer, Precompiled, ByteLevel, Sequence)",
                         t);
    }
    return TUNA_OK;
}

void tk_norm_free(struct tk_norm *n)
{
    if (!n) return;
    for (size_t i = 0; i < n->nkids; i++) tk_norm_free(&n->kids[i]);
    free(n->kids);
    free(n->content);
    free(n->units);
    free(n->repl_blob);
    tk_pattern_free(&n->pat);
}

static tuna_status unicode_form(const char *s, size_t len, utf8proc_option_t opt, tk_buf *out)
{
    if (len == 0) return tk_buf_put(out, "", 0) ? TUNA_OK : tuna_fail_oom("normalizer", 0);
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)len, &dst, opt | UTF8PROC_STABLE);
    if (r < 0) return tuna_fail(TUNA_E_INVALID, "unicode normalization failed: %s", utf8proc_errmsg(r));
    bool ok = tk_buf_put(out, dst, (size_t)r);
    free(dst);
    return ok ? TUNA_OK : tuna_fail_oom("normalizer", (size_t)r);
}

static bool is_mark(int32_t c)
{
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_MN || k == UTF8PROC_CATEGORY_MC || k == UTF8PROC_CATEGORY_ME;
}

static bool is_chinese(int32_t c)
{
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
           (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

enum char_pass { PASS_LOWER, PASS_STRIP_MARKS, PASS_STRIP_MN, PASS_BERT_CLEAN };

/* One per-character pass (HF's Lowercase, StripAccents, and the steps of BertNormalizer). */
static tuna_status map_chars(const struct tk_norm *n, enum char_pass pass, const char *s, size_t len, tk_buf *out)
{
    size_t i = 0;
    out->n = 0;
    while (i < len) {
        int32_t c;
        size_t k = tk_utf8_next(s + i, len - i, &c);
        i += k;
        if (c < 0) continue;
        bool ok = true;
        switch (pass) {
        case PASS_LOWER:
            if (c == 0x130) ok = tk_buf_put(out, "i\xCC\x87", 3); /* İ → i + U+0307, as Rust's to_lowercase */
            else ok = tk_buf_put_cp(out, (uint32_t)utf8proc_tolower(c));
            break;
        case PASS_STRIP_MARKS:
            if (!is_mark(c)) ok = tk_buf_put_cp(out, (uint32_t)c);
            break;
        case PASS_STRIP_MN:
            if (utf8proc_category(c) != UTF8PROC_CATEGORY_MN) ok = tk_buf_put_cp(out, (uint32_t)c);
            break;
        case PASS_BERT_CLEAN: {
            utf8proc_category_t cat = utf8proc_category(c);
            bool control = c != '\t' && c != '\n' && c != '\r' &&
                           (cat == UTF8PROC_CATEGORY_CC || cat == UTF8PROC_CATEGORY_CF || cat == UTF8PROC_CATEGORY_CN ||
                            cat == UTF8PROC_CATEGORY_CO);
            if (n->clean_text && (c == 0 || c == 0xFFFD || control)) break;
            if (n->clean_text && tk_is_whitespace(c)) c = ' ';
            if (n->chinese && is_chinese(c)) ok = tk_buf_putc(out, ' ') && tk_buf_put_cp(out, (uint32_t)c) && tk_buf_putc(out, ' ');
            else ok = tk_buf_put_cp(out, (uint32_t)c);
            break;
        }
        }
        if (!ok) return tuna_fail_oom("normalizer", len);
    }
    return tk_buf_put(out, "", 0) ? TUNA_OK : tuna_fail_oom("normalizer", 0);
}

/* HF BertNormalizer: clean text and pad CJK, then (NFD + drop Mn) when stripping accents, then
 * lowercase. */
static tuna_status bert_normalize(const struct tk_norm *n, const char *s, size_t len, tk_buf *out)
{
    tk_buf a = {0}, b = {0};
    tuna_status st = map_chars(n, PASS_BERT_CLEAN, s, len, &a);
    if (!st && n->strip_accents) {
        st = unicode_form(a.p, a.n, UTF8PROC_DECOMPOSE, &b);
        if (!st) st = map_chars(n, PASS_STRIP_MN, b.p, b.n, &a);
    }
    if (!st) st = n->lowercase ? map_chars(n, PASS_LOWER, a.p, a.n, out)
                               : (tk_buf_put(out, a.p ? a.p : "", a.n) ? TUNA_OK : tuna_fail_oom("normalizer", len));
    tk_buf_free(&a);
    tk_buf_free(&b);
    return st;
}

static tuna_status apply_one(const struct tk_norm *n, const char *s, size_t len, tk_buf *out)
{
    out->n = 0;
    switch (n->type) {
    case TK_NORM_NFC: return unicode_form(s, len, UTF8PROC_COMPOSE, out);
    case TK_NORM_NFD: return unicode_form(s, len, UTF8PROC_DECOMPOSE, out);
    case TK_NORM_NFKC: return unicode_form(s, len, UTF8PROC_COMPOSE | UTF8PROC_COMPAT, out);
    case TK_NORM_NFKD: return unicode_form(s, len, UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT, out);
    case TK_NORM_LOWERCASE: return map_chars(n, PASS_LOWER, s, len, out);
    case TK_NORM_STRIP_ACCENTS: return map_chars(n, PASS_STRIP_MARKS, s, len, out);
    case TK_NORM_PRECOMPILED: return apply_precompiled(n, s, len, out);
    case TK_NORM_BYTELEVEL: /* every byte shown as its GPT-2 character */
        for (size_t i = 0; i < len; i++)
            if (!tk_buf_put_cp(out, tk_byte_to_cp((unsigned char)s[i]))) return tuna_fail_oom("normalizer", len);
        return tk_buf_put(out, "", 0) ? TUNA_OK : tuna_fail_oom("normalizer", 0);
    case TK_NORM_BERT: return bert_normalize(n, s, len, out);
    case TK_NORM_STRIP: {
        size_t a = 0, b = len;
        if (n->left)
            while (a < b) {
                int32_t c;
                size_t k = tk_utf8_next(s + a, b - a, &c);
                if (!tk_is_whitespace(c)) break;
                a += k;
            }
        if (n->right)
            while (b > a) {
                size_t p = b - 1;
                while (p > a && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
                int32_t c;
                tk_utf8_next(s + p, b - p, &c);
                if (!tk_is_whitespace(c)) break;
                b = p;
            }
        return tk_buf_put(out, s + a, b - a) ? TUNA_OK : tuna_fail_oom("normalizer", len);
    }
    case TK_NORM_PREPEND:
        if (len && !tk_buf_put(out, n->content, strlen(n->content))) return tuna_fail_oom("normalizer", len);
        return tk_buf_put(out, s, len) ? TUNA_OK : tuna_fail_oom("normalizer", len);
    case TK_NORM_REPLACE: {
        tk_segs segs = {0};
        tuna_status st = tk_find_matches(&n->pat, s, len, &segs);
        size_t clen = strlen(n->content);
        for (size_t i = 0; !st && i < segs.n; i++) {
            const tk_seg *g = &segs.v[i];
            bool ok = g->match ? tk_buf_put(out, n->content, clen) : tk_buf_put(out, s + g->start, g->end - g->start);
            if (!ok) st = tuna_fail_oom("normalizer", len);
        }
        tk_segs_free(&segs);
        if (!st && !tk_buf_put(out, "", 0)) st = tuna_fail_oom("normalizer", 0);
        return st;
    }
    case TK_NORM_SEQUENCE: {
        tk_buf a = {0}, b = {0};
        if (!tk_buf_put(&a, s, len)) return tuna_fail_oom("normalizer", len);
        for (size_t i = 0; i < n->nkids; i++) {
            tuna_status st = apply_one(&n->kids[i], a.p, a.n, &b);
            if (st) {
                tk_buf_free(&a);
                tk_buf_free(&b);
                return st;
            }
            tk_buf t = a;
            a = b;
            b = t;
        }
        bool ok = tk_buf_put(out, a.p, a.n);
        tk_buf_free(&a);
        tk_buf_free(&b);
        return ok ? TUNA_OK : tuna_fail_oom("normalizer", len);
    }
    }
    return tuna_fail(TUNA_E_INTERNAL, "unknown normalizer type %d", (int)n->type);
}

tuna_status tk_norm_apply(const struct tk_norm *n, const char *s, size_t len, tk_buf *out)
{
    return apply_one(n, s, len, out);
}
