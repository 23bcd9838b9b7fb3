/* batching.c — which rows a training step uses, and right-padded [B, T] batches of them
 * (see dataset.h for the order). The order is a pure function of (step, batch, shuffle, seed),
 * so a resumed run picks up exactly where it stopped.
 */
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "model/sampler.h"
#include "train/dataset.h"
#include "train/dataset_internal.h"

/* Fisher–Yates permutation of 0..n-1 for epoch e. */
static void epoch_perm(size_t n, uint64_t seed, uint64_t epoch, size_t *perm)
{
    struct tuna_rng r;
    tuna_rng_seed(&r, seed + epoch * 0x9E3779B97F4A7C15ull);
    for (size_t i = 0; i < n; i++)
        perm[i] = i;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)(tuna_rng_next(&r) % (uint64_t)(i + 1));
        size_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

/* Row of global position p with shuffling; the dataset's cached permutation is updated when the
 * epoch (or seed) changes. Called with d->perm_mu held. */
static size_t shuffled_row(tuna_dataset *d, uint64_t seed, uint64_t p)
{
    size_t n = d->n;
    uint64_t e = p / n;
    if (!d->perm) {
        d->perm = malloc(n * sizeof *d->perm);
        if (!d->perm) return (size_t)(p % n); /* no memory for it: file order rather than fail */
        epoch_perm(n, seed, e, d->perm);
    } else if (d->perm_seed != seed || d->perm_epoch != e) {
        epoch_perm(n, seed, e, d->perm);
    }
    d->perm_seed = seed;
    d->perm_epoch = e;
    return d->perm[p % n];
}

void tuna_dataset_batch_indices(const tuna_dataset *cd, int64_t step, int64_t batch, bool shuffle, uint64_t seed,
                                size_t *idx)
{
    size_t n = tuna_dataset_size(cd);
    if (n == 0 || batch <= 0) return;
    uint64_t p0 = (uint64_t)step * (uint64_t)batch;
    if (!shuffle || n == 1) {
        for (int64_t j = 0; j < batch; j++)
            idx[j] = (size_t)((p0 + (uint64_t)j) % n);
        return;
    }
    /* the cache is not part of the dataset's value: the order is a pure function of the arguments */
    tuna_dataset *d = (tuna_dataset *)cd;
    pthread_mutex_lock(&d->perm_mu);
    for (int64_t j = 0; j < batch; j++)
        idx[j] = shuffled_row(d, seed, p0 + (uint64_t)j);
    pthread_mutex_unlock(&d->perm_mu);
}

void tuna_train_batch_free(struct tuna_train_batch *b)
{
    if (!b) return;
    free(b->ids);
    free(b->labels);
    free(b->attn);
    free(b->len);
    memset(b, 0, sizeof *b);
}

tuna_status tuna_dataset_make_batch(const tuna_dataset *d, const size_t *idx, int64_t B, struct tuna_train_batch *out)
{
    memset(out, 0, sizeof *out);
    if (B <= 0) return tuna_fail(TUNA_E_INVALID, "batch size must be positive (got %lld)", (long long)B);
    size_t n = tuna_dataset_size(d);
    int64_t T = 0;
    for (int64_t b = 0; b < B; b++) {
        if (idx[b] >= n)
            return tuna_fail(TUNA_E_RANGE, "batch row %lld asks for example %zu of a dataset of %zu", (long long)b,
                             idx[b], n);
        int64_t len = tuna_dataset_at(d, idx[b])->n;
        if (len > T) T = len;
    }
    size_t cells = (size_t)B * (size_t)(T ? T : 1);
    out->B = B;
    out->T = T;
    out->ids = malloc(cells * sizeof *out->ids);
    out->labels = malloc(cells * sizeof *out->labels);
    out->attn = malloc(cells * sizeof *out->attn);
    out->len = malloc((size_t)B * sizeof *out->len);
    if (!out->ids || !out->labels || !out->attn || !out->len) {
        tuna_train_batch_free(out);
        return tuna_fail_oom("training batch", cells * 12);
    }
    int32_t pad = tuna_dataset_pad_id(d);
    for (int64_t b = 0; b < B; b++) {
        const struct tuna_train_example *e = tuna_dataset_at(d, idx[b]);
        int32_t *ids = out->ids + b * T, *lab = out->labels + b * T, *att = out->attn + b * T;
        memcpy(ids, e->ids, (size_t)e->n * sizeof *ids);
        memcpy(lab, e->labels, (size_t)e->n * sizeof *lab);
        for (int64_t t = 0; t < e->n; t++)
            att[t] = 1;
        for (int64_t t = e->n; t < T; t++) {
            ids[t] = pad;
            lab[t] = TUNA_LABEL_IGNORE;
            att[t] = 0;
        }
        out->len[b] = e->n;
        for (int64_t t = 1; t < T; t++)
            out->n_targets += lab[t] != TUNA_LABEL_IGNORE;
    }
    return TUNA_OK;
}
