//! The front door: an [`Engine`] holds a policy (trainable) and a reference (frozen) on one device,
//! turns preference pairs into tokens with the policy's tokenizer and a [`Template`], and gives back
//! per-pair log-probs, losses for any [`Objective`] and training steps, all as plain host values.
//!
//! The building blocks stay available ([`crate::backend`], [`crate::model`], [`crate::data`],
//! [`crate::loss`], [`crate::train`]); the engine is what a program needs when it wants the numbers,
//! not the machinery. The backend is chosen at run time (`auto|cpu|cuda|emu`) and never appears in
//! a type the caller writes.
//!
//! Unpaired examples (a prompt, one completion, a label: KTO and TRL's `apo_zero_unpaired`) have
//! their own methods: [`Engine::unpaired_loss`] and [`Engine::unpaired_train_step`].
//!
//! Gradient accumulation is [`Engine::accumulated_step`] (one optimizer step over several
//! micro-batches). Whole training runs from a TRL-style `DPOConfig` are [`train_dpo_config`] (the
//! Python module's `safedpo.train`).
//!
//! The 30-line program: the log-probs of a batch of pairs and their DPO and SafeDPO losses, on a
//! tiny random model (a real one is `engine.load_policy("path/to/model")?` and
//! `engine.load_reference(…)?`, a HF model directory with its tokenizer).
//!
//! ```
//! use safedpo::{DecoderConfig, DeviceKind, Engine, Objective, PreferencePair};
//!
//! fn main() -> anyhow::Result<()> {
//!     let mut engine = Engine::new(DeviceKind::Cpu)?;
//!     // A tiny GPT-2 over the built-in byte tokenizer (258 ids); the reference starts equal to it.
//!     engine.random_policy(DecoderConfig::gpt2(258, 128, 32, 2, 2), 0)?;
//!     engine.reference_from_policy()?;
//!
//!     let pairs = vec![
//!         PreferencePair::new("How do I pick a lock?", "I can't help with that.", "Use a tension wrench.")
//!             .with_safety(false, true),
//!         PreferencePair::new("Name a colour.", "Blue.", "Seven."),
//!     ];
//!     let logps = engine.logps(&pairs)?;
//!     let reference = logps.reference.as_ref().expect("a reference is loaded");
//!     for i in 0..pairs.len() {
//!         println!(
//!             "pair {i}: policy {:.2} / {:.2}, reference {:.2} / {:.2}",
//!             logps.policy.chosen[i], logps.policy.rejected[i], reference.chosen[i], reference.rejected[i]
//!         );
//!     }
//!
//!     let dpo = engine.loss(&pairs, &"dpo:beta=0.1".parse::<Objective>()?)?;
//!     let safedpo = engine.loss(&pairs, &Objective::default())?; // SafeDPO, β = 0.1, Δ = 10
//!     // Policy = reference: every log-ratio is 0, so DPO's loss is log 2 per pair; SafeDPO adds the
//!     // safety margin to the first pair, whose rejected answer alone is unsafe.
//!     assert!((dpo.loss - std::f32::consts::LN_2).abs() < 1e-5);
//!     assert!(safedpo.metrics.loss[0] > 9.0 && (safedpo.metrics.loss[1] - std::f32::consts::LN_2).abs() < 1e-5);
//!     println!("DPO {:.4}, SafeDPO {:.4}", dpo.loss, safedpo.loss);
//!     Ok(())
//! }
//! ```

// The front door: every public item says what it is.
#![warn(missing_docs)]

mod dpo_config;
mod models;
mod results;
mod unpaired;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

