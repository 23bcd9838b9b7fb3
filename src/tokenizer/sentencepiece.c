/* sentencepiece.c — a folder with only tokenizer.model (a SentencePiece BPE model, Llama 2 /
 * Mistral style): the model protobuf is read and turned into the tokenizer.json that
 * transformers' LlamaConverter would write, which then loads as usual.
 *
 * What the converter does (transformers convert_slow_tokenizer.py, LlamaConverter):
 * - vocabulary: the pieces in id order (scores of the first three taken as 0);
 * - merges: for every piece, each split into two pieces that are both in the vocabulary, those of
 *   one piece ordered by (left id, right id), then all stably sorted by the piece's score,
 *   highest first (SentencePieceExtractor);
 * - BPE with unk_token = the trainer's unk piece, fuse_unk, byte_fallback;
 * - control and unknown pieces become special added tokens, user-defined pieces plain ones;
 * - legacy (the default): normalizer Prepend("▁") (unless add_prefix_space is false) +
 *   Replace(" " → "▁"); with "legacy": false no normalizer and a Metaspace pre-tokenizer
 *   (prepend_scheme "first", no split);
 * - decoder Replace("▁" → " "), ByteFallback, Fuse, Strip(" ", 1, 0) (no Strip without the
 *   prefix space); BOS added by the post-processor, as LlamaTokenizerFast does.
 * Unigram models (T5, ALBERT) are refused: their conversion needs the normalizer charsmap rules
 * of each tokenizer class. The protobuf is parsed defensively (every length checked). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "tokenizer/tok_internal.h"

struct spm_piece {
    const char *s; /* into the file buffer, not NUL-terminated */
    size_t n;
    float score;
    int type; /* 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte */
};

struct spm_model {
    struct spm_piece *p;
    size_t n, cap;
    int model_type; /* 1 unigram, 2 bpe, 3 word, 4 char */
    const char *unk, *bos, *eos; /* trainer_spec pieces */
    size_t unk_len, bos_len, eos_len;
};

/* ---- protobuf wire format ---- */

static bool pb_varint(const unsigned char *d, size_t n, size_t *o, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*o >= n) return false;
        unsigned char b = d[(*o)++];
        *v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) return true;
    }
    return false;
}

/* Reads one field header and its payload. For LEN fields data and len give the bytes; for
 * varint/fixed fields *v the value. */
static bool pb_field(const unsigned char *d, size_t n, size_t *o, uint32_t *field, int *wt, uint64_t *v,
                     const unsigned char **data, size_t *len)
{
    uint64_t key;
    if (!pb_varint(d, n, o, &key)) return false;
    *field = (uint32_t)(key >> 3);
    *wt = (int)(key & 7);
    switch (*wt) {
    case 0: return pb_varint(d, n, o, v);
    case 1:
        if (n - *o < 8) return false;
        memcpy(v, d + *o, 8);
        *o += 8;
        return true;
    case 2:
        if (!pb_varint(d, n, o, v) || *v > n - *o) return false;
        *data = d + *o;
        *len = (size_t)*v;
        *o += (size_t)*v;
        return true;
    case 5: {
        if (n - *o < 4) return false;
        uint32_t x;
        memcpy(&x, d + *o, 4);
        *v = x;
        *o += 4;
        return true;
    }
    default: return false;
    }
}

static tuna_status parse_piece(const unsigned char *d, size_t n, struct spm_piece *p, const char *path)
{
    size_t o = 0;
    memset(p, 0, sizeof *p);
    p->type = 1;
    while (o < n) {
        uint32_t f;
        int wt;
        uint64_t v = 0;
        const unsigned char *data = NULL;
        size_t len = 0;
        if (!pb_field(d, n, &o, &f, &wt, &v, &data, &len))
            return tuna_fail(TUNA_E_FORMAT, "%s: a SentencePiece entry is malformed (protobuf field ends past its message)", path);
        if (f == 1 && wt == 2) p->s = (const char *)data, p->n = len;
        else if (f == 2 && wt == 5) {
            uint32_t x = (uint32_t)v;
            memcpy(&p->score, &x, 4);
        } else if (f == 3 && wt == 0) p->type = (int)v;
    }
    if (!p->s) return tuna_fail(TUNA_E_FORMAT, "%s: a SentencePiece entry has no piece string", path);
    if (!tk_utf8_valid(p->s, p->n, NULL)) return tuna_fail(TUNA_E_FORMAT, "%s: a piece is not valid UTF-8", path);
    return TUNA_OK;
}

