/* bench_cuda_check.h — helpers of the standalone CUDA benchmark programs: CK(x), a CUDA runtime call
 * that on an error prints the call and CUDA's message and exits (benchmarks have nothing to
 * recover); CB(x), the same for a cuBLAS call; bench_no_device, the SKIP of a machine without a GPU;
 * bench_cmp_float, qsort's order of floats (medians); bench_dev_fill_bf16, device memory of random bf16 values; bench_dev_fill_f8, of random
 * FP8 E4M3 bytes; bench_token_counts, the token counts T given on the command line; bench_wall_s, the
 * wall clock (to match a line's time window with samples of nvidia-smi). */
#ifndef TUNA_BENCH_CUDA_CHECK_H
#define TUNA_BENCH_CUDA_CHECK_H

#include <cuda_runtime_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CK(x)                                                                                                          \
    do {                                                                                                               \
        cudaError_t e_ = (x);                                                                                          \
        if (e_ != cudaSuccess) {                                                                                       \
            fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                                                   \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

#define CB(x)                                                                                                          \
    do {                                                                                                               \
        int s_ = (int)(x);                                                                                             \
        if (s_ != 0) {                                                                                                 \
            fprintf(stderr, "%s: cuBLAS status %d\n", #x, s_);                                                         \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

/* True, after printing SKIP, when this machine has no CUDA device (the program then exits 0). */
static inline bool bench_no_device(void)
{
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0) return false;
    printf("SKIP: no CUDA device\n");
    return true;
}

/* qsort's comparison of floats, ascending. */
static inline int bench_cmp_float(const void *a, const void *b)
{
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* `bytes` of device memory holding bf16 values in about [-0.06, 0.06] (exponent 0x3d + a small
 * mantissa, random sign) from a generator seeded with `seed`; exits when out of memory. */
static inline void *bench_dev_fill_bf16(size_t bytes, uint32_t seed)
{
    uint16_t *h = (uint16_t *)malloc(bytes);
    if (!h) {
        fprintf(stderr, "bench: out of host memory (%zu bytes)\n", bytes);
        exit(1);
    }
    uint32_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < bytes / 2; i++) {
        s = s * 1664525u + 1013904223u;
        h[i] = (uint16_t)(((s >> 31) << 15) | (0x3c80u + ((s >> 16) & 0x7fu)));
    }
    void *d = NULL;
    CK(cudaMalloc(&d, bytes));
    CK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

/* `n` bytes of device memory holding FP8 E4M3 values of either sign below 2 in magnitude (exponent
 * field <= 7: no NaN), a 16 MB random piece repeated; exits when out of memory. */
static inline void *bench_dev_fill_f8(size_t n)
{
    const size_t piece = n < ((size_t)16 << 20) ? n : ((size_t)16 << 20);
    uint8_t *h = (uint8_t *)malloc(piece ? piece : 1);
    if (!h) {
        fprintf(stderr, "bench: out of host memory (%zu bytes)\n", piece);
        exit(1);
    }
    uint64_t s = 0x2545F4914F6CDD1Dull;
    for (size_t i = 0; i < piece; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        h[i] = (uint8_t)((s >> 32) & 0xBF);
    }
    char *d = NULL;
    CK(cudaMalloc((void **)&d, n));
    for (size_t o = 0; o < n; o += piece) CK(cudaMemcpy(d + o, h, n - o < piece ? n - o : piece, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

/* Seconds since the epoch (CLOCK_REALTIME, to the microsecond). */
static inline double bench_wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The token counts of a run: argv[1..] (at most 32), else the n_def defaults (at most 32).
 * Returns the largest, or -1 after a message naming `prog` when one is outside 1..16384. */
static inline int bench_token_counts(int argc, char **argv, const char *prog, const int *def, int n_def, int Ts[32],
                                     int *nT)
{
    *nT = 0;
    for (int i = 1; i < argc && *nT < 32; i++) Ts[(*nT)++] = atoi(argv[i]);
    const bool given = *nT > 0;
    for (int i = 0; !given && i < n_def && i < 32; i++) Ts[(*nT)++] = def[i];
    int maxT = 0;
    for (int i = 0; i < *nT; i++) {
        if (Ts[i] < 1 || Ts[i] > 16384) {
            fprintf(stderr, "%s: T must be in 1..16384 (got %d)\n", prog, Ts[i]);
            return -1;
        }
        maxT = Ts[i] > maxT ? Ts[i] : maxT;
    }
    return maxT;
}

#endif
