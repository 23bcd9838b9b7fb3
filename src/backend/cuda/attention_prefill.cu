/* attention_prefill.cu — flash attention for prefill runs over the paged KV cache (see
 * attention.cu for the whole op and the split of a batch between its two kernels).
 *
 * k_attn_prefill: a block takes a tile of BQ queries of one head; tiles of PF_BK keys go to
 * shared memory, S = Q K^T and O += P V run on tensor cores (WMMA 16x16x16, bf16 or f16 inputs,
 * float32 accumulation) for 16-bit caches, as float32 loops for a float32 cache; the online
 * softmax (per-row max and sum, O rescaled in shared memory) is float32. */
#include <math.h>
#include <mma.h>

#include "backend/cuda/attention_internal.cuh"
#include "backend/cuda/kv_types.cuh"

#define PF_THREADS 128
#define PF_BK 64 /* keys per tile of the prefill kernel */

/* ------------------------------------------------------------------------------------------
 * Prefill: grid (tiles, H), PF_THREADS threads, dynamic shared memory laid out by pf_layout.
 * tiles[2k] = first batch row of tile k, tiles[2k+1] = its rows (<= BQ), consecutive positions of
 * one sequence. Shared element type: KT for Q and K/V tiles (16-bit: the WMMA inputs), float32
 * for scores, P (float32 path) and O. */
struct pf_layout {
    int Dp;             /* D rounded up to 16 (zero padded) */
    int ldh, lds, ldp, ldo; /* leading dimensions (elements) of Q and K/V, S, P, O */
    size_t q, kv, s, p, o, m, l, c, rpos, rstart, slots, total; /* byte offsets */
};

static __host__ __device__ pf_layout pf_make_layout(int D, int BQ, int esz)
{
    pf_layout L;
    L.Dp = (D + 15) / 16 * 16;
    const bool h16 = esz == 2;
    L.ldh = h16 ? L.Dp + 8 : L.Dp + 4; /* against bank conflicts; rows stay 16-byte aligned (WMMA: 32) */
    L.lds = PF_BK + 4;
    L.ldp = PF_BK + 8;
    L.ldo = L.Dp + 4;
    size_t off = 0;
#define PF_TAKE(field, bytes) (L.field = off, off = (off + (size_t)(bytes) + 127) & ~(size_t)127)
    PF_TAKE(q, (size_t)BQ * L.ldh * esz);
    PF_TAKE(kv, (size_t)PF_BK * L.ldh * esz);
    PF_TAKE(s, (size_t)BQ * L.lds * 4);
    PF_TAKE(p, h16 ? (size_t)BQ * L.ldp * 2 : 0);
    PF_TAKE(o, (size_t)BQ * L.ldo * 4);
    PF_TAKE(m, (size_t)BQ * 4);
    PF_TAKE(l, (size_t)BQ * 4);
    PF_TAKE(c, (size_t)BQ * 4);
    PF_TAKE(rpos, (size_t)BQ * 8);
    PF_TAKE(rstart, (size_t)BQ * 8);
    PF_TAKE(slots, (size_t)PF_BK * 8);
#undef PF_TAKE
    L.total = off;
    return L;
}

/* WMMA on bf16 needs compute capability 8.0; the host never picks it below (f16 works from 7.0). */
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ATT_HAVE_BF16_MMA 1
#else
#define ATT_HAVE_BF16_MMA 0
#endif

/* Loads PF_BK rows of K or V (n valid, the rest zero) into shared rows of ldh elements. */
template <typename KT>
static __device__ __forceinline__ void pf_load_kv(KT *dst, const KT *base, const int64_t *slots, int n, int D,
                                                  int ldh, int64_t HkvD, bool vec)
{
    constexpr int VE = kv_traits<KT>::VEC;
    if (vec) {
        const int nu = D / VE;
        for (int x = threadIdx.x; x < PF_BK * nu; x += PF_THREADS) {
            int j = x / nu, u = x % nu;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (j < n) v = __ldg((const uint4 *)(base + slots[j] * HkvD + u * VE));
            *(uint4 *)(dst + (size_t)j * ldh + u * VE) = v;
        }
    } else {
        for (int x = threadIdx.x; x < PF_BK * D; x += PF_THREADS) {
            int j = x / D, d = x % D;
            dst[(size_t)j * ldh + d] = j < n ? base[slots[j] * HkvD + d] : kv_traits<KT>::from_f32(0.0f);
        }
    }
}

