//! The GPT-2 family: learned positions, pre-LayerNorm blocks, GELU (tanh), tied LM head, causal
//! attention inside each sequence of a packed batch. Forward and backward are written once, over
//! [`Backend`]; parameters live in Hugging Face's layout and names (`checkpoint`).

pub mod checkpoint;
pub mod config;
pub mod gpt2;

pub use checkpoint::HostWeights;
pub use config::Gpt2Config;
pub use gpt2::{DeviceBatch, Gpt2};
