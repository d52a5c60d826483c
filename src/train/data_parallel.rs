//! Data-parallel training: the same run on every rank of a [`Collective`] group, each rank taking its
//! share of every step's micro-batches.
//!
//! One step on `N` ranks:
//! 1. every rank draws the step's `grad_accum` micro-batches from the same batcher (same data order,
//!    same seed) and keeps its share: micro-batch by micro-batch in order, each to the rank with the
//!    fewest tokens so far (ties to the lower rank), so the split depends only on the batches;
//! 2. each rank's backward on its share with `grad_scale = 1 / (the step's pairs over all ranks)`;
//!    a rank without a micro-batch contributes zero gradients and still joins every collective;
//! 3. the gradients summed over the ranks (rank order), the global grad norm from per-owner partial
//!    sums of squares (see below), the clip scale and AdamW: the same update on every rank;
//! 4. the loss and the metric sums reduced with `all_reduce_host`, so the logged metrics are those of
//!    the whole step.
//!
//! **ZeRO-1** (`[train] zero_stage = 1`, DeepSpeed's name for the stage): each parameter tensor has
//! an owner rank (largest tensors first, each to the rank holding the fewest elements so far);
//! gradients are `reduce_sum`med to the owner only, the owner keeps AdamW's moments and (in bf16)
//! the fp32 master of its tensors and updates them, and broadcasts the new values (the bf16 values
//! only: the other ranks keep no master of a tensor they do not own). Checkpoints gather the
//! owners' masters to rank 0. The grad norm is
//! the rank-order sum of the owners' sums of squares in both modes, so ZeRO-1 and plain data
//! parallelism give bit-identical weights.
//!
//! Rank 0 leads: it holds the out-dir lock, writes the config, `metrics.jsonl`, the plot and the
//! checkpoints (the optimizer state gathered to it under ZeRO-1, so a checkpoint is the same
//! consolidated HF directory as a run of one rank writes, and a resume may use any world size), and
//! evaluates; the other ranks write nothing into the out dir and print nothing.
//!
//! A rank runs whole micro-batches, so whatever an objective computes within one (a batch mean) is
//! what one rank would compute. Every task and objective runs on N ranks (the steps are in
//! `data_parallel/steps.rs`):
//! - **SFT**: each rank's share of the step's SFT micro-batches, `dL/d(seq logp) = −1 / T` with `T`
//!   the whole step's target tokens, the negative log-likelihood summed over the ranks.
//! - **The unpaired objectives** (KTO, `apo_zero_unpaired`): each rank's share of the micro-batches
//!   with `grad_scale = 1 / (the step's examples)`. KTO's KL estimate stays each micro-batch's own
//!   (the mean of `policy − reference` over its KL sequences, clamped at 0), as a run alone has it,
//!   so N ranks give one rank's update. TRL (`trl/trainer/kto_trainer.py`, `KTOTrainer._compute_loss`)
//!   differs on N processes: it gathers each process's micro-batch estimate
//!   (`accelerator.gather_for_metrics(kl).mean().clamp(min=0)`), so the N micro-batches a micro-step
//!   runs at once share their mean, clamped after the mean; its update depends on N, ours does not.
//!   One process of TRL with the step's micro-batches as gradient accumulation is what every world
//!   size here computes. The logged `kl` is the mean of the micro-batches' estimates, as alone.
//! - **`bco_running_mean`**: TRL's `RunningMoments.update` (`trl/trainer/utils.py`, with
//!   `get_global_statistics`) sums each process's sample (its micro-batch's mean reward) and count
//!   over the processes before it updates the mean, so every process sees every process's reward.
//!   Here each rank first runs the forwards of its share to get their samples
//!   ([`Learner::bco_reward_samples`]), the step's samples are summed into one vector by
//!   `all_reduce_host` (each slot written by one rank: exact), and every rank replays the running
//!   mean over the whole step's micro-batches in order, each micro-batch's loss reading the mean up to
//!   and including its own sample, as one rank does. The difference to TRL on N processes: TRL's N
//!   concurrent micro-batches all read the mean after all N samples (one update of count N); the
//!   mean after the step is the same sum of samples (TRL's update of count N is N single updates),
//!   rounded differently. The cost: one more forward of the policy (and the reference) per micro-batch.
//! - **TR-DPO** (`sync_ref_model`): every rank holds the same policy after each update, so each
//!   rank mixes it into its own reference (under ZeRO-1 the owners' fp32 masters brought to every
//!   rank first, [`Trainer::policy_weights`]); rank 0 saves the reference with its checkpoints and
//!   alone recomputes the held-out pairs' reference log-probs (it alone evaluates).
//!
//! Refused: `train.zero_stage` above 1.
//!
//! **Next: gradient all-reduce in buckets overlapped with the backward.** Today the reduction
//! starts after the last micro-batch's backward. The plan: the model's trainable tensors cut into
//! buckets in the backward's order (the last blocks and the head first, about 25 MB each, a fixed
//! plan made with the owners, so that every rank cuts the same), and the last micro-batch's
//! backward calling a hook once a bucket's gradients are final (the decoder's backward walks the
//! blocks in reverse, so block `l`'s gradients are final when its backward returns). The NCCL
//! collective launches each bucket's `all_reduce_sum` (ZeRO-1: `reduce_sum` to each owner) on its
//! own stream, ordered after the backward's stream by an event, while the backward continues; the
//! update waits for every bucket. The staged collectives keep their meaning: a bucket is a list of
//! tensors reduced in rank order, and a tensor's sum does not depend on which bucket or when, so
//! buckets give the same bits as one reduction of every tensor (the grad norm stays the rank-order
//! sum of the owners' sums of squares, computed after the last bucket). What it needs: a backward
//! hook in `model::Decoder` (per block), a second stream and events in the CUDA backend, and a
//! `Collective` method that starts a reduction and returns a handle to wait on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};

