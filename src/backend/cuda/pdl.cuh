/* pdl.cuh — programmatic dependent launch (PDL, sm_90+) for the decode kernels.
 *
 * A kernel launched through tuna_cuda_launch() with PDL on may start while the kernel before it
 * in the stream is still running: its blocks first do what does not depend on that kernel (the
 * GEMVs load their first weights), then call tuna_pdl_wait(), which returns once the previous
 * kernel has completed and its writes are visible. tuna_pdl_trigger() lets the next kernel start
 * its own independent prologue. A kernel launched this way must call tuna_pdl_wait() before it
 * reads anything an earlier kernel wrote or writes anything at all; kernels launched without the
 * attribute (cuBLAS, attention, the plain ops) are ordered as usual. Inside stream capture the
 * launch becomes a programmatic edge of the graph (CUDA 12.3+).
 *
 * On at run time when the device's compute capability is >= 9.0 and TUNA_PDL is not "0"
 * (tuna_cuda_pdl_on); without it the launches are ordinary and the wait/trigger are no-ops. */
#ifndef TUNA_BACKEND_CUDA_PDL_CUH
#define TUNA_BACKEND_CUDA_PDL_CUH

#include <utility>

#include "backend/cuda/cuda_internal.h"

__device__ __forceinline__ void tuna_pdl_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void tuna_pdl_trigger(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* Brings a global address into L2 (no register, no wait): weights a kernel will read after
 * tuna_pdl_wait(). */
__device__ __forceinline__ void tuna_prefetch_l2(const void *p)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

/* Bulk prefetch of bytes [p, p + n) into L2 (sm_90: cp.async.bulk.prefetch, one instruction per
 * piece, nothing to wait for; below sm_90 nothing). p 16-byte aligned, n a multiple of 16. */
__device__ __forceinline__ void tuna_prefetch_l2_bulk(const void *p, unsigned n)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(n) : "memory");
#endif
}

/* Block b of nb brings its share of a pending L2 prefetch (struct tuna_l2pf, cuda_internal.h)
 * into L2; call from one thread. A hint: results never depend on it. */
__device__ __forceinline__ void tuna_l2pf_issue(const struct tuna_l2pf &pf, long long b, long long nb)
{
    if (!pf.p || pf.bytes <= 0 || nb <= 0) return;
    const long long chunk = ((pf.bytes + nb - 1) / nb + 15) & ~15LL;
    long long lo = b * chunk, hi = lo + chunk < pf.bytes ? lo + chunk : pf.bytes;
    for (; lo < hi; lo += 65536) {
        const long long n = hi - lo < 65536 ? hi - lo : 65536;
        tuna_prefetch_l2_bulk((const char *)pf.p + lo, (unsigned)n);
    }
}

/* True when this backend's launches may use PDL (compute capability >= 9.0, TUNA_PDL != 0). */
bool tuna_cuda_pdl_on(tuna_backend *be);

/* Whether kernel fn can have one block of `threads` threads and smem bytes of dynamic shared memory
 * resident on every SM (a persistent kernel with one block per SM, its blocks waiting for each
 * other); raises the kernel's shared-memory limit first. Asked once per kernel, size and device. */
bool tuna_cuda_one_per_sm(tuna_backend *be, const void *fn, int threads, size_t smem);

/* The persistent kernels' scratch (be->layer: q4_layer.cu's barrier, counters and partials,
 * q4_om.cu's barrier), at least `bytes`, zeroed whenever it is made or moved; NULL on failure
 * (sticky). */
void *tuna_cuda_layer_scratch(tuna_backend *be, size_t bytes);

/* cfg's attributes (attr: room for 2) for a persistent kernel whose blocks wait for each other:
 * cooperative where coop (all blocks resident, or the launch fails), and PDL where it is on. */
static inline void tuna_cuda_grid_attrs(tuna_backend *be, cudaLaunchConfig_t *cfg, cudaLaunchAttribute *attr, bool coop)
{
    int na = 0;
    if (coop) {
        attr[na].id = cudaLaunchAttributeCooperative;
        attr[na++].val.cooperative = 1;
    }
    if (tuna_cuda_pdl_on(be)) {
        attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[na++].val.programmaticStreamSerializationAllowed = 1;
    }
    cfg->attrs = attr;
    cfg->numAttrs = (unsigned)na;
}

/* The L2 prefetch hint (backend.h's prefetch_l2; TUNA_L2PF picks the kernel that issues it: 0 none,
 * the default; 1 the decode attention kernel; 2 the RoPE/KV-store kernel before it, or attention
 * when that kernel does not run). The o projection's 33.6 MB during RoPE + attention measured
 * no faster on the H100 (bf16 8B step: L2PF=1 6.06 ms against 6.06-6.09; L2PF=2 6.50 against
 * 6.46 with attention's early trigger). A consumer calls tuna_cuda_l2pf_take with its
 * own id and its token count: it gets the pending range (p NULL when none is for it) and the
 * hint is cleared when it is the consumer's or the consumer is attention (the last chance). */
enum { TUNA_L2PF_ATTN = 1, TUNA_L2PF_ROPE = 2 };
struct tuna_l2pf tuna_cuda_l2pf_take(tuna_backend *be, int consumer, int64_t T);

/* Lets kernel use `bytes` of dynamic shared memory (above the default 48 KiB: once per kernel). */
bool tuna_cuda_smem_allow(tuna_backend *be, const void *kernel, size_t bytes);

/* The most clusters of cs blocks (along x) of `kernel` resident at once in a grid `grid` of blocks of
 * `threads` threads and smem bytes of dynamic shared memory (cudaOccupancyMaxActiveClusters: a
 * cluster lies in one GPC, so the SMs a GPC has beyond a multiple of cs stay out); 0 when the
 * runtime cannot tell. The kernel's shared-memory attribute must allow smem already. */
static inline int tuna_cuda_max_clusters(const void *kernel, dim3 grid, int threads, size_t smem, int cs)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3((unsigned)threads);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = (unsigned)cs, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int nc = 0;
    if (cudaOccupancyMaxActiveClusters(&nc, kernel, &cfg) != cudaSuccess) nc = 0;
    cudaGetLastError();
    return nc;
}

/* Launches kernel<<<grid, block, smem, be->stream>>>(args...) with the PDL attribute when
 * tuna_cuda_pdl_on(be); the kernel must call tuna_pdl_wait() (see above). Checks the launch. */
template <typename... KArgs, typename... Args>
static inline bool tuna_cuda_launch(tuna_backend *be, const char *name, void (*kernel)(KArgs...), dim3 grid,
                                    dim3 block, size_t smem, Args &&...args)
{
    if (!tuna_cuda_smem_allow(be, (const void *)kernel, smem)) return false;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = be->stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = tuna_cuda_pdl_on(be) ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
    return tuna_cuda_check(be, e, name);
}

#endif
