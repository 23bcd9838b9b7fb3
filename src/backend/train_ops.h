/* train_ops.h — the training op table: the backward of every forward op, the LoRA forward,
 * dropout, the fused cross-entropy, the training-layout attention and AdamW, as one struct of
 * function pointers that the CPU backend (src/backend/cpu/train_*.c, the reference) and the CUDA
 * backend (src/backend/cuda/train_*.cu) implement with the same argument order and shapes.
 * Kept apart from backend.h's inference table so the two evolve without colliding; the trainer
 * (src/train) calls only the two tables, so activations, adapters, gradients and Adam moments
 * stay in backend memory.
 *
 * Pointer convention (as backend.h): float tensors and weights are BACKEND memory (host memory
 * for the CPU, device memory for CUDA); small integer metadata (positions, targets, row lists)
 * and inv_freq are HOST arrays that the backend stages itself. `work` arguments are backend
 * memory of the stated size that the caller owns (no hidden allocations on the hot path).
 *
 * Conventions (as src/train/backward.h): every gradient output is ACCUMULATED (+=) into; the
 * caller zeroes it first (op `zero`). Frozen weights get only an input gradient.
 *
 * Training layout: the tokens of each sequence are consecutive rows with positions 0, 1, ...;
 * a row with position 0 starts a new sequence. Token t attends to rows t - pos[t] .. t (the
 * last `window` of them with a sliding window, 0 = none).
 *
 * Shape letters (docs/ARCHITECTURE.md): T tokens, C hidden, H heads, Hkv kv heads, D head dim,
 * N out features, K in features, V vocab, R LoRA rank.
 *
 * Ops do not fail: the trainer checks shapes; a CUDA failure is sticky and comes back from the
 * inference table's sync().
 */
#ifndef TUNA_BACKEND_TRAIN_OPS_H
#define TUNA_BACKEND_TRAIN_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __CUDACC__
#define TUNA_HOST_DEVICE __host__ __device__
#else
#define TUNA_HOST_DEVICE
#endif

/* splitmix64's finalizer: dropout masks are hash(key + golden * element), the same bits on every
 * backend, so a mask is a pure function of (seed, step, micro-batch, module, element). */
static inline TUNA_HOST_DEVICE uint64_t tuna_train_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Dropout keeps element i when mix64(key + 0x9E3779B97F4A7C15 * i) >= thresh, thresh = p * 2^64. */
static inline uint64_t tuna_train_dropout_threshold(double p)
{
    return p <= 0 ? 0 : (uint64_t)(p * 18446744073709551616.0);
}

/* Floats of `work` the attention ops need for sequences of at most max_len tokens and head dim
 * D: CPU none; CUDA none when `fast` and D <= 128 (the flash-attention kernels of
 * train_flash.cu), else at least one kv head's scores and their gradient (2 * max_len^2; more
 * lets the exact float32 path batch more heads per GEMM, every head at once with
 * 2 * Hkv * max_len^2). The environment variable TUNA_TRAIN_FLASH=0 turns the flash kernels off
 * (the batched-GEMM path with TF32 in the bf16 mode; for comparisons). */
int64_t tuna_train_attention_work_min(const struct tuna_backend_ops *ops, int64_t max_len, int64_t D, bool fast);

struct tuna_train_ops {
    const char *name;

    /* p[n] = 0 */
    void (*zero)(tuna_backend *be, float *p, int64_t n);

    /* out[n, C] = x[rows[i], C]; rows: host [n]. */
    void (*gather_rows)(tuna_backend *be, float *out, const float *x, const int32_t *rows, int64_t n, int64_t C);
    /* dx[rows[i], C] += d[i, C]; rows: host [n], distinct. */
    void (*scatter_add_rows)(tuna_backend *be, float *dx, const float *d, const int32_t *rows, int64_t n, int64_t C);

    /* out[n] = in[n] / (1 - p) where kept, 0 where dropped (see tuna_train_dropout_threshold);
     * out may equal in. Element i of the call is element i of the mask. */
    void (*dropout)(tuna_backend *be, float *out, const float *in, int64_t n, double p, uint64_t key);

    /* y[T,N] += scale * (x[T,K] A^T) B^T for one adapter (A [R,K], B [N,R] in backend memory).
     * work: [T, R] floats. fast (here and in lora_backward): the GPU may run the GEMMs on TF32
     * tensor cores (the 16-bit mode; float32 mode passes false and stays exact); the CPU ignores it. */
    void (*lora_forward)(tuna_backend *be, float *y, const float *x, const struct tuna_lora *lora, int64_t T, int64_t N,
                         int64_t K, float *work, bool fast);

