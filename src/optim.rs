//! Optimizers (AdamW with fp32 state, plain SGD), global grad-norm clipping, and the learning-rate
//! schedules: ours (linear warmup, then cosine decay to a floor) and transformers' by their
//! `lr_scheduler_type` names ([`LrSchedulerType`], [`Scheduler`]).
//!
//! The update itself is one backend call over every parameter tensor (`Backend::adamw_tensors`,
//! `Backend::sgd_tensors`: one launch on a device, the same bits as a call per tensor); this module owns the optimizer state, decides which tensors are weight-decayed, folds gradient
//! clipping into the update as a `grad_scale`, and moves the state to and from checkpoints. Where
//! the gradients it reads accumulate (bf16 or f32 storage on a bf16 backend): [`GradDtype`].

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::{AdamWParams, AdamWTensor, Backend, SgdTensor};
use crate::model::Decoder;

mod grad_dtype;
pub use grad_dtype::{set_grad_dtype, store_grads_in_f32, GradDtype};

/// AdamW hyper-parameters. `lr` is the default learning rate; `AdamW::step` takes the one to use
/// (usually `LrSchedule::lr`), so a schedule never has to mutate the optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (Loshchilov & Hutter), applied only where `decays_weight` says.
    pub weight_decay: f32,
}

