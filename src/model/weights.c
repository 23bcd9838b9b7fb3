/* weights.c — Hugging Face tensor names → struct tuna_model, with every shape and dtype checked
 * against struct tuna_arch before the forward pass may touch it.
 *
 * Names (transformers' LlamaForCausalLM layout, shared by mistral/qwen2/qwen3/gemma):
 *   model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied),
 *   model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight,
 *   model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}, self_attn.{q,k}_norm.weight,
 *   model.layers.{i}.mlp.{gate,up,down}_proj.weight
 * A bitsandbytes 4-bit checkpoint stores a quantized Linear's weight as packed codes plus its
 * quant-state tensors; such a weight becomes an NF4/FP4 struct tuna_weight whose q4 points at
 * the decoded state (codes stay in the mapping).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "core/status.h"
#include "model/model.h"
#include "model/rope_freq.h"
#include "quant/bnb.h"
#include "quant/nf4.h"

struct loader {
    const struct tuna_arch *a;
    tuna_tensor_lookup get;
    void *ctx;
    const tuna_st_set *set;  /* for bitsandbytes weights; NULL for synthetic models */
    struct tuna_model *m;    /* owns the 4-bit states */
    const struct tuna_model_opts *opts; /* may be NULL */
};

/* A new, empty 4-bit weight state owned by the model (m->q4), freed with it. */
static tuna_status new_q4(struct tuna_model *m, struct tuna_q4_weight **out)
{
    struct tuna_q4_weight **nq = realloc(m->q4, sizeof *nq * (size_t)(m->n_q4 + 1));
    if (!nq) return tuna_fail_oom("4-bit weight table", sizeof *nq * (size_t)(m->n_q4 + 1));
    m->q4 = nq;
    *out = calloc(1, sizeof **out);
    if (!*out) return tuna_fail_oom("4-bit weight", sizeof **out);
    m->q4[m->n_q4++] = *out;
    return TUNA_OK;
}

/* --load-in-4bit: quantizes a 16/32-bit projection at load, as transformers + bitsandbytes do
 * for every decoder nn.Linear (lm_head and embeddings stay in their dtype). The quant_state
 * dtype is the stored dtype, so dequantized values are rounded to it, as bitsandbytes does. */
static tuna_status quantize_at_load(const struct loader *ld, const char *name, struct tuna_weight *w)
{
    const struct tuna_model_opts *o = ld->opts;
    struct tuna_model *m = ld->m;
    struct tuna_q4_weight *q;
    tuna_status st0 = new_q4(m, &q);
    if (st0) return st0;
    tuna_status st = tuna_q4_quantize(w->data, w->dtype, w->rows, w->cols, o->quant_fp4 ? TUNA_Q4_FP4 : TUNA_Q4_NF4,
                                      o->quant_blocksize > 0 ? o->quant_blocksize : 64, !o->no_double_quant, w->dtype,
                                      q);
    if (st) return tuna_fail_prefix(st, "--load-in-4bit: %s", name);
    w->dtype = q->type == TUNA_Q4_NF4 ? TUNA_DTYPE_NF4 : TUNA_DTYPE_FP4;
    w->data = q->codes;
    w->q4 = q;
    return TUNA_OK;
}

static tuna_status load_q4(const struct loader *ld, const char *name, int64_t rows, int64_t cols,
                           struct tuna_weight *w)
{
    struct tuna_model *m = ld->m;
    struct tuna_q4_weight *q;
    tuna_status st0 = new_q4(m, &q);
    if (st0) return st0;
    tuna_status st = tuna_bnb_load_weight(ld->set, name, q);
    if (st) return st;
    if (q->numel != rows * cols)
        return tuna_fail(TUNA_E_FORMAT, "4-bit weight '%s' holds %lld values (quant_state shape), config.json "
                         "implies [%lld, %lld]", name, (long long)q->numel, (long long)rows, (long long)cols);
    q->rows = rows; /* a 1-D quant_state shape still means [rows, cols] here */
    q->cols = cols;
    w->dtype = q->type == TUNA_Q4_NF4 ? TUNA_DTYPE_NF4 : TUNA_DTYPE_FP4;
    w->rows = rows;
    w->cols = cols;
    w->data = q->codes;
    w->q4 = q;
    return TUNA_OK;
}

