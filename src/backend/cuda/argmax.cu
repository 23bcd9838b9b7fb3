/* argmax.cu — greedy token ids on the GPU (the argmax op of backend.h). Many rows: one block
 * per row of logits [T, V]; each thread keeps the best (value, index) of a strided slice, then
 * a warp shuffle and a shared-memory step reduce them. Few rows (decode at small batch: one
 * block reading a 128,256-float row took ~100 us of a 6 ms step on the H100): each row is cut
 * into nb slices, one block per slice writes its best pair, and one warp per row reduces the
 * nb pairs. The order is total and matches the CPU twin's
 * sequential loop: larger value wins, equal values go to the lower index, NaN is skipped, and a
 * row whose column 0 is NaN answers 0 (the sequential loop never leaves index 0 then). Only the
 * T ids are copied to the host. */
#include <float.h>
#include <limits.h>

#include "backend/cuda/cuda_internal.h"

#define ARGMAX_THREADS 512
#define ARGMAX_SLICE 4096 /* fewest columns per slice when rows are cut */

__device__ __forceinline__ void better(float &bv, int &bi, float v, int i)
{
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

/* The best (value, index) of x[i0, i1) by this block, in thread 0's bv / bi. */
__device__ __forceinline__ void block_best(const float *x, int64_t i0, int64_t i1, float &bv, int &bi)
{
    __shared__ float sv[ARGMAX_THREADS / 32];
    __shared__ int si[ARGMAX_THREADS / 32];
    bv = -INFINITY;
    bi = INT_MAX; /* "none yet": any value, -inf included, beats it */
    for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
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
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) better(bv, bi, sv[w], si[w]);
}

/* The answer for a row from its best pair: 0 when column 0 is NaN or nothing was found. */
__device__ __forceinline__ int32_t row_answer(const float *x, int bi)
{
    const float x0 = x[0];
    return (x0 != x0 || bi == INT_MAX) ? 0 : bi;
}

/* Grid (T): one block per row. */
__global__ void k_argmax(int32_t *out, const float *logits, int64_t V)
{
    const float *x = logits + (int64_t)blockIdx.x * V;
    float bv;
    int bi;
    block_best(x, 0, V, bv, bi);
    if (threadIdx.x == 0) out[blockIdx.x] = row_answer(x, bi);
}

/* Grid (nb, T): block b of row t writes the best pair of slice b (chunk columns) to
 * pv/pi[t * nb + b]. */
__global__ void k_argmax_part(float *pv, int *pi, const float *logits, int64_t V, int64_t chunk)
{
    const float *x = logits + (int64_t)blockIdx.y * V;
    const int64_t i0 = (int64_t)blockIdx.x * chunk, i1 = i0 + chunk < V ? i0 + chunk : V;
    float bv;
    int bi;
    block_best(x, i0, i1, bv, bi);
    if (threadIdx.x == 0) {
        pv[(int64_t)blockIdx.y * gridDim.x + blockIdx.x] = bv;
        pi[(int64_t)blockIdx.y * gridDim.x + blockIdx.x] = bi;
    }
}

/* Grid (T), 32 threads: the nb pairs of a row reduced in the same total order. */
__global__ void k_argmax_final(int32_t *out, const float *pv, const int *pi, const float *logits, int64_t V, int nb)
{
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int b = threadIdx.x; b < nb; b += 32) better(bv, bi, pv[(int64_t)blockIdx.x * nb + b], pi[(int64_t)blockIdx.x * nb + b]);
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        better(bv, bi, ov, oi);
    }
    if (threadIdx.x == 0) out[blockIdx.x] = row_answer(logits + (int64_t)blockIdx.x * V, bi);
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
    /* slices per row: about two blocks per SM over all rows, each slice >= ARGMAX_SLICE columns */
    const int64_t sm = be->sm_count > 0 ? be->sm_count : 80;
    int64_t nb = 2 * sm / T, by_v = (V + ARGMAX_SLICE - 1) / ARGMAX_SLICE;
    if (nb > by_v) nb = by_v;
    if (nb <= 1) {
        k_argmax<<<(unsigned)T, ARGMAX_THREADS, 0, be->stream>>>(d, logits, V);
        if (!tuna_cuda_check_launch(be, "k_argmax")) return tuna_cuda_status(be);
    } else {
        const size_t pairs = (size_t)(T * nb);
        if (!tuna_cuda_grow(be, &be->argmax_part, pairs * (sizeof(float) + sizeof(int)), "cudaMalloc(argmax slices)"))
            return tuna_cuda_status(be);
        float *pv = (float *)be->argmax_part.p;
        int *pi = (int *)(pv + pairs);
        const int64_t chunk = (V + nb - 1) / nb;
        k_argmax_part<<<dim3((unsigned)nb, (unsigned)T), ARGMAX_THREADS, 0, be->stream>>>(pv, pi, logits, V, chunk);
        if (!tuna_cuda_check_launch(be, "k_argmax_part")) return tuna_cuda_status(be);
        k_argmax_final<<<(unsigned)T, 32, 0, be->stream>>>(d, pv, pi, logits, V, (int)nb);
        if (!tuna_cuda_check_launch(be, "k_argmax_final")) return tuna_cuda_status(be);
    }
    return tuna_cuda_download(be, out, d, (size_t)T * sizeof(int32_t)); /* waits for the stream */
}
