/* norm.cu — RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w, one block per row, float32 (as the CPU
 * reference and transformers' LlamaRMSNorm). Gemma's 1+w is folded into w by the model. */
#include "backend/cuda/cuda_internal.h"

__global__ void k_rmsnorm(float *y, const float *x, const float *w, int64_t C, float eps)
{
    __shared__ float red[32];
    const float *xr = x + (int64_t)blockIdx.x * C;
    float *yr = y + (int64_t)blockIdx.x * C;
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) s += xr[i] * xr[i];
    const float r = tuna_cuda_rms_inv(s, C, eps, red);
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

void tuna_cuda_rmsnorm(tuna_backend *be, float *y, const float *x, const float *w, int64_t T, int64_t C, float eps)
{
    if (be->sticky || T <= 0) return;
    tuna_cuda_racc_settle(be, x);
    k_rmsnorm<<<(unsigned)T, 256, 0, be->stream>>>(y, x, w, C, eps);
    tuna_cuda_check_launch(be, "k_rmsnorm");
}
