/* kv_store.cu — writes a step's keys and values (float32 activations) into the paged KV cache,
 * converted to the cache's element type (float32, bf16 or f16: round to nearest even as the CPU
 * twin; FP8 E4M3: round to nearest even, saturating, as tuna_f32_to_f8e4m3). Slots come through the metadata arena. */
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/kv_types.cuh"

template <typename KT>
__global__ void k_kv_store(KT *kc, KT *vc, const float *k, const float *v, const int64_t *slot, int64_t T,
                           int64_t HkvD)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * HkvD) return;
    int64_t t = i / HkvD, j = i % HkvD;
    int64_t s = slot[t];
    kc[s * HkvD + j] = kv_traits<KT>::from_f32(k[i]);
    vc[s * HkvD + j] = kv_traits<KT>::from_f32(v[i]);
}

void tuna_cuda_kv_store(tuna_backend *be, void *kcache, void *vcache, enum tuna_dtype kv_dtype, const float *k,
                        const float *v, const int64_t *slot, int64_t T, int64_t HkvD)
{
    if (be->sticky || T <= 0) return;
    int code = kv_code8(kv_dtype);
    if (code < 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "kv_store (KV cache dtype is not float32, bf16, f16 or fp8_e4m3)");
        return;
    }
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, (size_t)T * sizeof(int64_t))) return;
    size_t off = (size_t)tuna_cuda_meta_stage(be, &m, slot, (size_t)T * sizeof(int64_t));
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return;
    const int64_t *dslot = (const int64_t *)((char *)be->meta.p + off);
    unsigned grid = tuna_cuda_blocks(T * HkvD, 256);
    if (code == 0)
        k_kv_store<float><<<grid, 256, 0, be->stream>>>((float *)kcache, (float *)vcache, k, v, dslot, T, HkvD);
    else if (code == 1)
        k_kv_store<__nv_bfloat16><<<grid, 256, 0, be->stream>>>((__nv_bfloat16 *)kcache, (__nv_bfloat16 *)vcache, k,
                                                                v, dslot, T, HkvD);
    else if (code == 2)
        k_kv_store<__half><<<grid, 256, 0, be->stream>>>((__half *)kcache, (__half *)vcache, k, v, dslot, T, HkvD);
    else
        k_kv_store<__nv_fp8_e4m3><<<grid, 256, 0, be->stream>>>((__nv_fp8_e4m3 *)kcache, (__nv_fp8_e4m3 *)vcache, k,
                                                                v, dslot, T, HkvD);
    tuna_cuda_check_launch(be, "k_kv_store");
}
