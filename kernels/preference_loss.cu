// kernels/preference_loss.cu — the preference objectives, one thread per pair, all pairs in one launch
// (two for the objectives that sort across the batch).
//
// Per pair i (sequence 2i is the chosen response, 2i+1 the rejected one), with πc, πr the policy's and rc,
// rr the reference's sequence log-probs, x_c = πc − rc, x_r = πr − rr, h = x_c − x_r, u the safety flags
// (1 = unsafe), |y| the response lengths (0 counts as 1), and the SafeDAA shift t = (u_r − u_c)·Δ
// (Δ = `safety_margin`; 0 leaves every objective as published):
//
//     dpo           softplus(−z), z = βh − t                         (also safedpo: Δ = its delta)
//     ipo           (h − 1/(2β) − t/β)²
//     robust        [(1−ε)·softplus(−z) − ε·softplus(z)] / (1 − 2ε)
//     cdpo          (1−ε)·softplus(−z) + ε·softplus(z)
//     hinge         max(0, 1 − βh + t)                  (subgradient 0 at the kink)
//     rpo           softplus(−z) + α·(−πc/|yc|)
//     simpo         softplus(−z), z = β(πc/|yc| − πr/|yr|) − γ − t   (reference-free)
//     npo           (2/β)·softplus(βx_r + t)             (no gradient to the chosen response)
//     exo_pair      σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)
//     nca_pair      softplus(−βx_c) + ½softplus(βx_c) + ½softplus(βx_r + t)
//     sppo_hard     (x_c − 1/(2β))² + (x_r + t/β + 1/(2β))²
//     apo_zero      σ(−βx_c) + σ(βx_r + t)
//     apo_down      σ(βx_c) + σ(−z)
//     discopop      softplus(−z)·σ(−z/τ) + exp(−z − softplus(−z/τ))
//     sigmoid_norm  softplus(−z), z = β(x_c/|yc| − x_r/|yr|) − t
//     bco_pair      softplus(−βx_c) + softplus(βx_r + t)
//     aot           (1−ε)·softplus(−z_k) + ε·softplus(z_k), z_k = β(sort(πc − πr − t/β)_k − sort(rc − rr)_k)
//     aot_unpaired  the same with z_k = β(sort(x_c)_k − sort(x_r + t/β)_k)
//
// Writes metrics [P, 5] = (loss, chosen reward, rejected reward, margin, accuracy), rewards β(π − r)
// (simpo: β·π/|y|), and dpolicy [2P] = grad_scale·d(Σ loss)/dπ. CPU twin: src/backend/cpu/preference_loss.rs
// (`spec::forward`, which calls the specification, `batch_loss` and `pair_loss` in src/loss/). Host side:
// src/backend/cuda/ops/preference_loss.rs (`objective_code` maps each objective to the OBJ_* code below).
//
// f32 math throughout, stable for any margin: softplus(x) = max(x, 0) + log1p(exp(−|x|)) never
// overflows, σ is evaluated on the side where exp cannot overflow, and every exponential of a margin is
// written so that its argument is ≤ 0 where it could grow (discopop's, for τ ≤ 1).
//
// Launch: 1-D grid of PAIR_THREADS-thread blocks, thread i handles pair i (inputs are f32 in every precision
// mode, so there is only the f32 instantiation). AOT: `preference_loss_rank_f32` first (thread i ranks pair
// i's two sort keys and writes its index into the metrics rows of its ranks, as scratch), then
// `preference_loss_sorted_f32` (thread k scores sorted position k and overwrites metrics row k).
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

/// Metrics per pair: loss, chosen reward, rejected reward, margin, accuracy.
#define PAIR_METRICS 5  // @rust
/// Threads per block (one per pair).
#define PAIR_THREADS 128  // @rust
/// AOT's rank pass stores pair indices as floats in the metrics rows: exact below 2^24.
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

