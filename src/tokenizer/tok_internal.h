/* tok_internal.h — the structures behind tuna_tokenizer, shared by the files of the tokenizer
 * module only (not a public header).
 *
 * Text flows as UTF-8 byte strings. A pipeline stage turns a list of pieces (slices of one
 * buffer) into a new list; the model turns each final piece into ids. Names follow HF
 * tokenizers (normalizer, pre-tokenizer, model, post-processor, decoder).
 */
#ifndef TUNA_TOKENIZER_INTERNAL_H
#define TUNA_TOKENIZER_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cjson/cJSON.h>

#include "core/strmap.h"
#include "tokenizer/tokenizer.h"

/* ---- growable byte buffer and piece lists ---- */
typedef struct {
    char *p;
    size_t n, cap;
} tk_buf;

bool tk_buf_grow(tk_buf *b, size_t extra); /* room for extra more bytes and a NUL */
/* Appends n bytes and keeps the buffer NUL-terminated; false when out of memory. */
static inline bool tk_buf_put(tk_buf *b, const void *s, size_t n)
{
    if (b->n + n + 1 > b->cap && !tk_buf_grow(b, n)) return false;
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return true;
}
static inline bool tk_buf_putc(tk_buf *b, char c)
{
    if (b->n + 2 > b->cap && !tk_buf_grow(b, 1)) return false;
    b->p[b->n++] = c;
    b->p[b->n] = '\0';
    return true;
}
bool tk_buf_put_cp(tk_buf *b, uint32_t cp); /* appends the UTF-8 encoding of cp */
void tk_buf_free(tk_buf *b);

typedef struct {
    size_t off, len; /* slice of the list's text */
    bool first;      /* begins at offset 0 of the original input (Metaspace prepend "first") */
} tk_piece;

typedef struct {
    tk_buf text;
    tk_piece *v;
    size_t n, cap;
} tk_pieces;

bool tk_pieces_add(tk_pieces *l, const char *s, size_t n, bool first);
/* Registers the n bytes already written at l->text.p + l->text.n (room reserved, NUL after) as
 * a piece. */
bool tk_pieces_add_inplace(tk_pieces *l, size_t n, bool first);
void tk_pieces_free(tk_pieces *l);

/* ---- UTF-8 and Unicode character classes (unicode.c) ---- */
/* Decodes one code point at s[0..n); returns its byte length (1 for invalid bytes, *cp = -1). */
size_t tk_utf8_next(const char *s, size_t n, int32_t *cp);
/* True when all n bytes are valid UTF-8; otherwise *bad_at (may be NULL) is the first bad byte. */
bool tk_utf8_valid(const char *s, size_t n, size_t *bad_at);
/* Appends bytes to out, each maximal invalid subsequence replaced by U+FFFD (Rust
 * String::from_utf8_lossy). */
bool tk_utf8_lossy(tk_buf *out, const unsigned char *s, size_t n);
bool tk_is_whitespace(int32_t cp);   /* Unicode White_Space (Rust char::is_whitespace) */
bool tk_is_numeric(int32_t cp);      /* Rust char::is_numeric: Nd Nl No */
bool tk_is_punctuation(int32_t cp);  /* HF: ASCII punctuation or Unicode P* */
bool tk_is_word_char(int32_t cp);    /* Rust regex \w: letters, marks, Nd, Nl, Pc, joiners */
/* GPT-2 byte ↔ char table: byte b is shown as code point tk_byte_to_cp(b). */
uint32_t tk_byte_to_cp(unsigned char b);
int tk_cp_to_byte(int32_t cp); /* -1 when cp is not in the table */

/* ---- patterns (pretokenize.c): literal string or PCRE2 regex ---- */
enum tk_pattern_kind { TK_PAT_NONE = 0, TK_PAT_STRING, TK_PAT_REGEX };
struct tk_pattern {
    enum tk_pattern_kind kind;
    char *lit; /* TK_PAT_STRING */
    size_t lit_len;
    pcre2_code *re; /* TK_PAT_REGEX, JIT-compiled when possible */
};
/* Parses {"String": s} / {"Regex": r}; `where` names the place for messages. */
tuna_status tk_pattern_parse(const cJSON *j, struct tk_pattern *p, const char *where);
tuna_status tk_pattern_regex(struct tk_pattern *p, const char *re, const char *where);
void tk_pattern_free(struct tk_pattern *p);

