/* q4_mm.cu — k_q4_mm: the 4-bit GEMM for decode batches past the GEMVs (twenty-first session): y =
 * x W^T (+ bias) for 9 to TUNA_Q4_MM_MAXT (default 64) tokens, reading each 4-bit weight once per
 * launch of up to 64 tokens, where the path before dequantized the whole matrix to 16 bits every
 * step for cuBLAS (the issue's "never a dequantize-every-step of the whole matrix"; H100, twentieth session: NF4
 * decode at batch 32 19.5 ms/step against bf16's 8.3).
 *
 * Layout. A block is 4 warps; warp w takes the 16 rows 16 (4 b + w) .. + 15 of W (the A rows of
 * mma.m16n8k16, f16 or bf16 in, float32 accumulate) and all the launch's tokens (B columns, 8 per
 * MMA). K goes in steps of 128 weights: lane (g = lane / 4, t = lane % 4) loads 16 bytes of codes
 * of rows g and g + 8 (weights 32 t .. 32 t + 31 of the step; k_q4_tc's mapping: MMA m's k slots
 * (2t, 2t + 1, 2t + 8, 2t + 9) are the lane's weights 4m .. 4m + 3) and turns each byte into the
 * dequantized pair the prefill path writes (q4_round(lut[c] * absmax), rounded to the compute
 * type: the same 16-bit weights as k_dequant_q4_vec): a nibble is a byte offset into the 4-bit
 * table (one prmt), its value one table load and one multiply, and the pair one pack that rounds
 * both (the weights' own rounding first only where it is not the compute type's; twenty-second
 * session: that took the batch-32 step from 10.9 to 8.9 ms). x, already in the compute type (the
 * activations cuBLAS would read, be->half), goes through a ring of 4-6 steps in shared memory by
 * cp.async: a step is [tokens][128] 16-bit values, 16-byte pieces swizzled so that the 8 lanes of
 * a quarter-warp (two tokens, four pieces each) hit different banks. One barrier per step.
 * Where the row blocks alone would not fill the GPU, K is split over S blocks and k_q4_mm_sum adds
 * their sums.
 *
 * The numerics are those of the dequantize + cuBLAS path (the same 16-bit operands, float32 sums),
 * in another order of addition. Needs 16-bit compute (prefill dtype bf16 or f16), K % 128 == 0,
 * blocksize >= 32, 16-byte aligned codes, N * K < 2^31, compute capability 8.0+; otherwise the
 * caller dequantizes as before. */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"

#define Q4MM_WARPS 4
#define Q4MM_ROWS (16 * Q4MM_WARPS)
#define Q4MM_MAXTOK 64    /* tokens per launch (8 B column groups) */
#define Q4MM_DEFAULT_MAXT 64

/* The 16-byte piece c (0..15) of token row n of a step, swizzled: lanes (g, t) and (g + 1, t) read
 * pieces 4 t + p of rows 8 j + g, 8 j + g + 1; these 8 land in 8 different bank groups. */
static __device__ __forceinline__ uint32_t q4mm_piece(uint32_t n, uint32_t c)
{
    return n * 256u + ((c ^ ((c >> 3) & 1u) ^ ((n & 1u) << 1)) << 4);
}

/* The 4-bit table (floats), static: its shared-memory address is known when the kernel is
 * compiled, so a table load needs only the byte offset from q4mm_pair in a register. */
__shared__ float q4mm_slut[16];

/* The dequantized pair of byte b of a code word (first weight in the high nibble), in the compute
 * type, from the word's nibbles as table byte offsets: hi4 = (w >> 2) & 0x3c3c3c3c (byte b: its high
 * nibble * 4), lo4 = (w << 2) & 0x3c3c3c3c. A byte offset is one prmt, the value one table load and
 * one multiply. RND: the weights' own rounding (mode) first, where it is not the compute type's. */
