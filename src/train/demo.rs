//! `safedpo demo`: the whole method on a laptop in a few minutes.
//!
//! 1. Builds the synthetic safety preference set, writes it as PKU-SafeRLHF JSONL and reads it back
//!    through the real loader with selection `safedpo` (printing the T(D) counts).
//! 2. SFTs a tiny byte-level GPT-2 (or, with `--arch llama`, a tiny Llama-architecture model) on
//!    the helpfulness-preferred responses (the held-out prompts excluded).
//! 3. Runs SafeDPO with the SFT model as reference and initial policy, the reference log-probs
//!    precomputed once.
//! 4. Prints a before/after table (safe-preferred accuracy on held-out prompts, reward accuracy,
//!    margins, loss) and writes `metrics.jsonl` and `plot.svg` into the output directory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use super::metrics::Record;
use super::{train, RunSummary, Task, TrainOptions};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::{
    load_pairs, split_holdout_by, synthetic_pku_rows, write_pku_jsonl, DataFormat, PairSelection, PkuRow,
};
use crate::loss::Objective;
use crate::model::Family;

/// How to run the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub out_dir: PathBuf,
    /// A much smaller, faster run (a smoke test, not a demonstration).
    pub quick: bool,
    pub seed: u64,
    pub quiet: bool,
    pub progress: bool,
    /// The model family: GPT-2 (the default demo), or a tiny Llama-architecture model (RMSNorm,
    /// RoPE, SwiGLU, 4 query heads sharing 2 key/value heads, an untied head).
    pub arch: Family,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs/demo"),
            quick: false,
            seed: 42,
            quiet: false,
            progress: true,
            arch: Family::Gpt2,
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug)]
pub struct DemoReport {
    pub sft: RunSummary,
    pub safedpo: RunSummary,
    /// SafeDPO's evaluation before the first step (policy = reference) and after the last.
    pub before: Record,
    pub after: Record,
    /// The summary table as printed.
    pub table: String,
    pub wall_seconds: f64,
}

/// The demo's prompt template.
pub const DEMO_TEMPLATE: &str = "USER: {prompt} ASSISTANT:";

/// Held-out fraction of the prompts (whole prompts: no held-out prompt is ever trained on).
const EVAL_FRACTION: f64 = 0.15;

/// The demo's two run configurations (SFT, SafeDPO) for a training and a held-out data file.
pub fn demo_configs(opts: &DemoOptions, data: PathBuf, eval_data: PathBuf) -> (RunConfig, RunConfig) {
    let mut sft = RunConfig {
        seed: opts.seed,
        device: crate::backend::DeviceKind::Cpu,
        out_dir: opts.out_dir.join("sft"),
        ..Default::default()
    };
    sft.data.path = Some(data);
    sft.data.eval_path = Some(eval_data);
    sft.data.format = DataFormat::PkuSafeRlhf;
    // The reference is a helpfulness-only SFT (as the paper's Alpaca reference): it learns the
    // helpfulness-preferred responses, compliant answers to harmful requests included.
    sft.data.selection = PairSelection::Better;
    sft.data.sft_safe_only = false;
    // A short template: bytes are tokens here, and every one costs attention time.
    sft.data.template = DEMO_TEMPLATE.to_string();
    sft.data.max_len = 160;
    sft.model.n_positions = 160;
    sft.batching.tokens_per_micro_batch = 4096;
    sft.optimizer.weight_decay = 0.0;
    sft.optimizer.grad_clip = 1.0;
    sft.optimizer.min_lr_ratio = 0.1;
    sft.intervals.checkpoint_every = 0;
    sft.model.arch = opts.arch;
    if !opts.arch.is_gpt2() {
        sft.model.n_kv_head = Some(2);
    }
    if opts.quick {
        (sft.model.n_layer, sft.model.n_embd, sft.model.n_head) = (1, 32, 2);
        sft.optimizer.lr = 3e-3;
        sft.optimizer.warmup_steps = 2;
        sft.optimizer.total_steps = Some(12);
        sft.intervals.eval_every = 6;
    } else {
        (sft.model.n_layer, sft.model.n_embd, sft.model.n_head) = (2, 128, 4);
        sft.optimizer.lr = 2e-3;
        sft.optimizer.warmup_steps = 10;
        sft.optimizer.total_steps = Some(300);
        sft.intervals.eval_every = 50;
    }

    let mut dpo = sft.clone();
    dpo.out_dir = opts.out_dir.join("safedpo");
    dpo.model.init = Some(sft.out_dir.join(super::checkpoint::FINAL_DIR));
    dpo.precompute_ref = true;
    dpo.data.selection = PairSelection::SafeDpo;
    dpo.objective = Objective::SafeDpo { beta: 0.1, delta: 10.0 };
    if opts.quick {
        dpo.optimizer.lr = 2e-3;
        dpo.optimizer.warmup_steps = 2;
        dpo.optimizer.total_steps = Some(12);
        dpo.intervals.eval_every = 4;
    } else {
        dpo.optimizer.lr = 3e-4;
        dpo.optimizer.warmup_steps = 5;
        dpo.optimizer.total_steps = Some(40);
        dpo.intervals.eval_every = 5;
    }
    (sft, dpo)
}

pub fn number_of_rows(quick: bool) -> usize {
    if quick {
        400
    } else {
        2000
    }
}

fn get(rec: &Record, key: &str) -> f64 {
    rec.get(key).and_then(|v| v.as_f64()).unwrap_or(f64::NAN)
}

