/* model.h — a loaded Llama-family model (llama, mistral, qwen2, qwen3, gemma) and its forward
 * pass over the backend op table.
 *
 * Weights are views into the mapped safetensors files in their stored dtype (bf16 stays bf16:
 * resident memory ≈ file size); only the small vectors (norm weights, biases) are converted to
 * float32 at load. Architecture differences are data here (biases present or not, q/k norm,
 * Gemma's 1+w folded into the norm weights, embedding scale, activation, tied lm_head), never
 * a switch on the family in the forward pass.
 */
#ifndef TUNA_MODEL_H
#define TUNA_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/batch.h"
#include "model/kv_cache.h"

/* A linear layer y = W x + b + Σ scale·B(A x) for the adapter chosen by the token's sequence. */
struct tuna_linear {
    struct tuna_weight w;     /* [N, K] */
    float *bias;              /* [N] float32, owned; NULL without bias */
    int n_lora;               /* adapters attached (0 = none); index chosen per token */
    const struct tuna_lora *lora; /* [n_lora], borrowed from whoever attached them */
    /* The same adapters as the lora op reads them (descriptors, A and B in backend memory, in the
     * compute dtype), for backends whose memory is not the host's (CUDA): made on first use or by
     * tuna_model_lora_prepare, owned by the model, freed by tuna_model_lora_invalidate (which
     * attaching and detaching call, so a view never outlives the adapters it was copied from,
     * even when new ones reuse their addresses). */
    struct tuna_lora_bank *lora_dev;
    const struct tuna_lora *lora_dev_src; /* the `lora` array lora_dev was copied from */
    /* The LoRA fold (device.c; GPU, 16-bit): w's rows are columns fold_w0.. of the rows of
     * fold_base [N, w.ld], whose other columns hold the adapters' B. NULL: not folded. */
    void *fold_base;
    int64_t fold_w0;
};

struct tuna_layer {
    float *attn_norm;           /* [C] (1+w for Gemma) */
    struct tuna_linear q, k, v; /* [H*D, C], [Hkv*D, C], [Hkv*D, C] */
    float *q_norm, *k_norm;     /* [D] Qwen3 per-head norms, NULL otherwise */
    struct tuna_linear o;       /* [C, H*D] */
    float *mlp_norm;            /* [C] */
    struct tuna_linear gate, up; /* [I, C] */
    struct tuna_linear down;    /* [C, I] */
};

/* What a backward pass needs from the forward, per layer: when the caller passes a trace, the
 * forward keeps every layer's activations (one set of buffers per layer instead of one shared
 * set). All float32, T rows, in the model backend's memory; owned by the trace
 * (tuna_fwd_trace_free, before the model is freed). */
struct tuna_fwd_layer_acts {
    float *x_in;     /* [T, C] residual stream entering the layer */
    float *xn_attn;  /* [T, C] attention norm output */
    float *q;        /* [T, H*D] after q norm and RoPE */
    float *k, *v;    /* [T, Hkv*D] k after norm and RoPE */
    float *att;      /* [T, H*D] attention output before o_proj */
    float *x_mid;    /* [T, C] residual after attention */
    float *xn_mlp;   /* [T, C] */
    float *gate, *up; /* [T, I] projections (gate is overwritten by act(gate)*up unless traced) */
    float *act;      /* [T, I] act(gate) * up */
};
struct tuna_fwd_trace {
    const struct tuna_model *owner; /* the model whose backend holds the buffers */
    int64_t T, cap;
    struct tuna_fwd_layer_acts *layers; /* [L] */
    float *x_final;  /* [T, C] residual before the final norm */
};
void tuna_fwd_trace_free(struct tuna_fwd_trace *tr);

enum tuna_device {
    TUNA_DEVICE_CPU = 0, /* the reference backend (zero-initialized options mean CPU) */
    TUNA_DEVICE_CUDA,    /* the CUDA backend: weights, activations and KV cache on the GPU */
    TUNA_DEVICE_AUTO     /* CUDA when built with it and a GPU is present, else CPU */
};

