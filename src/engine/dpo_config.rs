//! Training from a TRL-style `DPOConfig`: its keys (`beta`, `loss_type`, `learning_rate`,
//! `num_train_epochs`, `per_device_train_batch_size`, `output_dir`, …) mapped onto the run
//! configuration as README's DPOConfig table says, plus safedpo's own keys (the safety margin, the
//! data and model paths, any setting by its TOML path). The Python module's `safedpo.train(config)`
//! is this, from a dict.
//!
//! ```no_run
//! use serde_json::json;
//!
//! let config = json!({
//!     "beta": 0.1, "loss_type": "sigmoid", "learning_rate": 1e-6, "num_train_epochs": 1,
//!     "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "max_length": 512,
//!     "output_dir": "runs/dpo", "model_name_or_path": "models/sft", "data_path": "pku_train.jsonl",
//! });
//! let summary = safedpo::engine::train_dpo_config(config.as_object().unwrap())?;
//! println!("{} steps, checkpoint {:?}", summary.total_steps, summary.last_checkpoint);
//! # anyhow::Ok(())
//! ```

use anyhow::{bail, Result};
use serde_json::{Map, Value};

use crate::config::cli::{resolve_adjusted, Training, KEYS};
use crate::config::model_dir::adopt_init_settings;
use crate::config::RunOverrides;
use crate::train::{self, Resume, RunSummary, Task, TrainOptions};
use crate::with_backend;

/// TRL's `DPOConfig` (and `TrainingArguments`) keys and the settings they set, README's table.
pub const DPO_CONFIG_KEYS: &[(&str, &str)] = &[
    ("beta", "objective.beta"),
    ("loss_type", "objective.name"),
    ("loss_weights", "objective.loss_weights"),
    ("label_smoothing", "objective.label_smoothing"),
    ("rpo_alpha", "objective.rpo_alpha"),
    ("f_divergence_type", "objective.f_divergence_type"),
    ("f_alpha_divergence_coef", "objective.f_alpha_divergence_coef"),
    ("use_weighting", "objective.use_weighting"),
    ("ld_alpha", "objective.ld_alpha"),
    ("sync_ref_model", "sync_ref_model"),
    ("ref_model_mixup_alpha", "ref_model_mixup_alpha"),
    ("ref_model_sync_steps", "ref_model_sync_steps"),
    ("precompute_ref_log_probs", "precompute_ref"),
    ("max_length", "data.max_len"),
    ("truncation_mode", "data.truncation_mode"),
    ("max_prompt_length", "data.max_prompt_length"),
    ("max_completion_length", "data.max_completion_length"),
    ("learning_rate", "optimizer.lr"),
    ("lr_scheduler_type", "optimizer.lr_scheduler_type"),
    ("warmup_ratio", "optimizer.warmup_ratio"),
    ("warmup_steps", "optimizer.warmup_steps"),
    ("per_device_train_batch_size", "batching.pairs_per_micro_batch"),
    ("gradient_accumulation_steps", "batching.grad_accum"),
    ("num_train_epochs", "optimizer.epochs"),
    ("max_steps", "optimizer.total_steps"),
    ("weight_decay", "optimizer.weight_decay"),
    ("adam_beta1", "optimizer.beta1"),
    ("adam_beta2", "optimizer.beta2"),
    ("adam_epsilon", "optimizer.eps"),
    ("max_grad_norm", "optimizer.grad_clip"),
    ("seed", "seed"),
    ("gradient_checkpointing", "batching.gradient_checkpointing"),
    ("logging_steps", "intervals.log_every"),
    ("eval_steps", "intervals.eval_every"),
    ("save_steps", "intervals.checkpoint_every"),
    ("save_total_limit", "intervals.keep_checkpoints"),
    ("output_dir", "out_dir"),
];

/// safedpo's own short keys beside TRL's (any setting may also be given by its TOML path).
pub const OWN_KEYS: &[(&str, &str)] = &[
    ("delta", "objective.delta"),
    ("safety_margin", "objective.safety_margin"),
    ("model_name_or_path", "model.init"),
    ("ref_model", "model.reference"),
    ("data_path", "data.path"),
    ("eval_data_path", "data.eval_path"),
    ("data_format", "data.format"),
    ("template", "data.template"),
];

/// A `DPOConfig` read: the settings it gives and how the run starts.
#[derive(Clone, Debug, Default)]
pub struct DpoRun {
    /// The settings given, as `--set path=value` would give them.
    pub overrides: RunOverrides,
    /// How the run starts (`resume_from_checkpoint`, `overwrite_output_dir`); no progress bar.
    pub options: TrainOptions,
}

