//! The preference objectives on the CUDA backend (kernels/preference_loss.cu): one thread per pair
//! (per example for the objectives on unpaired examples, KTO's KL estimate formed in the launch),
//! all pairs in one launch per term of the objective, each passed as its code; a term that sorts
//! across the batch (AOT) takes two launches, a rank pass and the scoring of the sorted positions.
//! The first launch writes the metrics and the gradient, the others add to them. With LD-DPO's
//! `ld_alpha` two more launches frame them: the weighted log-probs before, the split's token
//! gradients after.

use anyhow::{ensure, Result};

use crate::backend::cuda::backend::{CudaBackend, CudaBuf, CudaIds, Operand, Storage};
use crate::backend::cuda::kernels::constants::preference_loss::{
    ALPHA_DIVERGENCE_MAX_EXPONENT, EXAMPLE_METRICS, FDIV_ALPHA_DIVERGENCE, FDIV_FORWARD_KL, FDIV_JS_DIVERGENCE,
    FDIV_REVERSE_KL, OBJ_AOT, OBJ_AOT_UNPAIRED, OBJ_APO_DOWN, OBJ_APO_ZERO, OBJ_APO_ZERO_UNPAIRED, OBJ_BCO_PAIR,
    OBJ_CDPO, OBJ_CPO, OBJ_CPO_HINGE, OBJ_CPO_IPO, OBJ_CPO_SIMPO, OBJ_DISCOPOP, OBJ_DPO, OBJ_EXO_PAIR, OBJ_HINGE,
    OBJ_IPO, OBJ_KTO, OBJ_NCA_PAIR, OBJ_NPO, OBJ_ORPO, OBJ_ROBUST, OBJ_RPO, OBJ_SFT, OBJ_SIGMOID_NORM, OBJ_SIMPO,
    OBJ_SPPO_HARD, ORPO_MAX_MEAN_LOGP, PAIR_METRICS, PAIR_THREADS, SORTED_MAX_PAIRS,
};
use crate::backend::cuda::launch::i32_arg;
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, ExampleParts, PreferenceLossInputs, PreferenceLossOps};
use crate::loss::{FDivergence, Kto, KtoLoss, Objective};

// The kernel writes the metrics the loss module defines, in its order, with its constants.
const _: () = assert!(PAIR_METRICS as usize == crate::loss::PAIR_METRICS);
const _: () = assert!(EXAMPLE_METRICS as usize == crate::loss::EXAMPLE_METRICS);
const _: () = assert!(ALPHA_DIVERGENCE_MAX_EXPONENT as f64 == crate::loss::ALPHA_DIVERGENCE_MAX_EXPONENT);
const _: () = assert!(ORPO_MAX_MEAN_LOGP == crate::loss::ORPO_MAX_MEAN_LOGP as f32);

/// One launch of the kernel: one term of the objective (or the `sft` part of one), with its scalars.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Launch {
    /// An `OBJ_*` code of kernels/preference_loss.cu.
    code: i32,
    beta: f32,
    /// The term's second and third parameters (0 where it has none): see the kernel.
    param: f32,
    param2: f32,
    safety_margin: f32,
    weight: f32,
    /// Whether it reads the reference log-probs.
    uses_reference: bool,
}

