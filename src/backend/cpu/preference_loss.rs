//! The preference loss of a batch of pairs, every objective of `crate::loss`, or of unpaired
//! examples (KTO) (contract:
//! `backend/ops/preference_loss.rs`, kernels: `kernels/preference_loss.cu`).
//!
//! There is no fast version: a batch has a few pairs, so the CPU backend runs the spec itself and
//! rounds its results to f32.

use anyhow::Result;

use super::CpuBackend;
use crate::backend::{checks, PreferenceLossInputs, PreferenceLossOps};

/// The specification, in f64, that the CPU backend runs and the CUDA kernel is held to:
/// [`crate::loss::batch_loss_with`] of the batch (each pair's [`crate::loss::pair_loss`], unless the
/// objective is batch-level), laid out as the op lays it out; with TRL's log-prob modifiers,
/// [`crate::loss::batch_loss_parts`]; on unpaired examples, [`crate::loss::unpaired_loss`].
pub mod spec {
    use crate::backend::PAIR_METRICS;
    use crate::loss::{
        batch_loss_parts, batch_loss_with, kl_estimate, unpaired_loss, ExampleInput, Kto, LossState, Objective,
        PairInput, PairParts, SharedSplit, EXAMPLE_METRICS,
    };

    /// The op's parts (`LogpParts`) on the host, in f64: `[4P]` splits, `[2P]` aligned log-probs.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct HostParts<'a> {
        pub policy_split: Option<&'a [f64]>,
        pub reference_split: Option<&'a [f64]>,
        pub policy_aligned: Option<&'a [f64]>,
    }

    /// [`forward_with`] with the modifiers' parts: returns `(metrics [pairs, PAIR_METRICS], grads)`,
    /// `grads` `[4 · pairs]` with `ld_alpha` (each sequence's shared part, then its tail), else
    /// `[2 · pairs]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_parts(
        objective: &Objective,
        state: &LossState,
        policy: &[f64],
        reference: &[f64],
        unsafe_flags: &[i32],
        lengths: &[i32],
        parts: &HostParts,
        grad_scale: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let ld = objective.ld_alpha().is_some();
        if !ld && !objective.uses_weighting() {
            return forward_with(objective, state, policy, reference, unsafe_flags, lengths, grad_scale);
        }
        let inputs = pair_inputs(objective, policy, reference, unsafe_flags, lengths);
        let split = |values: Option<&[f64]>, s: usize| {
            values.map_or(SharedSplit::default(), |v| SharedSplit { shared: v[2 * s], tail: v[2 * s + 1] })
        };
        let reference_split = parts.reference_split.filter(|_| objective.uses_reference());
        let aligned = |s: usize| parts.policy_aligned.map_or(0.0, |v| v[s]);
        let pair_parts: Vec<PairParts> = (0..inputs.len())
            .map(|i| PairParts {
                policy_chosen: split(parts.policy_split, 2 * i),
                policy_rejected: split(parts.policy_split, 2 * i + 1),
                ref_chosen: split(reference_split, 2 * i),
                ref_rejected: split(reference_split, 2 * i + 1),
                aligned_chosen: aligned(2 * i),
                aligned_rejected: aligned(2 * i + 1),
            })
            .collect();
        let pairs = inputs.len();
        let mut metrics = vec![0.0; pairs * PAIR_METRICS];
        let mut grads = vec![0.0; if ld { 4 * pairs } else { 2 * pairs }];
        for (i, out) in batch_loss_parts(objective, &inputs, &pair_parts, state).iter().enumerate() {
            metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS].copy_from_slice(&out.pair.metrics_row());
            let (chosen, rejected) = (out.pair.d_policy_chosen, out.pair.d_policy_rejected);
            let row: &[f64] =
                if ld { &[chosen, out.d_tail_chosen, rejected, out.d_tail_rejected] } else { &[chosen, rejected] };
            let width = row.len();
            for (g, &d) in grads[i * width..(i + 1) * width].iter_mut().zip(row) {
                *g = grad_scale * d;
            }
        }
        (metrics, grads)
    }

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
        let inputs = pair_inputs(objective, policy, reference, unsafe_flags, lengths);
        let pairs = inputs.len();
        let (mut metrics, mut dpolicy) = (vec![0.0; pairs * PAIR_METRICS], vec![0.0; 2 * pairs]);
        for (i, out) in batch_loss_with(objective, &inputs, state).iter().enumerate() {
            metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS].copy_from_slice(&out.metrics_row());
            dpolicy[2 * i] = grad_scale * out.d_policy_chosen;
            dpolicy[2 * i + 1] = grad_scale * out.d_policy_rejected;
        }
        (metrics, dpolicy)
    }

    /// A batch of unpaired examples under `objective`: example i's `policy`, `reference` log-probs,
    /// its completion's safety flag (`unsafe_flags`, nonzero: unsafe) and label (`desirable`,
    /// nonzero: desirable); `kl` the KL sequences' policy and reference log-probs, whose clamped mean
    /// log-ratio is the KL estimate the loss reads ([`kl_estimate`]; 0 without them, or when the
    /// objective reads none). Returns
    /// `(metrics [n, EXAMPLE_METRICS], grads [n])`: [`unpaired_loss`]'s weighted loss, reward and the
    /// KL estimate per row, `grad_scale` times each example's gradient.
    pub fn forward_examples(
        objective: &Kto,
        policy: &[f64],
        reference: &[f64],
        unsafe_flags: &[i32],
        desirable: &[i32],
        kl: Option<(&[f64], &[f64])>,
        grad_scale: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let kl = kl.filter(|_| objective.estimates_kl());
        let kl = kl.map_or(0.0, |(policy_kl, reference_kl)| kl_estimate(policy_kl, reference_kl));
        let inputs: Vec<ExampleInput> = (0..policy.len())
            .map(|i| ExampleInput {
                policy: policy[i],
                reference: reference[i],
                desirable: desirable[i] != 0,
                completion_unsafe: unsafe_flags[i] != 0,
            })
            .collect();
        let outputs = unpaired_loss(objective, &inputs, kl);
        let metrics = outputs.iter().flat_map(|o| [o.loss, o.reward, kl]).collect::<Vec<f64>>();
        debug_assert_eq!(metrics.len(), outputs.len() * EXAMPLE_METRICS);
        (metrics, outputs.iter().map(|o| grad_scale * o.d_policy).collect())
    }

    /// Pair i is sequences `2i` and `2i + 1`; the reference read only when the objective uses it.
    fn pair_inputs(
        objective: &Objective,
        policy: &[f64],
        reference: &[f64],
        unsafe_flags: &[i32],
        lengths: &[i32],
    ) -> Vec<PairInput> {
        let uses_reference = objective.uses_reference();
        let reference_of = |s: usize| if uses_reference { reference[s] } else { 0.0 };
        (0..policy.len() / 2)
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
            .collect()
    }
}

