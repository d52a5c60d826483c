//! Run configuration: one definition of every setting (`settings!` in `settings`), read from TOML,
//! overridable from the command line with the same names (`cli`), validated with errors that name
//! the setting and where its value came from.
//!
//! Precedence, lowest to highest: the command's defaults (`RunConfig::default()` for `train`), the
//! TOML file given with `--config`, then the flags (`--optimizer.lr 1e-6`, or `--set
//! optimizer.lr=1e-6`). A flag always wins over the file.
//!
//! A complete file, every field optional (these are the defaults, except `data.path`):
//!
//! ```toml
//! seed = 42
//! out_dir = "runs/safedpo"
//! device = "auto"            # auto | cpu | cuda | emu
//! precompute_ref = true      # reference log-probs computed once and cached; the reference is dropped
//! sync_ref_model = false     # TR-DPO: every ref_model_sync_steps steps, reference = α·policy + (1 − α)·reference
//! ref_model_mixup_alpha = 0.6  # α (1: the policy's copy); needs precompute_ref = false
//! ref_model_sync_steps = 512 # τ
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
//! format = "auto"            # auto | pku-saferlhf | jsonl | unpaired (kto's prompt/completion/label rows)
//! selection = "safedpo"      # better | safer | safedpo
//! template = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"  # or "chat": the model's chat template
//! max_len = 512
//! # truncation_mode = "keep_start"   # or keep_end (TRL's); default prompt_then_responses
//! # max_prompt_length = 128; max_completion_length = 384   (TRL < 1.0's, applied before max_len)
//! eval_fraction = 0.05
//! skip_invalid = false
//! sft_safe_only = true       # sft: train only on chosen responses labelled safe
//!
//! [objective]                # names, parameters, defaults and bounds: `loss::Objective::ALL`
//! name = "safedpo"           # or any of `loss::Objective::NAMES` (dpo, ipo, …, cpo_simpo), or a
//!                            # list summed with loss_weights: ["sigmoid", "bco_pair", "sft"];
//!                            # or kto / apo_zero_unpaired (unpaired examples; desirable_weight,
//!                            # undesirable_weight; precompute_ref = false)
//! beta = 0.1
//! delta = 10.0               # safedpo only (the others: safety_margin); eps, alpha, gamma, tau, cpo_alpha
//! # loss_weights = [0.8, 0.2, 1.0]; rpo_alpha = 1.0; f_divergence_type = "js_divergence";
//! # f_alpha_divergence_coef = 0.5; bco_running_mean = true; ld_alpha = 0.5; use_weighting = true
//! #                          (TRL's modifiers: `loss::Combination`)
//!
//! [optimizer]
//! lr = 1e-5
//! beta1 = 0.9
//! beta2 = 0.999
//! eps = 1e-8
//! weight_decay = 0.0
//! grad_clip = 1.0            # 0 disables clipping
//! warmup_steps = 0          # or warmup_ratio = 0.1 (ceil(0.1 · steps), as transformers)
//! # lr_scheduler_type = "cosine_warmup_with_min_lr"   # or linear, cosine, constant, … (transformers')
//! epochs = 1.0               # or total_steps = 1000 (not both)
//! min_lr_ratio = 0.1
//!
//! [batching]
//! tokens_per_micro_batch = 8192
//! # pairs_per_micro_batch = 8  # exactly 8 pairs per micro-batch (TRL per_device_train_batch_size)
//! grad_accum = 1
//!
//! [intervals]
//! log_every = 1
//! eval_every = 100           # 0: only before the first and after the last step
//! checkpoint_every = 500     # 0: only the final checkpoint
//! keep_checkpoints = 0       # 0: keep all
//!
//! [train]
//! max_loss = 1e6             # a step's loss above this stops the run as diverged; inf: no bound
//! zero_stage = 0             # data parallel: 1 shards AdamW's state over the ranks (ZeRO-1)
//! grad_dtype = "auto"        # bf16 device: gradients in f32 (auto: when grad_accum > 1) or bf16
//! ```