use super::checkpoint::resolve_resume;
use super::metrics::{MetricsLog, Record};
use super::rundir::RunDir;
use super::step::{Learner, StepInfo};
use super::{train, train_ranked, RunSummary, Task, TrainOptions, Trainer};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::dist::Collective;
use crate::model::{Decoder, HostWeights};
use crate::optim::{clip_scale_of, AdamW, AdamWConfig, STEP_KEY};

mod steps;

/// [`train`] as one rank of `group` (a group of one is plain [`train`]).
pub fn train_in_group<B: Backend>(
    backend: Arc<B>,
    cfg: &RunConfig,
    task: Task,
    opts: &TrainOptions,
    group: Arc<dyn Collective<B>>,
) -> Result<RunSummary> {
    if group.world_size() == 1 {
        return train(backend, cfg, task, opts);
    }
    check_data_parallel(cfg, group.world_size())?;
    let mut opts = opts.clone();
    if group.rank() != 0 {
        // One voice: rank 0 reports for the group.
        (opts.quiet, opts.progress) = (true, false);
    }
    let rank = GroupRank { group, zero: cfg.train.zero_stage == 1, owners: Vec::new(), tensors: Vec::new() };
    train_ranked(backend, cfg, task, &opts, Some(rank))
}

/// What cannot run on more than one rank, as an error naming the setting.
fn check_data_parallel(cfg: &RunConfig, world_size: usize) -> Result<()> {
    let why = |what: &str| format!("data-parallel training ({world_size} ranks): {what}");
    ensure!(
        cfg.train.zero_stage <= 1,
        why(&format!("train.zero_stage = {}: only 0 (off) and 1 (sharded optimizer state)", cfg.train.zero_stage))
    );
    Ok(())
}

/// This process's place in a data-parallel group, with the ZeRO-1 plan.
pub struct GroupRank<B: Backend> {
    group: Arc<dyn Collective<B>>,
    /// ZeRO-1: optimizer state only for the tensors this rank owns.
    zero: bool,
    /// The owner rank of each trainable tensor, in the model's order (set by [`new_optimizer`]).
    owners: Vec<usize>,
    /// Each trainable tensor's name and length, in the model's order.
    tensors: Vec<(String, usize)>,
}

impl<B: Backend> GroupRank<B> {
    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn world_size(&self) -> usize {
        self.group.world_size()
    }

