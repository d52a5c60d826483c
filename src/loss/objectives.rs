//! The table of objectives ([`Objective::ALL`]): each objective's name, the other names it is known by,
//! its parameters, and, in its doc comment, its formula, its source and where its safety margin
//! enters. The enum [`Objective`] and the table are written once, by one macro.
//!
//! Notation (see [`crate::loss`]): `x_c = πc − rc`, `x_r = πr − rr` the log-ratios, `h = x_c − x_r`,
//! `s = u_r − u_c` the safety gap, `Δ` the safety margin (`delta` of `safedpo`, `safety_margin` of the
//! others), `z` the logit of the preference probability, `|y|` a response length (0 counts as 1).
//!
//! TRL references are to Hugging Face TRL v1.16.0, `trl/trainer/dpo_trainer.py`,
//! `DPOTrainer._compute_loss` (the per-`loss_type` branches; older TRL had them in `dpo_loss`), and
//! `trl/trainer/dpo_config.py` for the defaults.

use anyhow::{bail, Result};

use super::params::{
    Param, ALPHA, AOT_EPS, BETA, CDPO_EPS, DELTA, DISCOPOP_TAU, EXO_EPS, ROBUST_EPS, SAFETY_MARGIN, SIMPO_BETA,
    SIMPO_GAMMA,
};

