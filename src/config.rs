//! Run configuration (TOML), every field overridable from the command line, validated with errors
//! that name the field.
//!
//! Precedence, lowest to highest: the built-in defaults (`RunConfig::default()`), the TOML file given
//! with `--config`, then the command-line flags (`RunOverrides`). A flag always wins over the file.
//!
//! A complete file, every field optional (these are the defaults, except `data.path`):
//!
//! ```toml
//! seed = 42
//! out_dir = "runs/safedpo"
//! device = "auto"            # auto | cpu | cuda | emu
//! precompute_ref = true      # reference log-probs computed once and cached; the reference is dropped
//!
//! [model]
//! # init = "models/sft"      # HF model dir for the policy; absent: random init of the shape below
//! # reference = "models/sft" # HF model dir for the reference; absent: the policy's initial weights
//! n_layer = 4
//! n_embd = 128
//! n_head = 4
//! n_positions = 512
//! # vocab_size = 50257       # random init only; absent: the tokenizer's vocabulary
//!
//! [data]
//! path = "data/train.jsonl"
//! # eval_path = "data/test.jsonl"   # absent: hold out `eval_fraction` of `path`
//! format = "auto"            # auto | pku-saferlhf | jsonl
//! selection = "safedpo"      # better | safer | safedpo
//! template = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
//! max_len = 512
//! eval_fraction = 0.05
//! skip_invalid = false
//! sft_safe_only = true       # sft: train only on chosen responses labelled safe
//!
//! [objective]
//! name = "safedpo"           # dpo | safedpo | ipo | robust | cdpo | hinge | rpo | simpo | npo
//! beta = 0.1
//! delta = 10.0               # safedpo only; eps: robust/cdpo; alpha: rpo; gamma: simpo
//!
//! [optimizer]
//! lr = 1e-5
//! beta1 = 0.9
//! beta2 = 0.999
//! eps = 1e-8
//! weight_decay = 0.0
//! grad_clip = 1.0            # 0 disables clipping
//! warmup_steps = 0
//! epochs = 1.0               # or total_steps = 1000 (not both)
//! min_lr_ratio = 0.1
//!
//! [batching]
//! tokens_per_micro_batch = 8192
//! grad_accum = 1
//!
//! [intervals]
//! log_every = 1
//! eval_every = 100           # 0: only before the first and after the last step
//! checkpoint_every = 500     # 0: only the final checkpoint
//! keep_checkpoints = 0       # 0: keep all
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::backend::DeviceKind;
use crate::data::{DataFormat, PairSelection};
use crate::loss::{self, Objective};
use crate::model::Gpt2Config;

/// The objective's name (`objective.name`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveName {
    Dpo,
    #[default]
    Safedpo,
    Ipo,
    Robust,
    Cdpo,
    Hinge,
    Rpo,
    Simpo,
    Npo,
}

/// `[model]`: where the policy and the reference come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// HF model directory the policy starts from; absent: a random model of the shape below.
    pub init: Option<PathBuf>,
    /// HF model directory of the frozen reference; absent: the policy's initial weights.
    pub reference: Option<PathBuf>,
    /// Random-init shape (ignored with `init`).
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_positions: usize,
    /// Random-init vocabulary; absent: the tokenizer's. A larger one gives a model of a real
    /// tokenizer's shape (GPT-2's 50257) on data from a smaller one (e.g. the byte tokenizer), for
    /// timing and memory checks. Left out of the serialised form when absent, so configurations and
    /// trajectory hashes written before the field existed are unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { init: None, reference: None, n_layer: 4, n_embd: 128, n_head: 4, n_positions: 512, vocab_size: None }
    }
}

impl ModelConfig {
    /// The GPT-2 shape of a random init: `vocab_size` when set, else `tokenizer_vocab` (the
    /// tokenizer's). The trainer checks every token id of the data fits the vocabulary.
    pub fn random_shape(&self, tokenizer_vocab: usize) -> Gpt2Config {
        Gpt2Config {
            vocab_size: self.vocab_size.unwrap_or(tokenizer_vocab),
            n_positions: self.n_positions,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            layer_norm_epsilon: 1e-5,
        }
    }
}

