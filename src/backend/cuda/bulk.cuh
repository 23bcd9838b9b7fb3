/* bulk.cuh — mbarriers and the bulk copy engine (cp.async.bulk, sm_90+) for kernels that stream
 * weights into shared memory: k_q4_s (q4_stream.cu) and k_q4_r (q4_ring.cu). Below sm_90 the
 * functions compile to nothing (the copy traps): the host never launches those kernels there. */
#ifndef TUNA_BACKEND_CUDA_BULK_CUH
#define TUNA_BACKEND_CUDA_BULK_CUH

#include <stdint.h>

static __device__ __forceinline__ uint32_t q4s_sa(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void q4s_bar_init(uint64_t *b, unsigned count)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(q4s_sa(b)), "r"(count) : "memory");
#else
    (void)q4s_sa(b), (void)count;
#endif
}

static __device__ __forceinline__ void q4s_bar_wait(uint64_t *b, uint32_t parity)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t ok = 0;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(ok)
            : "r"(q4s_sa(b)), "r"(parity)
            : "memory");
    } while (!ok);
#else
    (void)b, (void)parity;
#endif
}

static __device__ __forceinline__ void q4s_bar_arrive(uint64_t *b)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(q4s_sa(b)) : "memory");
#else
    (void)b;
#endif
}

static __device__ __forceinline__ void q4s_bar_expect(uint64_t *b, uint32_t bytes)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(q4s_sa(b)), "r"(bytes) : "memory");
#else
    (void)b, (void)bytes;
#endif
}

/* bytes (a multiple of 16) from global src to shared dst (both 16-byte aligned), counted on bar */
static __device__ __forceinline__ void q4s_copy(void *dst, const void *src, uint32_t bytes, uint64_t *bar, bool hint,
                                                uint64_t pol)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (hint)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, "
                     "[%3], %4;" ::"r"(q4s_sa(dst)),
                     "l"(src), "r"(bytes), "r"(q4s_sa(bar)), "l"(pol)
                     : "memory");
    else
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                         q4s_sa(dst)),
                     "l"(src), "r"(bytes), "r"(q4s_sa(bar))
                     : "memory");
#else
    (void)dst, (void)src, (void)bytes, (void)bar, (void)hint, (void)pol;
    __trap(); /* sm_75/80 code: the host never launches k_q4_s below compute capability 9.0 */
#endif
}

/* True when the phase with parity `parity` of mbarrier b has completed (does not wait). */
static __device__ __forceinline__ bool q4s_bar_test(uint64_t *b, uint32_t parity)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t ok;
    asm volatile(
        "{\n\t.reg .pred p;\n\tmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(ok)
        : "r"(q4s_sa(b)), "r"(parity)
        : "memory");
    return ok != 0;
#else
    (void)b, (void)parity;
    return true;
#endif
}

/* Makes mbarrier initializations visible to the bulk copy engine (after q4s_bar_init, before the
 * block's barrier). */
static __device__ __forceinline__ void q4s_bar_fence_init(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

#endif