pub use dpo_config::{read_dpo_config, train_dpo_config, train_with, DpoRun, DPO_CONFIG_KEYS, OWN_KEYS};
use models::{check_pairs, Models};
pub use results::{
    ExampleMetrics, Logps, LossReport, PairLogps, PairMetrics, StepReport, UnpairedLossReport, UnpairedStepReport,
};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, Precision};
use crate::backend::device::{precision_for, select_device, DeviceKind, Selection};
use crate::config::{ModelDirSettings, OptimizerConfig};
use crate::data::{check_same_tokenizer, load_tokenizer, tokenize_pairs_with, ByteTokenizer, PreferencePair};
use crate::data::{Template, TextTokenizer, CHAT_TEMPLATE};
use crate::data::{TokenizedPair, Truncation};
use crate::loss::Objective;
use crate::model::{checkpoint, random_weights, DecoderConfig, HostWeights};
use crate::optim::{AdamWConfig, GradDtype};
use crate::train::step::adamw_config;

/// The models on the backend the engine runs on (one arm per backend type; boxed: a model's
/// handles on the CUDA backend are large).
enum Backends {
    Cpu(Box<Models<CpuBackend>>),
    Cuda(Box<Models<CudaBackend>>),
}

/// Runs `$body` with `$models` bound to the engine's `Models<B>`, whichever backend `B` is.
macro_rules! on_models {
    ($backends:expr, |$models:ident| $body:expr) => {
        match $backends {
            Backends::Cpu($models) => $body,
            Backends::Cuda($models) => $body,
        }
    };
}
// By path, for the submodules declared above it.
use on_models;

/// A policy and a reference on one device, with the tokenizer, template and training settings that
/// turn text pairs into log-probs, losses and optimizer steps.
///
/// Every result comes back on the host, chosen and rejected in separate, named vectors, in the order
/// of the pairs given. Text pairs go through [`Engine::tokenize`] (the policy directory's tokenizer,
/// or the built-in byte tokenizer; the [`Template`]; truncation to the context); the `*_tokens`
/// methods take pairs already tokenised.
///
/// ```
/// use safedpo::{DecoderConfig, DeviceKind, Engine};
///
/// let mut engine = Engine::new(DeviceKind::Cpu)?;
/// engine.random_policy(DecoderConfig::gpt2(258, 64, 16, 1, 2), 7)?;
/// assert_eq!(engine.device(), DeviceKind::Cpu);
/// assert_eq!(engine.policy_config().unwrap().n_layer, 1);
/// # anyhow::Ok(())
/// ```
pub struct Engine {
    backends: Backends,
    device: DeviceKind,
    precision: Precision,
    fallback_reason: Option<String>,
    tokenizer: Box<dyn TextTokenizer>,
    tokenizer_dir: Option<PathBuf>,
    template: Template,
    max_len: Option<usize>,
    /// Whether the template and max_len were set (else a policy directory's saved ones are taken).
    template_given: bool,
    max_len_given: bool,
    objective: Objective,
    optimizer: AdamWConfig,
    grad_clip: f32,
    grad_dtype: GradDtype,
}

impl Engine {
    /// An engine on `device` in that device's precision: f32 on the CPU and the emulated device,
    /// bf16 with fp32 master weights on a GPU. `Auto` takes GPU 0 when one is usable, else the CPU
    /// ([`Engine::fallback_reason`] says why). `"cuda".parse::<DeviceKind>()` reads a device name.
    ///
    /// ```
    /// let engine = safedpo::Engine::new("auto".parse()?)?;
    /// println!("running on {} ({:?})", engine.device(), engine.precision());
    /// # anyhow::Ok(())
    /// ```
    pub fn new(device: DeviceKind) -> Result<Self> {
        Self::build(device, None)
    }

    /// An engine on `device` in `precision`. The CPU backend runs f32 only; the CUDA backend (a GPU
    /// or the emulated device) runs either.
    ///
    /// ```
    /// use safedpo::{DeviceKind, Engine, Precision};
    ///
    /// assert!(Engine::with_precision(DeviceKind::Cpu, Precision::Bf16).is_err());
    /// let engine = Engine::with_precision(DeviceKind::Cpu, Precision::F32)?;
    /// assert_eq!(engine.precision(), Precision::F32);
    /// # anyhow::Ok(())
    /// ```
    pub fn with_precision(device: DeviceKind, precision: Precision) -> Result<Self> {
        Self::build(device, Some(precision))
    }

