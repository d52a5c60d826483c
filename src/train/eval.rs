//! Evaluation on fixed data: the preference metrics of held-out pairs ([`evaluate_pairs`]) and the
//! negative log-likelihood of their chosen responses ([`evaluate_nll`]).

use anyhow::{ensure, Result};

use super::metrics::PairStats;
use super::refcache::chunk_pairs;
use crate::backend::{Backend, PAIR_METRICS};
use crate::data::{preference_batch, sft_batch, TokenizedPair};
use crate::loss::{LossState, Objective};
use crate::model::{Decoder, DeviceBatch};

/// Evaluates `policy` on fixed pairs whose reference log-probs `[2P]` are given (zeros for a
/// reference-free objective), at the loss state before any step.
pub fn evaluate_pairs<B: Backend>(
    policy: &mut Decoder<B>,
    reference: &[f32],
    pairs: &[TokenizedPair],
    objective: &Objective,
    token_budget: usize,
) -> Result<PairStats> {
    evaluate_pairs_with(policy, reference, pairs, objective, &LossState::default(), token_budget)
}

/// [`evaluate_pairs`] at the trainer's loss state `state` (read, not updated: evaluation does not
/// move `bco_pair`'s running mean).
pub fn evaluate_pairs_with<B: Backend>(
    policy: &mut Decoder<B>,
    reference: &[f32],
    pairs: &[TokenizedPair],
    objective: &Objective,
    state: &LossState,
    token_budget: usize,
) -> Result<PairStats> {
    objective.require_pairwise("evaluating pairs")?;
    ensure!(reference.len() == 2 * pairs.len(), "{} reference log-probs for {} pairs", reference.len(), pairs.len());
    let backend = policy.backend().clone();
    let b = &*backend;
    let mut stats = PairStats::default();
    for ids in chunk_pairs(pairs, token_budget) {
        let batch = preference_batch(pairs, &ids);
        let dev = DeviceBatch::upload(b, &batch.packed)?;
        let host_ref: Vec<f32> = ids.iter().flat_map(|&i| [reference[2 * i], reference[2 * i + 1]]).collect();
        let reference = b.upload(&host_ref)?;
        let flags = b.upload_ids(&batch.unsafe_flags)?;
        let lengths = b.upload_ids(&batch.lengths)?;
        let mut metrics = b.zeros(ids.len() * PAIR_METRICS)?;
        let mut dpolicy = b.zeros(2 * ids.len())?;
        let logps = policy.forward(&dev)?;
        b.preference_loss_with(&mut metrics, &mut dpolicy, logps, &reference, &flags, &lengths, objective, state, 1.0)?;
        let host_logps = b.download(logps)?;
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