impl PreferenceLossOps for CpuBackend {
    fn preference_loss(
        &self,
        metrics: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        inputs: &PreferenceLossInputs<'_, Self>,
    ) -> Result<()> {
        checks::preference_loss(metrics.len(), grads.len(), inputs, Vec::len, Vec::as_slice)?;
        let to_f64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let objective = inputs.objective;
        let (policy, reference) = (to_f64(inputs.policy), to_f64(inputs.reference));
        let (unsafe_flags, lengths, grad_scale) = (inputs.unsafe_flags, inputs.lengths, inputs.grad_scale as f64);
        let (metrics_f64, grads_f64) = match (objective.as_unpaired(), &inputs.examples) {
            (Some(kto), Some(examples)) => {
                let kl = match (examples.policy_kl, examples.reference_kl) {
                    (Some(p), Some(r)) => Some((to_f64(p), to_f64(r))),
                    _ => None,
                };
                let kl = kl.as_ref().map(|(p, r)| (p.as_slice(), r.as_slice()));
                spec::forward_examples(kto, &policy, &reference, unsafe_flags, examples.desirable, kl, grad_scale)
            }
            _ => {
                let parts = &inputs.parts;
                let (policy_split, reference_split, policy_aligned) = (
                    parts.policy_split.map(|x| to_f64(x)),
                    parts.reference_split.map(|x| to_f64(x)),
                    parts.policy_aligned.map(|x| to_f64(x)),
                );
                let host_parts = spec::HostParts {
                    policy_split: policy_split.as_deref(),
                    reference_split: reference_split.as_deref(),
                    policy_aligned: policy_aligned.as_deref(),
                };
                let state = &inputs.state;
                spec::forward_parts(
                    objective,
                    state,
                    &policy,
                    &reference,
                    unsafe_flags,
                    lengths,
                    &host_parts,
                    grad_scale,
                )
            }
        };
        metrics.iter_mut().zip(&metrics_f64).for_each(|(m, &x)| *m = x as f32);
        grads.iter_mut().zip(&grads_f64).for_each(|(d, &x)| *d = x as f32);
        Ok(())
    }
}
