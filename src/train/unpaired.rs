//! Training on unpaired examples: the objectives of [`crate::loss::Kto`] (KTO, TRL's
//! `apo_zero_unpaired`), through the same loop, checkpoints and logs as pairs.
//!
//! One optimizer step: the batcher hands out `grad_accum` micro-batches of whole examples within the
//! token budget (an example costs its sequence and, for KTO, its share of the KL sequences); per
//! micro-batch, the reference model and the policy run on the KL sequences (KTO only; the policy's
//! KL log-probs carry no gradient, as TRL computes them under `no_grad`), then on the examples'
//! sequences, the policy last so that its backward follows; the loss
//! ([`crate::loss::unpaired_loss`], with the micro-batch's KL estimate) is computed on the host from
//! the per-sequence log-probs, in f64, on any backend (there is no device kernel for it: the host
//! work is a few operations per example); its gradient, scaled by `1 / N` (N = the step's
//! examples, so that the gradient is that of the mean loss over the step), goes back to the device
//! for the policy's backward. Then the global grad-norm clip and AdamW, as for pairs.
//!
//! The reference model runs on every micro-batch: the configuration refuses `precompute_ref` (KTO's
//! KL sequences depend on which examples share a micro-batch). A micro-batch of one example (the end
//! of an epoch can leave one) takes its own completion as its KL sequence, as TRL's last batch does.
//!
//! The log has TRL's KTO metrics: `loss`, `kl` (the mean of the micro-batches' KL estimates),
//! `rewards/chosen` and `logps/chosen` over the desirable examples, `rewards/rejected` and
//! `logps/rejected` over the undesirable ones, `rewards/margins` (their difference); `eval/…` the
//! same on the held-out examples, in fixed chunks of the token budget.

use anyhow::{bail, ensure, Context, Result};

use super::metrics::{json_f64, Record};
use super::step::{Learner, Reference, StepInfo};
use super::{PreparedData, Trainer};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::{
    chunks_by_cost, load_examples, sequence_format, split_holdout_by, tokenize_examples, unpaired_batch, TextTokenizer,
    TokenizedExample, Truncation, UnpairedBatch,
};
use crate::loss::{kl_estimate, unpaired_loss, ExampleInput, ExampleOutput, Kto};
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
}

impl<B: Backend> UnpairedMicroBatch<B> {
    pub fn upload(b: &B, host: UnpairedBatch) -> Result<Self> {
        let kl = host.kl.as_ref().map(|kl| DeviceBatch::upload(b, kl)).transpose()?;
        Ok(Self { matched: DeviceBatch::upload(b, &host.matched)?, kl, host })
    }
}

/// What one micro-batch gave, on the host.
pub struct UnpairedOutput {
    /// Per example: weighted loss, gradient (unscaled), reward.
    pub examples: Vec<ExampleOutput>,
    /// The micro-batch's KL estimate (0 without KL sequences).
    pub kl: f64,
    /// The policy's sequence log-probs `[N]`.
    pub logps: Vec<f32>,
}

/// Runs the reference and the policy on a micro-batch (the policy's forward on the examples' own
/// sequences last, so that its backward may follow) and computes the loss on the host.
pub fn unpaired_outputs<B: Backend>(
    policy: &mut Decoder<B>,
    reference: &mut Decoder<B>,
    batch: &UnpairedMicroBatch<B>,
    objective: &Kto,
) -> Result<UnpairedOutput> {
    let backend = policy.backend().clone();
    let b = &*backend;
    let to_f64 = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let kl = match &batch.kl {
        Some(kl_batch) => {
            let reference_kl = to_f64(b.download(reference.forward(kl_batch)?)?);
            let policy_kl = to_f64(b.download(policy.forward(kl_batch)?)?);
            kl_estimate(&policy_kl, &reference_kl)
        }
        None => 0.0,
    };
    let reference_logps = b.download(reference.forward(&batch.matched)?)?;
    let logps = b.download(policy.forward(&batch.matched)?)?;
    let host = &batch.host;
    ensure!(logps.len() == host.num_examples(), "{} log-probs for {} examples", logps.len(), host.num_examples());
    let inputs: Vec<ExampleInput> = (0..host.num_examples())
        .map(|i| ExampleInput {
            policy: f64::from(logps[i]),
            reference: f64::from(reference_logps[i]),
            desirable: host.desirable[i],
            completion_unsafe: host.completion_unsafe[i],
        })
        .collect();
    Ok(UnpairedOutput { examples: unpaired_loss(objective, &inputs, kl), kl, logps })
}

impl<B: Backend> Learner<B> {
    /// One optimizer step on unpaired `micro`-batches at learning rate `lr`, the gradient that of
    /// the mean loss over all their examples. `each` gets every micro-batch's output.
    pub fn unpaired_step(
        &mut self,
        micro: &[UnpairedMicroBatch<B>],
        lr: f32,
        mut each: impl FnMut(&UnpairedBatch, &UnpairedOutput),
    ) -> Result<StepInfo> {
        let Some(&objective) = self.objective.as_unpaired() else {
            bail!("the unpaired step needs an objective on unpaired examples, got {}", self.objective.describe())
        };
        let Reference::Model(reference) = &mut self.reference else {
            bail!("objective {} needs the reference model (precompute_ref = false)", objective.name())
        };
        let examples: usize = micro.iter().map(|m| m.host.num_examples()).sum();
        let grad_scale = 1.0 / examples as f64;
        let backend = self.policy.backend().clone();
        self.policy.zero_grad()?;
        for batch in micro {
            let output = unpaired_outputs(&mut self.policy, reference, batch, &objective)?;
            let dpolicy: Vec<f32> = output.examples.iter().map(|o| (grad_scale * o.d_policy) as f32).collect();
            self.policy.backward(&batch.matched, &backend.upload(&dpolicy)?)?;
            each(&batch.host, &output);
        }
        self.update(lr)
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
        for ((o, &desirable), &logp) in output.examples.iter().zip(&batch.desirable).zip(&output.logps) {
            self.examples += 1;
            self.loss += o.loss;
            if desirable {
                self.desirable += 1;
                self.reward_desirable += o.reward;
                self.logp_desirable += f64::from(logp);
            } else {
                self.undesirable += 1;
                self.reward_undesirable += o.reward;
                self.logp_undesirable += f64::from(logp);
            }
        }
        self.batches += 1;
        self.kl += output.kl;
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
    for ids in chunks_by_cost(examples.len(), token_budget, |i| examples[i].batch_cost(kl)) {
        let batch = UnpairedMicroBatch::upload(&*backend, unpaired_batch(examples, &ids, kl.then_some(max_len)))?;
        let output = unpaired_outputs(policy, reference, &batch, objective)?;
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
        let mut micro = Vec::with_capacity(self.cfg.batching.grad_accum);
        for _ in 0..self.cfg.batching.grad_accum {
            let ids = self.batcher.next_ids(budget, |i| examples[i].batch_cost(kl));
            micro.push(UnpairedMicroBatch::upload(&*backend, unpaired_batch(examples, &ids, kl.then_some(max_len)))?);
        }
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
