/* q4.cu — bitsandbytes NF4/FP4 weights stay 4-bit on the GPU.
 *
 * Decode (T <= TUNA_CUDA_GEMV_MAX_T): a fused dequant-GEMV — one warp per output row, 16-byte loads
 * of packed codes (32 weights), each weight = lut[nibble] * absmax[block] (rounded to bf16/f16 when
 * the checkpoint's dtype was, exactly as bitsandbytes dequantizes), float32 accumulation: a 4-bit
 * weight matrix is read once per step at a quarter of the bf16 bytes.
 * Prefill (larger T): the matrix is dequantized into a scratch buffer of the compute dtype and
 * handed to cuBLAS (matmul.cu).
 */
#include "backend/cuda/cuda_internal.h"

__device__ __forceinline__ float q4_round(float v, int mode)
{
    if (mode == 1) return __bfloat162float(__float2bfloat16_rn(v));
    if (mode == 2) return __half2float(__float2half_rn(v));
    return v;
}

/* Each lane owns a 16-entry table in shared memory, laid out [entry][lane] so that lookups of a
 * warp never share a bank; the table is rebuilt (16 multiply + round) per 32 weights, which all
 * lie in one absmax block (blocksize % 32 == 0 on the fast path). */
template <int TT>
__global__ void k_gemv_q4(float *y, const float *x, const uint8_t *codes, const float *absmax, int bs, int mode,
                          struct q4_lut lut_in, const float *bias, int64_t N, int64_t K, int vec)
{
    __shared__ float tab[4][16][32]; /* [warp][entry][lane] */
    int64_t n = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (n >= N) return;
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) acc[t] = 0.0f;
    const int64_t e_row = n * K;
    float(*my)[32] = tab[warp];
    if (vec) {
        /* K % 32 == 0 and bs % 32 == 0: each lane takes 16 bytes = 32 weights of one block */
        const uint4 *cr = reinterpret_cast<const uint4 *>(codes + e_row / 2);
        const int64_t K32 = K / 32;
        for (int64_t i = lane; i < K32; i += 32) {
            uint4 raw = __ldg(cr + i);
            float am = __ldg(absmax + (e_row + i * 32) / bs);
#pragma unroll
            for (int c = 0; c < 16; c++) my[c][lane] = q4_round(lut_in.v[c] * am, mode);
            const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int wi = 0; wi < 4; wi++) {
                int64_t k0 = i * 32 + wi * 8;
                float wf[8];
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    uint32_t byte = (words[wi] >> (8 * b)) & 0xffu;
                    wf[2 * b] = my[byte >> 4][lane];
                    wf[2 * b + 1] = my[byte & 15][lane];
                }
#pragma unroll
                for (int t = 0; t < TT; t++) {
                    const float4 *xp = reinterpret_cast<const float4 *>(x + t * K + k0);
                    float4 a = xp[0], b = xp[1];
                    acc[t] += wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x + wf[5] * b.y +
                              wf[6] * b.z + wf[7] * b.w;
                }
            }
        }
    } else {
        for (int64_t k = lane; k < K; k += 32) {
            int64_t e = e_row + k;
            uint8_t byte = codes[e >> 1];
            int c = (e & 1) ? (byte & 15) : (byte >> 4);
            float wv = q4_round(lut_in.v[c] * absmax[e / bs], mode);
#pragma unroll
            for (int t = 0; t < TT; t++) acc[t] += wv * x[t * K + k];
        }
    }
#pragma unroll
    for (int t = 0; t < TT; t++) {
        float v = acc[t];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) y[t * N + n] = v + (bias ? bias[n] : 0.0f);
    }
}

/* 32 weights per thread (16-byte load, one absmax block when bs % 32 == 0), written as 16-bit
 * (4 x 16-byte stores) or float32; the scalar kernel below handles the rest. */
__global__ void k_dequant_q4_vec(void *out, int dtype, const uint8_t *codes, const float *absmax, int bs, int mode,
                                 struct q4_lut lut, int64_t n32)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n32) return;
    uint4 raw = __ldg(reinterpret_cast<const uint4 *>(codes) + i);
    float am = __ldg(absmax + i * 32 / bs);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    float v[32];
#pragma unroll
    for (int wi = 0; wi < 4; wi++)
