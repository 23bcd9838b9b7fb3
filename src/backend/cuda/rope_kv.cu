/* rope_kv.cu — the step between the q/k/v projections and attention as one kernel (backend.h's
 * rope_kv_store): Qwen3's per-head RMSNorm of q and k when present, RoPE of q and k in place, and
 * k and v written into the paged KV cache. The same formulas as norm.cu, rope.cu and kv_store.cu
 * (the same float operations on each element), in one launch
 * instead of three to five: one block per (token, head) of q and of k; a k block also stores its
 * v head. Launched with PDL (pdl.cuh). q/k/v are float32 (io 0) or 16-bit (io 1 bf16, 2 f16: the
 * 16-bit activation op rope_kv_store16; the same math in float32, q and k rounded back in place). */
#include <stdlib.h>

#include "backend/cuda/act16.cuh"
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/kv_types.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/rope.cuh"

template <typename KT>
__global__ void k_rope_kv(void *q, void *k, const void *v, int io, const float *qn, const float *kn, float eps, KT *kc,
                          KT *vc, const int64_t *pos, const int64_t *slot, int64_t H, int64_t Hkv, int64_t D,
                          int64_t half, const float *inv_freq, float attn_factor, const struct tuna_l2pf pf)
{
    extern __shared__ float sh[]; /* [D] the head, normalized */
    __shared__ float red[32];
    tuna_pdl_wait();
    tuna_pdl_trigger();
    /* the L2 prefetch hint (TUNA_L2PF=2): the next weight streams in while this kernel and
     * attention leave DRAM idle; after the wait, so the q/k/v GEMV before has the bandwidth */
    if (threadIdx.x == 0) tuna_l2pf_issue(pf, blockIdx.x, gridDim.x);
    const int64_t t = blockIdx.x / (H + Hkv), h = blockIdx.x % (H + Hkv);
    const bool is_k = h >= H;
    const int64_t hh = is_k ? h - H : h;
    void *row = is_k ? k : q;
    const int64_t r0 = is_k ? (t * Hkv + hh) * D : (t * H + hh) * D;
    const float *nw = is_k ? kn : qn;
    float s = 0.0f;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float xv = a16_ld(row, io, r0 + d);
        sh[d] = xv;
        s += xv * xv;
    }
    if (nw) { /* norm.cu's k_rmsnorm over the head */
        const float r = tuna_cuda_rms_inv(s, D, eps, red);
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) sh[d] = sh[d] * r * nw[d];
    }
    __syncthreads();
    const float p = (float)pos[t];
    const int64_t HkvD = Hkv * D, sl = is_k ? slot[t] : 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float out = sh[d];
        if (d < 2 * half) { /* rope.cu's k_rope for the pair (j, j + half) */
            const int64_t jj = d < half ? d : d - half;
            float sn, c;
            rope_cos_sin(inv_freq, jj, p, attn_factor, &c, &sn);
            const float x1 = sh[jj], x2 = sh[jj + half];
            out = d < half ? rope_first(x1, x2, c, sn) : rope_second(x1, x2, c, sn);
        }
        a16_st(row, io, r0 + d, out);
        if (is_k) {
            kc[sl * HkvD + hh * D + d] = kv_traits<KT>::from_f32(out);
            vc[sl * HkvD + hh * D + d] = kv_traits<KT>::from_f32(a16_ld(v, io, t * HkvD + hh * D + d));
        }
    }
}

/* TUNA_ROPE16W=0: the 16-bit op runs k_rope_kv (one block per head) instead of k_rope_kv16w. */
static bool rope16w_on(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_ROPE16W");
        v = !(e && e[0] == '0');
    }
    return v == 1;
}

/* The 16-bit twin without q/k norms (Llama, Mistral): one warp per (token, head), each lane
 * rotating pairs of adjacent pairs (j, j + 1) and (j + half, j + half + 1) from two 4-byte loads,
 * no shared memory or barrier; a k warp also stores its k and v rows. The same float operations
 * on each element as k_rope_kv (rope.cuh). half even, D even, 4-byte aligned rows. */
