//! A decoder with a scalar head: the reward and cost models that judge what a policy says.
//!
//! [`ScalarHeadModel`] is the trunk of any family the engine runs (embeddings, blocks, final norm:
//! the decoder without its LM head) and one vector `score.weight` `[1, C]`: a sequence's score is
//! the final normed hidden state of its last token times that vector, with no bias, as
//! `transformers`' `*ForSequenceClassification` computes it with `num_labels = 1` (which reads
//! the rightmost token that is not `pad_token_id`; a packed batch has no padding, so here it is
//! simply each sequence's last token).
//!
//! The forward is the decoder's trunk (`Decoder::forward_trunk`), then a gather of the last rows
//! and a `[S, C] · [C]` product on the backend; the backward is that product's backward, a
//! scatter of the rows' gradient into dL/d(norm_f) (zero at every other token), and the
//! decoder's trunk backward (`Decoder::backward_trunk`). The LM head is never run: the trunk of a
//! model with an untied head is loaded without it.
//!
//! On disk the model is a `transformers` sequence classifier: the trunk's tensors under the
//! family's prefix (`transformer.` or `model.`), `score.weight`, and a `config.json` naming the
//! family's `*ForSequenceClassification` class with one label (`id2label`, `num_labels`) and a
//! `pad_token_id`. A classifier with any other number of labels is refused.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::checkpoint::{self, LoadOptions, SaveOptions, CONFIG_FILE};
use super::init::{normal_samples, random_weights};
use super::{Decoder, DecoderConfig, DeviceBatch, Family, HostWeights};
use crate::backend::{Backend, WeightLayout};
use crate::data::PackedBatch;

/// The score head's tensor, as `transformers` names it (no trunk prefix).
pub const SCORE_WEIGHT: &str = "score.weight";

/// The `architectures` entry of a family's sequence classifier.
pub fn sequence_classifier_class(family: Family) -> &'static str {
    match family {
        Family::Gpt2 => "GPT2ForSequenceClassification",
        Family::Llama => "LlamaForSequenceClassification",
        Family::Mistral => "MistralForSequenceClassification",
        Family::Qwen2 => "Qwen2ForSequenceClassification",
    }
}

/// A decoder trunk with a scalar head (see the module documentation).
pub struct ScalarHeadModel<B: Backend> {
    trunk: Decoder<B>,
    /// `[C]` the head's weight (`score.weight`, one row).
    score: B::Buf,
    /// `None` in a frozen model.
    score_grad: Option<B::Buf>,
    /// Written to `config.json` for `transformers`, which reads a sequence's score at its
    /// rightmost token that is not this id (it never reads it here: batches are packed).
    pad_token_id: Option<i64>,
    /// `[S]` each sequence's last token, `[S, C]` their final hidden states and `[S]` their scores,
    /// of the last forward.
    last_rows: Option<B::Ids>,
    rows: B::Buf,
    scores: B::Buf,
    /// (tokens, sequences) of the last forward, which a backward needs.
    pending_backward: Option<(usize, usize)>,
}

impl<B: Backend> ScalarHeadModel<B> {
    /// A model from trunk weights (a causal LM's: an untied LM head is dropped) and the head's
    /// weight `[C]`; trainable, or frozen for judging.
    pub fn from_host(backend: Arc<B>, weights: HostWeights, score: &[f32], frozen: bool) -> Result<Self> {
        let weights = trunk_weights(weights);
        let c = weights.config.n_embd;
        ensure!(score.len() == c, "score head: `{SCORE_WEIGHT}` has {} values, the model's width is {c}", score.len());
        let trunk =
            if frozen { Decoder::from_host_frozen(backend, &weights)? } else { Decoder::from_host(backend, &weights)? };
        let b = trunk.backend().clone();
        let score_grad = if frozen { None } else { Some(b.zeros(c)?) };
        let score = if frozen { b.upload_frozen(score)? } else { b.upload(score)? };
        Ok(Self {
            trunk,
            score,
            score_grad,
            pad_token_id: None,
            last_rows: None,
            rows: b.zeros(0)?,
            scores: b.zeros(0)?,
            pending_backward: None,
        })
    }