template <typename T16, bool RND>
static __device__ __forceinline__ uint32_t q4mm_pair(uint32_t hi4, uint32_t lo4, int b, float am, int mode)
{
    const uint32_t oh = __byte_perm(hi4, 0u, 0x4440u | (uint32_t)b), ol = __byte_perm(lo4, 0u, 0x4440u | (uint32_t)b);
    const float vh = *reinterpret_cast<const float *>(reinterpret_cast<const uint8_t *>(q4mm_slut) + oh) * am;
    const float vl = *reinterpret_cast<const float *>(reinterpret_cast<const uint8_t *>(q4mm_slut) + ol) * am;
    if (RND) return mma_pack<T16>(q4_round(vh, mode), q4_round(vl, mode));
    return mma_pack<T16>(vh, vl); /* round to nearest even once: what q4_round then the pack give */
}

struct q4mm_stage {
    uint4 c[2];    /* the lane's codes of rows g, g + 8 */
    float a[2];    /* their block's float32 absmax, or its nested absmax */
    uint32_t q[2]; /* nested: the block's 8-bit code (looked up at use: no load waits on another) */
};

/* Dynamic shared memory of a launch: the x ring [RING][8 TG][256 bytes], the nested code table [256]
 * (floats); the 4-bit table is q4mm_slut. */
static __host__ __device__ constexpr size_t q4mm_smem(int ring, int tg)
{
    return (size_t)ring * 8 * tg * 256 + 256 * sizeof(float);
}

/* RING: x steps in shared memory (RING - 1 in flight); D: weight steps in registers; RND: see
 * q4mm_pair. */
template <typename T16, int TG, int RING, int D, bool NESTED, bool RND>
__global__ void __launch_bounds__(Q4MM_WARPS * 32, TG <= 4 ? 4 : 3) /* the blocks per SM shared memory allows */
    k_q4_mm(float *y, const T16 *__restrict__ xh, const uint8_t *__restrict__ W, const struct q4_scales sc,
            const float *__restrict__ bias, const struct q4_lut lut, int mode, int bs_shift, int N, int K, int tok0,
            int nt, int accumulate, float *part)
{
    extern __shared__ __align__(128) uint8_t q4mm_xs[]; /* see q4mm_smem */
    float *ncode = reinterpret_cast<float *>(q4mm_xs + (size_t)RING * 8 * TG * 256);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    /* split K (gridDim.y > 1): this block's steps ks0 .. ks0 + nsteps - 1, its sums into part [split][nt][N] */
    const int ks0 = (int)(blockIdx.y * (K / 128) / gridDim.y), nsteps = (int)((blockIdx.y + 1) * (K / 128) / gridDim.y) - ks0;
    const int r0 = (blockIdx.x * Q4MM_WARPS + warp) * 16 + g;
    const int row[2] = {r0 < N ? r0 : N - 1, r0 + 8 < N ? r0 + 8 : N - 1}; /* rows past N: read again, not stored */
    if (threadIdx.x < 16) q4mm_slut[threadIdx.x] = lut.v[threadIdx.x];
    if (NESTED)
        for (int i = threadIdx.x; i < 256; i += Q4MM_WARPS * 32) ncode[i] = __ldg(sc.ncode + i);

    /* the weights: per row the lane's 16 bytes of step s at uint4 index (row K + 128 s) / 32 + t */
    const uint4 *wp[2];
    uint32_t e0[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        e0[r] = (uint32_t)row[r] * (uint32_t)K + 32u * (uint32_t)t;
        wp[r] = reinterpret_cast<const uint4 *>(W) + e0[r] / 32u;
    }
    auto load = [&](struct q4mm_stage &st, int s) {
        if (s >= nsteps) return;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            st.c[r] = __ldg(wp[r] + 4 * (ks0 + s));
            const uint32_t b = (e0[r] + 128u * (uint32_t)(ks0 + s)) >> bs_shift;
            if (NESTED) {
                st.q[r] = __ldg(sc.q + b);
                st.a[r] = __ldg(sc.nabs + (b >> sc.nshift));
            } else {
                st.a[r] = __ldg(sc.absmax + b);
            }
        }
    };
    struct q4mm_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++) load(st[u], u);
    tuna_pdl_wait(); /* x is the previous kernel's output, y may be read by it */
    tuna_pdl_trigger();

    /* x: step s's [nt][128] values into ring slot s % RING (pieces of rows past nt are not written:
     * their B columns give outputs that are not stored) */
    const int npieces = nt * 16;
    int wslot = 0; /* the ring slot of the next step staged: (step) % RING */
    auto stage_x = [&](int s) {
        if (s < nsteps) {
            uint8_t *dst = q4mm_xs + wslot * (8 * TG * 256);
            for (int i = threadIdx.x; i < npieces; i += Q4MM_WARPS * 32) {
                const int n = i >> 4, c = i & 15;
                const T16 *src = xh + (int64_t)(tok0 + n) * K + 128 * (ks0 + s) + 8 * c;
                mma_cp_async16(dst + q4mm_piece((uint32_t)n, (uint32_t)c), src, true);
            }
        }
        mma_cp_async_commit(); /* one group per step, empty or not */
        wslot = wslot == RING - 1 ? 0 : wslot + 1;
    };
