/* tokenizer.c — loading tokenizer.json (+ tokenizer_config.json, special_tokens_map.json,
 * chat_template.jinja), the encode pipeline (added tokens → normalizer → pre-tokenizer → model
 * → post-processor) and the small lookups. Follows the HF tokenizers serialization format. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "tokenizer/tok_internal.h"

static const char *const special_names[4] = {"bos_token", "eos_token", "unk_token", "pad_token"};

void tuna_tokenizer_free(tuna_tokenizer *t)
{
    if (!t) return;
    tk_model_free(&t->model);
    if (t->norm) tk_norm_free(t->norm);
    free(t->norm);
    if (t->pre) tk_pre_free(t->pre);
    free(t->pre);
    if (t->dec) tk_dec_free(t->dec);
    free(t->dec);
    free(t->post.tmpl);
    for (size_t i = 0; i < t->nadded; i++) {
        free(t->added[i].content);
        if (t->norm_content) free(t->norm_content[i]);
    }
    free(t->added);
    free(t->norm_content);
    tuna_strmap_free(&t->added_map);
    free(t->added_by_id);
    tk_matcher_free(&t->match_raw);
    tk_matcher_free(&t->match_norm);
    for (int i = 0; i < 4; i++) free(t->special_str[i]);
    free(t->chat_template);
    free(t);
}

static tuna_status tok_new(tuna_tokenizer **out)
{
    tuna_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return tuna_fail_oom("tokenizer", sizeof *t);
    tk_model_init(&t->model);
    tuna_strmap_init(&t->added_map);
    for (int i = 0; i < 4; i++) t->special_id[i] = -1;
    *out = t;
    return TUNA_OK;
}

/* ---------------- model ---------------- */

static tuna_status opt_str(const cJSON *m, const char *key, char **out)
{
    const cJSON *v = tuna_json_member(m, key);
    *out = NULL;
    if (!v || !cJSON_IsString(v) || !v->valuestring[0]) return TUNA_OK;
    *out = strdup(v->valuestring);
    return *out ? TUNA_OK : tuna_fail_oom("tokenizer", 0);
}

static tuna_status load_vocab_obj(struct tk_model *m, const cJSON *vocab, const char *where)
{
    if (!cJSON_IsObject(vocab)) return tuna_fail(TUNA_E_FORMAT, "%s: \"vocab\" is not an object of token → id", where);
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab)
    {
        if (!cJSON_IsNumber(e)) return tuna_fail(TUNA_E_FORMAT, "%s: vocab entry \"%s\" is not a number", where, e->string);
        tuna_status st = tk_model_add_token(m, e->string, strlen(e->string), (int64_t)e->valuedouble);
        if (st) return tuna_fail_prefix(st, "%s", where);
    }
    return TUNA_OK;
}

