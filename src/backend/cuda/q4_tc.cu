/* q4_tc.cu — k_q4_tc: the 4-bit decode GEMV with its products on the tensor cores, for 1 to 8
 * tokens per launch (twentieth session). The default at T = 2..8 where it fits (k_q4_tab before:
 * FFMAs per weight and token, compute-bound), in launches of up to 8 tokens; at T = 1 opt-in
 * (TUNA_Q4_K=9), since k_q4_h4 is faster there. TUNA_Q4_TC_MAXT (1-32) lets it take more tokens in
 * more launches (each reads the weights again): the twentieth session made 24 the default, over the
 * dequantize + GEMM path (H100: batch 16 12.3 against 19.0 ms/step, 24 17.2 against 19.1); since
 * the twenty-first the 4-bit GEMM k_q4_mm (q4_mm.cu) takes T > 8 (batch 16 9.04, 24 10.42).
 *
 * Why: k_q4_h4 (q4_h4.cu) spends ~3.4 instructions per weight, the f16 pair products (table lookup,
 * PRMT, HFMA2) 1.5 of them; here the HFMA2s become mma.sync.m16n8k16 (f16 in, float32 accumulate),
 * one MMA per 8 weights of a lane for up to 4 tokens, and a step covers 128 weights of 16 rows per
 * warp. Measured on the H100 (docs/PERFORMANCE.md, "NF4, twentieth session"): NF4 decode at batch 8
 * 6.92 against 17.97 ms/step, batch 4 4.56 against 7.98; at batch 1 2.98 against k_q4_h4's 2.60,
 * with no fewer instructions in all (ncu: 12.47M against 12.43M for gate/up: at K = 4096 each warp
 * has only 2 steps per tile, and the tile's end, the block barrier and the reduction, costs as much
 * as the steps saved) and more shared-memory wavefronts (the x loads of 8 B columns).
 *
 * Layout. A tile is 16 rows (GLU: 8 gate rows and the same 8 up rows); a block (16 warps, one per
 * SM) takes a contiguous range of tiles, and its warps split K: warp w takes the steps (128 weights
 * of each row) ks0(w) .. ks1(w) - 1 of every tile, so every warp of a block streams about the same
 * bytes whatever N is. Lane (g = lane / 4, t = lane % 4) loads 16 bytes of codes (weights 32 t ..
 * 32 t + 31 of the step) of rows g and g + 8: the MMA's A rows. The step's 8 MMAs give lane t's
 * slots (2t, 2t + 1, 2t + 8, 2t + 9) of MMA m the weights 32 t + 4 m .. 32 t + 4 m + 3, so the
 * byte -> half2 table (one PRMT + one shared-memory load per two weights, the table of k_q4_h4)
 * gives the A fragment as it is, and x (staged per token as scaled f16 by q4h_stage_x, as in
 * k_q4_h4) gives the B fragment with 4 16-byte loads per step and group of 4 tokens.
 *
 * The scales and the tokens. The 128 weights of a step are two blocks of 64 (lanes t = 0, 1 hold
 * block 0's, t = 2, 3 block 1's), and an MMA adds over all its 16 k slots. The B matrix's 8 columns
 * keep the blocks apart: column n is token n % 4 on the slots of block n / 4 and 0 on the other
 * block's (the lanes that supply the zeros, and those of tokens past T, read a line of zeros in
 * shared memory instead of x). So after a step lane t holds rows g, g + 8 for tokens 2 (t % 2),
 * 2 (t % 2) + 1 over block t / 2 (C columns 2t, 2t + 1), multiplies them by that block's scales
 * (loaded by that lane), and at the tile's end one shuffle adds block 1's sums to block 0's. With
 * 8 tokens (two groups, where their x fits in shared memory: K = 4096 does, 14336 does not) each A
 * fragment serves two MMAs; more tokens take more launches. The 16 warps' sums of a tile meet in
 * shared memory after a block barrier and one warp adds them in warp order: the same bits on every
 * run.
 *
 * Numerics: the products of the table's f16 values and x in f16 (each token scaled by a power of two
 * so that |x| * max|code| lies in [1024, 2048), as k_q4_h4) are exact in float32 and added in float32
 * by the MMA (k_q4_h4 adds pairs in f16 first): results close to k_q4_h4's, not its bits.
 * Needs T <= 8, K % 128 == 0, K >= 2048 (every warp has steps), blocksize >= 64, compute capability
 * 8.0+, and q4h_job_fits's other conditions. */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q4_h4.cuh"