    /// A trainable model on `weights`' trunk with a new head: N(0, 0.02) as `transformers`
    /// initialises it, deterministic in `seed`.
    pub fn with_new_head(backend: Arc<B>, weights: HostWeights, seed: u64) -> Result<Self> {
        let score = initial_score(weights.config.n_embd, seed);
        Self::from_host(backend, weights, &score, false)
    }

    /// A trainable model with the family's initialisation throughout.
    pub fn random(backend: Arc<B>, config: DecoderConfig, seed: u64) -> Result<Self> {
        Self::with_new_head(backend, random_weights(config, seed)?, seed)
    }

    /// Reads a `transformers` sequence classifier (see the module documentation).
    pub fn load(backend: Arc<B>, dir: &Path, frozen: bool) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{} is not a model directory: reading {CONFIG_FILE}", dir.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", config_path.display()))?;
        let Value::Object(obj) = value else { bail!("{}: expected a JSON object", config_path.display()) };
        let (config, pad_token_id) =
            classifier_config(&obj).with_context(|| format!("judge {}", config_path.display()))?;
        let shape = vec![1, config.n_embd];
        let (weights, mut extra) =
            checkpoint::load_weights(dir, config, LoadOptions::default(), &[(SCORE_WEIGHT, shape)])?;
        let score = extra.pop().expect("one extra tensor asked for");
        let mut model = Self::from_host(backend, weights, &score, frozen)?;
        model.pad_token_id = pad_token_id;
        Ok(model)
    }

    /// Writes a `transformers` sequence classifier (f32, sharded as `Decoder::save` shards).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let weights = self.trunk.to_host()?;
        let score = self.score_weight()?;
        let text = classifier_config_json(&weights.config, self.pad_token_id);
        let extra = vec![(SCORE_WEIGHT.to_string(), vec![1, score.len()], score.as_slice())];
        checkpoint::save_weights(&weights, extra, &text, dir, SaveOptions::default())
    }

    pub fn config(&self) -> &DecoderConfig {
        self.trunk.config()
    }

    pub fn backend(&self) -> &Arc<B> {
        self.trunk.backend()
    }

    /// The trunk (for its optimizer, gradient norms and weights).
    pub fn trunk(&self) -> &Decoder<B> {
        &self.trunk
    }

    pub fn trunk_mut(&mut self) -> &mut Decoder<B> {
        &mut self.trunk
    }

    pub fn pad_token_id(&self) -> Option<i64> {
        self.pad_token_id
    }

    /// Sets the id `config.json` names as padding (see the field); `None` writes `null`, with which
    /// `transformers` scores one sequence at a time.
    pub fn set_pad_token_id(&mut self, id: Option<i64>) {
        self.pad_token_id = id;
    }

    /// The head's weight `[C]` on the host.
    pub fn score_weight(&self) -> Result<Vec<f32>> {
        let mut data = self.backend().download(&self.score)?;
        data.truncate(self.config().n_embd);
        Ok(data)
    }

    /// The head's weight and gradient, for the optimizer; an error on a frozen model.
    pub fn score_and_grad_mut(&mut self) -> Result<(&mut B::Buf, &B::Buf)> {
        let grad = self.score_grad.as_ref().context("score head: this model is frozen (loaded to judge)")?;
        Ok((&mut self.score, grad))
    }

    /// Every gradient, the trunk's and the head's (to choose their storage: `optim::store_grads_in_f32`).
    pub fn grads_mut(&mut self) -> Result<Vec<&mut B::Buf>> {
        let mut grads = self.trunk.grads_mut()?;
        grads.push(self.score_grad.as_mut().context("score head: this model is frozen (loaded to judge)")?);
        Ok(grads)
    }

    /// Sets every gradient, the trunk's and the head's, to zero.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.trunk.zero_grad()?;
        let grad = self.score_grad.as_mut().expect("a trainable trunk has a trainable head");
        self.trunk.backend().fill(grad, 0.0)
    }

    /// Sum of the squares of every gradient, the head's included (for clipping).
    pub fn grad_sum_squares(&self) -> Result<f64> {
        let mut grads = self.trunk.grads()?;
        grads.push(self.score_grad.as_ref().expect("a trainable trunk has a trainable head"));
        self.backend().sum_squares(&grads)
    }

    /// Each sequence's score `[S]`: the head on the final hidden state of its last token. Keeps
    /// what the backward needs.
    pub fn forward(&mut self, batch: &DeviceBatch<B>) -> Result<Vec<f32>> {
        self.pending_backward = None;
        let (n, s, c) = (batch.num_tokens(), batch.num_seqs(), self.config().n_embd);
        // `PackedBatch::push` refuses empty sequences: each one's last token is its end minus one.
        let last: Vec<i32> = batch.packing.host_cu_seqlens[1..].iter().map(|&end| end - 1).collect();
        self.trunk.forward_trunk(batch)?;
        let b = &**self.trunk.backend();
        let last_rows = self.last_rows.insert(b.upload_ids(&last)?);
        b.resize(&mut self.rows, s * c)?;
        b.resize(&mut self.scores, s)?;
        let norm_f = &self.trunk.acts.as_ref().expect("forward_trunk allocates the activations").trunk.norm_f;
        b.gather_rows(&mut self.rows, norm_f, last_rows, s, n, c)?;
        b.matmul_forward(&mut self.scores, &self.rows, &self.score, None, s, c, 1, WeightLayout::OutIn)?;
        self.pending_backward = Some((n, s));
        let mut scores = b.download(&self.scores)?;
        scores.truncate(s);
        Ok(scores)
    }

    /// Given dL/d(score) `[S]`, accumulates every gradient (the head's and the trunk's). Must follow
    /// `forward` on the same batch.
    pub fn backward(&mut self, batch: &DeviceBatch<B>, dscores: &[f32]) -> Result<()> {
        self.trunk.ensure_trainable("backward")?;
        let (n, s, c) = (batch.num_tokens(), batch.num_seqs(), self.config().n_embd);
        ensure!(
            self.pending_backward == Some((n, s)),
            "score head backward needs a forward on the same batch just before it ({n} tokens, {s} sequences; last \
             forward: {:?})",
            self.pending_backward
        );
        ensure!(dscores.len() == s, "score head backward: {} gradients for {s} sequences", dscores.len());
        self.pending_backward = None;
        self.trunk.ensure_scratch(n)?;
        let b = self.trunk.backend().clone();
        let dout = b.upload(dscores)?;
        let mut drows = b.zeros(s * c)?;
        let dscore = self.score_grad.as_mut().expect("a trainable trunk has a trainable head");
        b.matmul_backward(&mut drows, dscore, None, &dout, &self.rows, &self.score, s, c, 1, WeightLayout::OutIn)?;
        let last_rows = self.last_rows.as_ref().expect("set by the forward");
        let d = &mut self.trunk.scratch.as_mut().expect("ensure_scratch allocated it").d;
        b.scatter_rows(&mut d.norm, &drows, last_rows, s, n, c)?;
        self.trunk.backward_trunk(batch)
    }

    /// Scores whole token sequences (prompt and response), packed about `token_budget` tokens at a
    /// time (a longer sequence goes alone).
    pub fn score_sequences(&mut self, sequences: &[Vec<i32>], token_budget: usize) -> Result<Vec<f32>> {
        let mut scores = Vec::with_capacity(sequences.len());
        let mut start = 0;
        while start < sequences.len() {
            let mut end = start + 1;
            let mut tokens = sequences[start].len();
            while end < sequences.len() && tokens + sequences[end].len() <= token_budget {
                tokens += sequences[end].len();
                end += 1;
            }
            let mut packed = PackedBatch::default();
            for (i, seq) in sequences[start..end].iter().enumerate() {
                ensure!(!seq.is_empty(), "score: sequence {} has no tokens", start + i);
                packed.push(seq, seq.len());
            }
            let batch = DeviceBatch::upload(&**self.backend(), &packed)?;
            scores.extend(self.forward(&batch)?);
            start = end;
        }
        Ok(scores)
    }
}

