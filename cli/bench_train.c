/* bench_train.c — `tuna bench train`: LoRA / QLoRA fine-tuning speed on a synthetic model (random
 * bf16 weights of real shapes, made in memory: cmd_bench.c), measured as the peer script
 * (shared/bench/peer_bench.py train_bench) measures Hugging Face + PEFT: batch 1 of `--seq`
 * random tokens with labels = inputs, r 16 on all seven projections, AdamW; warm-up steps, then
 * the mean time of the timed steps. Reports tokens/s, peak GPU memory, and model-FLOPs
 * utilization against the bf16 GEMM rate measured in the same run (8192^3 through the backend's
 * own matmul op, the peer's torch.mm(8192, 8192)).
 *
 * Conventions (stated in the output and docs/PERFORMANCE.md):
 * - model FLOPs per token = 6 N, N = the parameters of every matmul (the seven projections of
 *   every layer and lm_head; the embedding is a lookup) — the usual 6N of LoRA/QLoRA MFU, though a
 *   frozen base does no weight-gradient GEMMs (4N of real work); mfu_attn adds causal attention,
 *   6 L S H D per token (half of PaLM's 12 L S H D: causal);
 * - peak GPU memory = the largest drop of cudaMemGetInfo's free memory from before the model was
 *   made, sampled after each step (every buffer the trainer and backend take is persistent, so the
 *   value after a step is the step's high-water mark; the CUDA context is excluded).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "cli.h"
#include "core/dtype.h"
#include "core/status.h"
#include "infer_common.h"
#include "train/trainer.h"
#ifdef TUNA_HAVE_CUDA
#include "backend/cuda/device.h"
#endif

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tuna bench train --synthetic llama-2-7b|llama-3-8b|llama-3.2-1b|llama-3-tiny [--seq 2048]\n"
            "                        [--batch 1] [--lora-r 16] [--load-in-4bit] [--gradient-checkpointing]\n"
            "                        [--offload] [--steps 3] [--warmup 1] [--device cuda|cpu]\n"
            "                        [--dtype auto|bfloat16|float32]\n\n"
            "LoRA (QLoRA with --load-in-4bit: NF4 + double quant) training on all seven projections of a\n"
            "synthetic model: tokens/s, peak GPU memory, model-FLOPs utilization (6N per token) against the\n"
            "bf16 GEMM rate measured in the same run. One JSON line per measurement on stdout; the memory\n"
            "plan and, after the first step, what the trainer holds by category on stderr.\n"
            "--offload: the memory mode (gradient checkpointing with the layer inputs in page-locked host\n"
            "memory, AdamW on the host, the MLP in chunks of rows; Unsloth's \"unsloth\" checkpointing).\n");
}

/* GPU memory in use by this process since `free0` (bytes; 0 without CUDA). */
static uint64_t gpu_used(int device, uint64_t free0)
{
#ifdef TUNA_HAVE_CUDA
    struct tuna_cuda_device_info info;
    if (free0 && !tuna_cuda_device_query(device, &info) && free0 > info.free_bytes) return free0 - info.free_bytes;
#else
    (void)device, (void)free0;
#endif
    return 0;
}

static uint64_t gpu_free(int device)
{
#ifdef TUNA_HAVE_CUDA
    struct tuna_cuda_device_info info;
    if (!tuna_cuda_device_query(device, &info)) return info.free_bytes;
#else
    (void)device;
#endif
    return 0;
}

/* TFLOP/s of y[n,n] = x[n,n] W^T with a bf16 W through the backend (n = 8192 on a GPU, 1024 on
 * the CPU): bf16 x and y through the 16-bit matmul where the backend has one (a plain bf16 GEMM,
 * what torch.mm measures), else the float32-activation matmul (which adds the conversion of x).
 * 0 when the buffers cannot be had. */
