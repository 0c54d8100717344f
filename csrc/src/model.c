/* The guarded model's public API: load a bundle into onnxruntime, prefill a prompt into the KV cache
 * (the prober's risk comes out of the engine at the split layer), decide, decode through the plain or
 * the refusal head. Same loop as steerguard/runtime/model.py, at batch 1. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "sampling.h"

static void start_threshold(sg_model *m);
static void start_answer_guard(sg_model *m);

void sg_model_free(sg_model *m) {
    if (!m) return;
    for (size_t i = 0; i < m->n_engines; i++) {
        sg_engine *e = &m->engines[i];
        if (e->session) sg_ort->ReleaseSession(e->session);
        sg_free_names(e->inputs, e->n_inputs);
        sg_free_names(e->outputs, e->n_outputs);
    }
    int layers = m->bundle.num_layers;
    sg_free_names(m->past_key, (size_t)layers);
    sg_free_names(m->past_value, (size_t)layers);
    sg_free_names(m->present_key, (size_t)layers);
    sg_free_names(m->present_value, (size_t)layers);
    if (m->cpu) sg_ort->ReleaseMemoryInfo(m->cpu);
    free(m->engines);
    free(m->prefill);
    free(m->decode);
    sg_tokenizer_free(m->tokenizer);
    sg_bundle_free(&m->bundle);
    free(m);
    sg_env_release();
}

sg_load_options sg_load_options_default(void) { return (sg_load_options){.threads = 0, .verify_hashes = 1}; }

sg_status sg_model_load(const char *bundle_dir, const sg_load_options *options, sg_model **out) {
    sg_clear_error();
    if (!bundle_dir || !out)
        return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_model_load: bundle_dir and out must not be NULL");
    *out = NULL;
    sg_load_options o = options ? *options : sg_load_options_default();
    if (o.threads < 0) return sg_fail(SG_ERR_INVALID_ARGUMENT, "threads must be >= 0 (0 = all cores)");
    sg_status st = sg_env_acquire(o.threads);
    if (st != SG_OK) return st;
    sg_model *m = calloc(1, sizeof *m);
    if (!m) {
        sg_env_release();
        return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    }
    st = sg_bundle_load(bundle_dir, o.verify_hashes, &m->bundle);
    if (st == SG_OK) m->tokenizer = sg_tokenizer_load(m->bundle.tokenizer_path, &st);
    if (st == SG_OK) st = sg_engines_load(m);
    if (st == SG_OK) {
        int n = m->bundle.num_layers;
        m->past_key = sg_layer_names(n, "past_key_values.%d.key");
        m->past_value = sg_layer_names(n, "past_key_values.%d.value");
        m->present_key = sg_layer_names(n, "present.%d.key");
        m->present_value = sg_layer_names(n, "present.%d.value");
        for (int i = 0; i < n && st == SG_OK; i++)
            if (!m->past_key || !m->past_value || !m->present_key || !m->present_value || !m->past_key[i] ||
                !m->past_value[i] || !m->present_key[i] || !m->present_value[i])
                st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    }
    if (st != SG_OK) {
        sg_model_free(m);
        return st;
    }
    start_threshold(m);
    start_answer_guard(m);
    *out = m;
    return SG_OK;
}

/* ---- the guard's threshold ---------------------------------------------------------------------- */

#define GUARD_TAU 0xFFFFFFFFu /* the threshold word's "which" for the bundle's own guard.tau */

static void set_threshold(sg_model *m, uint32_t which, float explicit_tau) {
    uint32_t bits;
    memcpy(&bits, &explicit_tau, sizeof bits);
    atomic_store(&m->threshold, (uint64_t)which << 32 | bits);
}

/* The current threshold as a double (an operating point's and the bundle's exactly as the manifest holds
 * them, as the Python runtime compares), and (when `point` is given) its operating point's index, or -1. */
static double threshold(const sg_model *m, int32_t *point) {
    uint64_t word = atomic_load(&((sg_model *)m)->threshold);
    uint32_t which = (uint32_t)(word >> 32), bits = (uint32_t)word;
    if (point) *point = which && which != GUARD_TAU ? (int32_t)which - 1 : -1;
    if (which == GUARD_TAU) return m->bundle.tau;
    if (which) return m->bundle.points[which - 1].tau;
    float tau;
    memcpy(&tau, &bits, sizeof tau);
    return tau;
}

/* The bundle's own threshold: guard.tau, named after the default operating point when it is that point's
 * (runtime/model.py: set_operating_point(None)). */
static void start_threshold(sg_model *m) {
    const sg_bundle *b = &m->bundle;
    int32_t d = b->guarded ? b->default_point : -1;
    set_threshold(m, d >= 0 && b->points[d].tau == b->tau ? (uint32_t)d + 1 : GUARD_TAU, 0.0f);
}

