/* engine_opts.c — see engine_opts.h. */
#include "engine_opts.h"

#include <string.h>

#include "cli.h"
#include "core/status.h"
#include "infer_common.h"
#include "model/memplan.h"
#include "serve/loras.h"

void engine_opts_init(struct engine_opts *o)
{
    memset(o, 0, sizeof *o);
    o->block_size = 16;
    o->max_num_seqs = 128;
    o->max_batched = 2048;
    o->gpu_util = 0.9;
    o->prefix_caching = true;
    o->dev.device = TUNA_DEVICE_AUTO;
}

bool engine_opts_parse(struct engine_opts *o, int argc, char **argv, int *i, bool *bad)
{
    if (tuna_cli_opt_int(argc, argv, i, "--max-model-len", &o->max_model_len, bad) ||
        tuna_cli_opt_int(argc, argv, i, "--block-size", &o->block_size, bad) ||
        tuna_cli_opt_int(argc, argv, i, "--max-num-seqs", &o->max_num_seqs, bad) ||
        tuna_cli_opt_int(argc, argv, i, "--max-num-batched-tokens", &o->max_batched, bad) ||
        tuna_cli_opt_int(argc, argv, i, "--threads", &o->threads, bad) ||
        tuna_cli_opt_float(argc, argv, i, "--kv-cache-gb", &o->kv_gb, bad) ||
        tuna_cli_opt_float(argc, argv, i, "--gpu-memory-utilization", &o->gpu_util, bad))
        return true;
    if (infer_device_parse(&o->dev, argc, argv, i, bad)) return true;
    if (!strcmp(argv[*i], "--enable-prefix-caching") || !strcmp(argv[*i], "--no-enable-prefix-caching")) {
        o->prefix_caching = argv[*i][2] == 'e';
        return true;
    }
    return false;
}

bool engine_opts_check(const struct engine_opts *o, const char *cmd)
{
    if (o->kv_gb < 0 || o->gpu_util <= 0 || o->gpu_util > 1 || o->block_size < 1 || o->block_size > 1024 ||
        o->max_num_seqs < 1 || o->max_num_seqs > 1024 || o->max_batched < 1 || o->max_model_len < 0 ||
        o->threads < 0) {
        fprintf(stderr, "%s: out of range: --kv-cache-gb >= 0, --gpu-memory-utilization in (0, 1], --block-size "
                        "1..1024, --max-num-seqs 1..1024, --max-num-batched-tokens >= 1, --max-model-len and "
                        "--threads >= 0\n", cmd);
        return false;
    }
    return true;
}

void engine_opts_help(FILE *f)
{
    fprintf(f, "  --max-model-len N             context limit (default: max_position_embeddings)\n"
               "  --kv-cache-gb G               KV cache size in GiB (default: 1 on the CPU; on the GPU what\n"
               "                                --gpu-memory-utilization leaves after weights and activations)\n"
               "  --gpu-memory-utilization F    fraction of the GPU's memory tuna may use (default 0.9)\n"
               "  --block-size N                KV tokens per block (default 16)\n"
               "  --max-num-seqs N              sequences running at once (default 128, at most 1024)\n"
               "  --max-num-batched-tokens N    tokens per step, prefill chunks included (default 2048)\n"
               "  --enable-prefix-caching       reuse cached KV blocks of earlier prompts that share a prefix\n"
               "  --no-enable-prefix-caching    (default: on, as vLLM; hits count in vllm:prefix_cache_hits)\n"
               "  --threads N                   CPU threads (default: all)\n"
               "  --device D                    cpu, cuda, cuda:N or auto (default: the GPU when there is one)\n"
               "  --dtype T                     GPU compute dtype: auto, bfloat16, float16, float32\n"
               "  --kv-cache-dtype T            KV cache: auto (the compute dtype; float32 on the CPU), bfloat16,\n"
               "                                float16, fp8 (= fp8_e4m3, GPU only: 1 byte per element, ~2x tokens)\n"
               "  --load-in-4bit                quantize 16-bit weights to NF4 (double quant) at load\n");
}

struct tuna_model_opts engine_opts_model(const struct engine_opts *o)
{
    struct tuna_model_opts mo = o->dev;
    mo.threads = (int)o->threads;
    mo.max_model_len = o->max_model_len;
    return mo;
}

tuna_status engine_opts_plan(const struct engine_opts *o, const struct tuna_model *m, int lora_slots,
                             long long lora_rank, struct tuna_engine_config *ec)
{
    struct tuna_mem_request mr = {o->max_batched, o->max_num_seqs, (int32_t)o->block_size, o->kv_gb, o->gpu_util};
    struct tuna_mem_plan plan;
    tuna_status st = tuna_mem_plan_make(m, &mr, &plan);
    if (st) return st;
    tuna_mem_plan_print(&plan, m, stderr);
    fprintf(stderr, "  max concurrency     %.2fx requests of %lld tokens; prefix caching %s\n",
            (double)plan.kv_tokens / (double)m->max_model_len, (long long)m->max_model_len,
            o->prefix_caching ? "on" : "off");
    ec->kv_tokens = plan.kv_tokens;
    if (plan.on_gpu && o->kv_gb <= 0 && lora_slots > 0) {
        /* the adapters' GPU copies come out of the KV cache's share: every slot at the rank limit */
        double lb = tuna_serve_lora_bytes(m, lora_slots, lora_rank);
        int64_t drop = (int64_t)(lb / plan.kv_per_token) + 1;
        drop = (drop + o->block_size - 1) / o->block_size * o->block_size;
        if (plan.kv_tokens - drop < m->max_model_len)
            return tuna_fail(TUNA_E_OOM, "%d LoRA slots of rank %lld need %.2f GiB of GPU memory, which leaves the KV "
                             "cache less than one sequence of %lld tokens: lower --max-loras, --max-lora-rank or "
                             "--max-model-len, or raise --gpu-memory-utilization", lora_slots, lora_rank,
                             lb / 1073741824.0, (long long)m->max_model_len);
        ec->kv_tokens -= drop;
        fprintf(stderr, "  LoRA adapters       %.2f GiB kept for %d slots of rank <= %lld: KV cache %lld tokens\n",
                lb / 1073741824.0, lora_slots, lora_rank, (long long)ec->kv_tokens);
    }
    ec->block_size = (int32_t)o->block_size;
    ec->max_num_seqs = o->max_num_seqs;
    ec->max_num_batched_tokens = o->max_batched;
    ec->enable_prefix_caching = o->prefix_caching;
    return TUNA_OK;
}
