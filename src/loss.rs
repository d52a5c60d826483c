//! The preference objectives: the math, in one place. This is the specification every backend's
//! preference-loss kernel is held to, and the one definition of every objective's name, parameters,
//! defaults and bounds ([`Objective::ALL`]): the run configuration's `[objective]` table, the command
//! line (`--objective.name`, `--objective.beta`, …) and `safedpo bench` all take them from here.
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

use anyhow::{bail, Context, Result};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

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
}

impl Bound {
    pub fn admits(self, x: f64) -> bool {
        x.is_finite()
            && match self {
                Bound::Positive => x > 0.0,
                Bound::NonNegative => x >= 0.0,
                Bound::Below(hi) => (0.0..hi).contains(&x),
                Bound::UpTo(hi) => (0.0..=hi).contains(&x),
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

/// β of the objectives on reference log-ratios: 0.1, DPO's and SafeDPO's papers' value and TRL's
/// `DPOConfig.beta` default.
const BETA: Param =
    Param { name: "beta", default: 0.1, bound: Bound::Positive, help: "The scale β of the implicit rewards" };
/// SafeDPO's Δ = 10, the paper's value.
const DELTA: Param =
    Param { name: "delta", default: 10.0, bound: Bound::NonNegative, help: "SafeDPO's safety margin Δ" };
/// Robust DPO divides by `1 − 2ε`: ε must stay below ½.
const ROBUST_EPS: Param =
    Param { name: "eps", default: 0.1, bound: Bound::Below(0.5), help: "The label-noise rate ε" };
/// cDPO has no division: at ε = ½ its loss `½(softplus(−βh) + softplus(βh))` is even in h, finite,
/// and only pulls h to 0 (labels that are pure noise teach nothing), so ½ is admitted; above ½ the
/// labels would be read reversed.
const CDPO_EPS: Param = Param { name: "eps", default: 0.1, bound: Bound::UpTo(0.5), help: "The label-noise rate ε" };
/// RPO's α = 1, the paper's value (TRL's `rpo_alpha` has no default: RPO is off unless set).
const ALPHA: Param =
    Param { name: "alpha", default: 1.0, bound: Bound::NonNegative, help: "RPO's weight α of the chosen NLL" };
/// SimPO's β = 2.0: the SimPO authors' `SimPOConfig.beta` default (princeton-nlp/SimPO,
/// `scripts/simpo_config.py`; the paper tunes β in [2, 2.5]). TRL's `CPOConfig.beta` (0.1) is not
/// used: it is shared with CPO's other loss types and too small for length-normalised rewards.
const SIMPO_BETA: Param =
    Param { name: "beta", default: 2.0, bound: Bound::Positive, help: "The scale β of the implicit rewards" };
/// SimPO's γ = 0.5: TRL's `CPOConfig.simpo_gamma` default (trl/trainer/cpo_config.py), also the
/// SimPO authors' `SimPOConfig` (β = 2 with `gamma_beta_ratio` = 0.25). A margin, so ≥ 0.
const SIMPO_GAMMA: Param =
    Param { name: "gamma", default: 0.5, bound: Bound::NonNegative, help: "SimPO's target reward margin γ" };

/// One objective: its name, the other names it is known by, and its parameters.
#[derive(Clone, Copy, Debug)]
pub struct ObjectiveSpec {
    /// The name written out (serde's tag, `Objective::name`, the `--help` listing).
    pub name: &'static str,
    /// Also accepted on input: TRL's `loss_type` where it names the same loss.
    pub aliases: &'static [&'static str],
    /// In the order of the variant's fields, β first.
    pub params: &'static [Param],
}

impl ObjectiveSpec {
    pub fn param(&self, key: &str) -> Option<&'static Param> {
        self.params.iter().find(|p| p.name == key)
    }

    /// The objective with its default parameters.
    pub fn defaults(&self) -> Objective {
        self.build(&self.params.iter().map(|p| p.default).collect::<Vec<_>>())
    }

    /// The objective with `values` in the order of `params`.
    pub fn build(&self, values: &[f64]) -> Objective {
        assert_eq!(values.len(), self.params.len(), "objective {}: one value per parameter", self.name);
        Objective::from_values(self.name, values)
    }

    fn param_list(&self) -> String {
        self.params.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
    }

    /// The error for a key of an `[objective]` table this objective does not take.
    pub fn not_a_parameter(&self, key: &str) -> String {
        format!("`{key}` is not a parameter of objective `{}` (its parameters: {})", self.name, self.param_list())
    }
}

/// Defines [`Objective`] and its table from one list: variant, name, aliases, parameters.
macro_rules! objectives {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $name:literal $(or $alias:literal)* { $($field:ident: $param:expr),+ $(,)? }
    ),+ $(,)?) => {
        /// A preference objective and its parameters.
        ///
        /// The names are the lowercase variant names (`Objective::NAMES`, serde's `name` tag, the CLI
        /// spelling). Where Hugging Face TRL implements the same loss, its `DPOConfig.loss_type` is
        /// given; TRL's `sigmoid` is accepted as another name for `dpo`.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Objective {
            $( $(#[doc = $doc])* $variant { $($field: f64),+ }, )+
        }

        const OBJECTIVE_COUNT: usize = [$($name),+].len();

        impl Objective {
            /// Every objective, in the order of `NAMES`.
            pub const ALL: [ObjectiveSpec; OBJECTIVE_COUNT] = [
                $( ObjectiveSpec { name: $name, aliases: &[$($alias),*], params: &[$($param),+] }, )+
            ];

            /// Every objective's name, as `default_for`, `FromStr` and serde spell it.
            pub const NAMES: [&'static str; OBJECTIVE_COUNT] = [$($name),+];

            /// The objective's name (one of `NAMES`).
            pub fn name(&self) -> &'static str {
                match self {
                    $( Objective::$variant { .. } => $name, )+
                }
            }

            /// β, the inverse temperature every objective has.
            pub fn beta(&self) -> f64 {
                match *self {
                    $( Objective::$variant { beta, .. } => beta, )+
                }
            }

            /// The parameter values in the order of `spec().params`.
            pub fn values(&self) -> Vec<f64> {
                match *self {
                    $( Objective::$variant { $($field),+ } => vec![$($field),+], )+
                }
            }

            fn from_values(name: &str, values: &[f64]) -> Objective {
                match name {
                    $( $name => {
                        let &[$($field),+] = values else { unreachable!("checked by ObjectiveSpec::build") };
                        Objective::$variant { $($field),+ }
                    } )+
                    other => unreachable!("{other} is not in Objective::ALL"),
                }
            }
        }
    };
}