static const struct tuna_tensor_view *find(const struct loader *ld, const char *name, bool required,
                                           tuna_status *st)
{
    const struct tuna_tensor_view *t = ld->get(ld->ctx, name);
    if (!t && required)
        *st = tuna_fail(TUNA_E_FORMAT, "tensor '%s' is missing; a %s model with %lld layers needs it "
                        "(is this folder a complete %s checkpoint?)", name, ld->a->model_type,
                        (long long)ld->a->n_layers, ld->a->architecture);
    return t;
}

static tuna_status load_matrix(const struct loader *ld, const char *name, int64_t rows, int64_t cols,
                               struct tuna_weight *w)
{
    tuna_status st = TUNA_OK;
    if (ld->set && tuna_bnb_is_quantized_weight(ld->set, name)) return load_q4(ld, name, rows, cols, w);
    const struct tuna_tensor_view *t = find(ld, name, true, &st);
    if (!t) return st;
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols)
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s' has shape %s[%lld, %lld], config.json implies [%lld, %lld]",
                         t->file, name, t->ndim == 2 ? "" : "(not 2-D) ", t->ndim > 0 ? (long long)t->shape[0] : 0,
                         t->ndim > 1 ? (long long)t->shape[1] : 0, (long long)rows, (long long)cols);
    if (t->dtype != TUNA_DTYPE_BF16 && t->dtype != TUNA_DTYPE_F16 && t->dtype != TUNA_DTYPE_F32)
        return tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor '%s' is %s; the forward pass takes BF16, F16 or F32 weights "
                         "(quantize with `tuna quantize` for 4-bit)", t->file, name, tuna_dtype_name(t->dtype));
    w->dtype = t->dtype;
    w->rows = rows;
    w->cols = cols;
    w->data = t->data;
    w->q4 = NULL;
    return TUNA_OK;
}

/* A 1-D float vector of n elements converted to float32; add_one: store 1 + w (Gemma norms). */
static tuna_status load_vector(const struct loader *ld, const char *name, int64_t n, bool add_one, float **out)
{
    tuna_status st = TUNA_OK;
    const struct tuna_tensor_view *t = find(ld, name, true, &st);
    if (!t) return st;
    if (t->ndim != 1 || t->shape[0] != n)
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s' should be a vector of %lld values (config.json), "
                         "found %d dims with %llu values", t->file, name, (long long)n, t->ndim,
                         (unsigned long long)t->numel);
    if (!tuna_dtype_is_float(t->dtype))
        return tuna_fail(TUNA_E_FORMAT, "%s: tensor '%s' is %s, expected a float type", t->file, name,
                         tuna_dtype_name(t->dtype));
    float *v = malloc((size_t)n * sizeof *v);
    if (!v) return tuna_fail_oom(name, (size_t)n * sizeof *v);
    st = tuna_tensor_to_f32(t, v);
    if (st) {
        free(v);
        return st;
    }
    if (add_one)
        for (int64_t i = 0; i < n; i++) v[i] = 1.0f + v[i];
    *out = v;
    return TUNA_OK;
}

static tuna_status load_linear(const struct loader *ld, const char *prefix, int64_t rows, int64_t cols,
                               bool bias, struct tuna_linear *lin)
{
    char name[256];
    snprintf(name, sizeof name, "%s.weight", prefix);
    tuna_status st = load_matrix(ld, name, rows, cols, &lin->w);
    if (st) return st;
    if (ld->opts && ld->opts->load_in_4bit && !lin->w.q4 && (st = quantize_at_load(ld, name, &lin->w))) return st;
    snprintf(name, sizeof name, "%s.bias", prefix);
    bool present = ld->get(ld->ctx, name) != NULL;
    if (present && !bias)
        return tuna_fail(TUNA_E_FORMAT, "tensor '%s' exists but config.json says this %s model has no such "
                         "bias (attention_bias / mlp_bias)", name, ld->a->model_type);
    if (bias) return load_vector(ld, name, rows, false, &lin->bias);
    return TUNA_OK;
}

