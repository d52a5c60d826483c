//! The loss of a batch of pairs ([`batch_loss`]): each term of the objective (one, unless it is a
//! [`Combination`]) on every pair, weighted and summed. A term is its per-pair part
//! ([`pairwise`]), rearranged for the objectives that sort across the batch (AOT, whose sorted
//! positions pair one pair's policy value with another pair's reference or rejected value), plus
//! its `sft` part (the chosen responses' token-mean NLL over the batch) where it has one.
//!
//! [`Combination`]: crate::loss::Combination

use super::math::{aot_keys, label_smoothed, length_divisor, pairwise, rewards, Modifiers, PairInput, PairOutput};
use super::objectives::Objective;
use super::state::LossState;

/// The loss of one pair under `objective`: [`batch_loss`] of a batch of this one pair.
/// The CPU twin of the preference-loss kernel.
///
/// `shift = sΔ` is the SafeDAA safety shift (see [`crate::loss`]): subtracted from the logit `z` of
/// the objectives built on a preference logit, added to the rejected reward of the others. Most
/// objectives are a function `f(z)` of `z = βh − sΔ`; then `dL/dπc = β f'(z)` and
/// `dL/dπr = −β f'(z)`. The batch-level objectives (AOT's sort, the `sft` term's token mean) give
/// here the loss of a batch of this one pair.
pub fn pair_loss(objective: &Objective, p: &PairInput) -> PairOutput {
    batch_loss(objective, std::slice::from_ref(p)).remove(0)
}

/// The outputs of a batch, one per pair, in the order of `pairs`, with the trainer state at its
/// start (before any step): see [`batch_loss_with`].
pub fn batch_loss(objective: &Objective, pairs: &[PairInput]) -> Vec<PairOutput> {
    batch_loss_with(objective, pairs, &LossState::default())
}

/// The outputs of a batch, one per pair, in the order of `pairs`, under the trainer state `state`
/// (`bco_pair`'s running reward mean, already updated with this batch: see [`LossState`]).
///
/// Row i's loss is `Σ_k w_k L_k,i` over the terms k (weights `w_k`, 1 for a single objective) and its
/// gradients those of `Σ_i` of it; its rewards, margin and accuracy are the first term's, pair i's
/// own. Term by term:
///
/// - for the objectives that sort (`aot`, `aot_unpaired`), with `(a_i, b_i)` pair i's two sort keys
///   (see the objectives' docs) and `a_(k)`, `b_(k)` the k-th smallest of each: position k's loss is
///   `f(z_k)`, `z_k = β (a_(k) − b_(k))`, and is written as the loss of row k (so the rows' mean is
///   TRL's batch mean, but row k's loss is not pair k's own); the gradient of `f(z_k)` goes to the
///   pairs that hold `a_(k)` and `b_(k)` (for `aot`, whose `b` is the reference's, only the first).
///   Ties are ranked by position in the batch (a stable sort), as the kernel ranks them.
/// - the `sft` part (`sft` itself, `orpo`, the CPO objectives weighted by `cpo_alpha`): every row
///   gets the batch's `−Σ πc / Σ |yc|` (TRL's scalar, expanded to every pair), so the gradient of the
///   rows' sum is `−P / Σ |yc|` for each chosen log-prob (P pairs; the token count at least 1).
/// - every other term is pair by pair ([`crate::loss::pair_loss`]).
///
/// An objective with TRL's log-prob modifiers (`ld_alpha`, `use_weighting`) needs more than the
/// sequence log-probs: see [`crate::loss::batch_loss_parts`], which this refuses them for.
pub fn batch_loss_with(objective: &Objective, pairs: &[PairInput], state: &LossState) -> Vec<PairOutput> {
    assert!(
        objective.ld_alpha().is_none() && !objective.uses_weighting(),
        "{objective}: ld_alpha and use_weighting read the log-probs' parts (batch_loss_parts)"
    );
    let plain: Vec<f64> = pairs.iter().map(|p| p.policy_chosen).collect();
    weighted_terms(objective, pairs, &plain, None, false, state).into_iter().map(|(out, _)| out).collect()
}

