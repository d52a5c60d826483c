//! Judging what a model says: reward and cost models ([`crate::model::ScalarHeadModel`]), their
//! training (`safedpo rm`, [`reward_model`]), and generation-based evaluation.

pub mod reward_model;

pub use reward_model::{batch_loss, evaluate_rm, pair_loss, train_rm, RmEval, RmKind, RmStep, RmTrainOptions};