    /// Indices of the tensors `owner` owns.
    fn owned_by(&self, owner: usize) -> impl Iterator<Item = usize> + '_ {
        self.owners.iter().enumerate().filter(move |(_, &o)| o == owner).map(|(i, _)| i)
    }

    /// Sums the gradients over the ranks (ZeRO-1: into each tensor's owner), clips by the global
    /// norm and applies AdamW (ZeRO-1: each owner its tensors, then broadcasts them).
    fn update(&self, learner: &mut Learner<B>, lr: f32) -> Result<StepInfo> {
        let backend = learner.policy.backend().clone();
        let b = &*backend;
        self.drop_foreign_masters(&mut learner.policy)?;
        let mut grads = learner.policy.grads_mut()?;
        ensure!(grads.len() == self.owners.len(), "data parallel: the model's tensors changed since the plan");
        if self.zero {
            for owner in 0..self.world_size() {
                let mut bucket: Vec<&mut B::Buf> =
                    grads.iter_mut().zip(&self.owners).filter(|(_, &o)| o == owner).map(|(g, _)| &mut **g).collect();
                self.group.reduce_sum(b, &mut bucket, owner).context("summing the gradients")?;
            }
        } else {
            self.group.all_reduce_sum(b, &mut grads).context("summing the gradients")?;
        }
        drop(grads);
        // Σ over owners in rank order of each owner's Σ g², the same in both modes (ZeRO-1 has the
        // reduced gradients only on their owner).
        let grads = learner.policy.grads()?;
        let partial = |owner: usize| -> Result<f64> {
            let owned: Vec<&B::Buf> = self.owned_by(owner).map(|i| grads[i]).collect();
            if owned.is_empty() {
                return Ok(0.0);
            }
            b.sum_squares(&owned).context("global grad norm")
        };
        let sum_squares = if self.zero {
            let mut sum = [partial(self.rank())?];
            self.group.all_reduce_host(&mut sum).context("summing the grad norm")?;
            sum[0]
        } else {
            (0..self.world_size()).try_fold(0.0, |sum, owner| Ok::<_, anyhow::Error>(sum + partial(owner)?))?
        };
        drop(grads);
        let (grad_norm, scale) = clip_scale_of(sum_squares, learner.grad_clip);
        let info = learner.apply_update(grad_norm, scale, lr)?;
        if self.zero {
            let mut params: Vec<&mut B::Buf> =
                learner.policy.params_and_grads_mut()?.into_iter().map(|(_, param, _)| param).collect();
            for owner in 0..self.world_size() {
                let mut bucket: Vec<&mut B::Buf> =
                    params.iter_mut().zip(&self.owners).filter(|(_, &o)| o == owner).map(|(p, _)| &mut **p).collect();
                self.group.broadcast_values(b, &mut bucket, owner).context("sharing the updated parameters")?;
            }
        }
        Ok(info)
    }

    /// ZeRO-1: frees the fp32 master copies of the parameters this rank does not own (bf16 on the
    /// CUDA backend; nothing to free elsewhere). Done when the plan is made and at every update (after
    /// a checkpoint, rank 0 holds every master for a moment).
    fn drop_foreign_masters(&self, policy: &mut Decoder<B>) -> Result<()> {
        if !self.zero {
            return Ok(());
        }
        let backend = policy.backend().clone();
        for ((_, param, _), &owner) in policy.params_and_grads_mut()?.into_iter().zip(&self.owners) {
            if owner != self.rank() {
                backend.drop_master(param);
            }
        }
        Ok(())
    }

    /// ZeRO-1: each owner's exact parameters (its fp32 masters in bf16) broadcast from it and taken
    /// into rank 0's parameters (`everywhere`: every rank's), so that the checkpoint rank 0 writes
    /// holds them (a resume is then bit-exact), or TR-DPO's reference sync mixes them on every rank.
    /// Ranks that keep nothing hold one owner's share at a time, briefly; the masters taken in are
    /// dropped again at the next update.
    fn gather_masters(&self, b: &B, policy: &mut Decoder<B>, everywhere: bool) -> Result<()> {
        let mut params: Vec<&mut B::Buf> = policy.params_and_grads_mut()?.into_iter().map(|(_, p, _)| p).collect();
        for owner in 0..self.world_size() {
            let owned: Vec<usize> = self.owned_by(owner).collect();
            let mut bufs = owned
                .iter()
                .map(|&i| match owner == self.rank() {
                    true => b.upload(&b.download(params[i])?),
                    false => b.upload(&vec![0.0; self.tensors[i].1]),
                })
                .collect::<Result<Vec<_>>>()?;
            let mut refs: Vec<&mut B::Buf> = bufs.iter_mut().collect();
            self.group.broadcast(b, &mut refs, owner).context("gathering the parameters for a checkpoint")?;
            if (everywhere || self.rank() == 0) && owner != self.rank() {
                for (&i, buf) in owned.iter().zip(&bufs) {
                    b.copy(params[i], buf)?;
                }
            }
        }
        Ok(())
    }

    /// The whole optimizer state on rank 0 (`None` on the others): under ZeRO-1 each owner's moments
    /// broadcast from it (exact copies), and its parameters' masters into rank 0's policy
    /// ([`Self::gather_masters`]); else rank 0's own.
    fn gather_optimizer_state(
        &self,
        b: &B,
        optimizer: &AdamW<B>,
        policy: &mut Decoder<B>,
    ) -> Result<Option<BTreeMap<String, Vec<f32>>>> {
        if !self.zero {
            return if self.rank() == 0 { optimizer.state_to_host().map(Some) } else { Ok(None) };
        }
        self.gather_masters(b, policy, false)?;
        let mine = optimizer.state_to_host()?;
        let mut whole = BTreeMap::new();
        for owner in 0..self.world_size() {
            let keys: Vec<String> = self
                .owned_by(owner)
                .flat_map(|i| ["m", "v"].map(|moment| format!("{moment}.{}", self.tensors[i].0)))
                .collect();
            let lens: Vec<usize> = self.owned_by(owner).flat_map(|i| [self.tensors[i].1; 2]).collect();
            let mut bufs = keys
                .iter()
                .zip(&lens)
                // Every rank's buffers made alike (`upload`: in bf16 with a master copy), as NCCL's
                // broadcast requires the same layout on every rank; the others' zeros are overwritten.
                .map(|(key, &len)| match mine.get(key) {
                    Some(values) if owner == self.rank() => b.upload(values),
                    _ => b.upload(&vec![0.0; len]),
                })
                .collect::<Result<Vec<_>>>()?;
            let mut refs: Vec<&mut B::Buf> = bufs.iter_mut().collect();
            self.group.broadcast(b, &mut refs, owner).context("gathering the optimizer state for a checkpoint")?;
            if self.rank() == 0 {
                for (key, buf) in keys.into_iter().zip(&bufs) {
                    whole.insert(key, b.download(buf)?);
                }
            }
        }
        whole.insert(STEP_KEY.to_string(), mine[STEP_KEY].clone());
        Ok((self.rank() == 0).then_some(whole))
    }
}

