/* rcp_approx.c — see rcp_approx.h. The gzip blob is linked in with the assembler's .incbin
 * (path given by CMake as TUNA_RCP_BLOB), so the single binary needs no data file. */
#include "quant/rcp_approx.h"

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "core/status.h"

#ifndef TUNA_RCP_BLOB
#error "TUNA_RCP_BLOB must name src/quant/rcp_approx_delta.bin.gz (set by src/quant/CMakeLists.txt)"
#endif

__asm__(".section .rodata\n"
        ".balign 16\n"
        "tuna_rcp_blob_begin:\n"
        ".incbin \"" TUNA_RCP_BLOB "\"\n"
        "tuna_rcp_blob_end:\n"
        ".previous\n");
extern const unsigned char tuna_rcp_blob_begin[], tuna_rcp_blob_end[];

#define RCP_N (1u << 23)

static uint8_t *g_tab; /* [RCP_N / 4] 2-bit codes: ulp difference + 1 */
static tuna_status g_status = TUNA_OK;
static char g_msg[256];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void load(void)
{
    signed char *raw = malloc(RCP_N);
    uint8_t *tab = calloc(RCP_N / 4, 1);
    if (!raw || !tab) {
        free(raw);
        free(tab);
        g_status = TUNA_E_OOM;
        snprintf(g_msg, sizeof g_msg, "rcp_approx: cannot allocate the reciprocal table (10 MiB)");
        return;
    }
    z_stream z;
    memset(&z, 0, sizeof z);
    z.next_in = (Bytef *)(uintptr_t)tuna_rcp_blob_begin;
    z.avail_in = (uInt)(tuna_rcp_blob_end - tuna_rcp_blob_begin);
    z.next_out = (Bytef *)raw;
    z.avail_out = RCP_N;
    int rc = inflateInit2(&z, 16 + MAX_WBITS); /* gzip wrapper */
    if (rc == Z_OK) rc = inflate(&z, Z_FINISH);
    size_t got = RCP_N - z.avail_out;
    inflateEnd(&z);
    bool ok = rc == Z_STREAM_END && got == RCP_N;
    for (uint32_t i = 0; ok && i < RCP_N; i++) {
        if (raw[i] < -1 || raw[i] > 1) ok = false;
        else tab[i >> 2] |= (uint8_t)((raw[i] + 1) << ((i & 3) * 2));
    }
    free(raw);
    if (!ok) {
        free(tab);
        g_status = TUNA_E_INTERNAL;
        snprintf(g_msg, sizeof g_msg,
                 "rcp_approx: the embedded reciprocal table is damaged (zlib status %d, %zu of %u entries); "
                 "rebuild tuna from a clean checkout",
                 rc, got, RCP_N);
        return;
    }
    g_tab = tab;
}

tuna_status tuna_rcp_approx_init(void)
{
    pthread_once(&g_once, load);
    if (g_status != TUNA_OK) return tuna_fail(g_status, "%s", g_msg);
    return TUNA_OK;
}

float tuna_rcp_approx(float x)
{
    pthread_once(&g_once, load);
    uint32_t b;
    memcpy(&b, &x, 4);
    uint32_t sign = b & 0x80000000u, ex = (b >> 23) & 255u, man = b & 0x7fffffu;
    if (ex == 255) return man ? x : (sign ? -0.0f : 0.0f); /* NaN stays; 1/inf = 0 */
    if (ex == 0) return sign ? -INFINITY : INFINITY;      /* zero and subnormals (ftz) */
    if (!g_tab) return 1.0f / x;                          /* table not loadable: init reported it */
    uint32_t mb = 0x3f800000u | man;
    float m;
    memcpy(&m, &mb, 4);
    float cr = (float)(1.0 / (double)m); /* correctly rounded 1/m, m in [1, 2) */
    uint32_t rb;
    memcpy(&rb, &cr, 4);
    rb = (uint32_t)((int32_t)rb + (int32_t)((g_tab[man >> 2] >> ((man & 3) * 2)) & 3) - 1);
    /* 1/x = (1/m) * 2^-(ex-127): subtract from the result's exponent, flushing subnormals */
    int rex = (int)((rb >> 23) & 255u) - ((int)ex - 127);
    if (rex <= 0) return sign ? -0.0f : 0.0f;
    rb = (rb & 0x807fffffu) | ((uint32_t)rex << 23) | sign;
    float r;
    memcpy(&r, &rb, 4);
    return r;
}
