/* cmd_bench.c — `tuna bench [decode|prefill] [DIR | --synthetic NAME] [--batch 1,8] [--ctx 512,4096]`:
 * prefill and decode speed of the forward pass on either backend for each batch size and prompt
 * length asked for (the model loaded once), the bytes read per decode step as GB/s, and the
 * ceilings of the machine measured in the same run: on the CPU a streaming read with the same
 * thread count, on a GPU the bf16 GEMM rate and the device copy rate (the goals are
 * fractions of them). The synthetic models have real architectures' shapes with random bf16
 * weights made in memory (no download). `tuna bench --serve ...` is the serving benchmark
 * (bench_serve.c) and `--write-synthetic DIR` writes the synthetic model as a folder
 * (bench_write.c); both share the synthetic weights made here (bench.h). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/cpu.h"
#include "backend/cpu/threadpool.h"
#include "bench.h"
#include "cli.h"
#include "core/status.h"
#include "infer_common.h"

#define BENCH_PREFILL_TOKENS 16384 /* tokens per prefill step of `tuna bench` */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* --- memory bandwidth: every thread sums its share of a large buffer --- */
struct bw_args {
    const float *buf;
    int64_t n, chunk;
    double sums[64];
};

static void bw_task(void *arg, int64_t task, int thread)
{
    struct bw_args *a = arg;
    int64_t i0 = task * a->chunk, i1 = i0 + a->chunk < a->n ? i0 + a->chunk : a->n;
    float s[8] = {0};
    for (int64_t i = i0; i + 8 <= i1; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a->buf[i + j];
    a->sums[thread & 63] += s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

static double measure_bandwidth(int threads)
{
    const int64_t n = (int64_t)1 << 28; /* 1 GiB of floats */
    float *buf = malloc(sizeof(float) * (size_t)n);
    tuna_pool *pool;
    if (!buf || tuna_pool_new(threads, &pool)) {
        free(buf);
        return 0;
    }
    for (int64_t i = 0; i < n; i++) buf[i] = (float)(i & 7);
    struct bw_args a = {buf, n, n / (threads * 8), {0}};
    double best = 0;
    for (int r = 0; r < 3; r++) {
        double t0 = now_s();
        tuna_pool_run(pool, (n + a.chunk - 1) / a.chunk, bw_task, &a);
        double gbs = (double)n * 4 / (now_s() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    tuna_pool_free(pool);
    free(buf);
    return best;
}

/* --- a synthetic Llama-3.2-1B: views over random bf16 buffers --- */
static const struct tuna_tensor_view *synth_get(void *ctx, const char *name)
{
    struct synth *s = ctx;
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->views[i].name, name)) return &s->views[i];
    return NULL;
}

static uint64_t g_state = 0x9e3779b97f4a7c15ull;
static tuna_status synth_add(struct synth *s, const char *name, int64_t rows, int64_t cols, float scale, float offset)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->views = realloc(s->views, sizeof *s->views * (size_t)s->cap);
        if (!s->views) return tuna_fail_oom("synthetic tensors", sizeof *s->views * (size_t)s->cap);
    }
    struct tuna_tensor_view *v = &s->views[s->n++];
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
    if (!d || !v->name) return tuna_fail_oom(name, v->nbytes);
    /* a pool of random values per (scale, offset), copied at rotating offsets: big synthetic models
     * (8B) fill in seconds and run exactly as fast as real weights */
    enum { POOL = 1 << 22 };
    static uint16_t pool[2][POOL];
    static bool have[2];
    int pi = cols ? 0 : 1;
    if (!have[pi]) {
        for (uint64_t i = 0; i < POOL; i++) {
            g_state ^= g_state << 13;
            g_state ^= g_state >> 7;
            g_state ^= g_state << 17;
            float u = (float)((g_state >> 40) * 0x1.0p-24) * 2 - 1;
            pool[pi][i] = tuna_f32_to_bf16(offset + scale * u);
        }
        have[pi] = true;
    }
    uint64_t off = (g_state >> 20) % POOL;
    g_state = g_state * 6364136223846793005ull + 1442695040888963407ull;
    for (uint64_t i = 0; i < v->numel;) {
        uint64_t n = v->numel - i < POOL - off ? v->numel - i : POOL - off;
        memcpy(d + i, pool[pi] + off, n * 2);
        i += n;
        off = 0;
    }
    v->data = d;
    return TUNA_OK;
}

