#include "bundle.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *PRECISIONS[] = {"fp32", "fp16", "int8", "int4"};

static char *dup_str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? strdup(v->valuestring) : NULL;
}

static int get_int(const cJSON *o, const char *key, int32_t *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v)) return -1;
    *out = v->valueint;
    return 0;
}

static long long file_size(const char *path) {
    struct stat s;
    return stat(path, &s) ? -1 : (long long)s.st_size;
}

/* Bytes an engine stores at a precision (runtime/manifest.py: expected_engine_bytes). */
static double expected_bytes(int precision, double matmul, double other, double block) {
    static const double fixed[] = {4.0, 2.0, 1.0, 0.5};
    double per = precision >= 2 ? fixed[precision] + 4.0 / block : fixed[precision];
    return matmul * per + other * (precision == 1 ? 2.0 : 4.0);
}

static sg_status check_precision(const sg_bundle *b, const cJSON *e, const char *manifest_path) {
    const cJSON *name_item = cJSON_GetObjectItemCaseSensitive(e, "name");
    const cJSON *role_item = cJSON_GetObjectItemCaseSensitive(e, "role");
    const cJSON *file_item = cJSON_GetObjectItemCaseSensitive(e, "file");
    if (!cJSON_IsString(name_item) || !cJSON_IsString(role_item) || !cJSON_IsString(file_item))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: an engine lacks a name, role or file", manifest_path);
    const char *name = name_item->valuestring;
    const cJSON *claimed = cJSON_GetObjectItemCaseSensitive(e, "precision");
    int claim = -1;
    for (int p = 0; p < 4; p++)
        if (cJSON_IsString(claimed) && !strcmp(claimed->valuestring, PRECISIONS[p])) claim = p;
    if (claim < 0) return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: engine %s has an unknown precision", manifest_path, name);
    const char *role = role_item->valuestring;
    const cJSON *mm = cJSON_GetObjectItemCaseSensitive(e, "matmul_weights");
    if ((strcmp(role, "decoder") && strcmp(role, "head")) || !cJSON_IsNumber(mm) || mm->valuedouble == 0) return SG_OK;
    const cJSON *other = cJSON_GetObjectItemCaseSensitive(e, "other_weights");
    const cJSON *block = cJSON_GetObjectItemCaseSensitive(e, "block_size");
    double size = 0;
    const cJSON *f;
    char *p = sg_join_path(b->root, file_item->valuestring);
    size += (double)file_size(p);
    free(p);
    cJSON_ArrayForEach(f, cJSON_GetObjectItemCaseSensitive(e, "data_files")) {
        if (!cJSON_IsString(f)) continue;
        p = sg_join_path(b->root, f->valuestring);
        size += (double)file_size(p);
        free(p);
    }
    int looks = 0;
    double best = INFINITY;
    for (int q = 0; q < 4; q++) {
        double d = fabs(expected_bytes(q, mm->valuedouble, cJSON_IsNumber(other) ? other->valuedouble : 0,
                                       cJSON_IsNumber(block) ? block->valuedouble : 32) -
                        size);
        if (d < best) best = d, looks = q;
    }
    if (looks != claim)
        return sg_fail(SG_ERR_CORRUPT_BUNDLE,
                       "%s/%s: the manifest says %s, but the engine's %.1f MB fit %s; "
                       "re-export the bundle",
                       b->root, file_item->valuestring, PRECISIONS[claim], size / 1e6, PRECISIONS[looks]);
    return SG_OK;
}

static sg_status check_files(const sg_bundle *b, const cJSON *root, int verify, const char *manifest_path) {
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(root, "files");
    const cJSON *e, *f;
    if (!cJSON_IsObject(files))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: no 'files' entry; re-export the bundle", manifest_path);
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(root, "engines")) {
        const cJSON *file = cJSON_GetObjectItemCaseSensitive(e, "file");
        if (!cJSON_IsString(file) || !cJSON_GetObjectItemCaseSensitive(files, file->valuestring))
            return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: an engine file has no recorded sha256", manifest_path);
        cJSON_ArrayForEach(f, cJSON_GetObjectItemCaseSensitive(e, "data_files")) {
            if (!cJSON_IsString(f) || !cJSON_GetObjectItemCaseSensitive(files, f->valuestring))
                return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: engine file %s has no recorded sha256", manifest_path,
                               cJSON_IsString(f) ? f->valuestring : "?");
        }
    }
    cJSON_ArrayForEach(f, files) {
        char *path = sg_join_path(b->root, f->string);
        if (!path) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        struct stat s;
        char digest[65];
        sg_status st = SG_OK;
        if (stat(path, &s) || !S_ISREG(s.st_mode))
            st = sg_fail(SG_ERR_IO, "%s: missing from the bundle; copy the whole bundle folder again", path);
        else if (verify && (!cJSON_IsString(f) || sg_sha256_file(path, digest) || strcmp(digest, f->valuestring)))
            st = sg_fail(SG_ERR_CORRUPT_BUNDLE,
                         "%s: sha256 does not match the manifest (corrupt or modified); "
                         "copy the bundle again or re-export it",
                         path);
        free(path);
        if (st != SG_OK) return st;
    }
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(root, "engines")) {
        sg_status st = check_precision(b, e, manifest_path);
        if (st != SG_OK) return st;
    }
    return SG_OK;
}