/// The rank each item goes to: in order, each to the rank with the smallest load so far (ties to the
/// lower rank), its load growing by the item's `cost`.
pub fn assign_greedy(costs: impl IntoIterator<Item = usize>, world_size: usize) -> Vec<usize> {
    let mut load = vec![0usize; world_size];
    costs
        .into_iter()
        .map(|cost| {
            let rank = (0..world_size).min_by_key(|&r| (load[r], r)).expect("a group has a rank");
            load[rank] += cost;
            rank
        })
        .collect()
}

/// The owner of each tensor of `lens`: largest first (ties in the model's order), each to the rank
/// holding the fewest elements so far.
pub fn assign_owners(lens: &[usize], world_size: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let ranks = assign_greedy(order.iter().map(|&i| lens[i]), world_size);
    let mut owners = vec![0; lens.len()];
    for (i, rank) in order.into_iter().zip(ranks) {
        owners[i] = rank;
    }
    owners
}

/// The policy's AdamW: in a group, plans the tensors' owners first, and under ZeRO-1 keeps state only
/// for this rank's.
pub(super) fn new_optimizer<B: Backend>(
    policy: &mut Decoder<B>,
    cfg: AdamWConfig,
    group: Option<&mut GroupRank<B>>,
) -> Result<AdamW<B>> {
    let Some(rank) = group else { return AdamW::new(policy, cfg) };
    let backend = policy.backend().clone();
    rank.tensors = policy
        .params_and_grads_mut()?
        .into_iter()
        .map(|(name, param, _)| (name.to_string(), backend.buf_len(param)))
        .collect();
    let lens: Vec<usize> = rank.tensors.iter().map(|t| t.1).collect();
    rank.owners = assign_owners(&lens, rank.world_size());
    if !rank.zero {
        return AdamW::new(policy, cfg);
    }
    rank.drop_foreign_masters(policy)?;
    let (owners, me) = (&rank.owners, rank.rank());
    AdamW::for_tensors(policy, cfg, &|i| owners[i] == me)
}

