/* device.cu — CUDA device discovery (cudaGetDeviceCount / cudaGetDeviceProperties). */
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#include "core/status.h"
#include "device.h"

extern "C" int tuna_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear: no driver or no device is not a sticky error */
        return 0;
    }
    return n;
}

extern "C" tuna_status tuna_cuda_device_query(int index, struct tuna_cuda_device_info *info)
{
    memset(info, 0, sizeof *info);
    int n = tuna_cuda_device_count();
    if (index < 0 || index >= n)
        return tuna_fail(TUNA_E_NOT_FOUND, "CUDA device %d does not exist (%d device(s) found)", index, n);
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, index);
    if (e != cudaSuccess)
        return tuna_fail(TUNA_E_CUDA, "cudaGetDeviceProperties(%d): %s", index, cudaGetErrorString(e));
    info->index = index;
    snprintf(info->name, sizeof info->name, "%s", p.name);
    info->cc_major = p.major;
    info->cc_minor = p.minor;
    info->sm_count = p.multiProcessorCount;
    e = cudaSetDevice(index);
    if (e == cudaSuccess) e = cudaMemGetInfo(&info->free_bytes, &info->total_bytes);
    if (e != cudaSuccess)
        return tuna_fail(TUNA_E_CUDA, "cudaMemGetInfo on device %d: %s", index, cudaGetErrorString(e));
    return TUNA_OK;
}

extern "C" int tuna_cuda_supports_bf16(const struct tuna_cuda_device_info *info)
{
    return info->cc_major >= 8;
}