typedef struct {
    size_t start, end;
    bool match;
} tk_seg;
typedef struct {
    tk_seg *v;
    size_t n, cap;
    pcre2_match_data *md; /* reused by tk_find_matches across calls */
} tk_segs;
void tk_segs_free(tk_segs *s);
/* Cuts s into consecutive segments, marking the pattern's matches (HF Pattern::find_matches). */
tuna_status tk_find_matches(const struct tk_pattern *p, const char *s, size_t n, tk_segs *out);

enum tk_split_behavior {
    TK_SPLIT_REMOVED,
    TK_SPLIT_ISOLATED,
    TK_SPLIT_MERGED_PREV,
    TK_SPLIT_MERGED_NEXT,
    TK_SPLIT_CONTIGUOUS
};
/* Applies behavior (and invert) to segments: appends the kept non-empty pieces of s to out. */
bool tk_split_apply(tk_segs *segs, enum tk_split_behavior b, bool invert, const char *s, bool first,
                    tk_pieces *out);

/* ---- normalizers (normalize.c) ---- */
enum tk_norm_type {
    TK_NORM_NFC,
    TK_NORM_NFD,
    TK_NORM_NFKC,
    TK_NORM_NFKD,
    TK_NORM_LOWERCASE,
    TK_NORM_STRIP,
    TK_NORM_PREPEND,
    TK_NORM_REPLACE,
    TK_NORM_STRIP_ACCENTS,
    TK_NORM_BERT,
    TK_NORM_PRECOMPILED,
    TK_NORM_BYTELEVEL,
    TK_NORM_SEQUENCE
};
struct tk_norm {
    enum tk_norm_type type;
    bool left, right;       /* Strip */
    char *content;          /* Prepend / Replace */
    struct tk_pattern pat;  /* Replace */
    bool clean_text, chinese, strip_accents, lowercase; /* Bert */
    struct tk_norm *kids;   /* Sequence */
    size_t nkids;
    /* Precompiled (SentencePiece charsmap): a darts-clone double array and the replacements */
    uint32_t *units;
    size_t nunits;
    char *repl_blob;
    size_t repl_len;
};
tuna_status tk_norm_parse(const cJSON *j, struct tk_norm *n);
void tk_norm_free(struct tk_norm *n);
/* Normalizes s into *out (replaced; out->n reset first). */
tuna_status tk_norm_apply(const struct tk_norm *n, const char *s, size_t len, tk_buf *out);

/* ---- pre-tokenizers (pretokenize.c) ---- */
enum tk_pre_type {
    TK_PRE_SPLIT,
    TK_PRE_BYTELEVEL,
    TK_PRE_METASPACE,
    TK_PRE_DIGITS,
    TK_PRE_PUNCTUATION,
    TK_PRE_WHITESPACE,
    TK_PRE_WHITESPACE_SPLIT,
    TK_PRE_BERT,
    TK_PRE_CHAR_DELIMITER,
    TK_PRE_SEQUENCE
};
enum tk_prepend_scheme { TK_PREPEND_ALWAYS, TK_PREPEND_FIRST, TK_PREPEND_NEVER };
struct tk_pre {
    enum tk_pre_type type;
    struct tk_pattern pat;
    enum tk_split_behavior behavior;
    bool invert;
    bool add_prefix_space, use_regex; /* ByteLevel */
    char repl[8];                     /* Metaspace replacement (UTF-8) */
    int32_t repl_cp;
    enum tk_prepend_scheme prepend;
    bool split;             /* Metaspace */
    bool individual_digits; /* Digits */
    struct tk_pre *kids;
    size_t nkids;
};
tuna_status tk_pre_parse(const cJSON *j, struct tk_pre *p);
void tk_pre_free(struct tk_pre *p);
/* Runs the pre-tokenizer over every piece of *l, replacing *l. */
tuna_status tk_pre_apply(const struct tk_pre *p, tk_pieces *l);
/* The GPT-2 pattern that ByteLevel(use_regex=true) splits with. */
extern const char tk_gpt2_regex[];

