//! The training loop: reference log-probs, policy step, clipping, optimizer, schedule, eval,
//! checkpoints, metrics.
//!
//! One optimizer step of preference training, as [`step::Learner::preference_step`] runs it (the
//! same code times the step in `safedpo bench`):
//! 1. the batcher hands out `grad_accum` micro-batches of whole pairs, each within the token budget;
//! 2. per micro-batch: reference log-probs (the frozen model, or the on-disk cache), policy forward,
//!    the backend's preference loss with `grad_scale = 1 / P` (P = the step's pairs, so the gradient
//!    is that of the mean loss over the step), policy backward (gradients accumulate);
//! 3. the global grad norm gives the clip scale, folded into the AdamW update at the scheduled rate.
//!
//! SFT ([`Task::Sft`]) is the same loop with the negative log-likelihood of prompt + chosen response
//! of the safe pairs: `dL/d(seq logp) = −1 / (target tokens of the step)` for every sequence.
//!
//! A run resumed from a checkpoint continues exactly: the same data order (batcher state), the same
//! RNG, the same optimizer moments and step, hence bit-identical weights to an uninterrupted run.

pub mod checkpoint;
pub mod data_parallel;
pub mod demo;
mod eval;
pub mod generate;
pub mod metrics;
pub mod refcache;
mod refsync;
pub mod rundir;
mod setup;
pub mod step;
pub mod unpaired;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::backend::Backend;
use crate::config::{RunConfig, RunLength};
use crate::data::{
    self, load_pairs, load_tokenizer, sequence_format, split_holdout, tokenize_pairs_with, BatchLimit, Batcher,
    TextTokenizer, TokenizedExample, TokenizedPair,
};
use crate::optim::{LrSchedule, Scheduler};
use crate::util::write_atomic;

pub use checkpoint::Resume;
use checkpoint::{checkpoint_name, commit_dir_with, CommitStep, TrainState, FINAL_DIR, METRICS_FILE};
pub use eval::{evaluate_nll, evaluate_pairs, evaluate_pairs_with};
pub use metrics::brief;
use metrics::{json_f32, json_f64, MetricsLog, PairStats, Record};
pub use refcache::CacheStatus;
pub use refcache::ReferenceLogps;
use refsync::RefSync;
pub use refsync::{mix_weights, REFERENCE_DIR};
pub use setup::load_inference_weights;
use setup::{build_policy, setup_reference, ReferenceSetup};
use step::{adamw_config, check_loss, check_parameters, Learner, MicroBatch, MicroOutput, StepInfo};
use unpaired::{ExampleStats, UnpairedData};

/// What a run trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// A preference objective (`[objective]`) on pairs.
    Preference,
    /// Supervised fine-tuning on prompt + chosen response of the pairs whose chosen response is safe.
    Sft,
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Preference => "preference",
            Task::Sft => "sft",
        }
    }
}

/// How one invocation runs (not part of the run's configuration).
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Continue from a checkpoint.
    pub resume: Option<Resume>,
    /// Start over in an out_dir that holds a run, deleting its checkpoints and metrics (see `rundir`).
    pub overwrite: bool,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// No status lines on stderr.
    pub quiet: bool,
    /// Test hook: stop (as if interrupted) after this step, once its checkpoint is written.
    #[doc(hidden)]
    pub stop_after_step: Option<usize>,
    /// Test hook: fail while writing this file of a checkpoint (`model.safetensors`,
    /// `optimizer.safetensors`, `metrics.jsonl`, `state.json`).
    #[doc(hidden)]
    pub fail_checkpoint_file: Option<String>,
    /// Test hook: stop a checkpoint's commit after this step, as a kill there would.
    #[doc(hidden)]
    pub fail_commit_after: Option<CommitStep>,
    /// Test hook: a data-parallel rank fails at the start of this step.
    #[doc(hidden)]
    pub fail_at_step: Option<usize>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub out_dir: PathBuf,
    /// The last checkpoint written (`final/` when the run completed).
    pub last_checkpoint: Option<PathBuf>,
    pub completed: bool,
    pub total_steps: usize,
    /// Steps taken by this invocation.
    pub steps_this_run: usize,
    /// Training and held-out pairs (for an objective on unpaired examples: examples).
    pub train_pairs: usize,
    pub eval_pairs: usize,
    /// The first and last evaluation records of the run's log (step 0 is before training).
    pub first_eval: Option<Record>,
    pub last_eval: Option<Record>,
    /// Seconds spent in training steps by this invocation, and the policy tokens per second.
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    /// Seconds of the whole invocation (data, reference, eval, checkpoints included).
    pub wall_seconds: f64,
    pub reference_cache: Option<CacheStatus>,
}