static sg_status require_guard(const sg_model *m, const char *what) {
    if (!m) return sg_fail(SG_ERR_INVALID_ARGUMENT, "%s: NULL model", what);
    if (!m->bundle.guarded)
        return sg_fail(SG_ERR_NO_GUARD, "this bundle has no guard, so it has no operating point to choose");
    return SG_OK;
}

sg_status sg_model_set_operating_point(sg_model *m, const char *name) {
    sg_clear_error();
    sg_status st = require_guard(m, "sg_model_set_operating_point");
    if (st != SG_OK) return st;
    if (!name) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_model_set_operating_point: NULL name");
    const sg_bundle *b = &m->bundle;
    for (size_t i = 0; i < b->n_points; i++)
        if (!strcmp(b->points[i].name, name)) {
            set_threshold(m, (uint32_t)i + 1, 0.0f);
            return SG_OK;
        }
    if (!b->points_recorded && (!strcmp(name, "strict") || !strcmp(name, "permissive")))
        return sg_fail(SG_ERR_INVALID_ARGUMENT,
                       "this bundle's guard has no operating points (calibrated before them): only balanced "
                       "(tau %.3f) is available, or give a tau between 0 and 1",
                       b->points[0].tau);
    sg_buf names = {0};
    for (size_t i = 0; i < b->n_points; i++)
        if ((i && sg_buf_append_str(&names, ", ")) || sg_buf_append_str(&names, b->points[i].name)) {
            sg_buf_free(&names);
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        }
    st = sg_fail(SG_ERR_INVALID_ARGUMENT,
                 "unknown operating point '%.64s': this bundle has %s, or give a tau "
                 "between 0 and 1",
                 name, names.data ? names.data : "");
    sg_buf_free(&names);
    return st;
}

sg_status sg_model_set_tau(sg_model *m, float tau) {
    sg_clear_error();
    sg_status st = require_guard(m, "sg_model_set_tau");
    if (st != SG_OK) return st;
    if (!(tau >= 0.0f && tau <= 1.0f)) /* NaN fails too */
        return sg_fail(SG_ERR_INVALID_ARGUMENT, "tau must be between 0 and 1, got %g", (double)tau);
    set_threshold(m, 0, tau);
    return SG_OK;
}

sg_status sg_model_operating_point_get(const sg_model *m, int32_t index, const char **name, float *tau) {
    sg_clear_error();
    if (!m) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_model_operating_point_get: NULL model");
    if (index < 0 || (size_t)index >= m->bundle.n_points)
        return sg_fail(SG_ERR_INVALID_ARGUMENT, "operating point %d does not exist: this bundle has %zu", index,
                       m->bundle.n_points);
    if (name) *name = m->bundle.points[index].name;
    if (tau) *tau = (float)m->bundle.points[index].tau;
    return SG_OK;
}

sg_status sg_model_info_get(const sg_model *m, sg_model_info *out) {
    if (!m || !out) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_model_info_get: model and out must not be NULL");
    const sg_bundle *b = &m->bundle;
    int32_t point = -1;
    float tau = (float)threshold(m, &point);
    *out = (sg_model_info){b->name,
                           b->precision,
                           b->num_layers,
                           b->vocab_size,
                           b->context,
                           b->guarded,
                           b->split_layer,
                           tau,
                           point >= 0 ? b->points[point].name : NULL,
                           (int32_t)b->n_points};
    return SG_OK;
}

/* ---- the answer guard's settings ------------------------------------------------------------------ */

/* the answer threshold word: as `threshold`, its "which" an index + 1 into bundle.answer.points, 0 for an
 * explicit tau, or GUARD_TAU for guard.answer.tau */
static void set_answer_threshold(sg_model *m, uint32_t which, float explicit_tau) {
    uint32_t bits;
    memcpy(&bits, &explicit_tau, sizeof bits);
    atomic_store(&m->answer_threshold, (uint64_t)which << 32 | bits);
}

static double answer_threshold(const sg_model *m, int32_t *point) {
    uint64_t word = atomic_load(&((sg_model *)m)->answer_threshold);
    uint32_t which = (uint32_t)(word >> 32), bits = (uint32_t)word;
    if (point) *point = which && which != GUARD_TAU ? (int32_t)which - 1 : -1;
    if (which == GUARD_TAU) return m->bundle.answer.tau;
    if (which) return m->bundle.answer.points[which - 1].tau;
    float tau;
    memcpy(&tau, &bits, sizeof tau);
    return tau;
}

#define MODE_ENABLED 1u
#define MODE_RESTART 2u

static uint64_t mode_word(int enabled, int restart, int32_t hold) {
    return (enabled ? MODE_ENABLED : 0) | (restart ? MODE_RESTART : 0) | (uint64_t)(uint32_t)hold << 32;
}

