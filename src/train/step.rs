//! One optimizer step of preference training, the one implementation the trainer and `safedpo
//! bench` both run: per micro-batch the reference log-probs, the policy's forward, the preference
//! loss and the policy's backward (gradients accumulate over the micro-batches), then the global
//! grad-norm clip folded into AdamW. A hook after each [`Phase`] lets the benchmark synchronise the
//! device and read its clock; the trainer's does nothing.

use anyhow::{bail, ensure, Result};

use super::refcache::ReferenceLogps;
use crate::backend::{Backend, LogpParts, PreferenceLossInputs, PAIR_METRICS};
use crate::config::OptimizerConfig;
use crate::data::{PackedBatch, PreferenceBatch};
use crate::loss::{LossState, Objective};
use crate::model::{Decoder, DeviceBatch, ForwardExtras, RowSplit};
use crate::optim::{clip_scale, AdamW, AdamWConfig};

/// The parts of a step, in order, as the hook sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The reference log-probs of a micro-batch (zeroing the gradients first, on the first one).
    ReferenceForward,
    /// The policy's forward and log-probs.
    PolicyForward,
    /// The preference loss and its gradient; metrics and log-probs copied to the host.
    Loss,
    /// The policy's backward.
    Backward,
    /// Global grad norm, clipping scale and AdamW.
    Optimizer,
}

/// Where the reference log-probs of training pairs come from.
pub enum Reference<B: Backend> {
    /// A reference-free objective (or SFT).
    Free,
    /// The frozen reference model, run on every micro-batch.
    Model(Box<Decoder<B>>),
    /// The policy's own base, its LoRA adapters off (one copy of the base weights serves both).
    PolicyBase,
    /// Precomputed for every training pair (with their split at the shared length, which LD-DPO reads).
    Cached(ReferenceLogps),
}

/// A preference micro-batch on the device, with the host batch it came from.
pub struct MicroBatch<B: Backend> {
    pub host: PreferenceBatch,
    pub packed: DeviceBatch<B>,
    pub unsafe_flags: B::Ids,
    pub lengths: B::Ids,
}

impl<B: Backend> MicroBatch<B> {
    pub fn upload(b: &B, host: PreferenceBatch) -> Result<Self> {
        Ok(Self {
            packed: DeviceBatch::upload(b, &host.packed)?,
            unsafe_flags: b.upload_ids(&host.unsafe_flags)?,
            lengths: b.upload_ids(&host.lengths)?,
            host,
        })
    }
}

/// What one micro-batch gave, on the host.
pub struct MicroOutput {
    /// `PAIR_METRICS` values per pair (loss first).
    pub metrics: Vec<f32>,
    /// The policy's sequence log-probs `[2P]` (chosen, rejected per pair), as the loss read them.
    pub logps: Vec<f32>,
}

/// One step's outcome.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    pub grad_norm: f32,
    pub lr: f32,
    /// The step's mean loss over its pairs (`None` from [`Learner::update`] alone, which sees no
    /// loss).
    pub loss: Option<f64>,
}

/// What to say after a divergence: how to avoid the next one.
const DIVERGED: &str = "training diverged (lower optimizer.lr or set optimizer.grad_clip)";

/// Stops a diverged step: a loss that is NaN or infinite, or above `max_loss` (`train.max_loss`).
pub fn check_loss(step: usize, loss: f64, max_loss: f64) -> Result<()> {
    ensure!(loss.is_finite(), "step {step}: the loss is {loss}; {DIVERGED}");
    ensure!(loss <= max_loss, "step {step}: the loss is {loss:e}, above train.max_loss = {max_loss:e}; {DIVERGED}");
    Ok(())
}

/// Stops a step whose update left a parameter NaN or infinite: one reduction over the parameters
/// on the device (`Σ w²`), and only when that is not finite a download to name the first bad value.
pub fn check_parameters<B: Backend>(policy: &Decoder<B>, step: usize) -> Result<()> {
    let sum_squares = policy.backend().sum_squares(&policy.params())?;
    if sum_squares.is_finite() {
        return Ok(());
    }
    let weights = policy.to_host()?;
    let what = match weights.ensure_finite() {
        Err(e) => format!("{e:#}"),
        Ok(()) => "a parameter beyond ±1.8e19 (the sum of their squares overflows f32)".to_string(),
    };
    bail!("step {step}: after the update, {what}; {DIVERGED}")
}

