/* report.h — what a training run shows and leaves behind: the per-step metrics line (JSONL),
 * the progress line on the terminal, and the loss curve as an SVG picture.
 */
#ifndef TUNA_TRAIN_REPORT_H
#define TUNA_TRAIN_REPORT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "train/trainer.h"
#include "tuna.h"

/* One JSON object on one line: step, epoch, loss, grad_norm, learning_rate, tokens,
 * tokens_per_second, seconds. Flushed. */
void tuna_metrics_write(FILE *f, const struct tuna_step_stats *s, double epoch);

/* "step 12/100 [####......] loss 5.2091 lr 2.00e-03 1234 tok/s ETA 1m02s". On a terminal the
 * line is rewritten in place (\r); elsewhere one line per call. first_step: the step this
 * run started from (a resumed run), for the ETA; elapsed_s counts from then. */
void tuna_progress_print(FILE *f, bool tty, int64_t step, int64_t first_step, int64_t total, double loss, double lr,
                         double tok_s, double elapsed_s);

/* Writes an SVG line chart of loss[n] against steps first_step.. (atomically). n == 0 is
 * refused. */
tuna_status tuna_loss_svg_write(const char *path, const double *loss, int64_t n, int64_t first_step, const char *title);

#endif