static int by_tau(const void *a, const void *b) {
    double x = ((const sg_operating_point *)a)->tau, y = ((const sg_operating_point *)b)->tau;
    return (x > y) - (x < y);
}

/* `guard`.operating_points: name -> {"tau", ...}, kept where tau is a finite number, lowest tau first (as
 * runtime/model.py: operating_points_of); none recorded (an older bundle): "balanced" = `tau`. The default
 * point is default_operating_point's (else balanced's), or -1. */
static sg_status read_points(const cJSON *guard, double tau, sg_operating_point **out, size_t *n_out, int32_t *recorded,
                             int32_t *default_point) {
    const cJSON *points = cJSON_GetObjectItemCaseSensitive(guard, "operating_points");
    int n = cJSON_IsObject(points) ? cJSON_GetArraySize(points) : 0;
    sg_operating_point *list = *out = calloc(n > 0 ? (size_t)n : 1, sizeof *list);
    if (!list) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    const cJSON *p;
    if (n) cJSON_ArrayForEach(p, points) {
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(p, "tau");
            if (!p->string || !cJSON_IsNumber(t) || !isfinite(t->valuedouble)) continue;
            sg_operating_point *o = &list[*n_out];
            if (!(o->name = strdup(p->string))) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
            o->tau = t->valuedouble;
            (*n_out)++;
        }
    *recorded = *n_out > 0;
    if (!*n_out) {
        if (!(list[0].name = strdup("balanced"))) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
        list[0].tau = tau;
        *n_out = 1;
    }
    qsort(list, *n_out, sizeof *list, by_tau);
    const cJSON *def = cJSON_GetObjectItemCaseSensitive(guard, "default_operating_point");
    const char *name = cJSON_IsString(def) && *def->valuestring ? def->valuestring : "balanced";
    *default_point = -1;
    for (size_t i = 0; i < *n_out; i++)
        if (!strcmp(list[i].name, name)) *default_point = (int32_t)i;
    return SG_OK;
}

static sg_status read_operating_points(sg_bundle *b, const cJSON *guard) {
    return read_points(guard, b->tau, &b->points, &b->n_points, &b->points_recorded, &b->default_point);
}

/* A running score: window:N (N >= 1), ema:F (0 <= F < 1) or max (runtime/answer.py: RunningScore.parse). */
static int parse_score(const char *spec, sg_answer_spec *a) {
    const char *colon = strchr(spec, ':');
    size_t kind = colon ? (size_t)(colon - spec) : strlen(spec);
    const char *value = colon ? colon + 1 : NULL;
    if (kind == 3 && !strncmp(spec, "max", 3) && !value) {
        a->score = SCORE_MAX;
        return 0;
    }
    if (!value || !*value || strchr(" \t\n+-", *value)) return -1; /* digits or a decimal number, no sign */
    char *end = NULL;
    if (kind == 6 && !strncmp(spec, "window", 6)) {
        if (strspn(value, "0123456789") != strlen(value) || strlen(value) > 9) return -1;
        long n = strtol(value, &end, 10);
        if (n < 1) return -1;
        a->score = SCORE_WINDOW;
        a->window = (int32_t)n;
        return 0;
    }
    if (kind == 3 && !strncmp(spec, "ema", 3)) {
        double f = strtod(value, &end);
        if (*end || !(f >= 0.0 && f < 1.0)) return -1;
        a->score = SCORE_EMA;
        a->decay = f;
        return 0;
    }
    return -1;
}

/* guard.answer (null or absent: no answer guard). Anything this library cannot run as the Python runtime
 * does is refused here, naming the field. */