void bench_synth_free(struct synth *s)
{
    for (int i = 0; i < s->n; i++) {
        free((void *)s->views[i].name);
        free((void *)s->views[i].data);
    }
    free(s->views);
    memset(s, 0, sizeof *s); /* freed twice (bench_synth_model's error path, then the caller's): no-op */
}

static void llama32_1b(struct tuna_arch *a)
{
    memset(a, 0, sizeof *a);
    a->family = TUNA_FAMILY_LLAMA;
    snprintf(a->model_type, sizeof a->model_type, "llama");
    snprintf(a->architecture, sizeof a->architecture, "LlamaForCausalLM (synthetic Llama-3.2-1B shapes)");
    a->hidden_size = 2048;
    a->n_layers = 16;
    a->n_heads = 32;
    a->n_kv_heads = 8;
    a->head_dim = 64;
    a->intermediate_size = 8192;
    a->vocab_size = 128256;
    a->max_position_embeddings = 131072;
    a->norm_eps = 1e-5;
    a->act = TUNA_ACT_SILU;
    a->tie_word_embeddings = true;
    a->dtype = TUNA_DTYPE_BF16;
    a->rope.type = TUNA_ROPE_LLAMA3;
    a->rope.theta = 500000;
    a->rope.factor = 32;
    a->rope.low_freq_factor = 1;
    a->rope.high_freq_factor = 4;
    a->rope.original_max_pos = 8192;
    a->rope.partial_rotary_factor = 1;
    a->bos_token_id = 128000;
}

static void llama3_8b(struct tuna_arch *a)
{
    llama32_1b(a);
    snprintf(a->architecture, sizeof a->architecture, "LlamaForCausalLM (synthetic Llama-3-8B shapes)");
    a->hidden_size = 4096;
    a->n_layers = 32;
    a->n_heads = 32;
    a->n_kv_heads = 8;
    a->head_dim = 128;
    a->intermediate_size = 14336;
    a->max_position_embeddings = 8192;
    a->tie_word_embeddings = false;
    a->rope.type = TUNA_ROPE_DEFAULT;
    a->rope.factor = 1;
}

/* Llama-2-7B: multi-head attention (32 kv heads), 32k vocabulary, plain RoPE. */
static void llama2_7b(struct tuna_arch *a)
{
    llama3_8b(a);
    snprintf(a->architecture, sizeof a->architecture, "LlamaForCausalLM (synthetic Llama-2-7B shapes)");
    a->n_kv_heads = 32;
    a->intermediate_size = 11008;
    a->vocab_size = 32000;
    a->max_position_embeddings = 4096;
    a->rope.theta = 10000;
    a->bos_token_id = 1;
}

/* Llama 3's vocabulary and layout at toy sizes: what tests write and serve in seconds. */
static void llama3_tiny(struct tuna_arch *a)
{
    llama3_8b(a);
    snprintf(a->architecture, sizeof a->architecture, "LlamaForCausalLM (synthetic tiny, Llama-3 vocabulary)");
    a->hidden_size = 64;
    a->n_layers = 2;
    a->n_heads = 4;
    a->n_kv_heads = 2;
    a->head_dim = 16;
    a->intermediate_size = 96;
    a->max_position_embeddings = 2048;
}

