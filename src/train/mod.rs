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
pub mod demo;
pub mod generate;
pub mod metrics;
pub mod refcache;
pub mod step;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::backend::{Backend, PAIR_METRICS};
use crate::config::{RunConfig, RunLength};
use crate::data::{
    self, load_pairs, load_tokenizer, preference_batch, sequence_format, sft_batch, split_holdout, tokenize_pairs_with,
    BatchLimit, Batcher, TextTokenizer, TokenizedPair,
};
use crate::loss::{LossState, Objective};
use crate::model::decoder::random_weights;
use crate::model::{Decoder, DeviceBatch, HostWeights};
use crate::optim::{AdamW, LrSchedule, Scheduler};
use crate::util::write_atomic;

pub use checkpoint::Resume;
use checkpoint::{checkpoint_name, commit_dir, resolve_resume, TrainState, FINAL_DIR, METRICS_FILE};
use metrics::{json_f32, json_f64, MetricsLog, PairStats, Record};
pub use refcache::CacheStatus;
use refcache::{cache_key, chunk_pairs, load_or_compute, sequence_logps};
use step::{adamw_config, Learner, MicroBatch, MicroOutput, Reference, StepInfo};

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
    /// One line per step of the preparation (load report, T(D) counts, truncation).
    pub report: Vec<String>,
}

/// Loads, selects (T(D) for SafeDPO), splits and tokenizes the data of `cfg`. For SFT only the pairs
/// whose chosen response is safe are kept.
pub fn prepare_data(cfg: &RunConfig, tok: &dyn TextTokenizer, task: Task) -> Result<PreparedData> {
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
    Ok(PreparedData { train, eval, report })
}

/// Checks every token id of `pairs` is inside the model's vocabulary.
fn check_vocab(pairs: &[TokenizedPair], vocab_size: usize, what: &str) -> Result<()> {
    let max =
        pairs.iter().flat_map(|p| p.prompt.iter().chain(&p.chosen).chain(&p.rejected)).copied().max().unwrap_or(0);
    ensure!(
        (max as usize) < vocab_size,
        "{what}: the tokenizer produced token id {max}, but the model's vocabulary has {vocab_size} tokens"
    );
    Ok(())
}