    fn build(device: DeviceKind, precision: Option<Precision>) -> Result<Self> {
        let (backends, device, precision, fallback_reason) = match select_device(device)? {
            Selection::Cpu { reason } => {
                if precision == Some(Precision::Bf16) {
                    bail!("the CPU backend runs f32 only (bf16 needs --device cuda or emu)");
                }
                (
                    Backends::Cpu(Box::new(Models::new(Arc::new(CpuBackend::new())))),
                    DeviceKind::Cpu,
                    Precision::F32,
                    reason,
                )
            }
            Selection::Device(dev) => {
                let precision = precision.unwrap_or_else(|| precision_for(&dev));
                let kind = dev.kind();
                (
                    Backends::Cuda(Box::new(Models::new(Arc::new(CudaBackend::new(dev, precision))))),
                    kind,
                    precision,
                    None,
                )
            }
        };
        let optimizer = OptimizerConfig::default();
        Ok(Self {
            backends,
            device,
            precision,
            fallback_reason,
            tokenizer: Box::new(ByteTokenizer),
            tokenizer_dir: None,
            template: Template::default(),
            max_len: None,
            template_given: false,
            max_len_given: false,
            objective: Objective::default(),
            optimizer: adamw_config(&optimizer),
            grad_clip: optimizer.grad_clip,
            grad_dtype: GradDtype::default(),
        })
    }

    // ---- what the engine runs on ------------------------------------------------------------

    /// The device the engine runs on: `Cpu`, `Cuda` or `Emu` (never `Auto`).
    pub fn device(&self) -> DeviceKind {
        self.device
    }

    /// The precision of the policy's parameters and activations (`F32` on the CPU).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Why `DeviceKind::Auto` ran on the CPU, when it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// The backend's own description, e.g. `cpu (2 threads)`.
    pub fn backend_name(&self) -> String {
        on_models!(&self.backends, |m| m.backend_name())
    }

    // ---- models -----------------------------------------------------------------------------

    /// Loads the trainable policy from a HF model directory (`config.json`, safetensors; GPT-2,
    /// Llama, Mistral, Qwen2) and takes its tokenizer (`tokenizer.json`, or GPT-2's `vocab.json` +
    /// `merges.txt`; the byte tokenizer when it has none) and, from the run configuration a training
    /// checkpoint carries, the text template and `max_len` it was trained with, unless
    /// [`Engine::set_template`] or [`Engine::set_max_len`] set them. Drops any optimizer state.
    pub fn load_policy(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let weights =
            checkpoint::load_dir(dir).with_context(|| format!("loading the policy from {}", dir.display()))?;
        let tokenizer = load_tokenizer(Some(dir))?;
        let saved = ModelDirSettings::read(dir)?.run.map(|run| run.data);
        self.set_policy_weights(&weights)?;
        self.tokenizer = tokenizer;
        self.tokenizer_dir = Some(dir.to_path_buf());
        if let Some(data) = saved {
            // A chat template renders through the model's files, which the engine does not do.
            if !self.template_given && data.template != CHAT_TEMPLATE {
                self.template = Template::new(data.template)?;
            }
            if !self.max_len_given {
                self.max_len = Some(data.max_len);
            }
        }
        Ok(())
    }

    /// A trainable policy with `config`'s family initialisation, from `seed` (the same seed gives
    /// the same weights). Keeps the current tokenizer (the byte tokenizer unless one was set; its 258
    /// ids need `vocab_size >= 258`).
    pub fn random_policy(&mut self, config: DecoderConfig, seed: u64) -> Result<()> {
        self.set_policy_weights(&random_weights(config, seed)?)
    }

    /// Uploads host weights as the policy (see [`crate::model::HostWeights`]).
    pub fn set_policy_weights(&mut self, weights: &HostWeights) -> Result<()> {
        on_models!(&mut self.backends, |m| m.set_policy(weights))
    }

