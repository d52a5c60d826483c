//! The loss of a batch of pairs ([`batch_loss`]): [`pair_loss`] of each pair, except for the objectives
//! that sort across the batch (AOT), whose sorted positions pair one pair's policy value with
//! another pair's reference (or rejected) value.

use super::math::{aot_keys, label_smoothed, pair_loss, PairInput, PairOutput};
use super::objectives::Objective;

/// The outputs of a batch, one per pair, in the order of `pairs`.
///
/// For the objectives that sort (`objective.sorts_batch()`: `aot`, `aot_unpaired`), with
/// `(a_i, b_i)` pair i's two sort keys (see the objectives' docs) and `a_(k)`, `b_(k)` the k-th
/// smallest of each: position k's loss is `f(z_k)`, `z_k = β (a_(k) − b_(k))`, and is written as the
/// loss of row k (so the rows' mean is TRL's batch mean, but row k's loss is not pair k's own); the
/// gradient of `f(z_k)` goes to the pairs that hold `a_(k)` and `b_(k)` (for `aot`, whose `b` is the
/// reference's, only the first). Rewards, margin and accuracy stay each pair's own. Ties are ranked by
/// position in the batch (a stable sort), as the kernel ranks them.
pub fn batch_loss(objective: &Objective, pairs: &[PairInput]) -> Vec<PairOutput> {
    let mut out: Vec<PairOutput> = pairs.iter().map(|p| pair_loss(objective, p)).collect();
    let (Objective::Aot { beta, eps, .. } | Objective::AotUnpaired { beta, eps, .. }) = *objective else {
        return out;
    };
    let (first, second): (Vec<f64>, Vec<f64>) = pairs.iter().map(|p| aot_keys(objective, p)).unzip();
    let (by_first, by_second) = (sorted_order(&first), sorted_order(&second));
    for k in 0..pairs.len() {
        let (i, j) = (by_first[k], by_second[k]);
        let (loss, dz) = label_smoothed(beta * (first[i] - second[j]), eps);
        out[k].loss = loss;
        match objective {
            // a = πc − πr: pair i's both sides; b is the reference's.
            Objective::Aot { .. } => (out[i].d_policy_chosen, out[i].d_policy_rejected) = (beta * dz, -(beta * dz)),
            // a = chosen log-ratio of pair i, b = rejected log-ratio of pair j.
            _ => (out[i].d_policy_chosen, out[j].d_policy_rejected) = (beta * dz, -(beta * dz)),
        }
    }
    out
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
