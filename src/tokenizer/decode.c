/* decode.c — ids back to text: the HF decoders (ByteLevel, Metaspace, ByteFallback, Fuse, Strip,
 * Replace, WordPiece, Sequence), transformers' clean_up_tokenization, and streaming decode
 * (HF DecodeStream: re-decode a short window and emit only text that is complete). */
#include <stdlib.h>
#include <string.h>

#include "core/json.h"
#include "core/status.h"
#include "tokenizer/tok_internal.h"

tuna_status tk_dec_parse(const cJSON *j, struct tk_dec *d)
{
    memset(d, 0, sizeof *d);
    const cJSON *ty = tuna_json_member(j, "type");
    if (!cJSON_IsString(ty)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: decoder without a \"type\"");
    const char *t = ty->valuestring;
    if (!strcmp(t, "ByteLevel")) d->type = TK_DEC_BYTELEVEL;
    else if (!strcmp(t, "ByteFallback")) d->type = TK_DEC_BYTEFALLBACK;
    else if (!strcmp(t, "Fuse")) d->type = TK_DEC_FUSE;
    else if (!strcmp(t, "Metaspace")) {
        d->type = TK_DEC_METASPACE;
        const cJSON *r = tuna_json_member(j, "replacement");
        const char *rs = cJSON_IsString(r) ? r->valuestring : "\xE2\x96\x81";
        size_t rl = strlen(rs);
        if (!rl || tk_utf8_next(rs, rl, &d->repl_cp) != rl || d->repl_cp < 0)
            return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Metaspace decoder replacement \"%s\" is not one character", rs);
        const cJSON *ps = tuna_json_member(j, "prepend_scheme");
        if (cJSON_IsString(ps)) d->prepend = strcmp(ps->valuestring, "never") != 0;
        else d->prepend = !cJSON_IsFalse(tuna_json_member(j, "add_prefix_space"));
    } else if (!strcmp(t, "Strip")) {
        d->type = TK_DEC_STRIP;
        const cJSON *c = tuna_json_member(j, "content");
        const cJSON *a = tuna_json_member(j, "start"), *b = tuna_json_member(j, "stop");
        if (!cJSON_IsString(c) || !cJSON_IsNumber(a) || !cJSON_IsNumber(b) || a->valuedouble < 0 || b->valuedouble < 0)
            return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Strip decoder needs \"content\", \"start\", \"stop\"");
        size_t cl = strlen(c->valuestring);
        if (!cl || tk_utf8_next(c->valuestring, cl, &d->strip_cp) != cl)
            return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Strip decoder content \"%s\" is not one character", c->valuestring);
        d->start = (size_t)a->valuedouble;
        d->stop = (size_t)b->valuedouble;
    } else if (!strcmp(t, "Replace")) {
        d->type = TK_DEC_REPLACE;
        const cJSON *c = tuna_json_member(j, "content");
        if (!cJSON_IsString(c)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Replace decoder without \"content\"");
        d->content = strdup(c->valuestring);
        if (!d->content) return tuna_fail_oom("decoder", 0);
        return tk_pattern_parse(tuna_json_member(j, "pattern"), &d->pat, "Replace decoder");
    } else if (!strcmp(t, "WordPiece")) {
        d->type = TK_DEC_WORDPIECE;
        const cJSON *p = tuna_json_member(j, "prefix");
        d->content = strdup(cJSON_IsString(p) ? p->valuestring : "##");
        if (!d->content) return tuna_fail_oom("decoder", 0);
        d->cleanup = !cJSON_IsFalse(tuna_json_member(j, "cleanup"));
    } else if (!strcmp(t, "BPEDecoder")) {
        d->type = TK_DEC_BPE_SUFFIX;
        const cJSON *sf = tuna_json_member(j, "suffix");
        d->content = strdup(cJSON_IsString(sf) ? sf->valuestring : "</w>");
        if (!d->content) return tuna_fail_oom("decoder", 0);
    } else if (!strcmp(t, "Sequence")) {
        d->type = TK_DEC_SEQUENCE;
        const cJSON *arr = tuna_json_member(j, "decoders");
        if (!cJSON_IsArray(arr)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Sequence decoder without \"decoders\"");
        int k = cJSON_GetArraySize(arr);
        d->kids = calloc(k ? (size_t)k : 1, sizeof *d->kids);
        if (!d->kids) return tuna_fail_oom("decoder", 0);
        const cJSON *e;
        cJSON_ArrayForEach(e, arr)
        {
            tuna_status st = tk_dec_parse(e, &d->kids[d->nkids]);
            d->nkids++;
            if (st) return st;
        }
    } else {
        return tuna_fail(TUNA_E_UNSUPPORTED,
                         "tokenizer.json: decoder type \"%s\" is not supported (tuna handles ByteLevel, Metaspace, "
                         "ByteFallback, Fuse, Strip, Replace, WordPiece, BPEDecoder, Sequence)",
                         t);
    }
    return TUNA_OK;
}

