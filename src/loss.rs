//! The preference objectives: the math, in one place. This is the specification every backend's
//! preference-loss kernel is held to.
//!
//! Notation, per pair: `πc`, `πr` the policy's sequence log-probs of the chosen and rejected
//! responses, `rc`, `rr` the reference's; `h = (πc − rc) − (πr − rr)`; `u_c`, `u_r` the safety flags
//! (1 = unsafe); `σ` the logistic function; `|yc|`, `|yr|` the response lengths in tokens. Implicit
//! rewards are `β(πc − rc)` and `β(πr − rr)` (SimPO: `β·πc/|yc|`, `β·πr/|yr|`).
//!
//! All math is done in f64 and is stable for any margin: `log σ(x) = −softplus(−x)` with
//! `softplus(z) = max(z, 0) + log1p(exp(−|z|))`, which never overflows, and `σ` is evaluated on the
//! side where `exp` cannot overflow. A response length of 0 (possible only for an empty, fully
//! truncated response) is treated as 1 by the length-normalised objectives (SimPO, RPO), so that
//! they stay finite; the log-prob of such a response is 0 anyway.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// A preference objective and its parameters.
///
/// The names (`Objective::NAMES`, also the serde tag and the CLI spelling) are the lowercase
/// variant names. Where Hugging Face TRL implements the same loss, its `DPOConfig.loss_type` is
/// given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Objective {
    /// DPO (Rafailov et al. 2023, arXiv 2305.18290; TRL `sigmoid`): `−log σ(β h)`.
    Dpo { beta: f64 },
    /// SafeDPO (arXiv 2505.20065): `−log σ(β h − (u_r − u_c) Δ)`, on pairs already through T(D).
    /// After T(D) a pair has `u_r − u_c ∈ {0, 1}`: when only the rejected response is unsafe the
    /// policy must win by the extra margin Δ; with equal flags this is DPO.
    SafeDpo { beta: f64, delta: f64 },
    /// IPO (Azar et al. 2023, arXiv 2310.12036; TRL `ipo`): `(h − 1/(2β))²`. Here on summed
    /// sequence log-probs as in the paper (TRL averages them over tokens).
    Ipo { beta: f64 },
    /// Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409; TRL `robust`), label-noise rate
    /// `ε ∈ [0, ½)`: `[−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)`, an unbiased estimate of the
    /// clean-label DPO loss.
    Robust { beta: f64, eps: f64 },
    /// Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL `sigmoid` with
    /// `label_smoothing = ε`), `ε ∈ [0, ½]`: `−(1−ε) log σ(βh) − ε log σ(−βh)`.
    Cdpo { beta: f64, eps: f64 },
    /// Hinge / SLiC (Zhao et al. 2023, arXiv 2305.10425; TRL `hinge`): `max(0, 1 − β h)`. At the
    /// kink `βh = 1` the subgradient 0 is used.
    Hinge { beta: f64 },
    /// RPO (Pang et al. 2024, arXiv 2404.19733; TRL `rpo_alpha`): DPO + `α · (−πc / |yc|)`, the
    /// chosen response's negative log-likelihood averaged over its tokens.
    Rpo { beta: f64, alpha: f64 },
    /// SimPO (Meng et al. 2024, arXiv 2405.14734; TRL CPO `simpo`), reference-free:
    /// `−log σ(β (πc/|yc| − πr/|yr|) − γ)`. Rewards are `β·π/|y|`.
    Simpo { beta: f64, gamma: f64 },
    /// NPO (Zhang et al. 2024, arXiv 2404.05868) on the rejected response only:
    /// `−(2/β) log σ(−β(πr − rr)) = (2/β) log(1 + (πθ(yr)/πref(yr))^β)`. The chosen response gets
    /// no gradient.
    Npo { beta: f64 },
}

/// Number of float outputs per pair written by a preference loss into its `metrics` buffer, in this
/// order: loss, chosen reward, rejected reward, margin (chosen − rejected reward), accuracy (1 when
/// the chosen reward exceeds the rejected one, else 0).
pub const PAIR_METRICS: usize = 5;

