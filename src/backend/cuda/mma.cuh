/* mma.cuh — building blocks of tensor-core kernels on sm_80+ (inline PTX): mma.sync m16n8k16 with
 * float32 accumulation on bf16 or f16 inputs, ldmatrix loads of 8x8 tiles from shared memory,
 * cp.async 16-byte copies global -> shared (zero fill for rows past the data), and packing of two
 * float32 into one 32-bit register of 16-bit values. Only for src/backend/cuda.
 *
 * Fragment layouts of mma.m16n8k16 (g = lane / 4, c = lane % 4), each register two 16-bit values,
 * the lower column in the low half:
 *   A (16x16, row-major): a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..)
 *   B (16x8, "col": k contiguous for each n): b0 = (k 2c..2c+1, n g), b1 = (k 2c+8.., n g)
 *   C/D (16x8 float32): d0, d1 = (g, 2c..2c+1), d2, d3 = (g+8, 2c..2c+1)
 * The functions compile for every architecture; below sm_80 their bodies are empty (callers keep
 * such paths off those devices). */
#ifndef TUNA_BACKEND_CUDA_MMA_CUH
#define TUNA_BACKEND_CUDA_MMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define TUNA_MMA_SM80 1
#else
#define TUNA_MMA_SM80 0
#endif

/* Shared-memory address of p as the 32-bit value PTX expects. */
static __device__ __forceinline__ uint32_t mma_smem(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* Four 8x8 tiles of 16-bit values: lanes 8i..8i+7 give the row addresses of tile i (16 bytes
 * each); r[i] gets tile i in the A/B fragment order (row lane/4, columns 2(lane%4)..+1). */
static __device__ __forceinline__ void mma_ldsm_x4(uint32_t (&r)[4], uint32_t addr)
{
#if TUNA_MMA_SM80
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#else
    r[0] = r[1] = r[2] = r[3] = 0u;
    (void)addr;
#endif
}

/* The same, each tile transposed: r[i] holds (rows 2(lane%4)..+1, column lane/4) of tile i. */
static __device__ __forceinline__ void mma_ldsm_x4_t(uint32_t (&r)[4], uint32_t addr)
{
#if TUNA_MMA_SM80
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#else
    r[0] = r[1] = r[2] = r[3] = 0u;
    (void)addr;
#endif
}

/* d += a * b (16x8x16), T = __nv_bfloat16 or __half inputs, float32 accumulators. */
template <typename T>
static __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                          uint32_t b1)
{
#if TUNA_MMA_SM80
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    (void)d, (void)a, (void)b0, (void)b1;
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
#if TUNA_MMA_SM80
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    (void)d, (void)a, (void)b0, (void)b1;
#endif
}

/* Two float32 as one register of 16-bit values (lo in the low half), rounded to nearest. */
template <typename T> static __device__ __forceinline__ uint32_t mma_pack(float lo, float hi);
template <> __device__ __forceinline__ uint32_t mma_pack<__nv_bfloat16>(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t mma_pack<__half>(float lo, float hi)
{
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

/* 2^x with the hardware approximation (MUFU.EX2, ~2 ulp; flushes denormals; 2^-inf = 0). */
static __device__ __forceinline__ float mma_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* 16 bytes global -> shared, asynchronous (both 16-byte aligned); !full writes 16 zero bytes and
 * reads nothing (src must still be a valid address). */
static __device__ __forceinline__ void mma_cp_async16(void *dst, const void *src, bool full)
{
#if TUNA_MMA_SM80
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(mma_smem(dst)), "l"(src),
                 "r"(full ? 16 : 0));
#else
    (void)dst, (void)src, (void)full;
#endif
}

static __device__ __forceinline__ void mma_cp_async_commit()
{
#if TUNA_MMA_SM80
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

/* Waits until at most N committed groups of this thread are still in flight. */
template <int N> static __device__ __forceinline__ void mma_cp_async_wait()
{
#if TUNA_MMA_SM80
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

#endif