#include "backend/cuda/q4_tc.cuh"

#define Q4TC_THREADS 512
#define Q4TC_WARPS 16
#define Q4TC_TOK 4 /* tokens per group: B columns 0-3 and 4-7; a launch takes 1 or 2 groups */
#define Q4TC_MAXT 32 /* the most tokens it takes (in several launches; TUNA_Q4_TC_MAXT) */
#define Q4TC_DEFAULT_MAXT 8

/* Bytes from one token's staged x to the next: K f16 and 32 bytes, so two tokens' pieces read by
 * one quarter-warp fall on different banks. */
static __host__ __device__ __forceinline__ uint32_t q4tc_xstride(uint32_t K)
{
    return 2u * K + 32u;
}

struct q4tc_stage {
    uint4 c[2];    /* the lane's 16 bytes of codes of rows g and g + 8 */
    float a[2];    /* float32 absmax, or the nested absmax, of block t & 1 of each row */
    uint32_t q[2]; /* nested: the 8-bit code of that absmax */
};

template <bool NORM, bool NESTED, int D, int G>
__global__ void __launch_bounds__(Q4TC_THREADS, 1)
    k_q4_tc(const float *__restrict__ x, const __grid_constant__ struct gemv_job j, const struct q4_lut lut_in,
            int ntiles, float lmax, int nshift, int tok0, int nt)
{
    extern __shared__ __align__(128) float4 q4tc_smem4[];
    __shared__ __align__(128) uint4 zline[8]; /* 128 zero bytes: the B columns' zeros */
    __shared__ float slut[16];
    __shared__ float red[64];
    __shared__ float part[2][Q4TC_WARPS][16][Q4TC_TOK * G]; /* [tile parity][warp][row][token] */
    uint8_t *tab = reinterpret_cast<uint8_t *>(q4tc_smem4);
    float *ncode = reinterpret_cast<float *>(tab + Q4H4_TAB);
    uint8_t *xs = tab + Q4H4_TAB + Q4H4_NCODE; /* [nt][K f16 + 16 pad], 16-byte pieces at gemv_x_pos<true> */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const bool glu = j.mode == GEMV_GLU;
    const uint32_t K = (uint32_t)j.K, xstr = q4tc_xstride(K);
    const int KS = (int)(K / 128u);
    const int ks0 = warp * KS / Q4TC_WARPS, ks1 = (warp + 1) * KS / Q4TC_WARPS, nks = ks1 - ks0;
    const int tb = ntiles / (int)gridDim.x, tx = ntiles % (int)gridDim.x, bi = (int)blockIdx.x;
    const int tl0 = bi * tb + (bi < tx ? bi : tx), nmy = tb + (bi < tx ? 1 : 0), tlend = tl0 + nmy;
    const int total = nmy * nks;
    const int bs_shift = j.bs_shift;
    const uint32_t sblk = 64u * (uint32_t)(t >> 1); /* the lane's scale block within the step */
    const int rstep = glu ? 8 : 16;

    /* the load side: per row, the codes, the element index of the step's first weight, the scales */
    const uint4 *lw[2];
    uint32_t le[2];
    const float *la[2];
    const uint8_t *lq[2];
    int l_tl = tl0, l_ks = ks0;
    int64_t l_n = 0, l_N = 0;
    const uint32_t dtile = (uint32_t)rstep * K - (uint32_t)(nks - 1) * 128u; /* next tile, same matrix */
    auto set_src = [&](int tl) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int seg;
            int64_t row, n0, N;
            q4_tile_row(j, tl, g, r, &seg, &row, &n0, &N);
            if (r == 0) l_n = n0, l_N = N;
            const struct gemv_seg &s = j.s[seg];
            lw[r] = reinterpret_cast<const uint4 *>(s.W) + t;
            le[r] = (uint32_t)row * K + (uint32_t)ks0 * 128u;
            la[r] = NESTED ? s.sc.nabs : s.sc.absmax;
            lq[r] = NESTED ? s.sc.q : NULL;
        }
    };
    auto load_next = [&](struct q4tc_stage &st) {
        if (l_tl >= tlend) return;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            st.c[r] = __ldg(lw[r] + (le[r] >> 5));
            const uint32_t b = (le[r] + sblk) >> bs_shift;
            if (NESTED) {
                st.q[r] = __ldg(lq[r] + b);
                st.a[r] = __ldg(la[r] + (b >> nshift));
            } else {
                st.a[r] = __ldg(la[r] + b);
            }
        }
        if (++l_ks == ks1) {
            l_ks = ks0;
            if (++l_tl < tlend) {
                l_n += rstep;
                if (l_n + rstep - 1 < l_N) {
#pragma unroll
                    for (int r = 0; r < 2; r++) le[r] += dtile;
                } else {
                    set_src(l_tl);
                }
            }
        } else {
#pragma unroll
            for (int r = 0; r < 2; r++) le[r] += 128u;
        }
    };

    struct q4tc_stage st[D];
