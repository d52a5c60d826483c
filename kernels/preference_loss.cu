// kernels/preference_loss.cu — the preference objectives, one thread per pair, one launch per term of the
// objective (two for a term that sorts across the batch).
//
// Per pair i (sequence 2i is the chosen response, 2i+1 the rejected one), with πc, πr the policy's and rc,
// rr the reference's sequence log-probs, x_c = πc − rc, x_r = πr − rr, h = x_c − x_r, u the safety flags
// (1 = unsafe), |y| the response lengths (0 counts as 1), a = π/|y| the mean token log-probs, and the
// SafeDAA shift t = (u_r − u_c)·Δ (Δ = `safety_margin`; 0 leaves every objective as published):
//
//     dpo           softplus(−z), z = βh − t                         (also safedpo: Δ = its delta)
//     ipo           (h − 1/(2β) − t/β)²
//     robust        [(1−ε)·softplus(−z) − ε·softplus(z)] / (1 − 2ε)
//     cdpo          (1−ε)·softplus(−z) + ε·softplus(z)
//     hinge         max(0, 1 − βh + t)                  (subgradient 0 at the kink)
//     rpo           softplus(−z) + α·(−πc/|yc|)
//     simpo         softplus(−z), z = β(a_c − a_r) − γ − t           (reference-free)
//     npo           (2/β)·softplus(βx_r + t)             (no gradient to the chosen response)
//     exo_pair      σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)
//     nca_pair      softplus(−βx_c) + ½softplus(βx_c) + ½softplus(βx_r + t)
//     sppo_hard     (x_c − 1/(2β))² + (x_r + t/β + 1/(2β))²
//     apo_zero      σ(−βx_c) + σ(βx_r + t)
//     apo_down      σ(βx_c) + σ(−z)
//     discopop      softplus(−z)·σ(−z/τ) + exp(−z − softplus(−z/τ))
//     sigmoid_norm  softplus(−z), z = β(x_c/|yc| − x_r/|yr|) − t
//     bco_pair      softplus(−(βx_c − δ)) + softplus(βx_r + t − δ)   (δ: the running reward mean, or 0)
//     aot           (1−ε)·softplus(−z_k) + ε·softplus(z_k), z_k = β(sort(πc − πr − t/β)_k − sort(rc − rr)_k)
//     aot_unpaired  the same with z_k = β(sort(x_c)_k − sort(x_r + t/β)_k)
//     sft           −Σ_j πc_j / Σ_j |yc_j| on every row (the batch's token-mean NLL)
//     orpo          β·softplus(−z), z = (a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r})) − t
//     cpo           (1−ε)·softplus(−z) + ε·softplus(z), z = β(πc − πr) − t          (reference-free)
//     cpo_hinge     max(0, 1 − β(πc − πr) + t)
//     cpo_ipo       (a_c − a_r − t/β − 1/(2β))²
//     cpo_simpo     (1−ε)·softplus(−z) + ε·softplus(z), z = β(a_c − a_r) − γ − t
//
// The objectives built on h (dpo, ipo, robust, cdpo, hinge, rpo's first part, exo_pair, discopop,
// sigmoid_norm) read, under an f-divergence (`f_divergence` ≠ FDIV_REVERSE_KL), the scores f'(e^x) of x_c
// and x_r in place of x_c and x_r. ORPO's and CPO's NLL terms are `sft` launches of their own, as is each
// term of a combination: launch k > 0 accumulates (`accumulate` = 1: metrics row's loss += weight·loss,
// dpolicy += ...), launch 0 writes the rows. CPU twin: src/backend/cpu/preference_loss.rs (`spec::forward`,
// which calls the specification, `batch_loss_with` in src/loss/; `spec::forward_parts`, `batch_loss_parts`
// with TRL's log-prob modifiers). Host side: src/backend/cuda/ops/preference_loss.rs (`launches` maps an
// objective to its launches and OBJ_* codes).
//
// TRL's log-prob modifiers (src/loss/modifiers.rs):
// - LD-DPO (`ld_alpha` = α): the host composes π = shared + α·tail for the policy and the reference with
//   `ld_weighted_logps_f32` and passes those as `policy` and `reference`; the NLL parts (`sft`, RPO's) read
//   `plain` (the plain log-probs) and add their gradient to `dplain`; `ld_split_grads_f32` then writes each
//   sequence's token gradients, dread + dplain for its shared part and α·dread + dplain past it.
//   `plain` = `dplain` = NULL: the NLL parts read `policy` and write `dpolicy`.
// - WPO (`use_weighting`): `aligned` [2P] holds each response's Σ_t (log p_t − log Σ_v p_v²); the pair's
//   weight w = exp(ā_c)·exp(ā_r), ā = aligned/|y|, multiplies its loss and gradient; the `sft` launch writes
//   w_i·NLL on row i and the gradient Σ_i w_i·dNLL. NULL: no weights. (Not with the sorting objectives.)
//
// Writes metrics [P, 5] = (loss, chosen reward, rejected reward, margin, accuracy), rewards β(π − r)
// (cpo, cpo_hinge: β·π; simpo, orpo, cpo_ipo, cpo_simpo: β·a), and dpolicy [2P] = grad_scale·d(Σ loss)/dπ.
//
// f32 math throughout, stable for any margin: softplus(x) = max(x, 0) + log1p(exp(−|x|)) never
// overflows, σ is evaluated on the side where exp cannot overflow, and every exponential of a margin is
// written so that its argument is ≤ 0 where it could grow (discopop's, for τ ≤ 1); the f-divergences'
// scores are TRL's (the forward KL's e^{−x} overflows for x < −88, as TRL's does).
//
// Unpaired examples (`preference_loss_examples_f32`, one thread per example; CPU twin `spec::forward_examples`,
// which calls `unpaired_loss` in src/loss/unpaired.rs), with x = π − r the example's log-ratio, λ_D/λ_U the
// desirable/undesirable weights, u its completion's safety flag and z_KL the batch's KL estimate
// max(0, mean(π_KL − r_KL)) over its KL sequences (detached: no gradient reaches them):
//
//     kto                desirable λ_D·σ(βz_KL − (βx + uΔ)),  undesirable λ_U·σ((βx + uΔ) − βz_KL)
//     apo_zero_unpaired  the same with z_KL = 0 (no KL sequences)
//
// Writes metrics [N, 3] = (loss, reward βx, z_KL) and dpolicy [N] = grad_scale·dloss/dπ.
//
// Launch: 1-D grid of PAIR_THREADS-thread blocks, thread i handles pair i (inputs are f32 in every precision
// mode, so there is only the f32 instantiation). AOT: `preference_loss_rank_f32` first (thread i ranks pair
// i's two sort keys and writes its index into a scratch buffer at those ranks), then
// `preference_loss_sorted_f32` (thread k scores sorted position k and writes metrics row k). `sft` sums
// over the batch in every thread (a batch has few pairs; the sums are the same in every thread).
#include "common.cuh"

