/* act16.cu — the 16-bit activation path's norm, GEMM and GLU (backend.h rmsnorm16 / matmul16 /
 * glu16; act16.h). Float32 math, every output rounded once to the activations' type, as the CPU
 * twins in backend/cpu/act16.c:
 * - rmsnorm16: norm.cu's k_rmsnorm (float32 sum of squares, x * r * w) writing 16 bits;
 * - matmul16: cublasGemmEx with 16-bit x and W, float32 accumulation, a float32 output (beta 1
 *   with acc: the residual add inside the GEMM) or a 16-bit one (cuBLAS rounds the float32 sums
 *   once); no conversion pass before it (x is already 16-bit);
 * - glu16: act(gate) * up in float32 from 16-bit inputs, 8 elements per thread. */
#include "backend/cuda/act16.cuh"
#include "backend/cuda/act16.h"

static int act_io(enum tuna_dtype adt) { return adt == TUNA_DTYPE_BF16 ? 1 : adt == TUNA_DTYPE_F16 ? 2 : 0; }

__global__ void k_rmsnorm16(void *y, int64_t ldy, int io, const float *x, const float *w, int64_t C, float eps, int vec)
{
    __shared__ float red[32];
    const float *xr = x + (int64_t)blockIdx.x * C;
    const int64_t y0 = (int64_t)blockIdx.x * ldy;
    float s = 0.0f;
    if (vec) {
        for (int64_t i = threadIdx.x; i < C / 4; i += blockDim.x) {
            const float4 v = ((const float4 *)xr)[i];
            s += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int64_t i = threadIdx.x; i < C; i += blockDim.x) s += xr[i] * xr[i];
    }
    const float r = tuna_cuda_rms_inv(s, C, eps, red);
    if (vec) {
        for (int64_t i = threadIdx.x; i < C / 4; i += blockDim.x) {
            const float4 v = ((const float4 *)xr)[i], g = ((const float4 *)w)[i];
            a16_st2(y, io, y0 + 4 * i, v.x * r * g.x, v.y * r * g.y);
            a16_st2(y, io, y0 + 4 * i + 2, v.z * r * g.z, v.w * r * g.w);
        }
    } else {
        for (int64_t i = threadIdx.x; i < C; i += blockDim.x) a16_st(y, io, y0 + i, xr[i] * r * w[i]);
    }
}

void tuna_cuda_rmsnorm16(tuna_backend *be, void *y, int64_t ldy, const float *x, const float *w, int64_t T, int64_t C,
                         float eps, enum tuna_dtype adt)
{
    if (be->sticky || T <= 0) return;
    tuna_cuda_racc_settle(be, x);
    const int io = act_io(adt);
    if (!io) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "rmsnorm16 (activations neither bf16 nor f16)");
        return;
    }
    if (ldy <= 0) ldy = C;
    const int vec = C % 4 == 0 && ldy % 2 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0 && (uintptr_t)y % 4 == 0;
    k_rmsnorm16<<<(unsigned)T, 256, 0, be->stream>>>(y, ldy, io, x, w, C, eps, vec);
    tuna_cuda_check_launch(be, "k_rmsnorm16");
}

/* 8 elements per thread (vec: n % 8 == 0 and 16-byte aligned arrays), else one. */
__global__ void k_glu16(void *out, const void *gate, const void *up, int64_t n, int act, int io, int vec)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        if (i >= n / 8) return;
        const uint4 g4 = ((const uint4 *)gate)[i], u4 = ((const uint4 *)up)[i];
        float g[8], u[8];
        tuna_cuda_unpack8(g4, io, g);
        tuna_cuda_unpack8(u4, io, u);
        uint32_t o[4];
        for (int j = 0; j < 4; j++) {
            const float a = tuna_cuda_act(g[2 * j], act) * u[2 * j], b = tuna_cuda_act(g[2 * j + 1], act) * u[2 * j + 1];
            if (io == 1) {
                __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
                o[j] = *(uint32_t *)&h;
            } else {
                __half2 h = __floats2half2_rn(a, b);
                o[j] = *(uint32_t *)&h;
            }
        }
        ((uint4 *)out)[i] = make_uint4(o[0], o[1], o[2], o[3]);
    } else if (i < n) {
        a16_st(out, io, i, tuna_cuda_act(a16_ld(gate, io, i), act) * a16_ld(up, io, i));
    }
}

void tuna_cuda_glu16(tuna_backend *be, void *out, const void *gate, const void *up, int64_t n, int act,
                     enum tuna_dtype adt)
{
    if (be->sticky || n <= 0) return;
    const int io = act_io(adt);
    if (!io) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "glu16 (activations neither bf16 nor f16)");
        return;
    }
    const int vec = n % 8 == 0 && (uintptr_t)out % 16 == 0 && (uintptr_t)gate % 16 == 0 && (uintptr_t)up % 16 == 0;
    k_glu16<<<tuna_cuda_blocks(vec ? n / 8 : n, 256), 256, 0, be->stream>>>(out, gate, up, n, act, io, vec);
    tuna_cuda_check_launch(be, "k_glu16");
}

/* y[T, N] += bias (float32 y, or 16-bit y rounded again) */
__global__ void k_bias16(void *y, int io, const float *bias, int64_t T, int64_t N)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < T * N) a16_st(y, io, i, a16_ld(y, io, i) + bias[i % N]);
}

bool tuna_cuda_matmul16(tuna_backend *be, void *y, enum tuna_dtype ydt, const void *x, enum tuna_dtype adt,
                        const struct tuna_weight *w, const float *bias, int64_t T, bool acc)
{
    const int io = act_io(adt);
    if (!io || w->dtype != adt || (ydt != TUNA_DTYPE_F32 && ydt != adt) || (acc && ydt != TUNA_DTYPE_F32)) return false;
    if (be->sticky || T <= 0) return true;
    const int64_t N = w->rows, K = w->cols;
    const cudaDataType_t dt = io == 1 ? CUDA_R_16BF : CUDA_R_16F;
    const float one = 1.0f, zero = 0.0f;
    /* column-major view: y^T[N,T] = W[N,K] (row-major = K x N col-major, transposed) * x^T[K,T] */
    tuna_cuda_check_blas(be,
                         cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)T, (int)K, &one, w->data, dt,
                                      (int)tuna_weight_ld(w), x, dt, (int)K, acc ? &one : &zero, y,
                                      ydt == TUNA_DTYPE_F32 ? CUDA_R_32F : dt, (int)N, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT),
                         "cublasGemmEx(16-bit activations)");
    if (bias) {
        k_bias16<<<tuna_cuda_blocks(T * N, 256), 256, 0, be->stream>>>(y, ydt == TUNA_DTYPE_F32 ? 0 : io, bias, T, N);
        tuna_cuda_check_launch(be, "k_bias16");
    }
    return true;
}

/* the cuBLAS sizes of 16-bit weights (below: the float32 ops' GEMV, which reads float32 x) */
int64_t tuna_cuda_act16_min_t(tuna_backend *be)
{
    (void)be;
    return (int64_t)tuna_cuda_gemv_max_t16() + 1;
}
