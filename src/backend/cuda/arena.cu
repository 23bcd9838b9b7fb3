/* arena.cu — the weight arena of arena.h: one reserved virtual range, physical memory mapped in
 * granules behind a bump pointer (cuMemAddressReserve / cuMemCreate / cuMemMap / cuMemSetAccess,
 * reached through cudaGetDriverEntryPointByVersion). */
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/arena.h"
#include "core/status.h"

typedef CUresult (*fn_reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
typedef CUresult (*fn_addr_free)(CUdeviceptr, size_t);
typedef CUresult (*fn_create)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
typedef CUresult (*fn_release)(CUmemGenericAllocationHandle);
typedef CUresult (*fn_map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
typedef CUresult (*fn_unmap)(CUdeviceptr, size_t);
typedef CUresult (*fn_access)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
typedef CUresult (*fn_gran)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags);

struct arena_map {
    CUmemGenericAllocationHandle h;
    size_t off, size;
};

struct tuna_cuda_arena {
    int device;
    CUdeviceptr base;
    size_t reserved, gran, used, mapped;
    struct arena_map *maps;
    int64_t n_maps, cap_maps;
    CUmemAllocationProp prop;
    fn_reserve reserve;
    fn_addr_free addr_free;
    fn_create create;
    fn_release release;
    fn_map map;
    fn_unmap unmap;
    fn_access access;
};

static bool entry(const char *name, void **fp)
{
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    *fp = NULL;
    if (cudaGetDriverEntryPointByVersion(name, fp, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess || !*fp) {
        (void)cudaGetLastError();
        return false;
    }
    return true;
}

extern "C" tuna_status tuna_cuda_arena_new(int device, size_t reserve, tuna_cuda_arena **out)
{
    *out = NULL;
    typedef CUresult (*fn_dev_get)(CUdevice *, int);
    typedef CUresult (*fn_dev_attr)(int *, CUdevice_attribute, CUdevice);
    fn_dev_get dev_get = NULL;
    fn_dev_attr dev_attr = NULL;
    CUdevice cu_dev = 0;
    int vmm = 0;
    if (cudaSetDevice(device) != cudaSuccess || cudaFree(0) != cudaSuccess || !entry("cuDeviceGet", (void **)&dev_get) ||
        !entry("cuDeviceGetAttribute", (void **)&dev_attr) || dev_get(&cu_dev, device) != CUDA_SUCCESS ||
        dev_attr(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, cu_dev) != CUDA_SUCCESS || !vmm) {
        (void)cudaGetLastError();
        return tuna_fail(TUNA_E_UNSUPPORTED, "GPU %d has no virtual memory management", device);
    }
    tuna_cuda_arena *a = (tuna_cuda_arena *)calloc(1, sizeof *a);
    if (!a) return tuna_fail_oom("weight arena", sizeof *a);
    fn_gran gran = NULL;
    if (!entry("cuMemAddressReserve", (void **)&a->reserve) || !entry("cuMemAddressFree", (void **)&a->addr_free) ||
        !entry("cuMemCreate", (void **)&a->create) || !entry("cuMemRelease", (void **)&a->release) ||
        !entry("cuMemMap", (void **)&a->map) || !entry("cuMemUnmap", (void **)&a->unmap) ||
        !entry("cuMemSetAccess", (void **)&a->access) || !entry("cuMemGetAllocationGranularity", (void **)&gran)) {
        free(a);
        return tuna_fail(TUNA_E_UNSUPPORTED, "the CUDA driver lacks the virtual memory functions");
    }
    a->device = device;
    a->prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    a->prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    a->prop.location.id = (int)cu_dev;
    if (gran(&a->gran, &a->prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) != CUDA_SUCCESS || !a->gran) {
        free(a);
        return tuna_fail(TUNA_E_UNSUPPORTED, "cuMemGetAllocationGranularity failed on GPU %d", device);
    }
    if (!reserve) {
        size_t fr = 0, tot = 0;
        if (cudaMemGetInfo(&fr, &tot) != cudaSuccess) {
            (void)cudaGetLastError();
            free(a);
            return tuna_fail(TUNA_E_CUDA, "cudaMemGetInfo failed on GPU %d", device);
        }
        reserve = tot;
    }
    a->reserved = (reserve + a->gran - 1) / a->gran * a->gran;
    if (a->reserve(&a->base, a->reserved, a->gran, 0, 0) != CUDA_SUCCESS) {
        const size_t mib = a->reserved >> 20;
        free(a);
        return tuna_fail(TUNA_E_UNSUPPORTED, "cuMemAddressReserve of %zu MiB failed on GPU %d", mib, device);
    }
    *out = a;
    return TUNA_OK;
}

/* Maps [mapped, upto) (upto a multiple of the granularity). */
static tuna_status grow(tuna_cuda_arena *a, size_t upto)
{
    if (a->n_maps == a->cap_maps) {
        int64_t nc = a->cap_maps ? a->cap_maps * 2 : 256;
        struct arena_map *nm = (struct arena_map *)realloc(a->maps, (size_t)nc * sizeof *nm);
        if (!nm) return tuna_fail_oom("weight arena map table", (size_t)nc * sizeof *nm);
        a->maps = nm;
        a->cap_maps = nc;
    }
    const size_t size = upto - a->mapped;
    CUmemGenericAllocationHandle h;
    if (a->create(&h, size, &a->prop, 0) != CUDA_SUCCESS) {
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        (void)cudaGetLastError();
        return tuna_fail(TUNA_E_OOM, "cuMemCreate of %zu MiB for model weights on GPU %d failed (%zu MiB free of %zu MiB)",
                         size >> 20, a->device, fr >> 20, tot >> 20);
    }
    CUmemAccessDesc acc;
    memset(&acc, 0, sizeof acc);
    acc.location = a->prop.location;
    acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if (a->map(a->base + a->mapped, size, 0, h, 0) != CUDA_SUCCESS) {
        a->release(h);
        return tuna_fail(TUNA_E_CUDA, "cuMemMap of %zu MiB for model weights failed on GPU %d", size >> 20, a->device);
    }
    if (a->access(a->base + a->mapped, size, &acc, 1) != CUDA_SUCCESS) {
        a->unmap(a->base + a->mapped, size);
        a->release(h);
        return tuna_fail(TUNA_E_CUDA, "cuMemSetAccess on model weights failed on GPU %d", a->device);
    }
    a->maps[a->n_maps++] = (struct arena_map){h, a->mapped, size};
    a->mapped = upto;
    return TUNA_OK;
}

extern "C" tuna_status tuna_cuda_arena_alloc(tuna_cuda_arena *a, size_t bytes, void **out)
{
    *out = NULL;
    const size_t off = (a->used + 255) & ~(size_t)255;
    const size_t end = off + (bytes ? bytes : 1);
    if (end + 4096 > a->reserved || end < off)
        return tuna_fail(TUNA_E_OOM, "model weights past the %zu MiB reserved on GPU %d", a->reserved >> 20, a->device);
    if (end + 4096 > a->mapped) { /* 4 KiB of slack past the last buffer, as a page would give */
        tuna_status st = grow(a, (end + 4096 + a->gran - 1) / a->gran * a->gran);
        if (st) return st;
    }
    a->used = end;
    *out = (void *)(uintptr_t)(a->base + off);
    return TUNA_OK;
}

extern "C" bool tuna_cuda_arena_contains(const tuna_cuda_arena *a, const void *p)
{
    const uintptr_t u = (uintptr_t)p;
    return a && u >= (uintptr_t)a->base && u < (uintptr_t)a->base + a->used;
}

extern "C" size_t tuna_cuda_arena_used(const tuna_cuda_arena *a) { return a ? a->used : 0; }
extern "C" size_t tuna_cuda_arena_mapped(const tuna_cuda_arena *a) { return a ? a->mapped : 0; }

extern "C" void tuna_cuda_arena_free(tuna_cuda_arena *a)
{
    if (!a) return;
    for (int64_t i = 0; i < a->n_maps; i++) {
        a->unmap(a->base + a->maps[i].off, a->maps[i].size);
        a->release(a->maps[i].h);
    }
    a->addr_free(a->base, a->reserved);
    free(a->maps);
    free(a);
}
