/* bpe.c — the model stage: BPE as HF tokenizers runs it (merge by rank with a binary heap,
 * lowest rank first, then leftmost; byte_fallback to <0xXX> tokens; fuse_unk; ignore_merges;
 * continuing_subword_prefix / end_of_word_suffix) and WordPiece (greedy longest match).
 *
 * Owns the vocabulary (token ↔ id), the merge table ((left id, right id) → rank, new id) and a
 * word → ids cache shared by threads under a mutex. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "tokenizer/tok_internal.h"

/* ---------------- u64 → u64 map (open addressing) ---------------- */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

bool tk_u64map_put(tk_u64map *m, uint64_t key, uint64_t val)
{
    key += 1;
    if ((m->count + 1) * 2 > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 1024;
        uint64_t *k = calloc(cap, sizeof *k), *v = calloc(cap, sizeof *v);
        if (!k || !v) {
            free(k);
            free(v);
            return false;
        }
        for (size_t i = 0; i < m->cap; i++) {
            if (!m->keys[i]) continue;
            size_t h = mix64(m->keys[i]) & (cap - 1);
            while (k[h]) h = (h + 1) & (cap - 1);
            k[h] = m->keys[i];
            v[h] = m->vals[i];
        }
        free(m->keys);
        free(m->vals);
        m->keys = k;
        m->vals = v;
        m->cap = cap;
    }
    size_t h = mix64(key) & (m->cap - 1);
    while (m->keys[h] && m->keys[h] != key) h = (h + 1) & (m->cap - 1);
    if (!m->keys[h]) m->count++;
    m->keys[h] = key;
    m->vals[h] = val;
    return true;
}

bool tk_u64map_get(const tk_u64map *m, uint64_t key, uint64_t *val)
{
    if (!m->cap) return false;
    key += 1;
    size_t h = mix64(key) & (m->cap - 1);
    while (m->keys[h]) {
        if (m->keys[h] == key) {
            *val = m->vals[h];
            return true;
        }
        h = (h + 1) & (m->cap - 1);
    }
    return false;
}

/* ---------------- vocabulary and merges ---------------- */

void tk_model_init(struct tk_model *m)
{
    memset(m, 0, sizeof *m);
    tuna_strmap_init(&m->vocab);
    m->unk_id = -1;
    m->max_chars_per_word = 100;
    for (int i = 0; i < 256; i++) m->byte_id[i] = -1;
    pthread_mutex_init(&m->cache.mu, NULL);
    tuna_strmap_init(&m->cache.map);
}

void tk_model_free(struct tk_model *m)
{
    tuna_strmap_free(&m->vocab);
    for (int64_t i = 0; i < m->nvocab; i++) free(m->tok[i]);
    free(m->tok);
    free(m->tok_len);
    free(m->merges.keys);
    free(m->merges.vals);
    free(m->cont_prefix);
    free(m->eow_suffix);
    pthread_mutex_destroy(&m->cache.mu);
    tuna_strmap_free(&m->cache.map);
    free(m->cache.ids);
    free(m->scores);
    free(m->trie.keys);
    free(m->trie.vals);
    free(m->trie_id);
}

tuna_status tk_model_add_token(struct tk_model *m, const char *s, size_t n, int64_t id)
{
    if (id < 0 || id > INT32_MAX - 1) return tuna_fail(TUNA_E_FORMAT, "vocabulary entry \"%.*s\" has id %lld out of range", (int)n, s, (long long)id);
    if ((size_t)id >= m->tok_cap) {
        size_t cap = m->tok_cap ? m->tok_cap : 1024;
        while (cap <= (size_t)id) cap *= 2;
        char **t = realloc(m->tok, cap * sizeof *t);
        if (!t) return tuna_fail_oom("vocabulary", cap);
        m->tok = t;
        size_t *l = realloc(m->tok_len, cap * sizeof *l);
        if (!l) return tuna_fail_oom("vocabulary", cap);
        m->tok_len = l;
        for (size_t i = m->tok_cap; i < cap; i++) {
            m->tok[i] = NULL;
            m->tok_len[i] = 0;
        }
        m->tok_cap = cap;
    }
    if (id >= m->nvocab) m->nvocab = id + 1;
    char *c = malloc(n + 1);
    if (!c) return tuna_fail_oom("vocabulary", n);
    memcpy(c, s, n);
    c[n] = '\0';
    free(m->tok[id]);
    m->tok[id] = c;
    m->tok_len[id] = n;
    if (!tuna_strmap_put(&m->vocab, s, n, id, NULL)) return tuna_fail_oom("vocabulary", n);
    return TUNA_OK;
}

