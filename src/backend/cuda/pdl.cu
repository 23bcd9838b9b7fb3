/* pdl.cu — whether programmatic dependent launch is on (pdl.cuh). */
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
