/* bench_cuda_check.h — CK(x): a CUDA runtime call in a benchmark program; on an error it prints the
 * call and CUDA's message and exits (benchmarks have nothing to recover). */
#ifndef TUNA_BENCH_CUDA_CHECK_H
#define TUNA_BENCH_CUDA_CHECK_H

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#define CK(x)                                                                                                          \
    do {                                                                                                               \
        cudaError_t e_ = (x);                                                                                          \
        if (e_ != cudaSuccess) {                                                                                       \
            fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                                                   \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

#endif
