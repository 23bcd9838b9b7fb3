/* graph.cu — the step block and CUDA graphs of whole decode steps (backend.h: step_block,
 * step_upload, graph_begin, graph_end).
 *
 * A decode step is ~300 kernel launches of a few microseconds each; launched one by one, the
 * host's launch cost and the gaps between kernels are a large part of the step. A graph replays
 * the whole chain with one launch. What makes a step replayable: every kernel argument is the
 * same each step — weights, activations and the KV cache stay where they are, and all per-step
 * metadata (token ids, positions, slots, block tables, RoPE frequencies) lives in the step block,
 * a region at a fixed place at the start of the metadata arenas that the caller rewrites and
 * uploads with one copy before replaying. Anything else a capture meets (an upload outside the
 * block, a buffer that has to grow, a sync) taints it: the capture is thrown away, the key is
 * marked, and the caller runs that step eagerly — a graph is an optimization, never a
 * different answer.
 *
 * Keys come from the caller (src/model/forward.c: batch size, buffers, KV cache); a key is
 * captured the second time it is seen (the first eager run grows every buffer), lazily, so
 * start-up stays fast. Graphs captured before the arenas moved (meta_gen) are recaptured.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cuda/cuda_internal.h"

struct cuda_graph_entry {
    uint64_t key;
    uint64_t gen;
    cudaGraphExec_t exec;
    bool never; /* a capture of this key was tainted: always eager */
};

/* TUNA_CUDA_GRAPHS=0 turns graphs off; =debug prints what happened when the backend is freed;
 * =steps also times the replayed greedy steps (tuna_cuda_step_mark). */
static int graphs_env(void)
{
    static int env = -1;
    if (env < 0) {
        const char *e = getenv("TUNA_CUDA_GRAPHS");
        env = e && strcmp(e, "0") == 0 ? 0 : e && strcmp(e, "debug") == 0 ? 2 : e && strcmp(e, "steps") == 0 ? 3 : 1;
    }
    return env;
}

static double host_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A replayed greedy step, as the stream and the host see it: sum[0] upload -> graph launch (the
 * step block's copy), sum[1] graph launch -> the wait for the ids (the graph, and the argmax where
 * it is not in the graph), both GPU time between events; sum[2] the host's time from the upload
 * call to the ids in hand; sum[3] from one step's upload call to the next one's (the period). */
void tuna_cuda_step_mark(tuna_backend *be, int point)
{
    if (graphs_env() != 3 || be->sticky || be->capturing) return;
    if (!be->steps.ev[0])
        for (int i = 0; i < 3; i++)
            if (cudaEventCreate(&be->steps.ev[i]) != cudaSuccess) return;
    if (point == 0) {
        const double now = host_seconds();
        if (be->steps.stage != 0) be->steps.prev_ok = false; /* the step before did not finish as one */
        be->steps.prev0 = be->steps.host0;
        be->steps.host0 = now;
        be->steps.stage = 1;
        cudaEventRecord(be->steps.ev[0], be->stream);
    } else if (point == be->steps.stage && point < 3) {
        be->steps.stage = point + 1;
        cudaEventRecord(be->steps.ev[point], be->stream);
    } else if (point == 3 && be->steps.stage == 3) {
        float a = 0, b = 0;
        be->steps.stage = 0;
        if (cudaEventElapsedTime(&a, be->steps.ev[0], be->steps.ev[1]) != cudaSuccess ||
            cudaEventElapsedTime(&b, be->steps.ev[1], be->steps.ev[2]) != cudaSuccess)
            return;
        const double now = host_seconds();
        be->steps.sum[0] += a * 1e-3;
        be->steps.sum[1] += b * 1e-3;
        be->steps.sum[2] += now - be->steps.host0;
        if (be->steps.prev_ok) be->steps.sum[3] += be->steps.host0 - be->steps.prev0, be->steps.nper++;
        be->steps.prev_ok = true;
        be->steps.n++;
    } else {
        be->steps.stage = 0; /* not a replayed greedy step */
        be->steps.prev_ok = false;
    }
}

bool tuna_cuda_capture_taint(tuna_backend *be)
{
    if (!be->capturing) return false;
    be->capture_tainted = true;
    return true;
}

void tuna_cuda_graphs_free(tuna_backend *be)
{
    if (graphs_env() >= 2)
        fprintf(stderr, "tuna: CUDA graphs: %d keys, %ld captured, %ld launches, %ld captures discarded\n", be->n_graphs,
                be->graph_stats[0], be->graph_stats[1], be->graph_stats[2]);
    if (graphs_env() == 3 && be->steps.n > 0 && be->steps.nper > 0) {
        const double n = (double)be->steps.n, np = (double)be->steps.nper;
        fprintf(stderr,
                "tuna: %ld replayed greedy steps, mean us: upload %.1f, graph + argmax %.1f (GPU events); upload call "
                "to ids on the host %.1f; period %.1f\n",
                be->steps.n, 1e6 * be->steps.sum[0] / n, 1e6 * be->steps.sum[1] / n, 1e6 * be->steps.sum[2] / n,
                1e6 * be->steps.sum[3] / np);
    }
    for (int i = 0; i < 3; i++)
        if (be->steps.ev[i]) cudaEventDestroy(be->steps.ev[i]);
    for (int i = 0; i < be->n_graphs; i++)
        if (be->graphs[i].exec) cudaGraphExecDestroy(be->graphs[i].exec);
    free(be->graphs);
    be->graphs = NULL;
    be->n_graphs = be->cap_graphs = 0;
}