/// The launches of `objective`, in order: each term's own code, then, for a term with an `sft` part
/// (`orpo`, the CPO objectives with `cpo_alpha` > 0), an `OBJ_SFT` launch weighted by it.
fn launches(objective: &Objective) -> Vec<Launch> {
    let mut out = Vec::new();
    for (weight, term) in objective.terms() {
        let code = match *term {
            Objective::Dpo { .. } | Objective::SafeDpo { .. } => OBJ_DPO,
            Objective::Ipo { .. } => OBJ_IPO,
            Objective::Robust { .. } => OBJ_ROBUST,
            Objective::Cdpo { .. } => OBJ_CDPO,
            Objective::Hinge { .. } => OBJ_HINGE,
            Objective::Rpo { .. } => OBJ_RPO,
            Objective::Simpo { .. } => OBJ_SIMPO,
            Objective::Npo { .. } => OBJ_NPO,
            Objective::ExoPair { .. } => OBJ_EXO_PAIR,
            Objective::NcaPair { .. } => OBJ_NCA_PAIR,
            Objective::SppoHard { .. } => OBJ_SPPO_HARD,
            Objective::Aot { .. } => OBJ_AOT,
            Objective::AotUnpaired { .. } => OBJ_AOT_UNPAIRED,
            Objective::ApoZero { .. } => OBJ_APO_ZERO,
            Objective::ApoDown { .. } => OBJ_APO_DOWN,
            Objective::Discopop { .. } => OBJ_DISCOPOP,
            Objective::SigmoidNorm { .. } => OBJ_SIGMOID_NORM,
            Objective::BcoPair { .. } => OBJ_BCO_PAIR,
            Objective::Sft { .. } => OBJ_SFT,
            Objective::Orpo { .. } => OBJ_ORPO,
            Objective::Cpo { .. } => OBJ_CPO,
            Objective::CpoHinge { .. } => OBJ_CPO_HINGE,
            Objective::CpoIpo { .. } => OBJ_CPO_IPO,
            Objective::CpoSimpo { .. } => OBJ_CPO_SIMPO,
            Objective::Combination(_) => unreachable!("a combination's terms are single objectives"),
            Objective::Kto(_) => unreachable!("an objective on unpaired examples runs in `example_loss`"),
        };
        let (param, param2) = match *term {
            Objective::Robust { eps, .. }
            | Objective::Cdpo { eps, .. }
            | Objective::ExoPair { eps, .. }
            | Objective::Aot { eps, .. }
            | Objective::AotUnpaired { eps, .. }
            | Objective::Cpo { eps, .. } => (eps, 0.0),
            Objective::Rpo { alpha, .. } => (alpha, 0.0),
            Objective::Simpo { gamma, .. } => (gamma, 0.0),
            Objective::Discopop { tau, .. } => (tau, 0.0),
            Objective::CpoSimpo { eps, gamma, .. } => (eps, gamma),
            _ => (0.0, 0.0),
        };
        let launch = Launch {
            code,
            beta: term.beta() as f32,
            param: param as f32,
            param2: param2 as f32,
            safety_margin: term.safety_margin() as f32,
            weight: weight as f32,
            uses_reference: term.uses_reference(),
        };
        out.push(launch);
        let nll_weight = term.nll_weight();
        if code != OBJ_SFT && nll_weight > 0.0 {
            out.push(Launch { code: OBJ_SFT, weight: (weight * nll_weight) as f32, uses_reference: false, ..launch });
        }
    }
    out
}

/// The kernel's f-divergence code and its α.
fn f_divergence_args(objective: &Objective) -> (i32, f32) {
    let f_divergence = match objective {
        Objective::Combination(c) => c.f_divergence,
        _ => FDivergence::ReverseKl,
    };
    let code = match f_divergence {
        FDivergence::ReverseKl => FDIV_REVERSE_KL,
        FDivergence::ForwardKl => FDIV_FORWARD_KL,
        FDivergence::JsDivergence => FDIV_JS_DIVERGENCE,
        FDivergence::Alpha(_) => FDIV_ALPHA_DIVERGENCE,
    };
    debug_assert_eq!(code, f_divergence.code());
    (code, f_divergence.coef() as f32)
}

impl CudaBackend {
    /// LD-DPO's log-probs `[2P]` of a split `[4P]`, in new storage.
    fn ld_weighted_logps(&self, split: &Operand<'_>, ld_alpha: f32, pairs: usize) -> Result<Storage> {
        let out = self.alloc(Dtype::F32, 2 * pairs)?;
        let sequences = i32_arg(2 * pairs, "sequences")?;
        self.launch(
            "ld_weighted_logps_f32",
            LaunchConfig::for_elements(2 * pairs, PAIR_THREADS as u32),
            &[out.arg(), split.arg(), KernelArg::F32(ld_alpha), sequences],
        )?;
        Ok(out)
    }
}

