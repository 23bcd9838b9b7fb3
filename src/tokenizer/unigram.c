/* unigram.c — the Unigram model as HF tokenizers runs it (T5, ALBERT, XLNet style
 * SentencePiece vocabularies): Viterbi over all vocabulary pieces that start at each
 * character, unknown characters scored min_score - 10, consecutive unknowns fused, optional
 * byte_fallback to <0xXX> pieces.
 *
 * The pieces live in the model's vocabulary (id = position in the "vocab" list); a byte trie
 * built from them gives the common-prefix search. */
#include <float.h>
#include <stdlib.h>
#include <string.h>

#include "core/json.h"
#include "core/status.h"
#include "tokenizer/tok_internal.h"

#define UNK_PENALTY 10.0

static bool trie_node(struct tk_model *m, int32_t *out)
{
    if (m->trie_nodes == m->trie_cap) {
        size_t cap = m->trie_cap ? m->trie_cap * 2 : 1024;
        int32_t *v = realloc(m->trie_id, cap * sizeof *v);
        if (!v) return false;
        m->trie_id = v;
        m->trie_cap = cap;
    }
    m->trie_id[m->trie_nodes] = -1;
    *out = (int32_t)m->trie_nodes++;
    return true;
}

static bool trie_insert(struct tk_model *m, const char *s, size_t n, int32_t id)
{
    int32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t key = (uint64_t)(uint32_t)node << 8 | (unsigned char)s[i], v;
        if (tk_u64map_get(&m->trie, key, &v)) {
            node = (int32_t)v;
            continue;
        }
        int32_t child;
        if (!trie_node(m, &child) || !tk_u64map_put(&m->trie, key, (uint64_t)child)) return false;
        node = child;
    }
    if (m->trie_id[node] < 0) m->trie_id[node] = id; /* the first of duplicate pieces wins, as a map insert */
    return true;
}

tuna_status tk_unigram_load(struct tk_model *m, const cJSON *model, const char *where)
{
    m->type = TK_MODEL_UNIGRAM;
    m->fuse_unk = true;
    const cJSON *vocab = tuna_json_member(model, "vocab");
    if (!cJSON_IsArray(vocab)) return tuna_fail(TUNA_E_FORMAT, "%s: Unigram \"vocab\" is not a list of [piece, score]", where);
    int n = cJSON_GetArraySize(vocab);
    m->scores = malloc((size_t)(n ? n : 1) * sizeof *m->scores);
    int32_t root;
    if (!m->scores || !trie_node(m, &root)) return tuna_fail_oom("Unigram vocabulary", (size_t)n);
    double min_score = DBL_MAX;
    int id = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab)
    {
        const cJSON *p = cJSON_GetArrayItem(e, 0), *sc = cJSON_GetArrayItem(e, 1);
        if (!cJSON_IsArray(e) || !cJSON_IsString(p) || !cJSON_IsNumber(sc))
            return tuna_fail(TUNA_E_FORMAT, "%s: Unigram vocab entry %d is not [piece, score]", where, id);
        size_t len = strlen(p->valuestring);
        int64_t have;
        bool dup = tuna_strmap_get(&m->vocab, p->valuestring, len, &have);
        tuna_status st = tk_model_add_token(m, p->valuestring, len, id);
        if (st) return st;
        if (dup) /* keep the first id for the string, as HF's token → id map does */
            if (!tuna_strmap_put(&m->vocab, p->valuestring, len, have, NULL)) return tuna_fail_oom("vocabulary", 0);
        m->scores[id] = sc->valuedouble;
        if (sc->valuedouble < min_score) min_score = sc->valuedouble;
        if (len && !trie_insert(m, p->valuestring, len, id)) return tuna_fail_oom("Unigram trie", 0);
        id++;
    }
    m->unk_score = (n ? min_score : 0.0) - UNK_PENALTY;
    const cJSON *unk = tuna_json_member(model, "unk_id");
    if (cJSON_IsNumber(unk)) {
        if (unk->valuedouble < 0 || unk->valuedouble >= n)
            return tuna_fail(TUNA_E_FORMAT, "%s: Unigram unk_id %g is outside the vocabulary (%d pieces)", where,
                             unk->valuedouble, n);
        m->unk_id = (int32_t)unk->valuedouble;
    }
    m->byte_fallback = cJSON_IsTrue(tuna_json_member(model, "byte_fallback"));
    return TUNA_OK;
}