/// The demo's data as written into its output directory.
pub struct DemoData {
    pub train_path: PathBuf,
    pub eval_path: PathBuf,
    /// The training rows.
    pub train_rows: Vec<PkuRow>,
    /// The held-out rows (whole prompts no run trains on).
    pub eval_rows: Vec<PkuRow>,
    /// What was written and the T(D) counts, for the log.
    pub summary: String,
}

/// Builds the synthetic safety preference set, holds out whole prompts, writes both sides as
/// PKU-SafeRLHF JSONL into `opts.out_dir` and reads the training side back through the loader.
pub fn write_demo_data(opts: &DemoOptions) -> Result<DemoData> {
    let out = &opts.out_dir;
    let rows = synthetic_pku_rows(number_of_rows(opts.quick), opts.seed);
    let (train_rows, eval_rows) = split_holdout_by(rows, EVAL_FRACTION, opts.seed, |r: &PkuRow| r.prompt.clone());
    let (train_path, eval_path) = (out.join("train.jsonl"), out.join("eval.jsonl"));
    write_pku_jsonl(&train_path, &train_rows)?;
    write_pku_jsonl(&eval_path, &eval_rows)?;
    let (_, report) = load_pairs(&train_path, DataFormat::PkuSafeRlhf, PairSelection::SafeDpo, false)?;
    let summary = format!(
        "synthetic safety data: {} PKU-SafeRLHF rows in {} ({} more, on held-out prompts, in {})\nT(D): {} pairs \
         kept (preferred safe), {} swapped (preferred unsafe, other safe), {} dropped (both unsafe)",
        train_rows.len(),
        train_path.display(),
        eval_rows.len(),
        eval_path.display(),
        report.kept,
        report.swapped,
        report.dropped
    );
    Ok(DemoData { train_path, eval_path, train_rows, eval_rows, summary })
}

/// Runs the demo on `backend`.
pub fn run_demo<B: Backend>(backend: Arc<B>, opts: &DemoOptions) -> Result<DemoReport> {
    let started = Instant::now();
    let out = &opts.out_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let say = |msg: String| {
        if !opts.quiet {
            eprintln!("{msg}");
        }
    };

    // 1. The data, through the real loader; whole prompts held out for evaluation.
    let data = write_demo_data(opts)?;
    say(data.summary.clone());
    let (train_path, eval_path) = (data.train_path, data.eval_path);

    let (sft_cfg, dpo_cfg) = demo_configs(opts, train_path, eval_path);
    // The demo makes its runs again from scratch each time.
    let run_opts = TrainOptions { progress: opts.progress, quiet: opts.quiet, overwrite: true, ..Default::default() };

    // 2. SFT on the safe responses.
    say("\n== SFT: a tiny byte-level GPT-2 on the helpfulness-preferred responses (harmful ones included) ==".into());
    let sft = train(backend.clone(), &sft_cfg, Task::Sft, &run_opts)?;

    // 3. SafeDPO from the SFT model.
    say("\n== SafeDPO: policy and reference start from the SFT model ==".into());
    let safedpo = train(backend.clone(), &dpo_cfg, Task::Preference, &run_opts)?;

    let before = safedpo.first_eval.clone().context("the SafeDPO run has no evaluation before training")?;
    let after = safedpo.last_eval.clone().context("the SafeDPO run has no final evaluation")?;

    // 4. Outputs.
    let metrics = dpo_cfg.out_dir.join(super::checkpoint::METRICS_FILE);
    let records = crate::plot::read_metrics(&metrics)?;
    crate::util::write_atomic(&out.join("metrics.jsonl"), &std::fs::read(&metrics)?)?;
    let plot = out.join("plot.svg");
    crate::plot::plot_metrics(&records, &plot, "SafeDPO on the synthetic safety data")?;

    let wall = started.elapsed().as_secs_f64();
    let mut table = String::new();
    let row = |name: &str, key: &str, digits: usize| {
        format!("{name:<32}{:>10.digits$}{:>10.digits$}\n", get(&before, key), get(&after, key))
    };
    table.push_str(&format!("{:<32}{:>10}{:>10}\n", "held-out eval (SafeDPO)", "before", "after"));
    table.push_str(&row("safe-preferred accuracy", "eval/safe_preferred_accuracy", 3));
    table.push_str(&row("reward accuracy", "eval/rewards/accuracies", 3));
    table.push_str(&row("reward margin", "eval/rewards/margins", 3));
    table.push_str(&row("loss", "eval/loss", 4));
    table.push_str(&format!(
        "\n{:<10}{:>8}{:>10}{:>12}\n{:<10}{:>8}{:>10.1}{:>12.0}\n{:<10}{:>8}{:>10.1}{:>12.0}\n",
        "run",
        "steps",
        "time (s)",
        "tokens/s",
        "SFT",
        sft.total_steps,
        sft.wall_seconds,
        sft.tokens_per_second,
        "SafeDPO",
        safedpo.total_steps,
        safedpo.wall_seconds,
        safedpo.tokens_per_second
    ));
    table.push_str(&format!(
        "\ntotal {wall:.1}s; {} train / {} held-out pairs; metrics: {}; plot: {}\n",
        safedpo.train_pairs,
        safedpo.eval_pairs,
        out.join("metrics.jsonl").display(),
        plot.display()
    ));
    table.push_str(&format!(
        "try: safedpo generate --model {} --prompt \"How do I steal a car?\"\n",
        dpo_cfg.out_dir.join(super::checkpoint::FINAL_DIR).display()
    ));
    Ok(DemoReport { sft, safedpo, before, after, table, wall_seconds: wall })
}
