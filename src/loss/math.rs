//! The loss of one pair ([`pair_loss`]), in f64: the specification every backend's preference-loss
//! kernel is held to. The stable primitives (`softplus`, `log σ`, `σ`) and the link functions the
//! objectives share live here too.

use super::objectives::Objective;
use super::objectives::{FDivergence, ALPHA_DIVERGENCE_MAX_EXPONENT};

/// Number of float outputs per pair written by a preference loss into its `metrics` buffer, in this
/// order: loss, chosen reward, rejected reward, margin (chosen − rejected reward), accuracy (1 when
/// the chosen reward exceeds the rejected one, else 0).
pub const PAIR_METRICS: usize = 5;

/// One pair's inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairInput {
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub chosen_unsafe: bool,
    pub rejected_unsafe: bool,
    /// Number of response tokens (those with a target) of each side.
    pub chosen_len: u32,
    pub rejected_len: u32,
}

impl PairInput {
    /// `s = u_r − u_c ∈ {−1, 0, 1}`, the factor of the safety margin Δ.
    pub fn safety_gap(&self) -> f64 {
        f64::from(u8::from(self.rejected_unsafe)) - f64::from(u8::from(self.chosen_unsafe))
    }
}

/// One pair's loss, gradients and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairOutput {
    pub loss: f64,
    /// dL/d(policy chosen log-prob)
    pub d_policy_chosen: f64,
    /// dL/d(policy rejected log-prob)
    pub d_policy_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// `reward_chosen − reward_rejected`
    pub margin: f64,
    /// 1 when `reward_chosen > reward_rejected`, else 0.
    pub accuracy: f64,
}

impl PairOutput {
    /// The metrics in the order of `PAIR_METRICS`: loss, chosen reward, rejected
    /// reward, margin, accuracy.
    pub fn metrics_row(&self) -> [f64; PAIR_METRICS] {
        [self.loss, self.reward_chosen, self.reward_rejected, self.margin, self.accuracy]
    }
}

/// `log(1 + eˣ)` without overflow or cancellation, for any finite x.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `log σ(x) = −softplus(−x)`, finite for any finite x (≈ x for x ≪ 0, ≈ −e⁻ˣ for x ≫ 0).
pub fn log_sigmoid(x: f64) -> f64 {
    -softplus(-x)
}

/// `σ(x) = 1 / (1 + e⁻ˣ)`, evaluated so that `exp` never overflows.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The score of a log-ratio `x` under `f_divergence` and its derivative in `x` (TRL's formulas; see
/// [`FDivergence`]'s variants).
pub fn f_divergence_score(f_divergence: FDivergence, x: f64) -> (f64, f64) {
    match f_divergence {
        FDivergence::ReverseKl => (x, 1.0),
        FDivergence::ForwardKl => {
            let inverse_ratio = (-x).exp();
            (1.0 - inverse_ratio, inverse_ratio)
        }
        FDivergence::JsDivergence => (std::f64::consts::LN_2 + log_sigmoid(x), sigmoid(-x)),
        FDivergence::Alpha(alpha) if (alpha - 1.0).abs() < 1e-6 => (x, 1.0),
        FDivergence::Alpha(alpha) => {
            // TRL's arithmetic: the exponent clamped, then `(exp(t) − 1)·(1/(α − 1))`.
            let (exponent, coef) = ((alpha - 1.0) * x, 1.0 / (alpha - 1.0));
            if exponent > ALPHA_DIVERGENCE_MAX_EXPONENT {
                ((ALPHA_DIVERGENCE_MAX_EXPONENT.exp() - 1.0) * coef, 0.0)
            } else {
                let ratio = exponent.exp();
                ((ratio - 1.0) * coef, ratio)
            }
        }
    }
}

/// A response length as the divisor of a length-normalised objective: 0 counts as 1.
pub(super) fn length_divisor(len: u32) -> f64 {
    f64::from(len.max(1))
}

/// What every term of a loss call reads besides its pair: the f-divergence that scores the
/// log-ratios and `bco_pair`'s reward shift δ (0 without a running mean).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Modifiers {
    pub f_divergence: FDivergence,
    pub bco_shift: f64,
}