static tuna_status load_model(tuna_tokenizer *t, const cJSON *m, const char *where)
{
    if (!cJSON_IsObject(m)) return tuna_fail(TUNA_E_FORMAT, "%s: no \"model\" object", where);
    const cJSON *ty = tuna_json_member(m, "type");
    const char *type = cJSON_IsString(ty) ? ty->valuestring : NULL;
    const cJSON *vocab = tuna_json_member(m, "vocab");
    if (!type) { /* old files leave the type out: infer it the way HF's untagged enum does */
        if (tuna_json_member(m, "merges")) type = "BPE";
        else if (cJSON_IsArray(vocab)) type = "Unigram";
        else if (tuna_json_member(m, "max_input_chars_per_word")) type = "WordPiece";
        else type = "WordLevel";
    }
    struct tk_model *md = &t->model;
    tuna_status st;
    if (!strcmp(type, "WordPiece")) {
        md->type = TK_MODEL_WORDPIECE;
        if ((st = load_vocab_obj(md, vocab, where))) return st;
        if ((st = opt_str(m, "continuing_subword_prefix", &md->cont_prefix))) return st;
        if (!md->cont_prefix && !(md->cont_prefix = strdup("##"))) return tuna_fail_oom("tokenizer", 0);
        const cJSON *mx = tuna_json_member(m, "max_input_chars_per_word");
        if (cJSON_IsNumber(mx)) md->max_chars_per_word = (int64_t)mx->valuedouble;
    } else if (!strcmp(type, "BPE")) {
        md->type = TK_MODEL_BPE;
        if ((st = load_vocab_obj(md, vocab, where))) return st;
        if ((st = opt_str(m, "continuing_subword_prefix", &md->cont_prefix))) return st;
        if ((st = opt_str(m, "end_of_word_suffix", &md->eow_suffix))) return st;
        md->fuse_unk = cJSON_IsTrue(tuna_json_member(m, "fuse_unk"));
        md->byte_fallback = cJSON_IsTrue(tuna_json_member(m, "byte_fallback"));
        md->ignore_merges = cJSON_IsTrue(tuna_json_member(m, "ignore_merges"));
        const cJSON *merges = tuna_json_member(m, "merges");
        if (merges && !cJSON_IsArray(merges)) return tuna_fail(TUNA_E_FORMAT, "%s: \"merges\" is not an array", where);
        uint32_t rank = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, merges)
        {
            if (cJSON_IsString(e)) st = tk_model_add_merge_line(md, e->valuestring, strlen(e->valuestring), rank, where);
            else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(cJSON_GetArrayItem(e, 0)) &&
                     cJSON_IsString(cJSON_GetArrayItem(e, 1))) {
                const char *a = cJSON_GetArrayItem(e, 0)->valuestring, *b = cJSON_GetArrayItem(e, 1)->valuestring;
                st = tk_model_add_merge(md, a, strlen(a), b, strlen(b), rank, where);
            } else
                st = tuna_fail(TUNA_E_FORMAT, "%s: merge %u is neither \"a b\" nor [\"a\", \"b\"]", where, rank);
            if (st) return st;
            rank++;
        }
    } else if (!strcmp(type, "WordLevel")) {
        md->type = TK_MODEL_WORDLEVEL;
        if ((st = load_vocab_obj(md, vocab, where))) return st;
    } else if (!strcmp(type, "Unigram")) {
        if ((st = tk_unigram_load(md, m, where))) return st;
        return tk_model_finish(md);
    } else {
        return tuna_fail(TUNA_E_UNSUPPORTED,
                         "%s: model type %s is not supported (tuna handles BPE, Unigram, WordPiece and WordLevel)", where, type);
    }
    char *unk = NULL;
    if ((st = opt_str(m, "unk_token", &unk))) return st;
    if (unk) {
        int64_t id;
        /* an unk_token missing from the vocabulary only matters when an unknown character
         * comes (HF fails then; tuna drops it for BPE, refuses for WordPiece) */
        if (tuna_strmap_gets(&md->vocab, unk, &id)) md->unk_id = (int32_t)id;
        free(unk);
    }
    return tk_model_finish(md);
}

/* ---------------- post-processor ---------------- */

static tuna_status post_append(struct tk_post *p, int32_t v)
{
    int32_t *n = realloc(p->tmpl, (p->n + 1) * sizeof *n);
    if (!n) return tuna_fail_oom("post-processor", p->n);
    p->tmpl = n;
    p->tmpl[p->n++] = v;
    return TUNA_OK;
}

