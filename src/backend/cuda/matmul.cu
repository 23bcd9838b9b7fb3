/* matmul.cu — y[T,N] = x[T,K] W^T + bias, W[N,K] in its stored dtype (f32, bf16, f16).
 *
 * Small T (decode, T <= tuna_cuda_gemv_max_t16() for 16-bit weights, 8 for float32): a fused GEMV, one warp per output row, 16-byte
 * loads of W (8 bf16/f16 values), float32 accumulation for every token at once, so each weight
 * byte is read once per step: the memory-bandwidth roofline is the target.
 * Larger T (prefill): cuBLAS. 16-bit weights: x is rounded to the weight's type and
 * cublasGemmEx accumulates in float32 into a float32 y; f32 weights: SGEMM (no TF32).
 * tuna_cuda_matmul_acc: y += x W^T + bias at the cuBLAS sizes with beta = 1 (the GEMM reads y as
 * its C: nearly free where the GEMM is compute-bound), instead of a GEMM into scratch and an add.
 */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

#define TUNA_CUDA_GEMV_DEFAULT_T16 2 /* measured: docs/PERFORMANCE.md */

__device__ __forceinline__ float ld_w(const void *W, int dtype, int64_t i)
{
    if (dtype == 1) return __uint_as_float((uint32_t)((const uint16_t *)W)[i] << 16);
    if (dtype == 2) return __half2float(((const __half *)W)[i]);
    return ((const float *)W)[i];
}

/* R rows per warp, TT tokens at once: each 16-byte load of W (8 values) is used for TT tokens,
 * each x load for R rows. vec: K % 8 == 0 and W, x 16-byte aligned (16-bit weights); otherwise a
 * scalar path. Two chunks per lane are loaded before use to keep more loads in flight. */
template <int TT, int R>
__global__ void k_gemv(float *y, const float *x, const void *W, int dtype, const float *bias, int64_t N, int64_t K,
                       int64_t ldw, int vec)
{
    int64_t n0 = ((int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5)) * R;
    int lane = threadIdx.x & 31;
    if (n0 >= N) return;
    float acc[R][TT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) acc[r][t] = 0.0f;
    if (vec) {
        const int64_t K8 = K / 8;
        const uint4 *wr[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            int64_t n = n0 + r < N ? n0 + r : N - 1; /* rows past N compute garbage that is not stored */
            wr[r] = reinterpret_cast<const uint4 *>((const uint16_t *)W + n * ldw);
        }
        int64_t i = lane;
        for (; i + 32 < K8; i += 64) {
            uint4 raw0[R], raw1[R];
#pragma unroll
            for (int r = 0; r < R; r++) {
                raw0[r] = __ldg(wr[r] + i);
                raw1[r] = __ldg(wr[r] + i + 32);
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int64_t ii = i + half * 32;
                float wf[R][8];
#pragma unroll
                for (int r = 0; r < R; r++) tuna_cuda_unpack8(half ? raw1[r] : raw0[r], dtype, wf[r]);
#pragma unroll
                for (int t = 0; t < TT; t++) {
                    const float4 *xp = reinterpret_cast<const float4 *>(x + t * K + ii * 8);
                    float4 a = xp[0], b = xp[1];
#pragma unroll
                    for (int r = 0; r < R; r++)
                        acc[r][t] += wf[r][0] * a.x + wf[r][1] * a.y + wf[r][2] * a.z + wf[r][3] * a.w +
                                     wf[r][4] * b.x + wf[r][5] * b.y + wf[r][6] * b.z + wf[r][7] * b.w;
                }
            }
        }
        for (; i < K8; i += 32) {
            float wf[R][8];
#pragma unroll
            for (int r = 0; r < R; r++) tuna_cuda_unpack8(__ldg(wr[r] + i), dtype, wf[r]);
#pragma unroll
            for (int t = 0; t < TT; t++) {
                const float4 *xp = reinterpret_cast<const float4 *>(x + t * K + i * 8);
                float4 a = xp[0], b = xp[1];
#pragma unroll
                for (int r = 0; r < R; r++)
                    acc[r][t] += wf[r][0] * a.x + wf[r][1] * a.y + wf[r][2] * a.z + wf[r][3] * a.w +
                                 wf[r][4] * b.x + wf[r][5] * b.y + wf[r][6] * b.z + wf[r][7] * b.w;
            }
        }
    } else {
        for (int64_t k = lane; k < K; k += 32) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                int64_t n = n0 + r < N ? n0 + r : N - 1;
                float wv = ld_w(W, dtype, n * ldw + k);
#pragma unroll
                for (int t = 0; t < TT; t++) acc[r][t] += wv * x[t * K + k];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float v = acc[r][t];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && n0 + r < N) y[t * N + n0 + r] = v + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

extern "C" int tuna_cuda_gemv_max_t16(void)
{
    static int v = 0;
    if (v == 0) {
        const char *e = getenv("TUNA_GEMV_MAX_T");
        int n = e ? atoi(e) : 0;
        v = n >= 1 && n <= TUNA_CUDA_GEMV_MAX_T ? n : TUNA_CUDA_GEMV_DEFAULT_T16;
    }
    return v;
}

__global__ void k_to_bf16(__nv_bfloat16 *dst, const float *src, int64_t n)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void k_to_f16(__half *dst, const float *src, int64_t n)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2half_rn(src[i]);
}