/// Default parameters: β = 0.1, Δ = 10, ε = 0.1, α = 1.0; SimPO β = 2.0, γ = 1.0.
pub const DEFAULT_BETA: f64 = 0.1;
pub const DEFAULT_DELTA: f64 = 10.0;
pub const DEFAULT_EPS: f64 = 0.1;
pub const DEFAULT_ALPHA: f64 = 1.0;
pub const DEFAULT_SIMPO_BETA: f64 = 2.0;
pub const DEFAULT_SIMPO_GAMMA: f64 = 1.0;

impl Objective {
    /// Every objective's name, as `default_for`, `FromStr` and serde spell it.
    pub const NAMES: [&'static str; 9] = ["dpo", "safedpo", "ipo", "robust", "cdpo", "hinge", "rpo", "simpo", "npo"];

    /// The objective called `name` (case-insensitive) with its default parameters.
    pub fn default_for(name: &str) -> Result<Objective> {
        let (beta, delta, eps, alpha) = (DEFAULT_BETA, DEFAULT_DELTA, DEFAULT_EPS, DEFAULT_ALPHA);
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "dpo" => Objective::Dpo { beta },
            "safedpo" => Objective::SafeDpo { beta, delta },
            "ipo" => Objective::Ipo { beta },
            "robust" => Objective::Robust { beta, eps },
            "cdpo" => Objective::Cdpo { beta, eps },
            "hinge" => Objective::Hinge { beta },
            "rpo" => Objective::Rpo { beta, alpha },
            "simpo" => Objective::Simpo { beta: DEFAULT_SIMPO_BETA, gamma: DEFAULT_SIMPO_GAMMA },
            "npo" => Objective::Npo { beta },
            other => bail!("unknown objective {other:?}; expected one of: {}", Objective::NAMES.join(", ")),
        })
    }

    /// The objective's name (one of `NAMES`).
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Dpo { .. } => "dpo",
            Objective::SafeDpo { .. } => "safedpo",
            Objective::Ipo { .. } => "ipo",
            Objective::Robust { .. } => "robust",
            Objective::Cdpo { .. } => "cdpo",
            Objective::Hinge { .. } => "hinge",
            Objective::Rpo { .. } => "rpo",
            Objective::Simpo { .. } => "simpo",
            Objective::Npo { .. } => "npo",
        }
    }

    /// Whether the objective needs reference log-probs.
    pub fn uses_reference(&self) -> bool {
        !matches!(self, Objective::Simpo { .. })
    }

    /// β, the inverse temperature every objective has.
    pub fn beta(&self) -> f64 {
        match *self {
            Objective::Dpo { beta }
            | Objective::SafeDpo { beta, .. }
            | Objective::Ipo { beta }
            | Objective::Robust { beta, .. }
            | Objective::Cdpo { beta, .. }
            | Objective::Hinge { beta }
            | Objective::Rpo { beta, .. }
            | Objective::Simpo { beta, .. }
            | Objective::Npo { beta } => beta,
        }
    }

    /// The parameters as (name, value), in a fixed order (β first).
    pub fn params(&self) -> Vec<(&'static str, f64)> {
        match *self {
            Objective::Dpo { beta } | Objective::Ipo { beta } | Objective::Hinge { beta } | Objective::Npo { beta } => {
                vec![("beta", beta)]
            }
            Objective::SafeDpo { beta, delta } => vec![("beta", beta), ("delta", delta)],
            Objective::Robust { beta, eps } | Objective::Cdpo { beta, eps } => vec![("beta", beta), ("eps", eps)],
            Objective::Rpo { beta, alpha } => vec![("beta", beta), ("alpha", alpha)],
            Objective::Simpo { beta, gamma } => vec![("beta", beta), ("gamma", gamma)],
        }
    }

    /// Sets parameter `key` (as named by `params`) to `value`; errors name the objective and list
    /// its parameters. Does not validate the value (see `validate`).
    pub fn set_param(&mut self, key: &str, value: f64) -> Result<()> {
        let name = self.name();
        let slot = match (self, key) {
            (
                Objective::Dpo { beta }
                | Objective::SafeDpo { beta, .. }
                | Objective::Ipo { beta }
                | Objective::Robust { beta, .. }
                | Objective::Cdpo { beta, .. }
                | Objective::Hinge { beta }
                | Objective::Rpo { beta, .. }
                | Objective::Simpo { beta, .. }
                | Objective::Npo { beta },
                "beta",
            ) => beta,
            (Objective::SafeDpo { delta, .. }, "delta") => delta,
            (Objective::Robust { eps, .. } | Objective::Cdpo { eps, .. }, "eps") => eps,
            (Objective::Rpo { alpha, .. }, "alpha") => alpha,
            (Objective::Simpo { gamma, .. }, "gamma") => gamma,
            (this, _) => {
                let known: Vec<&str> = this.params().iter().map(|(k, _)| *k).collect();
                bail!("objective {name} has no parameter {key:?}; its parameters are: {}", known.join(", "))
            }
        };
        *slot = value;
        Ok(())
    }

    /// Checks the parameters: all finite, β > 0, Δ ≥ 0, ε in [0, ½) for robust and [0, ½] for
    /// cdpo, α ≥ 0.
    pub fn validate(&self) -> Result<()> {
        let name = self.name();
        for (key, value) in self.params() {
            ensure!(value.is_finite(), "objective {name}: {key} = {value} is not finite");
        }
        ensure!(self.beta() > 0.0, "objective {name}: beta = {} must be > 0", self.beta());
        match *self {
            Objective::SafeDpo { delta, .. } => {
                ensure!(delta >= 0.0, "objective safedpo: delta = {delta} must be >= 0")
            }
            Objective::Robust { eps, .. } => {
                ensure!((0.0..0.5).contains(&eps), "objective robust: eps = {eps} must be in [0, 0.5)")
            }
            Objective::Cdpo { eps, .. } => {
                ensure!((0.0..=0.5).contains(&eps), "objective cdpo: eps = {eps} must be in [0, 0.5]")
            }
            Objective::Rpo { alpha, .. } => ensure!(alpha >= 0.0, "objective rpo: alpha = {alpha} must be >= 0"),
            _ => {}
        }
        Ok(())
    }
}