/* Replace the bits `mask` of the mode word with `bits`, whatever another thread sets beside them. */
static void update_mode(sg_model *m, uint64_t mask, uint64_t bits) {
    uint64_t old = atomic_load(&m->answer_mode);
    while (!atomic_compare_exchange_weak(&m->answer_mode, &old, (old & ~mask) | bits)) {
    }
}

/* The bundle's settings (runtime/model.py: GuardedModel.__init__): enabled, hold and switch as guard.answer
 * says, the threshold its default operating point's (balanced). */
static void start_answer_guard(sg_model *m) {
    const sg_answer_spec *a = &m->bundle.answer;
    if (!a->present) {
        atomic_store(&m->answer_mode, 0);
        set_answer_threshold(m, 0, NAN);
        return;
    }
    atomic_store(&m->answer_mode, mode_word(a->enabled, a->restart, a->hold));
    set_answer_threshold(m, a->default_point >= 0 ? (uint32_t)a->default_point + 1 : GUARD_TAU, 0.0f);
}

static sg_status require_answer_guard(const sg_model *m, const char *what) {
    if (!m) return sg_fail(SG_ERR_INVALID_ARGUMENT, "%s: NULL model", what);
    if (!m->bundle.answer.present)
        return sg_fail(SG_ERR_UNSUPPORTED, "this bundle has no answer guard (exported before it, or calibrated "
                                           "without one): export it again to watch answers");
    return SG_OK;
}

sg_status sg_model_answer_guard_get(const sg_model *m, sg_answer_guard_info *out) {
    sg_clear_error();
    if (!m || !out)
        return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_model_answer_guard_get: model and out must not be NULL");
    const sg_answer_spec *a = &m->bundle.answer;
    if (!a->present) {
        *out = (sg_answer_guard_info){.tau = NAN};
        return SG_OK;
    }
    uint64_t mode = atomic_load(&((sg_model *)m)->answer_mode);
    int32_t point = -1;
    float tau = (float)answer_threshold(m, &point);
    *out = (sg_answer_guard_info){.available = 1,
                                  .enabled = (mode & MODE_ENABLED) != 0,
                                  .tau = tau,
                                  .operating_point = point >= 0 ? a->points[point].name : NULL,
                                  .hold = (int32_t)(uint32_t)(mode >> 32),
                                  .switch_mode = mode & MODE_RESTART ? SG_ANSWER_RESTART : SG_ANSWER_CONTINUE,
                                  .score = a->score_spec,
                                  .n_operating_points = (int32_t)a->n_points};
    return SG_OK;
}

sg_status sg_model_set_answer_guard(sg_model *m, int32_t enabled) {
    sg_clear_error();
    if (!m) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_model_set_answer_guard: NULL model");
    if (enabled != 0 && enabled != 1)
        return sg_fail(SG_ERR_INVALID_ARGUMENT, "the answer guard is on (1) or off (0), not %d", enabled);
    if (!enabled && !m->bundle.answer.present) return SG_OK; /* off already */
    sg_status st = require_answer_guard(m, "sg_model_set_answer_guard");
    if (st != SG_OK) return st;
    update_mode(m, MODE_ENABLED, enabled ? MODE_ENABLED : 0);
    return SG_OK;
}

sg_status sg_model_set_answer_operating_point(sg_model *m, const char *name) {
    sg_clear_error();
    sg_status st = require_answer_guard(m, "sg_model_set_answer_operating_point");
    if (st != SG_OK) return st;
    const sg_answer_spec *a = &m->bundle.answer;
    for (size_t i = 0; name && i < a->n_points; i++)
        if (!strcmp(a->points[i].name, name)) {
            set_answer_threshold(m, (uint32_t)i + 1, 0.0f);
            return SG_OK;
        }
    sg_buf names = {0};
    for (size_t i = 0; i < a->n_points; i++)
        if ((i && sg_buf_append_str(&names, ", ")) || sg_buf_append_str(&names, a->points[i].name)) {
            sg_buf_free(&names);
            return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        }
    if (name)
        st = sg_fail(SG_ERR_INVALID_ARGUMENT,
                     "unknown operating point '%.64s': this bundle has %s, or give a tau "
                     "between 0 and 1",
                     name, names.data ? names.data : "");
    else
        st = sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_model_set_answer_operating_point: NULL name: this bundle has %s",
                     names.data ? names.data : "");
    sg_buf_free(&names);
    return st;
}

sg_status sg_model_set_answer_tau(sg_model *m, float tau) {
    sg_clear_error();
    sg_status st = require_answer_guard(m, "sg_model_set_answer_tau");
    if (st != SG_OK) return st;
    if (!(tau >= 0.0f && tau <= 1.0f)) /* NaN fails too */
        return sg_fail(SG_ERR_INVALID_ARGUMENT, "tau must be between 0 and 1, got %g", (double)tau);
    set_answer_threshold(m, 0, tau);
    return SG_OK;
}

