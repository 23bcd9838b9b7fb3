/* cmd_finetune.c — `tuna finetune --model DIR --data FILE.jsonl --output OUT [flags]`: LoRA or
 * QLoRA training on the CPU (src/train), flags named after Hugging Face TrainingArguments and
 * Unsloth. Writes OUT/adapter_config.json + adapter_model.safetensors (PEFT), OUT/metrics.jsonl
 * (or --metrics FILE), OUT/loss.svg and, with --save-steps N, OUT/checkpoint-<step>/ folders
 * that --resume continues from. docs/TRAINING.md describes every flag.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "chat/chat.h"
#include "cli.h"
#include "infer_common.h"
#include "core/file.h"
#include "core/status.h"
#include "lora/lora.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "train/checkpoint.h"
#include "train/dataset.h"
#include "train/report.h"
#include "train/trainer.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tuna finetune --model DIR --data FILE.jsonl --output OUT [flags]\n\n"
            "Trains LoRA adapters (QLoRA with --load-in-4bit or a bitsandbytes 4-bit checkpoint) on the CPU or a GPU and\n"
            "writes a PEFT adapter folder to OUT, with OUT/metrics.jsonl and the loss curve OUT/loss.svg.\n\n"
            "data:\n"
            "  --format F                 auto (default) | messages | sharegpt | alpaca | text\n"
            "  --train-on-responses-only  loss on assistant turns only\n"
            "  --max-seq-length N         truncate longer examples (0 = no limit)\n"
            "  --packing                  pack examples into rows of --max-seq-length\n"
            "  --no-shuffle               step s takes examples s*batch .. s*batch+batch-1 in file order\n"
            "  --seed N                   shuffling and adapter init (3407)\n"
            "LoRA:\n"
            "  --lora-r N (16)  --lora-alpha A (16)  --lora-dropout P (0)  --use-rslora\n"
            "  --target-modules LIST      comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (all)\n"
            "  --init-adapter DIR         start from this PEFT adapter (its ranks, alphas and modules)\n"
            "  --load-in-4bit             quantize the base to NF4 with double quantization (QLoRA)\n"
            "optimizer (AdamW):\n"
            "  --learning-rate LR (2e-4)  --weight-decay W (0)  --adam-beta1 (0.9) --adam-beta2 (0.999)\n"
            "  --adam-epsilon (1e-8)  --lr-scheduler constant|linear|cosine (linear)  --warmup-steps N (0)\n"
            "  --max-grad-norm X (1.0; 0 turns clipping off)\n"
            "steps:\n"
            "  --batch-size N (2)  --grad-accum N (1)  --max-steps N  or  --epochs E (1)\n"
            "output:\n"
            "  --metrics FILE (OUT/metrics.jsonl)  --save-steps N (0 = no checkpoints)  --resume (latest\n"
            "  OUT/checkpoint-N)  --resume-from DIR  --overwrite (replace an adapter already in OUT)\n"
            "  --gradient-checkpointing (keep only each layer's input; recompute it in backward)\n"
            "  --offload (memory mode: checkpointing with the layer inputs and AdamW state in host memory,\n"
            "  the MLP and the logits in chunks; docs/TRAINING.md)\n"
            "device:\n"
            "  --device cpu|cuda|cuda:N (cpu)  --dtype auto|bfloat16|float16|float32 (GPU compute; auto = bf16)\n"
            "  --threads N  --quiet\n");
}

struct ft_opts {
    const char *model, *data, *out, *metrics, *init_adapter, *resume_from, *format, *targets_arg;
    long long batch, accum, max_steps, warmup, save_steps, max_seq, threads, lora_r, seed;
    double epochs, lr, wd, b1, b2, eps, clip, alpha, dropout;
    const char *sched;
    bool shuffle, rslora, load4, resume, responses_only, packing, overwrite, quiet, grad_ckpt, offload;
    struct tuna_model_opts mo; /* --device, --dtype (infer_device_parse) */
};

