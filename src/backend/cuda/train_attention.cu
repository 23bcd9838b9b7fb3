/* train_attention.cu — causal attention over the training layout (backend/train_ops.h), forward
 * and backward, as batched cuBLAS GEMMs over materialized probabilities: for each sequence (host
 * loop; rows t with pos[t] == 0 start one), each query head of a GQA group g, and a chunk of kv
 * heads that fits the caller's work buffer:
 *   S = scale Q K^T [hc, n, n] → P = causal softmax(S) (masked entries 0, sliding window too)
 *   forward:  O = P V
 *   backward: dP = dO V^T, dS = P ∘ (dP - rowsum(P ∘ dP)) · scale,
 *             dV += P^T dO, dQ += dS K, dK += dS^T Q
 * The probabilities are recomputed in backward (one more GEMM) instead of kept per layer.
 * Heads h = kvh·group + g of one g are group·D floats apart in q/out rows, kv heads D apart in
 * k/v rows: constant strides, so one strided-batched GEMM serves a chunk of kv heads.
 * Memory: 2 · hc · n² floats of work (n = the sequence length). This is the exact float32 path
 * (fast = false) and the one for head dims past TUNA_CUDA_FLASH_MAX_D; the bf16 mode runs the
 * flash kernels of train_flash.cu (no n² scratch). */
#include <math.h>

#include "backend/cuda/train_cuda.h"