/* Parses one processor into *p (a template where TK_POST_SEQ stands for the sequence). */
static tuna_status parse_post_one(const cJSON *j, struct tk_post *p)
{
    const cJSON *ty = tuna_json_member(j, "type");
    if (!cJSON_IsString(ty)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: post_processor without a \"type\"");
    const char *t = ty->valuestring;
    tuna_status st;
    p->present = true;
    if (!strcmp(t, "ByteLevel")) return post_append(p, TK_POST_SEQ);
    if (!strcmp(t, "RobertaProcessing") || !strcmp(t, "BertProcessing")) {
        const cJSON *cls = tuna_json_member(j, "cls"), *sep = tuna_json_member(j, "sep");
        if (!cJSON_IsArray(cls) || !cJSON_IsArray(sep) || !cJSON_IsNumber(cJSON_GetArrayItem(cls, 1)) ||
            !cJSON_IsNumber(cJSON_GetArrayItem(sep, 1)))
            return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: %s needs \"cls\" and \"sep\" as [token, id]", t);
        if ((st = post_append(p, (int32_t)cJSON_GetArrayItem(cls, 1)->valuedouble))) return st;
        if ((st = post_append(p, TK_POST_SEQ))) return st;
        return post_append(p, (int32_t)cJSON_GetArrayItem(sep, 1)->valuedouble);
    }
    if (!strcmp(t, "TemplateProcessing")) {
        const cJSON *single = tuna_json_member(j, "single"), *specials = tuna_json_member(j, "special_tokens");
        if (!cJSON_IsArray(single)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: TemplateProcessing without \"single\"");
        const cJSON *e;
        cJSON_ArrayForEach(e, single)
        {
            const cJSON *sp = tuna_json_member(e, "SpecialToken");
            if (tuna_json_member(e, "Sequence")) {
                if ((st = post_append(p, TK_POST_SEQ))) return st;
            } else if (sp) {
                const cJSON *id = tuna_json_member(sp, "id");
                const cJSON *def = cJSON_IsString(id) ? tuna_json_member(specials, id->valuestring) : NULL;
                const cJSON *ids = tuna_json_member(def, "ids");
                if (!cJSON_IsArray(ids))
                    return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: TemplateProcessing uses special token \"%s\" that "
                                     "\"special_tokens\" does not define",
                                     cJSON_IsString(id) ? id->valuestring : "?");
                const cJSON *x;
                cJSON_ArrayForEach(x, ids)
                {
                    if (!cJSON_IsNumber(x)) return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: special token ids are not numbers");
                    if ((st = post_append(p, (int32_t)x->valuedouble))) return st;
                }
            } else {
                return tuna_fail(TUNA_E_FORMAT, "tokenizer.json: TemplateProcessing item is neither SpecialToken nor Sequence");
            }
        }
        return TUNA_OK;
    }
    return tuna_fail(TUNA_E_UNSUPPORTED,
                     "tokenizer.json: post_processor type \"%s\" is not supported (tuna handles TemplateProcessing, "
                     "ByteLevel, RobertaProcessing, BertProcessing, Sequence)",
                     t);
}

static tuna_status parse_post(const cJSON *j, struct tk_post *p)
{
    const cJSON *ty = tuna_json_member(j, "type");
    if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "Sequence") != 0) return parse_post_one(j, p);
    /* compose: each processor wraps the output of the previous one */
    p->present = true;
    tuna_status st = post_append(p, TK_POST_SEQ);
    if (st) return st;
    const cJSON *e;
    cJSON_ArrayForEach(e, tuna_json_member(j, "processors"))
    {
        struct tk_post q = {0}, r = {0};
        st = parse_post(e, &q);
        for (size_t i = 0; !st && i < q.n; i++) {
            if (q.tmpl[i] != TK_POST_SEQ) st = post_append(&r, q.tmpl[i]);
            else
                for (size_t k = 0; !st && k < p->n; k++) st = post_append(&r, p->tmpl[k]);
        }
        free(q.tmpl);
        if (st) {
            free(r.tmpl);
            return st;
        }
        free(p->tmpl);
        p->tmpl = r.tmpl;
        p->n = r.n;
    }
    return TUNA_OK;
}

/* ---------------- loading ---------------- */

static tuna_status load_added(tuna_tokenizer *t, const cJSON *arr, const char *where)
{
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        const cJSON *id = tuna_json_member(e, "id"), *c = tuna_json_member(e, "content");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(c))
            return tuna_fail(TUNA_E_FORMAT, "%s: an added_tokens entry lacks \"id\" or \"content\"", where);
        tuna_status st = tk_added_add(t, c->valuestring, (int32_t)id->valuedouble,
                                      cJSON_IsTrue(tuna_json_member(e, "special")),
                                      !cJSON_IsFalse(tuna_json_member(e, "normalized")),
                                      cJSON_IsTrue(tuna_json_member(e, "lstrip")), cJSON_IsTrue(tuna_json_member(e, "rstrip")),
                                      cJSON_IsTrue(tuna_json_member(e, "single_word")));
        if (st) return st;
    }
    return TUNA_OK;
}

