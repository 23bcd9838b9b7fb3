/* vocab_load.c — a tuna_tokenizer from GGUF tokenizer metadata (tokenizer.ggml.*).
 *
 * The GGUF vocabulary is described as the equivalent Hugging Face tokenizer.json (as
 * transformers' GGUF loader does) and handed to the tokenizer module:
 *   gpt2  → BPE over the merges, pre-tokenizer chosen by tokenizer.ggml.pre (llama-bpe,
 *           qwen2, gpt-2/default, starcoder/refact), ByteLevel decoder;
 *   llama → SentencePiece-style BPE with byte fallback: merges come from the scores (every
 *           split of a token into two vocabulary entries, ordered by the token's score, ties by
 *           ids — the order of transformers' SentencePieceExtractor), ▁ normalizer, decoder
 *           Replace/ByteFallback/Fuse/Strip.
 * Control (3) and unknown (2) tokens become special added tokens, user-defined (4) ones plain
 * added tokens; BOS/EOS are added per tokenizer.ggml.add_bos_token/add_eos_token.
 * The tokenizer module reads files, so the two JSON files are written to a private temporary
 * folder that is removed again (a from-memory constructor there would avoid it).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/file.h"
#include "core/status.h"
#include "core/strmap.h"
#include "gguf/import.h"

static const char k_llama3_re[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                  "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char k_qwen2_re[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                                 "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

struct cand {
    float score;
    int32_t tok, l, r;
};

static int cmp_cand(const void *x, const void *y)
{
    const struct cand *a = x, *b = y;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    if (a->tok != b->tok) return a->tok < b->tok ? -1 : 1;
    if (a->l != b->l) return a->l < b->l ? -1 : 1;
    return (a->r > b->r) - (a->r < b->r);
}

static cJSON *str_n(const struct tuna_gguf_str *s) /* cJSON string from a non-terminated view */
{
    char *tmp = malloc((size_t)s->len + 1);
    if (!tmp) return NULL;
    memcpy(tmp, s->p, (size_t)s->len);
    tmp[s->len] = '\0';
    cJSON *j = cJSON_CreateString(tmp);
    free(tmp);
    return j;
}

/* SentencePiece merges from scores into the "merges" array. */
static tuna_status spm_merges(const struct tuna_gguf_kv *toks, const struct tuna_gguf_kv *scores,
                              const struct tuna_gguf_kv *types, cJSON *merges)
{
    struct tuna_strmap map;
    tuna_strmap_init(&map);
    struct cand *c = NULL;
    size_t nc = 0, cap = 0;
    tuna_status st = TUNA_OK;
    for (uint64_t i = 0; i < toks->n; i++)
        if (!tuna_strmap_put(&map, toks->strs[i].p, (size_t)toks->strs[i].len, (int64_t)i, NULL)) {
            st = tuna_fail_oom("vocab map", 0);
            goto done;
        }
    for (uint64_t i = 0; i < toks->n; i++) {
        if (types && tuna_gguf_arr_num(types, i) != 1) continue; /* only normal pieces are merge results */
        const char *s = toks->strs[i].p;
        size_t n = (size_t)toks->strs[i].len;
        for (size_t k = 1; k < n; k++) {
            if (((unsigned char)s[k] & 0xC0) == 0x80) continue; /* split at code point boundaries */
            int64_t l, r;
            if (!tuna_strmap_get(&map, s, k, &l) || !tuna_strmap_get(&map, s + k, n - k, &r)) continue;
            if (nc == cap) {
                cap = cap ? cap * 2 : 1024;
                struct cand *nn = realloc(c, cap * sizeof *nn);
                if (!nn) {
                    st = tuna_fail_oom("merges", cap * sizeof *nn);
                    goto done;
                }
                c = nn;
            }
            c[nc++] = (struct cand){scores ? (float)tuna_gguf_arr_num(scores, i) : 0.f, (int32_t)i, (int32_t)l, (int32_t)r};
        }
    }
    if (nc) qsort(c, nc, sizeof *c, cmp_cand);
    for (size_t i = 0; i < nc; i++) {
        cJSON *pair = cJSON_CreateArray();
        cJSON_AddItemToArray(pair, str_n(&toks->strs[c[i].l]));
        cJSON_AddItemToArray(pair, str_n(&toks->strs[c[i].r]));
        cJSON_AddItemToArray(merges, pair);
    }
done:
    free(c);
    tuna_strmap_free(&map);
    return st;
}

