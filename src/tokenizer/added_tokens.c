/* added_tokens.c — the added vocabulary (HF AddedVocabulary): tokens matched in the text before
 * the model sees it, with their special / normalized / lstrip / rstrip / single_word flags.
 *
 * Matching is leftmost-longest over byte strings (what HF's aho-corasick automaton does); a
 * rejected match (single_word, or a special token while parse_special is off) still consumes
 * its bytes, as in HF. Non-normalized tokens are matched in the raw text, normalized ones in
 * each normalized piece, against their normalized content. */
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "tokenizer/tok_internal.h"

tuna_status tk_added_add(tuna_tokenizer *t, const char *content, int32_t id, bool special, bool normalized, bool lstrip,
                         bool rstrip, bool single_word)
{
    int64_t have;
    if (tuna_strmap_gets(&t->added_map, content, &have)) {
        /* a repeated entry (tokenizer_config.json after tokenizer.json): keep the first */
        return TUNA_OK;
    }
    if (id < 0) return tuna_fail(TUNA_E_FORMAT, "added token \"%s\" has a negative id %d", content, id);
    struct tk_added *v = realloc(t->added, (t->nadded + 1) * sizeof *v);
    if (!v) return tuna_fail_oom("added tokens", t->nadded);
    t->added = v;
    struct tk_added *a = &t->added[t->nadded];
    memset(a, 0, sizeof *a);
    a->content = strdup(content);
    if (!a->content) return tuna_fail_oom("added tokens", 0);
    a->len = strlen(content);
    a->id = id;
    a->special = special;
    a->normalized = normalized;
    a->lstrip = lstrip;
    a->rstrip = rstrip;
    a->single_word = single_word;
    if (!tuna_strmap_puts(&t->added_map, content, (int64_t)t->nadded, NULL)) return tuna_fail_oom("added tokens", 0);
    t->nadded++;
    return TUNA_OK;
}

void tk_matcher_free(struct tk_matcher *m)
{
    free(m->pat);
    free(m->len);
    free(m->idx);
    memset(m, 0, sizeof *m);
}

struct pat_ref {
    const char *pat;
    size_t len;
    int32_t idx;
    size_t order; /* keeps the sort stable */
};

static int cmp_pat(const void *x, const void *y)
{
    const struct pat_ref *a = x, *b = y;
    unsigned char fa = (unsigned char)a->pat[0], fb = (unsigned char)b->pat[0];
    if (fa != fb) return fa < fb ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1; /* longest first: leftmost-longest */
    return a->order < b->order ? -1 : a->order > b->order;
}

/* Builds a matcher over the given patterns (pattern i belongs to added token idx[i]). */
static tuna_status matcher_build(struct tk_matcher *m, const char **pat, const size_t *len, const int32_t *idx, size_t n)
{
    memset(m, 0, sizeof *m);
    struct pat_ref *refs = malloc((n ? n : 1) * sizeof *refs);
    m->pat = malloc((n ? n : 1) * sizeof *m->pat);
    m->len = malloc((n ? n : 1) * sizeof *m->len);
    m->idx = malloc((n ? n : 1) * sizeof *m->idx);
    if (!refs || !m->pat || !m->len || !m->idx) {
        free(refs);
        return tuna_fail_oom("added token matcher", n);
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (len[i]) refs[k++] = (struct pat_ref){pat[i], len[i], idx[i], i}; /* an empty pattern never matches */
    qsort(refs, k, sizeof *refs, cmp_pat);
    for (size_t i = 0; i < k; i++) {
        m->pat[i] = refs[i].pat;
        m->len[i] = refs[i].len;
        m->idx[i] = refs[i].idx;
    }
    m->n = k;
    size_t j = 0;
    for (int b = 0; b <= 256; b++) {
        while (j < k && (unsigned char)m->pat[j][0] < b) j++;
        m->first[b] = j;
    }
    m->first[256] = k;
    free(refs);
    return TUNA_OK;
}

tuna_status tk_added_build(tuna_tokenizer *t)
{
    size_t n = t->nadded;
    const char **pat = calloc(n ? n : 1, sizeof *pat);
    size_t *len = calloc(n ? n : 1, sizeof *len);
    int32_t *idx = calloc(n ? n : 1, sizeof *idx);
    t->norm_content = calloc(n ? n : 1, sizeof *t->norm_content);
    tuna_status st = TUNA_OK;
    if (!pat || !len || !idx || !t->norm_content) {
        st = tuna_fail_oom("added tokens", n);
        goto done;
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (t->added[i].normalized) continue; /* matched in the second pass, even without a normalizer */
        pat[k] = t->added[i].content;
        len[k] = t->added[i].len;
        idx[k++] = (int32_t)i;
    }
    if ((st = matcher_build(&t->match_raw, pat, len, idx, k))) goto done;
    k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!t->added[i].normalized) continue;
        tk_buf b = {0};
        if (t->norm) st = tk_norm_apply(t->norm, t->added[i].content, t->added[i].len, &b);
        else if (!tk_buf_put(&b, t->added[i].content, t->added[i].len)) st = tuna_fail_oom("added tokens", 0);
        if (st) {
            tk_buf_free(&b);
            goto done;
        }
        t->norm_content[i] = b.p ? b.p : strdup("");
        if (!t->norm_content[i]) {
            st = tuna_fail_oom("added tokens", 0);
            goto done;
        }
        pat[k] = t->norm_content[i];
        len[k] = b.n;
        idx[k++] = (int32_t)i;
    }
    if ((st = matcher_build(&t->match_norm, pat, len, idx, k))) goto done;
    /* id → added index */
    int64_t top = t->model.nvocab;
    for (size_t i = 0; i < n; i++)
        if (t->added[i].id >= top) top = (int64_t)t->added[i].id + 1;
    t->nvocab_total = top;
    t->added_by_id = malloc((size_t)(top ? top : 1) * sizeof *t->added_by_id);
    if (!t->added_by_id) {
        st = tuna_fail_oom("added tokens", (size_t)top);
        goto done;
    }
    for (int64_t i = 0; i < top; i++) t->added_by_id[i] = -1;
    for (size_t i = 0; i < n; i++) t->added_by_id[t->added[i].id] = (int32_t)i;