/* C_b = alpha op(A_b) op(B_b) + beta C_b in cuBLAS's column-major terms, b < batch. */
static bool bgemm(tuna_backend *be, cublasOperation_t oa, cublasOperation_t ob, int64_t m, int64_t n, int64_t k,
                  float alpha, const float *A, int64_t lda, int64_t sA, const float *B, int64_t ldb, int64_t sB,
                  float beta, float *C, int64_t ldc, int64_t sC, int64_t batch, bool fast)
{
    if (be->sticky) return false;
    return tuna_cuda_check_blas(
        be,
        cublasGemmStridedBatchedEx(be->blas, oa, ob, (int)m, (int)n, (int)k, &alpha, A, CUDA_R_32F, (int)lda,
                                   (long long)sA, B, CUDA_R_32F, (int)ldb, (long long)sB, &beta, C, CUDA_R_32F,
                                   (int)ldc, (long long)sC, (int)batch,
                                   fast ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx(attention)");
}

/* One block per row r of S [rows = hc·n, n]: row i = r % n of its head keeps columns
 * [lo, i] (lo = i - window + 1 with a window), softmax over them, 0 elsewhere. In place.
 * lse (may be NULL): row i of head chunk c = r / n gets lse[i * H + c * hstride] = its
 * log-sum-exp. */
__global__ void k_train_causal_softmax(float *S, int64_t n, int64_t window, float *lse, int64_t H, int64_t hstride)
{
    __shared__ float red[64];
    const int64_t r = blockIdx.x, i = r % n;
    int64_t lo = 0;
    if (window > 0 && i - window + 1 > 0) lo = i - window + 1;
    float *row = S + r * n;
    float mx = -INFINITY;
    for (int64_t j = lo + threadIdx.x; j <= i; j += blockDim.x)
        mx = fmaxf(mx, row[j]);
    mx = tuna_block_max(mx, red);
    float sum = 0.0f;
    for (int64_t j = lo + threadIdx.x; j <= i; j += blockDim.x)
        sum += expf(row[j] - mx);
    sum = tuna_block_sum(sum, red);
    const float inv = 1.0f / sum;
    if (lse && threadIdx.x == 0) lse[i * H + (r / n) * hstride] = mx + logf(sum);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
        row[j] = (j >= lo && j <= i) ? expf(row[j] - mx) * inv : 0.0f;
}

/* dS = P ∘ (dP - sum_j P dP) · scale, one block per row, in place on dP. */
__global__ void k_train_softmax_backward(float *dP, const float *P, int64_t n, float scale)
{
    __shared__ float red[64];
    const int64_t r = blockIdx.x;
    const float *p = P + r * n;
    float *d = dP + r * n;
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
        s += p[j] * d[j];
    s = tuna_block_sum(s, red);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
        d[j] = p[j] * (d[j] - s) * scale;
}

struct seq_span {
    int64_t s0, n;
};

/* The sequences of the training layout (host). *out is malloc'ed; returns the count, -1 on OOM. */
static int64_t find_seqs(const int64_t *pos, int64_t T, struct seq_span **out)
{
    int64_t ns = 0;
    for (int64_t t = 0; t < T; t++)
        ns += pos[t] == 0 || t == 0;
    struct seq_span *s = (struct seq_span *)malloc((size_t)(ns ? ns : 1) * sizeof *s);
    if (!s) return -1;
    int64_t k = -1;
    for (int64_t t = 0; t < T; t++) {
        if (pos[t] == 0 || t == 0) s[++k] = {t, 0};
        s[k].n++;
    }
    *out = s;
    return ns;
}

static bool check_shapes(tuna_backend *be, int64_t H, int64_t Hkv, int64_t n_max, int64_t work_floats, int64_t per)
{
    if (Hkv <= 0 || H % Hkv != 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "training attention (H not a multiple of Hkv)");
        return false;
    }
    if (work_floats < per * n_max * n_max) {
        tuna_cuda_check(be, cudaErrorInvalidValue,
                        "training attention (work buffer below tuna_train_attention_work_min)");
        return false;
    }
    return true;
}

/* Runs fn(seq, g, h0, hc, buffers) over every sequence, group index and kv-head chunk. */
template <typename F>
static void for_chunks(tuna_backend *be, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv, int64_t work_floats,
                       int per, F fn)
{
    struct seq_span *seqs = NULL;
    int64_t ns = find_seqs(pos, T, &seqs);
    if (ns < 0) {
        tuna_cuda_check(be, cudaErrorMemoryAllocation, "training attention (host sequence list)");
        return;
    }
    int64_t n_max = 1;
    for (int64_t i = 0; i < ns; i++)
        if (seqs[i].n > n_max) n_max = seqs[i].n;
    if (check_shapes(be, H, Hkv, n_max, work_floats, per)) {
        const int64_t group = H / Hkv;
        for (int64_t i = 0; i < ns && !be->sticky; i++) {
            const int64_t n = seqs[i].n;
            int64_t hc = work_floats / (per * n * n);
            if (hc > Hkv) hc = Hkv;
            for (int64_t g = 0; g < group && !be->sticky; g++)
                for (int64_t h0 = 0; h0 < Hkv && !be->sticky; h0 += hc)
                    fn(seqs[i].s0, n, g, h0, h0 + hc <= Hkv ? hc : Hkv - h0);
        }
    }
    free(seqs);
}

static unsigned row_threads(int64_t n)
{
    return n >= 1024 ? 512u : n >= 256 ? 256u : 128u;
}

void tuna_cuda_train_attention_forward(tuna_backend *be, float *out, float *lse, const float *q, const float *k,
                                       const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv,
                                       int64_t D, float scale, int64_t window, bool fast, float *work,
                                       int64_t work_floats)
{
    if (be->sticky || T <= 0) return;
    if (fast && tuna_cuda_train_flash_ok(D)) {
        if (Hkv <= 0 || H % Hkv != 0) {
            tuna_cuda_check(be, cudaErrorInvalidValue, "training attention (H not a multiple of Hkv)");
            return;
        }
        tuna_cuda_train_flash_forward(be, out, lse, q, k, v, pos, T, H, Hkv, D, scale, window);
        return;
    }
    const int64_t HD = H * D, KD = Hkv * D, group = H / (Hkv > 0 ? Hkv : 1);
    for_chunks(be, pos, T, H, Hkv, work_floats, 1, [&](int64_t s0, int64_t n, int64_t g, int64_t h0, int64_t hc) {
        const float *Q = q + s0 * HD + (h0 * group + g) * D, *Kp = k + s0 * KD + h0 * D, *Vp = v + s0 * KD + h0 * D;
        float *O = out + s0 * HD + (h0 * group + g) * D, *S = work;
        /* S^T (column-major n x n per head) = K Q^T: S row-major [i, j] = q_i · k_j */
        if (!bgemm(be, CUBLAS_OP_T, CUBLAS_OP_N, n, n, D, scale, Kp, KD, D, Q, HD, group * D, 0.0f, S, n, n * n, hc,
                   fast))
            return;
        k_train_causal_softmax<<<(unsigned)(hc * n), row_threads(n), 0, be->stream>>>(
            S, n, window, lse ? lse + s0 * H + h0 * group + g : NULL, H, group);
        if (!tuna_cuda_check_launch(be, "k_train_causal_softmax")) return;
        /* O[n, D] = P V: column-major O^T = V^T P^T */
        bgemm(be, CUBLAS_OP_N, CUBLAS_OP_N, D, n, n, 1.0f, Vp, KD, D, S, n, n * n, 0.0f, O, HD, group * D, hc, fast);
    });
}

void tuna_cuda_train_attention_backward(tuna_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                        const float *out, const float *lse, const float *q, const float *k,
                                        const float *v, const int64_t *pos, int64_t T, int64_t H, int64_t Hkv,
                                        int64_t D, float scale, int64_t window, bool fast, float *work,
                                        int64_t work_floats)
{
    if (be->sticky || T <= 0) return;
    if (fast && tuna_cuda_train_flash_ok(D)) {
        if (Hkv <= 0 || H % Hkv != 0) {
            tuna_cuda_check(be, cudaErrorInvalidValue, "training attention (H not a multiple of Hkv)");
            return;
        }
        tuna_cuda_train_flash_backward(be, dq, dk, dv, dout, out, lse, q, k, v, pos, T, H, Hkv, D, scale, window);
        return;
    }
    const int64_t HD = H * D, KD = Hkv * D, group = H / (Hkv > 0 ? Hkv : 1);
    for_chunks(be, pos, T, H, Hkv, work_floats, 2, [&](int64_t s0, int64_t n, int64_t g, int64_t h0, int64_t hc) {
        const int64_t qo = s0 * HD + (h0 * group + g) * D, ko = s0 * KD + h0 * D;
        const float *Q = q + qo, *Kp = k + ko, *Vp = v + ko, *dO = dout + qo;
        float *dQ = dq + qo, *dK = dk + ko, *dV = dv + ko;
        float *P = work, *dS = work + hc * n * n;
        if (!bgemm(be, CUBLAS_OP_T, CUBLAS_OP_N, n, n, D, scale, Kp, KD, D, Q, HD, group * D, 0.0f, P, n, n * n, hc,
                   fast))
            return;
        k_train_causal_softmax<<<(unsigned)(hc * n), row_threads(n), 0, be->stream>>>(P, n, window, NULL, H, group);
        if (!tuna_cuda_check_launch(be, "k_train_causal_softmax")) return;
        /* dP[i, j] = dO_i · v_j: column-major dP^T = V dO^T */
        if (!bgemm(be, CUBLAS_OP_T, CUBLAS_OP_N, n, n, D, 1.0f, Vp, KD, D, dO, HD, group * D, 0.0f, dS, n, n * n, hc,
                   fast))
            return;
        k_train_softmax_backward<<<(unsigned)(hc * n), row_threads(n), 0, be->stream>>>(dS, P, n, scale);
        if (!tuna_cuda_check_launch(be, "k_train_softmax_backward")) return;
        /* dV[n, D] += P^T dO: column-major dV^T = dO^T P */
        bgemm(be, CUBLAS_OP_N, CUBLAS_OP_T, D, n, n, 1.0f, dO, HD, group * D, P, n, n * n, 1.0f, dV, KD, D, hc, fast);
        /* dQ[n, D] += dS K: column-major dQ^T = K^T dS^T */
        bgemm(be, CUBLAS_OP_N, CUBLAS_OP_N, D, n, n, 1.0f, Kp, KD, D, dS, n, n * n, 1.0f, dQ, HD, group * D, hc, fast);
        /* dK[n, D] += dS^T Q: column-major dK^T = Q^T dS */
        bgemm(be, CUBLAS_OP_N, CUBLAS_OP_T, D, n, n, 1.0f, Q, HD, group * D, dS, n, n * n, 1.0f, dK, KD, D, hc, fast);
    });
}