/// Parses `name` or `name:key=value,key=value` (e.g. `safedpo:beta=0.2,delta=5`); parameters not
/// given keep their defaults. The result is validated.
impl FromStr for Objective {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (name, overrides) = match s.split_once(':') {
            Some((name, rest)) => (name, Some(rest)),
            None => (s, None),
        };
        let mut objective = Objective::default_for(name)?;
        for item in overrides.into_iter().flat_map(|rest| rest.split(',')).filter(|item| !item.trim().is_empty()) {
            let (key, value) =
                item.split_once('=').with_context(|| format!("objective {s:?}: expected key=value, got {item:?}"))?;
            let value: f64 = value
                .trim()
                .parse()
                .with_context(|| format!("objective {s:?}: {} = {value:?} is not a number", key.trim()))?;
            objective.set_param(key.trim(), value)?;
        }
        objective.validate()?;
        Ok(objective)
    }
}

/// Writes the `FromStr` syntax with every parameter, e.g. `safedpo:beta=0.1,delta=10`.
impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        for (i, (key, value)) in self.params().into_iter().enumerate() {
            write!(f, "{}{key}={value}", if i == 0 { ':' } else { ',' })?;
        }
        Ok(())
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

impl PairOutput {
    /// The metrics in the order of `PAIR_METRICS`: loss, chosen reward, rejected
    /// reward, margin, accuracy.
    pub fn metrics_row(&self) -> [f64; PAIR_METRICS] {
        [self.loss, self.reward_chosen, self.reward_rejected, self.margin, self.accuracy]
    }
}

/// `log(1 + eˣ)` without overflow or cancellation, for any finite x.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `log σ(x) = −softplus(−x)`, finite for any finite x (≈ x for x ≪ 0, ≈ −e⁻ˣ for x ≫ 0).
pub fn log_sigmoid(x: f64) -> f64 {
    -softplus(-x)
}

/// `σ(x) = 1 / (1 + e⁻ˣ)`, evaluated so that `exp` never overflows.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// A response length as the divisor of a length-normalised objective: 0 counts as 1.
fn length_divisor(len: u32) -> f64 {
    f64::from(len.max(1))
}