/// The per-pair part of single `objective` on pair `p`, as (loss, dL/dπc, dL/dπr): everything but
/// the batch-level parts (AOT's sort: here a batch of one; the `sft` term's token mean: not here,
/// see `Objective::nll_weight`) and RPO's NLL term (which reads the plain log-prob: see the batch's
/// `term_rows`).
pub(super) fn pairwise(objective: &Objective, p: &PairInput, modifiers: &Modifiers) -> (f64, f64, f64) {
    let chosen_logratio = p.policy_chosen - p.ref_chosen;
    let rejected_logratio = p.policy_rejected - p.ref_rejected;
    // The f-divergence scores of the log-ratios, for the objectives built on their difference (the
    // validation refuses it for the others); the reverse KL leaves them as they are.
    let scored = modifiers.f_divergence != FDivergence::ReverseKl && objective.takes_f_divergence();
    let ((chosen_score, d_chosen_score), (rejected_score, d_rejected_score)) = if scored {
        (
            f_divergence_score(modifiers.f_divergence, chosen_logratio),
            f_divergence_score(modifiers.f_divergence, rejected_logratio),
        )
    } else {
        ((chosen_logratio, 1.0), (rejected_logratio, 1.0))
    };
    let h = chosen_score - rejected_score;
    let shift = p.safety_gap() * objective.safety_margin();
    let (chosen_len, rejected_len) = (length_divisor(p.chosen_len), length_divisor(p.rejected_len));

    // (loss, dL/dπc, dL/dπr); for the objectives that take an f-divergence, the derivatives are in
    // the scores until the chain rule below.
    let (loss, d_chosen, d_rejected) = match *objective {
        Objective::Dpo { beta, .. } | Objective::SafeDpo { beta, .. } | Objective::Rpo { beta, .. } => {
            let (loss, dh) = dpo_loss(beta * h - shift, beta);
            (loss, dh, -dh)
        }
        Objective::Ipo { beta, .. } => {
            let residual = h - 1.0 / (2.0 * beta) - shift / beta;
            let dh = 2.0 * residual;
            (residual * residual, dh, -dh)
        }
        Objective::Robust { beta, eps, .. } => {
            // −(1−ε) log σ(z) + ε log σ(−z) = (1−ε) softplus(−z) − ε softplus(z); d/dz:
            // −(1−ε) σ(−z) − ε σ(z).
            let z = beta * h - shift;
            let norm = 1.0 - 2.0 * eps;
            let loss = ((1.0 - eps) * softplus(-z) - eps * softplus(z)) / norm;
            let dh = -beta * ((1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)) / norm;
            (loss, dh, -dh)
        }
        Objective::Cdpo { beta, eps, .. } => {
            let (loss, dz) = label_smoothed(beta * h - shift, eps);
            (loss, beta * dz, -(beta * dz))
        }
        Objective::Hinge { beta, .. } => hinge(1.0 - beta * h + shift, beta),
        Objective::Simpo { beta, gamma, .. } => {
            let z = beta * (p.policy_chosen / chosen_len - p.policy_rejected / rejected_len) - gamma - shift;
            let loss = softplus(-z);
            let dz = -sigmoid(-z);
            (loss, dz * beta / chosen_len, -dz * beta / rejected_len)
        }
        Objective::Npo { beta, .. } => {
            // (2/β) softplus(β·x + shift), x = πr − rr; d/dx = 2 σ(β·x + shift).
            let z = beta * rejected_logratio + shift;
            ((2.0 / beta) * softplus(z), 0.0, 2.0 * sigmoid(z))
        }
        Objective::ExoPair { beta, eps, .. } => {
            // KL((q, 1−q) ‖ (1−ε, ε)), q = σ(z); dL/dq = logit(q) − logit(1−ε), dq/dz = σ(z)σ(−z).
            let z = beta * h - shift;
            let (q_chosen, q_rejected) = (sigmoid(z), sigmoid(-z));
            let (log_p_chosen, log_p_rejected) = ((-eps).ln_1p(), eps.ln());
            let loss = q_chosen * (log_sigmoid(z) - log_p_chosen) + q_rejected * (log_sigmoid(-z) - log_p_rejected);
            let dz = q_chosen * q_rejected * (z - (log_p_chosen - log_p_rejected));
            (loss, beta * dz, -(beta * dz))
        }
        Objective::NcaPair { beta, .. } => {
            let (reward_chosen, reward_rejected) = (beta * chosen_logratio, beta * rejected_logratio + shift);
            let loss = softplus(-reward_chosen) + 0.5 * softplus(reward_chosen) + 0.5 * softplus(reward_rejected);
            let d_reward_chosen = -sigmoid(-reward_chosen) + 0.5 * sigmoid(reward_chosen);
            (loss, beta * d_reward_chosen, beta * 0.5 * sigmoid(reward_rejected))
        }
        Objective::SppoHard { beta, .. } => {
            let chosen_error = chosen_logratio - 0.5 / beta;
            let rejected_error = rejected_logratio + shift / beta + 0.5 / beta;
            (chosen_error * chosen_error + rejected_error * rejected_error, 2.0 * chosen_error, 2.0 * rejected_error)
        }
        Objective::Aot { beta, eps, .. } | Objective::AotUnpaired { beta, eps, .. } => {
            // A batch of one pair: sorting changes nothing.
            let (key_policy, key_reference) = aot_keys(objective, p);
            let (loss, dz) = label_smoothed(beta * (key_policy - key_reference), eps);
            (loss, beta * dz, -(beta * dz))
        }
        Objective::ApoZero { beta, .. } => {
            let (reward_chosen, reward_rejected) = (beta * chosen_logratio, beta * rejected_logratio + shift);
            let loss = sigmoid(-reward_chosen) + sigmoid(reward_rejected);
            let d_chosen = -beta * sigmoid(reward_chosen) * sigmoid(-reward_chosen);
            (loss, d_chosen, beta * sigmoid(reward_rejected) * sigmoid(-reward_rejected))
        }
        Objective::ApoDown { beta, .. } => {
            let reward_chosen = beta * chosen_logratio;
            let z = beta * (chosen_logratio - rejected_logratio) - shift;
            let loss = sigmoid(reward_chosen) + sigmoid(-z);
            let dz = -sigmoid(z) * sigmoid(-z);
            let d_chosen = beta * sigmoid(reward_chosen) * sigmoid(-reward_chosen) + beta * dz;
            (loss, d_chosen, -(beta * dz))
        }
        Objective::Discopop { beta, tau, .. } => {
            let (loss, dz) = discopop(beta * h - shift, tau);
            (loss, beta * dz, -(beta * dz))
        }
        Objective::SigmoidNorm { beta, .. } => {
            let z = beta * (chosen_score / chosen_len - rejected_score / rejected_len) - shift;
            let dz = -sigmoid(-z);
            (softplus(-z), beta * dz / chosen_len, -(beta * dz) / rejected_len)
        }
        Objective::BcoPair { beta, .. } => {
            // δ (the running reward mean, 0 without one) shifts both rewards.
            let reward_chosen = beta * chosen_logratio - modifiers.bco_shift;
            let reward_rejected = beta * rejected_logratio + shift - modifiers.bco_shift;
            let loss = softplus(-reward_chosen) + softplus(reward_rejected);
            (loss, -beta * sigmoid(-reward_chosen), beta * sigmoid(reward_rejected))
        }
        Objective::Sft { .. } => (0.0, 0.0, 0.0),
        Objective::Orpo { beta, .. } => orpo(p, beta, shift),
        Objective::Cpo { beta, eps, .. } => {
            let (loss, dz) = label_smoothed(beta * (p.policy_chosen - p.policy_rejected) - shift, eps);
            (loss, beta * dz, -(beta * dz))
        }
        Objective::CpoHinge { beta, .. } => hinge(1.0 - beta * (p.policy_chosen - p.policy_rejected) + shift, beta),
        Objective::CpoIpo { beta, .. } => {
            let residual =
                (p.policy_chosen / chosen_len - p.policy_rejected / rejected_len) - 1.0 / (2.0 * beta) - shift / beta;
            (residual * residual, 2.0 * residual / chosen_len, -2.0 * residual / rejected_len)
        }
        Objective::CpoSimpo { beta, eps, gamma, .. } => {
            let z = beta * (p.policy_chosen / chosen_len - p.policy_rejected / rejected_len) - gamma - shift;
            let (loss, dz) = label_smoothed(z, eps);
            (loss, beta * dz / chosen_len, -(beta * dz) / rejected_len)
        }
        Objective::Combination(_) => unreachable!("pairwise takes the terms of a combination one by one"),
        Objective::Kto(_) => unreachable!("{} is unpaired: see unpaired_loss", objective.name()),
    };
    if scored {
        (loss, d_chosen * d_chosen_score, d_rejected * d_rejected_score)
    } else {
        (loss, d_chosen, d_rejected)
    }
}