    /* Given dy[T,N] of the op above: dx[T,K] += s (dy B) A, dA[R,K] += s (dy B)^T x,
     * dB[N,R] += s dy^T (x A^T). dx may be NULL. work: [2 T R] floats. */
    void (*lora_backward)(tuna_backend *be, float *dx, float *dA, float *dB, const float *dy, const float *x,
                          const struct tuna_lora *lora, int64_t T, int64_t N, int64_t K, float *work, bool fast);

    /* y[T,N] = x[T,K] W^T with W frozen: dx[T,K] += dy[T,N] W[N,K], W in its stored dtype
     * (F32, BF16, F16, NF4/FP4 dequantized in tiles or per GEMM). */
    void (*matmul_backward)(tuna_backend *be, float *dx, const float *dy, const struct tuna_weight *w, int64_t T);

    /* y[T,C] = x / rms(x) * w  →  dx[T,C] += dL/dx given dy[T,C]. */
    void (*rmsnorm_backward)(tuna_backend *be, float *dx, const float *dy, const float *x, const float *w, int64_t T,
                             int64_t C, float eps);

    /* In place on d[T,H,D]: the transposed rotation of the forward's rope (pos: host [T],
     * inv_freq: host [rot_dim/2]). */
    void (*rope_backward)(tuna_backend *be, float *d, const int64_t *pos, int64_t T, int64_t H, int64_t D,
                          int64_t rot_dim, const float *inv_freq, float attn_factor);

    /* Causal attention over the training layout: out[T, H*D] = softmax(q k^T * scale) v with
     * q[T, H*D], k, v [T, Hkv*D] (GQA: head h reads kv head h / (H/Hkv)); pos: host [T].
     * lse: [T, H] floats (may be NULL): row t, head h gets the natural log of the softmax's
     * denominator, log sum_j exp(scale q_t.k_j) — what the backward needs instead of the
     * probabilities. fast: 16-bit tensor cores allowed (the bf16 mode: flash attention with
     * bf16 tiles on CUDA when D <= 128); false = exact float32.
     * work / work_floats: scratch, at least tuna_train_attention_work_min. */
    void (*attention_forward)(tuna_backend *be, float *out, float *lse, const float *q, const float *k,
                              const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                              float scale, int64_t window, bool fast, float *work, int64_t work_floats);

    /* dq[T,H*D], dk[T,Hkv*D], dv[T,Hkv*D] += gradients given dout[T,H*D] and the forward's
     * inputs; out and lse are the forward's outputs for these inputs (the flash backward
     * recomputes the probabilities tile by tile from lse and uses rowsum(dout * out)). A backend
     * may recompute instead of reading them (the CPU does); with fast and D <= 128 CUDA needs
     * both. */
    void (*attention_backward)(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout, const float *out,
                               const float *lse, const float *q, const float *k, const float *v, const int64_t *pos,
                               int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale, int64_t window, bool fast,
                               float *work, int64_t work_floats);

    /* out[n] = act(gate) * up  →  dgate[n], dup[n] += gradients given dout[n]. */
    void (*glu_backward)(tuna_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                         const float *up, int64_t n, int act);

    /* Fused cross-entropy forward + backward on a chunk of rows: loss[t] = lse(logits[t]) -
     * logits[t, target[t]] (0 on ignored rows: target < 0 or >= V), and dlogits[T,V] =
     * (softmax - onehot) / denom (0 rows where ignored). dlogits may equal logits.
     * target: host [T]; loss: backend memory [T] doubles. */
    void (*cross_entropy)(tuna_backend *be, float *dlogits, double *loss, const float *logits, const int32_t *target,
                          int64_t T, int64_t V, double denom);

    /* Sum of g[n]^2 in double; waits for the queued work. work: backend memory of at least
     * TUNA_TRAIN_NORM_WORK bytes. */
    double (*grad_sq_sum)(tuna_backend *be, const float *g, int64_t n, void *work);

    /* g *= gscale (in double, rounded to float, as clip_grad_norm_; skipped when gscale == 1),
     * then one AdamW step in torch's decoupled form and order (t = 1 for the first step). */
    void (*adamw)(tuna_backend *be, float *p, float *g, float *m, float *v, int64_t n, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t t, double gscale);

