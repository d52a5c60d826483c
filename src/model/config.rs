//! GPT-2 model configuration, read from and written to Hugging Face's `config.json`.

use serde::{Deserialize, Serialize};

/// The fields of HF's `GPT2Config` that define the architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub layer_norm_epsilon: f32,
}

impl Gpt2Config {
    /// The tiny shape of the CPU benchmark: L=4, d=128, 4 heads, vocab 512.
    pub fn tiny() -> Self {
        Self { vocab_size: 512, n_positions: 1024, n_embd: 128, n_layer: 4, n_head: 4, layer_norm_epsilon: 1e-5 }
    }
    /// GPT-2 124M (vocab 50257, 12 layers, d=768, 12 heads).
    pub fn gpt2_124m() -> Self {
        Self { vocab_size: 50257, n_positions: 1024, n_embd: 768, n_layer: 12, n_head: 12, layer_norm_epsilon: 1e-5 }
    }
}