static tuna_status load_layer(const struct loader *ld, int64_t i, struct tuna_layer *L)
{
    const struct tuna_arch *a = ld->a;
    const int64_t C = a->hidden_size, HD = a->n_heads * a->head_dim, KD = a->n_kv_heads * a->head_dim;
    const int64_t I = a->intermediate_size;
    char p[192], n[256];
    tuna_status st;
#define LP(fmt) (snprintf(n, sizeof n, "model.layers.%lld." fmt, (long long)i), n)
    if ((st = load_vector(ld, LP("input_layernorm.weight"), C, a->norm_add_one, &L->attn_norm))) return st;
    if ((st = load_vector(ld, LP("post_attention_layernorm.weight"), C, a->norm_add_one, &L->mlp_norm))) return st;
    snprintf(p, sizeof p, "model.layers.%lld.self_attn.q_proj", (long long)i);
    if ((st = load_linear(ld, p, HD, C, a->attention_bias, &L->q))) return st;
    snprintf(p, sizeof p, "model.layers.%lld.self_attn.k_proj", (long long)i);
    if ((st = load_linear(ld, p, KD, C, a->attention_bias, &L->k))) return st;
    snprintf(p, sizeof p, "model.layers.%lld.self_attn.v_proj", (long long)i);
    if ((st = load_linear(ld, p, KD, C, a->attention_bias, &L->v))) return st;
    snprintf(p, sizeof p, "model.layers.%lld.self_attn.o_proj", (long long)i);
    if ((st = load_linear(ld, p, C, HD, a->o_bias, &L->o))) return st;
    if (a->qk_norm) {
        if ((st = load_vector(ld, LP("self_attn.q_norm.weight"), a->head_dim, a->norm_add_one, &L->q_norm))) return st;
        if ((st = load_vector(ld, LP("self_attn.k_norm.weight"), a->head_dim, a->norm_add_one, &L->k_norm))) return st;
    }
    snprintf(p, sizeof p, "model.layers.%lld.mlp.gate_proj", (long long)i);
    if ((st = load_linear(ld, p, I, C, a->mlp_bias, &L->gate))) return st;
    snprintf(p, sizeof p, "model.layers.%lld.mlp.up_proj", (long long)i);
    if ((st = load_linear(ld, p, I, C, a->mlp_bias, &L->up))) return st;
    snprintf(p, sizeof p, "model.layers.%lld.mlp.down_proj", (long long)i);
    if ((st = load_linear(ld, p, C, I, a->mlp_bias, &L->down))) return st;
#undef LP
    return TUNA_OK;
}

static tuna_status check_arch(const struct tuna_arch *a)
{
    if (a->hidden_size <= 0 || a->n_layers <= 0 || a->n_heads <= 0 || a->n_kv_heads <= 0 || a->head_dim <= 0 ||
        a->intermediate_size <= 0 || a->vocab_size <= 0)
        return tuna_fail(TUNA_E_FORMAT, "config.json: sizes must be positive (hidden %lld, layers %lld, heads %lld, "
                         "kv heads %lld, head_dim %lld, intermediate %lld, vocab %lld)", (long long)a->hidden_size,
                         (long long)a->n_layers, (long long)a->n_heads, (long long)a->n_kv_heads,
                         (long long)a->head_dim, (long long)a->intermediate_size, (long long)a->vocab_size);
    if (a->n_heads % a->n_kv_heads)
        return tuna_fail(TUNA_E_FORMAT, "config.json: num_attention_heads %lld is not a multiple of "
                         "num_key_value_heads %lld", (long long)a->n_heads, (long long)a->n_kv_heads);
    if (a->head_dim > TUNA_CPU_MAX_HEAD_DIM)
        return tuna_fail(TUNA_E_UNSUPPORTED, "config.json: head_dim %lld is above the %d the CPU attention supports",
                         (long long)a->head_dim, TUNA_CPU_MAX_HEAD_DIM);
    if (a->quant.method != TUNA_QUANT_NONE && a->quant.method != TUNA_QUANT_BNB_4BIT)
        return tuna_fail(TUNA_E_UNSUPPORTED, "config.json declares quantization_config (%s); the forward pass "
                         "runs 16/32-bit and bitsandbytes 4-bit checkpoints", a->quant.method_name);
    return TUNA_OK;
}

