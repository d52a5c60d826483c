//! Objectives combined, as TRL combines them: a weighted sum of objectives (TRL's `loss_type` list
//! with `loss_weights`, e.g. MPO = `0.8·sigmoid + 0.2·bco_pair + 1·sft`), and the modifiers TRL
//! applies to every term of the sum: the f-divergence of the log-ratios (`f_divergence_type`),
//! `bco_pair`'s running reward mean, and the two that change the log-probs the terms read, LD-DPO's
//! `ld_alpha` and WPO's `use_weighting` (see `crate::loss::modifiers`). TRL's `rpo_alpha` is the
//! `sft` term with weight α.
//!
//! A [`Combination`] is the value of [`Objective::Combination`] (and a submodule of the objectives',
//! as each refers to the other); a single objective without modifiers
//! is never written as one (see [`Combination::into_objective`]), so that every objective keeps one
//! spelling. Its terms share their parameters by name (one `beta` for all, as TRL has one), which
//! [`Combination::shared_param_errors`] checks.

use super::Objective;

/// TRL's `f_divergence_type` (f-DPO, Wang et al. 2023, arXiv 2309.16240): the function `f'` of the
/// likelihood ratio `u = e^x` that scores each response in place of its log-ratio `x`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum FDivergence {
    /// `x` itself: DPO's reverse KL (TRL's default).
    #[default]
    ReverseKl,
    /// `f'(u) = 1 − 1/u`: the score `1 − e^{−x}`.
    ForwardKl,
    /// Jensen–Shannon, `f'(u) = log(2u/(1 + u))`: the score `log 2 + log σ(x)`.
    JsDivergence,
    /// The α-divergence with `f_alpha_divergence_coef = α`: the score `(e^{(α−1)x} − 1)/(α − 1)`,
    /// TRL's exponent clamped at [`ALPHA_DIVERGENCE_MAX_EXPONENT`]; `|α − 1| < 1e-6` is the reverse KL.
    /// (The scores are computed by the loss's `f_divergence_score`.)
    Alpha(f64),
}

/// TRL clamps the α-divergence's exponent `(α−1)x` at 80 before `exp` (for f32 and bf16 log-probs),
/// so that the score stays finite; above it the score is constant (no gradient).
pub const ALPHA_DIVERGENCE_MAX_EXPONENT: f64 = 80.0;

/// `ld_alpha` when it is not set: the tokens past the shared length count fully (TRL's `None`).
pub const NO_LD_ALPHA: f64 = 1.0;

/// TRL's `f_alpha_divergence_coef` default.
pub const DEFAULT_ALPHA_DIVERGENCE_COEF: f64 = 0.5;