// The command line's plumbing (flags, layers, origins): the CLI's, not an API.
#[doc(hidden)]
pub mod cli;
pub mod model_dir;
pub mod settings;
mod source;
pub(crate) mod validate;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use crate::backend::DeviceKind;
use crate::backend::RopeScaling;
pub use crate::data::DEFAULT_TEMPLATE;
use crate::data::{BatchLimit, DataFormat, PairSelection, Truncation, TruncationMode};
use crate::loss::Objective;
use crate::model::{DecoderConfig, Family, Rope};
use crate::optim::{GradDtype, LrSchedulerType};
pub use cli::{Evaluation, Generation, Origin, Override, Profile, Resolved, RunOverrides, SettingsArgs, Training};
pub use model_dir::{check_init_shape, ModelDirSettings, RUN_CONFIG_FILE};
use settings::settings;

settings! {
    /// `[model]`: where the policy and the reference come from.
    pub struct ModelConfig {
        /// HF model directory the policy starts from; absent: a random model of the shape below.
        pub init: Option<PathBuf> = None,
        /// HF model directory of the frozen reference; absent: the policy's initial weights.
        pub reference: Option<PathBuf> = None,
        /// Architecture of a random init: gpt2 | llama | mistral | qwen2 (ignored with `init`, whose
        /// config.json says).
        // Left out of the serialised form when GPT-2 (like every field added after the first
        // release), so that configurations and trajectory hashes written before it are unchanged.
        #[serde(skip_serializing_if = "Family::is_gpt2_ref")]
        pub arch: Family = Family::Gpt2,
        /// Transformer blocks of a random init (ignored with `init`).
        pub n_layer: usize = 4,
        /// Width of a random init.
        pub n_embd: usize = 128,
        /// Attention heads of a random init.
        pub n_head: usize = 4,
        /// Key/value heads of a random Llama-family init (grouped-query attention); absent: `n_head`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub n_kv_head: Option<usize> = None,
        /// MLP width of a random init; absent: 4·n_embd (GPT-2), 8/3·n_embd rounded up to a multiple
        /// of 8 (the Llama family's SwiGLU).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub intermediate_size: Option<usize> = None,
        /// RoPE base of a random Llama-family init; absent: 10000.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub rope_theta: Option<f64> = None,
        /// Tie the LM head to the token embedding in a random Llama-family init (GPT-2's always is).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub tie_word_embeddings: bool = false,
        /// Context length (position embeddings) of a random init.
        pub n_positions: usize = 512,
        /// Vocabulary of a random init; absent: the tokenizer's. A larger one (GPT-2's 50257) gives a
        /// model of a real tokenizer's shape on data from a smaller one, for timing and memory checks.
        // Left out of the serialised form when absent, so that configurations and trajectory
        // hashes written before the field existed are unchanged.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub vocab_size: Option<usize> = None,
    }
}

impl ModelConfig {
    /// The shape of a random init: `vocab_size` when set, else `tokenizer_vocab` (the
    /// tokenizer's). The trainer checks every token id of the data fits the vocabulary.
    pub fn random_shape(&self, tokenizer_vocab: usize) -> DecoderConfig {
        let vocab = self.vocab_size.unwrap_or(tokenizer_vocab);
        let (c, heads) = (self.n_embd, self.n_head);
        if self.arch.is_gpt2() {
            return DecoderConfig::gpt2(vocab, self.n_positions, c, self.n_layer, heads);
        }
        let mlp = self.intermediate_size.unwrap_or((8 * c).div_ceil(3).next_multiple_of(8));
        let kv = self.n_kv_head.unwrap_or(heads);
        let mut config = DecoderConfig::llama(vocab, self.n_positions, c, self.n_layer, heads, kv, mlp);
        config.family = self.arch;
        config.qkv_bias = self.arch == Family::Qwen2;
        config.tie_word_embeddings = self.tie_word_embeddings;
        if let Some(theta) = self.rope_theta {
            config.rope = Some(Rope { theta, scaling: RopeScaling::Default });
        }
        config
    }
}

