/* dtype.c — dtype names, sizes and scalar conversions (IEEE half, bfloat16, float8). */
#include "dtype.h"

#include <math.h>
#include <string.h>

static const struct {
    enum tuna_dtype t;
    const char *name;
    int bits;
} k_types[] = {
    {TUNA_DTYPE_F64, "F64", 64},         {TUNA_DTYPE_F32, "F32", 32},
    {TUNA_DTYPE_F16, "F16", 16},         {TUNA_DTYPE_BF16, "BF16", 16},
    {TUNA_DTYPE_I64, "I64", 64},         {TUNA_DTYPE_I32, "I32", 32},
    {TUNA_DTYPE_I16, "I16", 16},         {TUNA_DTYPE_I8, "I8", 8},
    {TUNA_DTYPE_U64, "U64", 64},         {TUNA_DTYPE_U32, "U32", 32},
    {TUNA_DTYPE_U16, "U16", 16},         {TUNA_DTYPE_U8, "U8", 8},
    {TUNA_DTYPE_BOOL, "BOOL", 8},        {TUNA_DTYPE_F8_E4M3, "F8_E4M3", 8},
    {TUNA_DTYPE_F8_E5M2, "F8_E5M2", 8},  {TUNA_DTYPE_NF4, "NF4", 4},
    {TUNA_DTYPE_FP4, "FP4", 4},
};

#define N_TYPES (sizeof k_types / sizeof k_types[0])

int tuna_dtype_bits(enum tuna_dtype t)
{
    for (size_t i = 0; i < N_TYPES; i++)
        if (k_types[i].t == t) return k_types[i].bits;
    return 0;
}

const char *tuna_dtype_name(enum tuna_dtype t)
{
    for (size_t i = 0; i < N_TYPES; i++)
        if (k_types[i].t == t) return k_types[i].name;
    return "INVALID";
}

enum tuna_dtype tuna_dtype_from_name(const char *name)
{
    if (!name) return TUNA_DTYPE_INVALID;
    for (size_t i = 0; i < N_TYPES; i++) {
        /* NF4/FP4 are not file dtypes */
        if (k_types[i].t == TUNA_DTYPE_NF4 || k_types[i].t == TUNA_DTYPE_FP4) continue;
        if (strcmp(k_types[i].name, name) == 0) return k_types[i].t;
    }
    return TUNA_DTYPE_INVALID;
}

enum tuna_dtype tuna_dtype_from_torch(const char *name)
{
    if (!name) return TUNA_DTYPE_INVALID;
    if (strncmp(name, "torch.", 6) == 0) name += 6;
    if (!strcmp(name, "bfloat16")) return TUNA_DTYPE_BF16;
    if (!strcmp(name, "float16") || !strcmp(name, "half")) return TUNA_DTYPE_F16;
    if (!strcmp(name, "float32") || !strcmp(name, "float")) return TUNA_DTYPE_F32;
    if (!strcmp(name, "float64") || !strcmp(name, "double")) return TUNA_DTYPE_F64;
    if (!strcmp(name, "float8_e4m3fn")) return TUNA_DTYPE_F8_E4M3;
    if (!strcmp(name, "float8_e5m2")) return TUNA_DTYPE_F8_E5M2;
    if (!strcmp(name, "uint8")) return TUNA_DTYPE_U8;
    if (!strcmp(name, "int8")) return TUNA_DTYPE_I8;
    return TUNA_DTYPE_INVALID;
}

const char *tuna_dtype_torch_name(enum tuna_dtype t)
{
    switch (t) {
    case TUNA_DTYPE_BF16: return "bfloat16";
    case TUNA_DTYPE_F16: return "float16";
    case TUNA_DTYPE_F32: return "float32";
    case TUNA_DTYPE_F64: return "float64";
    case TUNA_DTYPE_F8_E4M3: return "float8_e4m3fn";
    case TUNA_DTYPE_F8_E5M2: return "float8_e5m2";
    default: return NULL;
    }
}

bool tuna_dtype_is_float(enum tuna_dtype t)
{
    return t == TUNA_DTYPE_F64 || t == TUNA_DTYPE_F32 || t == TUNA_DTYPE_F16 ||
           t == TUNA_DTYPE_BF16 || t == TUNA_DTYPE_F8_E4M3 || t == TUNA_DTYPE_F8_E5M2;
}

size_t tuna_dtype_nbytes(enum tuna_dtype t, uint64_t n)
{
    return (size_t)((n * (uint64_t)tuna_dtype_bits(t) + 7) / 8);
}

static float bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

float tuna_bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