/* A special token entry of tokenizer_config.json: "str" or {"content": "str", ...}. */
static const char *token_content(const cJSON *v)
{
    if (cJSON_IsString(v)) return v->valuestring;
    const cJSON *c = tuna_json_member(v, "content");
    return cJSON_IsString(c) ? c->valuestring : NULL;
}

/* The parts of tokenizer_config.json tuna uses (cfg may be NULL). */
static tuna_status apply_config(tuna_tokenizer *t, const cJSON *cfg)
{
    tuna_status st = TUNA_OK;
    const cJSON *e;
    if (cfg) {
        const cJSON *dec = tuna_json_member(cfg, "added_tokens_decoder");
        cJSON_ArrayForEach(e, dec)
        {
            const char *c = token_content(e);
            char *end;
            long id = strtol(e->string, &end, 10);
            if (!c || *end || id < 0) continue;
            int64_t have;
            if (tuna_strmap_gets(&t->added_map, c, &have)) continue;
            if ((st = tk_added_add(t, c, (int32_t)id, cJSON_IsTrue(tuna_json_member(e, "special")),
                                   cJSON_IsTrue(tuna_json_member(e, "normalized")),
                                   cJSON_IsTrue(tuna_json_member(e, "lstrip")), cJSON_IsTrue(tuna_json_member(e, "rstrip")),
                                   cJSON_IsTrue(tuna_json_member(e, "single_word")))))
                goto done;
        }
        for (int i = 0; i < 4; i++) {
            const char *c = token_content(tuna_json_member(cfg, special_names[i]));
            if (c && !(t->special_str[i] = strdup(c))) {
                st = tuna_fail_oom("tokenizer", 0);
                goto done;
            }
        }
        t->clean_up_spaces = cJSON_IsTrue(tuna_json_member(cfg, "clean_up_tokenization_spaces"));
        const cJSON *cls = tuna_json_member(cfg, "tokenizer_class");
        static const char *const rebuilds[] = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer",
                                               "CodeLlamaTokenizerFast", "GemmaTokenizer", "GemmaTokenizerFast"};
        for (size_t i = 0; cJSON_IsString(cls) && i < sizeof rebuilds / sizeof rebuilds[0]; i++)
            if (!strcmp(cls->valuestring, rebuilds[i])) t->rebuild_post = true;
        t->add_bos = !cJSON_IsFalse(tuna_json_member(cfg, "add_bos_token"));
        t->add_eos = cJSON_IsTrue(tuna_json_member(cfg, "add_eos_token"));
        const cJSON *ct = tuna_json_member(cfg, "chat_template");
        const char *tmpl = NULL;
        if (cJSON_IsString(ct)) tmpl = ct->valuestring;
        else if (cJSON_IsArray(ct))
            cJSON_ArrayForEach(e, ct)
            {
                const cJSON *nm = tuna_json_member(e, "name"), *tt = tuna_json_member(e, "template");
                if (cJSON_IsString(nm) && !strcmp(nm->valuestring, "default") && cJSON_IsString(tt)) tmpl = tt->valuestring;
            }
        if (tmpl && !(t->chat_template = strdup(tmpl))) {
            st = tuna_fail_oom("tokenizer", 0);
            goto done;
        }
    }
done:
    return st;
}