/// A gradient in the log-prob the terms read plus, where a term has one, the NLL parts' gradient in
/// the plain log-prob: their sum when both are the same log-prob. (Without an NLL part nothing is
/// added, so that a −0 stays −0.)
pub(super) fn combined(d_read: f64, d_plain: Option<f64>) -> f64 {
    match d_plain {
        Some(d) => d_read + d,
        None => d_read,
    }
}

/// The rows of a batch under `objective`'s terms, each weighted: its output, with `d_policy_*` the
/// gradient in the log-probs of `pairs` (which the terms read, with the rewards). The NLL parts (the
/// `sft` term, `orpo`'s, CPO's, RPO's) read `plain` instead, the chosen responses' plain log-probs;
/// with `separate_plain` their gradient is returned apart (`None` when no term has one), else each
/// term's is added to its `d_policy_chosen` (`plain` and the chosen log-probs of `pairs` are then
/// the same values). `pair_weights` (WPO's, detached) multiply every term's per-pair loss: row i's
/// per-pair parts by `w_i`, and the batch's NLL, written on row i times `w_i`, has the gradient
/// `Σ_i w_i · dNLL` in each chosen log-prob.
pub(super) fn weighted_terms(
    objective: &Objective,
    pairs: &[PairInput],
    plain: &[f64],
    pair_weights: Option<&[f64]>,
    separate_plain: bool,
    state: &LossState,
) -> Vec<(PairOutput, Option<f64>)> {
    let modifiers = match objective {
        Objective::Combination(c) => Modifiers { f_divergence: c.f_divergence, bco_shift: state.bco_shift(objective) },
        _ => Modifiers::default(),
    };
    let mut out: Vec<(PairOutput, Option<f64>)> = Vec::new();
    for (k, (weight, term)) in objective.terms().into_iter().enumerate() {
        let mut rows = term_rows(term, pairs, plain, pair_weights, &modifiers);
        if !separate_plain {
            for row in rows.iter_mut() {
                row.d_chosen = combined(row.d_chosen, row.d_plain.take());
            }
        }
        if k == 0 {
            out = rows
                .iter()
                .zip(pairs)
                .map(|(row, p)| {
                    let (reward_chosen, reward_rejected) = rewards(term, p);
                    let output = PairOutput {
                        loss: weight * row.loss,
                        d_policy_chosen: weight * row.d_chosen,
                        d_policy_rejected: weight * row.d_rejected,
                        reward_chosen,
                        reward_rejected,
                        margin: reward_chosen - reward_rejected,
                        accuracy: if reward_chosen > reward_rejected { 1.0 } else { 0.0 },
                    };
                    (output, row.d_plain.map(|d| weight * d))
                })
                .collect();
        } else {
            for ((o, d_plain), row) in out.iter_mut().zip(&rows) {
                o.loss += weight * row.loss;
                o.d_policy_chosen += weight * row.d_chosen;
                o.d_policy_rejected += weight * row.d_rejected;
                if let Some(d) = row.d_plain {
                    *d_plain = Some(d_plain.unwrap_or(0.0) + weight * d);
                }
            }
        }
    }
    out
}

/// One term's row: its loss, its gradient in the log-probs it reads, and its NLL part's gradient in
/// the plain chosen log-prob (`None` without one).
struct TermRow {
    loss: f64,
    d_chosen: f64,
    d_rejected: f64,
    d_plain: Option<f64>,
}

