/* attention_internal.cuh — what the decode (attention.cu) and prefill (attention_prefill.cu)
 * attention kernels share: the metadata of one attention call, the prefill kernel's launcher and
 * the cp.async helpers (also q4_layer.cu's attention phase). */
#pragma once
#include <stdint.h>

#include "backend/cuda/cuda_internal.h"

#define ATT_MAX_D 256
#define PF_MIN_RUN 8 /* consecutive tokens of one sequence that go to the prefill kernel */

/* 16 bytes from global to shared memory, asynchronously (cp.async, through L2); src_bytes 0 writes
 * zeros. Used by the decode attention and the decode-layer kernel (q4_layer.cu). */
static __device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
#else
    *(uint4 *)smem = src_bytes ? __ldg((const uint4 *)gmem) : make_uint4(0, 0, 0, 0);
#endif
}
static __device__ __forceinline__ void cp_async_commit()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> static __device__ __forceinline__ void cp_async_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

/* Where token t's positions and block table are (device pointers). */
struct att_meta {
    const int64_t *pos;       /* [T] */
    const int32_t *tables;    /* block tables */
    const int32_t *table_off; /* [T] start of token t's table in `tables`, or NULL: t * table_stride */
    int32_t table_stride;
    int32_t bs;
    int64_t window;
};

static __device__ __forceinline__ const int32_t *att_table(const att_meta &m, int64_t t)
{
    return m.tables + (m.table_off ? (int64_t)m.table_off[t] : t * (int64_t)m.table_stride);
}

static __device__ __forceinline__ int64_t att_start(const att_meta &m, int64_t p)
{
    return m.window > 0 && p - m.window + 1 > 0 ? p - m.window + 1 : 0;
}


/* Largest query-tile height the prefill kernel can run for head size D and KV element size esz
 * (4, or 2 for 16-bit caches) on a device with max_smem bytes of opt-in shared memory per block
 * and compute capability cc_major; 0 when none fits (those tokens then decode). */
int tuna_cuda_attn_prefill_bq(int D, int esz, int max_smem, int cc_major);

/* Launches the prefill kernel over n_tiles tiles: tiles[2k] = first batch row of tile k,
 * tiles[2k+1] = its rows (<= BQ), consecutive positions of one sequence. code: 0 float32, 1
 * bf16, 2 f16 cache; vec: K/V rows can be read in 16-byte vectors; io: q and out float32 (0), bf16
 * (1) or f16 (2). Errors go to be->sticky. */
void tuna_cuda_attn_prefill_launch(tuna_backend *be, int code, float *out, const float *q, const void *kcache,
                                   const void *vcache, const att_meta &md, const int32_t *tiles, int64_t n_tiles,
                                   int H, int Hkv, int D, int BQ, bool vec, float scale, int io);

/* The batch-1 decode kernel (attention_b1.cu): whether it serves a 16-bit cache (code 1 bf16,
 * 2 f16) with head size D and G query heads per kv head on this device (sm_90+: clusters;
 * TUNA_ATTN_B1=0 turns it off), and its launch for the single token of md (q, out: [H][D] in
 * float32 / bf16 / f16 by io; pdl: launched with PDL after the kernel that wrote q and row p).
 * Errors go to be->sticky. */
bool tuna_cuda_attn_b1_usable(tuna_backend *be, int code, int D, int G);

/* The fused decode kernels' metadata for the single token of a (backend.h's struct
 * tuna_decode_layer): its position, block table (md), cache slot and RoPE frequencies [D / 2]
 * staged in the metadata arena. False when it could not (be->sticky set; `what` names the caller
 * in the message of a position beyond max_blocks_per_seq). */
bool tuna_cuda_decode_meta(tuna_backend *be, const struct tuna_decode_layer *a, const char *what, att_meta *md,
                           const int64_t **slot, const float **inv_freq);
/* What the batch-1 attention with RoPE needs of a decode layer (attn_o.cu, attention_b1.cu): a
 * 16-bit cache (bf16 or f16) 16-byte aligned, D 64 or 128 rotated whole, whole groups of query heads,
 * the RoPE frequencies and a batch of one token in blocks. */
bool tuna_cuda_b1_layer_fits(const struct tuna_decode_layer *a);
void tuna_cuda_attn_b1_launch(tuna_backend *be, int code, void *out, const void *q, const void *kcache,
                              const void *vcache, const att_meta &md, int H, int Hkv, int D, float scale, int io,
                              bool pdl, const struct tuna_l2pf &pf);
