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
};

/* Writes model_dir (config.json, safetensors, tokenizer.json) as a GGUF v3 file at out_path,
 * atomically. Tensor types follow llama.cpp's rules for the chosen file type (llama-quantize's
 * mix for q4_K_M and q4_0; 1-D tensors stay f32). */
tuna_status tuna_gguf_export(const char *model_dir, const struct tuna_gguf_export_opts *opts, const char *out_path);

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