/* ---- BPE model (bpe.c) ---- */
typedef struct {
    uint64_t *keys; /* 0 = empty; key = ((uint64)left << 32 | right) + 1 */
    uint64_t *vals;
    size_t cap, count;
} tk_u64map;

struct tk_cache {
    pthread_mutex_t mu;
    struct tuna_strmap map; /* word → (offset << 16 | count) in ids */
    int32_t *ids;
    size_t n, cap;
};

enum tk_model_type { TK_MODEL_BPE, TK_MODEL_WORDPIECE, TK_MODEL_UNIGRAM, TK_MODEL_WORDLEVEL };
struct tk_model {
    enum tk_model_type type;
    struct tuna_strmap vocab; /* token → id */
    char **tok;               /* [nvocab] id → token (NUL-terminated, may be NULL for holes) */
    size_t *tok_len;
    int64_t nvocab; /* max id + 1 */
    size_t tok_cap;
    tk_u64map merges; /* (left, right) → (rank << 32 | new id) */
    int32_t unk_id;   /* -1 when none */
    bool fuse_unk, byte_fallback, ignore_merges;
    char *cont_prefix, *eow_suffix; /* NULL when absent or empty */
    int32_t byte_id[256];           /* "<0xXX>" ids for byte fallback, -1 when absent */
    int64_t max_chars_per_word;     /* WordPiece */
    /* BPE words may be cut before each "▁" that follows another character: no vocabulary token
     * has "▁" after another character, so no merge can cross such a cut, and the pieces are
     * merged independently (exactly as one word; but short, so they hit the cache). True for
     * SentencePiece-style vocabularies, whose whole text is one word. */
    bool metaspace_cut;
    struct tk_cache cache;
    /* Unigram: piece scores and a byte trie over the pieces ((node << 8 | byte) + 1 → child) */
    double *scores; /* [tok_cap] */
    double unk_score;
    tk_u64map trie;
    int32_t *trie_id; /* [trie_nodes] piece id ending at the node, -1 if none */
    size_t trie_nodes, trie_cap;
};
void tk_model_init(struct tk_model *m);
void tk_model_free(struct tk_model *m);
/* Adds vocab entry (copying s). */
tuna_status tk_model_add_token(struct tk_model *m, const char *s, size_t n, int64_t id);
/* Adds a merge of two tokens given as strings; rank is its order. */
tuna_status tk_model_add_merge(struct tk_model *m, const char *a, size_t an, const char *b, size_t bn,
                               uint32_t rank, const char *where);
/* Adds a merge written "a b" where a or b may contain spaces (the split that yields known
 * tokens is taken). */
tuna_status tk_model_add_merge_line(struct tk_model *m, const char *line, size_t n, uint32_t rank,
                                    const char *where);
tuna_status tk_model_finish(struct tk_model *m); /* after vocab and merges: byte ids, cache */
/* Appends the ids of one pre-tokenized word. */
tuna_status tk_model_tokenize(struct tk_model *m, const char *w, size_t n, int32_t **ids, size_t *nids,
                              size_t *cap);

/* unigram.c */
tuna_status tk_unigram_load(struct tk_model *m, const cJSON *model, const char *where);
tuna_status tk_unigram_tokenize(struct tk_model *m, const char *w, size_t n, int32_t **ids, size_t *nids, size_t *cap);
/* u64 map (bpe.c) */
bool tk_u64map_put(tk_u64map *m, uint64_t key, uint64_t val);
bool tk_u64map_get(const tk_u64map *m, uint64_t key, uint64_t *val);

