//! Judging what a model says: reward and cost models ([`crate::model::ScalarHeadModel`]), their
//! losses and training loop ([`reward_model`]), `safedpo rm` ([`rm_run`]), and judged evaluation of
//! what a policy generates ([`generate_eval`], `safedpo eval --generate`), and the paper's
//! comparison of alignment methods on the demo's data ([`compare`], `safedpo demo --compare`).

pub mod compare;
pub mod compare_model;
pub mod generate_eval;
pub mod reward_model;
pub mod rm_run;

pub use reward_model::{batch_loss, evaluate_rm, pair_loss, train_rm, RmEval, RmKind, RmStep, RmTrainOptions};
pub use rm_run::{run_rm, selection_for, RmSummary};