impl FDivergence {
    /// TRL's `f_divergence_type` names, in the order of the kernel's codes.
    pub const NAMES: [&'static str; 4] = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"];

    /// The divergence called `name` (TRL's spelling), with `coef` as α where it takes one.
    pub fn from_name(name: &str, coef: f64) -> Option<FDivergence> {
        Some(match name.trim() {
            "reverse_kl" => FDivergence::ReverseKl,
            "forward_kl" => FDivergence::ForwardKl,
            "js_divergence" => FDivergence::JsDivergence,
            "alpha_divergence" => FDivergence::Alpha(coef),
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        Self::NAMES[self.code() as usize]
    }

    /// The kernel's code (the index in `NAMES`).
    pub fn code(&self) -> i32 {
        match self {
            FDivergence::ReverseKl => 0,
            FDivergence::ForwardKl => 1,
            FDivergence::JsDivergence => 2,
            FDivergence::Alpha(_) => 3,
        }
    }

    /// α of the α-divergence, else TRL's default (unused).
    pub fn coef(&self) -> f64 {
        match self {
            FDivergence::Alpha(coef) => *coef,
            _ => DEFAULT_ALPHA_DIVERGENCE_COEF,
        }
    }
}

/// Objectives summed with weights, and the modifiers that apply to all of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Combination {
    /// `(weight, objective)` in order; each objective single (never itself a combination). The
    /// metrics (rewards, margin, accuracy) are those of the first term.
    pub terms: Vec<(f64, Objective)>,
    /// The score of each log-ratio (TRL's `f_divergence_type`), for the terms built on the
    /// chosen-minus-rejected log-ratio difference (see [`Objective::takes_f_divergence`]).
    pub f_divergence: FDivergence,
    /// `bco_pair` with the running mean δ of the rewards subtracted from both of its rewards (the BCO
    /// paper's reward shift, TRL < 1.0's `bco_pair`; TRL 1.x's has none). δ is trainer state
    /// ([`crate::loss::LossState`]), updated before each micro-batch's loss.
    pub bco_running_mean: bool,
    /// LD-DPO's α (TRL `ld_alpha`), in [0, 1]: the tokens of a response past its pair's shared
    /// length count α times in the log-probs the terms read; 1 (the default) leaves them as they are.
    pub ld_alpha: f64,
    /// WPO's per-pair weights (TRL `use_weighting`): every term's per-pair loss times the policy's
    /// length-normalised probability of both responses under its own sampling distribution.
    pub use_weighting: bool,
}

impl Combination {
    /// One objective with TRL's defaults for the modifiers.
    pub fn of(objective: Objective) -> Combination {
        match objective {
            Objective::Combination(c) => *c,
            single => Combination { terms: vec![(1.0, single)], ..Combination::empty() },
        }
    }

    fn empty() -> Combination {
        Combination {
            terms: Vec::new(),
            f_divergence: FDivergence::ReverseKl,
            bco_running_mean: false,
            ld_alpha: NO_LD_ALPHA,
            use_weighting: false,
        }
    }

    /// Whether every modifier is TRL's default.
    pub fn has_default_modifiers(&self) -> bool {
        self.f_divergence == FDivergence::ReverseKl
            && !self.bco_running_mean
            && self.ld_alpha == NO_LD_ALPHA
            && !self.use_weighting
    }

    /// The objective this is: its one term when it has one, of weight 1, and no modifier; else
    /// [`Objective::Combination`].
    pub fn into_objective(self) -> Objective {
        match self.terms.as_slice() {
            [(weight, single)] if *weight == 1.0 && self.has_default_modifiers() => single.clone(),
            _ => Objective::Combination(Box::new(self)),
        }
    }

    /// The parameters of the terms as (name, value), each name once, in the order the terms take
    /// them (β first): the terms share each parameter (see `shared_param_errors`).
    pub fn params(&self) -> Vec<(&'static str, f64)> {
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        for (_, term) in &self.terms {
            for (name, value) in term.params() {
                if !out.iter().any(|(n, _)| *n == name) {
                    out.push((name, value));
                }
            }
        }
        out
    }

    /// A parameter that two terms hold with different values (each term's default where it was not
    /// set): TRL has one value of each parameter for the whole sum.
    pub fn shared_param_errors(&self) -> Vec<(&'static str, String)> {
        let mut errors = Vec::new();
        for (name, _) in self.params() {
            let held: Vec<(&str, f64)> = self
                .terms
                .iter()
                .filter_map(|(_, t)| t.params().into_iter().find(|(n, _)| *n == name).map(|(_, v)| (t.name(), v)))
                .collect();
            if held.iter().any(|(_, v)| *v != held[0].1) {
                let values: Vec<String> = held.iter().map(|(term, v)| format!("{term}: {v}")).collect();
                let message = format!(
                    "is shared by the combined objectives, whose values differ ({}); set it",
                    values.join(", ")
                );
                errors.push((name, message));
            }
        }
        errors
    }

    /// The errors of the combination itself (not of its terms' parameters): weights, the modifiers
    /// and the terms they need, as (key, message).
    pub fn errors(&self) -> Vec<(&'static str, String)> {
        let mut errors = Vec::new();
        if self.terms.is_empty() {
            errors.push(("name", "names no objective".to_string()));
        }
        if let Some((w, t)) = self.terms.iter().find(|(w, _)| !(w.is_finite() && *w >= 0.0)) {
            errors.push(("loss_weights", format!("must be finite numbers >= 0, got {w} for {}", t.name())));
        }
        if self.terms.iter().any(|(_, t)| matches!(t, Objective::Combination(_))) {
            errors.push(("name", "a combination's terms are single objectives".to_string()));
        }
        if let Some((_, t)) = self.terms.iter().find(|(_, t)| t.as_unpaired().is_some()) {
            let message = format!(
                "{} trains on unpaired examples: it takes no other objective, weight or DPO modifier",
                t.name()
            );
            errors.push(("name", message));
        }
        if self.f_divergence != FDivergence::ReverseKl {
            let refused: Vec<&str> =
                self.terms.iter().filter(|(_, t)| !t.takes_f_divergence()).map(|(_, t)| t.name()).collect();
            if !refused.is_empty() {
                let takers: Vec<&str> =
                    Objective::ALL.iter().filter(|s| s.defaults().takes_f_divergence()).map(|s| s.name).collect();
                errors.push((
                    "f_divergence_type",
                    format!(
                        "{} applies only to the objectives built on the chosen-minus-rejected log-ratio difference \
                         ({}), not to {}",
                        self.f_divergence.name(),
                        takers.join(", "),
                        refused.join(", ")
                    ),
                ));
            }
        }
        if let FDivergence::Alpha(coef) = self.f_divergence {
            if !coef.is_finite() {
                errors.push(("f_alpha_divergence_coef", format!("must be a finite number, got {coef}")));
            }
        }
        if self.bco_running_mean && !self.terms.iter().any(|(_, t)| matches!(t, Objective::BcoPair { .. })) {
            errors.push(("bco_running_mean", "needs a bco_pair term".to_string()));
        }
        errors.extend(self.logp_modifier_errors());
        errors
    }

    /// The errors of the log-prob modifiers (`crate::loss::batch_loss_parts`), as (key, message):
    /// α outside [0, 1], WPO with a term that sorts the batch (as TRL refuses it), LD-DPO with
    /// nothing that reads it.
    fn logp_modifier_errors(&self) -> Vec<(&'static str, String)> {
        let mut errors = Vec::new();
        if !(self.ld_alpha.is_finite() && (0.0..=1.0).contains(&self.ld_alpha)) {
            errors.push(("ld_alpha", format!("must be in [0, 1], got {}", self.ld_alpha)));
        } else if self.ld_alpha != NO_LD_ALPHA && self.terms.iter().all(|(_, t)| matches!(t, Objective::Sft { .. })) {
            errors.push(("ld_alpha", "changes nothing for sft, whose NLL reads the plain log-probs".to_string()));
        }
        let sorting: Vec<&str> = self
            .terms
            .iter()
            .filter(|(_, t)| matches!(t, Objective::Aot { .. } | Objective::AotUnpaired { .. }))
            .map(|(_, t)| t.name())
            .collect();
        if self.use_weighting && !sorting.is_empty() {
            errors.push((
                "use_weighting",
                format!(
                    "is not defined for {}: it sorts the batch, which would misalign the per-pair weights (as TRL)",
                    sorting.join(", ")
                ),
            ));
        }
        errors
    }
}
