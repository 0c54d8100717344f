/* A bundle's manifest: read, checked and every file verified the way the Python loader does. */
#ifndef SG_BUNDLE_H
#define SG_BUNDLE_H

#include <stdint.h>

#include "common.h"

typedef enum { PHASE_BOTH, PHASE_PREFILL, PHASE_DECODE } sg_phase;

typedef struct {
    char *name, *role, *path; /* path: absolute or relative to the working directory */
    sg_phase phase;
    int32_t first_layer, end_layer; /* decoders: layers [first, end) */
} sg_engine_spec;

typedef struct {
    char *head, *head_system, *generation_prompt;
    char *open_user, *open_assistant;
    char *close_system, *close_user, *close_assistant;
    /* rules (steerguard/export/chat_pieces.py), all off in a bundle without them */
    int trim;               /* strip every content as Python's str.strip() does, but a folded system prompt */
    int fold;               /* the system prompt + system_separator open the first message after it */
    char *system_separator; /* fold only; head_system and close_system are then absent */
    int alternate;          /* turns after the system message must go user, assistant, user, ... */
} sg_chat_pieces;

typedef struct {
    char *name; /* "strict", "balanced", "permissive", ... */
    double tau; /* as the manifest's JSON holds it: the Python runtime compares risks with the same double */
} sg_operating_point;

typedef enum { SCORE_WINDOW, SCORE_EMA, SCORE_MAX } sg_score_kind;

/* guard.answer: the answer guard's running score over the decode engine's answer_risk, its named
 * thresholds and the settings a model starts with (runtime/answer.py, runtime/model.py: AnswerGuard) */
typedef struct {
    int present;      /* 0: no answer guard (a bundle exported before it, or calibrated without one) */
    char *score_spec; /* "window:8", "ema:0.9", "max" as the manifest writes it */
    sg_score_kind score;
    int32_t window;             /* SCORE_WINDOW: N */
    double decay;               /* SCORE_EMA: F */
    double tau;                 /* guard.answer.tau */
    sg_operating_point *points; /* lowest tau first; none recorded: balanced = tau */
    size_t n_points;
    int32_t default_point; /* the point a model starts at: default_operating_point's (else balanced's), or -1 */
    int32_t points_recorded;
    int32_t enabled, hold, restart; /* the manifest's defaults: enabled, hold (tokens), switch == "restart" */
} sg_answer_spec;

typedef struct {
    char *root, *name, *precision;
    int32_t num_layers, hidden_size, vocab_size, kv_heads, head_dim, context;
    int32_t guarded, split_layer, risk_per_token;
    double tau;                 /* guard.tau: the threshold the model starts at */
    sg_operating_point *points; /* the guard's named thresholds, lowest tau first; an older bundle's: balanced = tau */
    size_t n_points;
    int32_t default_point;   /* index of guard.default_operating_point in points, or -1 */
    int32_t points_recorded; /* 0 when points holds only the balanced entry made from tau (an older bundle) */
    sg_answer_spec answer;
    sg_engine_spec *engines;
    size_t n_engines;
    int32_t *stop_ids;
    size_t n_stop_ids;
    char *tokenizer_path;
    int has_chat;
    sg_chat_pieces chat;
} sg_bundle;

sg_status sg_bundle_load(const char *root, int verify_hashes, sg_bundle *out);
void sg_bundle_free(sg_bundle *b);

#endif
