/* cuda.h — the CUDA backend: the op table of backend/backend.h on an NVIDIA GPU.
 *
 * Pointer convention (differs from the CPU backend only in where memory lives):
 * - every float tensor argument (x, y, q, kcache, ...) and every weight's data are DEVICE
 *   pointers, allocated with tuna_cuda_alloc or uploaded with tuna_cuda_upload;
 * - small integer metadata (token ids, positions, KV slots, block tables) are HOST pointers, as
 *   the model prepares them: the backend copies them into its own device staging buffers.
 * Ops are queued on the backend's stream; tuna_cuda_sync waits for them. A failed CUDA or cuBLAS
 * call makes the backend unusable ("sticky"): every later op is skipped and tuna_cuda_status
 * returns TUNA_E_CUDA with the first failure (call and message), so the engine stops instead of
 * computing on garbage.
 *
 * Compute: float32 activations; matmuls with bf16/f16 weights take a fused GEMV kernel for small
 * T (decode: reads each weight once, accumulates in float32) and cuBLAS for larger T (activations
 * rounded to the weight's 16-bit type, float32 accumulation). F32 weights use cuBLAS SGEMM with
 * TF32 off, so the fp32 mode reproduces the CPU reference to ~1e-6.
 */
#ifndef TUNA_BACKEND_CUDA_H
#define TUNA_BACKEND_CUDA_H

#include <stddef.h>

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Starts a backend on device `device` (stream + cuBLAS handle). *out taken by the caller. */
tuna_status tuna_cuda_backend_new(int device, tuna_backend **out);
void tuna_cuda_backend_free(tuna_backend *be); /* accepts NULL */

/* The backend's CUDA stream (a cudaStream_t), on which every op runs: for benchmarks and tools
 * that order their own work against the backend's with events. */
void *tuna_cuda_backend_stream(tuna_backend *be);

/* The op table (static; valid forever). */
const struct tuna_backend_ops *tuna_cuda_backend_ops(void);

/* First failure since the backend started, or TUNA_OK. */
tuna_status tuna_cuda_status(tuna_backend *be);

/* Device memory. alloc: bytes of device memory in *out (NULL on failure, with the status). */
tuna_status tuna_cuda_alloc(tuna_backend *be, size_t bytes, void **out);
void tuna_cuda_free(tuna_backend *be, void *p);
/* Synchronous copies host → device and device → host. */
tuna_status tuna_cuda_upload(tuna_backend *be, void *dst_dev, const void *src_host, size_t bytes);
tuna_status tuna_cuda_download(tuna_backend *be, void *dst_host, const void *src_dev, size_t bytes);
/* rows of width bytes, host rows spitch apart, into device rows dpitch apart (backend.h upload_2d) */
tuna_status tuna_cuda_upload_2d(tuna_backend *be, void *dst_dev, size_t dpitch, const void *src_host, size_t spitch,
                                size_t width, size_t rows);
/* Waits for all queued ops; returns the sticky status. */
tuna_status tuna_cuda_sync(tuna_backend *be);

/* A bitsandbytes 4-bit weight on the GPU (struct tuna_weight with dtype NF4/FP4: data = the
 * packed codes in device memory, two per byte, first element in the high nibble, row-major over
 * the flattened [N, K] weight; q4 = this host-side descriptor). */
struct tuna_cuda_q4 {
    const float *absmax;         /* device: [ceil(N*K / blocksize)] float32 scales; NULL: the nested form below */
    int blocksize;
    int round_mode;              /* dequantized values rounded like bitsandbytes: 0 none, 1 bf16, 2 f16 */
    enum tuna_dtype prefill;     /* dtype the weight is dequantized to for T > TUNA_CUDA_GEMV_MAX_T */
    float lut[16];               /* value of each nibble (before x absmax) */
    /* Double-quantized scales (bitsandbytes compress_statistics), read only when absmax is NULL:
     * absmax[b] = nested_code[qabsmax[b]] * nested_absmax[b >> nested_shift] + nested_offset, a
     * float32 multiply then a float32 add (no fused multiply-add), as tuna_q4_undo_double_quant
     * computes it on the CPU: bit-identical scales at a quarter of the bytes. */
    const uint8_t *qabsmax;      /* device [n_blocks] */
    const float *nested_absmax;  /* device [ceil(n_blocks / 2^nested_shift)] */
    const float *nested_code;    /* device [256] */
    float nested_offset;
    int nested_shift;            /* log2 of the nested blocksize (256 in every bitsandbytes file) */
};

/* Dequantizes the 4-bit weight w (dtype NF4/FP4, w->q4 a struct tuna_cuda_q4) into the device
 * buffer out [rows * cols] of its descriptor's prefill dtype (float32, bf16 or f16; values
 * rounded like bitsandbytes for the checkpoint's dtype): what a prefill GEMM multiplies by. Queued
 * on the backend's stream; returns the sticky status. */
