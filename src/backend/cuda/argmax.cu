/* argmax.cu — greedy token ids on the GPU (the argmax op of backend.h). Many rows: one block
 * per row of logits [T, V]; each thread keeps the best (value, index) of a strided slice, then
 * a warp shuffle and a shared-memory step reduce them. Few rows (decode at small batch: one
 * block reading a 128,256-float row took ~100 us of a 6 ms step on the H100): each row is cut
 * into nb slices, one block per slice writes its best pair, and one warp per row reduces the
 * nb pairs. The order is total and matches the CPU twin's
 * sequential loop: larger value wins, equal values go to the lower index, NaN is skipped, and a
 * row whose column 0 is NaN answers 0 (the sequential loop never leaves index 0 then). Only the
 * T ids cross the bus: the kernels write them into pinned, mapped host memory (argmax_host), so the
 * queue half (argmax_queue) can end a step's CUDA graph and the take half (argmax_take) only waits
 * and copies them out. */
#include <float.h>
#include <limits.h>
#include <string.h>

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

/* The ids' buffer for T rows: pinned host memory mapped into the device's address space, so the
 * kernels write the ids where the host reads them (no copy to queue after them, which lets a CUDA
 * graph end with them). Grown outside captures only (inside one it taints the capture); growing
 * moves it, so graphs captured before are recaptured (meta_gen). */
static bool argmax_host_fits(tuna_backend *be, int64_t T)
{
    if (T <= be->argmax_host_cap) return true;
    if (tuna_cuda_capture_taint(be)) return false;
    if (!tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "cudaStreamSynchronize(argmax ids)")) return false;
    if (be->argmax_host) cudaFreeHost(be->argmax_host);
    be->argmax_host = be->argmax_host_dev = NULL;
    be->argmax_host_cap = 0;
    int64_t cap = 64;
    while (cap < T) cap *= 2;
    void *h = NULL;
    if (!tuna_cuda_check(be, cudaHostAlloc(&h, (size_t)cap * sizeof(int32_t), cudaHostAllocMapped),
                         "cudaHostAlloc(argmax ids, mapped)"))
        return false;
    void *d = NULL; /* the device's address of the mapped ids */
    if (!tuna_cuda_check(be, cudaHostGetDevicePointer(&d, h, 0), "cudaHostGetDevicePointer(argmax ids)")) {
        cudaFreeHost(h);
        return false;
    }
    be->argmax_host = (int32_t *)h;
    be->argmax_host_dev = (int32_t *)d;
    be->argmax_host_cap = cap;
    be->meta_gen++;
    return true;
}

void tuna_cuda_argmax_queue(tuna_backend *be, const float *logits, int64_t T, int64_t V)
{
    if (be->sticky || T <= 0) return;
    if (V <= 0 || V > INT_MAX) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "argmax (vocabulary size out of range)");
        return;
    }
    if (!argmax_host_fits(be, T)) return;
    int32_t *d = be->argmax_host_dev;
    /* slices per row: about two blocks per SM over all rows, each slice >= ARGMAX_SLICE columns */
    const int64_t sm = be->sm_count > 0 ? be->sm_count : 80;
    int64_t nb = 2 * sm / T, by_v = (V + ARGMAX_SLICE - 1) / ARGMAX_SLICE;
    if (nb > by_v) nb = by_v;
    if (nb <= 1) {
        k_argmax<<<(unsigned)T, ARGMAX_THREADS, 0, be->stream>>>(d, logits, V);
        tuna_cuda_check_launch(be, "k_argmax");
        return;
    }
    const size_t pairs = (size_t)(T * nb);
    if (!tuna_cuda_grow(be, &be->argmax_part, pairs * (sizeof(float) + sizeof(int)), "cudaMalloc(argmax slices)"))
        return;
    float *pv = (float *)be->argmax_part.p;
    int *pi = (int *)(pv + pairs);
    const int64_t chunk = (V + nb - 1) / nb;
    k_argmax_part<<<dim3((unsigned)nb, (unsigned)T), ARGMAX_THREADS, 0, be->stream>>>(pv, pi, logits, V, chunk);
    if (!tuna_cuda_check_launch(be, "k_argmax_part")) return;
    k_argmax_final<<<(unsigned)T, 32, 0, be->stream>>>(d, pv, pi, logits, V, (int)nb);
    tuna_cuda_check_launch(be, "k_argmax_final");
}

tuna_status tuna_cuda_argmax_take(tuna_backend *be, int32_t *out, int64_t T)
{
    if (be->sticky) return tuna_cuda_status(be);
    if (T <= 0) return TUNA_OK;
    if (T > be->argmax_host_cap) { /* no argmax_queue of this many rows came first */
        tuna_cuda_check(be, cudaErrorInvalidValue, "argmax_take (more rows than were queued)");
        return tuna_cuda_status(be);
    }
    tuna_cuda_step_mark(be, 2);
    if (!tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "cudaStreamSynchronize(argmax ids)"))
        return tuna_cuda_status(be);
    memcpy(out, be->argmax_host, (size_t)T * sizeof(int32_t));
    tuna_cuda_step_mark(be, 3);
    return TUNA_OK;
}

tuna_status tuna_cuda_argmax(tuna_backend *be, int32_t *out, const float *logits, int64_t T, int64_t V)
{
    if (T <= 0) return tuna_cuda_status(be);
    tuna_cuda_argmax_queue(be, logits, T, V);
    return tuna_cuda_argmax_take(be, out, T);
}
