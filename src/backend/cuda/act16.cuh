/* act16.cuh — loads and stores of activations that are float32 or 16-bit (backend.h's 16-bit
 * activation ops): io 0 = float32, 1 = bf16, 2 = f16, uniform over a launch (a kernel argument:
 * one kernel serves the float32 op and its 16-bit twin). Stores round to nearest even. */
#ifndef TUNA_CUDA_ACT16_CUH
#define TUNA_CUDA_ACT16_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

static __device__ __forceinline__ float a16_ld(const void *p, int io, int64_t i)
{
    if (io == 1) return __uint_as_float((uint32_t)((const uint16_t *)p)[i] << 16);
    if (io == 2) return __half2float(((const __half *)p)[i]);
    return ((const float *)p)[i];
}

static __device__ __forceinline__ void a16_st(void *p, int io, int64_t i, float v)
{
    if (io == 1) ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else if (io == 2) ((__half *)p)[i] = __float2half_rn(v);
    else ((float *)p)[i] = v;
}

/* elements i and i + 1 (i even; p 8-byte aligned for float32, 4-byte for 16-bit) */
static __device__ __forceinline__ void a16_st2(void *p, int io, int64_t i, float a, float b)
{
    if (io == 1) *(__nv_bfloat162 *)((__nv_bfloat16 *)p + i) = __floats2bfloat162_rn(a, b);
    else if (io == 2) *(__half2 *)((__half *)p + i) = __floats2half2_rn(a, b);
    else *(float2 *)((float *)p + i) = make_float2(a, b);
}

/* v rounded to the 16-bit type io (1 bf16, 2 f16) and back; io 0: v. */
static __device__ __forceinline__ float a16_round(float v, int io)
{
    if (io == 1) return __bfloat162float(__float2bfloat16_rn(v));
    if (io == 2) return __half2float(__float2half_rn(v));
    return v;
}

#endif