pub use crate::data::DEFAULT_TEMPLATE;

/// `[data]`: the dataset and how pairs are built from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Training data (JSONL).
    pub path: Option<PathBuf>,
    /// Separate evaluation data; absent: `eval_fraction` of `path` is held out.
    pub eval_path: Option<PathBuf>,
    pub format: DataFormat,
    pub selection: PairSelection,
    /// Prompt template; `{prompt}` is replaced by the prompt.
    pub template: String,
    /// Longest sequence (prompt + response) in tokens; longer pairs are truncated.
    pub max_len: usize,
    /// Fraction of the pairs held out for evaluation (when there is no `eval_path`).
    pub eval_fraction: f64,
    /// Skip malformed lines instead of failing on the first one.
    pub skip_invalid: bool,
    /// SFT trains only on chosen responses labelled safe (default). `false`: on every chosen
    /// response, a helpfulness-only SFT like the paper's Alpaca reference, which SafeDPO then aligns.
    pub sft_safe_only: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: None,
            eval_path: None,
            format: DataFormat::Auto,
            selection: PairSelection::SafeDpo,
            template: DEFAULT_TEMPLATE.to_string(),
            max_len: 512,
            eval_fraction: 0.05,
            skip_invalid: false,
            sft_safe_only: true,
        }
    }
}

/// `[objective]`: the preference objective and its parameters. Parameters an objective does not
/// take are rejected; those it takes and that are absent get the defaults of [`ObjectiveConfig::build`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    pub name: ObjectiveName,
    pub beta: f64,
    /// SafeDPO's safety offset Δ (default 10).
    pub delta: Option<f64>,
    /// Label-noise rate of robust DPO / cDPO (default 0.1).
    pub eps: Option<f64>,
    /// RPO's NLL weight (default 1).
    pub alpha: Option<f64>,
    /// SimPO's target margin γ (default 1.0).
    pub gamma: Option<f64>,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self { name: ObjectiveName::Safedpo, beta: 0.1, delta: None, eps: None, alpha: None, gamma: None }
    }
}

impl ObjectiveConfig {
    /// The names of the optional parameters `name` takes.
    fn takes(name: ObjectiveName) -> &'static [&'static str] {
        match name {
            ObjectiveName::Safedpo => &["delta"],
            ObjectiveName::Robust | ObjectiveName::Cdpo => &["eps"],
            ObjectiveName::Rpo => &["alpha"],
            ObjectiveName::Simpo => &["gamma"],
            ObjectiveName::Dpo | ObjectiveName::Ipo | ObjectiveName::Hinge | ObjectiveName::Npo => &[],
        }
    }

    /// The objective with its defaults filled in (call after validation).
    pub fn build(&self) -> Objective {
        let beta = self.beta;
        match self.name {
            ObjectiveName::Dpo => Objective::Dpo { beta },
            ObjectiveName::Safedpo => Objective::SafeDpo { beta, delta: self.delta.unwrap_or(loss::DEFAULT_DELTA) },
            ObjectiveName::Ipo => Objective::Ipo { beta },
            ObjectiveName::Robust => Objective::Robust { beta, eps: self.eps.unwrap_or(loss::DEFAULT_EPS) },
            ObjectiveName::Cdpo => Objective::Cdpo { beta, eps: self.eps.unwrap_or(loss::DEFAULT_EPS) },
            ObjectiveName::Hinge => Objective::Hinge { beta },
            ObjectiveName::Rpo => Objective::Rpo { beta, alpha: self.alpha.unwrap_or(loss::DEFAULT_ALPHA) },
            ObjectiveName::Simpo => Objective::Simpo { beta, gamma: self.gamma.unwrap_or(loss::DEFAULT_SIMPO_GAMMA) },
            ObjectiveName::Npo => Objective::Npo { beta },
        }
    }
}

