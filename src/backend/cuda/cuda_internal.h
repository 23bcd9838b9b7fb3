/* cuda_internal.h — state shared by the CUDA op files (not for use outside src/backend/cuda). */
#ifndef TUNA_BACKEND_CUDA_INTERNAL_H
#define TUNA_BACKEND_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "backend/cuda/cuda.h"

/* A device buffer that grows (never shrinks) to the largest request. */
struct cuda_grow_buf {
    void *p;
    size_t cap;
};

/* A second stream beside the main one (side_stream.cu): fork, an event the main stream records and
 * the side stream waits for; join, one the side stream records (its user says when the main stream
 * waits for it). Made outside a capture only, once. */
struct cuda_side {
    cudaStream_t stream;
    cudaEvent_t fork, join;
    bool made;
};

/* A range of device memory to bring into L2 (pdl.cuh: the prefetch_l2 hint); p NULL: none. */
struct tuna_l2pf {
    const void *p;
    long long bytes;
};

struct tuna_backend {
    int device;
    int cc_major, sm_count, max_smem_optin; /* the device's attributes, read once when made (0: unknown) */
    int q4wg;                    /* k_q4_wg (sm_90a wgmma) runs here: 0 not yet probed, 1 yes, -1 no (q4_mm.cu) */
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws; /* cuBLAS workspace, fixed (graph capture) */
    tuna_status sticky;          /* first failure; TUNA_OK while healthy */
    char sticky_msg[512];
    struct cuda_grow_buf meta;   /* device arena for int metadata (ids, positions, slots, tables) */
    struct cuda_grow_buf half;   /* activations rounded to bf16/f16 for cuBLAS */
    const float *half_of;        /* half holds half_of's first half_n values as half_dt (1 bf16, 2 f16), */
    int64_t half_n;              /* recorded only for a scope of ops that read the same x (NULL: none; */
    int half_dt;                 /* tuna_cuda_to_half) */
    struct cuda_grow_buf wdeq;   /* a 4-bit weight dequantized for a prefill GEMM */
    struct cuda_grow_buf argmax_part; /* [T * nb] float bests, then [T * nb] int indices (argmax.cu, few rows) */
    int32_t *argmax_host;             /* [argmax_host_cap] ids, pinned and mapped: the kernels write them (argmax.cu) */
    int32_t *argmax_host_dev;         /* the same memory's device address */
    int64_t argmax_host_cap;
    struct cuda_grow_buf attn;   /* attention's split partials (attention.cu): sized once, never moves */
    struct cuda_grow_buf layer;  /* the decode-layer kernel's barrier, counters, partials (q4_layer.cu) */
    struct cuda_grow_buf attn_o; /* the attention + o kernel's grid barrier count (attn_o.cu) */
    struct cuda_grow_buf q4sk;   /* k_q4_sk's partial sums and counters of cut tiles: sized once (q4_sk.cu) */
    struct cuda_grow_buf q4mm_part; /* k_q4_mm's split-K sums [splits][tokens][N] (q4_mm.cu) */
    struct cuda_grow_buf fuse;   /* scratch of the fused ops' unfused fallbacks (fused.cu) */
    struct cuda_grow_buf lora;   /* LoRA shrink partials [S, T, max_r] float32 (lora.cu) */
    struct {                     /* u of the linear after a GLU (down), made by the GLU-form lora call */
        const float *x;          /* the GLU output it was made from; NULL: none (lora.cu) */
        const void *w, *base;    /* that linear's descriptor table; be->lora.p when it was made */
        int64_t T, K;
        int n, R;
        size_t off;              /* u's byte offset in be->lora */
    } lora_next;
    struct {                     /* lora_begin: a shrink started on a second stream (lora.cu) */
        struct cuda_side side;   /* made at the first lora_begin outside a capture */
        bool pending;            /* pending: join not yet waited for by the main stream */
        bool valid;              /* the key below names a shrink whose u the next lora call may use */
        bool reads_half;         /* that shrink reads be->half (tuna_cuda_to_half waits before rewriting it) */
        const float *x;
        const void *base, *w[3];
        const int32_t *order, *start;
        int64_t T, K, KC;
        int n[3], R[3], nb, S, dt, sh_tiles;
    } lora_pre;
    void *host_meta;             /* pinned host arena, the same size: copies from it are truly async */
    size_t host_meta_cap;
    size_t meta_used, meta_flushed; /* append offsets in both arenas; reset only after a sync */
    struct {
        const void *src;
        size_t n, off;
    } meta_cache[32];            /* recent uploads: the same array (same pointer, same bytes) is reused */
    int meta_cache_n, meta_cache_next;
    /* The step block (graph.cu): the first step_cap bytes of both arenas hold one step's metadata,
     * written by the caller and uploaded once; staging a pointer inside it costs nothing and
     * gives the same device address every step, which is what makes a step capturable. */
    size_t step_cap, step_used;
    uint64_t meta_gen; /* bumped when the arenas move: graphs captured before refer to freed memory */
    /* CUDA graphs of whole decode steps, keyed by the caller (graph.cu) */
    bool capturing, capture_tainted;
    struct cuda_graph_entry *graphs;
    int n_graphs, cap_graphs, cur_graph;
    bool graphs_off;     /* tuna_cuda_set_graphs(be, false) */
    long graph_stats[3]; /* captured, launched, discarded (TUNA_CUDA_GRAPHS=debug prints them) */
    /* TUNA_CUDA_GRAPHS=steps: where a replayed greedy step's wall time goes (graph.cu's
     * tuna_cuda_step_mark): events at the step block's upload, the graph's launch and the ids'
     * download; sums over the steps measured, printed when the backend is freed */
    struct {
        cudaEvent_t ev[3];
        double sum[4], host0, prev0;
        long n, nper;
        int stage;    /* the marks of this step so far: 1 upload, 2 graph launched, 3 waiting for the ids */
        bool prev_ok; /* the step before this one was measured (its upload started the period) */
    } steps;
    struct tuna_l2pf l2pf; /* the pending prefetch_l2 hint (pdl.cu) */
    struct {               /* warm_l2's second stream (l2_warm.cu), made outside a capture */
        struct cuda_side side;
        int khz;           /* the SM clock, for the pace (0: not read yet) */
        bool pending;      /* not yet joined into the main stream */
    } warm;
    /* rope_kv_store launched its own kernel for one token (rope_kv.cu): the attention that
     * follows is launched with PDL, so its launch and prologue run under that small kernel;
     * attention.cu takes (clears) it */
    bool attn_pdl_hint;
    /* The residual's pending part (racc.cu): the 4-bit MLP kernel (q4_mlp.cu) adds down's sums
     * into buf ([n] long long, fixed point) instead of into x; x's readers add it (k_q4_h4's
     * staging, racc_value) or fold it first (tuna_cuda_racc_settle), and o's GEMV folds it as it
     * adds; whoever folds it zeroes it. pend: x (the residual stream) has a pending part. */
    struct {
        struct cuda_grow_buf buf;
        int64_t n;
        bool pend;
        const float *x;
    } racc;
};

