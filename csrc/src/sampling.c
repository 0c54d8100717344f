/* Next-token choice: greedy, or temperature / top-k / top-p sampling (the rules of
 * steerguard/runtime/sampling.py) with a seeded xoshiro256** generator. */
#include "sampling.h"

#include <math.h>
#include <stdlib.h>

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void sg_rng_seed(sg_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static double rng_uniform(sg_rng *r) {
    uint64_t *s = r->s, result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t, s[3] = rotl(s[3], 45);
    return (double)(result >> 11) * 0x1.0p-53;
}

static int by_prob_desc(const void *a, const void *b) {
    const sg_prob *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id < y->id ? -1 : x->id > y->id;
}

int32_t sg_sample(const float *logits, int32_t vocab, const sg_sampling *s, sg_rng *r, sg_prob *scratch) {
    int32_t best = 0;
    for (int32_t i = 1; i < vocab; i++)
        if (logits[i] > logits[best]) best = i;
    if (s->temperature == 0) return best;
    double top = logits[best] / s->temperature, kth = -INFINITY;
    for (int32_t i = 0; i < vocab; i++) scratch[i] = (sg_prob){logits[i] / s->temperature, i};
    if (s->top_k > 0 && s->top_k < vocab) {
        qsort(scratch, (size_t)vocab, sizeof *scratch, by_prob_desc);
        kth = scratch[s->top_k - 1].p;
        for (int32_t i = 0; i < vocab; i++) scratch[i] = (sg_prob){logits[i] / s->temperature, i};
    }
    double total = 0;
    for (int32_t i = 0; i < vocab; i++) {
        scratch[i].p = scratch[i].p < kth ? 0 : exp(scratch[i].p - top);
        total += scratch[i].p;
    }
    qsort(scratch, (size_t)vocab, sizeof *scratch, by_prob_desc);
    int32_t keep = vocab;
    if (s->top_p < 1) {
        double cum = 0;
        for (int32_t i = 0; i < vocab; i++) {
            if (cum > s->top_p * total) {
                keep = i;
                break;
            }
            cum += scratch[i].p;
        }
    }
    double kept = 0;
    for (int32_t i = 0; i < keep; i++) kept += scratch[i].p;
    double u = rng_uniform(r) * kept, cum = 0;
    for (int32_t i = 0; i < keep; i++) {
        cum += scratch[i].p;
        if (u < cum) return scratch[i].id;
    }
    return scratch[keep - 1].id;
}

sg_sampling sg_sampling_default(void) {
    return (sg_sampling){.max_new_tokens = 128,
                         .temperature = 0,
                         .top_k = 0,
                         .top_p = 1,
                         .seed = 0,
                         .stop = NULL,
                         .n_stop = 0,
                         .ignore_eos = 0};
}

sg_status sg_check_sampling(const sg_sampling *s) {
    if (s->max_new_tokens < 1)
        return sg_fail(SG_ERR_INVALID_ARGUMENT, "max_new_tokens must be >= 1, got %d", s->max_new_tokens);
    if (!(s->temperature >= 0) || !(s->top_p > 0 && s->top_p <= 1) || s->top_k < 0)
        return sg_fail(SG_ERR_INVALID_ARGUMENT, "temperature must be >= 0, top_p in (0, 1], top_k >= 0");
    if (s->n_stop && !s->stop) return sg_fail(SG_ERR_INVALID_ARGUMENT, "n_stop is %zu but stop is NULL", s->n_stop);
    for (size_t i = 0; i < s->n_stop; i++)
        if (!s->stop[i] || !*s->stop[i]) return sg_fail(SG_ERR_INVALID_ARGUMENT, "stop string %zu is NULL or empty", i);
    return SG_OK;
}
