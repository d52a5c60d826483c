//! `safedpo rm`: a judge trained from a run configuration. The data are read as a training run
//! reads them (`data.*`, the holdout split), in the order the judge learns: the helpfulness order
//! for a reward model, the safety order for a cost model (`data.selection` is set from the kind).
//! The trunk starts from `model.init` (an SFT model, say) or a random model of `[model]`'s shape;
//! the head is new. The run writes `metrics.jsonl` (a line per logged step and per evaluation)
//! and the judge, a `transformers` sequence classifier with the tokenizer, to `out_dir/final`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::json;

use super::reward_model::{evaluate_rm, train_rm, RmEval, RmKind, RmTrainOptions};
use crate::backend::Backend;
use crate::config::{RunConfig, RunLength};
use crate::data::{load_tokenizer, save_tokenizer_files, Batcher, PairSelection};
use crate::model::{checkpoint, random_weights, ScalarHeadModel};
use crate::optim::AdamWConfig;
use crate::train::{prepare_data, Task};

/// What a judge's run did.
#[derive(Clone, Debug)]
pub struct RmSummary {
    pub kind: RmKind,
    pub steps: usize,
    pub train_pairs: usize,
    pub final_loss: f64,
    /// On the held-out pairs (none when the run holds none out).
    pub eval: Option<RmEval>,
    pub model_dir: PathBuf,
}

/// The pair order a judge of `kind` learns from.
pub fn selection_for(kind: RmKind) -> PairSelection {
    match kind {
        RmKind::Reward => PairSelection::Better,
        RmKind::Cost => PairSelection::Safer,
    }
}

/// Trains a judge of `kind` as `cfg` says (see the module documentation).
pub fn run_rm<B: Backend>(backend: Arc<B>, cfg: &RunConfig, kind: RmKind, quiet: bool) -> Result<RmSummary> {
    let mut cfg = cfg.clone();
    cfg.data.selection = selection_for(kind);
    let init = cfg.model.init.clone();
    let tok = load_tokenizer(init.as_deref())?;
    let data = prepare_data(&cfg, tok.as_ref(), Task::Preference)?;
    if !quiet {
        data.report.iter().for_each(|line| eprintln!("{line}"));
    }
    let weights = match &init {
        Some(dir) => checkpoint::load_dir(dir).with_context(|| format!("loading model.init {}", dir.display()))?,
        None => random_weights(cfg.model.random_shape(tok.vocab_size()), cfg.seed)?,
    };
    let model_vocab = weights.config.vocab_size;
    let mut model = ScalarHeadModel::with_new_head(backend, weights, cfg.seed)?;
    // An id no sequence holds, when the vocabulary has one past the tokenizer's: `transformers`
    // then finds each sequence's last token in a padded batch. Otherwise none (one at a time).
    model.set_pad_token_id((tok.vocab_size() < model_vocab).then_some(tok.vocab_size() as i64));

    let budget = cfg.batching.tokens_per_micro_batch;
    let steps = match cfg.length() {
        RunLength::Steps(n) => n,
        RunLength::Epochs(e) => {
            let per_epoch =
                Batcher::new(data.train.len(), cfg.seed).batches_in_epoch_by(budget, 0, |i| data.train[i].num_tokens());
            ((e * per_epoch as f64).ceil() as usize).max(1)
        }
    };
    let o = &cfg.optimizer;
    let adam = AdamWConfig { lr: o.lr, beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay };
    let opts = RmTrainOptions {
        kind,
        steps,
        adam,
        grad_clip: o.grad_clip,
        tokens_per_batch: budget,
        seed: cfg.seed,
        grad_dtype: cfg.train.grad_dtype,
    };

    std::fs::create_dir_all(&cfg.out_dir).with_context(|| format!("creating {}", cfg.out_dir.display()))?;
    let metrics_path = cfg.out_dir.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path).with_context(|| format!("{}", metrics_path.display()))?;
    let (eval_pairs, log_every, eval_every) = (&data.eval, cfg.intervals.log_every.max(1), cfg.intervals.eval_every);
    let eval_line = |model: &mut ScalarHeadModel<B>, step: usize| -> Result<Option<(RmEval, serde_json::Value)>> {
        if eval_pairs.is_empty() {
            return Ok(None);
        }
        let e = evaluate_rm(model, eval_pairs, kind, budget)?;
        let line = json!({"step": step, "eval/loss": e.loss, "eval/accuracy": e.accuracy,
            "eval/sign_accuracy": e.sign_accuracy});
        Ok(Some((e, line)))
    };
    let records = train_rm(&mut model, &data.train, &opts, |record, model| {
        if record.step % log_every == 0 || record.step == steps {
            let line = json!({"step": record.step, "loss": record.loss, "grad_norm": record.grad_norm});
            writeln!(metrics, "{line}")?;
            if !quiet {
                eprintln!("{line}");
            }
        }
        if eval_every > 0 && record.step % eval_every == 0 && record.step < steps {
            if let Some((_, line)) = eval_line(model, record.step)? {
                writeln!(metrics, "{line}")?;
            }
        }
        Ok(())
    })?;
    let eval = match eval_line(&mut model, steps)? {
        Some((e, line)) => {
            writeln!(metrics, "{line}")?;
            Some(e)
        }
        None => None,
    };
    let model_dir = cfg.out_dir.join("final");
    model.save(&model_dir)?;
    save_tokenizer_files(tok.as_ref(), init.as_deref(), &model_dir)?;
    Ok(RmSummary {
        kind,
        steps,
        train_pairs: data.train.len(),
        final_loss: records.last().map_or(f64::NAN, |r| r.loss),
        eval,
        model_dir,
    })
}
