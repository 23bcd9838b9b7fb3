/* kv_cache.h — the paged KV cache: fixed-size blocks of block_size token slots, a block table per
 * sequence, reference counts so that sequences can share a prefix (fork), copy-on-write when a
 * shared block is about to be written.
 *
 * The allocator (block tables, free list, refcounts) is plain C; storage is K and V per layer laid
 * out [n_blocks * block_size slots, Hkv, D] in the cache's dtype: float32 on the CPU and in the
 * GPU's float32 mode, the model's 16-bit compute dtype (bf16, or f16 below compute capability 8.0)
 * on the GPU otherwise (tuna_model_kv_dtype), halving the bytes every decode step reads;
 * --kv-cache-dtype picks another (tuna_model_set_kv_dtype): fp8 = FP8 E4M3 on the GPU, one byte
 * per element (scale 1.0, saturating at +-448; backend/cuda/kv_types.cuh). With
 * n_layers = 0 there is no storage at all, which is how the allocator is unit-tested.
 *
 * Slots: position p of a sequence lives in slot blocks[p / block_size] * block_size + p % block_size.
 *
 * Automatic prefix caching (vLLM's design, SERVING.md §3.4): a full block can be registered under
 * a hash of (parent block's hash, its block_size token ids, LoRA adapter id); a table maps hash →
 * block. A new sequence can start by taking shared references to the longest chain of registered
 * blocks matching its tokens. Blocks whose refcount drops to 0 go to a free list that is also an
 * LRU: unregistered ones at its head (reused first), registered ones at its tail, still findable
 * and taken back from the middle on a hit; a block popped from the head for new use loses its
 * hash (eviction). So registered-but-unreferenced blocks count as free. A registered block is
 * never written again: growing into one (after a truncate) copies it first, as for a shared one.
 * Nothing is registered unless the caller calls tuna_kv_seq_cache_blocks: without it the cache
 * behaves as a plain paged allocator.
 */
#ifndef TUNA_MODEL_KV_CACHE_H
#define TUNA_MODEL_KV_CACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "tuna.h"

typedef struct tuna_kv_cache tuna_kv_cache;

struct tuna_kv_config {
    int64_t n_layers;   /* 0 = allocator only, no K/V storage */
    int64_t n_kv_heads; /* Hkv */
    int64_t head_dim;   /* D */
    int32_t block_size; /* tokens per block (default 16) */
    int32_t n_blocks;   /* total blocks */
    /* Where the K/V storage lives: NULL = host memory (calloc). Otherwise the backend's memory
     * (alloc/release/copy of the op table), e.g. GPU memory for the CUDA backend. */
    const struct tuna_backend_ops *mem_ops;
    tuna_backend *mem_be;
    enum tuna_dtype dtype; /* F32, BF16, F16 or F8_E4M3 (device storage only); INVALID (0) = F32 */
};

#define TUNA_KV_DEFAULT_BLOCK 16

tuna_status tuna_kv_new(const struct tuna_kv_config *cfg, tuna_kv_cache **out);
void tuna_kv_free(tuna_kv_cache *kv); /* accepts NULL */

/* A new empty sequence; *seq is its id (ids of freed sequences are reused). */
tuna_status tuna_kv_seq_new(tuna_kv_cache *kv, int32_t *seq);
/* A new sequence sharing every block of src (refcounts + 1), same length. */
tuna_status tuna_kv_seq_fork(tuna_kv_cache *kv, int32_t src, int32_t *dst);
/* Releases the sequence's blocks (refcount - 1 each) and its id. Unknown ids are ignored. */
void tuna_kv_seq_free(tuna_kv_cache *kv, int32_t seq);
/* Makes room for positions [len, new_len): appends blocks and copies a shared block that holds
 * one of these positions (copy-on-write). TUNA_E_OOM with a message when blocks run out (the
 * sequence is left as it was). new_len < len is refused: use truncate. */
tuna_status tuna_kv_seq_grow(tuna_kv_cache *kv, int32_t seq, int64_t new_len);
/* Shortens the sequence to len tokens and releases blocks no longer needed. */
tuna_status tuna_kv_seq_truncate(tuna_kv_cache *kv, int32_t seq, int64_t len);