/* Records the first failure and returns false when e is an error. */
bool tuna_cuda_check(tuna_backend *be, cudaError_t e, const char *call);
/* struct cuda_side: made unless it is (false outside a capture when CUDA cannot make it, and inside
 * one: nothing is made there); the fork (errors to be->sticky, named "<call>(<what> fork)"); freed
 * after its stream's work is done. */
bool tuna_cuda_side_make(tuna_backend *be, struct cuda_side *s);
bool tuna_cuda_side_fork(tuna_backend *be, struct cuda_side *s, const char *what);
void tuna_cuda_side_free(struct cuda_side *s);
bool tuna_cuda_check_blas(tuna_backend *be, cublasStatus_t s, const char *call);
/* Checks the last kernel launch. */
bool tuna_cuda_check_launch(tuna_backend *be, const char *kernel);
/* Makes buf hold at least bytes (device). */
bool tuna_cuda_grow(tuna_backend *be, struct cuda_grow_buf *buf, size_t bytes, const char *what);
/* Metadata (small host arrays the kernels read: ids, positions, slots, block tables, inv_freq)
 * goes through an append-only arena: a pinned host copy and a device copy at the same offset.
 * tuna_cuda_meta_begin reserves room for one op's arrays (syncing and starting over only when
 * the arena is full, so offsets handed out stay valid until the op's kernels have run);
 * tuna_cuda_meta_stage returns the device byte offset of src, reusing an earlier upload of the
 * same pointer with the same bytes (the positions of a step are staged once, not once per layer);
 * tuna_cuda_meta_flush queues one async copy of everything staged since the last flush. */
