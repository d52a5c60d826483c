//! Training on unpaired examples: the objectives of [`crate::loss::Kto`] (KTO, TRL's
//! `apo_zero_unpaired`), through the same loop, checkpoints and logs as pairs.
//!
//! One optimizer step: the batcher hands out `grad_accum` micro-batches of whole examples within the
//! token budget (an example costs its sequence and, for KTO, its share of the KL sequences); per
//! micro-batch, the reference model and the policy run on the KL sequences (KTO only; the policy's
//! KL log-probs carry no gradient, as TRL computes them under `no_grad`), then on the examples'
//! sequences, the policy last so that its backward follows; the loss is the backend's
//! preference-loss op on examples (`crate::backend::PreferenceLossInputs::examples`, specified by
//! [`crate::loss::unpaired_loss`]), which forms the micro-batch's KL estimate from the KL
//! sequences' log-probs on the device; its gradient, scaled by `1 / N` (N = the step's examples,
//! so that the gradient is that of the mean loss over the step; TRL averages each micro-batch's
//! own mean instead), stays on the device for the policy's backward. Then the global grad-norm
//! clip and AdamW, as for pairs.
//!
//! The reference model runs on every micro-batch: the configuration refuses `precompute_ref` (KTO's
//! KL sequences depend on which examples share a micro-batch). A micro-batch of one example (the end
//! of an epoch can leave one) takes its own completion as its KL sequence, as TRL's last batch does.
//!
//! The log has TRL's KTO metrics: `loss`, `kl` (the mean of the micro-batches' KL estimates),
//! `rewards/chosen` and `logps/chosen` over the desirable examples, `rewards/rejected` and
//! `logps/rejected` over the undesirable ones, `rewards/margins` (their difference); `eval/…` the
//! same on the held-out examples, in fixed chunks of the token budget.
//!
//! On N data-parallel ranks each rank runs its share of the step's micro-batches, each with its own
//! KL estimate (see `train::data_parallel` for how that relates to TRL's gathered estimate).

use anyhow::{bail, ensure, Context, Result};

use super::metrics::{json_f64, Record};
use super::step::{Learner, Reference, StepInfo};
use super::{PreparedData, Trainer};
use crate::backend::{Backend, ExampleParts, PreferenceLossInputs, EXAMPLE_METRICS};
use crate::config::RunConfig;
use crate::data::{
    chunks_by_cost, load_examples, sequence_format, split_holdout_by, tokenize_examples, unpaired_batch, TextTokenizer,
    TokenizedExample, Truncation, UnpairedBatch,
};
use crate::loss::{Kto, Objective};
use crate::model::{Decoder, DeviceBatch};

/// The examples a run on unpaired examples trains and evaluates on.
pub struct UnpairedData {
    pub train: Vec<TokenizedExample>,
    pub eval: Vec<TokenizedExample>,
}

/// Loads (unpaired rows, or pairs unpaired), selects, splits (whole prompts held out) and tokenizes
/// the examples of `cfg`, as [`super::prepare_data`] does pairs.
pub(super) fn prepare_examples(cfg: &RunConfig, tok: &dyn TextTokenizer) -> Result<PreparedData> {
    let d = &cfg.data;
    let path = cfg.require_data()?;
    let mut report = Vec::new();
    let load = |path: &std::path::Path, key: &str| -> Result<_> {
        let (examples, load) = load_examples(path, d.format, d.selection, d.skip_invalid)
            .with_context(|| format!("loading {key} {}", path.display()))?;
        Ok((examples, format!("{} ({}): {load}", path.display(), d.selection)))
    };
    let (examples, line) = load(path, "data.path")?;
    report.push(line);
    let (train, eval) = match &d.eval_path {
        Some(eval_path) => {
            let (eval, line) = load(eval_path, "data.eval_path")?;
            report.push(line);
            (examples, eval)
        }
        None => split_holdout_by(examples, d.eval_fraction, cfg.seed, |e| e.prompt.clone()),
    };
    let format = sequence_format(&d.template, cfg.model.init.as_deref()).context("data.template")?;
    let limits = Truncation::new(d.max_len);
    let (train, train_rep) = tokenize_examples(&train, tok, format.as_ref(), &limits)?;
    let (eval, eval_rep) = tokenize_examples(&eval, tok, format.as_ref(), &limits)?;
    report.push(format!("train: {train_rep}"));
    report.push(format!("eval: {eval_rep}"));
    ensure!(
        !train.is_empty(),
        "no training examples left in {} after selection and truncation (data.max_len = {})",
        path.display(),
        d.max_len
    );
    Ok(PreparedData { train: Vec::new(), eval: Vec::new(), examples: Some(UnpairedData { train, eval }), report })
}

