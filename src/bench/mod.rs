//! The training-step benchmark: N timed DPO/SafeDPO steps after a warm-up, on synthetic data.
//!
//! One step is the trainer's own step code (`train::step::Learner::preference_step`) on one
//! micro-batch: the reference model's forward (a frozen model, as the trainer's: no gradients, two
//! layers of activations; none for a reference-free objective) to get the reference sequence log-probs,
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
//!
//! Files: the configuration and the synthetic data here, `runner` (the timed steps), `report` (what a
//! run reports), `cli` (the command's options).

mod cli;
mod report;
mod runner;
#[cfg(test)]
mod tests;

use anyhow::{bail, ensure, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{BatchingConfig, LoraConfig, ModelConfig, OptimizerConfig, Profile, RunConfig};
use crate::data::{PackedBatch, PreferenceBatch};
use crate::loss::Objective;
use crate::model::{DecoderConfig, Family};

pub use cli::{BenchArgs, BenchSettings};
pub use report::{
    peak_rss_bytes, report_from_samples, BenchReport, PhaseTimes, StepSample, StepTimes, DEVICE_MEMORY_SOURCE,
    HOST_MEMORY_SOURCE,
};
pub use runner::{run_bench, StepRunner};

/// What to benchmark: the model's shape, the batch's, the objective and how many steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// The model family (`--model.arch`); reports written before it existed are GPT-2.
    #[serde(default)]
    pub arch: Family,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// Key/value heads of a Llama-family model (absent: `n_head`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<usize>,
    /// MLP width (absent: the family's default, see `ModelConfig::intermediate_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    /// A Llama-family LM head tied to the token embedding.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    pub n_positions: usize,
    /// Preference pairs per step; the policy sees `2 · pairs` sequences.
    pub pairs: usize,
    /// Tokens per sequence, prompt and response together (each side of a pair).
    pub seq_len: usize,
    /// Prompt tokens at the start of each sequence (no loss on them); the response is the rest.
    pub prompt_len: usize,
    /// `batching.head_chunk_rows`: LM head rows computed at once (absent: the trainer's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_chunk_rows: Option<usize>,
    /// `batching.gradient_checkpointing`: recompute each block's interior in the backward.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// `[lora]`: LoRA adapters on the frozen policy (off: full fine-tuning).
    #[serde(default, skip_serializing_if = "LoraConfig::is_off")]
    pub lora: LoraConfig,
    pub objective: Objective,
    /// Untimed steps first (allocation, caches, lazy initialisation).
    pub warmup_steps: usize,
    pub steps: usize,
    /// Seeds the model initialisation and the synthetic tokens.
    pub seed: u64,
    pub lr: f32,
    /// Global grad-norm clipping threshold, `optimizer.grad_clip` (0: no clipping; the norm is still
    /// computed).
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
        let model = DecoderConfig::tiny();
        Self {
            arch: model.family,
            n_layer: model.n_layer,
            n_embd: model.n_embd,
            n_head: model.n_head,
            n_kv_head: None,
            intermediate_size: None,
            tie_word_embeddings: false,
            vocab_size: model.vocab_size,
            n_positions: model.n_positions,
            pairs: 8,
            seq_len: 128,
            prompt_len: 32,
            head_chunk_rows: None,
            gradient_checkpointing: false,
            lora: LoraConfig::default(),
            objective: Objective::default_for("dpo").expect("dpo is an objective"),
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
    pub fn model_config(&self) -> DecoderConfig {
        self.run_settings().model.random_shape(self.vocab_size)
    }

    /// The settings this benchmark shares with `train`: the random init's `[model]` shape, the
    /// `[objective]`, `optimizer.lr` and `optimizer.grad_clip`, the seed and the device.
    pub fn run_settings(&self) -> RunConfig {
        let defaults = RunConfig::default();
        RunConfig {
            seed: self.seed,
            device: self.device.parse().unwrap_or(defaults.device),
            model: ModelConfig {
                arch: self.arch,
                n_kv_head: self.n_kv_head,
                intermediate_size: self.intermediate_size,
                tie_word_embeddings: self.tie_word_embeddings,
                n_layer: self.n_layer,
                n_embd: self.n_embd,
                n_head: self.n_head,
                n_positions: self.n_positions,
                vocab_size: Some(self.vocab_size),
                ..defaults.model
            },
            objective: self.objective.clone(),
            optimizer: OptimizerConfig { lr: self.lr, grad_clip: self.max_grad_norm, ..defaults.optimizer },
            batching: BatchingConfig {
                head_chunk_rows: self.head_chunk_rows,
                gradient_checkpointing: self.gradient_checkpointing,
                ..defaults.batching
            },
            lora: self.lora.clone(),
            ..defaults
        }
    }

    /// The benchmark of `run`'s shared settings (see [`run_settings`](Self::run_settings)) on
    /// batches of `pairs` pairs of `seq_len` tokens, `prompt_len` of them prompt.
    pub fn from_settings(run: &RunConfig, pairs: usize, seq_len: usize, prompt_len: usize) -> Self {
        let defaults = Self::default();
        Self {
            arch: run.model.arch,
            n_kv_head: run.model.n_kv_head,
            intermediate_size: run.model.intermediate_size,
            tie_word_embeddings: run.model.tie_word_embeddings,
            n_layer: run.model.n_layer,
            n_embd: run.model.n_embd,
            n_head: run.model.n_head,
            vocab_size: run.model.vocab_size.unwrap_or(defaults.vocab_size),
            n_positions: run.model.n_positions,
            pairs,
            seq_len,
            prompt_len,
            head_chunk_rows: run.batching.head_chunk_rows,
            gradient_checkpointing: run.batching.gradient_checkpointing,
            lora: run.lora.clone(),
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

/// Forward FLOPs of one sequence of `t` tokens: `2 · t · P` for the matrix products, `P` the
/// weights they multiply by (per layer the q/k/v, output, MLP up and down projections; the LM head
/// `d V`), plus `2 L q t (t+1)` for causal attention (QKᵀ and AV over the `t (t+1) / 2` unmasked
/// query-key pairs, `q = n_head · head_dim`). For GPT-2 `P = 12 L d² + d V`.
pub fn forward_flops_per_sequence(model: &DecoderConfig, t: usize) -> f64 {
    let layout = model.qkv_layout();
    let (d, f) = (model.n_embd as f64, model.intermediate_size as f64);
    let (width, q) = (layout.width() as f64, layout.q_width() as f64);
    let up = if model.family.is_gpt2() { f } else { 2.0 * f };
    let (l, v, t) = (model.n_layer as f64, model.vocab_size as f64, t as f64);
    let weights = l * (d * width + q * d + d * up + f * d) + d * v;
    2.0 * t * weights + 2.0 * l * q * t * (t + 1.0)
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
