/* A terminal chat on a steerguard bundle through libsteerguard: every user turn is judged by the guard.
 *
 *   build/c/chat BUNDLE [max_new_tokens]        (one line per turn; an empty line or EOF ends) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "steerguard.h"

static int print_piece(int32_t token, const char *piece, size_t length, void *user_data) {
    fwrite(piece, 1, length, stdout);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s BUNDLE [max_new_tokens]\n", argv[0]);
        return 2;
    }
    sg_model *model;
    if (sg_model_load(argv[1], NULL, &model) != SG_OK) {
        fprintf(stderr, "error: %s\n", sg_last_error());
        return 1;
    }
    sg_sampling sampling = sg_sampling_default();
    if (argc > 2) sampling.max_new_tokens = atoi(argv[2]);

    sg_message history[64];
    char *owned[64];
    size_t n = 0;
    char line[4096];
    while (n + 2 <= 64 && fputs("> ", stdout) >= 0 && fgets(line, sizeof line, stdin) && line[0] != '\n') {
        line[strcspn(line, "\n")] = '\0';
        owned[n] = strdup(line);
        history[n] = (sg_message){"user", owned[n]};
        sg_result result;
        if (sg_generate(model, history, n + 1, &sampling, print_piece, NULL, &result) != SG_OK) {
            fprintf(stderr, "\nerror: %s\n", sg_last_error());
            free(owned[n]);
            continue;
        }
        printf("\n[risk %.3f, %s at layer %d]\n", result.risk, result.fired ? "refused" : "passed", result.split_layer);
        owned[n + 1] = strdup(result.text);
        history[n + 1] = (sg_message){"assistant", owned[n + 1]};
        n += 2;
        sg_result_free(&result);
    }
    for (size_t i = 0; i < n; i++) free(owned[i]);
    sg_model_free(model);
    return 0;
}
