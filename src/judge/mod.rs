//! Judging what a model says: reward and cost models ([`crate::model::ScalarHeadModel`]), their
//! losses and training loop ([`reward_model`]) and `safedpo rm` ([`rm_run`]).

pub mod reward_model;
pub mod rm_run;

pub use reward_model::{batch_loss, evaluate_rm, pair_loss, train_rm, RmEval, RmKind, RmStep, RmTrainOptions};
pub use rm_run::{run_rm, selection_for, RmSummary};