template <typename KT>
__global__ void __launch_bounds__(PF_THREADS)
    k_attn_prefill(float *out, const float *q, const KT *kc, const KT *vc, att_meta md, const int32_t *tiles, int H,
                   int Hkv, int D, int BQ, bool vec, float scale)
{
    using namespace nvcuda;
    constexpr bool H16 = !std::is_same<KT, float>::value;
    extern __shared__ __align__(128) unsigned char smem[];
    const pf_layout L = pf_make_layout(D, BQ, (int)sizeof(KT));
    KT *Qs = (KT *)(smem + L.q), *KVs = (KT *)(smem + L.kv);
    float *S = (float *)(smem + L.s), *O = (float *)(smem + L.o);
    float *rm = (float *)(smem + L.m), *rl = (float *)(smem + L.l), *rc = (float *)(smem + L.c);
    int64_t *rpos = (int64_t *)(smem + L.rpos), *rstart = (int64_t *)(smem + L.rstart);
    int64_t *slots = (int64_t *)(smem + L.slots);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = PF_THREADS / 32;
    const int h = blockIdx.y, kvh = h / (H / Hkv);
    const int row0 = tiles[2 * blockIdx.x], nq = tiles[2 * blockIdx.x + 1];
    const int64_t t_last = row0 + nq - 1;
    const int32_t *table = att_table(md, t_last); /* the last row's table covers every key of the tile */
    const int64_t p_first = md.pos[row0], p_last = md.pos[t_last];
    const int64_t HkvD = (int64_t)Hkv * D;
    const int Dp = L.Dp;

    for (int r = tid; r < BQ; r += PF_THREADS) {
        rpos[r] = r < nq ? p_first + r : -1; /* rows past the tile attend to nothing */
        rstart[r] = r < nq ? att_start(md, p_first + r) : 0;
        rm[r] = -INFINITY;
        rl[r] = 0.0f;
    }
    for (int x = tid; x < BQ * Dp; x += PF_THREADS) {
        int r = x / Dp, d = x % Dp;
        float v = r < nq && d < D ? q[((size_t)(row0 + r) * H + h) * D + d] : 0.0f;
        Qs[(size_t)r * L.ldh + d] = kv_traits<KT>::from_f32(v);
    }
    for (int x = tid; x < BQ * L.ldo; x += PF_THREADS) O[x] = 0.0f;
    if (Dp > D) /* zero pad columns of the K/V tile: the loads below write [0, D) only */
        for (int x = tid; x < PF_BK * (Dp - D); x += PF_THREADS)
            KVs[(size_t)(x / (Dp - D)) * L.ldh + D + x % (Dp - D)] = kv_traits<KT>::from_f32(0.0f);
    const int64_t kstart = att_start(md, p_first);
    __syncthreads();

    for (int64_t k0 = kstart; k0 <= p_last; k0 += PF_BK) {
        const int n = (int)min((int64_t)PF_BK, p_last - k0 + 1);
        for (int j = tid; j < n; j += PF_THREADS) {
            int64_t pp = k0 + j;
            slots[j] = (int64_t)table[pp / md.bs] * md.bs + pp % md.bs;
        }
        __syncthreads();
        pf_load_kv<KT>(KVs, kc + (int64_t)kvh * D, slots, n, D, L.ldh, HkvD, vec);
        __syncthreads();
        /* S = Q K^T */
        if constexpr (H16) {
            if constexpr (std::is_same<KT, __nv_bfloat16>::value && !ATT_HAVE_BF16_MMA) {
                __trap();
            } else {
                const int ntiles = (BQ / 16) * (PF_BK / 16);
                for (int tt = warp; tt < ntiles; tt += nwarps) {
                    const int mi = tt / (PF_BK / 16), ni = tt % (PF_BK / 16);
                    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
                    wmma::fill_fragment(fc, 0.0f);
                    for (int k = 0; k < Dp; k += 16) {
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, KT, wmma::row_major> fa;
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, KT, wmma::col_major> fb;
                        wmma::load_matrix_sync(fa, Qs + (size_t)mi * 16 * L.ldh + k, L.ldh);
                        wmma::load_matrix_sync(fb, KVs + (size_t)ni * 16 * L.ldh + k, L.ldh);
                        wmma::mma_sync(fc, fa, fb, fc);
                    }
                    wmma::store_matrix_sync(S + (size_t)mi * 16 * L.lds + ni * 16, fc, L.lds, wmma::mem_row_major);
                }
            }
        } else {
            for (int x = tid; x < BQ * PF_BK; x += PF_THREADS) {
                const int r = x / PF_BK, j = x % PF_BK;
                const float *qr = (const float *)Qs + (size_t)r * L.ldh, *kr = (const float *)KVs + (size_t)j * L.ldh;
                float s = 0.0f;
                for (int d = 0; d < D; d++) s += qr[d] * kr[d];
                S[(size_t)r * L.lds + j] = s;
            }
        }
        __syncthreads();
        /* online softmax, one warp per row: P into P (16-bit) or back into S (float32) */
        for (int r = warp; r < BQ; r += nwarps) {
            float sv[2];
            float mx = -INFINITY;
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int j = lane + 32 * c;
                const int64_t pp = k0 + j;
                const bool ok = j < n && pp <= rpos[r] && pp >= rstart[r];
                sv[c] = ok ? S[(size_t)r * L.lds + j] * scale : -INFINITY;
                mx = fmaxf(mx, sv[c]);
            }
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_old = rm[r], m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int j = lane + 32 * c;
                const float e = m_new == -INFINITY ? 0.0f : expf(sv[c] - m_new);
                sum += e;
                if constexpr (H16) ((KT *)(smem + L.p))[(size_t)r * L.ldp + j] = kv_traits<KT>::from_f32(e);
                else S[(size_t)r * L.lds + j] = e;
            }
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) {
                const float c = m_new == -INFINITY ? 1.0f : expf(m_old - m_new);
                rc[r] = c;
                rm[r] = m_new;
                rl[r] = rl[r] * c + sum;
            }
        }
        pf_load_kv<KT>(KVs, vc + (int64_t)kvh * D, slots, n, D, L.ldh, HkvD, vec); /* K is done with */
        __syncthreads();
        /* O = O * c + P V */
        if constexpr (H16) {
            for (int x = tid; x < BQ * Dp; x += PF_THREADS) {
                const int r = x / Dp, d = x % Dp;
                O[(size_t)r * L.ldo + d] *= rc[r];
            }
            __syncthreads();
            if constexpr (std::is_same<KT, __nv_bfloat16>::value && !ATT_HAVE_BF16_MMA) {
                __trap();
            } else {
                const KT *P = (const KT *)(smem + L.p);
                const int ntiles = (BQ / 16) * (Dp / 16);
                for (int tt = warp; tt < ntiles; tt += nwarps) {
                    const int mi = tt / (Dp / 16), ni = tt % (Dp / 16);
                    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
                    float *op = O + (size_t)mi * 16 * L.ldo + ni * 16;
                    wmma::load_matrix_sync(fc, op, L.ldo, wmma::mem_row_major);
                    for (int k = 0; k < PF_BK; k += 16) {
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, KT, wmma::row_major> fa;
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, KT, wmma::row_major> fb;
                        wmma::load_matrix_sync(fa, P + (size_t)mi * 16 * L.ldp + k, L.ldp);
                        wmma::load_matrix_sync(fb, KVs + (size_t)k * L.ldh + ni * 16, L.ldh);
                        wmma::mma_sync(fc, fa, fb, fc);
                    }
                    wmma::store_matrix_sync(op, fc, L.ldo, wmma::mem_row_major);
                }
            }
        } else {
            for (int x = tid; x < BQ * D; x += PF_THREADS) {
                const int r = x / D, d = x % D;
                const float *pr = S + (size_t)r * L.lds, *vk = (const float *)KVs + d;
                float a = O[(size_t)r * L.ldo + d] * rc[r];
                for (int j = 0; j < n; j++) a += pr[j] * vk[(size_t)j * L.ldh];
                O[(size_t)r * L.ldo + d] = a;
            }
        }
        __syncthreads(); /* before the next tile rewrites slots, K/V, S and P */
    }
    for (int x = tid; x < nq * D; x += PF_THREADS) {
        const int r = x / D, d = x % D;
        out[((size_t)(row0 + r) * H + h) * D + d] = O[(size_t)r * L.ldo + d] / rl[r];
    }
}

