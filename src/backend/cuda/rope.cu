/* rope.cu — rotary embedding in transformers' rotate-half layout, in place on x[T, H, D]: for
 * i < rot_dim/2, (x[i], x[i+half]) -> (x[i] c - x[i+half] s, x[i+half] c + x[i] s), angle
 * pos[t] * inv_freq[i] in float32 (as transformers), c and s times attn_factor. */
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/rope.cuh"

__global__ void k_rope(float *x, const int64_t *pos, int64_t T, int64_t H, int64_t D, int64_t half,
                       const float *inv_freq, float attn_factor)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * H * half) return;
    int64_t j = i % half, th = i / half, t = th / H;
    float s, c;
    rope_cos_sin(inv_freq, j, (float)pos[t], attn_factor, &c, &s);
    float *v = x + th * D;
    const float x1 = v[j], x2 = v[j + half];
    v[j] = rope_first(x1, x2, c, s);
    v[j + half] = rope_second(x1, x2, c, s);
}

void tuna_cuda_rope(tuna_backend *be, float *x, const int64_t *pos, int64_t T, int64_t H, int64_t D,
                    int64_t rot_dim, const float *inv_freq, float attn_factor)
{
    if (be->sticky || T <= 0) return;
    int64_t half = rot_dim / 2;
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, (size_t)T * sizeof(int64_t) + (size_t)half * sizeof(float))) return;
    size_t off_pos = (size_t)tuna_cuda_meta_stage(be, &m, pos, (size_t)T * sizeof(int64_t));
    /* inv_freq is a host array in the model (computed once per context length) */
    size_t off_f = (size_t)tuna_cuda_meta_stage(be, &m, inv_freq, (size_t)half * sizeof(float));
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return;
    int64_t n = T * H * half;
    k_rope<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(
        x, (const int64_t *)((char *)be->meta.p + off_pos), T, H, D, half,
        (const float *)((char *)be->meta.p + off_f), attn_factor);
    tuna_cuda_check_launch(be, "k_rope");
}
