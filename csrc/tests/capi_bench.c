/* Speed and memory of libsteerguard on one bundle, for bench/capi.py:
 *
 *   capi_bench BUNDLE THREADS NEW_TOKENS RUNS ID ID ID ...
 *
 * loads the bundle, answers the prompt ids RUNS times (greedy, the end of turn ignored so every run
 * decodes NEW_TOKENS tokens) and prints one JSON line: load seconds, each run's time to first token and
 * decode tokens/s, and the process's peak resident memory. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "steerguard.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* VmHWM, this process's own high-water mark (getrusage's ru_maxrss keeps the parent's across exec) */
static long peak_rss_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s BUNDLE THREADS NEW_TOKENS RUNS ID...\n", argv[0]);
        return 2;
    }
    size_t n = (size_t)(argc - 5);
    int32_t *ids = malloc(n * sizeof *ids);
    for (size_t i = 0; i < n; i++) ids[i] = (int32_t)atoi(argv[5 + i]);
    sg_load_options options = sg_load_options_default();
    options.threads = atoi(argv[2]);
    double t0 = now();
    sg_model *model;
    if (sg_model_load(argv[1], &options, &model) != SG_OK) {
        fprintf(stderr, "error: %s\n", sg_last_error());
        return 1;
    }
    double load_s = now() - t0;
    sg_sampling sampling = sg_sampling_default();
    sampling.max_new_tokens = atoi(argv[3]);
    sampling.ignore_eos = 1;
    printf("{\"load_s\": %.4f, \"runs\": [", load_s);
    for (int r = 0; r < atoi(argv[4]); r++) {
        sg_result result;
        if (sg_generate_ids(model, ids, n, &sampling, NULL, NULL, &result) != SG_OK) {
            fprintf(stderr, "error: %s\n", sg_last_error());
            return 1;
        }
        printf("%s{\"ttft_ms\": %.3f, \"decode_tok_s\": %.3f, \"tokens\": %zu, \"fired\": %d}", r ? ", " : "",
               1000 * result.first_token_seconds, (double)(result.n_tokens - 1) / result.decode_seconds,
               result.n_tokens, result.fired);
        sg_result_free(&result);
    }
    printf("], \"peak_rss_mb\": %.1f}\n", peak_rss_kb() / 1024.0);
    sg_model_free(model);
    free(ids);
    return 0;
}