static tuna_status synth_build(const struct tuna_arch *a, struct synth *s)
{
    char n[128];
    const int64_t C = a->hidden_size, HD = a->n_heads * a->head_dim, KD = a->n_kv_heads * a->head_dim;
    const int64_t I = a->intermediate_size;
    const float sc = 0.02f * sqrtf(3.0f); /* uniform with std 0.02 */
    tuna_status st = synth_add(s, "model.embed_tokens.weight", a->vocab_size, C, sc, 0);
    if (!st) st = synth_add(s, "model.norm.weight", C, 0, 0.1f, 1.0f);
    if (!st && !a->tie_word_embeddings) st = synth_add(s, "lm_head.weight", a->vocab_size, C, sc, 0);
    for (int64_t l = 0; l < a->n_layers && !st; l++) {
        const struct {
            const char *name;
            int64_t rows, cols;
        } t[] = {{"input_layernorm.weight", C, 0},     {"post_attention_layernorm.weight", C, 0},
                 {"self_attn.q_proj.weight", HD, C},   {"self_attn.k_proj.weight", KD, C},
                 {"self_attn.v_proj.weight", KD, C},   {"self_attn.o_proj.weight", C, HD},
                 {"mlp.gate_proj.weight", I, C},       {"mlp.up_proj.weight", I, C},
                 {"mlp.down_proj.weight", C, I}};
        for (size_t k = 0; k < sizeof t / sizeof t[0] && !st; k++) {
            snprintf(n, sizeof n, "model.layers.%lld.%s", (long long)l, t[k].name);
            st = synth_add(s, n, t[k].rows, t[k].cols, t[k].cols ? sc : 0.1f, t[k].cols ? 0 : 1.0f);
        }
    }
    return st;
}

const char *bench_synth_canonical(const char *name)
{
    static const char *const known[] = {"llama-3.2-1b", "llama-3-8b", "llama-2-7b", "llama-3-tiny"};
    for (size_t k = 0; k < sizeof known / sizeof known[0]; k++) {
        const char *c = known[k];
        /* "llama3-8b" for "llama-3-8b": the hyphen after "llama" may be left out */
        if (!strcmp(name, c) || (!strncmp(name, "llama", 5) && !strcmp(name + 5, c + 6))) return c;
    }
    return NULL;
}

tuna_status bench_synth_make(const char *name, struct tuna_arch *a, struct synth *s)
{
    memset(s, 0, sizeof *s);
    const char *c = bench_synth_canonical(name);
    if (c) name = c;
    if (!strcmp(name, "llama-3-8b")) llama3_8b(a);
    else if (!strcmp(name, "llama-3.2-1b")) llama32_1b(a);
    else if (!strcmp(name, "llama-3-tiny")) llama3_tiny(a);
    else if (!strcmp(name, "llama-2-7b")) llama2_7b(a);
    else return tuna_fail(TUNA_E_INVALID,
                          "--synthetic knows llama-3.2-1b, llama-3-8b, llama-2-7b and llama-3-tiny (tests), not '%s'", name);
    tuna_status st = synth_build(a, s);
    if (st) bench_synth_free(s);
    return st;
}

tuna_status bench_synth_model(const char *name, const struct tuna_model_opts *o, struct synth *s, struct tuna_model **m)
{
    struct tuna_arch a;
    *m = NULL;
    tuna_status st = bench_synth_make(name, &a, s);
    if (!st) st = tuna_model_build(&a, synth_get, s, o, m);
    if (st) bench_synth_free(s);
    return st;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna bench [decode|prefill] [DIR | --synthetic llama-3.2-1b|llama-3-8b] [--prompt-len 128]\n"
               "                  [--gen 32] [--batch B] [--device cpu|cuda] [--dtype T] [--kv-cache-dtype T]\n"
               "                  [--threads N]\n\n"
               "Prefill and decode tokens/s for B sequences decoded together, weight GB/s per decode step,\n"
               "and on the CPU the machine's streaming read bandwidth with the same thread count; on a GPU the bf16\n"
               "GEMM rate and the device copy rate measured in the same run, prefill FLOP/s and decode bytes/s as\n"
               "fractions of them. Untimed warm-up steps of the prefill and decode shapes come first; decode steps\n"
               "return greedy ids (as the server's greedy steps do), not logits.\n\n"
               "  decode | prefill      report only that side (prefill alone decodes 2 steps unless --gen)\n"
               "  --batch 1,8,32,128    several batch sizes, and --ctx 512,4096 several prompt lengths (the\n"
               "                        context the decode steps read): one run each, the model loaded once,\n"
               "                        then a table; a run whose KV cache does not fit is skipped, said why\n"
               "  --dtype nf4|fp4       = --load-in-4bit [--quant-type fp4] (compute dtype auto)\n"
               "  --synthetic NAME      llama-3-8b, llama-3.2-1b, llama-2-7b, llama-3-tiny (llama3-8b works too)\n\n"
               "       tuna bench --serve [DIR | --synthetic NAME] ...   the serving engine (tuna bench --serve --help)\n"
               "       tuna bench --synthetic NAME --write-synthetic OUT  the synthetic model as a model folder\n"
               "       tuna bench train --synthetic llama-2-7b|llama-3-8b ...  LoRA/QLoRA training (tuna bench train --help)\n");
}