static tuna_status build(const struct tuna_arch *arch, tuna_tensor_lookup get, void *ctx, const tuna_st_set *set,
                         const struct tuna_model_opts *opts, struct tuna_model **out)
{
    *out = NULL;
    tuna_status st = check_arch(arch);
    if (st) return st;
    struct tuna_model *m = calloc(1, sizeof *m);
    if (!m) return tuna_fail_oom("model", sizeof *m);
    m->arch = *arch;
    m->arch.quant.skip_modules = NULL; /* owned by the caller's arch */
    m->arch.quant.n_skip_modules = 0;
    const struct tuna_arch *a = &m->arch;
    struct loader ld = {a, get, ctx, set, m, opts};
    m->layers = calloc((size_t)a->n_layers, sizeof *m->layers);
    if (!m->layers) {
        st = tuna_fail_oom("layer table", sizeof *m->layers * (size_t)a->n_layers);
        goto fail;
    }
    if ((st = load_matrix(&ld, "model.embed_tokens.weight", a->vocab_size, a->hidden_size, &m->embed))) goto fail;
    for (int64_t i = 0; i < a->n_layers; i++)
        if ((st = load_layer(&ld, i, &m->layers[i]))) goto fail;
    if ((st = load_vector(&ld, "model.norm.weight", a->hidden_size, a->norm_add_one, &m->final_norm))) goto fail;
    if (a->tie_word_embeddings || !get(ctx, "lm_head.weight")) {
        if (!a->tie_word_embeddings) {
            st = tuna_fail(TUNA_E_FORMAT, "tensor 'lm_head.weight' is missing and config.json has "
                           "tie_word_embeddings false");
            goto fail;
        }
        m->lm_head.w = m->embed;
    } else if ((st = load_matrix(&ld, "lm_head.weight", a->vocab_size, a->hidden_size, &m->lm_head.w))) {
        goto fail;
    }
    /* Gemma: hidden * torch.tensor(hidden_size ** 0.5, dtype=hidden.dtype), the compute dtype
     * being float32 here */
    m->embed_scale = a->embed_scale_sqrt ? (float)sqrt((double)a->hidden_size) : 1.0f;
    m->max_model_len = a->max_position_embeddings > 0 ? a->max_position_embeddings : INT64_MAX;
    if (opts && opts->max_model_len > 0) {
        if (a->max_position_embeddings > 0 && opts->max_model_len > a->max_position_embeddings &&
            a->rope.type == TUNA_ROPE_DEFAULT) {
            st = tuna_fail(TUNA_E_RANGE, "--max-model-len %lld is above max_position_embeddings %lld of this model",
                           (long long)opts->max_model_len, (long long)a->max_position_embeddings);
            goto fail;
        }
        m->max_model_len = opts->max_model_len;
    }
    m->rot_dim = tuna_rope_rot_dim(a);
    m->inv_freq = malloc(sizeof(float) * (size_t)(m->rot_dim / 2 + 1));
    if (!m->inv_freq) {
        st = tuna_fail_oom("rope table", sizeof(float) * (size_t)m->rot_dim);
        goto fail;
    }
    tuna_rope_inv_freq(a, 0, m->inv_freq, &m->attn_factor);
    int64_t maxk = a->intermediate_size > a->hidden_size ? a->intermediate_size : a->hidden_size;
    if (a->n_heads * a->head_dim > maxk) maxk = a->n_heads * a->head_dim;
    if ((st = tuna_model_start_backend(m, opts, maxk))) goto fail; /* device.c */
    if ((st = tuna_model_set_kv_dtype(m, opts ? opts->kv_cache_dtype : TUNA_DTYPE_INVALID))) goto fail; /* kv_cache.c */
    *out = m;
    return TUNA_OK;
fail:
    tuna_model_free(m);
    return st;
}

tuna_status tuna_model_build(const struct tuna_arch *arch, tuna_tensor_lookup get, void *ctx,
                             const struct tuna_model_opts *opts, struct tuna_model **out)
{
    return build(arch, get, ctx, NULL, opts, out);
}

static const struct tuna_tensor_view *set_lookup(void *ctx, const char *name)
{
    return tuna_st_set_find(ctx, name);
}

