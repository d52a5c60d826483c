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
pub fn batch_loss_with(objective: &Objective, pairs: &[PairInput], state: &LossState) -> Vec<PairOutput> {
    let modifiers = match objective {
        Objective::Combination(c) => Modifiers { f_divergence: c.f_divergence, bco_shift: state.bco_shift(objective) },
        _ => Modifiers::default(),
    };
    let mut out: Vec<PairOutput> = Vec::new();
    for (k, (weight, term)) in objective.terms().into_iter().enumerate() {
        let rows = term_rows(term, pairs, &modifiers);
        if k == 0 {
            out = rows
                .iter()
                .zip(pairs)
                .map(|(&(loss, d_chosen, d_rejected), p)| {
                    let (reward_chosen, reward_rejected) = rewards(term, p);
                    PairOutput {
                        loss: weight * loss,
                        d_policy_chosen: weight * d_chosen,
                        d_policy_rejected: weight * d_rejected,
                        reward_chosen,
                        reward_rejected,
                        margin: reward_chosen - reward_rejected,
                        accuracy: if reward_chosen > reward_rejected { 1.0 } else { 0.0 },
                    }
                })
                .collect();
        } else {
            for (o, &(loss, d_chosen, d_rejected)) in out.iter_mut().zip(&rows) {
                o.loss += weight * loss;
                o.d_policy_chosen += weight * d_chosen;
                o.d_policy_rejected += weight * d_rejected;
            }
        }
    }
    out
}

/// One single objective's rows (loss, dΣL/dπc, dΣL/dπr) over the batch.
fn term_rows(term: &Objective, pairs: &[PairInput], modifiers: &Modifiers) -> Vec<(f64, f64, f64)> {
    let mut rows: Vec<(f64, f64, f64)> = pairs.iter().map(|p| pairwise(term, p, modifiers)).collect();
    if let Objective::Aot { beta, eps, .. } | Objective::AotUnpaired { beta, eps, .. } = *term {
        let (first, second): (Vec<f64>, Vec<f64>) = pairs.iter().map(|p| aot_keys(term, p)).unzip();
        let (by_first, by_second) = (sorted_order(&first), sorted_order(&second));
        for k in 0..pairs.len() {
            let (i, j) = (by_first[k], by_second[k]);
            let (loss, dz) = label_smoothed(beta * (first[i] - second[j]), eps);
            rows[k].0 = loss;
            match term {
                // a = πc − πr: pair i's both sides; b is the reference's.
                Objective::Aot { .. } => (rows[i].1, rows[i].2) = (beta * dz, -(beta * dz)),
                // a = chosen log-ratio of pair i, b = rejected log-ratio of pair j.
                _ => (rows[i].1, rows[j].2) = (beta * dz, -(beta * dz)),
            }
        }
    }
    let nll_weight = term.nll_weight();
    if nll_weight > 0.0 && !pairs.is_empty() {
        let (nll, d_chosen) = chosen_nll(pairs);
        for row in rows.iter_mut() {
            row.0 += nll_weight * nll;
            row.1 += nll_weight * d_chosen;
        }
    }
    rows
}

/// The `sft` part: the batch's token-mean NLL of the chosen responses `−Σ πc / Σ |yc|`, and the
/// derivative of `P` copies of it (one per row) in each chosen log-prob, `−P / Σ |yc|` (the token
/// count at least 1).
pub(super) fn chosen_nll(pairs: &[PairInput]) -> (f64, f64) {
    let tokens = length_divisor(pairs.iter().map(|p| p.chosen_len).sum());
    let logps: f64 = pairs.iter().map(|p| p.policy_chosen).sum();
    (-logps / tokens, -(pairs.len() as f64) / tokens)
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