/// One single objective's rows over the batch (see [`weighted_terms`]).
fn term_rows(
    term: &Objective,
    pairs: &[PairInput],
    plain: &[f64],
    pair_weights: Option<&[f64]>,
    modifiers: &Modifiers,
) -> Vec<TermRow> {
    let mut rows: Vec<TermRow> = pairs
        .iter()
        .zip(plain)
        .map(|(p, &plain_chosen)| {
            let (mut loss, d_chosen, d_rejected) = pairwise(term, p, modifiers);
            let mut d_plain = None;
            if let Objective::Rpo { alpha, .. } = *term {
                // RPO's NLL term reads the log-prob itself, not its score (nor LD's).
                let chosen_len = length_divisor(p.chosen_len);
                loss += alpha * (-plain_chosen / chosen_len);
                d_plain = Some(-(alpha / chosen_len));
            }
            TermRow { loss, d_chosen, d_rejected, d_plain }
        })
        .collect();
    if let Objective::Aot { beta, eps, .. } | Objective::AotUnpaired { beta, eps, .. } = *term {
        let (first, second): (Vec<f64>, Vec<f64>) = pairs.iter().map(|p| aot_keys(term, p)).unzip();
        let (by_first, by_second) = (sorted_order(&first), sorted_order(&second));
        for k in 0..pairs.len() {
            let (i, j) = (by_first[k], by_second[k]);
            let (loss, dz) = label_smoothed(beta * (first[i] - second[j]), eps);
            rows[k].loss = loss;
            match term {
                // a = πc − πr: pair i's both sides; b is the reference's.
                Objective::Aot { .. } => (rows[i].d_chosen, rows[i].d_rejected) = (beta * dz, -(beta * dz)),
                // a = chosen log-ratio of pair i, b = rejected log-ratio of pair j.
                _ => (rows[i].d_chosen, rows[j].d_rejected) = (beta * dz, -(beta * dz)),
            }
        }
    }
    if let Some(weights) = pair_weights {
        // WPO: the pair's own parts (the sorting objectives are refused with it).
        for (row, &w) in rows.iter_mut().zip(weights) {
            (row.loss, row.d_chosen, row.d_rejected) = (w * row.loss, w * row.d_chosen, w * row.d_rejected);
            row.d_plain = row.d_plain.map(|d| w * d);
        }
    }
    let nll_weight = term.nll_weight();
    if nll_weight > 0.0 && !pairs.is_empty() {
        let (nll, tokens) = chosen_nll(plain, pairs);
        // The gradient of the rows' NLL copies, Σ_i w_i · (−1/Σ|yc|) (w_i = 1 without WPO).
        let d_chosen = match pair_weights {
            None => -(pairs.len() as f64) / tokens,
            Some(weights) => -weights.iter().sum::<f64>() / tokens,
        };
        for (i, row) in rows.iter_mut().enumerate() {
            row.loss += match pair_weights {
                None => nll_weight * nll,
                Some(weights) => weights[i] * (nll_weight * nll),
            };
            row.d_plain = Some(combined(nll_weight * d_chosen, row.d_plain));
        }
    }
    rows
}

/// The `sft` part: the batch's token-mean NLL of the chosen responses `−Σ πc / Σ |yc|` (`plain`
/// holds the `πc`), and the token count `Σ |yc|` (at least 1); each chosen log-prob's derivative of
/// the `P` copies of it (one per row) is `−P / Σ |yc|`.
fn chosen_nll(plain: &[f64], pairs: &[PairInput]) -> (f64, f64) {
    let tokens = length_divisor(pairs.iter().map(|p| p.chosen_len).sum());
    let logps: f64 = plain.iter().sum();
    (-logps / tokens, tokens)
}

/// `order[k]` = the index of the k-th smallest key, ties in index order: the rank of key i is the
/// number of keys below it plus the number of equal keys before it.
fn sorted_order(keys: &[f64]) -> Vec<usize> {
    let mut order = vec![0; keys.len()];
    for (i, &key) in keys.iter().enumerate() {
        let rank = keys.iter().enumerate().filter(|&(j, &other)| other < key || (other == key && j < i)).count();
        order[rank] = i;
    }
    order
}
