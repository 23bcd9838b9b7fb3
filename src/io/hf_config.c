/* hf_config.c — config.json → struct tuna_arch, with transformers' defaults per model_type.
 *
 * Follows the configuration classes of transformers 5 (LlamaConfig, MistralConfig, Qwen2Config,
 * Qwen3Config, GemmaConfig): RoPE from `rope_parameters` (new) or `rope_theta` + `rope_scaling`
 * (old; `type` or `rope_type`), dtype from `dtype` (new) or `torch_dtype` (old).
 */
#include "hf_config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"

static const struct {
    const char *model_type;
    enum tuna_family family;
} k_families[] = {
    {"llama", TUNA_FAMILY_LLAMA}, {"mistral", TUNA_FAMILY_MISTRAL}, {"qwen2", TUNA_FAMILY_QWEN2},
    {"qwen3", TUNA_FAMILY_QWEN3}, {"gemma", TUNA_FAMILY_GEMMA},
};
#define N_FAMILIES (sizeof k_families / sizeof k_families[0])
#define SUPPORTED_LIST "llama, mistral, qwen2, qwen3, gemma"

const char *tuna_family_name(enum tuna_family f)
{
    for (size_t i = 0; i < N_FAMILIES; i++)
        if (k_families[i].family == f) return k_families[i].model_type;
    return "unknown";
}

const char *tuna_rope_type_name(enum tuna_rope_type t)
{
    switch (t) {
    case TUNA_ROPE_DEFAULT: return "default";
    case TUNA_ROPE_LINEAR: return "linear";
    case TUNA_ROPE_DYNAMIC: return "dynamic";
    case TUNA_ROPE_LLAMA3: return "llama3";
    case TUNA_ROPE_YARN: return "yarn";
    }
    return "unknown";
}

const char *tuna_quant_method_name(enum tuna_quant_method m)
{
    switch (m) {
    case TUNA_QUANT_NONE: return "none";
    case TUNA_QUANT_BNB_4BIT: return "bitsandbytes 4-bit";
    case TUNA_QUANT_BNB_8BIT: return "bitsandbytes 8-bit (LLM.int8)";
    case TUNA_QUANT_AWQ: return "AWQ";
    case TUNA_QUANT_GPTQ: return "GPTQ";
    case TUNA_QUANT_FP8: return "FP8";
    case TUNA_QUANT_OTHER: return "other";
    }
    return "unknown";
}

void tuna_arch_free(struct tuna_arch *a)
{
    if (!a) return;
    for (int i = 0; i < a->quant.n_skip_modules; i++) free(a->quant.skip_modules[i]);
    free(a->quant.skip_modules);
    a->quant.skip_modules = NULL;
    a->quant.n_skip_modules = 0;
}

/* Reads an integer that must be present and positive. */
static tuna_status need_pos_int(const cJSON *doc, const char *key, int64_t *out, const char *what)
{
    tuna_status st;
    if (!tuna_json_get_int(doc, key, out, &st, what)) {
        if (st) return st;
        return tuna_fail(TUNA_E_FORMAT, "%s: \"%s\" is missing; it is required for this model", what, key);
    }
    if (*out <= 0) return tuna_fail(TUNA_E_FORMAT, "%s: \"%s\" is %lld; it must be positive", what, key, (long long)*out);
    return TUNA_OK;
}

/* Optional values: keep the default when absent, fail on a wrong type. */
#define OPT(getter, key, ptr)                                                                                          \
    do {                                                                                                               \
        tuna_status st_;                                                                                               \
        if (!getter(doc, key, ptr, &st_, what) && st_) return st_;                                                     \
    } while (0)