/// `[optimizer]`: AdamW, clipping and the learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global grad-norm clip; 0 disables it.
    pub grad_clip: f32,
    /// Linear warmup from 0 over this many steps.
    pub warmup_steps: usize,
    /// Number of optimizer steps (exclusive with `epochs`).
    pub total_steps: Option<usize>,
    /// Passes over the training pairs (exclusive with `total_steps`; the default is 1 epoch).
    pub epochs: Option<f64>,
    /// The cosine decay ends at `min_lr_ratio · lr`.
    pub min_lr_ratio: f32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
            warmup_steps: 0,
            total_steps: None,
            epochs: None,
            min_lr_ratio: 0.1,
        }
    }
}

/// `[batching]`: micro-batch size and gradient accumulation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Token budget of one packed micro-batch (chosen and rejected sequences together).
    pub tokens_per_micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self { tokens_per_micro_batch: 8192, grad_accum: 1 }
    }
}

/// `[intervals]`: how often to log, evaluate and checkpoint, in optimizer steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntervalConfig {
    pub log_every: usize,
    /// 0: evaluate only before the first step and after the last.
    pub eval_every: usize,
    /// 0: only the final checkpoint.
    pub checkpoint_every: usize,
    /// How many `checkpoint-<step>` directories to keep (oldest removed first); 0 keeps all.
    pub keep_checkpoints: usize,
}

impl Default for IntervalConfig {
    fn default() -> Self {
        Self { log_every: 1, eval_every: 100, checkpoint_every: 500, keep_checkpoints: 0 }
    }
}

/// Everything a training run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub seed: u64,
    pub out_dir: PathBuf,
    pub device: DeviceKind,
    /// Compute the reference log-probs once for the whole dataset, cache them on disk, and drop the
    /// reference model during training.
    pub precompute_ref: bool,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub objective: ObjectiveConfig,
    pub optimizer: OptimizerConfig,
    pub batching: BatchingConfig,
    pub intervals: IntervalConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            out_dir: PathBuf::from("runs/safedpo"),
            device: DeviceKind::Auto,
            precompute_ref: true,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            objective: ObjectiveConfig::default(),
            optimizer: OptimizerConfig::default(),
            batching: BatchingConfig::default(),
            intervals: IntervalConfig::default(),
        }
    }
}

/// The length of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RunLength {
    Steps(usize),
    Epochs(f64),
}

