/* kv_types.cuh — the element types of the KV cache on the GPU (float32, bf16, f16) as one
 * template parameter KT: conversions from float32 (store) and loads of 16-byte vectors of K/V
 * rows into float32 (attention). Only for src/backend/cuda. */
#ifndef TUNA_BACKEND_CUDA_KV_TYPES_CUH
#define TUNA_BACKEND_CUDA_KV_TYPES_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "core/dtype.h"

template <typename KT> struct kv_traits;
template <> struct kv_traits<float> {
    static constexpr int VEC = 4; /* elements per 16-byte load */
    static __device__ __forceinline__ float from_f32(float x) { return x; }
    static __device__ __forceinline__ float to_f32(float x) { return x; }
};
template <> struct kv_traits<__nv_bfloat16> {
    static constexpr int VEC = 8;
    static __device__ __forceinline__ __nv_bfloat16 from_f32(float x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
};
template <> struct kv_traits<__half> {
    static constexpr int VEC = 8;
    static __device__ __forceinline__ __half from_f32(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
};

/* f[0..VEC) = the 16 bytes at p (16-byte aligned) as float32. */
static __device__ __forceinline__ void kv_load_vec(const float *p, float *f)
{
    float4 v = __ldg((const float4 *)p);
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
}
static __device__ __forceinline__ void kv_unpack_u32(uint32_t w, bool bf16, float *f)
{
    if (bf16) {
        f[0] = __uint_as_float(w << 16);
        f[1] = __uint_as_float(w & 0xffff0000u);
    } else {
        __half2 h = *reinterpret_cast<__half2 *>(&w);
        float2 x = __half22float2(h);
        f[0] = x.x, f[1] = x.y;
    }
}
static __device__ __forceinline__ void kv_load_vec(const __nv_bfloat16 *p, float *f)
{
    uint4 v = __ldg((const uint4 *)p);
    kv_unpack_u32(v.x, true, f), kv_unpack_u32(v.y, true, f + 2), kv_unpack_u32(v.z, true, f + 4),
        kv_unpack_u32(v.w, true, f + 6);
}
static __device__ __forceinline__ void kv_load_vec(const __half *p, float *f)
{
    uint4 v = __ldg((const uint4 *)p);
    kv_unpack_u32(v.x, false, f), kv_unpack_u32(v.y, false, f + 2), kv_unpack_u32(v.z, false, f + 4),
        kv_unpack_u32(v.w, false, f + 6);
}

/* Which of the three a tuna dtype is: 0 float32, 1 bf16, 2 f16, -1 unsupported. */
static inline int kv_code(enum tuna_dtype t)
{
    return t == TUNA_DTYPE_F32 ? 0 : t == TUNA_DTYPE_BF16 ? 1 : t == TUNA_DTYPE_F16 ? 2 : -1;
}

#endif