static sg_status read_answer(sg_bundle *b, const cJSON *guard, const char *manifest_path) {
    const cJSON *answer = cJSON_GetObjectItemCaseSensitive(guard, "answer");
    if (!answer || cJSON_IsNull(answer)) return SG_OK;
    sg_answer_spec *a = &b->answer;
    if (!cJSON_IsObject(answer))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: guard.answer is not an object; re-export the bundle", manifest_path);
    const cJSON *output = cJSON_GetObjectItemCaseSensitive(answer, "output");
    if (output && !(cJSON_IsString(output) && !strcmp(output->valuestring, "answer_risk")))
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: guard.answer.output must be answer_risk; this library reads no other",
                       manifest_path);
    const cJSON *score = cJSON_GetObjectItemCaseSensitive(answer, "score");
    if (!cJSON_IsString(score))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: guard.answer.score is missing; re-export the bundle", manifest_path);
    if (parse_score(score->valuestring, a))
        return sg_fail(SG_ERR_UNSUPPORTED,
                       "%s: guard.answer.score '%.64s' is not a running score this library knows: use window:N "
                       "(N >= 1), ema:F (0 <= F < 1) or max",
                       manifest_path, score->valuestring);
    if (!(a->score_spec = strdup(score->valuestring))) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    const cJSON *tau = cJSON_GetObjectItemCaseSensitive(answer, "tau");
    if (!cJSON_IsNumber(tau) || !isfinite(tau->valuedouble))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: guard.answer.tau is missing or not a number; re-export the bundle",
                       manifest_path);
    a->tau = tau->valuedouble;
    const cJSON *enabled = cJSON_GetObjectItemCaseSensitive(answer, "enabled");
    if (enabled && !cJSON_IsBool(enabled))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: guard.answer.enabled must be true or false", manifest_path);
    a->enabled = !enabled || cJSON_IsTrue(enabled);
    const cJSON *hold = cJSON_GetObjectItemCaseSensitive(answer, "hold");
    if (hold && !(cJSON_IsNumber(hold) && hold->valuedouble >= 0 && hold->valuedouble <= INT32_MAX &&
                  hold->valuedouble == floor(hold->valuedouble)))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: guard.answer.hold must be a number of tokens (0 or more)",
                       manifest_path);
    a->hold = hold ? (int32_t)hold->valuedouble : 0;
    const cJSON *sw = cJSON_GetObjectItemCaseSensitive(answer, "switch");
    if (sw && !(cJSON_IsString(sw) && (!strcmp(sw->valuestring, "continue") || !strcmp(sw->valuestring, "restart"))))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: guard.answer.switch must be continue or restart", manifest_path);
    a->restart = sw && !strcmp(sw->valuestring, "restart");
    sg_status st = read_points(answer, a->tau, &a->points, &a->n_points, &a->points_recorded, &a->default_point);
    if (st != SG_OK) return st;
    a->present = 1;
    return SG_OK;
}

/* tokenizer.chat_pieces: the template as text pieces and the rules it needs; a rule this library does not
 * know, or a piece missing, leaves has_chat 0 (sg_generate then says the bundle has no chat pieces). */
static sg_status read_chat(sg_bundle *b, const cJSON *pieces) {
    if (!cJSON_IsObject(pieces)) return SG_OK; /* older bundles, or a template that does not fit pieces */
    const cJSON *open = cJSON_GetObjectItemCaseSensitive(pieces, "open");
    const cJSON *close = cJSON_GetObjectItemCaseSensitive(pieces, "close");
    const cJSON *system = cJSON_GetObjectItemCaseSensitive(pieces, "system");
    sg_chat_pieces *c = &b->chat;
    c->head = dup_str(pieces, "head");
    c->head_system = dup_str(pieces, "head_system");
    c->generation_prompt = dup_str(pieces, "generation_prompt");
    c->open_user = dup_str(open, "user");
    c->open_assistant = dup_str(open, "assistant");
    c->close_system = dup_str(close, "system");
    c->close_user = dup_str(close, "user");
    c->close_assistant = dup_str(close, "assistant");
    c->system_separator = dup_str(pieces, "system_separator");
    c->trim = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pieces, "trim"));
    c->alternate = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pieces, "alternate"));
    c->fold = cJSON_IsString(system) && !strcmp(system->valuestring, "fold");
    int known_system = !system || c->fold;
    int system_pieces = c->fold ? c->system_separator != NULL : c->head_system && c->close_system;
    b->has_chat = known_system && system_pieces && c->head && c->generation_prompt && c->open_user &&
                  c->open_assistant && c->close_user && c->close_assistant;
    return SG_OK;
}

