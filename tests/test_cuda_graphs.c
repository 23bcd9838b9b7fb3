/* test_cuda_graphs.c — decode steps replayed as CUDA graphs give exactly the logits of the same
 * steps run op by op: models/pymini on the GPU (bf16 and float32), three sequences decoded
 * together for 24 greedy steps with graphs on (checked to be captured and launched) and off,
 * every step's logits compared bit for bit; then a batch that changes size every step and a
 * second KV cache (new buffers: new keys, never a stale graph). With LoRA adapters attached:
 * two different mixes of adapters per sequence (switched in the middle of one decode) replayed
 * from the same captured graph, then a detach and an attach of another set (a new key: a new
 * capture, never the old views), each bit for bit against eager steps; eager steps with the LoRA
 * shrink in the lora call (default), before the GEMMs or on a second stream, bit for bit equal.
 * Skips without a GPU. */
#include "testutil.h"

#include <string.h>

#include "lora/lora.h"
#include "serve/bench.h"
#include "backend/cuda/cuda.h"
#include "backend/cuda/device.h"
#include "model/batch.h"
#include "model/kv_cache.h"
#include "model/model.h"

enum { NSEQ = 3, STEPS = 24 };

/* The first index of the largest of x[0..V). */
static int32_t row_argmax(const float *x, int64_t V)
{
    int64_t best = 0;
    for (int64_t v = 1; v < V; v++)
        if (x[v] > x[best]) best = v;
    return (int32_t)best;
}

/* Prefills three prompts, then decodes; with `shrink` the batch drops a sequence every few steps.
 * Writes every step's logits (all rows) to out[step][row][V]. Each step feeds every sequence the
 * argmax of its last logits, or with `force` the token force[step][row] (another run's, from
 * `fed`): a run with other roundings then sees the same tokens, so its logits differ from that
 * run's by the roundings only, not by a greedy choice flipped at a near tie (pymini's margins are
 * small). `fed` (optional) gets the tokens fed, fed[step][row]. */
static void run_mix_forced(struct tuna_model *m, tuna_kv_cache *kv_given, bool shrink, const int32_t *mix,
                           const int32_t *mix2, const int32_t *force, int32_t *fed, float *out)
{
    const int64_t V = m->arch.vocab_size;
    tuna_kv_cache *kv = kv_given;
    if (!kv) TT_OK(tuna_model_kv_new(m, 1024, 16, &kv));
    struct tuna_batch b;
    tuna_batch_init(&b);
    int32_t seq[NSEQ], next[NSEQ];
    int64_t len[NSEQ];
    float *lg = malloc((size_t)(NSEQ * V) * sizeof(float));
    assert_non_null(lg);
    for (int i = 0; i < NSEQ; i++) {
        TT_OK(tuna_kv_seq_new(kv, &seq[i]));
        int32_t prompt[40];
        len[i] = 5 + 13 * i;
        for (int64_t j = 0; j < len[i]; j++) prompt[j] = (int32_t)((j * 37 + i * 101 + 7) % (V - 1)) + 1;
        tuna_batch_clear(&b);
        TT_OK(tuna_batch_add_seq(&b, prompt, len[i], seq[i], 0, false, true));
        if (mix) tuna_lora_batch_use(&b, seq[i], mix[i]);
        TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
        next[i] = row_argmax(lg, V);
    }
    for (int s = 0; s < STEPS; s++) {
        int n = shrink ? NSEQ - (s / 8) % NSEQ : NSEQ;
        tuna_batch_clear(&b);
        for (int i = 0; i < n; i++) {
            if (force) next[i] = force[s * NSEQ + i];
            if (fed) fed[s * NSEQ + i] = next[i];
            TT_OK(tuna_batch_add(&b, next[i], seq[i], len[i], true));
            if (mix) tuna_lora_batch_use(&b, seq[i], s < STEPS / 2 || !mix2 ? mix[i] : mix2[i]);
        }
        TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
        memset(out + (size_t)s * NSEQ * V, 0, (size_t)(NSEQ * V) * sizeof(float));
        memcpy(out + (size_t)s * NSEQ * V, lg, (size_t)(n * V) * sizeof(float));
        for (int i = 0; i < n; i++) {
            len[i]++;
            next[i] = row_argmax(lg + i * V, V);
        }
    }
    free(lg);
    tuna_batch_free(&b);
    for (int i = 0; i < NSEQ; i++) tuna_kv_seq_free(kv, seq[i]);
    if (!kv_given) tuna_kv_free(kv);
}

static void run_mix(struct tuna_model *m, tuna_kv_cache *kv_given, bool shrink, const int32_t *mix, const int32_t *mix2,
                    float *out)
{
    run_mix_forced(m, kv_given, shrink, mix, mix2, NULL, NULL, out);
}

static void run(struct tuna_model *m, bool shrink, float *out) { run_mix(m, NULL, shrink, NULL, NULL, out); }

