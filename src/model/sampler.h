/* sampler.h — choosing the next token from logits with vLLM's semantics:
 *   penalties (repetition over prompt + output: divide positive logits / multiply negative ones;
 *   frequency × output count and presence × [count > 0] subtracted) → greedy when
 *   temperature < 1e-5 → logits / temperature → min-p (drop probs below min_p × max prob) →
 *   top-k (ties with the k-th value kept) → top-p (drop the low tail whose cumulative probability
 *   is <= 1 - top_p, always keeping the top token) → draw from the renormalized distribution.
 * A seeded xoshiro256** PRNG per sampler: same seed, same tokens.
 */
#ifndef TUNA_MODEL_SAMPLER_H
#define TUNA_MODEL_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

#include "tuna.h"

struct tuna_sampling {
    float temperature;        /* 0 (or < 1e-5) = greedy */
    int64_t top_k;            /* <= 0: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off */
    float repetition_penalty; /* 1: off */
    float presence_penalty;   /* 0: off */
    float frequency_penalty;  /* 0: off */
    uint64_t seed;
    bool has_seed;            /* false: seeded from the clock */
};

/* Greedy, every filter off. */
void tuna_sampling_default(struct tuna_sampling *s);
/* Checks ranges (temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1, repetition_penalty > 0,
 * penalties in [-2, 2] as vLLM), naming the flag that is wrong. */
tuna_status tuna_sampling_check(const struct tuna_sampling *s);

struct tuna_rng {
    uint64_t s[4];
};
void tuna_rng_seed(struct tuna_rng *r, uint64_t seed);
uint64_t tuna_rng_next(struct tuna_rng *r);
double tuna_rng_uniform(struct tuna_rng *r); /* [0, 1) with 53 random bits */

typedef struct tuna_sampler tuna_sampler;

tuna_status tuna_sampler_new(const struct tuna_sampling *s, int64_t vocab, tuna_sampler **out);
void tuna_sampler_free(tuna_sampler *s); /* accepts NULL */
/* Starts a new sequence: forgets output counts and marks the prompt tokens (repetition penalty). */
void tuna_sampler_reset(tuna_sampler *s, const int32_t *prompt, int64_t n);
/* Records a generated token (frequency / presence / repetition penalties). */
void tuna_sampler_accept(tuna_sampler *s, int32_t id);
/* Picks a token from logits[V]; logits are modified (penalties, temperature, filters). */
int32_t tuna_sampler_sample(tuna_sampler *s, float *logits);

/* Sampling defaults and EOS ids from generation_config.json (HF semantics: do_sample absent or
 * false = greedy; do_sample true takes temperature (1), top_p (1), top_k (50)). A missing file is
 * not an error (*found false). eos ids: int or list. */
struct tuna_gen_config {
    bool found;
    struct tuna_sampling sampling;
    int64_t eos_ids[16];
    int n_eos;
};
tuna_status tuna_gen_config_load(const char *dir, struct tuna_gen_config *out);

#endif
