/* sampler.c — see sampler.h for the order of operations (vLLM's sampler). */
#include "model/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"

#define TUNA_SAMPLING_EPS 1e-5f

void tuna_sampling_default(struct tuna_sampling *s)
{
    memset(s, 0, sizeof *s);
    s->temperature = 0.0f;
    s->top_p = 1.0f;
    s->repetition_penalty = 1.0f;
}

tuna_status tuna_sampling_check(const struct tuna_sampling *s)
{
    if (!(s->temperature >= 0) || isinf(s->temperature))
        return tuna_fail(TUNA_E_INVALID, "--temperature must be >= 0, got %g", s->temperature);
    if (!(s->top_p > 0 && s->top_p <= 1))
        return tuna_fail(TUNA_E_INVALID, "--top-p must be in (0, 1], got %g", s->top_p);
    if (!(s->min_p >= 0 && s->min_p <= 1))
        return tuna_fail(TUNA_E_INVALID, "--min-p must be in [0, 1], got %g", s->min_p);
    if (!(s->repetition_penalty > 0) || isinf(s->repetition_penalty))
        return tuna_fail(TUNA_E_INVALID, "--repetition-penalty must be > 0, got %g", s->repetition_penalty);
    if (!(s->presence_penalty >= -2 && s->presence_penalty <= 2))
        return tuna_fail(TUNA_E_INVALID, "--presence-penalty must be in [-2, 2], got %g", s->presence_penalty);
    if (!(s->frequency_penalty >= -2 && s->frequency_penalty <= 2))
        return tuna_fail(TUNA_E_INVALID, "--frequency-penalty must be in [-2, 2], got %g", s->frequency_penalty);
    return TUNA_OK;
}