static tuna_status parse_model(const unsigned char *d, size_t n, struct spm_model *m, const char *path)
{
    size_t o = 0;
    m->model_type = 1; /* SentencePiece's default */
    m->unk = "<unk>", m->unk_len = 5;
    m->bos = "<s>", m->bos_len = 3;
    m->eos = "</s>", m->eos_len = 4;
    while (o < n) {
        uint32_t f;
        int wt;
        uint64_t v = 0;
        const unsigned char *data = NULL;
        size_t len = 0;
        if (!pb_field(d, n, &o, &f, &wt, &v, &data, &len))
            return tuna_fail(TUNA_E_FORMAT, "%s: not a SentencePiece model (protobuf malformed at byte %zu)", path, o);
        if (f == 1 && wt == 2) {
            if (m->n == m->cap) {
                size_t cap = m->cap ? m->cap * 2 : 1024;
                struct spm_piece *p = realloc(m->p, cap * sizeof *p);
                if (!p) return tuna_fail_oom("SentencePiece pieces", cap);
                m->p = p;
                m->cap = cap;
            }
            tuna_status st = parse_piece(data, len, &m->p[m->n], path);
            if (st) return st;
            m->n++;
        } else if (f == 2 && wt == 2) { /* trainer_spec */
            size_t q = 0;
            while (q < len) {
                uint32_t g;
                int w;
                uint64_t x = 0;
                const unsigned char *dd = NULL;
                size_t ll = 0;
                if (!pb_field(data, len, &q, &g, &w, &x, &dd, &ll))
                    return tuna_fail(TUNA_E_FORMAT, "%s: the SentencePiece trainer_spec is malformed", path);
                if (g == 3 && w == 0) m->model_type = (int)x;
                else if (g == 45 && w == 2) m->unk = (const char *)dd, m->unk_len = ll;
                else if (g == 46 && w == 2) m->bos = (const char *)dd, m->bos_len = ll;
                else if (g == 47 && w == 2) m->eos = (const char *)dd, m->eos_len = ll;
            }
        }
    }
    if (m->n < 3) return tuna_fail(TUNA_E_FORMAT, "%s: a SentencePiece model with %zu pieces", path, m->n);
    return TUNA_OK;
}

/* ---- merges as SentencePieceExtractor makes them ---- */

struct cand {
    float score;
    int32_t l, r;
    size_t order; /* position before the stable sort */
};

static int cmp_local(const void *x, const void *y)
{
    const struct cand *a = x, *b = y;
    if (a->l != b->l) return a->l < b->l ? -1 : 1;
    return (a->r > b->r) - (a->r < b->r);
}

static int cmp_score(const void *x, const void *y)
{
    const struct cand *a = x, *b = y;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    return (a->order > b->order) - (a->order < b->order);
}

static tuna_status make_merges(const struct spm_model *m, const struct tuna_strmap *ids, struct cand **out, size_t *nout)
{
    size_t cap = 1024, n = 0;
    struct cand *c = malloc(cap * sizeof *c);
    if (!c) return tuna_fail_oom("merges", cap);
    for (size_t i = 0; i < m->n; i++) {
        const struct spm_piece *p = &m->p[i];
        float score = i < 3 ? 0.0f : p->score;
        size_t start = n;
        for (size_t k = 1; k < p->n; k++) {
            if (((unsigned char)p->s[k] & 0xC0) == 0x80) continue; /* split between characters */
            int64_t l, r;
            if (!tuna_strmap_get(ids, p->s, k, &l) || !tuna_strmap_get(ids, p->s + k, p->n - k, &r)) continue;
            if (n == cap) {
                cap *= 2;
                struct cand *nc = realloc(c, cap * sizeof *nc);
                if (!nc) {
                    free(c);
                    return tuna_fail_oom("merges", cap);
                }
                c = nc;
            }
            c[n++] = (struct cand){score, (int32_t)l, (int32_t)r, 0};
        }
        qsort(c + start, n - start, sizeof *c, cmp_local);
    }
    for (size_t i = 0; i < n; i++) c[i].order = i;
    qsort(c, n, sizeof *c, cmp_score);
    *out = c;
    *nout = n;
    return TUNA_OK;
}