static tuna_status load_config(tuna_tokenizer *t, const char *dir)
{
    tuna_status st = TUNA_OK;
    char *path = tuna_path_join(dir, "tokenizer_config.json");
    if (!path) return tuna_fail_oom("path", 0);
    cJSON *cfg = NULL;
    if (tuna_path_exists(path) && (st = tuna_json_load(path, 0, &cfg))) {
        free(path);
        return st;
    }
    free(path);
    if ((st = apply_config(t, cfg))) goto done;
    /* special_tokens_map.json fills what the config left out */
    path = tuna_path_join(dir, "special_tokens_map.json");
    if (!path) {
        st = tuna_fail_oom("path", 0);
        goto done;
    }
    cJSON *map = NULL;
    if (tuna_path_exists(path)) st = tuna_json_load(path, 0, &map);
    free(path);
    if (st) goto done;
    for (int i = 0; map && i < 4; i++) {
        const char *c = token_content(tuna_json_member(map, special_names[i]));
        if (c && !t->special_str[i] && !(t->special_str[i] = strdup(c))) st = tuna_fail_oom("tokenizer", 0);
    }
    cJSON_Delete(map);
    if (st) goto done;
    /* chat_template.jinja (transformers ≥ 4.43 saves it apart) wins over the config entry */
    path = tuna_path_join(dir, "chat_template.jinja");
    if (path && tuna_path_exists(path)) {
        char *txt;
        size_t n;
        if (!(st = tuna_read_file(path, 16u << 20, &txt, &n))) {
            free(t->chat_template);
            t->chat_template = txt;
        }
    } else if (path) {
        free(path);
        path = tuna_path_join(dir, "chat_template.json");
        cJSON *cj = NULL;
        if (path && tuna_path_exists(path) && !(st = tuna_json_load(path, 0, &cj))) {
            const cJSON *ct = tuna_json_member(cj, "chat_template");
            if (cJSON_IsString(ct)) {
                free(t->chat_template);
                t->chat_template = strdup(ct->valuestring);
            }
            cJSON_Delete(cj);
        }
    }
    free(path);
done:
    cJSON_Delete(cfg);
    return st;
}

static tuna_status finish(tuna_tokenizer *t)
{
    tuna_status st = tk_added_build(t);
    if (st) return st;
    for (int i = 0; i < 4; i++)
        t->special_id[i] = t->special_str[i] ? tuna_tokenizer_token_id(t, t->special_str[i]) : -1;
    if (t->rebuild_post) {
        if ((t->add_bos && t->special_id[0] < 0) || (t->add_eos && t->special_id[1] < 0))
            return tuna_fail(TUNA_E_FORMAT, "tokenizer_config.json asks for add_%s_token but its %s is not a token",
                             t->add_bos && t->special_id[0] < 0 ? "bos" : "eos",
                             t->add_bos && t->special_id[0] < 0 ? "bos_token" : "eos_token");
        free(t->post.tmpl);
        memset(&t->post, 0, sizeof t->post);
        t->post.present = true;
        if ((t->add_bos && (st = post_append(&t->post, t->special_id[0]))) || (st = post_append(&t->post, TK_POST_SEQ)) ||
            (t->add_eos && (st = post_append(&t->post, t->special_id[1]))))
            return st;
    }
    return TUNA_OK;
}

#define PARSE_PART(key, type, field, parser)                                                                           \
    do {                                                                                                               \
        const cJSON *x_ = tuna_json_member(doc, key);                                                                  \
        if (x_) {                                                                                                      \
            t->field = calloc(1, sizeof(type));                                                                        \
            if (!t->field) {                                                                                           \
                st = tuna_fail_oom("tokenizer", 0);                                                                    \
                goto fail;                                                                                             \
            }                                                                                                          \
            if ((st = parser(x_, t->field))) goto fail;                                                                \
        }                                                                                                              \
    } while (0)

/* Builds a tokenizer from a parsed tokenizer.json; then either config_dir's files or the parsed
 * config (either may be NULL). `what` names the source in messages. */
static tuna_status build_ex(const cJSON *doc, const char *what, const char *config_dir, const cJSON *config,
                            const char *const *special_defaults, bool llama_post, tuna_tokenizer **out)
{
    tuna_tokenizer *t = NULL;
    tuna_status st;
    if ((st = tok_new(&t))) goto fail;
    if (llama_post) { /* LlamaTokenizerFast: BOS + sequence unless the config says otherwise */
        t->rebuild_post = true;
        t->add_bos = true;
    }
    if ((st = load_model(t, tuna_json_member(doc, "model"), what))) goto fail;
    PARSE_PART("normalizer", struct tk_norm, norm, tk_norm_parse);
    PARSE_PART("pre_tokenizer", struct tk_pre, pre, tk_pre_parse);
    PARSE_PART("decoder", struct tk_dec, dec, tk_dec_parse);
    const cJSON *pp = tuna_json_member(doc, "post_processor");
    if (pp && (st = parse_post(pp, &t->post))) goto fail;
    if ((st = load_added(t, tuna_json_member(doc, "added_tokens"), what))) goto fail;
    if (config_dir && (st = load_config(t, config_dir))) goto fail;
    if (config && (st = apply_config(t, config))) goto fail;
    for (int i = 0; special_defaults && i < 4; i++)
        if (special_defaults[i] && !t->special_str[i] && !(t->special_str[i] = strdup(special_defaults[i]))) {
            st = tuna_fail_oom("tokenizer", 0);
            goto fail;
        }
    if ((st = finish(t))) goto fail;
    *out = t;
    return TUNA_OK;
fail:
    tuna_tokenizer_free(t);
    return tuna_fail_prefix(st, "loading tokenizer %s", what);
}

