/* The engine chain on onnxruntime's C API: the process-wide environment, the bundle's sessions, the KV
 * cache (one buffer per layer that the attention updates in place) and the prefill of a prompt. */
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

const OrtApi *sg_ort;
static OrtEnv *env;
static int env_users;
static pthread_mutex_t env_lock = PTHREAD_MUTEX_INITIALIZER;

sg_status sg_ort_check(OrtStatus *s, const char *what) {
    if (!s) return SG_OK;
    sg_status st = sg_fail(SG_ERR_RUNTIME, "%s: onnxruntime: %s", what, sg_ort->GetErrorMessage(s));
    sg_ort->ReleaseStatus(s);
    return st;
}

typedef const OrtApiBase *(*api_base_fn)(void);

/* onnxruntime is found when the first model loads, not when this library loads, so that one build serves
 * the onnxruntime of whichever environment it runs in (the Python wheel's, a system package, a release
 * tarball): SG_ONNXRUNTIME_LIBRARY if set, else a copy already in the process (linked by the application,
 * or loaded globally, as steerguard.runtime.native does), else libonnxruntime.so.1 on the library path. */
static sg_status find_onnxruntime(void) {
    const char *path = getenv("SG_ONNXRUNTIME_LIBRARY");
    void *sym = NULL;
    if (path && *path) {
        void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!lib) return sg_fail(SG_ERR_RUNTIME, "SG_ONNXRUNTIME_LIBRARY=%s cannot be loaded: %s", path, dlerror());
        if (!(sym = dlsym(lib, "OrtGetApiBase")))
            return sg_fail(SG_ERR_RUNTIME, "SG_ONNXRUNTIME_LIBRARY=%s is not onnxruntime (no OrtGetApiBase)", path);
    } else if (!(sym = dlsym(RTLD_DEFAULT, "OrtGetApiBase"))) {
        void *lib = dlopen("libonnxruntime.so.1", RTLD_NOW | RTLD_LOCAL);
        if (lib) sym = dlsym(lib, "OrtGetApiBase");
    }
    if (!sym)
        return sg_fail(SG_ERR_RUNTIME, "onnxruntime not found: set SG_ONNXRUNTIME_LIBRARY to its libonnxruntime.so "
                                       "(pip's onnxruntime has one in site-packages/onnxruntime/capi/)");
    const OrtApiBase *base = ((api_base_fn)sym)();
    if (!(sg_ort = base->GetApi(ORT_API_VERSION)))
        return sg_fail(SG_ERR_RUNTIME, "onnxruntime %s does not offer C API version %d (1.%d or newer does)",
                       base->GetVersionString(), ORT_API_VERSION, ORT_API_VERSION);
    return SG_OK;
}

sg_status sg_env_acquire(int threads) {
    pthread_mutex_lock(&env_lock);
    sg_status st = sg_ort ? SG_OK : find_onnxruntime();
    if (st == SG_OK && !env) {
        OrtThreadingOptions *opts = NULL;
        st = sg_ort_check(sg_ort->CreateThreadingOptions(&opts), "threading options");
        if (st == SG_OK) st = sg_ort_check(sg_ort->SetGlobalIntraOpNumThreads(opts, threads), "threading options");
        if (st == SG_OK) st = sg_ort_check(sg_ort->SetGlobalInterOpNumThreads(opts, 1), "threading options");
        if (st == SG_OK)
            st = sg_ort_check(sg_ort->CreateEnvWithGlobalThreadPools(ORT_LOGGING_LEVEL_ERROR, "steerguard", opts, &env),
                              "environment");
        if (opts) sg_ort->ReleaseThreadingOptions(opts);
    }
    if (st == SG_OK) env_users++;
    pthread_mutex_unlock(&env_lock);
    return st;
}

void sg_env_release(void) {
    pthread_mutex_lock(&env_lock);
    if (--env_users == 0 && env) {
        sg_ort->ReleaseEnv(env);
        env = NULL;
    }
    pthread_mutex_unlock(&env_lock);
}

static int has_name(char **names, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(names[i], name)) return 1;
    return 0;
}