#pragma unroll
    for (int s = 0; s < RING - 1; s++) stage_x(s);

    float acc[TG][4];
#pragma unroll
    for (int j = 0; j < TG; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    /* the lane's x pieces in a slot: piece 4 t + p of token 8 j + g at xoff[p] + 2048 j (q4mm_piece:
     * token 8 j + g has g's parity) */
    uint32_t xoff[4];
#pragma unroll
    for (int p = 0; p < 4; p++) xoff[p] = q4mm_piece((uint32_t)g, 4u * (uint32_t)t + (uint32_t)p);
    int rslot = 0; /* the slot of step s */
    for (int s0 = 0; s0 < nsteps; s0 += D) {
#pragma unroll
        for (int u = 0; u < D; u++) {
            const int s = s0 + u;
            if (s >= nsteps) break;
            mma_cp_async_wait<RING - 2>(); /* step s is in (the RING - 2 after it may still be on their way) */
            __syncthreads();               /* ... for every thread; and step s - 1's slot is free */
            stage_x(s + RING - 1);
            const uint8_t *xs = q4mm_xs + rslot * (8 * TG * 256);
            rslot = rslot == RING - 1 ? 0 : rslot + 1;
            const struct q4mm_stage cur = st[u];
            load(st[u], s + D);
            float am[2];
#pragma unroll
            for (int r = 0; r < 2; r++)
                am[r] = NESTED ? q4_nested(ncode[cur.q[r]], cur.a[r], sc.noff) : cur.a[r];
            /* word p of the codes: MMAs 2p (bytes 0, 1) and 2p + 1 (bytes 2, 3), against x piece
             * 4t + p of every token group (its halves .x .y and .z .w) */
#pragma unroll
            for (int p = 0; p < 4; p++) {
                const uint32_t wg = p == 0 ? cur.c[0].x : p == 1 ? cur.c[0].y : p == 2 ? cur.c[0].z : cur.c[0].w;
                const uint32_t wh = p == 0 ? cur.c[1].x : p == 1 ? cur.c[1].y : p == 2 ? cur.c[1].z : cur.c[1].w;
                const uint32_t gh = (wg >> 2) & 0x3c3c3c3cu, gl = (wg << 2) & 0x3c3c3c3cu;
                const uint32_t hh = (wh >> 2) & 0x3c3c3c3cu, hl = (wh << 2) & 0x3c3c3c3cu;
                uint32_t a[2][4];
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    a[h][0] = q4mm_pair<T16, RND>(gh, gl, 2 * h, am[0], mode);
                    a[h][1] = q4mm_pair<T16, RND>(hh, hl, 2 * h, am[1], mode);
                    a[h][2] = q4mm_pair<T16, RND>(gh, gl, 2 * h + 1, am[0], mode);
                    a[h][3] = q4mm_pair<T16, RND>(hh, hl, 2 * h + 1, am[1], mode);
                }
#pragma unroll
                for (int j = 0; j < TG; j++) {
                    const uint4 xv = *reinterpret_cast<const uint4 *>(xs + xoff[p] + 2048u * (uint32_t)j);
                    mma_16816<T16>(acc[j], a[0], xv.x, xv.y);
                    mma_16816<T16>(acc[j], a[1], xv.z, xv.w);
                }
            }
        }
    }
    /* D fragment: acc[j][0, 1] row g, tokens 8 j + 2 t, + 1; acc[j][2, 3] row g + 8 */
