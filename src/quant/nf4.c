/* nf4.c — bitsandbytes NF4/FP4 blockwise quantization, its double quantization, and the
 * dequantizer; a scalar reference that reproduces the CUDA kernels bit for bit.
 *
 * Follows docs/FORMATS.md §1: kQuantizeBlockwise (absmax over the valid items, x * (1/absmax) in
 * float32, the strict-greater comparison trees of dQuantizeNF4 / dQuantizeFP4, even element in
 * the high nibble), the 8-bit dQuantize binary search for the nested statistics, and the
 * dequantization LUTs of kDequantizeBlockwise. The offset of double quantization is
 * torch's CUDA mean, whose summation order is reproduced in tuna_q4_cuda_mean.
 * Owns: nothing global but two lazily built constant tables.
 */
#include "quant/nf4.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/status.h"
#include "quant/rcp_approx.h"

/* --- code tables --- */

/* nf4_dequantization_lut of the kernel == get_4bit_type("nf4"). */
static const float nf4_code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

/* Thresholds of dQuantizeNF4: the midpoints of adjacent codes; code c is chosen when
 * t[c-1] < x <= t[c] (every kernel test is a strict x > t). */
static const float nf4_thresh[15] = {
    -0.8480964004993439f,  -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,   0.2035212516784668f,  0.2920137718319893f,  0.3893125355243683f,
    0.5016634166240692f,   0.6427869200706482f,  0.8614784181118011f,
};

/* fp4_dequantization_lut of the kernel (magnitudes normalised by 12), by 3-bit code. */
static const float fp4_lut[8] = {0.0f,  0.005208333333f, 0.66666667f, 1.0f,
                                 0.33333333f, 0.5f,  0.16666667f, 0.25f};

static float fp4_code[16];
static float dyn_map[256];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

/* torch.linspace(start, end, steps) in float32 as bitsandbytes' create_dynamic_map gets it on the
 * CPU: start + step*i below steps/2 and end - step*(steps-1-i) above, each a fused multiply-add
 * (the compiler contracts torch's scalar kernel; checked against the stored maps bit for bit). */
