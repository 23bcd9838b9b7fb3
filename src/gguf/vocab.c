/* vocab.c — tokenizer.json (+ tokenizer_config.json) → GGUF tokenizer metadata (§7.3).
 *
 * Two vocabulary kinds, as llama.cpp names them:
 *   "gpt2"  byte-level BPE (Llama 3, Qwen): tokens, token types, merges "a b", and "pre", the
 *           pre-tokenizer id llama.cpp selects its split regex by (found from the Split regex).
 *   "llama" SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma): tokens, types
 *           and scores. llama.cpp's SPM tokenizer merges the adjacent pair whose joined string
 *           has the highest score, so a token made by merge rank r gets score -r: the merges
 *           then happen in the tokenizer.json order.
 * Special ids come from the tokenizer module (tokenizer_config.json's bos/eos/unk/pad), whether
 * BOS/EOS are added from what its post-processor does to a test string.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "core/strmap.h"
#include "gguf/export.h"
#include "tokenizer/tokenizer.h"

/* The split regexes of the pre-tokenizers llama.cpp knows (as tokenizer.json writes them). */
static const char k_llama3_re[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                  "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char k_qwen2_re[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                                 "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* Finds the first Split regex in a pre_tokenizer tree. */
static const char *split_regex(const cJSON *pre)
{
    if (!pre) return NULL;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(pre, "type");
    if (cJSON_IsString(type) && strcmp(type->valuestring, "Split") == 0) {
        const cJSON *re = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(pre, "pattern"), "Regex");
        return cJSON_IsString(re) ? re->valuestring : NULL;
    }
    const cJSON *kids = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
    const cJSON *k;
    cJSON_ArrayForEach(k, kids)
    {
        const char *r = split_regex(k);
        if (r) return r;
    }
    return NULL;
}

struct vocab {
    char **tok;   /* [n] id → token (owned) */
    int32_t *type; /* [n] */
    float *score;  /* [n] */
    int64_t n;
};

static void vocab_free(struct vocab *v)
{
    if (v->tok)
        for (int64_t i = 0; i < v->n; i++) free(v->tok[i]);
    free(v->tok);
    free(v->type);
    free(v->score);
}

/* One merge as "a b" (a string) or ["a", "b"] (newer tokenizers). Writes "a b" into *out. */
static tuna_status merge_text(const cJSON *m, char **out, const char **a, size_t *alen, const char **b)
{
    if (cJSON_IsString(m)) {
        *out = strdup(m->valuestring);
        if (!*out) return tuna_fail_oom("merge", 0);
        char *sp = strchr(*out, ' ');
        *a = *out;
        *alen = sp ? (size_t)(sp - *out) : strlen(*out);
        *b = sp ? sp + 1 : "";
        return TUNA_OK;
    }
    if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(cJSON_GetArrayItem(m, 0)) &&
        cJSON_IsString(cJSON_GetArrayItem(m, 1))) {
        const char *x = cJSON_GetArrayItem(m, 0)->valuestring, *y = cJSON_GetArrayItem(m, 1)->valuestring;
        size_t lx = strlen(x), ly = strlen(y);
        *out = malloc(lx + ly + 2);
        if (!*out) return tuna_fail_oom("merge", lx + ly + 2);
        memcpy(*out, x, lx);
        (*out)[lx] = ' ';
        memcpy(*out + lx + 1, y, ly + 1);
        *a = *out;
        *alen = lx;
        *b = *out + lx + 1;
        return TUNA_OK;
    }
    return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: a merge is neither \"a b\" nor [\"a\", \"b\"]");
}

static bool is_byte_token(const char *s)
{
    return strlen(s) == 6 && s[0] == '<' && s[1] == '0' && s[2] == 'x' && s[5] == '>';
}

