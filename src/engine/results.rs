//! What the engine gives back: plain host values, chosen and rejected in separate vectors, in the
//! order of the pairs given.

use crate::loss::{Objective, PAIR_METRICS};

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