/// An unpaired micro-batch on the device, with the host batch it came from.
pub struct UnpairedMicroBatch<B: Backend> {
    pub host: UnpairedBatch,
    pub matched: DeviceBatch<B>,
    pub kl: Option<DeviceBatch<B>>,
    /// `[N]` the labels (1 = desirable), the completions' safety flags (1 = unsafe) and lengths.
    pub desirable: B::Ids,
    pub completion_unsafe: B::Ids,
    pub lengths: B::Ids,
}

impl<B: Backend> UnpairedMicroBatch<B> {
    pub fn upload(b: &B, host: UnpairedBatch) -> Result<Self> {
        let kl = host.kl.as_ref().map(|kl| DeviceBatch::upload(b, kl)).transpose()?;
        let flags = |values: &[bool]| b.upload_ids(&values.iter().map(|&v| i32::from(v)).collect::<Vec<i32>>());
        let lengths: Vec<i32> = (0..host.matched.num_seqs()).map(|s| host.matched.num_targets(s) as i32).collect();
        Ok(Self {
            matched: DeviceBatch::upload(b, &host.matched)?,
            kl,
            desirable: flags(&host.desirable)?,
            completion_unsafe: flags(&host.completion_unsafe)?,
            lengths: b.upload_ids(&lengths)?,
            host,
        })
    }
}

/// What one micro-batch gave, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct UnpairedOutput {
    /// `[N, EXAMPLE_METRICS]` per example: the weighted loss, the reward `β x`, the KL estimate.
    pub metrics: Vec<f32>,
    /// The micro-batch's KL estimate (0 without KL sequences).
    pub kl: f64,
    /// The policy's sequence log-probs `[N]`.
    pub logps: Vec<f32>,
}

impl UnpairedOutput {
    /// Example i's weighted loss.
    pub fn loss(&self, i: usize) -> f32 {
        self.metrics[i * EXAMPLE_METRICS]
    }

    /// Example i's reward `β x`.
    pub fn reward(&self, i: usize) -> f32 {
        self.metrics[i * EXAMPLE_METRICS + 1]
    }
}

/// Runs the reference and the policy on a micro-batch (the policy's forward on the examples' own
/// sequences last, so that its backward may follow) and the loss op under `objective` (an
/// objective on unpaired examples). Returns the output and the gradient in the policy's log-probs
/// `[N]`, times `grad_scale`, on the device.
pub fn unpaired_outputs<B: Backend>(
    policy: &mut Decoder<B>,
    reference: &mut Decoder<B>,
    batch: &UnpairedMicroBatch<B>,
    objective: &Objective,
    grad_scale: f32,
) -> Result<(UnpairedOutput, B::Buf)> {
    let backend = policy.backend().clone();
    let b = &*backend;
    // Copied out: each model's next forward reuses its buffers.
    let copy = |src: &B::Buf| -> Result<B::Buf> {
        let mut dst = b.zeros(b.buf_len(src))?;
        b.copy(&mut dst, src)?;
        Ok(dst)
    };
    let kl = match &batch.kl {
        Some(kl_batch) => Some((copy(policy.forward(kl_batch)?)?, copy(reference.forward(kl_batch)?)?)),
        None => None,
    };
    let reference_logps = reference.forward(&batch.matched)?;
    let logps = policy.forward(&batch.matched)?;
    let n = batch.host.num_examples();
    ensure!(b.buf_len(logps) == n, "{} log-probs for {n} examples", b.buf_len(logps));
    let examples = ExampleParts {
        desirable: &batch.desirable,
        policy_kl: kl.as_ref().map(|(p, _)| p),
        reference_kl: kl.as_ref().map(|(_, r)| r),
    };
    let (flags, lengths) = (&batch.completion_unsafe, &batch.lengths);
    let inputs = PreferenceLossInputs {
        grad_scale,
        ..PreferenceLossInputs::examples(logps, reference_logps, flags, lengths, examples, objective)
    };
    let (mut metrics, mut dpolicy) = (b.zeros(n * EXAMPLE_METRICS)?, b.zeros(n)?);
    b.preference_loss(&mut metrics, &mut dpolicy, &inputs)?;
    let metrics = b.download(&metrics)?;
    let kl = if n > 0 { f64::from(metrics[2]) } else { 0.0 };
    Ok((UnpairedOutput { metrics, kl, logps: b.download(logps)? }, dpolicy))
}

