/* attention.cu — causal attention over the paged KV cache, prefill and decode alike.
 *
 * One block per (token, head). Keys of the token's sequence at positions
 * [max(0, pos - window + 1), pos] are visited in chunks of ATT_CHUNK: scores q·k·scale of a chunk go
 * to shared memory, then an online softmax (running max and sum, rescaling the accumulator)
 * adds the chunk's values; each thread owns output dims tid and tid + ATT_CHUNK (D <= 256).
 * Cache layout [slots, Hkv, D]; position p lives in slot table[p / bs] * bs + p % bs; GQA maps
 * head h to kv head h / (H / Hkv). A correct first version: a flash-decoding split of long
 * contexts across blocks is the next step for speed (docs/PERFORMANCE.md).
 */
#include <math.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/kv_types.cuh"

#define ATT_CHUNK 128
#define ATT_MAX_D 256

template <typename KT>
__global__ void k_attention(float *out, const float *q, const KT *kc, const KT *vc, const int64_t *pos,
                            const int32_t *tables, const int32_t *table_off, int32_t bs, int64_t window, int64_t H,
                            int64_t Hkv, int64_t D, float scale)
{
    __shared__ float qs[ATT_MAX_D];
    __shared__ float sc[ATT_CHUNK];
    __shared__ int64_t slots[ATT_CHUNK];
    __shared__ float red[ATT_CHUNK / 32];
    const int64_t t = blockIdx.x, h = blockIdx.y;
    const int tid = threadIdx.x;
    const int64_t kvh = h / (H / Hkv);
    const int64_t HkvD = Hkv * D;
    const int32_t *table = tables + table_off[t];
    const int64_t p = pos[t];
    int64_t start = 0;
    if (window > 0 && p - window + 1 > 0) start = p - window + 1;
    for (int64_t d = tid; d < D; d += blockDim.x) qs[d] = q[(t * H + h) * D + d];
    float m = -INFINITY, l = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    __syncthreads();
    for (int64_t c0 = start; c0 <= p; c0 += ATT_CHUNK) {
        int64_t j = c0 + tid;
        float s = -INFINITY;
        if (j <= p) {
            int64_t slot = (int64_t)table[j / bs] * bs + j % bs;
            slots[tid] = slot;
            const KT *kr = kc + slot * HkvD + kvh * D;
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += qs[d] * kv_traits<KT>::to_f32(kr[d]);
            s = dot * scale;
        }
        /* chunk max */
        float cm = s;
        for (int o = 16; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
        if ((tid & 31) == 0) red[tid >> 5] = cm;
        __syncthreads();
        cm = red[0];
        for (int w = 1; w < ATT_CHUNK / 32; w++) cm = fmaxf(cm, red[w]);
        float nm = fmaxf(m, cm);
        float e = (j <= p) ? expf(s - nm) : 0.0f;
        sc[tid] = e;
        __syncthreads(); /* red[] reads done, sc[] and slots[] written */
        float es = e;
        for (int o = 16; o > 0; o >>= 1) es += __shfl_xor_sync(0xffffffffu, es, o);
        if ((tid & 31) == 0) red[tid >> 5] = es;
        __syncthreads();
        float csum = 0.0f;
        for (int w = 0; w < ATT_CHUNK / 32; w++) csum += red[w];
        float f = expf(m - nm); /* 0 on the first chunk (m = -inf) */
        l = l * f + csum;
        acc0 *= f;
        acc1 *= f;
        int64_t n = p - c0 + 1 < ATT_CHUNK ? p - c0 + 1 : ATT_CHUNK;
        for (int64_t i = 0; i < n; i++) {
            const KT *vr = vc + slots[i] * HkvD + kvh * D;
            float w = sc[i];
            if (tid < D) acc0 += w * kv_traits<KT>::to_f32(vr[tid]);
            if (tid + ATT_CHUNK < D) acc1 += w * kv_traits<KT>::to_f32(vr[tid + ATT_CHUNK]);
        }
        m = nm;
        __syncthreads(); /* before the next chunk overwrites sc[], slots[], red[] */
    }
    float inv = 1.0f / l;
    float *o = out + (t * H + h) * D;
    if (tid < D) o[tid] = acc0 * inv;
    if (tid + ATT_CHUNK < D) o[tid + ATT_CHUNK] = acc1 * inv;
}

void tuna_cuda_attention(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                         enum tuna_dtype kv_dtype, const struct tuna_attn_batch *b, int64_t H, int64_t Hkv, int64_t D,
                         float scale)
{
    if (be->sticky || b->T <= 0) return;
    int code = kv_code(kv_dtype);
    if (code < 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "attention (KV cache dtype is not float32, bf16 or f16)");
        return;
    }
    if (D > ATT_MAX_D || H % Hkv != 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "attention (head_dim over 256 or H not a multiple of Hkv)");
        return;
    }
    /* flatten the block tables: consecutive tokens of one sequence share theirs */
    int64_t T = b->T;
    int32_t *off = (int32_t *)malloc((size_t)T * sizeof(int32_t));
    size_t total = 0;
    for (int64_t t = 0; t < T; t++) total += (size_t)(b->pos[t] / b->block_size + 1);
    int32_t *flat = (int32_t *)malloc((total ? total : 1) * sizeof(int32_t));
    if (!off || !flat) {
        free(off);
        free(flat);
        tuna_cuda_check(be, cudaErrorMemoryAllocation, "attention block tables (host)");
        return;
    }
    size_t used = 0;
    const int32_t *last_tbl = NULL;
    int64_t last_n = 0;
    int32_t last_off = 0;
    for (int64_t t = 0; t < T; t++) {
        int64_t nb = b->pos[t] / b->block_size + 1;
        if (b->block_tables[t] == last_tbl && nb <= last_n) {
            off[t] = last_off;
            continue;
        }
        memcpy(flat + used, b->block_tables[t], (size_t)nb * sizeof(int32_t));
        off[t] = (int32_t)used;
        last_tbl = b->block_tables[t];
        last_n = nb;
        last_off = (int32_t)used;
        used += (size_t)nb;
    }
    struct cuda_meta mt = {0};
    if (!tuna_cuda_meta_begin(be, &mt, (size_t)T * 12 + (used ? used : 1) * sizeof(int32_t))) {
        free(off);
        free(flat);
        return;
    }
    size_t o_pos = (size_t)tuna_cuda_meta_stage(be, &mt, b->pos, (size_t)T * sizeof(int64_t));
    size_t o_flat = (size_t)tuna_cuda_meta_stage(be, &mt, flat, (used ? used : 1) * sizeof(int32_t));
    size_t o_off = (size_t)tuna_cuda_meta_stage(be, &mt, off, (size_t)T * sizeof(int32_t));
    free(off);
    free(flat);
    if (be->sticky || !tuna_cuda_meta_flush(be, &mt)) return;
    char *base = (char *)be->meta.p;
    dim3 grid((unsigned)T, (unsigned)H);
    const int64_t *dpos = (const int64_t *)(base + o_pos);
    const int32_t *dflat = (const int32_t *)(base + o_flat), *doff = (const int32_t *)(base + o_off);
    if (code == 0)
        k_attention<float><<<grid, ATT_CHUNK, 0, be->stream>>>(out, q, (const float *)kcache, (const float *)vcache,
                                                               dpos, dflat, doff, b->block_size, b->sliding_window, H,
                                                               Hkv, D, scale);
    else if (code == 1)
        k_attention<__nv_bfloat16><<<grid, ATT_CHUNK, 0, be->stream>>>(
            out, q, (const __nv_bfloat16 *)kcache, (const __nv_bfloat16 *)vcache, dpos, dflat, doff, b->block_size,
            b->sliding_window, H, Hkv, D, scale);
    else
        k_attention<__half><<<grid, ATT_CHUNK, 0, be->stream>>>(out, q, (const __half *)kcache,
                                                                (const __half *)vcache, dpos, dflat, doff,
                                                                b->block_size, b->sliding_window, H, Hkv, D, scale);
    tuna_cuda_check_launch(be, "k_attention");
}
