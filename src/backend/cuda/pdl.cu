/* pdl.cu — whether programmatic dependent launch is on (pdl.cuh). */
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/pdl.cuh"

bool tuna_cuda_pdl_on(tuna_backend *be)
{
    static int env = -1;
    static int cc_major[64]; /* 0 = not asked yet; per device */
    if (env < 0) {
        const char *e = getenv("TUNA_PDL");
        env = e && strcmp(e, "0") == 0 ? 0 : 1;
    }
    if (!env || be->device < 0 || be->device >= 64) return false;
    if (cc_major[be->device] == 0) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, be->device) != cudaSuccess) {
            cudaGetLastError();
            major = -1;
        }
        cc_major[be->device] = major > 0 ? major : -1;
    }
    return cc_major[be->device] >= 9;
}

int tuna_cuda_sm_count(tuna_backend *be)
{
    static int n[64];
    if (be->device < 0 || be->device >= 64) return 0;
    if (n[be->device] == 0) {
        int v = 0;
        if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, be->device) != cudaSuccess) {
            cudaGetLastError();
            v = -1;
        }
        n[be->device] = v > 0 ? v : -1;
    }
    return n[be->device] > 0 ? n[be->device] : 0;
}

bool tuna_cuda_smem_allow(tuna_backend *be, const void *kernel, size_t bytes)
{
    static struct {
        const void *k;
        size_t bytes;
    } seen[128];
    static int n;
    if (bytes <= 48 * 1024) return true;
    for (int i = 0; i < n; i++)
        if (seen[i].k == kernel && seen[i].bytes >= bytes) return true;
    if (!tuna_cuda_check(be, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
                         "cudaFuncSetAttribute(shared memory)"))
        return false;
    for (int i = 0; i < n; i++)
        if (seen[i].k == kernel) {
            seen[i].bytes = bytes;
            return true;
        }
    if (n < 128) {
        seen[n].k = kernel;
        seen[n].bytes = bytes;
        n++;
    }
    return true;
}