typedef struct {
    double score;
    int32_t id;
    int64_t starts_at; /* -1 = not reached */
} vnode;

static bool push(int32_t **ids, size_t *n, size_t *cap, int32_t id)
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

/* Emits the ids of the piece s[a..b): its vocabulary id, else its bytes, else unk. */
static bool emit_piece(const struct tk_model *m, const char *s, size_t a, size_t b, int32_t **ids, size_t *nids, size_t *cap)
{
    int64_t id;
    if (tuna_strmap_get(&m->vocab, s + a, b - a, &id)) return push(ids, nids, cap, (int32_t)id);
    if (m->byte_fallback) {
        bool all = true;
        for (size_t i = a; i < b; i++) all = all && m->byte_id[(unsigned char)s[i]] >= 0;
        if (all) {
            for (size_t i = a; i < b; i++)
                if (!push(ids, nids, cap, m->byte_id[(unsigned char)s[i]])) return false;
            return true;
        }
    }
    return push(ids, nids, cap, m->unk_id);
}

tuna_status tk_unigram_tokenize(struct tk_model *m, const char *w, size_t n, int32_t **ids, size_t *nids, size_t *cap)
{
    if (m->unk_id < 0) return tuna_fail(TUNA_E_FORMAT, "Unigram model without unk_id cannot encode");
    vnode *best = malloc((n + 1) * sizeof *best);
    if (!best) return tuna_fail_oom("Unigram lattice", n);
    for (size_t i = 0; i <= n; i++) best[i] = (vnode){0.0, -1, -1};
    best[0].starts_at = 0;
    size_t pos = 0;
    while (pos < n) {
        int32_t cp;
        size_t mblen = tk_utf8_next(w + pos, n - pos, &cp);
        double here = best[pos].score;
        bool single = false;
        int32_t node = 0;
        for (size_t k = pos; k < n; k++) { /* every piece that is a prefix of w[pos..] */
            uint64_t v;
            if (!tk_u64map_get(&m->trie, (uint64_t)(uint32_t)node << 8 | (unsigned char)w[k], &v)) break;
            node = (int32_t)v;
            int32_t id = m->trie_id[node];
            if (id < 0) continue;
            size_t end = k + 1;
            double cand = here + m->scores[id];
            if (best[end].starts_at < 0 || cand > best[end].score) best[end] = (vnode){cand, id, (int64_t)pos};
            if (end - pos == mblen) single = true;
        }
        if (!single) {
            size_t end = pos + mblen;
            double cand = here + m->unk_score;
            if (best[end].starts_at < 0 || cand > best[end].score) best[end] = (vnode){cand, m->unk_id, (int64_t)pos};
        }
        pos += mblen;
    }
    /* walk back: collect piece boundaries (fusing runs of unknowns), then emit in order */
    size_t *cut = malloc((n + 1) * sizeof *cut);
    if (!cut) {
        free(best);
        return tuna_fail_oom("Unigram lattice", n);
    }
    size_t nc = 0, end = n;
    bool in_unk = false;
    cut[nc++] = n;
    while (end > 0) {
        const vnode *v = &best[end];
        size_t start = (size_t)v->starts_at;
        bool unk = m->fuse_unk && v->id == m->unk_id;
        if (!(unk && in_unk)) {
            if (end != cut[nc - 1]) cut[nc++] = end; /* close the previous piece here */
        }
        in_unk = unk;
        end = start;
    }
    if (cut[nc - 1] != 0) cut[nc++] = 0;
    tuna_status st = TUNA_OK;
    for (size_t i = nc - 1; i > 0 && !st; i--)
        if (!emit_piece(m, w, cut[i], cut[i - 1], ids, nids, cap)) st = tuna_fail_oom("ids", *nids);
    free(cut);
    free(best);
    return st;
}
