//! The `bench` command's options: the run settings it shares with `train` (generated from their one
//! definition, `--model.n_layer`, `--objective.name`, …) and its own (`--pairs`, `--steps`, …).

use anyhow::Result;

use super::BenchConfig;
use crate::config::validate::Errors;
use crate::config::{FieldError, Profile, RunConfig, SettingsArgs};

/// Which run settings `bench` takes ([`BenchConfig::run_settings`]), its defaults
/// (`BenchConfig::default()`), and their checks.
pub struct BenchSettings;

/// The settings `bench` takes besides `objective.*`.
const BENCH_SETTINGS: [&str; 19] = [
    "seed",
    "device",
    "model.arch",
    "model.n_kv_head",
    "model.intermediate_size",
    "model.tie_word_embeddings",
    "model.n_layer",
    "model.n_embd",
    "model.n_head",
    "model.n_positions",
    "model.vocab_size",
    "optimizer.lr",
    "optimizer.grad_clip",
    "batching.head_chunk_rows",
    "batching.gradient_checkpointing",
    "lora.r",
    "lora.alpha",
    "lora.target_modules",
    "lora.use_rslora",
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
        if let Err(e) = cfg.objective.require_pairwise("safedpo bench (it times the step on pairs)") {
            errs.add("objective.name", format!("{e:#}"));
        }
        cfg.check_optimizer(&mut errs);
        cfg.check_lora(&mut errs);
        if cfg.batching.head_chunk_rows == Some(0) {
            errs.add("batching.head_chunk_rows", "must be at least 1");
        }
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
