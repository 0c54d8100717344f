/* Internals shared by the library's modules: the loaded model and its engine chain on onnxruntime. */
#ifndef SG_MODEL_H
#define SG_MODEL_H

#include <onnxruntime_c_api.h>
#include <stdatomic.h>

#include "bundle.h"
#include "common.h"
#include "tokenizer.h"

extern const OrtApi *sg_ort;

typedef struct {
    const sg_engine_spec *spec;
    OrtSession *session;
    char **inputs, **outputs;
    size_t n_inputs, n_outputs;
    const char *hidden_output; /* "hidden_states" or "last_hidden_state" (decoders) */
    int has_risk;
    int has_answer_risk; /* the answer guard's per-token risk (the decode engine of the layers before the split) */
} sg_engine;

struct sg_model {
    sg_bundle bundle;
    sg_tokenizer *tokenizer;
    sg_engine *engines;
    size_t n_engines;
    sg_engine *embed, *head, *refusal;
    sg_engine **prefill, **decode; /* decoder chains, in layer order */
    size_t n_prefill, n_decode;
    size_t risk_engine;   /* index in `prefill` of the engine with the prober */
    size_t answer_engine; /* index in `decode` of the engine with answer_risk; n_decode when none */
    char **past_key, **past_value, **present_key, **present_value;
    OrtMemoryInfo *cpu;
    /* the guard's current threshold, set from any thread, in one word: which (the bundle's guard.tau, an
     * operating point's index + 1, or 0: an explicit tau) << 32 | an explicit tau's float bits */
    _Atomic uint64_t threshold;
    /* the answer guard's settings, each word set whole from any thread: its threshold (as `threshold`, over
     * bundle.answer.points) and its mode: enabled | restart << 1 | (uint64_t)hold << 32 */
    _Atomic uint64_t answer_threshold;
    _Atomic uint64_t answer_mode;
};

typedef struct {
    float **keys, **values; /* per layer: (1, kv_heads, max_len, head_dim) */
    OrtValue **key_values, **value_values;
    int layers;
    int64_t max_len;
} sg_kv_cache;

typedef struct {
    int32_t seqlens; /* tokens in the cache after this run, minus one */
    int32_t total;   /* width the attention reads */
} sg_attention;

/* onnxruntime: one environment with one intra-op pool per process, shared by every session */
sg_status sg_ort_check(OrtStatus *s, const char *what);
sg_status sg_env_acquire(int threads);
void sg_env_release(void);

/* the bundle's engines: sessions, their input and output names, the decoder chains */
sg_status sg_engines_load(sg_model *m);
char **sg_layer_names(int n, const char *fmt);
void sg_free_names(char **names, size_t n);

/* the KV cache and one run of an engine */
sg_status sg_tensor(const sg_model *m, void *data, size_t bytes, const int64_t *shape, size_t rank,
                    ONNXTensorElementDataType type, OrtValue **out);
sg_status sg_cache_new(const sg_model *m, int layers, int64_t max_len, sg_kv_cache *c);
void sg_cache_free(sg_kv_cache *c);
/* One decoder engine over activations `x` (1, n, d): the cache's rows are both its past and its present
 * (onnxruntime's attention updates the shared buffer in place). Returns its hidden output in *hidden
 * (allocated by onnxruntime unless `hidden_into` is given) and, when asked, its risk output; when
 * `answer_into` is given, the engine's answer_risk output is written there. */
sg_status sg_run_decoder(const sg_model *m, const sg_engine *e, OrtValue *x, const sg_attention *att, sg_kv_cache *c,
                         OrtValue *hidden_into, OrtValue **hidden, OrtValue **risk, OrtValue *answer_into);
float *sg_value_floats(OrtValue *v);
/* Run a prompt through chain[0..n_chain): embed, then each decoder; the last token's hidden state and the
 * prober's risk (NaN when no engine of the chain has it). */
sg_status sg_prefill(const sg_model *m, const int32_t *ids, size_t n, size_t user_start, sg_engine **chain,
                     size_t n_chain, sg_kv_cache *c, float *last, float *risk);

/* chat messages -> token ids, and where the last user message's content begins */
sg_status sg_encode_chat_ids(const sg_model *m, const sg_message *msgs, size_t n, sg_tokens *out, size_t *user_start);

#endif