settings! {
    /// `[data]`: the dataset and how pairs are built from it.
    pub struct DataConfig {
        /// Training data (JSONL).
        pub path: Option<PathBuf> = None,
        /// Separate evaluation data (JSONL); absent: `eval_fraction` of `path` is held out.
        pub eval_path: Option<PathBuf> = None,
        /// auto | pku-saferlhf | jsonl | unpaired (prompt/completion/label rows, for kto and
        /// apo_zero_unpaired, which also read pairs, unpaired).
        pub format: DataFormat = DataFormat::Auto,
        /// better | safer | safedpo (the better pairs through T(D)).
        pub selection: PairSelection = PairSelection::SafeDpo,
        /// Prompt template; `{prompt}` is replaced by the prompt. `chat`: the chat template of
        /// model.init's directory (its tokenizer_config.json or chat_template.jinja), as TRL applies it.
        /// Unset with a model that carries its run configuration (model.init; `--model`): the template
        /// it was trained with.
        pub template: String = DEFAULT_TEMPLATE.to_string(),
        /// Longest sequence (prompt + response) in tokens; longer pairs are truncated. Unset with a
        /// model directory (model.init; `--model`): its context, at most the length it was trained with
        /// (train and sft: at most the default).
        pub max_len: usize = 512,
        /// How a pair longer than max_len is cut: prompt_then_responses (the prompt's start first, down
        /// to 8 tokens, then the responses' ends), keep_start (TRL 1.x: each sequence keeps its first
        /// max_len tokens; a pair whose prompt fills max_len is dropped), keep_end (TRL: each sequence
        /// keeps its last max_len tokens, the prompt shared by the pair).
        #[serde(skip_serializing_if = "TruncationMode::is_default")]
        pub truncation_mode: TruncationMode = TruncationMode::default(),
        /// TRL < 1.0's max_prompt_length: the prompt keeps its last this many tokens, before max_len
        /// applies; absent: no limit.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_prompt_length: Option<usize> = None,
        /// TRL < 1.0's max_completion_length: each response keeps its first this many tokens, before
        /// max_len applies; absent: no limit.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_completion_length: Option<usize> = None,
        /// Fraction of the pairs held out for evaluation (when there is no `eval_path`).
        pub eval_fraction: f64 = 0.05,
        /// Skip malformed lines instead of failing on the first one.
        pub skip_invalid: bool = false,
        /// SFT trains only on chosen responses labelled safe; false: on every chosen response (a
        /// helpfulness-only SFT like the paper's Alpaca reference, which SafeDPO then aligns).
        pub sft_safe_only: bool = true,
    }
}

impl DataConfig {
    /// The truncation these settings ask for.
    pub fn truncation(&self) -> Truncation {
        Truncation {
            mode: self.truncation_mode,
            max_prompt_length: self.max_prompt_length,
            max_completion_length: self.max_completion_length,
            ..Truncation::new(self.max_len)
        }
    }
}

settings! {
    /// `[optimizer]`: AdamW, clipping and the learning-rate schedule.
    pub struct OptimizerConfig {
        /// Peak learning rate.
        pub lr: f32 = 1e-5,
        /// AdamW β1.
        pub beta1: f32 = 0.9,
        /// AdamW β2.
        pub beta2: f32 = 0.999,
        /// AdamW ε.
        pub eps: f32 = 1e-8,
        /// Decoupled weight decay (matrices and embeddings).
        pub weight_decay: f32 = 0.0,
        /// Global grad-norm clip; 0 disables it.
        pub grad_clip: f32 = 1.0,
        /// Linear warmup from 0 over this many steps.
        pub warmup_steps: usize = 0,
        /// Warmup as a fraction of the run's optimizer steps, in [0, 1): ceil(ratio · steps), as
        /// transformers computes it (TRL `warmup_ratio`; exclusive with `warmup_steps`).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub warmup_ratio: Option<f64> = None,
        /// The schedule, by transformers' `lr_scheduler_type` names: cosine_warmup_with_min_lr (ours:
        /// the peak at update warmup_steps, min_lr_ratio · lr at the last update), cosine_with_min_lr,
        /// linear, cosine, constant, constant_with_warmup (each as transformers computes it).
        #[serde(skip_serializing_if = "LrSchedulerType::is_default")]
        pub lr_scheduler_type: LrSchedulerType = LrSchedulerType::default(),
        /// Number of optimizer steps (exclusive with `epochs`; one replaces the other).
        pub total_steps: Option<usize> = None,
        /// Passes over the training pairs (exclusive with `total_steps`); absent: 1 epoch.
        pub epochs: Option<f64> = None,
        /// The cosine decay ends at `min_lr_ratio · lr` (cosine_warmup_with_min_lr and
        /// cosine_with_min_lr; transformers' `min_lr_rate`).
        pub min_lr_ratio: f32 = 0.1,
    }
}