struct cuda_meta {
    size_t reserved;
};
bool tuna_cuda_meta_begin(tuna_backend *be, struct cuda_meta *m, size_t upper_bound_bytes);
bool tuna_cuda_meta_reset(tuna_backend *be, size_t upper_bound_bytes);
void *tuna_cuda_meta_stage(tuna_backend *be, struct cuda_meta *m, const void *src, size_t n);
bool tuna_cuda_meta_flush(tuna_backend *be, struct cuda_meta *m);

/* Inside a capture, work that cannot be replayed (an upload outside the step block, a sync, a
 * buffer that must grow) marks the capture unusable instead of failing: graph.cu then discards it
 * and the caller runs the step eagerly. Returns true when the caller must not go on. */
bool tuna_cuda_capture_taint(tuna_backend *be);
void tuna_cuda_graphs_free(tuna_backend *be);
void *tuna_cuda_step_block(tuna_backend *be, size_t bytes);
void tuna_cuda_step_upload(tuna_backend *be, size_t bytes);
int tuna_cuda_graph_begin(tuna_backend *be, uint64_t key);
bool tuna_cuda_graph_end(tuna_backend *be);
/* TUNA_CUDA_GRAPHS=steps (a measurement): point 0 the step block's upload, 1 a graph replay's launch,
 * 2 the wait for the greedy ids begins, 3 the ids on the host. No effect otherwise. */
void tuna_cuda_step_mark(tuna_backend *be, int point);

/* The ops (one file per family). */
void tuna_cuda_matmul(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                      int64_t T);
/* be->half = x[n] rounded to dtype (1 bf16, 2 f16), unless it holds exactly that already (recorded
 * by an earlier call with keep). keep: record it for the ops that follow and read the same x
 * unchanged (matmul_multi's GEMMs, lora_begin's shrink and GEMMs); whoever set it clears
 * be->half_of at the end of that scope. False on an error (sticky). */
bool tuna_cuda_to_half(tuna_backend *be, const float *x, int64_t n, int dtype, bool keep);
/* be->half made ready to be rewritten with n 16-bit values by the caller (its record cleared, a LoRA
 * shrink reading it waited for, grown to n): what tuna_cuda_to_half does before its conversion. */
bool tuna_cuda_half_reserve(tuna_backend *be, int64_t n);
/* TUNA_HALF_ONCE=0: nobody keeps the copy (every GEMM converts its x; the LoRA shrink reads float32). */
bool tuna_cuda_half_once(void);
/* y[T,N] += x W^T + bias with the GEMM accumulating (cuBLAS beta = 1) at the sizes that run cuBLAS;
 * false (nothing done) at the GEMV sizes or with TUNA_MATMUL_ACC=0: the caller adds it itself. */
bool tuna_cuda_matmul_acc(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                          int64_t T);
/* The same with beta = 1 always (TUNA_MATMUL_ACC ignored): false only at the GEMV sizes. */
bool tuna_cuda_matmul_onto(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                           int64_t T);
void tuna_cuda_rmsnorm(tuna_backend *be, float *y, const float *x, const float *w, int64_t T, int64_t C, float eps);
void tuna_cuda_rope(tuna_backend *be, float *x, const int64_t *pos, int64_t T, int64_t H, int64_t D,
                    int64_t rot_dim, const float *inv_freq, float attn_factor);
void tuna_cuda_kv_store(tuna_backend *be, void *kcache, void *vcache, enum tuna_dtype kv_dtype, const float *k,
                        const float *v, const int64_t *slot, int64_t T, int64_t HkvD);
void tuna_cuda_attention(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                         enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H, int64_t Hkv, int64_t D,
                         float scale);
void tuna_cuda_glu(tuna_backend *be, float *out, const float *gate, const float *up, int64_t n, int act);
void tuna_cuda_embedding(tuna_backend *be, float *out, const int32_t *ids, int64_t T, const struct tuna_weight *emb,
                         float scale);
void tuna_cuda_add(tuna_backend *be, float *y, const float *x, int64_t n);

void tuna_cuda_lora(tuna_backend *be, int n, float *const *ys, const int64_t *Ns, const float *x, int64_t T, int64_t K,
                    const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok, float *glu_out, int act);
void tuna_cuda_lora_begin(tuna_backend *be, int n, const int64_t *Ns, const float *x, int64_t T, int64_t K,
                          const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok, float *glu_out,
                          int act);
