//! The engine's models on one backend, written once over [`Backend`]: the policy, the frozen
//! reference and the optimizer state, and what the engine does with them (log-probs, the loss, a
//! training step through the trainer's own [`Learner`], on pairs or on unpaired examples, saving). `Engine` holds one of these per
//! backend kind and dispatches to it, so that its users never see the backend type.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

use super::{Logps, PairLogps, PairMetrics};
use crate::backend::{Backend, LogpParts, PreferenceLossInputs, PAIR_METRICS};
use crate::data::{preference_batch, unpaired_batch, TokenizedExample, TokenizedPair};
use crate::loss::{LossState, Objective};
use crate::model::{Decoder, DecoderConfig, ForwardExtras, HostWeights, RowSplit, SequenceLogps};
use crate::optim::{set_grad_dtype, AdamW, AdamWConfig, GradDtype};
use crate::train::checkpoint::write_optimizer_state;
use crate::train::step::{loss_read_logps, Learner, MicroBatch, Reference, StepInfo};
use crate::train::unpaired::{unpaired_outputs, UnpairedMicroBatch, UnpairedOutput};

/// The policy (trainable), the reference (frozen) and the policy's optimizer state on `backend`.
/// The optimizer state is allocated by the first training step, so that an engine that only scores
/// pairs holds no moments.
pub(super) struct Models<B: Backend> {
    backend: Arc<B>,
    policy: Option<Decoder<B>>,
    reference: Option<Box<Decoder<B>>>,
    optimizer: Option<AdamW<B>>,
    /// The trainer state the loss reads (`bco_pair`'s running mean), carried across steps.
    loss_state: LossState,
}

/// What a training step gave, on the host.
pub(super) struct StepOutput {
    pub info: StepInfo,
    pub step: u32,
    pub metrics: Vec<f32>,
    pub logps: Vec<f32>,
}

