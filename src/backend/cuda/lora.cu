/* lora.cu — unmerged LoRA on the GPU, for a batch that mixes adapters (Punica's idea, simply):
 * one block per token: u = A x (a warp per rank row, lanes over K), then y += scale · B u
 * (threads over N). Tokens without an adapter exit at once. A and B are float32. */
#include "backend/cuda/cuda_internal.h"

struct lora_desc {
    const float *A, *B;
    int64_t r;
    float scale;
};

#define LORA_MAX_R 256

__global__ void k_lora(float *y, const float *x, int64_t N, int64_t K, const struct lora_desc *ads, int n_ads,
                       const int32_t *idx)
{
    __shared__ float u[LORA_MAX_R];
    const int64_t t = blockIdx.x;
    const int a = idx[t];
    if (a < 0 || a >= n_ads) return;
    const struct lora_desc d = ads[a];
    const float *xt = x + t * K;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int64_t j = warp; j < d.r; j += nwarps) {
        const float *arow = d.A + j * K;
        float s = 0.0f;
        for (int64_t k = lane; k < K; k += 32) s += arow[k] * xt[k];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) u[j] = s;
    }
    __syncthreads();
    float *yt = y + t * N;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
        const float *brow = d.B + n * d.r;
        float s = 0.0f;
        for (int64_t j = 0; j < d.r; j++) s += brow[j] * u[j];
        yt[n] += d.scale * s;
    }
}

void tuna_cuda_lora(tuna_backend *be, float *y, const float *x, int64_t T, int64_t N, int64_t K,
                    const struct tuna_lora *adapters, int n_adapters, const int32_t *adapter)
{
    if (be->sticky || T <= 0 || n_adapters <= 0) return;
    struct lora_desc ds[64];
    if (n_adapters > 64) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "lora (more than 64 adapters on one layer)");
        return;
    }
    for (int i = 0; i < n_adapters; i++) {
        if (adapters[i].r > LORA_MAX_R) {
            tuna_cuda_check(be, cudaErrorInvalidValue, "lora (rank over 256)");
            return;
        }
        ds[i].A = adapters[i].A;
        ds[i].B = adapters[i].B;
        ds[i].r = adapters[i].r;
        ds[i].scale = adapters[i].scale;
    }
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, (size_t)n_adapters * sizeof ds[0] + (size_t)T * sizeof(int32_t))) return;
    size_t o_d = (size_t)tuna_cuda_meta_stage(be, &m, ds, (size_t)n_adapters * sizeof ds[0]);
    size_t o_i = (size_t)tuna_cuda_meta_stage(be, &m, adapter, (size_t)T * sizeof(int32_t));
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return;
    char *base = (char *)be->meta.p;
    k_lora<<<(unsigned)T, 256, 0, be->stream>>>(y, x, N, K, (const struct lora_desc *)(base + o_d), n_adapters,
                                                (const int32_t *)(base + o_i));
    tuna_cuda_check_launch(be, "k_lora");
}
