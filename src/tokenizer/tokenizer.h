/* tokenizer.h — Hugging Face `tokenizers` pipelines (tokenizer.json), encode and decode exact to
 * the reference library.
 *
 * The pipeline follows HF tokenizers: added tokens are split out of the text first (non-
 * normalized ones in the raw text, normalized ones after normalizing each piece), each remaining
 * piece goes through normalizer → pre-tokenizer → model, then the post-processor adds BOS/EOS;
 * decode runs the decoder chain over the token strings. Supported (anything else is refused with
 * TUNA_E_UNSUPPORTED naming the type):
 *   models: BPE (byte-level: GPT-2, Llama 3, Qwen; SentencePiece-style with byte_fallback and
 *           fuse_unk: Llama 2, Mistral, Gemma; ignore_merges), Unigram (T5), WordPiece, WordLevel
 *   normalizers: NFC NFD NFKC NFKD Lowercase Strip StripAccents Prepend Replace BertNormalizer
 *                Precompiled ByteLevel Sequence
 *   pre-tokenizers: Split ByteLevel Metaspace Digits Punctuation Whitespace WhitespaceSplit
 *                   CharDelimiterSplit BertPreTokenizer Sequence
 *   post-processors: TemplateProcessing ByteLevel RobertaProcessing BertProcessing Sequence
 *   decoders: ByteLevel Metaspace ByteFallback Fuse Strip Replace WordPiece BPEDecoder Sequence
 * From tokenizer_config.json, as transformers does: bos/eos/unk/pad tokens, added_tokens_decoder
 * entries missing from tokenizer.json, clean_up_tokenization_spaces, the chat template, and for
 * the Llama/CodeLlama/Gemma tokenizer classes add_bos_token/add_eos_token (which rebuild the
 * post-processor). Regexes run through PCRE2 (HF uses Oniguruma; same matches on real patterns).
 *
 * A tuna_tokenizer is immutable after loading except for an internal word cache guarded by a
 * mutex, so one tokenizer may be shared by threads.
 */
#ifndef TUNA_TOKENIZER_H
#define TUNA_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tuna.h"

typedef struct tuna_tokenizer tuna_tokenizer;

/* Loads dir/tokenizer.json (+ tokenizer_config.json and special_tokens_map.json when present;
 * without tokenizer.json, dir/tokenizer.model via tuna_tokenizer_load_sentencepiece).
 * *out is taken by the caller; free with tuna_tokenizer_free. */
tuna_status tuna_tokenizer_load(const char *dir, tuna_tokenizer **out);

/* Loads a tokenizer.json file by path; config_dir (may be NULL) is where tokenizer_config.json
 * and special_tokens_map.json are looked for. */
tuna_status tuna_tokenizer_load_file(const char *tokenizer_json, const char *config_dir,
                                     tuna_tokenizer **out);

/* Loads a SentencePiece BPE model file (tokenizer.model of Llama 2 / Mistral), converted the way
 * transformers' LlamaConverter does (config_dir, may be NULL, supplies tokenizer_config.json:
 * legacy, add_prefix_space, add_bos/eos_token, special tokens). tuna_tokenizer_load uses it
 * when a folder has tokenizer.model but no tokenizer.json. Unigram models are refused. */
tuna_status tuna_tokenizer_load_sentencepiece(const char *model_path, const char *config_dir, tuna_tokenizer **out);

/* Builds a tokenizer from tokenizer.json text in memory (len bytes) and, when config_json is not
 * NULL, tokenizer_config.json text (config_len bytes); for tokenizers made on the fly (GGUF). */
tuna_status tuna_tokenizer_load_json(const char *json, size_t len, const char *config_json, size_t config_len,
                                     tuna_tokenizer **out);

/* Builds a byte-level BPE tokenizer from GPT-2 style files: vocab_json ({"token": id}) and
 * merges_txt ("a b" per line, optional "#version" first line). split_regex is the pre-tokenizer
 * regex (NULL = the GPT-2 one); nfc applies NFC first (Qwen2); ignore_merges as Llama 3.
 * No added tokens, no post-processor. */