tuna_status tk_model_add_merge(struct tk_model *m, const char *a, size_t an, const char *b, size_t bn, uint32_t rank,
                               const char *where)
{
    int64_t ia, ib, inew;
    if (!tuna_strmap_get(&m->vocab, a, an, &ia) || !tuna_strmap_get(&m->vocab, b, bn, &ib))
        return tuna_fail(TUNA_E_FORMAT, "%s: merge %u (\"%.*s\" \"%.*s\") uses a token missing from the vocabulary",
                         where, rank, (int)an, a, (int)bn, b);
    size_t pl = m->cont_prefix ? strlen(m->cont_prefix) : 0;
    const char *bb = b;
    size_t bbn = bn;
    if (pl && bn >= pl && memcmp(b, m->cont_prefix, pl) == 0) {
        bb += pl;
        bbn -= pl;
    }
    char stack[256];
    char *joined = an + bbn <= sizeof stack ? stack : malloc(an + bbn);
    if (!joined) return tuna_fail_oom("merges", an + bbn);
    memcpy(joined, a, an);
    memcpy(joined + an, bb, bbn);
    bool ok = tuna_strmap_get(&m->vocab, joined, an + bbn, &inew);
    if (joined != stack) free(joined);
    if (!ok)
        return tuna_fail(TUNA_E_FORMAT, "%s: merge %u (\"%.*s\" \"%.*s\") makes a token missing from the vocabulary",
                         where, rank, (int)an, a, (int)bn, b);
    if (!tk_u64map_put(&m->merges, (uint64_t)ia << 32 | (uint64_t)ib, (uint64_t)rank << 32 | (uint64_t)inew))
        return tuna_fail_oom("merges", 0);
    return TUNA_OK;
}

tuna_status tk_model_add_merge_line(struct tk_model *m, const char *line, size_t n, uint32_t rank, const char *where)
{
    /* The usual form has exactly one space. Tokens that contain spaces (Llama 2 has merges like
     * "   ") make it ambiguous: take the split whose halves and join are all in the vocabulary. */
    const char *sp = memchr(line, ' ', n);
    if (!sp) return tuna_fail(TUNA_E_FORMAT, "%s: merge %u \"%.*s\" has no space between its two tokens", where, rank, (int)n, line);
    if (!memchr(sp + 1, ' ', n - (size_t)(sp + 1 - line)))
        return tk_model_add_merge(m, line, (size_t)(sp - line), sp + 1, n - (size_t)(sp + 1 - line), rank, where);
    for (size_t i = 0; i < n; i++) {
        if (line[i] != ' ') continue;
        int64_t x;
        if (!tuna_strmap_get(&m->vocab, line, i, &x) || !tuna_strmap_get(&m->vocab, line + i + 1, n - i - 1, &x)) continue;
        char *joined = malloc(n);
        if (!joined) return tuna_fail_oom("merges", n);
        memcpy(joined, line, i);
        memcpy(joined + i, line + i + 1, n - i - 1);
        bool ok = tuna_strmap_get(&m->vocab, joined, n - 1, &x);
        free(joined);
        if (ok) return tk_model_add_merge(m, line, i, line + i + 1, n - i - 1, rank, where);
    }
    return tuna_fail(TUNA_E_FORMAT, "%s: merge %u \"%.*s\" cannot be split into two vocabulary tokens", where, rank, (int)n, line);
}

static const char k_meta[] = "\xE2\x96\x81"; /* U+2581 ▁ */

