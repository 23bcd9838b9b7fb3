/* memplan.c — see memplan.h. The activation estimate mirrors forward.c's buffers (rounded up to
 * the power-of-two capacity its workspace grows to). */
#include "model/memplan.h"

#include <string.h>

#include "core/status.h"
#include "core/units.h"
#ifdef TUNA_HAVE_CUDA
#include <cuda_runtime.h>
#endif

static int64_t pow2_cap(int64_t T)
{
    int64_t c = 16;
    while (c < T) c *= 2;
    return c;
}

tuna_status tuna_mem_plan_make(const struct tuna_model *m, const struct tuna_mem_request *r, struct tuna_mem_plan *p)
{
    memset(p, 0, sizeof *p);
    const struct tuna_arch *a = &m->arch;
    const double C = (double)a->hidden_size, HD = (double)(a->n_heads * a->head_dim);
    const double KD = (double)(a->n_kv_heads * a->head_dim), I = (double)a->intermediate_size;
    const double V = (double)a->vocab_size;
    const double T = (double)pow2_cap(r->max_batched_tokens > 0 ? r->max_batched_tokens : 2048);
    p->on_gpu = !m->ops->host_memory;
    p->weights = (double)tuna_model_weight_bytes(m);
    /* x, tmp, sel + one layer's q, k, v, att, xn_attn, xn_mlp, gate, up (float32) */
    p->activations = 4.0 * T * (3 * C + 2 * C + 2 * HD + 2 * KD + 2 * I);
    double maxk = I > C ? I : C;
    if (HD > maxk) maxk = HD;
    p->workspace = 4.0 * (double)(r->max_seqs > 0 ? r->max_seqs : 1) * V; /* logits */
    if (p->on_gpu) {
        p->workspace += 2.0 * T * maxk;                     /* activations rounded to 16 bits for cuBLAS */
        if (m->n_q4) p->workspace += 4.0 * I * C;           /* a 4-bit matrix dequantized for prefill */
        /* cuBLAS workspace, the 4-bit GEMM's split-K sums (q4_mm.cu: at most 16 B x rows x tokens per SM, 17 MB
         * for 128 tokens on 132 SMs), metadata staging, slack */
        p->workspace += 64.0 * 1048576.0;
    }
    p->kv_dtype = tuna_model_kv_dtype(m);
    p->kv_per_token = 2.0 * (double)a->n_layers * KD * (double)tuna_dtype_nbytes(p->kv_dtype, 1);
    int32_t bs = r->block_size > 0 ? r->block_size : 16;
    double kv_bytes;
    if (p->on_gpu) {
#ifdef TUNA_HAVE_CUDA
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        p->gpu_free = (double)fr;
        p->gpu_total = (double)tot;
        p->in_use = (double)(tot - fr);
        double util = r->gpu_memory_utilization > 0 ? r->gpu_memory_utilization : 0.9;
        if (util > 1.0) return tuna_fail(TUNA_E_INVALID, "--gpu-memory-utilization %.2f is over 1", util);
        p->budget = util * (double)tot;
        double left = p->budget - p->in_use - p->activations - p->workspace;
        if (r->kv_cache_gb > 0) {
            kv_bytes = r->kv_cache_gb * 1073741824.0;
            if (kv_bytes > left)
                return tuna_fail(TUNA_E_OOM,
                                 "--kv-cache-gb %.2f does not fit: the GPU has %.2f GiB, %.2f GiB may be used "
                                 "(--gpu-memory-utilization %.2f), %.2f GiB are in use (weights %.2f GiB), activations "
                                 "need %.2f GiB and workspaces %.2f GiB, leaving %.2f GiB; lower --kv-cache-gb, "
                                 "--max-num-batched-tokens or --max-num-seqs, or raise --gpu-memory-utilization",
                                 r->kv_cache_gb, tot / 1073741824.0, p->budget / 1073741824.0, util,
                                 p->in_use / 1073741824.0, p->weights / 1073741824.0,
                                 p->activations / 1073741824.0, p->workspace / 1073741824.0,
                                 left / 1073741824.0);
        } else {
            if (left <= 0)
                return tuna_fail(TUNA_E_OOM,
                                 "no room for a KV cache: the GPU has %.2f GiB, %.2f GiB may be used "
                                 "(--gpu-memory-utilization %.2f), %.2f GiB are in use (weights %.2f GiB), "
                                 "activations need %.2f GiB and workspaces %.2f GiB; lower --max-num-batched-tokens, "
                                 "use --load-in-4bit, or raise --gpu-memory-utilization",
                                 tot / 1073741824.0, p->budget / 1073741824.0, util, p->in_use / 1073741824.0,
                                 p->weights / 1073741824.0, p->activations / 1073741824.0,
                                 p->workspace / 1073741824.0);
            kv_bytes = left;
        }
#else
        return tuna_fail(TUNA_E_INTERNAL, "GPU memory plan without the CUDA backend");
#endif
    } else {
        kv_bytes = (r->kv_cache_gb > 0 ? r->kv_cache_gb : 1.0) * 1073741824.0;
    }
    p->kv_blocks = (int64_t)(kv_bytes / (p->kv_per_token * bs));
    p->kv_tokens = p->kv_blocks * bs;
    p->kv_bytes = (double)p->kv_tokens * p->kv_per_token;
    if (p->kv_tokens < m->max_model_len)
        return tuna_fail(TUNA_E_OOM,
                         "the KV cache (%lld tokens, %.2f GiB at %.1f KiB per token) cannot hold one sequence of "
                         "--max-model-len %lld tokens: raise --kv-cache-gb (or --gpu-memory-utilization) or lower "
                         "--max-model-len",
                         (long long)p->kv_tokens, p->kv_bytes / 1073741824.0, p->kv_per_token / 1024.0,
                         (long long)m->max_model_len);
    return TUNA_OK;
}

void tuna_mem_plan_print(const struct tuna_mem_plan *p, const struct tuna_model *m, FILE *f)
{
    char b[6][32];
    fprintf(f, "memory plan (%s):\n", m->device_desc);
    if (p->on_gpu)
        fprintf(f, "  GPU memory          %s total, %s budget (%.0f%%)\n", tuna_fmt_bytes(b[0], 32, p->gpu_total),
                tuna_fmt_bytes(b[1], 32, p->budget), 100.0 * p->budget / p->gpu_total);
    fprintf(f, "  weights             %s%s\n", tuna_fmt_bytes(b[2], 32, p->weights),
            p->on_gpu ? " on the GPU" : " (mapped from the files)");
    if (p->on_gpu) fprintf(f, "  in use now          %s (weights, CUDA context, other processes)\n",
                           tuna_fmt_bytes(b[0], 32, p->in_use));
    fprintf(f, "  peak activations    %s\n", tuna_fmt_bytes(b[3], 32, p->activations));
    fprintf(f, "  workspaces          %s\n", tuna_fmt_bytes(b[4], 32, p->workspace));
    fprintf(f, "  KV cache            %s = %lld blocks = %lld tokens (%.1f KiB per token, %s); %.2fx of max "
               "model len %lld\n",
            tuna_fmt_bytes(b[5], 32, p->kv_bytes), (long long)p->kv_blocks, (long long)p->kv_tokens,
            p->kv_per_token / 1024.0, tuna_dtype_torch_name(p->kv_dtype), (double)p->kv_tokens / (double)m->max_model_len,
            (long long)m->max_model_len);
}
