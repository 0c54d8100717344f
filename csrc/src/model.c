/* The guarded model's public API: load a bundle into onnxruntime, prefill a prompt into the KV cache
 * (the prober's risk comes out of the engine at the split layer), decide, decode through the plain or
 * the refusal head. Same loop as steerguard/runtime/model.py, at batch 1. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "sampling.h"

static void start_threshold(sg_model *m);

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
    st = sg_fail(SG_ERR_INVALID_ARGUMENT, "unknown operating point '%.64s': this bundle has %s, or give a tau "
                 "between 0 and 1", name, names.data ? names.data : "");
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

static int decide(const sg_model *m, float risk, double tau) {
    return m->bundle.guarded && !(isfinite(risk) && (double)risk < tau); /* the guard fails closed */
}

/* ---- generation ---------------------------------------------------------------------------------- */

typedef struct { /* everything one decode step binds, made once per answer */
    int64_t token;
    OrtValue *token_value, *x_value, **hidden_values, *logits_value, *last_value;
    float *x, **hidden, *logits; /* hidden[n_hidden - 1]: the last decoder's output, which the heads read */
    size_t n_hidden;
} step_buffers;

static void step_free(step_buffers *s) {
    OrtValue *values[] = {s->token_value, s->x_value, s->logits_value, s->last_value};
    for (size_t i = 0; i < 4; i++)
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

static sg_status decode_one_token(const sg_model *m, step_buffers *s, sg_kv_cache *c, int32_t token, int32_t length) {
    s->token = token;
    const char *ids_name = m->embed->inputs[0], *embed_out = m->embed->outputs[0];
    sg_status st = sg_ort_check(sg_ort->Run(m->embed->session, NULL, &ids_name,
                                            (const OrtValue *const *)&s->token_value, 1, &embed_out, 1, &s->x_value),
                                "embed");
    sg_attention att = {length - 1, (int32_t)c->max_len};
    OrtValue *x = s->x_value;
    for (size_t k = 0; k < m->n_decode && st == SG_OK; k++) {
        OrtValue *out = NULL;
        st = sg_run_decoder(m, m->decode[k], x, &att, c, s->hidden_values[k], &out, NULL);
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
    int32_t *tokens = malloc((size_t)s.max_new_tokens * sizeof *tokens);
    sg_prob *scratch = s.temperature > 0 ? malloc((size_t)b->vocab_size * sizeof *scratch) : NULL;
    float *last = malloc((size_t)b->hidden_size * sizeof *last);
    float risk = NAN;
    double tau = threshold(m, NULL); /* the threshold as this call starts */
    st = sg_cache_new(m, b->num_layers, (int64_t)n + s.max_new_tokens, &cache);
    if (st == SG_OK) st = step_new(m, &step);
    if (st == SG_OK && (!tokens || !last || (s.temperature > 0 && !scratch)))
        st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    double t0 = sg_now(); /* the clock starts at the prefill, after the buffers are made, as in the Python runtime */
    if (st == SG_OK) st = sg_prefill(m, ids, n, user_start, m->prefill, m->n_prefill, &cache, last, &risk);
    int fired = decide(m, risk, tau);
    double t_prefill = sg_now(), t_first = 0;
    sg_rng r;
    sg_rng_seed(&r, s.seed);
    size_t n_tokens = 0;
    sg_finish_reason reason = SG_FINISH_LENGTH;
    int32_t length = (int32_t)n;
    for (int steps = 0; st == SG_OK; steps++) {
        st = next_logits(m, &step, steps ? step.hidden[step.n_hidden - 1] : last, fired);
        if (st != SG_OK) break;
        if (!steps && fired) /* a refusal is never empty: it cannot end the turn at once */
            for (size_t i = 0; i < b->n_stop_ids; i++)
                if (b->stop_ids[i] >= 0 && b->stop_ids[i] < b->vocab_size) step.logits[b->stop_ids[i]] = -INFINITY;
        int32_t token = sg_sample(step.logits, b->vocab_size, &s, &r, scratch);
        if (!t_first) t_first = sg_now();
        if (is_stop_id(m, token) && !s.ignore_eos) {
            reason = SG_FINISH_STOP;
            break;
        }
        tokens[n_tokens++] = token;
        size_t at, len;
        if (stream_push(m, &ts, token, &at, &len)) {
            st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
            break;
        }
        if (callback && callback(token, ts.text.data ? ts.text.data + at : "", len, user_data)) {
            st = sg_fail(SG_ERR_CANCELLED, "the token callback cancelled the generation");
            break;
        }
        int stopped = 0; /* a new stop string ends in this token's piece: look only where it could begin */
        for (size_t k = 0; k < s.n_stop && !stopped && len; k++) {
            size_t reach = strlen(s.stop[k]) - 1, from = at > reach ? at - reach : 0;
            stopped = find_bytes(ts.text.data + from, ts.text.len - from, s.stop[k]) != NULL;
        }
        if (stopped) {
            reason = SG_FINISH_STOP_STRING;
            break;
        }
        if ((int32_t)n_tokens >= s.max_new_tokens) break;
        st = decode_one_token(m, &step, &cache, token, ++length);
    }
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
                               .fired = fired,
                               .split_layer = b->split_layer,
                               .finish_reason = reason,
                               .prefill_seconds = t_prefill - t0,
                               .first_token_seconds = t_first - t0,
                               .decode_seconds = t_end - t_first,
                               .tau = b->guarded ? (float)tau : NAN};
            tokens = NULL;
        }
    }
    free(tokens);
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
