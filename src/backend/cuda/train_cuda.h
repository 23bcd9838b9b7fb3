/* train_cuda.h — what the CUDA training op files (train_*.cu) share: row-major GEMM helpers over
 * cuBLAS and the ops each file defines for the table in train_ops.cu. Not for use outside
 * src/backend/cuda. */
#ifndef TUNA_BACKEND_CUDA_TRAIN_CUDA_H
#define TUNA_BACKEND_CUDA_TRAIN_CUDA_H

#include "backend/cuda/cuda_internal.h"
#include "backend/train_ops.h"

/* C[M,N] = alpha op(A) op(B) + beta C, every matrix row-major float32 (as backward.c's gemm):
 * ta: A is stored [K,M] (else [M,K]); tb: B is stored [N,K] (else [K,N]). Exact float32
 * (fast = false) or TF32 tensor cores (fast). Returns false after a (sticky) failure. */
bool tuna_cuda_train_gemm(tuna_backend *be, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                          const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc,
                          bool fast);

/* The same with A and B 16-bit (ct CUDA_R_16BF or CUDA_R_16F), float32 accumulation and C; the
 * long reductions split as above. */
bool tuna_cuda_train_gemm16(tuna_backend *be, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                            const void *A, int64_t lda, const void *B, int64_t ldb, float beta, float *C, int64_t ldc,
                            cudaDataType_t ct);

/* train_gemm.cu */
void tuna_cuda_train_matmul_backward(tuna_backend *be, float *dx, const float *dy, const struct tuna_weight *w,
                                     int64_t T);
void tuna_cuda_train_lora_forward(tuna_backend *be, float *y, const float *x, const struct tuna_lora *lora, int64_t T,
                                  int64_t N, int64_t K, float *work, bool fast);
void tuna_cuda_train_lora_backward(tuna_backend *be, float *dx, float *dA, float *dB, const float *dy, const float *x,
                                   const struct tuna_lora *lora, int64_t T, int64_t N, int64_t K, float *work,
                                   bool fast);

void tuna_cuda_train_lora_backward_h(tuna_backend *be, float *dx, float *dA, float *dB, const float *dy, const float *x,
                                     const float *h, const struct tuna_lora *lora, int64_t T, int64_t N, int64_t K,
                                     float *work, bool fast);

/* train_half.cu: the 16-bit operand ops of the table (train_ops.h) and the trainer's 4-bit
 * dequantization into be->wdeq (q4.cu's tuna_cuda_dequant_q4 where its fast kernel does not
 * apply, or with TUNA_TRAIN_DEQUANT=old); bit-identical values. */
bool tuna_cuda_train_dequant(tuna_backend *be, const struct tuna_weight *w, void **out, enum tuna_dtype *dt);
enum tuna_dtype tuna_cuda_train_half_dtype(tuna_backend *be, const struct tuna_weight *w);
void tuna_cuda_train_matmul16(tuna_backend *be, float *y, const void *x16, const struct tuna_weight *w,
                              const float *bias, int64_t T);
void tuna_cuda_train_matmul_backward16(tuna_backend *be, float *dx, const void *dy16, const struct tuna_weight *w,
                                       int64_t T, bool acc);
bool tuna_cuda_train_matmul16_lora(tuna_backend *be, float *y, void *x16, int64_t ldx, const struct tuna_weight *w,
                                   const float *bias, const struct tuna_lora *lora, float *h, int64_t T);
void tuna_cuda_train_to_half(tuna_backend *be, void *dst16, const float *src, int64_t n, int64_t cols, int64_t ld16,
                             enum tuna_dtype hdt);
void tuna_cuda_train_add_rmsnorm16(tuna_backend *be, float *x, const float *d, float *x_copy, float *y, void *y16,
                                   int64_t ld16, const float *w, int64_t T, int64_t C, float eps, enum tuna_dtype hdt);
void tuna_cuda_train_glu16(tuna_backend *be, float *out, void *out16, const float *gate, const float *up, int64_t n,
                           int64_t cols, int64_t ld16, int act, enum tuna_dtype hdt);
void tuna_cuda_train_rmsnorm_backward16(tuna_backend *be, float *dx, void *dx16, int64_t ld16, const float *dy,
                                        const float *x, const float *w, int64_t T, int64_t C, float eps,
                                        enum tuna_dtype hdt);
