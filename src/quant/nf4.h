/* nf4.h — bitsandbytes 4-bit quantization (NF4 and FP4), bit-exact with bitsandbytes' CUDA
 * kernels: blockwise quantize, dequantize, and double quantization of the block scales.
 *
 * Spec: docs/FORMATS.md §1 (design/FORMATS.md). Layout of a quantized [rows, cols] weight:
 *   codes   [(rows*cols + 1) / 2] bytes over the flattened row-major matrix, the element with
 *           the even index in the HIGH nibble; blocks of `blocksize` consecutive elements
 *           (a block may straddle rows);
 *   absmax  [n_blocks] float32, n_blocks = ceil(rows*cols / blocksize);
 *   or, double-quantized ("nested"): qabsmax [n_blocks] uint8 codes of the 8-bit dynamic map,
 *           nested_absmax [ceil(n_blocks / 256)] float32, nested_offset (float32 mean of the
 *           first-level absmax), and the 256-entry nested code table;
 *           absmax[b] = nested_code[qabsmax[b]] * nested_absmax[b / 256] + nested_offset.
 * Dequantization: w[i] = code[nibble(i)] * absmax[i / blocksize] in float32, then rounded to
 * the weight's original dtype (quant_state "dtype") as bitsandbytes returns it.
 *
 * bitsandbytes' CUDA build (fast math) computes 1/absmax with the GPU's approximate reciprocal,
 * which for some absmax mantissas is 1 ulp away from the IEEE reciprocal; where x * (1/absmax)
 * lands on a code threshold the code differs. tuna uses an emulation of that unit
 * (quant/rcp_approx.h), so codes, absmax, double quantization and dequantization are all
 * bit-exact with bitsandbytes, NF4 and FP4 (test_nf4: every quantize_cases fixture).
 */
#ifndef TUNA_QUANT_NF4_H
#define TUNA_QUANT_NF4_H

#include <stdbool.h>
#include <stdint.h>

#include "core/dtype.h"
#include "tuna.h"

enum tuna_q4_type { TUNA_Q4_NF4 = 0, TUNA_Q4_FP4 = 1 };

#define TUNA_Q4_NESTED_BLOCKSIZE 256

/* A 4-bit weight in bitsandbytes layout. Fill it with tuna_q4_quantize or tuna_bnb_load_weight;
 * release with tuna_q4_weight_free (which frees only what the struct owns). */
struct tuna_q4_weight {
    enum tuna_q4_type type;
    int64_t rows, cols;        /* logical shape [out, in] (quant_state "shape") */
    int64_t numel;             /* rows * cols */
    bool shape_1d;             /* quant_state "shape" was [numel] (rows = 1); else [rows, cols] */
    int blocksize;             /* elements per absmax block (64 in every transformers file) */
    int64_t n_blocks;          /* ceil(numel / blocksize) */
    enum tuna_dtype dtype;     /* original dtype (F32/BF16/F16): what dequantize rounds to */
    float code[16];            /* the 4-bit code table (quant_map), value per nibble */

    const uint8_t *codes;      /* [(numel+1)/2] packed nibbles: owned or borrowed, see below */
    float *absmax;             /* [n_blocks] float32 scales (owned; reconstructed when nested) */

    /* double quantization (nested == true), kept for byte-exact re-writing */
    bool nested;
    uint8_t *qabsmax;          /* [n_blocks] owned */
    float *nested_absmax;      /* [n_nested] owned */
    int64_t n_nested;          /* ceil(n_blocks / nested_blocksize) */
    int nested_blocksize;      /* 256 */
    float nested_offset;
    float nested_code[256];

    bool owns_codes;           /* true: codes was malloc'd here and is freed by weight_free */
};

/* The 16 code values of NF4 or FP4 (bitsandbytes get_4bit_type), index = nibble. */
const float *tuna_q4_code_table(enum tuna_q4_type t);
/* The value of each nibble before scaling by absmax, as the dequantizer (and bitsandbytes'
 * dequantize kernel) uses it: dequant = table[nibble] * absmax, rounded to the weight's dtype.
 * For FP4 this is the sign-magnitude kernel table, not the order of tuna_q4_code_table. */
void tuna_q4_dequant_table(enum tuna_q4_type t, float lut[16]);
/* "nf4" / "fp4". */
const char *tuna_q4_type_name(enum tuna_q4_type t);
/* bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): the 256-entry
 * table of the 8-bit blockwise quantizer used for the nested statistics. */
const float *tuna_q8_dynamic_map(void);

/* True for the 4-bit block sizes bitsandbytes accepts: 32, 64, ..., 4096. */
bool tuna_q4_blocksize_ok(int blocksize);

/* --- low level (flat arrays; all pointers borrowed) --- */

/* Quantizes n float32 values blockwise as kQuantizeBlockwise (NF4/FP4): packed
 * [(n+1)/2] bytes, absmax [ceil(n/blocksize)] floats. */
void tuna_q4_quantize_flat(enum tuna_q4_type t, const float *x, int64_t n, int blocksize,
                           uint8_t *packed, float *absmax);
/* 8-bit blockwise quantization with a sorted 256-entry code (bitsandbytes quantize_blockwise,
 * CUDA kernel semantics): q [n], absmax [ceil(n/blocksize)]. */
void tuna_q8_quantize_flat(const float *code256, const float *x, int64_t n, int blocksize, uint8_t *q,
                           float *absmax);
/* torch.Tensor.mean() of n float32 values with the summation order of PyTorch's CUDA reduction
 * kernel (what bitsandbytes uses for the nested offset), for a device with `num_sms`
 * multiprocessors (0 = 132, an H100/H200; only matters for very large n). */
float tuna_q4_cuda_mean(const float *x, int64_t n, int num_sms);

/* --- weights --- */

/* Quantizes a [rows, cols] matrix given as float32, bfloat16 or float16 (xdtype) the way
 * bitsandbytes quantize_4bit does (compress_statistics = double_quant), and records
 * orig_dtype as the weight's dtype (F32/BF16/F16). *out owns everything it holds. */
tuna_status tuna_q4_quantize(const void *x, enum tuna_dtype xdtype, int64_t rows, int64_t cols,
                             enum tuna_q4_type type, int blocksize, bool double_quant,
                             enum tuna_dtype orig_dtype, struct tuna_q4_weight *out);

/* Fills w->absmax from the nested state (w->qabsmax, nested_absmax, nested_code, offset). */
void tuna_q4_undo_double_quant(struct tuna_q4_weight *w);

/* Dequantizes rows [row0, row0 + nrows) into out [nrows, cols] float32, values rounded to
 * w->dtype exactly as bitsandbytes' dequantize_4bit output (then widened to float32). The fast
 * path: one 16-entry table (code × absmax) per block. */
void tuna_q4_dequantize_rows(const struct tuna_q4_weight *w, int64_t row0, int64_t nrows, float *out);
/* One row: out [cols]. */
void tuna_q4_dequantize_row(const struct tuna_q4_weight *w, int64_t row, float *out);

/* Frees what w owns and zeroes it. Accepts a zeroed struct. */
void tuna_q4_weight_free(struct tuna_q4_weight *w);

#endif
