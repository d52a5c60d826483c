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

mod combination;
mod kto;

pub use combination::{
    Combination, FDivergence, ALPHA_DIVERGENCE_MAX_EXPONENT, DEFAULT_ALPHA_DIVERGENCE_COEF, NO_LD_ALPHA,
};
pub use kto::{Kto, KtoLoss, UNPAIRED};

use super::params::{
    canonical_param, Param, ALPHA, AOT_EPS, BETA, CDPO_EPS, CPO_ALPHA, CPO_EPS, DELTA, DISCOPOP_TAU, EXO_EPS,
    ORPO_BETA, ROBUST_EPS, SAFETY_MARGIN, SIMPO_BETA, SIMPO_GAMMA,
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
    /// The parameter called `key` or one of TRL's spellings of it (`label_smoothing` for `eps`, …).
    pub fn param(&self, key: &str) -> Option<&'static Param> {
        let key = canonical_param(key);
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
            /// A weighted sum of objectives, or objectives with TRL's modifiers (see
            /// [`Combination`]): `sigmoid+bco_pair+sft` with `loss_weights`, `rpo_alpha`,
            /// `f_divergence_type`, `bco_running_mean`.
            Combination(Box<Combination>),
            /// An objective on unpaired examples (KTO, TRL's `apo_zero_unpaired`): see [`Kto`]. Not
            /// in `ALL` (its specs are [`UNPAIRED`]): the pairwise loss refuses it.
            Kto(Kto),
        }

        const OBJECTIVE_COUNT: usize = [$($name),+].len();

        impl Objective {
            /// Every objective, in the order of `NAMES`.
            pub const ALL: [ObjectiveSpec; OBJECTIVE_COUNT] = [
                $( ObjectiveSpec { name: $name, aliases: &[$($alias),*], params: &[$($param),+] }, )+
            ];

            /// Every objective's name, as `default_for`, `FromStr` and serde spell it.
            pub const NAMES: [&'static str; OBJECTIVE_COUNT] = [$($name),+];

            /// The objective's name (one of `NAMES`; `combination` for a [`Combination`], whose
            /// terms `describe` lists).
            pub fn name(&self) -> &'static str {
                match self {
                    $( Objective::$variant { .. } => $name, )+
                    Objective::Combination(_) => "combination",
                    Objective::Kto(ref k) => k.name(),
                }
            }

            /// β, the inverse temperature every objective has (a combination's terms share it).
            pub fn beta(&self) -> f64 {
                match *self {
                    $( Objective::$variant { beta, .. } => beta, )+
                    Objective::Combination(ref c) => c.terms.first().map_or(BETA.default, |(_, t)| t.beta()),
                    Objective::Kto(ref k) => k.beta,
                }
            }

            /// The parameter values in the order of `spec().params` (a combination: of `params`).
            pub fn values(&self) -> Vec<f64> {
                match *self {
                    $( Objective::$variant { $($field),+ } => vec![$($field),+], )+
                    Objective::Combination(ref c) => c.params().into_iter().map(|(_, v)| v).collect(),
                    Objective::Kto(ref k) => k.values(),
                }
            }

            fn from_values(name: &str, values: &[f64]) -> Objective {
                match name {
                    $( $name => {
                        let &[$($field),+] = values else { unreachable!("checked by ObjectiveSpec::build") };
                        Objective::$variant { $($field),+ }
                    } )+
                    other => Objective::Kto(
                        Kto::from_values(other, values).unwrap_or_else(|| unreachable!("{other} is not an objective")),
                    ),
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
    /// bad, at threshold 0, as TRL 1.x's `bco_pair`. TRL < 1.0 subtracted a running mean δ of all
    /// rewards from both (the BCO paper's reward shift, kept by TRL's separate BCO trainer):
    /// `bco_pair` with `bco_running_mean = true` (a [`Combination`] modifier) does, with δ trainer
    /// state ([`crate::loss::LossState`]) updated before every loss call, so that its loss depends on
    /// the pairs before it and on how a step is split into micro-batches.
    BcoPair = "bco_pair" { beta: BETA, safety_margin: SAFETY_MARGIN },
    /// SFT on the chosen responses (TRL `sft`): the negative log-likelihood of the batch's chosen
    /// response tokens, averaged over those tokens, `−Σ_i πc_i / Σ_i |yc_i|` (a batch of one pair:
    /// `−πc/|yc|`); TRL writes this batch value as every pair's loss, and so does [`batch_loss`]. A
    /// batch-level objective: the gradient of the batch's summed loss is `−P / Σ|yc|` for every
    /// chosen log-prob (P pairs). The loss reads no reference; the logged rewards are TRL's
    /// `β(π − r)`, which do. No safety margin: there is no rejected response. As a term of a
    /// [`Combination`] it is TRL's `loss_type=[…, "sft"]` (MPO), and with weight α TRL < 1.0's
    /// `rpo_alpha`.
    ///
    /// [`batch_loss`]: crate::loss::batch_loss
    Sft = "sft" { beta: BETA },
    /// ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 4–7; TRL `ORPOTrainer`), reference-free, on the
    /// mean token log-probs `a = π/|y|`: `−β log σ(z) + NLL`, the log odds ratio
    /// `z = (a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r})) − sΔ` (β is the paper's λ) and NLL the
    /// `sft` term. Rewards are `β a`. A mean log-prob above −1e-6 (a probability within 1e-6 of 1;
    /// an empty response's 0) counts as −1e-6, so that the log odds stay finite (TRL's are ±inf
    /// there). TRL's NLL covers the prompt tokens too; here it covers the response tokens, as CPO's.
    Orpo = "orpo" { beta: ORPO_BETA, safety_margin: SAFETY_MARGIN },
    /// CPO (Xu et al. 2024, arXiv 2401.08417, eq. 3; TRL `CPOTrainer`, `loss_type="sigmoid"`),
    /// reference-free: `(1−ε) softplus(−z) + ε softplus(z)`, `z = β(πc − πr) − sΔ`, plus `cpo_alpha`
    /// times the `sft` term. Rewards are `β π`. TRL's AlphaPO reward transform (`alpha`) is not here.
    Cpo = "cpo" { beta: BETA, eps: CPO_EPS, cpo_alpha: CPO_ALPHA, safety_margin: SAFETY_MARGIN },
    /// CPO with the hinge loss (TRL `CPOTrainer`, `loss_type="hinge"`): `max(0, 1 − z)`,
    /// `z = β(πc − πr) − sΔ`, plus `cpo_alpha` times the `sft` term. Rewards are `β π`.
    CpoHinge = "cpo_hinge" { beta: BETA, cpo_alpha: CPO_ALPHA, safety_margin: SAFETY_MARGIN },
    /// CPO with the IPO loss (TRL `CPOTrainer`, `loss_type="ipo"`), on the mean token log-probs
    /// `a = π/|y|`: `(a_c − a_r − sΔ/β − 1/(2β))²` (IPO's `((z − ½)/β)²`, `z = β(a_c − a_r) − sΔ`),
    /// plus `cpo_alpha` times the `sft` term. Rewards are `β a`.
    CpoIpo = "cpo_ipo" { beta: BETA, cpo_alpha: CPO_ALPHA, safety_margin: SAFETY_MARGIN },
    /// CPO with SimPO's loss (TRL `CPOTrainer`, `loss_type="simpo"`): `(1−ε) softplus(−z) + ε
    /// softplus(z)`, `z = β(a_c − a_r) − γ − sΔ` on the mean token log-probs, plus `cpo_alpha` times
    /// the `sft` term (TRL's CPO default 1; `cpo_alpha = 0`, `eps = 0` is `simpo` at these β, γ).
    /// Rewards are `β a`.
    CpoSimpo = "cpo_simpo" {
        beta: BETA,
        eps: CPO_EPS,
        gamma: SIMPO_GAMMA,
        cpo_alpha: CPO_ALPHA,
        safety_margin: SAFETY_MARGIN,
    },
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
        match Self::specs().find(|s| s.name == wanted || s.aliases.contains(&wanted.as_str())) {
            Some(spec) => Ok(spec),
            None => bail!("unknown objective {name:?}; expected one of: {}", Self::name_list()),
        }
    }

    /// Every objective's spec: those on pairs ([`Objective::ALL`]), then those on unpaired
    /// examples ([`UNPAIRED`]).
    pub fn specs() -> impl Iterator<Item = &'static ObjectiveSpec> {
        Self::ALL.iter().chain(UNPAIRED.iter())
    }

    /// `dpo (or sigmoid), safedpo, …, kto, apo_zero_unpaired`.
    pub fn name_list() -> String {
        let names = Self::specs().map(|s| match s.aliases {
            [] => s.name.to_string(),
            aliases => format!("{} (or {})", s.name, aliases.join(", ")),
        });
        names.collect::<Vec<_>>().join(", ")
    }

    /// The objective called `name` (case-insensitive, aliases accepted) with its default parameters.
    pub fn default_for(name: &str) -> Result<Objective> {
        Ok(Self::spec_of(name)?.defaults())
    }

    /// The table entry of a single objective; a combination's first term's.
    pub fn spec(&self) -> &'static ObjectiveSpec {
        match self {
            Objective::Combination(c) => c.terms.first().map_or(Objective::default().spec(), |(_, t)| t.spec()),
            Objective::Kto(k) => k.spec(),
            single => {
                Self::ALL.iter().find(|s| s.name == single.name()).expect("every single objective is in Objective::ALL")
            }
        }
    }

    /// The objective on unpaired examples this is, if it is one (see [`Kto`]).
    pub fn as_unpaired(&self) -> Option<&Kto> {
        match self {
            Objective::Kto(k) => Some(k),
            _ => None,
        }
    }

    /// Fails for an objective on unpaired examples, which `what` (an op or a step on pairs) cannot
    /// run.
    pub fn require_pairwise(&self, what: &str) -> Result<()> {
        match self {
            Objective::Kto(k) => bail!(
                "{what}: objective {} trains on unpaired examples (prompt, completion, label), not on pairs; it runs \
                 in the trainer's step on unpaired examples",
                k.name()
            ),
            _ => Ok(()),
        }
    }

    /// The terms of the sum: `(1, self)` for a single objective.
    pub fn terms(&self) -> Vec<(f64, &Objective)> {
        match self {
            Objective::Combination(c) => c.terms.iter().map(|(w, t)| (*w, t)).collect(),
            single => vec![(1.0, single)],
        }
    }

    /// `dpo`, or a combination's terms: `0.8*dpo+0.2*bco_pair+sft` (without parameters; `Display`
    /// writes them).
    pub fn describe(&self) -> String {
        match self {
            Objective::Combination(c) => {
                let terms =
                    c.terms
                        .iter()
                        .map(|(w, t)| if *w == 1.0 { t.name().to_string() } else { format!("{w}*{}", t.name()) });
                terms.collect::<Vec<_>>().join("+")
            }
            single => single.name().to_string(),
        }
    }

    /// Whether the objective needs reference log-probs (a combination: whether any term does).
    pub fn uses_reference(&self) -> bool {
        match self {
            Objective::Combination(c) => c.terms.iter().any(|(_, t)| t.uses_reference()),
            single => !matches!(
                single,
                Objective::Simpo { .. }
                    | Objective::Orpo { .. }
                    | Objective::Cpo { .. }
                    | Objective::CpoHinge { .. }
                    | Objective::CpoIpo { .. }
                    | Objective::CpoSimpo { .. }
            ),
        }
    }

    /// Whether the objective sorts across the batch (AOT), so that a pair's loss depends on the other
    /// pairs of its batch: see [`crate::loss::batch_loss`].
    pub fn sorts_batch(&self) -> bool {
        self.terms().iter().any(|(_, t)| matches!(t, Objective::Aot { .. } | Objective::AotUnpaired { .. }))
    }

    /// Whether a pair's loss depends on the other pairs of its batch: the sorting objectives, and
    /// those with the `sft` term (its token mean runs over the batch).
    pub fn batch_level(&self) -> bool {
        self.sorts_batch() || self.terms().iter().any(|(_, t)| t.nll_weight() > 0.0)
    }

    /// The weight of the `sft` term (the chosen responses' token-mean NLL over the batch) inside a
    /// single objective: 1 for `sft` and `orpo`, `cpo_alpha` for the CPO objectives, else 0 (RPO's
    /// NLL is per pair: see `rpo`). 0 for a combination, whose terms say.
    pub fn nll_weight(&self) -> f64 {
        match *self {
            Objective::Sft { .. } | Objective::Orpo { .. } => 1.0,
            Objective::Cpo { cpo_alpha, .. }
            | Objective::CpoHinge { cpo_alpha, .. }
            | Objective::CpoIpo { cpo_alpha, .. }
            | Objective::CpoSimpo { cpo_alpha, .. } => cpo_alpha,
            _ => 0.0,
        }
    }

    /// Whether the objective is built on the chosen-minus-rejected log-ratio difference, so that an
    /// f-divergence can score its log-ratios (TRL's list, `DPOTrainer.__init__`: `sigmoid`,
    /// `sigmoid_norm`, `hinge`, `ipo`, `exo_pair`, `robust`, `discopop`, `sft`; here also the
    /// objectives made of those: `safedpo`, `cdpo`, `rpo`).
    pub fn takes_f_divergence(&self) -> bool {
        matches!(
            self,
            Objective::Dpo { .. }
                | Objective::SafeDpo { .. }
                | Objective::Ipo { .. }
                | Objective::Robust { .. }
                | Objective::Cdpo { .. }
                | Objective::Hinge { .. }
                | Objective::Rpo { .. }
                | Objective::ExoPair { .. }
                | Objective::Discopop { .. }
                | Objective::SigmoidNorm { .. }
                | Objective::Sft { .. }
        )
    }

    /// The safety margin Δ: `delta` of `safedpo`, `safety_margin` of every other objective; 0 for
    /// `sft`, which has none; a combination's first term's that has one (they share it).
    pub fn safety_margin(&self) -> f64 {
        let terms = self.terms();
        let mut margins = terms.iter().flat_map(|(_, t)| {
            let params = t.spec().params.iter().zip(t.values());
            params.filter(|(p, _)| p.is_safety_margin()).map(|(_, v)| v).collect::<Vec<_>>()
        });
        margins.next().unwrap_or(0.0)
    }

    /// The parameters as (name, value), in a fixed order (β first; a combination: each shared
    /// parameter once, see [`Combination::params`]).
    pub fn params(&self) -> Vec<(&'static str, f64)> {
        match self {
            Objective::Combination(c) => c.params(),
            single => single.spec().params.iter().map(|p| p.name).zip(single.values()).collect(),
        }
    }

    /// Sets parameter `key` (as named by `params`, or TRL's spelling of it) to `value`; a
    /// combination sets it on every term that takes it. Errors name the objective and list its
    /// parameters. Does not validate the value (see `validate`).
    pub fn set_param(&mut self, key: &str, value: f64) -> Result<()> {
        if let Objective::Combination(c) = self {
            let mut found = false;
            for (_, term) in c.terms.iter_mut() {
                if term.spec().param(key).is_some() {
                    term.set_param(key, value)?;
                    found = true;
                }
            }
            if !found {
                let names: Vec<&str> = c.params().into_iter().map(|(n, _)| n).collect();
                bail!(
                    "objective {} has no parameter {key:?}; its parameters are: {}",
                    self.describe(),
                    names.join(", ")
                )
            }
            return Ok(());
        }
        let spec = self.spec();
        let Some(index) = spec.param(key).and_then(|p| spec.params.iter().position(|q| q.name == p.name)) else {
            bail!("objective {} has no parameter {key:?}; its parameters are: {}", spec.name, spec.param_list())
        };
        let mut values = self.values();
        values[index] = value;
        *self = spec.build(&values);
        Ok(())
    }

    /// Every parameter outside its bound, as (name, "must be …, got …"); for a combination also its
    /// weights, its modifiers and the parameters its terms hold with different values.
    pub fn param_errors(&self) -> Vec<(&'static str, String)> {
        if let Objective::Combination(c) = self {
            let mut errors: Vec<(&'static str, String)> = Vec::new();
            for (_, term) in &c.terms {
                for (key, message) in term.param_errors() {
                    if !errors.iter().any(|(k, _)| *k == key) {
                        errors.push((key, format!("{message} ({})", term.name())));
                    }
                }
            }
            errors.extend(c.shared_param_errors());
            errors.extend(c.errors());
            return errors;
        }
        let params = self.spec().params.iter().zip(self.values());
        params
            .filter(|(p, v)| !p.bound.admits(*v))
            .map(|(p, v)| (p.name, format!("must be {}, got {v}", p.bound)))
            .collect()
    }

    /// Checks every parameter against its bound (see [`Param`]): β > 0, Δ ≥ 0, ε in [0, ½) for robust,
    /// [0, ½] for cdpo, aot and cpo, (0, ½] for exo_pair, α ≥ 0, γ ≥ 0, τ in (0, 1], all finite; and
    /// a combination's weights and modifiers (see [`Combination::errors`]).
    pub fn validate(&self) -> Result<()> {
        match self.param_errors().into_iter().next() {
            Some((key, message)) => bail!("objective {}: {key} {message}", self.describe()),
            None => Ok(()),
        }
    }
}
