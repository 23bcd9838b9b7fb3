/* kv_cache.c — block allocator (free list + refcounts), per-sequence block tables, the prefix
 * cache (block hashes, hash table, LRU eviction) and the K/V storage they index (float32 or
 * 16-bit elements, kv_cache.h).
 * Spec: kv_cache.h.
 *
 * Invariants: a block is in the free list exactly when its refcount is 0; n_free is the list's
 * length; a block is in the hash table exactly when cached[b]; registered blocks are full and
 * their K/V never change while registered. */
#include "model/kv_cache.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "model/model.h"

struct kv_seq {
    bool used;
    int64_t len;
    int32_t *blocks;
    uint64_t *hashes;   /* [cap] chain hash of block i, valid for i < n_hashed */
    int64_t nblocks, cap;
    int64_t n_hashed;   /* leading full blocks whose hash is known (registered or duplicate) */
    int32_t adapter;    /* the adapter of its hashes (valid when n_hashed > 0) */
};

/* Hash of a block with no parent (the first block of a sequence). */
#define KV_ROOT_HASH 0x74756e612d6b7631ULL

struct tuna_kv_cache {
    struct tuna_kv_config cfg;
    int64_t slot_elems;   /* Hkv * D */
    size_t elem_bytes;    /* 4 (float32) or 2 (bf16, f16) */
    char **k, **v;        /* [n_layers] */
    int32_t *refcount;    /* [n_blocks] */
    int32_t *prev, *next; /* [n_blocks] free list links, -1 at the ends; head is reused first */
    int32_t head, tail;
    int32_t n_free;
    /* prefix cache, per block: */
    bool *cached;         /* registered in the table */
    uint64_t *hash, *parent; /* its hash and its parent's */
    int32_t *adapter;
    int32_t *btokens;     /* [n_blocks, block_size] its token ids, to check a hit exactly */
    int32_t *table;       /* [table_mask + 1] open addressing (linear probing), block or -1 */
    uint64_t table_mask;
    int32_t n_cached;
    struct kv_seq *seqs;
    int32_t n_seqs, cap_seqs;
};

