//! The preference loss: one call for the batch, every objective of `crate::loss`, single or combined
//! (kernels/preference_loss.cu; its specification is `crate::loss::batch_loss_with`).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;
use crate::loss::{LossState, Objective};

pub trait PreferenceLossOps: Buffers {
    /// One call for the batch of P pairs. Sequence `2i` is pair i's chosen response, `2i + 1` its
    /// rejected one. Inputs `[2P]`: policy and reference sequence log-probs, `unsafe_flags` (1 =
    /// unsafe), `lengths` (response tokens). Writes `metrics [P, PAIR_METRICS]` (see
    /// `PAIR_METRICS`) and `dpolicy [2P]` = `grad_scale · d(Σ_i L_i)/d(policy logp)`, which is each
    /// pair's own `dL_i` except for the batch-level objectives (AOT's sort, the `sft` term's token
    /// mean). `reference` is ignored by reference-free objectives. `state` is the trainer state the
    /// loss reads (`bco_pair`'s running reward mean). The CPU twin is
    /// `crate::loss::batch_loss_with`.
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
    ) -> Result<()>;

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
    use crate::loss::PAIR_METRICS;

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
}