static void linspace_f32(float start, float end, int steps, float *out)
{
    float step = (end - start) / (float)(steps - 1);
    int half = steps / 2;
    for (int i = 0; i < steps; i++) {
        if (i < half)
            out[i] = fmaf(step, (float)i, start);
        else
            out[i] = fmaf(-step, (float)(steps - i - 1), end);
    }
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void build_tables(void)
{
    /* get_4bit_type("fp4"): the list divided (float32) by its absmax 12; "-0" in the Python list
     * is the integer 0, so entry 8 is +0.0. */
    static const float raw[16] = {0, 0.0625f, 8, 12, 4, 6, 2, 3, 0, -0.0625f, -8, -12, -4, -6, -2, -3};
    for (int i = 0; i < 16; i++) fp4_code[i] = raw[i] / 12.0f;

    /* create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) */
    float data[256];
    int n = 0;
    for (int i = 0; i < 7; i++) {
        int items = (1 << i) + 1;
        float b[65];
        linspace_f32(0.1f, 1.0f, items, b);
        float scale = (float)pow(10.0, -6 + i); /* Python float 10**(i-6), cast to float32 by torch */
        for (int k = 0; k + 1 < items; k++) {
            float mean = (b[k] + b[k + 1]) / 2.0f;
            float v = (i == 6) ? mean : scale * mean;
            data[n++] = v;
            data[n++] = -v;
        }
    }
    data[n++] = 0.0f;
    data[n++] = 1.0f;
    qsort(data, (size_t)n, sizeof(float), cmp_float);
    memcpy(dyn_map, data, sizeof dyn_map);
}

static void tables_init(void) { pthread_once(&tables_once, build_tables); }

const float *tuna_q4_code_table(enum tuna_q4_type t)
{
    tables_init();
    return t == TUNA_Q4_FP4 ? fp4_code : nf4_code;
}

const char *tuna_q4_type_name(enum tuna_q4_type t) { return t == TUNA_Q4_FP4 ? "fp4" : "nf4"; }

const float *tuna_q8_dynamic_map(void)
{
    tables_init();
    return dyn_map;
}

bool tuna_q4_blocksize_ok(int blocksize)
{
    return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

/* --- one-element quantizers (kernel dQuantizeNF4 / dQuantizeFP4 / dQuantize<0>) --- */

static inline uint8_t quantize_nf4(float x)
{
    /* the comparison tree is equivalent to counting thresholds strictly below x (NaN: none) */
    uint8_t c = 0;
    for (int i = 0; i < 15; i++) c += (uint8_t)(x > nf4_thresh[i]);
    return c;
}

static inline uint8_t quantize_fp4(float x)
{
    uint8_t sign = x < 0 ? 8 : 0;
    x = fabsf(x);
    if (x > 0.29166667f) {
        if (x > 0.583333f) return (uint8_t)((x > 0.8333333f ? 3 : 2) + sign);
        return (uint8_t)((x > 0.4166667f ? 5 : 4) + sign);
    }
    if (x > 0.0859375f) return (uint8_t)((x > 0.20833333f ? 7 : 6) + sign);
    return (uint8_t)((x > 0.00260417f ? 1 : 0) + sign);
}

static uint8_t quantize_dynamic(const float *code, float x)
{
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > val) {
        float mid = (upper + val) * 0.5f;
        return (uint8_t)(x > mid ? upper_pivot : pivot);
    }
    float mid = (lower + val) * 0.5f;
    return (uint8_t)(x < mid ? lower_pivot : pivot);
}

/* max |x| as the kernel's fmaxf reduction (NaN ignored, -FLT_MAX when nothing valid) */
static float block_absmax(const float *x, int64_t n)
{
    float m = -3.40282347e38f;
    for (int64_t i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

void tuna_q4_quantize_flat(enum tuna_q4_type t, const float *x, int64_t n, int blocksize, uint8_t *packed,
                           float *absmax)
{
    int64_t nb = (n + blocksize - 1) / blocksize;
    for (int64_t b = 0; b < nb; b++) {
        int64_t i0 = b * blocksize;
        int64_t cnt = n - i0 < blocksize ? n - i0 : blocksize;
        float m = block_absmax(x + i0, cnt);
        /* padding zeros take part in the kernel's fmaxf: max(m, 0) */
        if (cnt < blocksize) m = fmaxf(m, 0.0f);
        absmax[b] = m;
        float inv = tuna_rcp_approx(m); /* as bitsandbytes' fast-math kernel */
        /* blocksize is even, so a block starts on a byte boundary */
        for (int64_t j = 0; j < cnt; j += 2) {
            float a = x[i0 + j] * inv;
            float c = (j + 1 < cnt ? x[i0 + j + 1] : 0.0f) * inv;
            uint8_t hi, lo;
            if (t == TUNA_Q4_NF4) {
                hi = quantize_nf4(a);
                lo = quantize_nf4(c);
            } else {
                hi = quantize_fp4(a);
                lo = quantize_fp4(c);
            }
            packed[(i0 + j) / 2] = (uint8_t)((hi << 4) | lo);
        }
    }
}

void tuna_q8_quantize_flat(const float *code, const float *x, int64_t n, int blocksize, uint8_t *q, float *absmax)
{
    int64_t nb = (n + blocksize - 1) / blocksize;
    for (int64_t b = 0; b < nb; b++) {
        int64_t i0 = b * blocksize;
        int64_t cnt = n - i0 < blocksize ? n - i0 : blocksize;
        float m = block_absmax(x + i0, cnt);
        if (cnt < blocksize) m = fmaxf(m, 0.0f);
        absmax[b] = m;
        float inv = tuna_rcp_approx(m); /* as bitsandbytes' fast-math kernel */
        for (int64_t j = 0; j < cnt; j++) q[i0 + j] = quantize_dynamic(code, x[i0 + j] * inv);
    }
}

/* --- torch's CUDA mean (ATen Reduce.cuh), for a contiguous 1-D float32 tensor --- */

static int last_pow2(int64_t n)
{
    int64_t p = 1;
    while (p * 2 <= n) p *= 2;
    return (int)p;
}

/* Combines the per-thread partial sums of one block as block_x_reduce does: a shared-memory
 * halving down to 32 lanes, then warp shuffles with offsets 1, 2, 4, ... (lane 0 keeps the sum). */
static float block_x_reduce(float *v, int width)
{
    int dim = width;
    if (dim > 32) {
        for (int off = dim / 2; off >= 32; off >>= 1)
            for (int t = 0; t < off; t++) v[t] = v[t] + v[t + off];
        dim = 32;
    }
    for (int off = 1; off < dim; off <<= 1)
        for (int t = 0; t + off < dim; t += 1)
            if (t % (2 * off) == 0) v[t] = v[t] + v[t + off];
    return v[0];
}

float tuna_q4_cuda_mean(const float *x, int64_t n, int num_sms)
{
    if (n <= 0) return NAN;
    if (num_sms <= 0) num_sms = 132;
    const int max_threads = 512, vec = 4, vt0 = 4;
    bool vectorize = n > 128;
    int64_t dim0 = vectorize ? n / vec : n;
    int width = dim0 < max_threads ? last_pow2(dim0) : max_threads;
    int64_t step = width; /* input_mult[0] = 1, step_input = block width */
    int64_t vpt = (n + step - 1) / step;
    int ctas = 1;
    if (vpt >= 256) { /* split across CTAs (global reduction) */
        int target = num_sms * (2048 / width);
        int64_t c1 = target, c2 = (vpt + 15) / 16, c3 = (vpt + 255) / 256;
        int64_t c = c1 < c2 ? c1 : c2;
        ctas = (int)(c > c3 ? c : c3);
    }
    int64_t cta_mult = step;
    if (ctas > 1) step *= ctas;

    float *part = malloc(sizeof(float) * (size_t)width);
    float *cta_sum = calloc((size_t)ctas, sizeof(float));
    if (!part || !cta_sum) {
        free(part);
        free(cta_sum);
        return NAN;
    }
    for (int c = 0; c < ctas; c++) {
        for (int t = 0; t < width; t++) {
            int64_t idx = t + (int64_t)c * cta_mult;
            float acc[4] = {0, 0, 0, 0};
            if (vectorize) {
                for (; idx * vec + vec - 1 < n; idx += step)
                    for (int i = 0; i < vec; i++) acc[i] = acc[i] + x[idx * vec + i];
                int64_t tail = n - n % vec + t;
                if (c == 0 && tail < n) acc[0] = acc[0] + x[tail];
            } else {
                int k = 0;
                for (; idx < n; idx += step, k++) acc[k % vt0] = acc[k % vt0] + x[idx];
            }
            part[t] = ((acc[0] + acc[1]) + acc[2]) + acc[3];
        }
        cta_sum[c] = block_x_reduce(part, width);
    }
    float sum = ctas > 1 ? 0.0f : cta_sum[0];
    if (ctas > 1) {
        for (int t = 0; t < width; t++) {
            float a = 0;
            for (int c = t; c < ctas; c += width) a = a + cta_sum[c];
            part[t] = a;
        }
        sum = block_x_reduce(part, width);
    }
    free(part);
    free(cta_sum);
    float factor = 1.0f / (float)n;
    return sum * factor;
}

/* --- weights --- */

void tuna_q4_weight_free(struct tuna_q4_weight *w)
{
    if (!w) return;
    if (w->owns_codes) free((void *)w->codes);
    free(w->absmax);
    free(w->qabsmax);
    free(w->nested_absmax);
    memset(w, 0, sizeof *w);
}

void tuna_q4_undo_double_quant(struct tuna_q4_weight *w)
{
    for (int64_t b = 0; b < w->n_blocks; b++) {
        float v = w->nested_code[w->qabsmax[b]] * w->nested_absmax[b / w->nested_blocksize];
        w->absmax[b] = v + w->nested_offset;
    }
}

/* Blocks are independent: large matrices are split over threads by whole blocks (same bytes as
 * one thread). */
struct qjob {
    enum tuna_q4_type t;
    const float *x;
    int64_t n;
    int bs;
    uint8_t *packed;
    float *absmax;
};

static void *qjob_run(void *arg)
{
    struct qjob *j = arg;
    tuna_q4_quantize_flat(j->t, j->x, j->n, j->bs, j->packed, j->absmax);
    return NULL;
}

static void quantize_parallel(enum tuna_q4_type t, const float *x, int64_t n, int bs, uint8_t *packed, float *absmax)
{
    enum { MAXT = 16 };
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int nt = n < (1 << 20) || ncpu < 2 ? 1 : (int)(ncpu < MAXT ? ncpu : MAXT);
    int64_t nb = (n + bs - 1) / bs, per = (nb + nt - 1) / nt;
    pthread_t th[MAXT];
    struct qjob jobs[MAXT];
    bool started[MAXT] = {false};
    for (int k = 0; k < nt; k++) {
        int64_t b0 = k * per, b1 = b0 + per < nb ? b0 + per : nb;
        int64_t e0 = b0 * bs, e1 = b1 * bs < n ? b1 * bs : n;
        jobs[k] = (struct qjob){t, x + e0, e1 > e0 ? e1 - e0 : 0, bs, packed + e0 / 2, absmax + b0};
        if (jobs[k].n <= 0) continue;
        started[k] = k > 0 && pthread_create(&th[k], NULL, qjob_run, &jobs[k]) == 0;
        if (!started[k]) qjob_run(&jobs[k]); /* thread 0, or no thread could be made */
    }
    for (int k = 0; k < nt; k++)
        if (started[k]) pthread_join(th[k], NULL);
}

tuna_status tuna_q4_quantize(const void *x, enum tuna_dtype xdtype, int64_t rows, int64_t cols,
                             enum tuna_q4_type type, int blocksize, bool double_quant,
                             enum tuna_dtype orig_dtype, struct tuna_q4_weight *out)
{
    memset(out, 0, sizeof *out);
    if (!tuna_q4_blocksize_ok(blocksize))
        return tuna_fail(TUNA_E_INVALID, "4-bit block size %d is not one bitsandbytes accepts (32, 64, ..., 4096)",
                         blocksize);
    if (rows <= 0 || cols <= 0 || rows > INT64_MAX / cols)
        return tuna_fail(TUNA_E_INVALID, "cannot quantize a [%lld, %lld] matrix", (long long)rows, (long long)cols);
    if (xdtype != TUNA_DTYPE_F32 && xdtype != TUNA_DTYPE_BF16 && xdtype != TUNA_DTYPE_F16)
        return tuna_fail(TUNA_E_UNSUPPORTED, "4-bit quantization takes float32, bfloat16 or float16 input, not %s",
                         tuna_dtype_name(xdtype));
    tuna_status st = tuna_rcp_approx_init();
    if (st) return st;
    int64_t n = rows * cols;
    out->type = type;
    out->rows = rows;
    out->cols = cols;
    out->numel = n;
    out->blocksize = blocksize;
    out->n_blocks = (n + blocksize - 1) / blocksize;
    out->dtype = orig_dtype;
    memcpy(out->code, tuna_q4_code_table(type), sizeof out->code);

    const float *xf = x;
    float *conv = NULL;
    if (xdtype != TUNA_DTYPE_F32) {
        conv = malloc(sizeof(float) * (size_t)n);
        if (!conv) return tuna_fail_oom("4-bit quantizer input", sizeof(float) * (size_t)n);
        tuna_convert_to_f32(xdtype, x, conv, (size_t)n);
        xf = conv;
    }
    uint8_t *codes = malloc((size_t)(n + 1) / 2);
    out->absmax = malloc(sizeof(float) * (size_t)out->n_blocks);
    out->codes = codes;
    out->owns_codes = true;
    if (!codes || !out->absmax) {
        free(conv);
        tuna_q4_weight_free(out);
        return tuna_fail_oom("4-bit codes", (size_t)(n + 1) / 2);
    }
    quantize_parallel(type, xf, n, blocksize, codes, out->absmax);
    free(conv);
    if (!double_quant) return TUNA_OK;

    /* compress_statistics: offset = absmax.mean(); 8-bit blockwise (256) of absmax - offset */
    int64_t nb = out->n_blocks;
    out->nested = true;
    out->nested_blocksize = TUNA_Q4_NESTED_BLOCKSIZE;
    out->n_nested = (nb + TUNA_Q4_NESTED_BLOCKSIZE - 1) / TUNA_Q4_NESTED_BLOCKSIZE;
    memcpy(out->nested_code, tuna_q8_dynamic_map(), sizeof out->nested_code);
    out->nested_offset = tuna_q4_cuda_mean(out->absmax, nb, 0);
    float *centred = malloc(sizeof(float) * (size_t)nb);
    out->qabsmax = malloc((size_t)nb);
    out->nested_absmax = malloc(sizeof(float) * (size_t)out->n_nested);
    if (!centred || !out->qabsmax || !out->nested_absmax) {
        free(centred);
        tuna_q4_weight_free(out);
        return tuna_fail_oom("double quantization state", sizeof(float) * (size_t)nb);
    }
    for (int64_t b = 0; b < nb; b++) centred[b] = out->absmax[b] - out->nested_offset;
    tuna_q8_quantize_flat(out->nested_code, centred, nb, TUNA_Q4_NESTED_BLOCKSIZE, out->qabsmax, out->nested_absmax);
    free(centred);
    /* what every consumer (bnb dequantize_4bit) sees from now on */
    tuna_q4_undo_double_quant(out);
    return TUNA_OK;
}

/* --- dequantization --- */

/* The kernel's per-nibble value: NF4 from its LUT, FP4 as lut[c & 7] * (±1). */
void tuna_q4_dequant_table(enum tuna_q4_type t, float lut[16])
{
    for (int c = 0; c < 16; c++)
        lut[c] = t == TUNA_Q4_NF4 ? nf4_code[c] : fp4_lut[c & 7] * ((c & 8) ? -1.0f : 1.0f);
}

static inline float round_to(enum tuna_dtype d, float v)
{
    if (d == TUNA_DTYPE_BF16) return tuna_bf16_to_f32(tuna_f32_to_bf16(v));
    if (d == TUNA_DTYPE_F16) return tuna_f16_to_f32(tuna_f32_to_f16(v));
    return v;
}

void tuna_q4_dequantize_rows(const struct tuna_q4_weight *w, int64_t row0, int64_t nrows, float *out)
{
    float lut[16], tab[16];
    tuna_q4_dequant_table(w->type, lut);
    int64_t i = row0 * w->cols, end = (row0 + nrows) * w->cols;
    const int bs = w->blocksize;
    while (i < end) {
        int64_t b = i / bs;
        int64_t bend = (b + 1) * bs < end ? (b + 1) * bs : end;
        float a = w->absmax[b];
        for (int c = 0; c < 16; c++) tab[c] = round_to(w->dtype, lut[c] * a);
        float *o = out + (i - row0 * w->cols);
        int64_t k = i;
        if (k & 1) { /* odd start: low nibble of the byte */
            *o++ = tab[w->codes[k >> 1] & 15];
            k++;
        }
        const uint8_t *p = w->codes + (k >> 1);
        for (; k + 1 < bend; k += 2, p++) {
            o[0] = tab[*p >> 4];
            o[1] = tab[*p & 15];
            o += 2;
        }
        if (k < bend) *o = tab[*p >> 4];
        i = bend;
    }
}

void tuna_q4_dequantize_row(const struct tuna_q4_weight *w, int64_t row, float *out)
{
    tuna_q4_dequantize_rows(w, row, 1, out);
}
