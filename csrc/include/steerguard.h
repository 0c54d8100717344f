/*
 * steerguard.h: the C API of libsteerguard, a guarded on-device runtime for steerguard bundles.
 *
 * A bundle (made by `steerguard export`) is an ONNX engine chain with a safety prober fused at one
 * layer and a refusal head. This library loads a bundle, runs the chain through onnxruntime's C API,
 * judges each request with the prober when its prompt is read, and answers through the refusal head
 * when the prober fires. Nothing of Python is involved.
 *
 * Conventions
 *  - Every object is an opaque handle made by a `sg_*_load`/`sg_*_new` call and released by the
 *    matching `sg_*_free` call. Free functions accept NULL.
 *  - Every call that can fail returns an `sg_status`; on failure `sg_last_error()` holds a one-line
 *    message for the calling thread (valid until that thread's next call into the library).
 *  - Strings are UTF-8, passed as (pointer, length) where a length is taken; text that is not valid
 *    UTF-8 is refused with SG_ERR_INVALID_ARGUMENT.
 *  - Memory the library returns (`sg_tokens`, `sg_result`) is released with the matching free call.
 *  - Thread safety: a loaded `sg_model` is immutable but for the guard's settings; any number of threads
 *    may call `sg_generate`, `sg_score`, `sg_tokenize` and `sg_detokenize` on it at once. Each call keeps
 *    its own state. The threshold (`sg_model_set_operating_point`, `sg_model_set_tau`) and the answer
 *    guard's settings (`sg_model_set_answer_*`) may be changed from any thread at any time: a call already
 *    running keeps the settings it started with.
 *
 * A minimal program:
 *
 *     sg_model *m;
 *     if (sg_model_load("runs/demo-bundle", NULL, &m) != SG_OK) { puts(sg_last_error()); return 1; }
 *     sg_message msg = {"user", "How do I bake bread?"};
 *     sg_sampling s = sg_sampling_default();
 *     sg_result r;
 *     if (sg_generate(m, &msg, 1, &s, NULL, NULL, &r) == SG_OK) { puts(r.text); sg_result_free(&r); }
 *     sg_model_free(m);
 */
#ifndef STEERGUARD_H
#define STEERGUARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define SG_API __declspec(dllexport)
#else
#define SG_API __attribute__((visibility("default")))
#endif

#define SG_VERSION_MAJOR 0
#define SG_VERSION_MINOR 2
#define SG_VERSION_PATCH 0

typedef enum {
    SG_OK = 0,
    SG_ERR_INVALID_ARGUMENT = 1, /* a NULL handle, bad sampling settings, text that is not UTF-8, ... */
    SG_ERR_IO = 2,               /* a file of the bundle is missing or unreadable */
    SG_ERR_CORRUPT_BUNDLE = 3,   /* a sha256 mismatch, a damaged manifest or engine */
    SG_ERR_UNSUPPORTED = 4,      /* a bundle feature this library does not run (multimodal, a tokenizer kind) */
    SG_ERR_TOO_LONG = 5,         /* prompt + max_new_tokens exceed the model's context */
    SG_ERR_NO_GUARD = 6,         /* sg_score on a bundle exported without a guard */
    SG_ERR_CANCELLED = 7,        /* the token callback returned non-zero */
    SG_ERR_RUNTIME = 8,          /* onnxruntime failed while running an engine */
    SG_ERR_OUT_OF_MEMORY = 9
} sg_status;

/* Library version as "MAJOR.MINOR.PATCH". */
SG_API const char *sg_version(void);

/* The calling thread's message for its last failed call ("" if none). */
SG_API const char *sg_last_error(void);

/* A short, constant name for a status ("SG_OK", "SG_ERR_IO", ...). */
SG_API const char *sg_status_name(sg_status status);

/* ---- loading ---------------------------------------------------------------------------------- */

typedef struct sg_model sg_model;

typedef struct {
    int32_t threads;       /* onnxruntime intra-op threads; 0 = all cores. All models of a process share one
                              thread pool, made by the first load with its count (as the Python runtime does) */
    int32_t verify_hashes; /* 1 (default): check every file's sha256 against the manifest before loading */
} sg_load_options;

SG_API sg_load_options sg_load_options_default(void);

