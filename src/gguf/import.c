/* import.c — GGUF file → struct tuna_model through tuna_model_build (weights by HF name).
 *
 * The GGUF hyperparameters are turned into config.json text and parsed by io/hf_config, so the
 * defaults of each family are the same as for a model folder. Tensors are renamed back to HF
 * names; llama-arch q/k rows are un-permuted (§7.5) and Gemma norms get 1 subtracted (the file
 * stores 1+w, tuna's arch adds 1 itself), both on float32 copies. Other f32/f16/bf16 tensors are
 * used in place; quantized ones are dequantized to float32 at load.
 */
#include "gguf/import.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/status.h"
#include "core/strmap.h"
#include "gguf/export.h"
#include "gguf/quants.h"

struct tuna_gguf_import {
    tuna_gguf *g;
    struct tuna_tensor_view *views; /* [n] by HF name */
    char **names;                   /* [n] owned HF names */
    float **bufs;                   /* [n] owned float32 data or NULL */
    size_t n;
    struct tuna_strmap map;
};

static void import_free(struct tuna_gguf_import *im)
{
    if (!im) return;
    for (size_t i = 0; i < im->n; i++) {
        free(im->names[i]);
        free(im->bufs[i]);
    }
    free(im->names);
    free(im->bufs);
    free(im->views);
    tuna_strmap_free(&im->map);
    tuna_gguf_close(im->g);
    free(im);
}

void tuna_gguf_model_free(struct tuna_gguf_model *gm)
{
    if (!gm) return;
    tuna_model_free(gm->model);
    tuna_tokenizer_free(gm->tokenizer);
    free((char *)gm->chat_template);
    import_free(gm->priv);
    free(gm);
}

static const struct tuna_tensor_view *lookup(void *ctx, const char *name)
{
    struct tuna_gguf_import *im = ctx;
    int64_t i;
    return tuna_strmap_gets(&im->map, name, &i) ? &im->views[i] : NULL;
}

/* GGUF tensor name → HF name. */
static bool hf_name(const char *gg, char *buf, size_t cap)
{
    static const struct {
        const char *gg, *hf;
    } top[] = {{"token_embd.weight", "model.embed_tokens.weight"},
               {"output_norm.weight", "model.norm.weight"},
               {"output.weight", "lm_head.weight"}},
      layer[] = {{"attn_norm.weight", "input_layernorm.weight"},  {"attn_q.weight", "self_attn.q_proj.weight"},
                 {"attn_k.weight", "self_attn.k_proj.weight"},     {"attn_v.weight", "self_attn.v_proj.weight"},
                 {"attn_output.weight", "self_attn.o_proj.weight"}, {"attn_q.bias", "self_attn.q_proj.bias"},
                 {"attn_k.bias", "self_attn.k_proj.bias"},         {"attn_v.bias", "self_attn.v_proj.bias"},
                 {"attn_output.bias", "self_attn.o_proj.bias"},    {"attn_q_norm.weight", "self_attn.q_norm.weight"},
                 {"attn_k_norm.weight", "self_attn.k_norm.weight"}, {"ffn_norm.weight", "post_attention_layernorm.weight"},
                 {"ffn_gate.weight", "mlp.gate_proj.weight"},      {"ffn_up.weight", "mlp.up_proj.weight"},
                 {"ffn_down.weight", "mlp.down_proj.weight"}};
    for (size_t i = 0; i < sizeof top / sizeof *top; i++)
        if (strcmp(gg, top[i].gg) == 0) return (size_t)snprintf(buf, cap, "%s", top[i].hf) < cap;
    unsigned l;
    int used = 0;
    if (sscanf(gg, "blk.%u.%n", &l, &used) != 1 || used == 0) return false;
    for (size_t i = 0; i < sizeof layer / sizeof *layer; i++)
        if (strcmp(gg + used, layer[i].gg) == 0) return (size_t)snprintf(buf, cap, "model.layers.%u.%s", l, layer[i].hf) < cap;
    return false;
}