impl AdamWConfig {
    /// Checks the hyper-parameters: all finite, `lr ≥ 0`, `β1, β2 ∈ [0, 1)`, `eps > 0`,
    /// `weight_decay ≥ 0`.
    pub fn validate(&self) -> Result<()> {
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = *self;
        for (name, value) in
            [("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay)]
        {
            ensure!(value.is_finite(), "adamw: {name} = {value} is not finite");
        }
        ensure!(lr >= 0.0, "adamw: lr = {lr} must be >= 0");
        ensure!((0.0..1.0).contains(&beta1), "adamw: beta1 = {beta1} must be in [0, 1)");
        ensure!((0.0..1.0).contains(&beta2), "adamw: beta2 = {beta2} must be in [0, 1)");
        ensure!(eps > 0.0, "adamw: eps = {eps} must be > 0");
        ensure!(weight_decay >= 0.0, "adamw: weight_decay = {weight_decay} must be >= 0");
        Ok(())
    }
}

/// Whether the parameter called `name` (as `DecoderConfig::parameter_shapes` names it) gets weight
/// decay: the matrices and the embeddings (`wte.weight`, `h.N.attn.c_attn.weight`,
/// `embed_tokens.weight`, `layers.N.self_attn.qkv_proj.weight`, `lm_head.weight`, …), i.e. names
/// ending in `weight` that are not norm gains (GPT-2's `ln_1`, `ln_2`, `ln_f`; the Llama family's
/// `input_layernorm`, `post_attention_layernorm`, `norm`). Biases and norm parameters are not
/// decayed. This is the GPT-2 / nanoGPT convention (nanoGPT decays every tensor of rank ≥ 2, which
/// for these models is exactly this set) and the `transformers` Trainer's (no decay for biases and
/// norms).
pub fn decays_weight(name: &str) -> bool {
    let is_norm = name.split('.').any(|part| part.starts_with("ln_") || part == "norm" || part.ends_with("layernorm"));
    name.ends_with("weight") && !is_norm
}

/// One parameter tensor's AdamW state.
struct Slot<B: Backend> {
    /// The tensor's position in the model's parameter list.
    index: usize,
    name: String,
    len: usize,
    decay: bool,
    /// First moment, fp32, same length as the parameter.
    m: B::Buf,
    /// Second moment, fp32.
    v: B::Buf,
}

/// AdamW (decoupled weight decay, bias-corrected moments) with its fp32 state on the backend.
pub struct AdamW<B: Backend> {
    backend: Arc<B>,
    cfg: AdamWConfig,
    slots: Vec<Slot<B>>,
    /// Every parameter name of the model, in order (the slots may hold a subset: a ZeRO shard).
    model_names: Vec<String>,
    /// Number of steps taken; the next step is `step + 1` (1-based, for bias correction).
    step: u32,
}

/// Key under which `AdamW::state_to_host` stores the step count (one f32, exact up to 2²⁴ steps).
pub const STEP_KEY: &str = "step";

impl<B: Backend> AdamW<B> {
    /// Zeroed state for every parameter of `model`, in the model's order.
    ///
    /// Takes the model mutably only to read the parameter names and sizes from
    /// `Decoder::params_and_grads_mut` (the model's one listing of named parameters); nothing is
    /// changed.
    pub fn new(model: &mut Decoder<B>, cfg: AdamWConfig) -> Result<Self> {
        Self::for_tensors(model, cfg, &|_| true)
    }

    /// State only for the model's parameter tensors whose index `keep` accepts (a data-parallel
    /// rank's ZeRO-1 shard); `step` updates only those, and `state_to_host` holds only theirs.
    pub fn for_tensors(model: &mut Decoder<B>, cfg: AdamWConfig, keep: &dyn Fn(usize) -> bool) -> Result<Self> {
        cfg.validate()?;
        let backend = model.backend().clone();
        let mut slots = Vec::new();
        let mut model_names = Vec::new();
        for (index, (name, param, grad)) in model.params_and_grads_mut()?.into_iter().enumerate() {
            model_names.push(name.to_string());
            let len = backend.buf_len(param);
            ensure!(
                backend.buf_len(grad) == len,
                "adamw: gradient of {name} has {} elements, the parameter {len}",
                backend.buf_len(grad)
            );
            if !keep(index) {
                continue;
            }
            let m = backend.zeros(len).with_context(|| format!("adamw: allocating m for {name} ({len} floats)"))?;
            let v = backend.zeros(len).with_context(|| format!("adamw: allocating v for {name} ({len} floats)"))?;
            slots.push(Slot { index, name: name.to_string(), len, decay: decays_weight(name), m, v });
        }
        Ok(Self { backend, cfg, slots, model_names, step: 0 })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> u32 {
        self.step
    }

    /// The parameter names the state is kept for, in order, with whether each is weight-decayed.
    pub fn decay_plan(&self) -> Vec<(&str, bool)> {
        self.slots.iter().map(|slot| (slot.name.as_str(), slot.decay)).collect()
    }

    /// One AdamW update of every parameter at learning rate `lr`, each gradient multiplied by
    /// `grad_scale` first (clipping, see `clip_scale`; gradient-accumulation averaging).
    pub fn step(&mut self, model: &mut Decoder<B>, lr: f32, grad_scale: f32) -> Result<()> {
        ensure!(lr.is_finite() && lr >= 0.0, "adamw: learning rate {lr} must be finite and >= 0");
        ensure!(grad_scale.is_finite(), "adamw: grad_scale {grad_scale} is not finite");
        ensure!(
            Arc::ptr_eq(model.backend(), &self.backend),
            "adamw: the model is on another backend than the optimizer state"
        );
        let backend = self.backend.clone();
        let params = model.params_and_grads_mut()?;
        ensure!(
            params.len() == self.model_names.len(),
            "adamw: the model has {} parameter tensors, the optimizer state {}",
            params.len(),
            self.model_names.len()
        );
        // Check every tensor before touching any, so that a mismatch leaves the model as it was.
        for slot in &self.slots {
            let (name, param, grad) = &params[slot.index];
            ensure!(*name == slot.name, "adamw: parameter {name} where the optimizer state has {}", slot.name);
            ensure!(
                backend.buf_len(param) == slot.len && backend.buf_len(grad) == slot.len,
                "adamw: {name} has {} elements (gradient {}), the optimizer state {}",
                backend.buf_len(param),
                backend.buf_len(grad),
                slot.len
            );
        }
        let step = self.step + 1;
        let hyper = AdamWParams {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step,
            grad_scale,
        };
        // Every kept tensor in one call (one launch on a device), weight decay where the slot says.
        let mut tensors = Vec::with_capacity(self.slots.len());
        let mut slots = self.slots.iter_mut().peekable();
        for (index, (_, param, grad)) in params.into_iter().enumerate() {
            let Some(slot) = slots.next_if(|slot| slot.index == index) else { continue };
            tensors.push(AdamWTensor { param, grad, m: &mut slot.m, v: &mut slot.v, decay: slot.decay });
        }
        backend.adamw_tensors(&mut tensors, &hyper).context("adamw")?;
        self.step = step;
        Ok(())
    }

    /// The state on the host, for checkpoints: `m.<param name>` and `v.<param name>` for every
    /// parameter, and `step` (`STEP_KEY`) holding the step count as one f32.
    pub fn state_to_host(&self) -> Result<BTreeMap<String, Vec<f32>>> {
        let mut state = BTreeMap::new();
        for slot in &self.slots {
            for (moment, buf) in [("m", &slot.m), ("v", &slot.v)] {
                let host =
                    self.backend.download(buf).with_context(|| format!("adamw: downloading {moment}.{}", slot.name))?;
                state.insert(format!("{moment}.{}", slot.name), host);
            }
        }
        state.insert(STEP_KEY.to_string(), vec![self.step as f32]);
        Ok(state)
    }

    /// Restores the state written by `state_to_host`, after `step` steps. Every `m.`/`v.` tensor
    /// must be present with the parameter's length and finite values; unknown keys are an error (a
    /// checkpoint of a different model). A `step` entry, where present, must agree with `step`.
    /// Nothing is changed unless the whole state is valid.
    pub fn load_state(&mut self, state: &BTreeMap<String, Vec<f32>>, step: u32) -> Result<()> {
        if let Some(saved) = state.get(STEP_KEY) {
            ensure!(
                saved.len() == 1 && saved[0] == step as f32,
                "adamw state: {STEP_KEY} = {saved:?} disagrees with the step {step} being restored"
            );
        }
        let mut expected = 0;
        for slot in &self.slots {
            for moment in ["m", "v"] {
                let key = format!("{moment}.{}", slot.name);
                let data = state.get(&key).with_context(|| format!("adamw state: missing tensor {key}"))?;
                ensure!(
                    data.len() == slot.len,
                    "adamw state: {key} has {} elements, the parameter {}",
                    data.len(),
                    slot.len
                );
                if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                    bail!("adamw state: {key}[{i}] = {} is not finite", data[i]);
                }
                expected += 1;
            }
        }
        let known = expected + usize::from(state.contains_key(STEP_KEY));
        if state.len() != known {
            let unknown: Vec<&str> = state
                .keys()
                .map(String::as_str)
                .filter(|key| {
                    *key != STEP_KEY
                        && !self.model_names.iter().any(|name| {
                            key.strip_prefix("m.").or_else(|| key.strip_prefix("v.")) == Some(name.as_str())
                        })
                })
                .collect();
            // A shard's state (`for_tensors`) skips the other tensors of the model.
            ensure!(unknown.is_empty(), "adamw state: tensors for no parameter of this model: {}", unknown.join(", "));
        }
        let mut loaded = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let upload = |moment: &str| {
                let key = format!("{moment}.{}", slot.name);
                self.backend.upload(&state[&key]).with_context(|| format!("adamw: uploading {key}"))
            };
            loaded.push((upload("m")?, upload("v")?));
        }
        for (slot, (m, v)) in self.slots.iter_mut().zip(loaded) {
            slot.m = m;
            slot.v = v;
        }
        self.step = step;
        Ok(())
    }
}

/// One plain SGD step on every parameter: `param −= lr · grad_scale · grad`. No momentum, no
/// weight decay (a baseline and a test oracle).
pub fn sgd_step<B: Backend>(model: &mut Decoder<B>, lr: f32, grad_scale: f32) -> Result<()> {
    ensure!(lr.is_finite(), "sgd: learning rate {lr} is not finite");
    ensure!(grad_scale.is_finite(), "sgd: grad_scale {grad_scale} is not finite");
    let backend = model.backend().clone();
    let mut tensors: Vec<SgdTensor<'_, B::Buf>> =
        model.params_and_grads_mut()?.into_iter().map(|(_, param, grad)| SgdTensor { param, grad }).collect();
    backend.sgd_tensors(&mut tensors, lr, grad_scale).context("sgd")
}

/// Global grad norm; returns `(norm, scale)` with `scale = min(1, max_norm / (norm + 1e-6))`, or 1
/// when `max_norm <= 0` (no clipping). Pass `scale` as the optimizer's `grad_scale`, so that clipping
/// costs no extra pass over the gradients.
///
/// A non-finite norm (overflowed or NaN gradients) is returned as is, with scale 1: the caller
/// decides whether to skip the step or stop, and must check `norm.is_finite()`.
pub fn clip_scale<B: Backend>(model: &Decoder<B>, max_norm: f32) -> Result<(f32, f32)> {
    let sum_squares = model.backend().sum_squares(&model.grads()?).context("global grad norm")?;
    Ok(clip_scale_of(sum_squares, max_norm))
}

/// `(norm, scale)` as [`clip_scale`] gives them, from the gradients' sum of squares (a data-parallel
/// group adds its ranks' parts).
pub fn clip_scale_of(sum_squares: f64, max_norm: f32) -> (f32, f32) {
    let norm = sum_squares.sqrt() as f32;
    let scale = if max_norm > 0.0 && norm.is_finite() { (max_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
    (norm, scale)
}

/// Learning rate by step: linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine decay
/// to `min_lr_ratio · peak_lr` at `total_steps`, constant after.
///
/// `step` is the 1-based number of the update about to be made (`AdamW::step_count() + 1`), so the
/// first update uses `peak_lr / warmup_steps`, update `warmup_steps` the peak, and update
/// `total_steps` the minimum; `lr(0) = 0` is where the warmup line starts. Without warmup
/// (`warmup_steps = 0`) the decay starts from the peak at step 0. When `total_steps ≤ warmup_steps`
/// there is no decay phase: the rate stays at the peak after the warmup.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub peak_lr: f32,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub min_lr_ratio: f32,
}

impl LrSchedule {
    /// A constant learning rate.
    pub fn constant(lr: f32) -> Self {
        Self { peak_lr: lr, warmup_steps: 0, total_steps: 0, min_lr_ratio: 1.0 }
    }

    /// Checks `peak_lr` finite and ≥ 0 and `min_lr_ratio ∈ [0, 1]`.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.peak_lr.is_finite() && self.peak_lr >= 0.0,
            "lr schedule: peak_lr = {} must be finite and >= 0",
            self.peak_lr
        );
        ensure!(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "lr schedule: min_lr_ratio = {} must be in [0, 1]",
            self.min_lr_ratio
        );
        Ok(())
    }

