/* attention_dec16.cuh — what the decode kernels over 16-bit (and FP8) caches share:
 * k_attn_decode16 (attention.cu, any batch) and k_attn_b1 (attention_b1.cu, one token). Groups of
 * D16_KEYS keys, staged in shared memory as 16 K rows then 16 V rows, RB bytes apart (rows outside
 * the context hold zeros), scores in log2 units (q scaled by scale * log2(e)). */
#pragma once
#include <type_traits>

#include "backend/cuda/attention_internal.cuh"
#include "backend/cuda/kv_types.cuh"

#define D16_KEYS 16

static __device__ __forceinline__ void cp_async_wait_rt(int n) /* n in 1..3 */
{
    if (n <= 1) cp_async_wait<1>();
    else if (n == 2) cp_async_wait<2>();
    else cp_async_wait<3>();
}
/* 2^x, x <= 0 (or -inf: 0); relative error ~2^-22 */
static __device__ __forceinline__ float d16_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* 8 elements of a K/V row in shared memory (16 bytes of bf16/f16, 8 of FP8) as float32 */
template <typename KT> static __device__ __forceinline__ void d16_unpack(const char *p, float *f)
{
    if constexpr (sizeof(KT) == 1) {
        kv_unpack_f8x8(*(const uint2 *)p, f);
    } else {
        constexpr bool bf = std::is_same<KT, __nv_bfloat16>::value;
        const uint4 v = *(const uint4 *)p;
        kv_unpack_u32(v.x, bf, f), kv_unpack_u32(v.y, bf, f + 2), kv_unpack_u32(v.z, bf, f + 4),
            kv_unpack_u32(v.w, bf, f + 6);
    }
}


/* The online softmax's state of GM query heads before the first group: running max, sum and
 * the lane's 8 accumulators per head. */
template <int GM>
static __device__ __forceinline__ void d16_state_init(float (&m)[GM], float (&l)[GM], float (&acc)[GM][8])
{
#pragma unroll
    for (int g = 0; g < GM; g++) {
        m[g] = -INFINITY, l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    }
}

/* The FFMA step of one group: lane (j, half) scores key j (valid: inside the context) for all GM
 * heads over half of the row's 8-element chunks (q from shared memory qs [GM][D], broadcast),
 * one shuffle joins the halves and four give the group's max; p = exp2(s - m) goes through the
 * warp's ps [D16_KEYS][GP] to the PV step, where lane (kq, cc) (pv_active: kq < KQ) adds keys kq,
 * kq + KQ, ... to its 8 output columns cc of every head. m, l, acc: the warp's running max, sum
 * (kept by the half-0 lanes) and output. */