/* FLOPs of a prefill of n_prompts prompts of plen tokens: 2 per weight of the layers' matrices
 * per token, causal attention (QK^T and PV: 4 * H * D per key, keys 1..plen), lm_head for the
 * one row per prompt that wants logits. */
static double prefill_flops(const struct tuna_arch *a, int64_t n_prompts, int64_t plen)
{
    const double C = (double)a->hidden_size, HD = (double)(a->n_heads * a->head_dim),
                 KVD = (double)(a->n_kv_heads * a->head_dim), I = (double)a->intermediate_size;
    const double per_layer = C * HD * 2 + C * KVD * 2 + C * I * 3; /* q, o; k, v; gate, up, down */
    const double p = (double)plen;
    return (double)n_prompts * (2.0 * per_layer * (double)a->n_layers * p +
                                4.0 * HD * (double)a->n_layers * p * (p + 1) / 2 +
                                2.0 * C * (double)a->vocab_size);
}

/* Device-to-device copy rate of the backend (bytes read + written per second, the convention of
 * docs/PERFORMANCE.md's ceilings): 10 copies of 1 GiB after one warm-up. 0 on failure. */
static double copy_rate(struct tuna_model *m)
{
    const size_t n = (size_t)1 << 30;
    void *a = NULL, *b = NULL;
    double rate = 0;
    if (!m->ops->alloc(m->be, n, &a) && !m->ops->alloc(m->be, n, &b)) {
        m->ops->copy(m->be, b, a, n); /* the contents do not matter */
        if (!m->ops->sync(m->be)) {
            double t0 = now_s();
            for (int i = 0; i < 10; i++) m->ops->copy(m->be, b, a, n);
            if (!m->ops->sync(m->be)) rate = 2.0 * (double)n * 10 / (now_s() - t0);
        }
    }
    if (a) m->ops->release(m->be, a);
    if (b) m->ops->release(m->be, b);
    return rate;
}

/* One measurement: B sequences with prompts of plen tokens (prefilled, timed), then gen greedy
 * decode steps of all B together (timed). kv_bytes: K and V read per decode step at the mean
 * context. A shape whose KV cache or buffers cannot be had is reported in *skip (the return value
 * stays TUNA_OK: the model is still usable for the next shape). */
struct bench_run {
    long long batch, plen;
    double prefill_s, decode_s, kv_bytes;
    tuna_status st;
};