/// Reads a `DPOConfig`-style map. TRL's precedence holds where ours differs: `max_steps > 0` wins
/// over `num_train_epochs`, `warmup_steps > 0` over `warmup_ratio`, and TRL's "unset" values
/// (`max_steps = -1`, `None`) set nothing. `resume_from_checkpoint` (`true` or a directory) and
/// `overwrite_output_dir` say how the run starts; `padding_free = true` and `reference_free = false`
/// are what safedpo always does. Any other key is an error that names it.
pub fn read_dpo_config(config: &Map<String, Value>) -> Result<DpoRun> {
    let positive = |key: &str| config.get(key).and_then(Value::as_f64).is_some_and(|v| v > 0.0);
    let mut run = DpoRun::default();
    run.options.progress = false;
    for (key, value) in config {
        let skipped = value.is_null()
            || (key == "num_train_epochs" && positive("max_steps"))
            || (key == "max_steps" && !positive("max_steps"))
            || (key == "warmup_ratio" && positive("warmup_steps"))
            || (key == "warmup_steps" && !positive("warmup_steps") && config.contains_key("warmup_ratio"));
        if skipped {
            continue;
        }
        match (key.as_str(), value) {
            ("resume_from_checkpoint", Value::Bool(resume)) => run.options.resume = resume.then_some(Resume::Auto),
            ("resume_from_checkpoint", Value::String(dir)) => run.options.resume = Some(dir.parse()?),
            ("overwrite_output_dir", Value::Bool(overwrite)) => run.options.overwrite = *overwrite,
            ("padding_free", Value::Bool(true)) | ("reference_free", Value::Bool(false)) => {}
            ("padding_free", _) => bail!("padding_free: safedpo always packs sequences (padding_free = true)"),
            ("reference_free", _) => {
                bail!("reference_free: not supported (simpo, orpo and the CPO objectives need no reference)")
            }
            _ => {
                let path = setting_path(key)?;
                run.overrides = std::mem::take(&mut run.overrides).set(path, &setting_text(key, value)?);
            }
        }
    }
    Ok(run)
}

/// The setting a key names: TRL's, ours, or a TOML path.
fn setting_path(key: &str) -> Result<&str> {
    if let Some((_, path)) = DPO_CONFIG_KEYS.iter().chain(OWN_KEYS).find(|(name, _)| *name == key) {
        return Ok(path);
    }
    if let Some(known) = KEYS.iter().find(|k| k.path == key) {
        return Ok(&known.path);
    }
    let trl: Vec<&str> = DPO_CONFIG_KEYS.iter().map(|(name, _)| *name).collect();
    let own: Vec<&str> = OWN_KEYS.iter().map(|(name, _)| *name).collect();
    bail!(
        "unknown DPOConfig key `{key}`: the keys taken are TRL's {}; safedpo's {}; and any setting by its \
         path (`optimizer.lr`, `data.path`, …: `safedpo train --help`)",
        trl.join(", "),
        own.join(", ")
    )
}

/// A value as its flag would give it: lists joined by `,` (`loss_type = ["sigmoid", "sft"]`).
fn setting_text(key: &str, value: &Value) -> Result<String> {
    Ok(match value {
        Value::String(text) => text.clone(),
        Value::Bool(_) | Value::Number(_) => value.to_string(),
        Value::Array(items) => items.iter().map(|item| setting_text(key, item)).collect::<Result<Vec<_>>>()?.join(","),
        Value::Null | Value::Object(_) => bail!("{key}: expected a number, a string, a bool or a list, got {value}"),
    })
}

/// Preference training (or SFT, `task`) with the settings `overrides` gives over the defaults, the
/// CLI's `train` / `sft` (`model.init`'s directory supplies the settings left unset, as there).
pub fn train_with(overrides: &RunOverrides, task: Task, options: &TrainOptions) -> Result<RunSummary> {
    let cfg = resolve_adjusted::<Training>(overrides, adopt_init_settings)?.config;
    cfg.require_data()?;
    with_backend!(cfg.device, |backend| train::train(backend, &cfg, task, options))
}

/// Preference training from a `DPOConfig`-style map ([`read_dpo_config`]).
pub fn train_dpo_config(config: &Map<String, Value>) -> Result<RunSummary> {
    let run = read_dpo_config(config)?;
    train_with(&run.overrides, Task::Preference, &run.options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(value: Value) -> Result<DpoRun> {
        read_dpo_config(value.as_object().unwrap())
    }

    #[test]
    fn every_mapped_key_is_a_setting() {
        for (name, path) in DPO_CONFIG_KEYS.iter().chain(OWN_KEYS) {
            assert!(KEYS.iter().any(|k| k.path == *path), "{name} maps to {path}, which is no setting");
        }
    }

    #[test]
    fn trl_precedence_and_lists() {
        let run = read(json!({"num_train_epochs": 3, "max_steps": 5, "loss_type": ["sigmoid", "sft"],
            "warmup_ratio": 0.1, "warmup_steps": 0, "output_dir": "x"}))
        .unwrap();
        let given: Vec<(&str, &str)> =
            run.overrides.values.iter().map(|o| (o.key.as_str(), o.value.as_str())).collect();
        assert!(given.contains(&("optimizer.total_steps", "5")));
        assert!(given.contains(&("objective.name", "sigmoid,sft")));
        assert!(given.contains(&("optimizer.warmup_ratio", "0.1")));
        assert!(!given.iter().any(|(k, _)| *k == "optimizer.epochs" || *k == "optimizer.warmup_steps"));
        let run = read(json!({"max_steps": -1, "num_train_epochs": 2})).unwrap();
        assert_eq!(run.overrides.values.len(), 1);
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = read(json!({"beta": 0.1, "report_to": "wandb"})).unwrap_err().to_string();
        assert!(err.contains("unknown DPOConfig key `report_to`"), "{err}");
        assert!(read(json!({"padding_free": false})).is_err());
        assert!(read(json!({"optimizer.lr": 1e-6, "padding_free": true})).is_ok());
    }
}