done:
    free(pat);
    free(len);
    free(idx);
    return st;
}

static int32_t last_cp(const char *s, size_t n)
{
    if (!n) return -1;
    size_t p = n - 1;
    while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
    int32_t c;
    tk_utf8_next(s + p, n - p, &c);
    return c;
}

static bool aseg_add(tk_aseg **v, size_t *n, size_t *cap, size_t a, size_t b, int32_t added)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 16;
        tk_aseg *p = realloc(*v, c * sizeof *p);
        if (!p) return false;
        *v = p;
        *cap = c;
    }
    (*v)[(*n)++] = (tk_aseg){a, b, added};
    return true;
}

tuna_status tk_added_split(const tuna_tokenizer *t, const struct tk_matcher *m, bool parse_special, const char *s,
                           size_t n, tk_aseg **out, size_t *nout)
{
    size_t cap = 0;
    *out = NULL;
    *nout = 0;
    if (n == 0) {
        if (!aseg_add(out, nout, &cap, 0, 0, -1)) return tuna_fail_oom("added token split", 0);
        return TUNA_OK;
    }
    size_t start_offset = 0, pos = 0;
    while (pos < n) {
        unsigned char c = (unsigned char)s[pos];
        size_t hit = SIZE_MAX;
        for (size_t j = m->first[c]; j < m->first[c + 1]; j++)
            if (m->len[j] <= n - pos && memcmp(s + pos, m->pat[j], m->len[j]) == 0) {
                hit = j;
                break;
            }
        if (hit == SIZE_MAX) {
            pos++;
            continue;
        }
        size_t start = pos, stop = pos + m->len[hit];
        pos = stop;
        const struct tk_added *a = &t->added[m->idx[hit]];
        if (!parse_special && a->special) continue;
        if (a->single_word) {
            /* HF tests the neighbours with the regexes \w$ and ^\w */
            bool start_space = start == 0 || !tk_is_word_char(last_cp(s, start));
            int32_t nc = -1;
            if (stop < n) tk_utf8_next(s + stop, n - stop, &nc);
            bool stop_space = stop == n || !tk_is_word_char(nc);
            if (!start_space || !stop_space) continue;
        }
        if (a->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                size_t p = ns - 1;
                while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
                int32_t cp;
                tk_utf8_next(s + p, ns - p, &cp);
                if (!tk_is_whitespace(cp)) break;
                ns = p;
            }
            start = ns > start_offset ? ns : start_offset;
        }
        if (a->rstrip) {
            while (stop < n) {
                int32_t cp;
                size_t k = tk_utf8_next(s + stop, n - stop, &cp);
                if (!tk_is_whitespace(cp)) break;
                stop += k;
            }
            if (pos < stop) pos = stop;
        }
        if (start_offset < start && !aseg_add(out, nout, &cap, start_offset, start, -1)) goto oom;
        if (!aseg_add(out, nout, &cap, start, stop, m->idx[hit])) goto oom;
        start_offset = stop;
    }
    if (start_offset != n && !aseg_add(out, nout, &cap, start_offset, n, -1)) goto oom;
    return TUNA_OK;
oom:
    free(*out);
    *out = NULL;
    return tuna_fail_oom("added token split", n);
}

const char *tk_id_to_str(const tuna_tokenizer *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->nvocab_total) return NULL;
    int32_t a = t->added_by_id[id];
    if (a >= 0) {
        if (len) *len = t->added[a].len;
        return t->added[a].content;
    }
    if (id >= t->model.nvocab || !t->model.tok[id]) return NULL;
    if (len) *len = t->model.tok_len[id];
    return t->model.tok[id];
}