/* Load the bundle in folder `bundle_dir` (NULL options = defaults). On success `*out` is a model to
 * release with sg_model_free. Refuses what the Python loader refuses: a missing or damaged manifest,
 * an unknown schema, a file missing from the bundle or whose sha256 differs from the manifest. */
SG_API sg_status sg_model_load(const char *bundle_dir, const sg_load_options *options, sg_model **out);
SG_API void sg_model_free(sg_model *model);

typedef struct {
    const char *name; /* the model's name from the manifest */
    const char *precision;
    int32_t num_layers;
    int32_t vocab_size;
    int32_t context;             /* the most tokens a prompt and its answer may take together */
    int32_t guarded;             /* 1 if the bundle has a prober and a refusal head */
    int32_t split_layer;         /* the prober's layer; -1 when unguarded */
    float tau;                   /* the current threshold: the guard fires when risk >= tau (NaN when unguarded) */
    const char *operating_point; /* the current threshold's name ("balanced", ...); NULL for an explicit tau
                                    or an unguarded bundle. Valid while the model is loaded */
    int32_t n_operating_points;  /* the bundle's named thresholds (see sg_model_operating_point_get) */
} sg_model_info;

SG_API sg_status sg_model_info_get(const sg_model *model, sg_model_info *out);

/* ---- operating points: the guard's threshold ----------------------------------------------------
 *
 * Calibration records named thresholds in the bundle: "strict" (fires most: the lowest tau),
 * "balanced" (the default: the calibrated tau) and "permissive" (fires least), each with its held-out
 * false and true fire rates (`steerguard inspect BUNDLE` prints them). A model starts at the bundle's
 * tau (balanced's). A bundle exported before operating points has only "balanced". The guard decides
 * exactly as the Python runtime does at the same threshold. */

/* Judge the requests of later calls at the named threshold. SG_ERR_INVALID_ARGUMENT (the message lists
 * the names this bundle has) for a NULL or unknown name; SG_ERR_NO_GUARD on an unguarded bundle. */
SG_API sg_status sg_model_set_operating_point(sg_model *model, const char *name);

/* Judge the requests of later calls at an explicit threshold `tau` in [0, 1] (0 fires on every request;
 * a NaN or a tau outside [0, 1] is SG_ERR_INVALID_ARGUMENT; SG_ERR_NO_GUARD on an unguarded bundle). */
SG_API sg_status sg_model_set_tau(sg_model *model, float tau);

/* The bundle's named threshold number `index` (0 .. n_operating_points - 1, lowest tau first): its name
 * (valid while the model is loaded) and tau. SG_ERR_INVALID_ARGUMENT for an index out of range. */
SG_API sg_status sg_model_operating_point_get(const sg_model *model, int32_t index, const char **name, float *tau);

/* ---- the answer guard: watching the answer as it is written -------------------------------------
 *
 * A bundle calibrated with an answer guard (manifest guard.answer) also scores every token the model
 * writes: the decode engine of the layers before the split computes the token's risk (answer_risk), and a
 * running score of those risks (the bundle's: "window:N", the mean of the last N risks, judged from the
 * N-th token on; "ema:F", an exponential moving average; or "max") is compared with the answer guard's
 * tau after every token. The first time the score reaches tau (or a risk is not finite: it fails closed)
 * the answer switches to the refusal head:
 *  - tokens still held back (see hold) are dropped: the token callback never sees them;
 *  - with switch SG_ANSWER_CONTINUE and nothing dropped, the refusal head carries on after the tokens shown,
 *    the KV cache kept; with SG_ANSWER_RESTART, or when tokens were dropped, the refusal answers from the
 *    prompt, as a prompt-guard refusal does (its first token never ends the turn).
 * hold N keeps the first N tokens of an answer back from the callback until the answer guard has judged them
 * (or the answer ends); the tokens after them stream at once. A request the prompt guard fired on is not
 * watched. sg_result says where and why the answer switched (switch_reason, switch_at, answer_score,
 * dropped_tokens). A model starts with the bundle's settings (guard.answer: enabled, the balanced tau,
 * hold, switch); the decisions are the Python runtime's (GuardedModel.set_answer_guard) at the same
 * settings. On a bundle without an answer guard every setter but turning it off is SG_ERR_UNSUPPORTED. */

typedef enum {
    SG_ANSWER_CONTINUE = 0, /* the refusal head continues after the tokens shown (default) */
    SG_ANSWER_RESTART = 1   /* the refusal head answers from the prompt, the KV cache rewound to it */
} sg_answer_switch;

