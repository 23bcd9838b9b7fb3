/* backend.h — the op table: every numeric step of the forward pass, as one struct of function
 * pointers that the CPU backend (src/backend/cpu) and, later, a CUDA backend implement with the
 * same names, argument order and shapes (llm.c style: the shape is written beside each argument).
 *
 * Shape letters (docs/ARCHITECTURE.md): T tokens in the step, C hidden, H query heads, Hkv key/value
 * heads, D head dim, N out features, K in features, V vocab.
 *
 * Ownership: every pointer is borrowed for the duration of the call. Ops do not fail: the caller
 * (model/) validates shapes and dtypes when weights are loaded, so an op only asserts.
 */
#ifndef TUNA_BACKEND_H
#define TUNA_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "tuna.h"

/* A weight matrix W[N, K] (row n = output feature n) in its stored dtype. A 4-bit weight is just
 * another dtype: data holds the packed codes and q4 points at its quantization state (absmax,
 * code table, ...) as src/quant defines it; NULL for 16/32-bit dtypes. */
struct tuna_weight {
    enum tuna_dtype dtype; /* F32, F16, BF16 (NF4/FP4 when the quant module provides them) */
    int64_t rows;          /* N */
    int64_t cols;          /* K */
    const void *data;      /* rows*cols elements, row-major; a view into the mapped file */
    const void *q4;        /* quantization state for NF4/FP4, else NULL */
    /* Elements from one row's start to the next (0: cols, rows back to back). Only 16-bit
     * weights on a GPU with the LoRA fold (model/device.c) have ld > cols: their rows sit inside
     * the rows of [W | adapters' B] (docs/LORA.md); the GPU readers of 16-bit weights take it. */
    int64_t ld;
};

/* A weight's row stride in elements. */
static inline int64_t tuna_weight_ld(const struct tuna_weight *w)
{
    return w->ld > 0 ? w->ld : w->cols;
}

/* A LoRA adapter on one linear layer: y += scale * B (A x). Float32, owned by whoever loaded it. */
struct tuna_lora {
    int64_t r;
    const float *A; /* [r, K] */
    const float *B; /* [N, r] */
    float scale;    /* alpha / r (or alpha / sqrt(r) for rsLoRA) */
};

/* One adapter of one linear layer as the lora op reads it: A [r, K] and B [N, r] in backend
 * memory, elements of the set's dtype, B's rows ldb elements apart (0: r, rows back to back; the
 * GPU views point B into the bank's B_all). r = 0: the adapter leaves this linear alone. */
struct tuna_lora_w {
    const void *A;
    const void *B;
    int64_t r;
    float scale; /* alpha / r (or alpha / sqrt(r) for rsLoRA) */
    int64_t ldb;
};

/* The adapters of one linear layer for the lora op. w is an array in BACKEND memory (device
 * memory on a GPU) whose address and contents stay put while the set lives: a captured step reads
 * it in place. dtype: TUNA_DTYPE_F32, BF16 or F16 on both backends (products are accumulated in
 * float32; the CPU's A x in double). max_r bounds every w[a].r (the GPU takes up to 256). */
struct tuna_lora_bank {
    int n;
    int64_t max_r;
    enum tuna_dtype dtype;
    const struct tuna_lora_w *w; /* [n] */
    /* Optional (NULL when not made): every adapter's A and B side by side in slots of rs >= max_r
     * ranks (rs a multiple of 8; ranks r..rs of a slot zero), in backend memory, the set's dtype:
     * A_all [n * rs, K] (slot a = rows a*rs..), B_all [N, n * rs] (slot a = columns a*rs..). The
     * dense form the lora_matmul op multiplies for all adapters at once (w[a].A may point into it). */
    const void *A_all, *B_all;
    int64_t rs;
    /* The LoRA fold (GPU, 16-bit; model/device.c): fold_ld > 0 when this linear's weight rows
     * are the rows of a matrix [N, fold_ld] that also holds every adapter's B, so one GEMM over
     * [x | hm] computes x W^T + hm B_all^T (hm: each token's own slot of the shrink, scaled, the
     * other slots zero). fold_w: that GEMM's first column (row 0), fold_k its columns: they
     * meet the rows of the group's packed input at column fold_xoff, a row of fold_stride
     * elements holding x at column fold_xcol and this linear's hm at fold_hcol. B_all then
     * points into the folded rows (rows fold_ld apart). Zero when not folded. */
    const void *fold_w;
    int64_t fold_ld, fold_k, fold_xoff, fold_hcol, fold_xcol, fold_stride;
};