sg_status sg_model_set_answer_hold(sg_model *m, int32_t tokens) {
    sg_clear_error();
    sg_status st = require_answer_guard(m, "sg_model_set_answer_hold");
    if (st != SG_OK) return st;
    if (tokens < 0) return sg_fail(SG_ERR_INVALID_ARGUMENT, "hold is a number of tokens (0 or more), not %d", tokens);
    update_mode(m, 0xFFFFFFFF00000000u, (uint64_t)(uint32_t)tokens << 32);
    return SG_OK;
}

sg_status sg_model_set_answer_switch(sg_model *m, sg_answer_switch mode) {
    sg_clear_error();
    sg_status st = require_answer_guard(m, "sg_model_set_answer_switch");
    if (st != SG_OK) return st;
    if (mode != SG_ANSWER_CONTINUE && mode != SG_ANSWER_RESTART)
        return sg_fail(SG_ERR_INVALID_ARGUMENT,
                       "the answer guard switches by continue (SG_ANSWER_CONTINUE) or restart (SG_ANSWER_RESTART), "
                       "not %d",
                       (int)mode);
    update_mode(m, MODE_RESTART, mode == SG_ANSWER_RESTART ? MODE_RESTART : 0);
    return SG_OK;
}

sg_status sg_model_answer_operating_point_get(const sg_model *m, int32_t index, const char **name, float *tau) {
    sg_clear_error();
    sg_status st = require_answer_guard(m, "sg_model_answer_operating_point_get");
    if (st != SG_OK) return st;
    const sg_answer_spec *a = &m->bundle.answer;
    if (index < 0 || (size_t)index >= a->n_points)
        return sg_fail(SG_ERR_INVALID_ARGUMENT, "answer operating point %d does not exist: this bundle has %zu", index,
                       a->n_points);
    if (name) *name = a->points[index].name;
    if (tau) *tau = (float)a->points[index].tau;
    return SG_OK;
}

/* One answer's running score, fed one token risk at a time (runtime/answer.py: AnswerWatch): the window's
 * mean is summed in order in double, as the Python runtime does. */
typedef struct {
    const sg_answer_spec *spec;
    double tau;
    double *risks; /* window: the last N risks, a ring */
    int64_t seen;  /* risks pushed */
    double ema, max, value, peak;
    int judged; /* value and peak hold a score */
} answer_watch;

/* Add the next token's risk; 1 when the answer must switch to the refusal head now. */
static int watch_push(answer_watch *w, float risk) {
    const sg_answer_spec *a = w->spec;
    double r = risk;
    if (a->score == SCORE_WINDOW) w->risks[w->seen % a->window] = r;
    w->seen++;
    if (!isfinite(r)) { /* the guard fails closed */
        w->value = w->peak = INFINITY;
        w->judged = 1;
        return 1;
    }
    double value;
    if (a->score == SCORE_WINDOW) {
        if (w->seen < a->window) return 0;
        double sum = 0.0;
        for (int64_t k = w->seen - a->window; k < w->seen; k++) sum += w->risks[k % a->window];
        value = sum / a->window;
    } else if (a->score == SCORE_EMA) {
        w->ema = a->decay * w->ema + (1.0 - a->decay) * r;
        value = w->ema;
    } else {
        w->max = w->seen == 1 || r > w->max ? r : w->max;
        value = w->max;
    }
    w->value = value;
    w->peak = !w->judged || value > w->peak ? value : w->peak;
    w->judged = 1;
    return !(value < w->tau);
}

static int decide(const sg_model *m, float risk, double tau) {
    return m->bundle.guarded && !(isfinite(risk) && (double)risk < tau); /* the guard fails closed */
}

/* ---- generation ---------------------------------------------------------------------------------- */

typedef struct { /* everything one decode step binds, made once per answer */
    int64_t token;
    float answer_risk; /* the answer guard's risk of the token just fed (when the answer is watched) */
    OrtValue *token_value, *x_value, **hidden_values, *logits_value, *last_value, *answer_value;
    float *x, **hidden, *logits; /* hidden[n_hidden - 1]: the last decoder's output, which the heads read */
    size_t n_hidden;
} step_buffers;

static void step_free(step_buffers *s) {
    OrtValue *values[] = {s->token_value, s->x_value, s->logits_value, s->last_value, s->answer_value};
    for (size_t i = 0; i < 5; i++)
        if (values[i]) sg_ort->ReleaseValue(values[i]);
    for (size_t i = 0; i < s->n_hidden; i++) {
        if (s->hidden_values && s->hidden_values[i]) sg_ort->ReleaseValue(s->hidden_values[i]);
        if (s->hidden) free(s->hidden[i]);
    }
    free(s->hidden_values);
    free(s->hidden);
    free(s->x);
    free(s->logits);
    memset(s, 0, sizeof *s);
}

