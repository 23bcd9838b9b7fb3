/* q4_tc.cuh — what the tensor-core 4-bit GEMVs k_q4_tc (q4_tc.cu) and k_q4_sk (q4_sk.cu) share: the
 * 16-row tiles, the prologue, a step's x offset and its A fragments. The layout is described in
 * q4_tc.cu. */
#ifndef TUNA_BACKEND_CUDA_Q4_TC_CUH
#define TUNA_BACKEND_CUDA_Q4_TC_CUH

#include "backend/cuda/gemv.cuh"
#include "backend/cuda/pdl.cuh"

/* The 16-row tiles of the tensor-core 4-bit GEMVs (k_q4_tc, k_q4_sk; GLU: 8 gate rows and the
 * same 8 up rows). Row r (0: g, 1: g + 8) of tile tl for lane group g: segment and row (clamped to the matrix: rows
 * past N are read again and not stored); *n0, *N: the tile's first row and its matrix's rows. */
static __device__ __forceinline__ void q4_tile_row(const struct gemv_job &j, int tl, int g, int r, int *seg,
                                                int64_t *row, int64_t *n0, int64_t *N)
{
    int64_t n;
    if (j.mode == GEMV_GLU) {
        *seg = r;
        *n0 = (int64_t)tl * 8;
        n = *n0 + g;
    } else {
        gemv_rows(j, 16, tl, seg, n0);
        n = *n0 + g + 8 * r;
    }
    *N = j.s[*seg].N;
    *row = n < *N ? n : *N - 1;
}

/* Nested scales: where rows g and g + 8 of tile tl find their segment's code table (offset into
 * the [GEMV_MAX_SEG][256] tables) and its offset. */
static __device__ __forceinline__ void q4tc_nested(const struct gemv_job &j, int tl, int g, int (&nco)[2],
                                                   float (&noff)[2])
{
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int seg;
        int64_t row, n0, N;
        q4_tile_row(j, tl, g, r, &seg, &row, &n0, &N);
        nco[r] = seg * 256;
        noff[r] = j.s[seg].sc.noff;
    }
}

/* Everything before the compute side, for a block of NT threads: the nested code tables' loads,
 * prefetch() (the first weight loads, before the PDL wait when j.prefetch >= 1), the byte -> half2
 * table, the zero line of the B columns (8 x 16 bytes), the PDL wait and trigger, the code tables'
 * store. The caller stages x next (its __syncthreads makes the tables visible). */
template <int NT, bool NESTED, typename Prefetch>
static __device__ __forceinline__ void q4tc_prologue(uint8_t *tab, float *ncode, float *slut, uint4 *zline,
                                                     const struct q4_lut &lut_in, const struct gemv_job &j,
                                                     Prefetch prefetch)
{
    float ncv[GEMV_MAX_SEG * 256 / NT];
    if (NESTED) q4h_ncode_load<NT>(ncv, j);
    if (j.prefetch >= 1) prefetch();
    q4h_fill_tables(tab, ncode, slut, lut_in, j, false);
    if (threadIdx.x < 8) zline[threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
    tuna_pdl_wait();
    tuna_pdl_trigger();
    if (NESTED) q4h_ncode_store<NT>(ncode, ncv, j);
}

/* Byte offset in the staged x (q4h_stage_x's pieces) of lane t's 32 weights of 128-weight step ks:
 * pieces 16 ks + 4 t + p (p = 0..3) of 128-byte run 2 ks + (t >> 1), swizzled; piece p at the
 * returned offset ^ 16 p. */
static __device__ __forceinline__ uint32_t q4tc_xoff(uint32_t ks, int t)
{
    const uint32_t run = 2u * ks + (uint32_t)(t >> 1);
    return run * 128u + ((4u * (uint32_t)(t & 1)) ^ (run & 7u)) * 16u;
}

/* The A fragment of MMA m (0..7) of a step from the lane's codes of rows g (cg) and g + 8 (ch):
 * bytes 2 (m & 1) and 2 (m & 1) + 1 of word m >> 1 through the byte -> half2 table. */
static __device__ __forceinline__ void q4tc_afrag(const uint8_t *tab, const uint4 &cg, const uint4 &ch, int m,
                                                  uint32_t lane_off, uint32_t (&a)[4])
{
    const uint32_t wg = m < 2 ? cg.x : m < 4 ? cg.y : m < 6 ? cg.z : cg.w;
    const uint32_t wh = m < 2 ? ch.x : m < 4 ? ch.y : m < 6 ? ch.z : ch.w;
    const uint32_t b0 = 2u * (uint32_t)(m & 1), b1 = b0 + 1u;
    a[0] = *reinterpret_cast<const uint32_t *>(tab + __byte_perm(wg, lane_off, 0x5504u | (b0 << 4)));
    a[1] = *reinterpret_cast<const uint32_t *>(tab + __byte_perm(wh, lane_off, 0x5504u | (b0 << 4)));
    a[2] = *reinterpret_cast<const uint32_t *>(tab + __byte_perm(wg, lane_off, 0x5504u | (b1 << 4)));
    a[3] = *reinterpret_cast<const uint32_t *>(tab + __byte_perm(wh, lane_off, 0x5504u | (b1 << 4)));
}

#endif
