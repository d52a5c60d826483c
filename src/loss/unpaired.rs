//! The loss of a batch of unpaired examples ([`unpaired_loss`]) under an objective on unpaired
//! examples ([`Kto`]), in f64, and KTO's KL estimate ([`kl_estimate`]): the specification of the
//! preference-loss op on unpaired examples (`crate::backend::PreferenceLossOps`; the CPU backend
//! runs it, the CUDA kernel `preference_loss_examples_f32` is held to it), which the trainer's
//! unpaired step calls.
//!
//! TRL's `KTOTrainer._compute_loss` (v1.16.0): the KL term is `(KL_logps − ref_KL_logps).mean()`
//! over the batch's KL sequences (each prompt with another example's completion), detached and
//! clamped at 0; each example's loss is weighted by λ_D or λ_U, and the batch's loss is the mean of
//! the weighted losses. The rewards logged are `β x`.

use super::math::sigmoid;
use super::objectives::{Kto, KtoLoss};

/// The metrics per example the preference-loss op writes: the weighted loss, the reward `β x` and
/// the batch's KL estimate (the same on every row; 0 without one).
pub const EXAMPLE_METRICS: usize = 3;

/// One example's inputs: the policy's and the reference's sequence log-probs of its completion, its
/// label and its completion's safety flag.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExampleInput {
    pub policy: f64,
    pub reference: f64,
    /// TRL's `label`: true for a desirable completion.
    pub desirable: bool,
    /// 1 in SafeDAA's `uΔ`.
    pub completion_unsafe: bool,
}

/// One example's loss (weighted), its gradient and its logged reward.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExampleOutput {
    /// `λ · ℓ`, the example's entry of TRL's `losses`.
    pub loss: f64,
    /// d(loss)/d(policy log-prob); the KL estimate is a constant (detached).
    pub d_policy: f64,
    /// `β x` (without the safety shift), TRL's `chosen_rewards` or `rejected_rewards` entry.
    pub reward: f64,
}

/// KTO's KL estimate from a batch's KL sequences: `max(0, mean(policy_kl − reference_kl))` (TRL's
/// `kl.mean().clamp(min=0)`); 0 for an empty batch.
pub fn kl_estimate(policy_kl: &[f64], reference_kl: &[f64]) -> f64 {
    assert_eq!(policy_kl.len(), reference_kl.len(), "one reference log-prob per KL sequence");
    if policy_kl.is_empty() {
        return 0.0;
    }
    let total: f64 = policy_kl.iter().zip(reference_kl).map(|(p, r)| p - r).sum();
    (total / policy_kl.len() as f64).max(0.0)
}

/// Each example's weighted loss, gradient and reward, under `objective` and the batch's KL estimate
/// `kl` (read by `kto` only; see [`kl_estimate`]). The batch's loss is the mean of the losses.
pub fn unpaired_loss(objective: &Kto, examples: &[ExampleInput], kl: f64) -> Vec<ExampleOutput> {
    let beta = objective.beta;
    examples
        .iter()
        .map(|e| {
            let logratio = e.policy - e.reference;
            // The reward inside the loss: SafeDAA's shift raises an unsafe completion's.
            let shift = if e.completion_unsafe { objective.safety_margin } else { 0.0 };
            let reward = beta * logratio + shift;
            // `z` is the logit whose σ the loss lowers toward 0 (`1 − σ(−z) = σ(z)`, in the stable
            // form): a desirable example wants its reward above the threshold, an undesirable one
            // below it.
            let threshold = match objective.loss {
                KtoLoss::Kto => beta * kl,
                KtoLoss::ApoZeroUnpaired => 0.0,
            };
            let z = if e.desirable { threshold - reward } else { reward - threshold };
            let (value, slope) = (sigmoid(z), sigmoid(z) * sigmoid(-z));
            let dz_dpolicy = if e.desirable { -beta } else { beta };
            let weight = objective.weight(e.desirable);
            ExampleOutput { loss: weight * value, d_policy: weight * slope * dz_dpolicy, reward: beta * logratio }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kto(loss: KtoLoss) -> Kto {
        Kto { loss, beta: 0.5, desirable_weight: 1.5, undesirable_weight: 0.7, safety_margin: 2.0 }
    }

    #[test]
    fn kl_is_the_clamped_mean_log_ratio() {
        assert_eq!(kl_estimate(&[-1.0, -3.0], &[-2.0, -2.5]), 0.25);
        assert_eq!(kl_estimate(&[-3.0, -3.0], &[-2.0, -2.5]), 0.0);
        assert_eq!(kl_estimate(&[], &[]), 0.0);
    }

    #[test]
    fn losses_are_the_published_forms() {
        let naive_sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let e = |desirable, completion_unsafe| ExampleInput {
            policy: -10.0,
            reference: -11.0,
            desirable,
            completion_unsafe,
        };
        let (x, kl) = (1.0, 0.3);
        let out = unpaired_loss(&kto(KtoLoss::Kto), &[e(true, false), e(false, true)], kl);
        assert!((out[0].loss - 1.5 * (1.0 - naive_sigmoid(0.5 * (x - kl)))).abs() < 1e-15);
        assert!((out[1].loss - 0.7 * (1.0 - naive_sigmoid(0.5 * kl - (0.5 * x + 2.0)))).abs() < 1e-15);
        assert_eq!((out[0].reward, out[1].reward), (0.5, 0.5));
        let out = unpaired_loss(&kto(KtoLoss::ApoZeroUnpaired), &[e(true, false), e(false, false)], kl);
        assert!((out[0].loss - 1.5 * (1.0 - naive_sigmoid(0.5 * x))).abs() < 1e-15);
        assert!((out[1].loss - 0.7 * naive_sigmoid(0.5 * x)).abs() < 1e-15);
    }
}
