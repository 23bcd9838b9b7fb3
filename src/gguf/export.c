/* export.c — HF model folder → GGUF (§7.3–7.5): metadata for llama.cpp's llama, qwen2, qwen3 and
 * gemma architectures, tensor names, the Q/K permutation, llama-quantize's type mix, tokenizer
 * metadata (vocab.c). Every tensor is converted to float32 and then to its GGUF type; the
 * converted buffers are held until the single atomic write at the end.
 */
#include "gguf/export.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/status.h"
#include "gguf/quants.h"
#include "io/safetensors.h"

bool tuna_gguf_ftype_parse(const char *s, enum tuna_gguf_ftype *out)
{
    static const struct {
        const char *n;
        enum tuna_gguf_ftype t;
    } tab[] = {{"f32", TUNA_GGUF_FT_F32},   {"f16", TUNA_GGUF_FT_F16},   {"bf16", TUNA_GGUF_FT_BF16},
               {"q8_0", TUNA_GGUF_FT_Q8_0}, {"q4_0", TUNA_GGUF_FT_Q4_0}, {"q4_k_m", TUNA_GGUF_FT_Q4_K_M}};
    for (size_t i = 0; i < sizeof tab / sizeof *tab; i++)
        if (strcasecmp(s, tab[i].n) == 0) {
            *out = tab[i].t;
            return true;
        }
    return false;
}

const char *tuna_gguf_arch_name(enum tuna_family f)
{
    switch (f) {
    case TUNA_FAMILY_LLAMA:
    case TUNA_FAMILY_MISTRAL: return "llama";
    case TUNA_FAMILY_QWEN2: return "qwen2";
    case TUNA_FAMILY_QWEN3: return "qwen3";
    case TUNA_FAMILY_GEMMA: return "gemma";
    default: return NULL;
    }
}

bool tuna_gguf_family_permutes_qk(enum tuna_family f) { return f == TUNA_FAMILY_LLAMA || f == TUNA_FAMILY_MISTRAL; }

bool tuna_gguf_tensor_name(const char *hf, char *buf, size_t cap)
{
    static const struct {
        const char *hf, *gg;
    } top[] = {{"model.embed_tokens.weight", "token_embd.weight"},
               {"model.norm.weight", "output_norm.weight"},
               {"lm_head.weight", "output.weight"}},
      layer[] = {{"input_layernorm.weight", "attn_norm.weight"},
                 {"self_attn.q_proj.weight", "attn_q.weight"},
                 {"self_attn.k_proj.weight", "attn_k.weight"},
                 {"self_attn.v_proj.weight", "attn_v.weight"},
                 {"self_attn.o_proj.weight", "attn_output.weight"},
                 {"self_attn.q_proj.bias", "attn_q.bias"},
                 {"self_attn.k_proj.bias", "attn_k.bias"},
                 {"self_attn.v_proj.bias", "attn_v.bias"},
                 {"self_attn.o_proj.bias", "attn_output.bias"},
                 {"self_attn.q_norm.weight", "attn_q_norm.weight"},
                 {"self_attn.k_norm.weight", "attn_k_norm.weight"},
                 {"post_attention_layernorm.weight", "ffn_norm.weight"},
                 {"mlp.gate_proj.weight", "ffn_gate.weight"},
                 {"mlp.up_proj.weight", "ffn_up.weight"},
                 {"mlp.down_proj.weight", "ffn_down.weight"}};
    for (size_t i = 0; i < sizeof top / sizeof *top; i++)
        if (strcmp(hf, top[i].hf) == 0) return (size_t)snprintf(buf, cap, "%s", top[i].gg) < cap;
    unsigned layer_no;
    int used = 0;
    if (sscanf(hf, "model.layers.%u.%n", &layer_no, &used) != 1 || used == 0) return false;
    for (size_t i = 0; i < sizeof layer / sizeof *layer; i++)
        if (strcmp(hf + used, layer[i].hf) == 0) return (size_t)snprintf(buf, cap, "blk.%u.%s", layer_no, layer[i].gg) < cap;
    return false;
}