static cJSON *str_n(const char *s, size_t n)
{
    char *z = malloc(n + 1);
    if (!z) return NULL;
    memcpy(z, s, n);
    z[n] = '\0';
    cJSON *j = cJSON_CreateString(z);
    free(z);
    return j;
}

static cJSON *add_obj(cJSON *parent, const char *key, const char *type)
{
    cJSON *o = cJSON_AddObjectToObject(parent, key);
    if (o) cJSON_AddStringToObject(o, "type", type);
    return o;
}

/* The tokenizer.json document for m (NULL when out of memory). */
static cJSON *to_json(const struct spm_model *m, const struct tuna_strmap *ids, const struct cand *mg, size_t nmg,
                      bool legacy, bool prefix_space)
{
    static const char meta[] = "\xE2\x96\x81";
    cJSON *doc = cJSON_CreateObject(), *model = add_obj(doc, "model", "BPE");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab"), *merges = cJSON_AddArrayToObject(model, "merges");
    cJSON_AddItemToObject(model, "unk_token", str_n(m->unk, m->unk_len));
    cJSON_AddBoolToObject(model, "fuse_unk", true);
    cJSON_AddBoolToObject(model, "byte_fallback", true);
    for (size_t i = 0; i < m->n; i++) {
        int64_t first;
        /* pieces are unique in a SentencePiece model; a repeat (damaged file) keeps its first id */
        tuna_strmap_get(ids, m->p[i].s, m->p[i].n, &first);
        if ((size_t)first != i) continue;
        cJSON *k = str_n(m->p[i].s, m->p[i].n);
        if (!k) goto oom;
        cJSON_AddItemToObject(vocab, k->valuestring, cJSON_CreateNumber((double)i));
        cJSON_Delete(k);
    }
    for (size_t i = 0; i < nmg; i++) {
        cJSON *pair = cJSON_CreateArray();
        cJSON_AddItemToArray(pair, str_n(m->p[mg[i].l].s, m->p[mg[i].l].n));
        cJSON_AddItemToArray(pair, str_n(m->p[mg[i].r].s, m->p[mg[i].r].n));
        cJSON_AddItemToArray(merges, pair);
    }
    cJSON *added = cJSON_AddArrayToObject(doc, "added_tokens");
    for (size_t i = 0; i < m->n; i++) {
        int t = m->p[i].type;
        if (t != 2 && t != 3 && t != 4) continue;
        cJSON *a = cJSON_CreateObject();
        cJSON_AddNumberToObject(a, "id", (double)i);
        cJSON_AddItemToObject(a, "content", str_n(m->p[i].s, m->p[i].n));
        cJSON_AddBoolToObject(a, "normalized", false);
        cJSON_AddBoolToObject(a, "special", t != 4);
        cJSON_AddItemToArray(added, a);
    }
    if (legacy) {
        cJSON *norm = add_obj(doc, "normalizer", "Sequence"), *seq = cJSON_AddArrayToObject(norm, "normalizers");
        if (prefix_space) {
            cJSON *pp = cJSON_CreateObject();
            cJSON_AddStringToObject(pp, "type", "Prepend");
            cJSON_AddStringToObject(pp, "prepend", meta);
            cJSON_AddItemToArray(seq, pp);
        }
        cJSON *rp = cJSON_CreateObject();
        cJSON_AddStringToObject(rp, "type", "Replace");
        cJSON_AddStringToObject(cJSON_AddObjectToObject(rp, "pattern"), "String", " ");
        cJSON_AddStringToObject(rp, "content", meta);
        cJSON_AddItemToArray(seq, rp);
    } else {
        cJSON *pre = add_obj(doc, "pre_tokenizer", "Metaspace");
        cJSON_AddStringToObject(pre, "replacement", meta);
        cJSON_AddStringToObject(pre, "prepend_scheme", prefix_space ? "first" : "never");
        cJSON_AddBoolToObject(pre, "split", false);
    }
    cJSON *dec = add_obj(doc, "decoder", "Sequence"), *ds = cJSON_AddArrayToObject(dec, "decoders");
    cJSON *d1 = cJSON_CreateObject(), *d2 = cJSON_CreateObject(), *d3 = cJSON_CreateObject();
    cJSON_AddStringToObject(d1, "type", "Replace");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(d1, "pattern"), "String", meta);
    cJSON_AddStringToObject(d1, "content", " ");
    cJSON_AddStringToObject(d2, "type", "ByteFallback");
    cJSON_AddStringToObject(d3, "type", "Fuse");
    cJSON_AddItemToArray(ds, d1);
    cJSON_AddItemToArray(ds, d2);
    cJSON_AddItemToArray(ds, d3);
    if (prefix_space) {
        cJSON *d4 = cJSON_CreateObject();
        cJSON_AddStringToObject(d4, "type", "Strip");
        cJSON_AddStringToObject(d4, "content", " ");
        cJSON_AddNumberToObject(d4, "start", 1);
        cJSON_AddNumberToObject(d4, "stop", 0);
        cJSON_AddItemToArray(ds, d4);
    }
    if (!cJSON_IsObject(doc) || !vocab || !merges) goto oom;
    return doc;
