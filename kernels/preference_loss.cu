// kernels/preference_loss.cu — the preference objectives, one thread per pair, all pairs in one launch.
//
// Per pair i (sequence 2i is the chosen response, 2i+1 the rejected one), with πc, πr the policy's and rc,
// rr the reference's sequence log-probs, h = (πc − rc) − (πr − rr), u the safety flags (1 = unsafe) and
// |y| the response lengths (0 counts as 1):
//
//     dpo      softplus(−βh)
//     safedpo  softplus(−(βh − (u_r − u_c)·Δ))
//     ipo      (h − 1/(2β))²
//     robust   [(1−ε)·softplus(−βh) − ε·softplus(βh)] / (1 − 2ε)
//     cdpo     (1−ε)·softplus(−βh) + ε·softplus(βh)
//     hinge    max(0, 1 − βh)                      (subgradient 0 at the kink)
//     rpo      softplus(−βh) + α·(−πc/|yc|)
//     simpo    softplus(−z), z = β(πc/|yc| − πr/|yr|) − γ   (reference-free)
//     npo      (2/β)·softplus(β(πr − rr))           (no gradient to the chosen response)
//
// Writes metrics [P, 5] = (loss, chosen reward, rejected reward, margin, accuracy), rewards β(π − r)
// (simpo: β·π/|y|), and dpolicy [2P] = grad_scale·dL/dπ. CPU twin: src/backend/cpu/preference_loss.rs
// (`preference_loss`, which calls the specification, `pair_loss` in src/loss.rs). Host side:
// src/backend/cuda/ops/preference_loss.rs (`objective_code` maps each objective to the OBJ_* code below).
//
// f32 math throughout, stable for any margin: softplus(x) = max(x, 0) + log1p(exp(−|x|)) never
// overflows, and σ is evaluated on the side where exp cannot overflow.
//
// Launch: 1-D grid of PAIR_THREADS-thread blocks, thread i handles pair i (inputs are f32 in every precision
// mode, so there is only the f32 instantiation).
#include "common.cuh"

// The objective codes of the `objective` argument.
#define OBJ_DPO 0  // @rust
#define OBJ_SAFEDPO 1  // @rust
#define OBJ_IPO 2  // @rust
#define OBJ_ROBUST 3  // @rust
#define OBJ_CDPO 4  // @rust
#define OBJ_HINGE 5  // @rust
#define OBJ_RPO 6  // @rust
#define OBJ_SIMPO 7  // @rust
#define OBJ_NPO 8  // @rust

/// Metrics per pair: loss, chosen reward, rejected reward, margin, accuracy.
#define PAIR_METRICS 5  // @rust
/// Threads per block (one per pair).
#define PAIR_THREADS 128  // @rust

__device__ __forceinline__ float softplus_f(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

__device__ __forceinline__ float sigmoid_f(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}

/// `param` is the objective's second parameter: Δ (safedpo), ε (robust, cdpo), α (rpo), γ (simpo).
extern "C" __global__ void preference_loss_f32(float* metrics, float* dpolicy, const float* policy,
                                               const float* reference, const int* unsafe_flags, const int* lengths,
                                               int num_pairs, int objective, float beta, float param,
                                               float grad_scale) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= num_pairs) return;
    const int c = 2 * i, r = 2 * i + 1;
    const float pc = policy[c], pr = policy[r];
    const float rc = reference != nullptr ? reference[c] : 0.0f;
    const float rr = reference != nullptr ? reference[r] : 0.0f;
    const float chosen_logratio = pc - rc, rejected_logratio = pr - rr;
    const float h = chosen_logratio - rejected_logratio;
    const float chosen_len = (float)max(lengths[c], 1), rejected_len = (float)max(lengths[r], 1);

    float loss, d_chosen, d_rejected;
    switch (objective) {
        case OBJ_DPO:
        case OBJ_SAFEDPO: {
            float z = beta * h;
            if (objective == OBJ_SAFEDPO) z -= (float)((unsafe_flags[r] != 0) - (unsafe_flags[c] != 0)) * param;
            loss = softplus_f(-z);
            d_chosen = -beta * sigmoid_f(-z);
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_IPO: {
            const float residual = h - 1.0f / (2.0f * beta);
            loss = residual * residual;
            d_chosen = 2.0f * residual;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_ROBUST: {
            const float z = beta * h, eps = param, norm = 1.0f - 2.0f * eps;
            loss = ((1.0f - eps) * softplus_f(-z) - eps * softplus_f(z)) / norm;
            d_chosen = -beta * ((1.0f - eps) * sigmoid_f(-z) + eps * sigmoid_f(z)) / norm;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_CDPO: {
            const float z = beta * h, eps = param;
            loss = (1.0f - eps) * softplus_f(-z) + eps * softplus_f(z);
            d_chosen = beta * (-(1.0f - eps) * sigmoid_f(-z) + eps * sigmoid_f(z));
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_HINGE: {
            const float slack = 1.0f - beta * h;
            loss = slack > 0.0f ? slack : 0.0f;
            d_chosen = slack > 0.0f ? -beta : 0.0f;
            d_rejected = -d_chosen;
            break;
        }
        case OBJ_RPO: {
            const float z = beta * h, alpha = param;
            const float dh = -beta * sigmoid_f(-z);
            loss = softplus_f(-z) + alpha * (-pc / chosen_len);
            d_chosen = dh - alpha / chosen_len;
            d_rejected = -dh;
            break;
        }
        case OBJ_SIMPO: {
            const float z = beta * (pc / chosen_len - pr / rejected_len) - param;
            const float dz = -sigmoid_f(-z);
            loss = softplus_f(-z);
            d_chosen = dz * beta / chosen_len;
            d_rejected = -dz * beta / rejected_len;
            break;
        }
        case OBJ_NPO: {
            const float z = beta * rejected_logratio;
            loss = (2.0f / beta) * softplus_f(z);
            d_chosen = 0.0f;
            d_rejected = 2.0f * sigmoid_f(z);
            break;
        }
        default:  // the host validates the code; a NaN makes a bad one impossible to miss
            loss = d_chosen = d_rejected = __int_as_float(0x7fc00000);
    }

    float reward_chosen, reward_rejected;
    if (objective == OBJ_SIMPO) {
        reward_chosen = beta * pc / chosen_len;
        reward_rejected = beta * pr / rejected_len;
    } else {
        reward_chosen = beta * chosen_logratio;
        reward_rejected = beta * rejected_logratio;
    }
    float* out = metrics + (long long)i * PAIR_METRICS;
    out[0] = loss;
    out[1] = reward_chosen;
    out[2] = reward_rejected;
    out[3] = reward_chosen - reward_rejected;
    out[4] = reward_chosen > reward_rejected ? 1.0f : 0.0f;
    dpolicy[c] = grad_scale * d_chosen;
    dpolicy[r] = grad_scale * d_rejected;
}
EMU_REGISTER(preference_loss_f32)