/* See metaspace_cut in tok_internal.h. */
static bool can_cut_at_metaspace(const struct tk_model *m)
{
    int64_t id;
    if (m->type != TK_MODEL_BPE || m->cont_prefix || m->eow_suffix || !tuna_strmap_gets(&m->vocab, k_meta, &id))
        return false;
    for (int64_t i = 0; i < m->nvocab; i++) {
        const char *s = m->tok[i];
        size_t n = m->tok_len[i];
        if (!s) continue;
        for (size_t k = 1; k + 3 <= n; k++)
            if (!memcmp(s + k, k_meta, 3) && !(k >= 3 && !memcmp(s + k - 3, k_meta, 3))) return false;
    }
    return true;
}

tuna_status tk_model_finish(struct tk_model *m)
{
    m->metaspace_cut = can_cut_at_metaspace(m);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        int64_t id;
        m->byte_id[b] = tuna_strmap_gets(&m->vocab, name, &id) ? (int32_t)id : -1;
    }
    return TUNA_OK;
}

/* ---------------- BPE merging ---------------- */

typedef struct {
    int32_t id;
    int32_t prev, next; /* -1 = none */
    bool alive;
} sym;

typedef struct {
    uint32_t rank;
    uint32_t pos;
    int32_t new_id;
} qent;

static bool q_less(const qent *a, const qent *b) /* a pops before b */
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

typedef struct {
    qent *v;
    size_t n, cap;
} heap;

static bool heap_push(heap *h, qent e)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        qent *v = realloc(h->v, cap * sizeof *v);
        if (!v) return false;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!q_less(&e, &h->v[p])) break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = e;
    return true;
}

static qent heap_pop(heap *h)
{
    qent top = h->v[0], last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && q_less(&h->v[c + 1], &h->v[c])) c++;
        if (!q_less(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = last;
    return top;
}

static bool push_pair(const struct tk_model *m, heap *h, const sym *s, int32_t pos)
{
    uint64_t v;
    int32_t nx = s[pos].next;
    if (nx < 0) return true;
    if (!tk_u64map_get(&m->merges, (uint64_t)(uint32_t)s[pos].id << 32 | (uint32_t)s[nx].id, &v)) return true;
    return heap_push(h, (qent){(uint32_t)(v >> 32), (uint32_t)pos, (int32_t)(v & 0xffffffffu)});
}

static bool append_id(int32_t **ids, size_t *n, size_t *cap, int32_t id)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 64;
        int32_t *v = realloc(*ids, c * sizeof *v);
        if (!v) return false;
        *ids = v;
        *cap = c;
    }
    (*ids)[(*n)++] = id;
    return true;
}

static bool add_sym(sym **s, size_t *n, size_t *cap, int32_t id)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 32;
        sym *v = realloc(*s, c * sizeof *v);
        if (!v) return false;
        *s = v;
        *cap = c;
    }
    (*s)[*n] = (sym){id, (int32_t)*n - 1, -1, true};
    if (*n > 0) (*s)[*n - 1].next = (int32_t)*n;
    (*n)++;
    return true;
}

