//! The training-step benchmark: N timed DPO/SafeDPO steps after a warm-up, on synthetic data.
//!
//! One step is what the trainer does per batch: the reference model's forward (a frozen model, as
//! the trainer's: no gradients, two layers of activations) to get the reference sequence log-probs,
//! the policy's forward on the chosen and rejected sequences (packed together, through the fused
//! log-softmax-gather), the preference loss, the policy's backward, global grad-norm clipping and
//! AdamW. Each phase is timed between two `backend.synchronize()` calls, so on a GPU the breakdown
//! is honest at the cost of a few bubbles.
//!
//! Memory: `peak_memory_bytes` is the most device memory the backend's buffers held at once during
//! the warm-up and timed steps, counted from the end of the setup, as the baseline reports
//! `torch.cuda.max_memory_allocated()` after `torch.cuda.reset_peak_memory_stats()`: both models'
//! weights, the gradients, the optimizer state and the activations. On a backend that does not
//! count its memory (the CPU) it is the process's peak resident set instead, as `memory_source`
//! says. `peak_host_rss_bytes` is the process's peak resident set in every case.
//!
//! The report's JSON field names are stable: `benches/baselines/torch_dpo.py` prints the same ones
//! for PyTorch, and `scripts/bench-compare.sh` lines the two up.
//!
//! Model FLOPs (see [`step_flops`]) count the useful work of a good implementation: the matrix
//! products (2 FLOPs per multiply-add, the tied LM head included, embeddings and pointwise ops
//! excluded) and causal attention (only the unmasked half of QKᵀ and AV). The backward costs twice
//! the forward; the reference runs forward only. MFU is reported against a peak the user gives.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, MemoryStats, PAIR_METRICS};
use crate::config::validate::Errors;
use crate::config::{FieldError, ModelConfig, OptimizerConfig, Profile, RunConfig, SettingsArgs};
use crate::data::{PackedBatch, PreferenceBatch};
use crate::loss::Objective;
use crate::model::gpt2::random_weights;
use crate::model::{Gpt2, Gpt2Config};
use crate::optim::AdamW;
use crate::train::step::{adamw_config, Learner, MicroBatch, Phase, Reference};

/// What to benchmark: the model's shape, the batch's, the objective and how many steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub vocab_size: usize,
    pub n_positions: usize,
    /// Preference pairs per step; the policy sees `2 · pairs` sequences.
    pub pairs: usize,
    /// Tokens per sequence, prompt and response together (each side of a pair).
    pub seq_len: usize,
    /// Prompt tokens at the start of each sequence (no loss on them); the response is the rest.
    pub prompt_len: usize,
    pub objective: Objective,
    /// Untimed steps first (allocation, caches, lazy initialisation).
    pub warmup_steps: usize,
    pub steps: usize,
    /// Seeds the model initialisation and the synthetic tokens.
    pub seed: u64,
    pub lr: f32,
    /// Global grad-norm clipping threshold (≤ 0: no clipping, the norm is still computed).
    pub max_grad_norm: f32,
    /// The device asked for ("auto", "cpu", "cuda", "emu"); the report names the backend actually used.
    pub device: String,
    /// Peak FLOP/s of the device, for MFU; none means MFU is not reported.
    pub peak_flops: Option<f64>,
}

impl Default for BenchConfig {
    /// The shape: L=4, d=128, 4 heads, vocab 512, 8 pairs of 128 tokens each side
    /// (a quarter of them prompt), DPO with β = 0.1.
    fn default() -> Self {
        let model = Gpt2Config::tiny();
        Self {
            n_layer: model.n_layer,
            n_embd: model.n_embd,
            n_head: model.n_head,
            vocab_size: model.vocab_size,
            n_positions: model.n_positions,
            pairs: 8,
            seq_len: 128,
            prompt_len: 32,
            objective: Objective::Dpo { beta: 0.1 },
            warmup_steps: 3,
            steps: 10,
            seed: 0,
            lr: 1e-4,
            max_grad_norm: 1.0,
            device: "cpu".to_string(),
            peak_flops: None,
        }
    }
}

impl BenchConfig {
    pub fn model_config(&self) -> Gpt2Config {
        Gpt2Config {
            vocab_size: self.vocab_size,
            n_positions: self.n_positions,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            layer_norm_epsilon: 1e-5,
        }
    }

    /// The settings this benchmark shares with `train`: the random init's `[model]` shape, the
    /// `[objective]`, `optimizer.lr` and `optimizer.grad_clip`, the seed and the device.
    pub fn run_settings(&self) -> RunConfig {
        let defaults = RunConfig::default();
        RunConfig {
            seed: self.seed,
            device: self.device.parse().unwrap_or(defaults.device),
            model: ModelConfig {
                n_layer: self.n_layer,
                n_embd: self.n_embd,
                n_head: self.n_head,
                n_positions: self.n_positions,
                vocab_size: Some(self.vocab_size),
                ..defaults.model
            },
            objective: self.objective.clone(),
            optimizer: OptimizerConfig { lr: self.lr, grad_clip: self.max_grad_norm, ..defaults.optimizer },
            ..defaults
        }
    }