objectives! {
    /// DPO (Rafailov et al. 2023, arXiv 2305.18290; TRL `sigmoid`): `−log σ(β h)`.
    Dpo = "dpo" or "sigmoid" { beta: BETA },
    /// SafeDPO (arXiv 2505.20065): `−log σ(β h − (u_r − u_c) Δ)`, on pairs already through T(D).
    /// After T(D) a pair has `u_r − u_c ∈ {0, 1}`: when only the rejected response is unsafe the
    /// policy must win by the extra margin Δ; with equal flags this is DPO.
    SafeDpo = "safedpo" { beta: BETA, delta: DELTA },
    /// IPO (Azar et al. 2023, arXiv 2310.12036; TRL `ipo`): `(h − 1/(2β))²`. Here on summed
    /// sequence log-probs as in the paper (TRL averages them over tokens).
    Ipo = "ipo" { beta: BETA },
    /// Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409; TRL `robust`), label-noise rate
    /// `ε ∈ [0, ½)`: `[−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)`, an unbiased estimate of the
    /// clean-label DPO loss.
    Robust = "robust" { beta: BETA, eps: ROBUST_EPS },
    /// Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL `sigmoid` with
    /// `label_smoothing = ε`), `ε ∈ [0, ½]`: `−(1−ε) log σ(βh) − ε log σ(−βh)`.
    Cdpo = "cdpo" { beta: BETA, eps: CDPO_EPS },
    /// Hinge / SLiC (Zhao et al. 2023, arXiv 2305.10425; TRL `hinge`): `max(0, 1 − β h)`. At the
    /// kink `βh = 1` the subgradient 0 is used.
    Hinge = "hinge" { beta: BETA },
    /// RPO (Pang et al. 2024, arXiv 2404.19733; TRL `rpo_alpha`): DPO + `α · (−πc / |yc|)`, the
    /// chosen response's negative log-likelihood averaged over its tokens.
    Rpo = "rpo" { beta: BETA, alpha: ALPHA },
    /// SimPO (Meng et al. 2024, arXiv 2405.14734; TRL CPO `simpo`), reference-free:
    /// `−log σ(β (πc/|yc| − πr/|yr|) − γ)`. Rewards are `β·π/|y|`.
    Simpo = "simpo" { beta: SIMPO_BETA, gamma: SIMPO_GAMMA },
    /// NPO (Zhang et al. 2024, arXiv 2404.05868) on the rejected response only:
    /// `−(2/β) log σ(−β(πr − rr)) = (2/β) log(1 + (πθ(yr)/πref(yr))^β)`. The chosen response gets
    /// no gradient.
    Npo = "npo" { beta: BETA },
}

/// Number of float outputs per pair written by a preference loss into its `metrics` buffer, in this
/// order: loss, chosen reward, rejected reward, margin (chosen − rejected reward), accuracy (1 when
/// the chosen reward exceeds the rejected one, else 0).
pub const PAIR_METRICS: usize = 5;

/// SafeDPO with its defaults: the objective this crate is about.
impl Default for Objective {
    fn default() -> Self {
        Objective::SafeDpo { beta: BETA.default, delta: DELTA.default }
    }
}

