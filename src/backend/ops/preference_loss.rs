//! The preference loss: one call for the batch, every objective of `crate::loss`, single or combined,
//! with TRL's log-prob modifiers, and the objectives on unpaired examples (KTO, TRL's
//! `apo_zero_unpaired`) (kernels/preference_loss.cu; its specification is
//! `crate::loss::batch_loss_parts`, without modifiers `crate::loss::batch_loss_with`, on unpaired
//! examples `crate::loss::unpaired_loss`).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;
use crate::loss::{LossState, Objective};

/// What TRL's log-prob modifiers read besides the sequence log-probs (`crate::loss::PairParts`), on
/// the backend; each needed only by the objectives with its modifier.
pub struct LogpParts<'a, Buf> {
    /// `[4P]`, for `ld_alpha`: each sequence's log-prob split at its pair's shared length, the sum
    /// over its first `min(|yc|, |yr|)` response tokens at `2s` and over the rest at `2s + 1`; the
    /// policy's, and the reference's (read when the objective uses a reference).
    pub policy_split: Option<&'a Buf>,
    pub reference_split: Option<&'a Buf>,
    /// `[2P]`, for `use_weighting`: each response's `Σ_t (log p_t − log Σ_v p_{t,v}²)`, the policy's.
    pub policy_aligned: Option<&'a Buf>,
}

impl<Buf> LogpParts<'_, Buf> {
    /// No parts: for an objective without modifiers.
    pub fn none() -> Self {
        LogpParts { policy_split: None, reference_split: None, policy_aligned: None }
    }
}

/// What the objectives on unpaired examples (`Objective::Kto`) read besides the examples' log-probs,
/// on the backend.
pub struct ExampleParts<'a, Buf, Ids> {
    /// `[N]` TRL's labels: nonzero for a desirable completion.
    pub desirable: &'a Ids,
    /// `[M]` KTO's KL sequences (each prompt with another example's completion): the policy's
    /// log-probs (no gradient flows to them, as TRL computes them under `no_grad`) and the
    /// reference's. The op forms the KL estimate from them, `max(0, mean(policy_kl − reference_kl))`
    /// (`crate::loss::kl_estimate`). `None` for an objective without the KL term
    /// (`apo_zero_unpaired`), or none read by it.
    pub policy_kl: Option<&'a Buf>,
    pub reference_kl: Option<&'a Buf>,
}

/// The inputs of one [`PreferenceLossOps::preference_loss`] call.
///
/// On pairs (every objective but `Objective::Kto`): sequence `2i` is pair i's chosen response,
/// `2i + 1` its rejected one; `policy`, `reference` are the sequence log-probs `[2P]`,
/// `unsafe_flags` `[2P]` (1 = unsafe), `lengths` `[2P]` (response tokens); `parts` what TRL's
/// log-prob modifiers read; `examples` is `None`.
///
/// On unpaired examples (`Objective::Kto`): `policy`, `reference`, `unsafe_flags` (the completion's),
/// `lengths` (completion tokens) are `[N]`, one per example, and `examples` holds the labels and
/// the KL sequences' log-probs; `parts` is `LogpParts::none()`.
///
/// `reference` is ignored by reference-free objectives (it may be empty). `state` is the trainer
/// state the loss reads (`bco_pair`'s running reward mean); `grad_scale` multiplies the gradient
/// (`1 / N` makes it that of the mean loss).
pub struct PreferenceLossInputs<'a, B: Buffers + ?Sized> {
    pub policy: &'a B::Buf,
    pub reference: &'a B::Buf,
    pub unsafe_flags: &'a B::Ids,
    pub lengths: &'a B::Ids,
    pub parts: LogpParts<'a, B::Buf>,
    pub examples: Option<ExampleParts<'a, B::Buf, B::Ids>>,
    pub objective: &'a Objective,
    pub state: LossState,
    pub grad_scale: f32,
}

impl<'a, B: Buffers + ?Sized> PreferenceLossInputs<'a, B> {
    /// A batch of pairs under `objective`, without modifiers' parts, at the loss state before any
    /// step and `grad_scale` 1; set the other fields with `..` (`PreferenceLossInputs { grad_scale,
    /// ..PreferenceLossInputs::pairs(…) }`).
    pub fn pairs(
        policy: &'a B::Buf,
        reference: &'a B::Buf,
        unsafe_flags: &'a B::Ids,
        lengths: &'a B::Ids,
        objective: &'a Objective,
    ) -> Self {
        PreferenceLossInputs {
            policy,
            reference,
            unsafe_flags,
            lengths,
            parts: LogpParts::none(),
            examples: None,
            objective,
            state: LossState::default(),
            grad_scale: 1.0,
        }
    }

    /// A batch of unpaired examples under `objective` (an `Objective::Kto`), `grad_scale` 1.
    pub fn examples(
        policy: &'a B::Buf,
        reference: &'a B::Buf,
        unsafe_flags: &'a B::Ids,
        lengths: &'a B::Ids,
        examples: ExampleParts<'a, B::Buf, B::Ids>,
        objective: &'a Objective,
    ) -> Self {
        PreferenceLossInputs {
            examples: Some(examples),
            ..Self::pairs(policy, reference, unsafe_flags, lengths, objective)
        }
    }
}