__global__ void k_add_bias(float *y, const float *bias, int64_t T, int64_t N)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < T * N) y[i] += bias[i % N];
}

static void launch_gemv(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, int dtype,
                        const float *bias, int64_t T)
{
    int64_t N = w->rows, K = w->cols, ldw = tuna_weight_ld(w); /* W's rows ldw elements apart */
    int vec = dtype != 0 && K % 8 == 0 && ldw % 8 == 0 && ((uintptr_t)w->data % 16) == 0 && ((uintptr_t)x % 16) == 0;
    const int warps = 4;
    /* more rows per warp reuse each x load; keep enough warps to fill the GPU */
    int R = (T == 1 || N < 4096) ? 1 : (N < 16384 ? 2 : 4);
    unsigned blocks = (unsigned)((N + (int64_t)warps * R - 1) / ((int64_t)warps * R));
#define GEMV_CASE(TT)                                                                                          \
    case TT:                                                                                                   \
        if (R == 1) k_gemv<TT, 1><<<blocks, warps * 32, 0, be->stream>>>(y, x, w->data, dtype, bias, N, K, ldw, vec); \
        else if (R == 2) k_gemv<TT, 2><<<blocks, warps * 32, 0, be->stream>>>(y, x, w->data, dtype, bias, N, K, ldw, vec); \
        else k_gemv<TT, 4><<<blocks, warps * 32, 0, be->stream>>>(y, x, w->data, dtype, bias, N, K, ldw, vec);     \
        break
    switch (T) {
        GEMV_CASE(1);
        GEMV_CASE(2);
        GEMV_CASE(3);
        GEMV_CASE(4);
        GEMV_CASE(5);
        GEMV_CASE(6);
        GEMV_CASE(7);
        GEMV_CASE(8);
    }
#undef GEMV_CASE
    tuna_cuda_check_launch(be, "k_gemv");
}

bool tuna_cuda_half_once(void)
{
    const char *e = getenv("TUNA_HALF_ONCE"); /* read at every call: tests switch it */
    return !(e && e[0] == '0');
}

bool tuna_cuda_half_reserve(tuna_backend *be, int64_t n)
{
    be->half_of = NULL;
    if (be->lora_pre.pending && be->lora_pre.reads_half) { /* a LoRA shrink on the second stream reads it */
        if (!tuna_cuda_check(be, cudaStreamWaitEvent(be->stream, be->lora_pre.side.join, 0),
                             "cudaStreamWaitEvent(LoRA shrink)"))
            return false;
        be->lora_pre.reads_half = false;
    }
    return tuna_cuda_grow(be, &be->half, (size_t)n * 2, "cudaMalloc(activations in 16-bit)");
}

bool tuna_cuda_to_half(tuna_backend *be, const float *x, int64_t n, int dtype, bool keep)
{
    if (be->half_of == x && be->half_n == n && be->half_dt == dtype) return !be->sticky;
    if (!tuna_cuda_half_reserve(be, n)) return false;
    if (dtype == 1) k_to_bf16<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>((__nv_bfloat16 *)be->half.p, x, n);
    else k_to_f16<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>((__half *)be->half.p, x, n);
    if (!tuna_cuda_check_launch(be, "k_to_16bit")) return false;
    if (keep) {
        be->half_of = x;
        be->half_n = n;
        be->half_dt = dtype;
    }
    return true;
}