impl<B: Backend> Learner<B> {
    /// One optimizer step on unpaired `micro`-batches at learning rate `lr`, the gradient that of
    /// the mean loss over all their examples. `each` gets every micro-batch's output.
    pub fn unpaired_step(
        &mut self,
        micro: &[UnpairedMicroBatch<B>],
        lr: f32,
        each: impl FnMut(&UnpairedBatch, &UnpairedOutput),
    ) -> Result<StepInfo> {
        let examples: usize = micro.iter().map(|m| m.host.num_examples()).sum();
        self.unpaired_gradients(micro, examples, each)?;
        self.update(lr)
    }

    /// The gradients of unpaired `micro`-batches (zeroed first), each example's loss weighted
    /// `1 / examples` (`examples`: the whole step's, which a data-parallel rank's share is a part of).
    pub fn unpaired_gradients(
        &mut self,
        micro: &[UnpairedMicroBatch<B>],
        examples: usize,
        mut each: impl FnMut(&UnpairedBatch, &UnpairedOutput),
    ) -> Result<()> {
        let Some(&objective) = self.objective.as_unpaired() else {
            bail!("the unpaired step needs an objective on unpaired examples, got {}", self.objective.describe())
        };
        let Reference::Model(reference) = &mut self.reference else {
            bail!("objective {} needs the reference model (precompute_ref = false)", objective.name())
        };
        let grad_scale = 1.0 / examples as f32;
        self.policy.zero_grad()?;
        for batch in micro {
            let (output, dpolicy) = unpaired_outputs(&mut self.policy, reference, batch, &self.objective, grad_scale)?;
            self.policy.backward(&batch.matched, &dpolicy)?;
            each(&batch.host, &output);
        }
        Ok(())
    }
}

/// Sums over examples of KTO's metrics; `write_means` divides.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExampleStats {
    pub examples: usize,
    pub loss: f64,
    pub desirable: usize,
    pub reward_desirable: f64,
    pub logp_desirable: f64,
    pub undesirable: usize,
    pub reward_undesirable: f64,
    pub logp_undesirable: f64,
    /// Micro-batches and the sum of their KL estimates.
    pub batches: usize,
    pub kl: f64,
}

impl ExampleStats {
    /// Adds a micro-batch's output.
    pub fn add(&mut self, batch: &UnpairedBatch, output: &UnpairedOutput) {
        for (i, (&desirable, &logp)) in batch.desirable.iter().zip(&output.logps).enumerate() {
            let reward = f64::from(output.reward(i));
            self.examples += 1;
            self.loss += f64::from(output.loss(i));
            if desirable {
                self.desirable += 1;
                self.reward_desirable += reward;
                self.logp_desirable += f64::from(logp);
            } else {
                self.undesirable += 1;
                self.reward_undesirable += reward;
                self.logp_undesirable += f64::from(logp);
            }
        }
        self.batches += 1;
        self.kl += output.kl;
    }

    /// Adds `other`'s sums.
    pub fn merge(&mut self, other: &ExampleStats) {
        let sums = self.to_values().iter().zip(other.to_values()).map(|(a, b)| a + b).collect::<Vec<f64>>();
        *self = Self::from_values(&sums);
    }

    /// The sums as host values for a data-parallel `all_reduce_host` (the counts are exact in f64).
    pub fn to_values(&self) -> Vec<f64> {
        vec![
            self.examples as f64,
            self.loss,
            self.desirable as f64,
            self.reward_desirable,
            self.logp_desirable,
            self.undesirable as f64,
            self.reward_undesirable,
            self.logp_undesirable,
            self.batches as f64,
            self.kl,
        ]
    }

    /// The inverse of [`ExampleStats::to_values`].
    pub fn from_values(v: &[f64]) -> Self {
        ExampleStats {
            examples: v[0] as usize,
            loss: v[1],
            desirable: v[2] as usize,
            reward_desirable: v[3],
            logp_desirable: v[4],
            undesirable: v[5] as usize,
            reward_undesirable: v[6],
            logp_undesirable: v[7],
            batches: v[8] as usize,
            kl: v[9],
        }
    }