tuna_status tuna_kv_new(const struct tuna_kv_config *cfg, tuna_kv_cache **out)
{
    *out = NULL;
    enum tuna_dtype dt = cfg->dtype == TUNA_DTYPE_INVALID ? TUNA_DTYPE_F32 : cfg->dtype;
    if (dt != TUNA_DTYPE_F32 && dt != TUNA_DTYPE_BF16 && dt != TUNA_DTYPE_F16 && dt != TUNA_DTYPE_F8_E4M3)
        return tuna_fail(TUNA_E_INVALID, "KV cache: dtype %s is not supported (float32, bfloat16, float16 or fp8_e4m3)",
                         tuna_dtype_name(dt));
    if (dt == TUNA_DTYPE_F8_E4M3 && !cfg->mem_ops && cfg->n_layers > 0)
        return tuna_fail(TUNA_E_UNSUPPORTED, "KV cache: fp8_e4m3 storage is for the GPU only (the CPU backend reads "
                         "float32, bfloat16 or float16 caches)");
    if (cfg->block_size <= 0 || cfg->n_blocks <= 0 || cfg->n_layers < 0 ||
        (cfg->n_layers > 0 && (cfg->n_kv_heads <= 0 || cfg->head_dim <= 0)))
        return tuna_fail(TUNA_E_INVALID, "KV cache: bad shape (layers %lld, kv heads %lld, head dim %lld, "
                         "block size %d, blocks %d)", (long long)cfg->n_layers, (long long)cfg->n_kv_heads,
                         (long long)cfg->head_dim, cfg->block_size, cfg->n_blocks);
    struct tuna_kv_cache *kv = calloc(1, sizeof *kv);
    if (!kv) return tuna_fail_oom("KV cache", sizeof *kv);
    kv->cfg = *cfg;
    kv->cfg.dtype = dt;
    kv->slot_elems = cfg->n_kv_heads * cfg->head_dim;
    kv->elem_bytes = tuna_dtype_nbytes(dt, 1);
    size_t nb = (size_t)cfg->n_blocks;
    size_t tcap = 16;
    while (tcap < 2 * nb) tcap *= 2;
    kv->table_mask = tcap - 1;
    kv->refcount = calloc(nb, sizeof *kv->refcount);
    kv->prev = malloc(nb * sizeof *kv->prev);
    kv->next = malloc(nb * sizeof *kv->next);
    kv->cached = calloc(nb, sizeof *kv->cached);
    kv->hash = calloc(nb, sizeof *kv->hash);
    kv->parent = calloc(nb, sizeof *kv->parent);
    kv->adapter = calloc(nb, sizeof *kv->adapter);
    kv->btokens = malloc(nb * (size_t)cfg->block_size * sizeof *kv->btokens);
    kv->table = malloc(tcap * sizeof *kv->table);
    if (!kv->refcount || !kv->prev || !kv->next || !kv->cached || !kv->hash || !kv->parent || !kv->adapter ||
        !kv->btokens || !kv->table)
        goto oom;
    for (size_t i = 0; i < tcap; i++) kv->table[i] = -1;
    /* hand out low block numbers first */
    for (int32_t i = 0; i < cfg->n_blocks; i++) {
        kv->prev[i] = i - 1;
        kv->next[i] = i + 1 < cfg->n_blocks ? i + 1 : -1;
    }
    kv->head = 0;
    kv->tail = cfg->n_blocks - 1;
    kv->n_free = cfg->n_blocks;
    if (cfg->n_layers > 0) {
        kv->k = calloc((size_t)cfg->n_layers, sizeof *kv->k);
        kv->v = calloc((size_t)cfg->n_layers, sizeof *kv->v);
        if (!kv->k || !kv->v) goto oom;
        size_t n = (size_t)cfg->n_blocks * (size_t)cfg->block_size * (size_t)kv->slot_elems;
        for (int64_t l = 0; l < cfg->n_layers; l++) {
            if (cfg->mem_ops) {
                void *pk = NULL, *pv = NULL;
                if (cfg->mem_ops->alloc(cfg->mem_be, n * kv->elem_bytes, &pk) == TUNA_OK)
                    cfg->mem_ops->alloc(cfg->mem_be, n * kv->elem_bytes, &pv);
                kv->k[l] = pk;
                kv->v[l] = pv;
            } else {
                kv->k[l] = calloc(n, kv->elem_bytes);
                kv->v[l] = calloc(n, kv->elem_bytes);
            }
            if (!kv->k[l] || !kv->v[l]) {
                tuna_kv_free(kv);
                return tuna_fail(TUNA_E_OOM, "KV cache: cannot allocate %d blocks of %d tokens "
                                 "(%.1f MiB of %s for all layers); use a smaller --kv-cache-gb or --max-model-len",
                                 cfg->n_blocks, cfg->block_size,
                                 2.0 * (double)n * (double)tuna_dtype_nbytes(dt, 1) * (double)cfg->n_layers / 1048576.0,
                                 tuna_dtype_name(dt));
            }
        }
    }
    *out = kv;
    return TUNA_OK;
oom:
    tuna_kv_free(kv);
    return tuna_fail_oom("KV cache tables", (size_t)cfg->n_blocks * 8);
}

void tuna_kv_free(tuna_kv_cache *kv)
{
    if (!kv) return;
    for (int64_t l = 0; l < kv->cfg.n_layers; l++) {
        if (kv->cfg.mem_ops) {
            if (kv->k) kv->cfg.mem_ops->release(kv->cfg.mem_be, kv->k[l]);
            if (kv->v) kv->cfg.mem_ops->release(kv->cfg.mem_be, kv->v[l]);
            continue;
        }
        if (kv->k) free(kv->k[l]);
        if (kv->v) free(kv->v[l]);
    }
    free(kv->k);
    free(kv->v);
    for (int32_t i = 0; i < kv->cap_seqs; i++) {
        free(kv->seqs[i].blocks);
        free(kv->seqs[i].hashes);
    }
    free(kv->seqs);
    free(kv->refcount);
    free(kv->prev);
    free(kv->next);
    free(kv->cached);
    free(kv->hash);
    free(kv->parent);
    free(kv->adapter);
    free(kv->btokens);
    free(kv->table);
    free(kv);
}