oom:
    cJSON_Delete(doc);
    return NULL;
}

tuna_status tuna_tokenizer_load_sentencepiece(const char *model_path, const char *config_dir, tuna_tokenizer **out)
{
    *out = NULL;
    char *buf = NULL;
    size_t len;
    tuna_status st = tuna_read_file(model_path, 256u << 20, &buf, &len);
    if (st) return st;
    struct spm_model m = {0};
    struct tuna_strmap ids;
    tuna_strmap_init(&ids);
    struct cand *mg = NULL;
    size_t nmg = 0;
    cJSON *doc = NULL, *cfg = NULL;
    if ((st = parse_model((const unsigned char *)buf, len, &m, model_path))) goto done;
    if (m.model_type != 2) {
        st = tuna_fail(TUNA_E_UNSUPPORTED,
                       "%s: a SentencePiece %s model; tuna converts BPE models (Llama 2, Mistral) only: convert it "
                       "to tokenizer.json with transformers (AutoTokenizer.from_pretrained(...).save_pretrained)",
                       model_path, m.model_type == 1 ? "Unigram" : m.model_type == 3 ? "word" : "char");
        goto done;
    }
    for (size_t i = 0; i < m.n; i++) {
        int64_t have;
        if (!tuna_strmap_get(&ids, m.p[i].s, m.p[i].n, &have) && !tuna_strmap_put(&ids, m.p[i].s, m.p[i].n, (int64_t)i, NULL)) {
            st = tuna_fail_oom("SentencePiece vocabulary", m.n);
            goto done;
        }
    }
    if ((st = make_merges(&m, &ids, &mg, &nmg))) goto done;
    /* transformers reads legacy and add_prefix_space from tokenizer_config.json */
    bool legacy = true, prefix_space = true;
    if (config_dir) {
        char *cp = tuna_path_join(config_dir, "tokenizer_config.json");
        if (cp && tuna_path_exists(cp) && (st = tuna_json_load(cp, 0, &cfg))) {
            free(cp);
            goto done;
        }
        free(cp);
        legacy = !cJSON_IsFalse(tuna_json_member(cfg, "legacy"));
        prefix_space = !cJSON_IsFalse(tuna_json_member(cfg, "add_prefix_space"));
    }
    if (!(doc = to_json(&m, &ids, mg, nmg, legacy, prefix_space))) {
        st = tuna_fail_oom("tokenizer.json from SentencePiece", len);
        goto done;
    }
    /* BOS as LlamaTokenizerFast adds it (tokenizer_config.json's add_bos/eos_token may change it) */
    char bos[64], eos[64], unk[64];
    snprintf(bos, sizeof bos, "%.*s", (int)(m.bos_len < 63 ? m.bos_len : 63), m.bos);
    snprintf(eos, sizeof eos, "%.*s", (int)(m.eos_len < 63 ? m.eos_len : 63), m.eos);
    snprintf(unk, sizeof unk, "%.*s", (int)(m.unk_len < 63 ? m.unk_len : 63), m.unk);
    const char *defaults[4] = {bos, eos, unk, NULL};
    st = tk_build_from_doc(doc, model_path, config_dir, defaults, true, out);
done:
    cJSON_Delete(doc);
    cJSON_Delete(cfg);
    free(mg);
    tuna_strmap_free(&ids);
    free(m.p);
    free(buf);
    return st;
}