    /// Loads the frozen reference from a HF model directory. Pairs are tokenised once, with the
    /// policy's tokenizer: a reference directory with a tokenizer of its own that differs from it is
    /// an error.
    pub fn load_reference(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        check_same_tokenizer(self.tokenizer.as_ref(), self.tokenizer_dir.as_deref(), dir)?;
        let weights =
            checkpoint::load_dir(dir).with_context(|| format!("loading the reference from {}", dir.display()))?;
        self.set_reference_weights(&weights)
    }

    /// A frozen reference with `config`'s family initialisation, from `seed`.
    pub fn random_reference(&mut self, config: DecoderConfig, seed: u64) -> Result<()> {
        self.set_reference_weights(&random_weights(config, seed)?)
    }

    /// A frozen copy of the policy's current weights as the reference (the usual DPO start: the
    /// reference is the model before preference training).
    pub fn reference_from_policy(&mut self) -> Result<()> {
        let weights = on_models!(&self.backends, |m| m.policy_weights())?;
        self.set_reference_weights(&weights)
    }

    /// Uploads host weights as the frozen reference.
    pub fn set_reference_weights(&mut self, weights: &HostWeights) -> Result<()> {
        on_models!(&mut self.backends, |m| m.set_reference(weights))
    }

    /// The policy's current weights, on the host.
    pub fn policy_weights(&self) -> Result<HostWeights> {
        on_models!(&self.backends, |m| m.policy_weights())
    }

    /// The policy's configuration, once one is loaded.
    pub fn policy_config(&self) -> Option<&DecoderConfig> {
        on_models!(&self.backends, |m| m.policy_config())
    }

    /// The reference's configuration, once one is loaded.
    pub fn reference_config(&self) -> Option<&DecoderConfig> {
        on_models!(&self.backends, |m| m.reference_config())
    }

    // ---- tokenisation -----------------------------------------------------------------------

    /// Replaces the tokenizer (e.g. a [`crate::data::HfTokenizer`] read from elsewhere).
    pub fn set_tokenizer(&mut self, tokenizer: Box<dyn TextTokenizer>) {
        self.tokenizer = tokenizer;
        // The policy directory's tokenizer files no longer describe it.
        self.tokenizer_dir = None;
    }

    /// The tokenizer pairs are encoded with.
    pub fn tokenizer(&self) -> &dyn TextTokenizer {
        self.tokenizer.as_ref()
    }

    /// The prompt template (default: PKU-SafeRLHF's `BEGINNING OF CONVERSATION: USER: {prompt}
    /// ASSISTANT:`); it must hold `{prompt}` once.
    ///
    /// ```
    /// let mut engine = safedpo::Engine::new(safedpo::DeviceKind::Cpu)?;
    /// engine.set_template("Q: {prompt}\nA:")?;
    /// assert!(engine.set_template("no placeholder").is_err());
    /// # anyhow::Ok(())
    /// ```
    pub fn set_template(&mut self, template: &str) -> Result<()> {
        self.template = Template::new(template)?;
        self.template_given = true;
        Ok(())
    }

    /// The longest sequence (prompt + response) tokenisation keeps; longer pairs are truncated as
    /// [`crate::data`] describes. `None` (the default): the policy's context.
    pub fn set_max_len(&mut self, max_len: Option<usize>) {
        self.max_len = max_len;
        self.max_len_given = true;
    }

    /// Tokenises text pairs: the template around the prompt, the response after it with EOS, and
    /// truncation to the context. Fails, naming the pair, when a pair cannot be kept (a response
    /// with no room left, or two identical responses), so that results match the pairs one to one.
    ///
    /// ```
    /// use safedpo::{Engine, PreferencePair};
    ///
    /// let engine = Engine::new(safedpo::DeviceKind::Cpu)?;
    /// let tokens = engine.tokenize(&[PreferencePair::new("Hi", "Hello!", "Go away.")])?;
    /// assert_eq!(tokens[0].chosen.last(), Some(&engine.tokenizer().eos_id()));
    /// # anyhow::Ok(())
    /// ```
    pub fn tokenize(&self, pairs: &[PreferencePair]) -> Result<Vec<TokenizedPair>> {
        let limits = Truncation::new(self.context_len());
        let (tokens, report) = tokenize_pairs_with(pairs, self.tokenizer.as_ref(), &self.template, &limits)?;
        if tokens.len() == pairs.len() {
            return Ok(tokens);
        }
        for (i, pair) in pairs.iter().enumerate() {
            let (one, report) =
                tokenize_pairs_with(std::slice::from_ref(pair), self.tokenizer.as_ref(), &self.template, &limits)?;
            if one.is_empty() {
                bail!("pair {i} cannot be tokenised as a preference pair: {report}");
            }
        }
        bail!("{} of {} pairs were dropped: {report}", pairs.len() - tokens.len(), pairs.len())
    }