impl PreferenceLossOps for CudaBackend {
    fn preference_loss(
        &self,
        metrics: &mut CudaBuf,
        grads: &mut CudaBuf,
        inputs: &PreferenceLossInputs<'_, Self>,
    ) -> Result<()> {
        let count = checks::preference_loss(metrics.len(), grads.len(), inputs, CudaBuf::len, CudaIds::host)?;
        if count == 0 {
            return Ok(());
        }
        match (inputs.objective.as_unpaired(), &inputs.examples) {
            (Some(kto), Some(examples)) => self.example_loss(metrics, grads, inputs, examples, kto, count),
            _ => self.pair_loss(metrics, grads, inputs, count),
        }
    }
}

impl CudaBackend {
    /// The loss of `pairs` pairs (checked): one launch per term of the objective.
    fn pair_loss(
        &self,
        metrics: &mut CudaBuf,
        grads: &mut CudaBuf,
        inputs: &PreferenceLossInputs<'_, Self>,
        pairs: usize,
    ) -> Result<()> {
        let PreferenceLossInputs {
            policy, reference, unsafe_flags, lengths, parts, objective, state, grad_scale, ..
        } = inputs;
        let (objective, grad_scale) = (*objective, *grad_scale);
        let uses_reference = objective.uses_reference();
        if objective.sorts_batch() {
            ensure!(
                pairs <= SORTED_MAX_PAIRS as usize,
                "preference_loss: {objective} sorts at most {SORTED_MAX_PAIRS} pairs"
            );
        }
        let ld_alpha = objective.ld_alpha().map(|alpha| alpha as f32);
        let policy = self.input(policy, Dtype::F32)?;
        let reference = if uses_reference { Some(self.input(reference, Dtype::F32)?) } else { None };
        let aligned = match parts.policy_aligned.filter(|_| objective.uses_weighting()) {
            Some(buf) => Some(self.input(buf, Dtype::F32)?),
            None => None,
        };
        // Under LD-DPO the terms read the weighted log-probs, and their gradients (in those, and the
        // NLL parts' in the plain ones) go to scratch until the split's token gradients are formed.
        let mut ld = None;
        if let Some(alpha) = ld_alpha {
            let policy_split = parts.policy_split.expect("checked by preference_loss");
            let policy_read = self.ld_weighted_logps(&self.input(policy_split, Dtype::F32)?, alpha, pairs)?;
            let reference_read = match parts.reference_split.filter(|_| uses_reference) {
                Some(split) => Some(self.ld_weighted_logps(&self.input(split, Dtype::F32)?, alpha, pairs)?),
                None => None,
            };
            let dread = self.alloc(Dtype::F32, 2 * pairs)?;
            let dplain = Storage::F32(self.device.alloc_zeros(2 * pairs)?);
            ld = Some((alpha, policy_read, reference_read, dread, dplain));
        }
        let grads = self.output(grads, Dtype::F32, false)?.arg();
        let (policy_arg, reference_arg, plain_arg, dpolicy, dplain) = match &ld {
            None => (
                policy.arg(),
                reference.as_ref().map_or(KernelArg::NULL, Operand::arg),
                KernelArg::NULL,
                grads,
                KernelArg::NULL,
            ),
            Some((_, policy_read, reference_read, dread, dplain)) => (
                policy_read.arg(),
                reference_read.as_ref().map_or(KernelArg::NULL, Storage::arg),
                policy.arg(),
                dread.arg(),
                dplain.arg(),
            ),
        };
        let aligned_arg = aligned.as_ref().map_or(KernelArg::NULL, Operand::arg);
        let metrics = self.output(metrics, Dtype::F32, false)?.arg();
        let (config, pairs_arg) = (LaunchConfig::for_elements(pairs, PAIR_THREADS as u32), i32_arg(pairs, "pairs")?);
        let (f_divergence, alpha) = f_divergence_args(objective);
        let bco_shift = state.bco_shift(objective) as f32;
        for (k, launch) in launches(objective).into_iter().enumerate() {
            let reference = if launch.uses_reference { reference_arg } else { KernelArg::NULL };
            let (code, beta) = (KernelArg::I32(launch.code), KernelArg::F32(launch.beta));
            let (weight, accumulate) = (KernelArg::F32(launch.weight), KernelArg::I32(i32::from(k > 0)));
            let (param, safety_margin) = (KernelArg::F32(launch.param), KernelArg::F32(launch.safety_margin));
            if launch.code == OBJ_AOT || launch.code == OBJ_AOT_UNPAIRED {
                // ranks[k] / ranks[P + k]: the pairs holding the k-th smallest first / second key.
                let ranks = self.alloc(Dtype::F32, 2 * pairs)?;
                self.launch(
                    "preference_loss_rank_f32",
                    config,
                    &[ranks.arg(), policy_arg, reference, unsafe_flags.arg(), pairs_arg, code, beta, safety_margin],
                )?;
                self.launch(
                    "preference_loss_sorted_f32",
                    config,
                    &[
                        metrics,
                        dpolicy,
                        ranks.arg(),
                        policy_arg,
                        reference,
                        unsafe_flags.arg(),
                        pairs_arg,
                        code,
                        beta,
                        param,
                        safety_margin,
                        weight,
                        accumulate,
                        KernelArg::F32(grad_scale),
                    ],
                )?;
                continue;
            }
            self.launch(
                "preference_loss_f32",
                config,
                &[
                    metrics,
                    dpolicy,
                    dplain,
                    policy_arg,
                    reference,
                    plain_arg,
                    aligned_arg,
                    unsafe_flags.arg(),
                    lengths.arg(),
                    pairs_arg,
                    code,
                    beta,
                    param,
                    KernelArg::F32(launch.param2),
                    safety_margin,
                    KernelArg::I32(f_divergence),
                    KernelArg::F32(alpha),
                    KernelArg::F32(bco_shift),
                    weight,
                    accumulate,
                    KernelArg::F32(grad_scale),
                ],
            )?;
        }
        if let Some((alpha, _, _, dread, dplain)) = &ld {
            self.launch(
                "ld_split_grads_f32",
                LaunchConfig::for_elements(2 * pairs, PAIR_THREADS as u32),
                &[grads, dread.arg(), dplain.arg(), KernelArg::F32(*alpha), i32_arg(2 * pairs, "sequences")?],
            )?;
        }
        Ok(())
    }

