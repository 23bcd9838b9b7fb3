/* import.h — running a GGUF file with tuna: the model (weights dequantized to float32 at load
 * for q8_0/q4_0/q5_0/q4_K/q6_K; f32/f16/bf16 stay views into the mapping), its tokenizer
 * (llama SentencePiece and gpt2 BPE vocabularies) and chat template.
 * Spec: docs/FORMATS.md §7, docs/GGUF.md.
 */
#ifndef TUNA_GGUF_IMPORT_H
#define TUNA_GGUF_IMPORT_H

#include "gguf/gguf.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

struct tuna_gguf_import; /* private: the mapping and dequantized buffers the model points into */

struct tuna_gguf_model {
    struct tuna_model *model;   /* owned */
    tuna_tokenizer *tokenizer;  /* owned; NULL when the file has no tokenizer.ggml.tokens */
    const char *chat_template;  /* NULL when absent; owned */
    struct tuna_gguf_import *priv;
};

/* Loads a GGUF model file (architectures llama, qwen2, qwen3, gemma). *out taken by the caller
 * (tuna_gguf_model_free). */
tuna_status tuna_gguf_model_load(const char *path, const struct tuna_model_opts *opts, struct tuna_gguf_model **out);
void tuna_gguf_model_free(struct tuna_gguf_model *gm); /* accepts NULL */

/* Builds a tokenizer from a GGUF file's tokenizer.ggml.* metadata (vocab-only files too).
 * TUNA_E_NOT_FOUND when the file has no vocabulary, TUNA_E_UNSUPPORTED for vocabulary kinds
 * or pre-tokenizers tuna does not handle (the message lists those it does). */
tuna_status tuna_gguf_tokenizer_load(const tuna_gguf *g, tuna_tokenizer **out);

/* The config.json text equivalent of the GGUF hyperparameters (malloc'd, taken by the caller). */
tuna_status tuna_gguf_config_json(const tuna_gguf *g, char **out);

#endif
