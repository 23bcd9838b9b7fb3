/* quants.h — ggml tensor types: ids as GGUF stores them, block layouts, and the reference
 * quantizers and dequantizers for the types tuna writes and reads.
 *
 * Spec: docs/FORMATS.md §7.2 (ggml-common.h block layouts). The quantizers reproduce ggml's
 * reference functions (quantize_row_*_ref) bit for bit: the same float operations in the same
 * order, fp16 scales rounded to nearest even. tests/test_gguf_quants.c checks this against
 * vectors produced by ggml itself (tests/data/gguf/quant_ref.bin).
 */
#ifndef TUNA_GGUF_QUANTS_H
#define TUNA_GGUF_QUANTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tuna.h"

/* ggml_type ids (the numbers GGUF tensor infos hold). */
enum tuna_ggml_type {
    TUNA_GGML_F32 = 0,
    TUNA_GGML_F16 = 1,
    TUNA_GGML_Q4_0 = 2,
    TUNA_GGML_Q4_1 = 3,
    TUNA_GGML_Q5_0 = 6,
    TUNA_GGML_Q5_1 = 7,
    TUNA_GGML_Q8_0 = 8,
    TUNA_GGML_Q8_1 = 9,
    TUNA_GGML_Q2_K = 10,
    TUNA_GGML_Q3_K = 11,
    TUNA_GGML_Q4_K = 12,
    TUNA_GGML_Q5_K = 13,
    TUNA_GGML_Q6_K = 14,
    TUNA_GGML_Q8_K = 15,
    TUNA_GGML_I8 = 24,
    TUNA_GGML_I16 = 25,
    TUNA_GGML_I32 = 26,
    TUNA_GGML_I64 = 27,
    TUNA_GGML_F64 = 28,
    TUNA_GGML_BF16 = 30,
    TUNA_GGML_TYPE_COUNT = 40 /* ids at or above this are refused */
};

#define TUNA_QK_32 32
#define TUNA_QK_K 256

/* Block layouts (ggml-common.h); fp16 fields are raw IEEE half bits. */
struct tuna_block_q8_0 {
    uint16_t d;
    int8_t qs[32];
};
struct tuna_block_q4_0 {
    uint16_t d;
    uint8_t qs[16]; /* low nibble: element j, high nibble: element j+16 */
};
struct tuna_block_q5_0 {
    uint16_t d;
    uint8_t qh[4]; /* bit j: 5th bit of element j */
    uint8_t qs[16];
};
struct tuna_block_q4_k {
    uint16_t d, dmin;
    uint8_t scales[12]; /* 8 scales and 8 mins, 6 bits each */
    uint8_t qs[128];
};
struct tuna_block_q6_k {
    uint8_t ql[128];
    uint8_t qh[64];
    int8_t scales[16];
    uint16_t d;
};

/* Name ("q4_K", "f16", ...) of a type id, or NULL when tuna does not know it. */
const char *tuna_ggml_type_name(uint32_t type);
/* Elements per block (1 for plain types) and bytes per block; false for unknown types. */
bool tuna_ggml_type_size(uint32_t type, int64_t *block_elems, size_t *block_bytes);
/* True when tuna can dequantize (read) this type. */
bool tuna_ggml_can_read(uint32_t type);
/* True when tuna can quantize (write) this type from float32. */
bool tuna_ggml_can_write(uint32_t type);

/* Bytes of a row of n elements; 0 when n is not a multiple of the block size or the type is
 * unknown (callers check divisibility before). */
size_t tuna_ggml_row_size(uint32_t type, int64_t n);

/* Quantizes n float32 values (a whole number of blocks) into dst, exactly as ggml's reference.
 * Types: F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K. TUNA_E_UNSUPPORTED otherwise,
 * TUNA_E_INVALID when n is not a multiple of the block size. */
tuna_status tuna_ggml_quantize(uint32_t type, const float *x, void *dst, int64_t n);

/* Dequantizes n values (a whole number of blocks) of src to float32.
 * Types: F32, F16, BF16, F64, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K, I8/I16/I32. */
tuna_status tuna_ggml_dequantize(uint32_t type, const void *src, float *y, int64_t n);

#endif
