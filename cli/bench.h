/* bench.h — what the parts of `tuna bench` share (cli/ only): the synthetic models of real
 * architectures with random bf16 weights made in memory (cmd_bench.c), the serving benchmark
 * (bench_serve.c) and writing a synthetic model as a Hugging Face folder (bench_write.c). */
#ifndef TUNA_CLI_BENCH_H
#define TUNA_CLI_BENCH_H

#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model.h"

/* The tensors of a synthetic model, by HF name, in file order (embedding, norm, lm_head, then
 * each layer's). Every view's name and data are malloc'd and owned here. */
struct synth {
    struct tuna_tensor_view *views;
    int n, cap;
};

/* The canonical name of a synthetic model (llama-3.2-1b, llama-3-8b, llama-2-7b, llama-3-tiny;
 * "llama3-8b" and the like name the same), or NULL when there is none by that name. */
const char *bench_synth_canonical(const char *name);
/* The architecture and random weights of `name` (bench_synth_canonical's names) into *a and *s. */
tuna_status bench_synth_make(const char *name, struct tuna_arch *a, struct synth *s);
/* The same, then a model over those weights (which must outlive it: bench_synth_free after
 * tuna_model_free). On failure *s is already freed (and emptied: bench_synth_free on it again is a
 * no-op). */
tuna_status bench_synth_model(const char *name, const struct tuna_model_opts *o, struct synth *s,
                              struct tuna_model **m);
void bench_synth_free(struct synth *s); /* accepts a zeroed struct */

/* `tuna bench --serve ...` and `tuna bench --synthetic NAME --write-synthetic DIR`: exit codes. */
int bench_serve_main(int argc, char **argv);
int bench_write_main(int argc, char **argv);
/* `tuna bench train ...` (bench_train.c; argv[0] = "train"): exit code. */
int bench_train_main(int argc, char **argv);
/* TFLOP/s of an 8192^3 bf16 GEMM through the model's backend (1024^3 on the CPU; bf16 in and out
 * where the backend has a 16-bit matmul), measured now (bench_train.c); 0 when its buffers
 * cannot be had. */
double bench_gemm_rate(struct tuna_model *m);

#endif
