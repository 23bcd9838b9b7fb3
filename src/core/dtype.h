/* dtype.h — element types of tensors, their names in safetensors/torch, and scalar conversions.
 *
 * The file dtypes are those of the safetensors format; NF4/FP4 are tuna's in-memory 4-bit
 * types (bitsandbytes layout: two codes per byte, first element in the high nibble).
 */
#ifndef TUNA_CORE_DTYPE_H
#define TUNA_CORE_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum tuna_dtype {
    TUNA_DTYPE_INVALID = 0,
    TUNA_DTYPE_F64,
    TUNA_DTYPE_F32,
    TUNA_DTYPE_F16,
    TUNA_DTYPE_BF16,
    TUNA_DTYPE_I64,
    TUNA_DTYPE_I32,
    TUNA_DTYPE_I16,
    TUNA_DTYPE_I8,
    TUNA_DTYPE_U64,
    TUNA_DTYPE_U32,
    TUNA_DTYPE_U16,
    TUNA_DTYPE_U8,
    TUNA_DTYPE_BOOL,
    TUNA_DTYPE_F8_E4M3,
    TUNA_DTYPE_F8_E5M2,
    TUNA_DTYPE_NF4, /* in-memory only: 4-bit codes + per-block absmax */
    TUNA_DTYPE_FP4,
    TUNA_DTYPE_COUNT
};

/* Size of one element in bits (4 for NF4/FP4), 0 for INVALID. */
int tuna_dtype_bits(enum tuna_dtype t);

/* The safetensors name ("BF16", "F8_E4M3", ...); "NF4"/"FP4" for the in-memory types. */
const char *tuna_dtype_name(enum tuna_dtype t);

/* Parses a safetensors dtype name; TUNA_DTYPE_INVALID if unknown. */
enum tuna_dtype tuna_dtype_from_name(const char *name);

/* Parses a torch dtype string as config.json writes it ("bfloat16", "float16", "float32",
 * "torch.bfloat16", "float", "half"); TUNA_DTYPE_INVALID if unknown. */
enum tuna_dtype tuna_dtype_from_torch(const char *name);

/* The torch spelling ("bfloat16", ...) for the float types, NULL for others. */
const char *tuna_dtype_torch_name(enum tuna_dtype t);

/* True for F64/F32/F16/BF16/F8*. */
bool tuna_dtype_is_float(enum tuna_dtype t);

/* Bytes taken by n elements, rounded up to whole bytes. */
size_t tuna_dtype_nbytes(enum tuna_dtype t, uint64_t n);

/* --- scalar conversions (exact where the target can represent the value) --- */
float tuna_bf16_to_f32(uint16_t h);
uint16_t tuna_f32_to_bf16(float f); /* round to nearest even, NaN kept NaN (as torch) */
float tuna_f16_to_f32(uint16_t h);
uint16_t tuna_f32_to_f16(float f); /* round to nearest even, overflow to inf */
float tuna_f8e4m3_to_f32(uint8_t v);
/* float32 to E4M3FN, round to nearest even, saturating: beyond +-448 (infinities too) gives
 * +-448, NaN gives NaN (0x7f/0xff), as CUDA's __nv_fp8_e4m3(float) (cvt.rn.satfinite). */
uint8_t tuna_f32_to_f8e4m3(float f);
float tuna_f8e5m2_to_f32(uint8_t v);

/* Converts n elements of type t at src to float32. Only float and integer types; returns false
 * for NF4/FP4/INVALID (those need their quantization state). */
bool tuna_convert_to_f32(enum tuna_dtype t, const void *src, float *dst, size_t n);

/* Converts n float32 values to dst of type t (F32, F16, BF16). Returns false otherwise. */
bool tuna_convert_from_f32(enum tuna_dtype t, const float *src, void *dst, size_t n);

#endif
