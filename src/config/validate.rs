//! The checks of a run configuration that TOML's types cannot express, one function per table, each
//! failure naming its field.

use super::{FieldError, RunConfig};
use crate::data::{DataFormat, CHAT_TEMPLATE};

/// Collects failures.
#[derive(Default)]
pub(crate) struct Errors(pub Vec<FieldError>);

impl Errors {
    pub(crate) fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError { field: field.to_string(), message: message.into() });
    }
}

impl RunConfig {
    /// Every problem with the configuration, each naming its field. Checks what can be checked without
    /// reading the data or the model.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        self.check_model_shape(&mut errs);
        self.check_data(&mut errs);
        self.check_objective(&mut errs);
        self.check_reference(&mut errs);
        self.check_optimizer(&mut errs);
        self.check_batching_and_intervals(&mut errs);
        self.check_lora(&mut errs);
        if !matches!(self.rm.kind.to_ascii_lowercase().as_str(), "reward" | "cost") {
            errs.add("rm.kind", format!("must be reward or cost, got '{}'", self.rm.kind));
        }
        if self.train.max_loss.is_nan() || self.train.max_loss <= 0.0 {
            errs.add(
                "train.max_loss",
                format!("must be a positive number (inf: no bound), got {}", self.train.max_loss),
            );
        }
        if self.train.zero_stage > 1 {
            errs.add(
                "train.zero_stage",
                format!("must be 0 (off) or 1 (sharded optimizer state), got {}", self.train.zero_stage),
            );
        }
        if self.out_dir.as_os_str().is_empty() {
            errs.add("out_dir", "must not be empty");
        }
        errs.0
    }

    /// `[lora]`: what PEFT's LoRA options the engine implements.
    pub(crate) fn check_lora(&self, errs: &mut Errors) {
        let l = &self.lora;
        if l.dropout != 0.0 {
            errs.add("lora.dropout", format!("must be 0: LoRA dropout is not implemented (got {})", l.dropout));
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            errs.add("lora.alpha", format!("must be a positive number, got {}", l.alpha));
        }
        if l.enabled() && self.sync_ref_model {
            errs.add("sync_ref_model", "TR-DPO's reference sync mixes full weights; it does not run with LoRA");
        }
    }

    /// `[model]`: the shape of a random init.
    pub(crate) fn check_model_shape(&self, errs: &mut Errors) {
        let m = &self.model;
        if m.init.is_some() {
            return;
        }
        if m.n_layer == 0 {
            errs.add("model.n_layer", "must be at least 1");
        }
        if m.n_head == 0 {
            errs.add("model.n_head", "must be at least 1");
        } else if m.n_embd == 0 || !m.n_embd.is_multiple_of(m.n_head) {
            let message = format!("must be a positive multiple of model.n_head ({}), got {}", m.n_head, m.n_embd);
            errs.add("model.n_embd", message);
        }
        if m.arch.is_gpt2() {
            for (field, set) in [
                ("model.n_kv_head", m.n_kv_head.is_some()),
                ("model.rope_theta", m.rope_theta.is_some()),
                ("model.tie_word_embeddings", m.tie_word_embeddings),
            ] {
                if set {
                    errs.add(field, "is a Llama-family setting; GPT-2 (model.arch = gpt2) has no such option");
                }
            }
            if m.intermediate_size.is_some_and(|f| f != 4 * m.n_embd) {
                errs.add("model.intermediate_size", "GPT-2's MLP is 4·n_embd wide");
            }
        } else {
            let kv = m.n_kv_head.unwrap_or(m.n_head);
            if kv == 0 || (m.n_head > 0 && !m.n_head.is_multiple_of(kv)) {
                errs.add("model.n_kv_head", format!("must divide model.n_head ({}), got {kv}", m.n_head));
            }
            if m.n_head > 0 && !(m.n_embd / m.n_head).is_multiple_of(2) {
                errs.add("model.n_embd", "n_embd / n_head must be even for RoPE");
            }
            if m.intermediate_size == Some(0) {
                errs.add("model.intermediate_size", "must be at least 1");
            }
            if m.rope_theta.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
                errs.add("model.rope_theta", "must be a positive number");
            }
        }
        if let Some(v) = m.vocab_size {
            if !(2..=i32::MAX as usize).contains(&v) {
                errs.add("model.vocab_size", format!("must be in 2..={} (token ids are i32), got {v}", i32::MAX));
            }
        }
    }

    /// `[data]`, and the random init's context against `data.max_len`.
    fn check_data(&self, errs: &mut Errors) {
        let d = &self.data;
        if self.model.init.is_none() && self.model.n_positions < d.max_len {
            let message = format!("must be at least data.max_len ({}), got {}", d.max_len, self.model.n_positions);
            errs.add("model.n_positions", message);
        }
        if d.template != CHAT_TEMPLATE && d.template.matches("{prompt}").count() != 1 {
            let message = format!(
                "must contain `{{prompt}}` exactly once, or be `{CHAT_TEMPLATE}` (the model's chat template), got {:?}",
                d.template
            );
            errs.add("data.template", message);
        }
        if d.max_len < 2 {
            errs.add("data.max_len", format!("must be at least 2 tokens, got {}", d.max_len));
        }
        for (field, limit) in
            [("data.max_prompt_length", d.max_prompt_length), ("data.max_completion_length", d.max_completion_length)]
        {
            if limit == Some(0) {
                errs.add(field, "must be at least 1 (absent: no limit)");
            }
        }
        if !(0.0..1.0).contains(&d.eval_fraction) {
            errs.add("data.eval_fraction", format!("must be in [0, 1), got {}", d.eval_fraction));
        }
    }

    /// `[objective]`: every parameter within its bound (`loss::Param::bound`).
    pub(crate) fn check_objective(&self, errs: &mut Errors) {
        for (param, message) in self.objective.param_errors() {
            errs.add(&format!("objective.{param}"), format!("{message} (objective {})", self.objective.describe()));
        }
    }

    /// The reference: TR-DPO's sync, and what the objectives on unpaired examples need of it.
    fn check_reference(&self, errs: &mut Errors) {
        let unpaired = self.objective.as_unpaired();
        if let Some(kto) = unpaired.filter(|_| self.precompute_ref) {
            let why = if kto.estimates_kl() {
                "its KL sequences pair each prompt with another example's completion of the same micro-batch, \
                 which changes with the data order"
            } else {
                "the reference cache holds pairs"
            };
            let message = format!(
                "must be false for objective {} ({why}; the reference model runs on every micro-batch)",
                kto.name()
            );
            errs.add("precompute_ref", message);
        }
        if unpaired.is_none() && self.data.format == DataFormat::Unpaired {
            let message = format!(
                "unpaired rows are the data of objectives kto and apo_zero_unpaired, not of {}",
                self.objective.describe()
            );
            errs.add("data.format", message);
        }
        if !self.sync_ref_model {
            return;
        }
        if self.precompute_ref {
            errs.add(
                "sync_ref_model",
                "needs precompute_ref = false: the cached reference log-probs assume a fixed reference, which \
                 TR-DPO moves (TRL refuses the two together)",
            );
        }
        if !self.objective.uses_reference() {
            let message =
                format!("objective {} reads no reference, so there is none to sync", self.objective.describe());
            errs.add("sync_ref_model", message);
        }
        if !(0.0..=1.0).contains(&self.ref_model_mixup_alpha) {
            errs.add("ref_model_mixup_alpha", format!("must be in [0, 1], got {}", self.ref_model_mixup_alpha));
        }
        if self.ref_model_sync_steps == 0 {
            errs.add("ref_model_sync_steps", "must be at least 1");
        }
    }

    /// `[optimizer]`.
    pub(crate) fn check_optimizer(&self, errs: &mut Errors) {
        let op = &self.optimizer;
        if !(op.lr.is_finite() && op.lr > 0.0) {
            errs.add("optimizer.lr", format!("must be a positive number, got {}", op.lr));
        }
        if !(0.0..1.0).contains(&op.beta1) {
            errs.add("optimizer.beta1", format!("must be in [0, 1), got {}", op.beta1));
        }
        if !(0.0..1.0).contains(&op.beta2) {
            errs.add("optimizer.beta2", format!("must be in [0, 1), got {}", op.beta2));
        }
        if !(op.eps.is_finite() && op.eps > 0.0) {
            errs.add("optimizer.eps", format!("must be a positive number, got {}", op.eps));
        }
        if !(op.weight_decay.is_finite() && op.weight_decay >= 0.0) {
            errs.add("optimizer.weight_decay", format!("must be >= 0, got {}", op.weight_decay));
        }
        if !(op.grad_clip.is_finite() && op.grad_clip >= 0.0) {
            errs.add("optimizer.grad_clip", format!("must be >= 0 (0 disables clipping), got {}", op.grad_clip));
        }
        if !(0.0..=1.0).contains(&op.min_lr_ratio) {
            errs.add("optimizer.min_lr_ratio", format!("must be in [0, 1], got {}", op.min_lr_ratio));
        }
        match (op.total_steps, op.epochs) {
            (Some(_), Some(_)) => errs.add("optimizer.total_steps", "and optimizer.epochs are exclusive; set one"),
            (Some(0), None) => errs.add("optimizer.total_steps", "must be at least 1"),
            (None, Some(e)) if !(e.is_finite() && e > 0.0) => {
                errs.add("optimizer.epochs", format!("must be a positive number, got {e}"))
            }
            _ => {}
        }
        if let Some(ratio) = op.warmup_ratio {
            if !(0.0..1.0).contains(&ratio) {
                errs.add("optimizer.warmup_ratio", format!("must be in [0, 1), got {ratio}"));
            }
            if op.warmup_steps > 0 {
                errs.add("optimizer.warmup_ratio", "and optimizer.warmup_steps are exclusive; set one");
            }
        }
        if let Some(total) = op.total_steps {
            if op.warmup_steps > total {
                let message = format!("must be at most optimizer.total_steps ({total}), got {}", op.warmup_steps);
                errs.add("optimizer.warmup_steps", message);
            }
        }
    }

    /// `[batching]` and `[intervals]`.
    fn check_batching_and_intervals(&self, errs: &mut Errors) {
        let b = &self.batching;
        let max_len = self.data.max_len;
        if b.tokens_per_micro_batch < 2 * max_len {
            let message = format!(
                "must hold one full pair, 2 × data.max_len = {}, got {}",
                2 * max_len,
                b.tokens_per_micro_batch
            );
            errs.add("batching.tokens_per_micro_batch", message);
        } else if self.objective.as_unpaired().is_some_and(|k| k.estimates_kl())
            && b.tokens_per_micro_batch < 4 * max_len
        {
            // TRL refuses a batch of one example: its KL sequence would be its own.
            let message = format!(
                "must hold two examples with their KL sequences for objective {}, 4 × data.max_len = {}, got {}",
                self.objective.describe(),
                4 * max_len,
                b.tokens_per_micro_batch
            );
            errs.add("batching.tokens_per_micro_batch", message);
        }
        if b.head_chunk_rows == Some(0) {
            errs.add("batching.head_chunk_rows", "must be at least 1");
        }
        if b.pairs_per_micro_batch == Some(0) {
            errs.add("batching.pairs_per_micro_batch", "must be at least 1 (absent: cut by the token budget)");
        }
        if b.grad_accum == 0 {
            errs.add("batching.grad_accum", "must be at least 1");
        }
        if self.intervals.log_every == 0 {
            errs.add("intervals.log_every", "must be at least 1");
        }
    }
}