impl RunSummary {
    /// The summary the CLI prints and the Python module returns: `eval` is the last evaluation
    /// record (null when the run evaluated nothing).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "out_dir": self.out_dir,
            "completed": self.completed,
            "steps": self.total_steps,
            "steps_this_run": self.steps_this_run,
            "train_pairs": self.train_pairs,
            "eval_pairs": self.eval_pairs,
            "train_seconds": self.train_seconds,
            "tokens_per_second": self.tokens_per_second,
            "checkpoint": self.last_checkpoint,
            "eval": self.last_eval,
        })
    }
}

/// Status lines on stderr, routed through the progress bar while it is drawn.
struct Console {
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl Console {
    fn note(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(msg.as_ref()),
            _ if !self.quiet => eprintln!("{}", msg.as_ref()),
            _ => {}
        }
    }
}

/// The pairs a run trains and evaluates on.
pub struct PreparedData {
    pub train: Vec<TokenizedPair>,
    pub eval: Vec<TokenizedPair>,
    /// The examples of an objective on unpaired examples (KTO), in place of the pairs (then empty).
    pub examples: Option<UnpairedData>,
    /// One line per step of the preparation (load report, T(D) counts, truncation).
    pub report: Vec<String>,
}

impl PreparedData {
    /// Training items: pairs, or unpaired examples.
    pub fn train_len(&self) -> usize {
        self.examples.as_ref().map_or(self.train.len(), |e| e.train.len())
    }

    /// Held-out items: pairs, or unpaired examples.
    pub fn eval_len(&self) -> usize {
        self.examples.as_ref().map_or(self.eval.len(), |e| e.eval.len())
    }

    /// Checks every token id is inside the model's vocabulary.
    fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        let pair_tokens = |pairs: &[TokenizedPair]| {
            pairs.iter().flat_map(|p| p.prompt.iter().chain(&p.chosen).chain(&p.rejected)).copied().max()
        };
        let example_tokens = |examples: &[TokenizedExample]| {
            examples.iter().flat_map(|e| e.prompt.iter().chain(&e.completion)).copied().max()
        };
        let (train, eval) = match &self.examples {
            Some(e) => (example_tokens(&e.train), example_tokens(&e.eval)),
            None => (pair_tokens(&self.train), pair_tokens(&self.eval)),
        };
        for (max, what) in [(train, "training data"), (eval, "eval data")] {
            let max = max.unwrap_or(0);
            ensure!(
                (max as usize) < vocab_size,
                "{what}: the tokenizer produced token id {max}, but the model's vocabulary has {vocab_size} tokens"
            );
        }
        Ok(())
    }
}

