/* hf_config.h — config.json of a Hugging Face model folder → struct tuna_arch.
 *
 * One description for every supported family (llama, mistral, qwen2, qwen3, gemma); the
 * differences between them are fields here (biases, q/k norm, norm offset, embedding scale,
 * activation), never `if (arch == ...)` in the forward pass. Defaults follow transformers'
 * configuration classes for each model_type.
 */
#ifndef TUNA_IO_HF_CONFIG_H
#define TUNA_IO_HF_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "core/dtype.h"
#include "tuna.h"

enum tuna_family {
    TUNA_FAMILY_LLAMA = 0,
    TUNA_FAMILY_MISTRAL,
    TUNA_FAMILY_QWEN2,
    TUNA_FAMILY_QWEN3,
    TUNA_FAMILY_GEMMA,
    TUNA_FAMILY_COUNT
};

enum tuna_act {
    TUNA_ACT_SILU = 0,  /* SwiGLU: silu(gate) * up */
    TUNA_ACT_GELU_TANH, /* GeGLU with the tanh approximation (gelu_pytorch_tanh) */
    TUNA_ACT_GELU       /* GeGLU with exact erf gelu */
};

enum tuna_rope_type {
    TUNA_ROPE_DEFAULT = 0,
    TUNA_ROPE_LINEAR,
    TUNA_ROPE_DYNAMIC, /* dynamic NTK */
    TUNA_ROPE_LLAMA3,
    TUNA_ROPE_YARN
};

struct tuna_rope {
    enum tuna_rope_type type;
    double theta;                /* rope_theta (base) */
    double factor;               /* linear/dynamic/llama3/yarn scaling factor (1 = none) */
    double low_freq_factor;      /* llama3 */
    double high_freq_factor;     /* llama3 */
    int64_t original_max_pos;    /* llama3/yarn/dynamic: original_max_position_embeddings */
    double beta_fast, beta_slow; /* yarn (defaults 32, 1) */
    double mscale, mscale_all_dim; /* yarn (0 = unset) */
    double attention_factor;     /* yarn: explicit attention_factor (0 = derive) */
    bool truncate;               /* yarn: truncate (default true) */
    double partial_rotary_factor; /* fraction of head_dim rotated (1 = all) */
};

enum tuna_quant_method {
    TUNA_QUANT_NONE = 0,
    TUNA_QUANT_BNB_4BIT,
    TUNA_QUANT_BNB_8BIT,
    TUNA_QUANT_AWQ,
    TUNA_QUANT_GPTQ,
    TUNA_QUANT_FP8,
    TUNA_QUANT_OTHER /* a quant_method tuna does not know; name in quant_method_name */
};

/* quantization_config as declared in config.json (not what the tensors hold: see inspect). */
struct tuna_quant_config {
    enum tuna_quant_method method;
    char method_name[32];        /* the quant_method string as written */
    /* bitsandbytes */
    bool bnb_4bit_quant_type_nf4; /* true: nf4, false: fp4 */
    bool bnb_double_quant;       /* bnb_4bit_use_double_quant */
    enum tuna_dtype bnb_compute_dtype;
    char bnb_quant_storage[16];  /* "uint8" usually */
    char **skip_modules;         /* llm_int8_skip_modules (owned), may be NULL */
    int n_skip_modules;
    double int8_threshold;
    /* AWQ / GPTQ */
    int bits;
    int group_size;
};

struct tuna_arch {
    enum tuna_family family;
    char model_type[32];         /* as written in config.json */
    char architecture[64];       /* architectures[0], e.g. "LlamaForCausalLM" */

    int64_t hidden_size;         /* C */
    int64_t n_layers;            /* L */
    int64_t n_heads;             /* H */
    int64_t n_kv_heads;          /* Hkv */
    int64_t head_dim;            /* D (explicit, or hidden/heads) */
    int64_t intermediate_size;
    int64_t vocab_size;          /* V */
    int64_t max_position_embeddings;
    double norm_eps;
    enum tuna_act act;
    bool tie_word_embeddings;
    bool attention_bias;         /* q/k/v (and o for llama's attention_bias) biases */
    bool o_bias;                 /* o_proj has a bias (llama attention_bias=true; not qwen2) */
    bool mlp_bias;
    bool qk_norm;                /* qwen3: RMSNorm on q and k per head */
    bool norm_add_one;           /* gemma: weight used as (1 + w) */
    bool embed_scale_sqrt;       /* gemma: embeddings × sqrt(hidden) */
    int64_t sliding_window;      /* 0 = none (or disabled) */
    enum tuna_dtype dtype;       /* torch_dtype / dtype; BF16 when absent */
    struct tuna_rope rope;

    int64_t bos_token_id;        /* -1 when absent */
    int64_t eos_token_ids[8];    /* eos_token_id may be a list */
    int n_eos;
    int64_t pad_token_id;        /* -1 when absent */

    struct tuna_quant_config quant;
};

/* Parses dir/config.json (or a config.json path). Unknown model_type: TUNA_E_UNSUPPORTED with
 * the list of supported ones. */
tuna_status tuna_arch_load(const char *dir_or_file, struct tuna_arch *out);
/* Parses config JSON text; `what` names it in messages. */
tuna_status tuna_arch_parse(const char *json, size_t len, const char *what, struct tuna_arch *out);
void tuna_arch_free(struct tuna_arch *a); /* frees quant.skip_modules */

const char *tuna_family_name(enum tuna_family f);
const char *tuna_rope_type_name(enum tuna_rope_type t);
const char *tuna_quant_method_name(enum tuna_quant_method m);

/* Parameter count implied by the shapes (embeddings counted once when tied). */
uint64_t tuna_arch_param_count(const struct tuna_arch *a);
/* KV cache bytes per token for all layers at the given element size. */
uint64_t tuna_arch_kv_bytes_per_token(const struct tuna_arch *a, int elem_bytes);

#endif
