/* racc.cu — the residual stream's pending part at batch 1 (struct tuna_backend's racc).
 *
 * The 4-bit MLP kernel (q4_mlp.cu) splits down's K over clusters of blocks: each cluster adds its
 * partial sums of all C outputs at once, so x += W_down act cannot be a plain store. Float atomics
 * would add in whatever order the clusters finish (different bits from run to run, and CUDA graph
 * replays that differ from eager steps), so the partial sums go into 64-bit integers in units of
 * 2^-32 instead (atomicAdd on integers: the same total in any order). A float partial sum of
 * magnitude >= 2^-9 is a whole number of such units, so its conversion is exact; the total is
 * rounded to float once, when it is read (racc_value in gemv.cuh). Range: |sum| < 2^31.
 *
 * Nothing is added into x itself: x's pending part stays in the buffer until a reader takes it.
 * k_q4_h4 staging a NORM job's x adds it element by element (gemv_job.xacc), o's GEMV folds it as
 * it adds its own sums and zeroes it (gemv_job.yacc; then it is no longer pending), and every
 * other op that reads or writes x folds it first with k_racc_fold (tuna_cuda_racc_settle: one
 * small kernel, which zeroes it too). So the buffer is all zero whenever nothing is pending, which
 * is what the next MLP kernel adds into. The state lives on the host side of the backend, so a
 * captured CUDA graph replays the same sequence of launches. */
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"

__global__ void k_racc_fold(float *x, long long *acc, int64_t n)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        x[i] = x[i] + racc_value(acc[i]);
        acc[i] = 0;
    }
}

long long *tuna_cuda_racc_take(tuna_backend *be, const float *x, int64_t n)
{
    if (be->sticky || n <= 0) return NULL;
    tuna_cuda_racc_settle(be, NULL);
    const size_t bytes = (size_t)n * sizeof(long long);
    if (be->racc.n != n || be->racc.buf.cap < bytes) {
        /* new or resized: zeroed once, in stream order */
        if (!tuna_cuda_grow(be, &be->racc.buf, bytes, "cudaMalloc(residual accumulator)")) return NULL;
        if (!tuna_cuda_check(be, cudaMemsetAsync(be->racc.buf.p, 0, bytes, be->stream), "cudaMemsetAsync(racc)"))
            return NULL;
        be->racc.n = n;
    }
    be->racc.pend = true;
    be->racc.x = x;
    return (long long *)be->racc.buf.p;
}

long long *tuna_cuda_racc_of(tuna_backend *be, const float *x)
{
    return be->racc.pend && x == be->racc.x ? (long long *)be->racc.buf.p : NULL;
}

void tuna_cuda_racc_done(tuna_backend *be)
{
    be->racc.pend = false;
}

void tuna_cuda_racc_settle(tuna_backend *be, const float *x)
{
    if (!be->racc.pend || (x && x != be->racc.x)) return;
    be->racc.pend = false;
    if (be->sticky) return;
    const int64_t n = be->racc.n;
    k_racc_fold<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>((float *)be->racc.x, (long long *)be->racc.buf.p, n);
    tuna_cuda_check_launch(be, "k_racc_fold");
}

void tuna_cuda_racc_drop(tuna_backend *be)
{
    if (!be->racc.pend) return;
    be->racc.pend = false; /* x is overwritten; the buffer must be zero again */
    if (!be->sticky)
        tuna_cuda_check(be, cudaMemsetAsync(be->racc.buf.p, 0, (size_t)be->racc.n * sizeof(long long), be->stream),
                        "cudaMemsetAsync(racc)");
}
