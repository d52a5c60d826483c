//! Evaluation on fixed data: the preference metrics of held-out pairs ([`evaluate_pairs`]) and the
//! negative log-likelihood of their chosen responses ([`evaluate_nll`]).

use anyhow::{ensure, Result};

use super::metrics::PairStats;
use super::refcache::{chunk_pairs, ReferenceLogps};
use crate::backend::{Backend, LogpParts, PreferenceLossInputs, PAIR_METRICS};
use crate::data::{preference_batch, sft_batch, TokenizedPair};
use crate::loss::{LossState, Objective};
use crate::model::{Decoder, DeviceBatch, ForwardExtras, RowSplit};

/// Evaluates `policy` on fixed pairs whose reference log-probs `[2P]` are given (zeros for a
/// reference-free objective), at the loss state before any step. An objective with `ld_alpha`
/// needs the reference's split too: [`evaluate_pairs_with`].
pub fn evaluate_pairs<B: Backend>(
    policy: &mut Decoder<B>,
    reference: &[f32],
    pairs: &[TokenizedPair],
    objective: &Objective,
    token_budget: usize,
) -> Result<PairStats> {
    let reference = ReferenceLogps::totals(reference.to_vec());
    evaluate_pairs_with(policy, &reference, pairs, objective, &LossState::default(), token_budget)
}

/// [`evaluate_pairs`] at the trainer's loss state `state` (read, not updated: evaluation does not
/// move `bco_pair`'s running mean), with the reference's log-probs and, for `ld_alpha`, their split
/// (`refcache::sequence_logp_parts`).
pub fn evaluate_pairs_with<B: Backend>(
    policy: &mut Decoder<B>,
    reference: &ReferenceLogps,
    pairs: &[TokenizedPair],
    objective: &Objective,
    state: &LossState,
    token_budget: usize,
) -> Result<PairStats> {
    objective.require_pairwise("evaluating pairs")?;
    let totals = reference.totals.len();
    ensure!(totals == 2 * pairs.len(), "{totals} reference log-probs for {} pairs", pairs.len());
    let ld = objective.ld_alpha().is_some();
    ensure!(
        !(ld && objective.uses_reference()) || reference.split.len() == 4 * pairs.len(),
        "objective {objective} has ld_alpha: evaluating it needs the reference log-probs split at each pair's shared \
         length (refcache::sequence_logp_parts)"
    );
    let backend = policy.backend().clone();
    let b = &*backend;
    let mut stats = PairStats::default();
    for ids in chunk_pairs(pairs, token_budget) {
        let batch = preference_batch(pairs, &ids);
        let dev = DeviceBatch::upload(b, &batch.packed)?;
        let host_ref = reference.of_pairs(&ids);
        let reference = b.upload(&host_ref.totals)?;
        let reference_split = if ld { Some(b.upload(&host_ref.split)?) } else { None };
        let split = if ld { Some(RowSplit::shared_length(b, &dev)?) } else { None };
        let flags = b.upload_ids(&batch.unsafe_flags)?;
        let lengths = b.upload_ids(&batch.lengths)?;
        let mut metrics = b.zeros(ids.len() * PAIR_METRICS)?;
        let mut grads = b.zeros(if ld { 4 * ids.len() } else { 2 * ids.len() })?;
        let extras = ForwardExtras { split: split.as_ref(), aligned: objective.uses_weighting() };
        let logps = policy.forward_with(&dev, &extras)?;
        let inputs = PreferenceLossInputs {
            parts: LogpParts {
                policy_split: logps.split,
                reference_split: reference_split.as_ref(),
                policy_aligned: logps.aligned,
            },
            state: *state,
            ..PreferenceLossInputs::pairs(logps.total, &reference, &flags, &lengths, objective)
        };
        b.preference_loss(&mut metrics, &mut grads, &inputs)?;
        let host_logps = super::step::loss_read_logps(b, logps.total, logps.split, objective.ld_alpha())?;
        stats.add_batch(&b.download(&metrics)?, &host_logps, &batch.unsafe_flags);
    }
    Ok(stats)
}

/// The summed negative log-likelihood of the chosen responses of `pairs` and their token count.
pub fn evaluate_nll<B: Backend>(
    model: &mut Decoder<B>,
    pairs: &[TokenizedPair],
    token_budget: usize,
) -> Result<(f64, usize)> {
    let backend = model.backend().clone();
    let (mut nll, mut tokens) = (0.0, 0);
    for ids in chunk_pairs(pairs, token_budget) {
        let packed = sft_batch(pairs, &ids);
        tokens += (0..packed.num_seqs()).map(|s| packed.num_targets(s)).sum::<usize>();
        let dev = DeviceBatch::upload(&*backend, &packed)?;
        let logps = model.forward(&dev)?;
        nll -= backend.download(logps)?.iter().map(|&x| x as f64).sum::<f64>();
    }
    Ok((nll, tokens))
}