static tuna_status bpe_word(const struct tk_model *m, const char *w, size_t n, int32_t **ids, size_t *nids, size_t *cap)
{
    sym *s = NULL;
    size_t ns = 0, scap = 0;
    heap h = {0};
    tuna_status st = TUNA_OK;
    size_t pl = m->cont_prefix ? strlen(m->cont_prefix) : 0, sl = m->eow_suffix ? strlen(m->eow_suffix) : 0;
    char stack[64];
    bool pending_unk = false; /* the last symbol is an unk that fuse_unk may extend */
    size_t i = 0;
    while (i < n) {
        int32_t cp;
        size_t k = tk_utf8_next(w + i, n - i, &cp);
        const char *key = w + i;
        size_t klen = k;
        bool decorate = (pl && i > 0) || (sl && i + k == n);
        if (decorate) {
            klen = (i > 0 ? pl : 0) + k + (i + k == n ? sl : 0);
            if (klen > sizeof stack) {
                st = tuna_fail(TUNA_E_INTERNAL, "BPE symbol too long");
                break;
            }
            size_t o = 0;
            if (i > 0 && pl) memcpy(stack, m->cont_prefix, pl), o = pl;
            memcpy(stack + o, w + i, k);
            o += k;
            if (i + k == n && sl) memcpy(stack + o, m->eow_suffix, sl);
            key = stack;
        }
        int64_t id;
        bool ok = true;
        if (tuna_strmap_get(&m->vocab, key, klen, &id)) {
            ok = add_sym(&s, &ns, &scap, (int32_t)id);
            pending_unk = false;
        } else {
            bool done = false;
            if (m->byte_fallback) {
                bool all = true;
                for (size_t b = 0; b < k; b++) all = all && m->byte_id[(unsigned char)w[i + b]] >= 0;
                if (all) {
                    for (size_t b = 0; b < k && ok; b++) ok = add_sym(&s, &ns, &scap, m->byte_id[(unsigned char)w[i + b]]);
                    done = true;
                    pending_unk = false;
                }
            }
            if (!done && m->unk_id >= 0) {
                if (!(m->fuse_unk && pending_unk)) ok = add_sym(&s, &ns, &scap, m->unk_id);
                pending_unk = true;
            }
        }
        if (!ok) {
            st = tuna_fail_oom("BPE word", n);
            break;
        }
        i += k;
    }
    for (size_t p = 0; !st && p + 1 < ns; p++)
        if (!push_pair(m, &h, s, (int32_t)p)) st = tuna_fail_oom("BPE queue", ns);
    while (!st && h.n) {
        qent top = heap_pop(&h);
        sym *a = &s[top.pos];
        if (!a->alive || a->next < 0) continue;
        sym *b = &s[a->next];
        uint64_t v;
        if (!tk_u64map_get(&m->merges, (uint64_t)(uint32_t)a->id << 32 | (uint32_t)b->id, &v) ||
            (int32_t)(v & 0xffffffffu) != top.new_id)
            continue;
        a->id = top.new_id;
        b->alive = false;
        a->next = b->next;
        if (b->next >= 0) s[b->next].prev = (int32_t)top.pos;
        if (a->prev >= 0 && !push_pair(m, &h, s, a->prev)) st = tuna_fail_oom("BPE queue", ns);
        if (!st && !push_pair(m, &h, s, (int32_t)top.pos)) st = tuna_fail_oom("BPE queue", ns);
    }
    for (int32_t p = ns ? 0 : -1; !st && p >= 0; p = s[p].next)
        if (!append_id(ids, nids, cap, s[p].id)) st = tuna_fail_oom("ids", *nids);
    free(s);
    free(h.v);
    return st;
}

static tuna_status wordpiece_word(const struct tk_model *m, const char *w, size_t n, int32_t **ids, size_t *nids,
                                  size_t *cap)
{
    size_t nchars = 0;
    for (size_t i = 0; i < n; i++) nchars += ((unsigned char)w[i] & 0xC0) != 0x80;
    size_t start_n = *nids;
    size_t pl = m->cont_prefix ? strlen(m->cont_prefix) : 0;
    if ((int64_t)nchars <= m->max_chars_per_word) {
        char *buf = malloc(n + pl + 1);
        if (!buf) return tuna_fail_oom("WordPiece", n);
        size_t start = 0;
        bool bad = false;
        while (start < n) {
            size_t end = n;
            int64_t id = -1;
            while (start < end) {
                size_t o = 0;
                if (start > 0 && pl) memcpy(buf, m->cont_prefix, pl), o = pl;
                memcpy(buf + o, w + start, end - start);
                if (tuna_strmap_get(&m->vocab, buf, o + end - start, &id)) break;
                id = -1;
                do end--;
                while (end > start && ((unsigned char)w[end] & 0xC0) == 0x80);
            }
            if (id < 0) {
                bad = true;
                break;
            }
            if (!append_id(ids, nids, cap, (int32_t)id)) {
                free(buf);
                return tuna_fail_oom("ids", *nids);
            }
            start = end;
        }
        free(buf);
        if (!bad) return TUNA_OK;
    }
    *nids = start_n;
    if (m->unk_id < 0) return tuna_fail(TUNA_E_FORMAT, "WordPiece: word \"%.*s\" has no tokens and the model has no unk_token", (int)n, w);
    return append_id(ids, nids, cap, m->unk_id) ? TUNA_OK : tuna_fail_oom("ids", *nids);
}

#define TK_CACHE_MAX_WORD 128

static tuna_status tk_model_tokenize_piece(struct tk_model *m, const char *w, size_t n, int32_t **ids, size_t *nids,
                                           size_t *cap);
