/* export.h — writing what the ecosystem loads: PEFT adapter folders (peft.c) and merged model
 * folders, 16-bit and bitsandbytes 4-bit (merged.c).
 *
 * Spec: docs/FORMATS.md §4 (PEFT adapter files), §5.3 (Unsloth's merged_16bit / merged_4bit),
 * §6 (safetensors, sharding). Every export is written into "<out>.tmp.<pid>" and renamed to
 * <out> when complete (core/file.h tuna_atomic_dir_begin/commit); an existing <out> is refused
 * unless `replace` is set.
 */
#ifndef TUNA_EXPORT_H
#define TUNA_EXPORT_H

#include <stdbool.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "lora/lora.h"
#include "quant/bnb.h"
#include "tuna.h"

/* --- PEFT adapter (peft.c) --- */

/* One adapted module as the trainer holds it: float32 A [r, in] and B [out, r], borrowed. */
struct tuna_peft_module {
    const char *name; /* module path in the HF model, e.g. "model.layers.0.self_attn.q_proj" */
    int64_t r, in, out;
    double alpha;   /* this module's lora_alpha (differences from cfg.alpha go to alpha_pattern) */
    const float *A; /* [r, in] */
    const float *B; /* [out, r] */
};

struct tuna_peft_config {
    int64_t r;    /* config `r` (modules of other ranks go to rank_pattern) */
    double alpha; /* lora_alpha */
    bool use_rslora;
    double dropout;             /* lora_dropout (recorded only) */
    const char *base_model;     /* base_model_name_or_path, may be NULL */
    const char *const *targets; /* target_modules; NULL = derived from the module names */
    int n_targets;
    const char *target_regex; /* target_modules as one regex string instead (targets NULL) */
    enum tuna_dtype dtype;    /* dtype of A/B in the file: F32 (INVALID = F32), BF16 or F16 */
};

/* Writes out_dir/adapter_config.json (every field PEFT needs, sorted keys, indent 2) and
 * out_dir/adapter_model.safetensors ("base_model.model.<name>.lora_{A,B}.weight",
 * __metadata__ {"format": "pt"}). When cfg->targets is NULL, target_modules is the list of the
 * modules' last name components if the modules are exactly those components in every layer
 * from 0 to the highest one adapted, else a regex that matches exactly the modules' names. */
tuna_status tuna_export_peft(const char *out_dir, const struct tuna_peft_config *cfg,
                             const struct tuna_peft_module *mods, int n, bool replace);

/* Re-writes a loaded adapter (`tuna export adapter`): same modules, ranks, alphas, targets. */
tuna_status tuna_export_adapter(const struct tuna_lora_adapter *a, const char *out_dir, bool replace);

/* --- merged models (merged.c) --- */

struct tuna_merge_opts {
    const char *base_16bit; /* for a 4-bit base: its original 16-bit folder to merge into (NULL =
                               dequantize the 4-bit weights and merge into those) */
    bool replace;           /* replace an existing output folder */
    /* merged-4bit only: how to quantize. NULL = the 4-bit base's own settings (quant type,
       double quant, block size, skip modules), or for a 16-bit base NF4 + double quant, block
       size 64 (what Unsloth's load_in_4bit uses). */
    const struct tuna_bnb_quantize_opts *quant;
};

struct tuna_merge_report {
    int n_merged;         /* weights that got W + s·B·A */
    int n_tensors;        /* tensors written */
    int n_files;          /* safetensors files written */
    bool dequantized;     /* the base was 4-bit and the merge went into dequantized weights */
    bool used_base_16bit; /* the merge went into --base-16bit's weights */
};

/* `tuna export merged-16bit`: every adapted "<module>.weight" becomes W + s·B·A computed in
 * float32 and rounded to the stored dtype; other tensors are copied. Same file names and
 * sharding (and index) as the base, config.json without any quantization_config (top level or
 * nested), tokenizer / generation / template files copied. From a 4-bit base the weights are
 * dequantized (to the quant_state dtype) unless opts->base_16bit names the original 16-bit
 * model, whose folder is then used as the base. report may be NULL. */
tuna_status tuna_export_merged_16bit(const char *model_dir, const struct tuna_lora_adapter *a,
                                     const struct tuna_merge_opts *opts, const char *out_dir,
                                     struct tuna_merge_report *report);

/* `tuna export merged-4bit`: the 16-bit merge above, then quantized as `tuna quantize` does
 * (tuna_bnb_quantize_dir). */
tuna_status tuna_export_merged_4bit(const char *model_dir, const struct tuna_lora_adapter *a,
                                    const struct tuna_merge_opts *opts, const char *out_dir,
                                    struct tuna_merge_report *report);

/* Removes every "quantization_config" member from a config document, at any depth. Returns how
 * many were removed. */
int tuna_export_strip_quant_config(cJSON *config);

#endif
