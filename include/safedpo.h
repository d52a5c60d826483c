/* safedpo.h: the C ABI of safedpo's Engine (src/capi.rs; tests/capi.rs keeps the two in step).
 *
 * Link with -lsafedpo (target/release/libsafedpo.so). Every function but the
 * last three returns a status code; on failure safedpo_last_error() says why. No function unwinds
 * or aborts on bad input. An engine may be used from one thread at a time. */
#ifndef SAFEDPO_H
#define SAFEDPO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SAFEDPO_OK 0               /* success */
#define SAFEDPO_ERROR 1            /* the call failed: see safedpo_last_error() */
#define SAFEDPO_INVALID_ARGUMENT 2 /* a null pointer where none is allowed, or a string not UTF-8 */
#define SAFEDPO_PANIC 3            /* a bug in the library; the engine may be half-updated */

/* An engine: a policy (trainable) and a reference (frozen) on one device. */
typedef struct SafedpoEngine SafedpoEngine;

/* One preference pair of token ids: the prompt, then each response (with its EOS if it has one).
 * A pointer may be NULL only when its length is 0. The flags are 1 for an unsafe response. */
typedef struct SafedpoPair {
    const int32_t *prompt;
    size_t prompt_len;
    const int32_t *chosen;
    size_t chosen_len;
    const int32_t *rejected;
    size_t rejected_len;
    int chosen_unsafe;
    int rejected_unsafe;
} SafedpoPair;

/* One unpaired example of token ids (KTO's rows): the prompt, then the completion (with its EOS if it
 * has one). A pointer may be NULL only when its length is 0. desirable is 1 for a desirable
 * completion (TRL's label), completion_unsafe 1 for an unsafe one. */
typedef struct SafedpoExample {
    const int32_t *prompt;
    size_t prompt_len;
    const int32_t *completion;
    size_t completion_len;
    int desirable;
    int completion_unsafe;
} SafedpoExample;

/* The message of this thread's last failed call ("" after a success); never NULL, valid until the
 * thread's next call. */
const char *safedpo_last_error(void);

/* The library's version, e.g. "0.1.0". */
const char *safedpo_version(void);

/* Makes an engine on device "auto", "cpu", "cuda" or "emu" (NULL = "auto") into *out. */
int safedpo_engine_new(const char *device, SafedpoEngine **out);

/* Releases an engine (NULL is ignored). */
void safedpo_engine_free(SafedpoEngine *engine);

/* Loads the trainable policy (and its tokenizer) from a Hugging Face model directory. */
int safedpo_load_policy(SafedpoEngine *engine, const char *dir);

/* Loads the frozen reference from a Hugging Face model directory. */
int safedpo_load_reference(SafedpoEngine *engine, const char *dir);

/* A random policy from a HF config.json text, e.g.
 * {"model_type": "gpt2", "vocab_size": 258, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2,
 * "layer_norm_epsilon": 1e-5}. */
int safedpo_random_policy(SafedpoEngine *engine, const char *config_json, uint64_t seed);

/* Makes a frozen copy of the policy's current weights the reference. */
int safedpo_reference_from_policy(SafedpoEngine *engine);

/* Sets the training objective, "name:key=value,..." (e.g. "safedpo:beta=0.1,delta=10", "dpo"). */
int safedpo_set_objective(SafedpoEngine *engine, const char *objective);

/* Sequence log-probs: the policy's into policy_chosen[n_pairs] and policy_rejected[n_pairs], the
 * reference's into reference_chosen / reference_rejected (NULL to skip; an error when not NULL and
 * no reference is loaded). */
int safedpo_logps(SafedpoEngine *engine, const SafedpoPair *pairs, size_t n_pairs, float *policy_chosen,
                  float *policy_rejected, float *reference_chosen, float *reference_rejected);

/* The loss under objective ("name:key=value,..."; NULL = the training objective; TRL's ld_alpha and
 * use_weighting included): the mean into *mean_loss, each pair's into per_pair_loss[n_pairs] (either
 * may be NULL). */
int safedpo_loss(SafedpoEngine *engine, const SafedpoPair *pairs, size_t n_pairs, const char *objective,
                 float *mean_loss, float *per_pair_loss);

/* One AdamW step (grad-norm clip 1) on the pairs' mean loss under the training objective at
 * learning rate lr; writes the loss before the update and the gradient norm (either may be NULL). */
int safedpo_train_step(SafedpoEngine *engine, const SafedpoPair *pairs, size_t n_pairs, float lr, float *loss,
                       float *grad_norm);

/* One AdamW step whose gradient is accumulated over micro-batches run one after another: the pairs
 * cut in order into n_micro micro-batches of micro_sizes[k] pairs (adding up to n_pairs); the mean
 * loss over all pairs, as safedpo_train_step on them at once. Writes the loss and gradient norm. */
int safedpo_accumulated_step(SafedpoEngine *engine, const SafedpoPair *pairs, size_t n_pairs,
                             const size_t *micro_sizes, size_t n_micro, float lr, float *loss, float *grad_norm);

/* The loss of unpaired examples, one batch, under objective ("kto:..." or "apo_zero_unpaired:...";
 * NULL = the training objective): the mean into *mean_loss, each example's (weighted) into
 * per_example_loss[n_examples], KTO's KL estimate of the batch into *kl (each may be NULL). */
int safedpo_unpaired_loss(SafedpoEngine *engine, const SafedpoExample *examples, size_t n_examples,
                          const char *objective, float *mean_loss, float *per_example_loss, float *kl);

/* One AdamW step (grad-norm clip 1) on the examples' mean loss, one batch, under the training objective
 * (kto or apo_zero_unpaired) at learning rate lr; writes the loss before the update, the gradient norm
 * and KTO's KL estimate (each may be NULL). */
int safedpo_unpaired_train_step(SafedpoEngine *engine, const SafedpoExample *examples, size_t n_examples,
                                float lr, float *loss, float *grad_norm, float *kl);

/* Writes the policy as a HF model directory (with the optimizer state once it has trained). */
int safedpo_save(SafedpoEngine *engine, const char *dir);

#ifdef __cplusplus
}
#endif

#endif /* SAFEDPO_H */