fn is_lead<B: Backend>(group: Option<&GroupRank<B>>) -> bool {
    group.is_none_or(|g| g.rank() == 0)
}

/// Rank 0 (or a run alone) opens the out dir (lock, interrupted commits, `--resume`); the other ranks
/// wait for it, then resolve `--resume` the same way without touching the directory.
pub(super) fn open_run_dir<B: Backend>(
    cfg: &RunConfig,
    opts: &TrainOptions,
    group: Option<&GroupRank<B>>,
    warn: &dyn Fn(&str),
) -> Result<(Option<RunDir>, Option<PathBuf>)> {
    let lead_first = lead_first(group, || match is_lead(group) {
        true => RunDir::open(cfg, opts, warn).map(Some),
        false => Ok(None),
    })?;
    let resume_from = match &lead_first {
        Some(dir) => dir.resume_from().map(Path::to_path_buf),
        None => resolve_resume(opts.resume.as_ref(), &cfg.out_dir)?,
    };
    Ok((lead_first, resume_from))
}

/// `work` on rank 0 first, then (once it succeeded) on the other ranks: what may write into the out
/// dir (the reference cache) is done there by rank 0 and read by the others.
pub(super) fn lead_first<B: Backend, T>(group: Option<&GroupRank<B>>, work: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(rank) = group else { return work() };
    if rank.rank() == 0 {
        let out = work()?;
        rank.group.barrier()?;
        Ok(out)
    } else {
        rank.group.barrier().context("waiting for rank 0 to prepare the run")?;
        work()
    }
}

/// The run's metrics log continuing from `records`: written by rank 0 only.
pub(super) fn metrics_log<B: Backend>(
    group: Option<&GroupRank<B>>,
    path: &Path,
    records: Vec<Record>,
) -> Result<MetricsLog> {
    match is_lead(group) {
        true => MetricsLog::restore(path, records),
        false => Ok(MetricsLog::detached(path, records)),
    }
}

impl<B: Backend> Trainer<B> {
    /// Whether this process writes the run's files (rank 0, or a run alone).
    pub(super) fn is_lead(&self) -> bool {
        is_lead(self.group.as_ref())
    }

    /// The policy's exact weights on this rank (TR-DPO's reference sync): under ZeRO-1 every owner's
    /// masters brought to every rank first, so that each rank mixes the same values into its own
    /// reference as a run alone would.
    pub(super) fn policy_weights(&mut self) -> Result<HostWeights> {
        if let Some(rank) = self.group.as_ref().filter(|g| g.zero) {
            rank.gather_masters(&*self.backend, &mut self.learner.policy, true)?;
        }
        self.learner.policy.to_host()
    }