void tuna_cuda_train_glu_backward16(tuna_backend *be, float *dgate, float *dup, void *dgate16, void *dup16,
                                    const float *dout, const float *gate, const float *up, int64_t n, int64_t cols,
                                    int64_t ld16, int act, enum tuna_dtype hdt);
void tuna_cuda_train_rope_backward16(tuna_backend *be, float *d, void *d16, int64_t ld16, const int64_t *pos,
                                     int64_t T, int64_t H, int64_t D, int64_t rot_dim, const float *inv_freq,
                                     float attn_factor, enum tuna_dtype hdt);
bool tuna_cuda_train_matmul_backward16_lora(tuna_backend *be, float *dx, void *dy16, int64_t lddy,
                                            const struct tuna_weight *w, bool acc, const struct tuna_lora *lora,
                                            float *dA, float *dB, const float *x, const float *h, int64_t T);
bool tuna_cuda_train_matmul_backward16_lora3(tuna_backend *be, float *dx, void *dy16, int64_t lddy, int n,
                                             const struct tuna_weight *const *w, const struct tuna_lora *const *l,
                                             float *const *dA, float *const *dB, const float *x,
                                             const float *const *h, int64_t T, int64_t pad);

/* train_attention.cu */
void tuna_cuda_train_attention_forward(tuna_backend *be, float *out, float *lse, const float *q, const float *k,
                                       const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv,
                                       int64_t D, float scale, int64_t window, bool fast, float *work,
                                       int64_t work_floats);
void tuna_cuda_train_attention_backward(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                        const float *out, const float *lse, const float *q, const float *k,
                                        const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv,
                                        int64_t D, float scale, int64_t window, bool fast, float *work,
                                        int64_t work_floats);

/* train_flash.cu: flash attention on bf16 tensor cores (no scratch) for head dims up to
 * TUNA_CUDA_FLASH_MAX_D; the backward needs the forward's out and lse. */
#define TUNA_CUDA_FLASH_MAX_D 128
bool tuna_cuda_train_flash_ok(int64_t D);
void tuna_cuda_train_flash_forward(tuna_backend *be, float *out, float *lse, const float *q, const float *k,
                                   const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                                   float scale, int64_t window);
void tuna_cuda_train_flash_backward(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                    const float *out, const float *lse, const float *q, const float *k, const float *v,
                                    const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale,
                                    int64_t window);

/* train_flash_mma.cu: the same on mma.sync for D 64 and 128 (16-byte aligned rows); false when
 * the call is not theirs (then train_flash.cu's WMMA kernels run). starts: the ns + 1 first rows of
 * the sequences (host). TUNA_TRAIN_FLASH=wmma keeps the WMMA kernels. */
bool tuna_cuda_train_flash_mma_forward(tuna_backend *be, float *out, float *lse, const float *q, const float *k,
                                       const float *v, const int64_t *starts, int64_t ns, int64_t H, int64_t Hkv,
                                       int64_t D, float scale, int64_t window);
bool tuna_cuda_train_flash_mma_backward(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                        const float *out, const float *lse, const float *q, const float *k,
                                        const float *v, const int64_t *starts, int64_t ns, int64_t T, int64_t H,
                                        int64_t Hkv, int64_t D, float scale, int64_t window);

/* Sums of one or two values over a block of blockDim.x threads (a multiple of 32, at most 1024);
 * every thread gets the totals. red: __shared__ scratch of 64 entries of T. */
template <typename T> __device__ __forceinline__ T tuna_warp_sum(T v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename T> __device__ __forceinline__ T tuna_block_sum(T v, T *red)
{
    v = tuna_warp_sum(v);
    __syncthreads(); /* red may still be read from a previous call */
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    T s = 0;
    for (unsigned w = 0; w < (blockDim.x >> 5); w++)
        s += red[w];
    return s;
}
template <typename T> __device__ __forceinline__ T tuna_block_max(T v, T *red)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    T s = red[0];
    for (unsigned w = 1; w < (blockDim.x >> 5); w++)
        s = fmax(s, red[w]);
    return s;
}

#endif