static tuna_status bench_one(struct tuna_model *m, struct bench_run *r, long long gen, tuna_status *skip)
{
    const int64_t V = m->arch.vocab_size, B = r->batch, plen = r->plen;
    tuna_kv_cache *kv = NULL;
    struct tuna_batch b;
    tuna_batch_init(&b);
    float *logits = malloc(sizeof(float) * (size_t)(V * B));
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)plen);
    int32_t seqs[256], out_ids[256];
    *skip = (!logits || !ids) ? tuna_fail_oom("bench buffers (logits of the batch)", (size_t)(V * B) * 4) : TUNA_OK;
    if (!*skip) *skip = tuna_model_kv_new(m, ((plen + gen) / 16 + 2) * 16 * B, 0, &kv);
    if (*skip) {
        free(logits);
        free(ids);
        tuna_batch_free(&b);
        return TUNA_OK; /* this shape does not fit; the caller reports it and goes on */
    }
    tuna_status st = TUNA_OK;
    for (int64_t s = 0; !st && s < B; s++) st = tuna_kv_seq_new(kv, &seqs[s]);
    for (int64_t i = 0; !st && i < plen; i++) ids[i] = (int32_t)((i * 7919 + 13) % V);
    /* warm-up: a step of the first timed prefill step's shape and two of the decode steps' shape,
     * on scratch sequences that are freed after, so workspace growth, kernel loading, the GEMM
     * library's first calls for these shapes and CUDA graph capture are not timed (a server
     * meets them once, at its first requests; a step's graph is captured the second time its
     * shape is seen: graph.cu) */
    int64_t per_step = 1; /* prompts per prefill step */
    while (per_step < B && (per_step + 1) * plen <= BENCH_PREFILL_TOKENS) per_step++;
    int32_t scratch[256];
    int64_t n_scratch = 0;
    if (!st) {
        tuna_batch_clear(&b);
        while (!st && n_scratch < per_step && !(st = tuna_kv_seq_new(kv, &scratch[n_scratch])))
            st = tuna_batch_add_seq(&b, ids, plen, scratch[n_scratch++], 0, false, true);
        if (!st) st = tuna_model_forward(m, kv, &b, logits, NULL);
        for (int64_t s = 0; s < n_scratch; s++) tuna_kv_seq_free(kv, scratch[s]);
        n_scratch = 0;
    }
    if (!st) {
        tuna_batch_clear(&b);
        while (!st && n_scratch < B && !(st = tuna_kv_seq_new(kv, &scratch[n_scratch]))) {
            st = tuna_batch_add(&b, (int32_t)(n_scratch % V), scratch[n_scratch], 0, true);
            n_scratch++;
        }
        if (!st) st = tuna_model_forward_greedy(m, kv, &b, out_ids);
        if (!st) { /* the same shape at the next position: the capture */
            tuna_batch_clear(&b);
            for (int64_t s = 0; !st && s < n_scratch; s++)
                st = tuna_batch_add(&b, (int32_t)((s + 1) % V), scratch[s], 1, true);
            if (!st) st = tuna_model_forward_greedy(m, kv, &b, out_ids);
        }
        for (int64_t s = 0; s < n_scratch; s++) tuna_kv_seq_free(kv, scratch[s]);
    }
    if (!st) {
        /* prefill the B prompts (logits of each last token) in steps of whole prompts of at most
         * BENCH_PREFILL_TOKENS tokens (a longer prompt alone): one step of B x plen tokens would
         * need activations for all of them (256 x 1000 tokens: tens of GB) */
        double t0 = now_s();
        for (int64_t s0 = 0; !st && s0 < B;) {
            tuna_batch_clear(&b);
            int64_t s1 = s0;
            while (!st && s1 < B && (s1 == s0 || (s1 - s0 + 1) * plen <= BENCH_PREFILL_TOKENS))
                st = tuna_batch_add_seq(&b, ids, plen, seqs[s1++], 0, false, true);
            if (!st) st = tuna_model_forward(m, kv, &b, logits + s0 * V, NULL);
            s0 = s1;
        }
        r->prefill_s = now_s() - t0;
    }
    double t0 = now_s();
    for (int64_t g = 0; !st && g < gen; g++) {
        tuna_batch_clear(&b);
        for (int64_t s = 0; !st && s < B; s++)
            st = tuna_batch_add(&b, (int32_t)((g * 31 + 7 * s + 7) % V), seqs[s], plen + g, true);
        if (!st) st = tuna_model_forward_greedy(m, kv, &b, out_ids); /* ids only, as the server's greedy steps */
    }
    r->decode_s = now_s() - t0;
    const struct tuna_arch *a = &m->arch;
    r->kv_bytes = (double)tuna_dtype_nbytes(tuna_kv_dtype(kv), 1) * 2.0 * (double)a->n_layers *
                  (double)(a->n_kv_heads * a->head_dim) * (double)B *
                  ((double)plen + (double)(gen + 1) / 2); /* K and V at the mean context */
    free(logits);
    free(ids);
    tuna_batch_free(&b);
    tuna_kv_free(kv);
    return st;
}