static bool parse_args(int argc, char **argv, struct ft_opts *o, bool *help)
{
    bool bad = false;
    for (int i = 1; i < argc && !bad; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            *help = true;
            return true;
        }
        if (tuna_cli_opt_str(argc, argv, &i, "--model", &o->model, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--data", &o->data, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--output", &o->out, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--metrics", &o->metrics, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--init-adapter", &o->init_adapter, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--resume-from", &o->resume_from, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--format", &o->format, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--target-modules", &o->targets_arg, &bad) ||
            tuna_cli_opt_str(argc, argv, &i, "--lr-scheduler", &o->sched, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--batch-size", &o->batch, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--grad-accum", &o->accum, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--max-steps", &o->max_steps, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--warmup-steps", &o->warmup, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--save-steps", &o->save_steps, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--max-seq-length", &o->max_seq, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--threads", &o->threads, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--lora-r", &o->lora_r, &bad) ||
            tuna_cli_opt_int(argc, argv, &i, "--seed", &o->seed, &bad) ||
            tuna_cli_opt_float(argc, argv, &i, "--epochs", &o->epochs, &bad) ||
            tuna_cli_opt_float(argc, argv, &i, "--learning-rate", &o->lr, &bad) ||
            tuna_cli_opt_float(argc, argv, &i, "--weight-decay", &o->wd, &bad) ||
            tuna_cli_opt_float(argc, argv, &i, "--adam-beta1", &o->b1, &bad) ||
            tuna_cli_opt_float(argc, argv, &i, "--adam-beta2", &o->b2, &bad) ||
            tuna_cli_opt_float(argc, argv, &i, "--adam-epsilon", &o->eps, &bad) ||
            tuna_cli_opt_float(argc, argv, &i, "--max-grad-norm", &o->clip, &bad) ||
            tuna_cli_opt_float(argc, argv, &i, "--lora-alpha", &o->alpha, &bad) ||
            tuna_cli_opt_float(argc, argv, &i, "--lora-dropout", &o->dropout, &bad))
            continue;
        bool *flag = !strcmp(a, "--no-shuffle")                ? &o->shuffle
                     : !strcmp(a, "--use-rslora")              ? &o->rslora
                     : !strcmp(a, "--load-in-4bit")            ? &o->load4
                     : !strcmp(a, "--resume")                  ? &o->resume
                     : !strcmp(a, "--train-on-responses-only") ? &o->responses_only
                     : !strcmp(a, "--packing")                 ? &o->packing
                     : !strcmp(a, "--overwrite")               ? &o->overwrite
                     : !strcmp(a, "--quiet")                   ? &o->quiet
                     : !strcmp(a, "--gradient-checkpointing")  ? &o->grad_ckpt
                     : !strcmp(a, "--offload")                 ? &o->offload
                                                               : NULL;
        if (flag) {
            *flag = strcmp(a, "--no-shuffle") != 0; /* --no-shuffle clears shuffle */
            continue;
        }
        if ((!strcmp(a, "--device") || !strcmp(a, "--dtype")) && infer_device_parse(&o->mo, argc, argv, &i, &bad))
            continue;
        fprintf(stderr, "tuna finetune: unknown option %s\n", a);
        bad = true;
    }
    return !bad;
}

/* Splits "q_proj,v_proj" into out[] (pointers into buf). */
static int split_targets(char *buf, const char **out, int cap)
{
    int n = 0;
    for (char *s = strtok(buf, ", "); s && n < cap; s = strtok(NULL, ", "))
        out[n++] = s;
    return n;
}

/* The final adapter files go into OUT one by one (each rename atomic), so OUT can also hold
 * checkpoints and metrics. */
