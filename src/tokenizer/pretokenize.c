/* pretokenize.c — patterns (literal strings and PCRE2 regexes), HF's split behaviors, and the
 * pre-tokenizers: Split, ByteLevel, Metaspace, Digits, Punctuation, Whitespace, WhitespaceSplit,
 * BertPreTokenizer, Sequence.
 *
 * HF runs regexes through Oniguruma; PCRE2 with PCRE2_UTF|PCRE2_UCP gives the same matches for
 * the patterns real tokenizers use (\p{L}, \p{N}, \s, lookahead, (?i:...)). Match iteration
 * follows the onig crate: an empty match right after the previous match is skipped by one
 * character. */
#include <stdlib.h>
#include <string.h>

#include "core/json.h"
#include "core/status.h"
#include "tokenizer/tok_internal.h"

const char tk_gpt2_regex[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* ---------------- patterns ---------------- */

tuna_status tk_pattern_regex(struct tk_pattern *p, const char *re, const char *where)
{
    int err;
    PCRE2_SIZE off;
    p->kind = TK_PAT_REGEX;
    p->re = pcre2_compile((PCRE2_SPTR)re, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &off, NULL);
    if (!p->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return tuna_fail(TUNA_E_UNSUPPORTED, "%s: regex /%s/ does not compile with PCRE2 at offset %zu: %s", where, re,
                         (size_t)off, (const char *)msg);
    }
    pcre2_jit_compile(p->re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter on failure */
    return TUNA_OK;
}

tuna_status tk_pattern_parse(const cJSON *j, struct tk_pattern *p, const char *where)
{
    memset(p, 0, sizeof *p);
    const cJSON *s = tuna_json_member(j, "String");
    const cJSON *r = tuna_json_member(j, "Regex");
    if (cJSON_IsString(s)) {
        p->kind = TK_PAT_STRING;
        p->lit = strdup(s->valuestring);
        if (!p->lit) return tuna_fail_oom("pattern", 0);
        p->lit_len = strlen(p->lit);
        return TUNA_OK;
    }
    if (cJSON_IsString(r)) return tk_pattern_regex(p, r->valuestring, where);
    return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: %s has no pattern {\"String\": ...} or {\"Regex\": ...}", where);
}

void tk_pattern_free(struct tk_pattern *p)
{
    if (!p) return;
    free(p->lit);
    if (p->re) pcre2_code_free(p->re);
    memset(p, 0, sizeof *p);
}

void tk_segs_free(tk_segs *s)
{
    free(s->v);
    if (s->md) pcre2_match_data_free(s->md);
    memset(s, 0, sizeof *s);
}

static bool segs_add(tk_segs *l, size_t a, size_t b, bool m)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        tk_seg *v = realloc(l->v, cap * sizeof *v);
        if (!v) return false;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = (tk_seg){a, b, m};
    return true;
}

tuna_status tk_find_matches(const struct tk_pattern *p, const char *s, size_t n, tk_segs *out)
{
    out->n = 0;
    if (n == 0) return segs_add(out, 0, 0, false) ? TUNA_OK : tuna_fail_oom("split", 0);
    size_t prev = 0;
    if (p->kind == TK_PAT_STRING) {
        if (p->lit_len == 0) return segs_add(out, 0, n, false) ? TUNA_OK : tuna_fail_oom("split", 0);
        const char *q = s, *end = s + n;
        while ((size_t)(end - q) >= p->lit_len) {
            const char *hit = memmem(q, (size_t)(end - q), p->lit, p->lit_len);
            if (!hit) break;
            size_t a = (size_t)(hit - s);
            if (prev != a && !segs_add(out, prev, a, false)) return tuna_fail_oom("split", n);
            if (!segs_add(out, a, a + p->lit_len, true)) return tuna_fail_oom("split", n);
            prev = a + p->lit_len;
            q = hit + p->lit_len;
        }
    } else if (p->kind == TK_PAT_REGEX) {
        if (!out->md && !(out->md = pcre2_match_data_create(1, NULL))) return tuna_fail_oom("regex match", 0);
        pcre2_match_data *md = out->md;
        size_t pos = 0;
        bool have_last = false;
        size_t last_end = 0;
        while (pos <= n) {
            int rc = pcre2_match(p->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, md, NULL);
            if (rc == PCRE2_ERROR_NOMATCH) break;
            if (rc < 0) {
                PCRE2_UCHAR msg[256];
                pcre2_get_error_message(rc, msg, sizeof msg);
                return tuna_fail(TUNA_E_INVALID, "regex match failed: %s", (const char *)msg);
            }
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            size_t a = ov[0], b = ov[1];
            if (a == b && have_last && last_end == b) {
                if (pos >= n) break;
                int32_t cp;
                pos += tk_utf8_next(s + pos, n - pos, &cp);
                continue;
            }
            pos = b;
            have_last = true;
            last_end = b;
            if (prev != a && !segs_add(out, prev, a, false)) goto oom;
            if (!segs_add(out, a, b, true)) goto oom;
            prev = b;
            continue;
        oom:
            return tuna_fail_oom("split", n);
        }
    }
    if (prev != n && !segs_add(out, prev, n, false)) return tuna_fail_oom("split", n);
    return TUNA_OK;
}

/* Each character for which pred holds is a match of its own (HF's Fn(char) -> bool pattern). */
static tuna_status find_char_matches(bool (*pred)(int32_t, int32_t), int32_t arg, const char *s, size_t n,
                                     tk_segs *out)
{
    out->n = 0;
    if (n == 0) return segs_add(out, 0, 0, false) ? TUNA_OK : tuna_fail_oom("split", 0);
    size_t last = 0, i = 0;
    while (i < n) {
        int32_t c;
        size_t k = tk_utf8_next(s + i, n - i, &c);
        if (pred(c, arg)) {
            if (last < i && !segs_add(out, last, i, false)) return tuna_fail_oom("split", n);
            if (!segs_add(out, i, i + k, true)) return tuna_fail_oom("split", n);
            last = i + k;
        }
        i += k;
    }
    if (n > last && !segs_add(out, last, n, false)) return tuna_fail_oom("split", n);
    return TUNA_OK;
}

bool tk_split_apply(tk_segs *segs, enum tk_split_behavior b, bool invert, const char *s, bool first, tk_pieces *out)
{
    tk_seg *v = segs->v;
    size_t n = segs->n, k = 0;
    if (invert)
        for (size_t i = 0; i < n; i++) v[i].match = !v[i].match;
    /* after this loop v[0..k) hold (offsets, remove) pairs */
    switch (b) {
    case TK_SPLIT_ISOLATED:
        for (size_t i = 0; i < n; i++) v[i].match = false;
        k = n;
        break;
    case TK_SPLIT_REMOVED: k = n; break;
    case TK_SPLIT_CONTIGUOUS: {
        bool prev = false;
        for (size_t i = 0; i < n; i++) {
            bool m = v[i].match;
            if (m == prev && k > 0) v[k - 1].end = v[i].end;
            else v[k++] = (tk_seg){v[i].start, v[i].end, false};
            prev = m;
        }
        break;
    }
    case TK_SPLIT_MERGED_PREV: {
        bool prev = false;
        for (size_t i = 0; i < n; i++) {
            bool m = v[i].match;
            if (m && !prev && k > 0) v[k - 1].end = v[i].end;
            else v[k++] = (tk_seg){v[i].start, v[i].end, false};
            prev = m;
        }
        break;
    }
    case TK_SPLIT_MERGED_NEXT: {
        /* walk backwards, building the list reversed at the end of v */
        bool prev = false;
        size_t w = n; /* v[w..n) is the reversed output */
        for (size_t ii = n; ii-- > 0;) {
            tk_seg g = v[ii];
            if (g.match && !prev && w < n) v[w].start = g.start;
            else v[--w] = (tk_seg){g.start, g.end, false};
            prev = g.match;
        }
        /* output in order is v[w..n) — it is already in forward order since we filled from the end */
        memmove(v, v + w, (n - w) * sizeof *v);
        k = n - w;
        break;
    }
    }
    for (size_t i = 0; i < k; i++) {
        if (v[i].match || v[i].end == v[i].start) continue;
        if (!tk_pieces_add(out, s + v[i].start, v[i].end - v[i].start, first && v[i].start == 0)) return false;
    }
    return true;
}

/* ---------------- pre-tokenizers ---------------- */

static tuna_status parse_behavior(const cJSON *j, enum tk_split_behavior *b, enum tk_split_behavior dflt)
{
    const cJSON *v = tuna_json_member(j, "behavior");
    *b = dflt;
    if (!v) return TUNA_OK;
    if (!cJSON_IsString(v)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: pre-tokenizer \"behavior\" is not a string");
    const char *s = v->valuestring;
    if (!strcmp(s, "Removed")) *b = TK_SPLIT_REMOVED;
    else if (!strcmp(s, "Isolated")) *b = TK_SPLIT_ISOLATED;
    else if (!strcmp(s, "MergedWithPrevious")) *b = TK_SPLIT_MERGED_PREV;
    else if (!strcmp(s, "MergedWithNext")) *b = TK_SPLIT_MERGED_NEXT;
    else if (!strcmp(s, "Contiguous")) *b = TK_SPLIT_CONTIGUOUS;
    else return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: unknown split behavior \"%s\"", s);
    return TUNA_OK;
}

