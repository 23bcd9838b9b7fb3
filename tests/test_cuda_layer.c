/* test_cuda_layer.c — the fused decode kernels against the same steps run op by op and against the
 * CPU backend: the decode-layer kernel (backend.h's decode_layer, CUDA q4_layer.cu; off by default,
 * turned on here with TUNA_LAYER_KERNEL=1), the attention + o kernel (attention_o, attn_o.cu; off
 * by default, turned on here with TUNA_ATTN_O=1), the MLP and o + MLP kernels (TUNA_Q4_MLP,
 * TUNA_Q4_OM) and the attention with RoPE (rope_attention, attention_b1.cu; on by default, off in
 * every other case here). Small synthetic
 * Llama models with random weights quantized at load (NF4 with and without double quantization,
 * FP4), head sizes 128, 64 and 32, GQA groups of 4 and 8 query heads (and a group of 2 padded to
 * 4), contexts of one group of 16 keys, of several blocks per kv head (300 tokens) and of several
 * groups per warp (4,400 tokens). Every decode step's logits are compared; the kernel is checked to
 * run once per layer and step, and CUDA graph replays of it to give the eager steps' bits. Skips
 * without a GPU. */
#include "testutil.h"

#include <math.h>
#include <string.h>

#include "backend/cuda/cuda.h"
#include "backend/cuda/device.h"
#include "core/dtype.h"
#include "io/safetensors.h"
#include "model/batch.h"
#include "model/kv_cache.h"
#include "model/model.h"

struct synth {
    struct tuna_tensor_view v[64];
    int n;
};

static const struct tuna_tensor_view *synth_get(void *ctx, const char *name)
{
    struct synth *s = ctx;
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->v[i].name, name)) return &s->v[i];
    return NULL;
}

static uint64_t g_rng = 0x243f6a8885a308d3ull;

static void synth_add(struct synth *s, const char *name, int64_t rows, int64_t cols, float scale, float offset)
{
    assert_true(s->n < 64);
    struct tuna_tensor_view *v = &s->v[s->n++];
    memset(v, 0, sizeof *v);
    v->name = strdup(name);
    v->dtype = TUNA_DTYPE_BF16;
    v->ndim = cols ? 2 : 1;
    v->shape[0] = rows;
    v->shape[1] = cols;
    v->numel = (uint64_t)(rows * (cols ? cols : 1));
    v->nbytes = v->numel * 2;
    v->file = "<synthetic>";
    uint16_t *d = malloc(v->nbytes);
    assert_non_null(d);
    for (uint64_t i = 0; i < v->numel; i++) {
        g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
        const float u = (float)((g_rng >> 40) * 0x1.0p-24) * 2 - 1;
        d[i] = tuna_f32_to_bf16(offset + scale * u);
    }
    v->data = d;
}

static void synth_free(struct synth *s)
{
    for (int i = 0; i < s->n; i++) {
        free((void *)s->v[i].name);
        free((void *)s->v[i].data);
    }
    s->n = 0;
}

/* A 2-layer Llama with H query and Hkv kv heads of size D. */
static void make_arch(struct tuna_arch *a, int64_t H, int64_t Hkv, int64_t D, int64_t I, int64_t C)
{
    memset(a, 0, sizeof *a);
    a->family = TUNA_FAMILY_LLAMA;
    snprintf(a->model_type, sizeof a->model_type, "llama");
    snprintf(a->architecture, sizeof a->architecture, "LlamaForCausalLM (test_cuda_layer)");
    a->hidden_size = C ? C : 256;
    a->n_layers = 2;
    a->n_heads = H;
    a->n_kv_heads = Hkv;
    a->head_dim = D;
    a->intermediate_size = I ? I : 352;
    a->vocab_size = 512;
    a->max_position_embeddings = 8192;
    a->norm_eps = 1e-5;
    a->act = TUNA_ACT_SILU;
    a->dtype = TUNA_DTYPE_BF16;
    a->rope.type = TUNA_ROPE_DEFAULT;
    a->rope.theta = 10000;
    a->rope.factor = 1;
    a->rope.partial_rotary_factor = 1;
}