/// The head's initialisation: N(0, 0.02), one ChaCha stream of its own.
pub fn initial_score(width: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX);
    normal_samples(&mut rng, width, 0.02)
}

/// `weights` without an LM head: an untied head is dropped and the config says tied (a
/// classifier has no head to tie; the trunk's tensors are the same either way).
fn trunk_weights(mut weights: HostWeights) -> HostWeights {
    if !weights.config.tie_word_embeddings {
        weights.tensors.remove("lm_head.weight");
        weights.config.tie_word_embeddings = true;
    }
    weights
}

/// The number of labels a `transformers` config gives its classifier: `num_labels`, else the size
/// of `id2label`, else `PretrainedConfig`'s default, 2.
fn num_labels(obj: &Map<String, Value>) -> Result<usize> {
    if let Some(n) = obj.get("num_labels").filter(|v| !v.is_null()) {
        return n
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("field `num_labels`: expected a count, got {n}"));
    }
    match obj.get("id2label") {
        Some(Value::Object(labels)) => Ok(labels.len()),
        Some(other) if !other.is_null() => bail!("field `id2label`: expected an object, got {other}"),
        _ => Ok(2),
    }
}

/// A classifier's `config.json` as the trunk's config and its `pad_token_id`: one label, the
/// family's `*ForSequenceClassification` class (or none named).
fn classifier_config(obj: &Map<String, Value>) -> Result<(DecoderConfig, Option<i64>)> {
    let labels = num_labels(obj)?;
    ensure!(labels == 1, "a judge gives one score per sequence (num_labels = 1); this classifier has {labels} labels");
    let mut trunk = obj.clone();
    let archs = trunk.remove("architectures");
    for key in ["id2label", "label2id", "num_labels", "problem_type"] {
        trunk.remove(key);
    }
    let pad_token_id = trunk.get("pad_token_id").and_then(Value::as_i64);
    trunk.insert("tie_word_embeddings".into(), json!(true));
    let config = DecoderConfig::from_hf_object(&trunk)?;
    if let Some(Value::Array(archs)) = archs {
        let expected = sequence_classifier_class(config.family);
        for arch in &archs {
            ensure!(
                arch.as_str() == Some(expected),
                "field `architectures` lists {arch}; a judge is a sequence classifier, \"{expected}\" for model_type \
                 \"{}\"",
                config.family
            );
        }
    }
    Ok((config, pad_token_id))
}