static enum tuna_family family_of(const char *arch)
{
    if (strcmp(arch, "llama") == 0) return TUNA_FAMILY_LLAMA;
    if (strcmp(arch, "qwen2") == 0) return TUNA_FAMILY_QWEN2;
    if (strcmp(arch, "qwen3") == 0) return TUNA_FAMILY_QWEN3;
    if (strcmp(arch, "gemma") == 0) return TUNA_FAMILY_GEMMA;
    return TUNA_FAMILY_COUNT;
}

tuna_status tuna_gguf_config_json(const tuna_gguf *g, char **out)
{
    *out = NULL;
    char *arch = NULL;
    tuna_status st = tuna_gguf_get_strdup(g, "general.architecture", &arch);
    if (st) return st;
    enum tuna_family fam = family_of(arch);
    if (fam == TUNA_FAMILY_COUNT) {
        st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: GGUF architecture '%s' is not supported (llama, qwen2, qwen3, gemma are)",
                       tuna_gguf_path(g), arch);
        free(arch);
        return st;
    }
    cJSON *c = cJSON_CreateObject();
    char k[160];
    const char *model_type = fam == TUNA_FAMILY_LLAMA ? "llama" : arch;
    cJSON_AddStringToObject(c, "model_type", model_type);
    static const struct {
        const char *gg, *hf;
        bool required;
    } ints[] = {{"embedding_length", "hidden_size", true},
                {"block_count", "num_hidden_layers", true},
                {"feed_forward_length", "intermediate_size", true},
                {"attention.head_count", "num_attention_heads", true},
                {"attention.head_count_kv", "num_key_value_heads", false},
                {"context_length", "max_position_embeddings", true},
                {"attention.key_length", "head_dim", false}};
    uint32_t v, hidden = 0, heads = 0;
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++) {
        snprintf(k, sizeof k, "%s.%s", arch, ints[i].gg);
        st = tuna_gguf_get_u32(g, k, &v);
        if (st == TUNA_E_NOT_FOUND && !ints[i].required) continue;
        if (st) goto done;
        cJSON_AddNumberToObject(c, ints[i].hf, v);
        if (i == 0) hidden = v;
        if (i == 3) heads = v;
    }
    if (!cJSON_GetObjectItemCaseSensitive(c, "head_dim") && heads) /* families whose default is not hidden/heads */
        cJSON_AddNumberToObject(c, "head_dim", hidden / heads);
    float f;
    snprintf(k, sizeof k, "%s.attention.layer_norm_rms_epsilon", arch);
    if ((st = tuna_gguf_get_f32(g, k, &f))) goto done;
    cJSON_AddNumberToObject(c, "rms_norm_eps", f);
    snprintf(k, sizeof k, "%s.rope.freq_base", arch);
    st = tuna_gguf_get_f32(g, k, &f);
    if (st && st != TUNA_E_NOT_FOUND) goto done;
    cJSON_AddNumberToObject(c, "rope_theta", st ? 10000.0 : f);
    snprintf(k, sizeof k, "%s.rope.dimension_count", arch);
    if (tuna_gguf_get_u32(g, k, &v) == TUNA_OK && heads && hidden) {
        uint32_t hd = hidden / heads;
        snprintf(k, sizeof k, "%s.attention.key_length", arch);
        uint32_t kl;
        if (tuna_gguf_get_u32(g, k, &kl) == TUNA_OK) hd = kl;
        if (v != hd && hd) cJSON_AddNumberToObject(c, "partial_rotary_factor", (double)v / hd);
    }
    snprintf(k, sizeof k, "%s.rope.scaling.type", arch);
    char *rs = NULL;
    if (tuna_gguf_get_strdup(g, k, &rs) == TUNA_OK && strcmp(rs, "none") != 0) {
        cJSON *r = cJSON_AddObjectToObject(c, "rope_scaling");
        cJSON_AddStringToObject(r, "rope_type", rs);
        snprintf(k, sizeof k, "%s.rope.scaling.factor", arch);
        if (tuna_gguf_get_f32(g, k, &f) == TUNA_OK) cJSON_AddNumberToObject(r, "factor", f);
        snprintf(k, sizeof k, "%s.rope.scaling.original_context_length", arch);
        if (tuna_gguf_get_u32(g, k, &v) == TUNA_OK) cJSON_AddNumberToObject(r, "original_max_position_embeddings", v);
        /* llama.cpp scales YaRN attention by mscale(factor) · rope.scaling.attn_factor */
        float fac, af;
        snprintf(k, sizeof k, "%s.rope.scaling.attn_factor", arch);
        if (!strcmp(rs, "yarn") && tuna_gguf_get_f32(g, k, &af) == TUNA_OK) {
            snprintf(k, sizeof k, "%s.rope.scaling.factor", arch);
            if (tuna_gguf_get_f32(g, k, &fac) != TUNA_OK) fac = 1.0f;
            cJSON_AddNumberToObject(r, "attention_factor", (double)af * (fac <= 1 ? 1.0 : 0.1 * log(fac) + 1.0));
        }
    }
    free(rs);
    const struct tuna_gguf_tensor *emb = tuna_gguf_find_tensor(g, "token_embd.weight");
    if (!emb) {
        st = tuna_fail(TUNA_E_FORMAT, "%s: no token_embd.weight tensor (a vocab-only file cannot be run)", tuna_gguf_path(g));
        goto done;
    }
    cJSON_AddNumberToObject(c, "vocab_size", (double)emb->ne[1]);
    cJSON_AddBoolToObject(c, "tie_word_embeddings", tuna_gguf_find_tensor(g, "output.weight") == NULL);
    bool bias = tuna_gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
    if (fam == TUNA_FAMILY_LLAMA) cJSON_AddBoolToObject(c, "attention_bias", bias);
    if (fam == TUNA_FAMILY_GEMMA) cJSON_AddStringToObject(c, "hidden_activation", "gelu_pytorch_tanh");
    cJSON_AddStringToObject(c, "torch_dtype", "float32");
    static const char *const sp[3][2] = {{"tokenizer.ggml.bos_token_id", "bos_token_id"},
                                         {"tokenizer.ggml.eos_token_id", "eos_token_id"},
                                         {"tokenizer.ggml.padding_token_id", "pad_token_id"}};
    for (int i = 0; i < 3; i++)
        if (tuna_gguf_get_u32(g, sp[i][0], &v) == TUNA_OK && v != UINT32_MAX) cJSON_AddNumberToObject(c, sp[i][1], v);
    if (!(*out = cJSON_PrintUnformatted(c))) st = tuna_fail_oom("config", 0);
    else st = TUNA_OK;