/* The packed rows' length when a lora_matmul16 call over these n sets folds (every set with
 * adapters folded, all with one layout; *xcol: x's column in them), else 0. */
static inline int64_t tuna_lora_fold_stride(int n, const struct tuna_lora_bank *const *sets, int64_t *xcol)
{
    int64_t stride = 0;
    for (int i = 0; i < n; i++) {
        const struct tuna_lora_bank *s = sets[i];
        if (!s || s->n <= 0 || s->max_r <= 0) continue;
        if (s->fold_ld <= 0 || !s->fold_w || (stride && (s->fold_stride != stride || s->fold_xcol != *xcol))) return 0;
        stride = s->fold_stride;
        *xcol = s->fold_xcol;
    }
    return stride;
}

/* Which tokens of a step use which adapter (host metadata, or pointers into the step block).
 * adapter [T]: index per token, < 0 or >= the set's n = none. order/start, optional (both or
 * neither), group the tokens by adapter: order [T] lists first the tokens whose index a is in
 * [0, n_groups), grouped by a in increasing a and ascending token order within a group (group a
 * is order[start[a] .. start[a+1]), start [n_groups + 1]), then every other token in ascending
 * order (order[start[n_groups] .. T)): a permutation of the step's tokens. n_groups must be >=
 * every set's n when given. Without them a GPU backend groups on the host itself (an upload:
 * not capturable). */
struct tuna_lora_tokens {
    const int32_t *adapter;
    const int32_t *order, *start;
    int n_groups;
};

/* Fills order/start (host arrays [T] and [n_groups + 1]) from adapter [T] as above; returns the
 * number of tokens grouped (those with an index in [0, n_groups)). */
static inline int64_t tuna_lora_group(const int32_t *adapter, int64_t T, int n_groups, int32_t *order, int32_t *start)
{
    for (int a = 0; a <= n_groups; a++) start[a] = 0;
    for (int64_t t = 0; t < T; t++)
        if (adapter[t] >= 0 && adapter[t] < n_groups) start[adapter[t] + 1]++;
    for (int a = 0; a < n_groups; a++) start[a + 1] += start[a];
    int64_t n = start[n_groups], rest = n;
    /* fill by a running cursor per group: start[a] advances, then shifts back; the others after */
    for (int64_t t = 0; t < T; t++) {
        if (adapter[t] >= 0 && adapter[t] < n_groups) order[start[adapter[t]]++] = (int32_t)t;
        else order[rest++] = (int32_t)t;
    }
    for (int a = n_groups; a > 0; a--) start[a] = start[a - 1];
    start[0] = 0;
    return n;
}

/* Where each token of a step reads its keys and values in the paged KV cache.
 * Slot s of a layer's cache lives at k + s*Hkv*D; a token's logical position p of its sequence
 * is in slot block_table[p / block_size] * block_size + p % block_size.
 *
 * max_blocks_per_seq bounds the length of every block table the cache can hand out
 * (ceil(max_model_len / block_size), filled by the callers from the KV cache). A GPU backend
 * derives its launch configuration only from T, the head shape, block_size and this bound, never
 * from the actual positions (which it reads from device memory), so one captured launch serves
 * every decode step of the same batch size. 0 = unknown: the bound is taken from the positions. */