tuna_status tuna_gguf_write_vocab(tuna_gguf_writer *w, const char *dir)
{
    char *path = tuna_path_join(dir, "tokenizer.json");
    cJSON *doc = NULL;
    tuna_tokenizer *tk = NULL;
    struct vocab v = {0};
    char **merges = NULL;
    int nmerges = 0;
    tuna_status st;
    if (!path) return tuna_fail_oom("path", 0);
    if ((st = tuna_json_load(path, 512u << 20, &doc))) goto done;
    if ((st = tuna_tokenizer_load(dir, &tk))) goto done;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(doc, "model");
    const cJSON *mtype = cJSON_GetObjectItemCaseSensitive(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *mlist = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsString(mtype) || strcmp(mtype->valuestring, "BPE") != 0 || !cJSON_IsObject(vocab)) {
        st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: only BPE tokenizers can be written to GGUF (found model type %s)", path,
                       cJSON_IsString(mtype) ? mtype->valuestring : "?");
        goto done;
    }
    bool spm = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback"));
    v.n = tuna_tokenizer_vocab_size(tk);
    v.tok = calloc((size_t)v.n, sizeof *v.tok);
    v.type = calloc((size_t)v.n, sizeof *v.type);
    v.score = calloc((size_t)v.n, sizeof *v.score);
    if (!v.tok || !v.type || !v.score) {
        st = tuna_fail_oom("vocab", 0);
        goto done;
    }
    for (int64_t i = 0; i < v.n; i++) {
        const char *s = tuna_tokenizer_token_str(tk, (int32_t)i);
        char hole[32];
        if (!s) {
            snprintf(hole, sizeof hole, "[PAD%lld]", (long long)i); /* as convert_hf_to_gguf fills holes */
            s = hole;
            v.type[i] = 5; /* unused */
        } else if (tuna_tokenizer_is_special(tk, (int32_t)i)) {
            v.type[i] = 3; /* control */
        } else if (spm && is_byte_token(s)) {
            v.type[i] = 6;
        } else {
            v.type[i] = 1;
        }
        if (!(v.tok[i] = strdup(s))) {
            st = tuna_fail_oom("token", 0);
            goto done;
        }
    }
    /* added tokens that are not special: user-defined (4) */
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(doc, "added_tokens"), *a;
    cJSON_ArrayForEach(a, added)
    {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id");
        if (cJSON_IsNumber(id) && id->valuedouble >= 0 && id->valuedouble < (double)v.n &&
            !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(a, "special")))
            v.type[(int64_t)id->valuedouble] = 4;
    }
    int32_t unk = tuna_tokenizer_special_id(tk, "unk_token");
    if (unk < 0) {
        const cJSON *u = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
        if (cJSON_IsString(u)) unk = tuna_tokenizer_token_id(tk, u->valuestring);
    }
    if (unk >= 0 && unk < v.n) v.type[unk] = 2;

    nmerges = cJSON_GetArraySize(mlist);
    if (spm) {
        /* score = -rank of the merge producing the token; others keep 0 (specials, bytes) or get
         * a low score when they are joined strings no merge makes */
        for (int64_t i = 0; i < v.n; i++)
            if (v.type[i] == 1 && strlen(v.tok[i]) > 1) v.score[i] = -1e6f;
        int r = 0;
        const cJSON *m;
        cJSON_ArrayForEach(m, mlist)
        {
            char *txt;
            const char *x, *y;
            size_t xl;
            if ((st = merge_text(m, &txt, &x, &xl, &y))) goto done;
            size_t yl = strlen(y);
            char *joined = malloc(xl + yl + 1);
            if (!joined) {
                free(txt);
                st = tuna_fail_oom("merge", xl + yl);
                goto done;
            }
            memcpy(joined, x, xl);
            memcpy(joined + xl, y, yl + 1);
            int32_t id = tuna_tokenizer_token_id(tk, joined);
            if (id >= 0 && id < v.n && v.score[id] == -1e6f) v.score[id] = -(float)r;
            free(joined);
            free(txt);
            r++;
        }
    } else {
        merges = calloc((size_t)(nmerges ? nmerges : 1), sizeof *merges);
        if (!merges) {
            st = tuna_fail_oom("merges", 0);
            goto done;
        }
        int r = 0;
        const cJSON *m;
        cJSON_ArrayForEach(m, mlist)
        {
            const char *x, *y;
            size_t xl;
            if ((st = merge_text(m, &merges[r], &x, &xl, &y))) goto done;
            r++;
        }
    }

    if ((st = tuna_gguf_set_str(w, "tokenizer.ggml.model", spm ? "llama" : "gpt2"))) goto done;
    if (!spm) {
        const char *re = split_regex(cJSON_GetObjectItemCaseSensitive(doc, "pre_tokenizer"));
        const char *pre = !re ? "gpt-2" : strcmp(re, k_llama3_re) == 0 ? "llama-bpe"
                                       : strcmp(re, k_qwen2_re) == 0  ? "qwen2"
                                                                       : "default";
        if (strcmp(pre, "default") == 0)
            fprintf(stderr, "tuna: warning: %s: pre-tokenizer regex not recognised; writing tokenizer.ggml.pre = "
                            "\"default\" (llama.cpp will split text with its default regex)\n", path);
        if ((st = tuna_gguf_set_str(w, "tokenizer.ggml.pre", pre))) goto done;
    }
    if ((st = tuna_gguf_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v.tok, (size_t)v.n))) goto done;
    if (spm && (st = tuna_gguf_set_arr_f32(w, "tokenizer.ggml.scores", v.score, (size_t)v.n))) goto done;
    if ((st = tuna_gguf_set_arr_i32(w, "tokenizer.ggml.token_type", v.type, (size_t)v.n))) goto done;
    if (!spm && (st = tuna_gguf_set_arr_str(w, "tokenizer.ggml.merges", (const char *const *)merges, (size_t)nmerges)))
        goto done;
    static const char *const which[4] = {"bos_token", "eos_token", "unk_token", "pad_token"};
    static const char *const key[4] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                       "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"};
    int32_t ids[4];
    for (int i = 0; i < 4; i++) {
        ids[i] = i == 2 ? unk : tuna_tokenizer_special_id(tk, which[i]);
        if (ids[i] >= 0 && (st = tuna_gguf_set_u32(w, key[i], (uint32_t)ids[i]))) goto done;
    }
    /* what the post-processor adds around a plain word */
    int32_t *with = NULL, *without = NULL;
    size_t nw = 0, nwo = 0;
    if ((st = tuna_tokenizer_encode(tk, "a", 1, true, false, &with, &nw)) ||
        (st = tuna_tokenizer_encode(tk, "a", 1, false, false, &without, &nwo))) {
        free(with);
        goto done;
    }
    bool add_bos = nw > nwo && ids[0] >= 0 && with[0] == ids[0];
    bool add_eos = nw > nwo && ids[1] >= 0 && with[nw - 1] == ids[1];
    free(with);
    free(without);
    if ((st = tuna_gguf_set_bool(w, "tokenizer.ggml.add_bos_token", add_bos)) ||
        (st = tuna_gguf_set_bool(w, "tokenizer.ggml.add_eos_token", add_eos)))
        goto done;
    if (spm && (st = tuna_gguf_set_bool(w, "tokenizer.ggml.add_space_prefix",
                                        cJSON_GetObjectItemCaseSensitive(doc, "normalizer") != NULL)))
        goto done;
    const char *tmpl = tuna_tokenizer_chat_template(tk);
    if (tmpl && (st = tuna_gguf_set_str(w, "tokenizer.chat_template", tmpl))) goto done;
done:
    if (merges)
        for (int i = 0; i < nmerges; i++) free(merges[i]);
    free(merges);
    vocab_free(&v);
    tuna_tokenizer_free(tk);
    cJSON_Delete(doc);
    free(path);
    return st;
}
