/* optim.h — AdamW (PyTorch's decoupled form), learning-rate schedules (Hugging Face's
 * get_scheduler: constant, linear and cosine, each after a linear warmup) and global-norm
 * gradient clipping (torch.nn.utils.clip_grad_norm_). Flat float32 arrays; the trainer keeps
 * every trainable parameter, its gradient and both moments in one group each.
 */
#ifndef TUNA_TRAIN_OPTIM_H
#define TUNA_TRAIN_OPTIM_H

#include <stdint.h>

#include "tuna.h"

enum tuna_lr_schedule { TUNA_LR_CONSTANT = 0, TUNA_LR_LINEAR, TUNA_LR_COSINE };

struct tuna_optim_opts {
    double lr;           /* peak learning rate (2e-4 by default) */
    double beta1, beta2; /* 0.9, 0.999 */
    double eps;          /* 1e-8 */
    double weight_decay; /* decoupled: p *= 1 - lr * wd before the Adam update */
    enum tuna_lr_schedule schedule;
    int64_t warmup_steps; /* lr rises linearly from 0 over these steps */
    int64_t total_steps;  /* for linear / cosine decay */
    double max_grad_norm; /* <= 0: no clipping */
};

void tuna_optim_opts_default(struct tuna_optim_opts *o);

/* "constant" | "linear" | "cosine" → *out; TUNA_E_INVALID naming the choices otherwise. */
tuna_status tuna_lr_schedule_parse(const char *s, enum tuna_lr_schedule *out);
const char *tuna_lr_schedule_name(enum tuna_lr_schedule s);

/* The learning rate of optimizer step `step` (from 0), as transformers' LambdaLR gives it. */
double tuna_lr_at(const struct tuna_optim_opts *o, int64_t step);

/* One AdamW update of p[n] with gradient g[n] and moments m[n], v[n]; t = 1 for the first step.
 * Same operation order as torch.optim.AdamW (float32 state). */
void tuna_adamw_update(float *p, const float *g, float *m, float *v, int64_t n, double lr,
                       const struct tuna_optim_opts *o, int64_t t);

/* sum of g^2 in double (the squared norm; add over groups, then sqrt). */
double tuna_grad_sq_sum(const float *g, int64_t n);

/* torch's clip_grad_norm_: with coef = max_norm / (norm + 1e-6) clamped to 1, g *= coef.
 * Returns the coefficient used. */
double tuna_grad_clip(float *g, int64_t n, double norm, double max_norm);

#endif
