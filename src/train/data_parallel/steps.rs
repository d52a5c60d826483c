//! The steps of a data-parallel rank: preference pairs (with `bco_running_mean`'s running mean
//! replayed over the whole step), SFT and the unpaired objectives. Each draws the step's
//! micro-batches as a run alone does, keeps its share ([`assign_greedy`] by tokens), runs the same
//! gradients code on it with the whole step's normalisation, sums the metrics over the ranks and
//! applies the group's update ([`GroupRank::update`]).

use anyhow::{bail, Context, Result};

use super::{assign_greedy, GroupRank};
use crate::backend::Backend;
use crate::data::{PackedBatch, UnpairedBatch};
use crate::loss::LossState;
use crate::train::metrics::PairStats;
use crate::train::step::{check_loss, MicroBatch, MicroOutput, StepInfo};
use crate::train::unpaired::{ExampleStats, UnpairedMicroBatch};
use crate::train::Trainer;

/// A step's pair statistics as host values for `all_reduce_host` (the counts are exact in f64).
fn stats_to_values(s: &PairStats) -> Vec<f64> {
    vec![
        s.pairs as f64,
        s.loss,
        s.reward_chosen,
        s.reward_rejected,
        s.margin,
        s.accuracy,
        s.logp_chosen,
        s.logp_rejected,
        s.mixed_pairs as f64,
        s.safe_preferred,
    ]
}

fn stats_from_values(v: &[f64]) -> PairStats {
    PairStats {
        pairs: v[0] as usize,
        loss: v[1],
        reward_chosen: v[2],
        reward_rejected: v[3],
        margin: v[4],
        accuracy: v[5],
        logp_chosen: v[6],
        logp_rejected: v[7],
        mixed_pairs: v[8] as usize,
        safe_preferred: v[9],
    }
}

impl<B: Backend> GroupRank<B> {
    /// This rank's share of a step's micro-batches, in order, and where each of the step's went.
    fn share<T>(&self, batches: Vec<T>, tokens: impl Fn(&T) -> usize) -> (Vec<T>, Vec<usize>) {
        let assigned = assign_greedy(batches.iter().map(tokens), self.world_size());
        let mine = batches.into_iter().zip(&assigned).filter(|(_, &to)| to == self.rank()).map(|(b, _)| b).collect();
        (mine, assigned)
    }

    /// `bco_running_mean` on N ranks: the running mean replayed on every rank over the whole step's
    /// micro-batches in order, from each micro-batch's reward sample (`samples`: this rank's, in the
    /// order of its share; the others' arrive by `all_reduce_host`, each slot written by one rank, so
    /// the sum is its value exactly). Returns the state each of this rank's micro-batches reads, as a
    /// run alone has it before that micro-batch's loss, and the state after the step.
    fn replay_running_mean(
        &self,
        start: LossState,
        samples: &[Option<f64>],
        assigned: &[usize],
    ) -> Result<(Vec<LossState>, LossState)> {
        let mine: Vec<usize> = (0..assigned.len()).filter(|&k| assigned[k] == self.rank()).collect();
        // Per micro-batch of the step: whether it has a sample, and the sample.
        let mut slots = vec![0.0; 2 * assigned.len()];
        for (&k, sample) in mine.iter().zip(samples) {
            if let Some(sample) = sample {
                (slots[2 * k], slots[2 * k + 1]) = (1.0, *sample);
            }
        }
        self.group.all_reduce_host(&mut slots).context("sharing the step's bco rewards")?;
        let (mut state, mut states) = (start, Vec::with_capacity(mine.len()));
        for (k, &to) in assigned.iter().enumerate() {
            if slots[2 * k] > 0.0 {
                state.add_reward_sample(slots[2 * k + 1]);
            }
            if to == self.rank() {
                states.push(state);
            }
        }
        Ok((states, state))
    }
}

/// The group a rank trains in, after the failure-injection hook (`fail_at`) of step `step`.
fn rank_for_step<B: Backend>(
    group: &Option<GroupRank<B>>,
    fail_at: Option<usize>,
    step: usize,
) -> Result<&GroupRank<B>> {
    let rank = group.as_ref().context("a data-parallel step outside a group")?;
    if fail_at == Some(step) {
        bail!("rank {}: injected failure at step {step}", rank.rank());
    }
    Ok(rank)
}

