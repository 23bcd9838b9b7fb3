/* optim.c — AdamW, schedules and clipping (optim.h); the AdamW and norm loops are the CPU
 * training kernels (backend/cpu/train_ops.c), shared with the CPU op table. */
#include <math.h>
#include <string.h>

#include "backend/cpu/train_cpu.h"
#include "core/status.h"
#include "train/optim.h"

void tuna_optim_opts_default(struct tuna_optim_opts *o)
{
    memset(o, 0, sizeof *o);
    o->lr = 2e-4;
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    o->weight_decay = 0.0;
    o->schedule = TUNA_LR_LINEAR;
    o->max_grad_norm = 1.0;
}

static const char *const sched_names[] = {"constant", "linear", "cosine"};

tuna_status tuna_lr_schedule_parse(const char *s, enum tuna_lr_schedule *out)
{
    for (int i = 0; i < 3; i++)
        if (strcmp(s, sched_names[i]) == 0) {
            *out = (enum tuna_lr_schedule)i;
            return TUNA_OK;
        }
    return tuna_fail(TUNA_E_INVALID, "unknown learning-rate schedule '%s'; use constant, linear or cosine", s);
}

const char *tuna_lr_schedule_name(enum tuna_lr_schedule s)
{
    return (unsigned)s < 3 ? sched_names[s] : "?";
}

double tuna_lr_at(const struct tuna_optim_opts *o, int64_t step)
{
    const int64_t w = o->warmup_steps > 0 ? o->warmup_steps : 0;
    if (step < w) return o->lr * (double)step / (double)w;
    if (o->schedule == TUNA_LR_CONSTANT) return o->lr;
    int64_t span = o->total_steps - w;
    if (span <= 0) return o->schedule == TUNA_LR_LINEAR ? 0.0 : o->lr;
    double progress = (double)(step - w) / (double)span;
    if (o->schedule == TUNA_LR_LINEAR) return o->lr * fmax(0.0, 1.0 - progress);
    return o->lr * fmax(0.0, 0.5 * (1.0 + cos(M_PI * progress))); /* num_cycles 0.5 */
}

void tuna_adamw_update(float *p, const float *g, float *m, float *v, int64_t n, double lr,
                       const struct tuna_optim_opts *o, int64_t t)
{
    /* gscale 1: g is only read */
    tuna_cpu_train_adamw(p, (float *)g, m, v, n, lr, o->beta1, o->beta2, o->eps, o->weight_decay, t, 1.0);
}

double tuna_grad_sq_sum(const float *g, int64_t n)
{
    return tuna_cpu_train_sq_sum(g, n);
}

double tuna_grad_clip(float *g, int64_t n, double norm, double max_norm)
{
    if (max_norm <= 0) return 1.0;
    double coef = max_norm / (norm + 1e-6);
    if (coef >= 1.0) return 1.0;
    for (int64_t i = 0; i < n; i++)
        g[i] = (float)(g[i] * coef);
    return coef;
}
