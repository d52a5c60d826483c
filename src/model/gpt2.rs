//! GPT-2 forward and backward over a packed batch, generic over the backend.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;

use super::{Gpt2Config, HostWeights};
use crate::backend::{Backend, Packing};
use crate::data::PackedBatch;

/// A packed batch uploaded to a backend.
pub struct DeviceBatch<B: Backend> {
    pub tokens: B::Ids,
    pub positions: B::Ids,
    pub targets: B::Ids,
    pub packing: Packing<B>,
}

impl<B: Backend> DeviceBatch<B> {
    pub fn upload(backend: &B, batch: &PackedBatch) -> Result<Self> {
        Ok(Self {
            tokens: backend.upload_ids(&batch.tokens)?,
            positions: backend.upload_ids(&batch.positions)?,
            targets: backend.upload_ids(&batch.targets)?,
            packing: Packing::new(backend, &batch.cu_seqlens)?,
        })
    }
    pub fn num_tokens(&self) -> usize {
        self.packing.num_tokens()
    }
}

/// A GPT-2 model on a backend: parameters, their gradients, and the activations of the last
/// forward pass (kept for the backward).
pub struct Gpt2<B: Backend> {
    backend: Arc<B>,
    config: Gpt2Config,
}

impl<B: Backend> Gpt2<B> {
    /// GPT-2's initialisation: N(0, 0.02) weights, residual projections scaled by 1/√(2L), zero
    /// biases, unit LayerNorm gains. Deterministic in `seed`.
    pub fn random(backend: Arc<B>, config: Gpt2Config, seed: u64) -> Result<Self> {
        let _ = (backend, config, seed);
        todo!()
    }
    pub fn from_host(backend: Arc<B>, weights: &HostWeights) -> Result<Self> {
        let _ = (backend, weights);
        todo!()
    }
    pub fn to_host(&self) -> Result<HostWeights> {
        todo!()
    }
    /// Reads a HF model directory.
    pub fn load(backend: Arc<B>, dir: &Path) -> Result<Self> {
        let _ = (backend, dir);
        todo!()
    }
    /// Writes a HF model directory, atomically file by file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let _ = dir;
        todo!()
    }
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }
    pub fn num_params(&self) -> usize {
        todo!()
    }
    /// Forward through the LM head and the fused log-softmax-gather; returns the per-sequence
    /// log-probs `[S]` and keeps what the backward needs.
    pub fn forward(&mut self, batch: &DeviceBatch<B>) -> Result<&B::Buf> {
        let _ = batch;
        todo!()
    }
    /// Given dL/d(seq logp) `[S]`, accumulates every parameter gradient. Must follow `forward`
    /// on the same batch.
    pub fn backward(&mut self, batch: &DeviceBatch<B>, dseq: &B::Buf) -> Result<()> {
        let _ = (batch, dseq);
        todo!()
    }
    /// Each parameter tensor with its gradient, in a fixed order, named as in HF (`h.0.attn.c_attn.weight`).
    pub fn params_and_grads_mut(&mut self) -> Vec<(&str, &mut B::Buf, &B::Buf)> {
        todo!()
    }
    /// Every gradient tensor, in the order of `params_and_grads_mut`.
    pub fn grads(&self) -> Vec<&B::Buf> {
        todo!()
    }
    pub fn zero_grad(&mut self) -> Result<()> {
        todo!()
    }
    /// Logits `[V]` at the last position of `tokens` (one sequence), for generation.
    pub fn last_logits(&mut self, tokens: &[i32]) -> Result<Vec<f32>> {
        let _ = tokens;
        todo!()
    }
}