#pragma unroll
    for (int u = 0; u < D; u++)
#pragma unroll
        for (int r = 0; r < 2; r++) st[u].q[r] = 0u, st[u].a[r] = 0.0f;
    if (nmy > 0) set_src(tl0);
    q4tc_prologue<Q4TC_THREADS, NESTED>(tab, ncode, slut, zline, lut_in, j, [&] {
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);
    });
    /* each token with its own power-of-two scale; every call ends with __syncthreads (the last one:
     * the tables are ready) */
    float inv_s[Q4TC_TOK * G];
#pragma unroll
    for (int k = 0; k < Q4TC_TOK * G; k++) {
        inv_s[k] = 1.0f;
        if (k < nt) {
            const int64_t tk = tok0 + k;
            inv_s[k] = q4h_stage_x<NORM>(xs + k * xstr, x + tk * (int64_t)K, j, lmax, red, tk * (int64_t)K);
        }
    }
    if (j.prefetch < 1)
#pragma unroll
        for (int u = 0; u < D; u++) load_next(st[u]);

    /* the compute side */
    const uint32_t lane_off = (uint32_t)lane * 4u;
    /* B column g of group q: token 4 q + (g & 3) on the slots of block g >> 2 (lanes t < 2 hold block
     * 0's slots, t >= 2 block 1's); the lanes of other slots and of tokens past nt read zeros */
    bool xon[G];
    const uint8_t *xb[G];
#pragma unroll
    for (int q = 0; q < G; q++) {
        xon[q] = Q4TC_TOK * q + (g & 3) < nt && (g >> 2) == (t >> 1);
        xb[q] = xon[q] ? xs + (Q4TC_TOK * q + (g & 3)) * xstr : reinterpret_cast<const uint8_t *>(zline);
    }
    int c_ks = ks0, c_k = 0, c_tl = tl0;
    int c_nco[2] = {0, 0};
    float c_noff[2] = {0.0f, 0.0f};
    float acc[G][2][2]; /* [group][row g, g + 8][token 2 (t & 1) + h of the group] over block t >> 1 */