struct tuna_model_opts {
    int threads;            /* <= 0: all CPUs */
    int64_t max_model_len;  /* 0: max_position_embeddings; larger is refused */
    enum tuna_device device;
    int cuda_device;        /* GPU index for TUNA_DEVICE_CUDA */
    /* GPU compute/weight dtype: TUNA_DTYPE_INVALID = auto (bf16 on compute capability >= 8.0,
     * f16 below, said so on stderr), BF16 (refused below 8.0), F16, F32 (weights converted to
     * float32: the mode that matches the CPU reference to ~1e-6). Ignored on the CPU. */
    enum tuna_dtype gpu_dtype;
    bool quiet;             /* no device/dtype line on stderr */
    /* --load-in-4bit: quantize the decoder projections at load (bitsandbytes layout, bit-exact
     * with its quantizer); NF4 + double quant + block 64 unless the fields below say otherwise */
    bool load_in_4bit;
    bool quant_fp4;         /* --quant-type fp4 */
    bool no_double_quant;   /* --no-double-quant */
    int quant_blocksize;    /* --blocksize (0 = 64) */
    /* CUDA: the weights in one virtual-memory arena (device.c, backend/cuda/arena.h) instead of
     * one cudaMalloc each: ~0.1-0.3 GB less at 7B; the training memory mode asks for it.
     * TUNA_WEIGHT_ARENA=1 / 0 forces it on / off. */
    bool weight_arena;
    /* --kv-cache-dtype (vLLM's flag): TUNA_DTYPE_INVALID = auto (float32 on the CPU, the compute
     * dtype on the GPU), F32, BF16, F16, or F8_E4M3 (GPU only: 1 byte per element, scale 1.0,
     * saturating at +-448; refused on the CPU). See tuna_model_kv_dtype (kv_cache.h). */
    enum tuna_dtype kv_cache_dtype;
    /* The LoRA fold (serve with adapters; GPU, 16-bit weights): columns kept beside the rows of
     * q/k/v/gate/up for the adapters' B (--max-loras x --max-lora-rank rounded up to 8), so a
     * step's LoRA term rides in the projections' GEMMs (docs/LORA.md). 0: none.
     * TUNA_LORA_KFOLD=0 turns it off. */
    int64_t lora_fold;
};

/* opts.lora_fold for `slots` adapters of rank <= max_rank: slots x max_rank rounded up to 8;
 * 0 for a rank no model could fold (above 2^20: the fold wants M <= K / 4). */
static inline int64_t tuna_lora_fold_for(int64_t slots, int64_t max_rank)
{
    if (slots <= 0 || max_rank <= 0 || max_rank > ((int64_t)1 << 20)) return 0;
    return slots * ((max_rank + 7) / 8 * 8);
}

struct tuna_q4_weight; /* quant/nf4.h */
struct tuna_fwd_ws; /* scratch activations, grown to the largest step (forward.c) */

struct tuna_model {
    struct tuna_arch arch;
    tuna_st_set *st;            /* owned: the mapped weights */
    const struct tuna_backend_ops *ops;
    tuna_backend *be;           /* owned */

    struct tuna_weight embed;   /* [V, C] */
    float embed_scale;          /* sqrt(C) in float32 for Gemma, else 1 */
    struct tuna_layer *layers;  /* [L] */
    float *final_norm;          /* [C] */
    struct tuna_linear lm_head; /* [V, C]: the embedding when tied */
    int64_t max_model_len;

    int64_t rot_dim;            /* RoPE dims rotated per head */
    float *inv_freq;            /* [rot_dim/2] */
    float attn_factor;
    int64_t inv_freq_len;       /* dynamic NTK: the seq_len inv_freq was made for */

    struct tuna_fwd_ws *ws;

    struct tuna_q4_weight **q4; /* [n_q4] owned 4-bit weight states (bitsandbytes checkpoints) */
    int64_t n_q4;

    /* non-host backends (CUDA): device buffers this model owns, freed with it (device.c) */
    void **dev_allocs;
    int64_t n_dev_allocs, cap_dev_allocs;
    void *dev_arena;            /* tuna_cuda_arena holding the weights, or NULL: one cudaMalloc each (device.c) */
    char device_desc[320];      /* "cpu, 16 threads" or "cuda:0 NVIDIA H200 (cc 9.0), bfloat16" */
    void *gpu_q4;               /* [n_q4] struct tuna_cuda_q4 descriptors of 4-bit weights on the GPU */
    int64_t n_gpu_q4;
    struct tuna_lora_dev_cache *lora_dev; /* the linears' LoRA device views and their buffers (device.c) */
    enum tuna_dtype kv_dtype_req; /* opts.kv_cache_dtype, checked (tuna_model_set_kv_dtype); INVALID = auto */
    int64_t lora_fold_cols;     /* the LoRA fold's columns (opts.lora_fold) when q/k/v/gate/up were folded, else 0 */
};

/* Loads config.json and the weights of dir, checks every tensor against the architecture and
 * starts the backend opts asks for (CPU by default; device.c). *out taken by the caller (tuna_model_free). */
tuna_status tuna_model_load(const char *dir, const struct tuna_model_opts *opts, struct tuna_model **out);
void tuna_model_free(struct tuna_model *m); /* accepts NULL */

