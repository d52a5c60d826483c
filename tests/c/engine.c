/* The C ABI end to end: an engine on the CPU, a random GPT-2, log-probs, DPO and SafeDPO losses,
 * two training steps, errors as codes and messages, save and load back; TRL's log-prob modifiers;
 * KTO's loss and training steps on unpaired examples. Prints "ok" and exits 0
 * when every check holds. Usage: engine SAVE_DIR */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "safedpo.h"

static int failures = 0;

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, safedpo_last_error());                                            \
            failures++;                                                                      \
        }                                                                                    \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SAVE_DIR\n", argv[0]);
        return 2;
    }
    CHECK(strlen(safedpo_version()) > 0);

    SafedpoEngine *engine = NULL;
    CHECK(safedpo_engine_new("no-such-device", &engine) == SAFEDPO_ERROR && engine == NULL);
    CHECK(strstr(safedpo_last_error(), "unknown device") != NULL);
    CHECK(safedpo_engine_new("cpu", NULL) == SAFEDPO_INVALID_ARGUMENT);
    CHECK(safedpo_engine_new("cpu", &engine) == SAFEDPO_OK && engine != NULL);
    CHECK(strcmp(safedpo_last_error(), "") == 0);

    const char *config =
        "{\"model_type\": \"gpt2\", \"vocab_size\": 64, \"n_positions\": 32, \"n_embd\": 16, \"n_layer\": 1, \"n_head\": 2,"
        " \"layer_norm_epsilon\": 1e-5}";
    int32_t prompt[] = {1, 2, 3, 4};
    int32_t good[] = {5, 6, 7};
    int32_t bad[] = {8, 9};
    int32_t out_of_vocab[] = {64};
    SafedpoPair pairs[2] = {
        {prompt, 4, good, 3, bad, 2, 0, 1},
        {prompt, 2, bad, 2, good, 3, 0, 0},
    };
    float pc[2], pr[2], rc[2], rr[2], per_pair[2], loss = 0, grad_norm = 0, dpo = 0, safedpo = 0;

    /* No policy yet: an error, not a crash. */
    CHECK(safedpo_logps(engine, pairs, 2, pc, pr, NULL, NULL) == SAFEDPO_ERROR);
    CHECK(strstr(safedpo_last_error(), "no policy") != NULL);

    CHECK(safedpo_random_policy(engine, "{not json", 0) == SAFEDPO_INVALID_ARGUMENT);
    CHECK(safedpo_random_policy(engine, config, 0) == SAFEDPO_OK);
    CHECK(safedpo_logps(engine, pairs, 2, pc, pr, rc, NULL) == SAFEDPO_ERROR); /* no reference */
    CHECK(safedpo_reference_from_policy(engine) == SAFEDPO_OK);
    CHECK(safedpo_logps(engine, pairs, 2, pc, pr, rc, rr) == SAFEDPO_OK);
    for (int i = 0; i < 2; i++) {
        CHECK(pc[i] < 0 && pr[i] < 0 && pc[i] == rc[i] && pr[i] == rr[i]);
    }

    /* Policy = reference: DPO gives log 2 per pair; SafeDPO's margin raises pair 0's loss. */
    CHECK(safedpo_loss(engine, pairs, 2, "dpo", &dpo, per_pair) == SAFEDPO_OK);
    CHECK(fabsf(dpo - logf(2.0f)) < 1e-5f);
    CHECK(safedpo_loss(engine, pairs, 2, NULL, &safedpo, per_pair) == SAFEDPO_OK); /* SafeDPO */
    CHECK(per_pair[0] > 9.0f && fabsf(per_pair[1] - logf(2.0f)) < 1e-5f);
    CHECK(safedpo_loss(engine, pairs, 2, "nonsense", &loss, NULL) == SAFEDPO_ERROR);

    SafedpoPair wrong = {prompt, 4, out_of_vocab, 1, bad, 2, 0, 0};
    CHECK(safedpo_logps(engine, &wrong, 1, pc, pr, NULL, NULL) == SAFEDPO_ERROR);
    CHECK(strstr(safedpo_last_error(), "vocabulary") != NULL);
    SafedpoPair null_tokens = {NULL, 3, good, 3, bad, 2, 0, 0};
    CHECK(safedpo_logps(engine, &null_tokens, 1, pc, pr, NULL, NULL) == SAFEDPO_INVALID_ARGUMENT);

    CHECK(safedpo_set_objective(engine, "dpo:beta=0.5") == SAFEDPO_OK);
    float first = 0, second = 0;
    CHECK(safedpo_train_step(engine, pairs, 2, 1e-2f, &first, &grad_norm) == SAFEDPO_OK);
    CHECK(fabsf(first - logf(2.0f)) < 1e-5f && grad_norm > 0);
    CHECK(safedpo_train_step(engine, pairs, 2, 1e-2f, &second, NULL) == SAFEDPO_OK);
    CHECK(second < first);

    size_t halves[] = {1, 1}, too_many[] = {2, 1};
    float accumulated = 0;
    CHECK(safedpo_accumulated_step(engine, pairs, 2, halves, 2, 1e-2f, &accumulated, &grad_norm) == SAFEDPO_OK);
    CHECK(accumulated < second && grad_norm > 0);
    CHECK(safedpo_accumulated_step(engine, pairs, 2, too_many, 2, 1e-2f, NULL, NULL) == SAFEDPO_INVALID_ARGUMENT);

    CHECK(safedpo_save(engine, argv[1]) == SAFEDPO_OK);
    SafedpoEngine *loaded = NULL;
    CHECK(safedpo_engine_new("cpu", &loaded) == SAFEDPO_OK);
    CHECK(safedpo_load_policy(loaded, argv[1]) == SAFEDPO_OK);
    float lc[2], lr_[2], tc[2], tr[2];
    CHECK(safedpo_logps(loaded, pairs, 2, lc, lr_, NULL, NULL) == SAFEDPO_OK);
    CHECK(safedpo_logps(engine, pairs, 2, tc, tr, NULL, NULL) == SAFEDPO_OK);
    for (int i = 0; i < 2; i++) {
        CHECK(lc[i] == tc[i] && lr_[i] == tr[i]);
    }
    CHECK(safedpo_load_policy(loaded, "/no/such/dir") == SAFEDPO_ERROR);

    /* TRL's log-prob modifiers in the pairwise loss. */
    CHECK(safedpo_loss(engine, pairs, 2, "dpo:ld_alpha=0.5,use_weighting=true", &loss, per_pair) == SAFEDPO_OK);
    CHECK(isfinite(loss) && loss > 0);

    /* Unpaired examples (KTO): with policy = reference every reward and the KL estimate are 0, so
     * each loss is sigma(0) = 0.5 times its weight. */
    SafedpoEngine *kto = NULL;
    CHECK(safedpo_engine_new("cpu", &kto) == SAFEDPO_OK);
    CHECK(safedpo_random_policy(kto, config, 1) == SAFEDPO_OK);
    CHECK(safedpo_reference_from_policy(kto) == SAFEDPO_OK);
    SafedpoExample examples[3] = {
        {prompt, 4, good, 3, 1, 0},
        {prompt, 4, bad, 2, 0, 1},
        {prompt, 2, good, 3, 1, 0},
    };
    float per_example[3], kl = -1, kto_loss = 0;
    CHECK(safedpo_unpaired_loss(kto, examples, 3, "kto:desirable_weight=2", &kto_loss, per_example, &kl) ==
          SAFEDPO_OK);
    CHECK(kl == 0 && fabsf(per_example[0] - 1.0f) < 1e-6f && fabsf(per_example[1] - 0.5f) < 1e-6f);
    CHECK(fabsf(kto_loss - 2.5f / 3.0f) < 1e-6f);
    CHECK(safedpo_unpaired_loss(kto, examples, 3, "dpo", &kto_loss, NULL, NULL) == SAFEDPO_ERROR);
    CHECK(strstr(safedpo_last_error(), "pairs") != NULL);
    CHECK(safedpo_unpaired_loss(kto, NULL, 3, "kto", &kto_loss, NULL, NULL) == SAFEDPO_INVALID_ARGUMENT);
    /* The training objective is still SafeDPO, on pairs. */
    CHECK(safedpo_unpaired_train_step(kto, examples, 3, 1e-2f, &first, NULL, NULL) == SAFEDPO_ERROR);
    CHECK(safedpo_set_objective(kto, "kto:beta=0.5") == SAFEDPO_OK);
    CHECK(safedpo_unpaired_train_step(kto, examples, 3, 1e-2f, &first, &grad_norm, &kl) == SAFEDPO_OK);
    CHECK(fabsf(first - 0.5f) < 1e-6f && grad_norm > 0 && kl == 0);
    CHECK(safedpo_unpaired_train_step(kto, examples, 3, 1e-2f, &second, NULL, &kl) == SAFEDPO_OK);
    CHECK(second < first && kl >= 0);
    safedpo_engine_free(kto);

    safedpo_engine_free(loaded);
    safedpo_engine_free(engine);
    safedpo_engine_free(NULL);
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