pub trait PreferenceLossOps: Buffers {
    /// One call for the batch (see [`PreferenceLossInputs`] for the layout of the inputs).
    ///
    /// On pairs: writes `metrics [P, PAIR_METRICS]` (loss, chosen reward, rejected reward, margin,
    /// accuracy) and `grads` = `grad_scale · d(Σ_i L_i)/d(policy logp)`, which is each pair's own
    /// `dL_i` except for the batch-level objectives (AOT's sort, the `sft` term's token mean):
    /// `[2P]`, or, with `ld_alpha`, `[4P]`: the gradient of each token of sequence s's shared part
    /// at `2s`, of each token past it at `2s + 1` (`crate::loss::PartsOutput`), which the model's
    /// backward takes over the same split. The CPU twin is `crate::loss::batch_loss_parts`
    /// (`crate::loss::batch_loss_with` without modifiers). An objective with TRL's log-prob
    /// modifiers without the parts they read is refused, naming them.
    ///
    /// On unpaired examples: writes `metrics [N, EXAMPLE_METRICS]` (the weighted loss, the reward
    /// `β x`, the batch's KL estimate) and `grads [N]`, `grad_scale ·` each example's own gradient
    /// (the KL estimate is a constant). The CPU twin is `crate::loss::unpaired_loss`.
    fn preference_loss(
        &self,
        metrics: &mut Self::Buf,
        grads: &mut Self::Buf,
        inputs: &PreferenceLossInputs<'_, Self>,
    ) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    use anyhow::{bail, ensure, Result};

    use super::PreferenceLossInputs;
    use crate::backend::checks::check_len;
    use crate::backend::Buffers;
    use crate::loss::{EXAMPLE_METRICS, PAIR_METRICS};

    /// Checks every length the objective reads, the flags and lengths on the host (`ids`: a
    /// backend's host copy of its ids). Returns the number of pairs, or of examples for an
    /// objective on unpaired examples.
    pub(crate) fn preference_loss<'i, B: Buffers + ?Sized>(
        metrics: usize,
        grads: usize,
        inputs: &'i PreferenceLossInputs<'_, B>,
        buf_len: impl Fn(&B::Buf) -> usize,
        ids: impl Fn(&'i B::Ids) -> &'i [i32],
    ) -> Result<usize> {
        const OP: &str = "preference_loss";
        let objective = inputs.objective;
        let (unsafe_flags, lengths) = (ids(inputs.unsafe_flags), ids(inputs.lengths));
        let policy = buf_len(inputs.policy);
        let uses_reference = objective.uses_reference();
        let negative = lengths.iter().position(|&l| l < 0);
        if objective.as_unpaired().is_some() {
            let Some(examples) = &inputs.examples else {
                bail!(
                    "{OP}: objective {} trains on unpaired examples: its inputs are examples (PreferenceLossInputs::examples)",
                    objective.name()
                )
            };
            let n = policy;
            if uses_reference {
                check_len(OP, "reference", buf_len(inputs.reference), n)?;
            }
            check_len(OP, "unsafe_flags", unsafe_flags.len(), n)?;
            check_len(OP, "lengths", lengths.len(), n)?;
            if let Some(i) = negative {
                bail!("{OP}: example {i} has a negative completion length");
            }
            check_len(OP, "desirable", ids(examples.desirable).len(), n)?;
            check_len(OP, "metrics", metrics, n * EXAMPLE_METRICS)?;
            check_len(OP, "grads", grads, n)?;
            match (examples.policy_kl, examples.reference_kl) {
                (Some(p), Some(r)) => check_len(OP, "reference_kl", buf_len(r), buf_len(p))?,
                (None, None) => {}
                _ => bail!("{OP}: the KL sequences' log-probs come in two: `policy_kl` and `reference_kl`"),
            }
            return Ok(n);
        }
        ensure!(
            inputs.examples.is_none(),
            "{OP}: objective {objective} is on pairs, but the inputs are unpaired examples"
        );
        ensure!(policy.is_multiple_of(2), "{OP}: `policy` has {policy} elements, expected an even number");
        let pairs = policy / 2;
        if uses_reference {
            check_len(OP, "reference", buf_len(inputs.reference), 2 * pairs)?;
        }
        check_len(OP, "unsafe_flags", unsafe_flags.len(), 2 * pairs)?;
        check_len(OP, "lengths", lengths.len(), 2 * pairs)?;
        if let Some(s) = negative {
            bail!("{OP}: pair {} has a negative response length", s / 2);
        }
        check_len(OP, "metrics", metrics, pairs * PAIR_METRICS)?;
        let ld = objective.ld_alpha().is_some();
        if ld {
            ensure!(grads == 4 * pairs, "{OP}: with ld_alpha, `grads` is [4P] = {}, got {grads}", 4 * pairs);
        } else {
            check_len(OP, "grads", grads, 2 * pairs)?;
        }
        let parts = &inputs.parts;
        let needed = |what: &str, buf: Option<&B::Buf>, want: usize, modifier: &str| match buf {
            Some(buf) => check_len(OP, what, buf_len(buf), want),
            None => bail!(
                "{OP}: objective {objective} has {modifier}, which reads `{what}` (the log-probs' parts: LogpParts)"
            ),
        };
        if ld {
            needed("policy_split", parts.policy_split, 4 * pairs, "ld_alpha")?;
            if uses_reference {
                needed("reference_split", parts.reference_split, 4 * pairs, "ld_alpha")?;
            }
        }
        if objective.uses_weighting() {
            needed("policy_aligned", parts.policy_aligned, 2 * pairs, "use_weighting")?;
        }
        Ok(pairs)
    }
}