static cJSON *split_seq(const char *re, bool bytelevel_regex)
{
    cJSON *seq = cJSON_CreateObject();
    cJSON_AddStringToObject(seq, "type", "Sequence");
    cJSON *arr = cJSON_AddArrayToObject(seq, "pretokenizers");
    if (re) {
        cJSON *sp = cJSON_CreateObject();
        cJSON_AddStringToObject(sp, "type", "Split");
        cJSON_AddStringToObject(cJSON_AddObjectToObject(sp, "pattern"), "Regex", re);
        cJSON_AddStringToObject(sp, "behavior", "Isolated");
        cJSON_AddBoolToObject(sp, "invert", false);
        cJSON_AddItemToArray(arr, sp);
    } else {
        cJSON *dg = cJSON_CreateObject();
        cJSON_AddStringToObject(dg, "type", "Digits");
        cJSON_AddBoolToObject(dg, "individual_digits", true);
        cJSON_AddItemToArray(arr, dg);
    }
    cJSON *bl = cJSON_CreateObject();
    cJSON_AddStringToObject(bl, "type", "ByteLevel");
    cJSON_AddBoolToObject(bl, "add_prefix_space", false);
    cJSON_AddBoolToObject(bl, "trim_offsets", true);
    cJSON_AddBoolToObject(bl, "use_regex", bytelevel_regex);
    cJSON_AddItemToArray(arr, bl);
    return seq;
}

static cJSON *typed(const char *type)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", type);
    return o;
}

static bool get_flag(const tuna_gguf *g, const char *key, bool def)
{
    bool b;
    return tuna_gguf_get_bool(g, key, &b) == TUNA_OK ? b : def;
}

static int64_t get_id(const tuna_gguf *g, const char *key, uint64_t n)
{
    uint32_t v;
    return tuna_gguf_get_u32(g, key, &v) == TUNA_OK && v < n ? (int64_t)v : -1;
}

