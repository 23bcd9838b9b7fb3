/* kv_cache.c — block allocator (free stack + refcounts), per-sequence block tables, and the
 * float32 K/V storage they index. Spec: kv_cache.h. */
#include "model/kv_cache.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"

struct kv_seq {
    bool used;
    int64_t len;
    int32_t *blocks;
    int64_t nblocks, cap;
};

struct tuna_kv_cache {
    struct tuna_kv_config cfg;
    int64_t slot_floats;  /* Hkv * D */
    float **k, **v;       /* [n_layers] */
    int32_t *refcount;    /* [n_blocks] */
    int32_t *free_stack;  /* [n_blocks] */
    int32_t n_free;
    struct kv_seq *seqs;
    int32_t n_seqs, cap_seqs;
};

tuna_status tuna_kv_new(const struct tuna_kv_config *cfg, tuna_kv_cache **out)
{
    *out = NULL;
    if (cfg->block_size <= 0 || cfg->n_blocks <= 0 || cfg->n_layers < 0 ||
        (cfg->n_layers > 0 && (cfg->n_kv_heads <= 0 || cfg->head_dim <= 0)))
        return tuna_fail(TUNA_E_INVALID, "KV cache: bad shape (layers %lld, kv heads %lld, head dim %lld, "
                         "block size %d, blocks %d)", (long long)cfg->n_layers, (long long)cfg->n_kv_heads,
                         (long long)cfg->head_dim, cfg->block_size, cfg->n_blocks);
    struct tuna_kv_cache *kv = calloc(1, sizeof *kv);
    if (!kv) return tuna_fail_oom("KV cache", sizeof *kv);
    kv->cfg = *cfg;
    kv->slot_floats = cfg->n_kv_heads * cfg->head_dim;
    kv->refcount = calloc((size_t)cfg->n_blocks, sizeof *kv->refcount);
    kv->free_stack = malloc((size_t)cfg->n_blocks * sizeof *kv->free_stack);
    if (!kv->refcount || !kv->free_stack) goto oom;
    /* hand out low block numbers first */
    for (int32_t i = 0; i < cfg->n_blocks; i++) kv->free_stack[i] = cfg->n_blocks - 1 - i;
    kv->n_free = cfg->n_blocks;
    if (cfg->n_layers > 0) {
        kv->k = calloc((size_t)cfg->n_layers, sizeof *kv->k);
        kv->v = calloc((size_t)cfg->n_layers, sizeof *kv->v);
        if (!kv->k || !kv->v) goto oom;
        size_t n = (size_t)cfg->n_blocks * (size_t)cfg->block_size * (size_t)kv->slot_floats;
        for (int64_t l = 0; l < cfg->n_layers; l++) {
            if (cfg->mem_ops) {
                void *pk = NULL, *pv = NULL;
                if (cfg->mem_ops->alloc(cfg->mem_be, n * sizeof(float), &pk) == TUNA_OK)
                    cfg->mem_ops->alloc(cfg->mem_be, n * sizeof(float), &pv);
                kv->k[l] = pk;
                kv->v[l] = pv;
            } else {
                kv->k[l] = calloc(n, sizeof(float));
                kv->v[l] = calloc(n, sizeof(float));
            }
            if (!kv->k[l] || !kv->v[l]) {
                tuna_kv_free(kv);
                return tuna_fail(TUNA_E_OOM, "KV cache: cannot allocate %d blocks of %d tokens "
                                 "(%.1f MiB for all layers); use a smaller --kv-cache-gb or --max-model-len",
                                 cfg->n_blocks, cfg->block_size,
                                 2.0 * (double)n * 4 * (double)cfg->n_layers / 1048576.0);
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
    for (int32_t i = 0; i < kv->cap_seqs; i++) free(kv->seqs[i].blocks);
    free(kv->seqs);
    free(kv->refcount);
    free(kv->free_stack);
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
    s->cap = ncap;
    return TUNA_OK;
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
    d->nblocks = s->nblocks;
    d->len = s->len;
    for (int64_t i = 0; i < s->nblocks; i++) kv->refcount[s->blocks[i]]++;
    *dst = id;
    return TUNA_OK;
}

static void release_block(tuna_kv_cache *kv, int32_t b)
{
    if (--kv->refcount[b] == 0) kv->free_stack[kv->n_free++] = b;
}

void tuna_kv_seq_free(tuna_kv_cache *kv, int32_t seq)
{
    struct kv_seq *s = get_seq(kv, seq);
    if (!s) return;
    for (int64_t i = 0; i < s->nblocks; i++) release_block(kv, s->blocks[i]);
    s->nblocks = 0;
    s->len = 0;
    s->used = false;
}

static void copy_block(tuna_kv_cache *kv, int32_t dst, int32_t src)
{
    size_t n = (size_t)kv->cfg.block_size * (size_t)kv->slot_floats;
    for (int64_t l = 0; l < kv->cfg.n_layers; l++) {
        if (kv->cfg.mem_ops) {
            kv->cfg.mem_ops->copy(kv->cfg.mem_be, kv->k[l] + (size_t)dst * n, kv->k[l] + (size_t)src * n, n * sizeof(float));
            kv->cfg.mem_ops->copy(kv->cfg.mem_be, kv->v[l] + (size_t)dst * n, kv->v[l] + (size_t)src * n, n * sizeof(float));
            continue;
        }
        memcpy(kv->k[l] + (size_t)dst * n, kv->k[l] + (size_t)src * n, n * sizeof(float));
        memcpy(kv->v[l] + (size_t)dst * n, kv->v[l] + (size_t)src * n, n * sizeof(float));
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
    /* the block holding position len is written when it is partly filled and shared */
    int64_t first_written = s->len / bs;
    bool cow = first_written < s->nblocks && kv->refcount[s->blocks[first_written]] > 1;
    int64_t want = (need - s->nblocks) + (cow ? 1 : 0);
    if (want > kv->n_free)
        return tuna_fail(TUNA_E_OOM, "KV cache is full: sequence %d needs %lld more blocks of %lld tokens "
                         "for %lld tokens, %d of %d are free; give it more room (--kv-cache-gb) or run "
                         "fewer sequences at once", seq, (long long)want, (long long)bs, (long long)new_len,
                         kv->n_free, kv->cfg.n_blocks);
    tuna_status st = reserve_table(s, need);
    if (st) return st;
    if (cow) {
        int32_t old = s->blocks[first_written], nb = kv->free_stack[--kv->n_free];
        kv->refcount[nb] = 1;
        copy_block(kv, nb, old);
        kv->refcount[old]--; /* still > 0: it was shared */
        s->blocks[first_written] = nb;
    }
    while (s->nblocks < need) {
        int32_t nb = kv->free_stack[--kv->n_free];
        kv->refcount[nb] = 1;
        s->blocks[s->nblocks++] = nb;
    }
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
    s->len = len;
    return TUNA_OK;
}

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
float *tuna_kv_k(tuna_kv_cache *kv, int64_t layer) { return kv->k && layer < kv->cfg.n_layers ? kv->k[layer] : NULL; }
float *tuna_kv_v(tuna_kv_cache *kv, int64_t layer) { return kv->v && layer < kv->cfg.n_layers ? kv->v[layer] : NULL; }
