//! The preference objectives on the CUDA backend (kernels/preference_loss.cu): one thread per pair,
//! all pairs in one launch, the objective passed as its code; the objectives that sort across the
//! batch (AOT) take two launches, a rank pass and the scoring of the sorted positions.

use anyhow::{ensure, Result};

use crate::backend::cuda::backend::{CudaBackend, CudaBuf, CudaIds, Operand};
use crate::backend::cuda::kernels::constants::preference_loss::{
    OBJ_AOT, OBJ_AOT_UNPAIRED, OBJ_APO_DOWN, OBJ_APO_ZERO, OBJ_BCO_PAIR, OBJ_CDPO, OBJ_DISCOPOP, OBJ_DPO, OBJ_EXO_PAIR,
    OBJ_HINGE, OBJ_IPO, OBJ_NCA_PAIR, OBJ_NPO, OBJ_ROBUST, OBJ_RPO, OBJ_SIGMOID_NORM, OBJ_SIMPO, OBJ_SPPO_HARD,
    PAIR_METRICS, PAIR_THREADS, SORTED_MAX_PAIRS,
};
use crate::backend::cuda::launch::i32_arg;
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, PreferenceLossOps};
use crate::loss::Objective;

// The kernel writes the metrics the loss module defines, in its order.
const _: () = assert!(PAIR_METRICS as usize == crate::loss::PAIR_METRICS);

/// The preference-loss kernel's arguments for `objective`: its code (the `OBJ_*` constants of
/// kernels/preference_loss.cu), β, its second parameter (0 when it has none) and its safety margin Δ.
fn objective_code(objective: &Objective) -> (i32, f32, f32, f32) {
    let code = match *objective {
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
    };
    let param = match *objective {
        Objective::Robust { eps, .. }
        | Objective::Cdpo { eps, .. }
        | Objective::ExoPair { eps, .. }
        | Objective::Aot { eps, .. }
        | Objective::AotUnpaired { eps, .. } => eps,
        Objective::Rpo { alpha, .. } => alpha,
        Objective::Simpo { gamma, .. } => gamma,
        Objective::Discopop { tau, .. } => tau,
        _ => 0.0,
    };
    (code, objective.beta() as f32, param as f32, objective.safety_margin() as f32)
}

impl PreferenceLossOps for CudaBackend {
    fn preference_loss(
        &self,
        metrics: &mut CudaBuf,
        dpolicy: &mut CudaBuf,
        policy: &CudaBuf,
        reference: &CudaBuf,
        unsafe_flags: &CudaIds,
        lengths: &CudaIds,
        objective: &Objective,
        grad_scale: f32,
    ) -> Result<()> {
        let uses_reference = objective.uses_reference();
        let pairs = checks::preference_loss(
            metrics.len(),
            dpolicy.len(),
            policy.len(),
            reference.len(),
            &unsafe_flags.host,
            &lengths.host,
            uses_reference,
        )?;
        if pairs == 0 {
            return Ok(());
        }
        let (code, beta, param, safety_margin) = objective_code(objective);
        let policy = self.input(policy, Dtype::F32)?;
        let reference = if uses_reference { Some(self.input(reference, Dtype::F32)?) } else { None };
        let metrics = self.output(metrics, Dtype::F32, false)?.arg();
        let dpolicy = self.output(dpolicy, Dtype::F32, false)?.arg();
        let reference = reference.as_ref().map_or(KernelArg::NULL, Operand::arg);
        let (config, pairs_arg) = (LaunchConfig::for_elements(pairs, PAIR_THREADS as u32), i32_arg(pairs, "pairs")?);
        let (code, beta, param, safety_margin) =
            (KernelArg::I32(code), KernelArg::F32(beta), KernelArg::F32(param), KernelArg::F32(safety_margin));
        if objective.sorts_batch() {
            ensure!(
                pairs <= SORTED_MAX_PAIRS as usize,
                "preference_loss: {objective} sorts at most {SORTED_MAX_PAIRS} pairs"
            );
            self.launch(
                "preference_loss_rank_f32",
                config,
                &[metrics, policy.arg(), reference, unsafe_flags.arg(), pairs_arg, code, beta, safety_margin],
            )?;
            return self.launch(
                "preference_loss_sorted_f32",
                config,
                &[
                    metrics,
                    dpolicy,
                    policy.arg(),
                    reference,
                    unsafe_flags.arg(),
                    pairs_arg,
                    code,
                    beta,
                    param,
                    safety_margin,
                    KernelArg::F32(grad_scale),
                ],
            );
        }
        self.launch(
            "preference_loss_f32",
            config,
            &[
                metrics,
                dpolicy,
                policy.arg(),
                reference,
                unsafe_flags.arg(),
                lengths.arg(),
                pairs_arg,
                code,
                beta,
                param,
                safety_margin,
                KernelArg::F32(grad_scale),
            ],
        )
    }
}