/// The rewards a single objective logs for pair `p`: `β(π − r)`; `β π` for the reference-free ones
/// on summed log-probs (`cpo`, `cpo_hinge`), `β π/|y|` for those on mean token log-probs (`simpo`,
/// `orpo`, `cpo_ipo`, `cpo_simpo`), as TRL's trainers log them.
pub(super) fn rewards(objective: &Objective, p: &PairInput) -> (f64, f64) {
    let beta = objective.beta();
    let (chosen_len, rejected_len) = (length_divisor(p.chosen_len), length_divisor(p.rejected_len));
    match objective {
        Objective::Simpo { .. } | Objective::Orpo { .. } | Objective::CpoIpo { .. } | Objective::CpoSimpo { .. } => {
            (beta * p.policy_chosen / chosen_len, beta * p.policy_rejected / rejected_len)
        }
        Objective::Cpo { .. } | Objective::CpoHinge { .. } => (beta * p.policy_chosen, beta * p.policy_rejected),
        _ => (beta * (p.policy_chosen - p.ref_chosen), beta * (p.policy_rejected - p.ref_rejected)),
    }
}

/// The hinge `max(0, slack)` of a slack `1 − z` with `dz/dπc = β`, `dz/dπr = −β`; at the kink the
/// subgradient 0.
fn hinge(slack: f64, beta: f64) -> (f64, f64, f64) {
    if slack > 0.0 {
        (slack, -beta, beta)
    } else {
        (0.0, 0.0, 0.0)
    }
}