    /* Host memory for offloaded state (checkpoints of --offload): page-locked on CUDA, so the
     * copies below run at full PCIe speed; plain malloc on the CPU. Not zeroed. */
    tuna_status (*host_alloc)(tuna_backend *be, size_t bytes, void **out);
    void (*host_free)(tuna_backend *be, void *p); /* accepts NULL */
    /* Copies between backend memory and host memory from host_alloc, queued in order with the
     * ops (CUDA: async on the backend's stream; the host side must not be touched until a sync). */
    void (*to_host)(tuna_backend *be, void *dst_host, const void *src, size_t bytes);
    void (*from_host)(tuna_backend *be, void *dst, const void *src_host, size_t bytes);

    /* Sizes the backend's own scratch for the GEMMs to come, exactly (CUDA: a 4-bit weight
     * dequantized, `weight_bytes`, and activations or gradients rounded to 16 bits, `half_bytes`;
     * grown on demand they would double to the next power of two). CPU: nothing. */
    void (*reserve_scratch)(tuna_backend *be, size_t weight_bytes, size_t half_bytes);

    /* ---- The 16-bit operand path (CUDA in the bf16/f16 mode; every pointer below NULL on the
     * CPU, where the trainer keeps the float32 ops above). A "16-bit" array (void *x16) holds
     * values rounded to the compute dtype hdt (TUNA_DTYPE_BF16 or F16) that a GEMM reads as it
     * is: the op that produces a GEMM input writes it beside (or instead of) the float32 tensor,
     * so no conversion pass runs before the GEMM. Rounding is round-to-nearest-even, as the
     * conversions it replaces. */

    /* The dtype the GEMMs of w run in on this backend: BF16 or F16, or F32 when w has no 16-bit
     * path (float32 weights; a 4-bit weight whose compute dtype is float32). */
    enum tuna_dtype (*half_dtype)(tuna_backend *be, const struct tuna_weight *w);

    /* y[T,N] = x16[T,K] W^T + bias (bias may be NULL), overwriting y; W 16-bit or 4-bit
     * (dequantized to its compute dtype first), x16 in half_dtype(w). */
    void (*matmul16)(tuna_backend *be, float *y, const void *x16, const struct tuna_weight *w, const float *bias,
                     int64_t T);

    /* dx[T,K] += dy16[T,N] W when acc, else dx = dy16 W (no zeroing needed first). */
    void (*matmul_backward16)(tuna_backend *be, float *dx, const void *dy16, const struct tuna_weight *w, int64_t T,
                              bool acc);

    /* dst16 = src[n] rounded to hdt, as rows of `cols` elements (n a multiple of cols) stored
     * ld16 apart (ld16 >= cols; ld16 == cols: one flat array). The gaps are left alone. */
    void (*to_half)(tuna_backend *be, void *dst16, const float *src, int64_t n, int64_t cols, int64_t ld16,
                    enum tuna_dtype hdt);

    /* The residual add, its saved copy and the next RMSNorm in one pass over x[T,C]: x += d (d
     * may be NULL), x_copy = x (may be NULL), y = x / rms(x) * w (y may be NULL) and
     * y16 = y rounded to hdt, rows ld16 (>= C) elements apart. */
    void (*add_rmsnorm16)(tuna_backend *be, float *x, const float *d, float *x_copy, float *y, void *y16,
                          int64_t ld16, const float *w, int64_t T, int64_t C, float eps, enum tuna_dtype hdt);

    /* out[n] = act(gate) * up (the inference table's glu; out may be NULL) and out16 = out rounded,
     * as rows of `cols` elements stored ld16 apart (as to_half). */
    void (*glu16)(tuna_backend *be, float *out, void *out16, const float *gate, const float *up, int64_t n,
                  int64_t cols, int64_t ld16, int act, enum tuna_dtype hdt);

    /* rmsnorm_backward (dx += ...), then dx16 = the new dx rounded (rows ld16 >= C apart): the
     * residual stream's gradient and the next GEMM's operand in one pass. */
    void (*rmsnorm_backward16)(tuna_backend *be, float *dx, void *dx16, int64_t ld16, const float *dy, const float *x,
                               const float *w, int64_t T, int64_t C, float eps, enum tuna_dtype hdt);

    /* glu_backward OVERWRITING dgate, dup (no zeroing first), and dgate16, dup16 = them rounded,
     * as rows of `cols` elements stored ld16 apart (as to_half). */
    void (*glu_backward16)(tuna_backend *be, float *dgate, float *dup, void *dgate16, void *dup16, const float *dout,
                           const float *gate, const float *up, int64_t n, int64_t cols, int64_t ld16, int act,
                           enum tuna_dtype hdt);

