//! The engine on unpaired examples (KTO, TRL's `apo_zero_unpaired`): each example is a prompt, one
//! completion and a label ([`UnpairedExample`], TRL's `KTOTrainer` rows), scored and trained on by
//! the same preference-loss op and the same unpaired step as `safedpo train` runs.
//!
//! A call's examples are one batch: KTO's KL estimate is formed from the batch's KL sequences (each
//! prompt with the previous example's completion, as the trainer builds them), so a loss depends
//! on which examples share the call, as TRL's does on its batch.

use anyhow::{bail, ensure, Context, Result};

use super::{on_models, Backends, Engine, ExampleMetrics, UnpairedLossReport, UnpairedStepReport};
use crate::data::{tokenize_examples, TokenizedExample, Truncation, UnpairedExample};
use crate::loss::Objective;
use crate::model::DecoderConfig;

impl Engine {
    /// Tokenises unpaired examples as pairs are tokenised ([`Engine::tokenize`]: the template
    /// around the prompt, the completion after it with EOS, truncation to the context). Fails,
    /// naming the example, when one cannot be kept, so that results match the examples one to one.
    ///
    /// ```
    /// use safedpo::{Engine, UnpairedExample};
    ///
    /// let engine = Engine::new(safedpo::DeviceKind::Cpu)?;
    /// let tokens = engine.tokenize_examples(&[UnpairedExample::new("Hi", "Hello!", true)])?;
    /// assert!(tokens[0].desirable && tokens[0].completion.last() == Some(&engine.tokenizer().eos_id()));
    /// # anyhow::Ok(())
    /// ```
    pub fn tokenize_examples(&self, examples: &[UnpairedExample]) -> Result<Vec<TokenizedExample>> {
        let limits = Truncation::new(self.context_len());
        let (tokens, report) = tokenize_examples(examples, self.tokenizer.as_ref(), &self.template, &limits)?;
        if tokens.len() == examples.len() {
            return Ok(tokens);
        }
        for (i, example) in examples.iter().enumerate() {
            let one = std::slice::from_ref(example);
            if tokenize_examples(one, self.tokenizer.as_ref(), &self.template, &limits)?.0.is_empty() {
                bail!("example {i} cannot be tokenised: {report}");
            }
        }
        bail!("{} of {} examples were dropped: {report}", examples.len() - tokens.len(), examples.len())
    }

    /// Each example's loss under `objective` (an objective on unpaired examples: `kto` or
    /// `apo_zero_unpaired`, see [`crate::loss::Kto`]), the examples one batch (KTO's KL estimate
    /// is the batch's), computed by the device's preference-loss kernel from the policy's and the
    /// reference's log-probs. Takes no gradient and changes nothing.
    ///
    /// ```
    /// use safedpo::{DecoderConfig, Engine, UnpairedExample};
    ///
    /// let mut engine = Engine::new(safedpo::DeviceKind::Cpu)?;
    /// engine.random_policy(DecoderConfig::gpt2(258, 64, 16, 1, 2), 0)?;
    /// engine.reference_from_policy()?;
    /// let examples = [UnpairedExample::new("2+2?", "4", true), UnpairedExample::new("2+2?", "5", false)];
    /// let report = engine.unpaired_loss(&examples, &"kto:beta=0.1".parse()?)?;
    /// // Policy = reference: every reward and the KL estimate are 0, each loss σ(0) = 0.5.
    /// assert!((report.loss - 0.5).abs() < 1e-6 && report.kl == 0.0);
    /// # anyhow::Ok(())
    /// ```
    pub fn unpaired_loss(&mut self, examples: &[UnpairedExample], objective: &Objective) -> Result<UnpairedLossReport> {
        let tokens = self.tokenize_examples(examples)?;
        self.unpaired_loss_tokens(&tokens, objective)
    }

    /// [`Engine::unpaired_loss`] of tokenised examples.
    pub fn unpaired_loss_tokens(
        &mut self,
        examples: &[TokenizedExample],
        objective: &Objective,
    ) -> Result<UnpairedLossReport> {
        require_unpaired(objective)?;
        self.check_examples(examples)?;
        let kl_max_len = self.context_len();
        let output = on_models!(&mut self.backends, |m| m.unpaired_loss(examples, objective, kl_max_len))?;
        let metrics = ExampleMetrics::from_outputs([&output]);
        Ok(UnpairedLossReport {
            objective: objective.clone(),
            loss: metrics.mean_loss(),
            kl: output.kl as f32,
            metrics,
        })
    }

