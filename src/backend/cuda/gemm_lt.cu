/* gemm_lt.cu — the opt-in per-shape algorithm choice of gemm_lt.h (TUNA_GEMM_LT=1).
 *
 * Why: cuBLAS's default for a 16-bit GEMM picks one algorithm from its heuristic; at the token
 * counts of a serving step (T ~ 400-512 decode-only, ~2,048 with a prefill chunk) the tiles can
 * quantize badly onto 132 SMs (q/k/v N 6,144 with 128x256 tiles at T 512: 96 tiles). Here the
 * heuristic's first LT_ALGOS algorithms are timed once per key (device, N, K, T rounded up to a
 * bucket, types, beta) on the real operands and the fastest is kept. The timing needs a stream
 * sync, so it only happens outside a capture; a capture meeting an unknown key returns false
 * (the caller's cublasGemmEx runs, as without this file). An algorithm kept for a bucket that
 * cublasLt refuses at another T of the bucket is not used for that call (false as well).
 * The results differ from cublasGemmEx's only by the order of float32 sums (another tiling or
 * split-K). */
#include <cublasLt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/gemm_lt.h"

#define LT_ALGOS 8
#define LT_CACHE 512
#define LT_MAX_DEV 16

struct lt_entry {
    int dev, yt, dt, acc;
    int64_t N, K, Tb;
    int ok; /* 1: algo holds the choice; 0: none works (the caller's GEMM) */
    cublasLtMatmulAlgo_t algo;
};

static struct lt_entry lt_cache[LT_CACHE];
static int lt_n;
static cublasLtHandle_t lt_handle[LT_MAX_DEV];

/* TUNA_GEMM_LT: 0/unset off, 1 on */
static int lt_env(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_GEMM_LT");
        v = e && atoi(e) > 0 ? 1 : 0;
    }
    return v;
}

/* T bucket: multiples of 32 up to 256, of 64 above (the default's bad picks are narrow: H100,
 * bench_gemm_lt: gate/up at T 448 ran at 361 TFLOP/s against 786 at T 512) */
static int64_t lt_bucket(int64_t T) { return T <= 256 ? (T + 31) / 32 * 32 : (T + 63) / 64 * 64; }

struct lt_desc {
    cublasLtMatmulDescOpaque_t op_s;
    cublasLtMatrixLayoutOpaque_t a_s, b_s, c_s;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
};