impl<B: Backend> Trainer<B> {
    /// [`Trainer::preference_step`] as one rank of the group: this rank's share of the step's
    /// micro-batches, the gradients and metrics summed over the ranks.
    pub(in crate::train) fn preference_step_in_group(&mut self) -> Result<StepInfo> {
        let limit = self.cfg.batching.limit();
        let batches: Vec<_> =
            (0..self.cfg.batching.grad_accum).map(|_| self.batcher.next_batch_under(&self.data.train, limit)).collect();
        let pairs: usize = batches.iter().map(|b| b.num_pairs()).sum();
        let tokens: usize = batches.iter().map(|b| b.packed.num_tokens()).sum();
        let rank = rank_for_step(&self.group, self.opts.fail_at_step, self.step + 1)?;
        let (mine, assigned) = rank.share(batches, |b| b.packed.num_tokens());
        let backend = self.backend.clone();
        let micro = mine.into_iter().map(|batch| MicroBatch::upload(&*backend, batch)).collect::<Result<Vec<_>>>()?;
        let lr = self.next_lr();
        let (states, end_state) = match LossState::is_read_by(&self.learner.objective) {
            true => {
                let samples = self.learner.bco_reward_samples(&micro)?;
                let (states, end) = rank.replay_running_mean(self.learner.loss_state, &samples, &assigned)?;
                (Some(states), Some(end))
            }
            false => (None, None),
        };
        let mut stats = PairStats::default();
        let each = |batch: &MicroBatch<B>, out: MicroOutput| {
            stats.add_batch(&out.metrics, &out.logps, &batch.host.unsafe_flags)
        };
        let loss_sum = self.learner.preference_gradients(&micro, pairs, states.as_deref(), each, &mut |_| Ok(()))?;
        if let Some(end) = end_state {
            self.learner.loss_state = end;
        }
        let mut sums = stats_to_values(&stats);
        sums.push(loss_sum);
        rank.group.all_reduce_host(&mut sums).context("summing the step's metrics")?;
        let loss = sums[sums.len() - 1] / pairs as f64;
        check_loss(self.step + 1, loss, f64::INFINITY)?;
        self.interval.stats.merge(&stats_from_values(&sums));
        self.interval.tokens += tokens;
        self.train_tokens += tokens;
        let info = rank.update(&mut self.learner, lr)?;
        Ok(StepInfo { loss: Some(loss), ..info })
    }

    /// SFT's step as one rank of the group: this rank's share of the micro-batches (`targets`: the
    /// whole step's target tokens), the negative log-likelihood summed over the ranks.
    pub(in crate::train) fn sft_step_in_group(&mut self, micro: Vec<PackedBatch>, targets: usize) -> Result<StepInfo> {
        let tokens: usize = micro.iter().map(PackedBatch::num_tokens).sum();
        let rank = rank_for_step(&self.group, self.opts.fail_at_step, self.step + 1)?;
        let (mine, _) = rank.share(micro, PackedBatch::num_tokens);
        let mut nll = [0.0];
        self.learner.sft_gradients(&mine, targets, |_, batch_nll| nll[0] += batch_nll)?;
        rank.group.all_reduce_host(&mut nll).context("summing the step's loss")?;
        self.interval.nll += nll[0];
        self.interval.nll_tokens += targets;
        self.interval.tokens += tokens;
        self.train_tokens += tokens;
        let loss = nll[0] / targets as f64;
        check_loss(self.step + 1, loss, f64::INFINITY)?;
        let lr = self.next_lr();
        Ok(StepInfo { loss: Some(loss), ..rank.update(&mut self.learner, lr)? })
    }

    /// The unpaired objectives' step as one rank of the group. Each micro-batch keeps its own KL
    /// estimate (its KL sequences are its own), as in a run alone; the metrics are summed over the
    /// ranks.
    pub(in crate::train) fn unpaired_step_in_group(&mut self, batches: Vec<UnpairedBatch>) -> Result<StepInfo> {
        let examples: usize = batches.iter().map(UnpairedBatch::num_examples).sum();
        let tokens: usize = batches.iter().map(UnpairedBatch::num_tokens).sum();
        let rank = rank_for_step(&self.group, self.opts.fail_at_step, self.step + 1)?;
        let (mine, _) = rank.share(batches, UnpairedBatch::num_tokens);
        let backend = self.backend.clone();
        let micro =
            mine.into_iter().map(|batch| UnpairedMicroBatch::upload(&*backend, batch)).collect::<Result<Vec<_>>>()?;
        let lr = self.next_lr();
        let mut stats = ExampleStats::default();
        self.learner.unpaired_gradients(&micro, examples, |batch, output| stats.add(batch, output))?;
        let mut sums = stats.to_values();
        rank.group.all_reduce_host(&mut sums).context("summing the step's metrics")?;
        self.interval.examples.merge(&ExampleStats::from_values(&sums));
        self.interval.tokens += tokens;
        self.train_tokens += tokens;
        rank.update(&mut self.learner, lr)
    }
}
