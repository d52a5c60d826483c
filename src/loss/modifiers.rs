//! TRL's two log-prob modifiers (`DPOTrainer` v1.16, `_compute_loss`), which change what the
//! objectives read rather than the objectives: LD-DPO's `ld_alpha` and WPO's `use_weighting`. Both
//! are fields of a [`Combination`] (which validates them), apply to every term of it, and combine with every pairwise
//! objective and its safety margin (which enters the logit built from the log-probs they give).
//!
//! **LD-DPO** (Liu et al. 2024, arXiv 2409.06411; TRL `ld_alpha`, α ∈ [0, 1]). Each response's tokens
//! are split at the pair's shared length `ℓ = min(|yc|, |yr|)`: its first ℓ response tokens (LD-DPO's
//! "public" part, TRL's `shared_logps`) and the rest (the "verbose" part, `tail_logps`). The
//! log-prob a term reads is `π = π_shared + α·π_tail`, for the policy and the reference alike (so
//! the reference's parts are cached too), and the implicit rewards are logged from those. The NLL
//! parts (the `sft` term, as TRL's reads the per-token log-probs; `orpo`'s and CPO's NLL, RPO's) read
//! the plain log-prob `π_shared + π_tail`. A token's gradient is then `dL/dπ + dL/dπ_plain` in the
//! shared part and `α·dL/dπ + dL/dπ_plain` past it. The length-normalised objectives keep dividing
//! by the whole response length (TRL's `completion_mask` sums). α = 1 is the plain objective (and
//! is written as no modifier: the same bits); α = 0 drops the tokens past the shared length.
//!
//! **WPO** (Zhou et al. 2024, arXiv 2406.11827, eq. 2; TRL `use_weighting`). Each pair's loss, every
//! term's (TRL multiplies each `loss_type`'s `per_sequence_loss`), is multiplied by
//! `w = exp(ā_c)·exp(ā_r)`, `ā = (1/|y|) Σ_t (log p_t − log Σ_v p_{t,v}²)` over the response's tokens
//! (|y| at least 1): the policy's length-normalised probability of the response under its own
//! sampling distribution, aligned by `Σ_v p_v²` (WPO's alignment, TRL's `log_sum_sq_probs`).
//! The weights are detached (TRL computes them under `torch.no_grad()`): the gradient is `w` times
//! the loss's. The `sft` term's batch NLL, written on every row, becomes `w_i·NLL` on row i, with
//! the gradient `Σ_i w_i · dNLL`. Not defined for `aot` and `aot_unpaired`, which sort the batch
//! (TRL raises `NotImplementedError`).
//!
//! TRL's `DPOTrainer` has both; its ORPO and CPO trainers have neither. Here they apply to the
//! reference-free objectives too, with the same reading: the LD log-prob in place of π, the weight
//! on the pair's loss.
//!
//! [`Combination`]: crate::loss::Combination

use super::batch::{combined, weighted_terms};
use super::math::{length_divisor, PairInput, PairOutput};
use super::objectives::{Objective, NO_LD_ALPHA};
use super::state::LossState;

impl Objective {
    /// LD-DPO's α when the objective has one other than 1 (see the module documentation).
    pub fn ld_alpha(&self) -> Option<f64> {
        match self {
            Objective::Combination(c) if c.ld_alpha != NO_LD_ALPHA => Some(c.ld_alpha),
            _ => None,
        }
    }

    /// Whether the objective has WPO's per-pair weights.
    pub fn uses_weighting(&self) -> bool {
        matches!(self, Objective::Combination(c) if c.use_weighting)
    }
}

/// A response's log-prob in LD-DPO's two parts: the sums over its first `min(|yc|, |yr|)` response
/// tokens and over the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SharedSplit {
    pub shared: f64,
    pub tail: f64,
}