static void make_weights(const struct tuna_arch *a, struct synth *s)
{
    const int64_t C = a->hidden_size, HD = a->n_heads * a->head_dim, KD = a->n_kv_heads * a->head_dim;
    const int64_t I = a->intermediate_size;
    const float sc = 0.08f;
    synth_add(s, "model.embed_tokens.weight", a->vocab_size, C, 1.0f, 0);
    synth_add(s, "model.norm.weight", C, 0, 0.1f, 1.0f);
    synth_add(s, "lm_head.weight", a->vocab_size, C, sc, 0);
    for (int64_t l = 0; l < a->n_layers; l++) {
        const struct {
            const char *name;
            int64_t rows, cols;
        } t[] = {{"input_layernorm.weight", C, 0},   {"post_attention_layernorm.weight", C, 0},
                 {"self_attn.q_proj.weight", HD, C}, {"self_attn.k_proj.weight", KD, C},
                 {"self_attn.v_proj.weight", KD, C}, {"self_attn.o_proj.weight", C, HD},
                 {"mlp.gate_proj.weight", I, C},     {"mlp.up_proj.weight", I, C},
                 {"mlp.down_proj.weight", C, I}};
        for (size_t k = 0; k < sizeof t / sizeof t[0]; k++) {
            char n[128];
            snprintf(n, sizeof n, "model.layers.%lld.%s", (long long)l, t[k].name);
            synth_add(s, n, t[k].rows, t[k].cols, t[k].cols ? sc : 0.1f, t[k].cols ? 0 : 1.0f);
        }
    }
}

/* Token i of the test's sequence (prompt and decode steps alike). */
static int32_t tok(int64_t i, int64_t V)
{
    return (int32_t)((i * 7919 + 13) % V);
}

/* Prefills `prompt` tokens, then decodes `steps` tokens one step at a time (T = 1); out [steps][V]
 * gets each decode step's logits. */
static void run(struct tuna_model *m, int64_t prompt, int steps, float *out)
{
    const int64_t V = m->arch.vocab_size;
    tuna_kv_cache *kv = NULL;
    TT_OK(tuna_model_kv_new(m, prompt + steps + 16, 16, &kv));
    int32_t seq;
    TT_OK(tuna_kv_seq_new(kv, &seq));
    struct tuna_batch b;
    tuna_batch_init(&b);
    int32_t *ids = malloc((size_t)prompt * sizeof *ids);
    float *lg = malloc((size_t)V * sizeof *lg);
    assert_non_null(ids);
    assert_non_null(lg);
    for (int64_t i = 0; i < prompt; i++)
        ids[i] = tok(i, V);
    TT_OK(tuna_batch_add_seq(&b, ids, prompt, seq, 0, false, true));
    TT_OK(tuna_model_forward(m, kv, &b, lg, NULL));
    for (int s = 0; s < steps; s++) {
        tuna_batch_clear(&b);
        TT_OK(tuna_batch_add(&b, tok(prompt + s, V), seq, prompt + s, true));
        TT_OK(tuna_model_forward(m, kv, &b, out + (size_t)s * V, NULL));
    }
    free(ids);
    free(lg);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
}

/* A fused kernel's case: env switches it (TUNA_LAYER_KERNEL, TUNA_ATTN_O, TUNA_Q4_MLP, TUNA_Q4_OM,
 * TUNA_ATTN_ROPE or TUNA_WARM: "1" on,
 * "0" the ops), launches counts its launches in this process; the other fused kernels stay off. */
struct layer_case {
    const char *what;
    int64_t H, Hkv, D;
    bool fp4, no_dq;
    const char *gm; /* TUNA_LAYER_GM: force the 8-head instantiation */
    int64_t prompts[3];
    const char *env;
    long (*launches)(void);
    int64_t I;     /* intermediate size (0: 352) */
    bool not_last; /* launched in every layer but the last (the MLP kernel) */
    int64_t C;     /* hidden size (0: 256) */
    bool exact;    /* the logits must equal the ops' to the bit */
};