struct tuna_attn_batch {
    int64_t T;
    const int64_t *pos;                   /* [T] position of each token in its sequence */
    const int32_t *const *block_tables;   /* [T] the block table of each token's sequence */
    int32_t block_size;
    int64_t sliding_window;               /* 0 = attend to all earlier positions */
    int32_t max_blocks_per_seq;           /* see above; 0 = unknown */
    /* Optional [T, max_blocks_per_seq]: row t holds token t's block table (entries past its
     * position unspecified), e.g. in the backend's step block; NULL = use block_tables. */
    const int32_t *tables_flat;
};

typedef struct tuna_backend tuna_backend; /* opaque per-backend state (thread pool, scratch) */

/* The lora op's act value for its residual form (see lora in struct tuna_backend_ops). */
#define TUNA_LORA_RESIDUAL (-1)

/* One decode layer of one token (the decode_layer op): the arguments of the ops it replaces. */
struct tuna_decode_layer {
    float *x;                          /* [C] the residual stream, updated in place */
    float *q, *k, *v, *att;            /* [H*D], [Hkv*D], [Hkv*D], [H*D] scratch, written */
    float *xn_attn, *xn_mlp, *act;     /* [C], [C], [I] scratch, written */
    const float *attn_norm, *mlp_norm; /* [C] RMSNorm weights */
    float eps;
    const struct tuna_weight *w[7];    /* q, k, v, o, gate, up, down */
    const float *bias[7];              /* NULL where none */
    void *kcache, *vcache;             /* the layer's cache */
    enum tuna_dtype kv_dtype;
    const int64_t *pos, *slot;         /* [1] */
    const float *inv_freq;             /* [rot_dim / 2] */
    float attn_factor, scale;
    const struct tuna_attn_batch *ab;  /* T = 1 */
    int64_t H, Hkv, D, rot_dim;
    int act_kind;                      /* enum tuna_act of the GLU */
};

struct tuna_backend_ops {
    const char *name;

    /* y[T,N] = x[T,K] W^T + bias[N] (bias may be NULL). Converts W in tiles, never whole. */
    void (*matmul)(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w,
                   const float *bias, int64_t T);

    /* y[T,C] = x / rms(x) * w (w already holds 1+w for Gemma). y may equal x. */
    void (*rmsnorm)(tuna_backend *be, float *y, const float *x, const float *w, int64_t T,
                    int64_t C, float eps);

    /* In place on x[T, H, D]: rotates the first rot_dim dims of each head (rotate-half layout,
     * as transformers), angle pos[t] * inv_freq[i], cos/sin multiplied by attn_factor. */
    void (*rope)(tuna_backend *be, float *x, const int64_t *pos, int64_t T, int64_t H, int64_t D,
                 int64_t rot_dim, const float *inv_freq, float attn_factor);

    /* Writes k[T,Hkv*D], v[T,Hkv*D] into the cache slots of each token (slot[T]), converted to
     * the cache's element type kv_dtype (F32, BF16 or F16; struct tuna_kv_cache owns the choice). */
    void (*kv_store)(tuna_backend *be, void *kcache, void *vcache, enum tuna_dtype kv_dtype, const float *k,
                     const float *v, const int64_t *slot, int64_t T, int64_t HkvD);

    /* out[T, H*D] = softmax(q k^T * scale, causal over positions 0..pos[t]) v, reading k and v
     * from the paged cache (layout [slots, Hkv, D], elements of kv_dtype: F32, BF16 or F16);
     * GQA maps head h to kv head h / (H/Hkv). Scores, softmax and sums are float32. */
    void (*attention)(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                      enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H, int64_t Hkv,
                      int64_t D, float scale);

    /* out[n] = act(gate[n]) * up[n]; act is enum tuna_act (hf_config.h). out may equal gate. */
    void (*glu)(tuna_backend *be, float *out, const float *gate, const float *up, int64_t n, int act);

    /* out[T,C] = emb[ids[t]] * scale. */
    void (*embedding)(tuna_backend *be, float *out, const int32_t *ids, int64_t T,
                      const struct tuna_weight *emb, float scale);

    /* y[n] += x[n] */
    void (*add)(tuna_backend *be, float *y, const float *x, int64_t n);

