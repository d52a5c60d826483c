//! The parameters the objectives take: what a value may be ([`Bound`]), one parameter's name, default
//! and meaning ([`Param`]), and every parameter the table of objectives uses, with where its default
//! comes from.

use std::fmt;

/// The values a parameter admits (always finite).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// `x > 0`.
    Positive,
    /// `x ≥ 0`.
    NonNegative,
    /// `0 ≤ x < hi`.
    Below(f64),
    /// `0 ≤ x ≤ hi`.
    UpTo(f64),
    /// `0 < x ≤ hi`.
    PositiveUpTo(f64),
}

impl Bound {
    pub fn admits(self, x: f64) -> bool {
        x.is_finite()
            && match self {
                Bound::Positive => x > 0.0,
                Bound::NonNegative => x >= 0.0,
                Bound::Below(hi) => (0.0..hi).contains(&x),
                Bound::UpTo(hi) => (0.0..=hi).contains(&x),
                Bound::PositiveUpTo(hi) => x > 0.0 && x <= hi,
            }
    }
}

/// As in "must be …": `a finite number > 0`, `in [0, 0.5)`.
impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Positive => write!(f, "a finite number > 0"),
            Bound::NonNegative => write!(f, "a finite number >= 0"),
            Bound::Below(hi) => write!(f, "in [0, {hi})"),
            Bound::UpTo(hi) => write!(f, "in [0, {hi}]"),
            Bound::PositiveUpTo(hi) => write!(f, "in (0, {hi}]"),
        }
    }
}

/// One parameter of an objective: its name (the `[objective]` key), default, bound and meaning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Param {
    pub name: &'static str,
    pub default: f64,
    pub bound: Bound,
    /// What it is (`--help`).
    pub help: &'static str,
}

impl Param {
    /// Whether this is the objective's safety margin Δ (`delta` of `safedpo`, `safety_margin` of
    /// every other objective): see [`crate::loss`], "SafeDAA".
    pub fn is_safety_margin(&self) -> bool {
        self.name == DELTA.name || self.name == SAFETY_MARGIN.name
    }
}

/// β of the objectives on reference log-ratios: 0.1, DPO's and SafeDPO's papers' value and TRL's
/// `DPOConfig.beta` default.
pub(super) const BETA: Param =
    Param { name: "beta", default: 0.1, bound: Bound::Positive, help: "The scale β of the implicit rewards" };
/// SafeDPO's Δ = 10, the paper's value.
pub(super) const DELTA: Param =
    Param { name: "delta", default: 10.0, bound: Bound::NonNegative, help: "SafeDPO's safety margin Δ" };
/// The safety margin Δ of every objective but `safedpo` (whose Δ is `delta`): 0, so that each objective
/// is, by default, exactly its published form; Δ > 0 makes it its SafeDAA twin.
pub(super) const SAFETY_MARGIN: Param = Param {
    name: "safety_margin",
    default: 0.0,
    bound: Bound::NonNegative,
    help: "The safety margin Δ (SafeDAA): a safe response must beat an unsafe one by Δ more",
};
/// Robust DPO divides by `1 − 2ε`: ε must stay below ½.
pub(super) const ROBUST_EPS: Param =
    Param { name: "eps", default: 0.1, bound: Bound::Below(0.5), help: "The label-noise rate ε" };
/// cDPO has no division: at ε = ½ its loss `½(softplus(−βh) + softplus(βh))` is even in h, finite,
/// and only pulls h to 0 (labels that are pure noise teach nothing), so ½ is admitted; above ½ the
/// labels would be read reversed.
pub(super) const CDPO_EPS: Param =
    Param { name: "eps", default: 0.1, bound: Bound::UpTo(0.5), help: "The label-noise rate ε" };
/// AOT's label smoothing: TRL's `DPOConfig.label_smoothing` default, 0 (no smoothing); bounded as cDPO's.
pub(super) const AOT_EPS: Param =
    Param { name: "eps", default: 0.0, bound: Bound::UpTo(0.5), help: "The label-noise rate ε" };
/// EXO's ε = 1e-3, the EXO paper's recommendation (quoted in TRL's `DPOConfig.label_smoothing` help).
/// TRL's own default, 0, is refused by TRL for `exo_pair` (the loss has `log ε`), so ε > 0 here too;
/// at ε = ½ the target distribution is uniform and the loss, like cDPO's, only pulls h to 0.
pub(super) const EXO_EPS: Param =
    Param { name: "eps", default: 1e-3, bound: Bound::PositiveUpTo(0.5), help: "EXO's label smoothing ε" };