/* A comma-separated list of whole numbers in [lo, hi] ("1,8,32,128") into v (at most max of
 * them); the count, or 0 after a message. */
static int parse_list(const char *opt, const char *s, long long *v, int max, long long lo, long long hi)
{
    int n = 0;
    for (const char *p = s;;) {
        char *end;
        errno = 0;
        const long long x = strtoll(p, &end, 10);
        if (errno || end == p || (*end && *end != ',') || x < lo || x > hi || n == max) {
            fprintf(stderr, "tuna bench: %s wants up to %d whole numbers from %lld to %lld separated by commas, "
                            "got '%s'\n",
                    opt, max, lo, hi, s);
            return 0;
        }
        v[n++] = x;
        if (!*end) return n;
        p = end + 1;
    }
}

/* --dtype nf4 / fp4 (the spelling of `--load-in-4bit [--quant-type fp4]`): true when
 * argv[*i] was one, consumed. */
static bool opt_dtype_4bit(int argc, char **argv, int *i, struct infer_flags *fl)
{
    const char *a = argv[*i], *v = NULL;
    const bool sep = !strcmp(a, "--dtype"); /* the value is the next argument */
    if (sep && *i + 1 < argc) v = argv[*i + 1];
    else if (!strncmp(a, "--dtype=", 8)) v = a + 8;
    if (!v || (strcmp(v, "nf4") && strcmp(v, "fp4"))) return false;
    fl->model.load_in_4bit = true;
    fl->model.quant_fp4 = !strcmp(v, "fp4");
    if (sep) (*i)++;
    return true;
}

#define BENCH_MAX_LIST 16