done:
    cJSON_Delete(c);
    free(arch);
    return st;
}

/* Adds one HF-named view over GGUF tensor t (converted to float32 when it must be). */
static tuna_status add_view(struct tuna_gguf_import *im, const struct tuna_arch *a, const struct tuna_gguf_tensor *t,
                            const char *hf)
{
    size_t i = im->n;
    struct tuna_tensor_view *v = &im->views[i];
    if (!(im->names[i] = strdup(hf)) || !tuna_strmap_puts(&im->map, hf, (int64_t)i, NULL)) return tuna_fail_oom("name", 0);
    im->n++;
    memset(v, 0, sizeof *v);
    v->name = im->names[i];
    v->file = tuna_gguf_path(im->g);
    v->ndim = t->n_dims;
    for (int d = 0; d < t->n_dims; d++) v->shape[d] = t->ne[t->n_dims - 1 - d];
    v->numel = t->nelements;
    bool is_q = strstr(hf, "q_proj") != NULL, is_k = strstr(hf, "k_proj") != NULL;
    bool permute = tuna_gguf_family_permutes_qk(a->family) && (is_q || is_k);
    bool norm_sub = a->norm_add_one && strstr(hf, "norm.weight");
    if (!permute && !norm_sub && (t->type == TUNA_GGML_F32 || t->type == TUNA_GGML_F16 || t->type == TUNA_GGML_BF16)) {
        v->dtype = t->type == TUNA_GGML_F32 ? TUNA_DTYPE_F32 : t->type == TUNA_GGML_F16 ? TUNA_DTYPE_F16 : TUNA_DTYPE_BF16;
        v->data = t->data;
        v->nbytes = t->nbytes;
        return TUNA_OK;
    }
    float *buf = malloc(t->nelements * sizeof *buf);
    if (!buf) return tuna_fail_oom(hf, t->nelements * sizeof *buf);
    im->bufs[i] = buf;
    tuna_status st = tuna_ggml_dequantize(t->type, t->data, buf, (int64_t)t->nelements);
    if (st) return tuna_fail_prefix(st, "%s: tensor %s", tuna_gguf_path(im->g), t->name);
    if (permute) {
        float *tmp = malloc(t->nelements * sizeof *tmp);
        if (!tmp) return tuna_fail_oom(hf, t->nelements * sizeof *tmp);
        int64_t nh = is_q ? a->n_heads : a->n_kv_heads;
        int64_t rows = t->n_dims == 2 ? t->ne[1] : t->ne[0], cols = t->n_dims == 2 ? t->ne[0] : 1;
        if (rows % (2 * nh)) {
            free(tmp);
            return tuna_fail(TUNA_E_FORMAT, "%s: %s has %lld rows, not a multiple of 2 x %lld heads", tuna_gguf_path(im->g),
                             t->name, (long long)rows, (long long)nh);
        }
        tuna_gguf_permute_qk(buf, tmp, nh, rows, cols, false);
        free(tmp);
    }
    if (norm_sub)
        for (uint64_t j = 0; j < t->nelements; j++) buf[j] -= 1.0f;
    v->dtype = TUNA_DTYPE_F32;
    v->data = buf;
    v->nbytes = t->nelements * sizeof *buf;
    return TUNA_OK;
}