static sg_status step_new(const sg_model *m, step_buffers *s) {
    memset(s, 0, sizeof *s);
    int64_t d = m->bundle.hidden_size, v = m->bundle.vocab_size;
    int64_t token_shape[2] = {1, 1}, x_shape[3] = {1, 1, d}, row_shape[2] = {1, d}, logits_shape[2] = {1, v};
    s->n_hidden = m->n_decode;
    s->x = calloc((size_t)d, sizeof(float));
    s->logits = calloc((size_t)v, sizeof(float));
    s->hidden = calloc(s->n_hidden, sizeof *s->hidden);
    s->hidden_values = calloc(s->n_hidden, sizeof *s->hidden_values);
    if (!s->x || !s->logits || !s->hidden || !s->hidden_values) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    sg_status st =
        sg_tensor(m, &s->token, sizeof s->token, token_shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &s->token_value);
    if (st == SG_OK)
        st = sg_tensor(m, s->x, (size_t)d * 4, x_shape, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &s->x_value);
    for (size_t i = 0; i < s->n_hidden && st == SG_OK; i++) {
        if (!(s->hidden[i] = calloc((size_t)d, sizeof(float)))) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        st = sg_tensor(m, s->hidden[i], (size_t)d * 4, x_shape, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                       &s->hidden_values[i]);
    }
    if (st == SG_OK)
        st = sg_tensor(m, s->logits, (size_t)v * 4, logits_shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                       &s->logits_value);
    /* the head reads the last hidden state as (1, d): a second view of the same buffer */
    if (st == SG_OK)
        st = sg_tensor(m, s->hidden[s->n_hidden - 1], (size_t)d * 4, row_shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                       &s->last_value);
    /* answer_risk: (batch, sequence) = (1, 1) on a decode step */
    if (st == SG_OK)
        st = sg_tensor(m, &s->answer_risk, sizeof s->answer_risk, token_shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                       &s->answer_value);
    return st;
}

/* Logits of `hidden` (d floats, copied into the head's input buffer) through the plain head, or
 * through the refusal transform first when the guard fired. */
static sg_status next_logits(const sg_model *m, step_buffers *s, const float *hidden, int fired) {
    size_t d = (size_t)m->bundle.hidden_size;
    float *row = s->hidden[s->n_hidden - 1];
    if (row != hidden) memcpy(row, hidden, d * sizeof(float));
    const char *hidden_name = "hidden";
    sg_status st = SG_OK;
    if (fired) {
        const char *steered_name = "steered";
        OrtValue *steered = NULL;
        st = sg_ort_check(sg_ort->Run(m->refusal->session, NULL, &hidden_name, (const OrtValue *const *)&s->last_value,
                                      1, &steered_name, 1, &steered),
                          "refusal");
        if (st == SG_OK) memcpy(row, sg_value_floats(steered), d * sizeof(float));
        if (steered) sg_ort->ReleaseValue(steered);
    }
    const char *logits_name = "logits";
    if (st == SG_OK)
        st = sg_ort_check(sg_ort->Run(m->head->session, NULL, &hidden_name, (const OrtValue *const *)&s->last_value, 1,
                                      &logits_name, 1, &s->logits_value),
                          "head");
    return st;
}

/* Feed `token` at position length - 1; with `watched`, the answer guard's risk of it lands in s->answer_risk. */
static sg_status decode_one_token(const sg_model *m, step_buffers *s, sg_kv_cache *c, int32_t token, int32_t length,
                                  int watched) {
    s->token = token;
    const char *ids_name = m->embed->inputs[0], *embed_out = m->embed->outputs[0];
    sg_status st = sg_ort_check(sg_ort->Run(m->embed->session, NULL, &ids_name,
                                            (const OrtValue *const *)&s->token_value, 1, &embed_out, 1, &s->x_value),
                                "embed");
    sg_attention att = {length - 1, (int32_t)c->max_len};
    OrtValue *x = s->x_value;
    for (size_t k = 0; k < m->n_decode && st == SG_OK; k++) {
        OrtValue *out = NULL;
        OrtValue *answer = watched && k == m->answer_engine ? s->answer_value : NULL;
        st = sg_run_decoder(m, m->decode[k], x, &att, c, s->hidden_values[k], &out, NULL, answer);
        x = s->hidden_values[k];
    }
    return st;
}

typedef struct {
    sg_buf bytes;   /* every generated token's bytes */
    sg_buf text;    /* the complete characters of `bytes`, decoded */
    size_t decoded; /* how much of `bytes` is in `text` */
} text_stream;