static sg_status read_engines(sg_bundle *b, const cJSON *engines, const char *manifest_path) {
    int n = cJSON_GetArraySize(engines);
    b->engines = calloc(n > 0 ? (size_t)n : 1, sizeof *b->engines);
    if (!b->engines) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, engines) {
        sg_engine_spec *s = &b->engines[b->n_engines++];
        const cJSON *file = cJSON_GetObjectItemCaseSensitive(e, "file");
        s->name = dup_str(e, "name");
        s->role = dup_str(e, "role");
        s->path = cJSON_IsString(file) ? sg_join_path(b->root, file->valuestring) : NULL;
        if (!s->name || !s->role || !s->path)
            return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: an engine lacks a name, role or file", manifest_path);
        const cJSON *phase = cJSON_GetObjectItemCaseSensitive(e, "phase");
        s->phase = !cJSON_IsString(phase)                   ? PHASE_BOTH
                   : !strcmp(phase->valuestring, "prefill") ? PHASE_PREFILL
                                                            : PHASE_DECODE;
        const cJSON *layers = cJSON_GetObjectItemCaseSensitive(e, "layers");
        if (!strcmp(s->role, "decoder")) {
            if (!cJSON_IsArray(layers) || cJSON_GetArraySize(layers) != 2)
                return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: decoder %s has no layer range", manifest_path, s->name);
            s->first_layer = cJSON_GetArrayItem(layers, 0)->valueint;
            s->end_layer = cJSON_GetArrayItem(layers, 1)->valueint;
        }
        if (!strcmp(s->role, "vision"))
            return sg_fail(SG_ERR_UNSUPPORTED,
                           "%s: a multimodal bundle (vision engine); the C library runs text "
                           "bundles only, use the Python runtime",
                           b->root);
    }
    /* each phase's decoders cover the layers 0..n-1 in order */
    for (int phase = PHASE_PREFILL; phase <= PHASE_DECODE; phase++) {
        int32_t next = 0;
        for (size_t i = 0; i < b->n_engines; i++) {
            const sg_engine_spec *s = &b->engines[i];
            if (strcmp(s->role, "decoder") || (s->phase != PHASE_BOTH && (int)s->phase != phase)) continue;
            if (s->first_layer != next) next = -1;
            if (next >= 0) next = s->end_layer;
        }
        if (next != b->num_layers)
            return sg_fail(SG_ERR_CORRUPT_BUNDLE,
                           "%s: the %s engines do not cover layers 0-%d in order; the manifest "
                           "is damaged, re-export the bundle",
                           b->root, phase == PHASE_PREFILL ? "prefill" : "decode", b->num_layers - 1);
    }
    return SG_OK;
}