/* ---- added tokens (added_tokens.c) ---- */
struct tk_added {
    char *content;
    size_t len;
    int32_t id;
    bool special, normalized, lstrip, rstrip, single_word;
};
struct tk_matcher {     /* leftmost-longest matching over a set of byte strings */
    const char **pat;   /* sorted by first byte, then length descending */
    size_t *len;
    int32_t *idx;       /* index into the added token table */
    size_t n;
    size_t first[257];  /* bucket starts by first byte */
};
void tk_matcher_free(struct tk_matcher *m);
typedef struct {
    size_t start, end;
    int32_t added; /* index into the added table, -1 for text */
} tk_aseg;

/* ---- decoders (decode.c) ---- */
enum tk_dec_type {
    TK_DEC_BYTELEVEL,
    TK_DEC_METASPACE,
    TK_DEC_BYTEFALLBACK,
    TK_DEC_FUSE,
    TK_DEC_STRIP,
    TK_DEC_REPLACE,
    TK_DEC_WORDPIECE,
    TK_DEC_BPE_SUFFIX,
    TK_DEC_SEQUENCE
};
struct tk_dec {
    enum tk_dec_type type;
    struct tk_pattern pat;
    char *content; /* Replace: replacement; WordPiece: prefix */
    int32_t strip_cp;
    size_t start, stop;
    int32_t repl_cp; /* Metaspace */
    bool prepend;    /* Metaspace: prepend_scheme != never */
    bool cleanup;    /* WordPiece */
    struct tk_dec *kids;
    size_t nkids;
};
tuna_status tk_dec_parse(const cJSON *j, struct tk_dec *d);
void tk_dec_free(struct tk_dec *d);
/* Runs the decoder over the token strings in *l, replacing the list (HF decode_chain). */
tuna_status tk_dec_apply(const struct tk_dec *d, tk_pieces *l);

/* ---- post-processor ---- */
struct tk_post {
    int32_t *tmpl; /* ids, TK_POST_SEQ marks where the sequence goes */
    size_t n;
    bool present;
};
#define TK_POST_SEQ INT32_MIN

/* ---- the tokenizer ---- */
struct tuna_tokenizer {
    struct tk_model model;
    struct tk_norm *norm; /* NULL = none */
    struct tk_pre *pre;
    struct tk_dec *dec;
    struct tk_post post;
    struct tk_added *added;
    size_t nadded;
    struct tuna_strmap added_map; /* content → index in added */
    int32_t *added_by_id;         /* [nvocab_total] index in added or -1 */
    int64_t nvocab_total;
    struct tk_matcher match_raw, match_norm; /* non-normalized / normalized added tokens */
    char **norm_content;                     /* [nadded] normalized content of normalized tokens */
    bool clean_up_spaces;
    /* transformers' Llama/Gemma tokenizer classes rebuild the post-processor from
     * add_bos_token / add_eos_token (LlamaTokenizerFast.update_post_processor) */
    bool rebuild_post, add_bos, add_eos;
    char *special_str[4];   /* bos, eos, unk, pad */
    int32_t special_id[4];
    char *chat_template;
};

/* tokenizer.c: builds a tokenizer from a tokenizer.json document; special_defaults (bos, eos,
 * unk, pad; entries may be NULL) fill what the config files leave out; llama_post adds BOS the
 * way LlamaTokenizerFast does (add_bos_token / add_eos_token may change it). */
tuna_status tk_build_from_doc(const cJSON *doc, const char *what, const char *config_dir,
                              const char *const special_defaults[4], bool llama_post, tuna_tokenizer **out);

/* added_tokens.c */
tuna_status tk_added_add(tuna_tokenizer *t, const char *content, int32_t id, bool special, bool normalized,
                         bool lstrip, bool rstrip, bool single_word);
tuna_status tk_added_build(tuna_tokenizer *t);
/* Splits s by the added tokens of one matcher (HF AddedVocabulary::find_matches). */
tuna_status tk_added_split(const tuna_tokenizer *t, const struct tk_matcher *m, bool parse_special,
                           const char *s, size_t n, tk_aseg **out, size_t *nout);
const char *tk_id_to_str(const tuna_tokenizer *t, int32_t id, size_t *len);

#endif