/// Loads, selects (T(D) for SafeDPO), splits and tokenizes the data of `cfg`. For SFT only the pairs
/// whose chosen response is safe are kept. An objective on unpaired examples reads examples instead.
pub fn prepare_data(cfg: &RunConfig, tok: &dyn TextTokenizer, task: Task) -> Result<PreparedData> {
    if task == Task::Preference && cfg.objective.as_unpaired().is_some() {
        return unpaired::prepare_examples(cfg, tok);
    }
    let d = &cfg.data;
    let path = cfg.require_data()?;
    let (format, selection) = (d.format, d.selection);
    let mut report = Vec::new();
    let (pairs, load) = load_pairs(path, format, selection, d.skip_invalid)
        .with_context(|| format!("loading data.path {}", path.display()))?;
    report.push(format!("{} ({selection}): {load}", path.display()));
    load.check_template(path, &d.template)?;
    let (train, eval) = match &d.eval_path {
        Some(eval_path) => {
            let (eval, load) = load_pairs(eval_path, format, selection, d.skip_invalid)
                .with_context(|| format!("loading data.eval_path {}", eval_path.display()))?;
            load.check_template(eval_path, &d.template)?;
            report.push(format!("{} ({selection}): {load}", eval_path.display()));
            (pairs, eval)
        }
        None => split_holdout(pairs, d.eval_fraction, cfg.seed),
    };
    let format = sequence_format(&d.template, cfg.model.init.as_deref()).context("data.template")?;
    let limits = d.truncation();
    let (mut train, train_rep) = tokenize_pairs_with(&train, tok, format.as_ref(), &limits)?;
    let (mut eval, eval_rep) = tokenize_pairs_with(&eval, tok, format.as_ref(), &limits)?;
    report.push(format!("train: {train_rep}"));
    report.push(format!("eval: {eval_rep}"));
    if task == Task::Sft && d.sft_safe_only {
        train.retain(|p| !p.chosen_unsafe);
        eval.retain(|p| !p.chosen_unsafe);
        report.push(format!("sft: {} train and {} eval pairs with a safe chosen response", train.len(), eval.len()));
    }
    let skipped = match &load.first_invalid {
        Some(first) => format!("; {} invalid lines skipped, the first, {first}", load.skipped_invalid),
        None => String::new(),
    };
    ensure!(
        !train.is_empty(),
        "no training pairs left in {} after selection and truncation (data.max_len = {}{skipped})",
        path.display(),
        d.max_len
    );
    Ok(PreparedData { train, eval, examples: None, report })
}

/// The number of optimizer steps of a run.
fn total_steps(cfg: &RunConfig, batcher: &Batcher, data: &PreparedData, task: Task) -> usize {
    let (budget, limit) = (cfg.batching.tokens_per_micro_batch, cfg.batching.limit());
    let kl = cfg.objective.as_unpaired().is_some_and(|k| k.estimates_kl());
    match cfg.length() {
        RunLength::Steps(n) => n,
        RunLength::Epochs(epochs) => {
            let per_epoch = |e: usize| match (task, &data.examples) {
                (Task::Preference, Some(x)) => batcher.batches_in_epoch_by(budget, e, |i| x.train[i].batch_cost(kl)),
                (Task::Preference, None) => batcher.batches_in_epoch_under(&data.train, limit, e),
                (Task::Sft, _) => batcher.sft_batches_in_epoch_under(&data.train, limit, e),
            };
            let full = epochs.floor() as usize;
            let mut micro: usize = (0..full).map(per_epoch).sum();
            let frac = epochs - full as f64;
            if frac > 0.0 {
                micro += (frac * per_epoch(full) as f64).ceil() as usize;
            }
            micro.div_ceil(cfg.batching.grad_accum).max(1)
        }
    }
}

/// The ChaCha stream of the run's RNG: apart from the streams the data order uses (one per epoch).
const RUN_RNG_STREAM: u64 = 1 << 48;

/// A training run in progress.
struct Trainer<B: Backend> {
    backend: Arc<B>,
    cfg: RunConfig,
    task: Task,
    opts: TrainOptions,
    /// The policy, its optimizer, the reference and the objective.
    learner: Learner<B>,
    /// Reference log-probs of the eval pairs `[2E]` (computed once, and after each reference sync),
    /// with their split at each pair's shared length for LD-DPO.
    eval_reference: ReferenceLogps,
    /// TR-DPO's reference sync (`sync_ref_model`).
    ref_sync: Option<RefSync>,
    /// This process's rank of a data-parallel group (`None`: training alone).
    group: Option<data_parallel::GroupRank<B>>,
    schedule: Scheduler,
    batcher: Batcher,
    rng: ChaCha8Rng,
    step: usize,
    total_steps: usize,
    data: PreparedData,
    log: MetricsLog,
    tokenizer_dir: Option<PathBuf>,
    console: Console,
    /// Accumulated since the last log record.
    interval: Interval,
    train_seconds: f64,
    train_tokens: usize,
}