#pragma unroll
    for (int j = 0; j < TG; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int tok = 8 * j + 2 * t + (i & 1), n = r0 + 8 * (i >> 1);
            if (tok >= nt || n >= N) continue;
            if (gridDim.y > 1) {
                part[((int64_t)blockIdx.y * nt + tok) * N + n] = acc[j][i];
                continue;
            }
            float *yp = y + (int64_t)(tok0 + tok) * N + n;
            const float v = acc[j][i] + (bias ? bias[n] : 0.0f);
            *yp = accumulate ? *yp + v : v;
        }
}

/* The split-K launches' sums in split order, + bias, into y (or onto it): part [S][nt][N]. */
__global__ void k_q4_mm_sum(float *y, const float *__restrict__ part, const float *__restrict__ bias, int S, int N,
                            int tok0, int nt, int accumulate)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n = i % N;
    tuna_pdl_wait();
    tuna_pdl_trigger();
    if (i >= (int64_t)nt * N) return;
    float v = 0.0f;
    for (int sp = 0; sp < S; sp++) v += part[(int64_t)sp * nt * N + i];
    v += bias ? bias[n] : 0.0f;
    float *yp = y + (int64_t)tok0 * N + i;
    *yp = accumulate ? *yp + v : v;
}

static long g_q4mm_launches;

extern "C" long tuna_cuda_q4_mm_launches(void)
{
    return g_q4mm_launches;
}

/* Read at every call (a getenv per 4-bit GEMM; graphs capture once) so tests can compare the paths. */
extern "C" int tuna_cuda_q4_mm_max_t(void)
{
    const char *e = getenv("TUNA_Q4_MM_MAXT");
    const int n = e && *e ? atoi(e) : -1;
    return n >= 0 && n <= 65536 ? n : Q4MM_DEFAULT_MAXT;
}

/* The round_mode whose rounding the compute type's pack performs (q4_round's 1 bf16, 2 f16). */
template <typename T16> static constexpr int q4mm_own_mode();
template <> constexpr int q4mm_own_mode<__nv_bfloat16>() { return 1; }
template <> constexpr int q4mm_own_mode<__half>() { return 2; }

/* Up to 32 tokens: 6 x steps (of 4 or 8 KB) in shared memory, 4 weight steps in registers; 64: 4 of
 * 16 KB, 3. */
template <typename T16, int TG>
static bool q4mm_launch(tuna_backend *be, float *y, const T16 *xh, const struct tuna_weight *w,
                        const struct tuna_cuda_q4 *q, const float *bias, int bs_shift, int tok0, int nt, bool acc,
                        int S, float *part)
{
    constexpr int RING = TG <= 4 ? 6 : 4, D = TG <= 4 ? 4 : 3;
    struct q4_lut lut;
    memcpy(lut.v, q->lut, sizeof lut.v);
    const int N = (int)w->rows, K = (int)w->cols;
    const dim3 grid((unsigned)((N + Q4MM_ROWS - 1) / Q4MM_ROWS), (unsigned)S), block(Q4MM_WARPS * 32);
    const size_t smem = q4mm_smem(RING, TG);
    const struct q4_scales sc = q4_scales_of(q);
    /* the weights' rounding is the pack's own when it names the compute type (or there is none) */
    const int mode = q->round_mode;
    const bool rnd = !(mode == 0 || mode == q4mm_own_mode<T16>());
    void (*fn)(float *, const T16 *, const uint8_t *, const struct q4_scales, const float *, const struct q4_lut, int,
               int, int, int, int, int, int, float *);
    if (sc.absmax) fn = rnd ? k_q4_mm<T16, TG, RING, D, false, true> : k_q4_mm<T16, TG, RING, D, false, false>;
    else fn = rnd ? k_q4_mm<T16, TG, RING, D, true, true> : k_q4_mm<T16, TG, RING, D, true, false>;
    g_q4mm_launches++;
    return tuna_cuda_launch(be, "k_q4_mm", fn, grid, block, smem, y, xh, (const uint8_t *)w->data, sc, bias, lut, mode,
                            bs_shift, N, K, tok0, nt, acc ? 1 : 0, part);
}

