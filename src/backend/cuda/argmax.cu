/* argmax.cu — greedy token ids on the GPU (the argmax op of backend.h): one block per row of
 * logits [T, V]; each thread keeps the best (value, index) of a strided slice, then a warp
 * shuffle and a shared-memory step reduce them. The order is total and matches the CPU twin's
 * sequential loop: larger value wins, equal values go to the lower index, NaN is skipped, and a
 * row whose column 0 is NaN answers 0 (the sequential loop never leaves index 0 then). Only the
 * T ids are copied to the host. */
#include <float.h>
#include <limits.h>

#include "backend/cuda/cuda_internal.h"

#define ARGMAX_THREADS 512

__device__ __forceinline__ void better(float &bv, int &bi, float v, int i)
{
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

__global__ void k_argmax(int32_t *out, const float *logits, int64_t V)
{
    __shared__ float sv[ARGMAX_THREADS / 32];
    __shared__ int si[ARGMAX_THREADS / 32];
    const float *x = logits + (int64_t)blockIdx.x * V;
    float bv = -INFINITY;
    int bi = INT_MAX; /* "none yet": any value, -inf included, beats it */
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        float v = x[i];
        if (v == v) better(bv, bi, v, (int)i);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        better(bv, bi, ov, oi);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            better(bv, bi, sv[w], si[w]);
        float x0 = x[0];
        out[blockIdx.x] = (x0 != x0 || bi == INT_MAX) ? 0 : bi;
    }
}

tuna_status tuna_cuda_argmax(tuna_backend *be, int32_t *out, const float *logits, int64_t T, int64_t V)
{
    if (be->sticky) return tuna_cuda_status(be);
    if (T <= 0) return TUNA_OK;
    if (V <= 0 || V > INT_MAX) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "argmax (vocabulary size out of range)");
        return tuna_cuda_status(be);
    }
    if (!tuna_cuda_grow(be, &be->argmax_ids, (size_t)T * sizeof(int32_t), "cudaMalloc(argmax ids)"))
        return tuna_cuda_status(be);
    int32_t *d = (int32_t *)be->argmax_ids.p;
    k_argmax<<<(unsigned)T, ARGMAX_THREADS, 0, be->stream>>>(d, logits, V);
    if (!tuna_cuda_check_launch(be, "k_argmax")) return tuna_cuda_status(be);
    return tuna_cuda_download(be, out, d, (size_t)T * sizeof(int32_t)); /* waits for the stream */
}