    pub fn lr(&self, step: usize) -> f32 {
        let peak = f64::from(self.peak_lr);
        if step < self.warmup_steps {
            return (peak * step as f64 / self.warmup_steps as f64) as f32;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 {
            return self.peak_lr;
        }
        let min = peak * f64::from(self.min_lr_ratio);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (min + (peak - min) * cosine) as f32
    }
}

/// A learning-rate schedule by its transformers name (`TrainingArguments.lr_scheduler_type`).
///
/// transformers' schedules are `LambdaLR` multipliers of the peak rate, and the `Trainer` steps the
/// scheduler after each optimizer step, so update `k` (1-based) runs at `lr · λ(k − 1)`: the first
/// update of a warmup runs at rate 0, and the last one of `linear` and `cosine` one step short of the
/// end. [`LrSchedulerType::multiplier`] is `λ`, written as transformers writes it (the same f64
/// operations in the same order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Ours, the default ([`LrSchedule`]): linear warmup reaching the peak at update `warmup_steps`,
    /// then cosine decay reaching `min_lr_ratio · lr` at the last update. transformers'
    /// `cosine_warmup_with_min_lr` (`min_lr_rate = min_lr_ratio`) is the same schedule: its λ counts
    /// from `current_step + 1`; the rates agree to the last bit of f32 but for rounding (ours forms
    /// `min + (peak − min)·c`, transformers `peak·(c·(1 − r) + r)`).
    #[default]
    CosineWarmupWithMinLr,
    /// transformers' `cosine_with_min_lr` (`min_lr_rate = min_lr_ratio`): ours one update later.
    CosineWithMinLr,
    /// Linear warmup, then linear decay to 0 (transformers' default).
    Linear,
    /// Linear warmup, then cosine decay to 0 (half a cycle).
    Cosine,
    /// The peak rate throughout (no warmup, whatever `warmup_steps` says, as transformers).
    Constant,
    /// Linear warmup, then the peak rate.
    ConstantWithWarmup,
}