impl OptimizerConfig {
    /// The warmup of a run of `total_steps` optimizer steps: `warmup_steps`, or with `warmup_ratio`
    /// `ceil(total_steps · ratio)` (transformers' `TrainingArguments.get_warmup_steps`).
    pub fn warmup_for(&self, total_steps: usize) -> usize {
        match self.warmup_ratio {
            Some(ratio) => (total_steps as f64 * ratio).ceil() as usize,
            None => self.warmup_steps,
        }
    }
}

settings! {
    /// `[batching]`: micro-batch size and gradient accumulation.
    pub struct BatchingConfig {
        /// Token budget of one packed micro-batch (chosen and rejected sequences together).
        pub tokens_per_micro_batch: usize = 8192,
        /// Pairs per micro-batch (TRL's `per_device_train_batch_size`): each micro-batch is exactly
        /// this many pairs in the epoch's order (the last of an epoch holds what is left), still
        /// packed; `tokens_per_micro_batch` then bounds them instead of cutting them (a run whose
        /// largest micro-batch is over it stops before training, naming it). Absent: micro-batches
        /// are cut by the token budget.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub pairs_per_micro_batch: Option<usize> = None,
        /// Micro-batches per optimizer step.
        pub grad_accum: usize = 1,
        /// LM head rows computed at once, by the policy and the reference: logits of `[rows, V]`
        /// instead of the whole micro-batch's; the policy's backward then recomputes each chunk's
        /// logits (one more head product per step). Absent: the policy's head runs whole, the
        /// reference's in chunks of 2048 rows.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub head_chunk_rows: Option<usize> = None,
        /// Activation checkpointing (TRL's `gradient_checkpointing`): the policy keeps each block's
        /// input and first norm only and its backward recomputes the rest of the block: about a
        /// third more compute for most of the activations' memory, the same gradients bit for bit.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub gradient_checkpointing: bool = false,
    }
}

impl BatchingConfig {
    /// What closes a training micro-batch: `pairs_per_micro_batch` pairs, else the token budget.
    pub fn limit(&self) -> BatchLimit {
        match self.pairs_per_micro_batch {
            Some(pairs) => BatchLimit::Pairs(pairs),
            None => BatchLimit::Tokens(self.tokens_per_micro_batch),
        }
    }
}

settings! {
    /// `[intervals]`: how often to log, evaluate and checkpoint, in optimizer steps.
    pub struct IntervalConfig {
        /// Steps between metrics records.
        pub log_every: usize = 1,
        /// Steps between evaluations; 0: only before the first step and after the last.
        pub eval_every: usize = 100,
        /// Steps between checkpoints; 0: only the final checkpoint.
        pub checkpoint_every: usize = 500,
        /// How many `checkpoint-<step>` directories to keep (oldest removed first); 0 keeps all.
        pub keep_checkpoints: usize = 0,
    }
}

