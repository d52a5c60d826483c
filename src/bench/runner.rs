//! The timed training steps: the trainer's own step code ([`Learner::preference_step`]) on synthetic
//! batches, each phase timed between two device synchronisations.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::report::{peak_rss_bytes, report_from_samples, BenchReport, PhaseTimes, StepSample};
use super::{synthetic_batch, BenchConfig};
use crate::backend::{Backend, PAIR_METRICS};
use crate::model::decoder::random_weights;
use crate::model::{Decoder, HostAdapters, LoraSpec};
use crate::optim::AdamW;
use crate::train::step::{adamw_config, Learner, MicroBatch, Phase, Reference};

/// Everything one benchmark step needs, built once: the trainer's [`Learner`] (policy, frozen
/// reference, optimizer state) and batches on the device. `step` runs one training step through the
/// trainer's own step code, timing its phases. Used by [`run_bench`] and by the criterion bench
/// `benches/step_cpu.rs`.
pub struct StepRunner<B: Backend> {
    backend: Arc<B>,
    cfg: BenchConfig,
    learner: Learner<B>,
    batches: Vec<MicroBatch<B>>,
    step: u32,
}

/// Distinct synthetic batches cycled through by the steps (the shape is what matters; a few
/// different batches keep the loss from being about one batch).
const DISTINCT_BATCHES: usize = 4;

impl<B: Backend> StepRunner<B> {
    pub fn new(backend: Arc<B>, cfg: &BenchConfig) -> Result<Self> {
        cfg.validate()?;
        let weights = random_weights(cfg.model_config(), cfg.seed)?;
        let lora = &cfg.lora;
        let mut policy = if lora.r > 0 {
            // LoRA: the frozen base with fresh adapters (PEFT's init, B = 0: the loss is the full
            // model's at the first step, the step's work is LoRA's).
            let targets = lora.target_list();
            let config = &weights.config;
            let target_modules = if targets.is_empty() { LoraSpec::default_targets(config) } else { targets };
            let spec = LoraSpec { r: lora.r, alpha: lora.alpha, target_modules, use_rslora: lora.use_rslora };
            Decoder::with_lora(backend.clone(), &weights, HostAdapters::init(config, spec, cfg.seed)?)
        } else {
            Decoder::from_host(backend.clone(), &weights)
        }
        .context("building the policy")?;
        if let Some(rows) = cfg.head_chunk_rows {
            policy.set_head_chunk_rows(rows)?;
        }
        policy.set_gradient_checkpointing(cfg.gradient_checkpointing);
        // Inference only, as the trainer's: no gradients, two layers of activations.
        let reference = if cfg.objective.uses_reference() && policy.has_adapters() {
            // One copy of the base: the reference is the policy with its adapters off.
            Reference::PolicyBase
        } else if cfg.objective.uses_reference() {
            let mut model =
                Decoder::from_host_frozen(backend.clone(), &weights).context("building the reference model")?;
            if let Some(rows) = cfg.head_chunk_rows {
                model.set_head_chunk_rows(rows)?;
            }
            Reference::Model(Box::new(model))
        } else {
            Reference::Free
        };
        drop(weights);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5afe_d90b);
        let batches = (0..DISTINCT_BATCHES.min(cfg.warmup_steps + cfg.steps).max(1))
            .map(|_| MicroBatch::upload(&*backend, synthetic_batch(cfg, &mut rng)))
            .collect::<Result<Vec<_>>>()?;
        let optimizer = AdamW::new(&mut policy, adamw_config(&cfg.run_settings().optimizer))?;
        let learner = Learner {
            policy,
            reference,
            optimizer,
            objective: cfg.objective.clone(),
            grad_clip: cfg.max_grad_norm,
            loss_state: Default::default(),
        };
        Ok(Self { backend, cfg: cfg.clone(), learner, batches, step: 0 })
    }

    pub fn num_params(&self) -> usize {
        self.learner.policy.num_params()
    }

    /// One training step, each phase timed between synchronisations.
    pub fn step(&mut self) -> Result<StepSample> {
        let b = self.backend.clone();
        let batch = std::slice::from_ref(&self.batches[self.step as usize % self.batches.len()]);
        let mut phases = PhaseTimes::default();
        let mut metrics = Vec::new();
        b.synchronize()?;
        let start = Instant::now();
        let mut mark = start;
        let mut lap = |phase: Phase| -> Result<()> {
            b.synchronize()?;
            let now = Instant::now();
            *phases.of(phase) += (now - mark).as_secs_f64() * 1e3;
            mark = now;
            Ok(())
        };
        self.learner.preference_step(batch, self.cfg.lr, |_, out| metrics = out.metrics, &mut lap)?;
        self.step += 1;
        let total_ms = (mark - start).as_secs_f64() * 1e3;
        let pairs = self.cfg.pairs;
        let loss = (0..pairs).map(|p| metrics[p * PAIR_METRICS] as f64).sum::<f64>() / pairs as f64;
        ensure!(loss.is_finite(), "bench step {}: the preference loss is not finite ({loss})", self.step);
        Ok(StepSample { total_ms, phases, loss })
    }
}

/// Runs `cfg.warmup_steps` untimed steps then `cfg.steps` timed ones, and reports.
pub fn run_bench<B: Backend>(backend: Arc<B>, cfg: &BenchConfig) -> Result<BenchReport> {
    let mut runner = StepRunner::new(backend.clone(), cfg)?;
    // As the baseline resets torch's peak after building its models: the peak then starts from what
    // the setup left allocated (weights, optimizer state, batches), not from its transients.
    backend.reset_peak_memory();
    for _ in 0..cfg.warmup_steps {
        runner.step()?;
    }
    let mut samples = Vec::with_capacity(cfg.steps);
    for _ in 0..cfg.steps {
        samples.push(runner.step()?);
    }
    let mut report =
        report_from_samples(cfg, &samples, runner.num_params(), backend.name(), rayon::current_num_threads());
    backend.synchronize()?;
    report.set_memory(backend.memory_stats(), peak_rss_bytes());
    if report.device.starts_with("cpu") {
        report.set_cpu_isa();
    }
    Ok(report)
}