int64_t tuna_kv_seq_len(const tuna_kv_cache *kv, int32_t seq);       /* -1 for an unknown id */
const int32_t *tuna_kv_seq_blocks(const tuna_kv_cache *kv, int32_t seq); /* borrowed */
int64_t tuna_kv_seq_nblocks(const tuna_kv_cache *kv, int32_t seq);
/* The slot of position pos (< len) of seq. */
int64_t tuna_kv_slot(const tuna_kv_cache *kv, int32_t seq, int64_t pos);

int32_t tuna_kv_block_size(const tuna_kv_cache *kv);
int32_t tuna_kv_n_blocks(const tuna_kv_cache *kv);
/* Blocks that can be handed out: unreferenced ones, registered (evictable) ones included. */
int32_t tuna_kv_free_blocks(const tuna_kv_cache *kv);
int32_t tuna_kv_block_refcount(const tuna_kv_cache *kv, int32_t block);

/* Prefix caching. `tokens` are always a sequence's tokens from position 0; adapter is the LoRA
 * adapter index (-1 = base model), part of every block hash, so different adapters never share.
 *
 * How many leading full blocks of tokens[0..n) are registered (at most n / block_size);
 * *n_evictable (may be NULL) receives how many of them are unreferenced, i.e. counted in
 * tuna_kv_free_blocks, so taking them uses that many free blocks. Changes nothing. */
int64_t tuna_kv_prefix_match(const tuna_kv_cache *kv, const int32_t *tokens, int64_t n, int32_t adapter,
                             int64_t *n_evictable);
/* Starts the empty sequence seq with shared references to the first n_blocks registered blocks
 * matching tokens (which holds at least n_blocks * block_size ids): its length becomes
 * n_blocks * block_size. TUNA_E_INVALID when seq is not empty or the blocks are not all
 * registered (nothing changes then). */
tuna_status tuna_kv_seq_take_prefix(tuna_kv_cache *kv, int32_t seq, const int32_t *tokens, int64_t n_blocks,
                                    int32_t adapter);
/* Registers the sequence's full blocks among its first min(n, length) tokens that are not yet
 * registered (a block whose hash already names another block stays unregistered). Call it after
 * the K/V of those tokens are written. A sequence keeps one adapter: another one is refused. */
tuna_status tuna_kv_seq_cache_blocks(tuna_kv_cache *kv, int32_t seq, const int32_t *tokens, int64_t n,
                                     int32_t adapter);
/* Registered blocks (referenced or not). */
int32_t tuna_kv_cached_blocks(const tuna_kv_cache *kv);

/* Layer l's storage [n_blocks*block_size, Hkv, D] of tuna_kv_dtype elements; NULL without storage. */
void *tuna_kv_k(tuna_kv_cache *kv, int64_t layer);
void *tuna_kv_v(tuna_kv_cache *kv, int64_t layer);
enum tuna_dtype tuna_kv_dtype(const tuna_kv_cache *kv); /* F32, BF16, F16 or F8_E4M3 */
/* The longest block table a sequence can have: ceil(max_len / block_size) for a sequence of
 * max_len tokens (struct tuna_attn_batch.max_blocks_per_seq). */
int32_t tuna_kv_max_blocks_per_seq(const tuna_kv_cache *kv, int64_t max_len);

struct tuna_model;
/* The KV cache dtype for a model: float32 on host-memory backends, else the dtype the backend
 * computes in (the GPU's: bf16, f16 below compute capability 8.0, float32 with --dtype float32). */
enum tuna_dtype tuna_model_kv_dtype(const struct tuna_model *m);
/* Sets the KV cache dtype the model's caches get (--kv-cache-dtype; TUNA_DTYPE_INVALID = auto, as
 * above): F32, BF16, F16 on any backend, F8_E4M3 on the GPU only (TUNA_E_UNSUPPORTED on the CPU
 * backend, whose cache stays float32); anything else TUNA_E_INVALID. Called by the loader. */
tuna_status tuna_model_set_kv_dtype(struct tuna_model *m, enum tuna_dtype want);
/* Parses a --kv-cache-dtype value: auto (TUNA_DTYPE_INVALID), bfloat16/bf16, float16/half/fp16,
 * float32/float, fp8/fp8_e4m3; false for anything else. */
bool tuna_kv_dtype_parse(const char *s, enum tuna_dtype *out);

#endif