    /// The benchmark of `run`'s shared settings (see [`run_settings`](Self::run_settings)) on
    /// batches of `pairs` pairs of `seq_len` tokens, `prompt_len` of them prompt.
    pub fn from_settings(run: &RunConfig, pairs: usize, seq_len: usize, prompt_len: usize) -> Self {
        let defaults = Self::default();
        Self {
            n_layer: run.model.n_layer,
            n_embd: run.model.n_embd,
            n_head: run.model.n_head,
            vocab_size: run.model.vocab_size.unwrap_or(defaults.vocab_size),
            n_positions: run.model.n_positions,
            pairs,
            seq_len,
            prompt_len,
            objective: run.objective.clone(),
            seed: run.seed,
            lr: run.optimizer.lr,
            max_grad_norm: run.optimizer.grad_clip,
            device: run.device.to_string(),
            ..defaults
        }
    }

    /// Checks the settings (as `train` would) and that the batch fits the model, naming the
    /// offending field.
    pub fn validate(&self) -> Result<()> {
        let errors = BenchSettings::validate(&self.run_settings());
        if let Some(e) = errors.first() {
            bail!("bench config: {}: {}", e.field, e.message);
        }
        ensure!(
            self.device.parse::<crate::backend::DeviceKind>().is_ok(),
            "bench config: unknown device {:?}",
            self.device
        );
        ensure!(self.vocab_size >= 2, "bench config: vocab_size must be at least 2, got {}", self.vocab_size);
        ensure!(self.pairs >= 1, "bench config: pairs must be at least 1");
        ensure!(
            self.seq_len >= 2 && self.seq_len <= self.n_positions,
            "bench config: seq_len ({}) must be in 2..={} (n_positions)",
            self.seq_len,
            self.n_positions
        );
        ensure!(
            self.prompt_len >= 1 && self.prompt_len < self.seq_len,
            "bench config: prompt_len ({}) must be in 1..{} (seq_len) so that every response has a token",
            self.prompt_len,
            self.seq_len
        );
        ensure!(self.steps >= 1, "bench config: steps must be at least 1");
        if let Some(p) = self.peak_flops {
            ensure!(p.is_finite() && p > 0.0, "bench config: peak_flops must be positive, got {p}");
        }
        Ok(())
    }

    /// Tokens the policy processes per step: chosen and rejected sequences of every pair.
    pub fn policy_tokens_per_step(&self) -> usize {
        2 * self.pairs * self.seq_len
    }
}

/// Forward FLOPs of one sequence of `t` tokens: `2 · t · (12 L d² + d V)` for the matrix
/// products (QKV, attention projection, the two MLP layers, the tied LM head) plus `2 L d t (t+1)`
/// for causal attention (QKᵀ and AV over the `t (t+1) / 2` unmasked query-key pairs).
pub fn forward_flops_per_sequence(model: &Gpt2Config, t: usize) -> f64 {
    let (l, d, v, t) = (model.n_layer as f64, model.n_embd as f64, model.vocab_size as f64, t as f64);
    2.0 * t * (12.0 * l * d * d + d * v) + 2.0 * l * d * t * (t + 1.0)
}

/// Model FLOPs of one step: policy forward + backward (3× forward) on every sequence, plus the
/// reference forward where the objective uses a reference.
pub fn step_flops(cfg: &BenchConfig) -> f64 {
    let per_seq = forward_flops_per_sequence(&cfg.model_config(), cfg.seq_len);
    let seqs = (2 * cfg.pairs) as f64;
    let passes = if cfg.objective.uses_reference() { 4.0 } else { 3.0 };
    passes * seqs * per_seq
}

/// A synthetic batch: `pairs` pairs whose chosen and rejected sequences share a random prompt and
/// have random responses, all of the configured lengths. Safety flags follow what T(D) leaves:
/// the chosen response is safe, the rejected one unsafe half of the time.
pub fn synthetic_batch(cfg: &BenchConfig, rng: &mut ChaCha8Rng) -> PreferenceBatch {
    let vocab = cfg.vocab_size as i32;
    let mut packed = PackedBatch { cu_seqlens: vec![0], ..Default::default() };
    let (mut unsafe_flags, mut lengths) = (Vec::new(), Vec::new());
    for _ in 0..cfg.pairs {
        let prompt: Vec<i32> = (0..cfg.prompt_len).map(|_| rng.random_range(0..vocab)).collect();
        for side_unsafe in [false, rng.random_bool(0.5)] {
            let mut seq = prompt.clone();
            seq.extend((cfg.prompt_len..cfg.seq_len).map(|_| rng.random_range(0..vocab)));
            packed.push(&seq, cfg.prompt_len);
            unsafe_flags.push(side_unsafe as i32);
            lengths.push((cfg.seq_len - cfg.prompt_len) as i32);
        }
    }
    PreferenceBatch { packed, unsafe_flags, lengths, pair_ids: (0..cfg.pairs).collect() }
}