tuna_status tuna_tokenizer_load_vocab_merges(const char *vocab_json, const char *merges_txt,
                                             const char *split_regex, bool nfc, bool ignore_merges,
                                             tuna_tokenizer **out);

/* Accepts NULL. */
void tuna_tokenizer_free(tuna_tokenizer *t);

/* Encodes len bytes of text (need not be NUL-terminated; must be UTF-8, invalid bytes are
 * refused with TUNA_E_INVALID).
 * add_special: apply the post-processor (BOS etc.) like HF encode(add_special_tokens=True);
 * parse_special: recognise special added tokens in the text (HF default true); non-special
 * added tokens are always recognised, as in HF. *ids is malloc'd (taken by the caller; may be
 * NULL when *n is 0). */
tuna_status tuna_tokenizer_encode(const tuna_tokenizer *t, const char *text, size_t len,
                                  bool add_special, bool parse_special, int32_t **ids, size_t *n);

/* Decodes ids like HF decode(ids, skip_special_tokens=skip_special). Byte sequences that are
 * not valid UTF-8 become U+FFFD as in HF. *out is malloc'd, NUL-terminated, taken by the
 * caller. Ids outside the vocabulary fail with TUNA_E_RANGE. */
tuna_status tuna_tokenizer_decode(const tuna_tokenizer *t, const int32_t *ids, size_t n,
                                  bool skip_special, char **out);

/* Streaming decode (for generation): push ids one at a time; each push returns the text that
 * became complete with this id (possibly ""), never ending inside a UTF-8 character. This is
 * HF's DecodeStream: it re-decodes a short window, so the pieces join to the full decode for
 * byte-level and SentencePiece decoders; where a token rewrites earlier text (clean-up of
 * spaces) HF raises InvalidPrefix and tuna emits only the new part. The stream borrows t. */
typedef struct tuna_detok_stream tuna_detok_stream;
tuna_status tuna_detok_stream_new(const tuna_tokenizer *t, bool skip_special, tuna_detok_stream **out);
/* *piece is malloc'd, NUL-terminated, taken by the caller. */
tuna_status tuna_detok_stream_push(tuna_detok_stream *s, int32_t id, char **piece);
void tuna_detok_stream_free(tuna_detok_stream *s); /* accepts NULL */

/* Size of the id space: max(model vocab, added token ids) + 1. */
int64_t tuna_tokenizer_vocab_size(const tuna_tokenizer *t);

/* The raw vocabulary string of id (e.g. "Ġhello", "▁the", "<0x0A>"), NULL when out of range.
 * Borrowed from t. */
const char *tuna_tokenizer_token_str(const tuna_tokenizer *t, int32_t id);

/* The id of a raw vocabulary string or added token, -1 when absent. */
int32_t tuna_tokenizer_token_id(const tuna_tokenizer *t, const char *tok);

/* Special tokens named in tokenizer_config.json / special_tokens_map.json: which is
 * "bos_token", "eos_token", "unk_token" or "pad_token". The string is NULL and the id -1 when
 * absent. Borrowed from t. */
const char *tuna_tokenizer_special_str(const tuna_tokenizer *t, const char *which);
int32_t tuna_tokenizer_special_id(const tuna_tokenizer *t, const char *which);

/* True when id is an added token marked special (skipped by decode(skip_special=true)). */
bool tuna_tokenizer_is_special(const tuna_tokenizer *t, int32_t id);

/* transformers' clean_up_tokenization_spaces for decode (" ." → "." and the like). It is read
 * from tokenizer_config.json; absent means false, as in transformers 5 (transformers 4 defaulted
 * to true: set it to reproduce decodes made with it). Call before sharing t between threads. */
void tuna_tokenizer_set_clean_up_spaces(tuna_tokenizer *t, bool on);

/* The chat template from tokenizer_config.json ("chat_template" as a string, or the "default"
 * entry of the list form) or chat_template.jinja / chat_template.json beside it; NULL when
 * absent. Borrowed from t. */
const char *tuna_tokenizer_chat_template(const tuna_tokenizer *t);

#endif