/// One validation failure: the dotted field path (`optimizer.lr`) and what was expected.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl RunConfig {
    /// Parses a TOML document. Errors carry `file:line:column` and the field.
    pub fn from_toml_str(text: &str, file: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", describe_toml_error(&e, text, file)))
    }

    /// Reads a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::from_toml_str(&text, path)
    }

    /// Defaults, then the `--config` file if any, then the flags; validated. Validation errors name the
    /// field and where its value came from (`file:line`, the flag, or the default).
    pub fn resolve(overrides: &RunOverrides) -> Result<Self> {
        let (mut cfg, source) = match &overrides.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
                (Self::from_toml_str(&text, path)?, Some((path.clone(), text)))
            }
            None => (Self::default(), None),
        };
        let from_flags = overrides.apply(&mut cfg);
        let errors = cfg.validate();
        if errors.is_empty() {
            return Ok(cfg);
        }
        let lines: Vec<String> = errors
            .iter()
            .map(|e| {
                let origin = if let Some((_, flag)) = from_flags.iter().find(|(f, _)| *f == e.field) {
                    format!("(from --{flag})")
                } else if let Some((path, line)) =
                    source.as_ref().and_then(|(p, t)| toml_field_line(t, &e.field).map(|l| (p, l)))
                {
                    format!("({}:{line})", path.display())
                } else {
                    "(default)".to_string()
                };
                format!("  {}: {} {origin}", e.field, e.message)
            })
            .collect();
        bail!("invalid configuration:\n{}", lines.join("\n"))
    }

    /// Every problem with the configuration, each naming its field. Checks what can be checked without
    /// reading the data or the model.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut err = |field: &str, message: String| errs.push(FieldError { field: field.to_string(), message });

        let m = &self.model;
        if m.init.is_none() {
            if m.n_layer == 0 {
                err("model.n_layer", "must be at least 1".into());
            }
            if m.n_head == 0 {
                err("model.n_head", "must be at least 1".into());
            } else if m.n_embd == 0 || !m.n_embd.is_multiple_of(m.n_head) {
                err(
                    "model.n_embd",
                    format!("must be a positive multiple of model.n_head ({}), got {}", m.n_head, m.n_embd),
                );
            }
            if let Some(v) = m.vocab_size {
                if !(2..=i32::MAX as usize).contains(&v) {
                    err("model.vocab_size", format!("must be in 2..={} (token ids are i32), got {v}", i32::MAX));
                }
            }
            if m.n_positions < self.data.max_len {
                err(
                    "model.n_positions",
                    format!("must be at least data.max_len ({}), got {}", self.data.max_len, m.n_positions),
                );
            }
        }

        let d = &self.data;
        if d.template.matches("{prompt}").count() != 1 {
            err("data.template", format!("must contain `{{prompt}}` exactly once, got {:?}", d.template));
        }
        if d.max_len < 2 {
            err("data.max_len", format!("must be at least 2 tokens, got {}", d.max_len));
        }
        if !(0.0..1.0).contains(&d.eval_fraction) {
            err("data.eval_fraction", format!("must be in [0, 1), got {}", d.eval_fraction));
        }

        let o = &self.objective;
        if !(o.beta.is_finite() && o.beta > 0.0) {
            err("objective.beta", format!("must be a positive number, got {}", o.beta));
        }
        let takes = ObjectiveConfig::takes(o.name);
        for (field, value) in [("delta", o.delta), ("eps", o.eps), ("alpha", o.alpha), ("gamma", o.gamma)] {
            let Some(v) = value else { continue };
            let path = format!("objective.{field}");
            if !takes.contains(&field) {
                let name = serde_json::to_value(o.name).ok().and_then(|v| v.as_str().map(String::from));
                let name = name.unwrap_or_default();
                err(&path, format!("is not a parameter of objective `{name}` (it takes: {})", list_or_none(takes)));
            } else if !v.is_finite() || v < 0.0 || (field == "eps" && v >= 0.5) {
                let range = if field == "eps" { "[0, 0.5)" } else { "a finite number >= 0" };
                err(&path, format!("must be {range}, got {v}"));
            }
        }

        let op = &self.optimizer;
        if !(op.lr.is_finite() && op.lr > 0.0) {
            err("optimizer.lr", format!("must be a positive number, got {}", op.lr));
        }
        if !(0.0..1.0).contains(&op.beta1) {
            err("optimizer.beta1", format!("must be in [0, 1), got {}", op.beta1));
        }
        if !(0.0..1.0).contains(&op.beta2) {
            err("optimizer.beta2", format!("must be in [0, 1), got {}", op.beta2));
        }
        if !(op.eps.is_finite() && op.eps > 0.0) {
            err("optimizer.eps", format!("must be a positive number, got {}", op.eps));
        }
        if !(op.weight_decay.is_finite() && op.weight_decay >= 0.0) {
            err("optimizer.weight_decay", format!("must be >= 0, got {}", op.weight_decay));
        }
        if !(op.grad_clip.is_finite() && op.grad_clip >= 0.0) {
            err("optimizer.grad_clip", format!("must be >= 0 (0 disables clipping), got {}", op.grad_clip));
        }
        if !(0.0..=1.0).contains(&op.min_lr_ratio) {
            err("optimizer.min_lr_ratio", format!("must be in [0, 1], got {}", op.min_lr_ratio));
        }
        match (op.total_steps, op.epochs) {
            (Some(_), Some(_)) => err("optimizer.total_steps", "and optimizer.epochs are exclusive; set one".into()),
            (Some(0), None) => err("optimizer.total_steps", "must be at least 1".into()),
            (None, Some(e)) if !(e.is_finite() && e > 0.0) => {
                err("optimizer.epochs", format!("must be a positive number, got {e}"))
            }
            _ => {}
        }
        if let Some(total) = op.total_steps {
            if op.warmup_steps > total {
                err(
                    "optimizer.warmup_steps",
                    format!("must be at most optimizer.total_steps ({total}), got {}", op.warmup_steps),
                );
            }
        }

        let b = &self.batching;
        if b.tokens_per_micro_batch < 2 * d.max_len {
            err(
                "batching.tokens_per_micro_batch",
                format!(
                    "must hold one full pair, 2 × data.max_len = {}, got {}",
                    2 * d.max_len,
                    b.tokens_per_micro_batch
                ),
            );
        }
        if b.grad_accum == 0 {
            err("batching.grad_accum", "must be at least 1".into());
        }
        if self.intervals.log_every == 0 {
            err("intervals.log_every", "must be at least 1".into());
        }
        if self.out_dir.as_os_str().is_empty() {
            err("out_dir", "must not be empty".into());
        }
        errs
    }

    /// Checks the fields a training run needs beyond `validate` (a data path).
    pub fn require_data(&self) -> Result<&Path> {
        match &self.data.path {
            Some(p) => Ok(p),
            None => bail!("data.path: required (set `path` under [data] in the config, or pass --data)"),
        }
    }

    /// How long to train: `Steps(n)` with `total_steps`, else `Epochs(e)` (1 by default); the
    /// trainer converts epochs to steps once it knows the data.
    pub fn length(&self) -> RunLength {
        match self.optimizer.total_steps {
            Some(n) => RunLength::Steps(n),
            None => RunLength::Epochs(self.optimizer.epochs.unwrap_or(1.0)),
        }
    }

    /// A sha256 over everything that determines the training trajectory (not the output dir, the
    /// device or the logging intervals). A resumed run must have the same hash.
    pub fn trajectory_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let key = serde_json::json!({
            "seed": self.seed,
            "precompute_ref": self.precompute_ref,
            "model": self.model,
            "data": self.data,
            "objective": self.objective,
            "optimizer": self.optimizer,
            "batching": self.batching,
        });
        let digest = Sha256::digest(key.to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The configuration as TOML (written next to every run's outputs).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).context("serialising the run configuration to TOML")
    }
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "none besides beta".to_string()
    } else {
        items.join(", ")
    }
}