/// The phases of a step, in order. `log_probs` is folded into `policy_forward` (and the reference
/// log-probs into `reference_forward`): `Gpt2::forward` runs the LM head and the fused
/// log-softmax-gather as its last stage and exposes no hook between them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Zeroing the gradients, then the reference model's forward, log-probs included (no forward for
    /// reference-free objectives).
    pub reference_forward: f64,
    /// Policy forward on chosen and rejected, log-probs included.
    pub policy_forward: f64,
    /// Separate log-prob time where the model exposes it; `null` when folded into the forwards.
    pub log_probs: Option<f64>,
    /// Preference loss and its gradient, metrics and log-probs copied to the host.
    pub loss: f64,
    /// The policy backward (log-softmax-gather backward included).
    pub backward: f64,
    /// Global grad norm, clipping scale and AdamW.
    pub optimizer: f64,
}

impl PhaseTimes {
    /// The time of a step's phase.
    fn of(&mut self, phase: Phase) -> &mut f64 {
        match phase {
            Phase::ReferenceForward => &mut self.reference_forward,
            Phase::PolicyForward => &mut self.policy_forward,
            Phase::Loss => &mut self.loss,
            Phase::Backward => &mut self.backward,
            Phase::Optimizer => &mut self.optimizer,
        }
    }

    fn sum(&self) -> f64 {
        self.reference_forward
            + self.policy_forward
            + self.log_probs.unwrap_or(0.0)
            + self.loss
            + self.backward
            + self.optimizer
    }
}

/// Step-time statistics in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    pub median: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl StepTimes {
    pub fn from_samples(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        Self { median: median_sorted(&s), mean: s.iter().sum::<f64>() / s.len() as f64, min: s[0], max: s[s.len() - 1] }
    }
}

fn median_sorted(s: &[f64]) -> f64 {
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

fn median(samples: impl Iterator<Item = f64>) -> f64 {
    let mut s: Vec<f64> = samples.collect();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        0.0
    } else {
        median_sorted(&s)
    }
}

/// The result of a benchmark run. Field names are stable (the PyTorch baseline prints the same).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// "safedpo", or "torch-eager" / "torch-compile" for the baseline.
    pub engine: String,
    /// The backend that ran, as it names itself.
    pub device: String,
    /// CPU worker threads (rayon's pool; torch's intra-op threads).
    pub threads: usize,
    pub config: BenchConfig,
    pub num_params: usize,
    pub policy_tokens_per_step: usize,
    /// Policy tokens (chosen + rejected sequences) per second at the median step time.
    pub tokens_per_s: f64,
    /// The same at the fastest step.
    pub tokens_per_s_best: f64,
    /// Step times over the timed steps, ms.
    pub step_ms: StepTimes,
    /// Median time of each phase over the timed steps, ms.
    pub phases_ms: PhaseTimes,
    /// Model FLOPs of one step (see the module doc).
    pub flops_per_step: f64,
    /// Model FLOPs per second at the median step time.
    pub flops_per_s: f64,
    /// `flops_per_s / peak_flops` when a peak was given.
    pub mfu: Option<f64>,
    /// Peak memory in bytes, with its source in `memory_source` (see the module doc): the device's
    /// peak allocation (weights, gradients, optimizer state, activations) where the backend counts
    /// it, else the process's peak resident set.
    pub peak_memory_bytes: Option<u64>,
    /// [`DEVICE_MEMORY_SOURCE`] (the backend's count of its device buffers;
    /// "torch.cuda.max_memory_allocated" in the baseline) or [`HOST_MEMORY_SOURCE`].
    pub memory_source: String,
    /// Peak resident set of the process (VmHWM), whatever the device; None where /proc is missing.
    /// Absent from reports written before the field existed.
    #[serde(default)]
    pub peak_host_rss_bytes: Option<u64>,
    /// Mean preference loss of the last timed step (a sanity check: finite, near ln 2 at the start).
    pub final_loss: f64,
    pub notes: Vec<String>,
}

/// `memory_source` when `peak_memory_bytes` is the backend's own count of its device buffers.
pub const DEVICE_MEMORY_SOURCE: &str = "device allocator";
/// `memory_source` when `peak_memory_bytes` is the process's peak resident set (/proc/self/status).
pub const HOST_MEMORY_SOURCE: &str = "VmHWM";