tuna_status tuna_cuda_q4_dequantize(tuna_backend *be, const struct tuna_weight *w, void *out);
/* Launches of the batch-1 4-bit stream kernel (q4_stream.cu, TUNA_Q4_K=5) in this process, for
 * tests; -1 when be's device cannot run it (compute capability below 9.0). */
long tuna_cuda_q4_stream_launches(tuna_backend *be);
/* Launches of k_q4_h4 (q4_h4.cu, TUNA_Q4_K=8) in this process, for tests. */
long tuna_cuda_q4_h4_launches(void);
/* Launches of k_q4_r (q4_ring.cu, TUNA_Q4_RING=1) in this process, for tests; -1 when be's device
 * cannot run it (compute capability below 9.0). */
long tuna_cuda_q4_r_launches(tuna_backend *be);
/* Launches of k_q4_mm (q4_mm.cu) in this process, for tests. */
long tuna_cuda_q4_mm_launches(void);
/* Of those, launches of its wgmma form k_q4_wg (TUNA_Q4_WG=1 on an sm_90a build and a 9.0 GPU). */
long tuna_cuda_q4_wg_launches(void);
/* The most tokens the 4-bit GEMM k_q4_mm takes (TUNA_Q4_MM_MAXT, default 128; 0: never); above,
 * a 4-bit matmul dequantizes the weight for cuBLAS. */
int tuna_cuda_q4_mm_max_t(void);
/* Launches of k_q4_sk (q4_sk.cu, TUNA_Q4_K=7) in this process, for tests. */
long tuna_cuda_q4_sk_launches(void);
/* Launches of k_q4_tc (q4_tc.cu, TUNA_Q4_K=9) in this process, for tests. */
long tuna_cuda_q4_tc_launches(void);
/* Tokens per launch of k_q4_tc for K and T tokens on be's device (8 where their x fits in shared
 * memory, else 4, or T when fewer); 0 when the kernel does not take such a job. */
int tuna_cuda_q4_tc_tokens(tuna_backend *be, int64_t K, int64_t T);
/* The most tokens k_q4_tc takes (in launches of up to 8; TUNA_Q4_TC_MAXT, default 8: k_q4_mm above). */
int tuna_cuda_q4_tc_max_t(void);
/* The most tokens the fused 4-bit decode GEMVs take: TUNA_CUDA_GEMV_MAX_T, or k_q4_tc's limit where
 * it is higher; more take the dequantize + GEMM path. */
int tuna_cuda_q4_gemv_max_t(void);
/* Launches of the decode-layer kernel (q4_layer.cu) in this process, for tests. */
long tuna_cuda_q4_layer_launches(void);
/* Launches of the batch-1 attention with RoPE and the KV store (attention_b1.cu; TUNA_ATTN_ROPE=0 turns
 * it off) in this process, for tests. */
long tuna_cuda_attn_rope_launches(void);
/* Launches of the L2 warm kernel (l2_warm.cu, backend.h's warm_l2; TUNA_WARM=0 turns it off) in this
 * process, for tests. */
long tuna_cuda_warm_launches(void);
/* Launches of the attention + o kernel (attn_o.cu) in this process, for tests. */
long tuna_cuda_attn_o_launches(void);
/* Launches of k_q4_mlp (q4_mlp.cu: the 4-bit MLP of one token; TUNA_Q4_MLP=0 turns it off) in this
 * process, for tests. */
long tuna_cuda_q4_mlp_launches(void);
/* Launches of k_q4_om (q4_om.cu: o and the 4-bit MLP of one token in one persistent kernel) in this
 * process, for tests. */
long tuna_cuda_q4_om_launches(void);

/* Small-T threshold of 4-bit weights: T <= this use the fused dequant-GEMV kernel. */
#define TUNA_CUDA_GEMV_MAX_T 8
/* The same for 16-bit weights (the GEMV kernels; cuBLAS above): measured on an H200, a bf16
 * GEMV of 8 tokens is slower than cuBLAS (docs/PERFORMANCE.md). TUNA_GEMV_MAX_T=n (1..8)
 * overrides it, for benchmarks. */
int tuna_cuda_gemv_max_t16(void);

/* CUDA graphs of decode steps (graph.cu): on by default (TUNA_CUDA_GRAPHS=0 turns them off for a
 * process); per backend for tests and benchmarks. stats: captured, launched, discarded. */
void tuna_cuda_set_graphs(tuna_backend *be, bool on);
void tuna_cuda_graph_stats(const tuna_backend *be, long stats[3]);

#ifdef __cplusplus
}
#endif
#endif