/* --- xoshiro256** seeded through splitmix64 --- */
static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void tuna_rng_seed(struct tuna_rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t tuna_rng_next(struct tuna_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double tuna_rng_uniform(struct tuna_rng *r) { return (double)(tuna_rng_next(r) >> 11) * 0x1.0p-53; }

struct tuna_sampler {
    struct tuna_sampling p;
    struct tuna_rng rng;
    int64_t V;
    int32_t *counts;   /* [V] output occurrences */
    uint8_t *seen;     /* [V] in prompt or output */
    int32_t *idx;      /* [V] scratch: candidate ids */
    float *probs;      /* [V] scratch */
};

tuna_status tuna_sampler_new(const struct tuna_sampling *p, int64_t vocab, tuna_sampler **out)
{
    *out = NULL;
    tuna_status st = tuna_sampling_check(p);
    if (st) return st;
    if (vocab <= 0 || vocab > INT32_MAX) return tuna_fail(TUNA_E_INVALID, "sampler: vocabulary of %lld", (long long)vocab);
    struct tuna_sampler *s = calloc(1, sizeof *s);
    if (!s) return tuna_fail_oom("sampler", sizeof *s);
    s->p = *p;
    s->V = vocab;
    s->counts = calloc((size_t)vocab, sizeof *s->counts);
    s->seen = calloc((size_t)vocab, 1);
    s->idx = malloc((size_t)vocab * sizeof *s->idx);
    s->probs = malloc((size_t)vocab * sizeof *s->probs);
    if (!s->counts || !s->seen || !s->idx || !s->probs) {
        tuna_sampler_free(s);
        return tuna_fail_oom("sampler tables", (size_t)vocab * 13);
    }
    uint64_t seed = p->has_seed ? p->seed : ((uint64_t)time(NULL) ^ ((uint64_t)clock() << 32) ^ (uint64_t)(uintptr_t)s);
    tuna_rng_seed(&s->rng, seed);
    *out = s;
    return TUNA_OK;
}

void tuna_sampler_free(tuna_sampler *s)
{
    if (!s) return;
    free(s->counts);
    free(s->seen);
    free(s->idx);
    free(s->probs);
    free(s);
}

void tuna_sampler_reset(tuna_sampler *s, const int32_t *prompt, int64_t n)
{
    memset(s->counts, 0, (size_t)s->V * sizeof *s->counts);
    memset(s->seen, 0, (size_t)s->V);
    for (int64_t i = 0; i < n; i++)
        if (prompt[i] >= 0 && prompt[i] < s->V) s->seen[prompt[i]] = 1;
}

void tuna_sampler_accept(tuna_sampler *s, int32_t id)
{
    if (id < 0 || id >= s->V) return;
    s->counts[id]++;
    s->seen[id] = 1;
}

static int32_t argmax(const float *x, int64_t n)
{
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

static const float *g_sort_key;
static int by_logit_desc(const void *a, const void *b)
{
    float x = g_sort_key[*(const int32_t *)a], y = g_sort_key[*(const int32_t *)b];
    if (x != y) return x < y ? 1 : -1;
    return *(const int32_t *)a - *(const int32_t *)b;
}

int32_t tuna_sampler_sample(tuna_sampler *s, float *logits)
{
    const struct tuna_sampling *p = &s->p;
    const int64_t V = s->V;
    if (p->repetition_penalty != 1.0f || p->presence_penalty != 0 || p->frequency_penalty != 0)
        for (int64_t i = 0; i < V; i++) {
            if (s->seen[i] && p->repetition_penalty != 1.0f)
                logits[i] = logits[i] > 0 ? logits[i] / p->repetition_penalty : logits[i] * p->repetition_penalty;
            if (s->counts[i]) logits[i] -= p->frequency_penalty * (float)s->counts[i] + p->presence_penalty;
        }
    if (p->temperature < TUNA_SAMPLING_EPS) return argmax(logits, V);
    for (int64_t i = 0; i < V; i++) logits[i] /= p->temperature;
    /* candidates sorted by logit, best first (a static key: the sampler is used by one thread;
     * qsort has no context argument in C11) */
    int64_t n = V;
    for (int64_t i = 0; i < V; i++) s->idx[i] = (int32_t)i;
    g_sort_key = logits;
    qsort(s->idx, (size_t)V, sizeof *s->idx, by_logit_desc);
    g_sort_key = NULL;
    float mx = logits[s->idx[0]];
    double sum = 0;
    for (int64_t i = 0; i < n; i++) {
        s->probs[i] = expf(logits[s->idx[i]] - mx);
        sum += s->probs[i];
    }
    if (p->min_p > 0) { /* probs below min_p * max prob go; the max prob is probs[0] / sum */
        float thr = p->min_p * s->probs[0];
        while (n > 1 && s->probs[n - 1] < thr) n--;
    }
    if (p->top_k > 0 && p->top_k < n) {
        float kth = logits[s->idx[p->top_k - 1]];
        int64_t k = p->top_k;
        while (k < n && logits[s->idx[k]] >= kth) k++; /* ties with the k-th value stay */
        n = k;
    }
    sum = 0;
    for (int64_t i = 0; i < n; i++) sum += s->probs[i];
    if (p->top_p < 1.0f) { /* drop the tail whose cumulative probability (ascending) <= 1 - top_p */
        double tail = 0;
        int64_t keep = n;
        for (int64_t i = n - 1; i > 0; i--) {
            tail += s->probs[i] / sum;
            if (tail <= 1.0 - (double)p->top_p) keep = i;
            else break;
        }
        n = keep;
        sum = 0;
        for (int64_t i = 0; i < n; i++) sum += s->probs[i];
    }
    double u = tuna_rng_uniform(&s->rng) * sum, acc = 0;
    for (int64_t i = 0; i < n; i++) {
        acc += s->probs[i];
        if (u < acc) return s->idx[i];
    }
    return s->idx[n - 1];
}

tuna_status tuna_gen_config_load(const char *dir, struct tuna_gen_config *out)
{
    memset(out, 0, sizeof *out);
    tuna_sampling_default(&out->sampling);
    char *path = tuna_path_join(dir, "generation_config.json");
    if (!path) return tuna_fail_oom("path", strlen(dir) + 32);
    if (!tuna_path_exists(path)) {
        free(path);
        return TUNA_OK;
    }
    cJSON *doc;
    tuna_status st = tuna_json_load(path, 0, &doc);
    if (st) {
        free(path);
        return st;
    }
    out->found = true;
    bool do_sample = false;
    double v;
    int64_t k;
    if (!tuna_json_get_bool(doc, "do_sample", &do_sample, &st, path) && st) goto done;
    if (do_sample) {
        out->sampling.temperature = 1.0f;
        out->sampling.top_k = 50;
        if (tuna_json_get_num(doc, "temperature", &v, &st, path)) out->sampling.temperature = (float)v;
        else if (st) goto done;
        if (tuna_json_get_num(doc, "top_p", &v, &st, path)) out->sampling.top_p = (float)v;
        else if (st) goto done;
        if (tuna_json_get_int(doc, "top_k", &k, &st, path)) out->sampling.top_k = k;
        else if (st) goto done;
        if (tuna_json_get_num(doc, "min_p", &v, &st, path)) out->sampling.min_p = (float)v;
        else if (st) goto done;
    }
    if (tuna_json_get_num(doc, "repetition_penalty", &v, &st, path)) out->sampling.repetition_penalty = (float)v;
    else if (st) goto done;
    const cJSON *eos = tuna_json_member(doc, "eos_token_id");
    if (cJSON_IsNumber(eos)) {
        out->eos_ids[out->n_eos++] = (int64_t)eos->valuedouble;
    } else if (cJSON_IsArray(eos)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, eos) {
            if (!cJSON_IsNumber(e)) {
                st = tuna_fail(TUNA_E_FORMAT, "%s: eos_token_id list holds a non-number", path);
                goto done;
            }
            if (out->n_eos < 16) out->eos_ids[out->n_eos++] = (int64_t)e->valuedouble;
        }
    } else if (eos) {
        st = tuna_fail(TUNA_E_FORMAT, "%s: eos_token_id must be a number or a list of numbers", path);
    }
done:
    cJSON_Delete(doc);
    free(path);
    return st;
}