void tuna_cuda_lora_free(tuna_backend *be); /* the second stream and its events */
bool tuna_cuda_lora_matmul(tuna_backend *be, int n, float *const *ys, const float *x, const struct tuna_weight *const *ws,
                           const float *const *biases, int64_t T, const struct tuna_lora_bank *const *sets,
                           const struct tuna_lora_tokens *tok, bool acc);
bool tuna_cuda_lora_matmul16(tuna_backend *be, int n, void *const *ys, enum tuna_dtype ydt, const void *x,
                             enum tuna_dtype adt, const struct tuna_weight *const *ws, const float *const *biases,
                             int64_t T, const struct tuna_lora_bank *const *sets, const struct tuna_lora_tokens *tok,
                             bool acc);
tuna_status tuna_cuda_argmax(tuna_backend *be, int32_t *out, const float *logits, int64_t T, int64_t V);
void tuna_cuda_argmax_queue(tuna_backend *be, const float *logits, int64_t T, int64_t V);
tuna_status tuna_cuda_argmax_take(tuna_backend *be, int32_t *out, int64_t T);

/* Optional fused ops (fused.cu), backend.h's matmul_multi / matmul_glu / matmul_add. */
void tuna_cuda_matmul_multi(tuna_backend *be, int n, float *const *ys, const float *x,
                            const struct tuna_weight *const *ws, const float *const *biases, int64_t T);
void tuna_cuda_matmul_glu(tuna_backend *be, float *out, const float *x, const struct tuna_weight *wg,
                          const float *bg, const struct tuna_weight *wu, const float *bu, int64_t T, int act);
void tuna_cuda_matmul_add(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                          int64_t T);

/* Decode fusions (fused.cu, rope_kv.cu): backend.h's rmsnorm_matmul_multi / rmsnorm_matmul_glu /
 * rope_kv_store. */
void tuna_cuda_rmsnorm_matmul_multi(tuna_backend *be, int n, float *const *ys, float *xn, const float *x,
                                    const float *nw, float eps, const struct tuna_weight *const *ws,
                                    const float *const *biases, int64_t T);
void tuna_cuda_rmsnorm_matmul_glu(tuna_backend *be, float *out, float *xn, const float *x, const float *nw, float eps,
                                  const struct tuna_weight *wg, const float *bg, const struct tuna_weight *wu,
                                  const float *bu, int64_t T, int act);
void tuna_cuda_rope_kv_store(tuna_backend *be, float *q, float *k, const float *v, const float *q_norm,
                             const float *k_norm, float eps, void *kcache, void *vcache, enum tuna_dtype kv_dtype,
                             const int64_t *pos, const int64_t *slot, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                             int64_t rot_dim, const float *inv_freq, float attn_factor);

void tuna_cuda_rmsnorm_qkv_rope_kv(tuna_backend *be, float *const *ys, float *xn, const float *x, const float *nw,
                                   float eps, const struct tuna_weight *const *ws, const float *const *biases,
                                   void *kcache, void *vcache, enum tuna_dtype kv_dtype, const int64_t *pos,
                                   const int64_t *slot, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t rot_dim,
                                   const float *inv_freq, float attn_factor);
/* backend.h's decode_layer (q4_layer.cu): one persistent kernel per layer for 4-bit weights. */
bool tuna_cuda_decode_layer(tuna_backend *be, const struct tuna_decode_layer *l);
/* backend.h's rope_attention (attention_b1.cu): RoPE of q and k, the KV store and the batch-1 attention
 * in one kernel (k_attn_b1 with ROPE). */
bool tuna_cuda_rope_attention(tuna_backend *be, const struct tuna_decode_layer *l, bool query);
/* backend.h's attention_o (attn_o.cu): RoPE, the KV store, attention and a 4-bit o in one kernel. */
bool tuna_cuda_attention_o(tuna_backend *be, const struct tuna_decode_layer *l, bool query);
/* The residual's pending part (racc.cu; see struct tuna_backend's racc). take: for the MLP kernel
 * that adds into x's pending part: the buffer to add into (zero), after folding whatever was
 * pending (NULL on failure: sticky). of: x's pending part or NULL. done: x has been folded by the
 * kernel just queued (o's GEMV). settle: folds x's pending part into x now (a kernel), x NULL:
 * whatever is pending. drop: x is about to be overwritten. */
