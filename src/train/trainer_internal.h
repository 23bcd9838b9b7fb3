/* trainer_internal.h — what trainer.c and train_forward.c share: the trainer's state and the
 * module table. Not part of the module's API. */
#ifndef TUNA_TRAIN_TRAINER_INTERNAL_H
#define TUNA_TRAIN_TRAINER_INTERNAL_H

#include "train/trainer.h"

struct tmod {
    char name[96]; /* "model.layers.3.mlp.up_proj" */
    int64_t layer;
    int proj;
    int64_t r, K, N;
    double alpha;
    struct tuna_lora lora; /* A, B point into t->params */
    int64_t offA, offB;    /* offsets into the flat arrays */
};

struct tuna_trainer {
    struct tuna_model *m;
    struct tuna_optim_opts oo;
    struct tuna_lora_train_opts lo;
    bool use_rslora;
    int64_t cfg_r;
    double cfg_alpha;
    struct tmod *mods;
    int n_mods;
    struct tmod **by_lin; /* [L * 7]: the module on each linear, or NULL */
    int64_t P;            /* trainable floats */
    float *params, *grads, *m1, *m2;
    int64_t step;                /* optimizer steps done */
    struct tuna_fwd_trace trace; /* the model forward's activations (default path) */

    /* own forward (train_forward.c): with LoRA dropout or gradient checkpointing */
    bool own_fwd, ckpt;
    uint64_t drop_base;               /* seed, step and micro-batch mixed: this micro-batch's masks;
                                         0 = no dropout (evaluation) */
    int64_t cap_T;                    /* tokens the buffers below hold */
    float *mem;                       /* one allocation for everything below */
    struct tuna_fwd_layer_acts *acts; /* [L] ([1] with checkpointing: the layer being worked on) */
    float *x_saved;                   /* [L, T, C] layer inputs (checkpointing) */
    float *x, *tmp, *x_final, *sel;   /* [T, C] */
    float *drop, *drop_g;             /* [T, max(C, I)] each: a dropped LoRA input, its gradient */
    int32_t *rows;                    /* [T] 0..T-1: size-1 KV blocks over the contiguous k, v */
    const int32_t **bt;               /* [T] each token's block table */
};

static inline struct tuna_linear *proj_lin(struct tuna_layer *L, int p)
{
    switch (p) {
    case TUNA_PROJ_Q: return &L->q;
    case TUNA_PROJ_K: return &L->k;
    case TUNA_PROJ_V: return &L->v;
    case TUNA_PROJ_O: return &L->o;
    case TUNA_PROJ_GATE: return &L->gate;
    case TUNA_PROJ_UP: return &L->up;
    default: return &L->down;
    }
}

/* The key of module `mod`'s dropout masks in the current micro-batch (0 = no dropout). */
uint64_t tuna_train_drop_key(const tuna_trainer *t, int mod);
/* out[T,K] = dropout(in) with the masks of `key` (in and out may be the same). */
void tuna_train_dropout(float *out, const float *in, int64_t T, int64_t K, double p, uint64_t key);

/* y[T,N] = x W^T + b + s·B A dropout(x) for linear `proj` of layer l (the masks of this
 * micro-batch). */
void tuna_train_linear_forward(tuna_trainer *t, int64_t l, int proj, float *y, const float *x, int64_t T);

/* The trainer's own forward (train_forward.c), used with LoRA dropout or gradient
 * checkpointing: the same op list as src/model/forward.c over the training layout. Runs the
 * micro-batch b (tokens, positions as build_batch makes them), writes the logits of the rows
 * with want_logits and, when train, keeps what backward needs in t->acts / t->saved. */
tuna_status tuna_train_forward(tuna_trainer *t, const struct tuna_batch *b, float *logits, bool train);
/* Recomputes layer l's activations from its saved input (checkpointing) into t->acts[0]. */
void tuna_train_recompute_layer(tuna_trainer *t, int64_t l, const struct tuna_batch *b);

#endif