typedef struct {
    int32_t available;           /* 1 if the bundle has an answer guard; 0: the other fields are zero/NULL/NaN */
    int32_t enabled;             /* 1 if later calls watch their answers */
    float tau;                   /* the running score's threshold: it switches when score >= tau */
    const char *operating_point; /* the threshold's name ("balanced", ...); NULL for an explicit tau. Valid
                                    while the model is loaded */
    int32_t hold;                /* tokens held back from the callback at the start of each answer */
    sg_answer_switch switch_mode;
    const char *score;          /* the bundle's running score: "window:8", "ema:0.9" or "max" */
    int32_t n_operating_points; /* the answer guard's named thresholds (sg_model_answer_operating_point_get) */
} sg_answer_guard_info;

/* The answer guard's presence and current settings. SG_ERR_INVALID_ARGUMENT for a NULL model or out. */
SG_API sg_status sg_model_answer_guard_get(const sg_model *model, sg_answer_guard_info *out);

/* Watch the answers of later calls (enabled 1) or not (0: the answers are bit for bit those of the bundle
 * without an answer guard). Turning it on where the bundle has none is SG_ERR_UNSUPPORTED; turning it off
 * there succeeds (it is off). Any other value than 0 or 1 is SG_ERR_INVALID_ARGUMENT. */
SG_API sg_status sg_model_set_answer_guard(sg_model *model, int32_t enabled);

/* Switch at the answer guard's named threshold ("strict", "balanced", "permissive"; the message of
 * SG_ERR_INVALID_ARGUMENT lists the names for an unknown or NULL one). SG_ERR_UNSUPPORTED without an
 * answer guard. */
SG_API sg_status sg_model_set_answer_operating_point(sg_model *model, const char *name);

/* Switch at an explicit threshold `tau` in [0, 1] (0 switches at the first judged token); NaN or outside
 * [0, 1]: SG_ERR_INVALID_ARGUMENT. SG_ERR_UNSUPPORTED without an answer guard. */
SG_API sg_status sg_model_set_answer_tau(sg_model *model, float tau);

/* Hold the first `tokens` (>= 0; 0 = stream every token at once) of each answer back from the callback
 * until the answer guard has seen that many. SG_ERR_INVALID_ARGUMENT below 0; SG_ERR_UNSUPPORTED without
 * an answer guard. */
SG_API sg_status sg_model_set_answer_hold(sg_model *model, int32_t tokens);

/* How the answer switches: SG_ANSWER_CONTINUE or SG_ANSWER_RESTART (another value:
 * SG_ERR_INVALID_ARGUMENT). SG_ERR_UNSUPPORTED without an answer guard. */
SG_API sg_status sg_model_set_answer_switch(sg_model *model, sg_answer_switch mode);

/* The answer guard's named threshold number `index` (0 .. n_operating_points - 1, lowest tau first): its
 * name (valid while the model is loaded) and tau. SG_ERR_INVALID_ARGUMENT for an index out of range,
 * SG_ERR_UNSUPPORTED without an answer guard. */
SG_API sg_status sg_model_answer_operating_point_get(const sg_model *model, int32_t index, const char **name,
                                                     float *tau);

/* ---- text and tokens -------------------------------------------------------------------------- */

typedef struct {
    const char *role;    /* "system" (first message only), "user" or "assistant" */
    const char *content; /* UTF-8, NUL-terminated */
} sg_message;

typedef struct {
    int32_t *ids;
    size_t count;
} sg_tokens;

/* Token ids of raw text, the way the bundle's tokenizer.json encodes it (special tokens written in
 * the text are recognised; nothing is added). */
SG_API sg_status sg_tokenize(const sg_model *model, const char *text, size_t length, sg_tokens *out);

/* Token ids of a chat, rendered with the bundle's chat template and its generation prompt. */
SG_API sg_status sg_encode_chat(const sg_model *model, const sg_message *messages, size_t n_messages, sg_tokens *out);

SG_API void sg_tokens_free(sg_tokens *tokens);

/* The text of token ids, special tokens skipped; invalid byte sequences become U+FFFD. `*out` is
 * NUL-terminated (the text itself may hold NUL characters: `*length`, if not NULL, is its length);
 * release it with sg_string_free. */
