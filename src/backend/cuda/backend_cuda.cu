/* backend_cuda.cu — the CUDA backend object: stream, cuBLAS handle, sticky error, device memory,
 * metadata staging, the op table and the small element-wise ops (add, GLU, embedding; the KV store
 * is with attention, kv_store.cu). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/act16.h"
#include "backend/cuda/cuda_internal.h"
#include "core/status.h"

bool tuna_cuda_check(tuna_backend *be, cudaError_t e, const char *call)
{
    if (e == cudaSuccess) return true;
    if (be->sticky == TUNA_OK) {
        be->sticky = TUNA_E_CUDA;
        snprintf(be->sticky_msg, sizeof be->sticky_msg, "%s failed on GPU %d: %s (%s)", call, be->device,
                 cudaGetErrorString(e), cudaGetErrorName(e));
    }
    return false;
}

bool tuna_cuda_check_blas(tuna_backend *be, cublasStatus_t s, const char *call)
{
    if (s == CUBLAS_STATUS_SUCCESS) return true;
    if (be->sticky == TUNA_OK) {
        be->sticky = TUNA_E_CUDA;
        snprintf(be->sticky_msg, sizeof be->sticky_msg, "%s failed on GPU %d: cuBLAS status %d", call, be->device,
                 (int)s);
    }
    return false;
}

bool tuna_cuda_check_launch(tuna_backend *be, const char *kernel)
{
    return tuna_cuda_check(be, cudaGetLastError(), kernel);
}

bool tuna_cuda_grow(tuna_backend *be, struct cuda_grow_buf *buf, size_t bytes, const char *what)
{
    if (bytes <= buf->cap) return true;
    if (tuna_cuda_capture_taint(be)) return false;
    size_t cap = buf->cap ? buf->cap : 4096;
    while (cap < bytes) cap *= 2;
    if (buf->p) {
        /* the old buffer may still be read by queued kernels */
        if (!tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "cudaStreamSynchronize")) return false;
        cudaFree(buf->p);
        buf->p = NULL;
        buf->cap = 0;
    }
    if (!tuna_cuda_check(be, cudaMalloc(&buf->p, cap), what)) return false;
    buf->cap = cap;
    be->meta_gen++; /* captured graphs may refer to the old buffer */
    return true;
}

bool tuna_cuda_meta_begin(tuna_backend *be, struct cuda_meta *m, size_t upper)
{
    upper += 8 * 8; /* alignment of up to 8 arrays */
    m->reserved = upper;
    if (be->meta_used + upper <= be->host_meta_cap) return true;
    return tuna_cuda_meta_reset(be, upper);
}

/* Waits until every queued copy and kernel that reads the arena is done and starts the append
 * region over (after the step block), growing both arenas when room is short. The step block
 * keeps its bytes: copied into the new arenas and uploaded again. */
bool tuna_cuda_meta_reset(tuna_backend *be, size_t upper)
{
    if (tuna_cuda_capture_taint(be)) return false;
    if (!tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "cudaStreamSynchronize(metadata arena)"))
        return false;
    be->meta_used = be->meta_flushed = be->step_cap;
    be->meta_cache_n = be->meta_cache_next = 0;
    if (be->step_cap + upper > be->host_meta_cap) {
        size_t cap = be->host_meta_cap ? be->host_meta_cap : (size_t)4 << 20;
        while (cap < be->step_cap + upper) cap *= 2;
        void *h = NULL, *d = NULL;
        if (!tuna_cuda_check(be, cudaHostAlloc(&h, cap, cudaHostAllocDefault), "cudaHostAlloc(metadata)")) return false;
        if (!tuna_cuda_check(be, cudaMalloc(&d, cap), "cudaMalloc(metadata)")) {
            cudaFreeHost(h);
            return false;
        }
        if (be->step_used) {
            memcpy(h, be->host_meta, be->step_used);
            if (!tuna_cuda_check(be, cudaMemcpyAsync(d, h, be->step_used, cudaMemcpyHostToDevice, be->stream),
                                 "cudaMemcpyAsync(step block)"))
                return false;
        }
        if (be->host_meta) cudaFreeHost(be->host_meta);
        if (be->meta.p) cudaFree(be->meta.p);
        be->host_meta = h;
        be->meta.p = d;
        be->meta.cap = cap;
        be->host_meta_cap = cap;
        be->meta_gen++;
    }
    return true;
}