/// AdamW's settings from `[optimizer]`.
pub fn adamw_config(op: &OptimizerConfig) -> AdamWConfig {
    AdamWConfig { lr: op.lr, beta1: op.beta1, beta2: op.beta2, eps: op.eps, weight_decay: op.weight_decay }
}

/// What a step updates: the policy and its optimizer state, with the reference and the objective.
pub struct Learner<B: Backend> {
    pub policy: Decoder<B>,
    pub reference: Reference<B>,
    pub optimizer: AdamW<B>,
    pub objective: Objective,
    /// Global grad-norm clip; 0 disables it (the norm is still computed).
    pub grad_clip: f32,
    /// The trainer state the loss reads (saved with checkpoints), updated before each loss call.
    pub loss_state: LossState,
}

impl<B: Backend> Learner<B> {
    /// One optimizer step on `micro` at learning rate `lr`, the gradient that of the mean loss over
    /// all their pairs. `each` gets every micro-batch's output; `lap` is called after each phase.
    pub fn preference_step(
        &mut self,
        micro: &[MicroBatch<B>],
        lr: f32,
        each: impl FnMut(&MicroBatch<B>, MicroOutput),
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<StepInfo> {
        let pairs: usize = micro.iter().map(|m| m.host.num_pairs()).sum();
        let loss_sum = self.preference_gradients(micro, pairs, None, each, lap)?;
        // A NaN or infinite loss stops the step before the update (its gradient may look finite).
        let loss = loss_sum / pairs as f64;
        check_loss(self.optimizer.step_count() as usize + 1, loss, f64::INFINITY)?;
        let info = self.update(lr)?;
        lap(Phase::Optimizer)?;
        Ok(StepInfo { loss: Some(loss), ..info })
    }

    /// The gradients of `micro` (zeroed first), each pair's loss weighted `1 / pairs` (`pairs`: the
    /// whole step's pairs, which a data-parallel rank's share of the micro-batches is a part of);
    /// returns the sum of their pairs' losses. `states`: the loss state each micro-batch's loss
    /// reads, given (a data-parallel rank's, from the whole step's rewards, see
    /// [`Learner::bco_reward_samples`]) instead of updated here from its own log-probs.
    pub fn preference_gradients(
        &mut self,
        micro: &[MicroBatch<B>],
        pairs: usize,
        states: Option<&[LossState]>,
        mut each: impl FnMut(&MicroBatch<B>, MicroOutput),
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<f64> {
        ensure!(states.is_none_or(|s| s.len() == micro.len()), "one loss state per micro-batch");
        let mut loss_sum = 0.0f64;
        let grad_scale = 1.0 / pairs as f32;
        let backend = self.policy.backend().clone();
        let b = &*backend;
        self.policy.zero_grad()?;
        for (i, batch) in micro.iter().enumerate() {
            let n = batch.host.num_pairs();
            let ld_alpha = self.objective.ld_alpha();
            let split = self.row_split(batch)?;
            let extras = ForwardExtras { split: split.as_ref(), aligned: self.objective.uses_weighting() };
            let reference = reference_forward(&mut self.reference, &mut self.policy, batch, &extras)?;
            let (reference, reference_split) = reference.parts();
            lap(Phase::ReferenceForward)?;

            let logps = self.policy.forward_with(&batch.packed, &extras)?;
            lap(Phase::PolicyForward)?;

            if LossState::is_read_by(&self.objective) {
                match states {
                    Some(states) => self.loss_state = states[i],
                    None => {
                        let policy_read = loss_read_logps(b, logps.total, logps.split, ld_alpha)?;
                        let reference_read = loss_read_logps(b, reference, reference_split, ld_alpha)?;
                        self.loss_state.before_loss(&self.objective, &policy_read, &reference_read);
                    }
                }
            }
            let mut metrics = b.zeros(n * PAIR_METRICS)?;
            let mut dpolicy = b.zeros(if split.is_some() { 4 * n } else { 2 * n })?;
            let (flags, lengths, state) = (&batch.unsafe_flags, &batch.lengths, &self.loss_state);
            let inputs = PreferenceLossInputs {
                parts: LogpParts { policy_split: logps.split, reference_split, policy_aligned: logps.aligned },
                state: *state,
                grad_scale,
                ..PreferenceLossInputs::pairs(logps.total, reference, flags, lengths, &self.objective)
            };
            b.preference_loss(&mut metrics, &mut dpolicy, &inputs)?;
            // The logged log-probs are those the loss read (LD-DPO's, as TRL logs them).
            let logps = loss_read_logps(b, logps.total, logps.split, ld_alpha)?;
            let output = MicroOutput { metrics: b.download(&metrics)?, logps };
            loss_sum += output.metrics.chunks(PAIR_METRICS).map(|m| m[0] as f64).sum::<f64>();
            lap(Phase::Loss)?;

            match &split {
                Some(split) => self.policy.backward_split(&batch.packed, split, &dpolicy)?,
                None => self.policy.backward(&batch.packed, &dpolicy)?,
            }
            lap(Phase::Backward)?;
            each(batch, output);
        }
        Ok(loss_sum)
    }

    /// LD-DPO reads each response's log-prob split at its pair's shared length, WPO the policy's
    /// aligned log-probs (see `crate::loss::batch_loss_parts`): the split, when the objective reads it.
    fn row_split(&self, batch: &MicroBatch<B>) -> Result<Option<RowSplit<B>>> {
        match self.objective.ld_alpha() {
            Some(_) => Ok(Some(RowSplit::shared_length(&**self.policy.backend(), &batch.packed)?)),
            None => Ok(None),
        }
    }

    /// Each micro-batch's mean reward `β(π − r)`, the sample `bco_running_mean` adds to its running
    /// mean before the micro-batch's loss (`None` for a micro-batch without pairs): the forwards of
    /// [`Learner::preference_gradients`] without the loss. A data-parallel rank runs them on its
    /// share first, so that every rank can replay the running mean over the whole step in order.
    pub fn bco_reward_samples(&mut self, micro: &[MicroBatch<B>]) -> Result<Vec<Option<f64>>> {
        let backend = self.policy.backend().clone();
        let b = &*backend;
        let ld_alpha = self.objective.ld_alpha();
        let mut samples = Vec::with_capacity(micro.len());
        for batch in micro {
            let split = self.row_split(batch)?;
            let extras = ForwardExtras { split: split.as_ref(), aligned: self.objective.uses_weighting() };
            let reference = reference_forward(&mut self.reference, &mut self.policy, batch, &extras)?;
            let (reference, reference_split) = reference.parts();
            let reference_read = loss_read_logps(b, reference, reference_split, ld_alpha)?;
            let logps = self.policy.forward_with(&batch.packed, &extras)?;
            let policy_read = loss_read_logps(b, logps.total, logps.split, ld_alpha)?;
            samples.push(LossState::reward_sample(&self.objective, &policy_read, &reference_read));
        }
        Ok(samples)
    }

    /// SFT's gradients of `micro` (zeroed first): `dL/d(seq logp) = −1 / targets` for every sequence
    /// (`targets`: the whole step's target tokens, which a data-parallel rank's share is a part of).
    /// `each` gets every micro-batch's negative log-likelihood.
    pub fn sft_gradients(
        &mut self,
        micro: &[PackedBatch],
        targets: usize,
        mut each: impl FnMut(&PackedBatch, f64),
    ) -> Result<()> {
        let backend = self.policy.backend().clone();
        let b = &*backend;
        self.policy.zero_grad()?;
        for packed in micro {
            let dev = DeviceBatch::upload(b, packed)?;
            let dseq = b.upload(&vec![-1.0 / targets as f32; packed.num_seqs()])?;
            let logps = self.policy.forward(&dev)?;
            let host = b.download(logps)?;
            self.policy.backward(&dev, &dseq)?;
            each(packed, -host.iter().map(|&x| x as f64).sum::<f64>());
        }
        Ok(())
    }

    /// Clips by the global grad norm and applies AdamW at `lr`.
    pub fn update(&mut self, lr: f32) -> Result<StepInfo> {
        let (grad_norm, scale) = clip_scale(&self.policy, self.grad_clip)?;
        self.apply_update(grad_norm, scale, lr)
    }

    /// AdamW at `lr` with the gradients scaled by `scale`, once `grad_norm` (the global norm the
    /// scale came from) is checked finite.
    pub fn apply_update(&mut self, grad_norm: f32, scale: f32, lr: f32) -> Result<StepInfo> {
        ensure!(
            grad_norm.is_finite(),
            "step {}: the gradient norm is {grad_norm}; {DIVERGED}",
            self.optimizer.step_count() + 1
        );
        self.optimizer.step(&mut self.policy, lr, scale)?;
        Ok(StepInfo { grad_norm, lr, loss: None })
    }
}

/// A micro-batch's reference log-probs and their split: borrowed from the frozen reference model's
/// buffers, or owned.
enum ReferenceOutput<'a, B: Backend> {
    Borrowed(&'a B::Buf, Option<&'a B::Buf>),
    Owned(B::Buf, Option<B::Buf>),
}

impl<B: Backend> ReferenceOutput<'_, B> {
    fn parts(&self) -> (&B::Buf, Option<&B::Buf>) {
        match self {
            ReferenceOutput::Borrowed(total, split) => (total, *split),
            ReferenceOutput::Owned(total, split) => (total, split.as_ref()),
        }
    }
}

