/* train_cpu.h — the CPU training kernels that other files reuse outside the op table
 * (src/train/optim.c's AdamW and norm, the fixture tests). The table itself is
 * tuna_cpu_train_ops() in backend/train_ops.h; the backward ops are declared in
 * src/train/backward.h and defined in train_backward.c. */
#ifndef TUNA_BACKEND_CPU_TRAIN_CPU_H
#define TUNA_BACKEND_CPU_TRAIN_CPU_H

#include <stdint.h>

/* out[n] = dropout(in) with the masks of key (backend/train_ops.h); out may equal in. */
void tuna_cpu_train_dropout(float *out, const float *in, int64_t n, double p, uint64_t key);
/* sum of g^2 in double */
double tuna_cpu_train_sq_sum(const float *g, int64_t n);
/* g *= gscale (when not 1), then AdamW as torch (see train_ops.h's adamw). */
void tuna_cpu_train_adamw(float *p, float *g, float *m, float *v, int64_t n, double lr, double beta1, double beta2,
                          double eps, double weight_decay, int64_t t, double gscale);

#endif
