/* quants.c — ggml block quantizers and dequantizers (Q8_0, Q4_0, Q5_0, Q4_K, Q6_K) and the
 * type table. Spec: docs/FORMATS.md §7.2.
 *
 * Bit-exactness with ggml's quantize_row_*_ref depends on doing the same float32 operations
 * in the same order (the module is compiled as ISO C11, so no fused multiply-add contraction):
 * keep every expression below in its written order when editing.
 */
#include "gguf/quants.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include "core/dtype.h"
#include "core/status.h"

static_assert(sizeof(struct tuna_block_q8_0) == 34, "q8_0 block");
static_assert(sizeof(struct tuna_block_q4_0) == 18, "q4_0 block");
static_assert(sizeof(struct tuna_block_q5_0) == 22, "q5_0 block");
static_assert(sizeof(struct tuna_block_q4_k) == 144, "q4_K block");
static_assert(sizeof(struct tuna_block_q6_k) == 210, "q6_K block");

struct type_info {
    const char *name;
    int64_t blck;
    size_t bytes;
    bool read, write;
};

static const struct type_info *info(uint32_t t)
{
    static const struct type_info tab[TUNA_GGML_TYPE_COUNT] = {
        [TUNA_GGML_F32] = {"f32", 1, 4, true, true},
        [TUNA_GGML_F16] = {"f16", 1, 2, true, true},
        [TUNA_GGML_Q4_0] = {"q4_0", 32, 18, true, true},
        [TUNA_GGML_Q4_1] = {"q4_1", 32, 20, false, false},
        [TUNA_GGML_Q5_0] = {"q5_0", 32, 22, true, true},
        [TUNA_GGML_Q5_1] = {"q5_1", 32, 24, false, false},
        [TUNA_GGML_Q8_0] = {"q8_0", 32, 34, true, true},
        [TUNA_GGML_Q8_1] = {"q8_1", 32, 36, false, false},
        [TUNA_GGML_Q2_K] = {"q2_K", 256, 84, false, false},
        [TUNA_GGML_Q3_K] = {"q3_K", 256, 110, false, false},
        [TUNA_GGML_Q4_K] = {"q4_K", 256, 144, true, true},
        [TUNA_GGML_Q5_K] = {"q5_K", 256, 176, false, false},
        [TUNA_GGML_Q6_K] = {"q6_K", 256, 210, true, true},
        [TUNA_GGML_Q8_K] = {"q8_K", 256, 292, false, false},
        [TUNA_GGML_I8] = {"i8", 1, 1, true, false},
        [TUNA_GGML_I16] = {"i16", 1, 2, true, false},
        [TUNA_GGML_I32] = {"i32", 1, 4, true, false},
        [TUNA_GGML_I64] = {"i64", 1, 8, false, false},
        [TUNA_GGML_F64] = {"f64", 1, 8, true, false},
        [TUNA_GGML_BF16] = {"bf16", 1, 2, true, true},
    };
    if (t >= TUNA_GGML_TYPE_COUNT || !tab[t].name) return NULL;
    return &tab[t];
}

const char *tuna_ggml_type_name(uint32_t type)
{
    const struct type_info *i = info(type);
    return i ? i->name : NULL;
}

bool tuna_ggml_type_size(uint32_t type, int64_t *block_elems, size_t *block_bytes)
{
    const struct type_info *i = info(type);
    if (!i) return false;
    *block_elems = i->blck;
    *block_bytes = i->bytes;
    return true;
}

bool tuna_ggml_can_read(uint32_t type)
{
    const struct type_info *i = info(type);
    return i && i->read;
}

bool tuna_ggml_can_write(uint32_t type)
{
    const struct type_info *i = info(type);
    return i && i->write;
}

size_t tuna_ggml_row_size(uint32_t type, int64_t n)
{
    const struct type_info *i = info(type);
    if (!i || n < 0 || n % i->blck) return 0;
    return (size_t)(n / i->blck) * i->bytes;
}

/* Round to nearest, ties to even, for |f| <= 2^22: adding 1.5*2^23 leaves the integer in the
 * low mantissa bits (the ggml helper's trick, so that results match it exactly). */