tuna_status tk_pre_parse(const cJSON *j, struct tk_pre *p)
{
    memset(p, 0, sizeof *p);
    const cJSON *ty = tuna_json_member(j, "type");
    if (!cJSON_IsString(ty)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: pre_tokenizer without a \"type\"");
    const char *t = ty->valuestring;
    tuna_status st;
    if (!strcmp(t, "Split")) {
        p->type = TK_PRE_SPLIT;
        p->invert = cJSON_IsTrue(tuna_json_member(j, "invert"));
        if ((st = parse_behavior(j, &p->behavior, TK_SPLIT_REMOVED))) return st;
        return tk_pattern_parse(tuna_json_member(j, "pattern"), &p->pat, "Split pre-tokenizer");
    }
    if (!strcmp(t, "ByteLevel")) {
        p->type = TK_PRE_BYTELEVEL;
        p->add_prefix_space = !cJSON_IsFalse(tuna_json_member(j, "add_prefix_space"));
        p->use_regex = !cJSON_IsFalse(tuna_json_member(j, "use_regex"));
        if (p->use_regex) return tk_pattern_regex(&p->pat, tk_gpt2_regex, "ByteLevel pre-tokenizer");
        return TUNA_OK;
    }
    if (!strcmp(t, "Metaspace")) {
        p->type = TK_PRE_METASPACE;
        const cJSON *r = tuna_json_member(j, "replacement");
        const char *rs = cJSON_IsString(r) ? r->valuestring : "\xE2\x96\x81";
        size_t rl = strlen(rs);
        if (rl == 0 || rl >= sizeof p->repl || tk_utf8_next(rs, rl, &p->repl_cp) != rl || p->repl_cp < 0)
            return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Metaspace replacement \"%s\" is not one character", rs);
        memcpy(p->repl, rs, rl + 1);
        const cJSON *ps = tuna_json_member(j, "prepend_scheme");
        if (cJSON_IsString(ps)) {
            if (!strcmp(ps->valuestring, "always")) p->prepend = TK_PREPEND_ALWAYS;
            else if (!strcmp(ps->valuestring, "first")) p->prepend = TK_PREPEND_FIRST;
            else if (!strcmp(ps->valuestring, "never")) p->prepend = TK_PREPEND_NEVER;
            else return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Metaspace prepend_scheme \"%s\" unknown", ps->valuestring);
        } else {
            p->prepend = cJSON_IsFalse(tuna_json_member(j, "add_prefix_space")) ? TK_PREPEND_NEVER : TK_PREPEND_ALWAYS;
        }
        p->split = !cJSON_IsFalse(tuna_json_member(j, "split"));
        return TUNA_OK;
    }
    if (!strcmp(t, "Digits")) {
        p->type = TK_PRE_DIGITS;
        p->individual_digits = cJSON_IsTrue(tuna_json_member(j, "individual_digits"));
        return TUNA_OK;
    }
    if (!strcmp(t, "Punctuation")) {
        p->type = TK_PRE_PUNCTUATION;
        return parse_behavior(j, &p->behavior, TK_SPLIT_ISOLATED);
    }
    if (!strcmp(t, "Whitespace")) {
        p->type = TK_PRE_WHITESPACE;
        return tk_pattern_regex(&p->pat, "\\w+|[^\\w\\s]+", "Whitespace pre-tokenizer");
    }
    if (!strcmp(t, "WhitespaceSplit")) {
        p->type = TK_PRE_WHITESPACE_SPLIT;
        return TUNA_OK;
    }
    if (!strcmp(t, "CharDelimiterSplit")) {
        p->type = TK_PRE_CHAR_DELIMITER;
        const cJSON *d = tuna_json_member(j, "delimiter");
        size_t dl = cJSON_IsString(d) ? strlen(d->valuestring) : 0;
        if (!dl || tk_utf8_next(d->valuestring, dl, &p->repl_cp) != dl || p->repl_cp < 0)
            return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: CharDelimiterSplit needs a one-character \"delimiter\"");
        return TUNA_OK;
    }
    if (!strcmp(t, "BertPreTokenizer")) {
        p->type = TK_PRE_BERT;
        return TUNA_OK;
    }
    if (!strcmp(t, "Sequence")) {
        p->type = TK_PRE_SEQUENCE;
        const cJSON *arr = tuna_json_member(j, "pretokenizers");
        if (!cJSON_IsArray(arr)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: Sequence pre-tokenizer without \"pretokenizers\"");
        int k = cJSON_GetArraySize(arr);
        p->kids = calloc(k ? (size_t)k : 1, sizeof *p->kids);
        if (!p->kids) return tuna_fail_oom("pre-tokenizer", 0);
        const cJSON *e;
        cJSON_ArrayForEach(e, arr)
        {
            st = tk_pre_parse(e, &p->kids[p->nkids]);
            p->nkids++;
            if (st) return st;
        }
        return TUNA_OK;
    }
    return tuna_fail(TUNA_E_UNSUPPORTED,
                     "tokenizer.json: pre-tokenizer type \"%s\" is not supported (tuna handles Split, ByteLevel, "
                     "Metaspace, Digits, Punctuation, Whitespace, WhitespaceSplit, CharDelimiterSplit, BertPreTokenizer, Sequence)",
                     t);
}