/* Decode the newly completed characters; returns the piece added to text (offset, length). */
static int stream_push(const sg_model *m, text_stream *ts, int32_t token, size_t *piece_at, size_t *piece_len) {
    if (sg_tokenizer_decode_bytes(m->tokenizer, &token, 1, &ts->bytes)) return -1;
    size_t complete = sg_utf8_complete_prefix(ts->bytes.data ? ts->bytes.data : "", ts->bytes.len);
    *piece_at = ts->text.len;
    if (complete > ts->decoded && sg_utf8_append_lossy(&ts->text, ts->bytes.data + ts->decoded, complete - ts->decoded))
        return -1;
    ts->decoded = complete > ts->decoded ? complete : ts->decoded;
    *piece_len = ts->text.len - *piece_at;
    return 0;
}

static const char *find_bytes(const char *hay, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; k <= n && i <= n - k; i++)
        if (!memcmp(hay + i, needle, k)) return hay + i;
    return NULL;
}

static int is_stop_id(const sg_model *m, int32_t id) {
    for (size_t i = 0; i < m->bundle.n_stop_ids; i++)
        if (m->bundle.stop_ids[i] == id) return 1;
    return 0;
}

/* Push `tokens[from..to)` to the callback with the pieces stream_push recorded for them. */
static sg_status release(const int32_t *tokens, const size_t *piece_at, const size_t *piece_len, const text_stream *ts,
                         size_t from, size_t to, sg_token_callback callback, void *user_data) {
    for (size_t k = from; callback && k < to; k++)
        if (callback(tokens[k], ts->text.data ? ts->text.data + piece_at[k] : "", piece_len[k], user_data))
            return sg_fail(SG_ERR_CANCELLED, "the token callback cancelled the generation");
    return SG_OK;
}

static void mask_stop_ids(const sg_bundle *b, float *logits) { /* a refusal is never empty */
    for (size_t i = 0; i < b->n_stop_ids; i++)
        if (b->stop_ids[i] >= 0 && b->stop_ids[i] < b->vocab_size) logits[b->stop_ids[i]] = -INFINITY;
}

/* The loop of runtime/model.py: decode_tokens at batch 1. Tokens are appended to `tokens`; the first
 * `released` of them have gone to the callback, the rest are held until the answer guard has seen `hold`
 * tokens (or the answer ends). When the answer guard fires, the held tokens are dropped; with tokens dropped
 * or the restart switch, the KV cache goes back to the prompt and the refusal head answers from its last
 * hidden state (`restart`), else the refusal head continues from the current one. */