/* Rows of logits [rows][V] whose argmax differs between a and b. */
static int argmax_flips(const float *a, const float *b, size_t rows, int64_t V)
{
    int flips = 0;
    for (size_t r = 0; r < rows; r++) flips += row_argmax(a + r * (size_t)V, V) != row_argmax(b + r * (size_t)V, V);
    return flips;
}

/* Runs the mix with graphs on, then off; fails unless every logit has the same bits. Returns
 * the graph counters' change of the run with graphs (captured, launched, discarded) and (fed,
 * optional) the tokens the run without graphs fed. */
static void compare_mix(struct tuna_model *m, tuna_kv_cache *kv, const int32_t *mix, const int32_t *mix2, float *with,
                        float *without, size_t n, long d[3], int32_t *fed)
{
    long before[3], after[3];
    tuna_cuda_graph_stats(m->be, before);
    tuna_cuda_set_graphs(m->be, true);
    run_mix(m, kv, false, mix, mix2, with);
    tuna_cuda_graph_stats(m->be, after);
    tuna_cuda_set_graphs(m->be, false);
    run_mix_forced(m, kv, false, mix, mix2, NULL, fed, without);
    tuna_cuda_set_graphs(m->be, true);
    for (int i = 0; i < 3; i++) d[i] = after[i] - before[i];
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += memcmp(&with[i], &without[i], sizeof(float)) != 0;
    if (bad) fail_msg("adapters %d/%d/%d then %d/%d/%d: %zu of %zu logits differ between graph replay and eager steps",
                      mix[0], mix[1], mix[2], mix2[0], mix2[1], mix2[2], bad, n);
}

static void check_lora(enum tuna_dtype dt)
{
    if (tuna_cuda_device_count() == 0) {
        fprintf(stderr, "SKIP: no CUDA device on this machine\n");
        skip();
    }
    struct tuna_model_opts o = {.threads = 1, .device = TUNA_DEVICE_CUDA, .quiet = true, .gpu_dtype = dt};
    struct tuna_model *m = NULL;
    TT_OK(tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &o, &m));
    const size_t n = (size_t)STEPS * NSEQ * (size_t)m->arch.vocab_size;
    float *with = malloc(n * sizeof(float)), *without = malloc(n * sizeof(float)), *first = malloc(n * sizeof(float));
    assert_non_null(with);
    assert_non_null(without);
    assert_non_null(first);
    struct tuna_lora_adapter *ads[4];
    TT_OK(tuna_serve_bench_make_adapters(m, 3, 8, 11, ads));
    TT_OK(tuna_serve_bench_make_adapters(m, 1, 16, 12, ads + 3));
    const struct tuna_lora_adapter *set1[3] = {ads[0], ads[1], ads[2]}, *set2[3] = {ads[3], ads[0], ads[2]};
    tuna_lora_attachment *att = NULL;
    TT_OK(tuna_lora_attach(m, set1, 3, &att));
    tuna_kv_cache *kv = NULL; /* one cache for every run: the same buffers, the same graph keys */
    TT_OK(tuna_model_kv_new(m, 1024, 16, &kv));
    static const int32_t mix_a[NSEQ] = {0, 1, -1}, mix_b[NSEQ] = {2, 0, 1};
    /* one run: adapters 0/1/none, then from the middle of the decode 2/0/1; the step's key does
     * not depend on the mix, so the graph captured under the first mix replays the second */
    long d[3];
    int32_t fed[STEPS * NSEQ];
    compare_mix(m, kv, mix_a, mix_b, with, without, n, d, fed);
    printf("  %s, adapters 0/1/- then 2/0/1: %ld graphs captured, %ld launched, %ld discarded\n", tuna_dtype_name(dt),
           d[0], d[1], d[2]);
    assert_int_equal(d[0], 1);
    assert_true(d[1] >= STEPS - 3);
    assert_int_equal(d[2], 0);
    /* where the shrink runs changes no bit: eager steps with TUNA_LORA_BEGIN=1 (before the GEMMs,
     * on the 16-bit copy of x) and 2 (a second stream beside the GEMMs) against the eager run
     * above (the default 0: in the lora call, float32 x) */
    tuna_cuda_set_graphs(m->be, false);
    /* the segmented kernels (TUNA_LORA_DENSE=0; the default in bf16 is the dense form, lora_matmul):
     * close to the dense form (other roundings: fed the default's tokens, see run_mix_forced), and
     * their shrink placements bit-identical */
    setenv("TUNA_LORA_DENSE", "0", 1);
    float *seg = malloc(n * sizeof(float));
    assert_non_null(seg);
    run_mix_forced(m, kv, false, mix_a, mix_b, fed, NULL, seg);
    const double e = tt_rel_err(seg, without, n);
    printf("  %s: segmented vs default logits relative error %.2e (same tokens fed; %d of %d greedy choices differ)\n",
           tuna_dtype_name(dt), e, argmax_flips(seg, without, (size_t)STEPS * NSEQ, m->arch.vocab_size), STEPS * NSEQ);
    if (!(e < 5e-2)) fail_msg("%s: segmented LoRA kernels %.3g from the default", tuna_dtype_name(dt), e);
    for (int mode = 1; mode <= 2; mode++) {
        setenv("TUNA_LORA_BEGIN", mode == 1 ? "1" : "2", 1);
        run_mix_forced(m, kv, false, mix_a, mix_b, fed, NULL, first);
        unsetenv("TUNA_LORA_BEGIN");
        if (memcmp(first, seg, n * sizeof(float)) != 0)
            fail_msg("%s: logits with TUNA_LORA_BEGIN=%d differ from TUNA_LORA_BEGIN=0", tuna_dtype_name(dt), mode);
    }
    unsetenv("TUNA_LORA_DENSE");
    free(seg);
    tuna_cuda_set_graphs(m->be, true);
    /* the second half differs from a run that keeps the first mix: the replay followed the mix */
    memcpy(first, with, n * sizeof(float));
    compare_mix(m, kv, mix_a, mix_a, with, without, n, d, NULL);
    const size_t half = (size_t)(STEPS / 2) * NSEQ * (size_t)m->arch.vocab_size;
    assert_memory_equal(first, with, half * sizeof(float));
    assert_true(memcmp(first + half, with + half, (n - half) * sizeof(float)) != 0);
    memcpy(first, with, n * sizeof(float));
    /* unload, load another set: new views, a new key, a new capture, other logits */
    tuna_lora_detach(m, att);
    TT_OK(tuna_lora_attach(m, set2, 3, &att));
    compare_mix(m, kv, mix_a, mix_a, with, without, n, d, NULL);
    printf("  %s, after unload/load: %ld graphs captured, %ld launched, %ld discarded\n", tuna_dtype_name(dt), d[0],
           d[1], d[2]);
    assert_true(d[0] >= 1 && d[1] >= STEPS / 2);
    assert_int_equal(d[2], 0);
    assert_true(memcmp(first, with, n * sizeof(float)) != 0);
    tuna_lora_detach(m, att);
    tuna_kv_free(kv);
    for (int i = 0; i < 4; i++) tuna_lora_free(ads[i]);
    free(with);
    free(without);
    free(first);
    tuna_model_free(m);
}