void tk_pre_free(struct tk_pre *p)
{
    if (!p) return;
    for (size_t i = 0; i < p->nkids; i++) tk_pre_free(&p->kids[i]);
    free(p->kids);
    tk_pattern_free(&p->pat);
}

static bool pred_ws(int32_t c, int32_t a) { return (void)a, tk_is_whitespace(c); }
static bool pred_num(int32_t c, int32_t a) { return (void)a, tk_is_numeric(c); }
static bool pred_punct(int32_t c, int32_t a) { return (void)a, tk_is_punctuation(c); }
static bool pred_eq(int32_t c, int32_t a) { return c == a; }

/* Splits one piece by a character predicate. */
static tuna_status split_chars(bool (*pred)(int32_t, int32_t), int32_t arg, enum tk_split_behavior b,
                               const char *s, size_t n, bool first, tk_segs *segs, tk_pieces *out)
{
    tuna_status st = find_char_matches(pred, arg, s, n, segs);
    if (st) return st;
    return tk_split_apply(segs, b, false, s, first, out) ? TUNA_OK : tuna_fail_oom("pre-tokenizer", n);
}

static tuna_status split_pattern(const struct tk_pattern *pat, enum tk_split_behavior b, bool invert, const char *s,
                                 size_t n, bool first, tk_segs *segs, tk_pieces *out)
{
    tuna_status st = tk_find_matches(pat, s, n, segs);
    if (st) return st;
    return tk_split_apply(segs, b, invert, s, first, out) ? TUNA_OK : tuna_fail_oom("pre-tokenizer", n);
}