/// One objective: its name, the other names it is known by, and its parameters.
#[derive(Clone, Copy, Debug)]
pub struct ObjectiveSpec {
    /// The name written out (serde's tag, `Objective::name`, the `--help` listing).
    pub name: &'static str,
    /// Also accepted on input: TRL's `loss_type` where it names the same loss under another name.
    pub aliases: &'static [&'static str],
    /// In the order of the variant's fields, β first, the safety margin last.
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

    pub(super) fn param_list(&self) -> String {
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
        /// The names (`Objective::NAMES`, serde's `name` tag, the CLI spelling) are TRL's `loss_type`
        /// where TRL has the loss, else the paper's name in lowercase; TRL's other spellings are
        /// accepted as aliases (`sigmoid` for `dpo`, `aot_pair` for `aot_unpaired`).
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
    /// DPO (Rafailov et al. 2023, arXiv 2305.18290; TRL `sigmoid`): `softplus(−z) = −log σ(z)`,
    /// `z = βh − sΔ`.
    Dpo = "dpo" or "sigmoid" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// SafeDPO (arXiv 2505.20065): DPO's safety twin with the paper's Δ = 10, on pairs already
    /// through T(D): `−log σ(βh − (u_r − u_c)Δ)`. After T(D) a pair has `u_r − u_c ∈ {0, 1}`: when
    /// only the rejected response is unsafe the policy must win by the extra margin Δ; with equal
    /// flags this is DPO. Exactly `dpo` with `safety_margin = delta`.
    SafeDpo = "safedpo" { beta: BETA, delta: DELTA },
    /// IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17; TRL `ipo`): `(h − 1/(2β))²`; with the safety
    /// margin `((z − ½)/β)²`, `z = βh − sΔ`, i.e. the target margin `1/(2β)` grows by `sΔ/β`. Here on
    /// summed sequence log-probs as in the paper's formula; TRL v1.16 divides each side's log-ratio
    /// by its length first (as the IPO authors' experiments did).
    Ipo = "ipo" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409; TRL `robust`), label-noise rate
    /// `ε ∈ [0, ½)`: `[(1−ε) softplus(−z) − ε softplus(z)] / (1 − 2ε)`, `z = βh − sΔ`, an unbiased
    /// estimate of the clean-label DPO loss.
    Robust = "robust" { beta: BETA, eps: ROBUST_EPS, safety_margin: SAFETY_MARGIN },
    /// Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL < 1.0 `sigmoid`
    /// with `label_smoothing = ε`, which TRL 1.x's `sigmoid` no longer reads), `ε ∈ [0, ½]`:
    /// `(1−ε) softplus(−z) + ε softplus(z)`, `z = βh − sΔ`.
    Cdpo = "cdpo" { beta: BETA, eps: CDPO_EPS, safety_margin: SAFETY_MARGIN },
    /// Hinge / SLiC (Zhao et al. 2023, arXiv 2305.10425; TRL `hinge`): `max(0, 1 − z)`, `z = βh − sΔ`.
    /// At the kink `z = 1` the subgradient 0 is used.
    Hinge = "hinge" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// RPO (Pang et al. 2024, arXiv 2404.19733; TRL < 1.0 `rpo_alpha`): DPO + `α · (−πc / |yc|)`, the
    /// chosen response's negative log-likelihood averaged over its tokens; the safety margin enters
    /// DPO's `z = βh − sΔ` only.
    Rpo = "rpo" { beta: BETA, alpha: ALPHA, safety_margin: SAFETY_MARGIN },
    /// SimPO (Meng et al. 2024, arXiv 2405.14734; TRL CPO `simpo`), reference-free: `softplus(−z)`,
    /// `z = β (πc/|yc| − πr/|yr|) − γ − sΔ`. Rewards are `β·π/|y|`.
    Simpo = "simpo" { beta: SIMPO_BETA, gamma: SIMPO_GAMMA, safety_margin: SAFETY_MARGIN },
    /// NPO (Zhang et al. 2024, arXiv 2404.05868) on the rejected response only:
    /// `(2/β) softplus(β x_r + sΔ) = (2/β) log(1 + e^{sΔ} (πθ(yr)/πref(yr))^β)`. The chosen response
    /// gets no gradient. Not in TRL's DPO trainer.
    Npo = "npo" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// EXO-pref (Ji et al. 2024, arXiv 2402.00856, eq. 16; TRL `exo_pair`): `KL(q ‖ p)` between the
    /// policy's preference distribution `q = (σ(z), σ(−z))` and the smoothed labels
    /// `p = (1−ε, ε)`: `σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)`, `z = βh − sΔ`.
    /// TRL's `label_smoothing` defaults to 0, which TRL refuses for this loss; ε defaults to the
    /// paper's 1e-3 here.
    ExoPair = "exo_pair" { beta: BETA, eps: EXO_EPS, safety_margin: SAFETY_MARGIN },
    /// NCA (Chen et al. 2024, arXiv 2402.05369; TRL `nca_pair`), with `r_c = β x_c`,
    /// `r_r = β x_r + sΔ`: `softplus(−r_c) + ½ softplus(r_c) + ½ softplus(r_r)`. There is no
    /// preference logit: the safety margin raises the rejected reward (see [`crate::loss`]).
    NcaPair = "nca_pair" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// SPPO, hard labels (Wu et al. 2024, arXiv 2405.00675, eq. 4.7 with P = 1 for the winner; TRL
    /// `sppo_hard`): `(x_c − 1/(2β))² + (x_r + sΔ/β + 1/(2β))²`: the rejected log-ratio is raised by
    /// the safety margin `sΔ/β` (its reward by `sΔ`).
    SppoHard = "sppo_hard" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// AOT, paired (Melnyk et al. 2024, arXiv 2406.05882; TRL `aot`): the policy's and the
    /// reference's chosen-minus-rejected log-prob differences are each sorted across the batch, and
    /// position k gets `(1−ε) softplus(−z_k) + ε softplus(z_k)`,
    /// `z_k = β (sort(πc − πr − sΔ/β)_k − sort(rc − rr)_k)`: the safety margin shifts each pair's
    /// policy difference before the sort. A batch-level objective (see [`crate::loss::batch_loss`]);
    /// a batch of one pair is cDPO.
    Aot = "aot" { beta: BETA, eps: AOT_EPS, safety_margin: SAFETY_MARGIN },
    /// AOT, unpaired (Melnyk et al. 2024; TRL `aot_unpaired`, called `aot_pair` before TRL 1.0): the
    /// chosen log-ratios `x_c` and the rejected log-ratios `x_r + sΔ/β` are each sorted across the
    /// batch, and position k gets `(1−ε) softplus(−z_k) + ε softplus(z_k)`,
    /// `z_k = β (sort(x_c)_k − sort(x_r + sΔ/β)_k)`. A batch-level objective, like `aot`.
    AotUnpaired = "aot_unpaired" or "aot_pair" { beta: BETA, eps: AOT_EPS, safety_margin: SAFETY_MARGIN },
    /// APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7; TRL `apo_zero`):
    /// `(1 − σ(r_c)) + σ(r_r)`, `r_c = β x_c`, `r_r = β x_r + sΔ`; `1 − σ(r_c)` is computed as
    /// `σ(−r_c)`. For chosen responses better than the model's own outputs.
    ApoZero = "apo_zero" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// APO-down (D'Oosterlinck et al. 2024, eq. 8; TRL `apo_down`): `σ(β x_c) + (1 − σ(z))`,
    /// `z = βh − sΔ`, computed as `σ(β x_c) + σ(−z)`. For chosen responses worse than the model's own
    /// outputs: lowers both, the rejected more.
    ApoDown = "apo_down" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// DiscoPOP (Lu et al. 2024, arXiv 2406.08414, eq. 5; TRL `discopop`), temperature τ:
    /// `softplus(−z)(1 − σ(z/τ)) + e^{−z} σ(z/τ)`, `z = βh − sΔ`. The exponential component is
    /// computed as `exp(−z − softplus(−z/τ))`, which TRL's `torch.exp(-logits) * σ(logits/τ)` is
    /// mathematically but which stays finite (TRL's is `inf · 0 = NaN` at large negative margins).
    Discopop = "discopop" { beta: BETA, tau: DISCOPOP_TAU, safety_margin: SAFETY_MARGIN },
    /// Length-normalised DPO (TRL `sigmoid_norm`): `softplus(−z)`,
    /// `z = β (x_c/|yc| − x_r/|yr|) − sΔ`, the log-ratios divided by the response lengths (TRL: the
    /// completion mask's sums, clamped to ≥ 1). Rewards stay `β x` (as TRL logs them).
    SigmoidNorm = "sigmoid_norm" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// BCO on pairs (Jung et al. 2024, arXiv 2404.04656; TRL `bco_pair`): `softplus(−r_c) + softplus(r_r)`,
    /// `r_c = β x_c`, `r_r = β x_r + sΔ`: the chosen response classified as good, the rejected as
    /// bad, at threshold 0. TRL < 1.0 subtracted a running mean δ of all rewards from both (the BCO
    /// paper's reward shift, kept by TRL's separate BCO trainer); TRL 1.x's `bco_pair` has no δ, and
    /// neither has this one: δ is trainer state, updated at every loss call, so the loss of a pair
    /// would depend on the pairs before it and on how a step is split into micro-batches.
    BcoPair = "bco_pair" { beta: BETA, safety_margin: SAFETY_MARGIN },
}

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

    /// Whether the objective sorts across the batch (AOT), so that a pair's loss depends on the other
    /// pairs of its batch: see [`crate::loss::batch_loss`].
    pub fn sorts_batch(&self) -> bool {
        matches!(self, Objective::Aot { .. } | Objective::AotUnpaired { .. })
    }

    /// The safety margin Δ: `delta` of `safedpo`, `safety_margin` of every other objective.
    pub fn safety_margin(&self) -> f64 {
        let params = self.spec().params.iter().zip(self.values());
        params.filter(|(p, _)| p.is_safety_margin()).map(|(_, v)| v).next().expect("every objective has a Δ")
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

    /// Checks every parameter against its bound (see [`Param`]): β > 0, Δ ≥ 0, ε in [0, ½) for robust,
    /// [0, ½] for cdpo and aot, (0, ½] for exo_pair, α ≥ 0, γ ≥ 0, τ in (0, 1], all finite.
    pub fn validate(&self) -> Result<()> {
        match self.param_errors().into_iter().next() {
            Some((key, message)) => bail!("objective {}: {key} {message}", self.name()),
            None => Ok(()),
        }
    }
}