impl SharedSplit {
    /// The log-prob LD-DPO reads, TRL's `shared_logps + ld_alpha * tail_logps`.
    pub fn weighted(&self, alpha: f64) -> f64 {
        self.shared + alpha * self.tail
    }
}

/// What the modifiers read of one pair besides [`PairInput`]: its log-probs split at the shared
/// length (LD-DPO), the policy's and the reference's, and the policy's aligned log-probs (WPO).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairParts {
    pub policy_chosen: SharedSplit,
    pub policy_rejected: SharedSplit,
    pub ref_chosen: SharedSplit,
    pub ref_rejected: SharedSplit,
    /// `Σ_t (log p_t − log Σ_v p_{t,v}²)` over the response tokens, the policy's.
    pub aligned_chosen: f64,
    pub aligned_rejected: f64,
}

impl PairParts {
    /// WPO's weight of the pair, `exp(ā_c)·exp(ā_r)` (TRL's `chosen_weights * rejected_weights`), the
    /// lengths those of `p`.
    pub fn wpo_weight(&self, p: &PairInput) -> f64 {
        let mean = |aligned: f64, len: u32| aligned / length_divisor(len);
        mean(self.aligned_chosen, p.chosen_len).exp() * mean(self.aligned_rejected, p.rejected_len).exp()
    }
}

/// One pair's output under the modifiers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PartsOutput {
    /// Loss and metrics; `d_policy_*` is the gradient of each token of the response's shared part
    /// (every token's without `ld_alpha`): `dL/dπ + dL/dπ_plain`.
    pub pair: PairOutput,
    /// The gradient of each token past the shared part, `α·dL/dπ + dL/dπ_plain` (without
    /// `ld_alpha`, the same as `pair.d_policy_*`).
    pub d_tail_chosen: f64,
    pub d_tail_rejected: f64,
}

/// [`crate::loss::batch_loss_with`] with the modifiers: the outputs of a batch whose pairs hold
/// the plain sequence log-probs (the sums over their response tokens) in `pairs` and the rest in
/// `parts` (read only for the modifiers the objective has). Without modifiers, the outputs are
/// `batch_loss_with`'s, bit for bit, each token's gradient the sequence's.
pub fn batch_loss_parts(
    objective: &Objective,
    pairs: &[PairInput],
    parts: &[PairParts],
    state: &LossState,
) -> Vec<PartsOutput> {
    assert_eq!(pairs.len(), parts.len(), "batch_loss_parts: one PairParts per pair");
    let alpha = objective.ld_alpha();
    let read: Vec<PairInput> = match alpha {
        None => pairs.to_vec(),
        Some(alpha) => pairs
            .iter()
            .zip(parts)
            .map(|(p, q)| PairInput {
                policy_chosen: q.policy_chosen.weighted(alpha),
                policy_rejected: q.policy_rejected.weighted(alpha),
                ref_chosen: q.ref_chosen.weighted(alpha),
                ref_rejected: q.ref_rejected.weighted(alpha),
                ..*p
            })
            .collect(),
    };
    let plain: Vec<f64> = pairs.iter().map(|p| p.policy_chosen).collect();
    let weights: Option<Vec<f64>> =
        objective.uses_weighting().then(|| pairs.iter().zip(parts).map(|(p, q)| q.wpo_weight(p)).collect());
    let rows = weighted_terms(objective, &read, &plain, weights.as_deref(), alpha.is_some(), state);
    rows.into_iter()
        .map(|(out, d_plain)| match alpha {
            None => {
                PartsOutput { pair: out, d_tail_chosen: out.d_policy_chosen, d_tail_rejected: out.d_policy_rejected }
            }
            Some(alpha) => PartsOutput {
                pair: PairOutput { d_policy_chosen: combined(out.d_policy_chosen, d_plain), ..out },
                d_tail_chosen: combined(alpha * out.d_policy_chosen, d_plain),
                d_tail_rejected: alpha * out.d_policy_rejected,
            },
        })
        .collect()
}