template <typename KT>
__global__ void k_rope_kv16w(void *q, void *k, const void *v, int io, KT *kc, KT *vc, const int64_t *pos,
                             const int64_t *slot, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t half,
                             const float *inv_freq, float attn_factor, const struct tuna_l2pf pf)
{
    tuna_pdl_wait();
    tuna_pdl_trigger();
    if (threadIdx.x == 0) tuna_l2pf_issue(pf, blockIdx.x, gridDim.x);
    const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (w >= T * (H + Hkv)) return;
    const int64_t t = w / (H + Hkv), h = w % (H + Hkv);
    const bool is_k = h >= H;
    const int64_t hh = is_k ? h - H : h;
    void *row = is_k ? k : q;
    const int64_t r0 = is_k ? (t * Hkv + hh) * D : (t * H + hh) * D;
    const float p = (float)pos[t];
    const int64_t HkvD = Hkv * D, c0 = is_k ? slot[t] * HkvD + hh * D : 0, v0 = t * HkvD + hh * D;
    for (int64_t j = 2 * lane; j < half; j += 64) {
        const float a1 = a16_ld(row, io, r0 + j), b1 = a16_ld(row, io, r0 + j + 1);
        const float a2 = a16_ld(row, io, r0 + j + half), b2 = a16_ld(row, io, r0 + j + half + 1);
        float ca, sa, cb, sb;
        rope_cos_sin(inv_freq, j, p, attn_factor, &ca, &sa);
        rope_cos_sin(inv_freq, j + 1, p, attn_factor, &cb, &sb);
        const float o1a = rope_first(a1, a2, ca, sa), o1b = rope_first(b1, b2, cb, sb);
        const float o2a = rope_second(a1, a2, ca, sa), o2b = rope_second(b1, b2, cb, sb);
        a16_st2(row, io, r0 + j, o1a, o1b);
        a16_st2(row, io, r0 + j + half, o2a, o2b);
        if (is_k) {
            kc[c0 + j] = kv_traits<KT>::from_f32(o1a);
            kc[c0 + j + 1] = kv_traits<KT>::from_f32(o1b);
            kc[c0 + j + half] = kv_traits<KT>::from_f32(o2a);
            kc[c0 + j + half + 1] = kv_traits<KT>::from_f32(o2b);
        }
    }
    if (!is_k) return;
    for (int64_t d = 2 * half + lane; d < D; d += 32) /* dims past rot_dim: stored as they are */
        kc[c0 + d] = kv_traits<KT>::from_f32(a16_ld(row, io, r0 + d));
    for (int64_t d = lane; d < D; d += 32) vc[c0 + d] = kv_traits<KT>::from_f32(a16_ld(v, io, v0 + d));
}