tuna_status tuna_gguf_model_load(const char *path, const struct tuna_model_opts *opts, struct tuna_gguf_model **out)
{
    *out = NULL;
    struct tuna_gguf_model *gm = calloc(1, sizeof *gm);
    struct tuna_gguf_import *im = calloc(1, sizeof *im);
    struct tuna_arch a;
    memset(&a, 0, sizeof a);
    char *cfg = NULL;
    tuna_status st;
    if (!gm || !im) {
        free(gm);
        free(im);
        return tuna_fail_oom("gguf model", 0);
    }
    gm->priv = im;
    tuna_strmap_init(&im->map);
    if ((st = tuna_gguf_open(path, &im->g))) goto fail;
    if ((st = tuna_gguf_config_json(im->g, &cfg))) goto fail;
    if ((st = tuna_arch_parse(cfg, strlen(cfg), path, &a))) goto fail;
    size_t nt = tuna_gguf_tensor_count(im->g);
    im->views = calloc(nt ? nt : 1, sizeof *im->views);
    im->names = calloc(nt ? nt : 1, sizeof *im->names);
    im->bufs = calloc(nt ? nt : 1, sizeof *im->bufs);
    if (!im->views || !im->names || !im->bufs) {
        st = tuna_fail_oom("gguf views", 0);
        goto fail;
    }
    for (size_t i = 0; i < nt; i++) {
        const struct tuna_gguf_tensor *t = tuna_gguf_tensor_at(im->g, i);
        char hf[160];
        if (strcmp(t->name, "rope_freqs.weight") == 0) {
            st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: rope_freqs.weight (Llama-3.1 RoPE scaling) is not supported yet", path);
            goto fail;
        }
        if (!hf_name(t->name, hf, sizeof hf)) {
            st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor '%s' is not part of a %s model tuna runs", path, t->name,
                           tuna_family_name(a.family));
            goto fail;
        }
        if ((st = add_view(im, &a, t, hf))) goto fail;
    }
    if ((st = tuna_model_build(&a, lookup, im, opts, &gm->model))) goto fail;
    if (tuna_gguf_find(im->g, "tokenizer.ggml.tokens")) {
        if ((st = tuna_gguf_tokenizer_load(im->g, &gm->tokenizer))) goto fail;
    }
    char *tmpl = NULL;
    if (tuna_gguf_get_strdup(im->g, "tokenizer.chat_template", &tmpl) == TUNA_OK) gm->chat_template = tmpl;
    free(cfg);
    tuna_arch_free(&a);
    *out = gm;
    return TUNA_OK;
fail:
    free(cfg);
    tuna_arch_free(&a);
    tuna_gguf_model_free(gm);
    return tuna_fail_prefix(st, "loading GGUF %s", path);
}