int cmd_bench(int argc, char **argv)
{
    const char *dir = NULL, *synth_name = NULL, *batch_s = NULL, *ctx_s = NULL;
    long long plen = 128, gen = -1;
    struct infer_flags fl;
    infer_flags_init(&fl);
    bool bad = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--serve")) return bench_serve_main(argc, argv);
        if (i == 1 && !strcmp(argv[i], "train")) return bench_train_main(argc - 1, argv + 1);
        if (!strcmp(argv[i], "--write-synthetic")) return bench_write_main(argc, argv);
    }
    /* `tuna bench decode|prefill ...`: the same runs, reporting one side */
    int mode = 0; /* 0 both, 1 decode, 2 prefill */
    int i0 = 1;
    if (argc > 1 && (!strcmp(argv[1], "decode") || !strcmp(argv[1], "prefill"))) {
        mode = !strcmp(argv[1], "decode") ? 1 : 2;
        i0 = 2;
    }
    for (int i = i0; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (opt_dtype_4bit(argc, argv, &i, &fl) || tuna_cli_opt_str(argc, argv, &i, "--synthetic", &synth_name, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--prompt-len", &plen, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--ctx", &ctx_s, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--gen", &gen, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--batch", &batch_s, &bad) ||
            infer_flags_parse(&fl, argc, argv, &i, &bad))
            continue;
        if (argv[i][0] == '-' || dir) {
            fprintf(stderr, "tuna bench: unexpected argument %s\n", argv[i]);
            bad = true;
        } else {
            dir = argv[i];
        }
    }
    long long batches[BENCH_MAX_LIST] = {1}, ctxs[BENCH_MAX_LIST] = {plen};
    int nb = 1, nc = 1;
    if (!bad && batch_s && !(nb = parse_list("--batch", batch_s, batches, BENCH_MAX_LIST, 1, 256))) bad = true;
    if (!bad && ctx_s && !(nc = parse_list("--ctx", ctx_s, ctxs, BENCH_MAX_LIST, 1, (long long)1 << 30))) bad = true;
    if (gen < 0) gen = mode == 2 ? 2 : 32; /* prefill alone: the least decode a run makes */
    if (bad || (!dir == !synth_name) || plen < 1 || gen < 2) {
        usage(stderr);
        return 2;
    }
    if (synth_name && !bench_synth_canonical(synth_name)) {
        fprintf(stderr, "tuna bench: --synthetic knows llama-3.2-1b, llama-3-8b, llama-2-7b and llama-3-tiny, "
                        "not '%s'\n", synth_name);
        return 2;
    }
    struct tuna_model *m = NULL;
    struct synth syn = {0};
    tuna_status st;
    double t0 = now_s();
    if (synth_name) st = bench_synth_model(synth_name, &fl.model, &syn, &m);
    else st = tuna_model_load(dir, &fl.model, &m);
    if (st) return tuna_cli_fail("bench", st);
    double load_s = now_s() - t0;
    const bool on_cpu = m->ops->host_memory;
    const int threads = on_cpu ? tuna_cpu_backend_threads(m->be) : 0;
    const int64_t V = m->arch.vocab_size;
    const struct tuna_arch *a = &m->arch;
    const double wb = (double)tuna_model_weight_bytes(m);
    printf("model       %s (%s, %lld layers, hidden %lld, vocab %lld)\n", synth_name ? synth_name : dir,
           a->architecture, (long long)a->n_layers, (long long)a->hidden_size, (long long)V);
    printf("device      %s   (load %.2f s)\n", m->device_desc, load_s);
    printf("weights     %.1f MB read per decode step (matrices in their compute dtype)\n", wb / 1e6);
    fflush(stdout);

    struct bench_run runs[BENCH_MAX_LIST * BENCH_MAX_LIST];
    int nr = 0;
    for (int c = 0; c < nc && !st; c++)
        for (int k = 0; k < nb && !st; k++) {
            struct bench_run *r = &runs[nr++];
            memset(r, 0, sizeof *r);
            r->batch = batches[k];
            r->plen = ctxs[c] + gen > m->max_model_len ? m->max_model_len - gen : ctxs[c];
            if (r->plen < 1) {
                st = tuna_fail(TUNA_E_INVALID, "--gen %lld leaves no room for a prompt in this model's %lld tokens",
                               gen, (long long)m->max_model_len);
                break;
            }
            st = bench_one(m, r, gen, &r->st);
            if (r->st && nb * nc == 1) st = r->st; /* the one run asked for */
            else if (r->st) {
                fprintf(stderr, "tuna bench: batch %lld x %lld tokens skipped: %s\n", r->batch, r->plen,
                        tuna_last_error());
                continue;
            }
            if (st || nb * nc == 1) continue;
            const double steps_s = (double)gen / r->decode_s;
            printf("run         batch %lld, %lld tokens: prefill %.1f tok/s, decode %.1f tok/s (%.2f ms/step)\n",
                   r->batch, r->plen, (double)(r->plen * r->batch) / r->prefill_s, steps_s * (double)r->batch,
                   1e3 / steps_s);
            fflush(stdout);
        }
    /* the ceilings of this machine that the report compares with (the goals are fractions
     * of them), measured now: decode against the read or copy rate, prefill against the GEMM rate */
    double bw = 0, gemm = 0, copy = 0;
    if (!st && on_cpu && mode != 2) bw = measure_bandwidth(threads);
    if (!st && !on_cpu && mode != 1) gemm = bench_gemm_rate(m);
    if (!st && !on_cpu && mode != 2) copy = copy_rate(m);
    if (!st && nb * nc == 1 && !runs[0].st) {
        const struct bench_run *r = &runs[0];
        const long long B = r->batch;
        const double steps_s = (double)gen / r->decode_s;
        if (mode != 1)
            printf("prefill     %lld x %lld tokens in %.3f s = %.1f tok/s\n", B, r->plen, r->prefill_s,
                   (double)(r->plen * B) / r->prefill_s);
        if (mode != 2) {
            printf("decode      batch %lld, %lld steps in %.3f s = %.1f tok/s (%.2f ms/step)\n", B, gen, r->decode_s,
                   steps_s * (double)B, 1e3 / steps_s);
            printf("weights/s   %.2f GB/s during decode\n", wb * steps_s / 1e9);
        }
        if (on_cpu && mode != 2 && bw <= 0) {
            printf("memory bw   not measured (no 1 GiB buffer for the streaming read)\n");
        } else if (on_cpu && mode != 2) {
            printf("memory bw   %.2f GB/s streaming read, %d threads -> decode reaches %.0f%%\n", bw, threads,
                   100.0 * wb * steps_s / 1e9 / bw);
        } else if (!on_cpu) {
            const double pf = prefill_flops(a, B, r->plen) / r->prefill_s / 1e12;
            if (mode != 1)
                printf("gemm rate   %.1f TFLOP/s (bf16 8192^3, now) -> prefill %.1f TFLOP/s by model "
                       "FLOPs = %.0f%%\n",
                       gemm, pf, gemm > 0 ? 100.0 * pf / gemm : 0.0);
            if (mode != 2)
                printf("copy rate   %.1f GB/s (device to device, read + write, now) -> decode reads %.1f MB per step "
                       "(weights + %.1f MB of KV) = %.1f GB/s = %.0f%%\n",
                       copy / 1e9, (wb + r->kv_bytes) / 1e6, r->kv_bytes / 1e6, (wb + r->kv_bytes) * steps_s / 1e9,
                       copy > 0 ? 100.0 * (wb + r->kv_bytes) * steps_s / copy : 0.0);
        }
    } else if (!st) {
        /* the sweep's table: one row per batch and context */
        if (on_cpu && mode != 2) printf("memory bw   %.2f GB/s streaming read, %d threads\n", bw, threads);
        if (!on_cpu && mode != 1) printf("gemm rate   %.1f TFLOP/s (bf16 8192^3, now)\n", gemm);
        if (!on_cpu && mode != 2) printf("copy rate   %.1f GB/s (device to device, read + write, now)\n", copy / 1e9);
        printf("\n%6s %7s", "batch", "ctx");
        if (mode != 1) printf(" %14s %9s %6s", "prefill tok/s", "TFLOP/s", "%gemm");
        if (mode != 2)
            printf(" %13s %8s %9s %9s %6s", "decode tok/s", "ms/step", "MB/step", "GB/s", on_cpu ? "%bw" : "%copy");
        printf("\n");
        for (int i = 0; i < nr; i++) {
            const struct bench_run *r = &runs[i];
            printf("%6lld %7lld", r->batch, r->plen);
            if (r->st) {
                printf("  does not fit (see above)\n");
                continue;
            }
            const double steps_s = (double)gen / r->decode_s;
            const double pf = prefill_flops(a, r->batch, r->plen) / r->prefill_s / 1e12;
            const double bytes = on_cpu ? wb : wb + r->kv_bytes, ceil = on_cpu ? bw * 1e9 : copy;
            if (mode != 1 && gemm > 0)
                printf(" %14.1f %9.2f %5.0f%%", (double)(r->plen * r->batch) / r->prefill_s, pf, 100.0 * pf / gemm);
            else if (mode != 1) /* no GEMM rate: the CPU, or its buffers could not be had */
                printf(" %14.1f %9.2f %6s", (double)(r->plen * r->batch) / r->prefill_s, pf, "-");
            if (mode != 2 && ceil > 0)
                printf(" %13.1f %8.2f %9.1f %9.1f %5.0f%%", steps_s * (double)r->batch, 1e3 / steps_s, bytes / 1e6,
                       bytes * steps_s / 1e9, 100.0 * bytes * steps_s / ceil);
            else if (mode != 2) /* the ceiling could not be measured */
                printf(" %13.1f %8.2f %9.1f %9.1f %6s", steps_s * (double)r->batch, 1e3 / steps_s, bytes / 1e6,
                       bytes * steps_s / 1e9, "-");
            printf("\n");
        }
    }
    tuna_model_free(m);
    bench_synth_free(&syn);
    return st ? tuna_cli_fail("bench", st) : 0;
}