/* y = x W^T + bias (acc false) or y += x W^T + bias (acc true: cuBLAS with beta = 1, the GEMM
 * reading y as its C). Returns false, having done nothing, when acc is asked of the GEMV sizes
 * (they write y). */
static bool matmul_impl(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                        int64_t T, bool acc)
{
    if (be->sticky || T <= 0) return true;
    if (acc) tuna_cuda_racc_settle(be, y);
    struct tuna_weight deq;
    if (w->dtype == TUNA_DTYPE_NF4 || w->dtype == TUNA_DTYPE_FP4) {
        if (!w->q4) {
            tuna_cuda_check(be, cudaErrorInvalidValue, "matmul (4-bit weight without its GPU quant state)");
            return true;
        }
        if (T <= TUNA_CUDA_GEMV_MAX_T) {
            if (acc) return false;
            tuna_cuda_gemv_q4(be, y, x, w, bias, T);
            return true;
        }
        /* up to tuna_cuda_q4_mm_max_t() tokens: the 4-bit GEMM */
        if (tuna_cuda_q4_mm(be, y, x, w, bias, T, acc)) return true;
        /* prefill: dequantize once for this GEMM, then the 16/32-bit path below */
        void *p;
        enum tuna_dtype dt;
        if (!tuna_cuda_dequant_q4(be, w, &p, &dt)) return true;
        deq.dtype = dt;
        deq.rows = w->rows;
        deq.cols = w->cols;
        deq.data = p;
        deq.q4 = NULL;
        deq.ld = 0;
        w = &deq;
    }
    int dtype = w->dtype == TUNA_DTYPE_BF16 ? 1 : w->dtype == TUNA_DTYPE_F16 ? 2 : w->dtype == TUNA_DTYPE_F32 ? 0 : -1;
    if (dtype < 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "matmul (weight dtype not supported by the CUDA backend yet)");
        return true;
    }
    int64_t N = w->rows, K = w->cols;
    if (T <= (dtype == 0 ? TUNA_CUDA_GEMV_MAX_T : tuna_cuda_gemv_max_t16())) {
        if (acc) return false;
        launch_gemv(be, y, x, w, dtype, bias, T);
        return true;
    }
    const float one = 1.0f, zero = 0.0f;
    const float *beta = acc ? &one : &zero;
    if (dtype == 0) {
        /* column-major view: y^T[N,T] = W[N,K] (row-major = K x N col-major, transposed) * x^T[K,T] */
        tuna_cuda_check_blas(be,
                             cublasSgemm(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)T, (int)K, &one,
                                         (const float *)w->data, (int)tuna_weight_ld(w), x, (int)K, beta, y, (int)N),
                             "cublasSgemm");
    } else {
        if (!tuna_cuda_to_half(be, x, T * K, dtype, false)) return true;
        cudaDataType_t dt = dtype == 1 ? CUDA_R_16BF : CUDA_R_16F;
        tuna_cuda_check_blas(be,
                             cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)T, (int)K, &one, w->data,
                                          dt, (int)tuna_weight_ld(w), be->half.p, dt, (int)K, beta, y, CUDA_R_32F, (int)N,
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                             "cublasGemmEx");
    }
    if (bias) {
        k_add_bias<<<tuna_cuda_blocks(T * N, 256), 256, 0, be->stream>>>(y, bias, T, N);
        tuna_cuda_check_launch(be, "k_add_bias");
    }
    return true;
}

void tuna_cuda_matmul(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                      int64_t T)
{
    (void)matmul_impl(be, y, x, w, bias, T, false);
}

/* TUNA_MATMUL_ACC=0: never accumulate in the GEMM (the callers add a separate pass, as before). */
bool tuna_cuda_matmul_acc(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                          int64_t T)
{
    static int on = -1;
    if (on < 0) {
        const char *e = getenv("TUNA_MATMUL_ACC");
        on = !(e && e[0] == '0');
    }
    return on && matmul_impl(be, y, x, w, bias, T, true);
}

/* y += x W^T + bias with cuBLAS's beta = 1 whatever TUNA_MATMUL_ACC says (the dense LoRA path:
 * the LoRA term is already in y); false (nothing done) at the GEMV sizes. */
bool tuna_cuda_matmul_onto(tuna_backend *be, float *y, const float *x, const struct tuna_weight *w, const float *bias,
                           int64_t T)
{
    return matmul_impl(be, y, x, w, bias, T, true);
}