settings! {
    /// `[train]`: when a run stops as diverged (a NaN or infinite loss, gradient norm or parameter
    /// always stops it), ZeRO-1, and where the gradients accumulate.
    pub struct TrainConfig {
        /// A step whose mean loss is above this stops the run as diverged, before anything of the
        /// step is written (`inf`: no bound). The default is far above any objective's loss at sane
        /// settings (IPO's (1/2β)² is 2.5e5 at β = 0.001), far below a blow-up's.
        pub max_loss: f64 = 1e6,
        /// Data-parallel runs (more than one rank): 0 keeps the whole AdamW state on every rank; 1
        /// (ZeRO stage 1) shards it, each parameter tensor's moments (and bf16 master weights) on
        /// one owner rank. The same update bit for bit; ignored by a run of one rank.
        pub zero_stage: usize = 0,
        /// Storage of the parameter gradients on a bf16 device: auto (f32 when grad_accum > 1, else
        /// bf16) | f32 | bf16. f32 adds every backward's and micro-batch's contribution in f32 (2 more
        /// bytes per parameter, no extra pass); an f32 device's gradients are f32 whatever this says.
        pub grad_dtype: GradDtype = GradDtype::Auto,
    }
}

impl TrainConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

settings! {
    /// `[lora]`: LoRA adapters as PEFT defines them, trained on the frozen policy (`r = 0`: every
    /// weight trains).
    pub struct LoraConfig {
        /// Rank of each adapter (PEFT's `r`); 0: no LoRA, full fine-tuning.
        pub r: usize = 0,
        /// PEFT's `lora_alpha`: an adapter's output is scaled by alpha / r.
        pub alpha: f64 = 8.0,
        /// PEFT module names, comma-separated: GPT-2 c_attn, c_proj (attn.c_proj, mlp.c_proj), c_fc;
        /// the Llama family q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; or
        /// all-linear. Empty: PEFT's default of the family (c_attn; q_proj,v_proj).
        pub target_modules: String = String::new(),
        /// PEFT's `lora_dropout`; must be 0 (dropout is not implemented).
        pub dropout: f64 = 0.0,
        /// rsLoRA: scale by alpha / √r.
        pub use_rslora: bool = false,
        /// A PEFT adapter directory to start from (its r, alpha and targets replace the ones above).
        pub adapter: Option<PathBuf> = None,
    }
}

impl LoraConfig {
    /// Whether the run trains LoRA adapters.
    pub fn enabled(&self) -> bool {
        self.r > 0 || self.adapter.is_some()
    }

    /// Whether every LoRA setting is at its default (LoRA off).
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// The target modules as a list (empty: the family's default).
    pub fn target_list(&self) -> Vec<String> {
        self.target_modules.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
    }
}

settings! {
    /// `[rm]`: the judge `safedpo rm` trains.
    pub struct RmConfig {
        /// reward (Bradley–Terry on the helpfulness order) | cost (on the safety order, plus the sign
        /// of each response's safety label).
        pub kind: String = String::from("reward"),
    }
}