/// The number of optimizer steps of a run.
fn total_steps(cfg: &RunConfig, batcher: &Batcher, pairs: &[TokenizedPair], task: Task) -> usize {
    let limit = cfg.batching.limit();
    match cfg.length() {
        RunLength::Steps(n) => n,
        RunLength::Epochs(epochs) => {
            let per_epoch = |e: usize| match task {
                Task::Preference => batcher.batches_in_epoch_under(pairs, limit, e),
                Task::Sft => batcher.sft_batches_in_epoch_under(pairs, limit, e),
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

/// The reference weights: `model.reference`, else `model.init`, else the random init the policy
/// starts from. Kept on the host long enough to key the reference cache with their exact values (a
/// frozen model on a bf16 device holds rounded ones), then uploaded frozen.
fn load_reference_weights(cfg: &RunConfig, vocab_size: usize) -> Result<HostWeights> {
    match cfg.model.reference.as_ref().or(cfg.model.init.as_ref()) {
        Some(dir) => crate::model::checkpoint::load_dir(dir)
            .with_context(|| format!("loading the reference model from {}", dir.display())),
        None => random_weights(cfg.model.random_shape(vocab_size), cfg.seed),
    }
}

/// A training run in progress.
struct Trainer<B: Backend> {
    backend: Arc<B>,
    cfg: RunConfig,
    task: Task,
    opts: TrainOptions,
    /// The policy, its optimizer, the reference and the objective.
    learner: Learner<B>,
    /// Reference log-probs of the eval pairs `[2E]` (fixed, so computed once).
    eval_reference: Vec<f32>,
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
        let backend = self.backend.clone();
        let b = &*backend;
        let policy = &mut self.learner.policy;
        policy.zero_grad()?;
        for packed in &micro {
            let dev = DeviceBatch::upload(b, packed)?;
            let dseq = b.upload(&vec![-1.0 / targets as f32; packed.num_seqs()])?;
            let logps = policy.forward(&dev)?;
            let host = b.download(logps)?;
            policy.backward(&dev, &dseq)?;
            self.interval.nll -= host.iter().map(|&x| x as f64).sum::<f64>();
            self.interval.tokens += packed.num_tokens();
            self.train_tokens += packed.num_tokens();
        }
        self.interval.nll_tokens += targets;
        let lr = self.next_lr();
        self.learner.update(lr)
    }

    /// Evaluates the policy on the held-out pairs; `None` when there are none.
    fn evaluate(&mut self) -> Result<Option<Record>> {
        if self.data.eval.is_empty() {
            return Ok(None);
        }
        let mut rec = Record::new();
        rec.insert("step".into(), self.step.into());
        rec.insert("epoch".into(), json_f64(self.epoch()));
        match self.task {
            Task::Preference => {
                let stats = evaluate_pairs_with(
                    &mut self.learner.policy,
                    &self.eval_reference,
                    &self.data.eval,
                    &self.learner.objective,
                    &self.learner.loss_state,
                    self.cfg.batching.tokens_per_micro_batch,
                )?;
                stats.write_means("eval/", &mut rec);
            }
            Task::Sft => {
                let budget = self.budget();
                let (nll, tokens) = evaluate_nll(&mut self.learner.policy, &self.data.eval, budget)?;
                rec.insert("eval/loss".into(), json_f64(nll / tokens.max(1) as f64));
            }
        }
        Ok(Some(rec))
    }

    /// The log record of the steps since the last one.
    fn train_record(&mut self, info: &StepInfo) -> Record {
        let iv = std::mem::take(&mut self.interval);
        let mut rec = Record::new();
        match self.task {
            Task::Preference => iv.stats.write_means("", &mut rec),
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
    fn save_checkpoint(&self, name: &str) -> Result<PathBuf> {
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
        let dir = commit_dir(&self.cfg.out_dir, name, |dir| {
            check("model.safetensors")?;
            self.learner.policy.save(dir)?;
            let src = self.tokenizer_dir.as_deref();
            data::save_tokenizer_files(load_tokenizer(src)?.as_ref(), src, dir)?;
            check("optimizer.safetensors")?;
            checkpoint::write_optimizer_state(dir, &self.learner.optimizer.state_to_host()?)?;
            check("metrics.jsonl")?;
            write_atomic(&dir.join(METRICS_FILE), self.log.to_jsonl().as_bytes())?;
            write_atomic(&dir.join(checkpoint::RUN_CONFIG_FILE), self.cfg.to_toml()?.as_bytes())?;
            check("state.json")?;
            state.write(dir)
        })?;
        checkpoint::prune_checkpoints(&self.cfg.out_dir, self.cfg.intervals.keep_checkpoints, &dir)?;
        Ok(dir)
    }
}

/// Evaluates `policy` on fixed pairs whose reference log-probs `[2P]` are given (zeros for a
/// reference-free objective), at the loss state before any step.
pub fn evaluate_pairs<B: Backend>(
    policy: &mut Decoder<B>,
    reference: &[f32],
    pairs: &[TokenizedPair],
    objective: &Objective,
    token_budget: usize,
) -> Result<PairStats> {
    evaluate_pairs_with(policy, reference, pairs, objective, &LossState::default(), token_budget)
}

/// [`evaluate_pairs`] at the trainer's loss state `state` (read, not updated: evaluation does not
/// move `bco_pair`'s running mean).
pub fn evaluate_pairs_with<B: Backend>(
    policy: &mut Decoder<B>,
    reference: &[f32],
    pairs: &[TokenizedPair],
    objective: &Objective,
    state: &LossState,
    token_budget: usize,
) -> Result<PairStats> {
    ensure!(reference.len() == 2 * pairs.len(), "{} reference log-probs for {} pairs", reference.len(), pairs.len());
    let backend = policy.backend().clone();
    let b = &*backend;
    let mut stats = PairStats::default();
    for ids in chunk_pairs(pairs, token_budget) {
        let batch = preference_batch(pairs, &ids);
        let dev = DeviceBatch::upload(b, &batch.packed)?;
        let host_ref: Vec<f32> = ids.iter().flat_map(|&i| [reference[2 * i], reference[2 * i + 1]]).collect();
        let reference = b.upload(&host_ref)?;
        let flags = b.upload_ids(&batch.unsafe_flags)?;
        let lengths = b.upload_ids(&batch.lengths)?;
        let mut metrics = b.zeros(ids.len() * PAIR_METRICS)?;
        let mut dpolicy = b.zeros(2 * ids.len())?;
        let logps = policy.forward(&dev)?;
        b.preference_loss_with(&mut metrics, &mut dpolicy, logps, &reference, &flags, &lengths, objective, state, 1.0)?;
        let host_logps = b.download(logps)?;
        stats.add_batch(&b.download(&metrics)?, &host_logps, &batch.unsafe_flags);
    }
    Ok(stats)
}

/// The summed negative log-likelihood of the chosen responses of `pairs` and their token count.
pub fn evaluate_nll<B: Backend>(
    model: &mut Decoder<B>,
    pairs: &[TokenizedPair],
    token_budget: usize,
) -> Result<(f64, usize)> {
    let backend = model.backend().clone();
    let (mut nll, mut tokens) = (0.0, 0);
    for ids in chunk_pairs(pairs, token_budget) {
        let packed = sft_batch(pairs, &ids);
        tokens += (0..packed.num_seqs()).map(|s| packed.num_targets(s)).sum::<usize>();
        let dev = DeviceBatch::upload(&*backend, &packed)?;
        let logps = model.forward(&dev)?;
        nll -= backend.download(logps)?.iter().map(|&x| x as f64).sum::<f64>();
    }
    Ok((nll, tokens))
}

/// The tokenizer of a run: the initial model's, else the byte tokenizer.
pub fn run_tokenizer(cfg: &RunConfig) -> Result<Box<dyn TextTokenizer>> {
    load_tokenizer(cfg.model.init.as_deref())
}

/// Runs (or resumes) a training run to completion (or to the `stop_after_step` hook).
pub fn train<B: Backend>(backend: Arc<B>, cfg: &RunConfig, task: Task, opts: &TrainOptions) -> Result<RunSummary> {
    let started = Instant::now();
    let errors = cfg.validate();
    if !errors.is_empty() {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {}: {}", e.field, e.message)).collect();
        bail!("invalid configuration:\n{}", lines.join("\n"));
    }
    let out = &cfg.out_dir;
    let console = Console { quiet: opts.quiet, bar: None };
    console.note(format!("{} run in {} on {}", task.name(), out.display(), backend.name()));

    let resume_from = resolve_resume(opts.resume.as_ref(), out)?;
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
    std::fs::create_dir_all(out).with_context(|| format!("creating out_dir {}", out.display()))?;
    write_atomic(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;

    // The policy: the checkpoint's weights, the initial model, or a random init.
    let mut policy = match (&resume_from, &cfg.model.init) {
        (Some(dir), _) => Decoder::load(backend.clone(), dir),
        (None, Some(dir)) => {
            Decoder::load(backend.clone(), dir).with_context(|| format!("loading model.init {}", dir.display()))
        }
        (None, None) => Decoder::random(backend.clone(), cfg.model.random_shape(tokenizer.vocab_size()), cfg.seed),
    }?;
    if let Some(rows) = cfg.batching.head_chunk_rows {
        policy.set_head_chunk_rows(rows)?;
    }
    policy.set_gradient_checkpointing(cfg.batching.gradient_checkpointing);
    let vocab = policy.config().vocab_size;
    check_vocab(&data.train, vocab, "training data")?;
    check_vocab(&data.eval, vocab, "eval data")?;
    let n_positions = policy.config().n_positions;
    ensure!(
        cfg.data.max_len <= n_positions,
        "data.max_len = {} exceeds the model's context (n_positions = {n_positions})",
        cfg.data.max_len
    );
    console.note(format!(
        "model: {}, {:.2}M parameters; {} train / {} eval pairs",
        policy.config().summary(),
        policy.num_params() as f64 / 1e6,
        data.train.len(),
        data.eval.len()
    ));

    // The reference: cached log-probs (the model dropped), or the frozen model.
    let objective = cfg.objective.clone();
    let mut reference_cache = None;
    let (reference, eval_reference) = if task == Task::Sft || !objective.uses_reference() {
        (Reference::Free, vec![0.0; 2 * data.eval.len()])
    } else {
        if let Some(dir) = &cfg.model.reference {
            data::check_same_tokenizer(tokenizer.as_ref(), cfg.model.init.as_deref(), dir)?;
        }
        let ref_weights = load_reference_weights(cfg, vocab)?;
        ensure!(
            ref_weights.config.same_architecture(policy.config()),
            "the reference model ({}) differs from the policy ({})",
            ref_weights.config.summary(),
            policy.config().summary()
        );
        let mut ref_model = Decoder::from_host_frozen(backend.clone(), &ref_weights)?;
        if let Some(rows) = cfg.batching.head_chunk_rows {
            ref_model.set_head_chunk_rows(rows)?;
        }
        let budget = cfg.batching.tokens_per_micro_batch;
        if cfg.precompute_ref {
            let key = cache_key(&ref_weights, &[("train", &data.train), ("eval", &data.eval)], &cfg.data.template);
            let path = out.join("reference_logps.safetensors");
            let t0 = Instant::now();
            let (mut sets, status) =
                load_or_compute(&path, &key, &[("train", data.train.len()), ("eval", data.eval.len())], || {
                    Ok(vec![
                        sequence_logps(&mut ref_model, &data.train, budget)?,
                        sequence_logps(&mut ref_model, &data.eval, budget)?,
                    ])
                })?;
            console.note(format!(
                "reference log-probs: cache {} ({}, {:.1}s)",
                match status {
                    CacheStatus::Hit => "hit",
                    CacheStatus::Miss => "miss, computed",
                    CacheStatus::Stale => "stale, recomputed",
                },
                path.display(),
                t0.elapsed().as_secs_f64()
            ));
            reference_cache = Some(status);
            let eval = sets.pop().expect("two sets");
            let train = sets.pop().expect("two sets");
            (Reference::Cached(train), eval)
        } else {
            let eval = sequence_logps(&mut ref_model, &data.eval, budget)?;
            (Reference::Model(Box::new(ref_model)), eval)
        }
    };

    let op = &cfg.optimizer;
    let mut policy = policy;
    let mut optimizer = AdamW::new(&mut policy, adamw_config(op))?;
    let mut batcher = Batcher::new(data.train.len(), cfg.seed);
    let total = total_steps(cfg, &batcher, &data.train, task);
    if let limit @ BatchLimit::Pairs(_) = cfg.batching.limit() {
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
            batcher = Batcher::restore(data.train.len(), cfg.seed, state.batcher)?;
            rng = state.rng.clone();
            let records = crate::plot::read_metrics(&dir.join(METRICS_FILE))?;
            console.note(format!("resumed from {} at step {}/{total}", dir.display(), state.step));
            (state.step, MetricsLog::restore(&metrics_path, records)?)
        }
        _ => (0, MetricsLog::create(&metrics_path)?),
    };

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
        train_pairs: t.data.train.len(),
        eval_pairs: t.data.eval.len(),
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

/// A one-line digest of a metrics record for the console.
pub fn brief(rec: &Record) -> String {
    let keys = [
        ("loss", "loss"),
        ("rewards/accuracies", "acc"),
        ("rewards/margins", "margin"),
        ("eval/loss", "eval loss"),
        ("eval/rewards/accuracies", "eval acc"),
        ("eval/rewards/margins", "eval margin"),
        ("eval/safe_preferred_accuracy", "safe-preferred"),
    ];
    keys.iter()
        .filter_map(|(k, label)| rec.get(*k).and_then(|v| v.as_f64()).map(|v| format!("{label} {v:.4}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Re-exports for the command line and the demo.
pub use data::PreferencePair;
