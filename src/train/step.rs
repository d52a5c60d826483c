//! One optimizer step of preference training, the one implementation the trainer and `safedpo
//! bench` both run: per micro-batch the reference log-probs, the policy's forward, the preference
//! loss and the policy's backward (gradients accumulate over the micro-batches), then the global
//! grad-norm clip folded into AdamW. A hook after each [`Phase`] lets the benchmark synchronise the
//! device and read its clock; the trainer's does nothing.

use anyhow::{bail, ensure, Result};

use crate::backend::{Backend, PAIR_METRICS};
use crate::config::OptimizerConfig;
use crate::data::PreferenceBatch;
use crate::loss::{LossState, Objective};
use crate::model::{Decoder, DeviceBatch};
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
    /// Precomputed `[2T]` (chosen, rejected per training pair).
    Cached(Vec<f32>),
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
    /// The policy's sequence log-probs `[2P]` (chosen, rejected per pair).
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
        mut each: impl FnMut(&MicroBatch<B>, MicroOutput),
        lap: &mut dyn FnMut(Phase) -> Result<()>,
    ) -> Result<StepInfo> {
        let pairs: usize = micro.iter().map(|m| m.host.num_pairs()).sum();
        let mut loss_sum = 0.0f64;
        let grad_scale = 1.0 / pairs as f32;
        let backend = self.policy.backend().clone();
        let b = &*backend;
        self.policy.zero_grad()?;
        for batch in micro {
            let n = batch.host.num_pairs();
            let owned;
            let reference = match &mut self.reference {
                Reference::Model(model) => model.forward(&batch.packed)?,
                Reference::Free => {
                    owned = b.zeros(2 * n)?;
                    &owned
                }
                Reference::Cached(all) => {
                    let ids = &batch.host.pair_ids;
                    owned = b.upload(&ids.iter().flat_map(|&i| [all[2 * i], all[2 * i + 1]]).collect::<Vec<_>>())?;
                    &owned
                }
            };
            lap(Phase::ReferenceForward)?;

            let logps = self.policy.forward(&batch.packed)?;
            lap(Phase::PolicyForward)?;

            if LossState::is_read_by(&self.objective) {
                self.loss_state.before_loss(&self.objective, &b.download(logps)?, &b.download(reference)?);
            }
            let mut metrics = b.zeros(n * PAIR_METRICS)?;
            let mut dpolicy = b.zeros(2 * n)?;
            let (flags, lengths, state) = (&batch.unsafe_flags, &batch.lengths, &self.loss_state);
            b.preference_loss_with(
                &mut metrics,
                &mut dpolicy,
                logps,
                reference,
                flags,
                lengths,
                &self.objective,
                state,
                grad_scale,
            )?;
            let output = MicroOutput { metrics: b.download(&metrics)?, logps: b.download(logps)? };
            loss_sum += output.metrics.chunks(PAIR_METRICS).map(|m| m[0] as f64).sum::<f64>();
            lap(Phase::Loss)?;

            self.policy.backward(&batch.packed, &dpolicy)?;
            lap(Phase::Backward)?;
            each(batch, output);
        }
        // A NaN or infinite loss stops the step before the update (its gradient may look finite).
        let loss = loss_sum / pairs as f64;
        check_loss(self.optimizer.step_count() as usize + 1, loss, f64::INFINITY)?;
        let info = self.update(lr)?;
        lap(Phase::Optimizer)?;
        Ok(StepInfo { loss: Some(loss), ..info })
    }

    /// Clips by the global grad norm and applies AdamW at `lr`.
    pub fn update(&mut self, lr: f32) -> Result<StepInfo> {
        let (grad_norm, scale) = clip_scale(&self.policy, self.grad_clip)?;
        ensure!(
            grad_norm.is_finite(),
            "step {}: the gradient norm is {grad_norm}; {DIVERGED}",
            self.optimizer.step_count() + 1
        );
        self.optimizer.step(&mut self.policy, lr, scale)?;
        Ok(StepInfo { grad_norm, lr, loss: None })
    }
}
