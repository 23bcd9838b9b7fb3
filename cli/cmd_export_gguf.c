/* cmd_export_gguf.c — `tuna export gguf --model DIR --quant TYPE OUT.gguf`: a Hugging Face model
 * folder → one GGUF file for llama.cpp (src/gguf/export.h). `tuna export gguf ...` routes here
 * (argv[0] is then "gguf"). */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "gguf/export.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tuna export gguf --model DIR [--quant f16|bf16|f32|q8_0|q4_0|q4_k_m] [--name NAME] OUT.gguf\n\n"
            "Writes DIR (config.json, safetensors, tokenizer.json) as a GGUF v3 file that llama.cpp runs:\n"
            "architecture metadata (llama, mistral→llama, qwen2, qwen3, gemma), tokenizer metadata\n"
            "(tokens, types, scores or merges, pre-tokenizer, special ids, chat template), llama.cpp's\n"
            "tensor names and q/k row order. Quantization is bit-exact with ggml's reference quantizers;\n"
            "q4_k_m and q4_0 use llama-quantize's per-tensor mix (output in q6_K, some attn_v/ffn_down\n"
            "in q6_K, fallbacks for rows that are not whole blocks). OUT is written atomically.\n\n"
            "  --model   the model folder (required)\n"
            "  --quant   tensor type (default f16)\n"
            "  --name    general.name (default: the folder name)\n"
            "  --lora    not yet: merge the adapter first (tuna export merged-16bit), then export\n");
}

int cmd_export_gguf(int argc, char **argv)
{
    const char *model = NULL, *quant = "f16", *name = NULL, *lora = NULL, *out = NULL;
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--model", &model, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--quant", &quant, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--name", &name, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--lora", &lora, &bad)) {
            continue;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "tuna export gguf: unknown option %s\n", argv[i]);
            bad = true;
        } else if (!out) {
            out = argv[i];
        } else {
            fprintf(stderr, "tuna export gguf: unexpected argument %s\n", argv[i]);
            bad = true;
        }
    }
    struct tuna_gguf_export_opts o = {.name = name};
    if (!bad && (!model || !out)) {
        fprintf(stderr, "tuna export gguf: needs --model DIR and an output file\n");
        bad = true;
    }
    if (!bad && !tuna_gguf_ftype_parse(quant, &o.ftype)) {
        fprintf(stderr, "tuna export gguf: --quant %s: use f16, bf16, f32, q8_0, q4_0 or q4_k_m\n", quant);
        bad = true;
    }
    if (!bad && lora) {
        fprintf(stderr, "tuna export gguf: --lora is not supported yet; run `tuna export merged-16bit` with the "
                        "adapter and export the merged folder\n");
        bad = true;
    }
    if (bad) {
        usage(stderr);
        return 2;
    }
    tuna_status st = tuna_gguf_export(model, &o, out);
    if (st) return tuna_cli_fail("export gguf", st);
    fprintf(stderr, "wrote %s\n", out);
    return 0;
}
