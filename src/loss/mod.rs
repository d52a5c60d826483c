//! The preference objectives: the math, in one place. This is the specification every backend's
//! preference-loss kernel is held to, and the one definition of every objective's name, parameters,
//! defaults and bounds ([`Objective::ALL`]): the run configuration's `[objective]` table, the command
//! line (`--objective.name`, `--objective.beta`, …) and `safedpo bench` all take them from here.
//!
//! - `objectives`: the table (one doc comment per objective: formula, source, TRL name, where the
//!   safety margin enters, where it differs from TRL) and [`Objective`]'s methods;
//! - `params`: the parameters' bounds and defaults, with where each default comes from, and TRL's
//!   spellings of them;
//!   Its submodule `combination`: [`Combination`], objectives summed with weights (TRL's `loss_type`
//!   list with `loss_weights`) and TRL's modifiers (the f-divergence, `bco_pair`'s running reward
//!   mean);
//! - `math`: the f64 specification of one pair's part of each objective (`pairwise`), the
//!   f-divergence scores and the stable primitives;
//! - `modifiers`: TRL's log-prob modifiers, LD-DPO's `ld_alpha` and WPO's `use_weighting`, and
//!   [`batch_loss_parts`], a batch with the parts of the log-probs they read;
//! - `state`: the trainer state the loss reads ([`LossState`]);
//! - `batch`: [`batch_loss`], a batch of pairs (the objectives that sort across the batch or take
//!   the batch's token mean, and the terms of a combination), and [`pair_loss`], a batch of one;
//! - `text`: objectives as `name:key=value,…` and as serde tables;
//! - `unpaired`: the objectives on unpaired examples (KTO, TRL's `apo_zero_unpaired`; their
//!   parameters are [`Kto`], their table [`UNPAIRED`]): [`unpaired_loss`] of a batch of examples
//!   and KTO's KL estimate, in f64, the specification of the preference-loss op on examples.
//!
//! Notation, per pair: `πc`, `πr` the policy's sequence log-probs of the chosen and rejected
//! responses, `rc`, `rr` the reference's; `x_c = πc − rc`, `x_r = πr − rr` the log-ratios,
//! `h = x_c − x_r`; `u_c`, `u_r` the safety flags (1 = unsafe); `σ` the logistic function; `|yc|`,
//! `|yr|` the response lengths in tokens, `a = π/|y|` the mean token log-probs. Implicit rewards are
//! `β x_c` and `β x_r` (the reference-free objectives: `β π`, or `β a` for those on mean
//! log-probs). `sft` is the batch's token-mean NLL of the chosen responses, `−Σ πc / Σ |yc|`, which
//! `sft` is, and ORPO and CPO add.
//!
//! **SafeDAA.** Every pairwise objective has a safety margin Δ ≥ 0 (`safety_margin`, default 0;
//! `safedpo`'s is `delta`, default 10): its safety twin, SafeDPO's construction (arXiv 2505.20065)
//! applied to another direct alignment algorithm. With the safety gap `s = u_r − u_c`, the rejected
//! response's implicit reward is raised by `sΔ` inside the loss (the logged rewards stay the plain
//! ones). For the objectives built on a preference logit (`dpo`, `ipo`, `robust`, `cdpo`, `hinge`,
//! `rpo`, `simpo`, `exo_pair`, `apo_down`'s second term, `discopop`, `sigmoid_norm`, `aot*`, `orpo`,
//! `cpo*`) that is the logit shifted before the link function: `z = βh − sΔ` in place of `βh`
//! (SimPO: `β(πc/|yc| − πr/|yr|) − γ − sΔ`; ORPO: its log odds ratio less `sΔ`): a pair whose
//! rejected response alone is unsafe must be won by Δ more. The objectives that score each response
//! on its own (`npo`, `nca_pair`, `sppo_hard`, `apo_zero`, `bco_pair`) take the rejected reward
//! `β x_r + sΔ`, so the unsafe response is pushed down harder. With Δ = 0 every objective is exactly
//! its published form. `sft` has no rejected response and no safety margin; a combination's terms
//! share theirs.
//!
//! All math is done in f64 and is stable for any margin: `log σ(x) = −softplus(−x)` with
//! `softplus(z) = max(z, 0) + log1p(exp(−|z|))`, which never overflows, and `σ` is evaluated on the
//! side where `exp` cannot overflow. A response length of 0 (possible only for an empty, fully
//! truncated response) is treated as 1 by the length-normalised objectives (SimPO, RPO,
//! sigmoid_norm, ORPO, CPO's ipo and simpo), so that they stay finite; the log-prob of such a
//! response is 0 anyway (and `sft`'s token count is at least 1).

mod batch;
mod math;
mod modifiers;
mod objectives;
mod params;
mod state;
mod text;
mod unpaired;

pub use batch::{batch_loss, batch_loss_with, pair_loss};
pub use math::{
    f_divergence_score, log1mexp, log_sigmoid, sigmoid, softplus, PairInput, PairOutput, ORPO_MAX_MEAN_LOGP,
    PAIR_METRICS,
};
pub use modifiers::{batch_loss_parts, PairParts, PartsOutput, SharedSplit};
pub use objectives::{
    Combination, FDivergence, Kto, KtoLoss, Objective, ObjectiveSpec, ALPHA_DIVERGENCE_MAX_EXPONENT,
    DEFAULT_ALPHA_DIVERGENCE_COEF, NO_LD_ALPHA, UNPAIRED,
};
pub use params::{canonical_param, Bound, Param, PARAM_ALIASES};
pub use state::{LossState, RunningMean};
pub use text::{parse_terms, unknown_key, MODIFIER_KEYS};
pub use unpaired::{kl_estimate, unpaired_loss, ExampleInput, ExampleOutput, EXAMPLE_METRICS};
