/* export.h — Hugging Face model folder → GGUF file that llama.cpp loads, and the pieces it
 * shares with import (tensor names, the Q/K row permutation, tokenizer metadata).
 *
 * Spec: docs/FORMATS.md §7.3 (metadata keys and their types), §7.4 (tensor names), §7.5 (the
 * permutation llama.cpp's Llama arch expects for q_proj/k_proj), docs/GGUF.md (what is covered).
 */
#ifndef TUNA_GGUF_EXPORT_H
#define TUNA_GGUF_EXPORT_H

#include <stdbool.h>
#include <stdint.h>

#include "gguf/gguf.h"
#include "io/hf_config.h"
#include "lora/lora.h"
#include "tuna.h"

enum tuna_gguf_ftype {
    TUNA_GGUF_FT_F32 = 0,
    TUNA_GGUF_FT_F16 = 1,
    TUNA_GGUF_FT_Q4_0 = 2,
    TUNA_GGUF_FT_Q8_0 = 7,
    TUNA_GGUF_FT_Q4_K_M = 15,
    TUNA_GGUF_FT_BF16 = 32
};

/* Parses "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m" (case-insensitive). */
bool tuna_gguf_ftype_parse(const char *s, enum tuna_gguf_ftype *out);

struct tuna_gguf_export_opts {
    enum tuna_gguf_ftype ftype;
    const char *name; /* general.name; NULL: the folder's base name */
    bool quiet;       /* no progress lines on stderr */
    /* a LoRA adapter merged into the weights before conversion (NULL: none): every adapted
     * weight becomes W + s·B·A in float32, rounded to the stored dtype, exactly as
     * `tuna export merged-16bit` writes it; then converted like any other weight. Every module
     * of the adapter must name a weight of the model (lm_head of a tied model is refused). */
    const struct tuna_lora_adapter *lora;
};

/* Writes model_dir (config.json, safetensors, tokenizer.json) as a GGUF v3 file at out_path,
 * atomically. Tensor types follow llama.cpp's rules for the chosen file type (llama-quantize's
 * mix for q4_K_M and q4_0; 1-D tensors stay f32). */
tuna_status tuna_gguf_export(const char *model_dir, const struct tuna_gguf_export_opts *opts, const char *out_path);

/* --- GGUF LoRA adapter files for `llama-cli --lora` (lora_export.c, docs/GGUF.md) --- */

struct tuna_gguf_lora_opts {
    enum tuna_gguf_ftype ftype; /* type of lora_a / lora_b: F32, F16 or BF16 only */
    const char *name;           /* general.name; NULL: the adapter folder's base name */
    bool quiet;                 /* no progress lines on stderr */
};

struct tuna_gguf_lora_report {
    int n_modules; /* modules written (2 tensors each) */
    int n_folded;  /* modules whose PEFT scale differs from llama.cpp's alpha / r: B multiplied by the ratio */
    float alpha;   /* adapter.lora.alpha written */
};

/* Writes adapter `a` (trained on model_dir) as a GGUF LoRA adapter at out_path, atomically, in
 * the layout llama.cpp's llama_adapter_lora_init reads: general.type "adapter", adapter.type
 * "lora", adapter.lora.alpha (float32, the config's lora_alpha), general.architecture of the
 * base; per module "<GGUF weight name>.lora_a" ne {in, r} and ".lora_b" ne {r, out}, with the
 * rows of lora_b permuted like the base weight for llama q/k. llama.cpp scales every module by
 * alpha / r (its own rank); a module whose PEFT scale differs (use_rslora, alpha_pattern) gets
 * B × (PEFT scale / llama.cpp scale) in float32, so the file computes PEFT's delta. model_dir
 * gives the architecture and the shapes each module is checked against; lm_head on a model with
 * tied embeddings is refused (llama.cpp's base file has no output.weight). report may be NULL. */
tuna_status tuna_gguf_export_lora(const char *model_dir, const struct tuna_lora_adapter *a,
                                  const struct tuna_gguf_lora_opts *opts, const char *out_path,
                                  struct tuna_gguf_lora_report *report);

/* The factor by which a module's B is multiplied in a GGUF LoRA file with adapter.lora.alpha =
 * alpha (1 when llama.cpp's alpha / r is the module's PEFT scale). */
double tuna_gguf_lora_fold(const struct tuna_lora_module *mod, float alpha);

/* GGUF architecture name for a family ("llama" for llama and mistral, "qwen2", "qwen3", "gemma"). */
const char *tuna_gguf_arch_name(enum tuna_family f);
/* True when llama.cpp runs this family with interleaved (GPT-J) RoPE, so q/k rows are permuted. */
bool tuna_gguf_family_permutes_qk(enum tuna_family f);

/* The GGUF name of a Hugging Face tensor name (into buf), false when it has none. */
bool tuna_gguf_tensor_name(const char *hf, char *buf, size_t cap);

/* Reorders the rows of W [rows, cols] (rows = n_head * head_dim) in place: to_gguf true applies
 * llama.cpp's permutation (row 2i of a head ← HF row i, row 2i+1 ← HF row i + head_dim/2),
 * false undoes it. tmp holds rows*cols floats. */
void tuna_gguf_permute_qk(float *w, float *tmp, int64_t n_head, int64_t rows, int64_t cols, bool to_gguf);

/* YaRN's attention scaling as transformers computes it (attention_factor, else
 * mscale(factor, mscale) / mscale(factor, mscale_all_dim), else 0.1 ln(factor) + 1). Export writes
 * it as rope.scaling.attn_factor = this / (0.1 ln(factor) + 1), what llama.cpp multiplies its own by. */
double tuna_gguf_yarn_attn_factor(const struct tuna_rope *r);

/* The rope_freqs.weight values [dim/2] for llama3 RoPE scaling, as convert_hf_to_gguf computes
 * them (float32): llama.cpp divides theta_i = pos · base^(−2i/dim) by out[i]. */
void tuna_gguf_llama3_rope_freqs(const struct tuna_rope *r, int64_t dim, float *out);

/* Tokenizer metadata (tokenizer.ggml.*, tokenizer.chat_template) from model_dir's tokenizer.json
 * and tokenizer_config.json into w (vocab.c). */
tuna_status tuna_gguf_write_vocab(tuna_gguf_writer *w, const char *model_dir);

#endif
