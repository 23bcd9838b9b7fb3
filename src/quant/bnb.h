/* bnb.h — bitsandbytes 4-bit weights in safetensors checkpoints: reading the tensors that
 * transformers saves for each quantized Linear, and writing them back byte-identically.
 *
 * Spec: docs/FORMATS.md §2 (design/FORMATS.md). For a quantized "<p>.weight" a checkpoint holds
 *   <p>.weight                                U8  [ceil(n/2), 1]  packed nibbles
 *   <p>.weight.absmax                         F32 [n_blocks] (plain) or U8 [n_blocks] (nested)
 *   <p>.weight.quant_map                      F32 [16]
 *   <p>.weight.nested_absmax                  F32 [ceil(n_blocks/256)]   (nested only)
 *   <p>.weight.nested_quant_map               F32 [256]                  (nested only)
 *   <p>.weight.quant_state.bitsandbytes__nf4  U8  [len]  JSON (or __fp4)
 * Detection always looks at these tensors, never at folder names.
 */
#ifndef TUNA_QUANT_BNB_H
#define TUNA_QUANT_BNB_H

#include <stdbool.h>

#include "io/safetensors.h"
#include "quant/nf4.h"
#include "tuna.h"

/* True when the set holds at least one "*.quant_state.bitsandbytes__nf4|fp4" tensor. */
bool tuna_bnb_is_4bit(const tuna_st_set *set);

/* True when weight_name (e.g. "model.layers.0.mlp.up_proj.weight") has a bnb 4-bit quant state
 * in the set (i.e. must be loaded with tuna_bnb_load_weight, not as a float tensor). */
bool tuna_bnb_is_quantized_weight(const tuna_st_set *set, const char *weight_name);

/* True when name is one of the companion tensors of a 4-bit weight (".absmax", ".quant_map",
 * ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__*"). */
bool tuna_bnb_is_state_tensor(const char *name);

/* TUNA_OK when the set holds no LLM.int8 (8-bit) tensors; otherwise TUNA_E_UNSUPPORTED with a
 * message naming the first ".SCB" / ".weight_format" tensor found. */
tuna_status tuna_bnb_check_not_int8(const tuna_st_set *set);

/* Reads "<weight_name>" and its quant state from the set into *out. codes are borrowed from the
 * set's mapping (valid while the set is open); absmax and the nested state are owned by *out
 * (free with tuna_q4_weight_free). Everything is validated: dtypes, sizes against the JSON
 * shape and blocksize, storage (only uint8 is accepted), JSON keys. */
tuna_status tuna_bnb_load_weight(const tuna_st_set *set, const char *weight_name, struct tuna_q4_weight *out);

/* --- writing (bnb_writer.c) --- */

/* The quant_state JSON exactly as transformers/bitsandbytes writes it (Python json.dumps,
 * insertion order quant_type, blocksize, dtype, shape[, nested_blocksize, nested_dtype,
 * nested_offset]). Returns a malloc'd string (NULL on OOM). */
char *tuna_bnb_quant_state_json(const struct tuna_q4_weight *w);

/* Adds "<weight_name>" and its quant-state tensors to the writer (data copied). */
tuna_status tuna_bnb_writer_add(tuna_st_writer *wr, const char *weight_name, const struct tuna_q4_weight *w);

/* Formats a double as Python's repr() does (shortest round-trip, "0.5", "1e-05", "6.0"). */
void tuna_py_float_repr(double d, char *buf, size_t cap);

struct tuna_bnb_quantize_opts {
    enum tuna_q4_type type;      /* default NF4 */
    bool double_quant;           /* bnb_4bit_use_double_quant */
    int blocksize;               /* 64 (what transformers uses); 0 = 64 */
    enum tuna_dtype dtype;       /* dtype for the unquantized tensors and quant_state "dtype";
                                    INVALID = keep each tensor's own (config dtype for JSON) */
    enum tuna_dtype compute_dtype; /* bnb_4bit_compute_dtype; INVALID = same as dtype */
    const char *const *skip_modules; /* llm_int8_skip_modules (NULL = transformers' default) */
    int n_skip_modules;
};

/* Which tensors `tuna quantize` quantizes: 2-D "*.weight" of Linear layers inside the decoder
 * ("…layers.N.….weight" with 2 dims), never embeddings, lm_head, norms, or anything whose
 * module name contains one of skip (substring match, as transformers does). skip NULL means
 * transformers' default ({"lm_head"}). Unlike transformers, lm_head stays in float even when an
 * explicit skip list omits it (it is outside the decoder layers). */
bool tuna_bnb_should_quantize(const char *name, int ndim, const char *const *skip, int n_skip);

/* Quantizes the model folder src into dst (written to a temporary folder and renamed; dst must
 * not exist): model*.safetensors with the quantized tensors, config.json with
 * quantization_config, every other file copied. */
tuna_status tuna_bnb_quantize_dir(const char *src, const char *dst, const struct tuna_bnb_quantize_opts *o);

#endif
