//! What the engine gives back: plain host values, chosen and rejected in separate vectors, in the
//! order of the pairs given.

use crate::loss::{Objective, EXAMPLE_METRICS, PAIR_METRICS};
use crate::train::unpaired::UnpairedOutput;

/// Sequence log-probs of one model, one value per pair and side: the sum over the response tokens
/// (EOS included) of `log p(token | everything before it)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Logps {
    /// The chosen (preferred) responses'.
    pub chosen: Vec<f32>,
    /// The rejected responses'.
    pub rejected: Vec<f32>,
}

impl Logps {
    /// Splits the `[2P]` layout of a packed batch (chosen, rejected per pair).
    pub(crate) fn from_interleaved(values: &[f32]) -> Self {
        let chosen = values.iter().step_by(2).copied().collect();
        let rejected = values.iter().skip(1).step_by(2).copied().collect();
        Self { chosen, rejected }
    }

    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.chosen.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }
}

/// The policy's log-probs and, when the engine has a reference, the reference's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairLogps {
    /// The policy's.
    pub policy: Logps,
    /// `None` when no reference is loaded.
    pub reference: Option<Logps>,
}

/// Per-pair metrics of an objective, one value per pair in each vector.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairMetrics {
    /// The pair's loss.
    pub loss: Vec<f32>,
    /// The chosen response's implicit reward (DPO: `β(πc − rc)`; see [`crate::loss`]).
    pub reward_chosen: Vec<f32>,
    /// The rejected response's implicit reward.
    pub reward_rejected: Vec<f32>,
    /// `reward_chosen − reward_rejected`.
    pub margin: Vec<f32>,
    /// 1 when the chosen reward is the larger, else 0.
    pub accuracy: Vec<f32>,
}

impl PairMetrics {
    /// Splits the `[P, PAIR_METRICS]` rows the preference-loss kernel writes.
    pub(crate) fn from_rows(rows: &[f32]) -> Self {
        let column = |k: usize| rows.chunks_exact(PAIR_METRICS).map(|row| row[k]).collect();
        Self {
            loss: column(0),
            reward_chosen: column(1),
            reward_rejected: column(2),
            margin: column(3),
            accuracy: column(4),
        }
    }

    /// The mean loss over the pairs (summed in f64), the quantity a step minimises.
    pub fn mean_loss(&self) -> f32 {
        mean(&self.loss)
    }

    /// The fraction of pairs whose chosen reward is the larger.
    pub fn mean_accuracy(&self) -> f32 {
        mean(&self.accuracy)
    }
}

fn mean(values: &[f32]) -> f32 {
    (values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len().max(1) as f64) as f32
}

/// [`crate::Engine::loss`]'s result.
#[derive(Clone, Debug, PartialEq)]
pub struct LossReport {
    /// The objective the loss is of.
    pub objective: Objective,
    /// The mean loss over the pairs.
    pub loss: f32,
    /// The log-probs the loss came from.
    pub logps: PairLogps,
    /// Each pair's loss, rewards, margin and accuracy.
    pub metrics: PairMetrics,
}

/// [`crate::Engine::train_step`]'s result.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Optimizer steps taken, this one included.
    pub step: u32,
    /// The mean loss over the pairs, before the update.
    pub loss: f32,
    /// The global gradient norm, before clipping.
    pub grad_norm: f32,
    /// The learning rate the step used.
    pub lr: f32,
    /// The policy's log-probs before the update.
    pub policy_logps: Logps,
    /// Each pair's loss, rewards, margin and accuracy, before the update.
    pub metrics: PairMetrics,
}

/// Per-example values of an objective on unpaired examples (KTO), one value per example in each
/// vector, in the order of the examples given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExampleMetrics {
    /// The example's loss, weighted by λ_D or λ_U (TRL's `losses` entry).
    pub loss: Vec<f32>,
    /// Its implicit reward `β(π − r)`, without the safety shift (TRL's chosen or rejected reward).
    pub reward: Vec<f32>,
    /// The policy's sequence log-prob of its completion.
    pub policy_logps: Vec<f32>,
}

impl ExampleMetrics {
    /// The examples of the loss op's outputs, in order.
    pub(crate) fn from_outputs<'a>(outputs: impl IntoIterator<Item = &'a UnpairedOutput>) -> Self {
        let mut out = Self::default();
        for output in outputs {
            for row in output.metrics.chunks_exact(EXAMPLE_METRICS) {
                out.loss.push(row[0]);
                out.reward.push(row[1]);
            }
            out.policy_logps.extend(&output.logps);
        }
        out
    }

    /// The mean loss over the examples (summed in f64), the quantity a step minimises.
    pub fn mean_loss(&self) -> f32 {
        mean(&self.loss)
    }
}

/// [`crate::Engine::unpaired_loss`]'s result.
#[derive(Clone, Debug, PartialEq)]
pub struct UnpairedLossReport {
    /// The objective the loss is of.
    pub objective: Objective,
    /// The mean loss over the examples.
    pub loss: f32,
    /// KTO's KL estimate of the batch (0 for `apo_zero_unpaired`).
    pub kl: f32,
    /// Each example's loss, reward and policy log-prob.
    pub metrics: ExampleMetrics,
}

/// [`crate::Engine::unpaired_train_step`]'s result.
#[derive(Clone, Debug, PartialEq)]
pub struct UnpairedStepReport {
    /// Optimizer steps taken, this one included.
    pub step: u32,
    /// The mean loss over the examples, before the update.
    pub loss: f32,
    /// The mean of the micro-batches' KL estimates.
    pub kl: f32,
    /// The global gradient norm, before clipping.
    pub grad_norm: f32,
    /// The learning rate the step used.
    pub lr: f32,
    /// Each example's loss, reward and policy log-prob, before the update.
    pub metrics: ExampleMetrics,
}