/* Appends the GPT-2 characters of bytes q[0..len) to out as one piece (no intermediate copy). */
static bool add_bytelevel(tk_pieces *out, const unsigned char *q, size_t len, bool first)
{
    /* every byte maps to a code point below 0x800: at most two UTF-8 bytes */
    if (!tk_buf_grow(&out->text, 2 * len)) return false;
    size_t off = out->text.n;
    unsigned char *w = (unsigned char *)out->text.p + off;
    for (size_t k = 0; k < len; k++) {
        uint32_t cp = tk_byte_to_cp(q[k]);
        if (cp < 0x80) *w++ = (unsigned char)cp;
        else {
            *w++ = (unsigned char)(0xC0 | (cp >> 6));
            *w++ = (unsigned char)(0x80 | (cp & 0x3F));
        }
    }
    size_t n = (size_t)(w - ((unsigned char *)out->text.p + off));
    out->text.p[off + n] = '\0';
    return tk_pieces_add_inplace(out, n, first);
}

static tuna_status bytelevel_piece(const struct tk_pre *p, const char *s, size_t n, bool first, tk_segs *segs,
                                   tk_buf *tmp, tk_pieces *out)
{
    if (p->add_prefix_space && (n == 0 || s[0] != ' ')) {
        tmp->n = 0;
        if (!tk_buf_putc(tmp, ' ') || !tk_buf_put(tmp, s, n)) return tuna_fail_oom("pre-tokenizer", n);
        s = tmp->p;
        n = tmp->n;
    }
    if (!p->use_regex)
        return n == 0 || add_bytelevel(out, (const unsigned char *)s, n, first) ? TUNA_OK : tuna_fail_oom("pre-tokenizer", n);
    tuna_status st = tk_find_matches(&p->pat, s, n, segs);
    if (st) return st;
    /* Isolated: every segment, match or not, is a piece; empty ones are dropped */
    for (size_t i = 0; i < segs->n; i++) {
        const tk_seg *g = &segs->v[i];
        if (g->end == g->start) continue;
        if (!add_bytelevel(out, (const unsigned char *)s + g->start, g->end - g->start, first && g->start == 0))
            return tuna_fail_oom("pre-tokenizer", n);
    }
    return TUNA_OK;
}

