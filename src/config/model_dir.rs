//! The settings a model directory carries, and how a command that reads the model takes them.
//!
//! A training run saves its configuration next to every checkpoint's weights ([`RUN_CONFIG_FILE`]);
//! the tokenizer travels in Hugging Face's own files (`data::tokenizer_files`). `eval`, `logps`,
//! `generate` and `train --model.init` read a model directory's settings for the ones the flags and
//! the `--config` file leave unset, and say which they took:
//! - `data.template`: the template the model was trained with;
//! - `data.max_len`: the model's context (every model's the command reads: the smallest), at most the
//!   length the model was trained with; a value given above a context is an error before any data is
//!   read.
//!
//! A model started from a directory has that directory's shape: a `[model]` shape setting given with
//! `model.init` that disagrees with its `config.json` is an error ([`check_init_shape`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::cli::Resolved;
use super::{DataConfig, RunConfig};
use crate::model::DecoderConfig;

/// The run configuration as saved in a checkpoint (and `final/`) next to the weights.
pub const RUN_CONFIG_FILE: &str = "run_config.toml";

/// What a model directory says about the model and how it was trained.
#[derive(Clone, Debug)]
pub struct ModelDirSettings {
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: DecoderConfig,
    /// The run configuration it was saved with (a training checkpoint), if any.
    pub run: Option<RunConfig>,
}

impl ModelDirSettings {
    /// Reads `dir`'s `config.json` and, when there is one, its [`RUN_CONFIG_FILE`].
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let config = DecoderConfig::from_hf_json(&dir.join("config.json"))?;
        let path = dir.join(RUN_CONFIG_FILE);
        let run = match path.is_file() {
            true => Some(RunConfig::from_toml_file(&path).context("the run configuration saved with the model")?),
            false => None,
        };
        Ok(Self { dir: dir.to_path_buf(), config, run })
    }

    fn run_config_path(&self) -> PathBuf {
        self.dir.join(RUN_CONFIG_FILE)
    }

    /// `data.template`, unless given: the template the model was trained with. Returns a note when it
    /// took it.
    pub fn adopt_template(&self, resolved: &mut Resolved) -> Option<String> {
        let run = self.run.as_ref()?;
        if resolved.is_set("data.template") {
            return None;
        }
        resolved.config.data.template = run.data.template.clone();
        Some(format!("data.template = {:?} (from {})", run.data.template, self.run_config_path().display()))
    }

    /// `data.max_len`, unless given: the smallest context of this model and `others`, at most the
    /// length this model was trained with and each of `caps` (a bound and what it is). A value given
    /// above a context is an error. Returns a note saying where the value came from.
    pub fn adopt_max_len(
        &self,
        resolved: &mut Resolved,
        others: &[&ModelDirSettings],
        caps: &[(usize, &str)],
    ) -> Result<String> {
        let models = std::iter::once(self).chain(others.iter().copied());
        let (context, smallest) = models.map(|m| (m.config.n_positions, m)).min_by_key(|(n, _)| *n).expect("one model");
        let context_of = || format!("the context of {} (n_positions = {context})", smallest.dir.display());
        if resolved.is_set("data.max_len") {
            let given = resolved.config.data.max_len;
            if given > context {
                bail!(
                    "data.max_len = {given} {} exceeds {}; leave it out to use the context",
                    resolved.origin("data.max_len"),
                    context_of()
                );
            }
            return Ok(format!("data.max_len = {given} {}", resolved.origin("data.max_len")));
        }
        let mut max_len = context;
        let mut source = context_of();
        if let Some(trained) = self.run.as_ref().map(|r| r.data.max_len).filter(|&n| n < max_len) {
            (max_len, source) = (trained, format!("{}, as trained", self.run_config_path().display()));
        }
        for &(cap, what) in caps {
            if cap < max_len {
                (max_len, source) = (cap, what.to_string());
            }
        }
        resolved.config.data.max_len = max_len;
        Ok(format!("data.max_len = {max_len} (from {source})"))
    }
}