SG_API sg_status sg_detokenize(const sg_model *model, const int32_t *ids, size_t count, char **out, size_t *length);
SG_API void sg_string_free(char *text);

/* ---- generation ------------------------------------------------------------------------------- */

typedef struct {
    int32_t max_new_tokens;  /* >= 1; default 128 */
    float temperature;       /* 0 = greedy (default) */
    int32_t top_k;           /* 0 = off */
    float top_p;             /* (0, 1]; 1 = off */
    uint64_t seed;           /* for sampling */
    const char *const *stop; /* stop strings (not included in the answer), or NULL */
    size_t n_stop;
    int32_t ignore_eos; /* keep going past the end of the turn (benchmarks) */
} sg_sampling;

SG_API sg_sampling sg_sampling_default(void);

typedef enum {
    SG_FINISH_STOP = 0,        /* the model ended its turn */
    SG_FINISH_STOP_STRING = 1, /* a stop string appeared */
    SG_FINISH_LENGTH = 2       /* max_new_tokens reached */
} sg_finish_reason;

typedef enum {
    SG_SWITCH_NONE = 0,   /* the plain head answered throughout */
    SG_SWITCH_PROMPT = 1, /* the prompt guard fired: the refusal head answered from the first token */
    SG_SWITCH_ANSWER = 2  /* the answer guard switched to the refusal head mid-answer */
} sg_switch_reason;

typedef struct {
    char *text;         /* the answer, NUL-terminated */
    size_t text_length; /* its length in bytes (the answer itself may hold NUL characters) */
    int32_t *token_ids; /* the generated tokens (the end-of-turn token excluded) */
    size_t n_tokens;
    size_t prompt_tokens;
    float risk;          /* the prober's risk; NaN when the bundle is unguarded */
    int32_t fired;       /* 1 when the guard fired and the refusal head answered */
    int32_t split_layer; /* -1 when unguarded */
    sg_finish_reason finish_reason;
    double prefill_seconds; /* prompt read and judged */
    double first_token_seconds;
    double decode_seconds; /* from the first token to the last */
    float tau;             /* the threshold the request was judged at (NaN when unguarded) */
    /* the answer guard (after the fields above, which keep their offsets) */
    sg_switch_reason switch_reason; /* why the refusal head answers, if it does */
    int32_t switch_at;              /* index in token_ids where the refusal head's tokens begin (0 for the prompt
                                       guard's); -1 when it never answered */
    float answer_score;             /* the running score at the answer guard's switch, else the highest it reached;
                                       NaN when the answer was not watched or too short to be judged */
    int32_t dropped_tokens;         /* held-back tokens dropped at the switch (never passed to the callback) */
} sg_result;

/* Called once per generated token with the token and the text it completes (possibly empty while a
 * multi-byte character is incomplete). Return 0 to go on, non-zero to cancel: the call then returns
 * SG_ERR_CANCELLED and fills nothing. With an answer-guard hold, a held token is passed once the answer
 * guard has seen enough (so possibly several tokens in a row), and a dropped one never. */
typedef int (*sg_token_callback)(int32_t token, const char *piece, size_t piece_length, void *user_data);

/* Answer a chat through the guard: prefill (the prober judges the request at the model's current
 * threshold: fired = risk >= tau, or a non-finite risk: the guard fails closed), then decode through the
 * plain or the refusal head.
 * NULL sampling = sg_sampling_default(). `callback` may be NULL. On SG_OK release `*out` with
 * sg_result_free. */
SG_API sg_status sg_generate(sg_model *model, const sg_message *messages, size_t n_messages,
                             const sg_sampling *sampling, sg_token_callback callback, void *user_data, sg_result *out);

/* The same from chat-formatted token ids (e.g. from sg_encode_chat). */
SG_API sg_status sg_generate_ids(sg_model *model, const int32_t *ids, size_t count, const sg_sampling *sampling,
                                 sg_token_callback callback, void *user_data, sg_result *out);

SG_API void sg_result_free(sg_result *result);

/* The guard's judgement alone, at the model's current threshold: runs the engines only up to the prober. */
SG_API sg_status sg_score(sg_model *model, const sg_message *messages, size_t n_messages, float *risk, int32_t *fired);

#ifdef __cplusplus
}
#endif

#endif /* STEERGUARD_H */
