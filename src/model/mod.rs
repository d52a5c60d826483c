//! The GPT-2 family: learned positions, pre-LayerNorm blocks, GELU (tanh), tied LM head, causal
//! attention inside each sequence of a packed batch. Forward and backward are written once, over
//! [`Backend`](crate::backend::Backend); parameters live in Hugging Face's layout and names
//! (`checkpoint`).
//!
//! - `config`: the architecture's sizes, read from and written to HF's `config.json`;
//! - `params`: the parameter lists, each tensor written once with its HF name and shape;
//! - `activations`: what the forward keeps for the backward, and the backward's scratch;
//! - `batch`: a packed batch on a backend, and the LM head's plan for it;
//! - `gpt2`: the model: forward, backward, initialisation;
//! - `weights`: the model's weights: upload, download, HF directories, the optimizer's view;
//! - `checkpoint`: model directories as HF writes them.

mod activations;
mod batch;
pub mod checkpoint;
pub mod config;
pub mod gpt2;
mod params;
mod tensor_list;
mod weights;

pub use batch::{plan_head_chunks, DeviceBatch, FROZEN_HEAD_CHUNK_ROWS, MIN_HEAD_CHUNK_ROWS};
pub use checkpoint::HostWeights;
pub use config::Gpt2Config;
pub use gpt2::{random_weights, Gpt2};
pub use weights::ParamAndGrad;