static inline int nearest_int(float f)
{
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* ---------------- 32-element blocks ---------------- */

static void quant_q8_0(const float *x, struct tuna_block_q8_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = tuna_f32_to_f16(d);
        for (int j = 0; j < 32; j++) y[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

/* The signed value of largest magnitude (the first one on ties). */
static float signed_max(const float *x, int n)
{
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++)
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    return max;
}

static void quant_q4_0(const float *x, struct tuna_block_q4_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += 32) {
        const float d = signed_max(x, 32) / -8;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = tuna_f32_to_f16(d);
        for (int j = 0; j < 16; j++) {
            /* x*id + 8.5 lies in [0.5, 16.5]: truncation toward zero, then clamp to 15 */
            int q0 = imin(15, (int)(x[j] * id + 8.5f));
            int q1 = imin(15, (int)(x[j + 16] * id + 8.5f));
            y[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void quant_q5_0(const float *x, struct tuna_block_q5_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += 32) {
        const float d = signed_max(x, 32) / -16;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = tuna_f32_to_f16(d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            int q0 = imin(31, (int)(x[j] * id + 16.5f));
            int q1 = imin(31, (int)(x[j + 16] * id + 16.5f));
            y[i].qs[j] = (uint8_t)((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= (uint32_t)((q0 & 0x10) >> 4) << j;
            qh |= (uint32_t)((q1 & 0x10) >> 4) << (j + 16);
        }
        for (int b = 0; b < 4; b++) y[i].qh[b] = (uint8_t)(qh >> (8 * b)); /* little-endian u32 */
    }
}

/* ---------------- Q4_K ---------------- */

/* Affine fit of n values to levels 0..nmax (x ≈ scale*L - min), searching nstep+1 candidate
 * scales around the min/max one and keeping the lowest weighted squared error. Returns scale,
 * *the_min = -min (>= 0). */
static float fit_affine(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                        uint8_t *Laux, float rmin, float rdelta, int nstep)
{
    float min = x[0], max = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; i++) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)imax(0, imin(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = diff * diff;
        best_error += w[i] * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * (x[i] - min));
            l = imax(0, imin(nmax, l));
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = diff * diff;
                cur_error += w[i] * diff;
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* 6-bit scale and min of sub-block j from the packed 12 bytes. */
static inline void k4_scale_min(int j, const uint8_t *q, uint8_t *d, uint8_t *m)
{
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void quant_q4_k(const float *x, struct tuna_block_q4_k *y, int64_t nb)
{
    uint8_t L[TUNA_QK_K], Laux[32];
    float w[32], mins[8], scales[8];
    for (int64_t i = 0; i < nb; i++, x += TUNA_QK_K) {
        memset(&y[i], 0, sizeof y[i]);
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; j++) {
            const float *xs = x + 32 * j;
            float sum_x2 = 0;
            for (int l = 0; l < 32; l++) sum_x2 += xs[l] * xs[l];
            float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(xs[l]);
            scales[j] = fit_affine(32, 15, xs, w, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; j++) {
            uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
            uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
            if (ls > 63) ls = 63;
            if (lm > 63) lm = 63;
            if (j < 4) {
                y[i].scales[j] = ls;
                y[i].scales[j + 4] = lm;
            } else {
                y[i].scales[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
                y[i].scales[j - 4] |= (uint8_t)((ls >> 4) << 6);
                y[i].scales[j] |= (uint8_t)((lm >> 4) << 6);
            }
        }
        y[i].d = tuna_f32_to_f16(max_scale / 63.f);
        y[i].dmin = tuna_f32_to_f16(max_min / 63.f);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            k4_scale_min(j, y[i].scales, &sc, &m);
            const float d = tuna_f16_to_f32(y[i].d) * sc;
            if (d == 0.0f) continue;
            const float dm = tuna_f16_to_f32(y[i].dmin) * m;
            for (int ii = 0; ii < 32; ii++) {
                int l = nearest_int((x[32 * j + ii] + dm) / d);
                L[32 * j + ii] = (uint8_t)imax(0, imin(15, l));
            }
        }
        uint8_t *q = y[i].qs;
        for (int j = 0; j < TUNA_QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; l++) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

static void dequant_q4_k(const struct tuna_block_q4_k *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q = x[i].qs;
        const float d = tuna_f16_to_f32(x[i].d);
        const float min = tuna_f16_to_f32(x[i].dmin);
        for (int j = 0, is = 0; j < TUNA_QK_K; j += 64, q += 32, is += 2) {
            uint8_t sc, m;
            k4_scale_min(is, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            k4_scale_min(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        }
    }
}

/* ---------------- Q6_K ---------------- */

#define GROUP_MAX_EPS 1e-15f

/* Symmetric fit of n values to levels -nmax..nmax-1 weighted by x² (rmse_type 1), trying 18
 * scales around -nmax/max. L gets level + nmax. Returns the scale. */
static float fit_symmetric(int n, int nmax, const float *x, int8_t *L)
{
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = imax(-nmax, imin(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * x[i]);
            l = imax(-nmax, imin(nmax - 1, l));
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + imax(-nmax, imin(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void quant_q6_k(const float *x, struct tuna_block_q6_k *y, int64_t nb)
{
    int8_t L[TUNA_QK_K];
    float scales[16];
    for (int64_t i = 0; i < nb; i++, x += TUNA_QK_K) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < 16; ib++) {
            const float scale = fit_symmetric(16, 32, x + 16 * ib, L + 16 * ib);
            scales[ib] = scale;
            const float abs_scale = fabsf(scale);
            if (abs_scale > max_abs_scale) {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }
        memset(&y[i], 0, sizeof y[i]);
        if (max_abs_scale < GROUP_MAX_EPS) continue; /* all zero, d = +0 */
        float iscale = -128.f / max_scale;
        y[i].d = tuna_f32_to_f16(1 / iscale);
        for (int ib = 0; ib < 16; ib++) y[i].scales[ib] = (int8_t)imin(127, nearest_int(iscale * scales[ib]));
        for (int j = 0; j < 16; j++) {
            float d = tuna_f16_to_f32(y[i].d) * y[i].scales[j];
            if (d == 0.0f) continue;
            for (int ii = 0; ii < 16; ii++) {
                int l = nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = (int8_t)(imax(-32, imin(31, l)) + 32);
            }
        }
        uint8_t *ql = y[i].ql, *qh = y[i].qh;
        for (int j = 0; j < TUNA_QK_K; j += 128, ql += 64, qh += 32)
            for (int l = 0; l < 32; l++) {
                const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
                const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
                ql[l] = (uint8_t)(q1 | (q3 << 4));
                ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                  ((L[j + l + 96] >> 4) << 6));
            }
    }
}

static void dequant_q6_k(const struct tuna_block_q6_k *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++) {
        const float d = tuna_f16_to_f32(x[i].d);
        const uint8_t *ql = x[i].ql, *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int n = 0; n < TUNA_QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8)
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
    }
}

/* ---------------- entry points ---------------- */

tuna_status tuna_ggml_quantize(uint32_t type, const float *x, void *dst, int64_t n)
{
    const struct type_info *ti = info(type);
    if (!ti || !ti->write)
        return tuna_fail(TUNA_E_UNSUPPORTED, "tuna cannot write ggml type %u (%s): supported are f32, f16, bf16, "
                         "q8_0, q4_0, q5_0, q4_K, q6_K", type, ti ? ti->name : "unknown");
    if (n < 0 || n % ti->blck)
        return tuna_fail(TUNA_E_INVALID, "%lld values are not a whole number of %s blocks (%lld each)", (long long)n,
                         ti->name, (long long)ti->blck);
    int64_t nb = n / ti->blck;
    switch (type) {
    case TUNA_GGML_F32: memcpy(dst, x, (size_t)n * 4); break;
    case TUNA_GGML_F16: tuna_convert_from_f32(TUNA_DTYPE_F16, x, dst, (size_t)n); break;
    case TUNA_GGML_BF16: tuna_convert_from_f32(TUNA_DTYPE_BF16, x, dst, (size_t)n); break;
    case TUNA_GGML_Q8_0: quant_q8_0(x, dst, nb); break;
    case TUNA_GGML_Q4_0: quant_q4_0(x, dst, nb); break;
    case TUNA_GGML_Q5_0: quant_q5_0(x, dst, nb); break;
    case TUNA_GGML_Q4_K: quant_q4_k(x, dst, nb); break;
    case TUNA_GGML_Q6_K: quant_q6_k(x, dst, nb); break;
    default: return tuna_fail(TUNA_E_INTERNAL, "ggml type %u marked writable without a quantizer", type);
    }
    return TUNA_OK;
}

tuna_status tuna_ggml_dequantize(uint32_t type, const void *src, float *y, int64_t n)
{
    const struct type_info *ti = info(type);
    if (!ti || !ti->read)
        return tuna_fail(TUNA_E_UNSUPPORTED, "tuna cannot read ggml type %u (%s): supported are f32, f16, bf16, "
                         "f64, i8/i16/i32, q8_0, q4_0, q5_0, q4_K, q6_K", type, ti ? ti->name : "unknown");
    if (n < 0 || n % ti->blck)
        return tuna_fail(TUNA_E_INVALID, "%lld values are not a whole number of %s blocks (%lld each)", (long long)n,
                         ti->name, (long long)ti->blck);
    int64_t nb = n / ti->blck;
    switch (type) {
    case TUNA_GGML_F32: memcpy(y, src, (size_t)n * 4); break;
    case TUNA_GGML_F16: tuna_convert_to_f32(TUNA_DTYPE_F16, src, y, (size_t)n); break;
    case TUNA_GGML_BF16: tuna_convert_to_f32(TUNA_DTYPE_BF16, src, y, (size_t)n); break;
    case TUNA_GGML_F64: tuna_convert_to_f32(TUNA_DTYPE_F64, src, y, (size_t)n); break;
    case TUNA_GGML_I8: tuna_convert_to_f32(TUNA_DTYPE_I8, src, y, (size_t)n); break;
    case TUNA_GGML_I16: tuna_convert_to_f32(TUNA_DTYPE_I16, src, y, (size_t)n); break;
    case TUNA_GGML_I32: tuna_convert_to_f32(TUNA_DTYPE_I32, src, y, (size_t)n); break;
    case TUNA_GGML_Q8_0: {
        const struct tuna_block_q8_0 *b = src;
        for (int64_t i = 0; i < nb; i++) {
            const float d = tuna_f16_to_f32(b[i].d);
            for (int j = 0; j < 32; j++) y[i * 32 + j] = b[i].qs[j] * d;
        }
        break;
    }
    case TUNA_GGML_Q4_0: {
        const struct tuna_block_q4_0 *b = src;
        for (int64_t i = 0; i < nb; i++) {
            const float d = tuna_f16_to_f32(b[i].d);
            for (int j = 0; j < 16; j++) {
                y[i * 32 + j] = ((b[i].qs[j] & 0x0F) - 8) * d;
                y[i * 32 + j + 16] = ((b[i].qs[j] >> 4) - 8) * d;
            }
        }
        break;
    }
    case TUNA_GGML_Q5_0: {
        const struct tuna_block_q5_0 *b = src;
        for (int64_t i = 0; i < nb; i++) {
            const float d = tuna_f16_to_f32(b[i].d);
            uint32_t qh = (uint32_t)b[i].qh[0] | (uint32_t)b[i].qh[1] << 8 | (uint32_t)b[i].qh[2] << 16 |
                          (uint32_t)b[i].qh[3] << 24;
            for (int j = 0; j < 16; j++) {
                int h0 = (int)((qh >> j) << 4) & 0x10, h1 = (int)(qh >> (j + 12)) & 0x10;
                y[i * 32 + j] = (((b[i].qs[j] & 0x0F) | h0) - 16) * d;
                y[i * 32 + j + 16] = (((b[i].qs[j] >> 4) | h1) - 16) * d;
            }
        }
        break;
    }
    case TUNA_GGML_Q4_K: dequant_q4_k(src, y, nb); break;
    case TUNA_GGML_Q6_K: dequant_q6_k(src, y, nb); break;
    default: return tuna_fail(TUNA_E_INTERNAL, "ggml type %u marked readable without a dequantizer", type);
    }
    return TUNA_OK;
}