// The objective codes of the `objective` argument.
#define OBJ_DPO 0  // @rust
#define OBJ_IPO 1  // @rust
#define OBJ_ROBUST 2  // @rust
#define OBJ_CDPO 3  // @rust
#define OBJ_HINGE 4  // @rust
#define OBJ_RPO 5  // @rust
#define OBJ_SIMPO 6  // @rust
#define OBJ_NPO 7  // @rust
#define OBJ_EXO_PAIR 8  // @rust
#define OBJ_NCA_PAIR 9  // @rust
#define OBJ_SPPO_HARD 10  // @rust
#define OBJ_APO_ZERO 11  // @rust
#define OBJ_APO_DOWN 12  // @rust
#define OBJ_DISCOPOP 13  // @rust
#define OBJ_SIGMOID_NORM 14  // @rust
#define OBJ_BCO_PAIR 15  // @rust
/// The objectives that sort across the batch: the two-launch path.
#define OBJ_AOT 16  // @rust
#define OBJ_AOT_UNPAIRED 17  // @rust
/// The reference-free objectives of the preference optimisers TRL keeps outside `DPOTrainer`, and SFT.
#define OBJ_SFT 18  // @rust
#define OBJ_ORPO 19  // @rust
#define OBJ_CPO 20  // @rust
#define OBJ_CPO_HINGE 21  // @rust
#define OBJ_CPO_IPO 22  // @rust
#define OBJ_CPO_SIMPO 23  // @rust
/// The objectives on unpaired examples (`preference_loss_examples_f32`): KTO and TRL's apo_zero_unpaired.
#define OBJ_KTO 24  // @rust
#define OBJ_APO_ZERO_UNPAIRED 25  // @rust