static sg_status engine_names(sg_engine *e, OrtAllocator *alloc) {
    sg_status st = sg_ort_check(sg_ort->SessionGetInputCount(e->session, &e->n_inputs), e->spec->path);
    if (st == SG_OK) st = sg_ort_check(sg_ort->SessionGetOutputCount(e->session, &e->n_outputs), e->spec->path);
    if (st != SG_OK) return st;
    e->inputs = calloc(e->n_inputs + 1, sizeof *e->inputs);
    e->outputs = calloc(e->n_outputs + 1, sizeof *e->outputs);
    if (!e->inputs || !e->outputs) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    for (size_t i = 0; i < e->n_inputs + e->n_outputs && st == SG_OK; i++) {
        char *name = NULL;
        int in = i < e->n_inputs;
        st = sg_ort_check(in ? sg_ort->SessionGetInputName(e->session, i, alloc, &name)
                             : sg_ort->SessionGetOutputName(e->session, i - e->n_inputs, alloc, &name),
                          e->spec->path);
        if (st != SG_OK) break;
        char *copy = strdup(name);
        sg_ort_check(sg_ort->AllocatorFree(alloc, name), "allocator");
        if (!copy) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        if (in)
            e->inputs[i] = copy;
        else
            e->outputs[i - e->n_inputs] = copy;
    }
    if (st != SG_OK) return st;
    e->has_risk = has_name(e->outputs, e->n_outputs, "risk");
    e->has_answer_risk = has_name(e->outputs, e->n_outputs, "answer_risk");
    e->hidden_output = has_name(e->outputs, e->n_outputs, "last_hidden_state") ? "last_hidden_state" : "hidden_states";
    return SG_OK;
}

static sg_status check_decoder(const sg_model *m, const sg_engine *e) {
    for (size_t i = 1; i < e->n_inputs; i++) {
        const char *name = e->inputs[i];
        if (!strcmp(name, "attention_mask"))
            return sg_fail(SG_ERR_UNSUPPORTED,
                           "%s was exported by an older steerguard (its engines take an attention "
                           "mask); export it again",
                           m->bundle.root);
        if (strcmp(name, "seqlens_k") && strcmp(name, "total_sequence_length") && strncmp(name, "past_key_values.", 16))
            return sg_fail(SG_ERR_UNSUPPORTED, "%s: engine %s takes input %s, which the C library does not provide",
                           m->bundle.root, e->spec->name, name);
    }
    if (!has_name(e->outputs, e->n_outputs, e->hidden_output))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: engine %s has no hidden-state output", m->bundle.root,
                       e->spec->name);
    return SG_OK;
}

sg_status sg_engines_load(sg_model *m) {
    OrtSessionOptions *opts = NULL;
    OrtAllocator *alloc = NULL;
    sg_status st = sg_ort_check(sg_ort->CreateSessionOptions(&opts), "session options");
    if (st == SG_OK)
        st = sg_ort_check(sg_ort->SetSessionGraphOptimizationLevel(opts, ORT_ENABLE_ALL), "session options");
    if (st == SG_OK) st = sg_ort_check(sg_ort->DisablePerSessionThreads(opts), "session options");
    if (st == SG_OK) st = sg_ort_check(sg_ort->SetSessionLogSeverityLevel(opts, 3), "session options");
    if (st == SG_OK) st = sg_ort_check(sg_ort->GetAllocatorWithDefaultOptions(&alloc), "allocator");
    const sg_bundle *b = &m->bundle;
    m->engines = calloc(b->n_engines ? b->n_engines : 1, sizeof *m->engines);
    m->prefill = calloc(b->n_engines + 1, sizeof *m->prefill);
    m->decode = calloc(b->n_engines + 1, sizeof *m->decode);
    if (st == SG_OK && (!m->engines || !m->prefill || !m->decode)) st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    for (size_t i = 0; i < b->n_engines && st == SG_OK; i++) {
        sg_engine *e = &m->engines[m->n_engines++];
        e->spec = &b->engines[i];
        OrtStatus *s = sg_ort->CreateSession(env, e->spec->path, opts, &e->session);
        if (s) {
            st = sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: onnxruntime cannot load this engine (%s)", e->spec->path,
                         sg_ort->GetErrorMessage(s));
            sg_ort->ReleaseStatus(s);
            break;
        }
        st = engine_names(e, alloc);
        const char *role = e->spec->role;
        if (st != SG_OK) break;
        if (!strcmp(role, "embed"))
            m->embed = m->embed ? NULL : e;
        else if (!strcmp(role, "head"))
            m->head = e;
        else if (!strcmp(role, "refusal"))
            m->refusal = e;
        else if (!strcmp(role, "decoder")) {
            if ((st = check_decoder(m, e)) != SG_OK) break;
            if (e->spec->phase != PHASE_DECODE) m->prefill[m->n_prefill++] = e;
            if (e->spec->phase != PHASE_PREFILL) m->decode[m->n_decode++] = e;
        }
    }
    if (opts) sg_ort->ReleaseSessionOptions(opts);
    if (st != SG_OK) return st;
    if (!m->embed || !m->head)
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: the manifest must list exactly one embed and one head engine",
                       b->root);
    m->risk_engine = m->n_prefill;
    for (size_t i = 0; i < m->n_prefill; i++)
        if (m->prefill[i]->has_risk) m->risk_engine = i;
    if (b->guarded && (m->risk_engine == m->n_prefill || !m->refusal))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE,
                       "%s: the manifest has a guard but the engines lack the prober or the "
                       "refusal head; re-export the bundle",
                       b->root);
    m->answer_engine = m->n_decode;
    for (size_t i = 0; i < m->n_decode; i++)
        if (m->decode[i]->has_answer_risk) m->answer_engine = i;
    if (b->answer.present && (!b->guarded || m->answer_engine == m->n_decode))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE,
                       "%s: the manifest has an answer guard but no engine computes answer_risk; re-export the "
                       "bundle",
                       b->root);
    return sg_ort_check(sg_ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &m->cpu), "memory info");
}