void *tuna_cuda_meta_stage(tuna_backend *be, struct cuda_meta *m, const void *src, size_t n)
{
    /* inside the step block: already on the device at the same offset */
    if (be->step_used && (const char *)src >= (const char *)be->host_meta &&
        (const char *)src + n <= (const char *)be->host_meta + be->step_used)
        return (void *)((const char *)src - (const char *)be->host_meta);
    if (tuna_cuda_capture_taint(be)) return NULL;
    for (int i = 0; i < be->meta_cache_n; i++) {
        if (be->meta_cache[i].src == src && be->meta_cache[i].n == n &&
            memcmp((char *)be->host_meta + be->meta_cache[i].off, src, n) == 0)
            return (void *)be->meta_cache[i].off;
    }
    size_t off = (be->meta_used + 7) & ~(size_t)7;
    if (off + n > be->host_meta_cap || n + 8 > m->reserved) {
        /* a caller that staged more than it reserved: a bug, reported as a sticky error */
        tuna_cuda_check(be, cudaErrorInvalidValue, "metadata staged beyond its reservation");
        return NULL;
    }
    m->reserved -= n + 8;
    memcpy((char *)be->host_meta + off, src, n);
    be->meta_used = off + n;
    int slot = be->meta_cache_next;
    be->meta_cache[slot].src = src;
    be->meta_cache[slot].n = n;
    be->meta_cache[slot].off = off;
    be->meta_cache_next = (slot + 1) % 32;
    if (be->meta_cache_n < 32) be->meta_cache_n++;
    return (void *)off; /* a device byte offset into be->meta.p, valid once flushed */
}

bool tuna_cuda_meta_flush(tuna_backend *be, struct cuda_meta *m)
{
    (void)m;
    if (be->meta_used <= be->meta_flushed) return true;
    size_t a = be->meta_flushed, b = be->meta_used;
    be->meta_flushed = b;
    /* pinned source, never rewritten before the next sync: truly asynchronous */
    return tuna_cuda_check(be, cudaMemcpyAsync((char *)be->meta.p + a, (char *)be->host_meta + a, b - a,
                                               cudaMemcpyHostToDevice, be->stream),
                           "cudaMemcpyAsync(metadata)");
}

/* Turns a staged offset into the device address (after flush). */
#define META_PTR(be, off, type) ((type *)((char *)(be)->meta.p + (size_t)(off)))

extern "C" void *tuna_cuda_backend_stream(tuna_backend *be) { return (void *)be->stream; }

extern "C" tuna_status tuna_cuda_backend_new(int device, tuna_backend **out)
{
    *out = NULL;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        cudaGetLastError();
        return tuna_fail(TUNA_E_NOT_FOUND, "no CUDA device found (%s); run on the CPU instead",
                         e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
    }
    if (device < 0 || device >= n) return tuna_fail(TUNA_E_INVALID, "CUDA device %d does not exist (%d found)", device, n);
    tuna_backend *be = (tuna_backend *)calloc(1, sizeof *be);
    if (!be) return tuna_fail_oom("CUDA backend", sizeof *be);
    be->device = device;
    if ((e = cudaSetDevice(device)) != cudaSuccess || (e = cudaStreamCreate(&be->stream)) != cudaSuccess) {
        free(be);
        return tuna_fail(TUNA_E_CUDA, "starting CUDA on device %d: %s", device, cudaGetErrorString(e));
    }
    if (cudaDeviceGetAttribute(&be->cc_major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&be->sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&be->max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
        cudaGetLastError(); /* an attribute left 0 only turns off what needs it */
    cublasStatus_t bs = cublasCreate(&be->blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        cudaStreamDestroy(be->stream);
        free(be);
        return tuna_fail(TUNA_E_CUDA, "cublasCreate on device %d: status %d", device, (int)bs);
    }
    cublasSetStream(be->blas, be->stream);
    /* the default math mode keeps SGEMM in fp32 (TF32 only when asked): fp32 mode matches the CPU */
    cublasSetMathMode(be->blas, CUBLAS_DEFAULT_MATH);
    /* a fixed cuBLAS workspace (32 MiB, NVIDIA's advice for Hopper), so GEMMs inside a captured
     * graph never allocate */
    if (cudaMalloc(&be->blas_ws, (size_t)32 << 20) == cudaSuccess) cublasSetWorkspace(be->blas, be->blas_ws, (size_t)32 << 20);
    else cudaGetLastError();
    *out = be;
    return TUNA_OK;
}

extern "C" void tuna_cuda_backend_free(tuna_backend *be)
{
    if (!be) return;
    cudaStreamSynchronize(be->stream);
    cudaFree(be->meta.p);
    if (be->host_meta) cudaFreeHost(be->host_meta);
    cudaFree(be->half.p);
    cudaFree(be->wdeq.p);
    cudaFree(be->argmax_part.p);
    if (be->argmax_host) cudaFreeHost(be->argmax_host);
    cudaFree(be->attn.p);
    cudaFree(be->layer.p);
    cudaFree(be->attn_o.p);
    cudaFree(be->q4sk.p);
    cudaFree(be->q4mm_part.p);
    cudaFree(be->fuse.p);
    cudaFree(be->lora.p);
    tuna_cuda_lora_free(be);
    tuna_cuda_warm_free(be);
    tuna_cuda_graphs_free(be);
    cublasDestroy(be->blas);
    cudaFree(be->blas_ws);
    cudaStreamDestroy(be->stream);
    free(be);
}

extern "C" tuna_status tuna_cuda_status(tuna_backend *be)
{
    if (be->sticky) return tuna_fail(be->sticky, "%s; the GPU engine stopped", be->sticky_msg);
    return TUNA_OK;
}

extern "C" tuna_status tuna_cuda_alloc(tuna_backend *be, size_t bytes, void **out)
{
    *out = NULL;
    if (be->sticky) return tuna_cuda_status(be);
    cudaError_t e = cudaMalloc(out, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* an OOM here is reported, not sticky */
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        return tuna_fail(e == cudaErrorMemoryAllocation ? TUNA_E_OOM : TUNA_E_CUDA,
                         "cudaMalloc of %zu MiB on GPU %d failed: %s (%zu MiB free of %zu MiB)", bytes >> 20,
                         be->device, cudaGetErrorString(e), fr >> 20, tot >> 20);
    }
    return TUNA_OK;
}

extern "C" void tuna_cuda_free(tuna_backend *be, void *p)
{
    (void)be;
    if (p) cudaFree(p);
}

extern "C" tuna_status tuna_cuda_upload(tuna_backend *be, void *dst, const void *src, size_t bytes)
{
    if (be->sticky) return tuna_cuda_status(be);
    if (!tuna_cuda_check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, be->stream), "upload") ||
        !tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "upload sync"))
        return tuna_cuda_status(be);
    return TUNA_OK;
}