void tk_dec_free(struct tk_dec *d)
{
    if (!d) return;
    for (size_t i = 0; i < d->nkids; i++) tk_dec_free(&d->kids[i]);
    free(d->kids);
    free(d->content);
    tk_pattern_free(&d->pat);
}

/* transformers' clean_up_tokenization (and the WordPiece decoder's cleanup, which also turns
 * " do not" into " don't"). */
static bool cleanup(const char *s, size_t n, bool do_not, tk_buf *out)
{
    static const char *from[] = {" .", " ?", " !", " ,", " ' ", " n't", " 'm", " do not", " 's", " 've", " 're"};
    static const char *to[] = {".", "?", "!", ",", "'", "n't", "'m", " don't", "'s", "'ve", "'re"};
    tk_buf a = {0}, b = {0};
    if (!tk_buf_put(&a, s, n)) return false;
    for (size_t r = 0; r < sizeof from / sizeof from[0]; r++) {
        if (r == 7 && !do_not) continue;
        size_t fl = strlen(from[r]), tl = strlen(to[r]);
        b.n = 0;
        size_t i = 0;
        bool ok = true;
        while (i < a.n && ok) {
            if (a.n - i >= fl && memcmp(a.p + i, from[r], fl) == 0) {
                ok = tk_buf_put(&b, to[r], tl);
                i += fl;
            } else {
                ok = tk_buf_putc(&b, a.p[i++]);
            }
        }
        if (!ok || !tk_buf_put(&b, "", 0)) {
            tk_buf_free(&a);
            tk_buf_free(&b);
            return false;
        }
        tk_buf t = a;
        a = b;
        b = t;
    }
    bool ok = tk_buf_put(out, a.p, a.n);
    tk_buf_free(&a);
    tk_buf_free(&b);
    return ok;
}

#define P_STR(l, i) ((l)->text.p + (l)->v[i].off)

static bool is_byte_token(const char *s, size_t n, unsigned char *b)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return false;
    unsigned v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        unsigned d;
        if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
        else if (c >= 'A' && c <= 'F') d = (unsigned)(c - 'A' + 10);
        else if (c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
        else return false;
        v = v * 16 + d;
    }
    *b = (unsigned char)v;
    return true;
}