char **sg_layer_names(int n, const char *fmt) {
    char **names = calloc((size_t)n, sizeof *names);
    for (int i = 0; names && i < n; i++) {
        char buf[64];
        snprintf(buf, sizeof buf, fmt, i);
        if (!(names[i] = strdup(buf))) return names;
    }
    return names;
}

void sg_free_names(char **names, size_t n) {
    for (size_t i = 0; names && i < n; i++) free(names[i]);
    free(names);
}

void sg_cache_free(sg_kv_cache *c) {
    for (int i = 0; i < c->layers; i++) {
        if (c->key_values && c->key_values[i]) sg_ort->ReleaseValue(c->key_values[i]);
        if (c->value_values && c->value_values[i]) sg_ort->ReleaseValue(c->value_values[i]);
        if (c->keys) free(c->keys[i]);
        if (c->values) free(c->values[i]);
    }
    free(c->keys);
    free(c->values);
    free(c->key_values);
    free(c->value_values);
    memset(c, 0, sizeof *c);
}

sg_status sg_tensor(const sg_model *m, void *data, size_t bytes, const int64_t *shape, size_t rank,
                    ONNXTensorElementDataType type, OrtValue **out) {
    return sg_ort_check(sg_ort->CreateTensorWithDataAsOrtValue(m->cpu, data, bytes, shape, rank, type, out), "tensor");
}

sg_status sg_cache_new(const sg_model *m, int layers, int64_t max_len, sg_kv_cache *c) {
    memset(c, 0, sizeof *c);
    c->layers = layers;
    c->max_len = max_len;
    c->keys = calloc((size_t)layers, sizeof *c->keys);
    c->values = calloc((size_t)layers, sizeof *c->values);
    c->key_values = calloc((size_t)layers, sizeof *c->key_values);
    c->value_values = calloc((size_t)layers, sizeof *c->value_values);
    if (!c->keys || !c->values || !c->key_values || !c->value_values)
        return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    const sg_bundle *b = &m->bundle;
    int64_t shape[4] = {1, b->kv_heads, max_len, b->head_dim};
    size_t elems = (size_t)(b->kv_heads * max_len * b->head_dim);
    sg_status st = SG_OK;
    for (int i = 0; i < layers && st == SG_OK; i++) {
        c->keys[i] = calloc(elems, sizeof(float));
        c->values[i] = calloc(elems, sizeof(float));
        if (!c->keys[i] || !c->values[i]) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory for the KV cache");
        st = sg_tensor(m, c->keys[i], elems * sizeof(float), shape, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                       &c->key_values[i]);
        if (st == SG_OK)
            st = sg_tensor(m, c->values[i], elems * sizeof(float), shape, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                           &c->value_values[i]);
    }
    return st;
}

