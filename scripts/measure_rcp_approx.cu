/* measure_rcp_approx.cu — measures the GPU's approximate reciprocal (PTX rcp.approx.ftz.f32, what
 * `1.0f / x` compiles to under --use_fast_math, as bitsandbytes is built) for every float
 * mantissa, and writes the table src/quant/rcp_approx.c embeds: one signed byte per mantissa
 * i in [0, 2^23), the GPU's result for x = 1 + i/2^23 minus the correctly rounded 1/x, in units
 * in the last place (-1, 0 or +1). It also checks that the result for x * 2^e is the table's
 * value scaled by 2^-e for exponents across the normal range (so one table covers all inputs).
 *
 *   nvcc -O3 --use_fast_math -arch=sm_90 -o measure_rcp_approx scripts/measure_rcp_approx.cu
 *   ./measure_rcp_approx table.bin && gzip -9n table.bin   # -> src/quant/rcp_approx_delta.bin.gz
 */
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda_runtime.h>

__global__ void k_rcp(uint32_t *out, int n, float scale)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float_as_uint(1.0f / (__uint_as_float(0x3f800000u | (uint32_t)i) * scale));
}

static float bits_f(uint32_t b)
{
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static uint32_t f_bits(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT.bin\n", argv[0]);
        return 2;
    }
    const int n = 1 << 23;
    uint32_t *d, *h = (uint32_t *)malloc(n * 4ull), *h2 = (uint32_t *)malloc(n * 4ull);
    signed char *delta = (signed char *)malloc(n);
    if (cudaMalloc(&d, n * 4ull) != cudaSuccess || !h || !h2 || !delta) return 1;
    k_rcp<<<(n + 255) / 256, 256>>>(d, n, 1.0f);
    cudaMemcpy(h, d, n * 4ull, cudaMemcpyDeviceToHost);
    long hist[3] = {0, 0, 0}, bad = 0;
    for (int i = 0; i < n; i++) {
        float cr = (float)(1.0 / (double)bits_f(0x3f800000u | (uint32_t)i));
        long dd = (long)h[i] - (long)f_bits(cr);
        if (dd < -1 || dd > 1) bad++;
        delta[i] = (signed char)(dd < -1 ? -1 : dd > 1 ? 1 : dd);
        hist[delta[i] + 1]++;
    }
    printf("ulp differences from the correctly rounded reciprocal: -1: %ld, 0: %ld, +1: %ld, beyond: %ld\n",
           hist[0], hist[1], hist[2], bad);
    int exps[] = {-125, -100, -40, -7, -1, 1, 7, 40, 100, 125};
    long scale_bad = 0;
    for (int e : exps) {
        k_rcp<<<(n + 255) / 256, 256>>>(d, n, bits_f((uint32_t)(127 + e) << 23));
        cudaMemcpy(h2, d, n * 4ull, cudaMemcpyDeviceToHost);
        for (int i = 0; i < n; i++) {
            uint32_t want = h[i] - ((uint32_t)e << 23); /* exponent field minus e */
            if ((int)((h[i] >> 23) & 255) - e <= 0) want = 0; /* a subnormal result is flushed */
            if (h2[i] != want) scale_bad++;
        }
    }
    printf("results at exponents -125..125 that are not the table scaled: %ld\n", scale_bad);
    FILE *f = fopen(argv[1], "wb");
    if (!f || fwrite(delta, 1, n, f) != (size_t)n || fclose(f) != 0) return 1;
    return bad || scale_bad ? 1 : 0;
}
