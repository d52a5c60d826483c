//! What the benches share: the training-step [`Shape`] (the step shape, [`STEP_SHAPE`]),
//! criterion settings, random data, and [`kernels`], every kernel family's benchmark written once
//! over `Backend` (run by `kernels_cpu.rs` and `kernels_cuda.rs`).

#![allow(dead_code)]

pub mod kernels;

use std::time::Duration;

use criterion::Criterion;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use safedpo::backend::WeightLayout;

/// A training-step shape: the batch (sequences of equal length) and the GPT-2 model.
pub struct Shape {
    pub seqs: usize,
    pub seq_len: usize,
    pub c: usize,
    pub n_head: usize,
    pub vocab: usize,
    /// Layers and position embeddings of the model, for the optimizer and grad-norm benches.
    pub n_layer: usize,
    pub n_positions: usize,
}

/// The step shape: N = 2048 tokens (16 sequences of 128), d = 128, 4 heads, vocab 512.
pub const STEP_SHAPE: Shape =
    Shape { seqs: 16, seq_len: 128, c: 128, n_head: 4, vocab: 512, n_layer: 4, n_positions: 1024 };

impl Shape {
    pub fn n(&self) -> usize {
        self.seqs * self.seq_len
    }
    /// Parameters of the GPT-2 model of this shape (tied LM head): 989,952 for the step shape,
    /// 124,439,808 for GPT-2 small.
    pub fn params(&self) -> usize {
        let c = self.c;
        let layer = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c);
        self.vocab * c + self.n_positions * c + self.n_layer * layer + 2 * c
    }
    /// `cu_seqlens` of the batch: `seqs` sequences of `seq_len` tokens.
    pub fn cu_seqlens(&self) -> Vec<i32> {
        (0..=self.seqs).map(|i| (i * self.seq_len) as i32).collect()
    }
    /// Every matrix product of a layer plus the tied LM head: (name, in, out, layout, has bias).
    pub fn matmul_products(&self) -> [(&'static str, usize, usize, WeightLayout, bool); 5] {
        let (ch, v) = (self.c, self.vocab);
        [
            ("qkv", ch, 3 * ch, WeightLayout::InOut, true),
            ("attn_proj", ch, ch, WeightLayout::InOut, true),
            ("mlp_fc", ch, 4 * ch, WeightLayout::InOut, true),
            ("mlp_proj", 4 * ch, ch, WeightLayout::InOut, true),
            ("lm_head", ch, v, WeightLayout::OutIn, false),
        ]
    }
    /// Log-softmax-gather targets: random tokens on the last three quarters of each sequence (the
    /// response), -1 elsewhere.
    pub fn response_targets(&self, rng: &mut ChaCha8Rng) -> Vec<i32> {
        (0..self.n())
            .map(|i| {
                let p = i % self.seq_len;
                if p + 1 >= self.seq_len / 4 && p + 1 < self.seq_len {
                    rng.random_range(0..self.vocab as i32)
                } else {
                    -1
                }
            })
            .collect()
    }
}

/// Criterion settings that keep a full run within a few minutes on a small machine.
pub fn quick_criterion() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

/// `len` values uniform in `-scale..scale`.
pub fn random(len: usize, scale: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}