/// The `config.json` of a classifier on `config`'s trunk.
fn classifier_config_json(config: &DecoderConfig, pad_token_id: Option<i64>) -> String {
    let mut value: Value = serde_json::from_str(&config.to_hf_json()).expect("the config writes valid JSON");
    let obj = value.as_object_mut().expect("the config is an object");
    obj.insert("architectures".into(), json!([sequence_classifier_class(config.family)]));
    obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
    obj.insert("label2id".into(), json!({"LABEL_0": 0}));
    obj.insert("num_labels".into(), json!(1));
    obj.insert("pad_token_id".into(), json!(pad_token_id));
    let sorted: std::collections::BTreeMap<_, _> = std::mem::take(obj).into_iter().collect();
    let mut text = serde_json::to_string_pretty(&sorted).expect("a JSON value always serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_classifier_with_two_labels_is_refused() {
        let mut obj: Map<String, Value> =
            serde_json::from_str(&classifier_config_json(&DecoderConfig::tiny(), Some(0))).unwrap();
        assert_eq!(classifier_config(&obj).unwrap().1, Some(0));
        obj.remove("num_labels");
        obj.insert("id2label".into(), json!({"0": "a", "1": "b"}));
        let err = classifier_config(&obj).unwrap_err().to_string();
        assert!(err.contains("num_labels = 1") && err.contains("2 labels"), "{err}");
        obj.remove("id2label");
        assert!(classifier_config(&obj).is_err(), "no label count is transformers' default of 2");
    }
}
