/* lora.h — PEFT LoRA adapters: loading an adapter folder, attaching several adapters at once to a
 * model's linear layers (chosen per sequence at inference), and merging W + s·B·A.
 *
 * Spec: docs/FORMATS.md §4 (design/FORMATS.md). An adapter folder holds adapter_config.json and
 * adapter_model.safetensors with, per adapted module "<p>" (e.g. model.layers.0.self_attn.q_proj),
 *   base_model.model.<p>.lora_A.weight  [r, in]
 *   base_model.model.<p>.lora_B.weight  [out, r]
 * in F32, BF16 or F16. Per module, r and alpha come from rank_pattern / alpha_pattern (the first
 * key k, in file order, for which the regex "(.*\.)?(k)$" matches <p> from its start, as PEFT's
 * get_pattern_key) or else from `r` / `lora_alpha`; scale = alpha / r, or alpha / sqrt(r) with
 * use_rslora, rounded to float32 (how torch applies a Python float to a float32 tensor).
 * What tuna does not support is refused with TUNA_E_UNSUPPORTED and a message: DoRA, bias other
 * than "none", lora_bias, modules_to_save, fan_in_fan_out, embedding LoRA, layer_replication,
 * QA-LoRA, aLoRA, trainable tokens, target_parameters.
 *
 * Ownership: an adapter owns its float32 A/B copies (the safetensors file is closed after load).
 * An attachment borrows the adapters, which must outlive it.
 */
#ifndef TUNA_LORA_H
#define TUNA_LORA_H

#include <stdbool.h>
#include <stdint.h>

#include "core/dtype.h"
#include "model/batch.h"
#include "model/model.h"
#include "tuna.h"

struct tuna_lora_module {
    char *name;   /* module path in the HF model: "model.layers.0.self_attn.q_proj", "lm_head" */
    int64_t r;    /* R */
    int64_t in;   /* K */
    int64_t out;  /* N */
    double alpha; /* lora_alpha (or its alpha_pattern override) */
    float scale;  /* alpha / r or alpha / sqrt(r), in float32 */
    float *A;     /* [R, K] owned */
    float *B;     /* [N, R] owned */
};

struct tuna_lora_adapter {
    char *dir;    /* folder it was loaded from (owned; NULL when built in memory) */
    int64_t r;    /* config `r` */
    double alpha; /* config `lora_alpha` */
    bool use_rslora;
    char *base_model; /* base_model_name_or_path (owned), NULL when absent */
    char **targets;   /* target_modules as a list (owned), n_targets entries */
    int n_targets;
    char *target_regex;               /* target_modules given as one regex string (owned), else NULL */
    enum tuna_dtype file_dtype;       /* dtype of the A/B tensors in the file (F32 usually) */
    struct tuna_lora_module *modules; /* [n_modules] sorted by name, owned */
    int n_modules;
};

/* Loads dir/adapter_config.json and dir/adapter_model.safetensors. Every module in the file must
 * have both A and B with agreeing shapes and the rank the config gives it. *out taken by the
 * caller (tuna_lora_free). */
tuna_status tuna_lora_load(const char *dir, struct tuna_lora_adapter **out);
void tuna_lora_free(struct tuna_lora_adapter *a); /* accepts NULL */

/* The module named `name` ("model.layers.0.mlp.up_proj"), or NULL. */
const struct tuna_lora_module *tuna_lora_find(const struct tuna_lora_adapter *a, const char *name);

/* PEFT's scale for rank r and alpha, in float32. */
float tuna_lora_scale(double alpha, int64_t r, bool use_rslora);

/* True when the PEFT pattern key `key` (a regex) matches module name `name` as
 * re.match(rf"(.*\.)?({key})$", name). A key that does not compile is TUNA_E_FORMAT. */
tuna_status tuna_lora_pattern_match(const char *key, const char *name, bool *match);

/* --- attaching to a model (attach.c) --- */

typedef struct tuna_lora_attachment tuna_lora_attachment;

/* Attaches n adapters to m: adapter i is index i in batch.adapter (-1 = base model). Every
 * module of every adapter must name a linear of the model ("model.layers.N.self_attn.{q,k,v,o}_proj",
 * "model.layers.N.mlp.{gate,up,down}_proj", "lm_head") with the same [out, in] shape; a linear
 * that some adapters do not adapt gets an empty (rank 0) entry for them. The model must have no
 * adapters attached. The adapters are borrowed and must outlive the attachment. */
tuna_status tuna_lora_attach(struct tuna_model *m, const struct tuna_lora_adapter *const *adapters, int n,
                             tuna_lora_attachment **out);
/* Removes the adapters from the model's linears and frees the attachment (NULL accepted). */
void tuna_lora_detach(struct tuna_model *m, tuna_lora_attachment *att);

/* Sets the adapter of every token of sequence `seq` already in the batch (adapter -1 = base). */
void tuna_lora_batch_use(struct tuna_batch *b, int32_t seq, int32_t adapter);

/* A convenience for commands with `--lora DIR` (repeatable): loads each folder and attaches them
 * all, adapter i = dirs[i]. Free with tuna_lora_set_free (detaches first). */
struct tuna_lora_set {
    int n;
    struct tuna_lora_adapter **adapters; /* [n] owned */
    tuna_lora_attachment *att;           /* owned */
};
tuna_status tuna_lora_set_open(struct tuna_model *m, const char *const *dirs, int n, struct tuna_lora_set **out);
void tuna_lora_set_free(struct tuna_model *m, struct tuna_lora_set *s); /* accepts NULL */

/* --- merging (merge.c) --- */

/* delta[N, K] = scale · (B @ A) in float32 as PEFT's get_delta_weight computes it (B @ A, then
 * times the scale); the products are summed in double and rounded once. */
tuna_status tuna_lora_delta(const struct tuna_lora_module *mod, float *delta);

/* W[N, K] (float32, in place) += scale · B @ A. */
tuna_status tuna_lora_merge_f32(const struct tuna_lora_module *mod, float *W);

/* Merges into a weight in its stored dtype (F32, F16, BF16): dst = round(float(src) + delta),
 * the way torch's `weight.data += delta` rounds. src and dst are [N, K] and may be the same. */
tuna_status tuna_lora_merge_stored(const struct tuna_lora_module *mod, enum tuna_dtype dtype, const void *src,
                                   void *dst);

#endif
