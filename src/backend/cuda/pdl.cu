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