#pragma unroll
    for (int q = 0; q < G; q++) acc[q][0][0] = acc[q][0][1] = acc[q][1][0] = acc[q][1][1] = 0.0f;
    auto set_cmp = [&](int tl) { q4tc_nested(j, tl, g, c_nco, c_noff); };
    if (NESTED && nmy > 0) set_cmp(tl0);
    for (int q0 = 0; q0 < total; q0 += D) {
#pragma unroll
        for (int u = 0; u < D; u++) {
            if (q0 + u >= total) break;
            /* the zero lanes read the same place of the zero line */
            const uint32_t xo = q4tc_xoff((uint32_t)c_ks, t);
            uint4 xv[G][4];
            float c[G][4];
#pragma unroll
            for (int q = 0; q < G; q++) {
                const uint32_t xoff = xon[q] ? xo : (xo & 127u);
#pragma unroll
                for (int p = 0; p < 4; p++)
                    xv[q][p] = *reinterpret_cast<const uint4 *>(xb[q] + (xoff ^ ((uint32_t)p * 16u)));
                c[q][0] = c[q][1] = c[q][2] = c[q][3] = 0.0f;
            }
#pragma unroll
            for (int m = 0; m < 8; m++) {
                uint32_t a[4];
                q4tc_afrag(tab, st[u].c[0], st[u].c[1], m, lane_off, a);
#pragma unroll
                for (int q = 0; q < G; q++) {
                    const uint4 &xp = xv[q][m >> 1];
                    mma_16816<__half>(c[q], a, (m & 1) ? xp.z : xp.x, (m & 1) ? xp.w : xp.y);
                }
            }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const float am = NESTED ? q4_nested(ncode[c_nco[r] + st[u].q[r]], st[u].a[r], c_noff[r])
                                        : st[u].a[r];
#pragma unroll
                for (int q = 0; q < G; q++) {
                    acc[q][r][0] += am * c[q][2 * r];
                    acc[q][r][1] += am * c[q][2 * r + 1];
                }
            }
            load_next(st[u]);
            if (++c_ks < ks1) continue;
            /* the tile's last step: block 1's sums (lanes t >= 2) onto block 0's, then the block's */
            c_ks = ks0;
            float(*pp)[16][Q4TC_TOK * G] = part[c_k & 1];
#pragma unroll
            for (int q = 0; q < G; q++) {
#pragma unroll
                for (int r = 0; r < 2; r++)
#pragma unroll
                    for (int h = 0; h < 2; h++) acc[q][r][h] += __shfl_xor_sync(0xffffffffu, acc[q][r][h], 2);
                if (t < 2) {
                    *reinterpret_cast<float2 *>(&pp[warp][g][Q4TC_TOK * q + 2 * t]) = make_float2(acc[q][0][0], acc[q][0][1]);
                    *reinterpret_cast<float2 *>(&pp[warp][g + 8][Q4TC_TOK * q + 2 * t]) =
                        make_float2(acc[q][1][0], acc[q][1][1]);
                }
                acc[q][0][0] = acc[q][0][1] = acc[q][1][0] = acc[q][1][1] = 0.0f;
            }
            asm volatile("bar.sync 1, %0;" ::"n"(Q4TC_THREADS) : "memory");
            if (warp == (c_k & (Q4TC_WARPS - 1))) {
                /* outputs (row i, token k) = lane + 32 o: token k = lane % (4 G) on every pass */
                constexpr int NTOK = Q4TC_TOK * G;
                const int k = lane & (NTOK - 1);
                float inv = inv_s[0];
#pragma unroll
                for (int q = 1; q < NTOK; q++)
                    if (k == q) inv = inv_s[q];
                const int64_t tk = tok0 + k;
                int seg = 0;
                int64_t n0 = (int64_t)c_tl * 8;
                if (!glu) gemv_rows(j, 16, c_tl, &seg, &n0);
                const struct gemv_seg &s = j.s[seg];
                for (int o = lane; o < (glu ? 8 : 16) * NTOK; o += 32) {
                    const int i = o / NTOK;
                    const int64_t n = n0 + i;
                    if (k >= nt || n >= s.N) continue;
                    float v = 0.0f;
#pragma unroll
                    for (int w = 0; w < Q4TC_WARPS; w++) v += pp[w][i][k];
                    v *= inv;
                    if (glu) {
                        float up = 0.0f;
#pragma unroll
                        for (int w = 0; w < Q4TC_WARPS; w++) up += pp[w][i + 8][k];
                        up *= inv;
                        const float bg = s.bias ? s.bias[n] : 0.0f, bu = j.s[1].bias ? j.s[1].bias[n] : 0.0f;
                        s.y[tk * s.N + n] = tuna_cuda_act(v + bg, j.act) * (up + bu);
                    } else {
                        const float b = s.bias ? s.bias[n] : 0.0f;
                        float *yp = s.y + tk * s.N + n;
                        if (j.mode == GEMV_ADD) *yp += v + b;
                        else *yp = v + b;
                    }
                }
            }
            c_k++;
            if (++c_tl < tlend && NESTED) set_cmp(c_tl);
        }
    }
}