template <typename KT, int GM>
static __device__ __forceinline__ void d16_group_ffma(const char *buf, int RB, int D, const float *qs, float *ps, int j,
                                                      int half, int kq, int cc, bool pv_active, bool valid,
                                                      float (&m)[GM], float (&l)[GM], float (&acc)[GM][8])
{
    constexpr int ES = (int)sizeof(KT);
    constexpr int GP = (GM + 3) & ~3;
    const int CH = D / 8, KQ = min(D16_KEYS, 32 / CH);
    /* scores of key j, this lane's half of the chunks */
    float dot[GM];
#pragma unroll
    for (int g = 0; g < GM; g++) dot[g] = 0.0f;
    const char *krow = buf + j * RB;
#pragma unroll 4
    for (int u = half; u < CH; u += 2) {
        float f[8];
        d16_unpack<KT>(krow + u * 8 * ES, f);
#pragma unroll
        for (int g = 0; g < GM; g++) {
            const float4 qa = *(const float4 *)(qs + g * D + u * 8);
            const float4 qb = *(const float4 *)(qs + g * D + u * 8 + 4);
            const float d0 = qa.x * f[0] + qa.y * f[1] + qa.z * f[2] + qa.w * f[3];
            const float d1 = qb.x * f[4] + qb.y * f[5] + qb.z * f[6] + qb.w * f[7];
            dot[g] += d0 + d1;
        }
    }
    float s[GM], mx[GM];
#pragma unroll
    for (int g = 0; g < GM; g++) {
        s[g] = dot[g] + __shfl_xor_sync(0xffffffffu, dot[g], 16);
        s[g] = valid ? s[g] : -INFINITY;
        mx[g] = s[g];
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1)
#pragma unroll
        for (int g = 0; g < GM; g++) mx[g] = fmaxf(mx[g], __shfl_xor_sync(0xffffffffu, mx[g], o));
    float pv[GP];
#pragma unroll
    for (int g = 0; g < GP; g++) pv[g] = 0.0f;
#pragma unroll
    for (int g = 0; g < GM; g++) {
        const float mn = fmaxf(m[g], mx[g]); /* finite: the group holds at least one key */
        const float c = d16_exp2(m[g] - mn); /* 0 on the first group */
        const float pe = d16_exp2(s[g] - mn); /* masked keys: 0 */
        l[g] = l[g] * c + (half == 0 ? pe : 0.0f);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] *= c;
        m[g] = mn;
        pv[g] = pe;
    }
    if (half == 0) {
#pragma unroll
        for (int g = 0; g < GP; g += 4)
            *(float4 *)(ps + j * GP + g) = make_float4(pv[g], pv[g + 1], pv[g + 2], pv[g + 3]);
    }
    __syncwarp();
    /* values: lane (kq, cc) adds keys kq, kq + KQ, ... of the group to its 8 columns (rows
     * outside the context are zeros with p = 0) */
    if (pv_active) {
#pragma unroll 4
        for (int jj = kq; jj < D16_KEYS; jj += KQ) {
            float f[8], pw[GP];
            d16_unpack<KT>(buf + (D16_KEYS + jj) * RB + cc * 8 * ES, f);
#pragma unroll
            for (int g = 0; g < GP; g += 4) {
                const float4 w4 = *(const float4 *)(ps + jj * GP + g);
                pw[g] = w4.x, pw[g + 1] = w4.y, pw[g + 2] = w4.z, pw[g + 3] = w4.w;
            }
#pragma unroll
            for (int g = 0; g < GM; g++)
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] += pw[g] * f[e];
        }
    }
}

/* After the FFMA loop: the warp's partial rows into its region accs ([KQ][GM][D] floats, then
 * GM maxima and GM sums), the sums first reduced across the warp. */
template <int GM>
static __device__ __forceinline__ void d16_warp_store(float *accs, int D, int kq, int cc, bool pv_active, int lane,
                                                      const float (&m)[GM], float (&l)[GM], const float (&acc)[GM][8])
{
    const int KQ = min(D16_KEYS, 32 / (D / 8));
    float *mls = accs + KQ * GM * D;
#pragma unroll
    for (int g = 0; g < GM; g++) {
        float v = l[g];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        l[g] = v;
    }
    if (pv_active) {
#pragma unroll
        for (int g = 0; g < GM; g++) {
            float *dst = accs + (kq * GM + g) * D + cc * 8;
            *(float4 *)dst = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
            *(float4 *)(dst + 4) = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
        }
    }
    if (lane == 0)
#pragma unroll
        for (int g = 0; g < GM; g++) mls[g] = m[g], mls[GM + g] = l[g];
}

/* The block's NW warps merged for head g, column d: returns the unnormalized output, M and L the
 * block's max and sum (-inf and 0 when no warp had keys). Warp w's region starts at
 * wreg_all + w * wr: [KQ][GM][D] partial rows (rows_f floats), then GM maxima and GM sums. */
static __device__ __forceinline__ float d16_block_merge(const char *wreg_all, int wr, int NW, int rows_f, int GM,
                                                        int KQ, int D, int g, int d, float &M, float &L)
{
    M = -INFINITY;
    for (int w = 0; w < NW; w++) M = fmaxf(M, ((const float *)(wreg_all + (size_t)w * wr))[rows_f + g]);
    L = 0.0f;
    float a = 0.0f;
    for (int w = 0; w < NW; w++) {
        const float *wa = (const float *)(wreg_all + (size_t)w * wr), *wm = wa + rows_f;
        if (wm[GM + g] > 0.0f) { /* a warp without keys adds nothing */
            const float f = d16_exp2(wm[g] - M);
            L += f * wm[GM + g];
            float sum = 0.0f;
            for (int z = 0; z < KQ; z++) sum += wa[(z * GM + g) * D + d];
            a += f * sum;
        }
    }
    return a;
}