long long *tuna_cuda_racc_take(tuna_backend *be, const float *x, int64_t n);
long long *tuna_cuda_racc_of(tuna_backend *be, const float *x);
void tuna_cuda_racc_done(tuna_backend *be);
void tuna_cuda_racc_settle(tuna_backend *be, const float *x);
void tuna_cuda_racc_drop(tuna_backend *be);
/* backend.h's rmsnorm_glu_down (q4_mlp.cu): the 4-bit MLP of one token in one kernel. */
bool tuna_cuda_rmsnorm_glu_down(tuna_backend *be, float *x, float *xn, const float *nw, float eps,
                                const struct tuna_weight *wg, const struct tuna_weight *wu,
                                const struct tuna_weight *wd, int64_t T, int act);
/* backend.h's decode_o_mlp (q4_om.cu): o, the 4-bit MLP of one token and the next layer's q/k/v in
 * one persistent kernel. */
bool tuna_cuda_decode_o_mlp(tuna_backend *be, const struct tuna_decode_layer *l, const struct tuna_decode_layer *next,
                            bool *next_qkv);
/* backend.h's prefetch_l2 (pdl.cu): records the hint for the next decode kernel that issues it. */
void tuna_cuda_prefetch_l2(tuna_backend *be, const void *p, size_t bytes);
/* Batch-1 decode: positions below this take the RoPE form of the attention (attention_b1.cu) and the
 * L2 warm (l2_warm.cu); at longer contexts the attention's own K/V reads dominate (H100 measurements
 * in docs/PERFORMANCE.md, thirty-second session). */
#define TUNA_CUDA_B1_SHORT 768
/* backend.h's warm_l2 (l2_warm.cu; on by default, TUNA_WARM=0 off); the join of its second stream
 * into the main one (graph.cu: before a capture begins and before it ends) and its teardown. */
bool tuna_cuda_warm_l2(tuna_backend *be, const struct tuna_decode_layer *l, bool query);
void tuna_cuda_warm_join(tuna_backend *be);
void tuna_cuda_warm_free(tuna_backend *be);

/* 4-bit weights (q4.cu): the 16-entry table passed by value to kernels. */
struct q4_lut {
    float v[16];
};
void tuna_cuda_gemv_q4(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                       int64_t T);
/* Dequantizes w into be->wdeq in its descriptor's prefill dtype; *out, *dt describe it. */
bool tuna_cuda_dequant_q4(tuna_backend *be, const struct tuna_weight *w, void **out, enum tuna_dtype *dt);
/* y = x W^T + bias (accumulate: y +=) for a 4-bit w by k_q4_mm (q4_mm.cu; k_q4_wg above 64 tokens with
 * TUNA_Q4_WG=1 on an sm_90a build), reading the 4-bit weights once per 128 tokens; false (nothing done)
 * when it does not take the case: then the caller dequantizes. T from 1 to tuna_cuda_q4_mm_max_t(). */
bool tuna_cuda_q4_mm(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                     int64_t T, bool accumulate);

/* 8 bf16 (dtype 1) or f16 (dtype 2) values of one 16-byte load, as float32 (the GEMV kernels). */
__device__ __forceinline__ void tuna_cuda_unpack8(uint4 raw, int dtype, float *f)
{
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (dtype == 1) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        } else {
            __half2 h = *reinterpret_cast<const __half2 *>(&w[i]);
            float2 v = __half22float2(h);
            f[2 * i] = v.x;
            f[2 * i + 1] = v.y;
        }
    }
}

/* act(x) of a GLU: 0 SiLU, 1 GELU tanh, 2 GELU erf (enum tuna_act), the CPU backend's formulas. */
__device__ __forceinline__ float tuna_cuda_act(float x, int act)
{
    if (act == 1) return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    if (act == 2) return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    return x / (1.0f + expf(-x));
}

/* RMSNorm's 1 / sqrt(mean(x^2) + eps) over a row that one block holds: s is this thread's part of
 * the sum of squares of n values; red is __shared__ scratch of 32 floats. Warp sums, then the first
 * warp sums the warps' (a fixed order: the same bits on every run). Every thread of the block must
 * call it; every thread gets the result. */
__device__ __forceinline__ float tuna_cuda_rms_inv(float s, int64_t n, float eps, float *red)
{
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    return 1.0f / sqrtf(red[0] / (float)n + eps);
}

static inline unsigned tuna_cuda_blocks(int64_t n, int threads)
{
    return (unsigned)((n + threads - 1) / threads);
}

#endif