static bool lt_desc_init(struct lt_desc *d, cudaDataType_t yt, cudaDataType_t dt, int64_t N, int64_t K, int64_t T)
{
    d->op = &d->op_s, d->a = &d->a_s, d->b = &d->b_s, d->c = &d->c_s;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    return cublasLtMatmulDescInit(d->op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulDescSetAttribute(d->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulDescSetAttribute(d->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutInit(d->a, dt, (uint64_t)K, (uint64_t)N, K) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutInit(d->b, dt, (uint64_t)K, (uint64_t)T, K) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutInit(d->c, yt, (uint64_t)N, (uint64_t)T, N) == CUBLAS_STATUS_SUCCESS;
}

/* Times the heuristic's algorithms on this call's operands (y is written: with acc the sums pile
 * up, so y is saved first and put back after). Returns the entry's ok. */
static int lt_tune(tuna_backend *be, cublasLtHandle_t lt, struct lt_entry *en, const struct lt_desc *d, void *y,
                   size_t ybytes, const void *x, const void *w, const float *beta)
{
    void *ws = be->blas_ws;
    const size_t ws_bytes = ws ? (size_t)32 << 20 : 0;
    cublasLtMatmulPreferenceOpaque_t pref_s;
    cublasLtMatmulPreference_t pref = &pref_s;
    cublasLtMatmulHeuristicResult_t res[LT_ALGOS];
    int nres = 0;
    if (cublasLtMatmulPreferenceInit(pref) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                             sizeof ws_bytes) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoGetHeuristic(lt, d->op, d->a, d->b, d->c, d->c, pref, LT_ALGOS, res, &nres) !=
            CUBLAS_STATUS_SUCCESS)
        return 0;
    void *save = NULL;
    if (*beta != 0.0f && (cudaMalloc(&save, ybytes) != cudaSuccess ||
                          cudaMemcpyAsync(save, y, ybytes, cudaMemcpyDeviceToDevice, be->stream) != cudaSuccess)) {
        cudaFree(save);
        cudaGetLastError();
        return 0;
    }
    cudaEvent_t e0 = NULL, e1 = NULL;
    const float one = 1.0f;
    float best = 1e30f;
    int best_i = -1;
    if (cudaEventCreate(&e0) == cudaSuccess && cudaEventCreate(&e1) == cudaSuccess) {
        for (int a = 0; a < nres; a++) {
            if (res[a].state != CUBLAS_STATUS_SUCCESS) continue;
            /* one warm-up run, then the mean of 2 (the same operands each time) */
            if (cublasLtMatmul(lt, d->op, &one, w, d->a, x, d->b, beta, y, d->c, y, d->c, &res[a].algo, ws, ws_bytes,
                               be->stream) != CUBLAS_STATUS_SUCCESS)
                continue;
            cudaEventRecord(e0, be->stream);
            bool bad = false;
            for (int r = 0; r < 2 && !bad; r++)
                bad = cublasLtMatmul(lt, d->op, &one, w, d->a, x, d->b, beta, y, d->c, y, d->c, &res[a].algo, ws,
                                     ws_bytes, be->stream) != CUBLAS_STATUS_SUCCESS;
            cudaEventRecord(e1, be->stream);
            float ms = 0.0f;
            if (bad || cudaEventSynchronize(e1) != cudaSuccess || cudaEventElapsedTime(&ms, e0, e1) != cudaSuccess)
                continue;
            if (ms < best) best = ms, best_i = a;
        }
    }
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (save) {
        cudaMemcpyAsync(y, save, ybytes, cudaMemcpyDeviceToDevice, be->stream);
        cudaStreamSynchronize(be->stream);
        cudaFree(save);
    }
    cudaGetLastError(); /* a refused algorithm above is not the caller's failure */
    if (best_i < 0) return 0;
    en->algo = res[best_i].algo;
    if (getenv("TUNA_GEMM_LT_DEBUG"))
        fprintf(stderr, "gemm_lt: N %lld K %lld T bucket %lld y%s: algorithm %d of %d, %.1f us\n", (long long)en->N,
                (long long)en->K, (long long)en->Tb, en->acc ? "+=" : "=", best_i, nres, 1e3 * best / 2);
    return 1;
}

bool tuna_cuda_gemm_lt(tuna_backend *be, void *y, cudaDataType_t yt, const void *x, const void *w, cudaDataType_t dt,
                       int64_t N, int64_t K, int64_t T, bool acc)
{
    if (!lt_env() || be->device < 0 || be->device >= LT_MAX_DEV || T <= 0 || N > INT32_MAX || K > INT32_MAX)
        return false;
    if (!lt_handle[be->device] && cublasLtCreate(&lt_handle[be->device]) != CUBLAS_STATUS_SUCCESS) {
        lt_handle[be->device] = NULL;
        return false;
    }
    cublasLtHandle_t lt = lt_handle[be->device];
    const int64_t Tb = lt_bucket(T);
    struct lt_entry *en = NULL;
    for (int i = 0; i < lt_n && !en; i++) {
        struct lt_entry *c = &lt_cache[i];
        if (c->dev == be->device && c->N == N && c->K == K && c->Tb == Tb && c->yt == (int)yt && c->dt == (int)dt &&
            c->acc == (int)acc)
            en = c;
    }
    struct lt_desc d;
    if (!lt_desc_init(&d, yt, dt, N, K, T)) return false;
    const float one = 1.0f, zero = 0.0f;
    const float *beta = acc ? &one : &zero;
    if (!en) {
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        if (lt_n == LT_CACHE || cudaStreamIsCapturing(be->stream, &cs) != cudaSuccess ||
            cs != cudaStreamCaptureStatusNone)
            return false;
        en = &lt_cache[lt_n++];
        memset(en, 0, sizeof *en);
        en->dev = be->device, en->N = N, en->K = K, en->Tb = Tb, en->yt = (int)yt, en->dt = (int)dt, en->acc = (int)acc;
        const size_t ybytes = (size_t)N * (size_t)T * (yt == CUDA_R_32F ? 4 : 2);
        en->ok = lt_tune(be, lt, en, &d, y, ybytes, x, w, beta);
        /* without acc y holds this call's result (the last timed run); with acc y was put back:
         * run it once more below */
        if (en->ok && !acc) return true;
    }
    if (!en->ok) return false;
    void *ws = be->blas_ws;
    const size_t ws_bytes = ws ? (size_t)32 << 20 : 0;
    const cublasStatus_t s =
        cublasLtMatmul(lt, d.op, &one, w, d.a, x, d.b, beta, y, d.c, y, d.c, &en->algo, ws, ws_bytes, be->stream);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE) return false; /* not for this T */
    return tuna_cuda_check_blas(be, s, "cublasLtMatmul(16-bit activations, TUNA_GEMM_LT)");
}