sg_status sg_run_decoder(const sg_model *m, const sg_engine *e, OrtValue *x, const sg_attention *att, sg_kv_cache *c,
                         OrtValue *hidden_into, OrtValue **hidden, OrtValue **risk, OrtValue *answer_into) {
    size_t layers = (size_t)(e->spec->end_layer - e->spec->first_layer);
    size_t n_in = 3 + 2 * layers, n_out = 1 + (risk ? 1 : 0) + (answer_into ? 1 : 0) + 2 * layers;
    const char **in_names = calloc(n_in, sizeof *in_names), **out_names = calloc(n_out, sizeof *out_names);
    const OrtValue **in = calloc(n_in, sizeof *in);
    OrtValue **out = calloc(n_out, sizeof *out);
    OrtValue *seqlens = NULL, *total = NULL;
    int64_t one = 1;
    sg_status st = SG_OK;
    if (!in_names || !out_names || !in || !out) st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    sg_attention a = *att;
    if (st == SG_OK)
        st = sg_tensor(m, &a.seqlens, sizeof a.seqlens, &one, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, &seqlens);
    if (st == SG_OK) st = sg_tensor(m, &a.total, sizeof a.total, NULL, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, &total);
    if (st == SG_OK) {
        in_names[0] = e->inputs[0], in[0] = x;
        in_names[1] = "seqlens_k", in[1] = seqlens;
        in_names[2] = "total_sequence_length", in[2] = total;
        out_names[0] = e->hidden_output, out[0] = hidden_into;
        size_t k = 1;
        if (risk) out_names[k++] = "risk";
        if (answer_into) out_names[k] = "answer_risk", out[k++] = answer_into;
        for (size_t l = 0; l < layers; l++) {
            int layer = e->spec->first_layer + (int)l;
            in_names[3 + 2 * l] = m->past_key[layer], in[3 + 2 * l] = c->key_values[layer];
            in_names[4 + 2 * l] = m->past_value[layer], in[4 + 2 * l] = c->value_values[layer];
            out_names[k + 2 * l] = m->present_key[layer], out[k + 2 * l] = c->key_values[layer];
            out_names[k + 1 + 2 * l] = m->present_value[layer], out[k + 1 + 2 * l] = c->value_values[layer];
        }
        st = sg_ort_check(sg_ort->Run(e->session, NULL, in_names, in, n_in, out_names, n_out, out), e->spec->name);
    }
    if (st == SG_OK) {
        *hidden = out[0];
        if (risk) *risk = out[1];
    } else if (out) {
        if (out[0] && out[0] != hidden_into) sg_ort->ReleaseValue(out[0]);
        if (risk && out[1]) sg_ort->ReleaseValue(out[1]);
    }
    if (seqlens) sg_ort->ReleaseValue(seqlens);
    if (total) sg_ort->ReleaseValue(total);
    free(in_names);
    free(out_names);
    free(in);
    free(out);
    return st;
}

float *sg_value_floats(OrtValue *v) {
    void *p = NULL;
    OrtStatus *s = sg_ort->GetTensorMutableData(v, &p);
    if (s) sg_ort->ReleaseStatus(s); /* only for non-tensors, which these never are */
    return p;
}

/* Run a prompt through `chain[0..n_chain)`: embed, then each decoder; return the last token's hidden
 * state (d floats into `last`) and the prober's risk (NaN when no engine of the chain has it). */
sg_status sg_prefill(const sg_model *m, const int32_t *ids, size_t n, size_t user_start, sg_engine **chain,
                     size_t n_chain, sg_kv_cache *c, float *last, float *risk) {
    int64_t *ids64 = malloc(n * sizeof *ids64);
    if (!ids64) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    for (size_t i = 0; i < n; i++) ids64[i] = ids[i];
    int64_t shape[2] = {1, (int64_t)n};
    OrtValue *input = NULL, *x = NULL;
    sg_status st = sg_tensor(m, ids64, n * sizeof *ids64, shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &input);
    const char *embed_in = m->embed->inputs[0], *embed_out = m->embed->outputs[0];
    if (st == SG_OK)
        st = sg_ort_check(
            sg_ort->Run(m->embed->session, NULL, &embed_in, (const OrtValue *const *)&input, 1, &embed_out, 1, &x),
            "embed");
    *risk = NAN;
    sg_attention att = {(int32_t)n - 1, (int32_t)n};
    for (size_t k = 0; k < n_chain && st == SG_OK; k++) {
        OrtValue *hidden = NULL, *r = NULL;
        st = sg_run_decoder(m, chain[k], x, &att, c, NULL, &hidden, chain[k]->has_risk ? &r : NULL, NULL);
        if (st != SG_OK) break;
        sg_ort->ReleaseValue(x);
        x = hidden;
        if (r) {
            OrtTensorTypeAndShapeInfo *info = NULL;
            size_t count = 0;
            st = sg_ort_check(sg_ort->GetTensorTypeAndShape(r, &info), "risk");
            if (st == SG_OK) st = sg_ort_check(sg_ort->GetTensorShapeElementCount(info, &count), "risk");
            if (info) sg_ort->ReleaseTensorTypeAndShapeInfo(info);
            const float *values = sg_value_floats(r);
            if (st == SG_OK && m->bundle.risk_per_token) { /* the highest over the last user turn; NaN stays NaN */
                float best = -INFINITY;
                for (size_t i = user_start; i < count; i++) {
                    if (isnan(values[i])) {
                        best = NAN;
                        break;
                    }
                    if (values[i] > best) best = values[i];
                }
                *risk = best;
            } else if (st == SG_OK && count) { /* (1,) or, read at every position, (1, n): the last one's */
                *risk = values[count - 1];
            }
            sg_ort->ReleaseValue(r);
        }
    }
    if (st == SG_OK)
        memcpy(last, sg_value_floats(x) + (n - 1) * (size_t)m->bundle.hidden_size,
               (size_t)m->bundle.hidden_size * sizeof(float));
    if (x) sg_ort->ReleaseValue(x);
    if (input) sg_ort->ReleaseValue(input);
    free(ids64);
    return st;
}
