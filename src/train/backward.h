/* backward.h — the backward of every op of the forward pass (src/backend/backend.h), one function
 * per op, named after the forward op with _backward, plain pointers with the shapes beside them
 * (llm.c style), float32 on the host. Defined in src/backend/cpu/train_backward.c; the training
 * op table (src/backend/train_ops.h) wraps them for the CPU and has CUDA twins.
 *
 * Conventions: every gradient output is ACCUMULATED (+=) into, so branches that meet (the
 * residual stream, q/k/v reading one normed input) sum without temporaries; the caller zeroes
 * buffers first. Frozen weights get no gradient: only inputs (and LoRA A/B) do.
 *
 * Attention works on a training layout instead of the paged cache: the tokens of each sequence
 * are consecutive rows with positions 0, 1, ..., so token t attends to rows t - pos[t] .. t
 * (and to the last `window` of them with a sliding window). That is how the trainer lays out a
 * batch; the finite-difference test runs the forward op on the same rows through a block table
 * of size-1 blocks.
 */
#ifndef TUNA_TRAIN_BACKWARD_H
#define TUNA_TRAIN_BACKWARD_H

#include <stdint.h>

#include "backend/backend.h"

/* y[T,C] = x / rms(x) * w  →  dx[T,C] += dL/dx given dy[T,C] (x is the forward input). */
void tuna_rmsnorm_backward(float *dx, const float *dy, const float *x, const float *w, int64_t T, int64_t C, float eps);

/* The forward rotates (x1, x2) by the angle pos*inv_freq scaled by attn_factor; the backward
 * applies the transposed rotation to d[T, H, D] in place. */
void tuna_rope_backward(float *d, const int64_t *pos, int64_t T, int64_t H, int64_t D, int64_t rot_dim,
                        const float *inv_freq, float attn_factor);

/* out[T, H*D] = softmax(q k^T * scale, causal) v over the training layout above.
 * dq[T, H*D], dk[T, Hkv*D], dv[T, Hkv*D] += gradients given dout[T, H*D]; q, k, v as the
 * forward saw them (after norm and RoPE). window 0 = no sliding window. Every sequence must
 * start with position 0 (that is how sequences are told apart). */
void tuna_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                             const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                             float scale, int64_t window);

/* The forward of the above over the same layout (the training op table's attention_forward on
 * the CPU): softmax and the weighted sum of v in double. lse (may be NULL): [T, H], the natural
 * log of each row's softmax denominator, log sum_j exp(scale q.k_j). Every sequence starts at
 * position 0. */
void tuna_attention_forward_train(float *out, float *lse, const float *q, const float *k, const float *v, const int64_t *pos,
                                  int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale, int64_t window);

/* Threads for the backward ops that run several (attention: one task per sequence and kv
 * head); <= 0 = all online CPUs. */
void tuna_backward_set_threads(int n);

/* out[n] = act(gate[n]) * up[n]  →  dgate[n], dup[n] += gradients given dout[n]. */
void tuna_glu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t n,
                       int act);

/* y[T,N] = x[T,K] W^T (+ bias) with W frozen: dx[T,K] += dy[T,N] W[N,K]. W in any stored dtype
 * the forward takes (F32, BF16, F16, NF4/FP4 dequantized on the fly), converted in row tiles. */
void tuna_matmul_backward(float *dx, const float *dy, const struct tuna_weight *w, int64_t T);

/* y[T,N] += scale * (x A^T) B^T for one adapter on every row:
 * dx[T,K] += scale * (dy B) A, dA[R,K] += scale * (dy B)^T x, dB[N,R] += scale * dy^T (x A^T).
 * dx may be NULL (no input gradient wanted). */
void tuna_lora_backward(float *dx, float *dA, float *dB, const float *dy, const float *x, const struct tuna_lora *lora,
                        int64_t N, int64_t K, int64_t T);

/* Mean cross-entropy of logits[T,V] against target[T] (-100 = ignored) with the mean taken
 * over `denom` targets (the whole step's count, so micro-batches add up): returns the SUM of
 * -log softmax(logits)[target] over this call's rows (divide by denom for the mean) and sets
 * dlogits[T,V] = (softmax - onehot) / denom (0 on ignored rows). dlogits may equal logits. */
double tuna_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *target, int64_t T, int64_t V,
                                   double denom);

#endif