static void rope_kv_io(tuna_backend *be, void *q, void *k, const void *v, int io, const float *q_norm,
                       const float *k_norm, float eps, void *kcache, void *vcache, enum tuna_dtype kv_dtype,
                             const int64_t *pos, const int64_t *slot, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                             int64_t rot_dim, const float *inv_freq, float attn_factor)
{
    if (be->sticky || T <= 0) return;
    int code = kv_code8(kv_dtype);
    if (code < 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue,
                        "rope_kv_store (KV cache dtype is not float32, bf16, f16 or fp8_e4m3)");
        return;
    }
    const int64_t half = rot_dim / 2;
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, (size_t)T * 16 + (size_t)half * sizeof(float))) return;
    size_t off_pos = (size_t)tuna_cuda_meta_stage(be, &m, pos, (size_t)T * sizeof(int64_t));
    size_t off_slot = (size_t)tuna_cuda_meta_stage(be, &m, slot, (size_t)T * sizeof(int64_t));
    size_t off_f = half ? (size_t)tuna_cuda_meta_stage(be, &m, inv_freq, (size_t)half * sizeof(float)) : 0;
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return;
    const int64_t *dpos = (const int64_t *)((char *)be->meta.p + off_pos);
    const int64_t *dslot = (const int64_t *)((char *)be->meta.p + off_slot);
    const float *dfreq = (const float *)((char *)be->meta.p + off_f);
    const struct tuna_l2pf pf = tuna_cuda_l2pf_take(be, TUNA_L2PF_ROPE, T);
    be->attn_pdl_hint = T == 1;
    if (io != 0 && !q_norm && !k_norm && half % 2 == 0 && D % 2 == 0 && (uintptr_t)q % 4 == 0 &&
        (uintptr_t)k % 4 == 0 && rope16w_on()) {
        const dim3 g16((unsigned)((T * (H + Hkv) + 7) / 8)), b16(256);
        if (code == 0)
            tuna_cuda_launch(be, "k_rope_kv16w", k_rope_kv16w<float>, g16, b16, 0, q, k, v, io, (float *)kcache,
                             (float *)vcache, dpos, dslot, T, H, Hkv, D, half, dfreq, attn_factor, pf);
        else if (code == 1)
            tuna_cuda_launch(be, "k_rope_kv16w", k_rope_kv16w<__nv_bfloat16>, g16, b16, 0, q, k, v, io,
                             (__nv_bfloat16 *)kcache, (__nv_bfloat16 *)vcache, dpos, dslot, T, H, Hkv, D, half, dfreq,
                             attn_factor, pf);
        else if (code == 2)
            tuna_cuda_launch(be, "k_rope_kv16w", k_rope_kv16w<__half>, g16, b16, 0, q, k, v, io, (__half *)kcache,
                             (__half *)vcache, dpos, dslot, T, H, Hkv, D, half, dfreq, attn_factor, pf);
        else
            tuna_cuda_launch(be, "k_rope_kv16w", k_rope_kv16w<__nv_fp8_e4m3>, g16, b16, 0, q, k, v, io,
                             (__nv_fp8_e4m3 *)kcache, (__nv_fp8_e4m3 *)vcache, dpos, dslot, T, H, Hkv, D, half, dfreq,
                             attn_factor, pf);
        return;
    }
    int threads = (int)((D + 31) / 32 * 32);
    if (threads > 256) threads = 256;
    const dim3 grid((unsigned)(T * (H + Hkv))), block((unsigned)threads);
    const size_t smem = (size_t)D * sizeof(float);
    if (code == 0)
        tuna_cuda_launch(be, "k_rope_kv", k_rope_kv<float>, grid, block, smem, q, k, v, io, q_norm, k_norm, eps,
                         (float *)kcache, (float *)vcache, dpos, dslot, H, Hkv, D, half, dfreq, attn_factor, pf);
    else if (code == 1)
        tuna_cuda_launch(be, "k_rope_kv", k_rope_kv<__nv_bfloat16>, grid, block, smem, q, k, v, io, q_norm, k_norm, eps,
                         (__nv_bfloat16 *)kcache, (__nv_bfloat16 *)vcache, dpos, dslot, H, Hkv, D, half, dfreq,
                         attn_factor, pf);
    else if (code == 2)
        tuna_cuda_launch(be, "k_rope_kv", k_rope_kv<__half>, grid, block, smem, q, k, v, io, q_norm, k_norm, eps,
                         (__half *)kcache, (__half *)vcache, dpos, dslot, H, Hkv, D, half, dfreq, attn_factor, pf);
    else
        tuna_cuda_launch(be, "k_rope_kv", k_rope_kv<__nv_fp8_e4m3>, grid, block, smem, q, k, v, io, q_norm, k_norm, eps,
                         (__nv_fp8_e4m3 *)kcache, (__nv_fp8_e4m3 *)vcache, dpos, dslot, H, Hkv, D, half, dfreq,
                         attn_factor, pf);
}

void tuna_cuda_rope_kv_store(tuna_backend *be, float *q, float *k, const float *v, const float *q_norm,
                             const float *k_norm, float eps, void *kcache, void *vcache, enum tuna_dtype kv_dtype,
                             const int64_t *pos, const int64_t *slot, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                             int64_t rot_dim, const float *inv_freq, float attn_factor)
{
    rope_kv_io(be, q, k, v, 0, q_norm, k_norm, eps, kcache, vcache, kv_dtype, pos, slot, T, H, Hkv, D, rot_dim, inv_freq,
               attn_factor);
}

void tuna_cuda_rope_kv_store16(tuna_backend *be, void *q, void *k, const void *v, enum tuna_dtype adt,
                               const float *q_norm, const float *k_norm, float eps, void *kcache, void *vcache,
                               enum tuna_dtype kv_dtype, const int64_t *pos, const int64_t *slot, int64_t T, int64_t H,
                               int64_t Hkv, int64_t D, int64_t rot_dim, const float *inv_freq, float attn_factor)
{
    if (be->sticky || T <= 0) return;
    if (adt != TUNA_DTYPE_BF16 && adt != TUNA_DTYPE_F16) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "rope_kv_store16 (activations neither bf16 nor f16)");
        return;
    }
    rope_kv_io(be, q, k, v, adt == TUNA_DTYPE_BF16 ? 1 : 2, q_norm, k_norm, eps, kcache, vcache, kv_dtype, pos, slot, T,
               H, Hkv, D, rot_dim, inv_freq, attn_factor);
}