/// One timed step's measurements.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepSample {
    pub total_ms: f64,
    pub phases: PhaseTimes,
    /// Mean loss over the pairs.
    pub loss: f64,
}

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
        let mut policy = Gpt2::from_host(backend.clone(), &weights).context("building the policy")?;
        // Inference only, as the trainer's: no gradients, two layers of activations.
        let reference = if cfg.objective.uses_reference() {
            let model = Gpt2::from_host_frozen(backend.clone(), &weights).context("building the reference model")?;
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
        let learner =
            Learner { policy, reference, optimizer, objective: cfg.objective.clone(), grad_clip: cfg.max_grad_norm };
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

/// Peak resident set size of this process (VmHWM in /proc/self/status), in bytes; None where the
/// file or the field is missing (not Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM:` line of a /proc status file, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
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
    Ok(report)
}

/// Builds the report from timed samples (split out so that it can be checked without a backend).
pub fn report_from_samples(
    cfg: &BenchConfig,
    samples: &[StepSample],
    num_params: usize,
    device: String,
    threads: usize,
) -> BenchReport {
    let step_ms = StepTimes::from_samples(&samples.iter().map(|s| s.total_ms).collect::<Vec<_>>());
    let tokens = cfg.policy_tokens_per_step();
    let per_s = |ms: f64| if ms > 0.0 { 1e3 / ms } else { 0.0 };
    let flops_per_step = step_flops(cfg);
    let flops_per_s = flops_per_step * per_s(step_ms.median);
    let phase = |f: fn(&PhaseTimes) -> f64| median(samples.iter().map(|s| f(&s.phases)));
    let phases_ms = PhaseTimes {
        reference_forward: phase(|p| p.reference_forward),
        policy_forward: phase(|p| p.policy_forward),
        log_probs: None,
        loss: phase(|p| p.loss),
        backward: phase(|p| p.backward),
        optimizer: phase(|p| p.optimizer),
    };
    let mut notes =
        vec!["log-probs (LM head + fused log-softmax-gather) are timed inside the forward phases".to_string()];
    if !cfg.objective.uses_reference() {
        notes.push("reference-free objective: no reference forward".to_string());
    }
    BenchReport {
        engine: "safedpo".to_string(),
        device,
        threads,
        config: cfg.clone(),
        num_params,
        policy_tokens_per_step: tokens,
        tokens_per_s: tokens as f64 * per_s(step_ms.median),
        tokens_per_s_best: tokens as f64 * per_s(step_ms.min),
        step_ms,
        phases_ms,
        flops_per_step,
        flops_per_s,
        mfu: cfg.peak_flops.map(|peak| flops_per_s / peak),
        peak_memory_bytes: None,
        memory_source: HOST_MEMORY_SOURCE.to_string(),
        peak_host_rss_bytes: None,
        final_loss: samples.last().map_or(f64::NAN, |s| s.loss),
        notes,
    }
}

impl BenchReport {
    /// Fills the memory fields: the device's peak where the backend counts its memory, else the
    /// process's peak resident set; the resident set separately in any case.
    pub fn set_memory(&mut self, device: Option<MemoryStats>, host_rss: Option<u64>) {
        self.peak_host_rss_bytes = host_rss;
        (self.peak_memory_bytes, self.memory_source) = match device {
            Some(stats) => (Some(stats.peak_bytes), DEVICE_MEMORY_SOURCE.to_string()),
            None => (host_rss, HOST_MEMORY_SOURCE.to_string()),
        };
    }
}