static sg_status generate(sg_model *m, const int32_t *ids, size_t n, size_t user_start, const sg_sampling *sampling,
                          sg_token_callback callback, void *user_data, sg_result *out) {
    sg_sampling s = sampling ? *sampling : sg_sampling_default();
    sg_status st = sg_check_sampling(&s);
    if (st != SG_OK) return st;
    const sg_bundle *b = &m->bundle;
    if (!n) return sg_fail(SG_ERR_INVALID_ARGUMENT, "the prompt has no tokens");
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= b->vocab_size)
            return sg_fail(SG_ERR_INVALID_ARGUMENT, "token ids out of the vocabulary's range");
    if ((int64_t)n + s.max_new_tokens > b->context)
        return sg_fail(SG_ERR_TOO_LONG,
                       "the prompt is %zu tokens; with max_new_tokens %d it exceeds the model's context "
                       "of %d tokens: shorten it",
                       n, s.max_new_tokens, b->context);
    sg_kv_cache cache;
    step_buffers step;
    text_stream ts = {0};
    size_t max_new = (size_t)s.max_new_tokens;
    int32_t *tokens = malloc(max_new * sizeof *tokens);
    size_t *piece_at = malloc(max_new * sizeof *piece_at), *piece_len = malloc(max_new * sizeof *piece_len);
    sg_prob *scratch = s.temperature > 0 ? malloc((size_t)b->vocab_size * sizeof *scratch) : NULL;
    float *last = malloc((size_t)b->hidden_size * sizeof *last);
    float risk = NAN;
    double tau = threshold(m, NULL); /* the settings as this call starts */
    uint64_t mode = atomic_load(&m->answer_mode);
    answer_watch watch = {.spec = &b->answer, .tau = answer_threshold(m, NULL)};
    int32_t hold = (int32_t)(uint32_t)(mode >> 32);
    int restart_mode = (mode & MODE_RESTART) != 0;
    if (b->answer.present && b->answer.score == SCORE_WINDOW)
        watch.risks = malloc((size_t)b->answer.window * sizeof *watch.risks);
    st = sg_cache_new(m, b->num_layers, (int64_t)n + s.max_new_tokens, &cache);
    if (st == SG_OK) st = step_new(m, &step);
    if (st == SG_OK && (!tokens || !piece_at || !piece_len || !last || (s.temperature > 0 && !scratch) ||
                        (b->answer.present && b->answer.score == SCORE_WINDOW && !watch.risks)))
        st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    double t0 = sg_now(); /* the clock starts at the prefill, after the buffers are made, as in the Python runtime */
    if (st == SG_OK) st = sg_prefill(m, ids, n, user_start, m->prefill, m->n_prefill, &cache, last, &risk);
    int fired = decide(m, risk, tau), prompt_fired = fired;
    /* the answer is watched when the answer guard is on and the prompt guard let the request through */
    int watched = b->answer.present && (mode & MODE_ENABLED) && !fired;
    sg_switch_reason switch_reason = fired ? SG_SWITCH_PROMPT : SG_SWITCH_NONE;
    int32_t switch_at = fired ? 0 : -1, dropped = 0;
    float answer_score = NAN;
    double t_prefill = sg_now(), t_first = 0;
    sg_rng r;
    sg_rng_seed(&r, s.seed);
    size_t n_tokens = 0, released = 0;
    int restart = 0; /* the next token is the refusal's first, from the prompt */
    sg_finish_reason reason = SG_FINISH_LENGTH;
    int32_t length = (int32_t)n;
    for (int steps = 0; st == SG_OK; steps++) {
        int from_prompt = !steps || restart;
        st = next_logits(m, &step, from_prompt ? last : step.hidden[step.n_hidden - 1], fired);
        if (st != SG_OK) break;
        if (from_prompt && fired) mask_stop_ids(b, step.logits);
        restart = 0;
        int32_t token = sg_sample(step.logits, b->vocab_size, &s, &r, scratch);
        if (!t_first) t_first = sg_now();
        int finished = 0;
        if (is_stop_id(m, token) && !s.ignore_eos) {
            reason = SG_FINISH_STOP;
            finished = 1;
        } else {
            tokens[n_tokens] = token;
            if (stream_push(m, &ts, token, &piece_at[n_tokens], &piece_len[n_tokens])) {
                st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
                break;
            }
            size_t at = piece_at[n_tokens], len = piece_len[n_tokens];
            n_tokens++;
            int stopped = 0; /* a new stop string ends in this token's piece: look only where it could begin */
            for (size_t k = 0; k < s.n_stop && !stopped && len; k++) {
                size_t reach = strlen(s.stop[k]) - 1, from = at > reach ? at - reach : 0;
                stopped = find_bytes(ts.text.data + from, ts.text.len - from, s.stop[k]) != NULL;
            }
            if (stopped) {
                reason = SG_FINISH_STOP_STRING;
                finished = 1;
            } else if (n_tokens >= max_new) {
                reason = SG_FINISH_LENGTH;
                finished = 1;
            }
        }
        if (finished || !watched || watch.seen >= hold) { /* release what is held, then this token */
            st = release(tokens, piece_at, piece_len, &ts, released, n_tokens, callback, user_data);
            released = n_tokens;
        }
        if (finished || st != SG_OK) break;
        st = decode_one_token(m, &step, &cache, token, ++length, watched);
        if (st != SG_OK || !watched || !watch_push(&watch, step.answer_risk)) continue;
        /* the answer guard fires: the held tokens are dropped, the refusal head takes the answer */
        switch_reason = SG_SWITCH_ANSWER;
        switch_at = (int32_t)released;
        answer_score = (float)watch.value;
        dropped = (int32_t)(n_tokens - released);
        watched = 0;
        fired = 1;
        n_tokens = released;
        if (dropped || restart_mode) {
            length = (int32_t)n; /* the KV cache back to the prompt */
            restart = 1;
        }
        if (dropped) { /* the text stream of the tokens kept (their pieces are the same again) */
            ts.bytes.len = ts.text.len = ts.decoded = 0;
            for (size_t k = 0; k < n_tokens && st == SG_OK; k++)
                if (stream_push(m, &ts, tokens[k], &piece_at[k], &piece_len[k]))
                    st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        }
    }
    if (switch_reason != SG_SWITCH_ANSWER && watched && watch.judged) answer_score = (float)watch.peak;
    double t_end = sg_now();
    if (st == SG_OK) {
        sg_buf text = {0};
        if (sg_utf8_append_lossy(&text, ts.bytes.data ? ts.bytes.data : "", ts.bytes.len)) {
            st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        } else {
            if (reason == SG_FINISH_STOP_STRING) { /* cut at the first stop string */
                size_t cut = text.len;
                for (size_t k = 0; k < s.n_stop; k++) {
                    const char *hit = find_bytes(text.data ? text.data : "", text.len, s.stop[k]);
                    if (hit && (size_t)(hit - text.data) < cut) cut = (size_t)(hit - text.data);
                }
                text.len = cut;
                if (text.data) text.data[cut] = '\0';
            }
            size_t text_length = text.len;
            *out = (sg_result){.text = sg_buf_take(&text),
                               .text_length = text_length,
                               .token_ids = tokens,
                               .n_tokens = n_tokens,
                               .prompt_tokens = n,
                               .risk = b->guarded ? risk : NAN,
                               .fired = prompt_fired,
                               .split_layer = b->split_layer,
                               .finish_reason = reason,
                               .prefill_seconds = t_prefill - t0,
                               .first_token_seconds = t_first - t0,
                               .decode_seconds = t_end - t_first,
                               .tau = b->guarded ? (float)tau : NAN,
                               .switch_reason = switch_reason,
                               .switch_at = switch_at,
                               .answer_score = answer_score,
                               .dropped_tokens = dropped};
            tokens = NULL;
        }
    }
    free(tokens);
    free(piece_at);
    free(piece_len);
    free(watch.risks);
    free(scratch);
    free(last);
    sg_buf_free(&ts.bytes);
    sg_buf_free(&ts.text);
    step_free(&step);
    sg_cache_free(&cache);
    return st;
}

