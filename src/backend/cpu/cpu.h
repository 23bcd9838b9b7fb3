/* cpu.h — the CPU backend: the reference implementation of the op table in backend/backend.h.
 *
 * Compute is float32. Weights stay in their stored dtype (bf16/f16/f32) and are converted in
 * tiles inside the matmul; big GEMMs go to OpenBLAS sgemm, which is kept single-threaded and
 * called from tuna's own thread pool (one level of parallelism, no oversubscription).
 */
#ifndef TUNA_BACKEND_CPU_H
#define TUNA_BACKEND_CPU_H

#include "backend/backend.h"

/* Head dims above this are refused by the model loader (attention keeps one head on the stack). */
#define TUNA_CPU_MAX_HEAD_DIM 1024

/* n_threads <= 0: the number of online CPUs. *out taken by the caller. */
tuna_status tuna_cpu_backend_new(int n_threads, tuna_backend **out);
void tuna_cpu_backend_free(tuna_backend *be); /* accepts NULL */
int tuna_cpu_backend_threads(const tuna_backend *be);

/* Prepares per-thread scratch for matmuls with up to max_k input features (tiles of weight
 * rows converted to float32). Without it (or past it) the matmul uses its tile-free path. */
tuna_status tuna_cpu_backend_reserve(tuna_backend *be, int64_t max_k);

/* Ops whose work (about multiply-adds) is below this run on the calling thread only; waking the
 * pool costs more than they do. Default TUNA_CPU_MIN_PARALLEL_WORK; tests set 0 to force the
 * threaded paths on small inputs. */
#define TUNA_CPU_MIN_PARALLEL_WORK (1 << 17)
void tuna_cpu_backend_set_min_parallel(tuna_backend *be, int64_t work);

/* The op table (static; valid forever). */
const struct tuna_backend_ops *tuna_cpu_backend_ops(void);

#endif
