/* arena.h — one growable device region for a model's weights (CUDA virtual memory management).
 *
 * cudaMalloc hands out large buffers in 2 MiB pages: a 4-bit MLP weight of Llama-2-7B (22.5 MB
 * of codes, 2.7 MB of absmax) wastes up to 1.3 MiB per buffer, ~0.3 GB over the ~450 buffers of
 * a 7B model. The arena reserves one virtual address range and maps physical memory behind a bump
 * pointer in the device's allocation granularity, so all of a model's weights together waste less
 * than one granule. Buffers are 256-byte aligned and live until the arena is freed.
 *
 * The driver functions come through cudaGetDriverEntryPointByVersion (no link to libcuda); a
 * driver or device without virtual memory management makes tuna_cuda_arena_new answer
 * TUNA_E_UNSUPPORTED, and the caller allocates buffer by buffer as before.
 */
#ifndef TUNA_BACKEND_CUDA_ARENA_H
#define TUNA_BACKEND_CUDA_ARENA_H

#include <stdbool.h>
#include <stddef.h>

#include "tuna.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tuna_cuda_arena tuna_cuda_arena;

/* Reserves `reserve` bytes of address space on device (0 = the device's total memory). */
tuna_status tuna_cuda_arena_new(int device, size_t reserve, tuna_cuda_arena **out);
/* A 256-byte aligned buffer of `bytes`, mapping more memory when needed (TUNA_E_OOM when the
 * device has none left or the reservation is full). */
tuna_status tuna_cuda_arena_alloc(tuna_cuda_arena *a, size_t bytes, void **out);
/* Whether p points into the arena's buffers. */
bool tuna_cuda_arena_contains(const tuna_cuda_arena *a, const void *p);
/* Bytes handed out (alignment included) and bytes of device memory mapped. */
size_t tuna_cuda_arena_used(const tuna_cuda_arena *a);
size_t tuna_cuda_arena_mapped(const tuna_cuda_arena *a);
/* Unmaps and releases everything; the caller has synchronized the work that reads it. */
void tuna_cuda_arena_free(tuna_cuda_arena *a); /* accepts NULL */

#ifdef __cplusplus
}
#endif
#endif