bool tuna_cuda_q4_mm(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                     int64_t T, bool acc)
{
    const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)w->q4;
    const int64_t N = w->rows, K = w->cols;
    const int dt = q->prefill == TUNA_DTYPE_BF16 ? 1 : q->prefill == TUNA_DTYPE_F16 ? 2 : 0;
    if (dt == 0 || be->cc_major < 8 || T < 1 || T > tuna_cuda_q4_mm_max_t() || K % 128 != 0 || q->blocksize < 32 ||
        ((uintptr_t)w->data % 16) != 0 || N < 1 || N * K >= ((int64_t)1 << 31))
        return false;
    int bs_shift = 0;
    while ((1 << bs_shift) < q->blocksize) bs_shift++;
    if ((1 << bs_shift) != q->blocksize) return false;
    /* K split over gridDim.y blocks where the rows alone give fewer than 2 blocks per SM (each split at
     * least 8 steps): their sums in be->q4mm_part, added in split order by k_q4_mm_sum. (Measured
     * slower on the H100, twenty-second session: the last split of a row block adding them, found
     * through a counter, and the splits as a cluster adding them through distributed shared memory:
     * batch 32 10.9 and 10.0 against 8.9 ms/step.) */
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132, rb = (N + Q4MM_ROWS - 1) / Q4MM_ROWS;
    int S = 1;
    while (S < 8 && rb * S < 2 * sms && K / 128 >= 16 * S) S *= 2;
    /* S * rows < 4 * sms * Q4MM_ROWS by the loop: one buffer for every case, sized once (while a graph
     * is being captured and it does not exist yet: no split) */
    const size_t part_bytes = (size_t)4 * sms * Q4MM_ROWS * Q4MM_MAXTOK * sizeof(float);
    if (S > 1 && be->capturing && be->q4mm_part.cap < part_bytes) S = 1;
    if (S > 1 && !tuna_cuda_grow(be, &be->q4mm_part, part_bytes, "cudaMalloc(4-bit GEMM split-K sums)"))
        return true; /* in the sticky status */
    float *part = S > 1 ? (float *)be->q4mm_part.p : NULL;
    if (!tuna_cuda_to_half(be, x, T * K, dt, false)) return true; /* the failure is in the sticky status */
    for (int64_t tok0 = 0; tok0 < T; tok0 += Q4MM_MAXTOK) {
        const int nt = (int)(T - tok0 < Q4MM_MAXTOK ? T - tok0 : Q4MM_MAXTOK);
        bool ok;
        if (dt == 1) {
            const __nv_bfloat16 *xh = (const __nv_bfloat16 *)be->half.p;
            ok = nt <= 16   ? q4mm_launch<__nv_bfloat16, 2>(be, y, xh, w, q, bias, bs_shift, (int)tok0, nt, acc, S, part)
                 : nt <= 32 ? q4mm_launch<__nv_bfloat16, 4>(be, y, xh, w, q, bias, bs_shift, (int)tok0, nt, acc, S, part)
                            : q4mm_launch<__nv_bfloat16, 8>(be, y, xh, w, q, bias, bs_shift, (int)tok0, nt, acc, S, part);
        } else {
            const __half *xh = (const __half *)be->half.p;
            ok = nt <= 16   ? q4mm_launch<__half, 2>(be, y, xh, w, q, bias, bs_shift, (int)tok0, nt, acc, S, part)
                 : nt <= 32 ? q4mm_launch<__half, 4>(be, y, xh, w, q, bias, bs_shift, (int)tok0, nt, acc, S, part)
                            : q4mm_launch<__half, 8>(be, y, xh, w, q, bias, bs_shift, (int)tok0, nt, acc, S, part);
        }
        if (ok && S > 1)
            ok = tuna_cuda_launch(be, "k_q4_mm_sum", k_q4_mm_sum, dim3((unsigned)((nt * N + 255) / 256)), dim3(256), 0, y,
                                  (const float *)part, bias, S, (int)N, (int)tok0, nt, acc ? 1 : 0);
        if (!ok) return true; /* in the sticky status */
    }
    return true;
}