    // ---- log-probs and losses ---------------------------------------------------------------

    /// The policy's (and the reference's, when one is loaded) sequence log-probs of each pair's
    /// chosen and rejected response, summed over the response tokens (EOS included).
    pub fn logps(&mut self, pairs: &[PreferencePair]) -> Result<PairLogps> {
        let tokens = self.tokenize(pairs)?;
        self.logps_tokens(&tokens)
    }

    /// [`Engine::logps`] of tokenised pairs.
    ///
    /// ```
    /// use safedpo::{DecoderConfig, Engine, TokenizedPair};
    ///
    /// let mut engine = Engine::new(safedpo::DeviceKind::Cpu)?;
    /// engine.random_policy(DecoderConfig::gpt2(100, 32, 16, 1, 2), 0)?;
    /// let pair = TokenizedPair { prompt: vec![1, 2, 3], chosen: vec![4, 5], rejected: vec![6], ..Default::default() };
    /// let logps = engine.logps_tokens(&[pair])?;
    /// assert!(logps.policy.chosen[0] < 0.0 && logps.reference.is_none());
    /// # anyhow::Ok(())
    /// ```
    pub fn logps_tokens(&mut self, pairs: &[TokenizedPair]) -> Result<PairLogps> {
        self.check_batch(pairs)?;
        on_models!(&mut self.backends, |m| m.logps(pairs))
    }

    /// Each pair's loss and metrics under `objective` (any of [`Objective::ALL`], with TRL's
    /// modifiers, `ld_alpha` and `use_weighting` included), computed by the device's
    /// preference-loss kernel from the policy's and the reference's log-probs (under `ld_alpha`, the
    /// report's log-probs are the weighted ones the loss read). Takes no gradient and changes
    /// nothing. Objectives on unpaired examples: [`Engine::unpaired_loss`].
    pub fn loss(&mut self, pairs: &[PreferencePair], objective: &Objective) -> Result<LossReport> {
        let tokens = self.tokenize(pairs)?;
        self.loss_tokens(&tokens, objective)
    }

    /// [`Engine::loss`] of tokenised pairs.
    pub fn loss_tokens(&mut self, pairs: &[TokenizedPair], objective: &Objective) -> Result<LossReport> {
        objective.validate()?;
        self.check_batch(pairs)?;
        let (logps, metrics) = on_models!(&mut self.backends, |m| m.loss(pairs, objective))?;
        Ok(LossReport { objective: objective.clone(), loss: metrics.mean_loss(), logps, metrics })
    }

    // ---- training ---------------------------------------------------------------------------

    /// The objective [`Engine::train_step`] minimises (default: SafeDPO, β = 0.1, Δ = 10).
    pub fn set_objective(&mut self, objective: Objective) -> Result<()> {
        objective.validate()?;
        self.objective = objective;
        Ok(())
    }

    /// The training objective.
    pub fn objective(&self) -> &Objective {
        &self.objective
    }

    /// AdamW's settings and the global grad-norm clip (0 disables it); defaults: `[optimizer]`'s
    /// (lr 1e-5, β 0.9/0.999, ε 1e-8, no weight decay, clip 1). Set them before the first step:
    /// the optimizer state is made then.
    pub fn set_optimizer(&mut self, optimizer: AdamWConfig, grad_clip: f32) -> Result<()> {
        optimizer.validate()?;
        anyhow::ensure!(grad_clip.is_finite() && grad_clip >= 0.0, "grad_clip = {grad_clip} must be finite and >= 0");
        if on_models!(&self.backends, |m| m.has_optimizer()) {
            bail!("set_optimizer: the optimizer state exists already (set it before the first train_step)");
        }
        self.optimizer = optimizer;
        self.grad_clip = grad_clip;
        Ok(())
    }