/// The loss of one pair under `objective`. The CPU twin of the preference-loss kernel.
///
/// Most objectives are a function `f(h)` of the log-ratio difference `h`; then
/// `dL/dπc = f'(h)` and `dL/dπr = −f'(h)`. RPO, SimPO and NPO are spelled out below.
pub fn pair_loss(objective: &Objective, p: &PairInput) -> PairOutput {
    let chosen_logratio = p.policy_chosen - p.ref_chosen;
    let rejected_logratio = p.policy_rejected - p.ref_rejected;
    let h = chosen_logratio - rejected_logratio;
    let beta = objective.beta();

    // (loss, dL/dπc, dL/dπr)
    let (loss, d_chosen, d_rejected) = match *objective {
        Objective::Dpo { beta } => {
            let (loss, dh) = dpo_loss(beta * h, beta);
            (loss, dh, -dh)
        }
        Objective::SafeDpo { beta, delta } => {
            let safety_gap = f64::from(u8::from(p.rejected_unsafe)) - f64::from(u8::from(p.chosen_unsafe));
            let (loss, dh) = dpo_loss(beta * h - safety_gap * delta, beta);
            (loss, dh, -dh)
        }
        Objective::Ipo { beta } => {
            let residual = h - 1.0 / (2.0 * beta);
            let dh = 2.0 * residual;
            (residual * residual, dh, -dh)
        }
        Objective::Robust { beta, eps } => {
            // −(1−ε) log σ(z) + ε log σ(−z) = (1−ε) softplus(−z) − ε softplus(z); d/dz:
            // −(1−ε) σ(−z) − ε σ(z).
            let z = beta * h;
            let norm = 1.0 - 2.0 * eps;
            let loss = ((1.0 - eps) * softplus(-z) - eps * softplus(z)) / norm;
            let dh = -beta * ((1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)) / norm;
            (loss, dh, -dh)
        }
        Objective::Cdpo { beta, eps } => {
            // (1−ε) softplus(−z) + ε softplus(z); d/dz: −(1−ε) σ(−z) + ε σ(z).
            let z = beta * h;
            let loss = (1.0 - eps) * softplus(-z) + eps * softplus(z);
            let dh = beta * (-(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z));
            (loss, dh, -dh)
        }
        Objective::Hinge { beta } => {
            let slack = 1.0 - beta * h;
            if slack > 0.0 {
                (slack, -beta, beta)
            } else {
                (0.0, 0.0, 0.0)
            }
        }
        Objective::Rpo { beta, alpha } => {
            let (dpo, dh) = dpo_loss(beta * h, beta);
            let chosen_len = length_divisor(p.chosen_len);
            let nll = -p.policy_chosen / chosen_len;
            (dpo + alpha * nll, dh - alpha / chosen_len, -dh)
        }
        Objective::Simpo { beta, gamma } => {
            let (chosen_len, rejected_len) = (length_divisor(p.chosen_len), length_divisor(p.rejected_len));
            let z = beta * (p.policy_chosen / chosen_len - p.policy_rejected / rejected_len) - gamma;
            let loss = softplus(-z);
            let dz = -sigmoid(-z);
            (loss, dz * beta / chosen_len, -dz * beta / rejected_len)
        }
        Objective::Npo { beta } => {
            // (2/β) softplus(β·x), x = πr − rr; d/dx = 2 σ(β·x).
            let z = beta * rejected_logratio;
            ((2.0 / beta) * softplus(z), 0.0, 2.0 * sigmoid(z))
        }
    };

    let (reward_chosen, reward_rejected) = match objective {
        Objective::Simpo { .. } => (
            beta * p.policy_chosen / length_divisor(p.chosen_len),
            beta * p.policy_rejected / length_divisor(p.rejected_len),
        ),
        _ => (beta * chosen_logratio, beta * rejected_logratio),
    };
    PairOutput {
        loss,
        d_policy_chosen: d_chosen,
        d_policy_rejected: d_rejected,
        reward_chosen,
        reward_rejected,
        margin: reward_chosen - reward_rejected,
        accuracy: if reward_chosen > reward_rejected { 1.0 } else { 0.0 },
    }
}

/// `−log σ(z)` and its derivative with respect to `h`, where `z = β h + const`:
/// `(softplus(−z), −β σ(−z))`.
fn dpo_loss(z: f64, beta: f64) -> (f64, f64) {
    (softplus(-z), -beta * sigmoid(-z))
}
