/* bench_cuda_ops.c — the CUDA backend's ops at real model sizes, against the machine's ceilings.
 *
 * Measures, on GPU 0: device-to-device copy bandwidth (the memory roofline), the decode matmul
 * (fused GEMV, T = 1..8) on Llama-3-8B's weight shapes in bf16 as achieved GB/s of weights read,
 * the prefill matmul (cuBLAS bf16, T = 512 and 2048) as TFLOP/s, and attention over a paged bf16
 * KV cache with Llama-3-8B heads (H 32, Hkv 8, D 128, blocks of 16): decode at batch 1 / 4k
 * context and batch 32 / 128 at 1k as achieved GB/s of K and V read, prefill of 2048 tokens as
 * TFLOP/s of the causal QK^T and PV products. Prints one table. Timings: CUDA events, median of
 * repeats after warm-up, weights and KV caches rotated among several copies so the 50 MB L2
 * cache does not serve them. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda.h"
#include "core/dtype.h"

#define CK(x)                                                                                                          \
    do {                                                                                                               \
        cudaError_t e_ = (x);                                                                                          \
        if (e_ != cudaSuccess) {                                                                                       \
            fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                                                   \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

static int cmp_f(const void *a, const void *b);
static void *dev_random_bf16(size_t n);

static double g_copy_gbs; /* the copy rate measured first (decode attention lines print their share) */

/* One attention shape: 4 batches over 4 copies of the cache, used in turn. */
struct att_bench {
    tuna_backend *be;
    float *out, *q;
    void *kc, *vc;
    struct tuna_attn_batch b[4];
};

/* Median seconds of the attention op over reps runs after 3 warm-ups, rotating the copies. */
static double time_attention(struct att_bench *a, int reps, cudaEvent_t e0, cudaEvent_t e1)
{
    float ms[64];
    for (int r = 0; r < reps + 3; r++) {
        CK(cudaEventRecord(e0, 0));
        tuna_cuda_backend_ops()->attention(a->be, a->out, a->q, a->kc, a->vc, TUNA_DTYPE_BF16, &a->b[r % 4], 32, 8,
                                           128, 0.08838834764831845f);
        CK(cudaEventRecord(e1, 0));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms[r], e0, e1));
    }
    if (tuna_cuda_status(a->be)) {
        fprintf(stderr, "%s\n", tuna_last_error());
        exit(1);
    }
    qsort(ms + 3, (size_t)reps, sizeof(float), cmp_f);
    return ms[3 + reps / 2] * 1e-3;
}

/* Mean seconds per call of reps calls queued back to back (rotating the copies): the GPU's time
 * per call when the host keeps ahead of it (no gap between kernels), as in a CUDA-graph step. */
static double time_attention_b2b(struct att_bench *a, int reps, cudaEvent_t e0, cudaEvent_t e1)
{
    float ms = 0.0f;
    CK(cudaEventRecord(e0, 0));
    for (int r = 0; r < reps; r++)
        tuna_cuda_backend_ops()->attention(a->be, a->out, a->q, a->kc, a->vc, TUNA_DTYPE_BF16, &a->b[r % 4], 32, 8,
                                           128, 0.08838834764831845f);
    CK(cudaEventRecord(e1, 0));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1e-3 / reps;
}

/* Attention cases: nseq sequences of ctx tokens each, n_new query tokens per sequence at its
 * end (1 = decode, ctx = prefill from scratch); 4 copies of the cache, one per rotation (one when
 * a copy is over 256 MB: far past the L2 cache, and quicker to fill). */
