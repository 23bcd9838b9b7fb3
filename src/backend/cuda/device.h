/* device.h — the CUDA devices tuna can use: discovery and capability checks.
 *
 * Built only with the CUDA backend (TUNA_HAVE_CUDA); every function is callable on a machine
 * without a GPU and then reports that no device is present, so CPU-only runs and CI stay clean.
 */
#ifndef TUNA_BACKEND_CUDA_DEVICE_H
#define TUNA_BACKEND_CUDA_DEVICE_H

#include <stddef.h>

#include "tuna.h"

#ifdef __cplusplus
extern "C" {
#endif

struct tuna_cuda_device_info {
    int index;
    char name[256];
    int cc_major, cc_minor; /* compute capability */
    size_t total_bytes, free_bytes;
    int sm_count;
};

/* Number of usable CUDA devices (0 when there is no driver or no GPU: not an error). */
int tuna_cuda_device_count(void);

/* Fills info for device index. */
tuna_status tuna_cuda_device_query(int index, struct tuna_cuda_device_info *info);

/* Whether bf16 compute is native on the device (compute capability ≥ 8.0). */
int tuna_cuda_supports_bf16(const struct tuna_cuda_device_info *info);

#ifdef __cplusplus
}
#endif
#endif