    /// The optimizer state a checkpoint holds, on the rank that writes it (`None` on the others);
    /// under ZeRO-1 also brings every parameter's exact values to rank 0's policy.
    pub(super) fn optimizer_state_to_save(&mut self) -> Result<Option<BTreeMap<String, Vec<f32>>>> {
        match &self.group {
            None => self.learner.optimizer.state_to_host().map(Some),
            Some(rank) => {
                rank.gather_optimizer_state(&*self.backend, &self.learner.optimizer, &mut self.learner.policy)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ZeRO-1 in bf16 on the emulated device, 2 ranks: after the plan each rank holds the fp32
    /// masters of its own tensors only; gathering for a checkpoint gives rank 0 every owner's exact
    /// values (masters included) and leaves the others as they were.
    #[cfg(feature = "emu")]
    #[test]
    fn zero_1_keeps_each_master_on_its_owner_and_gathers_them_for_a_checkpoint() {
        use crate::backend::cuda::{CudaBackend, Device, Precision};
        use crate::backend::Buffers;
        use crate::dist::{in_process, Staged};
        use crate::model::DecoderConfig;

        /// A rank's view: which parameters have a master after the plan and after the gather, their
        /// values after the gather, and the owners.
        type RankView = (Vec<bool>, Vec<bool>, Vec<Vec<f32>>, Vec<usize>);
        let ranks: Vec<RankView> = std::thread::scope(|s| {
            let handles: Vec<_> = in_process::group(2)
                .into_iter()
                .map(|handle| {
                    s.spawn(move || {
                        let b = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16));
                        // The same weights on both ranks, plus a rank-specific nudge on rank 1 so
                        // that the gather has something to bring.
                        let mut policy = Decoder::random(b.clone(), DecoderConfig::gpt2(64, 16, 16, 2, 2), 7).unwrap();
                        let group: Arc<dyn Collective<CudaBackend>> = Arc::new(Staged(handle));
                        let mut rank = GroupRank { group, zero: true, owners: Vec::new(), tensors: Vec::new() };
                        let cfg = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
                        new_optimizer(&mut policy, cfg, Some(&mut rank)).unwrap();
                        let masters = |p: &mut Decoder<CudaBackend>| -> Vec<bool> {
                            p.params_and_grads_mut().unwrap().into_iter().map(|(_, w, _)| b.has_master(w)).collect()
                        };
                        let after_plan = masters(&mut policy);
                        if rank.rank() == 1 {
                            // Rank 1's own tensors move: the values rank 0 must fetch.
                            for ((_, w, _), &owner) in
                                policy.params_and_grads_mut().unwrap().into_iter().zip(&rank.owners)
                            {
                                if owner == 1 {
                                    let moved: Vec<f32> =
                                        b.download(w).unwrap().iter().map(|x| x + 0.123_456_7).collect();
                                    *w = b.upload(&moved).unwrap();
                                }
                            }
                        }
                        rank.gather_masters(&*b, &mut policy, false).unwrap();
                        let values = policy.params().iter().map(|w| b.download(w).unwrap()).collect();
                        (after_plan, masters(&mut policy), values, rank.owners.clone())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let owners = &ranks[0].3;
        assert!(owners.contains(&0) && owners.contains(&1), "both ranks own tensors: {owners:?}");
        for (r, (after_plan, after_gather, _, _)) in ranks.iter().enumerate() {
            let own: Vec<bool> = owners.iter().map(|&o| o == r).collect();
            assert_eq!(after_plan, &own, "rank {r}: masters after the plan are its own tensors'");
            let want = if r == 0 { vec![true; owners.len()] } else { own };
            assert_eq!(after_gather, &want, "rank {r}: masters after the gather");
        }
        // Rank 0 now holds rank 1's exact (moved) values for rank 1's tensors.
        for (i, &owner) in owners.iter().enumerate() {
            if owner == 1 {
                assert_eq!(ranks[0].2[i], ranks[1].2[i], "tensor {i}: rank 0's copy of rank 1's master");
            }
        }
    }

    #[test]
    fn micro_batches_go_to_the_least_loaded_rank_in_order() {
        assert_eq!(assign_greedy([10, 10, 10, 10], 2), [0, 1, 0, 1]);
        assert_eq!(assign_greedy([30, 10, 10, 5], 2), [0, 1, 1, 1]);
        assert_eq!(assign_greedy([7], 3), [0]);
        assert_eq!(assign_greedy([], 2), Vec::<usize>::new());
    }

    #[test]
    fn owners_balance_elements_largest_first() {
        // 100 → r0, 60 → r1, 50 → r1 (60 < 100), 10 → r0.
        assert_eq!(assign_owners(&[10, 100, 50, 60], 2), [0, 0, 1, 1]);
        assert_eq!(assign_owners(&[4, 4], 3), [0, 1]);
    }
}