static long g_q4tc_launches;

extern "C" long tuna_cuda_q4_tc_launches(void)
{
    return g_q4tc_launches;
}

/* Steps in flight per warp: TUNA_Q4_TCD=2, 3 or 4 (default 3). */
static int q4tc_depth(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_Q4_TCD");
        v = e && (e[0] == '2' || e[0] == '4') ? e[0] - '0' : 3;
    }
    return v;
}

/* TUNA_Q4_TCG=1: 4 tokens per launch even where 8 fit (comparisons). */
static bool q4tc_two_groups_off(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_Q4_TCG");
        v = e && e[0] == '1';
    }
    return v == 1;
}

template <bool NORM, bool NESTED, int G>
static bool q4tc_launch_g(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                          unsigned blocks, size_t smem, int ntiles, float lmax, int nshift, int tok0, int nt)
{
    const dim3 grid(blocks), block(Q4TC_THREADS);
    switch (q4tc_depth()) {
    case 2:
        return tuna_cuda_launch(be, "k_q4_tc", k_q4_tc<NORM, NESTED, 2, G>, grid, block, smem, x, *j, *lut, ntiles,
                                lmax, nshift, tok0, nt);
    case 4:
        return tuna_cuda_launch(be, "k_q4_tc", k_q4_tc<NORM, NESTED, 4, G>, grid, block, smem, x, *j, *lut, ntiles,
                                lmax, nshift, tok0, nt);
    }
    return tuna_cuda_launch(be, "k_q4_tc", k_q4_tc<NORM, NESTED, 3, G>, grid, block, smem, x, *j, *lut, ntiles, lmax,
                            nshift, tok0, nt);
}

template <bool NORM, bool NESTED>
static bool q4tc_launch(tuna_backend *be, const float *x, const struct gemv_job *j, const struct q4_lut *lut,
                        unsigned blocks, size_t smem, int ntiles, float lmax, int nshift, int tok0, int nt)
{
    if (nt > Q4TC_TOK) return q4tc_launch_g<NORM, NESTED, 2>(be, x, j, lut, blocks, smem, ntiles, lmax, nshift, tok0, nt);
    return q4tc_launch_g<NORM, NESTED, 1>(be, x, j, lut, blocks, smem, ntiles, lmax, nshift, tok0, nt);
}

/* Dynamic shared memory of a launch of nt tokens: the tables and the tokens' staged x. */
static size_t q4tc_smem(int64_t K, int nt)
{
    return (size_t)Q4H4_TAB + Q4H4_NCODE + ((size_t)nt * q4tc_xstride((uint32_t)K) + 127) / 128 * 128;
}