static tuna_status build(const cJSON *doc, const char *what, const char *config_dir, const cJSON *config,
                         tuna_tokenizer **out)
{
    return build_ex(doc, what, config_dir, config, NULL, false, out);
}

tuna_status tk_build_from_doc(const cJSON *doc, const char *what, const char *config_dir,
                              const char *const special_defaults[4], bool llama_post, tuna_tokenizer **out)
{
    return build_ex(doc, what, config_dir, NULL, special_defaults, llama_post, out);
}

tuna_status tuna_tokenizer_load_file(const char *tokenizer_json, const char *config_dir, tuna_tokenizer **out)
{
    *out = NULL;
    cJSON *doc = NULL;
    tuna_status st = tuna_json_load(tokenizer_json, 256u << 20, &doc);
    if (st) return st;
    st = build(doc, tokenizer_json, config_dir, NULL, out);
    cJSON_Delete(doc);
    return st;
}

tuna_status tuna_tokenizer_load_json(const char *json, size_t len, const char *config_json, size_t config_len,
                                     tuna_tokenizer **out)
{
    *out = NULL;
    cJSON *doc = NULL, *cfg = NULL;
    tuna_status st = tuna_json_parse(json, len, "tokenizer.json", &doc);
    if (st) return st;
    if (config_json && (st = tuna_json_parse(config_json, config_len, "tokenizer_config.json", &cfg))) {
        cJSON_Delete(doc);
        return st;
    }
    st = build(doc, "tokenizer.json (in memory)", NULL, cfg, out);
    cJSON_Delete(doc);
    cJSON_Delete(cfg);
    return st;
}

tuna_status tuna_tokenizer_load(const char *dir, tuna_tokenizer **out)
{
    *out = NULL;
    char *path = tuna_path_join(dir, "tokenizer.json");
    if (!path) return tuna_fail_oom("path", 0);
    if (!tuna_path_exists(path)) {
        /* an older folder with only SentencePiece's tokenizer.model: convert it as transformers does */
        char *spm = tuna_path_join(dir, "tokenizer.model");
        tuna_status st;
        if (spm && tuna_path_exists(spm)) st = tuna_tokenizer_load_sentencepiece(spm, dir, out);
        else
            st = tuna_fail(TUNA_E_NOT_FOUND,
                           "%s not found (nor tokenizer.model): tuna reads the Hugging Face tokenizer.json; a folder "
                           "with only vocab.json/merges.txt needs tuna_tokenizer_load_vocab_merges or converting "
                           "with transformers",
                           path);
        free(spm);
        free(path);
        return st;
    }
    tuna_status st = tuna_tokenizer_load_file(path, dir, out);
    free(path);
    return st;
}

