/* dataset.h — training data: JSONL files → tokenized examples with labels, and batches of them.
 *
 * One JSON object per line (blank lines are skipped). Formats (opts.format, "auto" detects per
 * line from the keys, in this order):
 *   messages  {"messages": [{"role": "system"|"user"|"assistant"|..., "content": ...}, ...]}
 *   sharegpt  {"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": ...}]}
 *             (human → user, gpt → assistant; "role"/"content" keys are accepted too)
 *   alpaca    {"instruction": s, "input": s (optional), "output": s, "system": s (optional)}:
 *             user turn "instruction\n\ninput" (instruction alone when input is absent or ""),
 *             assistant turn "output", preceded by a system turn when "system" is a non-empty string
 *   text      {"text": s}: encoded with the tokenizer's special tokens (BOS as its post-processor
 *             adds it), then EOS appended (opts.add_eos_for_text)
 * Conversations are rendered with the model's chat template (add_generation_prompt false) and
 * encoded with add_special false, parse_special true — the rendered text already holds BOS for
 * Llama-3 style templates — exactly as transformers' apply_chat_template + encode.
 *
 * Labels are HF `labels`: labels[i] is the token at position i or -100 (ignored); they are NOT
 * shifted — the loss compares logits at position i with labels[i + 1].
 *   - default: labels = ids (every token is a target).
 *   - train_on_responses_only: only assistant turns are targets. For assistant message k the
 *     targets are tokens [len(enc(render(msgs[:k], add_generation_prompt=true))),
 *     len(enc(render(msgs[:k+1])))) — and up to the end of the sequence when k is the last
 *     message. For [user, assistant] this is the fixtures' definition: the prompt part (all
 *     messages but the last, with the generation prompt) gets -100. Raw text lines are refused
 *     in this mode (they have no responses).
 * max_seq_length > 0 truncates (keeps the first max_seq_length tokens), counting what was cut.
 * Examples left without any target (no label != -100 at positions >= 1) are dropped and counted.
 *
 * Packing (opts.packing, needs max_seq_length): examples, in file order, are concatenated
 * greedily into rows of at most max_seq_length tokens; an example never spans two rows. The first
 * token of every packed example gets label -100, so no example learns to predict another's first
 * token. Attention is NOT separated between packed examples (each attends to the earlier examples
 * of its row, positions run on); seg_start lists where each example starts, for a trainer that
 * wants to reset positions or mask attention itself.
 *
 * Batch order: step s takes the rows at global positions p = s*B + j (j < B); epoch e = p / N,
 * k = p % N. Without shuffle the row is k (file order, wrapping: the fixtures' order). With
 * shuffle it is perm_e[k], perm_e a Fisher–Yates shuffle of 0..N-1 drawn from xoshiro256**
 * (src/model/sampler.h) seeded with seed + e*0x9E3779B97F4A7C15: every epoch sees every row once.
 *
 * Spec: docs/TRAINING.md, "Datasets".
 */
#ifndef TUNA_TRAIN_DATASET_H
#define TUNA_TRAIN_DATASET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chat/chat.h"
#include "tokenizer/tokenizer.h"
#include "tuna.h"

#define TUNA_LABEL_IGNORE (-100)

/* One training row (an example, or several packed ones). */
struct tuna_train_example {
    int32_t *ids;    /* [n] */
    int32_t *labels; /* [n]; TUNA_LABEL_IGNORE = not a target; not shifted */
    int64_t n;
    int64_t line;       /* 1-based line of the (first) example in the file */
    int64_t *seg_start; /* [n_seg] start offset of each packed example; {0} when not packed */
    int64_t n_seg;
};

struct tuna_dataset_opts {
    const char *format;           /* "auto" (NULL = auto) | "messages" | "sharegpt" | "alpaca" | "text" */
    bool train_on_responses_only; /* mask all but assistant turns */
    int64_t max_seq_length;       /* <= 0: no limit (packing then refused) */
    bool packing;                 /* pack examples into rows of max_seq_length */
    bool add_eos_for_text;        /* text format: append EOS (default true) */
    bool drop_untrained;          /* drop examples without targets (default true); false: refuse them */
};