/* Read at every call (tests compare the paths; graphs capture once). */
extern "C" int tuna_cuda_q4_tc_max_t(void)
{
    const char *e = getenv("TUNA_Q4_TC_MAXT");
    const int n = e ? atoi(e) : 0;
    return n >= 1 && n <= Q4TC_MAXT ? n : Q4TC_DEFAULT_MAXT;
}

extern "C" int tuna_cuda_q4_gemv_max_t(void)
{
    return tuna_cuda_q4_tc_max_t() > TUNA_CUDA_GEMV_MAX_T ? tuna_cuda_q4_tc_max_t() : TUNA_CUDA_GEMV_MAX_T;
}

extern "C" int tuna_cuda_q4_tc_tokens(tuna_backend *be, int64_t K, int64_t T)
{
    if (be->cc_major < 8 || T < 1 || T > tuna_cuda_q4_tc_max_t() || K % 128 != 0 || K < 128 * Q4TC_WARPS) return 0;
    /* the static shared memory: part (8 or 16 KB with 2 groups) and small scratch */
    const size_t stat1 = 2 * Q4TC_WARPS * 16 * Q4TC_TOK * 4 + 2048, stat2 = 2 * stat1;
    const size_t optin = be->max_smem_optin > 0 ? (size_t)be->max_smem_optin : 0;
    const int two = T < 2 * Q4TC_TOK ? (int)T : 2 * Q4TC_TOK;
    if (T > Q4TC_TOK && !q4tc_two_groups_off() && q4tc_smem(K, two) + stat2 <= optin) return two;
    const int per = T < Q4TC_TOK ? (int)T : Q4TC_TOK;
    return q4tc_smem(K, per) + stat1 <= optin ? per : 0;
}

bool tuna_cuda_q4_tc(tuna_backend *be, const float *x, struct gemv_job *j, const struct tuna_weight *const *ws,
                     const struct q4_lut *lut, int blocksize, int64_t T)
{
    const int64_t K = j->K;
    bool nested;
    const int per = tuna_cuda_q4_tc_tokens(be, K, T); /* tokens per launch: up to 8 where their x fits, else 4 */
    if (per == 0 || blocksize < 64 || !q4h_job_fits(j, ws, blocksize, 1, &nested)) return false;
    const size_t smem = q4tc_smem(K, per);
    const bool glu = j->mode == GEMV_GLU;
    const int64_t ntiles = glu ? (j->s[0].N + 7) / 8 : gemv_number_rows(j, 16) / 16;
    if (ntiles < 1) return true; /* nothing to do */
    if (ntiles >= ((int64_t)1 << 30)) return false;
    const int64_t sms = be->sm_count > 0 ? be->sm_count : 132;
    const int64_t blocks = ntiles < sms ? ntiles : sms;
    const float lmax = q4_lut_absmax(lut);
    j->prefetch = tuna_cuda_gemv_prefetch();
    const int nshift = nested ? j->s[0].sc.nshift : 0;
    /* each launch reads every weight once for its tokens */
    for (int tok0 = 0; tok0 < T; tok0 += per) {
        const int nt = T - tok0 < per ? (int)(T - tok0) : per;
        bool ok;
        g_q4tc_launches++;
        if (j->nw)
            ok = nested ? q4tc_launch<true, true>(be, x, j, lut, (unsigned)blocks, smem, (int)ntiles, lmax, nshift, tok0, nt)
                        : q4tc_launch<true, false>(be, x, j, lut, (unsigned)blocks, smem, (int)ntiles, lmax, nshift, tok0, nt);
        else
            ok = nested ? q4tc_launch<false, true>(be, x, j, lut, (unsigned)blocks, smem, (int)ntiles, lmax, nshift, tok0, nt)
                        : q4tc_launch<false, false>(be, x, j, lut, (unsigned)blocks, smem, (int)ntiles, lmax, nshift, tok0, nt);
        if (!ok) return tok0 > 0; /* a later launch's failure is in the sticky status */
    }
    return true;
}