/// Fails when a `[model]` shape setting given (by a flag or the file) differs from the shape of the
/// model in `init` (`model.init`, or `--model` for the commands that read one), naming each and where
/// it was given.
pub fn check_init_shape(resolved: &Resolved, init: &ModelDirSettings) -> Result<()> {
    let (m, c) = (&resolved.config.model, &init.config);
    let show = |x: Option<String>| x.unwrap_or_else(|| "none".to_string());
    let rope_theta = c.rope.map(|r| r.theta.to_string());
    let fields: [(&str, String, String); 10] = [
        ("arch", m.arch.to_string(), c.family.to_string()),
        ("n_layer", m.n_layer.to_string(), c.n_layer.to_string()),
        ("n_embd", m.n_embd.to_string(), c.n_embd.to_string()),
        ("n_head", m.n_head.to_string(), c.n_head.to_string()),
        ("n_kv_head", show(m.n_kv_head.map(|n| n.to_string())), c.n_kv_head.to_string()),
        ("intermediate_size", show(m.intermediate_size.map(|n| n.to_string())), c.intermediate_size.to_string()),
        ("rope_theta", show(m.rope_theta.map(|t| t.to_string())), show(rope_theta)),
        ("tie_word_embeddings", m.tie_word_embeddings.to_string(), c.tie_word_embeddings.to_string()),
        ("n_positions", m.n_positions.to_string(), c.n_positions.to_string()),
        ("vocab_size", show(m.vocab_size.map(|n| n.to_string())), c.vocab_size.to_string()),
    ];
    let conflicts: Vec<String> = fields
        .iter()
        .filter(|(name, given, actual)| resolved.is_set(&format!("model.{name}")) && given != actual)
        .map(|(name, given, actual)| {
            let key = format!("model.{name}");
            format!("  {key} = {given} {}, but the model has {name} = {actual}", resolved.origin(&key))
        })
        .collect();
    if !conflicts.is_empty() {
        bail!(
            "the model shape given differs from the model in {} (its config.json); a model read from a \
             directory has that directory's shape, so leave these settings out:\n{}",
            init.dir.display(),
            conflicts.join("\n")
        );
    }
    Ok(())
}

/// The settings taken from model directories, on stderr.
pub fn print_settings_notes(notes: &[String]) {
    for note in notes {
        eprintln!("using {note}");
    }
}

/// The bounds of a `data.max_len` left unset besides the models' contexts: a micro-batch holds a pair
/// (and training keeps to the default's memory use).
pub fn max_len_caps(settings: &Resolved, training: bool) -> Vec<(usize, &'static str)> {
    let budget = settings.config.batching.tokens_per_micro_batch;
    let mut caps = vec![(budget / 2, "half of batching.tokens_per_micro_batch")];
    if training {
        caps.push((DataConfig::default().max_len, "the default"));
    }
    caps
}

/// `train` / `sft` from `model.init`: its shape is the model's (a shape setting that differs is an
/// error), and the data settings left unset come from its directory (see `config::model_dir`).
pub fn adopt_init_settings(settings: &mut Resolved) -> Result<()> {
    let Some(init) = settings.config.model.init.clone() else {
        return Ok(());
    };
    let init = ModelDirSettings::read(&init).with_context(|| format!("model.init {}", init.display()))?;
    check_init_shape(settings, &init)?;
    let reference = match &settings.config.model.reference {
        Some(dir) => Some(ModelDirSettings::read(dir).with_context(|| format!("model.reference {}", dir.display()))?),
        None => None,
    };
    let mut notes: Vec<String> = init.adopt_template(settings).into_iter().collect();
    let caps = max_len_caps(settings, true);
    notes.push(init.adopt_max_len(settings, &reference.iter().collect::<Vec<_>>(), &caps)?);
    print_settings_notes(&notes);
    Ok(())
}