uint16_t tuna_f32_to_bf16(float f)
{
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float tuna_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
    return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t tuna_f32_to_f16(float f)
{
    uint32_t u = f32_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
    if (a < 0x38800000u) {
        /* result is subnormal or zero: value / 2^-24 rounded to nearest even */
        float v = bits_to_f32(a) * 16777216.0f;
        float r = nearbyintf(v); /* default rounding mode: nearest even */
        return (uint16_t)(sign | (uint16_t)r);
    }
    uint32_t mant_odd = (a >> 13) & 1u;
    a += 0xc8000fffu + mant_odd; /* rebias exponent (-112 << 23) and round */
    return (uint16_t)(sign | (uint16_t)(a >> 13));
}

float tuna_f8e4m3_to_f32(uint8_t v)
{
    /* E4M3FN: bias 7, no infinities, S.1111.111 is NaN */
    int sign = v >> 7;
    int exp = (v >> 3) & 0xf;
    int man = v & 7;
    float r;
    if (exp == 15 && man == 7) return NAN;
    if (exp == 0) r = ldexpf((float)man, -9); /* man/8 * 2^-6 */
    else r = ldexpf(1.0f + (float)man / 8.0f, exp - 7);
    return sign ? -r : r;
}

uint8_t tuna_f32_to_f8e4m3(float f)
{
    const uint8_t sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (isnan(f)) return (uint8_t)(sign | 0x7f);
    if (a >= 464.0f) return (uint8_t)(sign | 0x7e); /* rounds past 448 (464 ties to even 448): saturate */
    if (a < 0.015625f) /* below 2^-6: subnormal, steps of 2^-9 (8 steps round up to 2^-6 = 0x08) */
        return (uint8_t)(sign | (uint8_t)nearbyintf(a * 512.0f));
    int e;
    frexpf(a, &e);          /* a = m * 2^e, m in [0.5, 1): a in [2^(e-1), 2^e) */
    e -= 1;                 /* a in [2^e, 2^(e+1)), e in [-6, 8] */
    const int qv = (int)nearbyintf(ldexpf(a, 3 - e)); /* 8..16: the significand in eighths */
    int bits = ((e + 7) << 3) + (qv - 8);
    if (bits > 0x7e) bits = 0x7e;
    return (uint8_t)(sign | bits);
}

float tuna_f8e5m2_to_f32(uint8_t v)
{
    /* E5M2 is the top byte of an IEEE half */
    return tuna_f16_to_f32((uint16_t)((uint16_t)v << 8));
}

bool tuna_convert_to_f32(enum tuna_dtype t, const void *src, float *dst, size_t n)
{
    const uint8_t *p = src;
    size_t i;
    switch (t) {
    case TUNA_DTYPE_F32: memcpy(dst, src, n * 4); return true;
    case TUNA_DTYPE_F64:
        for (i = 0; i < n; i++) { double d; memcpy(&d, p + 8 * i, 8); dst[i] = (float)d; }
        return true;
    case TUNA_DTYPE_BF16:
        for (i = 0; i < n; i++) { uint16_t h; memcpy(&h, p + 2 * i, 2); dst[i] = tuna_bf16_to_f32(h); }
        return true;
    case TUNA_DTYPE_F16:
        for (i = 0; i < n; i++) { uint16_t h; memcpy(&h, p + 2 * i, 2); dst[i] = tuna_f16_to_f32(h); }
        return true;
    case TUNA_DTYPE_F8_E4M3: for (i = 0; i < n; i++) dst[i] = tuna_f8e4m3_to_f32(p[i]); return true;
    case TUNA_DTYPE_F8_E5M2: for (i = 0; i < n; i++) dst[i] = tuna_f8e5m2_to_f32(p[i]); return true;
    case TUNA_DTYPE_I64:
        for (i = 0; i < n; i++) { int64_t x; memcpy(&x, p + 8 * i, 8); dst[i] = (float)x; }
        return true;
    case TUNA_DTYPE_I32:
        for (i = 0; i < n; i++) { int32_t x; memcpy(&x, p + 4 * i, 4); dst[i] = (float)x; }
        return true;
    case TUNA_DTYPE_I16:
        for (i = 0; i < n; i++) { int16_t x; memcpy(&x, p + 2 * i, 2); dst[i] = (float)x; }
        return true;
    case TUNA_DTYPE_I8: for (i = 0; i < n; i++) dst[i] = (float)(int8_t)p[i]; return true;
    case TUNA_DTYPE_U64:
        for (i = 0; i < n; i++) { uint64_t x; memcpy(&x, p + 8 * i, 8); dst[i] = (float)x; }
        return true;
    case TUNA_DTYPE_U32:
        for (i = 0; i < n; i++) { uint32_t x; memcpy(&x, p + 4 * i, 4); dst[i] = (float)x; }
        return true;
    case TUNA_DTYPE_U16:
        for (i = 0; i < n; i++) { uint16_t x; memcpy(&x, p + 2 * i, 2); dst[i] = (float)x; }
        return true;
    case TUNA_DTYPE_U8:
    case TUNA_DTYPE_BOOL: for (i = 0; i < n; i++) dst[i] = (float)p[i]; return true;
    default: return false;
    }
}

bool tuna_convert_from_f32(enum tuna_dtype t, const float *src, void *dst, size_t n)
{
    uint8_t *p = dst;
    size_t i;
    switch (t) {
    case TUNA_DTYPE_F32: memcpy(dst, src, n * 4); return true;
    case TUNA_DTYPE_BF16:
        for (i = 0; i < n; i++) { uint16_t h = tuna_f32_to_bf16(src[i]); memcpy(p + 2 * i, &h, 2); }
        return true;
    case TUNA_DTYPE_F16:
        for (i = 0; i < n; i++) { uint16_t h = tuna_f32_to_f16(src[i]); memcpy(p + 2 * i, &h, 2); }
        return true;
    default: return false;
    }
}