static void bench_attention(tuna_backend *be, const char *label, int64_t nseq, int64_t ctx, int64_t n_new,
                            cudaEvent_t e0, cudaEvent_t e1)
{
    const int64_t H = 32, Hkv = 8, D = 128, bs = 16, max_len = 8192;
    const int64_t ncopy = nseq * ctx * Hkv * D * 2 >= ((int64_t)256 << 20) ? 1 : 4;
    const int64_t blocks_per_seq = (ctx + bs - 1) / bs, nblocks = ncopy * nseq * blocks_per_seq;
    const int64_t T = nseq * n_new;
    struct att_bench a = {be, NULL, NULL, NULL, NULL, {{0}}};
    a.kc = dev_random_bf16((size_t)(nblocks * bs * Hkv * D));
    a.vc = dev_random_bf16((size_t)(nblocks * bs * Hkv * D));
    CK(cudaMalloc((void **)&a.out, (size_t)(T * H * D) * 4));
    CK(cudaMalloc((void **)&a.q, (size_t)(T * H * D) * 4));
    CK(cudaMemset(a.q, 0x3c, (size_t)(T * H * D) * 4));
    int32_t *tables = malloc((size_t)nblocks * sizeof(int32_t));
    for (int64_t i = 0; i < nblocks; i++) tables[i] = (int32_t)((i * 7919) % nblocks); /* scattered blocks */
    int64_t *pos = malloc((size_t)T * sizeof(int64_t));
    const int32_t **bt = malloc((size_t)(4 * T) * sizeof(*bt));
    for (int64_t s = 0, t = 0; s < nseq; s++)
        for (int64_t i = 0; i < n_new; i++, t++) pos[t] = ctx - n_new + i;
    for (int c = 0; c < 4; c++) {
        for (int64_t t = 0; t < T; t++) bt[c * T + t] = tables + ((c % ncopy) * nseq + t / n_new) * blocks_per_seq;
        a.b[c] = (struct tuna_attn_batch){T, pos, bt + c * T, (int32_t)bs, 0, (int32_t)(max_len / bs), NULL};
    }
    double t = time_attention(&a, 20, e0, e1);
    if (n_new == 1) {
        double bytes = (double)nseq * (double)ctx * (double)(Hkv * D) * 2.0 * 2.0; /* K and V, bf16 */
        double tb = time_attention_b2b(&a, 40, e0, e1);
        printf("%-44s %10.1f GB/s  %5.1f%% of copy  %8.1f us  (back to back: %.1f us, %.1f GB/s)\n", label,
               bytes / t / 1e9, g_copy_gbs > 0 ? 100.0 * bytes / t / 1e9 / g_copy_gbs : 0.0, t * 1e6, tb * 1e6,
               bytes / tb / 1e9);
    } else {
        double flops = 4.0 * (double)H * (double)D * (double)nseq * (double)n_new * (double)(n_new + 1) / 2.0;
        printf("%-44s %10.1f TFLOP/s %15.1f us\n", label, flops / t / 1e12, t * 1e6);
    }
    CK(cudaFree(a.kc));
    CK(cudaFree(a.vc));
    CK(cudaFree(a.out));
    CK(cudaFree(a.q));
    free(tables), free(pos), free(bt);
}

