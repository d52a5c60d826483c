//! The decoder: GPT-2 and the Llama family (Llama, Mistral, Qwen2) as configurations of one
//! pre-norm causal transformer, attending inside each sequence of a packed batch. Forward and
//! backward are written once, over [`Backend`](crate::backend::Backend); parameters live in Hugging
//! Face's layout and names (`checkpoint`).
//!
//! - `config`: the family and the sizes, read from and written to HF's `config.json`;
//!   `sliding_window`: the attention window and the layers that use it, in that file;
//! - `params`: the parameter lists, each tensor written once with its HF name and shape;
//! - `activations`: what the forward keeps for the backward, and the backward's scratch;
//! - `batch`: a packed batch on a backend, and the LM head's plan for it;
//! - `logp_parts`: what a forward computes besides the log-probs, for TRL's log-prob modifiers;
//! - `decoder`: the model: forward and backward; `block`: one block of it and the LM head;
//!   `init`: the initialisation;
//! - `weights`: the model's weights: upload, download, HF directories, the optimizer's view;
//! - `checkpoint`: model directories as HF writes them;
//! - `scalar_head`: the decoder's trunk with a scalar head (reward and cost models);
//! - `kv_cache`: decoding, token by token;
//! - `lora`, `adapters`, `lora_model`, `peft`: LoRA adapters as PEFT defines them: the spec and the
//!   host tensors, the products on a backend, the decoder with adapters, PEFT's adapter directories.

mod activations;
mod adapters;
mod batch;
mod block;
pub mod checkpoint;
pub mod config;
pub mod decoder;
mod init;
pub mod kv_cache;
mod logp_parts;
pub mod lora;
mod lora_model;
mod params;
pub mod peft;
pub mod scalar_head;
pub mod sliding_window;
mod tensor_list;
mod weights;

pub use batch::{plan_head_chunks, DeviceBatch, FROZEN_HEAD_CHUNK_ROWS, MIN_HEAD_CHUNK_ROWS};
pub use checkpoint::HostWeights;
pub use config::{DecoderConfig, Family, Rope};
pub use decoder::{random_weights, Decoder};
pub use kv_cache::KvCache;
pub use logp_parts::{ForwardExtras, RowSplit, SequenceLogps};
pub use lora::{HostAdapters, LoraSpec};
pub use scalar_head::{sequence_classifier_class, ScalarHeadModel, SCORE_WEIGHT};
pub use sliding_window::LayerAttention;
pub use weights::ParamAndGrad;