static struct kv_seq *get_seq(const tuna_kv_cache *kv, int32_t seq)
{
    if (seq < 0 || seq >= kv->cap_seqs || !kv->seqs[seq].used) return NULL;
    return &kv->seqs[seq];
}

tuna_status tuna_kv_seq_new(tuna_kv_cache *kv, int32_t *seq)
{
    int32_t id = -1;
    for (int32_t i = 0; i < kv->cap_seqs; i++)
        if (!kv->seqs[i].used) {
            id = i;
            break;
        }
    if (id < 0) {
        int32_t ncap = kv->cap_seqs ? kv->cap_seqs * 2 : 8;
        struct kv_seq *ns = realloc(kv->seqs, (size_t)ncap * sizeof *ns);
        if (!ns) return tuna_fail_oom("KV sequence table", (size_t)ncap * sizeof *ns);
        memset(ns + kv->cap_seqs, 0, (size_t)(ncap - kv->cap_seqs) * sizeof *ns);
        id = kv->cap_seqs;
        kv->seqs = ns;
        kv->cap_seqs = ncap;
    }
    struct kv_seq *s = &kv->seqs[id];
    s->used = true;
    s->len = 0;
    s->nblocks = 0;
    s->n_hashed = 0;
    s->adapter = -1;
    *seq = id;
    return TUNA_OK;
}

static tuna_status reserve_table(struct kv_seq *s, int64_t n)
{
    if (n <= s->cap) return TUNA_OK;
    int64_t ncap = s->cap ? s->cap : 8;
    while (ncap < n) ncap *= 2;
    int32_t *nb = realloc(s->blocks, (size_t)ncap * sizeof *nb);
    if (!nb) return tuna_fail_oom("KV block table", (size_t)ncap * sizeof *nb);
    s->blocks = nb;
    uint64_t *nh = realloc(s->hashes, (size_t)ncap * sizeof *nh);
    if (!nh) return tuna_fail_oom("KV block hashes", (size_t)ncap * sizeof *nh);
    s->hashes = nh;
    s->cap = ncap;
    return TUNA_OK;
}

/* ---- free list (LRU) and hash table ---- */

static void list_unlink(tuna_kv_cache *kv, int32_t b)
{
    if (kv->prev[b] >= 0) kv->next[kv->prev[b]] = kv->next[b];
    else kv->head = kv->next[b];
    if (kv->next[b] >= 0) kv->prev[kv->next[b]] = kv->prev[b];
    else kv->tail = kv->prev[b];
    kv->n_free--;
}

static void list_push(tuna_kv_cache *kv, int32_t b, bool at_tail)
{
    if (at_tail) {
        kv->prev[b] = kv->tail;
        kv->next[b] = -1;
        if (kv->tail >= 0) kv->next[kv->tail] = b;
        else kv->head = b;
        kv->tail = b;
    } else {
        kv->next[b] = kv->head;
        kv->prev[b] = -1;
        if (kv->head >= 0) kv->prev[kv->head] = b;
        else kv->tail = b;
        kv->head = b;
    }
    kv->n_free++;
}

static int32_t table_find(const tuna_kv_cache *kv, uint64_t h)
{
    for (uint64_t i = h & kv->table_mask;; i = (i + 1) & kv->table_mask) {
        int32_t b = kv->table[i];
        if (b < 0) return -1;
        if (kv->hash[b] == h) return b;
    }
}

static void table_insert(tuna_kv_cache *kv, int32_t b)
{
    uint64_t i = kv->hash[b] & kv->table_mask;
    while (kv->table[i] >= 0) i = (i + 1) & kv->table_mask;
    kv->table[i] = b; /* at most n_blocks entries in twice as many slots: there is always a hole */
    kv->cached[b] = true;
    kv->n_cached++;
}

/* Removes b from the table; entries after it in its probe run move back into the hole. */
static void table_remove(tuna_kv_cache *kv, int32_t b)
{
    const uint64_t mask = kv->table_mask;
    uint64_t i = kv->hash[b] & mask;
    while (kv->table[i] != b) i = (i + 1) & mask;
    kv->table[i] = -1;
    for (uint64_t j = (i + 1) & mask; kv->table[j] >= 0; j = (j + 1) & mask) {
        uint64_t home = kv->hash[kv->table[j]] & mask;
        /* the entry at j may move to the hole at i unless its home lies cyclically in (i, j] */
        bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (stays) continue;
        kv->table[i] = kv->table[j];
        kv->table[j] = -1;
        i = j;
    }
    kv->cached[b] = false;
    kv->n_cached--;
}