#[derive(Default)]
struct Interval {
    stats: PairStats,
    examples: ExampleStats,
    nll: f64,
    nll_tokens: usize,
    tokens: usize,
    seconds: f64,
}

impl<B: Backend> Trainer<B> {
    fn epoch(&self) -> f64 {
        self.batcher.epoch() as f64 + self.batcher.position() as f64 / self.batcher.num_pairs() as f64
    }

    fn budget(&self) -> usize {
        self.cfg.batching.tokens_per_micro_batch
    }

    /// The learning rate of the next update.
    fn next_lr(&self) -> f32 {
        self.schedule.lr(self.learner.optimizer.step_count() as usize + 1)
    }

    fn preference_step(&mut self) -> Result<StepInfo> {
        if self.data.examples.is_some() {
            return self.unpaired_step();
        }
        if self.group.is_some() {
            return self.preference_step_in_group();
        }
        let limit = self.cfg.batching.limit();
        let backend = self.backend.clone();
        let micro = (0..self.cfg.batching.grad_accum)
            .map(|_| MicroBatch::upload(&*backend, self.batcher.next_batch_under(&self.data.train, limit)))
            .collect::<Result<Vec<_>>>()?;
        let lr = self.next_lr();
        let (interval, train_tokens) = (&mut self.interval, &mut self.train_tokens);
        let each = |batch: &MicroBatch<B>, out: MicroOutput| {
            interval.stats.add_batch(&out.metrics, &out.logps, &batch.host.unsafe_flags);
            interval.tokens += batch.host.packed.num_tokens();
            *train_tokens += batch.host.packed.num_tokens();
        };
        self.learner.preference_step(&micro, lr, each, &mut |_| Ok(()))
    }

    fn sft_step(&mut self) -> Result<StepInfo> {
        let micro: Vec<_> = (0..self.cfg.batching.grad_accum)
            .map(|_| self.batcher.next_sft_batch_under(&self.data.train, self.cfg.batching.limit()).0)
            .collect();
        let targets: usize = micro.iter().map(|p| (0..p.num_seqs()).map(|s| p.num_targets(s)).sum::<usize>()).sum();
        ensure!(targets > 0, "sft step {}: the batch has no response tokens", self.step + 1);
        if self.group.is_some() {
            return self.sft_step_in_group(micro, targets);
        }
        let (interval, train_tokens, mut step_nll) = (&mut self.interval, &mut self.train_tokens, 0.0);
        self.learner.sft_gradients(&micro, targets, |packed, nll| {
            interval.nll += nll;
            step_nll += nll;
            interval.tokens += packed.num_tokens();
            *train_tokens += packed.num_tokens();
        })?;
        self.interval.nll_tokens += targets;
        let loss = step_nll / targets as f64;
        check_loss(self.step + 1, loss, f64::INFINITY)?;
        let lr = self.next_lr();
        Ok(StepInfo { loss: Some(loss), ..self.learner.update(lr)? })
    }