void tuna_gguf_permute_qk(float *w, float *tmp, int64_t n_head, int64_t rows, int64_t cols, bool to_gguf)
{
    int64_t hd = rows / n_head, half = hd / 2;
    memcpy(tmp, w, (size_t)(rows * cols) * sizeof *w);
    for (int64_t h = 0; h < n_head; h++)
        for (int64_t i = 0; i < half; i++)
            for (int s = 0; s < 2; s++) {
                int64_t hf = h * hd + i + s * half, gg = h * hd + 2 * i + s;
                int64_t dst = to_gguf ? gg : hf, src = to_gguf ? hf : gg;
                memcpy(w + dst * cols, tmp + src * cols, (size_t)cols * sizeof *w);
            }
}

/* llama-quantize's use_more_bits(): the first and last eighth of the layers and every third one
 * in between get more bits in the _M mixes. */
static bool use_more_bits(int64_t i, int64_t n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

/* The GGUF type of one tensor, as convert_hf_to_gguf (f32/f16/bf16/q8_0) or llama-quantize
 * (q4_0, q4_K_M) would choose it (FORMATS.md §7.4, llama-quant.cpp's rules for these ftypes). */
static uint32_t pick_type(enum tuna_gguf_ftype ft, const char *gg, int ndims, int64_t ne0, int64_t n_layers, bool tied)
{
    if (ndims < 2 || strstr(gg, "_norm.weight")) return TUNA_GGML_F32;
    uint32_t base;
    switch (ft) {
    case TUNA_GGUF_FT_F32: return TUNA_GGML_F32;
    case TUNA_GGUF_FT_F16: return TUNA_GGML_F16;
    case TUNA_GGUF_FT_BF16: return TUNA_GGML_BF16;
    case TUNA_GGUF_FT_Q8_0: return ne0 % 32 ? TUNA_GGML_F16 : TUNA_GGML_Q8_0;
    case TUNA_GGUF_FT_Q4_0: base = TUNA_GGML_Q4_0; break;
    default: base = TUNA_GGML_Q4_K; break;
    }
    uint32_t t = base;
    int64_t blck = base == TUNA_GGML_Q4_K ? 256 : 32;
    unsigned layer = 0;
    bool is_output = strcmp(gg, "output.weight") == 0 || (tied && strcmp(gg, "token_embd.weight") == 0);
    if (is_output) {
        t = ne0 % blck ? TUNA_GGML_Q8_0 : TUNA_GGML_Q6_K;
    } else if (ft == TUNA_GGUF_FT_Q4_K_M && sscanf(gg, "blk.%u.", &layer) == 1 &&
               (strstr(gg, "attn_v.weight") || strstr(gg, "ffn_down.weight"))) {
        if (use_more_bits((int64_t)layer, n_layers)) t = TUNA_GGML_Q6_K;
    }
    /* llama-quantize's fallbacks for rows that are not whole blocks */
    if (t == TUNA_GGML_Q4_K && ne0 % 256) t = TUNA_GGML_Q5_0;
    if (t == TUNA_GGML_Q6_K && ne0 % 256) t = TUNA_GGML_Q8_0;
    if (ne0 % 32) t = TUNA_GGML_F16;
    return t;
}

static double gguf_yarn_mscale(double scale, double m)
{
    return scale <= 1 ? 1.0 : 0.1 * m * log(scale) + 1.0;
}

double tuna_gguf_yarn_attn_factor(const struct tuna_rope *r)
{
    if (r->attention_factor > 0) return r->attention_factor;
    if (r->mscale > 0 && r->mscale_all_dim > 0)
        return gguf_yarn_mscale(r->factor, r->mscale) / gguf_yarn_mscale(r->factor, r->mscale_all_dim);
    return gguf_yarn_mscale(r->factor, 1.0);
}

void tuna_gguf_llama3_rope_freqs(const struct tuna_rope *r, int64_t dim, float *out)
{
    float factor = (float)r->factor, lf = (float)r->low_freq_factor;
    float old = (float)r->original_max_pos;
    float low_wl = (float)((double)r->original_max_pos / r->low_freq_factor);
    float high_wl = (float)((double)r->original_max_pos / r->high_freq_factor);
    for (int64_t i = 0; i < dim / 2; i++) {
        float freq = 1.0f / powf((float)r->theta, (float)(2 * i) / (float)dim);
        float wl = (float)(2 * M_PI) / freq;
        if (wl < high_wl) {
            out[i] = 1.0f;
        } else if (wl > low_wl) {
            out[i] = factor;
        } else {
            float smooth = (old / wl - lf) / (float)(r->high_freq_factor - r->low_freq_factor);
            out[i] = 1.0f / ((1.0f - smooth) / factor + smooth);
        }
    }
}

static tuna_status set_arch_kv(tuna_gguf_writer *w, const struct tuna_arch *a, const char *an, const char *name,
                               enum tuna_gguf_ftype ft)
{
    char k[128];
    tuna_status st;
#define KEY(suffix) (snprintf(k, sizeof k, "%s." suffix, an), k)
    if ((st = tuna_gguf_set_str(w, "general.architecture", an)) || (st = tuna_gguf_set_str(w, "general.type", "model")) ||
        (st = tuna_gguf_set_str(w, "general.name", name)) ||
        (st = tuna_gguf_set_u32(w, KEY("context_length"), (uint32_t)a->max_position_embeddings)) ||
        (st = tuna_gguf_set_u32(w, KEY("embedding_length"), (uint32_t)a->hidden_size)) ||
        (st = tuna_gguf_set_u32(w, KEY("block_count"), (uint32_t)a->n_layers)) ||
        (st = tuna_gguf_set_u32(w, KEY("feed_forward_length"), (uint32_t)a->intermediate_size)) ||
        (st = tuna_gguf_set_u32(w, KEY("attention.head_count"), (uint32_t)a->n_heads)) ||
        (st = tuna_gguf_set_u32(w, KEY("attention.head_count_kv"), (uint32_t)a->n_kv_heads)) ||
        (st = tuna_gguf_set_f32(w, KEY("attention.layer_norm_rms_epsilon"), (float)a->norm_eps)) ||
        (st = tuna_gguf_set_f32(w, KEY("rope.freq_base"), (float)a->rope.theta)))
        return st;
    int64_t rot = (int64_t)((double)a->head_dim * a->rope.partial_rotary_factor);
    if ((st = tuna_gguf_set_u32(w, KEY("rope.dimension_count"), (uint32_t)rot))) return st;
    if ((a->head_dim * a->n_heads != a->hidden_size || a->family == TUNA_FAMILY_GEMMA) &&
        ((st = tuna_gguf_set_u32(w, KEY("attention.key_length"), (uint32_t)a->head_dim)) ||
         (st = tuna_gguf_set_u32(w, KEY("attention.value_length"), (uint32_t)a->head_dim))))
        return st;
    if (a->family == TUNA_FAMILY_LLAMA || a->family == TUNA_FAMILY_MISTRAL)
        if ((st = tuna_gguf_set_u32(w, KEY("vocab_size"), (uint32_t)a->vocab_size))) return st;
    switch (a->rope.type) {
    case TUNA_ROPE_DEFAULT: break;
    case TUNA_ROPE_LINEAR:
    case TUNA_ROPE_YARN:
        if ((st = tuna_gguf_set_str(w, KEY("rope.scaling.type"), a->rope.type == TUNA_ROPE_LINEAR ? "linear" : "yarn")) ||
            (st = tuna_gguf_set_f32(w, KEY("rope.scaling.factor"), (float)a->rope.factor)))
            return st;
        if (a->rope.original_max_pos > 0 &&
            (st = tuna_gguf_set_u32(w, KEY("rope.scaling.original_context_length"), (uint32_t)a->rope.original_max_pos)))
            return st;
        if (a->rope.type == TUNA_ROPE_YARN) {
            /* llama.cpp's llama/qwen2/qwen3/gemma graphs run YaRN with beta_fast 32, beta_slow 1 and
             * truncated correction dims (the yarn_beta_* keys are not read for them), and scale by
             * mscale(factor) · rope.scaling.attn_factor (llama-context.cpp). */
            if (a->rope.beta_fast != 32.0 || a->rope.beta_slow != 1.0 || !a->rope.truncate)
                return tuna_fail(TUNA_E_UNSUPPORTED,
                                 "YaRN with beta_fast %g, beta_slow %g, truncate %s cannot be "
                                 "written to GGUF: llama.cpp runs %s models with beta_fast 32, beta_slow 1, truncate "
                                 "true only",
                                 a->rope.beta_fast, a->rope.beta_slow, a->rope.truncate ? "true" : "false", an);
            double af = tuna_gguf_yarn_attn_factor(&a->rope) / gguf_yarn_mscale(a->rope.factor, 1.0);
            if (fabs(af - 1.0) > 1e-7 && (st = tuna_gguf_set_f32(w, KEY("rope.scaling.attn_factor"), (float)af)))
                return st;
        }
        break;
    case TUNA_ROPE_LLAMA3:
        /* a rope_freqs.weight tensor (tuna_gguf_export), no rope.scaling keys */
        if (!tuna_gguf_family_permutes_qk(a->family))
            return tuna_fail(TUNA_E_UNSUPPORTED,
                             "llama3 RoPE scaling is written to GGUF for Llama-architecture models "
                             "only (llama.cpp's %s graph has no rope_freqs tensor)",
                             an);
        break;
    default:
        return tuna_fail(TUNA_E_UNSUPPORTED,
                         "rope_scaling type %s is not exported to GGUF yet (llama.cpp has no "
                         "equivalent); linear, yarn and llama3 are",
                         tuna_rope_type_name(a->rope.type));
    }
#undef KEY
    bool quant = ft == TUNA_GGUF_FT_Q8_0 || ft == TUNA_GGUF_FT_Q4_0 || ft == TUNA_GGUF_FT_Q4_K_M;
    if ((st = tuna_gguf_set_u32(w, "general.file_type", (uint32_t)ft))) return st;
    if (quant && (st = tuna_gguf_set_u32(w, "general.quantization_version", 2))) return st;
    return TUNA_OK;
}

/* The adapter module that tensor `name` ("<module>.weight") adapts, or NULL. */
static const struct tuna_lora_module *lora_module_for(const struct tuna_lora_adapter *a, const char *name)
{
    size_t n = strlen(name);
    char mod[TUNA_GGUF_MAX_NAME * 4];
    if (n < 8 || n - 7 >= sizeof mod || strcmp(name + n - 7, ".weight") != 0) return NULL;
    memcpy(mod, name, n - 7);
    mod[n - 7] = '\0';
    return tuna_lora_find(a, mod);
}

/* Every adapter module must name a weight of the model that the export writes. */
static tuna_status lora_check_covered(const tuna_st_set *set, const struct tuna_lora_adapter *a, const char *dir,
                                      bool tied)
{
    for (int i = 0; i < a->n_modules; i++) {
        const char *m = a->modules[i].name;
        char name[TUNA_GGUF_MAX_NAME * 4];
        if ((size_t)snprintf(name, sizeof name, "%s.weight", m) >= sizeof name)
            return tuna_fail(TUNA_E_INVALID, "LoRA module name too long: %.64s...", m);
        if (!strcmp(m, "lm_head") && tied)
            return tuna_fail(TUNA_E_UNSUPPORTED,
                             "the adapter adapts lm_head but %s ties its output to the embeddings; merging would "
                             "untie them, which tuna does not do",
                             dir);
        if (!tuna_st_set_find(set, name))
            return tuna_fail(TUNA_E_INVALID,
                             "the adapter adapts %s but %s has no tensor %s: is it an adapter for another base model?", m,
                             dir, name);
    }
    return TUNA_OK;
}

tuna_status tuna_gguf_export(const char *dir, const struct tuna_gguf_export_opts *o, const char *out_path)
{
    struct tuna_arch a;
    memset(&a, 0, sizeof a);
    tuna_st_set *set = NULL;
    tuna_gguf_writer *w = NULL;
    float *buf = NULL, *tmp = NULL;
    tuna_status st = tuna_arch_load(dir, &a);
    if (st) return st;
    const char *an = tuna_gguf_arch_name(a.family);
    if (a.quant.method != TUNA_QUANT_NONE) {
        st = tuna_fail(TUNA_E_UNSUPPORTED, "%s is a %s-quantized checkpoint; export a 16-bit model to GGUF "
                       "(dequantize or merge to 16-bit first)", dir, a.quant.method_name);
        goto done;
    }
    if ((st = tuna_st_set_open(dir, "model", &set))) goto done;
    if ((st = tuna_gguf_writer_new(&w))) goto done;
    char name[256];
    if (o->name) {
        snprintf(name, sizeof name, "%s", o->name);
    } else {
        const char *b = strrchr(dir, '/');
        snprintf(name, sizeof name, "%s", b && b[1] ? b + 1 : dir);
    }
    if ((st = set_arch_kv(w, &a, an, name, o->ftype))) goto done;
    if ((st = tuna_gguf_write_vocab(w, dir))) goto done;
    if (a.rope.type == TUNA_ROPE_LLAMA3) {
        /* llama.cpp's Llama-3.1 RoPE: theta_i / rope_freqs[i] (convert_hf_to_gguf's factors) */
        int64_t rot = (int64_t)((double)a.head_dim * a.rope.partial_rotary_factor), ne = rot / 2;
        float *rf = malloc(sizeof *rf * (size_t)(ne ? ne : 1));
        if (!rf) {
            st = tuna_fail_oom("rope_freqs", sizeof *rf * (size_t)ne);
            goto done;
        }
        tuna_gguf_llama3_rope_freqs(&a.rope, rot, rf);
        if ((st = tuna_gguf_add_tensor(w, "rope_freqs.weight", TUNA_GGML_F32, 1, &ne, rf, sizeof *rf * (size_t)ne,
                                       true)))
            goto done;
    }
    bool tied = a.tie_word_embeddings || !tuna_st_set_find(set, "lm_head.weight");
    if (o->lora && (st = lora_check_covered(set, o->lora, dir, tied))) goto done;
    int n_merged = 0;
    size_t n = tuna_st_set_count(set);
    for (size_t i = 0; i < n; i++) {
        const struct tuna_tensor_view *tv = tuna_st_set_at(set, i);
        char gg[TUNA_GGUF_MAX_NAME];
        if (strstr(tv->name, "rotary_emb.inv_freq")) continue; /* recomputed by llama.cpp */
        if (!tuna_gguf_tensor_name(tv->name, gg, sizeof gg)) {
            st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor '%s' has no GGUF name for arch %s", dir, tv->name, an);
            goto done;
        }
        if (tied && strcmp(gg, "output.weight") == 0) continue;
        if (tv->ndim < 1 || tv->ndim > 2) {
            st = tuna_fail(TUNA_E_UNSUPPORTED, "%s: tensor '%s' has %d dims", dir, tv->name, tv->ndim);
            goto done;
        }
        int64_t rows = tv->ndim == 2 ? tv->shape[0] : 1, cols = tv->shape[tv->ndim - 1];
        free(buf);
        free(tmp);
        tmp = NULL;
        if (!(buf = malloc(tv->numel * sizeof *buf))) {
            st = tuna_fail_oom("tensor", tv->numel * sizeof *buf);
            goto done;
        }
        const struct tuna_lora_module *mod = o->lora ? lora_module_for(o->lora, tv->name) : NULL;
        if (mod) {
            /* the merge of `tuna export merged-16bit`: W + s·B·A rounded to the stored dtype */
            if (tv->ndim != 2 || mod->out != rows || mod->in != cols) {
                st = tuna_fail(TUNA_E_INVALID, "LoRA module %s is [%lld, %lld] but %s is %s[%lld, %lld]: is the adapter for another base model?",
                               mod->name, (long long)mod->out, (long long)mod->in, tv->name, tv->ndim == 2 ? "" : "not 2-D ",
                               (long long)rows, (long long)cols);
                goto done;
            }
            void *merged = malloc(tv->nbytes ? tv->nbytes : 1);
            if (!merged) {
                st = tuna_fail_oom("merged tensor", tv->nbytes);
                goto done;
            }
            struct tuna_tensor_view mv = *tv;
            mv.data = merged;
            if (!(st = tuna_lora_merge_stored(mod, tv->dtype, tv->data, merged))) st = tuna_tensor_to_f32(&mv, buf);
            free(merged);
            if (st) goto done;
            n_merged++;
        } else if ((st = tuna_tensor_to_f32(tv, buf))) {
            goto done;
        }
        /* Gemma: llama.cpp's gemma graph uses plain RMSNorm, the converter stores 1 + w */
        if (a.norm_add_one && strstr(gg, "norm.weight"))
            for (int64_t j = 0; j < (int64_t)tv->numel; j++) buf[j] += 1.0f;
        bool is_q = strstr(gg, ".attn_q.") != NULL, is_k = strstr(gg, ".attn_k.") != NULL;
        if (tuna_gguf_family_permutes_qk(a.family) && (is_q || is_k)) {
            if (!(tmp = malloc(tv->numel * sizeof *tmp))) {
                st = tuna_fail_oom("tensor", tv->numel * sizeof *tmp);
                goto done;
            }
            int64_t nh = is_q ? a.n_heads : a.n_kv_heads;
            /* a bias [rows] is permuted as a [rows, 1] matrix */
            int64_t prow = tv->ndim == 2 ? rows : cols, pcol = tv->ndim == 2 ? cols : 1;
            tuna_gguf_permute_qk(buf, tmp, nh, prow, pcol, true);
        }
        uint32_t type = pick_type(o->ftype, gg, tv->ndim, cols, a.n_layers, tied);
        size_t nbytes = tuna_ggml_row_size(type, cols) * (size_t)rows;
        void *data = malloc(nbytes ? nbytes : 1);
        if (!data) {
            st = tuna_fail_oom("tensor", nbytes);
            goto done;
        }
        if ((st = tuna_ggml_quantize(type, buf, data, (int64_t)tv->numel))) {
            free(data);
            goto done;
        }
        int64_t ne[2] = {cols, rows};
        if ((st = tuna_gguf_add_tensor(w, gg, type, tv->ndim, ne, data, nbytes, true))) goto done;
        if (!o->quiet && tv->ndim == 1) fprintf(stderr, "  %-28s %-6s [%lld]\n", gg, tuna_ggml_type_name(type), (long long)cols);
        else if (!o->quiet) fprintf(stderr, "  %-28s %-6s [%lld, %lld]\n", gg, tuna_ggml_type_name(type), (long long)cols, (long long)rows);
    }
    if (o->lora && n_merged != o->lora->n_modules) {
        st = tuna_fail(TUNA_E_INTERNAL, "merged %d weights for %d adapter modules", n_merged, o->lora->n_modules);
        goto done;
    }
    st = tuna_gguf_writer_save(w, out_path);
done:
    free(buf);
    free(tmp);
    tuna_gguf_writer_free(w);
    tuna_st_set_close(set);
    tuna_arch_free(&a);
    if (st) return tuna_fail_prefix(st, "exporting %s to GGUF", dir);
    return TUNA_OK;
}