sg_status sg_generate_ids(sg_model *m, const int32_t *ids, size_t count, const sg_sampling *sampling,
                          sg_token_callback callback, void *user_data, sg_result *out) {
    sg_clear_error();
    if (!m || !out || !ids) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_generate_ids: NULL model, ids or out");
    memset(out, 0, sizeof *out);
    return generate(m, ids, count, 0, sampling, callback, user_data, out);
}

sg_status sg_generate(sg_model *m, const sg_message *msgs, size_t n, const sg_sampling *sampling,
                      sg_token_callback callback, void *user_data, sg_result *out) {
    sg_clear_error();
    if (!m || !out) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_generate: NULL model or out");
    memset(out, 0, sizeof *out);
    sg_tokens ids = {0};
    size_t user_start = 0;
    sg_status st = sg_encode_chat_ids(m, msgs, n, &ids, &user_start);
    if (st == SG_OK) st = generate(m, ids.ids, ids.count, user_start, sampling, callback, user_data, out);
    sg_tokens_free(&ids);
    return st;
}

void sg_result_free(sg_result *r) {
    if (!r) return;
    free(r->text);
    free(r->token_ids);
    memset(r, 0, sizeof *r);
}

sg_status sg_score(sg_model *m, const sg_message *msgs, size_t n, float *risk, int32_t *fired) {
    sg_clear_error();
    if (!m || !risk) return sg_fail(SG_ERR_INVALID_ARGUMENT, "sg_score: NULL model or risk");
    if (!m->bundle.guarded) return sg_fail(SG_ERR_NO_GUARD, "this bundle has no guard to score with");
    sg_tokens ids = {0};
    size_t user_start = 0;
    sg_status st = sg_encode_chat_ids(m, msgs, n, &ids, &user_start);
    if (st == SG_OK && (int64_t)ids.count + 1 > m->bundle.context)
        st = sg_fail(SG_ERR_TOO_LONG, "the prompt is %zu tokens, more than the model's context of %d", ids.count,
                     m->bundle.context);
    size_t upto = m->risk_engine + 1;
    double tau = threshold(m, NULL);
    sg_kv_cache cache = {0};
    float *last = malloc((size_t)m->bundle.hidden_size * sizeof *last);
    if (st == SG_OK && !last) st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    if (st == SG_OK) st = sg_cache_new(m, m->prefill[upto - 1]->spec->end_layer, (int64_t)ids.count, &cache);
    if (st == SG_OK) st = sg_prefill(m, ids.ids, ids.count, user_start, m->prefill, upto, &cache, last, risk);
    if (st == SG_OK && fired) *fired = decide(m, *risk, tau);
    free(last);
    sg_cache_free(&cache);
    sg_tokens_free(&ids);
    return st;
}

#define SG_STRING(x)               #x
#define SG_VERSION_STRING(a, b, c) SG_STRING(a) "." SG_STRING(b) "." SG_STRING(c)

const char *sg_version(void) { return SG_VERSION_STRING(SG_VERSION_MAJOR, SG_VERSION_MINOR, SG_VERSION_PATCH); }

const char *sg_status_name(sg_status s) {
    static const char *names[] = {"SG_OK",
                                  "SG_ERR_INVALID_ARGUMENT",
                                  "SG_ERR_IO",
                                  "SG_ERR_CORRUPT_BUNDLE",
                                  "SG_ERR_UNSUPPORTED",
                                  "SG_ERR_TOO_LONG",
                                  "SG_ERR_NO_GUARD",
                                  "SG_ERR_CANCELLED",
                                  "SG_ERR_RUNTIME",
                                  "SG_ERR_OUT_OF_MEMORY"};
    return (unsigned)s < sizeof names / sizeof *names ? names[s] : "SG_ERR_UNKNOWN";
}