/* format "auto", no masking, no limit, no packing, add_eos_for_text true, drop_untrained true. */
void tuna_dataset_opts_default(struct tuna_dataset_opts *o);

struct tuna_dataset_stats {
    int64_t lines;              /* non-blank lines read */
    int64_t examples;           /* examples kept (before packing) */
    int64_t rows;               /* rows = tuna_dataset_size (examples, or packed rows) */
    int64_t tokens;             /* tokens kept, over all rows */
    int64_t target_tokens;      /* labels != -100 at positions >= 1 (what the loss sees) */
    int64_t truncated_examples; /* examples longer than max_seq_length */
    int64_t truncated_tokens;   /* tokens cut from them */
    int64_t dropped_untrained;  /* examples dropped because no token was a target */
    int64_t prefix_mismatches;  /* responses-only: conversations where a rendered prefix's text or
                                   tokens do not begin the whole (the template rewrites earlier
                                   turns, or a token merges across the boundary, as SentencePiece
                                   "]" + "▁Sure"); masks then follow token counts, as the
                                   reference does */
    int64_t by_format[4];       /* examples per format: messages, sharegpt, alpaca, text */
    int64_t max_len;            /* longest row */
};

typedef struct tuna_dataset tuna_dataset;

/* Reads a JSONL file. tok is needed; tmpl may be NULL when every line is raw text. Bad lines
 * fail naming the file and line (malformed JSON, unknown format — the formats are listed —, a
 * role the template cannot take); an empty dataset is refused. *out is taken by the caller
 * (tuna_dataset_free). tok and tmpl are only used during the call. */
tuna_status tuna_dataset_load(const char *jsonl_path, const tuna_tokenizer *tok, const struct tuna_chat_template *tmpl,
                              const struct tuna_dataset_opts *o, tuna_dataset **out);

/* The same from len bytes of JSONL text in memory; name is used in messages. */
tuna_status tuna_dataset_load_text(const char *text, size_t len, const char *name, const tuna_tokenizer *tok,
                                   const struct tuna_chat_template *tmpl, const struct tuna_dataset_opts *o,
                                   tuna_dataset **out);

void tuna_dataset_free(tuna_dataset *d); /* accepts NULL */

/* Number of rows (examples, or packed rows). */
size_t tuna_dataset_size(const tuna_dataset *d);
/* Row i (< size), borrowed from d. */
const struct tuna_train_example *tuna_dataset_at(const tuna_dataset *d, size_t i);
/* Borrowed from d. */
const struct tuna_dataset_stats *tuna_dataset_stats(const tuna_dataset *d);
/* Padding id for batches: the tokenizer's pad_token, else 0 (as the reference run). */
int32_t tuna_dataset_pad_id(const tuna_dataset *d);

/* One line for the user: "8 examples (8 messages), 312 tokens, 120 targets; 0 truncated ...". */
void tuna_dataset_describe(const tuna_dataset *d, char *buf, size_t cap);

/* ---- batching (batching.c) ---- */

/* The rows of step `step` (from 0): idx[batch] (see the order above). */
void tuna_dataset_batch_indices(const tuna_dataset *d, int64_t step, int64_t batch, bool shuffle, uint64_t seed,
                                size_t *idx);

/* A right-padded batch. */
struct tuna_train_batch {
    int64_t B, T;      /* T = longest row of the batch */
    int32_t *ids;      /* [B, T]; pad id after each row */
    int32_t *labels;   /* [B, T]; -100 on padding */
    int32_t *attn;     /* [B, T]; 1 on tokens, 0 on padding (HF attention_mask) */
    int64_t *len;      /* [B] row lengths */
    int64_t n_targets; /* labels[b][t] != -100 with t >= 1: the loss's denominator */
};

/* Builds the batch of rows idx[B]. *out's arrays are malloc'd; free with tuna_train_batch_free. */
tuna_status tuna_dataset_make_batch(const tuna_dataset *d, const size_t *idx, int64_t B, struct tuna_train_batch *out);
void tuna_train_batch_free(struct tuna_train_batch *b); /* accepts NULL and zeroed batches */

#endif