static void check(const struct layer_case *c)
{
    struct tuna_arch a;
    make_arch(&a, c->H, c->Hkv, c->D, c->I, c->C);
    struct synth s = {.n = 0};
    make_weights(&a, &s);
    struct tuna_model_opts o = {.threads = 1,
                                .device = TUNA_DEVICE_CUDA,
                                .quiet = true,
                                .load_in_4bit = true,
                                .quant_fp4 = c->fp4,
                                .no_double_quant = c->no_dq};
    struct tuna_model *m = NULL, *cpu = NULL;
    TT_OK(tuna_model_build(&a, synth_get, &s, &o, &m));
    o.device = TUNA_DEVICE_CPU;
    TT_OK(tuna_model_build(&a, synth_get, &s, &o, &cpu));
    if (c->gm) setenv("TUNA_LAYER_GM", c->gm, 1);
    setenv("TUNA_LAYER_KERNEL", "0", 1); /* both fused kernels off, then this case's one on */
    setenv("TUNA_ATTN_O", "0", 1);
    setenv("TUNA_Q4_MLP", "0", 1);
    setenv("TUNA_Q4_OM", "0", 1);
    setenv("TUNA_ATTN_ROPE", "0", 1);
    enum { STEPS = 6 };
    const long want = STEPS * (a.n_layers - (c->not_last ? 1 : 0));
    const int64_t V = a.vocab_size;
    const size_t n = (size_t)STEPS * (size_t)V;
    float *on = malloc(n * 4), *off = malloc(n * 4), *graph = malloc(n * 4), *ref = malloc(n * 4);
    assert_non_null(on);
    assert_non_null(off);
    assert_non_null(graph);
    assert_non_null(ref);
    for (int k = 0; k < 3 && c->prompts[k]; k++) {
        const int64_t P = c->prompts[k];
        tuna_cuda_set_graphs(m->be, false);
        setenv(c->env, "1", 1);
        const long l0 = c->launches();
        run(m, P, STEPS, on);
        const long launched = c->launches() - l0;
        setenv(c->env, "0", 1);
        run(m, P, STEPS, off);
        const long off_launched = c->launches() - l0 - launched;
        setenv(c->env, "1", 1);
        tuna_cuda_set_graphs(m->be, true);
        run(m, P, STEPS, graph);
        run(cpu, P, STEPS, ref);
        const double e_ops = tt_rel_err(on, off, n), e_cpu = tt_rel_err(on, ref, n),
                     e_ops_cpu = tt_rel_err(off, ref, n);
        size_t gbad = 0;
        for (size_t i = 0; i < n; i++)
            gbad += memcmp(&on[i], &graph[i], 4) != 0;
        printf("  %s, context %lld: %ld launches; logits vs the ops %.2e, vs the CPU %.2e (the ops vs the CPU "
               "%.2e); graph replays: %zu of %zu differ\n",
               c->what, (long long)P, launched, e_ops, e_cpu, e_ops_cpu, gbad, n);
        if (launched != want || off_launched != 0)
            fail_msg("%s: %ld launches (%ld with %s=0), want %ld (one per layer and step%s)", c->what, launched,
                     off_launched, c->env, want, c->not_last ? ", but the last layer" : "");
        /* the GEMVs stage x as scaled f16: an attention output that differs in its last float32
         * bits (another summation order) can round an element to the neighbouring f16 (~5e-4
         * relative), measured 3e-7 .. 2.7e-4 over these cases */
        if (c->exact && e_ops != 0.0)
            fail_msg("%s, context %lld: %.3g from the ops, want the same bits", c->what, (long long)P, e_ops);
        if (!(e_ops < 2e-3))
            fail_msg("%s, context %lld: the fused kernel %.3g from the ops", c->what, (long long)P, e_ops);
        if (!(e_cpu < 4.0 * e_ops_cpu + 1e-4))
            fail_msg("%s, context %lld: the fused kernel %.3g from the CPU, the ops %.3g", c->what, (long long)P, e_cpu,
                     e_ops_cpu);
        if (gbad) fail_msg("%s: graph replays differ from eager steps", c->what);
    }
    unsetenv("TUNA_LAYER_GM");
    unsetenv("TUNA_LAYER_KERNEL");
    unsetenv("TUNA_ATTN_O");
    unsetenv("TUNA_Q4_MLP");
    unsetenv("TUNA_Q4_OM");
    unsetenv("TUNA_ATTN_ROPE");
    unsetenv("TUNA_WARM");
    free(on);
    free(off);
    free(graph);
    free(ref);
    tuna_model_free(m);
    tuna_model_free(cpu);
    synth_free(&s);
}

static bool have_gpu(void)
{
    if (tuna_cuda_device_count() > 0) return true;
    fprintf(stderr, "SKIP: no CUDA device on this machine\n");
    return false;
}

/* The cases, one test each. The attention + o kernel's (attn_o.cu): RoPE, the KV store, attention
 * and a 4-bit o in one launch per layer and decode step, against TUNA_ATTN_O=0 (k_rope_kv,
 * k_attn_b1 and the o GEMV); its attention is k_attn_b1's arithmetic (where the clusters are the
 * same size) and its KV rows k_rope_kv's, while o's sums go in another order, so the logits agree to
 * float32 rounding carried through the layers. The FP4 case's K = 3,584 has 56 scales per row, so a
 * block's scales start off 16-byte boundaries. */
