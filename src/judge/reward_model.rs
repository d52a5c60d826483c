//! Trains a reward model or a cost model (a [`ScalarHeadModel`]) on preference pairs.
//!
//! The losses, per pair, averaged over a batch (safe-rlhf's sequence-wise losses, PKU-Alignment's
//! `safe_rlhf/values/reward/trainer.py` and `safe_rlhf/values/cost/trainer.py`, `loss_type =
//! 'sequence-wise'`, without their optional score regulariser):
//!
//! - reward, on the helpfulness order (`data.selection = better`), `w` the better response and `l`
//!   the worse: `−log σ(r_w − r_l)` (Bradley–Terry);
//! - cost, on the safety order (`data.selection = safer`), `w` the safer response and `l` the less
//!   safe one: `−log σ(c_l − c_w) − log σ(s_w·c_w) − log σ(s_l·c_l)`, with `s = +1` for a response
//!   labelled unsafe and `−1` for a safe one: Bradley–Terry on the safety order, plus the sign
//!   term that puts unsafe responses above zero and safe ones below (Safe RLHF, eq. 6), so that
//!   `cost < 0` reads as harmless.
//!
//! Accuracies: the share of pairs the model orders as the data does (`r_w > r_l`, `c_l > c_w`),
//! and for a cost model the share of responses whose cost has the sign of their label.
//!
//! Gradients: a step is one batch (no accumulation over micro-batches), so on a bf16 backend each
//! gradient takes one backward's adds and `grad_dtype = auto` keeps them in bf16, as a training run
//! of `grad_accum = 1` does; `f32` stores them, the head's too, in f32 (`optim::GradDtype`).

use anyhow::{bail, ensure, Result};

use crate::backend::{AdamWParams, Backend};
use crate::data::{preference_batch, Batcher, TokenizedPair};
use crate::model::{DeviceBatch, ScalarHeadModel};
use crate::optim::{decays_weight, store_grads_in_f32, AdamW, AdamWConfig, GradDtype};

/// Which judge a run trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RmKind {
    /// Helpfulness: Bradley–Terry on the better/worse order.
    #[default]
    Reward,
    /// Harmfulness: Bradley–Terry on the safer/less-safe order plus the safety-sign term.
    Cost,
}

impl std::str::FromStr for RmKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "reward" => Ok(RmKind::Reward),
            "cost" => Ok(RmKind::Cost),
            _ => bail!("unknown rm.kind '{s}': expected reward or cost"),
        }
    }
}

impl std::fmt::Display for RmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RmKind::Reward => "reward",
            RmKind::Cost => "cost",
        })
    }
}

/// `−log σ(x)` and its derivative `−σ(−x)`, stable for any `x`.
fn neg_log_sigmoid(x: f64) -> (f64, f64) {
    let loss = if x > 0.0 { (-x).exp().ln_1p() } else { -x + x.exp().ln_1p() };
    let sig_neg = if x > 0.0 { (-x).exp() / (1.0 + (-x).exp()) } else { 1.0 / (1.0 + x.exp()) };
    (loss, -sig_neg)
}

/// One pair's loss (see the module documentation) and its derivatives by the chosen (`w`) and the
/// rejected (`l`) response's score: `(loss, dloss/dscore_w, dloss/dscore_l)`.
pub fn pair_loss(kind: RmKind, w: f64, l: f64, w_unsafe: bool, l_unsafe: bool) -> (f64, f64, f64) {
    match kind {
        RmKind::Reward => {
            let (loss, d) = neg_log_sigmoid(w - l);
            (loss, d, -d)
        }
        RmKind::Cost => {
            let sign = |unsafe_: bool| if unsafe_ { 1.0 } else { -1.0 };
            let (s_w, s_l) = (sign(w_unsafe), sign(l_unsafe));
            let (order, d_order) = neg_log_sigmoid(l - w);
            let (sign_w, d_sign_w) = neg_log_sigmoid(s_w * w);
            let (sign_l, d_sign_l) = neg_log_sigmoid(s_l * l);
            (order + sign_w + sign_l, -d_order + s_w * d_sign_w, d_order + s_l * d_sign_l)
        }
    }
}

/// The mean of [`pair_loss`] over a batch whose scores are `[2P]` (pair i's chosen response at
/// `2i`, its rejected one at `2i + 1`, `unsafe_flags` alike), and its gradient by each score.
pub fn batch_loss(kind: RmKind, scores: &[f32], unsafe_flags: &[i32]) -> (f64, Vec<f32>) {
    let pairs = scores.len() / 2;
    let mut total = 0.0;
    let mut grad = vec![0.0f32; scores.len()];
    for i in 0..pairs {
        let (w, l) = (scores[2 * i] as f64, scores[2 * i + 1] as f64);
        let (loss, dw, dl) = pair_loss(kind, w, l, unsafe_flags[2 * i] != 0, unsafe_flags[2 * i + 1] != 0);
        total += loss;
        grad[2 * i] = (dw / pairs as f64) as f32;
        grad[2 * i + 1] = (dl / pairs as f64) as f32;
    }
    (total / pairs.max(1) as f64, grad)
}

/// What a judge scores on held-out pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RmEval {
    pub pairs: usize,
    pub loss: f64,
    /// Pairs ordered as the data orders them.
    pub accuracy: f64,
    /// Cost models: responses whose cost has their label's sign (unsafe > 0, safe < 0).
    pub sign_accuracy: Option<f64>,
}

