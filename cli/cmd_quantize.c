/* cmd_quantize.c — `tuna quantize DIR OUT`: a 16-bit model folder → a bitsandbytes 4-bit
 * checkpoint that transformers, bitsandbytes and vLLM load as pre-quantized (src/quant/bnb.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "quant/bnb.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tuna quantize DIR OUT [--quant-type nf4|fp4] [--double-quant|--no-double-quant]\n"
            "                     [--blocksize 64] [--dtype bfloat16|float16|float32]\n"
            "                     [--compute-dtype DTYPE] [--skip-modules a,b,...]\n\n"
            "Quantizes every Linear weight of the decoder layers to 4 bits exactly as bitsandbytes does and\n"
            "writes OUT as transformers' save_pretrained would: packed weights with their absmax /\n"
            "quant_map / nested_* / quant_state tensors, quantization_config in config.json, and every\n"
            "other file (tokenizer, generation_config, chat template) copied. Embeddings, lm_head and\n"
            "norms stay in float. OUT must not exist; it is written to a temporary folder and renamed.\n\n"
            "  --quant-type      nf4 (default) or fp4\n"
            "  --double-quant    quantize the block scales too (default; bnb_4bit_use_double_quant)\n"
            "  --no-double-quant keep float32 block scales\n"
            "  --blocksize       elements per scale: 32, 64 (default, what transformers writes) ... 4096\n"
            "  --dtype           dtype of the unquantized tensors and the recorded weight dtype\n"
            "                    (default: config.json's; transformers loads with dtype=... the same way)\n"
            "  --compute-dtype   bnb_4bit_compute_dtype (default: the dtype)\n"
            "  --skip-modules    llm_int8_skip_modules: module names (substrings) kept in float\n");
}

static bool parse_dtype(const char *s, enum tuna_dtype *out)
{
    enum tuna_dtype d = tuna_dtype_from_torch(s);
    if (d != TUNA_DTYPE_F32 && d != TUNA_DTYPE_BF16 && d != TUNA_DTYPE_F16) {
        fprintf(stderr, "tuna quantize: dtype '%s': use bfloat16, float16 or float32\n", s);
        return false;
    }
    *out = d;
    return true;
}

int cmd_quantize(int argc, char **argv)
{
    const char *src = NULL, *dst = NULL, *qt = "nf4", *dt = NULL, *cdt = NULL, *skip = NULL;
    long long bs = 64;
    struct tuna_bnb_quantize_opts o = {.type = TUNA_Q4_NF4, .double_quant = true, .blocksize = 64,
                                       .dtype = TUNA_DTYPE_INVALID, .compute_dtype = TUNA_DTYPE_INVALID};
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_flag(argv, i, "--double-quant")) {
            o.double_quant = true;
        } else if (tuna_cli_flag(argv, i, "--no-double-quant")) {
            o.double_quant = false;
        } else if (tuna_cli_opt_str(argc, argv, &i, "--quant-type", &qt, &bad) ||
                   tuna_cli_opt_int(argc, argv, &i, "--blocksize", &bs, &bad) ||
                   tuna_cli_opt_str(argc, argv, &i, "--dtype", &dt, &bad) ||
                   tuna_cli_opt_str(argc, argv, &i, "--compute-dtype", &cdt, &bad) ||
                   tuna_cli_opt_str(argc, argv, &i, "--skip-modules", &skip, &bad)) {
            continue;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "tuna quantize: unknown option %s\n", argv[i]);
            bad = true;
        } else if (!src) {
            src = argv[i];
        } else if (!dst) {
            dst = argv[i];
        } else {
            fprintf(stderr, "tuna quantize: unexpected argument %s\n", argv[i]);
            bad = true;
        }
    }
    if (!bad && (!src || !dst)) {
        fprintf(stderr, "tuna quantize: needs a model folder and an output folder\n");
        bad = true;
    }
    if (!bad && strcmp(qt, "nf4") && strcmp(qt, "fp4")) {
        fprintf(stderr, "tuna quantize: --quant-type %s: use nf4 or fp4\n", qt);
        bad = true;
    }
    if (!bad && (bs < 32 || bs > 4096 || !tuna_q4_blocksize_ok((int)bs))) {
        fprintf(stderr, "tuna quantize: --blocksize %lld: use a power of two from 32 to 4096 (64 is standard)\n", bs);
        bad = true;
    }
    if (!bad && dt && !parse_dtype(dt, &o.dtype)) bad = true;
    if (!bad && cdt && !parse_dtype(cdt, &o.compute_dtype)) bad = true;
    if (bad) {
        usage(stderr);
        return 2;
    }
    o.type = strcmp(qt, "fp4") == 0 ? TUNA_Q4_FP4 : TUNA_Q4_NF4;
    o.blocksize = (int)bs;

    /* --skip-modules a,b,c → list (kept in config.json as llm_int8_skip_modules) */
    char *skip_copy = NULL;
    const char **list = NULL;
    if (skip) {
        skip_copy = strdup(skip);
        list = calloc(strlen(skip) + 1, sizeof *list);
        if (!skip_copy || !list) {
            free(skip_copy);
            free(list);
            fprintf(stderr, "tuna quantize: out of memory\n");
            return 3;
        }
        int n = 0;
        for (char *save = NULL, *t = strtok_r(skip_copy, ",", &save); t; t = strtok_r(NULL, ",", &save))
            if (*t) list[n++] = t;
        o.skip_modules = list;
        o.n_skip_modules = n;
    }
    tuna_status s = tuna_bnb_quantize_dir(src, dst, &o);
    free(list);
    free(skip_copy);
    if (s) return tuna_cli_fail("quantize", s);
    printf("wrote %s (%s%s, blocksize %lld)\n", dst, qt, o.double_quant ? ", double quant" : "", bs);
    return 0;
}