tuna_status tuna_tokenizer_load_vocab_merges(const char *vocab_json, const char *merges_txt, const char *split_regex,
                                             bool nfc, bool ignore_merges, tuna_tokenizer **out)
{
    *out = NULL;
    tuna_tokenizer *t = NULL;
    cJSON *vocab = NULL;
    char *merges = NULL;
    size_t mlen;
    tuna_status st = tok_new(&t);
    if (st) return st;
    if ((st = tuna_json_load(vocab_json, 256u << 20, &vocab))) goto fail;
    if ((st = load_vocab_obj(&t->model, vocab, vocab_json))) goto fail;
    if ((st = tuna_read_file(merges_txt, 256u << 20, &merges, &mlen))) goto fail;
    uint32_t rank = 0;
    size_t i = 0;
    bool first_line = true;
    while (i < mlen) {
        size_t e = i;
        while (e < mlen && merges[e] != '\n') e++;
        size_t le = e;
        if (le > i && merges[le - 1] == '\r') le--;
        bool header = first_line && le - i >= 8 && memcmp(merges + i, "#version", 8) == 0;
        first_line = false;
        if (!header && le > i) {
            if ((st = tk_model_add_merge_line(&t->model, merges + i, le - i, rank, merges_txt))) goto fail;
            rank++;
        }
        i = e + 1;
    }
    t->model.type = TK_MODEL_BPE;
    t->model.ignore_merges = ignore_merges;
    if ((st = tk_model_finish(&t->model))) goto fail;
    if (nfc) {
        if (!(t->norm = calloc(1, sizeof *t->norm))) goto oom;
        t->norm->type = TK_NORM_NFC;
    }
    if (!(t->pre = calloc(1, sizeof *t->pre))) goto oom;
    if (split_regex) {
        t->pre->type = TK_PRE_SEQUENCE;
        if (!(t->pre->kids = calloc(2, sizeof *t->pre->kids))) goto oom;
        t->pre->nkids = 2;
        t->pre->kids[0].type = TK_PRE_SPLIT;
        t->pre->kids[0].behavior = TK_SPLIT_ISOLATED;
        if ((st = tk_pattern_regex(&t->pre->kids[0].pat, split_regex, "split regex"))) goto fail;
        t->pre->kids[1].type = TK_PRE_BYTELEVEL;
    } else {
        t->pre->type = TK_PRE_BYTELEVEL;
        t->pre->use_regex = true;
        if ((st = tk_pattern_regex(&t->pre->pat, tk_gpt2_regex, "ByteLevel"))) goto fail;
    }
    if (!(t->dec = calloc(1, sizeof *t->dec))) goto oom;
    t->dec->type = TK_DEC_BYTELEVEL;
    if ((st = finish(t))) goto fail;
    cJSON_Delete(vocab);
    free(merges);
    *out = t;
    return TUNA_OK;
oom:
    st = tuna_fail_oom("tokenizer", 0);
fail:
    cJSON_Delete(vocab);
    free(merges);
    tuna_tokenizer_free(t);
    return st;
}

/* ---------------- encode ---------------- */

static bool push_id(int32_t **ids, size_t *n, size_t *cap, int32_t id)
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

/* Normalized text of one piece (between raw added tokens) → ids. */
static tuna_status encode_normalized(const tuna_tokenizer *t, const char *s, size_t n, bool first, bool parse_special,
                                     int32_t **ids, size_t *nids, size_t *cap)
{
    tk_aseg *segs = NULL;
    size_t nseg = 0;
    tuna_status st = TUNA_OK;
    tk_aseg whole = {0, n, -1};
    if (t->match_norm.n) {
        if ((st = tk_added_split(t, &t->match_norm, parse_special, s, n, &segs, &nseg))) return st;
    }
    tk_aseg *v = segs ? segs : &whole;
    size_t nv = segs ? nseg : 1;
    tk_pieces l = {0};
    for (size_t i = 0; !st && i < nv; i++) {
        if (v[i].added >= 0) {
            if (!push_id(ids, nids, cap, t->added[v[i].added].id)) st = tuna_fail_oom("ids", *nids);
            continue;
        }
        if (v[i].end == v[i].start) continue;
        l.n = 0;
        l.text.n = 0;
        if (!tk_pieces_add(&l, s + v[i].start, v[i].end - v[i].start, first && v[i].start == 0)) {
            st = tuna_fail_oom("encode", n);
            break;
        }
        if (t->pre && (st = tk_pre_apply(t->pre, &l))) break;
        for (size_t k = 0; !st && k < l.n; k++)
            st = tk_model_tokenize((struct tk_model *)&t->model, l.text.p + l.v[k].off, l.v[k].len, ids, nids, cap);
    }
    tk_pieces_free(&l);
    free(segs);
    return st;
}

