//! The preference loss of a batch of pairs, every objective of `crate::loss` (contract:
//! `backend/ops/preference_loss.rs`, kernels: `kernels/preference_loss.cu`).
//!
//! There is no fast version: a batch has a few pairs, so the CPU backend runs the spec itself and
//! rounds its results to f32.

use anyhow::Result;

use super::CpuBackend;
use crate::backend::{checks, PreferenceLossOps};
use crate::loss::{LossState, Objective};

/// The specification, in f64, that the CPU backend runs and the CUDA kernel is held to:
/// [`crate::loss::batch_loss_with`] of the batch (each pair's [`crate::loss::pair_loss`], unless the
/// objective is batch-level), laid out as the op lays it out.
pub mod spec {
    use crate::backend::PAIR_METRICS;
    use crate::loss::{batch_loss_with, LossState, Objective, PairInput};

    /// Pair i is sequences `2i` (chosen) and `2i + 1` (rejected) of `policy`, `reference` (read only
    /// when the objective `uses_reference`), `unsafe_flags` (nonzero: unsafe) and `lengths`.
    /// Returns `(metrics [pairs, PAIR_METRICS], dpolicy [2 · pairs])`, with `dpolicy` the gradient
    /// of the batch's summed loss times `grad_scale` (each pair's own loss unless the objective
    /// sorts across the batch).
    pub fn forward(
        objective: &Objective,
        policy: &[f64],
        reference: &[f64],
        unsafe_flags: &[i32],
        lengths: &[i32],
        grad_scale: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        forward_with(objective, &LossState::default(), policy, reference, unsafe_flags, lengths, grad_scale)
    }

    /// [`forward`] under the trainer state `state` (see [`crate::loss::LossState`]).
    pub fn forward_with(
        objective: &Objective,
        state: &LossState,
        policy: &[f64],
        reference: &[f64],
        unsafe_flags: &[i32],
        lengths: &[i32],
        grad_scale: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let pairs = policy.len() / 2;
        let uses_reference = objective.uses_reference();
        let reference_of = |s: usize| if uses_reference { reference[s] } else { 0.0 };
        let inputs: Vec<PairInput> = (0..pairs)
            .map(|i| {
                let (c, r) = (2 * i, 2 * i + 1);
                PairInput {
                    policy_chosen: policy[c],
                    policy_rejected: policy[r],
                    ref_chosen: reference_of(c),
                    ref_rejected: reference_of(r),
                    chosen_unsafe: unsafe_flags[c] != 0,
                    rejected_unsafe: unsafe_flags[r] != 0,
                    chosen_len: lengths[c] as u32,
                    rejected_len: lengths[r] as u32,
                }
            })
            .collect();
        let (mut metrics, mut dpolicy) = (vec![0.0; pairs * PAIR_METRICS], vec![0.0; 2 * pairs]);
        for (i, out) in batch_loss_with(objective, &inputs, state).iter().enumerate() {
            metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS].copy_from_slice(&out.metrics_row());
            dpolicy[2 * i] = grad_scale * out.d_policy_chosen;
            dpolicy[2 * i + 1] = grad_scale * out.d_policy_rejected;
        }
        (metrics, dpolicy)
    }
}

impl PreferenceLossOps for CpuBackend {
    fn preference_loss_with(
        &self,
        metrics: &mut Vec<f32>,
        dpolicy: &mut Vec<f32>,
        policy: &Vec<f32>,
        reference: &Vec<f32>,
        unsafe_flags: &Vec<i32>,
        lengths: &Vec<i32>,
        objective: &Objective,
        state: &LossState,
        grad_scale: f32,
    ) -> Result<()> {
        objective.require_pairwise("preference_loss")?;
        checks::preference_loss(
            metrics.len(),
            dpolicy.len(),
            policy.len(),
            reference.len(),
            unsafe_flags,
            lengths,
            objective.uses_reference(),
        )?;
        let to_f64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (policy, reference) = (to_f64(policy), to_f64(reference));
        let (metrics_f64, dpolicy_f64) =
            spec::forward_with(objective, state, &policy, &reference, unsafe_flags, lengths, grad_scale as f64);
        metrics.iter_mut().zip(&metrics_f64).for_each(|(m, &x)| *m = x as f32);
        dpolicy.iter_mut().zip(&dpolicy_f64).for_each(|(d, &x)| *d = x as f32);
        Ok(())
    }
}
