/* rope.cuh — the rotary embedding's arithmetic, shared by every kernel that rotates (rope.cu,
 * rope_kv.cu, the training backward in train_ops.cu), so that they agree bit for bit. */
#pragma once
#include <stdint.h>

/* cos and sin of pair j's angle at position p (float32, as transformers), times attn_factor. */
static __device__ __forceinline__ void rope_cos_sin_of(float freq, float p, float attn_factor, float *c, float *s)
{
    sincosf(freq * p, s, c);
    *c *= attn_factor;
    *s *= attn_factor;
}
static __device__ __forceinline__ void rope_cos_sin(const float *inv_freq, int64_t j, float p, float attn_factor,
                                                    float *c, float *s)
{
    rope_cos_sin_of(inv_freq[j], p, attn_factor, c, s);
}

/* The rotated pair (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) with explicit roundings (no FMA
 * contraction): the fused and the plain kernels compute exactly the same. */
static __device__ __forceinline__ float rope_first(float x1, float x2, float c, float s)
{
    return __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
}
static __device__ __forceinline__ float rope_second(float x1, float x2, float c, float s)
{
    return __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}
