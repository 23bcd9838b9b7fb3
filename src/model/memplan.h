/* memplan.h — the memory plan: what a model will take before the big allocations happen.
 *
 * Weights (already resident: mapped on the CPU, on the device for CUDA), the forward pass's peak
 * activations for the largest step, the backend's workspaces (16-bit activation copies for
 * cuBLAS, a dequantized 4-bit matrix for prefill GEMMs, logits), and what is left for the paged
 * KV cache under --gpu-memory-utilization (GPU) or --kv-cache-gb. Printed as one table at start;
 * a plan that does not fit is a TUNA_E_OOM with the numbers, never a crash later.
 */
#ifndef TUNA_MODEL_MEMPLAN_H
#define TUNA_MODEL_MEMPLAN_H

#include <stdint.h>
#include <stdio.h>

#include "model/model.h"

struct tuna_mem_request {
    int64_t max_batched_tokens; /* tokens in one forward step */
    int64_t max_seqs;           /* sequences in one step (rows of logits) */
    int32_t block_size;         /* KV tokens per block */
    double kv_cache_gb;         /* > 0: this much KV cache, else what the GPU budget leaves */
    double gpu_memory_utilization; /* fraction of the GPU's memory tuna may use (default 0.9) */
};

struct tuna_mem_plan {
    bool on_gpu;
    double gpu_total, gpu_free;  /* bytes, at planning time (after the weights were loaded) */
    double budget;               /* gpu_total × utilization */
    double weights;              /* bytes of weights read per step (stored/compute dtype) */
    double in_use;               /* on the GPU: total − free now (weights, context, other processes) */
    double activations;          /* peak forward buffers for max_batched_tokens */
    double workspace;            /* backend scratch: 16-bit activations, dequantized 4-bit weight, logits */
    enum tuna_dtype kv_dtype;    /* element type of the KV cache (tuna_model_kv_dtype) */
    double kv_per_token;         /* bytes, all layers, K and V, in kv_dtype */
    int64_t kv_blocks, kv_tokens;
    double kv_bytes;
};

tuna_status tuna_mem_plan_make(const struct tuna_model *m, const struct tuna_mem_request *r, struct tuna_mem_plan *p);
void tuna_mem_plan_print(const struct tuna_mem_plan *p, const struct tuna_model *m, FILE *f);

#endif
