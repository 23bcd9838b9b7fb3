/* test_cuda_device.c — src/backend/cuda/device.cu: discovery works with and without a GPU. */
#include "testutil.h"

#include "backend/cuda/device.h"

static void test_devices(void **state)
{
    (void)state;
    int n = tuna_cuda_device_count();
    struct tuna_cuda_device_info info;
    TT_FAILS(tuna_cuda_device_query(n, &info), TUNA_E_NOT_FOUND, "does not exist");
    if (n == 0) {
        fprintf(stderr, "SKIP: no CUDA device on this machine\n");
        skip();
    }
    TT_OK(tuna_cuda_device_query(0, &info));
    assert_true(info.cc_major >= 7);
    assert_true(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
    assert_true(info.name[0] != '\0');
    printf("device 0: %s, compute capability %d.%d, %zu MiB\n", info.name, info.cc_major, info.cc_minor,
           info.total_bytes >> 20);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_devices)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