#define LAYER "TUNA_LAYER_KERNEL", tuna_cuda_q4_layer_launches, 0, false, 0, false
#define ATTN_O "TUNA_ATTN_O", tuna_cuda_attn_o_launches, 0, false, 0, false
/* The MLP kernel's (q4_mlp.cu, experimental): gate/up, the GLU and down in one launch per layer but
 * the last, down's sums added in fixed point by clusters of 2 or 4 blocks, each over its own columns
 * of down, against TUNA_Q4_MLP=0 (k_q4_h4 twice). I = 352: one unit of 32 columns per cluster, so one
 * lane per row of down; 2,816 and 4,160: 2-3 units per cluster of 2 on 132 SMs (run again with
 * TUNA_Q4_MLP_CS=4 in the environment for clusters of 4). */
#define MLP "TUNA_Q4_MLP", tuna_cuda_q4_mlp_launches
/* The o + MLP kernel's (q4_om.cu): o, gate/up with the GLU, down and (in layer 0) layer 1's q/k/v in
 * one persistent launch per layer, its weights streamed through shared-memory rings ahead of its
 * phases, against TUNA_Q4_OM=0 (k_q4_h4 per projection). Its products and staging are k_q4_h4's, so
 * the logits agreed to the bit on the H100 (0.00e+00); every K a multiple of 2,048 (its steps). */
#define OM "TUNA_Q4_OM", tuna_cuda_q4_om_launches
/* The batch-1 attention with RoPE and the KV store (attention_b1.cu, on by default below 768 tokens; backend.h's
 * rope_attention): one launch per layer and step instead of k_rope_kv and k_attn_b1, against
 * TUNA_ATTN_ROPE=0. The same float operations on every value (k_rope_kv's rotation, k_attn_b1's
 * attention and merge order), so the logits must be the same bits. */
#define ROPE "TUNA_ATTN_ROPE", tuna_cuda_attn_rope_launches, 0, false, 0, true
/* The L2 warm (l2_warm.cu, on by default; backend.h's warm_l2): a kernel on a second stream per layer
 * and step that only prefetches o's and gate/up's weights, against TUNA_WARM=0. Nothing it does
 * reaches a result, so the logits must be the same bits; graph replays (the second stream forked
 * and joined inside the capture) must equal the eager steps. */
#define WARM "TUNA_WARM", tuna_cuda_warm_launches, 0, false, 0, true
static const struct layer_case k_cases[] = {
    {"NF4 dq, D 128, 8/2 heads", 8, 2, 128, false, false, NULL, {5, 300, 4400}, LAYER},
    {"NF4, D 64, 16/2 heads", 16, 2, 64, false, true, NULL, {40, 300, 0}, LAYER},
    {"FP4 dq, D 32, 8/4 heads", 8, 4, 32, true, false, NULL, {17, 300, 0}, LAYER},
    {"NF4 dq, D 128, 4/4 heads in groups of 8", 4, 4, 128, false, false, "8", {33, 0, 0}, LAYER},
    {"attention + o, NF4 dq, D 128, 32/8 heads (Llama-3-8B's)", 32, 8, 128, false, false, NULL, {5, 300, 2100}, ATTN_O},
    {"attention + o, NF4, D 64, 16/2 heads", 16, 2, 64, false, true, NULL, {40, 300, 0}, ATTN_O},
    {"attention + o, FP4 dq, D 128, 28/4 heads (groups of 7)", 28, 4, 128, true, false, NULL, {17, 1000, 0}, ATTN_O},
    {"MLP, NF4 dq, I 352", 8, 2, 32, false, false, NULL, {5, 70, 0}, MLP, 352, true, 0, false},
    {"MLP, NF4, I 2816", 8, 2, 32, false, true, NULL, {9, 0, 0}, MLP, 2816, true, 0, false},
    {"MLP, FP4 dq, I 4160", 8, 4, 32, true, false, NULL, {17, 0, 0}, MLP, 4160, true, 0, false},
    {"o + MLP, NF4 dq, C 2048, I 4096, 16/4 heads", 16, 4, 128, false, false, NULL, {5, 300, 0}, OM, 4096, false, 2048, false},
    {"o + MLP, NF4, C 2048, I 6144, 32/8 heads of 64", 32, 8, 64, false, true, NULL, {9, 0, 0}, OM, 6144, false, 2048, false},
    {"o + MLP, FP4 dq, C 4096, I 2048, 32/8 heads", 32, 8, 128, true, false, NULL, {17, 0, 0}, OM, 2048, false, 4096, false},
    {"attention with RoPE, NF4 dq, D 128, 32/8 heads", 32, 8, 128, false, false, NULL, {5, 300, 2100}, ROPE},
    {"attention with RoPE, NF4, D 64, 16/2 heads", 16, 2, 64, false, true, NULL, {40, 300, 0}, ROPE},
    {"attention with RoPE, FP4 dq, D 128, 28/4 heads (groups of 7)", 28, 4, 128, true, false, NULL, {17, 1000, 0}, ROPE},
    {"L2 warm, NF4 dq, D 128, 32/8 heads", 32, 8, 128, false, false, NULL, {5, 300, 0}, WARM},
    {"L2 warm, FP4, D 64, 16/2 heads, I 2816", 16, 2, 64, true, true, NULL, {40, 0, 0}, "TUNA_WARM", tuna_cuda_warm_launches, 2816, false, 0, true},
};