    /* LoRA, unmerged, of n <= 3 linears that share their input x[T, K] (one; q/k/v; gate/up):
     * ys[i][t, :Ns[i]] += scale_a * B_a (A_a x[t]) with the adapters of sets[i] (NULL: none) for
     * every token t whose adapter index a = tok->adapter[t] is in [0, sets[i]->n) and whose
     * adapter has r > 0; other tokens are left alone. With glu_out (n == 2, Ns equal: gate and
     * up) glu_out[T, N] = act(ys[0] + LoRA_0) * (ys[1] + LoRA_1) instead, for EVERY token, with
     * an adapter or not (the LoRA terms folded into the GLU, act an enum tuna_act; glu_out may
     * equal ys[0]; ys[0] and ys[1] may be overwritten). The GLU form may name a third set (n ==
     * 3, ys[2] unused, Ns[2] its outputs): the adapters of the linear that reads glu_out next
     * (down, whose K is Ns[0]); a GPU backend may then fold that linear's shrink into the GLU
     * (CUDA: the default; TUNA_LORA_FOLD=0 off) and keep its rank-r activations for the
     * residual- or plain-form call on glu_out that follows (valid only for the next lora call,
     * with glu_out unchanged in between; any other call drops them; results equal a fresh shrink
     * up to the order of float32 sums). With glu_out and act ==
     * TUNA_LORA_RESIDUAL (n == 1: o/down): glu_out[t] += ys[0][t] + LoRA_0 for every token instead
     * (the projection added into the residual stream with its adapter in one pass; ys[0] may be
     * overwritten). One call serves a batch that mixes several
     * adapters. sets[i]->w lives in backend memory (see struct tuna_lora_bank); tok is host
     * metadata (or pointers into the step block). A GPU backend derives its launch configuration
     * only from T, the Ns, K and the sets' n and max_r, so a captured step replays for any mix of
     * adapters. The GPU's 16-bit sets multiply on tensor cores (x and the rank-r activations
     * rounded to the set's dtype, float32 sums); float32 sets in float32. */
    void (*lora)(tuna_backend *be, int n, float *const *ys, const int64_t *Ns, const float *x, int64_t T, int64_t K,
                 const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok, float *glu_out,
                 int act);

    /* Greedy ids: out[t] = the column of the largest value of row t of logits [T, V] (backend
     * memory), ties to the lowest column, NaN never chosen (0 when column 0 is NaN), exactly as
     * the sampler's greedy on the host. out is a HOST array [T]; the call waits for the result
     * (on a GPU only T ints cross the bus instead of T*V floats). Returns the sticky error (CUDA). */
    tuna_status (*argmax)(tuna_backend *be, int32_t *out, const float *logits, int64_t T, int64_t V);

    /* --- memory: activations, weights and the KV cache live in the backend's memory --------
     * (host memory for the CPU backend, device memory for CUDA). Small metadata (ids, positions,
     * slots, block tables, inv_freq) is always host memory. */
    tuna_status (*alloc)(tuna_backend *be, size_t bytes, void **out); /* uninitialized */
    void (*release)(tuna_backend *be, void *p);                       /* accepts NULL */
    tuna_status (*upload)(tuna_backend *be, void *dst, const void *src_host, size_t bytes);
    tuna_status (*download)(tuna_backend *be, void *dst_host, const void *src, size_t bytes);
    void (*copy)(tuna_backend *be, void *dst, const void *src, size_t bytes); /* within backend memory */
    /* Waits for queued work; returns the backend's sticky error (CUDA) or TUNA_OK. */
    tuna_status (*sync)(tuna_backend *be);
    bool host_memory; /* backend memory is ordinary host memory */

