//! The objectives on unpaired examples: KTO and TRL's unpaired APO-zero ([`Kto`], the value of
//! [`Objective::Kto`]). Each example is a prompt, one completion and a label (desirable or not), as
//! TRL's `KTOTrainer` reads them; its loss is specified by [`crate::loss::unpaired_loss`], not by the
//! pairwise table (`Objective::ALL` lists the objectives on pairs; [`UNPAIRED`] these), and runs in
//! the preference-loss op on examples (`crate::backend::PreferenceLossInputs::examples`; the CUDA
//! kernel `preference_loss_examples_f32`, in f32, forms the KL estimate on the device).
//!
//! **Where it differs from TRL.** A training step's loss is the mean over all its examples, its
//! gradient that of this mean; TRL's is the mean of each micro-batch's own mean over its
//! `gradient_accumulation_steps` micro-batches. The two are equal when the micro-batches hold as
//! many examples each (a token budget does not promise it). Each micro-batch has its own KL
//! estimate, as in TRL.
//!
//! TRL references are to TRL v1.16.0, `trl/trainer/kto_trainer.py`, `KTOTrainer._compute_loss`, and
//! `trl/trainer/kto_config.py` for the defaults.
//!
//! Notation: `x = π − r` an example's log-ratio (policy and reference sequence log-probs of its
//! completion), `z_KL` the batch's KL estimate (see [`crate::loss::kl_estimate`]), `λ_D`, `λ_U` the
//! desirable and undesirable weights, `u` the completion's safety flag (1 = unsafe), Δ the safety
//! margin.
//!
//! **Safety twin.** There is no pair, so SafeDPO's T(D) has nothing to swap: its unpaired
//! counterpart is a data rule (`data.selection = "safedpo"`: an unsafe completion labelled
//! desirable is read as undesirable, see `crate::data::UnpairedExample`). The safety margin Δ
//! (`safety_margin`, default 0) is SafeDAA's shift of an unsafe response's reward, as the pairwise
//! objectives that score each response alone take it (`npo`, `apo_zero`, `bco_pair`: the rejected
//! reward `β x_r + sΔ`): inside the loss an unsafe completion's reward is `β x + uΔ`, so that an
//! undesirable unsafe completion is pushed down harder, and a desirable one (only with
//! `data.selection = "better"`) is pushed up less. With Δ = 0 each objective is exactly TRL's.

use super::{Objective, ObjectiveSpec};
use crate::loss::params::{BETA, DESIRABLE_WEIGHT, SAFETY_MARGIN, UNDESIRABLE_WEIGHT};

/// TRL's `KTOConfig.loss_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KtoLoss {
    /// KTO (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 7; TRL `kto`): a desirable example's loss
    /// is `λ_D (1 − σ(β x + uΔ − β z_KL))`, an undesirable one's `λ_U (1 − σ(β z_KL − β x − uΔ))`
    /// (computed as `σ(−·)`), with `z_KL` the batch's KL estimate, detached and clamped at 0.
    Kto,
    /// APO-zero, unpaired (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7 per example; TRL
    /// `apo_zero_unpaired`): a desirable example's loss is `λ_D (1 − σ(β x + uΔ))`, an undesirable
    /// one's `λ_U σ(β x + uΔ)`. No KL term (TRL builds no KL sequences for it).
    ApoZeroUnpaired,
}

/// An objective on unpaired examples and its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Kto {
    pub loss: KtoLoss,
    /// β, 0.1 (TRL's `KTOConfig.beta`).
    pub beta: f64,
    /// λ_D, 1 (TRL's default).
    pub desirable_weight: f64,
    /// λ_U, 1 (TRL's default).
    pub undesirable_weight: f64,
    /// Δ, 0: see the module docs.
    pub safety_margin: f64,
}

/// The objectives on unpaired examples, as [`Objective::ALL`] lists those on pairs: name, aliases
/// (none) and parameters, in the order of [`Kto::values`].
pub const UNPAIRED: [ObjectiveSpec; 2] = [
    ObjectiveSpec { name: "kto", aliases: &[], params: &[BETA, DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT, SAFETY_MARGIN] },
    ObjectiveSpec {
        name: "apo_zero_unpaired",
        aliases: &[],
        params: &[BETA, DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT, SAFETY_MARGIN],
    },
];

impl Kto {
    /// `kto` or `apo_zero_unpaired` (TRL's `loss_type`).
    pub fn name(&self) -> &'static str {
        self.spec().name
    }

    pub fn spec(&self) -> &'static ObjectiveSpec {
        match self.loss {
            KtoLoss::Kto => &UNPAIRED[0],
            KtoLoss::ApoZeroUnpaired => &UNPAIRED[1],
        }
    }

    /// The parameters in the order of the spec's.
    pub fn values(&self) -> Vec<f64> {
        vec![self.beta, self.desirable_weight, self.undesirable_weight, self.safety_margin]
    }

    /// The objective called `name` with `values` in the order of its spec's parameters.
    pub(super) fn from_values(name: &str, values: &[f64]) -> Option<Kto> {
        let loss = match name {
            "kto" => KtoLoss::Kto,
            "apo_zero_unpaired" => KtoLoss::ApoZeroUnpaired,
            _ => return None,
        };
        let &[beta, desirable_weight, undesirable_weight, safety_margin] = values else { return None };
        Some(Kto { loss, beta, desirable_weight, undesirable_weight, safety_margin })
    }

    /// Whether the loss reads the batch's KL estimate, so that each batch needs its KL sequences
    /// (TRL's `calculate_KL`: every loss type but `apo_zero_unpaired`).
    pub fn estimates_kl(&self) -> bool {
        self.loss == KtoLoss::Kto
    }

    /// The weight of an example's loss: λ_D or λ_U.
    pub fn weight(&self, desirable: bool) -> f64 {
        if desirable {
            self.desirable_weight
        } else {
            self.undesirable_weight
        }
    }
}

impl From<Kto> for Objective {
    fn from(kto: Kto) -> Objective {
        Objective::Kto(kto)
    }
}