static tuna_status parse_rope(const cJSON *doc, const char *what, struct tuna_rope *r)
{
    r->type = TUNA_ROPE_DEFAULT;
    r->theta = 10000.0;
    r->factor = 1.0;
    r->low_freq_factor = 1.0;
    r->high_freq_factor = 4.0;
    r->original_max_pos = 0;
    r->beta_fast = 32.0;
    r->beta_slow = 1.0;
    r->truncate = true;
    r->partial_rotary_factor = 1.0;
    OPT(tuna_json_get_num, "rope_theta", &r->theta);
    OPT(tuna_json_get_num, "partial_rotary_factor", &r->partial_rotary_factor);
    /* rope_parameters (transformers ≥ 5) holds theta too; rope_scaling is the older name */
    const cJSON *p = tuna_json_member(doc, "rope_parameters");
    const cJSON *sc = tuna_json_member(doc, "rope_scaling");
    if (p && !cJSON_IsObject(p)) return tuna_fail(TUNA_E_FORMAT, "%s: rope_parameters should be an object", what);
    if (sc && !cJSON_IsObject(sc)) return tuna_fail(TUNA_E_FORMAT, "%s: rope_scaling should be an object", what);
    const cJSON *src = p ? p : sc;
    if (!src) return TUNA_OK;
    char sub[300];
    snprintf(sub, sizeof sub, "%s (%s)", what, p ? "rope_parameters" : "rope_scaling");
    const char *type = NULL;
    tuna_status st;
    if (!tuna_json_get_str(src, "rope_type", &type, &st, sub)) {
        if (st) return st;
        if (!tuna_json_get_str(src, "type", &type, &st, sub) && st) return st;
    }
    if (!tuna_json_get_num(src, "rope_theta", &r->theta, &st, sub) && st) return st;
    if (!tuna_json_get_num(src, "factor", &r->factor, &st, sub) && st) return st;
    if (!tuna_json_get_num(src, "low_freq_factor", &r->low_freq_factor, &st, sub) && st) return st;
    if (!tuna_json_get_num(src, "high_freq_factor", &r->high_freq_factor, &st, sub) && st) return st;
    if (!tuna_json_get_int(src, "original_max_position_embeddings", &r->original_max_pos, &st, sub) && st) return st;
    if (!tuna_json_get_num(src, "beta_fast", &r->beta_fast, &st, sub) && st) return st;
    if (!tuna_json_get_num(src, "beta_slow", &r->beta_slow, &st, sub) && st) return st;
    if (!tuna_json_get_num(src, "mscale", &r->mscale, &st, sub) && st) return st;
    if (!tuna_json_get_num(src, "mscale_all_dim", &r->mscale_all_dim, &st, sub) && st) return st;
    if (!tuna_json_get_num(src, "attention_factor", &r->attention_factor, &st, sub) && st) return st;
    if (!tuna_json_get_bool(src, "truncate", &r->truncate, &st, sub) && st) return st;
    if (!tuna_json_get_num(src, "partial_rotary_factor", &r->partial_rotary_factor, &st, sub) && st) return st;
    if (!type || !strcmp(type, "default")) r->type = TUNA_ROPE_DEFAULT;
    else if (!strcmp(type, "linear")) r->type = TUNA_ROPE_LINEAR;
    else if (!strcmp(type, "dynamic")) r->type = TUNA_ROPE_DYNAMIC;
    else if (!strcmp(type, "llama3")) r->type = TUNA_ROPE_LLAMA3;
    else if (!strcmp(type, "yarn")) r->type = TUNA_ROPE_YARN;
    else
        return tuna_fail(TUNA_E_UNSUPPORTED,
                         "%s: RoPE type \"%s\" is not supported (tuna handles default, linear, dynamic, llama3, yarn)",
                         sub, type);
    if (r->theta <= 0) return tuna_fail(TUNA_E_FORMAT, "%s: rope_theta must be positive", sub);
    if (r->type != TUNA_ROPE_DEFAULT && r->factor <= 0)
        return tuna_fail(TUNA_E_FORMAT, "%s: RoPE scaling factor must be positive", sub);
    if (r->type == TUNA_ROPE_LLAMA3 && r->original_max_pos <= 0)
        return tuna_fail(TUNA_E_FORMAT, "%s: llama3 RoPE needs original_max_position_embeddings", sub);
    return TUNA_OK;
}

