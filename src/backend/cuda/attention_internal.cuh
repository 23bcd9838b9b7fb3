/* attention_internal.cuh — what the decode (attention.cu) and prefill (attention_prefill.cu)
 * attention kernels share: the metadata of one attention call and the prefill kernel's launcher. */
#pragma once
#include <stdint.h>

#include "backend/cuda/cuda_internal.h"

#define ATT_MAX_D 256
#define PF_MIN_RUN 8 /* consecutive tokens of one sequence that go to the prefill kernel */

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