impl LrSchedulerType {
    /// Every type, in the order of the docs.
    pub const ALL: [LrSchedulerType; 6] = [
        LrSchedulerType::CosineWarmupWithMinLr,
        LrSchedulerType::CosineWithMinLr,
        LrSchedulerType::Linear,
        LrSchedulerType::Cosine,
        LrSchedulerType::Constant,
        LrSchedulerType::ConstantWithWarmup,
    ];

    /// transformers' name.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedulerType::CosineWarmupWithMinLr => "cosine_warmup_with_min_lr",
            LrSchedulerType::CosineWithMinLr => "cosine_with_min_lr",
            LrSchedulerType::Linear => "linear",
            LrSchedulerType::Cosine => "cosine",
            LrSchedulerType::Constant => "constant",
            LrSchedulerType::ConstantWithWarmup => "constant_with_warmup",
        }
    }

    /// Whether `self == Default::default()` (serde: the default is left out of saved configurations).
    pub fn is_default(&self) -> bool {
        *self == LrSchedulerType::default()
    }

    /// transformers' multiplier `λ(current_step)` (0-based: the scheduler's `last_epoch`) for a run of
    /// `total` updates with `warmup` warmup updates, `min_lr_rate` the floor of the `*_min_lr` types.
    /// Each arm is the matching `_get_*_lr_lambda` of `transformers/optimization.py` (5.x), with
    /// `num_cycles = 0.5`.
    pub fn multiplier(self, current_step: usize, warmup: usize, total: usize, min_lr_rate: f64) -> f64 {
        let (step, warmup, total) = (current_step as i64, warmup as i64, total as i64);
        let warming = |s: i64| s as f64 / warmup.max(1) as f64;
        let progress = |s: i64| (s - warmup) as f64 / (total - warmup).max(1) as f64;
        // `0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))`
        let half_cosine = |p: f64| 0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * p).cos());
        match self {
            LrSchedulerType::Constant => 1.0,
            LrSchedulerType::CosineWarmupWithMinLr => {
                // `_get_cosine_with_min_lr_schedule_with_warmup_lr_rate_lambda`, `warmup_lr_rate=None`:
                // every count in floats, shifted by one.
                let (step, warmup, total) = (step as f64, warmup as f64, total as f64);
                if step < warmup {
                    return (step + 1.0) / warmup.max(1.0);
                }
                let progress = (step - warmup + 1.0) / (total - warmup).max(1.0);
                (half_cosine(progress) * (1.0 - min_lr_rate) + min_lr_rate).max(0.0)
            }
            _ if step < warmup => warming(step),
            LrSchedulerType::ConstantWithWarmup => 1.0,
            LrSchedulerType::Linear => (0.0f64).max((total - step) as f64 / (total - warmup).max(1) as f64),
            LrSchedulerType::Cosine => (0.0f64).max(half_cosine(progress(step))),
            LrSchedulerType::CosineWithMinLr => {
                (half_cosine(progress(step)) * (1.0 - min_lr_rate) + min_lr_rate).max(0.0)
            }
        }
    }
}

impl std::fmt::Display for LrSchedulerType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LrSchedulerType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .with_context(|| format!("unknown lr_scheduler_type `{s}`: expected one of {}", names.join(", ")))
    }
}

/// The learning rate of every update of a run: a [`LrSchedulerType`] over an [`LrSchedule`]'s peak,
/// warmup, length and floor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scheduler {
    pub kind: LrSchedulerType,
    pub schedule: LrSchedule,
}

impl Scheduler {
    /// The rate of update `update` (1-based, as [`LrSchedule::lr`]): ours by [`LrSchedule::lr`]
    /// (unchanged, so that runs stay bit-identical), transformers' as `peak · λ(update − 1)` rounded
    /// once to f32.
    pub fn lr(&self, update: usize) -> f32 {
        let s = &self.schedule;
        match self.kind {
            LrSchedulerType::CosineWarmupWithMinLr => s.lr(update),
            kind => {
                let lambda =
                    kind.multiplier(update.saturating_sub(1), s.warmup_steps, s.total_steps, f64::from(s.min_lr_ratio));
                (f64::from(s.peak_lr) * lambda) as f32
            }
        }
    }
}