static tuna_status parse_quant(const cJSON *doc, const char *what, struct tuna_quant_config *q)
{
    memset(q, 0, sizeof *q);
    const cJSON *qc = tuna_json_member(doc, "quantization_config");
    /* some tools nest it under text_config; the top level is what transformers reads */
    if (!qc) return TUNA_OK;
    if (!cJSON_IsObject(qc)) return tuna_fail(TUNA_E_FORMAT, "%s: quantization_config should be an object", what);
    char sub[300];
    snprintf(sub, sizeof sub, "%s (quantization_config)", what);
    tuna_status st;
    const char *method = NULL;
    if (!tuna_json_get_str(qc, "quant_method", &method, &st, sub)) {
        if (st) return st;
        /* old bitsandbytes configs had no quant_method but load_in_4bit/8bit */
        bool b4 = false, b8 = false;
        tuna_json_get_bool(qc, "load_in_4bit", &b4, &st, sub);
        tuna_json_get_bool(qc, "load_in_8bit", &b8, &st, sub);
        method = (b4 || b8) ? "bitsandbytes" : "unknown";
    }
    snprintf(q->method_name, sizeof q->method_name, "%s", method);
    q->bnb_4bit_quant_type_nf4 = true;
    q->bnb_compute_dtype = TUNA_DTYPE_F32;
    snprintf(q->bnb_quant_storage, sizeof q->bnb_quant_storage, "uint8");
    if (!strcmp(method, "bitsandbytes")) {
        bool b4 = false, b8 = false;
        if (!tuna_json_get_bool(qc, "load_in_4bit", &b4, &st, sub) && st) return st;
        if (!tuna_json_get_bool(qc, "load_in_8bit", &b8, &st, sub) && st) return st;
        if (!b4 && !b8) tuna_json_get_bool(qc, "_load_in_4bit", &b4, &st, sub);
        if (!b4 && !b8) tuna_json_get_bool(qc, "_load_in_8bit", &b8, &st, sub);
        if (b4 && b8) return tuna_fail(TUNA_E_FORMAT, "%s: both load_in_4bit and load_in_8bit are true", sub);
        q->method = b8 ? TUNA_QUANT_BNB_8BIT : TUNA_QUANT_BNB_4BIT;
        const char *s = NULL;
        if (tuna_json_get_str(qc, "bnb_4bit_quant_type", &s, &st, sub)) {
            if (!strcmp(s, "nf4")) q->bnb_4bit_quant_type_nf4 = true;
            else if (!strcmp(s, "fp4")) q->bnb_4bit_quant_type_nf4 = false;
            else return tuna_fail(TUNA_E_UNSUPPORTED, "%s: bnb_4bit_quant_type \"%s\" (tuna reads nf4 and fp4)", sub, s);
        } else if (st) {
            return st;
        }
        if (!tuna_json_get_bool(qc, "bnb_4bit_use_double_quant", &q->bnb_double_quant, &st, sub) && st) return st;
        if (tuna_json_get_str(qc, "bnb_4bit_compute_dtype", &s, &st, sub)) {
            q->bnb_compute_dtype = tuna_dtype_from_torch(s);
            if (q->bnb_compute_dtype == TUNA_DTYPE_INVALID)
                return tuna_fail(TUNA_E_FORMAT, "%s: unknown bnb_4bit_compute_dtype \"%s\"", sub, s);
        } else if (st) {
            return st;
        }
        if (tuna_json_get_str(qc, "bnb_4bit_quant_storage", &s, &st, sub))
            snprintf(q->bnb_quant_storage, sizeof q->bnb_quant_storage, "%s", s);
        else if (st)
            return st;
        q->int8_threshold = 6.0;
        if (!tuna_json_get_num(qc, "llm_int8_threshold", &q->int8_threshold, &st, sub) && st) return st;
        const cJSON *skip = tuna_json_member(qc, "llm_int8_skip_modules");
        if (skip) {
            if (!cJSON_IsArray(skip))
                return tuna_fail(TUNA_E_FORMAT, "%s: llm_int8_skip_modules should be a list of names", sub);
            int n = cJSON_GetArraySize(skip);
            q->skip_modules = calloc((size_t)n + 1, sizeof *q->skip_modules);
            if (!q->skip_modules) return tuna_fail_oom("skip modules", (size_t)n);
            for (const cJSON *e = skip->child; e; e = e->next) {
                if (!cJSON_IsString(e))
                    return tuna_fail(TUNA_E_FORMAT, "%s: llm_int8_skip_modules holds a non-string", sub);
                q->skip_modules[q->n_skip_modules] = strdup(e->valuestring);
                if (!q->skip_modules[q->n_skip_modules]) return tuna_fail_oom("skip modules", 0);
                q->n_skip_modules++;
            }
        }
    } else if (!strcmp(method, "awq")) {
        q->method = TUNA_QUANT_AWQ;
    } else if (!strcmp(method, "gptq")) {
        q->method = TUNA_QUANT_GPTQ;
    } else if (!strcmp(method, "fp8") || !strcmp(method, "compressed-tensors")) {
        q->method = !strcmp(method, "fp8") ? TUNA_QUANT_FP8 : TUNA_QUANT_OTHER;
    } else {
        q->method = TUNA_QUANT_OTHER;
    }
    int64_t v;
    if (tuna_json_get_int(qc, "bits", &v, &st, sub)) q->bits = (int)v;
    else if (tuna_json_get_int(qc, "w_bit", &v, &st, sub)) q->bits = (int)v;
    if (tuna_json_get_int(qc, "group_size", &v, &st, sub)) q->group_size = (int)v;
    else if (tuna_json_get_int(qc, "q_group_size", &v, &st, sub)) q->group_size = (int)v;
    return TUNA_OK;
}