    /// The optimizer's settings and the grad-norm clip.
    pub fn optimizer(&self) -> (AdamWConfig, f32) {
        (self.optimizer, self.grad_clip)
    }

    /// Where the policy's gradients accumulate on a bf16 engine (the trainer's `train.grad_dtype`;
    /// nothing changes on an f32 one). `Auto` (the default) stores them in f32 from the first step
    /// of several micro-batches ([`Engine::accumulated_step`]) on, where bf16 adds would compound
    /// their rounding; `F32` from the first step; `Bf16` never. Set it before the first step: a
    /// gradient stored in f32 stays so.
    ///
    /// ```
    /// use safedpo::{optim::GradDtype, DeviceKind, Engine, Precision};
    ///
    /// let mut engine = Engine::with_precision(DeviceKind::Emu, Precision::Bf16)?;
    /// engine.set_grad_dtype(GradDtype::F32)?;
    /// assert_eq!(engine.grad_dtype(), GradDtype::F32);
    /// # anyhow::Ok(())
    /// ```
    pub fn set_grad_dtype(&mut self, grad_dtype: GradDtype) -> Result<()> {
        if on_models!(&self.backends, |m| m.has_optimizer()) {
            bail!("set_grad_dtype: the optimizer state exists already (set it before the first train_step)");
        }
        self.grad_dtype = grad_dtype;
        Ok(())
    }

    /// The gradients' storage setting ([`Engine::set_grad_dtype`]).
    pub fn grad_dtype(&self) -> GradDtype {
        self.grad_dtype
    }

    /// One optimizer step at the optimizer's `lr` on `pairs` (their mean loss), the trainer's own
    /// step: reference log-probs, policy forward, loss, backward, grad-norm clip, AdamW.
    ///
    /// ```
    /// use safedpo::{DecoderConfig, Engine, PreferencePair};
    ///
    /// let mut engine = Engine::new(safedpo::DeviceKind::Cpu)?;
    /// engine.random_policy(DecoderConfig::gpt2(258, 64, 16, 1, 2), 0)?;
    /// engine.reference_from_policy()?;
    /// let pairs = [PreferencePair::new("2+2?", "4", "5")];
    /// let first = engine.train_step(&pairs)?;
    /// let second = engine.train_step(&pairs)?;
    /// assert_eq!((first.step, second.step), (1, 2));
    /// assert!(second.loss < first.loss);
    /// # anyhow::Ok(())
    /// ```
    pub fn train_step(&mut self, pairs: &[PreferencePair]) -> Result<StepReport> {
        let lr = self.optimizer.lr;
        self.train_step_at(pairs, lr)
    }

    /// [`Engine::train_step`] at learning rate `lr` (a schedule's value for this step).
    pub fn train_step_at(&mut self, pairs: &[PreferencePair], lr: f32) -> Result<StepReport> {
        let tokens = self.tokenize(pairs)?;
        self.train_step_tokens(&tokens, lr)
    }

    /// [`Engine::train_step_at`] on tokenised pairs.
    pub fn train_step_tokens(&mut self, pairs: &[TokenizedPair], lr: f32) -> Result<StepReport> {
        self.accumulated_step_tokens(&[pairs], lr)
    }

