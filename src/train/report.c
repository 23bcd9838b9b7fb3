/* report.c — metrics lines, progress line and the loss-curve SVG (report.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/status.h"
#include "train/report.h"

void tuna_metrics_write(FILE *f, const struct tuna_step_stats *s, double epoch)
{
    double tps = s->seconds > 0 ? (double)s->tokens / s->seconds : 0;
    fprintf(f,
            "{\"step\": %lld, \"epoch\": %.4f, \"loss\": %.9g, \"grad_norm\": %.9g, \"learning_rate\": %.9g, "
            "\"tokens\": %lld, \"target_tokens\": %lld, \"tokens_per_second\": %.2f, \"seconds\": %.4f}\n",
            (long long)s->step, epoch, s->loss, s->grad_norm, s->lr, (long long)s->tokens, (long long)s->targets, tps,
            s->seconds);
    fflush(f);
}

static void fmt_time(char *buf, size_t cap, double s)
{
    if (!isfinite(s) || s < 0) s = 0;
    long long t = (long long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, cap, "%lldh%02lldm", t / 3600, t / 60 % 60);
    else
        snprintf(buf, cap, "%lldm%02llds", t / 60, t % 60);
}

void tuna_progress_print(FILE *f, bool tty, int64_t step, int64_t first_step, int64_t total, double loss, double lr,
                         double tok_s, double elapsed_s)
{
    enum { W = 20 };
    char bar[W + 1], eta[32], el[32];
    int64_t fill = total > 0 ? step * W / total : 0;
    for (int i = 0; i < W; i++)
        bar[i] = i < fill ? '#' : '.';
    bar[W] = '\0';
    fmt_time(eta, sizeof eta,
             step > first_step && total > step ? elapsed_s / (double)(step - first_step) * (double)(total - step) : 0);
    fmt_time(el, sizeof el, elapsed_s);
    fprintf(f, "%sstep %lld/%lld [%s] loss %.4f lr %.2e %.0f tok/s %s ETA %s%s", tty ? "\r" : "", (long long)step,
            (long long)total, bar, loss, lr, tok_s, el, eta, tty ? "  " : "\n");
    if (tty && step == total) fputc('\n', f);
    fflush(f);
}

/* a "nice" tick step for a range */
static double tick_step(double range, int want)
{
    double raw = range / want, mag = pow(10, floor(log10(raw))), r = raw / mag;
    return (r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10) * mag;
}

tuna_status tuna_loss_svg_write(const char *path, const double *loss, int64_t n, int64_t first_step, const char *title)
{
    if (n <= 0) return tuna_fail(TUNA_E_INVALID, "loss curve: no steps to draw");
    const double W = 720, H = 420, L = 70, R = 20, T = 40, B = 50;
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (isfinite(loss[i])) {
            lo = fmin(lo, loss[i]);
            hi = fmax(hi, loss[i]);
        }
    if (!isfinite(lo)) lo = 0, hi = 1;
    if (hi - lo < 1e-9) lo -= 0.5, hi += 0.5;
    double pad = (hi - lo) * 0.05;
    lo -= pad, hi += pad;
    size_t cap = 4096 + (title ? 2 * 5 * strlen(title) : 0) + (size_t)n * 40;
    char *s = malloc(cap);
    if (!s) return tuna_fail_oom("SVG", cap);
    size_t k = 0;
#define EMIT(...) (k += (size_t)snprintf(s + k, k < cap ? cap - k : 0, __VA_ARGS__))
    EMIT("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
         "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
         W, H, W, H);
    EMIT("<text x=\"%.0f\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">", W / 2);
    for (const char *c = title ? title : "training loss"; *c && k + 8 < cap / 2; c++) /* XML-escaped */
        EMIT("%s", *c == '&' ? "&amp;" : *c == '<' ? "&lt;" : *c == '>' ? "&gt;" : (char[2]){*c, 0});
    EMIT("</text>\n");
    double x0 = L, x1 = W - R, y0 = H - B, y1 = T;
    int64_t last = first_step + n - 1;
    double span = n > 1 ? (double)(last - first_step) : 1;
#define XS(step) (x0 + ((double)(step) - (double)first_step) / span * (x1 - x0))
#define YS(v) (y0 - ((v)-lo) / (hi - lo) * (y0 - y1))
    double ty = tick_step(hi - lo, 6);
    for (double v = ceil(lo / ty) * ty; v <= hi; v += ty) {
        EMIT("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", x0, YS(v), x1, YS(v));
        EMIT("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", x0 - 6, YS(v) + 4, v);
    }
    double tx = tick_step(span > 0 ? span : 1, 8);
    if (tx < 1) tx = 1;
    for (double st = ceil((double)first_step / tx) * tx; st <= (double)last; st += tx) {
        EMIT("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#eee\"/>\n", XS(st), y0, XS(st), y1);
        EMIT("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%g</text>\n", XS(st), y0 + 18, st);
    }
    EMIT("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#444\"/>\n", x0, y1,
         x1 - x0, y0 - y1);
    EMIT("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">step</text>\n", (x0 + x1) / 2, H - 12);
    EMIT("<text x=\"16\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 16 %.1f)\">loss</text>\n",
         (y0 + y1) / 2, (y0 + y1) / 2);
    EMIT("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.8\" points=\"");
    for (int64_t i = 0; i < n; i++)
        if (isfinite(loss[i])) EMIT("%.1f,%.1f ", XS(first_step + i), YS(loss[i]));
    EMIT("\"/>\n</svg>\n");
#undef XS
#undef YS
#undef EMIT
    tuna_status st = k < cap ? tuna_write_file_atomic(path, s, k) : tuna_fail(TUNA_E_INTERNAL, "SVG buffer too small");
    free(s);
    return st;
}