static void test_case(void **state)
{
    if (!have_gpu()) skip();
    check((const struct layer_case *)*state);
}

/* The switch by context length (TUNA_ATTN_ROPE and TUNA_WARM unset): the RoPE form and the L2 warm
 * for positions below 768 (one launch each per layer and step), neither above; and a graph-replayed
 * run across the switch (positions 764-771: the step captured again past it, forward.c's key) gives
 * the eager run's bits. */
static void test_switch_by_context(void **state)
{
    (void)state;
    if (!have_gpu()) skip();
    struct tuna_arch a;
    make_arch(&a, 32, 8, 128, 0, 0);
    struct synth s = {.n = 0};
    make_weights(&a, &s);
    struct tuna_model_opts o = {.threads = 1, .device = TUNA_DEVICE_CUDA, .quiet = true, .load_in_4bit = true};
    struct tuna_model *m = NULL;
    TT_OK(tuna_model_build(&a, synth_get, &s, &o, &m));
    unsetenv("TUNA_ATTN_ROPE");
    unsetenv("TUNA_WARM");
    enum { STEPS = 8 };
    const size_t n = (size_t)STEPS * (size_t)a.vocab_size;
    float *eager = malloc(n * 4), *graph = malloc(n * 4);
    assert_non_null(eager);
    assert_non_null(graph);
    tuna_cuda_set_graphs(m->be, false);
    const int64_t prompts[2] = {5, 800};
    for (int k = 0; k < 2; k++) {
        const long r0 = tuna_cuda_attn_rope_launches(), w0 = tuna_cuda_warm_launches();
        run(m, prompts[k], STEPS, eager);
        const long r = tuna_cuda_attn_rope_launches() - r0, w = tuna_cuda_warm_launches() - w0;
        const long want = prompts[k] < 768 ? STEPS * a.n_layers : 0;
        printf("  context %lld: %ld RoPE-form launches, %ld warm launches (want %ld each)\n", (long long)prompts[k], r,
               w, want);
        if (r != want || w != want)
            fail_msg("context %lld: %ld RoPE-form and %ld warm launches, want %ld each", (long long)prompts[k], r, w,
                     want);
    }
    run(m, 764, STEPS, eager);
    tuna_cuda_set_graphs(m->be, true);
    run(m, 764, STEPS, graph);
    size_t gbad = 0;
    for (size_t i = 0; i < n; i++)
        gbad += memcmp(&eager[i], &graph[i], 4) != 0;
    printf("  across the switch (positions 764-771): graph replays %zu of %zu differ\n", gbad, n);
    if (gbad) fail_msg("across the switch: %zu of %zu logits of graph replays differ from eager steps", gbad, n);
    free(eager);
    free(graph);
    tuna_model_free(m);
    synth_free(&s);
}

int main(void)
{
    enum { N = sizeof k_cases / sizeof k_cases[0] };
    struct CMUnitTest tests[N + 1];
    /* TUNA_TEST_FILTER=text: only the cases whose name holds it (the GPU machine's short runs) */
    const char *only = getenv("TUNA_TEST_FILTER");
    int n = 0;
    for (int i = 0; i < N; i++) {
        if (only && *only && !strstr(k_cases[i].what, only)) continue;
        memset(&tests[n], 0, sizeof tests[n]);
        tests[n].name = k_cases[i].what;
        tests[n].test_func = test_case;
        tests[n].initial_state = (void *)&k_cases[i];
        n++;
    }
    static const char k_switch[] = "the RoPE form and the L2 warm by context length";
    if (!(only && *only) || strstr(k_switch, only)) {
        memset(&tests[n], 0, sizeof tests[n]);
        tests[n].name = k_switch;
        tests[n].test_func = test_switch_by_context;
        n++;
    }
    return _cmocka_run_group_tests("test_cuda_layer", tests, (size_t)n, NULL, NULL);
}