    /* rope_backward in place on d, then d16 = d rounded (d16 may be NULL), token rows ld16 >= H*D
     * elements apart. */
    void (*rope_backward16)(tuna_backend *be, float *d, void *d16, int64_t ld16, const int64_t *pos, int64_t T,
                            int64_t H, int64_t D, int64_t rot_dim, const float *inv_freq, float attn_factor,
                            enum tuna_dtype hdt);

    /* lora_backward given h[T,R] = x A^T, what lora_forward left in its work for the same x (the
     * trainer keeps it from the forward): one GEMM and one read of x fewer. work: [T R] floats.
     * NULL on the CPU. */
    void (*lora_backward_h)(tuna_backend *be, float *dx, float *dA, float *dB, const float *dy, const float *x,
                            const float *h, const struct tuna_lora *lora, int64_t T, int64_t N, int64_t K, float *work,
                            bool fast);

    /* The LoRA forward folded into the frozen GEMM by concatenating the reduction (CUDA, 16-bit
     * mode): y[T,N] = [x16 | h16] [W | s B]^T + bias = x16 W^T + bias + s (x16 A^T) B^T, where
     * h = x16 A^T (float32, written to h [T, R] for the backward) and h16 = h rounded, written into
     * x16's columns K .. K+R-1: x16's rows are ldx >= K + R elements apart (ldx a multiple of 8).
     * lora may be NULL (then y = x16 W^T + bias with x16's rows ldx apart). A and B are read as
     * they are now (rounded to the compute dtype inside). Returns false when it cannot (weight
     * layout or dtype): nothing was done, the caller runs matmul16 and lora_forward instead.
     * NULL on the CPU. */
    bool (*matmul16_lora)(tuna_backend *be, float *y, void *x16, int64_t ldx, const struct tuna_weight *w,
                          const float *bias, const struct tuna_lora *lora, float *h, int64_t T);

    /* Its backward, the adapter's input gradient folded into the frozen GEMM the same way:
     * u = dy16 B (float32), u16 = u rounded into dy16's columns N .. N+R-1 (dy16's rows lddy >=
     * N + R apart, a multiple of 8), dx (+)= [dy16 | u16] [W ; s A] (acc: accumulate, else
     * overwrite), dA += s u^T x (x float32 [T, K]), dB += s dy16^T h16 (h: the forward's x A^T,
     * float32 [T, R], rounded). lora may be NULL (then only dx (+)= dy16 W; x, h, dA, dB unused).
     * Returns false when it cannot (nothing done: the caller uses the float32 ops). NULL on the CPU. */
    bool (*matmul_backward16_lora)(tuna_backend *be, float *dx, void *dy16, int64_t lddy, const struct tuna_weight *w,
                                   bool acc, const struct tuna_lora *lora, float *dA, float *dB, const float *x,
                                   const float *h, int64_t T);

    /* The same for n (1..3) linears that read one input x (q, k, v), in ONE GEMM with the n
     * weights stacked: block i of dy16's rows, from column off_i = sum_{j<i} (N_j + pad), is
     * [dy_i (N_i columns) | pad spare columns] (pad a multiple of 8, >= every r), and
     * dx = sum_i [dy_i | u_i16] [W_i ; s A_i] OVERWRITES dx; dA_i, dB_i as above (each lora_i
     * may be NULL: that linear has no adapter). Returns false when it cannot (nothing done).
     * NULL on the CPU. */
    bool (*matmul_backward16_lora_n)(tuna_backend *be, float *dx, void *dy16, int64_t lddy, int n,
                                     const struct tuna_weight *const *w, const struct tuna_lora *const *lora,
                                     float *const *dA, float *const *dB, const float *x, const float *const *h,
                                     int64_t T, int64_t pad);
};

#define TUNA_TRAIN_NORM_WORK 8192

/* The training table of a backend (by its inference table): the CPU's or CUDA's; NULL for a
 * backend without one. Defined in src/train/train_ops.c (the module that sees both backends),
 * as is tuna_train_attention_work_min. */
const struct tuna_train_ops *tuna_backend_train_ops(const struct tuna_backend_ops *ops);

/* The CPU and CUDA tables themselves (CUDA only in builds with it). */
const struct tuna_train_ops *tuna_cpu_train_ops(void);
const struct tuna_train_ops *tuna_cuda_train_ops(void);

#ifdef __cplusplus
}
#endif
#endif