/// `param` is the objective's second parameter: ε (robust, cdpo, exo_pair), α (rpo), γ (simpo), τ (discopop).
extern "C" __global__ void preference_loss_f32(float* metrics, float* dpolicy, const float* policy,
                                               const float* reference, const int* unsafe_flags, const int* lengths,
                                               int num_pairs, int objective, float beta, float param,
                                               float safety_margin, float grad_scale) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= num_pairs) return;
    const int c = 2 * i, r = 2 * i + 1;
    const float pc = policy[c], pr = policy[r];
    const float rc = reference != nullptr ? reference[c] : 0.0f;
    const float rr = reference != nullptr ? reference[r] : 0.0f;
    const float chosen_logratio = pc - rc, rejected_logratio = pr - rr;
    const float h = chosen_logratio - rejected_logratio;
    const float chosen_len = (float)max(lengths[c], 1), rejected_len = (float)max(lengths[r], 1);
    const float shift = safety_shift(unsafe_flags, i, safety_margin);

    float loss, d_chosen, d_rejected;
    switch (objective) {
        case OBJ_DPO: {
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
        case OBJ_HINGE: {
            const float slack = 1.0f - beta * h + shift;
            loss = slack > 0.0f ? slack : 0.0f;
            d_chosen = slack > 0.0f ? -beta : 0.0f;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_RPO: {
            const float z = beta * h - shift, alpha = param;
            const float dh = -beta * sigmoid_f(-z);
            loss = softplus_f(-z) + alpha * (-pc / chosen_len);
            d_chosen = dh - alpha / chosen_len;
            d_rejected = -dh;
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
            const float z = beta * (chosen_logratio / chosen_len - rejected_logratio / rejected_len) - shift;
            const float dz = -sigmoid_f(-z);
            loss = softplus_f(-z);
            d_chosen = beta * dz / chosen_len;
            d_rejected = -(beta * dz) / rejected_len;
            break;
        }
        case OBJ_BCO_PAIR: {
            const float reward_chosen = beta * chosen_logratio, reward_rejected = beta * rejected_logratio + shift;
            loss = softplus_f(-reward_chosen) + softplus_f(reward_rejected);
            d_chosen = -beta * sigmoid_f(-reward_chosen);
            d_rejected = beta * sigmoid_f(reward_rejected);
            break;
        }
        default:  // the host validates the code (and sends AOT elsewhere); a NaN makes a bad one impossible to miss
            loss = d_chosen = d_rejected = __int_as_float(0x7fc00000);
    }

    if (objective == OBJ_SIMPO) {
        write_metrics(metrics, i, loss, beta * pc / chosen_len, beta * pr / rejected_len);
    } else {
        write_metrics(metrics, i, loss, beta * chosen_logratio, beta * rejected_logratio);
    }
    dpolicy[c] = grad_scale * d_chosen;
    dpolicy[r] = grad_scale * d_rejected;
}
EMU_REGISTER(preference_loss_f32)

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

/// Thread i ranks pair i's keys among the batch's (ties by index) and writes i into columns 0 (first key)
/// and 1 (second key) of the metrics rows at those ranks.
extern "C" __global__ void preference_loss_rank_f32(float* metrics, const float* policy, const float* reference,
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
    metrics[(long long)first_rank * PAIR_METRICS + 0] = (float)i;
    metrics[(long long)second_rank * PAIR_METRICS + 1] = (float)i;
}
EMU_REGISTER(preference_loss_rank_f32)

/// Thread k scores sorted position k (the pairs the rank pass put in row k), sends the gradient to those
/// pairs, and overwrites row k with position k's loss and pair k's own rewards. `param` is ε.
extern "C" __global__ void preference_loss_sorted_f32(float* metrics, float* dpolicy, const float* policy,
                                                      const float* reference, const int* unsafe_flags,
                                                      int num_pairs, int objective, float beta, float param,
                                                      float safety_margin, float grad_scale) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= num_pairs) return;
    const int i = (int)metrics[(long long)k * PAIR_METRICS + 0], j = (int)metrics[(long long)k * PAIR_METRICS + 1];
    float first, second, unused, loss, dz;
    aot_keys(objective, policy, reference, unsafe_flags, i, beta, safety_margin, &first, &unused);
    aot_keys(objective, policy, reference, unsafe_flags, j, beta, safety_margin, &unused, &second);
    label_smoothed_f(beta * (first - second), param, &loss, &dz);
    const float d_chosen = beta * dz;
    dpolicy[2 * i] = grad_scale * d_chosen;
    // aot: both sides of pair i (its key is πc − πr); aot_unpaired: the rejected side of pair j.
    dpolicy[objective == OBJ_AOT ? 2 * i + 1 : 2 * j + 1] = grad_scale * -d_chosen;
    write_metrics(metrics, k, loss, beta * (policy[2 * k] - reference[2 * k]),
                  beta * (policy[2 * k + 1] - reference[2 * k + 1]));
}
EMU_REGISTER(preference_loss_sorted_f32)
