/* checkpoint.h — training checkpoints: <out>/checkpoint-<step>/ holds the adapter (PEFT folder
 * files), optimizer.bin (Adam moments and step count) and trainer_state.json (the step, the data
 * order settings, the seed and the loss of every step so far). The folder is written under a
 * temporary name and renamed when complete, so a crash never leaves half a checkpoint.
 *
 * Resuming: the data position is a function of the step (batch order is fixed by the step, the
 * batch size and the seed; dataset.h), and there is no other random state while training
 * (dropout 0), so adapter + moments + step continue exactly where the run stopped.
 */
#ifndef TUNA_TRAIN_CHECKPOINT_H
#define TUNA_TRAIN_CHECKPOINT_H

#include <stdbool.h>
#include <stdint.h>

#include "train/trainer.h"
#include "tuna.h"

struct tuna_train_state {
    int64_t step; /* optimizer steps done */
    int64_t max_steps;
    int64_t batch_size, grad_accum;
    bool shuffle;
    uint64_t seed;
    double *losses; /* [n_losses] loss of steps 1..n_losses (owned) */
    int64_t n_losses;
};
void tuna_train_state_free(struct tuna_train_state *s);

/* Writes <out_dir>/checkpoint-<step> (step = tuna_trainer_step_count); replaces one of that
 * name. path (may be NULL) receives the folder's path. */
tuna_status tuna_checkpoint_save(const tuna_trainer *t, const struct tuna_train_state *s, const char *out_dir,
                                 const char *base_model, char *path, size_t cap);

/* Reads <dir>/trainer_state.json into *s (losses malloc'd). */
tuna_status tuna_checkpoint_read_state(const char *dir, struct tuna_train_state *s);

/* The checkpoint-<N> folder with the highest N under out_dir; TUNA_E_NOT_FOUND when none. */
tuna_status tuna_checkpoint_latest(const char *out_dir, char *path, size_t cap);

#endif
