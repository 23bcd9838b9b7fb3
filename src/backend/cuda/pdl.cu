/* pdl.cu — whether programmatic dependent launch is on, and the L2 prefetch hint (pdl.cuh). */
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/pdl.cuh"

bool tuna_cuda_pdl_on(tuna_backend *be)
{
    static int env = -1;
    if (env < 0) {
        const char *e = getenv("TUNA_PDL");
        env = e && strcmp(e, "0") == 0 ? 0 : 1;
    }
    return env && be->cc_major >= 9;
}

/* TUNA_CARVEOUT=pct (0..100): the preferred shared-memory carveout of every kernel launched here
 * (the PDL chain of decode: GEMVs, the 4-bit GEMVs, RoPE/KV store), set once per kernel; unset:
 * the driver's choice. An SM changes its carveout only when empty, and PDL-chained kernels keep
 * it occupied: one value for the whole chain avoids waiting for an SM to drain (a measurement). */
static int carveout_env(void)
{
    static int v = -2;
    if (v == -2) {
        const char *e = getenv("TUNA_CARVEOUT");
        v = e && *e ? atoi(e) : -1;
        if (v > 100) v = 100;
    }
    return v;
}

bool tuna_cuda_smem_allow(tuna_backend *be, const void *kernel, size_t bytes)
{
    static struct {
        const void *k;
        size_t bytes;
    } seen[128];
    static int n;
    const int carve = carveout_env();
    if (bytes <= 48 * 1024 && carve < 0) return true;
    int at = -1;
    for (int i = 0; i < n; i++)
        if (seen[i].k == kernel) at = i;
    if (at >= 0 && seen[at].bytes >= bytes) return true;
    if (at < 0 && carve >= 0 && cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, carve) !=
                                    cudaSuccess)
        cudaGetLastError(); /* a hint: ignored where refused */
    if (bytes > 48 * 1024 &&
        !tuna_cuda_check(be, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
                         "cudaFuncSetAttribute(shared memory)"))
        return false;
    if (at >= 0) {
        seen[at].bytes = bytes;
    } else if (n < 128) {
        seen[n].k = kernel;
        seen[n].bytes = bytes;
        n++;
    }
    return true;
}

/* TUNA_L2PF: which kernel issues the hint (pdl.cuh), 0 none; TUNA_L2PF_MB: at most this much of
 * the range is taken, from its start (default 40 MB, under the H100's 50 MB L2). */
static int l2pf_mode(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_L2PF");
        v = e && (e[0] == '1' || e[0] == '2') && !e[1] ? e[0] - '0' : 0;
    }
    return v;
}

static long long l2pf_max(void)
{
    static long long v = -1;
    if (v < 0) {
        const char *e = getenv("TUNA_L2PF_MB");
        const long long mb = e && *e ? atoll(e) : 40;
        v = (mb > 0 ? mb : 0) << 20;
    }
    return v;
}

void tuna_cuda_prefetch_l2(tuna_backend *be, const void *p, size_t bytes)
{
    be->l2pf.p = NULL;
    be->l2pf.bytes = 0;
    if (!l2pf_mode() || be->cc_major < 9 || !p || ((uintptr_t)p % 16) != 0) return;
    const long long n = (long long)(bytes & ~(size_t)15);
    if (n <= 0) return;
    be->l2pf.p = p;
    be->l2pf.bytes = n < l2pf_max() ? n : l2pf_max();
}

struct tuna_l2pf tuna_cuda_l2pf_take(tuna_backend *be, int consumer, int64_t T)
{
    struct tuna_l2pf none = {NULL, 0};
    if (!be->l2pf.p) return none;
    const int mode = l2pf_mode();
    if (mode != consumer && consumer != TUNA_L2PF_ATTN) return none;
    struct tuna_l2pf pf = be->l2pf;
    be->l2pf = none;
    return T <= TUNA_CUDA_GEMV_MAX_T ? pf : none;
}

bool tuna_cuda_one_per_sm(tuna_backend *be, const void *fn, int threads, size_t smem)
{
    static struct {
        const void *fn;
        size_t smem;
        int threads, dev;
        bool ok;
    } seen[32];
    static int n;
    for (int i = 0; i < n; i++)
        if (seen[i].fn == fn && seen[i].smem == smem && seen[i].threads == threads && seen[i].dev == be->device)
            return seen[i].ok;
    if (!tuna_cuda_smem_allow(be, fn, smem)) return false;
    int bps = 0;
    const bool ok = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, fn, threads, smem) == cudaSuccess && bps >= 1;
    cudaGetLastError();
    if (n < 32) {
        seen[n].fn = fn, seen[n].smem = smem, seen[n].threads = threads, seen[n].dev = be->device;
        seen[n++].ok = ok;
    }
    return ok;
}

void *tuna_cuda_layer_scratch(tuna_backend *be, size_t bytes)
{
    void *before = be->layer.p;
    if (!tuna_cuda_grow(be, &be->layer, bytes, "cudaMalloc(decode layer scratch)")) return NULL;
    if (be->layer.p != before &&
        !tuna_cuda_check(be, cudaMemsetAsync(be->layer.p, 0, be->layer.cap, be->stream), "cudaMemsetAsync(decode layer)"))
        return NULL;
    return be->layer.p;
}