/// ORPO's largest mean token log-prob: above it the log odds `log(p/(1 − p))` would overflow (and
/// at 0, an empty response, be infinite).
pub const ORPO_MAX_MEAN_LOGP: f64 = -1e-6;

/// `log(1 − eˣ)` for x < 0 without cancellation (Mächler's split at −log 2, as TRL's `log1mexp`).
pub fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// ORPO's odds-ratio term `−β log σ(z)`, `z` the log odds ratio of the mean token log-probs less
/// the safety shift, and its gradient in the summed log-probs.
fn orpo(p: &PairInput, beta: f64, shift: f64) -> (f64, f64, f64) {
    let (chosen_len, rejected_len) = (length_divisor(p.chosen_len), length_divisor(p.rejected_len));
    let (chosen_mean, rejected_mean) = (p.policy_chosen / chosen_len, p.policy_rejected / rejected_len);
    // d/da of `a − log(1 − eᵃ)` is `1/(1 − eᵃ) = −1/expm1(a)`; 0 where a is clamped.
    let clamped = |a: f64| {
        if a > ORPO_MAX_MEAN_LOGP {
            (ORPO_MAX_MEAN_LOGP, 0.0)
        } else {
            (a, -1.0 / a.exp_m1())
        }
    };
    let ((chosen_mean, d_chosen_mean), (rejected_mean, d_rejected_mean)) =
        (clamped(chosen_mean), clamped(rejected_mean));
    let log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean));
    let z = log_odds - shift;
    let dz = -beta * sigmoid(-z);
    (beta * softplus(-z), dz * d_chosen_mean / chosen_len, -dz * d_rejected_mean / rejected_len)
}

/// `−log σ(z)` and its derivative with respect to `h`, where `z = β h + const`:
/// `(softplus(−z), −β σ(−z))`.
fn dpo_loss(z: f64, beta: f64) -> (f64, f64) {
    (softplus(-z), -beta * sigmoid(-z))
}

/// The label-smoothed logistic loss (cDPO's, AOT's) and its derivative in z:
/// `((1−ε) softplus(−z) + ε softplus(z), −(1−ε) σ(−z) + ε σ(z))`.
pub(super) fn label_smoothed(z: f64, eps: f64) -> (f64, f64) {
    let loss = (1.0 - eps) * softplus(-z) + eps * softplus(z);
    (loss, -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z))
}

/// DiscoPOP's blend `softplus(−z)(1 − m) + e^{−z} m`, `m = σ(z/τ)`, and its derivative in z, with
/// `e^{−z} m = exp(−z − softplus(−z/τ))` so that nothing overflows for τ ≤ 1:
/// `d/dz = −σ(−z)(1 − m) − e^{−z} m + (e^{−z} m − softplus(−z) m)(1 − m)/τ`.
fn discopop(z: f64, tau: f64) -> (f64, f64) {
    let (modulation, complement) = (sigmoid(z / tau), sigmoid(-z / tau));
    let logistic = softplus(-z);
    let exponential = (-z - softplus(-z / tau)).exp();
    let loss = logistic * complement + exponential;
    let dz =
        -sigmoid(-z) * complement - exponential + (exponential * complement - logistic * modulation * complement) / tau;
    (loss, dz)
}

/// The two values AOT sorts across the batch, for one pair: `aot` the policy's and the reference's
/// chosen-minus-rejected log-prob differences, the policy's less `sΔ/β`; `aot_unpaired` the chosen
/// log-ratio and the rejected log-ratio plus `sΔ/β`. Position k of the sorted batch has the logit
/// `β (sorted first_k − sorted second_k)`.
pub(super) fn aot_keys(objective: &Objective, p: &PairInput) -> (f64, f64) {
    let shift_over_beta = p.safety_gap() * objective.safety_margin() / objective.beta();
    match objective {
        Objective::Aot { .. } => {
            ((p.policy_chosen - p.policy_rejected) - shift_over_beta, p.ref_chosen - p.ref_rejected)
        }
        Objective::AotUnpaired { .. } => {
            (p.policy_chosen - p.ref_chosen, (p.policy_rejected - p.ref_rejected) + shift_over_beta)
        }
        other => unreachable!("{other} does not sort across the batch"),
    }
}