// The f-divergence codes of the `f_divergence` argument (TRL's `f_divergence_type`).
#define FDIV_REVERSE_KL 0  // @rust
#define FDIV_FORWARD_KL 1  // @rust
#define FDIV_JS_DIVERGENCE 2  // @rust
#define FDIV_ALPHA_DIVERGENCE 3  // @rust
/// TRL clamps the α-divergence's exponent (α−1)·x here before exp.
#define ALPHA_DIVERGENCE_MAX_EXPONENT 80.0f  // @rust
/// ORPO's largest mean token log-prob (its log odds are infinite at 0).
#define ORPO_MAX_MEAN_LOGP -1e-6f  // @rust

/// Metrics per pair: loss, chosen reward, rejected reward, margin, accuracy.
#define PAIR_METRICS 5  // @rust
/// Metrics per unpaired example: weighted loss, reward, the batch's KL estimate.
#define EXAMPLE_METRICS 3  // @rust
/// Threads per block (one per pair).
#define PAIR_THREADS 128  // @rust
/// AOT's rank pass stores pair indices as floats in its scratch buffer: exact below 2^24.
#define SORTED_MAX_PAIRS 16777216  // @rust

__device__ __forceinline__ float softplus_f(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

__device__ __forceinline__ float sigmoid_f(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}

/// The label-smoothed logistic loss (cdpo, aot) and its derivative in z.
__device__ __forceinline__ void label_smoothed_f(float z, float eps, float* loss, float* dz) {
    *loss = (1.0f - eps) * softplus_f(-z) + eps * softplus_f(z);
    *dz = -(1.0f - eps) * sigmoid_f(-z) + eps * sigmoid_f(z);
}

/// The f-divergence score of a log-ratio x and its derivative in x (TRL's `f_divergence_type` formulas).
__device__ __forceinline__ void f_divergence_score(int f_divergence, float alpha, float x, float* score, float* dx) {
    switch (f_divergence) {
        case FDIV_FORWARD_KL: {
            const float inverse_ratio = expf(-x);
            *score = 1.0f - inverse_ratio;
            *dx = inverse_ratio;
            return;
        }
        case FDIV_JS_DIVERGENCE:
            *score = 0.69314718055994531f - softplus_f(-x);
            *dx = sigmoid_f(-x);
            return;
        case FDIV_ALPHA_DIVERGENCE:
            if (fabsf(alpha - 1.0f) >= 1e-6f) {
                const float exponent = (alpha - 1.0f) * x, coef = 1.0f / (alpha - 1.0f);
                const bool clamped = exponent > ALPHA_DIVERGENCE_MAX_EXPONENT;
                const float ratio = expf(clamped ? ALPHA_DIVERGENCE_MAX_EXPONENT : exponent);
                *score = (ratio - 1.0f) * coef;
                *dx = clamped ? 0.0f : ratio;
                return;
            }
            break;  // α = 1: the reverse KL
        default:
            break;
    }
    *score = x;
    *dx = 1.0f;
}

/// Whether the objective reads the (f-divergence) scores of its log-ratios: those built on h (`sft`
/// takes an f-divergence too, but reads no log-ratio).
__device__ __forceinline__ bool reads_scores(int objective) {
    return objective == OBJ_DPO || objective == OBJ_IPO || objective == OBJ_ROBUST || objective == OBJ_CDPO ||
           objective == OBJ_HINGE || objective == OBJ_RPO || objective == OBJ_EXO_PAIR ||
           objective == OBJ_DISCOPOP || objective == OBJ_SIGMOID_NORM;
}

/// `log(1 − eˣ)` for x < 0 without cancellation (split at −log 2).
__device__ __forceinline__ float log1mexp_f(float x) {
    return x < -0.69314718055994531f ? log1pf(-expf(x)) : logf(-expm1f(x));
}

/// The SafeDAA shift (u_r − u_c)·Δ of pair i.
__device__ __forceinline__ float safety_shift(const int* unsafe_flags, int i, float safety_margin) {
    return (float)((unsafe_flags[2 * i + 1] != 0) - (unsafe_flags[2 * i] != 0)) * safety_margin;
}

/// Writes metrics row `row`: loss, the two rewards, their margin, accuracy.
__device__ __forceinline__ void write_metrics(float* metrics, int row, float loss, float reward_chosen,
                                              float reward_rejected) {
    float* out = metrics + (long long)row * PAIR_METRICS;
    out[0] = loss;
    out[1] = reward_chosen;
    out[2] = reward_rejected;
    out[3] = reward_chosen - reward_rejected;
    out[4] = reward_chosen > reward_rejected ? 1.0f : 0.0f;
}

/// Launch 0 writes the rows (loss, rewards, margin, accuracy) and dpolicy; a later launch (`accumulate`)
/// adds its weighted loss and gradient.
__device__ __forceinline__ void write_pair(float* metrics, float* dpolicy, int i, int accumulate, float weight,
                                           float grad_scale, float loss, float d_chosen, float d_rejected,
                                           float reward_chosen, float reward_rejected) {
    if (accumulate) {
        metrics[(long long)i * PAIR_METRICS] += weight * loss;
        dpolicy[2 * i] += grad_scale * (weight * d_chosen);
        dpolicy[2 * i + 1] += grad_scale * (weight * d_rejected);
    } else {
        write_metrics(metrics, i, weight * loss, reward_chosen, reward_rejected);
        dpolicy[2 * i] = grad_scale * (weight * d_chosen);
        dpolicy[2 * i + 1] = grad_scale * (weight * d_rejected);
    }
}

/// WPO's weight of pair i: exp(ā_c)·exp(ā_r), ā = aligned / |y| (|y| at least 1).
__device__ __forceinline__ float wpo_weight(const float* aligned, const int* lengths, int i) {
    const int c = 2 * i, r = 2 * i + 1;
    return expf(aligned[c] / (float)max(lengths[c], 1)) * expf(aligned[r] / (float)max(lengths[r], 1));
}

/// One term of the objective. `param` is its second parameter: ε (robust, cdpo, exo_pair, cpo, cpo_simpo),
/// α (rpo), γ (simpo), τ (discopop); `param2` its third: γ (cpo_simpo). `f_divergence`/`alpha`: the
/// f-divergence and its α; `bco_shift`: bco_pair's δ; `weight`: the term's weight. `plain`, `dplain`,
/// `aligned`: TRL's log-prob modifiers (see the header), NULL without them.
extern "C" __global__ void preference_loss_f32(float* metrics, float* dpolicy, float* dplain, const float* policy,
                                               const float* reference, const float* plain, const float* aligned,
                                               const int* unsafe_flags, const int* lengths, int num_pairs,
                                               int objective, float beta, float param, float param2,
                                               float safety_margin, int f_divergence, float alpha, float bco_shift,
                                               float weight, int accumulate, float grad_scale) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= num_pairs) return;
    const int c = 2 * i, r = 2 * i + 1;
    const float pc = policy[c], pr = policy[r];
    // The NLL parts read the plain log-probs (under LD-DPO, `policy` holds the weighted ones).
    const float* nll_logps = plain != nullptr ? plain : policy;
    float d_plain = 0.0f;  // the NLL parts' gradient in the plain chosen log-prob
    const float rc = reference != nullptr ? reference[c] : 0.0f;
    const float rr = reference != nullptr ? reference[r] : 0.0f;
    const float chosen_logratio = pc - rc, rejected_logratio = pr - rr;
    const float chosen_len = (float)max(lengths[c], 1), rejected_len = (float)max(lengths[r], 1);
    const float shift = safety_shift(unsafe_flags, i, safety_margin);
    // The scores of the log-ratios: the log-ratios themselves unless an f-divergence applies.
    const bool scored = f_divergence != FDIV_REVERSE_KL && reads_scores(objective);
    float chosen_score = chosen_logratio, rejected_score = rejected_logratio;
    float d_chosen_score = 1.0f, d_rejected_score = 1.0f;
    if (scored) {
        f_divergence_score(f_divergence, alpha, chosen_logratio, &chosen_score, &d_chosen_score);
        f_divergence_score(f_divergence, alpha, rejected_logratio, &rejected_score, &d_rejected_score);
    }
    const float h = chosen_score - rejected_score;

    // The derivatives are in the scores until the chain rule after the switch.
    float loss, d_chosen, d_rejected;
    switch (objective) {
        case OBJ_DPO:
        case OBJ_RPO: {
            float z = beta * h;
            z -= shift;
            loss = softplus_f(-z);
            d_chosen = -beta * sigmoid_f(-z);
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_IPO: {
            const float residual = h - 1.0f / (2.0f * beta) - shift / beta;
            loss = residual * residual;
            d_chosen = 2.0f * residual;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_ROBUST: {
            const float z = beta * h - shift, eps = param, norm = 1.0f - 2.0f * eps;
            loss = ((1.0f - eps) * softplus_f(-z) - eps * softplus_f(z)) / norm;
            d_chosen = -beta * ((1.0f - eps) * sigmoid_f(-z) + eps * sigmoid_f(z)) / norm;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_CDPO: {
            float dz;
            label_smoothed_f(beta * h - shift, param, &loss, &dz);
            d_chosen = beta * dz;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_HINGE:
        case OBJ_CPO_HINGE: {
            const float slack = objective == OBJ_HINGE ? 1.0f - beta * h + shift : 1.0f - beta * (pc - pr) + shift;
            loss = slack > 0.0f ? slack : 0.0f;
            d_chosen = slack > 0.0f ? -beta : 0.0f;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_SIMPO: {
            const float z = beta * (pc / chosen_len - pr / rejected_len) - param - shift;
            const float dz = -sigmoid_f(-z);
            loss = softplus_f(-z);
            d_chosen = dz * beta / chosen_len;
            d_rejected = -dz * beta / rejected_len;
            break;
        }
        case OBJ_NPO: {
            const float z = beta * rejected_logratio + shift;
            loss = (2.0f / beta) * softplus_f(z);
            d_chosen = 0.0f;
            d_rejected = 2.0f * sigmoid_f(z);
            break;
        }
        case OBJ_EXO_PAIR: {
            const float z = beta * h - shift, eps = param;
            const float q_chosen = sigmoid_f(z), q_rejected = sigmoid_f(-z);
            const float log_p_chosen = log1pf(-eps), log_p_rejected = logf(eps);
            loss = q_chosen * (-softplus_f(-z) - log_p_chosen) + q_rejected * (-softplus_f(z) - log_p_rejected);
            const float dz = q_chosen * q_rejected * (z - (log_p_chosen - log_p_rejected));
            d_chosen = beta * dz;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_NCA_PAIR: {
            const float reward_chosen = beta * chosen_logratio, reward_rejected = beta * rejected_logratio + shift;
            loss = softplus_f(-reward_chosen) + 0.5f * softplus_f(reward_chosen) + 0.5f * softplus_f(reward_rejected);
            d_chosen = beta * (-sigmoid_f(-reward_chosen) + 0.5f * sigmoid_f(reward_chosen));
            d_rejected = beta * 0.5f * sigmoid_f(reward_rejected);
            break;
        }
        case OBJ_SPPO_HARD: {
            const float chosen_error = chosen_logratio - 0.5f / beta;
            const float rejected_error = rejected_logratio + shift / beta + 0.5f / beta;
            loss = chosen_error * chosen_error + rejected_error * rejected_error;
            d_chosen = 2.0f * chosen_error;
            d_rejected = 2.0f * rejected_error;
            break;
        }
        case OBJ_APO_ZERO: {
            const float reward_chosen = beta * chosen_logratio, reward_rejected = beta * rejected_logratio + shift;
            loss = sigmoid_f(-reward_chosen) + sigmoid_f(reward_rejected);
            d_chosen = -beta * sigmoid_f(reward_chosen) * sigmoid_f(-reward_chosen);
            d_rejected = beta * sigmoid_f(reward_rejected) * sigmoid_f(-reward_rejected);
            break;
        }
        case OBJ_APO_DOWN: {
            const float reward_chosen = beta * chosen_logratio, z = beta * h - shift;
            const float dz = -sigmoid_f(z) * sigmoid_f(-z);
            loss = sigmoid_f(reward_chosen) + sigmoid_f(-z);
            d_chosen = beta * sigmoid_f(reward_chosen) * sigmoid_f(-reward_chosen) + beta * dz;
            d_rejected = -(beta * dz);
            break;
        }
        case OBJ_DISCOPOP: {
            // softplus(−z)(1 − m) + e^{−z}·m, m = σ(z/τ), with e^{−z}·m = exp(−z − softplus(−z/τ)).
            const float z = beta * h - shift, tau = param;
            const float modulation = sigmoid_f(z / tau), complement = sigmoid_f(-z / tau);
            const float logistic = softplus_f(-z), exponential = expf(-z - softplus_f(-z / tau));
            loss = logistic * complement + exponential;
            const float dz = -sigmoid_f(-z) * complement - exponential +
                             (exponential * complement - logistic * modulation * complement) / tau;
            d_chosen = beta * dz;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_SIGMOID_NORM: {
            const float z = beta * (chosen_score / chosen_len - rejected_score / rejected_len) - shift;
            const float dz = -sigmoid_f(-z);
            loss = softplus_f(-z);
            d_chosen = beta * dz / chosen_len;
            d_rejected = -(beta * dz) / rejected_len;
            break;
        }
        case OBJ_BCO_PAIR: {
            const float reward_chosen = beta * chosen_logratio - bco_shift;
            const float reward_rejected = beta * rejected_logratio + shift - bco_shift;
            loss = softplus_f(-reward_chosen) + softplus_f(reward_rejected);
            d_chosen = -beta * sigmoid_f(-reward_chosen);
            d_rejected = beta * sigmoid_f(reward_rejected);
            break;
        }
        case OBJ_SFT: {
            // The batch's token-mean NLL of the chosen responses, the same sums in every thread; under WPO
            // row j holds w_j·NLL, whose gradient in each chosen log-prob is Σ_j w_j·dNLL.
            float logps = 0.0f, weights = 0.0f;
            int tokens = 0;
            for (int j = 0; j < num_pairs; ++j) {
                logps += nll_logps[2 * j];
                tokens += lengths[2 * j];
                if (aligned != nullptr) weights += wpo_weight(aligned, lengths, j);
            }
            const float token_count = (float)max(tokens, 1);
            loss = -logps / token_count;
            d_plain = -(aligned != nullptr ? weights : (float)num_pairs) / token_count;
            d_chosen = 0.0f;
            d_rejected = 0.0f;
            break;
        }
        case OBJ_ORPO: {
            // z = (a_c − a_r) − (log1mexp(a_c) − log1mexp(a_r)) − t; d/da of `a − log1mexp(a)` = −1/expm1(a).
            float chosen_mean = pc / chosen_len, rejected_mean = pr / rejected_len;
            const bool chosen_clamped = chosen_mean > ORPO_MAX_MEAN_LOGP;
            const bool rejected_clamped = rejected_mean > ORPO_MAX_MEAN_LOGP;
            chosen_mean = chosen_clamped ? ORPO_MAX_MEAN_LOGP : chosen_mean;
            rejected_mean = rejected_clamped ? ORPO_MAX_MEAN_LOGP : rejected_mean;
            const float d_chosen_mean = chosen_clamped ? 0.0f : -1.0f / expm1f(chosen_mean);
            const float d_rejected_mean = rejected_clamped ? 0.0f : -1.0f / expm1f(rejected_mean);
            const float log_odds =
                (chosen_mean - rejected_mean) - (log1mexp_f(chosen_mean) - log1mexp_f(rejected_mean));
            const float z = log_odds - shift, dz = -beta * sigmoid_f(-z);
            loss = beta * softplus_f(-z);
            d_chosen = dz * d_chosen_mean / chosen_len;
            d_rejected = -dz * d_rejected_mean / rejected_len;
            break;
        }
        case OBJ_CPO:
        case OBJ_CPO_SIMPO: {
            const float z = objective == OBJ_CPO ? beta * (pc - pr) - shift
                                                 : beta * (pc / chosen_len - pr / rejected_len) - param2 - shift;
            float dz;
            label_smoothed_f(z, param, &loss, &dz);
            d_chosen = objective == OBJ_CPO ? beta * dz : beta * dz / chosen_len;
            d_rejected = objective == OBJ_CPO ? -(beta * dz) : -(beta * dz) / rejected_len;
            break;
        }
        case OBJ_CPO_IPO: {
            const float residual = (pc / chosen_len - pr / rejected_len) - 1.0f / (2.0f * beta) - shift / beta;
            loss = residual * residual;
            d_chosen = 2.0f * residual / chosen_len;
            d_rejected = -2.0f * residual / rejected_len;
            break;
        }
        default:  // the host validates the code (and sends AOT elsewhere); a NaN makes a bad one impossible to miss
            loss = d_chosen = d_rejected = __int_as_float(0x7fc00000);
    }
    if (scored) {
        d_chosen *= d_chosen_score;
        d_rejected *= d_rejected_score;
    }
    if (objective == OBJ_RPO) {  // RPO's NLL term reads the plain log-prob itself, not its score
        loss += param * (-nll_logps[c] / chosen_len);
        d_plain = -(param / chosen_len);
    }
    if (aligned != nullptr) {  // WPO: the pair's weight (the `sft` gradient already holds the batch's)
        const float w = wpo_weight(aligned, lengths, i);
        loss *= w;
        d_chosen *= w;
        d_rejected *= w;
        if (objective == OBJ_RPO) d_plain *= w;
    }
    const bool nll_part = objective == OBJ_SFT || objective == OBJ_RPO;
    if (nll_part && dplain == nullptr) d_chosen = objective == OBJ_SFT ? d_plain : d_chosen + d_plain;

    const bool mean_rewards = objective == OBJ_SIMPO || objective == OBJ_ORPO || objective == OBJ_CPO_IPO ||
                              objective == OBJ_CPO_SIMPO;
    const float reward_chosen = mean_rewards ? beta * pc / chosen_len : beta * chosen_logratio;
    const float reward_rejected = mean_rewards ? beta * pr / rejected_len : beta * rejected_logratio;
    write_pair(metrics, dpolicy, i, accumulate, weight, grad_scale, loss, d_chosen, d_rejected, reward_chosen,
               reward_rejected);
    if (nll_part && dplain != nullptr) dplain[c] += grad_scale * (weight * d_plain);  // zeroed by the host
}
EMU_REGISTER(preference_loss_f32)

// ---- LD-DPO: the log-probs read, and the token gradients of the split ---------------------------------

/// out[s] = split[2s] + α·split[2s + 1] (TRL's shared_logps + ld_alpha·tail_logps).
extern "C" __global__ void ld_weighted_logps_f32(float* out, const float* split, float ld_alpha, int num_seqs) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= num_seqs) return;
    out[s] = split[2 * s] + ld_alpha * split[2 * s + 1];
}
EMU_REGISTER(ld_weighted_logps_f32)

/// grads[2s] = dread[s] + dplain[s] (each token of the shared part), grads[2s + 1] = α·dread[s] + dplain[s]
/// (each token past it): dread the gradient in the weighted log-prob, dplain the NLL parts' in the plain one.
extern "C" __global__ void ld_split_grads_f32(float* grads, const float* dread, const float* dplain, float ld_alpha,
                                              int num_seqs) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= num_seqs) return;
    grads[2 * s] = dread[s] + dplain[s];
    grads[2 * s + 1] = ld_alpha * dread[s] + dplain[s];
}
EMU_REGISTER(ld_split_grads_f32)

// ---- AOT: the objectives that sort across the batch ---------------------------------------------------

/// Pair i's two sort keys: aot (πc − πr − t/β, rc − rr); aot_unpaired (x_c, x_r + t/β).
__device__ __forceinline__ void aot_keys(int objective, const float* policy, const float* reference,
                                         const int* unsafe_flags, int i, float beta, float safety_margin,
                                         float* first, float* second) {
    const float pc = policy[2 * i], pr = policy[2 * i + 1], rc = reference[2 * i], rr = reference[2 * i + 1];
    const float shift_over_beta = safety_shift(unsafe_flags, i, safety_margin) / beta;
    if (objective == OBJ_AOT) {
        *first = (pc - pr) - shift_over_beta;
        *second = rc - rr;
    } else {
        *first = pc - rc;
        *second = (pr - rr) + shift_over_beta;
    }
}

/// A signed integer that orders as the float does (IEEE total order: −0 < +0, NaNs at the ends), so that
/// the ranks below are a permutation whatever the keys.
__device__ __forceinline__ int total_order_key(float x) {
    const int bits = __float_as_int(x);
    return bits >= 0 ? bits : bits ^ 0x7fffffff;
}

/// Thread i ranks pair i's keys among the batch's (ties by index) and writes i into `ranks` at those ranks:
/// `ranks[k]` is the pair holding the k-th smallest first key, `ranks[P + k]` the k-th smallest second key.
extern "C" __global__ void preference_loss_rank_f32(float* ranks, const float* policy, const float* reference,
                                                    const int* unsafe_flags, int num_pairs, int objective,
                                                    float beta, float safety_margin) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= num_pairs) return;
    float first, second;
    aot_keys(objective, policy, reference, unsafe_flags, i, beta, safety_margin, &first, &second);
    const int first_key = total_order_key(first), second_key = total_order_key(second);
    int first_rank = 0, second_rank = 0;
    for (int j = 0; j < num_pairs; ++j) {
        float other_first, other_second;
        aot_keys(objective, policy, reference, unsafe_flags, j, beta, safety_margin, &other_first, &other_second);
        const int a = total_order_key(other_first), b = total_order_key(other_second);
        first_rank += a < first_key || (a == first_key && j < i);
        second_rank += b < second_key || (b == second_key && j < i);
    }
    ranks[first_rank] = (float)i;
    ranks[num_pairs + second_rank] = (float)i;
}
EMU_REGISTER(preference_loss_rank_f32)

