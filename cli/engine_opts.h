/* engine_opts.h — the serving engine's options, shared by `tuna serve` and `tuna bench --serve`:
 * one parser, one set of defaults (vLLM's names and values), one range check, and the memory plan
 * that turns them into an engine configuration. */
#ifndef TUNA_CLI_ENGINE_OPTS_H
#define TUNA_CLI_ENGINE_OPTS_H

#include <stdbool.h>
#include <stdio.h>

#include "model/model.h"
#include "serve/engine.h"

struct engine_opts {
    long long max_model_len, block_size, max_num_seqs, max_batched, threads;
    double kv_gb, gpu_util;
    bool prefix_caching;
    struct tuna_model_opts dev; /* --device, --dtype, --load-in-4bit */
};

/* The defaults of `tuna serve`: block 16, 128 sequences, 2048 tokens per step, 0.9 of the GPU,
 * prefix caching on, the device found at run time. */
void engine_opts_init(struct engine_opts *o);

/* Consumes argv[*i] when it is an engine option; sets *bad on a malformed value. */
bool engine_opts_parse(struct engine_opts *o, int argc, char **argv, int *i, bool *bad);

/* Range checks after parsing; prints "<cmd>: ..." and returns false on a bad value. */
bool engine_opts_check(const struct engine_opts *o, const char *cmd);

/* The options' lines for a usage text. */
void engine_opts_help(FILE *f);

/* The model loading options the engine options imply (device, dtype, threads, context limit). */
struct tuna_model_opts engine_opts_model(const struct engine_opts *o);

/* Makes and prints the memory plan of model m under the options and fills ec's sizes (KV tokens,
 * block size, sequence and token limits, prefix caching). On the GPU, without --kv-cache-gb,
 * lora_slots adapters of rank <= lora_rank come out of the KV cache's share; a KV cache left
 * smaller than one sequence of max_model_len tokens is an error that names the knobs. The caller
 * sets ec->max_pending and ec->max_loras. */
tuna_status engine_opts_plan(const struct engine_opts *o, const struct tuna_model *m, int lora_slots,
                             long long lora_rank, struct tuna_engine_config *ec);

#endif
