//! The run's setup that `train` reads as one step each: the policy (full, or a frozen base with
//! LoRA adapters), and the reference (a frozen model, the LoRA policy's base, its cached log-probs,
//! or none) with the eval pairs' reference log-probs; and the weights `eval`, `logps` and
//! `generate` run (a model directory, with `--lora.adapter` merged in).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use super::refcache::{cache_key, load_or_compute, sequence_logp_parts};
use super::refsync::RefSync;
use super::step::Reference;
use super::{CacheStatus, Console, PreparedData, ReferenceLogps, Task};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::{check_same_tokenizer, TextTokenizer, TokenizedPair};
use crate::model::checkpoint::LoadOptions;
use crate::model::decoder::random_weights;
use crate::model::peft::{load_adapter, read_adapter_spec};
use crate::model::{Decoder, HostAdapters, HostWeights, LoraSpec};

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

/// A LoRA policy's base log-probs (its adapters off) of `pairs`.
fn base_logp_parts<B: Backend>(
    policy: &mut Decoder<B>,
    pairs: &[TokenizedPair],
    budget: usize,
) -> Result<ReferenceLogps> {
    policy.set_adapters_enabled(false)?;
    let logps = sequence_logp_parts(policy, pairs, budget);
    policy.set_adapters_enabled(true)?;
    logps
}

/// The frozen base of a LoRA run: `model.init`, or the seed's random init (of `vocab` tokens when
/// `model.vocab_size` is unset). Read again for each checkpoint's merged model: exact on a device
/// that holds the frozen base in bf16.
pub(super) fn load_lora_base(cfg: &RunConfig, vocab: usize) -> Result<HostWeights> {
    match cfg.model.init.as_ref() {
        Some(dir) => {
            crate::model::checkpoint::load_dir(dir).with_context(|| format!("loading model.init {}", dir.display()))
        }
        None => random_weights(cfg.model.random_shape(vocab), cfg.seed),
    }
}

/// The weights of a model directory for inference (`eval`, `logps`, `generate`), with the PEFT
/// adapter `adapter` merged in when one is named: exactly the model `safedpo merge` writes (f32),
/// checked against the base as training checks `lora.adapter` (an adapter of another model is an
/// error naming the tensor). Merged rather than run as live adapters: these commands never need the
/// base with the adapters off on the same weights (the reference is loaded as a model of its own),
/// so one merge makes every forward and decoding step cost what the base's does, and the results are
/// those of the merged model bit for bit. LoRA dropout, which PEFT applies in training only, is
/// ignored here.
pub fn load_inference_weights(model: &Path, adapter: Option<&Path>, options: LoadOptions) -> Result<HostWeights> {
    let base = crate::model::checkpoint::load_dir_with(model, options)?;
    let Some(dir) = adapter else { return Ok(base) };
    let adapters = load_adapter(dir, &base.config).with_context(|| format!("lora.adapter {}", dir.display()))?;
    adapters
        .merge_into(&base)
        .with_context(|| format!("merging lora.adapter {} into {}", dir.display(), model.display()))
}

/// The policy: a checkpoint's weights, the initial model, or a random init; with `[lora]`, that base
/// (never a checkpoint's: the base is frozen) with the checkpoint's adapters, `lora.adapter`'s, or
/// fresh ones.
pub(super) fn build_policy<B: Backend>(
    backend: &Arc<B>,
    cfg: &RunConfig,
    resume_from: Option<&Path>,
    tokenizer_vocab: usize,
) -> Result<Decoder<B>> {
    let init = cfg.model.init.as_ref();
    if !cfg.lora.enabled() {
        return match (resume_from, init) {
            (Some(dir), _) => Decoder::load(backend.clone(), dir),
            (None, Some(dir)) => {
                Decoder::load(backend.clone(), dir).with_context(|| format!("loading model.init {}", dir.display()))
            }
            (None, None) => Decoder::random(backend.clone(), cfg.model.random_shape(tokenizer_vocab), cfg.seed),
        };
    }
    let base = load_lora_base(cfg, tokenizer_vocab)?;
    let adapters = match (resume_from, &cfg.lora.adapter) {
        (Some(dir), _) => load_adapter(dir, &base.config)?,
        (None, Some(dir)) => {
            let (_, dropout) = read_adapter_spec(dir)?;
            ensure!(
                dropout == 0.0,
                "lora.adapter {}: lora_dropout is {dropout}; LoRA dropout is not implemented (training needs 0)",
                dir.display()
            );
            load_adapter(dir, &base.config)?
        }
        (None, None) => {
            let l = &cfg.lora;
            let targets = l.target_list();
            let target_modules = if targets.is_empty() { LoraSpec::default_targets(&base.config) } else { targets };
            let spec = LoraSpec { r: l.r, alpha: l.alpha, target_modules, use_rslora: l.use_rslora };
            HostAdapters::init(&base.config, spec, cfg.seed)?
        }
    };
    Decoder::with_lora(backend.clone(), &base, adapters)
}