/* Builds a model over weights the caller owns (bench: synthetic weights in memory): `get` returns
 * the view of a tensor by HF name, or NULL. Views must outlive the model. */
typedef const struct tuna_tensor_view *(*tuna_tensor_lookup)(void *ctx, const char *name);
tuna_status tuna_model_build(const struct tuna_arch *arch, tuna_tensor_lookup get, void *ctx,
                             const struct tuna_model_opts *opts, struct tuna_model **out);

/* A KV cache for this model: n_tokens slots in blocks of block_size (0 = default 16). */
tuna_status tuna_model_kv_new(const struct tuna_model *m, int64_t n_tokens, int32_t block_size,
                              tuna_kv_cache **out);

/* One forward step over a batch (tokens of several sequences, prefill and decode mixed).
 * Each token's position must be at most its sequence's current length (the cache grows to hold
 * it); positions >= max_model_len are refused with TUNA_E_RANGE.
 * logits: [rows with want_logits, V] in batch order. trace: NULL, or keeps what backward needs. */
tuna_status tuna_model_forward(struct tuna_model *m, tuna_kv_cache *kv, const struct tuna_batch *b,
                               float *logits, struct tuna_fwd_trace *trace);
/* The same step for greedy decoding: ids[n_logits] (host) receives the argmax of each row's
 * logits in batch order (lowest id on ties, as tuna_sampler_sample at temperature 0), computed
 * where the logits are (backend argmax op), so a GPU sends n ints instead of n x V floats. */
tuna_status tuna_model_forward_greedy(struct tuna_model *m, tuna_kv_cache *kv, const struct tuna_batch *b,
                                      int32_t *ids);

/* Backend start/stop and device memory (device.c; used by the loader). */
tuna_status tuna_model_start_backend(struct tuna_model *m, const struct tuna_model_opts *opts, int64_t max_k);
void tuna_model_stop_backend(struct tuna_model *m);
bool tuna_model_owns_device_ptr(const struct tuna_model *m, const void *p);
/* Training memory mode (GPU, untied embedding): the embedding table to page-locked host memory the
 * caller owns (`host`, the table's size) and back (device.c). */
tuna_status tuna_model_embed_to_host(struct tuna_model *m, void *host);
tuna_status tuna_model_embed_to_device(struct tuna_model *m);
/* The adapters of a linear layer as the GPU sees them: lin->lora_dev, uploaded now when missing;
 * NULL when the upload fails (tuna_model_lora_prepare reports why). */
const struct tuna_lora_bank *tuna_model_lora_on_device(struct tuna_model *m, const struct tuna_linear *lin);
/* Device bytes the views of `slots` adapters of rank r on q, k, v, o, gate, up and down of every
 * layer take (lora_views_make's layout in the GPU's compute dtype: descriptors, A_all and B_all,
 * with their alignment; on a GPU each buffer rounded up to cudaMalloc's 2 MiB), an upper bound:
 * what `tuna serve` keeps free of the KV cache. 0 for slots or r <= 0. */
size_t tuna_model_lora_view_bytes(const struct tuna_model *m, int slots, int64_t r);
/* Backend bytes the device views made so far hold (0 when none): what the estimate bounds. */
size_t tuna_model_lora_view_bytes_made(const struct tuna_model *m);
/* Uploads the device view of every linear with adapters now, so that an upload failure (GPU
 * memory) is a status here, when adapters are attached, and not a missing update in a later
 * forward. TUNA_OK at once on host-memory backends. */
tuna_status tuna_model_lora_prepare(struct tuna_model *m);
/* Drops every device view (waits for queued work first) and bumps the LoRA generation.
 * tuna_lora_attach and tuna_lora_detach call it; anyone who changes a linear's `lora` array by
 * hand must too. */
void tuna_model_lora_invalidate(struct tuna_model *m);
/* Changes with every tuna_model_lora_invalidate: what identifies the attached adapter set (and
 * its device views) in the keys of captured steps. */
uint64_t tuna_model_lora_generation(const struct tuna_model *m);
/* Block size of a 4-bit weight's absmax, whichever backend holds it. */
int tuna_model_q4_blocksize(const struct tuna_model *m, const struct tuna_weight *w);
/* Bytes of a 4-bit weight's scales as its backend holds them (float32 absmax per block, or on the
 * GPU the double-quantized form: a byte per block + nested floats + code table); 0 for others. */
uint64_t tuna_model_q4_scale_bytes(const struct tuna_model *m, const struct tuna_weight *w);

/* Bytes of weights read per decoded token (every matrix once; the embedding row is negligible). */
uint64_t tuna_model_weight_bytes(const struct tuna_model *m);

#endif
