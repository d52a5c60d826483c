//! The preference objectives on the CUDA backend (kernels/preference_loss.cu): one thread per pair,
//! all pairs in one launch, the objective passed as its code.

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf, CudaIds, Operand};
use crate::backend::cuda::kernels::constants::preference_loss::{
    OBJ_CDPO, OBJ_DPO, OBJ_HINGE, OBJ_IPO, OBJ_NPO, OBJ_ROBUST, OBJ_RPO, OBJ_SAFEDPO, OBJ_SIMPO, PAIR_METRICS,
    PAIR_THREADS,
};
use crate::backend::cuda::launch::i32_arg;
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, PreferenceLossOps};
use crate::loss::Objective;

// The kernel writes the metrics the loss module defines, in its order.
const _: () = assert!(PAIR_METRICS as usize == crate::loss::PAIR_METRICS);

/// The preference-loss kernel's objective code (the `OBJ_*` constants of kernels/preference_loss.cu)
/// and (β, second parameter).
fn objective_code(objective: &Objective) -> (i32, f32, f32) {
    match *objective {
        Objective::Dpo { beta } => (OBJ_DPO, beta as f32, 0.0),
        Objective::SafeDpo { beta, delta } => (OBJ_SAFEDPO, beta as f32, delta as f32),
        Objective::Ipo { beta } => (OBJ_IPO, beta as f32, 0.0),
        Objective::Robust { beta, eps } => (OBJ_ROBUST, beta as f32, eps as f32),
        Objective::Cdpo { beta, eps } => (OBJ_CDPO, beta as f32, eps as f32),
        Objective::Hinge { beta } => (OBJ_HINGE, beta as f32, 0.0),
        Objective::Rpo { beta, alpha } => (OBJ_RPO, beta as f32, alpha as f32),
        Objective::Simpo { beta, gamma } => (OBJ_SIMPO, beta as f32, gamma as f32),
        Objective::Npo { beta } => (OBJ_NPO, beta as f32, 0.0),
    }
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
        let (code, beta, param) = objective_code(objective);
        let policy = self.input(policy, Dtype::F32)?;
        let reference = if uses_reference { Some(self.input(reference, Dtype::F32)?) } else { None };
        let metrics = self.output(metrics, Dtype::F32, false)?.arg();
        let dpolicy = self.output(dpolicy, Dtype::F32, false)?.arg();
        self.launch(
            "preference_loss_f32",
            LaunchConfig::for_elements(pairs, PAIR_THREADS as u32),
            &[
                metrics,
                dpolicy,
                policy.arg(),
                reference.as_ref().map_or(KernelArg::NULL, Operand::arg),
                unsafe_flags.arg(),
                lengths.arg(),
                i32_arg(pairs, "pairs")?,
                KernelArg::I32(code),
                KernelArg::F32(beta),
                KernelArg::F32(param),
                KernelArg::F32(grad_scale),
            ],
        )
    }
}
