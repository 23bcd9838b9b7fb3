/* side_stream.cu — a second stream beside the main one (struct cuda_side, cuda_internal.h): the
 * L2 warm (l2_warm.cu) and the LoRA shrink begun early (lora.cu) run their kernels on one. */
#include <stdio.h>

#include "backend/cuda/cuda_internal.h"

bool tuna_cuda_side_make(tuna_backend *be, struct cuda_side *s)
{
    if (s->made) return true;
    if (be->capturing) return false; /* made outside a capture only */
    if (cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    if (cudaEventCreateWithFlags(&s->fork, cudaEventDisableTiming) != cudaSuccess ||
        cudaEventCreateWithFlags(&s->join, cudaEventDisableTiming) != cudaSuccess) {
        cudaGetLastError();
        cudaStreamDestroy(s->stream);
        return false;
    }
    s->made = true;
    return true;
}

bool tuna_cuda_side_fork(tuna_backend *be, struct cuda_side *s, const char *what)
{
    cudaError_t e = cudaEventRecord(s->fork, be->stream);
    const char *call = "cudaEventRecord";
    if (e == cudaSuccess) {
        e = cudaStreamWaitEvent(s->stream, s->fork, 0);
        call = "cudaStreamWaitEvent";
    }
    if (e == cudaSuccess) return true;
    char m[96];
    snprintf(m, sizeof m, "%s(%s fork)", call, what);
    return tuna_cuda_check(be, e, m);
}

void tuna_cuda_side_free(struct cuda_side *s)
{
    if (!s->made) return;
    cudaStreamSynchronize(s->stream);
    cudaEventDestroy(s->fork);
    cudaEventDestroy(s->join);
    cudaStreamDestroy(s->stream);
    s->made = false;
}