static tuna_status parse_eos(const cJSON *doc, const char *what, struct tuna_arch *a)
{
    const cJSON *e = tuna_json_member(doc, "eos_token_id");
    a->n_eos = 0;
    if (!e) return TUNA_OK;
    if (cJSON_IsNumber(e)) {
        a->eos_token_ids[a->n_eos++] = (int64_t)e->valuedouble;
        return TUNA_OK;
    }
    if (!cJSON_IsArray(e)) return tuna_fail(TUNA_E_FORMAT, "%s: eos_token_id should be a number or a list", what);
    for (const cJSON *x = e->child; x; x = x->next) {
        if (!cJSON_IsNumber(x)) return tuna_fail(TUNA_E_FORMAT, "%s: eos_token_id list holds a non-number", what);
        if (a->n_eos < (int)(sizeof a->eos_token_ids / sizeof a->eos_token_ids[0]))
            a->eos_token_ids[a->n_eos++] = (int64_t)x->valuedouble;
    }
    return TUNA_OK;
}

static tuna_status parse_doc(const cJSON *doc, const char *what, struct tuna_arch *a)
{
    tuna_status st;
    memset(a, 0, sizeof *a);
    if (!cJSON_IsObject(doc)) return tuna_fail(TUNA_E_FORMAT, "%s is not a JSON object", what);
    const char *mt = NULL;
    if (!tuna_json_get_str(doc, "model_type", &mt, &st, what)) {
        if (st) return st;
        return tuna_fail(TUNA_E_FORMAT, "%s has no \"model_type\"; tuna supports %s", what, SUPPORTED_LIST);
    }
    size_t fi = 0;
    while (fi < N_FAMILIES && strcmp(k_families[fi].model_type, mt)) fi++;
    if (fi == N_FAMILIES)
        return tuna_fail(TUNA_E_UNSUPPORTED, "%s: model_type \"%s\" is not supported; tuna supports %s", what, mt,
                         SUPPORTED_LIST);
    a->family = k_families[fi].family;
    snprintf(a->model_type, sizeof a->model_type, "%s", mt);
    const cJSON *archs = tuna_json_member(doc, "architectures");
    if (archs && cJSON_IsArray(archs) && archs->child && cJSON_IsString(archs->child))
        snprintf(a->architecture, sizeof a->architecture, "%s", archs->child->valuestring);

    if ((st = need_pos_int(doc, "hidden_size", &a->hidden_size, what))) return st;
    if ((st = need_pos_int(doc, "num_hidden_layers", &a->n_layers, what))) return st;
    if ((st = need_pos_int(doc, "num_attention_heads", &a->n_heads, what))) return st;
    if ((st = need_pos_int(doc, "intermediate_size", &a->intermediate_size, what))) return st;
    if ((st = need_pos_int(doc, "vocab_size", &a->vocab_size, what))) return st;
    a->n_kv_heads = a->n_heads;
    OPT(tuna_json_get_int, "num_key_value_heads", &a->n_kv_heads);
    if (a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads != 0)
        return tuna_fail(TUNA_E_FORMAT, "%s: num_attention_heads %lld is not a multiple of num_key_value_heads %lld",
                         what, (long long)a->n_heads, (long long)a->n_kv_heads);
    /* head_dim: explicit, else the family default (gemma 256, qwen3 128), else hidden/heads */
    a->head_dim = 0;
    OPT(tuna_json_get_int, "head_dim", &a->head_dim);
    if (a->head_dim <= 0) {
        if (tuna_json_member(doc, "head_dim") == NULL && a->family == TUNA_FAMILY_GEMMA) a->head_dim = 256;
        else if (tuna_json_member(doc, "head_dim") == NULL && a->family == TUNA_FAMILY_QWEN3) a->head_dim = 128;
        else a->head_dim = a->hidden_size / a->n_heads;
    }
    if (a->head_dim <= 0 || a->head_dim % 2)
        return tuna_fail(TUNA_E_FORMAT, "%s: head_dim %lld must be positive and even", what, (long long)a->head_dim);
    a->max_position_embeddings = a->family == TUNA_FAMILY_GEMMA ? 8192
                               : a->family == TUNA_FAMILY_MISTRAL ? 32768
                               : a->family == TUNA_FAMILY_LLAMA ? 2048 : 32768;
    OPT(tuna_json_get_int, "max_position_embeddings", &a->max_position_embeddings);
    a->norm_eps = 1e-6;
    OPT(tuna_json_get_num, "rms_norm_eps", &a->norm_eps);

    /* activation: gemma reads hidden_activation (default gelu_pytorch_tanh), others hidden_act */
    const char *act = a->family == TUNA_FAMILY_GEMMA ? "gelu_pytorch_tanh" : "silu";
    if (a->family == TUNA_FAMILY_GEMMA) {
        OPT(tuna_json_get_str, "hidden_activation", &act);
    } else {
        OPT(tuna_json_get_str, "hidden_act", &act);
    }
    if (!strcmp(act, "silu") || !strcmp(act, "swish")) a->act = TUNA_ACT_SILU;
    else if (!strcmp(act, "gelu_pytorch_tanh") || !strcmp(act, "gelu_new") || !strcmp(act, "gelu_fast"))
        a->act = TUNA_ACT_GELU_TANH;
    else if (!strcmp(act, "gelu")) a->act = TUNA_ACT_GELU;
    else return tuna_fail(TUNA_E_UNSUPPORTED, "%s: activation \"%s\" is not supported (silu, gelu, gelu_pytorch_tanh)",
                          what, act);

    a->tie_word_embeddings = a->family == TUNA_FAMILY_GEMMA;
    OPT(tuna_json_get_bool, "tie_word_embeddings", &a->tie_word_embeddings);

    bool attn_bias = false;
    OPT(tuna_json_get_bool, "attention_bias", &attn_bias);
    switch (a->family) {
    case TUNA_FAMILY_QWEN2: /* q/k/v always carry a bias, o_proj never */
        a->attention_bias = true;
        a->o_bias = false;
        break;
    case TUNA_FAMILY_MISTRAL: /* MistralAttention has no biases */
        a->attention_bias = false;
        a->o_bias = false;
        break;
    default: /* llama, qwen3, gemma: attention_bias applies to q, k, v and o */
        a->attention_bias = attn_bias;
        a->o_bias = attn_bias;
    }
    a->mlp_bias = false;
    if (a->family == TUNA_FAMILY_LLAMA) OPT(tuna_json_get_bool, "mlp_bias", &a->mlp_bias);
    a->qk_norm = a->family == TUNA_FAMILY_QWEN3;
    a->norm_add_one = a->family == TUNA_FAMILY_GEMMA;
    a->embed_scale_sqrt = a->family == TUNA_FAMILY_GEMMA;

    /* sliding window: mistral uses it when set; qwen2/3 only with use_sliding_window */
    int64_t sw = 0;
    OPT(tuna_json_get_int, "sliding_window", &sw);
    /* MistralConfig's default is 4096 when the key is absent (an explicit null disables it) */
    if (a->family == TUNA_FAMILY_MISTRAL && !cJSON_GetObjectItemCaseSensitive(doc, "sliding_window")) sw = 4096;
    bool use_sw = a->family == TUNA_FAMILY_MISTRAL;
    if (a->family == TUNA_FAMILY_QWEN2 || a->family == TUNA_FAMILY_QWEN3) OPT(tuna_json_get_bool, "use_sliding_window", &use_sw);
    a->sliding_window = (use_sw && sw > 0) ? sw : 0;

    const char *dt = NULL;
    a->dtype = TUNA_DTYPE_BF16;
    if (!tuna_json_get_str(doc, "dtype", &dt, &st, what)) {
        if (st) return st;
        OPT(tuna_json_get_str, "torch_dtype", &dt);
    }
    if (dt) {
        a->dtype = tuna_dtype_from_torch(dt);
        if (a->dtype == TUNA_DTYPE_INVALID || !tuna_dtype_is_float(a->dtype))
            return tuna_fail(TUNA_E_UNSUPPORTED, "%s: dtype \"%s\" is not a float type tuna loads", what, dt);
    }

    if ((st = parse_rope(doc, what, &a->rope))) return st;
    a->bos_token_id = -1;
    a->pad_token_id = -1;
    OPT(tuna_json_get_int, "bos_token_id", &a->bos_token_id);
    OPT(tuna_json_get_int, "pad_token_id", &a->pad_token_id);
    if ((st = parse_eos(doc, what, a))) return st;
    if ((st = parse_quant(doc, what, &a->quant))) return st;
    return TUNA_OK;
}