/* Applies one decoder to the token list *l, replacing it. */
tuna_status tk_dec_apply(const struct tk_dec *d, tk_pieces *l)
{
    if (d->type == TK_DEC_SEQUENCE) {
        for (size_t i = 0; i < d->nkids; i++) {
            tuna_status st = tk_dec_apply(&d->kids[i], l);
            if (st) return st;
        }
        return TUNA_OK;
    }
    tk_pieces out = {0};
    tk_buf b = {0}, bytes = {0};
    bool ok = true;
    tuna_status st = TUNA_OK;
    switch (d->type) {
    case TK_DEC_BYTELEVEL:
        for (size_t i = 0; i < l->n && ok; i++) {
            const char *s = P_STR(l, i);
            size_t n = l->v[i].len, start = bytes.n;
            bool all = true;
            for (size_t k = 0; k < n && ok;) {
                int32_t cp;
                k += tk_utf8_next(s + k, n - k, &cp);
                int v = tk_cp_to_byte(cp);
                if (v < 0) {
                    all = false;
                    break;
                }
                ok = tk_buf_putc(&bytes, (char)v);
            }
            if (!all) {
                bytes.n = start;
                ok = tk_buf_put(&bytes, s, n);
            }
        }
        ok = ok && tk_utf8_lossy(&b, (const unsigned char *)bytes.p, bytes.n) && tk_pieces_add(&out, b.p, b.n, false);
        break;
    case TK_DEC_METASPACE:
        for (size_t i = 0; i < l->n && ok; i++) {
            const char *s = P_STR(l, i);
            size_t n = l->v[i].len;
            b.n = 0;
            ok = tk_buf_put(&b, "", 0);
            for (size_t k = 0; k < n && ok;) {
                int32_t cp;
                size_t w = tk_utf8_next(s + k, n - k, &cp);
                if (cp == d->repl_cp) {
                    if (!(i == 0 && d->prepend)) ok = tk_buf_putc(&b, ' ');
                } else {
                    ok = tk_buf_put(&b, s + k, w);
                }
                k += w;
            }
            ok = ok && tk_pieces_add(&out, b.p, b.n, false);
        }
        break;
    case TK_DEC_BYTEFALLBACK:
        for (size_t i = 0; i <= l->n && ok; i++) {
            unsigned char v;
            if (i < l->n && is_byte_token(P_STR(l, i), l->v[i].len, &v)) {
                ok = tk_buf_putc(&bytes, (char)v);
                continue;
            }
            if (bytes.n) {
                if (tk_utf8_valid(bytes.p, bytes.n, NULL)) ok = tk_pieces_add(&out, bytes.p, bytes.n, false);
                else
                    for (size_t k = 0; k < bytes.n && ok; k++) ok = tk_pieces_add(&out, "\xEF\xBF\xBD", 3, false);
                bytes.n = 0;
            }
            if (i < l->n && ok) ok = tk_pieces_add(&out, P_STR(l, i), l->v[i].len, false);
        }
        break;
    case TK_DEC_FUSE:
        ok = tk_pieces_add(&out, l->text.p ? l->text.p : "", l->text.n, false); /* pieces are contiguous */
        break;
    case TK_DEC_STRIP:
        for (size_t i = 0; i < l->n && ok; i++) {
            const char *s = P_STR(l, i);
            size_t n = l->v[i].len, a = 0, e = n;
            for (size_t k = 0; k < d->start && a < n; k++) {
                int32_t cp;
                size_t w = tk_utf8_next(s + a, n - a, &cp);
                if (cp != d->strip_cp) break;
                a += w;
            }
            for (size_t k = 0; k < d->stop && e > a; k++) {
                size_t p = e - 1;
                while (p > a && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
                int32_t cp;
                tk_utf8_next(s + p, e - p, &cp);
                if (cp != d->strip_cp) break;
                e = p;
            }
            ok = tk_pieces_add(&out, s + a, e - a, false);
        }
        break;
    case TK_DEC_REPLACE: {
        tk_segs segs = {0};
        size_t cl = strlen(d->content);
        for (size_t i = 0; i < l->n && ok && !st; i++) {
            const char *s = P_STR(l, i);
            st = tk_find_matches(&d->pat, s, l->v[i].len, &segs);
            b.n = 0;
            ok = tk_buf_put(&b, "", 0);
            for (size_t k = 0; !st && k < segs.n && ok; k++)
                ok = segs.v[k].match ? tk_buf_put(&b, d->content, cl)
                                     : tk_buf_put(&b, s + segs.v[k].start, segs.v[k].end - segs.v[k].start);
            ok = ok && tk_pieces_add(&out, b.p, b.n, false);
        }
        tk_segs_free(&segs);
        break;
    }
    case TK_DEC_WORDPIECE: {
        size_t pl = strlen(d->content);
        for (size_t i = 0; i < l->n && ok; i++) {
            const char *s = P_STR(l, i);
            size_t n = l->v[i].len;
            b.n = 0;
            ok = tk_buf_put(&b, "", 0);
            if (i != 0) {
                if (n >= pl && memcmp(s, d->content, pl) == 0) s += pl, n -= pl;
                else ok = tk_buf_putc(&b, ' ');
            }
            ok = ok && tk_buf_put(&b, s, n);
            if (ok && d->cleanup) {
                bytes.n = 0;
                ok = cleanup(b.p, b.n, true, &bytes) && tk_pieces_add(&out, bytes.p ? bytes.p : "", bytes.n, false);
            } else {
                ok = ok && tk_pieces_add(&out, b.p, b.n, false);
            }
        }
        break;
    }
    case TK_DEC_BPE_SUFFIX: { /* the suffix becomes a space, or nothing in the last token */
        size_t sl = strlen(d->content);
        for (size_t i = 0; i < l->n && ok; i++) {
            const char *s = P_STR(l, i);
            size_t n = l->v[i].len;
            b.n = 0;
            ok = tk_buf_put(&b, "", 0);
            for (size_t k = 0; k < n && ok;) {
                if (sl && n - k >= sl && !memcmp(s + k, d->content, sl)) {
                    if (i + 1 < l->n) ok = tk_buf_putc(&b, ' ');
                    k += sl;
                } else {
                    ok = tk_buf_putc(&b, s[k++]);
                }
            }
            ok = ok && tk_pieces_add(&out, b.p, b.n, false);
        }
        break;
    }
    case TK_DEC_SEQUENCE: break;
    }
    tk_buf_free(&b);
    tk_buf_free(&bytes);
    if (!ok && !st) st = tuna_fail_oom("decoder", l->text.n);
    if (st) {
        tk_pieces_free(&out);
        return st;
    }
    tk_pieces_free(l);
    *l = out;
    return TUNA_OK;
}

tuna_status tuna_tokenizer_decode(const tuna_tokenizer *t, const int32_t *ids, size_t n, bool skip_special, char **out)
{
    *out = NULL;
    tk_pieces l = {0};
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const char *s = tk_id_to_str(t, ids[i], &len);
        if (!s) {
            tk_pieces_free(&l);
            return tuna_fail(TUNA_E_RANGE, "decode: id %d at position %zu is not in the vocabulary (size %lld)", ids[i], i,
                             (long long)t->nvocab_total);
        }
        if (skip_special && tuna_tokenizer_is_special(t, ids[i])) continue;
        if (!tk_pieces_add(&l, s, len, false)) {
            tk_pieces_free(&l);
            return tuna_fail_oom("decode", n);
        }
    }
    tuna_status st = TUNA_OK;
    tk_buf res = {0};
    if (t->dec) st = tk_dec_apply(t->dec, &l);
    bool ok = true;
    for (size_t i = 0; !st && i < l.n && ok; i++) {
        if (!t->dec && i > 0) ok = tk_buf_putc(&res, ' ');
        ok = ok && tk_buf_put(&res, l.text.p + l.v[i].off, l.v[i].len);
    }
    ok = ok && tk_buf_put(&res, "", 0);
    tk_pieces_free(&l);
    if (!st && !ok) st = tuna_fail_oom("decode", n);
    if (!st && t->clean_up_spaces) {
        tk_buf c = {0};
        if (!cleanup(res.p, res.n, false, &c) || !tk_buf_put(&c, "", 0)) st = tuna_fail_oom("decode", n);
        tk_buf_free(&res);
        res = c;
    }
    if (st) {
        tk_buf_free(&res);
        return st;
    }
    *out = res.p;
    return TUNA_OK;
}