#define TK_CACHE_MAX_IDS (1u << 22)

tuna_status tk_model_tokenize(struct tk_model *m, const char *w, size_t n, int32_t **ids, size_t *nids, size_t *cap)
{
    if (n == 0) return TUNA_OK;
    if (m->type == TK_MODEL_WORDPIECE) return wordpiece_word(m, w, n, ids, nids, cap);
    if (m->type == TK_MODEL_UNIGRAM) return tk_unigram_tokenize(m, w, n, ids, nids, cap);
    if (m->type == TK_MODEL_WORDLEVEL) { /* the word's id, else unk (HF fails without one) */
        int64_t id;
        if (!tuna_strmap_get(&m->vocab, w, n, &id)) {
            if (m->unk_id < 0)
                return tuna_fail(TUNA_E_INVALID, "WordLevel: \"%.*s\" is not in the vocabulary and there is no unk_token",
                                 (int)(n > 60 ? 60 : n), w);
            id = m->unk_id;
        }
        return append_id(ids, nids, cap, (int32_t)id) ? TUNA_OK : tuna_fail_oom("ids", *nids);
    }
    int64_t v;
    if (m->ignore_merges && tuna_strmap_get(&m->vocab, w, n, &v))
        return append_id(ids, nids, cap, (int32_t)v) ? TUNA_OK : tuna_fail_oom("ids", *nids);
    if (m->metaspace_cut && n > TK_CACHE_MAX_WORD / 2) {
        /* cut before every "▁" that follows another character and merge the pieces apart */
        size_t start = 0;
        for (size_t k = 3; k + 3 <= n; k++) {
            if (memcmp(w + k, k_meta, 3) != 0 || !memcmp(w + k - 3, k_meta, 3)) continue;
            tuna_status st = tk_model_tokenize_piece(m, w + start, k - start, ids, nids, cap);
            if (st) return st;
            start = k;
        }
        return tk_model_tokenize_piece(m, w + start, n - start, ids, nids, cap);
    }
    return tk_model_tokenize_piece(m, w, n, ids, nids, cap);
}

static tuna_status tk_model_tokenize_piece(struct tk_model *m, const char *w, size_t n, int32_t **ids, size_t *nids,
                                           size_t *cap)
{
    int64_t v;
    bool cacheable = n <= TK_CACHE_MAX_WORD;
    if (cacheable) {
        pthread_mutex_lock(&m->cache.mu);
        if (tuna_strmap_get(&m->cache.map, w, n, &v)) {
            size_t off = (size_t)(v >> 16), cnt = (size_t)(v & 0xffff);
            bool ok = true;
            for (size_t i = 0; i < cnt && ok; i++) ok = append_id(ids, nids, cap, m->cache.ids[off + i]);
            pthread_mutex_unlock(&m->cache.mu);
            return ok ? TUNA_OK : tuna_fail_oom("ids", *nids);
        }
        pthread_mutex_unlock(&m->cache.mu);
    }
    size_t before = *nids;
    tuna_status st = bpe_word(m, w, n, ids, nids, cap);
    if (st || !cacheable) return st;
    size_t cnt = *nids - before;
    pthread_mutex_lock(&m->cache.mu);
    struct tk_cache *c = &m->cache;
    if (c->n + cnt > TK_CACHE_MAX_IDS) { /* full: start over rather than evict piecemeal */
        tuna_strmap_free(&c->map);
        tuna_strmap_init(&c->map);
        c->n = 0;
    }
    if (c->n + cnt > c->cap) {
        size_t nc = c->cap ? c->cap : 4096;
        while (nc < c->n + cnt) nc *= 2;
        int32_t *p = realloc(c->ids, nc * sizeof *p);
        if (p) {
            c->ids = p;
            c->cap = nc;
        }
    }
    if (c->n + cnt <= c->cap && cnt < 0xffff) {
        memcpy(c->ids + c->n, *ids + before, cnt * sizeof(int32_t));
        if (tuna_strmap_put(&c->map, w, n, (int64_t)(c->n << 16 | cnt), NULL)) c->n += cnt;
    }
    pthread_mutex_unlock(&m->cache.mu);
    return TUNA_OK;
}
