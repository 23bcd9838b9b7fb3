/* trainer.h — LoRA / QLoRA fine-tuning on the model's backend (the CPU, or CUDA with everything
 * in device memory): trainable A/B on the model's linears, one optimizer step over one or more
 * micro-batches (forward keeping activations → loss → backward in reverse layer order →
 * gradients of LoRA A/B only → clipping → AdamW), adapter export and checkpoint state. Every
 * numeric step goes through the backend's op tables (backend/backend.h, backend/train_ops.h).
 *
 * The base stays frozen in its stored dtype (bf16, f16, f32, or NF4 dequantized on the fly in
 * forward and backward): it gets no gradient and no optimizer state. Every trainable float
 * (A, B of every module), its gradient and both Adam moments live in four flat arrays.
 *
 * What it reproduces (docs/TRAINING.md): PEFT's LoRA (y = W x + scale·B(A x), scale = alpha/r
 * or alpha/sqrt(r)), transformers' causal-LM loss (mean cross-entropy over every non-ignored
 * shifted label of the step: with several micro-batches the mean is over all of them, as the
 * HF Trainer's num_items_in_batch), the gradient norm before clipping, torch's AdamW.
 */
#ifndef TUNA_TRAIN_TRAINER_H
#define TUNA_TRAIN_TRAINER_H

#include <stdbool.h>
#include <stdint.h>

#include "lora/lora.h"
#include "model/model.h"
#include "train/dataset.h"
#include "train/optim.h"
#include "tuna.h"

/* The seven projections, in PEFT's usual order. */
enum {
    TUNA_PROJ_Q = 0,
    TUNA_PROJ_K,
    TUNA_PROJ_V,
    TUNA_PROJ_O,
    TUNA_PROJ_GATE,
    TUNA_PROJ_UP,
    TUNA_PROJ_DOWN,
    TUNA_PROJ_COUNT
};
/* "q_proj", ..., "down_proj" */
const char *tuna_proj_name(int proj);

struct tuna_lora_train_opts {
    int64_t r;      /* 16 */
    double alpha;   /* 16 */
    double dropout; /* LoRA dropout on the adapter's input, [0, 1) */
    bool use_rslora;
    const char *const *targets; /* projection names ("q_proj", ...); NULL = all seven */
    int n_targets;
    uint64_t seed;               /* A's init (kaiming-uniform bound 1/sqrt(in), as PEFT); B = 0;
                                    dropout masks */
    bool gradient_checkpointing; /* keep only each layer's input; recompute the rest in backward */
    bool offload; /* the memory mode (--offload; implies checkpointing): the layer inputs in
                     page-locked host memory, the AdamW moments and update on the host, the MLP
                     in chunks of rows, a small head chunk (docs/TRAINING.md) */
    int64_t mlp_chunk_rows; /* offload: rows per MLP chunk; 0 = as many as fit 4 Mi floats per
                               [rows, intermediate] buffer (tests set a few rows) */
};
void tuna_lora_train_opts_default(struct tuna_lora_train_opts *o);

typedef struct tuna_trainer tuna_trainer;

/* Attaches trainable adapters to m (which must have none attached). With init (borrowed; its
 * values are copied) the modules, ranks and alphas are the adapter's and lo's r/alpha/targets
 * are ignored; otherwise fresh adapters from lo. *out taken (tuna_trainer_free detaches). */
tuna_status tuna_trainer_new(struct tuna_model *m, const struct tuna_lora_train_opts *lo,
                             const struct tuna_optim_opts *oo, const struct tuna_lora_adapter *init,
                             tuna_trainer **out);
void tuna_trainer_free(tuna_trainer *t); /* accepts NULL */

struct tuna_step_stats {
    int64_t step;     /* optimizer steps done after this one (1 for the first) */
    double loss;      /* mean CE over the step's targets */
    double grad_norm; /* global L2 norm of the LoRA gradients, before clipping */
    double lr;        /* learning rate used */
    int64_t tokens;   /* tokens processed (not padding) */
    int64_t targets;  /* labels counted by the loss */
    double seconds;   /* wall time of the step */
};

