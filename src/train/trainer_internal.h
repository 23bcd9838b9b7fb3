/* trainer_internal.h — what trainer.c and train_forward.c share: the trainer's state and the
 * module table. Not part of the module's API. Every float pointer in struct tuna_trainer is
 * backend memory (device memory on CUDA) unless marked host. */
#ifndef TUNA_TRAIN_TRAINER_INTERNAL_H
#define TUNA_TRAIN_TRAINER_INTERNAL_H

#include "backend/train_ops.h"
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
    const struct tuna_train_ops *tops; /* the backend's training table (backend/train_ops.h) */
    bool host;                         /* backend memory is host memory (CPU): no mirrors */
    bool fast;                         /* 16-bit GPU compute: attention GEMMs may use TF32 */
    struct tuna_optim_opts oo;
    struct tuna_lora_train_opts lo;
    bool use_rslora;
    int64_t cfg_r;
    double cfg_alpha;
    struct tmod *mods;
    int n_mods;
    struct tmod **by_lin; /* [L * 7]: the module on each linear, or NULL */
    int64_t P;            /* trainable floats */
    int64_t max_r;        /* largest rank (LoRA work buffers) */
    /* backend memory: one allocation for params, grads, both moments [P] each, then the
       norm reduction's work; host mirrors (h_*) only when the backend is not host memory */
    void *state_mem;
    float *params, *grads, *m1, *m2;
    void *norm_work;
    float *h_params, *h_grads;
    bool h_params_dirty; /* a caller holds h_params (tuna_trainer_params): it is the truth, uploaded
                            before each forward and refreshed after each update */
    int64_t step;        /* optimizer steps done */

    bool ckpt;
    bool offload;       /* lo.offload: x_saved in host memory, AdamW on the host, MLP in row chunks */
    float *h_m1, *h_m2; /* offload: the AdamW moments in host memory (then m1 = h_m1, m2 = h_m2) */
    float *x_saved_host; /* offload: [L, T, C] layer inputs in page-locked host memory (host_alloc) */
    size_t x_saved_host_bytes;
    void *embed_host;   /* offload on a GPU, untied embedding: the table in page-locked host memory
                           (host_alloc; the model reads it there until tuna_trainer_free) */
    size_t embed_host_bytes;
    int64_t mlp_rows;   /* rows per MLP chunk (cap_T unless offloading) */
    size_t mem_cat[8];  /* bytes of t->mem by category (train_forward.c's layout) */
    uint64_t drop_base; /* seed, step and micro-batch mixed: this micro-batch's masks;
                           0 = no dropout (evaluation) */
    /* activations and backward buffers in backend memory for cap_T tokens (train_forward.c) */
    int64_t cap_T;
    void *mem;                        /* one allocation for everything below */
    struct tuna_fwd_layer_acts *acts; /* [L] ([1] with checkpointing: the layer being worked on); host */
    float *x_saved;                   /* [L, T, C] layer inputs (checkpointing) */
    float *lse;                       /* [nact, T, H] attention log-sum-exps of each kept layer */
    float *x, *tmp;                   /* [T, C] */
    float *sel_in, *sel_n;            /* [T, C] rows with a target: before / after the final norm */
    float *dsel_n, *dsel;             /* [T, C] their gradients */
    float *drop, *drop_g;             /* [T, max(C, I)] each, with dropout only: a dropped input, its gradient */
    /* with offload the MLP runs in chunks of mlp_rows rows: acts[0].gate/up/act and g.dact/dup
       hold one chunk ([mlp_rows, I]) and g.dgate is acts[0].act (dead once down's backward ran) */
    float *lwork;                     /* [2 T max_r] LoRA scratch */
    float *lh; /* [nact, 7, T, max_r]: each adapter's x A^T from the forward, for lora_backward_h (NULL
                  where the backend has none) */
    float *logits;                    /* [chunk, V] one chunk of the head's rows */
    int64_t chunk;                    /* rows per head chunk */
    double *loss_rows;                /* [T] per-row cross-entropy */
    struct tuna_train_grad_bufs {
        float *dx, *dxn, *datt, *dq, *dk, *dv, *dact, *dgate, *dup, *pre, *dpre;
    } g;            /* backward buffers */
    /* the 16-bit operand path (backend/train_ops.h; CUDA in the bf16/f16 mode): every GEMM input
       rounded to hdt by the op that produces it. 16-bit arrays, in t->mem:
       xa16 [T, max(C, H*D)]: the forward's q/k/v, o and gate/up operands in turn;
       act16 [mlp_rows, I]: down's operand, then (backward) dgate's; dup16 [mlp_rows, I];
       dx16 [T, C]: the residual gradient (down's and o's dy); dq16 [T, H*D], dk16, dv16 [T, Hkv*D] */
    bool h16;
    /* kcat (16-bit path, no dropout, the backend has matmul16_lora): each LoRA forward is folded
       into its frozen GEMM by concatenating the reduction; the forward's 16-bit operands (xa16,
       act16) then have kpad (max_r rounded up to 8) spare columns per row, where the adapter's
       x A^T goes; likewise the backward's dy operands (dx16, dup16, dq16, dk16, dv16, act16 as
       dgate16), where u = dy B goes. TUNA_TRAIN_KCAT=0 keeps the separate LoRA GEMMs. */
    bool kcat;
    bool kcat_bwd; /* the backward's too (dx += s u A inside; TUNA_TRAIN_KCAT=fwd: not) */
    int64_t kpad;
    /* qkv (kcat_bwd; TUNA_TRAIN_QKV=0: not): dq16, dk16, dv16 are blocks of one buffer, rows
       ld_qkv = H*D + 2*Hkv*D + 3*kpad elements apart, and the backward of q, k, v with their
       adapters is ONE GEMM over the stacked weights (matmul_backward16_lora_n) */
    bool qkv;
    int64_t ld_qkv;
    bool add_pending; /* h16 without checkpoints: x += tmp (the last layer's down output) not done yet */
    enum tuna_dtype hdt;
    void *xa16, *act16, *dup16, *dx16, *dq16, *dk16, *dv16;
    void *attn_mem; /* attention scratch (attn_floats), grown per batch */
    int64_t attn_floats;
    int32_t *sel_rows; /* host [T]: the rows of the selected logits */
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