static int cmp_f(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void *dev_random_bf16(size_t n)
{
    uint16_t *h = malloc(n * 2);
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        h[i] = tuna_f32_to_bf16(((float)(s >> 40) / 16777216.0f - 0.5f) * 0.05f);
    }
    void *d;
    CK(cudaMalloc(&d, n * 2));
    CK(cudaMemcpy(d, h, n * 2, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

int main(void)
{
    tuna_backend *be;
    if (tuna_cuda_backend_new(0, &be)) {
        fprintf(stderr, "bench_cuda_ops: %s\n", tuna_last_error());
        return 1;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float ms[64];
    const int reps = 30;

    /* memory roofline: a 2 GiB device-to-device copy counts read + write */
    size_t big = (size_t)1 << 30;
    void *a, *b;
    CK(cudaMalloc(&a, big));
    CK(cudaMalloc(&b, big));
    CK(cudaMemset(a, 1, big));
    for (int r = 0; r < 12; r++) {
        CK(cudaEventRecord(e0, 0));
        CK(cudaMemcpyAsync(b, a, big, cudaMemcpyDeviceToDevice, 0));
        CK(cudaEventRecord(e1, 0));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms[r], e0, e1));
    }
    qsort(ms + 2, 10, sizeof(float), cmp_f);
    double copy_gbs = 2.0 * (double)big / (ms[7] * 1e-3) / 1e9;
    g_copy_gbs = copy_gbs;
    CK(cudaFree(a));
    CK(cudaFree(b));
    printf("device: %s (cc %d.%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
    printf("%-44s %10.1f GB/s\n", "device-to-device copy (read+write)", copy_gbs);

    /* Llama-3-8B linear shapes: q, k/v, o, gate/up, down, lm_head */
    static const struct {
        const char *name;
        int64_t N, K;
    } shapes[] = {{"q_proj / o_proj 4096x4096", 4096, 4096},
                  {"k_proj / v_proj 1024x4096", 1024, 4096},
                  {"gate / up 14336x4096", 14336, 4096},
                  {"down 4096x14336", 4096, 14336},
                  {"lm_head 128256x4096", 128256, 4096}};
    const int copies = 4;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t N = shapes[s].N, K = shapes[s].K;
        size_t nw = (size_t)(N * K);
        struct tuna_weight w[4];
        for (int c = 0; c < copies; c++) {
            w[c].dtype = TUNA_DTYPE_BF16;
            w[c].rows = N;
            w[c].cols = K;
            w[c].data = dev_random_bf16(nw);
            w[c].q4 = NULL;
        }
        float *x, *y;
        CK(cudaMalloc((void **)&x, (size_t)2048 * (size_t)K * 4));
        CK(cudaMalloc((void **)&y, (size_t)2048 * (size_t)N * 4));
        CK(cudaMemset(x, 0x3c, (size_t)2048 * (size_t)K * 4)); /* 0x3c3c3c3c ≈ 0.0115 */
        const int64_t Ts[] = {1, 4, 8, 512, 2048};
        for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
            int64_t T = Ts[ti];
            int nrep = T >= 512 ? 10 : reps;
            for (int r = 0; r < nrep + 3; r++) {
                CK(cudaEventRecord(e0, 0));
                tuna_cuda_backend_ops()->matmul(be, y, x, &w[r % copies], NULL, T);
                CK(cudaEventRecord(e1, 0));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&ms[r], e0, e1));
            }
            if (tuna_cuda_status(be)) {
                fprintf(stderr, "%s\n", tuna_last_error());
                return 1;
            }
            qsort(ms + 3, (size_t)nrep, sizeof(float), cmp_f);
            double t = ms[3 + nrep / 2] * 1e-3;
            char label[96];
            snprintf(label, sizeof label, "matmul %s T=%lld", shapes[s].name, (long long)T);
            if (T <= TUNA_CUDA_GEMV_MAX_T) {
                double gbs = (double)nw * 2.0 / t / 1e9;
                printf("%-44s %10.1f GB/s  %5.1f%% of copy  %8.1f us\n", label, gbs, 100.0 * gbs / copy_gbs, t * 1e6);
            } else {
                double tf = 2.0 * (double)N * (double)K * (double)T / t / 1e12;
                printf("%-44s %10.1f TFLOP/s %18.1f us\n", label, tf, t * 1e6);
            }
        }
        for (int c = 0; c < copies; c++) CK(cudaFree((void *)w[c].data));
        CK(cudaFree(x));
        CK(cudaFree(y));
    }

    /* attention, bf16 KV cache, Llama-3-8B heads */
    bench_attention(be, "attention decode B=1 ctx=4096", 1, 4096, 1, e0, e1);
    bench_attention(be, "attention decode B=32 ctx=1024", 32, 1024, 1, e0, e1);
    bench_attention(be, "attention decode B=128 ctx=1024", 128, 1024, 1, e0, e1);
    bench_attention(be, "attention decode B=256 ctx=2048", 256, 2048, 1, e0, e1);
    bench_attention(be, "attention decode B=64 ctx=4096", 64, 4096, 1, e0, e1);
    bench_attention(be, "attention prefill T=2048 (causal)", 1, 2048, 2048, e0, e1);
    tuna_cuda_backend_free(be);
    return 0;
}