/* One optimizer step over n micro-batches (right-padded, labels not shifted). A NaN or inf
 * loss or gradient stops with TUNA_E_RANGE naming the step, and the parameters are left
 * untouched. A step whose batches hold no target is refused (TUNA_E_INVALID). */
tuna_status tuna_trainer_step(tuna_trainer *t, const struct tuna_train_batch *mb, int n, struct tuna_step_stats *st);

/* The loss and the gradients (tuna_trainer_grads) of the next step over n micro-batches, with
 * that step's dropout masks, changing nothing else: tuna_trainer_step is this, then the norm,
 * clipping and AdamW. tokens / targets may be NULL. */
tuna_status tuna_trainer_loss_grad(tuna_trainer *t, const struct tuna_train_batch *mb, int n, double *loss,
                                   int64_t *tokens, int64_t *targets);

/* The loss of a batch without training (evaluation): mean CE over its targets. */
tuna_status tuna_trainer_eval(tuna_trainer *t, const struct tuna_train_batch *b, double *loss);

int64_t tuna_trainer_step_count(const tuna_trainer *t);
int64_t tuna_trainer_param_count(const tuna_trainer *t);
/* The gradients of the last step and the parameters: flat, in module order, A then B per
 * module (tuna_trainer_param_count floats), host memory (a copy read back from a GPU; NULL if
 * that fails). Parameters may be changed in place (tests): once tuna_trainer_params was called
 * on a GPU trainer, the host copy is the truth, uploaded before each step and refreshed after. */
const float *tuna_trainer_grads(const tuna_trainer *t);
float *tuna_trainer_params(tuna_trainer *t);

/* What the trainer holds, in bytes, by category, for the batch size it last reserved (after a
 * step): backend memory (device memory on CUDA) and host memory of the offload mode. The model's
 * weights and the backend's own scratch (cuBLAS workspace, dequantized weight, 16-bit copies of
 * GEMM inputs) are not counted. */
struct tuna_train_memory {
    int64_t tokens;          /* the batch size (tokens) the buffers are planned for */
    size_t lora_state;       /* A/B parameters, gradients and (unless offloaded) both AdamW moments */
    size_t layer_acts;       /* activations kept for backward: every layer's, or the recomputed one's */
    size_t checkpoints;      /* saved layer inputs in backend memory (gradient checkpointing) */
    size_t layer_grads;      /* one layer's backward buffers */
    size_t residual;         /* residual stream, selected rows and their gradients, losses, lse */
    size_t attention;        /* attention scratch (materialized scores; 0 with flash attention) */
    size_t logits;           /* one chunk of the head's logits (and their gradient, in place) */
    size_t lora_work;        /* LoRA and dropout scratch */
    size_t total;            /* the sum of the above (backend memory) */
    size_t host_checkpoints; /* offload: layer inputs in page-locked host memory */
    size_t host_optimizer;   /* offload: AdamW moments (and host copies of params, grads) */
    size_t host_embedding;   /* offload: the embedding table moved from the GPU to page-locked host memory */
    int64_t mlp_rows;        /* rows per MLP chunk (the batch's tokens unless offloading) */
    int64_t head_rows;       /* rows per logits chunk */
};
void tuna_trainer_memory(const tuna_trainer *t, struct tuna_train_memory *out);

/* Writes the adapters as a PEFT folder (tuna_export_peft). base_model may be NULL. */
tuna_status tuna_trainer_export(const tuna_trainer *t, const char *dir, const char *base_model, bool replace);

/* --load-in-4bit (qlora.c): quantizes the seven projections of every layer of a 16-bit base in
 * memory to NF4 + double quantization, block size 64, float32 quant_state dtype (what the
 * fixtures' QLoRA run uses); weights already 4-bit are kept. Call before tuna_trainer_new. */
tuna_status tuna_train_quantize_base(struct tuna_model *m);

/* Optimizer state (moments and step count) as dir/optimizer.bin; load checks that the module
 * list and sizes agree with this trainer. */
tuna_status tuna_trainer_save_optimizer(const tuna_trainer *t, const char *dir);
tuna_status tuna_trainer_load_optimizer(tuna_trainer *t, const char *dir);

#endif