double bench_gemm_rate(struct tuna_model *m)
{
    const int64_t n = m->ops->host_memory ? 1024 : 8192;
    const size_t nn = (size_t)(n * n);
    float *hx = malloc(nn * sizeof(float));
    uint16_t *hw = malloc(nn * sizeof(uint16_t));
    void *x = NULL, *w = NULL, *y = NULL;
    double rate = 0;
    if (!hx || !hw) goto done;
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < nn; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        hx[i] = (float)((double)(s >> 11) / 9007199254740992.0 - 0.5);
    }
    tuna_convert_from_f32(TUNA_DTYPE_BF16, hx, hw, nn);
    if (m->ops->alloc(m->be, nn * 4, &x) || m->ops->alloc(m->be, nn * 2, &w) || m->ops->alloc(m->be, nn * 4, &y) ||
        m->ops->upload(m->be, x, hx, nn * 4) || m->ops->upload(m->be, w, hw, nn * 2))
        goto done;
    struct tuna_weight wt = {TUNA_DTYPE_BF16, n, n, w, NULL, 0};
    /* the 16-bit form reads x as bf16: the weight's bits serve (any bf16 values do) */
    const bool h16 = m->ops->matmul16 && m->ops->matmul16(m->be, y, TUNA_DTYPE_BF16, w, TUNA_DTYPE_BF16, &wt, NULL, n,
                                                          false); /* also the warm-up */
    if (!h16) m->ops->matmul(m->be, y, x, &wt, NULL, n); /* warm-up (cuBLAS heuristics, buffers) */
    if (m->ops->sync(m->be)) goto done;
    const int iters = m->ops->host_memory ? 2 : 10;
    double t0 = now_s();
    for (int i = 0; i < iters; i++) {
        if (h16) m->ops->matmul16(m->be, y, TUNA_DTYPE_BF16, w, TUNA_DTYPE_BF16, &wt, NULL, n, false);
        else m->ops->matmul(m->be, y, x, &wt, NULL, n);
    }
    if (m->ops->sync(m->be)) goto done;
    rate = 2.0 * (double)n * (double)n * (double)n * iters / (now_s() - t0) / 1e12;
done:
    m->ops->release(m->be, x);
    m->ops->release(m->be, w);
    m->ops->release(m->be, y);
    free(hx);
    free(hw);
    return rate;
}

/* What the first step held, by category: the model's weights (measured after load; the 16-bit
 * embedding and lm_head by construction), the trainer's buffers (tuna_trainer_memory), and the
 * rest of the measured peak (the backend's scratch: cuBLAS workspace, a dequantized 4-bit weight,
 * 16-bit copies of GEMM inputs; allocator rounding). One JSON line on stdout, a table on stderr. */
static void print_memory(const tuna_trainer *t, const struct tuna_model *m, bool load4, uint64_t weights,
                         uint64_t peak)
{
    struct tuna_train_memory tm;
    tuna_trainer_memory(t, &tm);
    const struct tuna_arch *a = &m->arch;
    const double GB = 1e9;
    const size_t emb = tuna_dtype_nbytes(m->embed.dtype, (uint64_t)(a->vocab_size * a->hidden_size));
    const size_t head = m->lm_head.w.data == m->embed.data ? 0 : emb;
    /* offload: the trainer moved the embedding table to host memory after the measurement */
    if (tm.host_embedding && weights >= tm.host_embedding) weights -= tm.host_embedding;
    const size_t other = peak > weights + tm.total ? (size_t)(peak - weights - tm.total) : 0;
    fprintf(stderr,
            "memory (GB = 1e9 bytes; %lld tokens):\n"
            "  model weights (measured)        %7.3f  (of which embedding %.3f%s, lm_head %.3f%s)\n"
            "  LoRA params+grads%s     %7.3f\n"
            "  checkpoints (device)            %7.3f\n"
            "  kept layer activations          %7.3f\n"
            "  layer backward buffers          %7.3f  (MLP rows per chunk %lld)\n"
            "  residual, selected rows, lse    %7.3f\n"
            "  attention scratch               %7.3f\n"
            "  logits chunk                    %7.3f  (%lld rows)\n"
            "  LoRA / dropout scratch          %7.3f\n"
            "  backend scratch and other       %7.3f  (measured peak minus the above)\n"
            "  peak (cudaMemGetInfo)           %7.3f\n"
            "  host: checkpoints %.3f, optimizer %.3f, embedding %.3f\n",
            (long long)tm.tokens, (double)weights / GB, tm.host_embedding ? 0.0 : (double)emb / GB,
            tm.host_embedding ? " (on the host)" : "", (double)head / GB,
            load4 ? ", layers NF4" : "", tm.host_optimizer ? "          " : "+AdamW    ",
            (double)tm.lora_state / GB, (double)tm.checkpoints / GB, (double)tm.layer_acts / GB,
            (double)tm.layer_grads / GB, (long long)tm.mlp_rows, (double)tm.residual / GB, (double)tm.attention / GB,
            (double)tm.logits / GB, (long long)tm.head_rows, (double)tm.lora_work / GB, (double)other / GB,
            (double)peak / GB, (double)tm.host_checkpoints / GB, (double)tm.host_optimizer / GB,
            (double)tm.host_embedding / GB);
    printf("{\"what\": \"tuna_train_memory\", \"weights_GB\": %.4f, \"lora_state_GB\": %.4f, \"checkpoints_GB\": "
           "%.4f, \"layer_acts_GB\": %.4f, \"layer_grads_GB\": %.4f, \"residual_GB\": %.4f, \"attention_GB\": %.4f, "
           "\"logits_GB\": %.4f, \"lora_work_GB\": %.4f, \"other_GB\": %.4f, \"peak_GB\": %.4f, "
           "\"host_checkpoints_GB\": %.4f, \"host_optimizer_GB\": %.4f, \"host_embedding_GB\": %.4f}\n",
           (double)weights / GB, (double)tm.lora_state / GB, (double)tm.checkpoints / GB, (double)tm.layer_acts / GB,
           (double)tm.layer_grads / GB, (double)tm.residual / GB, (double)tm.attention / GB, (double)tm.logits / GB,
           (double)tm.lora_work / GB, (double)other / GB, (double)peak / GB, (double)tm.host_checkpoints / GB,
           (double)tm.host_optimizer / GB, (double)tm.host_embedding / GB);
    fflush(stdout);
}

