/* cmd_export_gguf.c — `tuna export gguf --model DIR [--lora ADAPTER] --quant TYPE OUT.gguf`: a
 * Hugging Face model folder (with an adapter merged in) → one GGUF file for llama.cpp, and
 * `tuna export gguf-lora --model DIR --lora ADAPTER OUT.gguf`: the adapter alone as a GGUF LoRA
 * file for `llama-cli --lora` (src/gguf/export.h). `tuna export gguf ...` and `tuna export
 * gguf-lora ...` route here (argv[0] is then "gguf" or "gguf-lora"). */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "gguf/export.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tuna export gguf --model DIR [--lora ADAPTER] [--quant f16|bf16|f32|q8_0|q4_0|q4_k_m] [--name NAME] OUT.gguf\n"
            "       tuna export gguf-lora --model DIR --lora ADAPTER [--quant f32|f16|bf16] [--name NAME] OUT.gguf\n\n"
            "gguf: writes DIR (config.json, safetensors, tokenizer.json) as a GGUF v3 file that llama.cpp runs:\n"
            "architecture metadata (llama, mistral→llama, qwen2, qwen3, gemma), tokenizer metadata\n"
            "(tokens, types, scores or merges, pre-tokenizer, special ids, chat template), llama.cpp's\n"
            "tensor names and q/k row order. Quantization is bit-exact with ggml's reference quantizers;\n"
            "q4_k_m and q4_0 use llama-quantize's per-tensor mix (output in q6_K, some attn_v/ffn_down\n"
            "in q6_K, fallbacks for rows that are not whole blocks). With --lora the PEFT adapter is\n"
            "merged first (W + s*B*A in float32, rounded to the stored dtype: the weights of\n"
            "`tuna export merged-16bit`), then converted.\n\n"
            "gguf-lora: writes the PEFT adapter alone as a GGUF LoRA adapter for `llama-cli -m BASE.gguf\n"
            "--lora OUT.gguf` (BASE.gguf: `tuna export gguf --model DIR`). DIR gives the architecture and\n"
            "the shapes. adapter.lora.alpha is the config's lora_alpha; modules whose scale is not\n"
            "alpha/r (use_rslora, alpha_pattern) get the difference folded into lora_b.\n\n"
            "  --model   the (base) model folder (required)\n"
            "  --lora    a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)\n"
            "  --quant   tensor type (default f16 for gguf, f32 for gguf-lora)\n"
            "  --name    general.name (default: the folder name)\n"
            "OUT is written atomically.\n");
}

int cmd_export_gguf(int argc, char **argv)
{
    bool lora_only = argc > 0 && !strcmp(argv[0], "gguf-lora");
    const char *what = lora_only ? "export gguf-lora" : "export gguf";
    const char *model = NULL, *quant = lora_only ? "f32" : "f16", *name = NULL, *lora = NULL, *out = NULL;
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
            fprintf(stderr, "tuna %s: unknown option %s\n", what, argv[i]);
            bad = true;
        } else if (!out) {
            out = argv[i];
        } else {
            fprintf(stderr, "tuna %s: unexpected argument %s\n", what, argv[i]);
            bad = true;
        }
    }
    enum tuna_gguf_ftype ft = TUNA_GGUF_FT_F16;
    if (!bad && (!model || !out || (lora_only && !lora))) {
        fprintf(stderr, "tuna %s: needs --model DIR%s and an output file\n", what, lora_only ? ", --lora ADAPTER" : "");
        bad = true;
    }
    if (!bad && !tuna_gguf_ftype_parse(quant, &ft)) {
        fprintf(stderr, "tuna %s: --quant %s: use f16, bf16, f32, q8_0, q4_0 or q4_k_m\n", what, quant);
        bad = true;
    }
    if (!bad && lora_only && ft != TUNA_GGUF_FT_F32 && ft != TUNA_GGUF_FT_F16 && ft != TUNA_GGUF_FT_BF16) {
        fprintf(stderr, "tuna %s: --quant %s: a LoRA adapter is written in f32, f16 or bf16\n", what, quant);
        bad = true;
    }
    if (bad) {
        usage(stderr);
        return 2;
    }
    struct tuna_lora_adapter *ad = NULL;
    tuna_status st = lora ? tuna_lora_load(lora, &ad) : TUNA_OK;
    if (st) return tuna_cli_fail(what, st);
    if (lora_only) {
        struct tuna_gguf_lora_opts lo = {.ftype = ft, .name = name};
        struct tuna_gguf_lora_report rep;
        st = tuna_gguf_export_lora(model, ad, &lo, out, &rep);
        if (!st) {
            fprintf(stderr, "wrote %s (%d LoRA modules, adapter.lora.alpha %g", out, rep.n_modules, (double)rep.alpha);
            if (rep.n_folded) fprintf(stderr, "; %d modules with their scale folded into lora_b", rep.n_folded);
            fprintf(stderr, ")\n");
        }
    } else {
        struct tuna_gguf_export_opts o = {.ftype = ft, .name = name, .lora = ad};
        st = tuna_gguf_export(model, &o, out);
        if (!st) fprintf(stderr, "wrote %s%s\n", out, ad ? " (adapter merged)" : "");
    }
    tuna_lora_free(ad);
    if (st) return tuna_cli_fail(what, st);
    return 0;
}