tuna_status tuna_tokenizer_encode(const tuna_tokenizer *t, const char *text, size_t len, bool add_special,
                                  bool parse_special, int32_t **ids_out, size_t *n_out)
{
    *ids_out = NULL;
    *n_out = 0;
    size_t bad;
    if (!tk_utf8_valid(text, len, &bad))
        return tuna_fail(TUNA_E_INVALID, "encode: the text is not valid UTF-8 (byte 0x%02X at offset %zu)",
                         (unsigned char)text[bad], bad);
    int32_t *ids = NULL;
    size_t n = 0, cap = 0;
    tk_aseg *segs = NULL;
    size_t nseg = 0;
    tuna_status st = tk_added_split(t, &t->match_raw, parse_special, text, len, &segs, &nseg);
    tk_buf norm = {0};
    for (size_t i = 0; !st && i < nseg; i++) {
        const tk_aseg *g = &segs[i];
        if (g->added >= 0) {
            if (!push_id(&ids, &n, &cap, t->added[g->added].id)) st = tuna_fail_oom("ids", n);
            continue;
        }
        if (g->end == g->start) continue;
        const char *s = text + g->start;
        size_t sl = g->end - g->start;
        if (t->norm) {
            norm.n = 0;
            if ((st = tk_norm_apply(t->norm, s, sl, &norm))) break;
            s = norm.p ? norm.p : "";
            sl = norm.n;
        }
        st = encode_normalized(t, s, sl, g->start == 0, parse_special, &ids, &n, &cap);
    }
    tk_buf_free(&norm);
    free(segs);
    if (!st && add_special && t->post.present) {
        int32_t *o = NULL;
        size_t on = 0, ocap = 0;
        for (size_t i = 0; !st && i < t->post.n; i++) {
            if (t->post.tmpl[i] != TK_POST_SEQ) {
                if (!push_id(&o, &on, &ocap, t->post.tmpl[i])) st = tuna_fail_oom("ids", on);
            } else {
                for (size_t k = 0; !st && k < n; k++)
                    if (!push_id(&o, &on, &ocap, ids[k])) st = tuna_fail_oom("ids", on);
            }
        }
        free(ids);
        ids = o;
        n = on;
    }
    if (st) {
        free(ids);
        return st;
    }
    *ids_out = ids;
    *n_out = n;
    return TUNA_OK;
}

/* ---------------- lookups ---------------- */

int64_t tuna_tokenizer_vocab_size(const tuna_tokenizer *t) { return t->nvocab_total; }

const char *tuna_tokenizer_token_str(const tuna_tokenizer *t, int32_t id) { return tk_id_to_str(t, id, NULL); }

int32_t tuna_tokenizer_token_id(const tuna_tokenizer *t, const char *tok)
{
    int64_t v;
    if (tuna_strmap_gets(&t->added_map, tok, &v)) return t->added[v].id;
    if (tuna_strmap_gets(&t->model.vocab, tok, &v)) return (int32_t)v;
    return -1;
}

static int special_index(const char *which)
{
    for (int i = 0; i < 4; i++)
        if (which && !strcmp(which, special_names[i])) return i;
    return -1;
}

const char *tuna_tokenizer_special_str(const tuna_tokenizer *t, const char *which)
{
    int i = special_index(which);
    return i < 0 ? NULL : t->special_str[i];
}

int32_t tuna_tokenizer_special_id(const tuna_tokenizer *t, const char *which)
{
    int i = special_index(which);
    return i < 0 ? -1 : t->special_id[i];
}

bool tuna_tokenizer_is_special(const tuna_tokenizer *t, int32_t id)
{
    if (id < 0 || id >= t->nvocab_total) return false;
    int32_t a = t->added_by_id[id];
    return a >= 0 && t->added[a].special;
}

const char *tuna_tokenizer_chat_template(const tuna_tokenizer *t) { return t->chat_template; }

void tuna_tokenizer_set_clean_up_spaces(tuna_tokenizer *t, bool on) { t->clean_up_spaces = on; }