impl<B: Backend> Models<B> {
    pub fn new(backend: Arc<B>) -> Self {
        Self { backend, policy: None, reference: None, optimizer: None, loss_state: LossState::default() }
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    pub fn set_policy(&mut self, weights: &HostWeights) -> Result<()> {
        self.policy = Some(Decoder::from_host(self.backend.clone(), weights).context("uploading the policy")?);
        self.optimizer = None;
        Ok(())
    }

    pub fn set_reference(&mut self, weights: &HostWeights) -> Result<()> {
        let model = Decoder::from_host_frozen(self.backend.clone(), weights).context("uploading the reference")?;
        self.reference = Some(Box::new(model));
        Ok(())
    }

    /// The policy's current weights, downloaded.
    pub fn policy_weights(&self) -> Result<HostWeights> {
        self.policy()?.to_host()
    }

    pub fn policy_config(&self) -> Option<&DecoderConfig> {
        self.policy.as_ref().map(Decoder::config)
    }

    pub fn reference_config(&self) -> Option<&DecoderConfig> {
        self.reference.as_deref().map(Decoder::config)
    }

    pub fn steps_taken(&self) -> u32 {
        self.optimizer.as_ref().map_or(0, AdamW::step_count)
    }

    /// Stores the policy's gradients in f32 when `grad_dtype` says so for a step of `grad_accum`
    /// micro-batches (`optim::set_grad_dtype`); a gradient stored in f32 stays so.
    pub fn set_grad_dtype(&mut self, grad_dtype: GradDtype, grad_accum: usize) -> Result<()> {
        let policy = self.policy.as_mut().context("no policy: load one first")?;
        set_grad_dtype(policy, grad_dtype, grad_accum)
    }

    pub fn has_optimizer(&self) -> bool {
        self.optimizer.is_some()
    }

    fn policy(&self) -> Result<&Decoder<B>> {
        self.policy.as_ref().context("no policy: load one first (Engine::load_policy or Engine::random_policy)")
    }

    fn reference_for(&self, objective: &Objective) -> Result<Option<&Decoder<B>>> {
        if !objective.uses_reference() {
            return Ok(None);
        }
        match self.reference.as_deref() {
            Some(model) => Ok(Some(model)),
            None => bail!(
                "objective `{}` needs a reference model: load one first (Engine::load_reference, \
                 Engine::random_reference or Engine::reference_from_policy)",
                objective.name()
            ),
        }
    }

    /// Policy (and, when loaded, reference) log-probs `[2P]`, chosen and rejected per pair.
    pub fn logps(&mut self, pairs: &[TokenizedPair]) -> Result<PairLogps> {
        let batch = MicroBatch::upload(&*self.backend, preference_batch(pairs, &all(pairs)))?;
        let b = &*self.backend;
        let policy = self.policy.as_mut().context("no policy: load one first")?;
        let policy = Logps::from_interleaved(&b.download(policy.forward(&batch.packed)?)?);
        let reference = match self.reference.as_deref_mut() {
            Some(model) => Some(Logps::from_interleaved(&b.download(model.forward(&batch.packed)?)?)),
            None => None,
        };
        Ok(PairLogps { policy, reference })
    }

    /// The loss of every pair under `objective` (the backend's preference-loss kernel, the one
    /// training runs, with what TRL's log-prob modifiers read), with the log-probs it read (under
    /// LD-DPO's `ld_alpha`, the weighted ones, as training logs them). No gradient is kept.
    pub fn loss(&mut self, pairs: &[TokenizedPair], objective: &Objective) -> Result<(PairLogps, PairMetrics)> {
        self.reference_for(objective)?;
        let n = pairs.len();
        let batch = MicroBatch::upload(&*self.backend, preference_batch(pairs, &all(pairs)))?;
        let b = &*self.backend;
        let ld_alpha = objective.ld_alpha();
        let split = match ld_alpha {
            Some(_) => Some(RowSplit::shared_length(b, &batch.packed)?),
            None => None,
        };
        let extras = ForwardExtras { split: split.as_ref(), aligned: objective.uses_weighting() };
        let policy = self.policy.as_mut().context("no policy: load one first")?;
        let policy_logps = policy.forward_with(&batch.packed, &extras)?;
        let reference_logps = match self.reference.as_deref_mut() {
            Some(model) => Some(model.forward_with(&batch.packed, &ForwardExtras { aligned: false, ..extras })?),
            None => None,
        };
        let owned;
        let (reference_buf, reference_split) = match (objective.uses_reference(), &reference_logps) {
            (true, Some(out)) => (out.total, out.split),
            _ => {
                owned = b.zeros(2 * n)?;
                (&owned, None)
            }
        };
        let mut metrics = b.zeros(n * PAIR_METRICS)?;
        let mut grads = b.zeros(if split.is_some() { 4 * n } else { 2 * n })?;
        let inputs = PreferenceLossInputs {
            parts: LogpParts {
                policy_split: policy_logps.split,
                reference_split,
                policy_aligned: policy_logps.aligned,
            },
            grad_scale: 1.0 / n as f32,
            ..PreferenceLossInputs::pairs(
                policy_logps.total,
                reference_buf,
                &batch.unsafe_flags,
                &batch.lengths,
                objective,
            )
        };
        b.preference_loss(&mut metrics, &mut grads, &inputs)?;
        let read = |out: &SequenceLogps<'_, B>| loss_read_logps(b, out.total, out.split, ld_alpha);
        let logps = PairLogps {
            policy: Logps::from_interleaved(&read(&policy_logps)?),
            reference: reference_logps.as_ref().map(read).transpose()?.map(|v| Logps::from_interleaved(&v)),
        };
        Ok((logps, PairMetrics::from_rows(&b.download(&metrics)?)))
    }

    /// One optimizer step on `micro_batches` (their gradients accumulated: the mean loss over all
    /// their pairs) through [`Learner::preference_step`].
    pub fn train_step(
        &mut self,
        micro_batches: &[&[TokenizedPair]],
        objective: &Objective,
        optimizer: AdamWConfig,
        grad_clip: f32,
        lr: f32,
    ) -> Result<StepOutput> {
        self.reference_for(objective)?;
        let batches = micro_batches
            .iter()
            .map(|pairs| MicroBatch::upload(&*self.backend, preference_batch(pairs, &all(pairs))))
            .collect::<Result<Vec<_>>>()?;
        let (mut metrics, mut logps) = (Vec::new(), Vec::new());
        let (info, step) = self.with_learner(objective, optimizer, grad_clip, |learner| {
            learner.preference_step(
                &batches,
                lr,
                |_, out| {
                    metrics.extend(out.metrics);
                    logps.extend(out.logps);
                },
                &mut |_| Ok(()),
            )
        })?;
        Ok(StepOutput { info, step, metrics, logps })
    }

    /// The loss of unpaired examples under `objective` (one on unpaired examples), one batch with
    /// KTO's KL sequences cut to `kl_max_len`: the backend's preference-loss op, as training runs
    /// it. No gradient is kept.
    pub fn unpaired_loss(
        &mut self,
        examples: &[TokenizedExample],
        objective: &Objective,
        kl_max_len: usize,
    ) -> Result<UnpairedOutput> {
        let kto = objective.as_unpaired().context("not an objective on unpaired examples")?;
        self.reference_for(objective)?;
        let kl = kto.estimates_kl().then_some(kl_max_len);
        let batch = UnpairedMicroBatch::upload(&*self.backend, unpaired_batch(examples, &all_of(examples), kl))?;
        let policy = self.policy.as_mut().context("no policy: load one first")?;
        let reference = self.reference.as_deref_mut().context("no reference")?;
        let grad_scale = 1.0 / examples.len().max(1) as f32;
        Ok(unpaired_outputs(policy, reference, &batch, objective, grad_scale)?.0)
    }

    /// One optimizer step on unpaired `micro_batches` (the mean loss over all their examples)
    /// through [`Learner::unpaired_step`]; the outputs in order.
    #[allow(clippy::too_many_arguments)]
    pub fn unpaired_train_step(
        &mut self,
        micro_batches: &[&[TokenizedExample]],
        objective: &Objective,
        optimizer: AdamWConfig,
        grad_clip: f32,
        lr: f32,
        kl_max_len: usize,
    ) -> Result<(StepInfo, u32, Vec<UnpairedOutput>)> {
        let kto = objective.as_unpaired().context("not an objective on unpaired examples")?;
        self.reference_for(objective)?;
        let kl = kto.estimates_kl().then_some(kl_max_len);
        let batches = micro_batches
            .iter()
            .map(|examples| UnpairedMicroBatch::upload(&*self.backend, unpaired_batch(examples, &all_of(examples), kl)))
            .collect::<Result<Vec<_>>>()?;
        let mut outputs = Vec::new();
        let (info, step) = self.with_learner(objective, optimizer, grad_clip, |learner| {
            learner.unpaired_step(&batches, lr, |_, out| outputs.push(out.clone()))
        })?;
        Ok((info, step, outputs))
    }

    /// Lends the models to a [`Learner`] for one step (`run`), and takes them back, also when it
    /// fails; the optimizer state is made on the first step. Returns `run`'s value and the
    /// optimizer's step count.
    fn with_learner<T>(
        &mut self,
        objective: &Objective,
        optimizer: AdamWConfig,
        grad_clip: f32,
        run: impl FnOnce(&mut Learner<B>) -> Result<T>,
    ) -> Result<(T, u32)> {
        let mut policy = self.policy.take().context("no policy: load one first")?;
        let optimizer = match self.optimizer.take() {
            Some(state) => Ok(state),
            None => AdamW::new(&mut policy, optimizer),
        };
        let optimizer = match optimizer {
            Ok(state) => state,
            Err(e) => {
                self.policy = Some(policy);
                return Err(e);
            }
        };
        let reference = match (objective.uses_reference(), self.reference.take()) {
            (true, Some(model)) => Reference::Model(model),
            (_, model) => {
                self.reference = model;
                Reference::Free
            }
        };
        let loss_state = self.loss_state;
        let mut learner = Learner { policy, reference, optimizer, objective: objective.clone(), grad_clip, loss_state };
        let result = run(&mut learner);
        let Learner { policy, reference, optimizer, loss_state, .. } = learner;
        self.loss_state = loss_state;
        self.policy = Some(policy);
        if let Reference::Model(model) = reference {
            self.reference = Some(model);
        }
        let step = optimizer.step_count();
        self.optimizer = Some(optimizer);
        Ok((result?, step))
    }

    /// Writes the policy as a HF model directory, with `optimizer.safetensors` once it has trained.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.policy()?.save(dir)?;
        if let Some(optimizer) = &self.optimizer {
            write_optimizer_state(dir, &optimizer.state_to_host()?)?;
        }
        Ok(())
    }
}