/* ---------------- streaming ---------------- */

struct tuna_detok_stream {
    const tuna_tokenizer *t;
    bool skip_special;
    int32_t *ids;
    size_t n, cap;
    char *prefix;        /* decode of ids[0..prefix_index) ... as HF keeps it */
    size_t prefix_index;
};

tuna_status tuna_detok_stream_new(const tuna_tokenizer *t, bool skip_special, tuna_detok_stream **out)
{
    *out = calloc(1, sizeof **out);
    if (!*out) return tuna_fail_oom("decode stream", 0);
    (*out)->t = t;
    (*out)->skip_special = skip_special;
    (*out)->prefix = strdup("");
    if (!(*out)->prefix) {
        free(*out);
        *out = NULL;
        return tuna_fail_oom("decode stream", 0);
    }
    return TUNA_OK;
}

void tuna_detok_stream_free(tuna_detok_stream *s)
{
    if (!s) return;
    free(s->ids);
    free(s->prefix);
    free(s);
}

static bool ends_with_fffd(const char *s)
{
    size_t n = strlen(s);
    return n >= 3 && memcmp(s + n - 3, "\xEF\xBF\xBD", 3) == 0;
}

tuna_status tuna_detok_stream_push(tuna_detok_stream *s, int32_t id, char **piece)
{
    *piece = NULL;
    tuna_status st;
    if (s->prefix[0] == '\0' && s->n > 0) {
        char *np;
        if ((st = tuna_tokenizer_decode(s->t, s->ids, s->n, s->skip_special, &np))) return st;
        if (!ends_with_fffd(np)) {
            free(s->prefix);
            s->prefix = np;
            s->prefix_index = s->n;
        } else {
            free(np);
        }
    }
    if (s->n == s->cap) {
        size_t c = s->cap ? s->cap * 2 : 16;
        int32_t *v = realloc(s->ids, c * sizeof *v);
        if (!v) return tuna_fail_oom("decode stream", c);
        s->ids = v;
        s->cap = c;
    }
    s->ids[s->n++] = id;
    char *str;
    if ((st = tuna_tokenizer_decode(s->t, s->ids, s->n, s->skip_special, &str))) {
        s->n--;
        return st;
    }
    size_t pl = strlen(s->prefix), sl = strlen(str);
    if (sl > pl && !ends_with_fffd(str)) {
        if (memcmp(str, s->prefix, pl) != 0) {
            /* The new token changed text already emitted (e.g. clean_up_tokenization_spaces
             * turning "a ," into "a,"). HF raises InvalidPrefix; tuna emits what follows the
             * common part, so generation goes on and nothing is repeated. */
            size_t k = 0;
            while (k < pl && str[k] == s->prefix[k]) k++;
            while (k > 0 && ((unsigned char)str[k] & 0xC0) == 0x80) k--; /* whole characters */
            pl = k;
        }
        char *text = strdup(str + pl);
        free(str);
        if (!text) return tuna_fail_oom("decode stream", sl);
        size_t new_prefix_index = s->n - s->prefix_index;
        memmove(s->ids, s->ids + s->prefix_index, (s->n - s->prefix_index) * sizeof *s->ids);
        s->n -= s->prefix_index;
        char *np;
        if ((st = tuna_tokenizer_decode(s->t, s->ids, s->n, s->skip_special, &np))) {
            free(text);
            return st;
        }
        free(s->prefix);
        s->prefix = np;
        s->prefix_index = new_prefix_index;
        *piece = text;
        return TUNA_OK;
    }
    free(str);
    *piece = strdup("");
    return *piece ? TUNA_OK : tuna_fail_oom("decode stream", 0);
}
