/* dataset_internal.h — the dataset's fields, shared by dataset.c (loading) and batching.c (the
 * cached shuffle of the current epoch). Not for other files: use dataset.h. */
#ifndef TUNA_TRAIN_DATASET_INTERNAL_H
#define TUNA_TRAIN_DATASET_INTERNAL_H

#include <pthread.h>

#include "train/dataset.h"

struct tuna_dataset {
    struct tuna_train_example *rows; /* [n] */
    size_t n, cap;
    struct tuna_dataset_stats stats;
    int32_t pad_id;
    /* the permutation of one epoch, kept so that a step costs O(batch), not O(n): guarded by
     * perm_mu because batch_indices takes a const dataset that threads may share */
    pthread_mutex_t perm_mu;
    size_t *perm;       /* [n] or NULL */
    uint64_t perm_seed; /* which (seed, epoch) perm holds, when perm is not NULL */
    uint64_t perm_epoch;
};

#endif