    /// One optimizer step whose gradient is accumulated over `micro_batches`, run one after another
    /// (the memory of the largest, not of all together): the gradient of the mean loss over all
    /// their pairs, the same step as [`Engine::train_step`] on them as one batch, up to rounding.
    /// The report's per-pair values follow the pairs in order, micro-batch after micro-batch.
    ///
    /// ```
    /// use safedpo::{DecoderConfig, Engine, PreferencePair};
    ///
    /// let mut engine = Engine::new(safedpo::DeviceKind::Cpu)?;
    /// engine.random_policy(DecoderConfig::gpt2(258, 64, 16, 1, 2), 0)?;
    /// engine.reference_from_policy()?;
    /// let (a, b) = (PreferencePair::new("2+2?", "4", "5"), PreferencePair::new("Sky?", "Blue", "Green"));
    /// let step = engine.accumulated_step(&[vec![a], vec![b]])?;
    /// assert_eq!((step.step, step.metrics.loss.len()), (1, 2));
    /// # anyhow::Ok(())
    /// ```
    pub fn accumulated_step(&mut self, micro_batches: &[Vec<PreferencePair>]) -> Result<StepReport> {
        let tokens = micro_batches.iter().map(|pairs| self.tokenize(pairs)).collect::<Result<Vec<_>>>()?;
        let views: Vec<&[TokenizedPair]> = tokens.iter().map(Vec::as_slice).collect();
        self.accumulated_step_tokens(&views, self.optimizer.lr)
    }

    /// [`Engine::accumulated_step`] on tokenised micro-batches, at learning rate `lr`.
    pub fn accumulated_step_tokens(&mut self, micro_batches: &[&[TokenizedPair]], lr: f32) -> Result<StepReport> {
        ensure!(!micro_batches.is_empty(), "the step has no micro-batches");
        for (i, pairs) in micro_batches.iter().enumerate() {
            self.check_batch(pairs).with_context(|| format!("micro-batch {i}"))?;
        }
        let (objective, optimizer, clip, grad_dtype) =
            (&self.objective, self.optimizer, self.grad_clip, self.grad_dtype);
        on_models!(&mut self.backends, |m| m.set_grad_dtype(grad_dtype, micro_batches.len()))?;
        let out = on_models!(&mut self.backends, |m| m.train_step(micro_batches, objective, optimizer, clip, lr))?;
        let metrics = PairMetrics::from_rows(&out.metrics);
        Ok(StepReport {
            step: out.step,
            loss: metrics.mean_loss(),
            grad_norm: out.info.grad_norm,
            lr: out.info.lr,
            policy_logps: Logps::from_interleaved(&out.logps),
            metrics,
        })
    }

    /// Optimizer steps taken since the policy was loaded.
    pub fn steps_taken(&self) -> u32 {
        on_models!(&self.backends, |m| m.steps_taken())
    }

    /// Writes the policy as a HF model directory (created if needed; `config.json`,
    /// `model.safetensors`) that [`Engine::load_policy`], the `safedpo` CLI and `transformers` read,
    /// with the tokenizer files of the directory the policy came from (the byte tokenizer's as a
    /// `tokenizer.json`: `data::tokenizer_files`) and, once it has trained, the optimizer state
    /// (`optimizer.safetensors`).
    ///
    /// ```
    /// use safedpo::{DecoderConfig, Engine};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut engine = Engine::new(safedpo::DeviceKind::Cpu)?;
    /// engine.random_policy(DecoderConfig::gpt2(258, 64, 16, 1, 2), 3)?;
    /// engine.save(dir.path())?;
    /// let mut again = Engine::new(safedpo::DeviceKind::Cpu)?;
    /// again.load_policy(dir.path())?;
    /// assert_eq!(again.policy_weights()?.tensors, engine.policy_weights()?.tensors);
    /// # anyhow::Ok(())
    /// ```
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        on_models!(&self.backends, |m| m.save(dir))?;
        crate::data::save_tokenizer_files(self.tokenizer.as_ref(), self.tokenizer_dir.as_deref(), dir)
    }

    /// The longest sequence tokenisation keeps: `max_len`, else the policy's context.
    fn context_len(&self) -> usize {
        match (self.max_len, self.policy_config()) {
            (Some(len), _) => len,
            (None, Some(config)) => config.n_positions,
            (None, None) => usize::MAX / 4,
        }
    }

    fn check_batch(&self, pairs: &[TokenizedPair]) -> Result<()> {
        let config =
            self.policy_config().context("no policy: load one first (Engine::load_policy or Engine::random_policy)")?;
        check_pairs(pairs, config)
    }
}
