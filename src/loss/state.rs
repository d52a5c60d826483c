//! The trainer state the loss reads ([`LossState`]): `bco_pair`'s running reward mean
//! ([`RunningMean`]), updated by the trainer before each loss call and saved with its checkpoints.

use super::objectives::Objective;

/// `bco_pair`'s running reward mean δ, TRL's `RunningMoments` (trl < 1.0, `trl/trainer/utils.py`) as
/// its `bco_pair` used it: one update per loss call with that call's mean reward (the mean of
/// `β x_c` and `β x_r` over the micro-batch, one sample per call), starting from mean 0 and count
/// 1e-24; the loss then uses the updated mean. Saved with the trainer's checkpoint state. On N
/// data-parallel ranks every rank replays the whole step's samples in order (see
/// `train::data_parallel`), so the mean is one rank's.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunningMean {
    pub mean: f64,
    pub count: f64,
}

impl Default for RunningMean {
    fn default() -> Self {
        RunningMean { mean: 0.0, count: 1e-24 }
    }
}

impl RunningMean {
    /// Adds one sample and returns the new mean.
    pub fn update(&mut self, sample: f64) -> f64 {
        let total = self.count + 1.0;
        self.mean += (sample - self.mean) / total;
        self.count = total;
        self.mean
    }
}

/// What the loss reads besides the batch and the objective: trainer state, updated by the trainer
/// between loss calls (see [`RunningMean`]). The default is the state before the first step.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossState {
    /// `bco_pair`'s running reward mean, used when the objective has `bco_running_mean`.
    pub bco_reward_mean: RunningMean,
}

impl LossState {
    /// The reward shift δ the `bco_pair` terms of `objective` subtract (0 without `bco_running_mean`).
    pub fn bco_shift(&self, objective: &Objective) -> f64 {
        match objective {
            Objective::Combination(c) if c.bco_running_mean => self.bco_reward_mean.mean,
            _ => 0.0,
        }
    }

    /// Whether `objective` reads the state, so that `before_loss` needs the micro-batch's log-probs.
    pub fn is_read_by(objective: &Objective) -> bool {
        matches!(objective, Objective::Combination(c) if c.bco_running_mean)
    }

    /// Before a loss call on a micro-batch with sequence log-probs `policy` and `reference` (`[2P]`,
    /// chosen and rejected per pair): adds its mean reward (see [`LossState::reward_sample`]) to the
    /// running mean, where `objective` uses it.
    pub fn before_loss(&mut self, objective: &Objective, policy: &[f32], reference: &[f32]) {
        if let Some(sample) = Self::reward_sample(objective, policy, reference) {
            self.add_reward_sample(sample);
        }
    }

    /// The sample a micro-batch with sequence log-probs `policy` and `reference` (`[2P]`) adds to the
    /// running mean: its mean reward `β(π − r)` (TRL's `cat(chosen_rewards, rejected_rewards).mean()`),
    /// where `objective` uses it and the micro-batch has pairs.
    pub fn reward_sample(objective: &Objective, policy: &[f32], reference: &[f32]) -> Option<f64> {
        if !Self::is_read_by(objective) || policy.is_empty() {
            return None;
        }
        let beta = objective.beta();
        let total: f64 = policy.iter().zip(reference).map(|(&p, &r)| beta * (f64::from(p) - f64::from(r))).sum();
        Some(total / policy.len() as f64)
    }

    /// Adds one micro-batch's sample (see [`LossState::reward_sample`]) to the running mean.
    pub fn add_reward_sample(&mut self, sample: f64) {
        self.bco_reward_mean.update(sample);
    }
}