/* Largest BQ in {64, 32, 16} whose shared memory fits the device; 0 when none does. */
int tuna_cuda_attn_prefill_bq(int D, int esz, int max_smem)
{
    for (int bq = 64; bq >= 16; bq /= 2)
        if (pf_make_layout(D, bq, esz).total <= (size_t)max_smem) return bq;
    return 0;
}

template <typename KT>
static void launch_prefill(tuna_backend *be, float *out, const float *q, const void *kcache, const void *vcache,
                           const att_meta &md, const int32_t *tiles, int64_t n_tiles, int H, int Hkv, int D, int BQ,
                           bool vec, float scale)
{
    const size_t smem = pf_make_layout(D, BQ, (int)sizeof(KT)).total;
    if (!tuna_cuda_check(be, cudaFuncSetAttribute(k_attn_prefill<KT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  (int)smem),
                         "cudaFuncSetAttribute(k_attn_prefill)"))
        return;
    k_attn_prefill<KT><<<dim3((unsigned)n_tiles, (unsigned)H), PF_THREADS, smem, be->stream>>>(
        out, q, (const KT *)kcache, (const KT *)vcache, md, tiles, H, Hkv, D, BQ, vec, scale);
    tuna_cuda_check_launch(be, "k_attn_prefill");
}

void tuna_cuda_attn_prefill_launch(tuna_backend *be, int code, float *out, const float *q, const void *kcache,
                                   const void *vcache, const att_meta &md, const int32_t *tiles, int64_t n_tiles,
                                   int H, int Hkv, int D, int BQ, bool vec, float scale)
{
    if (n_tiles <= 0 || be->sticky) return;
    if (code == 0)
        launch_prefill<float>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, D, BQ, vec, scale);
    else if (code == 1)
        launch_prefill<__nv_bfloat16>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, D, BQ, vec, scale);
    else
        launch_prefill<__half>(be, out, q, kcache, vcache, md, tiles, n_tiles, H, Hkv, D, BQ, vec, scale);
}