static tuna_status metaspace_piece(const struct tk_pre *p, const char *s, size_t n, bool first, tk_segs *segs,
                                   tk_buf *tmp, tk_pieces *out)
{
    tmp->n = 0;
    size_t rl = strlen(p->repl);
    bool starts = n >= rl && memcmp(s, p->repl, rl) == 0;
    bool starts_space = n > 0 && s[0] == ' '; /* becomes the replacement below */
    if (!starts && !starts_space &&
        (p->prepend == TK_PREPEND_ALWAYS || (p->prepend == TK_PREPEND_FIRST && first)))
        if (!tk_buf_put(tmp, p->repl, rl)) return tuna_fail_oom("pre-tokenizer", n);
    for (size_t i = 0; i < n; i++) {
        bool ok = s[i] == ' ' ? tk_buf_put(tmp, p->repl, rl) : tk_buf_putc(tmp, s[i]);
        if (!ok) return tuna_fail_oom("pre-tokenizer", n);
    }
    if (!tmp->p && !tk_buf_put(tmp, "", 0)) return tuna_fail_oom("pre-tokenizer", n);
    if (!p->split) return tk_pieces_add(out, tmp->p, tmp->n, first) ? TUNA_OK : tuna_fail_oom("pre-tokenizer", n);
    return split_chars(pred_eq, p->repl_cp, TK_SPLIT_MERGED_NEXT, tmp->p, tmp->n, first, segs, out);
}

static tuna_status apply_piece(const struct tk_pre *p, const char *s, size_t n, bool first, tk_segs *segs,
                               tk_buf *tmp, tk_pieces *out)
{
    switch (p->type) {
    case TK_PRE_SPLIT: return split_pattern(&p->pat, p->behavior, p->invert, s, n, first, segs, out);
    case TK_PRE_BYTELEVEL: return bytelevel_piece(p, s, n, first, segs, tmp, out);
    case TK_PRE_METASPACE: return metaspace_piece(p, s, n, first, segs, tmp, out);
    case TK_PRE_DIGITS:
        return split_chars(pred_num, 0, p->individual_digits ? TK_SPLIT_ISOLATED : TK_SPLIT_CONTIGUOUS, s, n, first,
                           segs, out);
    case TK_PRE_PUNCTUATION: return split_chars(pred_punct, 0, p->behavior, s, n, first, segs, out);
    case TK_PRE_WHITESPACE: return split_pattern(&p->pat, TK_SPLIT_REMOVED, true, s, n, first, segs, out);
    case TK_PRE_WHITESPACE_SPLIT: return split_chars(pred_ws, 0, TK_SPLIT_REMOVED, s, n, first, segs, out);
    case TK_PRE_CHAR_DELIMITER: return split_chars(pred_eq, p->repl_cp, TK_SPLIT_REMOVED, s, n, first, segs, out);
    case TK_PRE_BERT: {
        tk_pieces mid = {0};
        tuna_status st = split_chars(pred_ws, 0, TK_SPLIT_REMOVED, s, n, first, segs, &mid);
        for (size_t i = 0; !st && i < mid.n; i++)
            st = split_chars(pred_punct, 0, TK_SPLIT_ISOLATED, mid.text.p + mid.v[i].off, mid.v[i].len,
                             mid.v[i].first, segs, out);
        tk_pieces_free(&mid);
        return st;
    }
    case TK_PRE_SEQUENCE: break; /* handled by tk_pre_apply */
    }
    return tuna_fail(TUNA_E_INTERNAL, "pre-tokenizer type %d applied per piece", (int)p->type);
}

tuna_status tk_pre_apply(const struct tk_pre *p, tk_pieces *l)
{
    if (p->type == TK_PRE_SEQUENCE) {
        for (size_t i = 0; i < p->nkids; i++) {
            tuna_status st = tk_pre_apply(&p->kids[i], l);
            if (st) return st;
        }
        return TUNA_OK;
    }
    tk_pieces out = {0};
    tk_segs segs = {0};
    tk_buf tmp = {0};
    tuna_status st = TUNA_OK;
    for (size_t i = 0; !st && i < l->n; i++)
        st = apply_piece(p, l->text.p + l->v[i].off, l->v[i].len, l->v[i].first, &segs, &tmp, &out);
    tk_segs_free(&segs);
    tk_buf_free(&tmp);
    if (st) {
        tk_pieces_free(&out);
        return st;
    }
    tk_pieces_free(l);
    *l = out;
    return TUNA_OK;
}