static tuna_status write_final(const tuna_trainer *t, const char *out, const char *base, bool overwrite)
{
    char cfg[4096], tmp[4096];
    snprintf(cfg, sizeof cfg, "%s/adapter_config.json", out);
    if (!overwrite && tuna_path_exists(cfg))
        return tuna_fail(TUNA_E_IO, "%s already holds an adapter; choose another --output or pass --overwrite", out);
    snprintf(tmp, sizeof tmp, "%s/.final.tmp.%d", out, (int)getpid());
    tuna_status st = tuna_trainer_export(t, tmp, base, true);
    const char *files[] = {"adapter_model.safetensors", "adapter_config.json", "README.md"};
    for (size_t i = 0; !st && i < sizeof files / sizeof files[0]; i++) {
        char a[8400], b[8400];
        snprintf(a, sizeof a, "%s/%s", tmp, files[i]);
        snprintf(b, sizeof b, "%s/%s", out, files[i]);
        if (!tuna_path_exists(a)) continue;
        if (rename(a, b) != 0) st = tuna_fail(TUNA_E_IO, "cannot move %s to %s", a, b);
    }
    tuna_remove_tree(tmp);
    return st;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int cmd_finetune(int argc, char **argv)
{
    struct ft_opts o = {0};
    o.batch = 2, o.accum = 1, o.max_steps = -1, o.epochs = -1, o.lr = 2e-4, o.wd = 0, o.b1 = 0.9, o.b2 = 0.999;
    o.eps = 1e-8, o.clip = 1.0, o.lora_r = 16, o.alpha = 16, o.seed = 3407, o.shuffle = true, o.sched = "linear";
    bool help = false;
    if (!parse_args(argc, argv, &o, &help)) {
        usage(stderr);
        return 2;
    }
    if (help) {
        usage(stdout);
        return 0;
    }
    if (!o.model || !o.data || !o.out) {
        fprintf(stderr, "tuna finetune: --model, --data and --output are required\n");
        usage(stderr);
        return 2;
    }
    if (o.batch <= 0 || o.accum <= 0 || o.lora_r <= 0 || o.save_steps < 0 || o.warmup < 0 || o.lr < 0) {
        fprintf(stderr, "tuna finetune: --batch-size, --grad-accum and --lora-r must be positive; --save-steps, "
                        "--warmup-steps and --learning-rate not negative\n");
        return 2;
    }
    const bool tty = isatty(2) && !o.quiet;
    struct tuna_model *m = NULL;
    tuna_tokenizer *tok = NULL;
    struct tuna_chat_template *tmpl = NULL;
    tuna_dataset *ds = NULL;
    struct tuna_lora_adapter *init = NULL;
    tuna_trainer *t = NULL;
    FILE *mf = NULL;
    struct tuna_train_state ts = {0};
    char ckpt[4096] = "", *tbuf = NULL, metrics_path[4096];
    const char *targets[TUNA_PROJ_COUNT];
    int n_targets = 0;
    struct tuna_model_opts mo = o.mo;
    mo.threads = (int)o.threads;
    /* on a GPU the base is quantized as it is loaded (then uploaded 4-bit); on the CPU after */
    const bool q4_at_load = o.load4 && mo.device != TUNA_DEVICE_CPU;
    mo.load_in_4bit = q4_at_load;
    mo.weight_arena = o.offload; /* the memory mode: the weights in one arena (device.c) */
    mo.quiet = o.quiet;

    tuna_status st = TUNA_OK;
    if (o.targets_arg) {
        tbuf = strdup(o.targets_arg);
        n_targets = tbuf ? split_targets(tbuf, targets, TUNA_PROJ_COUNT) : 0;
        for (int i = 0; i < n_targets && !st; i++) {
            bool known = false;
            for (int p = 0; p < TUNA_PROJ_COUNT; p++)
                known |= !strcmp(targets[i], tuna_proj_name(p));
            if (!known)
                st = tuna_fail(TUNA_E_INVALID,
                               "--target-modules: unknown module '%s'; use q_proj, k_proj, v_proj, "
                               "o_proj, gate_proj, up_proj, down_proj",
                               targets[i]);
        }
    }
    /* resume: the checkpoint's adapter, moments, step and settings */
    if (!st && (o.resume || o.resume_from)) {
        if (o.resume_from)
            snprintf(ckpt, sizeof ckpt, "%s", o.resume_from);
        else
            st = tuna_checkpoint_latest(o.out, ckpt, sizeof ckpt);
        if (!st) st = tuna_checkpoint_read_state(ckpt, &ts);
        if (!st && (ts.batch_size != o.batch || ts.grad_accum != o.accum || ts.shuffle != o.shuffle ||
                    ts.seed != (uint64_t)o.seed))
            st = tuna_fail(TUNA_E_INVALID,
                           "%s was made with --batch-size %lld --grad-accum %lld --seed %llu%s; "
                           "resume with the same data order settings",
                           ckpt, (long long)ts.batch_size, (long long)ts.grad_accum, (unsigned long long)ts.seed,
                           ts.shuffle ? "" : " --no-shuffle");
        if (!st) st = tuna_lora_load(ckpt, &init);
    } else if (!st && o.init_adapter) {
        st = tuna_lora_load(o.init_adapter, &init);
    }
    if (!st) st = tuna_tokenizer_load(o.model, &tok);
    if (!st) {
        tuna_status cs = tuna_chat_load(o.model, &tmpl);
        if (cs == TUNA_E_NOT_FOUND)
            tmpl = NULL; /* text-only data needs no template */
        else
            st = cs;
    }
    if (!st) {
        struct tuna_dataset_opts dopt;
        tuna_dataset_opts_default(&dopt);
        dopt.format = o.format;
        dopt.train_on_responses_only = o.responses_only;
        dopt.max_seq_length = o.max_seq;
        dopt.packing = o.packing;
        st = tuna_dataset_load(o.data, tok, tmpl, &dopt, &ds);
    }
    if (!st) st = tuna_model_load(o.model, &mo, &m);
    if (!st && o.load4 && !q4_at_load) st = tuna_train_quantize_base(m);
    const int64_t N = ds ? (int64_t)tuna_dataset_size(ds) : 0, per_step = o.batch * o.accum;
    int64_t total =
        o.max_steps > 0 ? o.max_steps : (int64_t)ceil((o.epochs > 0 ? o.epochs : 1.0) * (double)N / (double)per_step);
    if (total < 1) total = 1;
    struct tuna_optim_opts oo;
    tuna_optim_opts_default(&oo);
    oo.lr = o.lr, oo.weight_decay = o.wd, oo.beta1 = o.b1, oo.beta2 = o.b2, oo.eps = o.eps;
    oo.warmup_steps = o.warmup, oo.total_steps = total, oo.max_grad_norm = o.clip;
    if (!st) st = tuna_lr_schedule_parse(o.sched, &oo.schedule);
    struct tuna_lora_train_opts lo;
    tuna_lora_train_opts_default(&lo);
    lo.r = o.lora_r, lo.alpha = o.alpha, lo.dropout = o.dropout, lo.use_rslora = o.rslora, lo.seed = (uint64_t)o.seed;
    lo.gradient_checkpointing = o.grad_ckpt || o.offload;
    lo.offload = o.offload;
    lo.targets = n_targets ? targets : NULL;
    lo.n_targets = n_targets;
    if (!st) st = tuna_trainer_new(m, &lo, &oo, init, &t);
    if (!st && ckpt[0]) st = tuna_trainer_load_optimizer(t, ckpt);
    if (!st) st = tuna_mkdir_p(o.out);
    if (!st) {
        snprintf(metrics_path, sizeof metrics_path, "%s", o.metrics ? o.metrics : "");
        if (!o.metrics) snprintf(metrics_path, sizeof metrics_path, "%s/metrics.jsonl", o.out);
        mf = fopen(metrics_path, ckpt[0] ? "a" : "w");
        if (!mf) st = tuna_fail(TUNA_E_IO, "cannot open the metrics file %s for writing", metrics_path);
    }
    int64_t step0 = t ? tuna_trainer_step_count(t) : 0;
    if (!st) {
        ts.step = step0, ts.max_steps = total, ts.batch_size = o.batch, ts.grad_accum = o.accum;
        ts.shuffle = o.shuffle, ts.seed = (uint64_t)o.seed;
        double *l = realloc(ts.losses, (size_t)(total > ts.n_losses ? total : ts.n_losses) * sizeof *l + 8);
        if (!l)
            st = tuna_fail_oom("loss history", (size_t)total * 8);
        else
            ts.losses = l;
        if (ts.n_losses > step0) ts.n_losses = step0; /* steps after the checkpoint are redone */
    }
    if (!st && !o.quiet) {
        char desc[512];
        tuna_dataset_describe(ds, desc, sizeof desc);
        fprintf(stderr, "data: %s\n", desc);
        fprintf(stderr, "model: %s (%s)%s; %lld trainable LoRA parameters\n", o.model, m->device_desc,
                o.load4 ? ", NF4 base" : "", (long long)tuna_trainer_param_count(t));
        fprintf(stderr,
                "steps %lld..%lld of %lld: %lld examples per step (batch %lld x accum %lld), lr %g (%s, "
                "warmup %lld)%s\n",
                (long long)step0 + 1, (long long)total, (long long)total, (long long)per_step, o.batch, o.accum, o.lr,
                o.sched, o.warmup, ckpt[0] ? ", resumed" : "");
    }
    size_t *idx = st ? NULL : malloc((size_t)o.batch * sizeof *idx);
    struct tuna_train_batch *mb = st ? NULL : calloc((size_t)o.accum, sizeof *mb);
    if (!st && (!idx || !mb)) st = tuna_fail_oom("batch", (size_t)o.batch * 8);
    double t_start = now_s();
    int64_t tokens_run = 0;
    for (int64_t s = step0; !st && s < total; s++) {
        for (int64_t a = 0; a < o.accum && !st; a++) {
            tuna_dataset_batch_indices(ds, s * o.accum + a, o.batch, o.shuffle, (uint64_t)o.seed, idx);
            st = tuna_dataset_make_batch(ds, idx, o.batch, &mb[a]);
        }
        struct tuna_step_stats ss;
        if (!st) st = tuna_trainer_step(t, mb, (int)o.accum, &ss);
        for (int64_t a = 0; a < o.accum; a++)
            tuna_train_batch_free(&mb[a]);
        if (st) break;
        tokens_run += ss.tokens;
        ts.losses[ts.n_losses++] = ss.loss;
        ts.step = ss.step;
        tuna_metrics_write(mf, &ss, (double)(ss.step * per_step) / (double)N);
        double el = now_s() - t_start;
        if (!o.quiet)
            tuna_progress_print(stderr, tty, ss.step, step0, total, ss.loss, ss.lr,
                                el > 0 ? (double)tokens_run / el : 0, el);
        if (o.save_steps > 0 && ss.step % o.save_steps == 0 && ss.step < total) {
            char where[4096];
            st = tuna_checkpoint_save(t, &ts, o.out, o.model, where, sizeof where);
            if (!st && !o.quiet && !tty) fprintf(stderr, "checkpoint %s\n", where);
        }
    }
    if (!st) st = write_final(t, o.out, o.model, o.overwrite || ckpt[0]);
    if (!st && ts.n_losses > 0) {
        char svg[4200];
        snprintf(svg, sizeof svg, "%s/loss.svg", o.out);
        st = tuna_loss_svg_write(svg, ts.losses, ts.n_losses, 1, "training loss");
        if (!st && !o.quiet)
            fprintf(stderr,
                    "adapter: %s (adapter_config.json, adapter_model.safetensors); metrics: %s; loss curve: "
                    "%s\n",
                    o.out, metrics_path, svg);
    }
    if (mf) fclose(mf);
    free(idx);
    free(mb);
    free(tbuf);
    tuna_train_state_free(&ts);
    tuna_trainer_free(t);
    tuna_lora_free(init);
    tuna_dataset_free(ds);
    tuna_chat_free(tmpl);
    tuna_tokenizer_free(tok);
    tuna_model_free(m);
    return st ? tuna_cli_fail("finetune", st) : 0;
}