tuna_status tuna_gguf_tokenizer_load(const tuna_gguf *g, tuna_tokenizer **out)
{
    *out = NULL;
    const struct tuna_gguf_kv *toks, *types = NULL, *scores = NULL, *mk = NULL;
    tuna_status st = tuna_gguf_get_arr(g, "tokenizer.ggml.tokens", TUNA_GGUF_STRING, &toks);
    if (st) return st;
    char *model = NULL, *pre = NULL, *tmpl = NULL;
    if ((st = tuna_gguf_get_strdup(g, "tokenizer.ggml.model", &model))) return st;
    if (tuna_gguf_find(g, "tokenizer.ggml.token_type") &&
        (st = tuna_gguf_get_arr(g, "tokenizer.ggml.token_type", TUNA_GGUF_INT32, &types)))
        goto done0;
    if (tuna_gguf_find(g, "tokenizer.ggml.scores") &&
        (st = tuna_gguf_get_arr(g, "tokenizer.ggml.scores", TUNA_GGUF_FLOAT32, &scores)))
        goto done0;
    if (types && types->n != toks->n) {
        st = tuna_fail(TUNA_E_FORMAT, "%s: %llu token types for %llu tokens", tuna_gguf_path(g),
                       (unsigned long long)types->n, (unsigned long long)toks->n);
        goto done0;
    }
    if (scores && scores->n != toks->n) {
        st = tuna_fail(TUNA_E_FORMAT, "%s: %llu scores for %llu tokens", tuna_gguf_path(g), (unsigned long long)scores->n,
                       (unsigned long long)toks->n);
        goto done0;
    }
    bool spm = strcmp(model, "llama") == 0;
    if (!spm && strcmp(model, "gpt2") != 0) {
        st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: tokenizer.ggml.model '%s' is not supported (llama and gpt2 are)",
                       tuna_gguf_path(g), model);
        goto done0;
    }
    cJSON *doc = cJSON_CreateObject(), *cfg = cJSON_CreateObject();
    cJSON *m = cJSON_AddObjectToObject(doc, "model");
    cJSON_AddStringToObject(m, "type", "BPE");
    cJSON *vocab = cJSON_AddObjectToObject(m, "vocab");
    struct tuna_strmap seen;
    tuna_strmap_init(&seen);
    for (uint64_t i = 0; i < toks->n; i++) {
        bool dup = false;
        if (!tuna_strmap_put(&seen, toks->strs[i].p, (size_t)toks->strs[i].len, (int64_t)i, &dup)) {
            st = tuna_fail_oom("vocab", 0);
            break;
        }
        if (dup) continue; /* first id wins, as in llama.cpp's token_to_id */
        cJSON *idn = cJSON_CreateNumber((double)i);
        char *key = malloc((size_t)toks->strs[i].len + 1);
        if (!key) {
            st = tuna_fail_oom("token", 0);
            cJSON_Delete(idn);
            break;
        }
        memcpy(key, toks->strs[i].p, (size_t)toks->strs[i].len);
        key[toks->strs[i].len] = '\0';
        cJSON_AddItemToObject(vocab, key, idn);
        free(key);
    }
    tuna_strmap_free(&seen);
    cJSON *merges = cJSON_AddArrayToObject(m, "merges");
    int64_t bos = get_id(g, "tokenizer.ggml.bos_token_id", toks->n), eos = get_id(g, "tokenizer.ggml.eos_token_id", toks->n);
    int64_t unk = get_id(g, "tokenizer.ggml.unknown_token_id", toks->n);
    int64_t pad = get_id(g, "tokenizer.ggml.padding_token_id", toks->n);
    bool add_bos = get_flag(g, "tokenizer.ggml.add_bos_token", spm), add_eos = get_flag(g, "tokenizer.ggml.add_eos_token", false);
    if (st) goto done;
    if (spm) {
        cJSON_AddBoolToObject(m, "byte_fallback", true);
        cJSON_AddBoolToObject(m, "fuse_unk", true);
        if (unk >= 0) cJSON_AddItemToObject(m, "unk_token", str_n(&toks->strs[unk]));
        if ((st = spm_merges(toks, scores, types, merges))) goto done;
        cJSON *norm = typed("Sequence"), *nl = cJSON_AddArrayToObject(norm, "normalizers");
        if (get_flag(g, "tokenizer.ggml.add_space_prefix", true)) {
            cJSON *p = typed("Prepend");
            cJSON_AddStringToObject(p, "prepend", "\xe2\x96\x81");
            cJSON_AddItemToArray(nl, p);
        }
        cJSON *r = typed("Replace");
        cJSON_AddStringToObject(cJSON_AddObjectToObject(r, "pattern"), "String", " ");
        cJSON_AddStringToObject(r, "content", "\xe2\x96\x81");
        cJSON_AddItemToArray(nl, r);
        cJSON_AddItemToObject(doc, "normalizer", norm);
        cJSON *dec = typed("Sequence"), *dl = cJSON_AddArrayToObject(dec, "decoders");
        cJSON *dr = typed("Replace");
        cJSON_AddStringToObject(cJSON_AddObjectToObject(dr, "pattern"), "String", "\xe2\x96\x81");
        cJSON_AddStringToObject(dr, "content", " ");
        cJSON_AddItemToArray(dl, dr);
        cJSON_AddItemToArray(dl, typed("ByteFallback"));
        cJSON_AddItemToArray(dl, typed("Fuse"));
        cJSON *ds = typed("Strip");
        cJSON_AddStringToObject(ds, "content", " ");
        cJSON_AddNumberToObject(ds, "start", 1);
        cJSON_AddNumberToObject(ds, "stop", 0);
        cJSON_AddItemToArray(dl, ds);
        cJSON_AddItemToObject(doc, "decoder", dec);
    } else {
        if (tuna_gguf_find(g, "tokenizer.ggml.merges") &&
            (st = tuna_gguf_get_arr(g, "tokenizer.ggml.merges", TUNA_GGUF_STRING, &mk)))
            goto done;
        for (uint64_t i = 0; mk && i < mk->n; i++) cJSON_AddItemToArray(merges, str_n(&mk->strs[i]));
        if (tuna_gguf_find(g, "tokenizer.ggml.pre") && (st = tuna_gguf_get_strdup(g, "tokenizer.ggml.pre", &pre))) goto done;
        const char *p = pre ? pre : "default";
        cJSON *pt;
        if (!strcmp(p, "llama-bpe") || !strcmp(p, "llama3") || !strcmp(p, "llama-v3") || !strcmp(p, "dbrx") ||
            !strcmp(p, "smaug-bpe")) {
            pt = split_seq(k_llama3_re, false);
            cJSON_AddBoolToObject(m, "ignore_merges", true);
        } else if (!strcmp(p, "qwen2") || !strcmp(p, "deepseek-r1-qwen")) {
            pt = split_seq(k_qwen2_re, false);
            cJSON_AddItemToObject(doc, "normalizer", typed("NFC"));
        } else if (!strcmp(p, "gpt-2") || !strcmp(p, "gpt2") || !strcmp(p, "default")) {
            pt = typed("ByteLevel");
            cJSON_AddBoolToObject(pt, "add_prefix_space", false);
            cJSON_AddBoolToObject(pt, "use_regex", true);
        } else if (!strcmp(p, "starcoder") || !strcmp(p, "refact")) {
            pt = split_seq(NULL, true);
        } else {
            st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: tokenizer.ggml.pre '%s' is not supported (llama-bpe, qwen2, gpt-2, "
                           "default, starcoder, refact are)", tuna_gguf_path(g), p);
            goto done;
        }
        cJSON_AddItemToObject(doc, "pre_tokenizer", pt);
        cJSON_AddItemToObject(doc, "decoder", typed("ByteLevel"));
    }
    cJSON *added = cJSON_AddArrayToObject(doc, "added_tokens");
    for (uint64_t i = 0; types && i < types->n; i++) {
        int ty = (int)tuna_gguf_arr_num(types, i);
        if (ty != 2 && ty != 3 && ty != 4) continue;
        cJSON *a = cJSON_CreateObject();
        cJSON_AddNumberToObject(a, "id", (double)i);
        cJSON_AddItemToObject(a, "content", str_n(&toks->strs[i]));
        cJSON_AddBoolToObject(a, "single_word", false);
        cJSON_AddBoolToObject(a, "lstrip", false);
        cJSON_AddBoolToObject(a, "rstrip", false);
        cJSON_AddBoolToObject(a, "normalized", false);
        cJSON_AddBoolToObject(a, "special", ty != 4);
        cJSON_AddItemToArray(added, a);
    }
    if ((add_bos && bos >= 0) || (add_eos && eos >= 0)) {
        cJSON *pp = typed("TemplateProcessing"), *single = cJSON_AddArrayToObject(pp, "single");
        cJSON *sp = cJSON_AddObjectToObject(pp, "special_tokens");
        int64_t ends[2] = {add_bos ? bos : -1, add_eos ? eos : -1};
        for (int e = 0; e < 2; e++) {
            if (e == 1) {
                cJSON *seq = cJSON_CreateObject();
                cJSON *so = cJSON_AddObjectToObject(seq, "Sequence");
                cJSON_AddStringToObject(so, "id", "A");
                cJSON_AddNumberToObject(so, "type_id", 0);
                cJSON_AddItemToArray(single, seq);
            }
            if (ends[e] < 0) continue;
            char nm[8];
            snprintf(nm, sizeof nm, "T%d", e);
            cJSON *it = cJSON_CreateObject();
            cJSON *st_ = cJSON_AddObjectToObject(it, "SpecialToken");
            cJSON_AddStringToObject(st_, "id", nm);
            cJSON_AddNumberToObject(st_, "type_id", 0);
            cJSON_AddItemToArray(single, it);
            cJSON *def = cJSON_AddObjectToObject(sp, nm);
            cJSON_AddStringToObject(def, "id", nm);
            cJSON *ids = cJSON_AddArrayToObject(def, "ids");
            cJSON_AddItemToArray(ids, cJSON_CreateNumber((double)ends[e]));
            cJSON *ts = cJSON_AddArrayToObject(def, "tokens");
            cJSON_AddItemToArray(ts, str_n(&toks->strs[ends[e]]));
        }
        cJSON_AddItemToObject(doc, "post_processor", pp);
    }
    static const char *const cfg_key[4] = {"bos_token", "eos_token", "unk_token", "pad_token"};
    int64_t cfg_id[4] = {bos, eos, unk, pad};
    for (int i = 0; i < 4; i++)
        if (cfg_id[i] >= 0) cJSON_AddItemToObject(cfg, cfg_key[i], str_n(&toks->strs[cfg_id[i]]));
    if (tuna_gguf_get_strdup(g, "tokenizer.chat_template", &tmpl) == TUNA_OK) cJSON_AddStringToObject(cfg, "chat_template", tmpl);

    /* hand both files to the tokenizer module through a private temporary folder */
    const char *base = getenv("TMPDIR");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/tuna-gguf-vocab-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(dir)) {
        st = tuna_fail(TUNA_E_IO, "cannot create a temporary folder under %s for the GGUF tokenizer", base ? base : "/tmp");
        goto done;
    }
    char *tj = cJSON_PrintUnformatted(doc), *cj = cJSON_PrintUnformatted(cfg);
    char *p1 = tuna_path_join(dir, "tokenizer.json"), *p2 = tuna_path_join(dir, "tokenizer_config.json");
    if (!tj || !cj || !p1 || !p2) st = tuna_fail_oom("tokenizer json", 0);
    if (!st) st = tuna_write_file_atomic(p1, tj, strlen(tj));
    if (!st) st = tuna_write_file_atomic(p2, cj, strlen(cj));
    if (!st) st = tuna_tokenizer_load(dir, out);
    if (st) st = tuna_fail_prefix(st, "%s: building the tokenizer from GGUF metadata", tuna_gguf_path(g));
    tuna_remove_tree(dir);
    free(tj);
    free(cj);
    free(p1);
    free(p2);
done:
    cJSON_Delete(doc);
    cJSON_Delete(cfg);
done0:
    free(model);
    free(pre);
    free(tmpl);
    return st;
}