impl Objective {
    /// The objective called `name` or one of its aliases (case-insensitive).
    pub fn spec_of(name: &str) -> Result<&'static ObjectiveSpec> {
        let wanted = name.trim().to_ascii_lowercase();
        match Self::ALL.iter().find(|s| s.name == wanted || s.aliases.contains(&wanted.as_str())) {
            Some(spec) => Ok(spec),
            None => bail!("unknown objective {name:?}; expected one of: {}", Self::name_list()),
        }
    }

    /// `dpo (or sigmoid), safedpo, …`.
    pub fn name_list() -> String {
        let names = Self::ALL.iter().map(|s| match s.aliases {
            [] => s.name.to_string(),
            aliases => format!("{} (or {})", s.name, aliases.join(", ")),
        });
        names.collect::<Vec<_>>().join(", ")
    }

    /// The objective called `name` (case-insensitive, aliases accepted) with its default parameters.
    pub fn default_for(name: &str) -> Result<Objective> {
        Ok(Self::spec_of(name)?.defaults())
    }

    pub fn spec(&self) -> &'static ObjectiveSpec {
        Self::ALL.iter().find(|s| s.name == self.name()).expect("every variant is in Objective::ALL")
    }

    /// Whether the objective needs reference log-probs.
    pub fn uses_reference(&self) -> bool {
        !matches!(self, Objective::Simpo { .. })
    }

    /// The parameters as (name, value), in a fixed order (β first).
    pub fn params(&self) -> Vec<(&'static str, f64)> {
        self.spec().params.iter().map(|p| p.name).zip(self.values()).collect()
    }

    /// Sets parameter `key` (as named by `params`) to `value`; errors name the objective and list
    /// its parameters. Does not validate the value (see `validate`).
    pub fn set_param(&mut self, key: &str, value: f64) -> Result<()> {
        let spec = self.spec();
        let Some(index) = spec.params.iter().position(|p| p.name == key) else {
            bail!("objective {} has no parameter {key:?}; its parameters are: {}", spec.name, spec.param_list())
        };
        let mut values = self.values();
        values[index] = value;
        *self = spec.build(&values);
        Ok(())
    }

    /// Every parameter outside its bound, as (name, "must be …, got …").
    pub fn param_errors(&self) -> Vec<(&'static str, String)> {
        let params = self.spec().params.iter().zip(self.values());
        params
            .filter(|(p, v)| !p.bound.admits(*v))
            .map(|(p, v)| (p.name, format!("must be {}, got {v}", p.bound)))
            .collect()
    }

    /// Checks every parameter against its bound (see [`Param`]): β > 0, Δ ≥ 0, ε in [0, ½) for robust
    /// and [0, ½] for cdpo, α ≥ 0, γ ≥ 0, all finite.
    pub fn validate(&self) -> Result<()> {
        match self.param_errors().into_iter().next() {
            Some((key, message)) => bail!("objective {}: {key} {message}", self.name()),
            None => Ok(()),
        }
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

/// A table tagged with `name`: `{name = "safedpo", beta = 0.1, delta = 10.0}`, every parameter
/// written.
impl Serialize for Objective {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let params = self.params();
        let mut map = serializer.serialize_map(Some(1 + params.len()))?;
        map.serialize_entry("name", self.name())?;
        for (key, value) in params {
            map.serialize_entry(key, &value)?;
        }
        map.end()
    }
}

/// Reads the table `Serialize` writes. `name` may be an alias and defaults to `safedpo`; parameters
/// left out take the objective's defaults; a parameter the objective does not take is an error.
/// Bounds are checked by [`Objective::validate`], not here.
impl<'de> Deserialize<'de> for Objective {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectiveVisitor)
    }
}

struct ObjectiveVisitor;

impl<'de> Visitor<'de> for ObjectiveVisitor {
    type Value = Objective;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an objective: a table with `name` ({}) and its parameters", Objective::name_list())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Objective, A::Error> {
        // The keys may come in any order (TOML's in sorted order, `name` after most parameters).
        let mut spec = None;
        let mut given: Vec<(String, f64)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "name" {
                spec = Some(map.next_value_seed(NameSeed)?);
            } else {
                given.push((key, map.next_value()?));
            }
        }
        let spec = spec.unwrap_or_else(|| Objective::default().spec());
        let mut values: Vec<f64> = spec.params.iter().map(|p| p.default).collect();
        for (key, value) in given {
            match spec.params.iter().position(|p| p.name == key) {
                Some(index) => values[index] = value,
                None => return Err(de::Error::custom(spec.not_a_parameter(&key))),
            }
        }
        Ok(spec.build(&values))
    }
}

/// Reads an objective's name; an unknown one is an error on the value.
struct NameSeed;

impl<'de> DeserializeSeed<'de> for NameSeed {
    type Value = &'static ObjectiveSpec;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> std::result::Result<Self::Value, D::Error> {
        let name = String::deserialize(deserializer)?;
        Objective::spec_of(&name).map_err(de::Error::custom)
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