static sg_status parse(sg_bundle *b, const cJSON *root, int verify, const char *manifest_path) {
    const cJSON *format = cJSON_GetObjectItemCaseSensitive(root, "format");
    if (!cJSON_IsString(format) || strcmp(format->valuestring, "steerguard-bundle"))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: not a steerguard bundle manifest", manifest_path);
    int32_t schema = 0;
    if (get_int(root, "schema", &schema) || schema != 1)
        return sg_fail(SG_ERR_UNSUPPORTED, "%s: bundle schema %d, this library reads schema 1; re-export the bundle",
                       manifest_path, schema);
    static const char *required[] = {"model", "engines", "files", "tokenizer", "generation"};
    for (size_t i = 0; i < 5; i++)
        if (!cJSON_GetObjectItemCaseSensitive(root, required[i]))
            return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: no '%s' entry; re-export the bundle", manifest_path,
                           required[i]);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    b->name = dup_str(model, "name");
    b->precision = dup_str(root, "precision");
    if (!b->name || !b->precision || get_int(model, "num_layers", &b->num_layers) ||
        get_int(model, "hidden_size", &b->hidden_size) || get_int(model, "vocab_size", &b->vocab_size) ||
        get_int(model, "num_kv_heads", &b->kv_heads) || get_int(model, "head_dim", &b->head_dim) ||
        get_int(model, "context", &b->context))
        return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: the model entry is incomplete; re-export the bundle", manifest_path);
    const cJSON *mrope = cJSON_GetObjectItemCaseSensitive(model, "mrope");
    const cJSON *vision = cJSON_GetObjectItemCaseSensitive(root, "vision");
    if ((mrope && !cJSON_IsNull(mrope)) || (vision && !cJSON_IsNull(vision)))
        return sg_fail(SG_ERR_UNSUPPORTED,
                       "%s: a multimodal bundle; the C library runs text bundles only, use the "
                       "Python runtime",
                       b->root);
    sg_status st = check_files(b, root, verify, manifest_path);
    if (st != SG_OK) return st;
    if ((st = read_engines(b, cJSON_GetObjectItemCaseSensitive(root, "engines"), manifest_path)) != SG_OK) return st;
    const cJSON *guard = cJSON_GetObjectItemCaseSensitive(root, "guard");
    b->split_layer = -1;
    b->tau = NAN;
    if (cJSON_IsObject(guard)) {
        const cJSON *tau = cJSON_GetObjectItemCaseSensitive(guard, "tau");
        const cJSON *feature = cJSON_GetObjectItemCaseSensitive(guard, "feature");
        if (!cJSON_IsNumber(tau) || get_int(guard, "split_layer", &b->split_layer))
            return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: the guard entry lacks tau or split_layer", manifest_path);
        b->guarded = 1;
        b->tau = tau->valuedouble;
        b->risk_per_token = cJSON_IsString(feature) && !strcmp(feature->valuestring, "max");
        if ((st = read_operating_points(b, guard)) != SG_OK) return st;
        if ((st = read_answer(b, guard, manifest_path)) != SG_OK) return st;
    }
    const cJSON *stops =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "generation"), "stop_token_ids");
    int n = cJSON_GetArraySize(stops);
    b->stop_ids = calloc(n > 0 ? (size_t)n : 1, sizeof *b->stop_ids);
    if (!b->stop_ids) return sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    const cJSON *s;
    cJSON_ArrayForEach(s, stops) b->stop_ids[b->n_stop_ids++] = s->valueint;
    const cJSON *tok = cJSON_GetObjectItemCaseSensitive(root, "tokenizer");
    const cJSON *file = cJSON_GetObjectItemCaseSensitive(tok, "file");
    if (!cJSON_IsString(file)) return sg_fail(SG_ERR_CORRUPT_BUNDLE, "%s: no tokenizer file", manifest_path);
    b->tokenizer_path = sg_join_path(b->root, file->valuestring);
    return read_chat(b, cJSON_GetObjectItemCaseSensitive(tok, "chat_pieces"));
}

sg_status sg_bundle_load(const char *root, int verify, sg_bundle *b) {
    memset(b, 0, sizeof *b);
    struct stat s;
    if (stat(root, &s) || !S_ISDIR(s.st_mode))
        return sg_fail(SG_ERR_IO, "%s: no such bundle folder (make one with `steerguard export`)", root);
    b->root = strdup(root);
    char *manifest_path = sg_join_path(root, "manifest.json");
    sg_status st = SG_OK;
    cJSON *json = NULL;
    if (!b->root || !manifest_path)
        st = sg_fail(SG_ERR_OUT_OF_MEMORY, "out of memory");
    else if (stat(manifest_path, &s))
        st = sg_fail(SG_ERR_IO, "%s: missing; %s is not a steerguard bundle", manifest_path, root);
    else if ((json = sg_read_json(manifest_path, &st)))
        st = parse(b, json, verify, manifest_path);
    cJSON_Delete(json);
    free(manifest_path);
    if (st != SG_OK) sg_bundle_free(b);
    return st;
}

void sg_bundle_free(sg_bundle *b) {
    for (size_t i = 0; i < b->n_engines; i++) {
        free(b->engines[i].name);
        free(b->engines[i].role);
        free(b->engines[i].path);
    }
    free(b->engines);
    for (size_t i = 0; i < b->n_points; i++) free(b->points[i].name);
    free(b->points);
    for (size_t i = 0; i < b->answer.n_points; i++) free(b->answer.points[i].name);
    free(b->answer.points);
    free(b->answer.score_spec);
    free(b->stop_ids);
    free(b->tokenizer_path);
    free(b->root);
    free(b->name);
    free(b->precision);
    sg_chat_pieces *c = &b->chat;
    char *pieces[] = {c->head,         c->head_system, c->generation_prompt, c->open_user,       c->open_assistant,
                      c->close_system, c->close_user,  c->close_assistant,   c->system_separator};
    for (size_t i = 0; i < sizeof pieces / sizeof *pieces; i++) free(pieces[i]);
    memset(b, 0, sizeof *b);
}