    /// One optimizer step at the optimizer's `lr` on unpaired `examples` (their mean loss) under the
    /// training objective ([`Engine::set_objective`], which must be one on unpaired examples), the
    /// trainer's own unpaired step: reference and policy log-probs of the examples and, for KTO,
    /// of their KL sequences, the loss, backward, grad-norm clip, AdamW.
    ///
    /// ```
    /// use safedpo::{DecoderConfig, Engine, UnpairedExample};
    ///
    /// let mut engine = Engine::new(safedpo::DeviceKind::Cpu)?;
    /// engine.random_policy(DecoderConfig::gpt2(258, 64, 16, 1, 2), 0)?;
    /// engine.reference_from_policy()?;
    /// engine.set_objective("kto:beta=0.5".parse()?)?;
    /// let examples = [UnpairedExample::new("2+2?", "4", true), UnpairedExample::new("Sky?", "Green", false)];
    /// let first = engine.unpaired_train_step(&examples)?;
    /// let second = engine.unpaired_train_step(&examples)?;
    /// assert_eq!((first.step, second.step), (1, 2));
    /// assert!(second.loss < first.loss);
    /// # anyhow::Ok(())
    /// ```
    pub fn unpaired_train_step(&mut self, examples: &[UnpairedExample]) -> Result<UnpairedStepReport> {
        let tokens = self.tokenize_examples(examples)?;
        self.unpaired_train_step_tokens(&[&tokens], self.optimizer.lr)
    }

    /// [`Engine::unpaired_train_step`] on tokenised micro-batches at learning rate `lr`: one
    /// optimizer step whose gradient is that of the mean loss over all their examples, each
    /// micro-batch with its own KL estimate. The report's per-example values follow the examples
    /// in order, micro-batch after micro-batch; its `kl` is the mean of the micro-batches'.
    pub fn unpaired_train_step_tokens(
        &mut self,
        micro_batches: &[&[TokenizedExample]],
        lr: f32,
    ) -> Result<UnpairedStepReport> {
        ensure!(!micro_batches.is_empty(), "the step has no micro-batches");
        require_unpaired(&self.objective)?;
        for (i, examples) in micro_batches.iter().enumerate() {
            self.check_examples(examples).with_context(|| format!("micro-batch {i}"))?;
        }
        let (objective, optimizer, clip, kl_max_len) =
            (&self.objective, self.optimizer, self.grad_clip, self.context_len());
        on_models!(&mut self.backends, |m| m.set_grad_dtype(self.grad_dtype, micro_batches.len()))?;
        let (info, step, outputs) = on_models!(&mut self.backends, |m| {
            m.unpaired_train_step(micro_batches, objective, optimizer, clip, lr, kl_max_len)
        })?;
        let metrics = ExampleMetrics::from_outputs(&outputs);
        let kl = outputs.iter().map(|o| o.kl).sum::<f64>() / outputs.len() as f64;
        Ok(UnpairedStepReport {
            step,
            loss: metrics.mean_loss(),
            kl: kl as f32,
            grad_norm: info.grad_norm,
            lr: info.lr,
            metrics,
        })
    }

    fn check_examples(&self, examples: &[TokenizedExample]) -> Result<()> {
        let config =
            self.policy_config().context("no policy: load one first (Engine::load_policy or Engine::random_policy)")?;
        check_examples(examples, config)
    }
}

/// Fails for an objective on pairs, naming the unpaired ones.
fn require_unpaired(objective: &Objective) -> Result<()> {
    ensure!(
        objective.as_unpaired().is_some(),
        "objective {objective} is on pairs; the unpaired methods take kto or apo_zero_unpaired (Engine::loss and \
         Engine::train_step take pairs)"
    );
    Ok(())
}

/// Checks a batch of examples before it is packed: not empty, ids inside the vocabulary, a
/// non-empty completion, every sequence inside the context; errors name the example.
fn check_examples(examples: &[TokenizedExample], config: &DecoderConfig) -> Result<()> {
    ensure!(!examples.is_empty(), "the batch has no examples");
    for (i, example) in examples.iter().enumerate() {
        for (part, ids) in [("prompt", &example.prompt), ("completion", &example.completion)] {
            if let Some(&id) = ids.iter().find(|&&id| id < 0 || id as usize >= config.vocab_size) {
                bail!("example {i}: {part} token id {id} is outside the model's vocabulary 0..{}", config.vocab_size);
            }
        }
        ensure!(!example.completion.is_empty(), "example {i}: the completion is empty (it needs one token at least)");
        let len = example.sequence_tokens();
        ensure!(
            len <= config.n_positions,
            "example {i}: a sequence of {len} tokens exceeds the model's context of {} positions",
            config.n_positions
        );
    }
    Ok(())
}
