//! safedpo: SafeDPO and the DPO family on a small, fast transformer engine.
//!
//! The pieces, in the order a training step uses them:
//! - [`data`]: preference pairs, the SafeDPO transform T(D), templates, tokenizers, packing;
//! - [`model`]: the GPT-2 family, forward and backward, written once over [`backend::Backend`];
//! - [`backend`]: the CPU f32 reference and the CUDA backend (a GPU or the emulated device);
//! - [`loss`]: the preference objectives;
//! - [`optim`]: AdamW, SGD, grad-norm clipping, the learning-rate schedule;
//! - [`train`]: the loop, reference log-probs, eval, checkpoints, metrics.

pub mod backend;
pub mod bench;
pub mod config;
pub mod data;
pub mod loss;
pub mod model;
pub mod optim;
pub mod train;
pub mod util;

pub use backend::Backend;