/* A block for new contents from the head of the free list (evicting its hash); refcount 1.
 * The caller has checked n_free > 0. */
static int32_t alloc_block(tuna_kv_cache *kv)
{
    int32_t b = kv->head;
    list_unlink(kv, b);
    if (kv->cached[b]) table_remove(kv, b);
    kv->refcount[b] = 1;
    return b;
}

/* One more reference; an unreferenced (cached) block leaves the free list. */
static void touch_block(tuna_kv_cache *kv, int32_t b)
{
    if (kv->refcount[b]++ == 0) list_unlink(kv, b);
}

/* One reference less; at 0 a registered block goes to the LRU end (kept for reuse), others to
 * the head (reused first). */
static void release_block(tuna_kv_cache *kv, int32_t b)
{
    if (--kv->refcount[b] == 0) list_push(kv, b, kv->cached[b]);
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t block_hash(uint64_t parent, int32_t adapter, const int32_t *t, int64_t bs)
{
    uint64_t h = mix64(parent ^ mix64((uint64_t)(uint32_t)adapter + 0x9e3779b97f4a7c15ULL));
    for (int64_t i = 0; i < bs; i++) h = mix64(h ^ ((uint64_t)(uint32_t)t[i] + 0x632be59bd9b4e019ULL));
    return h;
}

/* The registered block holding exactly these tokens after `parent` for this adapter, or -1. */
static int32_t find_block(const tuna_kv_cache *kv, uint64_t parent, int32_t adapter, const int32_t *t, uint64_t *h)
{
    const int64_t bs = kv->cfg.block_size;
    *h = block_hash(parent, adapter, t, bs);
    int32_t b = table_find(kv, *h);
    if (b < 0 || kv->parent[b] != parent || kv->adapter[b] != adapter ||
        memcmp(kv->btokens + (size_t)b * (size_t)bs, t, (size_t)bs * sizeof *t) != 0)
        return -1;
    return b;
}

tuna_status tuna_kv_seq_fork(tuna_kv_cache *kv, int32_t src, int32_t *dst)
{
    if (!get_seq(kv, src)) return tuna_fail(TUNA_E_INVALID, "KV cache: fork of unknown sequence %d", src);
    int32_t id;
    tuna_status st = tuna_kv_seq_new(kv, &id);
    if (st) return st;
    struct kv_seq *s = &kv->seqs[src], *d = &kv->seqs[id]; /* after seq_new: it may move seqs */
    st = reserve_table(d, s->nblocks);
    if (st) {
        d->used = false;
        return st;
    }
    memcpy(d->blocks, s->blocks, (size_t)s->nblocks * sizeof *d->blocks);
    if (s->n_hashed) memcpy(d->hashes, s->hashes, (size_t)s->n_hashed * sizeof *d->hashes);
    d->nblocks = s->nblocks;
    d->len = s->len;
    d->n_hashed = s->n_hashed;
    d->adapter = s->adapter;
    for (int64_t i = 0; i < s->nblocks; i++) kv->refcount[s->blocks[i]]++;
    *dst = id;
    return TUNA_OK;
}

void tuna_kv_seq_free(tuna_kv_cache *kv, int32_t seq)
{
    struct kv_seq *s = get_seq(kv, seq);
    if (!s) return;
    /* last block first: at the LRU end, a sequence's tail is evicted before its prefix */
    for (int64_t i = s->nblocks - 1; i >= 0; i--) release_block(kv, s->blocks[i]);
    s->nblocks = 0;
    s->n_hashed = 0;
    s->len = 0;
    s->used = false;
}

static void copy_block(tuna_kv_cache *kv, int32_t dst, int32_t src)
{
    size_t n = (size_t)kv->cfg.block_size * (size_t)kv->slot_elems * kv->elem_bytes; /* bytes per block */
    for (int64_t l = 0; l < kv->cfg.n_layers; l++) {
        if (kv->cfg.mem_ops) {
            kv->cfg.mem_ops->copy(kv->cfg.mem_be, kv->k[l] + (size_t)dst * n, kv->k[l] + (size_t)src * n, n);
            kv->cfg.mem_ops->copy(kv->cfg.mem_be, kv->v[l] + (size_t)dst * n, kv->v[l] + (size_t)src * n, n);
            continue;
        }
        memcpy(kv->k[l] + (size_t)dst * n, kv->k[l] + (size_t)src * n, n);
        memcpy(kv->v[l] + (size_t)dst * n, kv->v[l] + (size_t)src * n, n);
    }
}

tuna_status tuna_kv_seq_grow(tuna_kv_cache *kv, int32_t seq, int64_t new_len)
{
    struct kv_seq *s = get_seq(kv, seq);
    if (!s) return tuna_fail(TUNA_E_INVALID, "KV cache: unknown sequence %d", seq);
    if (new_len < s->len)
        return tuna_fail(TUNA_E_INVALID, "KV cache: grow to %lld below the length %lld", (long long)new_len,
                         (long long)s->len);
    if (new_len == s->len) return TUNA_OK;
    const int64_t bs = kv->cfg.block_size;
    int64_t need = (new_len + bs - 1) / bs;
    /* the block holding position len is written: copied first when it is shared or registered */
    int64_t first_written = s->len / bs;
    bool cow = first_written < s->nblocks &&
               (kv->refcount[s->blocks[first_written]] > 1 || kv->cached[s->blocks[first_written]]);
    int64_t want = (need - s->nblocks) + (cow ? 1 : 0);
    if (want > kv->n_free)
        return tuna_fail(TUNA_E_OOM, "KV cache is full: sequence %d needs %lld more blocks of %lld tokens "
                         "for %lld tokens, %d of %d are free; give it more room (--kv-cache-gb) or run "
                         "fewer sequences at once", seq, (long long)want, (long long)bs, (long long)new_len,
                         kv->n_free, kv->cfg.n_blocks);
    tuna_status st = reserve_table(s, need);
    if (st) return st;
    if (cow) {
        int32_t old = s->blocks[first_written], nb = alloc_block(kv);
        copy_block(kv, nb, old);
        release_block(kv, old); /* a registered one stays cached */
        s->blocks[first_written] = nb;
    }
    while (s->nblocks < need) s->blocks[s->nblocks++] = alloc_block(kv);
    s->len = new_len;
    return TUNA_OK;
}

tuna_status tuna_kv_seq_truncate(tuna_kv_cache *kv, int32_t seq, int64_t len)
{
    struct kv_seq *s = get_seq(kv, seq);
    if (!s) return tuna_fail(TUNA_E_INVALID, "KV cache: unknown sequence %d", seq);
    if (len < 0 || len > s->len)
        return tuna_fail(TUNA_E_INVALID, "KV cache: truncate sequence %d of %lld tokens to %lld", seq,
                         (long long)s->len, (long long)len);
    int64_t need = (len + kv->cfg.block_size - 1) / kv->cfg.block_size;
    while (s->nblocks > need) release_block(kv, s->blocks[--s->nblocks]);
    if (s->n_hashed > len / kv->cfg.block_size) s->n_hashed = len / kv->cfg.block_size;
    s->len = len;
    return TUNA_OK;
}

/* ---- prefix caching ---- */

int64_t tuna_kv_prefix_match(const tuna_kv_cache *kv, const int32_t *tokens, int64_t n, int32_t adapter,
                             int64_t *n_evictable)
{
    const int64_t bs = kv->cfg.block_size;
    int64_t i = 0, evictable = 0;
    uint64_t parent = KV_ROOT_HASH, h;
    for (; (i + 1) * bs <= n; i++) {
        int32_t b = find_block(kv, parent, adapter, tokens + i * bs, &h);
        if (b < 0) break;
        if (kv->refcount[b] == 0) evictable++;
        parent = h;
    }
    if (n_evictable) *n_evictable = evictable;
    return i;
}

tuna_status tuna_kv_seq_take_prefix(tuna_kv_cache *kv, int32_t seq, const int32_t *tokens, int64_t n_blocks,
                                    int32_t adapter)
{
    struct kv_seq *s = get_seq(kv, seq);
    if (!s) return tuna_fail(TUNA_E_INVALID, "KV cache: unknown sequence %d", seq);
    if (s->len || s->nblocks)
        return tuna_fail(TUNA_E_INVALID, "KV cache: sequence %d already holds %lld tokens; a cached prefix "
                         "can only start an empty sequence", seq, (long long)s->len);
    if (n_blocks <= 0) return n_blocks == 0 ? TUNA_OK : tuna_fail(TUNA_E_INVALID, "KV cache: %lld prefix blocks",
                                                                   (long long)n_blocks);
    tuna_status st = reserve_table(s, n_blocks);
    if (st) return st;
    const int64_t bs = kv->cfg.block_size;
    uint64_t parent = KV_ROOT_HASH;
    for (int64_t i = 0; i < n_blocks; i++) { /* find them all before taking any */
        int32_t b = find_block(kv, parent, adapter, tokens + i * bs, &s->hashes[i]);
        if (b < 0)
            return tuna_fail(TUNA_E_INVALID, "KV cache: block %lld of the prefix is not cached (%lld asked); "
                             "ask tuna_kv_prefix_match first", (long long)i, (long long)n_blocks);
        s->blocks[i] = b;
        parent = s->hashes[i];
    }
    for (int64_t i = 0; i < n_blocks; i++) touch_block(kv, s->blocks[i]);
    s->nblocks = s->n_hashed = n_blocks;
    s->len = n_blocks * bs;
    s->adapter = adapter;
    return TUNA_OK;
}

tuna_status tuna_kv_seq_cache_blocks(tuna_kv_cache *kv, int32_t seq, const int32_t *tokens, int64_t n,
                                     int32_t adapter)
{
    struct kv_seq *s = get_seq(kv, seq);
    if (!s) return tuna_fail(TUNA_E_INVALID, "KV cache: unknown sequence %d", seq);
    if (s->n_hashed > 0 && s->adapter != adapter)
        return tuna_fail(TUNA_E_INVALID, "KV cache: sequence %d was cached for adapter %d, not %d", seq, s->adapter,
                         adapter);
    const int64_t bs = kv->cfg.block_size;
    int64_t full = (n < s->len ? n : s->len) / bs;
    s->adapter = adapter;
    for (int64_t i = s->n_hashed; i < full; i++) {
        uint64_t parent = i ? s->hashes[i - 1] : KV_ROOT_HASH;
        const int32_t *t = tokens + i * bs;
        uint64_t h = block_hash(parent, adapter, t, bs);
        s->hashes[i] = h;
        int32_t b = s->blocks[i];
        if (kv->cached[b] || table_find(kv, h) >= 0) continue; /* already registered, or a duplicate */
        kv->hash[b] = h;
        kv->parent[b] = parent;
        kv->adapter[b] = adapter;
        memcpy(kv->btokens + (size_t)b * (size_t)bs, t, (size_t)bs * sizeof *t);
        table_insert(kv, b);
    }
    if (full > s->n_hashed) s->n_hashed = full;
    return TUNA_OK;
}

int32_t tuna_kv_cached_blocks(const tuna_kv_cache *kv) { return kv->n_cached; }

int64_t tuna_kv_seq_len(const tuna_kv_cache *kv, int32_t seq)
{
    const struct kv_seq *s = get_seq(kv, seq);
    return s ? s->len : -1;
}

const int32_t *tuna_kv_seq_blocks(const tuna_kv_cache *kv, int32_t seq)
{
    const struct kv_seq *s = get_seq(kv, seq);
    return s ? s->blocks : NULL;
}

int64_t tuna_kv_seq_nblocks(const tuna_kv_cache *kv, int32_t seq)
{
    const struct kv_seq *s = get_seq(kv, seq);
    return s ? s->nblocks : 0;
}

int64_t tuna_kv_slot(const tuna_kv_cache *kv, int32_t seq, int64_t pos)
{
    const struct kv_seq *s = &kv->seqs[seq];
    int64_t bs = kv->cfg.block_size;
    return (int64_t)s->blocks[pos / bs] * bs + pos % bs;
}

int32_t tuna_kv_block_size(const tuna_kv_cache *kv) { return kv->cfg.block_size; }
int32_t tuna_kv_n_blocks(const tuna_kv_cache *kv) { return kv->cfg.n_blocks; }
int32_t tuna_kv_free_blocks(const tuna_kv_cache *kv) { return kv->n_free; }
int32_t tuna_kv_block_refcount(const tuna_kv_cache *kv, int32_t block)
{
    return block >= 0 && block < kv->cfg.n_blocks ? kv->refcount[block] : -1;
}
void *tuna_kv_k(tuna_kv_cache *kv, int64_t layer) { return kv->k && layer < kv->cfg.n_layers ? kv->k[layer] : NULL; }
void *tuna_kv_v(tuna_kv_cache *kv, int64_t layer) { return kv->v && layer < kv->cfg.n_layers ? kv->v[layer] : NULL; }
enum tuna_dtype tuna_kv_dtype(const tuna_kv_cache *kv) { return kv->cfg.dtype; }

int32_t tuna_kv_max_blocks_per_seq(const tuna_kv_cache *kv, int64_t max_len)
{
    int64_t n = (max_len + kv->cfg.block_size - 1) / kv->cfg.block_size;
    if (n > kv->cfg.n_blocks) n = kv->cfg.n_blocks; /* no table can be longer than the whole cache */
    return (int32_t)(n > 0 ? n : 1);
}

enum tuna_dtype tuna_model_kv_dtype(const struct tuna_model *m)
{
    if (m->kv_dtype_req != TUNA_DTYPE_INVALID) return m->kv_dtype_req; /* --kv-cache-dtype */
    if (m->ops->host_memory) return TUNA_DTYPE_F32;
    /* the GPU loader moves the embedding to the compute dtype (src/model/device.c) */
    enum tuna_dtype dt = m->embed.dtype;
    return dt == TUNA_DTYPE_BF16 || dt == TUNA_DTYPE_F16 ? dt : TUNA_DTYPE_F32;
}

tuna_status tuna_model_set_kv_dtype(struct tuna_model *m, enum tuna_dtype want)
{
    if (want == TUNA_DTYPE_F8_E5M2)
        return tuna_fail(TUNA_E_UNSUPPORTED, "--kv-cache-dtype fp8_e5m2 is not supported: use fp8 (fp8_e4m3), "
                         "bfloat16, float16 or auto");
    if (want != TUNA_DTYPE_INVALID && want != TUNA_DTYPE_F32 && want != TUNA_DTYPE_BF16 && want != TUNA_DTYPE_F16 &&
        want != TUNA_DTYPE_F8_E4M3)
        return tuna_fail(TUNA_E_INVALID, "KV cache dtype %s: use auto, bfloat16, float16, float32 or fp8",
                         tuna_dtype_name(want));
    if (want == TUNA_DTYPE_F8_E4M3 && m->ops->host_memory)
        return tuna_fail(TUNA_E_UNSUPPORTED, "--kv-cache-dtype fp8 needs the GPU backend (--device cuda): the CPU "
                         "backend keeps its KV cache in float32 (or bfloat16/float16 when asked); use "
                         "--kv-cache-dtype auto on the CPU");
    m->kv_dtype_req = want;
    return TUNA_OK;
}

bool tuna_kv_dtype_parse(const char *s, enum tuna_dtype *out)
{
    static const struct {
        const char *name;
        enum tuna_dtype dt;
    } names[] = {{"auto", TUNA_DTYPE_INVALID}, {"bfloat16", TUNA_DTYPE_BF16}, {"bf16", TUNA_DTYPE_BF16},
                 {"float16", TUNA_DTYPE_F16},   {"half", TUNA_DTYPE_F16},     {"fp16", TUNA_DTYPE_F16},
                 {"float32", TUNA_DTYPE_F32},   {"float", TUNA_DTYPE_F32},    {"fp32", TUNA_DTYPE_F32},
                 {"fp8", TUNA_DTYPE_F8_E4M3},   {"fp8_e4m3", TUNA_DTYPE_F8_E4M3}, {"fp8_e5m2", TUNA_DTYPE_F8_E5M2}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(s, names[i].name)) {
            *out = names[i].dt;
            return true;
        }
    return false;
}
