//! The preference objectives: the math, in one place. This is the specification every backend's
//! preference-loss kernel is held to.
//!
//! Notation, per pair: `πc`, `πr` the policy's sequence log-probs of the chosen and rejected
//! responses, `rc`, `rr` the reference's; `h = (πc − rc) − (πr − rr)`; `u_c`, `u_r` the safety flags
//! (1 = unsafe); `σ` the logistic function. Implicit rewards are `β(πc − rc)` and `β(πr − rr)`.
//! All math is done in f64 and is stable for any margin (`log σ(x)` via softplus).

use serde::{Deserialize, Serialize};

/// A preference objective and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Objective {
    /// DPO (Rafailov et al. 2023): `−log σ(β h)`.
    Dpo { beta: f64 },
    /// SafeDPO (arXiv 2505.20065): `−log σ(β h − (u_r − u_c) Δ)`, on pairs already through T(D).
    SafeDpo { beta: f64, delta: f64 },
    /// IPO (Azar et al. 2023): `(h − 1/(2β))²`.
    Ipo { beta: f64 },
    /// Robust DPO (Chowdhury et al. 2024), label-noise rate ε.
    Robust { beta: f64, eps: f64 },
    /// Conservative DPO (label smoothing ε).
    Cdpo { beta: f64, eps: f64 },
    /// Hinge / SLiC: `max(0, 1 − β h)`.
    Hinge { beta: f64 },
    /// RPO (Pang et al. 2024): DPO + α · NLL of the chosen response, length-normalised.
    Rpo { beta: f64, alpha: f64 },
    /// SimPO (Meng et al. 2024), reference-free: `−log σ(β (πc/|yc| − πr/|yr|) − γ)`.
    Simpo { beta: f64, gamma: f64 },
    /// NPO (Zhang et al. 2024) on the rejected response: `(2/β) log(1 + (πθ(yr)/πref(yr))^β)`.
    Npo { beta: f64 },
}

impl Objective {
    /// Whether the objective needs reference log-probs.
    pub fn uses_reference(&self) -> bool {
        !matches!(self, Objective::Simpo { .. })
    }
}

/// One pair's inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairInput {
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub chosen_unsafe: bool,
    pub rejected_unsafe: bool,
    /// Number of response tokens (those with a target) of each side.
    pub chosen_len: u32,
    pub rejected_len: u32,
}

/// One pair's loss, gradients and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairOutput {
    pub loss: f64,
    /// dL/d(policy chosen log-prob)
    pub d_policy_chosen: f64,
    /// dL/d(policy rejected log-prob)
    pub d_policy_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// `reward_chosen − reward_rejected`
    pub margin: f64,
    /// 1 when `reward_chosen > reward_rejected`, else 0.
    pub accuracy: f64,
}

/// The loss of one pair under `objective`. The CPU twin of the preference-loss kernel.
pub fn pair_loss(objective: &Objective, p: &PairInput) -> PairOutput {
    let _ = (objective, p);
    todo!("loss helper")
}