extern "C" tuna_status tuna_cuda_upload_2d(tuna_backend *be, void *dst, size_t dpitch, const void *src, size_t spitch,
                                           size_t width, size_t rows)
{
    if (be->sticky) return tuna_cuda_status(be);
    if (rows == 0 || width == 0) return TUNA_OK;
    /* host rows back to back (the LoRA fold's columns): one upload into a staging buffer, then
     * a device-to-device 2D copy; a 2D copy straight from pageable memory goes row by row (the
     * fold's 256-byte rows took ~9 s for Llama-3-8B's 8 slots) */
    void *tmp = NULL;
    if (spitch == width && cudaMalloc(&tmp, width * rows) == cudaSuccess) {
        const bool ok = tuna_cuda_check(be, cudaMemcpyAsync(tmp, src, width * rows, cudaMemcpyHostToDevice, be->stream),
                                        "upload (2D, staging)") &&
                        tuna_cuda_check(be,
                                        cudaMemcpy2DAsync(dst, dpitch, tmp, width, width, rows, cudaMemcpyDeviceToDevice,
                                                          be->stream),
                                        "upload (2D, placing rows)") &&
                        tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "upload sync");
        cudaFree(tmp);
        return ok ? TUNA_OK : tuna_cuda_status(be);
    }
    (void)cudaGetLastError(); /* a failed staging cudaMalloc: the direct 2D copy below */
    if (!tuna_cuda_check(be, cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyHostToDevice, be->stream),
                         "upload (2D)") ||
        !tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "upload sync"))
        return tuna_cuda_status(be);
    return TUNA_OK;
}

extern "C" tuna_status tuna_cuda_download(tuna_backend *be, void *dst, const void *src, size_t bytes)
{
    if (be->sticky) return tuna_cuda_status(be);
    if (!tuna_cuda_check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, be->stream), "download") ||
        !tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "download sync"))
        return tuna_cuda_status(be);
    return TUNA_OK;
}

extern "C" tuna_status tuna_cuda_sync(tuna_backend *be)
{
    if (!be->sticky) tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "cudaStreamSynchronize");
    return tuna_cuda_status(be);
}

/* ---------------- element-wise ops ---------------- */

__global__ void k_add(float *y, const float *x, int64_t n)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

void tuna_cuda_add(tuna_backend *be, float *y, const float *x, int64_t n)
{
    if (be->sticky || n <= 0) return;
    tuna_cuda_racc_settle(be, y);
    tuna_cuda_racc_settle(be, x);
    k_add<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(y, x, n);
    tuna_cuda_check_launch(be, "k_add");
}

__global__ void k_glu(float *out, const float *gate, const float *up, int64_t n, int act)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = tuna_cuda_act(gate[i], act) * up[i];
}

void tuna_cuda_glu(tuna_backend *be, float *out, const float *gate, const float *up, int64_t n, int act)
{
    if (be->sticky || n <= 0) return;
    k_glu<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(out, gate, up, n, act);
    tuna_cuda_check_launch(be, "k_glu");
}