int bench_train_main(int argc, char **argv)
{
    const char *synth_name = NULL;
    long long seq = 2048, batch = 1, r = 16, steps = 3, warm = 1;
    bool load4 = false, ckpt = false, offload = false, bad = false;
    struct tuna_model_opts mo = {0};
    mo.device = TUNA_DEVICE_AUTO;
    for (int i = 1; i < argc && !bad; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--synthetic", &synth_name, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--seq", &seq, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--batch", &batch, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--lora-r", &r, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--steps", &steps, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--warmup", &warm, &bad))
            continue;
        if (!strcmp(a, "--load-in-4bit")) {
            load4 = true;
            continue;
        }
        if (!strcmp(a, "--gradient-checkpointing")) {
            ckpt = true;
            continue;
        }
        if (!strcmp(a, "--offload")) {
            offload = ckpt = true;
            continue;
        }
        if ((!strcmp(a, "--device") || !strcmp(a, "--dtype")) && infer_device_parse(&mo, argc, argv, &i, &bad))
            continue;
        fprintf(stderr, "tuna bench train: unexpected argument %s\n", a);
        bad = true;
    }
    if (bad || !synth_name || seq < 2 || batch < 1 || r < 1 || steps < 1 || warm < 0) {
        usage(stderr);
        return 2;
    }
    mo.load_in_4bit = load4;
    mo.weight_arena = offload; /* the memory mode: no 2 MiB page rounding per weight */
    mo.quiet = true;
    const int dev = mo.device == TUNA_DEVICE_CPU ? -1 : mo.cuda_device;
    const uint64_t free0 = dev >= 0 ? gpu_free(dev) : 0;

    struct synth syn = {0};
    struct tuna_model *m = NULL;
    tuna_trainer *t = NULL;
    int32_t *ids = NULL, *labels = NULL, *attn = NULL;
    int64_t *len = NULL;
    double t0 = now_s();
    tuna_status st = bench_synth_model(synth_name, &mo, &syn, &m);
    if (st) return tuna_cli_fail("bench train", st);
    const double load_s = now_s() - t0;
    const bool gpu = !m->ops->host_memory;
    const uint64_t weights_bytes = gpu ? gpu_used(dev, free0) : 0;
    const struct tuna_arch *a = &m->arch;
    if (seq > m->max_model_len) {
        st = tuna_fail(TUNA_E_INVALID, "--seq %lld is past the model's context of %lld", seq,
                       (long long)m->max_model_len);
        goto done;
    }
    fprintf(stderr, "model: synthetic %s on %s%s; seq %lld x batch %lld, r %lld, %s\n", synth_name, m->device_desc,
            load4 ? ", NF4 base (double quant)" : "", seq, batch, r,
            offload ? "offload (checkpoints and AdamW on the host)"
            : ckpt  ? "gradient checkpointing"
                    : "every activation kept");

    struct tuna_lora_train_opts lo;
    tuna_lora_train_opts_default(&lo);
    lo.r = r;
    lo.alpha = (double)r;
    lo.gradient_checkpointing = ckpt;
    lo.offload = offload;
    struct tuna_optim_opts oo;
    tuna_optim_opts_default(&oo);
    oo.lr = 1e-4; /* the peer's */
    oo.schedule = TUNA_LR_CONSTANT;
    if ((st = tuna_trainer_new(m, &lo, &oo, NULL, &t))) goto done;

    const int64_t B = batch, T = seq, V = a->vocab_size;
    ids = malloc((size_t)(B * T) * sizeof *ids);
    labels = malloc((size_t)(B * T) * sizeof *labels);
    attn = malloc((size_t)(B * T) * sizeof *attn);
    len = malloc((size_t)B * sizeof *len);
    if (!ids || !labels || !attn || !len) {
        st = tuna_fail_oom("benchmark batch", (size_t)(B * T) * 12);
        goto done;
    }
    uint64_t s = 12345;
    for (int64_t i = 0; i < B * T; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int32_t)((s >> 33) % (uint64_t)V);
        labels[i] = ids[i];
        attn[i] = 1;
    }
    for (int64_t b = 0; b < B; b++)
        len[b] = T;
    struct tuna_train_batch tb = {B, T, ids, labels, attn, len, B * (T - 1)};
    uint64_t peak = 0;
    double timed = 0, loss0 = 0, loss1 = 0;
    for (long long k = 0; k < warm + steps; k++) {
        struct tuna_step_stats ss;
        if ((st = tuna_trainer_step(t, &tb, 1, &ss))) goto done;
        if (k >= warm) timed += ss.seconds;
        if (k == 0) loss0 = ss.loss;
        loss1 = ss.loss;
        uint64_t u = gpu ? gpu_used(dev, free0) : 0;
        if (u > peak) peak = u;
        fprintf(stderr, "  step %lld%s: loss %.4f, %.3f s, %.0f tokens/s\n", k + 1, k < warm ? " (warm-up)" : "",
                ss.loss, ss.seconds, (double)(B * T) / ss.seconds);
        if (k == 0) print_memory(t, m, load4, gpu ? weights_bytes : 0, u);
    }
    const double step_s = timed / (double)steps, tok_s = (double)(B * T) / step_s;
    /* FLOPs: 6 N per token, N = every matmul's parameters */
    const int64_t C = a->hidden_size, HD = a->n_heads * a->head_dim, KD = a->n_kv_heads * a->head_dim;
    const double n_layer = (double)(C * HD * 2 + C * KD * 2 + 3 * C * a->intermediate_size);
    const double N = n_layer * (double)a->n_layers + (double)V * (double)C;
    const double attn_flops = 6.0 * (double)a->n_layers * (double)T * (double)HD; /* per token, causal */
    tuna_trainer_free(t);
    t = NULL;
    const double gemm = bench_gemm_rate(m);
    const double model_tflops = 6.0 * N * tok_s / 1e12, attn_tflops = attn_flops * tok_s / 1e12;
    printf("{\"what\": \"bf16_gemm_%d\", \"device\": \"%s\", \"TFLOPs\": %.4g, \"via\": \"%s\"}\n",
           m->ops->host_memory ? 1024 : 8192, m->ops->name, gemm,
           m->ops->matmul16 ? "tuna matmul16 op (bf16 in and out, f32 accumulation)"
                            : "tuna matmul op (f32 activations rounded to bf16, f32 accumulation)");
    printf("{\"what\": \"tuna_train\", \"shape\": \"%s\", \"seq\": %lld, \"batch\": %lld, \"quant\": \"%s\", "
           "\"lora_r\": %lld, \"grad_ckpt\": %s, \"offload\": %s, \"device\": \"%s\", \"tok_per_s\": %.1f, \"step_s\": %.3f, "
           "\"peak_GiB\": %.2f, \"weights_GiB\": %.2f, \"model_TFLOPs\": %.4g, \"mfu\": %.3f, \"mfu_attn\": %.3f, "
           "\"flops_convention\": \"6N per token, N=%.3g (matmul weights incl. lm_head)\", \"loss_first\": %.4f, "
           "\"loss_last\": %.4f, \"load_s\": %.1f}\n",
           synth_name, seq, batch, load4 ? "nf4-dq" : "bf16", r, ckpt ? "true" : "false", offload ? "true" : "false",
           m->device_desc, tok_s, step_s,
           (double)peak / 1073741824.0, (double)weights_bytes / 1073741824.0, model_tflops,
           gemm > 0 ? model_tflops / gemm : 0.0, gemm > 0 ? (model_tflops + attn_tflops) / gemm : 0.0, N, loss0, loss1,
           load_s);
    fflush(stdout);
done:
    tuna_trainer_free(t);
    free(ids), free(labels), free(attn), free(len);
    tuna_model_free(m);
    bench_synth_free(&syn);
    return st ? tuna_cli_fail("bench train", st) : 0;
}