/// `file:line:column: message (field)` for a TOML parse or type error.
fn describe_toml_error(e: &toml::de::Error, text: &str, file: &Path) -> String {
    let msg = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
            let field = field_at(text, span.start).map(|f| format!("{f}: ")).unwrap_or_default();
            format!("{}:{line}:{col}: {field}{msg}\n  | {snippet}", file.display())
        }
        None => format!("{}: {msg}", file.display()),
    }
}

/// 1-based line and column of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

/// The dotted path of the key or value at byte `offset` of a TOML document, if any.
fn field_at(text: &str, offset: usize) -> Option<String> {
    fn walk(table: &toml::de::DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
        for (key, value) in table.iter() {
            let path =
                if prefix.is_empty() { key.get_ref().to_string() } else { format!("{prefix}.{}", key.get_ref()) };
            if let Some(inner) = value.get_ref().as_table() {
                if let Some(found) = walk(inner, offset, &path) {
                    return Some(found);
                }
            }
            let (k, v) = (key.span(), value.span());
            if k.contains(&offset) || v.contains(&offset) {
                return Some(path);
            }
        }
        None
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    walk(doc.get_ref(), offset, "")
}

/// The 1-based line of the value of a dotted `field` in a TOML document, if it is set there.
fn toml_field_line(text: &str, field: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut keys = field.split('.');
    let first = keys.next()?;
    let mut value = doc.get_ref().get(first)?;
    for k in keys {
        value = value.get_ref().get(k)?;
    }
    Some(line_col(text, value.span().start).0)
}

/// A clap value parser for the types that parse with `FromStr` into an `anyhow` error.
fn parse_via_from_str<T: std::str::FromStr<Err = anyhow::Error>>(s: &str) -> std::result::Result<T, String> {
    s.parse::<T>().map_err(|e| e.to_string())
}

/// Command-line overrides of every `RunConfig` field (`--config` names the TOML file they apply on).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RunOverrides {
    /// TOML run configuration; the flags below override its fields.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Random seed (data order, holdout split, random init).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output directory (metrics, checkpoints, final model).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Where to run: auto, cpu, cuda or emu.
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
    /// Cache the reference log-probs on disk and drop the reference model (true/false).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub precompute_ref: Option<bool>,

    /// HF model directory the policy starts from.
    #[arg(long, value_name = "DIR", help_heading = "Model")]
    pub init: Option<PathBuf>,
    /// HF model directory of the reference (default: the policy's initial weights).
    #[arg(long, value_name = "DIR", help_heading = "Model")]
    pub reference: Option<PathBuf>,
    /// Transformer blocks of a random init.
    #[arg(long, help_heading = "Model")]
    pub n_layer: Option<usize>,
    /// Width of a random init.
    #[arg(long, help_heading = "Model")]
    pub n_embd: Option<usize>,
    /// Attention heads of a random init.
    #[arg(long, help_heading = "Model")]
    pub n_head: Option<usize>,
    /// Context length of a random init.
    #[arg(long, help_heading = "Model")]
    pub n_positions: Option<usize>,
    /// Vocabulary of a random init (default: the tokenizer's); e.g. 50257 for GPT-2's shape.
    #[arg(long, help_heading = "Model")]
    pub vocab_size: Option<usize>,

    /// Training data (JSONL).
    #[arg(long, value_name = "FILE", help_heading = "Data")]
    pub data: Option<PathBuf>,
    /// Evaluation data (JSONL); default: hold out --eval-fraction of --data.
    #[arg(long, value_name = "FILE", help_heading = "Data")]
    pub eval_data: Option<PathBuf>,
    /// auto, pku-saferlhf or jsonl.
    #[arg(long, value_parser = parse_via_from_str::<DataFormat>, help_heading = "Data")]
    pub format: Option<DataFormat>,
    /// better, safer or safedpo (better through T(D)).
    #[arg(long, value_parser = parse_via_from_str::<PairSelection>, help_heading = "Data")]
    pub selection: Option<PairSelection>,
    /// Prompt template containing `{prompt}`.
    #[arg(long, help_heading = "Data")]
    pub template: Option<String>,
    /// Longest sequence (prompt + response) in tokens.
    #[arg(long, help_heading = "Data")]
    pub max_len: Option<usize>,
    /// Fraction of --data held out for evaluation.
    #[arg(long, allow_negative_numbers = true, help_heading = "Data")]
    pub eval_fraction: Option<f64>,
    /// Skip malformed lines instead of failing.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Data")]
    pub skip_invalid: Option<bool>,

    /// The preference objective.
    #[arg(long, value_enum, help_heading = "Objective")]
    pub objective: Option<ObjectiveName>,
    /// β: the implicit reward scale.
    #[arg(long, allow_negative_numbers = true, help_heading = "Objective")]
    pub beta: Option<f64>,
    /// SafeDPO's Δ.
    #[arg(long, allow_negative_numbers = true, help_heading = "Objective")]
    pub delta: Option<f64>,
    /// Robust DPO / cDPO label-noise rate.
    #[arg(long, allow_negative_numbers = true, help_heading = "Objective")]
    pub label_eps: Option<f64>,
    /// RPO's NLL weight.
    #[arg(long, allow_negative_numbers = true, help_heading = "Objective")]
    pub alpha: Option<f64>,
    /// SimPO's target margin.
    #[arg(long, allow_negative_numbers = true, help_heading = "Objective")]
    pub gamma: Option<f64>,

    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimizer")]
    pub lr: Option<f32>,
    /// AdamW β1.
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimizer")]
    pub adam_beta1: Option<f32>,
    /// AdamW β2.
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimizer")]
    pub adam_beta2: Option<f32>,
    /// AdamW ε.
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimizer")]
    pub adam_eps: Option<f32>,
    /// Decoupled weight decay (matrices and embeddings).
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimizer")]
    pub weight_decay: Option<f32>,
    /// Global grad-norm clip (0 disables).
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimizer")]
    pub grad_clip: Option<f32>,
    /// Linear warmup steps.
    #[arg(long, help_heading = "Optimizer")]
    pub warmup_steps: Option<usize>,
    /// Optimizer steps (replaces any `epochs` from the config file).
    #[arg(long, help_heading = "Optimizer")]
    pub total_steps: Option<usize>,
    /// Passes over the data (replaces any `total_steps` from the config file).
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimizer")]
    pub epochs: Option<f64>,
    /// The cosine decay ends at this fraction of --lr.
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimizer")]
    pub min_lr_ratio: Option<f32>,

    /// Token budget of one packed micro-batch.
    #[arg(long, help_heading = "Batching")]
    pub tokens_per_batch: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long, help_heading = "Batching")]
    pub grad_accum: Option<usize>,

    /// Steps between metrics records.
    #[arg(long, help_heading = "Intervals")]
    pub log_every: Option<usize>,
    /// Steps between evaluations (0: first and last only).
    #[arg(long, help_heading = "Intervals")]
    pub eval_every: Option<usize>,
    /// Steps between checkpoints (0: final only).
    #[arg(long, help_heading = "Intervals")]
    pub checkpoint_every: Option<usize>,
    /// Checkpoints kept (0: all).
    #[arg(long, help_heading = "Intervals")]
    pub keep_checkpoints: Option<usize>,
}