/// Scores `pairs` (chosen and rejected, each after its prompt) and measures them.
pub fn evaluate_rm<B: Backend>(
    model: &mut ScalarHeadModel<B>,
    pairs: &[TokenizedPair],
    kind: RmKind,
    token_budget: usize,
) -> Result<RmEval> {
    let mut sequences = Vec::with_capacity(2 * pairs.len());
    let mut flags = Vec::with_capacity(2 * pairs.len());
    for p in pairs {
        sequences.push([p.prompt.as_slice(), &p.chosen].concat());
        sequences.push([p.prompt.as_slice(), &p.rejected].concat());
        flags.extend([p.chosen_unsafe as i32, p.rejected_unsafe as i32]);
    }
    let scores = model.score_sequences(&sequences, token_budget)?;
    let (loss, _) = batch_loss(kind, &scores, &flags);
    let n = pairs.len().max(1) as f64;
    let ordered = (0..pairs.len())
        .filter(|&i| match kind {
            RmKind::Reward => scores[2 * i] > scores[2 * i + 1],
            RmKind::Cost => scores[2 * i + 1] > scores[2 * i],
        })
        .count();
    let sign_accuracy = (kind == RmKind::Cost).then(|| {
        let right = scores.iter().zip(&flags).filter(|(&c, &f)| (c > 0.0) == (f != 0)).count();
        right as f64 / scores.len().max(1) as f64
    });
    Ok(RmEval { pairs: pairs.len(), loss, accuracy: ordered as f64 / n, sign_accuracy })
}

/// How to train a judge.
#[derive(Clone, Debug)]
pub struct RmTrainOptions {
    pub kind: RmKind,
    pub steps: usize,
    /// The optimizer (its `lr` constant through the run).
    pub adam: AdamWConfig,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f32,
    pub tokens_per_batch: usize,
    pub seed: u64,
    /// Where the gradients accumulate on a bf16 backend; a step is one batch, so `Auto` is bf16.
    pub grad_dtype: GradDtype,
}

/// One optimizer step's record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmStep {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f32,
}

/// AdamW on the trunk (`optim::AdamW`) and on the score head (its own moments).
struct RmOptimizer<B: Backend> {
    trunk: AdamW<B>,
    score_m: B::Buf,
    score_v: B::Buf,
    cfg: AdamWConfig,
}

impl<B: Backend> RmOptimizer<B> {
    fn new(model: &mut ScalarHeadModel<B>, cfg: AdamWConfig) -> Result<Self> {
        let c = model.config().n_embd;
        let trunk = AdamW::new(model.trunk_mut(), cfg)?;
        let b = model.backend().clone();
        Ok(Self { trunk, score_m: b.zeros(c)?, score_v: b.zeros(c)?, cfg })
    }

    fn step(&mut self, model: &mut ScalarHeadModel<B>, lr: f32, grad_scale: f32) -> Result<()> {
        self.trunk.step(model.trunk_mut(), lr, grad_scale)?;
        let b = model.backend().clone();
        let hyper = AdamWParams {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: if decays_weight(crate::model::SCORE_WEIGHT) { self.cfg.weight_decay } else { 0.0 },
            step: self.trunk.step_count(),
            grad_scale,
        };
        let (score, grad) = model.score_and_grad_mut()?;
        b.adamw(score, grad, &mut self.score_m, &mut self.score_v, &hyper)
    }
}

/// Trains `model` on `train` for `opts.steps` steps of about `tokens_per_batch` tokens, calling
/// `on_step` after each; returns the steps' records.
pub fn train_rm<B: Backend>(
    model: &mut ScalarHeadModel<B>,
    train: &[TokenizedPair],
    opts: &RmTrainOptions,
    mut on_step: impl FnMut(&RmStep, &mut ScalarHeadModel<B>) -> Result<()>,
) -> Result<Vec<RmStep>> {
    ensure!(!train.is_empty(), "rm: no training pairs");
    // One batch per step: `grad_accum` is 1.
    if opts.grad_dtype.accumulates_in_f32(1) {
        let backend = model.backend().clone();
        store_grads_in_f32(&*backend, model.grads_mut()?)?;
    }
    let mut optimizer = RmOptimizer::new(model, opts.adam)?;
    let mut batcher = Batcher::new(train.len(), opts.seed);
    let mut records = Vec::with_capacity(opts.steps);
    for step in 1..=opts.steps {
        let ids = batcher.next_ids(opts.tokens_per_batch, |i| train[i].num_tokens());
        let batch = preference_batch(train, &ids);
        let device_batch = DeviceBatch::upload(&**model.backend(), &batch.packed)?;
        let scores = model.forward(&device_batch)?;
        let (loss, dscores) = batch_loss(opts.kind, &scores, &batch.unsafe_flags);
        ensure!(loss.is_finite(), "rm: the loss is {loss} at step {step}");
        model.zero_grad()?;
        model.backward(&device_batch, &dscores)?;
        let norm = model.grad_sum_squares()?.sqrt() as f32;
        let max = opts.grad_clip;
        let scale = if max > 0.0 && norm.is_finite() { (max / (norm + 1e-6)).min(1.0) } else { 1.0 };
        optimizer.step(model, opts.adam.lr, scale)?;
        let record = RmStep { step, loss, grad_norm: norm };
        on_step(&record, model)?;
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neg_log_sigmoid_is_stable_and_exact() {
        for x in [-50.0, -3.0, -0.1, 0.0, 0.7, 4.0, 60.0] {
            let (loss, d) = neg_log_sigmoid(x);
            let sigma = 1.0 / (1.0 + (-x).exp());
            assert!((loss - (-sigma.ln())).abs() < 1e-12 * (1.0 + loss.abs()), "{x}");
            assert!((d + (1.0 - sigma)).abs() < 1e-12, "{x}");
        }
    }
}