impl RmConfig {
    /// Whether every setting is at its default.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

settings! {
    /// Everything a training run needs.
    pub struct RunConfig {
        /// Random seed (data order, holdout split, random init; `generate`: sampling).
        pub seed: u64 = 42,
        /// Output directory (metrics, checkpoints, final model).
        pub out_dir: PathBuf = PathBuf::from("runs/safedpo"),
        /// Where to run: auto | cpu | cuda | emu.
        pub device: DeviceKind = DeviceKind::Auto,
        /// Compute the reference log-probs once for the whole dataset, cache them on disk, and drop
        /// the reference model during training.
        pub precompute_ref: bool = true,
        /// TR-DPO (TRL `sync_ref_model`): every `ref_model_sync_steps` steps the reference becomes
        /// `ref_model_mixup_alpha · policy + (1 − α) · reference`. Needs precompute_ref = false.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        pub sync_ref_model: bool = false,
        /// TR-DPO's α, the policy's share of the synced reference (TRL's default 0.6; 1 copies the
        /// policy).
        #[serde(skip_serializing_if = "is_default_mixup_alpha")]
        pub ref_model_mixup_alpha: f64 = DEFAULT_MIXUP_ALPHA,
        /// TR-DPO's τ, optimizer steps between syncs (TRL's default 512).
        #[serde(skip_serializing_if = "is_default_sync_steps")]
        pub ref_model_sync_steps: usize = DEFAULT_SYNC_STEPS,
        pub model: ModelConfig = ModelConfig::default(),
        pub data: DataConfig = DataConfig::default(),
        /// `[objective]`: the preference objective and its parameters (see `loss::Objective::ALL`).
        pub objective: Objective = Objective::default(),
        pub optimizer: OptimizerConfig = OptimizerConfig::default(),
        pub batching: BatchingConfig = BatchingConfig::default(),
        pub intervals: IntervalConfig = IntervalConfig::default(),
        /// `[train]`: when a run stops as diverged (not part of the trajectory).
        // Left out of the serialised form at its defaults, so that configurations written before it
        // are unchanged.
        #[serde(skip_serializing_if = "TrainConfig::is_default")]
        pub train: TrainConfig = TrainConfig::default(),
        /// `[lora]`: LoRA adapters (PEFT's) instead of full fine-tuning.
        // Left out of the serialised form when off, so that configurations and trajectory hashes
        // written before it are unchanged.
        #[serde(skip_serializing_if = "LoraConfig::is_off")]
        pub lora: LoraConfig = LoraConfig::default(),
        /// `[rm]`: the judge `safedpo rm` trains (no other command reads it).
        // Left out of the serialised form at its default, as `[lora]`.
        #[serde(skip_serializing_if = "RmConfig::is_default")]
        pub rm: RmConfig = RmConfig::default(),
    }
}

/// TRL's `ref_model_mixup_alpha` default.
const DEFAULT_MIXUP_ALPHA: f64 = 0.6;
/// TRL's `ref_model_sync_steps` default.
const DEFAULT_SYNC_STEPS: usize = 512;

// Left out of the serialised form at their defaults (as every field added after the first
// release), so that configurations and trajectory hashes written before them are unchanged.
fn is_default_mixup_alpha(alpha: &f64) -> bool {
    *alpha == DEFAULT_MIXUP_ALPHA
}

fn is_default_sync_steps(steps: &usize) -> bool {
    *steps == DEFAULT_SYNC_STEPS
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
        if let Some((field, message)) = text.parse().ok().as_ref().and_then(source::objective_key_error) {
            let offset = source::field_offset(text, &field).unwrap_or(0);
            bail!("{}", source::describe_at(text, file, offset, Some(&field), &message));
        }
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", source::describe_toml_error(&e, text, file)))
    }

    /// Reads a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::from_toml_str(&text, path)
    }

    /// The defaults, then the `--config` file if any, then the flags; validated. Errors name the field
    /// and where its value came from (`file:line`, the flag, or the default).
    pub fn resolve(overrides: &RunOverrides) -> Result<Self> {
        Ok(cli::resolve::<Training>(overrides)?.config)
    }

    /// Checks the fields a training run needs beyond `validate` (a data path).
    pub fn require_data(&self) -> Result<&Path> {
        match &self.data.path {
            Some(p) => Ok(p),
            None => bail!("data.path: required (set `path` under [data] in the config, or pass --data.path)"),
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
        let mut key = serde_json::json!({
            "seed": self.seed,
            "precompute_ref": self.precompute_ref,
            "model": self.model,
            "data": self.data,
            "objective": self.objective,
            "optimizer": self.optimizer,
            "batching": self.batching,
        });
        if !self.lora.is_off() {
            key["lora"] = serde_json::json!(self.lora);
        }
        if self.sync_ref_model {
            key["ref_sync"] = serde_json::json!([self.ref_model_mixup_alpha, self.ref_model_sync_steps]);
        }
        let digest = Sha256::digest(key.to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The configuration as TOML (written next to every run's outputs).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).context("serialising the run configuration to TOML")
    }
}

#[cfg(test)]
mod tests;