static void test_graphs_lora_bf16(void **state)
{
    (void)state;
    check_lora(TUNA_DTYPE_BF16);
}

static void test_graphs_lora_f32(void **state)
{
    (void)state;
    check_lora(TUNA_DTYPE_F32);
}

static void check_dtype(enum tuna_dtype dt)
{
    if (tuna_cuda_device_count() == 0) {
        fprintf(stderr, "SKIP: no CUDA device on this machine\n");
        skip();
    }
    struct tuna_model_opts o = {.threads = 1, .device = TUNA_DEVICE_CUDA, .quiet = true, .gpu_dtype = dt};
    struct tuna_model *m = NULL;
    TT_OK(tuna_model_load(TUNA_SOURCE_DIR "/models/pymini", &o, &m));
    const size_t n = (size_t)STEPS * NSEQ * (size_t)m->arch.vocab_size;
    float *with = malloc(n * sizeof(float)), *without = malloc(n * sizeof(float));
    assert_non_null(with);
    assert_non_null(without);
    for (int shrink = 0; shrink < 2; shrink++) {
        long before[3], after[3];
        tuna_cuda_graph_stats(m->be, before);
        tuna_cuda_set_graphs(m->be, true);
        run(m, shrink, with);
        tuna_cuda_graph_stats(m->be, after);
        tuna_cuda_set_graphs(m->be, false);
        run(m, shrink, without);
        tuna_cuda_set_graphs(m->be, true);
        printf("  %s, %s batch: %ld graphs captured, %ld launched, %ld discarded\n", tuna_dtype_name(dt),
               shrink ? "changing" : "fixed", after[0] - before[0], after[1] - before[1], after[2] - before[2]);
        assert_true(after[1] - before[1] >= STEPS / 2); /* most decode steps replayed a graph */
        assert_int_equal(after[2] - before[2], 0);
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += memcmp(&with[i], &without[i], sizeof(float)) != 0;
        if (bad) fail_msg("%zu of %zu logits differ between graph replay and eager steps", bad, n);
    }
    free(with);
    free(without);
    tuna_model_free(m);
}

static void test_graphs_bf16(void **state)
{
    (void)state;
    check_dtype(TUNA_DTYPE_BF16);
}

static void test_graphs_f32(void **state)
{
    (void)state;
    check_dtype(TUNA_DTYPE_F32);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_graphs_bf16),
        cmocka_unit_test(test_graphs_f32),
        cmocka_unit_test(test_graphs_lora_bf16),
        cmocka_unit_test(test_graphs_lora_f32),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
