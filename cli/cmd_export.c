/* cmd_export.c — `tuna export adapter|merged-16bit|merged-4bit ...`: PEFT adapter folders and
 * merged model folders (src/export/export.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "export/export.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tuna export adapter --adapter ADIR OUT [--force]\n"
               "       tuna export merged-16bit --model DIR --adapter ADIR [--base-16bit DIR16] OUT [--force]\n"
               "       tuna export merged-4bit --model DIR --adapter ADIR [--base-16bit DIR16] OUT [--force]\n"
               "                               [--quant-type nf4|fp4] [--no-double-quant] [--blocksize 64]\n\n"
               "adapter       re-writes a PEFT LoRA adapter folder (adapter_config.json +\n"
               "              adapter_model.safetensors) as PEFT and vLLM load it.\n"
               "merged-16bit  W + s*B*A for every adapted weight, computed in float32 and rounded to the\n"
               "              stored dtype; same shards and index as the base; config.json without\n"
               "              quantization_config; tokenizer, chat template and generation files copied.\n"
               "              From a bitsandbytes 4-bit base, the merge goes into the original 16-bit\n"
               "              weights given with --base-16bit, else into the dequantized 4-bit weights.\n"
               "gguf         a GGUF file for llama.cpp / Ollama (--lora merges an adapter): `tuna export gguf --help`\n"
               "gguf-lora    a PEFT adapter as a GGUF LoRA file for llama.cpp's --lora: `tuna export gguf --help`\n"
               "merged-4bit   merged-16bit, then quantized as `tuna quantize` does: the 4-bit base's own\n"
               "              settings, or NF4 + double quant, block size 64 for a 16-bit base (flags\n"
               "              override).\n\n"
               "OUT is written to a temporary folder and renamed; an existing OUT is refused unless --force.\n");
}

int cmd_export(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *what = argv[1];
    if (!strcmp(what, "gguf") || !strcmp(what, "gguf-lora"))
        return cmd_export_gguf(argc - 1, argv + 1); /* cli/cmd_export_gguf.c */
    bool is_adapter = !strcmp(what, "adapter"), is16 = !strcmp(what, "merged-16bit"),
         is4 = !strcmp(what, "merged-4bit");
    if (!is_adapter && !is16 && !is4) {
        fprintf(stderr, "tuna export: unknown format '%s': use adapter, merged-16bit, merged-4bit, gguf or gguf-lora\n", what);
        usage(stderr);
        return 2;
    }
    const char *model = NULL, *adir = NULL, *base16 = NULL, *out = NULL, *qt = NULL;
    long long bs = 0;
    bool force = false, no_dq = false, bad = false;
    for (int i = 2; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_flag(argv, i, "--force")) {
            force = true;
        } else if (is4 && tuna_cli_flag(argv, i, "--no-double-quant")) {
            no_dq = true;
        } else if (tuna_cli_opt_str(argc, argv, &i, "--adapter", &adir, &bad) ||
                   (!is_adapter && tuna_cli_opt_str(argc, argv, &i, "--model", &model, &bad)) ||
                   (!is_adapter && tuna_cli_opt_str(argc, argv, &i, "--base-16bit", &base16, &bad)) ||
                   (is4 && tuna_cli_opt_str(argc, argv, &i, "--quant-type", &qt, &bad)) ||
                   (is4 && tuna_cli_opt_int(argc, argv, &i, "--blocksize", &bs, &bad))) {
            continue;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "tuna export %s: unknown option %s\n", what, argv[i]);
            bad = true;
        } else if (!out) {
            out = argv[i];
        } else {
            fprintf(stderr, "tuna export %s: unexpected argument %s\n", what, argv[i]);
            bad = true;
        }
    }
    if (!bad && (!adir || !out || (!is_adapter && !model))) {
        fprintf(stderr, "tuna export %s: needs --adapter ADIR%s and an output folder\n", what,
                is_adapter ? "" : ", --model DIR");
        bad = true;
    }
    if (!bad && qt && strcmp(qt, "nf4") && strcmp(qt, "fp4")) {
        fprintf(stderr, "tuna export: --quant-type %s: use nf4 or fp4\n", qt);
        bad = true;
    }
    if (!bad && bs && !tuna_q4_blocksize_ok((int)bs)) {
        fprintf(stderr, "tuna export: --blocksize %lld: use a power of two from 32 to 4096 (64 is standard)\n", bs);
        bad = true;
    }
    if (bad) {
        usage(stderr);
        return 2;
    }
    struct tuna_lora_adapter *a = NULL;
    tuna_status st = tuna_lora_load(adir, &a);
    if (st) return tuna_cli_fail("export", st);
    if (is_adapter) {
        st = tuna_export_adapter(a, out, force);
        if (!st) printf("wrote %s (%d LoRA modules, r=%lld)\n", out, a->n_modules, (long long)a->r);
        tuna_lora_free(a);
        return st ? tuna_cli_fail("export", st) : 0;
    }
    struct tuna_merge_opts o = {.base_16bit = base16, .replace = force};
    struct tuna_bnb_quantize_opts q = {.type = TUNA_Q4_NF4, .double_quant = true, .blocksize = 64};
    if (is4 && (qt || bs || no_dq)) {
        q.type = qt && !strcmp(qt, "fp4") ? TUNA_Q4_FP4 : TUNA_Q4_NF4;
        q.double_quant = !no_dq;
        q.blocksize = bs ? (int)bs : 64;
        o.quant = &q;
    }
    struct tuna_merge_report rep;
    memset(&rep, 0, sizeof rep);
    st = is16 ? tuna_export_merged_16bit(model, a, &o, out, &rep) : tuna_export_merged_4bit(model, a, &o, out, &rep);
    tuna_lora_free(a);
    if (st) return tuna_cli_fail("export", st);
    if (rep.dequantized)
        fprintf(stderr,
                "tuna export: note: %s is a 4-bit model; the adapter was merged into its dequantized weights "
                "(give --base-16bit DIR to merge into the original 16-bit weights instead)\n",
                model);
    if (rep.used_base_16bit) fprintf(stderr, "tuna export: merged into the 16-bit weights of %s\n", base16);
    printf("wrote %s (%s: %d weights merged, %d tensors in %d file%s)\n", out, what, rep.n_merged, rep.n_tensors,
           rep.n_files, rep.n_files == 1 ? "" : "s");
    return 0;
}