/// Every pair, in order: `0..pairs.len()`.
fn all(pairs: &[TokenizedPair]) -> Vec<usize> {
    (0..pairs.len()).collect()
}

/// Every example, in order.
fn all_of(examples: &[TokenizedExample]) -> Vec<usize> {
    (0..examples.len()).collect()
}

/// Checks a batch before it is packed: not empty, ids inside the vocabulary, every sequence inside
/// the context, one response token per side at least; errors name the pair.
pub(super) fn check_pairs(pairs: &[TokenizedPair], config: &DecoderConfig) -> Result<()> {
    ensure!(!pairs.is_empty(), "the batch has no pairs");
    for (i, pair) in pairs.iter().enumerate() {
        for (side, ids) in [("prompt", &pair.prompt), ("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
            if let Some(&id) = ids.iter().find(|&&id| id < 0 || id as usize >= config.vocab_size) {
                bail!("pair {i}: {side} token id {id} is outside the model's vocabulary 0..{}", config.vocab_size);
            }
        }
        ensure!(
            !pair.chosen.is_empty() && !pair.rejected.is_empty(),
            "pair {i}: a response is empty (each side needs one token at least)"
        );
        let longest = pair.prompt.len() + pair.chosen.len().max(pair.rejected.len());
        ensure!(
            longest <= config.n_positions,
            "pair {i}: a sequence of {longest} tokens exceeds the model's context of {} positions",
            config.n_positions
        );
    }
    Ok(())
}