/// The reference of a run, and what comes with it.
pub(super) struct ReferenceSetup<B: Backend> {
    pub(super) reference: Reference<B>,
    /// Reference log-probs of the eval pairs `[2E]`.
    pub(super) eval_reference: ReferenceLogps,
    /// Whether the cached reference log-probs were found (`precompute_ref`).
    pub(super) reference_cache: Option<CacheStatus>,
    /// TR-DPO's reference sync (`sync_ref_model`).
    pub(super) ref_sync: Option<RefSync>,
}

/// The reference: cached log-probs (the model dropped), or the frozen model, or none for SFT and
/// the reference-free objectives.
#[allow(clippy::too_many_arguments)]
pub(super) fn setup_reference<B: Backend>(
    backend: &Arc<B>,
    cfg: &RunConfig,
    task: Task,
    data: &PreparedData,
    policy: &mut Decoder<B>,
    resume_from: Option<&Path>,
    tokenizer: &dyn TextTokenizer,
    console: &Console,
) -> Result<ReferenceSetup<B>> {
    let out = &cfg.out_dir;
    let vocab = policy.config().vocab_size;
    let budget = cfg.batching.tokens_per_micro_batch;
    let objective = &cfg.objective;
    let mut reference_cache = None;
    let mut ref_sync = None;
    ensure!(task == Task::Preference || !cfg.sync_ref_model, "sync_ref_model: {} trains no reference", task.name());
    let (reference, eval_reference) = if task == Task::Sft || !objective.uses_reference() {
        (Reference::Free, ReferenceLogps::totals(vec![0.0; 2 * data.eval.len()]))
    } else {
        if let Some(dir) = &cfg.model.reference {
            check_same_tokenizer(tokenizer, cfg.model.init.as_deref(), dir)?;
        }
        let ref_weights = match &resume_from {
            // TR-DPO: the reference the checkpoint's run had synced to.
            Some(dir) if cfg.sync_ref_model => RefSync::load(dir)?,
            _ => load_reference_weights(cfg, vocab)?,
        };
        ensure!(
            ref_weights.config.same_architecture(policy.config()),
            "the reference model ({}) differs from the policy ({})",
            ref_weights.config.summary(),
            policy.config().summary()
        );
        // A LoRA policy's reference is its own base (adapters off), unless another is named (or
        // the unpaired step, which runs a reference model of its own, needs one).
        let base_is_reference =
            policy.has_adapters() && cfg.model.reference.is_none() && objective.as_unpaired().is_none();
        let mut ref_model =
            if base_is_reference { None } else { Some(Decoder::from_host_frozen(backend.clone(), &ref_weights)?) };
        if let (Some(rows), Some(model)) = (cfg.batching.head_chunk_rows, ref_model.as_mut()) {
            model.set_head_chunk_rows(rows)?;
        }
        let mut logps_of = |pairs: &[TokenizedPair]| match ref_model.as_mut() {
            Some(model) => sequence_logp_parts(model, pairs, budget),
            None => base_logp_parts(policy, pairs, budget),
        };
        if cfg.precompute_ref {
            let key = cache_key(&ref_weights, &[("train", &data.train), ("eval", &data.eval)], &cfg.data.template);
            let path = out.join("reference_logps.safetensors");
            let t0 = Instant::now();
            let (mut sets, status) =
                load_or_compute(&path, &key, &[("train", data.train.len()), ("eval", data.eval.len())], || {
                    Ok(vec![logps_of(&data.train)?, logps_of(&data.eval)?])
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
            let eval = logps_of(&data.eval)?;
            if cfg.sync_ref_model {
                let (alpha, every) = (cfg.ref_model_mixup_alpha, cfg.ref_model_sync_steps);
                ref_sync = Some(RefSync { alpha, every, weights: ref_weights });
            }
            match ref_model {
                Some(model) => (Reference::Model(Box::new(model)), eval),
                None => (Reference::PolicyBase, eval),
            }
        }
    };

    Ok(ReferenceSetup { reference, eval_reference, reference_cache, ref_sync })
}