fn objective_label(o: &Objective) -> String {
    match o {
        Objective::Dpo { beta } => format!("DPO β={beta}"),
        Objective::SafeDpo { beta, delta } => format!("SafeDPO β={beta} Δ={delta}"),
        other => format!("{other:?}"),
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let threads =
            if self.device.contains("thread") { String::new() } else { format!(" ({} threads)", self.threads) };
        writeln!(f, "{} on {}{threads}, {}", self.engine, self.device, objective_label(&c.objective))?;
        writeln!(
            f,
            "model   L={} d={} heads={} vocab={}  ({:.3} M params)",
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.vocab_size,
            self.num_params as f64 / 1e6
        )?;
        writeln!(
            f,
            "batch   {} pairs × 2 sequences × {} tokens ({} prompt) = {} policy tokens/step; {} warm-up + {} timed steps",
            c.pairs, c.seq_len, c.prompt_len, self.policy_tokens_per_step, c.warmup_steps, c.steps
        )?;
        writeln!(
            f,
            "policy tokens/s   {:>10.0} (median step)  {:>10.0} (best step)",
            self.tokens_per_s, self.tokens_per_s_best
        )?;
        writeln!(
            f,
            "step time ms      median {:.2}  mean {:.2}  min {:.2}  max {:.2}",
            self.step_ms.median, self.step_ms.mean, self.step_ms.min, self.step_ms.max
        )?;
        let mfu = match self.mfu {
            Some(m) => format!("MFU {:.1}%", 100.0 * m),
            None => "MFU n/a (no peak FLOP/s given)".to_string(),
        };
        writeln!(
            f,
            "model FLOPs       {:.3} GFLOP/step, {:.2} GFLOP/s, {mfu}",
            self.flops_per_step / 1e9,
            self.flops_per_s / 1e9
        )?;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        match self.peak_memory_bytes {
            Some(b) => writeln!(f, "peak memory       {:.1} MiB ({})", mib(b), self.memory_source)?,
            None => writeln!(f, "peak memory       n/a")?,
        }
        // The resident set again only when the line above is about the device.
        if let (Some(rss), true) = (self.peak_host_rss_bytes, self.memory_source != HOST_MEMORY_SOURCE) {
            writeln!(f, "peak host RSS     {:.1} MiB ({HOST_MEMORY_SOURCE})", mib(rss))?;
        }
        writeln!(f, "final loss        {:.6}", self.final_loss)?;
        let p = &self.phases_ms;
        let total = p.sum().max(f64::MIN_POSITIVE);
        writeln!(f, "{:<34}{:>12}{:>8}", "phase (median)", "ms", "share")?;
        let mut row = |name: &str, ms: f64| writeln!(f, "{name:<34}{ms:>12.2}{:>7.1}%", 100.0 * ms / total);
        row("reference forward (+log-probs)", p.reference_forward)?;
        row("policy forward (+log-probs)", p.policy_forward)?;
        if let Some(lp) = p.log_probs {
            row("log-probs", lp)?;
        }
        row("preference loss", p.loss)?;
        row("backward", p.backward)?;
        row("optimizer (grad norm, AdamW)", p.optimizer)?;
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// Which run settings `bench` takes ([`BenchConfig::run_settings`]), its defaults
/// (`BenchConfig::default()`), and their checks.
pub struct BenchSettings;

/// The settings `bench` takes besides `objective.*`.
const BENCH_SETTINGS: [&str; 9] = [
    "seed",
    "device",
    "model.n_layer",
    "model.n_embd",
    "model.n_head",
    "model.n_positions",
    "model.vocab_size",
    "optimizer.lr",
    "optimizer.grad_clip",
];

impl Profile for BenchSettings {
    fn base() -> RunConfig {
        BenchConfig::default().run_settings()
    }

    fn takes(path: &str) -> bool {
        path.starts_with("objective.") || BENCH_SETTINGS.contains(&path)
    }

    fn validate(cfg: &RunConfig) -> Vec<FieldError> {
        let mut errs = Errors::default();
        for (field, dir) in [("model.init", &cfg.model.init), ("model.reference", &cfg.model.reference)] {
            if dir.is_some() {
                errs.add(field, "bench times a random init of the [model] shape; it reads no model directory");
            }
        }
        cfg.check_model_shape(&mut errs);
        cfg.check_objective(&mut errs);
        cfg.check_optimizer(&mut errs);
        errs.0
    }
}

/// The `bench` command's options; the CLI flattens this into its `bench` subcommand. The model, the
/// objective, the learning rate and clip, the seed and the device are `train`'s settings
/// ([`BenchSettings`]: `--model.n_layer`, `--objective.name`, `--optimizer.lr`, `--device`, …).
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub settings: SettingsArgs<BenchSettings>,
    /// Preference pairs per step.
    #[arg(long, default_value_t = BenchConfig::default().pairs)]
    pub pairs: usize,
    /// Tokens per sequence, prompt + response, each side of a pair.
    #[arg(long, default_value_t = BenchConfig::default().seq_len)]
    pub seq_len: usize,
    /// Prompt tokens per sequence [default: a quarter of --seq-len].
    #[arg(long)]
    pub prompt_len: Option<usize>,
    /// Untimed steps first.
    #[arg(long, default_value_t = BenchConfig::default().warmup_steps)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = BenchConfig::default().steps)]
    pub steps: usize,
    /// Device peak FLOP/s for MFU (e.g. 989e12 for an H100's dense bf16).
    #[arg(long)]
    pub peak_flops: Option<f64>,
    /// CPU worker threads [default: rayon's, one per core].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    pub fn to_config(&self) -> Result<BenchConfig> {
        let run = self.settings.resolve()?.config;
        let prompt_len = self.prompt_len.unwrap_or((self.seq_len / 4).max(1));
        let cfg = BenchConfig {
            warmup_steps: self.warmup,
            steps: self.steps,
            peak_flops: self.peak_flops,
            ..BenchConfig::from_settings(&run, self.pairs, self.seq_len, prompt_len)
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::prelude::*;

    /// FLOPs counted by walking every matrix product of the forward, one by one.
    fn forward_flops_by_enumeration(m: &Gpt2Config, t: usize) -> f64 {
        let (d, v) = (m.n_embd, m.vocab_size);
        let mut flops = 0usize;
        for _layer in 0..m.n_layer {
            for (ic, oc) in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] {
                flops += 2 * t * ic * oc;
            }
            let hd = d / m.n_head;
            for _head in 0..m.n_head {
                for q in 0..t {
                    // q attends to keys 0..=q: scores then the weighted sum of values.
                    flops += 2 * (q + 1) * hd + 2 * (q + 1) * hd;
                }
            }
        }
        flops += 2 * t * d * v;
        flops as f64
    }

    #[test]
    fn flop_formula_matches_enumeration() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..20 {
            let heads = rng.random_range(1..5usize);
            let m = Gpt2Config {
                vocab_size: rng.random_range(2..300),
                n_positions: 64,
                n_embd: heads * rng.random_range(1..9usize),
                n_layer: rng.random_range(1..4),
                n_head: heads,
                layer_norm_epsilon: 1e-5,
            };
            let t = rng.random_range(1..40);
            let (a, b) = (forward_flops_per_sequence(&m, t), forward_flops_by_enumeration(&m, t));
            assert!((a - b).abs() <= 1e-9 * b, "{m:?} t={t}: formula {a} vs enumeration {b}");
        }
    }

    #[test]
    fn step_flops_counts_reference_only_when_used() {
        let cfg = BenchConfig::default();
        let fwd = forward_flops_per_sequence(&cfg.model_config(), cfg.seq_len) * 16.0;
        assert_eq!(step_flops(&cfg), 4.0 * fwd);
        let simpo = BenchConfig { objective: Objective::Simpo { beta: 2.0, gamma: 0.5 }, ..cfg };
        assert_eq!(step_flops(&simpo), 3.0 * fwd);
    }

    #[test]
    fn synthetic_batch_has_the_configured_shape() {
        let cfg = BenchConfig { pairs: 3, seq_len: 10, prompt_len: 4, vocab_size: 17, ..BenchConfig::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let b = synthetic_batch(&cfg, &mut rng);
        assert_eq!(b.num_pairs(), 3);
        assert_eq!(b.packed.num_seqs(), 6);
        assert_eq!(b.packed.num_tokens(), 60);
        assert!(b.packed.tokens.iter().all(|&t| (0..17).contains(&t)));
        for s in 0..6 {
            assert_eq!(b.packed.num_targets(s), 6, "sequence {s}");
            assert_eq!(b.lengths[s], 6);
        }
        for p in 0..3 {
            let (c, r) = (p * 20, p * 20 + 10);
            assert_eq!(b.packed.tokens[c..c + 4], b.packed.tokens[r..r + 4], "pair {p} shares its prompt");
            assert_eq!(b.unsafe_flags[2 * p], 0, "chosen responses are safe after T(D)");
        }
        let again = synthetic_batch(&cfg, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(again, b, "same seed, same batch");
    }

    #[test]
    fn step_times_statistics() {
        let t = StepTimes::from_samples(&[5.0, 1.0, 3.0, 9.0]);
        assert_eq!(t, StepTimes { median: 4.0, mean: 4.5, min: 1.0, max: 9.0 });
        let t = StepTimes::from_samples(&[2.0, 7.0, 3.0]);
        assert_eq!((t.median, t.min, t.max), (3.0, 2.0, 7.0));
    }

    #[test]
    fn vm_hwm_is_parsed_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  999 kB\nVmHWM:\t    1234 kB\nVmRSS:\t  10 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1234 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS: 1 kB\n"), None);
        if cfg!(target_os = "linux") {
            let rss = peak_rss_bytes().expect("VmHWM on Linux");
            assert!(rss > 1 << 20, "a test process holds more than 1 MiB: {rss}");
        }
    }

    #[test]
    fn report_fields_and_rates() {
        let cfg = BenchConfig::default();
        let phases = PhaseTimes {
            reference_forward: 1.0,
            policy_forward: 2.0,
            log_probs: None,
            loss: 0.5,
            backward: 4.0,
            optimizer: 0.5,
        };
        let samples: Vec<StepSample> =
            [8.0, 10.0, 12.0].iter().map(|&total_ms| StepSample { total_ms, phases, loss: 0.69 }).collect();
        let r = report_from_samples(&cfg, &samples, 1000, "cpu".into(), 2);
        assert_eq!(r.policy_tokens_per_step, 2048);
        assert!((r.tokens_per_s - 2048.0 / 0.010).abs() < 1e-6);
        assert!((r.tokens_per_s_best - 2048.0 / 0.008).abs() < 1e-6);
        assert!((r.flops_per_s - step_flops(&cfg) * 100.0).abs() < 1e-3);
        assert_eq!(r.mfu, None);
        assert_eq!(r.phases_ms, phases);
        let with_peak = report_from_samples(
            &BenchConfig { peak_flops: Some(1e12), ..cfg.clone() },
            &samples,
            1000,
            "cpu".into(),
            2,
        );
        assert!((with_peak.mfu.unwrap() - r.flops_per_s / 1e12).abs() < 1e-15);

        // The field names the PyTorch baseline and scripts/bench-compare.sh rely on.
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "engine",
            "device",
            "threads",
            "config",
            "num_params",
            "policy_tokens_per_step",
            "tokens_per_s",
            "tokens_per_s_best",
            "step_ms",
            "phases_ms",
            "flops_per_step",
            "flops_per_s",
            "mfu",
            "peak_memory_bytes",
            "memory_source",
            "peak_host_rss_bytes",
            "final_loss",
            "notes",
        ] {
            assert!(json.get(key).is_some(), "report JSON lacks {key}");
        }
        for key in ["reference_forward", "policy_forward", "log_probs", "loss", "backward", "optimizer"] {
            assert!(json["phases_ms"].get(key).is_some(), "phases_ms lacks {key}");
        }
        for key in ["median", "mean", "min", "max"] {
            assert!(json["step_ms"].get(key).is_some(), "step_ms lacks {key}");
        }
        assert_eq!(json["config"]["objective"]["name"], "dpo");
        let back: BenchReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        let table = r.to_string();
        assert!(table.contains("policy tokens/s") && table.contains("backward"), "{table}");
    }

    fn tiny_cfg(objective: Objective) -> BenchConfig {
        BenchConfig {
            n_layer: 1,
            n_embd: 16,
            n_head: 2,
            vocab_size: 32,
            n_positions: 32,
            pairs: 2,
            seq_len: 12,
            prompt_len: 3,
            objective,
            warmup_steps: 1,
            steps: 3,
            ..BenchConfig::default()
        }
    }

    #[test]
    fn cpu_steps_time_every_phase_and_train() {
        use crate::backend::cpu::CpuBackend;
        let ln2 = std::f64::consts::LN_2;
        // Policy = reference at the first step, so h = 0: DPO's loss is ln 2 for every pair, and
        // SafeDPO's is −log σ(−Δ) = softplus(Δ) for pairs whose rejected response is unsafe.
        let safedpo = Objective::SafeDpo { beta: 0.1, delta: 3.0 };
        for objective in [Objective::Dpo { beta: 0.1 }, safedpo.clone()] {
            let cfg = tiny_cfg(objective.clone());
            let mut runner = StepRunner::new(Arc::new(CpuBackend::new()), &cfg).unwrap();
            let batch = synthetic_batch(&cfg, &mut ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5afe_d90b));
            let unsafe_pairs = (0..cfg.pairs).filter(|&p| batch.unsafe_flags[2 * p + 1] == 1).count() as f64;
            let expected = match objective {
                Objective::SafeDpo { delta, .. } => {
                    (unsafe_pairs * (1.0 + delta.exp()).ln() + (cfg.pairs as f64 - unsafe_pairs) * ln2)
                        / cfg.pairs as f64
                }
                _ => ln2,
            };
            let first = runner.step().unwrap();
            assert!((first.loss - expected).abs() < 1e-5, "{objective:?}: first loss {} vs {expected}", first.loss);
            for _ in 0..3 {
                let s = runner.step().unwrap();
                let p = &s.phases;
                for (name, ms) in [
                    ("reference_forward", p.reference_forward),
                    ("policy_forward", p.policy_forward),
                    ("loss", p.loss),
                    ("backward", p.backward),
                    ("optimizer", p.optimizer),
                ] {
                    assert!(ms > 0.0 && ms.is_finite(), "{name}: {ms} ms");
                }
                assert!((p.sum() - s.total_ms).abs() <= 1e-9 * s.total_ms.max(1.0), "{p:?} vs {}", s.total_ms);
                assert!(s.loss.is_finite());
            }
        }
        // Training moves the policy away from the reference: the same batch no longer gives ln 2.
        let cfg = BenchConfig { warmup_steps: 0, steps: 1, ..tiny_cfg(Objective::Dpo { beta: 0.1 }) };
        let mut runner = StepRunner::new(Arc::new(CpuBackend::new()), &cfg).unwrap();
        assert!((runner.step().unwrap().loss - ln2).abs() < 1e-6);
        let again = runner.step().unwrap().loss;
        assert!((again - ln2).abs() > 1e-7, "after one AdamW step the loss is still {again}");
    }

    #[test]
    fn run_bench_on_cpu_reports_the_run() {
        use crate::backend::cpu::CpuBackend;
        let cfg = tiny_cfg(Objective::Simpo { beta: 2.0, gamma: 0.5 });
        let r = run_bench(Arc::new(CpuBackend::new()), &cfg).unwrap();
        assert_eq!(r.policy_tokens_per_step, 48);
        assert_eq!(
            r.num_params,
            Gpt2::random(Arc::new(CpuBackend::new()), cfg.model_config(), 0).unwrap().num_params()
        );
        assert!(r.step_ms.min <= r.step_ms.median && r.step_ms.median <= r.step_ms.max);
        assert!(r.tokens_per_s > 0.0 && r.tokens_per_s <= r.tokens_per_s_best);
        assert!(r.phases_ms.reference_forward < r.phases_ms.policy_forward, "SimPO runs no reference forward");
        assert!(r.final_loss.is_finite());
        if cfg!(target_os = "linux") {
            // The CPU counts no device memory: the headline peak is the resident set.
            assert_eq!(r.memory_source, HOST_MEMORY_SOURCE);
            assert!(r.peak_memory_bytes.unwrap() > 0);
            assert_eq!(r.peak_memory_bytes, r.peak_host_rss_bytes);
        }
        assert_eq!(r.config, cfg);
    }

    #[test]
    fn memory_fields_prefer_the_device_and_keep_the_resident_set() {
        let mut r = report_from_samples(&BenchConfig::default(), &[StepSample::default()], 10, "x".into(), 1);
        r.set_memory(None, Some(7 << 20));
        assert_eq!((r.peak_memory_bytes, r.peak_host_rss_bytes), (Some(7 << 20), Some(7 << 20)));
        assert_eq!(r.memory_source, HOST_MEMORY_SOURCE);
        assert!(r.to_string().contains("peak memory       7.0 MiB (VmHWM)"), "{r}");
        assert!(!r.to_string().contains("host RSS"), "{r}");

        let device = MemoryStats { current_bytes: 1 << 20, peak_bytes: 3 << 20 };
        r.set_memory(Some(device), Some(7 << 20));
        assert_eq!((r.peak_memory_bytes, r.peak_host_rss_bytes), (Some(3 << 20), Some(7 << 20)));
        assert_eq!(r.memory_source, DEVICE_MEMORY_SOURCE);
        let table = r.to_string();
        assert!(table.contains("peak memory       3.0 MiB (device allocator)"), "{table}");
        assert!(table.contains("peak host RSS     7.0 MiB (VmHWM)"), "{table}");

        r.set_memory(None, None);
        assert_eq!((r.peak_memory_bytes, r.peak_host_rss_bytes), (None, None));
        assert!(r.to_string().contains("peak memory       n/a"));

        // A report written before `peak_host_rss_bytes` existed still reads.
        let mut json = serde_json::to_value(&r).unwrap();
        json.as_object_mut().unwrap().remove("peak_host_rss_bytes");
        assert_eq!(serde_json::from_value::<BenchReport>(json).unwrap(), r);
    }

    #[test]
    fn run_bench_on_the_emulated_device_reports_its_memory() {
        use crate::backend::cuda::{CudaBackend, Device, Precision};
        let backend = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::Bf16));
        let cfg = BenchConfig { device: "emu".into(), ..tiny_cfg(Objective::SafeDpo { beta: 0.1, delta: 3.0 }) };
        let r = run_bench(backend.clone(), &cfg).unwrap();
        assert!(r.final_loss.is_finite());
        match backend.memory_stats() {
            Some(stats) => {
                assert_eq!(r.memory_source, DEVICE_MEMORY_SOURCE);
                let peak = r.peak_memory_bytes.unwrap();
                // The peak holds at least both models' bf16 weights (the policy's with their fp32
                // masters and bf16 gradients) and two fp32 AdamW moments.
                let p = r.num_params as u64;
                assert!(peak >= (2 + (2 + 4 + 2) + 8) * p, "peak {peak} bytes for {p} parameters");
                assert!(peak >= stats.current_bytes, "{stats:?}");
            }
            None => assert_eq!(r.memory_source, HOST_MEMORY_SOURCE),
        }
        if cfg!(target_os = "linux") {
            assert!(r.peak_host_rss_bytes.unwrap() > 0);
        }
    }

    #[test]
    fn args_map_to_config_and_validate() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BenchArgs,
        }
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.args.to_config().unwrap(), BenchConfig::default());
        let cli = Cli::parse_from(["x", "--objective", "safedpo", "--delta", "5", "--seq-len", "64"]);
        let cfg = cli.args.to_config().unwrap();
        assert_eq!(cfg.objective, Objective::SafeDpo { beta: 0.1, delta: 5.0 });
        assert_eq!((cfg.seq_len, cfg.prompt_len), (64, 16));
        let bad = Cli::parse_from(["x", "--seq-len", "2000"]);
        let err = bad.args.to_config().unwrap_err().to_string();
        assert!(err.contains("seq_len"), "{err}");
        let bad = Cli::parse_from(["x", "--objective", "kto"]);
        assert!(bad.args.to_config().unwrap_err().to_string().contains("kto"));
    }
}