impl RunOverrides {
    /// Writes every flag that was given into `cfg`; returns (field path, flag name) of each.
    pub fn apply(&self, cfg: &mut RunConfig) -> Vec<(&'static str, &'static str)> {
        let mut set = Vec::new();
        macro_rules! over {
            ($flag:ident => $($field:ident).+ as $path:literal, $name:literal) => {
                if let Some(v) = &self.$flag {
                    cfg.$($field).+ = v.clone().into();
                    set.push(($path, $name));
                }
            };
        }
        over!(seed => seed as "seed", "seed");
        over!(out_dir => out_dir as "out_dir", "out-dir");
        over!(device => device as "device", "device");
        over!(precompute_ref => precompute_ref as "precompute_ref", "precompute-ref");
        over!(init => model.init as "model.init", "init");
        over!(reference => model.reference as "model.reference", "reference");
        over!(n_layer => model.n_layer as "model.n_layer", "n-layer");
        over!(n_embd => model.n_embd as "model.n_embd", "n-embd");
        over!(n_head => model.n_head as "model.n_head", "n-head");
        over!(n_positions => model.n_positions as "model.n_positions", "n-positions");
        over!(vocab_size => model.vocab_size as "model.vocab_size", "vocab-size");
        over!(data => data.path as "data.path", "data");
        over!(eval_data => data.eval_path as "data.eval_path", "eval-data");
        over!(format => data.format as "data.format", "format");
        over!(selection => data.selection as "data.selection", "selection");
        over!(template => data.template as "data.template", "template");
        over!(max_len => data.max_len as "data.max_len", "max-len");
        over!(eval_fraction => data.eval_fraction as "data.eval_fraction", "eval-fraction");
        over!(skip_invalid => data.skip_invalid as "data.skip_invalid", "skip-invalid");
        over!(objective => objective.name as "objective.name", "objective");
        over!(beta => objective.beta as "objective.beta", "beta");
        over!(delta => objective.delta as "objective.delta", "delta");
        over!(label_eps => objective.eps as "objective.eps", "label-eps");
        over!(alpha => objective.alpha as "objective.alpha", "alpha");
        over!(gamma => objective.gamma as "objective.gamma", "gamma");
        over!(lr => optimizer.lr as "optimizer.lr", "lr");
        over!(adam_beta1 => optimizer.beta1 as "optimizer.beta1", "adam-beta1");
        over!(adam_beta2 => optimizer.beta2 as "optimizer.beta2", "adam-beta2");
        over!(adam_eps => optimizer.eps as "optimizer.eps", "adam-eps");
        over!(weight_decay => optimizer.weight_decay as "optimizer.weight_decay", "weight-decay");
        over!(grad_clip => optimizer.grad_clip as "optimizer.grad_clip", "grad-clip");
        over!(warmup_steps => optimizer.warmup_steps as "optimizer.warmup_steps", "warmup-steps");
        over!(min_lr_ratio => optimizer.min_lr_ratio as "optimizer.min_lr_ratio", "min-lr-ratio");
        over!(tokens_per_batch => batching.tokens_per_micro_batch as "batching.tokens_per_micro_batch", "tokens-per-batch");
        over!(grad_accum => batching.grad_accum as "batching.grad_accum", "grad-accum");
        over!(log_every => intervals.log_every as "intervals.log_every", "log-every");
        over!(eval_every => intervals.eval_every as "intervals.eval_every", "eval-every");
        over!(checkpoint_every => intervals.checkpoint_every as "intervals.checkpoint_every", "checkpoint-every");
        over!(keep_checkpoints => intervals.keep_checkpoints as "intervals.keep_checkpoints", "keep-checkpoints");
        // A length flag replaces the file's choice between steps and epochs.
        if let Some(steps) = self.total_steps {
            cfg.optimizer.total_steps = Some(steps);
            cfg.optimizer.epochs = None;
            set.push(("optimizer.total_steps", "total-steps"));
        }
        if let Some(epochs) = self.epochs {
            cfg.optimizer.epochs = Some(epochs);
            if self.total_steps.is_none() {
                cfg.optimizer.total_steps = None;
            }
            set.push(("optimizer.epochs", "epochs"));
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let cfg = RunConfig::default();
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        let text = cfg.to_toml().unwrap();
        let back = RunConfig::from_toml_str(&text, Path::new("x.toml")).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn vocab_size_of_a_random_init() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunOverrides,
        }
        use clap::Parser;
        // Absent: the tokenizer's vocabulary, and nothing in the serialised forms (old hashes hold).
        let cfg = RunConfig::resolve(&Cli::parse_from(["x"]).run).unwrap();
        assert_eq!(cfg.model.vocab_size, None);
        assert_eq!(cfg.model.random_shape(258).vocab_size, 258);
        assert!(serde_json::to_value(&cfg.model).unwrap().get("vocab_size").is_none());
        assert!(!cfg.to_toml().unwrap().contains("vocab_size"));

        // The flag: the random init gets it, the hash changes, TOML round-trips.
        let cli = Cli::parse_from(["x", "--vocab-size", "50257"]);
        let big = RunConfig::resolve(&cli.run).unwrap();
        assert_eq!(big.model.vocab_size, Some(50257));
        assert_eq!(big.model.random_shape(258).vocab_size, 50257);
        assert_ne!(big.trajectory_hash(), cfg.trajectory_hash());
        let back = RunConfig::from_toml_str(&big.to_toml().unwrap(), Path::new("x.toml")).unwrap();
        assert_eq!(back, big);
        let from_file = RunConfig::from_toml_str("[model]\nvocab_size = 1000\n", Path::new("y.toml")).unwrap();
        assert_eq!(from_file.model.random_shape(258).vocab_size, 1000);

        // Out of range: named with the flag it came from.
        let err = RunConfig::resolve(&Cli::parse_from(["x", "--vocab-size", "1"]).run).unwrap_err().to_string();
        assert!(err.contains("model.vocab_size") && err.contains("--vocab-size"), "{err}");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