    /* --- optional fusions (NULL = not provided: callers compose the plain ops above) --------
     * Same numbers as the composition up to float32 summation order. */
    /* ys[i][T, N_i] = x[T,K] W_i^T + bias_i for n <= 4 weights of the same K (q/k/v); biases may
     * be NULL, or any entry of it. */
    void (*matmul_multi)(tuna_backend *be, int n, float *const *ys, const float *x,
                         const struct tuna_weight *const *ws, const float *const *biases, int64_t T);
    /* out[T, I] = act(x Wg^T + bg) * (x Wu^T + bu): gate/up and the GLU in one pass. */
    void (*matmul_glu)(tuna_backend *be, float *out, const float *x, const struct tuna_weight *wg,
                       const float *bg, const struct tuna_weight *wu, const float *bu, int64_t T, int act);
    /* y[T,N] += x[T,K] W^T + bias: a projection added into the residual stream. */
    void (*matmul_add)(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w,
                       const float *bias, int64_t T);

    /* --- the step block and graphs of whole steps (optional; NULL where metadata is free) ---
     * step_block returns a host buffer of at least `bytes` (valid until the next call) whose
     * first bytes step_upload mirrors into backend memory with one copy: ops given pointers into
     * it (ids, positions, slots, block tables, inv_freq) read the mirror and upload nothing of
     * their own. NULL on failure (the sticky error says why). */
    void *(*step_block)(tuna_backend *be, size_t bytes);
    void (*step_upload)(tuna_backend *be, size_t bytes);
    /* graph_begin(key): 1 = the graph recorded for key was launched (skip the ops); 0 = capture
     * started: run the ops, then graph_end; -1 = run the ops eagerly. The key must change
     * whenever any pointer or size the ops are given changes (all metadata in the step block).
     * graph_end returns true when the captured step was launched, false when the capture could
     * not be used and the caller must run the ops again eagerly. */
    int (*graph_begin)(tuna_backend *be, uint64_t key);
    bool (*graph_end)(tuna_backend *be);
    /* --- optional: decode fusions of the RMSNorm and the RoPE/KV-store step (NULL = compose the
     * plain ops; same numbers up to float32 summation order) ----------------------------------
     * xn[T,K] = rmsnorm(x, nw, eps) and ys[i] = xn W_i^T + bias_i (matmul_multi of xn): the norm in
     * front of q/k/v folded into their GEMV. xn is always written (LoRA reads it). */
    void (*rmsnorm_matmul_multi)(tuna_backend *be, int n, float *const *ys, float *xn, const float *x,
                                 const float *nw, float eps, const struct tuna_weight *const *ws,
                                 const float *const *biases, int64_t T);
    /* xn[T,K] = rmsnorm(x, nw, eps), out[T, I] = act(xn Wg^T + bg) * (xn Wu^T + bu). */
    void (*rmsnorm_matmul_glu)(tuna_backend *be, float *out, float *xn, const float *x, const float *nw, float eps,
                               const struct tuna_weight *wg, const float *bg, const struct tuna_weight *wu,
                               const float *bu, int64_t T, int act);
    /* The step between the projections and attention: when given, rmsnorm of each head of q
     * [T, H*D] by q_norm[D] and of k [T, Hkv*D] by k_norm[D] (Qwen3), then rope of q and k (in
     * place), then kv_store of k and v: rmsnorm, rope, rope, kv_store in one call. */
    void (*rope_kv_store)(tuna_backend *be, float *q, float *k, const float *v, const float *q_norm,
                          const float *k_norm, float eps, void *kcache, void *vcache, enum tuna_dtype kv_dtype,
                          const int64_t *pos, const int64_t *slot, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                          int64_t rot_dim, const float *inv_freq, float attn_factor);
    /* rmsnorm_matmul_multi of q, k, v (n = 3: ys[0] q [T, H*D], ys[1] k and ys[2] v [T, Hkv*D])
     * then rope_kv_store without q/k norms, in one call (the CUDA backend rotates and stores in
     * the GEMV's epilogue: one launch less per layer). Same numbers as the two ops. */
    void (*rmsnorm_qkv_rope_kv)(tuna_backend *be, float *const *ys, float *xn, const float *x, const float *nw,
                                float eps, const struct tuna_weight *const *ws, const float *const *biases,
                                void *kcache, void *vcache, enum tuna_dtype kv_dtype, const int64_t *pos,
                                const int64_t *slot, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t rot_dim,
                                const float *inv_freq, float attn_factor);
    /* A hint, no effect on any result: bytes [p, p + bytes) of backend memory (the next weight
     * of a decode step) will be read soon; the backend may bring them into its cache while the
     * next ops leave memory bandwidth idle (the CUDA backend: during RoPE/attention, TUNA_L2PF). */
    void (*prefetch_l2)(tuna_backend *be, const void *p, size_t bytes);
    /* Optional (NULL: nothing to start), no effect on any result: announces the lora call that
     * follows with the same n, Ns, x, T, K, sets, tok, glu_out and act (ys are not needed yet),
     * after only ops that read x and write elsewhere (the projections' GEMMs). A GPU backend starts
     * that call's shrink (u = x A^T) on a second stream, beside the GEMM, and the lora call then
     * waits for it instead of running it; any lora call waits for a started shrink first. */
    void (*lora_begin)(tuna_backend *be, int n, const int64_t *Ns, const float *x, int64_t T, int64_t K,
                       const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok, float *glu_out,
                       int act);
    /* Optional (NULL: the callers compose matmul_multi / matmul_add and lora): n <= 3 projections
     * of one input and their adapters in one op: ys[i][T, N_i] = x W_i^T + bias_i + LoRA_i (acc:
     * ys[i] += the same), LoRA_i as in lora with the adapters of sets[i] (NULL: none) for each
     * token's adapter tok->adapter[t]; the ws share K. Returns false, having done nothing, when the
     * backend declines the call (sizes, dtypes or sets it does not take in this form): the caller
     * then composes the plain ops. CUDA (16-bit sets with A_all/B_all, the GEMM sizes; TUNA_LORA_DENSE=0
     * declines always): x rounded to 16 bits once; h = x A_all^T for every slot at once (a cuBLAS
     * GEMM, float32); each token's own slot kept, times its scale, rounded to 16 bits, the others
     * zeroed (one small kernel, as PEFT/vLLM round the rank-r activations in 16-bit mode); the
     * LoRA term as a GEMM over the slots (y = h B_all^T, beta 0, or beta 1 with acc), then the
     * projection's GEMM accumulated onto it (beta 1). Graph-capturable (no host sync; tok in the
     * step block). */
    bool (*lora_matmul)(tuna_backend *be, int n, float *const *ys, const float *x, const struct tuna_weight *const *ws,
                        const float *const *biases, int64_t T, const struct tuna_lora_bank *const *sets,
                        const struct tuna_lora_tokens *tok, bool acc);
    /* --- optional: 16-bit activations (NULL: not offered; the CUDA backend) ------------------
     * The many-token path of a 16-bit model (forward.c: no trace, no adapter in the layer, bf16
     * or f16 weights without q/k/v/gate/up biases, T >= act16_min_t) passes its activations
     * between ops in 16 bits of adt (TUNA_DTYPE_BF16 or F16, the weights' type), as transformers
     * does in bf16: the norm writes 16-bit xn; q/k/v and gate/up write 16-bit outputs (float32
     * sums rounded once); RoPE + KV store, attention and the GLU read and write 16 bits (float32
     * math inside, each output rounded once); o and down read 16 bits and accumulate into the
     * float32 residual stream. No float32 -> 16-bit conversion pass is left on that path.
     * backend/cpu/act16.h holds the CPU twins (float32 math, rounded at the same points): the
     * reference of the op tests. TUNA_ACT16=0 makes the forward use the float32 ops instead. */
    /* y[T,C] (adt) = rmsnorm(x) (as rmsnorm), rounded to adt; y's rows ldy elements apart (0: C). */
    void (*rmsnorm16)(tuna_backend *be, void *y, int64_t ldy, const float *x, const float *w, int64_t T, int64_t C,
                      float eps, enum tuna_dtype adt);
    /* x [T, K] in adt; w of dtype adt (4-bit weights are declined). ydt F32: y (float32) = x W^T +
     * bias, or += with acc; ydt == adt: y (adt) = x W^T rounded, then + bias rounded again (acc
     * must be false). Returns false, having done nothing, for any other combination (the caller
     * runs the float32 ops). */
    bool (*matmul16)(tuna_backend *be, void *y, enum tuna_dtype ydt, const void *x, enum tuna_dtype adt,
                     const struct tuna_weight *w, const float *bias, int64_t T, bool acc);
    /* rope_kv_store with q [T, H*D], k and v [T, Hkv*D] in adt: q and k normed (when given) and
     * rotated in float32, rounded back in place; the cache gets the rotated k and v converted to
     * kv_dtype from those float32 values. */
    void (*rope_kv_store16)(tuna_backend *be, void *q, void *k, const void *v, enum tuna_dtype adt,
                            const float *q_norm, const float *k_norm, float eps, void *kcache, void *vcache,
                            enum tuna_dtype kv_dtype, const int64_t *pos, const int64_t *slot, int64_t T, int64_t H,
                            int64_t Hkv, int64_t D, int64_t rot_dim, const float *inv_freq, float attn_factor);
    /* attention with q and out [T, H*D] in adt (the float32 op's math; out rounded once). */
    void (*attention16)(tuna_backend *be, void *out, const void *q, enum tuna_dtype adt, const void *kcache,
                        const void *vcache, enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H,
                        int64_t Hkv, int64_t D, float scale);
    /* out[n] = act(gate[n]) * up[n], all in adt, float32 math, rounded once; out may equal gate. */
    void (*glu16)(tuna_backend *be, void *out, const void *gate, const void *up, int64_t n, int act,
                  enum tuna_dtype adt);
    /* Steps of at least this many tokens take the 16-bit ops (fewer: the float32 ops' GEMV path). */
    int64_t (*act16_min_t)(tuna_backend *be);
    /* Optional (NULL: layers with adapters take the float32 ops): lora_matmul on the 16-bit path:
     * x [T, K] in adt, ys[i] in ydt: adt (ys[i] = x W_i^T + LoRA_i rounded once; acc false, no
     * bias) or F32 (with acc: ys[i] += x W_i^T + bias_i + LoRA_i: o/down into the residual
     * stream). The LoRA term as lora_matmul makes it (rank-r activations rounded to adt). Returns
     * false, having done nothing, when the backend declines the call (TUNA_LORA_DENSE=0 on CUDA). n = 0: a
     * query, nothing done: whether the backend takes such calls for a step of T tokens in adt.
     * The LoRA fold (tuna_lora_fold_stride(n, sets) > 0, ydt == adt, no acc): x is the packed
     * rows instead, fold_stride elements apart with x at column fold_xcol (x points at row 0's
     * column 0), and the op writes each folded linear's hm columns into them (docs/LORA.md). */
    bool (*lora_matmul16)(tuna_backend *be, int n, void *const *ys, enum tuna_dtype ydt, const void *x,
                          enum tuna_dtype adt, const struct tuna_weight *const *ws, const float *const *biases,
                          int64_t T, const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok,
                          bool acc);
    /* Optional (NULL: the ops one by one): a whole decode layer of one token without adapters or
     * q/k norms — rmsnorm_qkv_rope_kv, attention, matmul_add of o, rmsnorm_matmul_glu, matmul_add
     * of down — in one call, the same results up to float32 rounding (the CUDA backend runs it as
     * one kernel for 4-bit weights). Returns false, having done nothing, when it declines. */
    bool (*decode_layer)(tuna_backend *be, const struct tuna_decode_layer *l);
    /* Optional (NULL: none; the LoRA fold needs it): `rows` rows of `width` bytes from host rows
     * spitch bytes apart into backend rows dpitch bytes apart. */
    tuna_status (*upload_2d)(tuna_backend *be, void *dst, size_t dpitch, const void *src_host, size_t spitch,
                             size_t width, size_t rows);
    /* Optional (NULL: the ops one by one): the attention block of one token after its q/k/v
     * projections (l->q, k, v as projected, no RoPE yet): RoPE of q and k, the KV store, attention
     * into l->att and l->x += o(att) — rope_kv_store, attention and matmul_add of o — in one call
     * (the fields of l the attention and o use; no q/k norms, no adapter on o). The same results up
     * to float32 rounding (CUDA: one kernel for a 4-bit o). query: only whether it takes such a
     * call, nothing done. Returns false, having done nothing, when it declines. */
    bool (*attention_o)(tuna_backend *be, const struct tuna_decode_layer *l, bool query);
    /* Optional (NULL: the ops one by one): the MLP block of one token without adapters or biases —
     * rmsnorm_matmul_glu (xn gets the normalized x) and matmul_add of down into x — in one call, the
     * same results up to float32 rounding (CUDA: one kernel for 4-bit weights, down's sums added in
     * fixed point and left pending for x's next reader: docs/ARCHITECTURE.md; experimental, only
     * with TUNA_Q4_MLP=1). Returns false, having done nothing, when it declines. */
    bool (*rmsnorm_glu_down)(tuna_backend *be, float *x, float *xn, const float *nw, float eps,
                             const struct tuna_weight *wg, const struct tuna_weight *wu, const struct tuna_weight *wd,
                             int64_t T, int act);
    /* Optional (NULL: the ops one by one): after the attention of one token, the o projection and
     * the MLP block without adapters — matmul_add of o (x += o(att)), rmsnorm_matmul_glu (l->xn_mlp
     * gets the normalized x, l->act the GLU output) and matmul_add of down — in one call (the fields
     * of l they use), the same results up to float32 rounding (CUDA: one persistent kernel for
     * 4-bit weights, TUNA_Q4_OM). next (NULL: none): the next layer, whose q/k/v projections with
     * their norm (rmsnorm_matmul_multi into next->q, k, v and next->xn_attn; no adapters) the call
     * may do too, saying so in *next_qkv. Returns false, having done nothing, when it declines. */
    bool (*decode_o_mlp)(tuna_backend *be, const struct tuna_decode_layer *l, const struct tuna_decode_layer *next,
                         bool *next_qkv);
    /* Optional (NULL: the ops one by one): the attention of one token after its q/k/v projections
     * (l->q, k, v as projected, no RoPE yet; no q/k norms): RoPE of q and k, the KV store and
     * attention into l->att — rope_kv_store and attention — in one call (the fields of l they use),
     * the same results (CUDA: one kernel for 4-bit q/k/v weights, the rotated q not written back).
     * query: only whether it takes such a call (the caller then projects q/k/v without RoPE),
     * nothing done. Returns false, having done nothing, when it declines. */
    bool (*rope_attention)(tuna_backend *be, const struct tuna_decode_layer *l, bool query);
    /* Optional (NULL: argmax): argmax in two halves, so that a step's greedy ids are computed inside
     * its CUDA graph and only the T ids cross the bus after it. argmax_queue queues what argmax
     * computes over logits [T, V] (backend memory) without waiting, into memory the host reads;
     * argmax_take waits for everything queued and copies the T ids of the last argmax_queue into
     * out (a HOST array [T]). The same ids as argmax. argmax_take returns the sticky error (CUDA). */
    void (*argmax_queue)(tuna_backend *be, const float *logits, int64_t T, int64_t V);
    tuna_status (*argmax_take)(tuna_backend *be, int32_t *out, int64_t T);
    /* Optional (NULL: nothing), a hint with no effect on any result: called after the q/k/v
     * projections of one token and before its attention; the backend may bring the weights read
     * after the attention (l->w[3] o, then w[4], w[5] gate and up) into its cache while the
     * attention leaves memory bandwidth idle (CUDA: l2_warm.cu, at contexts below 768 tokens).
     * Returns whether it does; query: only that, nothing done. */
    bool (*warm_l2)(tuna_backend *be, const struct tuna_decode_layer *l, bool query);
};

#endif