/// The reference log-probs of `batch` (with the split `extras` asks for), from wherever `reference`
/// takes them; `policy` serves a LoRA policy's base (its adapters off for the forward).
fn reference_forward<'a, B: Backend>(
    reference: &'a mut Reference<B>,
    policy: &mut Decoder<B>,
    batch: &MicroBatch<B>,
    extras: &ForwardExtras<B>,
) -> Result<ReferenceOutput<'a, B>> {
    let backend = policy.backend().clone();
    let b = &*backend;
    let frozen = ForwardExtras { aligned: false, ..*extras };
    Ok(match reference {
        Reference::Model(model) => {
            let out = model.forward_with(&batch.packed, &frozen)?;
            ReferenceOutput::Borrowed(out.total, out.split)
        }
        Reference::Free => ReferenceOutput::Owned(b.zeros(2 * batch.host.num_pairs())?, None),
        Reference::PolicyBase => {
            policy.set_adapters_enabled(false)?;
            let out = policy.forward_with(&batch.packed, &frozen)?;
            // Copied out: the policy's forward that follows reuses its buffers.
            let copy = |src: &B::Buf| -> Result<B::Buf> {
                let mut dst = b.zeros(b.buf_len(src))?;
                b.copy(&mut dst, src)?;
                Ok(dst)
            };
            let owned = ReferenceOutput::Owned(copy(out.total)?, out.split.map(copy).transpose()?);
            policy.set_adapters_enabled(true)?;
            owned
        }
        Reference::Cached(all) => {
            let picked = all.of_pairs(&batch.host.pair_ids);
            let split = match extras.split {
                Some(_) => Some(b.upload(&picked.split)?),
                None => None,
            };
            ReferenceOutput::Owned(b.upload(&picked.totals)?, split)
        }
    })
}

/// The sequence log-probs `[2P]` as the loss's terms read them, on the host: `total`, or under
/// LD-DPO each sequence's `shared + α·tail` of `split` (`[4P]`).
pub(crate) fn loss_read_logps<B: Backend>(
    b: &B,
    total: &B::Buf,
    split: Option<&B::Buf>,
    ld_alpha: Option<f64>,
) -> Result<Vec<f32>> {
    match (split, ld_alpha) {
        (Some(split), Some(alpha)) => {
            let split = b.download(split)?;
            Ok(split.chunks(2).map(|part| (part[0] as f64 + alpha * part[1] as f64) as f32).collect())
        }
        _ => b.download(total),
    }
}
