/* Next-token choice for the generation loop. */
#ifndef SG_SAMPLING_H
#define SG_SAMPLING_H

#include <stdint.h>

#include "common.h"

typedef struct {
    uint64_t s[4];
} sg_rng;

typedef struct {
    double p;
    int32_t id;
} sg_prob;

void sg_rng_seed(sg_rng *r, uint64_t seed);
sg_status sg_check_sampling(const sg_sampling *s);
/* The next token from one row of logits; `scratch` holds `vocab` entries (NULL when greedy). */
int32_t sg_sample(const float *logits, int32_t vocab, const sg_sampling *s, sg_rng *r, sg_prob *scratch);

#endif