/* Where the forward leaves module (layer l, proj)'s x A^T for rows from row0 on (rank r), or NULL. */
static inline float *tuna_train_lora_h(const tuna_trainer *t, int64_t l, int proj, int64_t row0, int64_t r)
{
    if (!t->lh) return NULL;
    const int64_t k = t->ckpt ? 0 : l;
    return t->lh + (k * TUNA_PROJ_COUNT + proj) * t->cap_T * t->max_r + row0 * r;
}

/* The key of module `mod`'s dropout masks in the current micro-batch (0 = no dropout). */
uint64_t tuna_train_drop_key(const tuna_trainer *t, int mod);

/* y[T,N] = x W^T + b + s·B A dropout(x) for linear `proj` of layer l (the masks of this
 * micro-batch); backend memory. row0: the first row of x within the micro-batch (the masks of
 * a chunk of rows are those rows' masks). */
void tuna_train_linear_forward(tuna_trainer *t, int64_t l, int proj, float *y, const float *x, int64_t T);
/* x16: x rounded to t->hdt (the 16-bit path's GEMM operand; rows K + t->kpad elements apart), or
 * NULL for the float32 ops */
void tuna_train_linear_forward_rows(tuna_trainer *t, int64_t l, int proj, float *y, const float *x, void *x16,
                                    int64_t T, int64_t row0);
/* The dropout key of elements starting at element `first` of a call: key + golden * first, so a
 * chunk of rows gets the masks that the whole call gives those rows. */
static inline uint64_t tuna_train_key_at(uint64_t key, int64_t first)
{
    return key ? key + 0x9E3779B97F4A7C15ULL * (uint64_t)first : 0;
}
/* Forward of the MLP block on rows [r0, r0 + n) into acts[0]'s chunk buffers (offload mode):
 * gate, up, act of those rows from A->xn_mlp. */
void tuna_train_mlp_chunk_forward(tuna_trainer *t, int64_t l, const struct tuna_fwd_layer_acts *A, int64_t r0,
                                  int64_t n);

/* Makes the buffers above hold a batch of T tokens whose longest sequence is max_len. */
tuna_status tuna_train_reserve(tuna_trainer *t, int64_t T, int64_t max_len);

/* The trainer's own forward (train_forward.c): the op list of src/model/forward.c over the
 * training layout through the backend's tables. Runs the micro-batch b (tokens, positions as
 * build_batch makes them), keeps what backward needs in t->acts / t->x_saved, and leaves the
 * rows with want_logits, gathered, in t->sel_in (before the final norm) and t->sel_n (after);
 * *n_sel = their count, t->sel_rows their rows. Call tuna_train_reserve first. */
tuna_status tuna_train_forward(tuna_trainer *t, const struct tuna_batch *b, int64_t *n_sel);
/* Recomputes layer l's activations from its saved input (checkpointing) into t->acts[0]. */
void tuna_train_recompute_layer(tuna_trainer *t, int64_t l, const struct tuna_batch *b);

#endif