/// Thread k scores sorted position k (the pairs the rank pass put at rank k), sends the gradient to those
/// pairs, and writes row k: position k's loss and pair k's own rewards (or, accumulating, adds the loss).
/// Every pair is the first key's holder of one position and the second key's of one, so the writes to
/// dpolicy never collide. `param` is ε.
extern "C" __global__ void preference_loss_sorted_f32(float* metrics, float* dpolicy, const float* ranks,
                                                      const float* policy, const float* reference,
                                                      const int* unsafe_flags, int num_pairs, int objective,
                                                      float beta, float param, float safety_margin, float weight,
                                                      int accumulate, float grad_scale) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= num_pairs) return;
    const int i = (int)ranks[k], j = (int)ranks[num_pairs + k];
    float first, second, unused, loss, dz;
    aot_keys(objective, policy, reference, unsafe_flags, i, beta, safety_margin, &first, &unused);
    aot_keys(objective, policy, reference, unsafe_flags, j, beta, safety_margin, &unused, &second);
    label_smoothed_f(beta * (first - second), param, &loss, &dz);
    const float d_chosen = grad_scale * (weight * (beta * dz));
    // aot: both sides of pair i (its key is πc − πr); aot_unpaired: the rejected side of pair j.
    const int rejected = objective == OBJ_AOT ? 2 * i + 1 : 2 * j + 1;
    if (accumulate) {
        metrics[(long long)k * PAIR_METRICS] += weight * loss;
        dpolicy[2 * i] += d_chosen;
        dpolicy[rejected] += -d_chosen;
    } else {
        write_metrics(metrics, k, weight * loss, beta * (policy[2 * k] - reference[2 * k]),
                      beta * (policy[2 * k + 1] - reference[2 * k + 1]));
        dpolicy[2 * i] = d_chosen;
        dpolicy[rejected] = -d_chosen;
    }
}
EMU_REGISTER(preference_loss_sorted_f32)

