/* train_ops.c — which training op table goes with a backend (backend/train_ops.h): the selector
 * lives here, in the module that sees both the CPU and (in CUDA builds) the CUDA backend. */
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "backend/train_ops.h"
#ifdef TUNA_HAVE_CUDA
#include "backend/cuda/cuda.h"
#endif

const struct tuna_train_ops *tuna_backend_train_ops(const struct tuna_backend_ops *ops)
{
    if (ops == tuna_cpu_backend_ops()) return tuna_cpu_train_ops();
#ifdef TUNA_HAVE_CUDA
    if (ops == tuna_cuda_backend_ops()) return tuna_cuda_train_ops();
#endif
    return NULL;
}

int64_t tuna_train_attention_work_min(const struct tuna_backend_ops *ops, int64_t max_len, int64_t D, bool fast)
{
    if (ops->host_memory) return 0;
    const char *e = getenv("TUNA_TRAIN_FLASH"); /* "0": no flash attention (comparisons) */
    if (fast && D >= 1 && D <= 128 && !(e && e[0] == '0')) return 0; /* CUDA's flash kernels (TUNA_CUDA_FLASH_MAX_D) */
    return 2 * max_len * max_len;
}