tuna_status tuna_model_load(const char *dir, const struct tuna_model_opts *opts, struct tuna_model **out)
{
    *out = NULL;
    struct tuna_arch arch;
    tuna_status st = tuna_arch_load(dir, &arch);
    if (st) return st;
    tuna_st_set *set = NULL;
    st = tuna_st_set_open(dir, "model", &set);
    if (st) {
        tuna_arch_free(&arch);
        return st;
    }
    st = tuna_bnb_check_not_int8(set);
    if (!st) st = build(&arch, set_lookup, set, set, opts, out);
    tuna_arch_free(&arch);
    if (st) {
        tuna_st_set_close(set);
        return tuna_fail_prefix(st, "loading %s", dir);
    }
    (*out)->st = set;
    return TUNA_OK;
}

void tuna_fwd_ws_free(const struct tuna_model *m, struct tuna_fwd_ws *ws); /* forward.c */

/* Host vectors are freed here; ones moved to a device (device.c) are freed with the backend. */
static void free_host(const struct tuna_model *m, void *p)
{
    if (p && !tuna_model_owns_device_ptr(m, p)) free(p);
}

void tuna_model_free(struct tuna_model *m)
{
    if (!m) return;
    if (m->ws) tuna_fwd_ws_free(m, m->ws);
    if (m->layers)
        for (int64_t i = 0; i < m->arch.n_layers; i++) {
            struct tuna_layer *L = &m->layers[i];
            free_host(m, L->attn_norm);
            free_host(m, L->mlp_norm);
            free_host(m, L->q_norm);
            free_host(m, L->k_norm);
            struct tuna_linear *lins[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
            for (size_t k = 0; k < sizeof lins / sizeof lins[0]; k++) free_host(m, lins[k]->bias);
        }
    free(m->layers);
    free_host(m, m->final_norm);
    free_host(m, m->lm_head.bias);
    free(m->inv_freq);
    for (int64_t i = 0; i < m->n_q4; i++) {
        tuna_q4_weight_free(m->q4[i]);
        free(m->q4[i]);
    }
    free(m->q4);
    tuna_model_stop_backend(m); /* device.c */
    tuna_st_set_close(m->st);
    free(m);
}

tuna_status tuna_model_kv_new(const struct tuna_model *m, int64_t n_tokens, int32_t block_size, tuna_kv_cache **out)
{
    if (block_size <= 0) block_size = TUNA_KV_DEFAULT_BLOCK;
    int64_t nb = (n_tokens + block_size - 1) / block_size;
    if (nb < 1) nb = 1;
    if (nb > INT32_MAX) return tuna_fail(TUNA_E_RANGE, "KV cache of %lld tokens is too large", (long long)n_tokens);
    struct tuna_kv_config cfg = {m->arch.n_layers, m->arch.n_kv_heads, m->arch.head_dim, block_size, (int32_t)nb,
                                 m->ops->host_memory ? NULL : m->ops, m->ops->host_memory ? NULL : m->be,
                                 tuna_model_kv_dtype(m)};
    return tuna_kv_new(&cfg, out);
}

static uint64_t wbytes(const struct tuna_model *m, const struct tuna_weight *w)
{
    /* rows * ld: a weight folded for LoRA (device.c) holds the adapters' columns in its rows */
    uint64_t n = tuna_dtype_nbytes(w->dtype, (uint64_t)(w->rows * (w->q4 ? w->cols : tuna_weight_ld(w))));
    return n + tuna_model_q4_scale_bytes(m, w); /* device.c: the scales' form differs per backend */
}

uint64_t tuna_model_weight_bytes(const struct tuna_model *m)
{
    uint64_t n = wbytes(m, &m->lm_head.w);
    for (int64_t i = 0; i < m->arch.n_layers; i++) {
        const struct tuna_layer *L = &m->layers[i];
        n += wbytes(m, &L->q.w) + wbytes(m, &L->k.w) + wbytes(m, &L->v.w) + wbytes(m, &L->o.w) +
             wbytes(m, &L->gate.w) + wbytes(m, &L->up.w) + wbytes(m, &L->down.w);
    }
    return n;
}
