//! The preference loss: one call for the batch, every objective of `crate::loss`, single or combined,
//! with TRL's log-prob modifiers (kernels/preference_loss.cu; its specification is
//! `crate::loss::batch_loss_parts`, without modifiers `crate::loss::batch_loss_with`).
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

pub trait PreferenceLossOps: Buffers {
    /// [`preference_loss_with`](Self::preference_loss_with) for any objective, TRL's log-prob
    /// modifiers included: `parts` holds what they read (see [`LogpParts`]). With `ld_alpha`,
    /// `grads` is `[4P]`: `grad_scale ·` the gradient of each token of sequence s's shared part at
    /// `2s`, of each token past it at `2s + 1` (`crate::loss::PartsOutput`), which the model's
    /// backward takes over the same split; otherwise `[2P]`, the `dpolicy` of
    /// `preference_loss_with`. The CPU twin is `crate::loss::batch_loss_parts`.
    #[allow(clippy::too_many_arguments)]
    fn preference_loss_parts(
        &self,
        metrics: &mut Self::Buf,
        grads: &mut Self::Buf,
        policy: &Self::Buf,
        reference: &Self::Buf,
        unsafe_flags: &Self::Ids,
        lengths: &Self::Ids,
        parts: &LogpParts<'_, Self::Buf>,
        objective: &Objective,
        state: &LossState,
        grad_scale: f32,
    ) -> Result<()>;

    /// One call for the batch of P pairs. Sequence `2i` is pair i's chosen response, `2i + 1` its
    /// rejected one. Inputs `[2P]`: policy and reference sequence log-probs, `unsafe_flags` (1 =
    /// unsafe), `lengths` (response tokens). Writes `metrics [P, PAIR_METRICS]` (see
    /// `PAIR_METRICS`) and `dpolicy [2P]` = `grad_scale · d(Σ_i L_i)/d(policy logp)`, which is each
    /// pair's own `dL_i` except for the batch-level objectives (AOT's sort, the `sft` term's token
    /// mean). `reference` is ignored by reference-free objectives. `state` is the trainer state the
    /// loss reads (`bco_pair`'s running reward mean). The CPU twin is
    /// `crate::loss::batch_loss_with`. An objective with TRL's log-prob modifiers is refused (it
    /// needs [`preference_loss_parts`](Self::preference_loss_parts)).
    #[allow(clippy::too_many_arguments)]
    fn preference_loss_with(
        &self,
        metrics: &mut Self::Buf,
        dpolicy: &mut Self::Buf,
        policy: &Self::Buf,
        reference: &Self::Buf,
        unsafe_flags: &Self::Ids,
        lengths: &Self::Ids,
        objective: &Objective,
        state: &LossState,
        grad_scale: f32,
    ) -> Result<()> {
        let parts = LogpParts::none();
        self.preference_loss_parts(
            metrics,
            dpolicy,
            policy,
            reference,
            unsafe_flags,
            lengths,
            &parts,
            objective,
            state,
            grad_scale,
        )
    }

    /// `preference_loss_with` at the state before any step (`crate::loss::batch_loss`).
    #[allow(clippy::too_many_arguments)]
    fn preference_loss(
        &self,
        metrics: &mut Self::Buf,
        dpolicy: &mut Self::Buf,
        policy: &Self::Buf,
        reference: &Self::Buf,
        unsafe_flags: &Self::Ids,
        lengths: &Self::Ids,
        objective: &Objective,
        grad_scale: f32,
    ) -> Result<()> {
        let state = LossState::default();
        self.preference_loss_with(
            metrics,
            dpolicy,
            policy,
            reference,
            unsafe_flags,
            lengths,
            objective,
            &state,
            grad_scale,
        )
    }
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    #[allow(unused_imports)]
    use anyhow::{bail, ensure, Result};

    #[allow(unused_imports)]
    use crate::backend::checks::{check_ids, check_len, sequences, Sequences};
    use crate::loss::{Objective, PAIR_METRICS};

    /// `reference` is checked only when the objective `uses_reference`. Returns the number of pairs.
    pub(crate) fn preference_loss(
        metrics: usize,
        dpolicy: usize,
        policy: usize,
        reference: usize,
        unsafe_flags: &[i32],
        lengths: &[i32],
        uses_reference: bool,
    ) -> Result<usize> {
        const OP: &str = "preference_loss";
        ensure!(policy.is_multiple_of(2), "{OP}: `policy` has {policy} elements, expected an even number");
        let pairs = policy / 2;
        if uses_reference {
            check_len(OP, "reference", reference, 2 * pairs)?;
        }
        check_len(OP, "unsafe_flags", unsafe_flags.len(), 2 * pairs)?;
        check_len(OP, "lengths", lengths.len(), 2 * pairs)?;
        check_len(OP, "metrics", metrics, pairs * PAIR_METRICS)?;
        check_len(OP, "dpolicy", dpolicy, 2 * pairs)?;
        if let Some(s) = lengths.iter().position(|&l| l < 0) {
            bail!("{OP}: pair {} has a negative response length", s / 2);
        }
        Ok(pairs)
    }

    /// `preference_loss`'s checks with `grads` in place of `dpolicy` (`[4P]` with `ld_alpha`), and
    /// the parts the objective's modifiers read (their lengths, given as `None` where absent).
    /// Returns the number of pairs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn preference_loss_parts(
        metrics: usize,
        grads: usize,
        policy: usize,
        reference: usize,
        unsafe_flags: &[i32],
        lengths: &[i32],
        objective: &Objective,
        policy_split: Option<usize>,
        reference_split: Option<usize>,
        policy_aligned: Option<usize>,
    ) -> Result<usize> {
        const OP: &str = "preference_loss";
        let uses_reference = objective.uses_reference();
        let ld = objective.ld_alpha().is_some();
        let pairs = policy / 2;
        let dpolicy = if ld && grads == 4 * pairs { 2 * pairs } else { grads };
        let pairs = preference_loss(metrics, dpolicy, policy, reference, unsafe_flags, lengths, uses_reference)?;
        let needed = |what: &str, len: Option<usize>, want: usize, modifier: &str| match len {
            Some(len) => check_len(OP, what, len, want),
            None => bail!(
                "{OP}: objective {objective} has {modifier}, which reads `{what}` (the log-probs' parts: LogpParts)"
            ),
        };
        if ld {
            ensure!(grads == 4 * pairs, "{OP}: with ld_alpha, `grads` is [4P] = {}, got {grads}", 4 * pairs);
            needed("policy_split", policy_split, 4 * pairs, "ld_alpha")?;
            if uses_reference {
                needed("reference_split", reference_split, 4 * pairs, "ld_alpha")?;
            }
        }
        if objective.uses_weighting() {
            needed("policy_aligned", policy_aligned, 2 * pairs, "use_weighting")?;
        }
        Ok(pairs)
    }
}