    /// The loss of `n` unpaired examples (checked): one launch, KTO's KL estimate formed in it.
    fn example_loss(
        &self,
        metrics: &mut CudaBuf,
        grads: &mut CudaBuf,
        inputs: &PreferenceLossInputs<'_, Self>,
        examples: &ExampleParts<'_, CudaBuf, CudaIds>,
        objective: &Kto,
        n: usize,
    ) -> Result<()> {
        let code = match objective.loss {
            KtoLoss::Kto => OBJ_KTO,
            KtoLoss::ApoZeroUnpaired => OBJ_APO_ZERO_UNPAIRED,
        };
        let policy = self.input(inputs.policy, Dtype::F32)?;
        let reference = self.input(inputs.reference, Dtype::F32)?;
        // The KL sequences only where the objective reads the estimate.
        let kl = match (examples.policy_kl, examples.reference_kl) {
            (Some(p), Some(r)) if objective.estimates_kl() && !p.is_empty() => {
                Some((self.input(p, Dtype::F32)?, self.input(r, Dtype::F32)?, p.len()))
            }
            _ => None,
        };
        let (policy_kl, reference_kl, num_kl) = match &kl {
            Some((p, r, m)) => (p.arg(), r.arg(), i32_arg(*m, "KL sequences")?),
            None => (KernelArg::NULL, KernelArg::NULL, KernelArg::I32(0)),
        };
        let grads = self.output(grads, Dtype::F32, false)?.arg();
        let metrics = self.output(metrics, Dtype::F32, false)?.arg();
        self.launch(
            "preference_loss_examples_f32",
            LaunchConfig::for_elements(n, PAIR_THREADS as u32),
            &[
                metrics,
                grads,
                policy.arg(),
                reference.arg(),
                inputs.unsafe_flags.arg(),
                examples.desirable.arg(),
                policy_kl,
                reference_kl,
                i32_arg(n, "examples")?,
                num_kl,
                KernelArg::I32(code),
                KernelArg::F32(objective.beta as f32),
                KernelArg::F32(objective.desirable_weight as f32),
                KernelArg::F32(objective.undesirable_weight as f32),
                KernelArg::F32(objective.safety_margin as f32),
                KernelArg::F32(inputs.grad_scale),
            ],
        )
    }
}