void *tuna_cuda_step_block(tuna_backend *be, size_t bytes)
{
    if (be->sticky) return NULL;
    /* the previous step's kernels may still read the block: callers sync at the end of a step,
     * so this is normally free */
    if (cudaStreamQuery(be->stream) != cudaSuccess &&
        !tuna_cuda_check(be, cudaStreamSynchronize(be->stream), "cudaStreamSynchronize(step block)"))
        return NULL;
    bytes = (bytes + 255) & ~(size_t)255;
    if (bytes > be->step_cap) {
        size_t cap = be->step_cap ? be->step_cap : 16384;
        while (cap < bytes) cap *= 2;
        be->step_cap = cap;
        be->step_used = 0;
        be->meta_gen++; /* offsets of everything after the block change */
        if (!tuna_cuda_meta_reset(be, 4096)) return NULL;
    }
    return be->host_meta;
}

void tuna_cuda_step_upload(tuna_backend *be, size_t bytes)
{
    if (be->sticky) return;
    if (bytes > be->step_cap) {
        tuna_cuda_check(be, cudaErrorInvalidValue, "step block uploaded beyond its size");
        return;
    }
    be->step_used = bytes;
    tuna_cuda_step_mark(be, 0);
    if (bytes)
        tuna_cuda_check(be, cudaMemcpyAsync(be->meta.p, be->host_meta, bytes, cudaMemcpyHostToDevice, be->stream),
                        "cudaMemcpyAsync(step block)");
}

static struct cuda_graph_entry *find(tuna_backend *be, uint64_t key)
{
    for (int i = 0; i < be->n_graphs; i++)
        if (be->graphs[i].key == key) return &be->graphs[i];
    return NULL;
}

int tuna_cuda_graph_begin(tuna_backend *be, uint64_t key)
{
    if (!graphs_env() || be->graphs_off || be->sticky || be->capturing) return -1;
    struct cuda_graph_entry *g = find(be, key);
    if (g && g->exec && g->gen != be->meta_gen) {
        cudaGraphExecDestroy(g->exec);
        g->exec = NULL;
    }
    if (g && g->exec) {
        be->graph_stats[1]++;
        tuna_cuda_step_mark(be, 1);
        return tuna_cuda_check(be, cudaGraphLaunch(g->exec, be->stream), "cudaGraphLaunch") ? 1 : -1;
    }
    if (g && g->never) return -1;
    if (!g) { /* first sighting: eager, and remember the key */
        if (be->n_graphs == be->cap_graphs) {
            int cap = be->cap_graphs ? 2 * be->cap_graphs : 64;
            if (cap > 4096) return -1; /* a caller with endless keys: stay eager */
            struct cuda_graph_entry *n =
                (struct cuda_graph_entry *)realloc(be->graphs, (size_t)cap * sizeof *n);
            if (!n) return -1;
            be->graphs = n;
            be->cap_graphs = cap;
        }
        g = &be->graphs[be->n_graphs++];
        memset(g, 0, sizeof *g);
        g->key = key;
        return -1;
    }
    tuna_cuda_warm_join(be); /* an eager step's second stream cannot be joined inside the capture */
    if (cudaStreamBeginCapture(be->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        g->never = true;
        return -1;
    }
    be->capturing = true;
    be->capture_tainted = false;
    be->cur_graph = (int)(g - be->graphs);
    return 0;
}

bool tuna_cuda_graph_end(tuna_backend *be)
{
    if (!be->capturing) return false;
    cudaGraph_t graph = NULL;
    tuna_cuda_warm_join(be); /* a second stream forked inside the capture must join it */
    cudaError_t e = cudaStreamEndCapture(be->stream, &graph);
    be->capturing = false;
    struct cuda_graph_entry *g = &be->graphs[be->cur_graph];
    cudaGraphExec_t exec = NULL;
    if (e == cudaSuccess && graph && !be->capture_tainted && !be->sticky)
        e = cudaGraphInstantiate(&exec, graph, 0);
    else if (e == cudaSuccess)
        e = cudaErrorStreamCaptureInvalidated;
    if (graph) cudaGraphDestroy(graph);
    if (e != cudaSuccess || !exec) {
        cudaGetLastError(); /* a failed capture is not the engine's error: the step runs eagerly */
        g->never = true;
        be->graph_stats[2]++;
        return false;
    }
    g->exec = exec;
    g->gen = be->meta_gen;
    be->graph_stats[0]++;
    be->graph_stats[1]++;
    return tuna_cuda_check(be, cudaGraphLaunch(exec, be->stream), "cudaGraphLaunch");
}

extern "C" void tuna_cuda_set_graphs(tuna_backend *be, bool on) { be->graphs_off = !on; }

extern "C" void tuna_cuda_graph_stats(const tuna_backend *be, long stats[3])
{
    for (int i = 0; i < 3; i++) stats[i] = be->graph_stats[i];
}