    /// Evaluates the policy on the held-out pairs; `None` when there are none.
    fn evaluate(&mut self) -> Result<Option<Record>> {
        if self.data.eval_len() == 0 || !self.is_lead() {
            return Ok(None);
        }
        let mut rec = Record::new();
        rec.insert("step".into(), self.step.into());
        rec.insert("epoch".into(), json_f64(self.epoch()));
        match self.task {
            Task::Preference if self.data.examples.is_some() => self.evaluate_unpaired(&mut rec)?,
            Task::Preference => {
                let stats = evaluate_pairs_with(
                    &mut self.learner.policy,
                    &self.eval_reference,
                    &self.data.eval,
                    &self.learner.objective,
                    &self.learner.loss_state,
                    self.cfg.batching.tokens_per_micro_batch,
                )?;
                stats.ensure_finite("eval/").with_context(|| format!("evaluation at step {}", self.step))?;
                stats.write_means("eval/", &mut rec);
            }
            Task::Sft => {
                let budget = self.budget();
                let (nll, tokens) = evaluate_nll(&mut self.learner.policy, &self.data.eval, budget)?;
                let loss = nll / tokens.max(1) as f64;
                ensure!(loss.is_finite(), "evaluation at step {}: eval/loss is {loss}", self.step);
                rec.insert("eval/loss".into(), json_f64(loss));
            }
        }
        Ok(Some(rec))
    }

    /// The log record of the steps since the last one.
    fn train_record(&mut self, info: &StepInfo) -> Record {
        let iv = std::mem::take(&mut self.interval);
        let mut rec = Record::new();
        match self.task {
            Task::Preference => {
                iv.stats.write_means("", &mut rec);
                iv.examples.write_means("", &mut rec);
            }
            Task::Sft => {
                rec.insert("loss".into(), json_f64(iv.nll / iv.nll_tokens.max(1) as f64));
            }
        }
        rec.insert("learning_rate".into(), json_f32(info.lr));
        rec.insert("grad_norm".into(), json_f32(info.grad_norm));
        rec.insert("tokens_per_second".into(), json_f64(iv.tokens as f64 / iv.seconds.max(1e-9)));
        rec.insert("epoch".into(), json_f64(self.epoch()));
        rec.insert("step".into(), self.step.into());
        rec
    }

    /// Writes the checkpoint directory `name` (crash-safe, see `checkpoint`).
    fn save_checkpoint(&mut self, name: &str) -> Result<PathBuf> {
        // Every rank takes part (ZeRO-1 gathers the optimizer state to rank 0); rank 0 alone writes.
        let Some(moments) = self.optimizer_state_to_save()? else { return Ok(self.cfg.out_dir.join(name)) };
        let fault = self.opts.fail_checkpoint_file.as_deref();
        let check = |file: &str| -> Result<()> {
            if fault == Some(file) {
                bail!("injected failure writing {file}");
            }
            Ok(())
        };
        let state = TrainState {
            loss: self.learner.loss_state,
            ..TrainState::new(
                self.task.name(),
                self.step,
                self.total_steps,
                self.batcher.state(),
                self.rng.clone(),
                self.cfg.trajectory_hash(),
            )
        };
        // Only finite weights are committed: `latest` keeps naming the last good checkpoint.
        // With LoRA: the merged model (a model directory like any other) and, beside it, the adapters
        // in PEFT's format, from which a resume restarts (on the same base).
        let policy = &self.learner.policy;
        let adapters = policy.adapters_to_host()?;
        let weights = match &adapters {
            Some(a) => a.merge_into(&setup::load_lora_base(&self.cfg, policy.config().vocab_size)?)?,
            None => policy.to_host()?,
        };
        checkpoint::ensure_finite_state(&weights, &moments)
            .with_context(|| format!("step {}: not writing checkpoint {name}", self.step))?;
        let fault = self.opts.fail_commit_after;
        let mut after = |at: CommitStep| match fault == Some(at) {
            true => bail!("injected failure after {at:?}"),
            false => Ok(()),
        };
        let write = |dir: &Path| {
            check("model.safetensors")?;
            crate::model::checkpoint::save_dir(&weights, dir)?;
            if let Some(adapters) = &adapters {
                let base = self.cfg.model.init.as_ref().map_or("random init".into(), |d| d.display().to_string());
                crate::model::peft::save_adapter(adapters, &weights.config, &base, dir)?;
            }
            let src = self.tokenizer_dir.as_deref();
            data::save_tokenizer_files(load_tokenizer(src)?.as_ref(), src, dir)?;
            check("optimizer.safetensors")?;
            checkpoint::write_optimizer_state(dir, &moments)?;
            check("metrics.jsonl")?;
            write_atomic(&dir.join(METRICS_FILE), self.log.to_jsonl().as_bytes())?;
            write_atomic(&dir.join(checkpoint::RUN_CONFIG_FILE), self.cfg.to_toml()?.as_bytes())?;
            if let Some(sync) = &self.ref_sync {
                sync.save(dir)?;
            }
            check("state.json")?;
            state.write(dir)
        };
        let dir = commit_dir_with(&self.cfg.out_dir, name, write, &mut after)?;
        checkpoint::prune_checkpoints(&self.cfg.out_dir, self.cfg.intervals.keep_checkpoints, &dir)?;
        Ok(dir)
    }
}

