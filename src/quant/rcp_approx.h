/* rcp_approx.h — the GPU's approximate reciprocal, emulated bit for bit on the CPU.
 *
 * bitsandbytes is built with --use_fast_math, so its quantize kernels compute 1/absmax with PTX
 * `rcp.approx.ftz.f32` (the MUFU.RCP unit), not an IEEE division. For about one mantissa in
 * eight the result is 1 ulp away from the correctly rounded reciprocal, and a value that lands
 * on a code threshold then gets the neighbouring code. tuna reproduces the unit with a table
 * measured on an NVIDIA H200 by scripts/measure_rcp_approx.cu: one difference (-1, 0, +1 ulp)
 * per mantissa, 2^23 of them, embedded gzip-compressed (137 KB; src/quant/rcp_approx_delta.bin.gz)
 * and inflated with zlib on first use into a 2 MiB 2-bit table. The same program checked that
 * the result for x * 2^e is the table's scaled by 2^-e over the normal range, so the table
 * covers every input. With it tuna's NF4/FP4 codes equal bitsandbytes' on every fixture case.
 */
#ifndef TUNA_QUANT_RCP_APPROX_H
#define TUNA_QUANT_RCP_APPROX_H

#include "tuna.h"

/* Loads the table (once per process, thread-safe). TUNA_E_OOM or TUNA_E_INTERNAL (a damaged
 * build) with a message; tuna_rcp_approx falls back to 1.0f / x while it is not loaded. */
tuna_status tuna_rcp_approx_init(void);

/* rcp.approx.ftz.f32: ±0 and subnormal inputs give ±inf, ±inf gives ±0, NaN stays NaN, a
 * subnormal result is flushed to ±0. */
float tuna_rcp_approx(float x);

#endif