tuna_status tuna_arch_parse(const char *json, size_t len, const char *what, struct tuna_arch *out)
{
    cJSON *doc;
    tuna_status st = tuna_json_parse(json, len, what, &doc);
    if (st) return st;
    st = parse_doc(doc, what, out);
    if (st) tuna_arch_free(out);
    cJSON_Delete(doc);
    return st;
}

tuna_status tuna_arch_load(const char *dir_or_file, struct tuna_arch *out)
{
    char *path = tuna_path_is_dir(dir_or_file) ? tuna_path_join(dir_or_file, "config.json") : strdup(dir_or_file);
    if (!path) return tuna_fail_oom("path", strlen(dir_or_file));
    if (!tuna_path_exists(path)) {
        tuna_status st = tuna_fail(TUNA_E_NOT_FOUND, "%s not found: a Hugging Face model folder has a config.json", path);
        free(path);
        return st;
    }
    char *text;
    size_t len;
    tuna_status st = tuna_read_file(path, 16u << 20, &text, &len);
    if (!st) st = tuna_arch_parse(text, len, path, out);
    free(text);
    free(path);
    return st;
}

uint64_t tuna_arch_param_count(const struct tuna_arch *a)
{
    uint64_t C = (uint64_t)a->hidden_size, D = (uint64_t)a->head_dim, H = (uint64_t)a->n_heads;
    uint64_t Hkv = (uint64_t)a->n_kv_heads, I = (uint64_t)a->intermediate_size, V = (uint64_t)a->vocab_size;
    uint64_t attn = C * H * D + 2 * C * Hkv * D + H * D * C;
    if (a->attention_bias) attn += H * D + 2 * Hkv * D;
    if (a->o_bias) attn += C;
    if (a->qk_norm) attn += 2 * D;
    uint64_t mlp = 3 * C * I + (a->mlp_bias ? 2 * I + C : 0);
    uint64_t layer = attn + mlp + 2 * C;
    uint64_t total = (uint64_t)a->n_layers * layer + V * C + C;
    if (!a->tie_word_embeddings) total += V * C;
    return total;
}

uint64_t tuna_arch_kv_bytes_per_token(const struct tuna_arch *a, int elem_bytes)
{
    return 2ull * (uint64_t)a->n_layers * (uint64_t)a->n_kv_heads * (uint64_t)a->head_dim * (uint64_t)elem_bytes;
}