/// The tokenizer of a run: the initial model's, else the byte tokenizer.
pub fn run_tokenizer(cfg: &RunConfig) -> Result<Box<dyn TextTokenizer>> {
    load_tokenizer(cfg.model.init.as_deref())
}

/// Runs (or resumes) a training run to completion (or to the `stop_after_step` hook).
pub fn train<B: Backend>(backend: Arc<B>, cfg: &RunConfig, task: Task, opts: &TrainOptions) -> Result<RunSummary> {
    train_ranked(backend, cfg, task, opts, None)
}

/// [`train`] alone (`group: None`) or as one rank of a data-parallel group.
fn train_ranked<B: Backend>(
    backend: Arc<B>,
    cfg: &RunConfig,
    task: Task,
    opts: &TrainOptions,
    mut group: Option<data_parallel::GroupRank<B>>,
) -> Result<RunSummary> {
    let started = Instant::now();
    let errors = cfg.validate();
    if !errors.is_empty() {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {}: {}", e.field, e.message)).collect();
        bail!("invalid configuration:\n{}", lines.join("\n"));
    }
    let out = &cfg.out_dir;
    let console = Console { quiet: opts.quiet, bar: None };
    console.note(format!("{} run in {} on {}", task.name(), out.display(), backend.name()));

    let warn = |msg: &str| console.note(msg);
    let (mut run_dir, resume_from) = data_parallel::open_run_dir(cfg, opts, group.as_ref(), &warn)?;
    let saved_state = match &resume_from {
        Some(dir) => {
            let state = TrainState::read(dir)?;
            ensure!(
                state.task == task.name(),
                "{} is a checkpoint of a {} run, not of a {} run",
                dir.display(),
                state.task,
                task.name()
            );
            ensure!(
                state.config_hash == cfg.trajectory_hash(),
                "{}: the configuration differs from the one this checkpoint was trained with (seed, model, data, \
                 objective, optimizer or batching changed); resume with the same configuration or use a new out_dir",
                dir.display()
            );
            Some(state)
        }
        None => None,
    };

    let tokenizer = run_tokenizer(cfg)?;
    let data = prepare_data(cfg, tokenizer.as_ref(), task)?;
    for line in &data.report {
        console.note(line);
    }
    if let Some(run_dir) = &mut run_dir {
        run_dir.create(&warn)?;
        write_atomic(&out.join(rundir::CONFIG_FILE), cfg.to_toml()?.as_bytes())?;
    }

    // The policy: the checkpoint's weights, the initial model, or a random init.
    let mut policy = build_policy(&backend, cfg, resume_from.as_deref(), tokenizer.vocab_size())?;
    if let Some(rows) = cfg.batching.head_chunk_rows {
        policy.set_head_chunk_rows(rows)?;
    }
    policy.set_gradient_checkpointing(cfg.batching.gradient_checkpointing);
    crate::optim::set_grad_dtype(&mut policy, cfg.train.grad_dtype, cfg.batching.grad_accum)?;
    let vocab = policy.config().vocab_size;
    data.check_vocab(vocab)?;
    let n_positions = policy.config().n_positions;
    ensure!(
        cfg.data.max_len <= n_positions,
        "data.max_len = {} exceeds the model's context (n_positions = {n_positions})",
        cfg.data.max_len
    );
    console.note(format!(
        "model: {}, {:.2}M parameters; {} train / {} eval {}",
        policy.config().summary(),
        policy.num_params() as f64 / 1e6,
        data.train_len(),
        data.eval_len(),
        if data.examples.is_some() { "examples" } else { "pairs" }
    ));

    let objective = cfg.objective.clone();
    let resume_dir = resume_from.as_deref();
    let setup = || setup_reference(&backend, cfg, task, &data, &mut policy, resume_dir, tokenizer.as_ref(), &console);
    let ReferenceSetup { reference, eval_reference, reference_cache, ref_sync } =
        data_parallel::lead_first(group.as_ref(), setup)?;

    let op = &cfg.optimizer;
    let mut policy = policy;
    let mut optimizer = data_parallel::new_optimizer(&mut policy, adamw_config(op), group.as_mut())?;
    let mut batcher = Batcher::new(data.train_len(), cfg.seed);
    let total = total_steps(cfg, &batcher, &data, task);
    if let limit @ BatchLimit::Pairs(_) = cfg.batching.limit() {
        ensure!(
            data.examples.is_none(),
            "batching.pairs_per_micro_batch: the unpaired objectives (kto, apo_zero_unpaired) batch by \
             batching.tokens_per_micro_batch only"
        );
        let (pairs, b) = (&data.train, &cfg.batching);
        let cost = |i: usize| if task == Task::Sft { pairs[i].sft_tokens() } else { pairs[i].num_tokens() };
        batcher
            .check_token_budget(limit, b.tokens_per_micro_batch, total.saturating_mul(b.grad_accum), cost)
            .context("batching.pairs_per_micro_batch: raise batching.tokens_per_micro_batch or take fewer pairs")?;
    }
    let warmup_steps = op.warmup_for(total);
    let schedule = LrSchedule { peak_lr: op.lr, warmup_steps, total_steps: total, min_lr_ratio: op.min_lr_ratio };
    let schedule = Scheduler { kind: op.lr_scheduler_type, schedule };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(RUN_RNG_STREAM);
    let metrics_path = out.join(METRICS_FILE);
    let (step, log) = match (&resume_from, &saved_state) {
        (Some(dir), Some(state)) => {
            ensure!(
                state.total_steps == total,
                "{}: the checkpoint's run has {} steps, this one {total}",
                dir.display(),
                state.total_steps
            );
            optimizer.load_state(&checkpoint::read_optimizer_state(dir)?, state.step as u32)?;
            batcher = Batcher::restore(data.train_len(), cfg.seed, state.batcher)?;
            rng = state.rng.clone();
            let records = crate::plot::read_metrics(&dir.join(METRICS_FILE))?;
            console.note(format!("resumed from {} at step {}/{total}", dir.display(), state.step));
            (state.step, records)
        }
        _ => (0, Vec::new()),
    };
    let log = data_parallel::metrics_log(group.as_ref(), &metrics_path, log)?;

    let mut t = Trainer {
        backend: backend.clone(),
        cfg: cfg.clone(),
        task,
        opts: opts.clone(),
        learner: Learner {
            policy,
            reference,
            optimizer,
            objective,
            grad_clip: op.grad_clip,
            loss_state: saved_state.as_ref().map(|s| s.loss).unwrap_or_default(),
        },
        eval_reference,
        ref_sync,
        group,
        schedule,
        batcher,
        rng,
        step,
        total_steps: total,
        data,
        log,
        tokenizer_dir: cfg.model.init.clone(),
        console: Console { quiet: opts.quiet, bar: None },
        interval: Interval::default(),
        train_seconds: 0.0,
        train_tokens: 0,
    };
    drop(console);

    if t.step == 0 {
        if let Some(rec) = t.evaluate()? {
            t.console.note(format!("step 0 (before training): {}", brief(&rec)));
            t.log.append(rec)?;
            refresh_plot(&t.log, task, &t.console);
        }
    }

    let bar = ProgressBar::new(total as u64);
    if !opts.progress || opts.quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps  {msg}  {elapsed_precise} < {eta_precise}")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_prefix(task.name());
    bar.set_position(t.step as u64);
    t.console.bar = Some(bar.clone());

    let mut last_checkpoint = None;
    let steps_at_start = t.step;
    while t.step < total {
        let t0 = Instant::now();
        let info = match task {
            Task::Preference => t.preference_step(),
            Task::Sft => t.sft_step(),
        }
        .with_context(|| format!("training step {}", t.step + 1))?;
        t.step += 1;
        // A diverged step stops the run before anything of it is written.
        check_loss(t.step, info.loss.unwrap_or(0.0), cfg.train.max_loss)
            .and_then(|()| check_parameters(&t.learner.policy, t.step))
            .with_context(|| {
                format!("the run stopped, nothing of this step written; {}", checkpoint::describe_latest(out))
            })?;
        t.sync_reference().with_context(|| format!("syncing the reference after step {}", t.step))?;
        let secs = t0.elapsed().as_secs_f64();
        t.interval.seconds += secs;
        t.train_seconds += secs;
        bar.set_position(t.step as u64);

        let last = t.step == total;
        if t.step % cfg.intervals.log_every == 0 || last {
            let rec = t.train_record(&info);
            bar.set_message(brief(&rec));
            t.log.append(rec)?;
        }
        let eval_every = cfg.intervals.eval_every;
        if (eval_every > 0 && t.step % eval_every == 0) || last {
            if let Some(rec) = t.evaluate()? {
                t.console.note(format!("step {}: {}", t.step, brief(&rec)));
                t.log.append(rec)?;
                refresh_plot(&t.log, task, &t.console);
            }
        }
        let stop = opts.stop_after_step == Some(t.step);
        let every = cfg.intervals.checkpoint_every;
        if last {
            last_checkpoint = Some(t.save_checkpoint(FINAL_DIR)?);
        } else if (every > 0 && t.step % every == 0) || stop {
            last_checkpoint = Some(t.save_checkpoint(&checkpoint_name(t.step))?);
        }
        if stop {
            break;
        }
    }
    bar.finish_and_clear();
    t.console.bar = None;
    refresh_plot(&t.log, task, &t.console);
    if steps_at_start == total {
        t.console.note(format!("the run in {} is already complete ({total} steps)", out.display()));
        last_checkpoint = resume_from.clone();
    }
    let records = t.log.records();
    let evals: Vec<&Record> = records.iter().filter(|r| r.contains_key("eval/loss")).collect();
    let summary = RunSummary {
        out_dir: out.clone(),
        last_checkpoint,
        completed: t.step == total,
        total_steps: total,
        steps_this_run: t.step - steps_at_start,
        train_pairs: t.data.train_len(),
        eval_pairs: t.data.eval_len(),
        first_eval: evals.first().map(|r| (*r).clone()),
        last_eval: evals.last().map(|r| (*r).clone()),
        train_seconds: t.train_seconds,
        tokens_per_second: t.train_tokens as f64 / t.train_seconds.max(1e-9),
        wall_seconds: started.elapsed().as_secs_f64(),
        reference_cache,
    };
    if let Some(dir) = &summary.last_checkpoint {
        t.console.note(format!("checkpoint: {}", dir.display()));
    }
    Ok(summary)
}

/// Redraws the run's `plot.svg` from its metrics so far. A plot that cannot be written is noted, not
/// fatal: the curves are a view of `metrics.jsonl`, which holds them all.
fn refresh_plot(log: &MetricsLog, task: Task, console: &Console) {
    let Some(dir) = log.path().parent().filter(|_| log.writes_file()) else { return };
    let title = format!("{} training: {}", task.name(), dir.display());
    if let Err(e) = crate::plot::plot_metrics(log.records(), &dir.join(crate::plot::PLOT_FILE), &title) {
        console.note(format!("warning: {e:#}"));
    }
}

/// Re-exports for the command line and the demo.
pub use data::PreferencePair;