/// DiscoPOP's τ = 0.05: TRL's `DPOConfig.discopop_tau` default, the paper's value. Bounded by 1:
/// above it the exponential component `e^{−z}σ(z/τ)` grows like `e^{|z|(1 − 1/τ)}` for a losing pair
/// (exponentially, not linearly, in the margin) and overflows at large margins.
pub(super) const DISCOPOP_TAU: Param = Param {
    name: "tau",
    default: 0.05,
    bound: Bound::PositiveUpTo(1.0),
    help: "DiscoPOP's temperature τ of the logistic/exponential mix",
};
/// RPO's α = 1, the paper's value (TRL's `rpo_alpha` has no default: RPO is off unless set).
pub(super) const ALPHA: Param =
    Param { name: "alpha", default: 1.0, bound: Bound::NonNegative, help: "RPO's weight α of the chosen NLL" };
/// SimPO's β = 2.0: the SimPO authors' `SimPOConfig.beta` default (princeton-nlp/SimPO,
/// `scripts/simpo_config.py`; the paper tunes β in [2, 2.5]). TRL's `CPOConfig.beta` (0.1) is not
/// used: it is shared with CPO's other loss types and too small for length-normalised rewards.
pub(super) const SIMPO_BETA: Param =
    Param { name: "beta", default: 2.0, bound: Bound::Positive, help: "The scale β of the implicit rewards" };
/// ORPO's λ, here β (TRL's `ORPOConfig.beta`, 0.1: the weight of the odds-ratio term against the NLL;
/// the ORPO paper's λ, 0.1 in its experiments).
pub(super) const ORPO_BETA: Param = Param {
    name: "beta",
    default: 0.1,
    bound: Bound::Positive,
    help: "The scale β of the implicit rewards (ORPO: the weight λ of the odds-ratio term)",
};
/// CPO's weight of the chosen response's NLL: TRL's `CPOConfig.cpo_alpha` default, 1 (the CPO paper's
/// behaviour-cloning regulariser; 0 drops it, which makes `cpo_simpo` SimPO).
pub(super) const CPO_ALPHA: Param = Param {
    name: "cpo_alpha",
    default: 1.0,
    bound: Bound::NonNegative,
    help: "CPO's weight of the chosen response's NLL (TRL `cpo_alpha`)",
};
/// CPO's label smoothing (TRL's `CPOConfig.label_smoothing`, default 0), bounded as cDPO's.
pub(super) const CPO_EPS: Param =
    Param { name: "eps", default: 0.0, bound: Bound::UpTo(0.5), help: "The label-noise rate ε" };
/// SimPO's γ = 0.5: TRL's `CPOConfig.simpo_gamma` default (trl/trainer/cpo_config.py), also the
/// SimPO authors' `SimPOConfig` (β = 2 with `gamma_beta_ratio` = 0.25). A margin, so ≥ 0.
pub(super) const SIMPO_GAMMA: Param =
    Param { name: "gamma", default: 0.5, bound: Bound::NonNegative, help: "SimPO's target reward margin γ" };

/// TRL's spellings of parameters that are named otherwise here, accepted wherever a parameter is
/// named (`[objective]`, `--objective.*`, `name:key=value`): `label_smoothing` (read by TRL's
/// `robust`, `exo_pair`, `aot`, `aot_unpaired`, CPO's `sigmoid` and `simpo`, TRL < 1.0's `sigmoid`,
/// i.e. `cdpo`) is ε, `discopop_tau` τ, `simpo_gamma` γ.
pub const PARAM_ALIASES: [(&str, &str); 3] =
    [("label_smoothing", "eps"), ("discopop_tau", "tau"), ("simpo_gamma", "gamma")];

/// The parameter name `key` means: itself, or the name TRL's spelling stands for.
pub fn canonical_param(key: &str) -> &str {
    PARAM_ALIASES.iter().find(|(alias, _)| *alias == key).map_or(key, |(_, name)| name)
}

/// KTO's weight of the desirable examples' losses: TRL's `KTOConfig.desirable_weight` default, 1
/// (the KTO paper, eq. 8, sets the two weights so that `λ_D n_D / (λ_U n_U)` is in [1, 4/3]).
pub(super) const DESIRABLE_WEIGHT: Param = Param {
    name: "desirable_weight",
    default: 1.0,
    bound: Bound::NonNegative,
    help: "KTO's weight λ_D of the desirable examples' losses (TRL `desirable_weight`)",
};
/// KTO's weight of the undesirable examples' losses: TRL's `KTOConfig.undesirable_weight` default, 1.
pub(super) const UNDESIRABLE_WEIGHT: Param = Param {
    name: "undesirable_weight",
    default: 1.0,
    bound: Bound::NonNegative,
    help: "KTO's weight λ_U of the undesirable examples' losses (TRL `undesirable_weight`)",
};