__device__ __forceinline__ float tuna_ld_elem(const void *p, int dtype, int64_t i)
{
    /* dtype: 0 f32, 1 bf16, 2 f16 */
    if (dtype == 1) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        return __uint_as_float(u);
    }
    if (dtype == 2) return __half2float(((const __half *)p)[i]);
    return ((const float *)p)[i];
}

static int dtype_code(enum tuna_dtype t)
{
    return t == TUNA_DTYPE_BF16 ? 1 : t == TUNA_DTYPE_F16 ? 2 : t == TUNA_DTYPE_F32 ? 0 : -1;
}

__global__ void k_embedding(float *out, const int32_t *ids, int64_t T, const void *emb, int dtype, int64_t C,
                            float scale)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * C) return;
    int64_t t = i / C, c = i % C;
    out[i] = tuna_ld_elem(emb, dtype, (int64_t)ids[t] * C + c) * scale;
}

void tuna_cuda_embedding(tuna_backend *be, float *out, const int32_t *ids, int64_t T, const struct tuna_weight *emb,
                         float scale)
{
    if (be->sticky || T <= 0) return;
    if (out == be->racc.x) tuna_cuda_racc_drop(be); /* x is overwritten: its pending part is void */
    int dc = dtype_code(emb->dtype);
    if (dc < 0) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "embedding (unsupported weight dtype)");
        return;
    }
    struct cuda_meta m = {0};
    if (!tuna_cuda_meta_begin(be, &m, (size_t)T * sizeof(int32_t))) return;
    size_t off = (size_t)tuna_cuda_meta_stage(be, &m, ids, (size_t)T * sizeof(int32_t));
    if (be->sticky || !tuna_cuda_meta_flush(be, &m)) return;
    int64_t n = T * emb->cols;
    k_embedding<<<tuna_cuda_blocks(n, 256), 256, 0, be->stream>>>(out, META_PTR(be, off, int32_t), T, emb->data, dc,
                                                                  emb->cols, scale);
    tuna_cuda_check_launch(be, "k_embedding");
}

static void cuda_release(tuna_backend *be, void *p) { tuna_cuda_free(be, p); }

static void cuda_copy(tuna_backend *be, void *dst, const void *src, size_t bytes)
{
    if (be->sticky || bytes == 0) return;
    tuna_cuda_racc_settle(be, (const float *)src);
    tuna_cuda_racc_settle(be, (const float *)dst);
    tuna_cuda_check(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, be->stream), "cudaMemcpyAsync(D2D)");
}

/* positional: C++17 has no designated initializers; the order is backend.h's */
static const struct tuna_backend_ops k_cuda_ops = {
    "cuda",
    tuna_cuda_matmul,
    tuna_cuda_rmsnorm,
    tuna_cuda_rope,
    tuna_cuda_kv_store,
    tuna_cuda_attention,
    tuna_cuda_glu,
    tuna_cuda_embedding,
    tuna_cuda_add,
    tuna_cuda_lora,
    tuna_cuda_argmax,
    tuna_cuda_alloc,
    cuda_release,
    tuna_cuda_upload,
    tuna_cuda_download,
    cuda_copy,
    tuna_cuda_sync,
    false,
    tuna_cuda_matmul_multi,
    tuna_cuda_matmul_glu,
    tuna_cuda_matmul_add,
    tuna_cuda_step_block,
    tuna_cuda_step_upload,
    tuna_cuda_graph_begin,
    tuna_cuda_graph_end,
    tuna_cuda_rmsnorm_matmul_multi,
    tuna_cuda_rmsnorm_matmul_glu,
    tuna_cuda_rope_kv_store,
    tuna_cuda_rmsnorm_qkv_rope_kv,
    tuna_cuda_prefetch_l2,
    tuna_cuda_lora_begin,
    tuna_cuda_lora_matmul,
    tuna_cuda_rmsnorm16,
    tuna_cuda_matmul16,
    tuna_cuda_rope_kv_store16,
    tuna_cuda_attention16,
    tuna_cuda_glu16,
    tuna_cuda_act16_min_t,
    tuna_cuda_lora_matmul16,
    tuna_cuda_decode_layer,
    tuna_cuda_upload_2d,
    tuna_cuda_attention_o,
    tuna_cuda_rmsnorm_glu_down,
    tuna_cuda_decode_o_mlp,
    tuna_cuda_rope_attention,
    tuna_cuda_argmax_queue,
    tuna_cuda_argmax_take,
    tuna_cuda_warm_l2,
};

extern "C" const struct tuna_backend_ops *tuna_cuda_backend_ops(void) { return &k_cuda_ops; }