    /// Writes the means under TRL's KTO names, each prefixed by `prefix` (`""` or `"eval/"`); the
    /// chosen (rejected) means only when there were desirable (undesirable) examples.
    pub fn write_means(&self, prefix: &str, rec: &mut Record) {
        if self.examples == 0 {
            return;
        }
        let mut put = |name: &str, value: f64| rec.insert(format!("{prefix}{name}"), json_f64(value));
        put("loss", self.loss / self.examples as f64);
        put("kl", self.kl / self.batches.max(1) as f64);
        let chosen = (self.desirable > 0).then(|| self.reward_desirable / self.desirable as f64);
        let rejected = (self.undesirable > 0).then(|| self.reward_undesirable / self.undesirable as f64);
        if let Some(reward) = chosen {
            put("rewards/chosen", reward);
            put("logps/chosen", self.logp_desirable / self.desirable as f64);
        }
        if let Some(reward) = rejected {
            put("rewards/rejected", reward);
            put("logps/rejected", self.logp_undesirable / self.undesirable as f64);
        }
        if let (Some(chosen), Some(rejected)) = (chosen, rejected) {
            put("rewards/margins", chosen - rejected);
        }
    }
}

/// KTO's metrics of `policy` on fixed examples, in consecutive chunks of `token_budget` (each
/// chunk's KL sequences rotated within it), the reference model run alongside.
pub fn evaluate_examples<B: Backend>(
    policy: &mut Decoder<B>,
    reference: &mut Decoder<B>,
    examples: &[TokenizedExample],
    objective: &Kto,
    token_budget: usize,
    max_len: usize,
) -> Result<ExampleStats> {
    let backend = policy.backend().clone();
    let kl = objective.estimates_kl();
    let mut stats = ExampleStats::default();
    let whole = Objective::Kto(*objective);
    for ids in chunks_by_cost(examples.len(), token_budget, |i| examples[i].batch_cost(kl)) {
        let batch = UnpairedMicroBatch::upload(&*backend, unpaired_batch(examples, &ids, kl.then_some(max_len)))?;
        let (output, _) = unpaired_outputs(policy, reference, &batch, &whole, 1.0)?;
        stats.add(&batch.host, &output);
    }
    Ok(stats)
}

impl<B: Backend> Trainer<B> {
    /// One optimizer step on unpaired examples.
    pub(super) fn unpaired_step(&mut self) -> Result<StepInfo> {
        let (budget, max_len) = (self.budget(), self.cfg.data.max_len);
        let kl = self.learner.objective.as_unpaired().is_some_and(Kto::estimates_kl);
        let backend = self.backend.clone();
        let examples = &self.data.examples.as_ref().context("a run on pairs has no unpaired examples")?.train;
        let batches: Vec<UnpairedBatch> = (0..self.cfg.batching.grad_accum)
            .map(|_| {
                let ids = self.batcher.next_ids(budget, |i| examples[i].batch_cost(kl));
                unpaired_batch(examples, &ids, kl.then_some(max_len))
            })
            .collect();
        if self.group.is_some() {
            return self.unpaired_step_in_group(batches);
        }
        let micro = batches
            .into_iter()
            .map(|batch| UnpairedMicroBatch::upload(&*backend, batch))
            .collect::<Result<Vec<_>>>()?;
        let lr = self.next_lr();
        let (interval, train_tokens) = (&mut self.interval, &mut self.train_tokens);
        self.learner.unpaired_step(&micro, lr, |batch, output| {
            interval.examples.add(batch, output);
            interval.tokens += batch.num_tokens();
            *train_tokens += batch.num_tokens();
        })
    }

    /// Writes the held-out examples' metrics into `rec` (nothing when there are none).
    pub(super) fn evaluate_unpaired(&mut self, rec: &mut Record) -> Result<()> {
        let objective = *self.learner.objective.as_unpaired().context("not an objective on unpaired examples")?;
        let (budget, max_len) = (self.budget(), self.cfg.data.max_len);
        let Reference::Model(reference) = &mut self.learner.reference else {
            bail!("objective {} needs the reference model", objective.name())
        };
        let eval = &self.data.examples.as_ref().context("a run on pairs has no unpaired examples")?.eval;
        let stats = evaluate_examples(&mut self.learner.policy, reference, eval, &objective, budget, max_len)?;
        stats.write_means("eval/", rec);
        Ok(())
    }
}
