/* kv_types.cuh — the element types of the KV cache on the GPU (float32, bf16, f16, and FP8 E4M3
 * for --kv-cache-dtype fp8) as one template parameter KT: conversions from float32 (store) and
 * loads of vectors of K/V rows into float32 (attention). FP8: scale 1.0, saturating conversion
 * (round to nearest even, beyond +-448 clamps to +-448, as vLLM's uncalibrated fp8 cache; the host
 * twin is tuna_f32_to_f8e4m3); loads of 8 bytes = 8 elements (the 16-bit kernels' unit). Only for
 * src/backend/cuda. */
#ifndef TUNA_BACKEND_CUDA_KV_TYPES_CUH
#define TUNA_BACKEND_CUDA_KV_TYPES_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
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

template <> struct kv_traits<__nv_fp8_e4m3> {
    static constexpr int VEC = 8; /* elements per load (8 bytes: the general decode kernel's registers) */
    static __device__ __forceinline__ __nv_fp8_e4m3 from_f32(float x) { return __nv_fp8_e4m3(x); } /* satfinite */
    static __device__ __forceinline__ float to_f32(__nv_fp8_e4m3 x) { return float(x); }
};

/* 2 E4M3 values (the low 16 bits of w, first element low) as the bits of a half2 (first element
 * low): exact (E4M3 is a subset of f16). One cvt on sm_89+ (inline PTX: no stack temporaries). */
static __device__ __forceinline__ uint32_t kv_f8x2_to_h2(uint32_t w)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint32_t h;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)(w & 0xffffu)));
    return h;
#else
    __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w & 0xffffu), __NV_E4M3);
    return (uint32_t)r.x | ((uint32_t)r.y << 16);
#endif
}
/* the two halves of half2 bits as float32 */
static __device__ __forceinline__ void kv_h2_to_f2(uint32_t h, float *f)
{
    f[0] = __half2float(__ushort_as_half((unsigned short)(h & 0xffffu)));
    f[1] = __half2float(__ushort_as_half((unsigned short)(h >> 16)));
}
/* f[0..8) = 8 E4M3 values (w.x low byte first) as float32 */
static __device__ __forceinline__ void kv_unpack_f8x8(uint2 w, float *f)
{
    kv_h2_to_f2(kv_f8x2_to_h2(w.x), f), kv_h2_to_f2(kv_f8x2_to_h2(w.x >> 16), f + 2);
    kv_h2_to_f2(kv_f8x2_to_h2(w.y), f + 4), kv_h2_to_f2(kv_f8x2_to_h2(w.y >> 16), f + 6);
}

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

/* f[0..8) = the 8 bytes at p (8-byte aligned) as float32 */
static __device__ __forceinline__ void kv_load_vec(const __nv_fp8_e4m3 *p, float *f)
{
    kv_unpack_f8x8(__ldg((const uint2 *)p), f);
}

/* Which of the three 16/32-bit types a tuna dtype is: 0 float32, 1 bf16, 2 f16, -1 other (FP8
 * included: code that knows only these three, e.g. fused.cu's store, refuses it and the caller
 * falls back to the ops that know it). */
static inline int kv_code(enum tuna_dtype t)
{
    return t == TUNA_DTYPE_F32 ? 0 : t == TUNA_DTYPE_BF16 ? 1 : t == TUNA_DTYPE_F16 ? 2 : -1;
}
#define KV_CODE_F8 3
/* kv_code, plus KV_CODE_F8 (3) for FP8 E4M3: for the kernels that store or read it (kv_store.cu,
 * rope_kv.cu, attention.cu, attention_prefill.cu). */
static inline int kv_code8(enum tuna_dtype t)
{
    return t == TUNA_DTYPE_F8_E4M3 ? KV_CODE_F8 : kv_code(t);
}

#endif
