//! The training loop: reference log-probs, policy step, clipping, optimizer, schedule, eval,
//! checkpoints, metrics.

pub mod generate;
pub mod metrics;