#pragma unroll
        for (int b = 0; b < 4; b++) {
            uint32_t byte = (words[wi] >> (8 * b)) & 0xffu;
            v[wi * 8 + 2 * b] = q4_round(lut.v[byte >> 4] * am, mode);
            v[wi * 8 + 2 * b + 1] = q4_round(lut.v[byte & 15] * am, mode);
        }
    if (dtype == 0) {
        float4 *o = reinterpret_cast<float4 *>(out) + i * 8;
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
        return;
    }
    uint4 *o = reinterpret_cast<uint4 *>(out) + i * 4;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint32_t h[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float lo = v[8 * j + 2 * q], hi = v[8 * j + 2 * q + 1];
            if (dtype == 1) {
                __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
                h[q] = *reinterpret_cast<uint32_t *>(&p);
            } else {
                __half2 p = __floats2half2_rn(lo, hi);
                h[q] = *reinterpret_cast<uint32_t *>(&p);
            }
        }
        o[j] = make_uint4(h[0], h[1], h[2], h[3]);
    }
}

/* One thread per byte: two weights into out (dtype 0 f32, 1 bf16, 2 f16). */
__global__ void k_dequant_q4(void *out, int dtype, const uint8_t *codes, const float *absmax, int bs, int mode,
                             struct q4_lut lut, int64_t numel)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; /* byte */
    if (2 * i >= numel) return;
    uint8_t byte = codes[i];
    for (int h = 0; h < 2; h++) {
        int64_t e = 2 * i + h;
        if (e >= numel) break;
        float v = q4_round(lut.v[h ? (byte & 15) : (byte >> 4)] * absmax[e / bs], mode);
        if (dtype == 1) ((__nv_bfloat16 *)out)[e] = __float2bfloat16_rn(v);
        else if (dtype == 2) ((__half *)out)[e] = __float2half_rn(v);
        else ((float *)out)[e] = v;
    }
}

void tuna_cuda_gemv_q4(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                       int64_t T)
{
    const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)w->q4;
    int64_t N = w->rows, K = w->cols;
    struct q4_lut lut;
    memcpy(lut.v, q->lut, sizeof lut.v);
    int vec = K % 32 == 0 && q->blocksize % 32 == 0 && ((uintptr_t)w->data % 16) == 0 && ((uintptr_t)x % 16) == 0;
    const int warps = 4;
    unsigned blocks = (unsigned)((N + warps - 1) / warps);
#define Q4_CASE(TT)                                                                                            \
    case TT:                                                                                                   \
        k_gemv_q4<TT><<<blocks, warps * 32, 0, be->stream>>>(y, x, (const uint8_t *)w->data, q->absmax,        \
                                                             q->blocksize, q->round_mode, lut, bias, N, K, vec); \
        break
    switch (T) {
        Q4_CASE(1);
        Q4_CASE(2);
        Q4_CASE(3);
        Q4_CASE(4);
        Q4_CASE(5);
        Q4_CASE(6);
        Q4_CASE(7);
        Q4_CASE(8);
    }
#undef Q4_CASE
    tuna_cuda_check_launch(be, "k_gemv_q4");
}

bool tuna_cuda_dequant_q4(tuna_backend *be, const struct tuna_weight *w, void **out, enum tuna_dtype *dt)
{
    const struct tuna_cuda_q4 *q = (const struct tuna_cuda_q4 *)w->q4;
    int64_t numel = w->rows * w->cols;
    int code = q->prefill == TUNA_DTYPE_BF16 ? 1 : q->prefill == TUNA_DTYPE_F16 ? 2 : 0;
    size_t bytes = (size_t)numel * (code ? 2 : 4);
    if (!tuna_cuda_grow(be, &be->wdeq, bytes, "cudaMalloc(4-bit weight dequantized for prefill)")) return false;
    struct q4_lut lut;
    memcpy(lut.v, q->lut, sizeof lut.v);
    int64_t nbytes = (numel + 1) / 2;
    if (numel % 32 == 0 && q->blocksize % 32 == 0 && ((uintptr_t)w->data % 16) == 0) {
        int64_t n32 = numel / 32;
        k_dequant_q4_vec<<<tuna_cuda_blocks(n32, 256), 256, 0, be->stream>>>(
            be->wdeq.p, code, (const uint8_t *)w->data, q->absmax, q->blocksize, q->round_mode, lut, n32);
    } else {
        k_dequant_q4<<<tuna_cuda_blocks(nbytes, 256), 256, 0, be->stream>>>(
            be->wdeq.p, code, (const uint8_t *)w->data, q->absmax, q->blocksize, q->round_mode, lut, numel);
    }
    if (!tuna_cuda_check_launch(be, "k_dequant_q4")) return false;
    *out = be->wdeq.p;
    *dt = code == 1 ? TUNA_DTYPE_BF16 : code == 2 ? TUNA_DTYPE_F16 : TUNA_DTYPE_F32;
    return true;
}