// ---- the objectives on unpaired examples ---------------------------------------------------------------

/// Thread i scores example i: `objective` OBJ_KTO or OBJ_APO_ZERO_UNPAIRED, `desirable` its label (nonzero:
/// desirable), `unsafe_flags` its completion's safety flag. `policy_kl`/`reference_kl` [num_kl]: the KL
/// sequences' log-probs, NULL without them; every thread sums them in the same order (a batch has a few
/// hundred examples at most), so the estimate is the same bits on every row.
extern "C" __global__ void preference_loss_examples_f32(float* metrics, float* dpolicy, const float* policy,
                                                        const float* reference, const int* unsafe_flags,
                                                        const int* desirable, const float* policy_kl,
                                                        const float* reference_kl, int num_examples, int num_kl,
                                                        int objective, float beta, float desirable_weight,
                                                        float undesirable_weight, float safety_margin,
                                                        float grad_scale) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= num_examples) return;
    float kl = 0.0f;
    if (policy_kl != nullptr && num_kl > 0) {
        float total = 0.0f;
        for (int j = 0; j < num_kl; ++j) total += policy_kl[j] - reference_kl[j];
        kl = fmaxf(total / (float)num_kl, 0.0f);
    }
    const float reward = beta * (policy[i] - reference[i]);
    // The reward inside the loss: SafeDAA's shift raises an unsafe completion's.
    const float shifted = reward + (unsafe_flags[i] != 0 ? safety_margin : 0.0f);
    const bool good = desirable[i] != 0;
    float loss, d_policy;
    if (objective == OBJ_KTO || objective == OBJ_APO_ZERO_UNPAIRED) {
        const float threshold = objective == OBJ_KTO ? beta * kl : 0.0f;
        // z: the logit whose σ the loss lowers (a desirable example wants its reward above the threshold).
        const float z = good ? threshold - shifted : shifted - threshold;
        const float weight = good ? desirable_weight : undesirable_weight;
        const float value = sigmoid_f(z);
        loss = weight * value;
        d_policy = weight * (value * sigmoid_f(-z)) * (good ? -beta : beta);
    } else {  // the host validates the code
        loss = d_policy = __int_as_float(0x7fc00000);
    }
    float* out = metrics + (long long)i * EXAMPLE_METRICS;
    out[0] = loss;
    out[1] = reward;
    out[2] = kl;
    dpolicy[i] = grad_scale * d_policy;
}
EMU_REGISTER(preference_loss_examples_f32)
