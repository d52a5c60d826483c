//! The `Backend` trait: every op a training step needs, one method per kernel family.
//!
//! The model (`crate::model`) and the trainer (`crate::train`) are written once, generic over
//! `Backend`. Semantics are those of f32 row-major tensors; a backend may store them in another
//! precision (the CUDA backend keeps bf16 activations with fp32 master weights).
//!
//! Conventions every implementation follows:
//! - Tensors are contiguous, row-major, token-major: activations are `[n, c]` with `n` the number of
//!   tokens of the whole packed batch laid end to end.
//! - Sequences are described by `Packing`: `cu_seqlens[s]..cu_seqlens[s+1]` are the tokens of
//!   sequence `s`. Attention never crosses a sequence boundary.
//! - Methods whose doc says "accumulates" add into their output (`+=`); parameter gradients always
//!   accumulate, so gradient accumulation over micro-batches needs no extra op. All others overwrite.
//! - Targets are token ids, `-1` where a position carries no loss (prompt tokens, last token).
//! - Every method is deterministic: the same inputs give bit-identical outputs (no float atomics).

mod checks;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod ops;

pub use device::DeviceKind;

use anyhow::Result;

pub use crate::loss::{EXAMPLE_METRICS, PAIR_METRICS};
pub use ops::{
    rope_inverse_frequencies, window_start, windowed_span, AdamWTensor, AttentionOps, DecodeAttentionOps, DecodeSpans,
    EmbeddingOps, ExampleParts, GradNormOps, LayerNormOps, LogSoftmaxGatherOps, LogpParts, MatmulOps, OptimizerOps,
    PointwiseOps, PreferenceLossInputs, PreferenceLossOps, QkvLayout, RmsNormOps, RopeOps, RopeScaling, RowOps,
    SgdTensor, SwiGluOps, Window,
};

/// How a weight matrix is laid out in memory, for `matmul_*`.
///
/// HF GPT-2 stores its `Conv1D` weights `[in, out]` (`InOut`); the tied LM head multiplies by the
/// token embedding `wte`, stored `[vocab, c]`, i.e. `[out, in]` (`OutIn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `weight[i * out + o]`
    InOut,
    /// `weight[o * in + i]`
    OutIn,
}

/// The sequence layout of a packed batch, on the device and on the host.
pub struct Packing<B: Buffers + ?Sized> {
    /// `[S + 1]` sequence start offsets, device copy.
    pub cu_seqlens: B::Ids,
    /// The same offsets on the host (launch planning, CPU loops).
    pub host_cu_seqlens: Vec<i32>,
    /// Length of the longest sequence.
    pub max_seqlen: usize,
}

impl<B: Buffers + ?Sized> Packing<B> {
    pub fn new(backend: &B, cu_seqlens: &[i32]) -> Result<Self> {
        anyhow::ensure!(!cu_seqlens.is_empty() && cu_seqlens[0] == 0, "cu_seqlens must start at 0");
        let max_seqlen = cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        Ok(Self { cu_seqlens: backend.upload_ids(cu_seqlens)?, host_cu_seqlens: cu_seqlens.to_vec(), max_seqlen })
    }
    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.host_cu_seqlens.len() - 1
    }
    /// Total number of tokens.
    pub fn num_tokens(&self) -> usize {
        *self.host_cu_seqlens.last().unwrap() as usize
    }
}

/// Device memory held by a backend's allocations, in bytes (what `safedpo bench` reports as peak
/// memory on a device; the CPU backend reports none and the bench falls back to the process RSS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes allocated now.
    pub current_bytes: u64,
    /// Most bytes allocated at once since the backend was made or `reset_peak_memory` was called.
    pub peak_bytes: u64,
}

/// Hyper-parameters of one AdamW update (decoupled weight decay, bias-corrected moments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u32,
    /// Multiplies the gradient before use (grad-norm clipping folded in).
    pub grad_scale: f32,
}

/// Declares `Backend` as the union of `Buffers` and the op families, its blanket impl, and the
/// prelude, from one list (a new family is one more name here).
macro_rules! backend_union {
    ($($family:ident),+ $(,)?) => {
        /// Everything a training step needs from a device: buffers plus every op family. Implemented
        /// automatically for any type that implements all of them; the model and the trainer are
        /// generic over it.
        pub trait Backend: Buffers $(+ $family)+ {}

        impl<B: Buffers $(+ $family)+> Backend for B {}

        /// What a program that holds a concrete backend imports to call its ops: `Backend`,
        /// `Buffers` and every op family's trait.
        pub mod prelude {
            pub use super::{Backend, Buffers $(, $family)+};
        }
    };
}

backend_union!(
    EmbeddingOps,
    LayerNormOps,
    RmsNormOps,
    MatmulOps,
    AttentionOps,
    DecodeAttentionOps,
    RopeOps,
    PointwiseOps,
    SwiGluOps,
    RowOps,
    LogSoftmaxGatherOps,
    PreferenceLossOps,
    OptimizerOps,
    GradNormOps,
);

/// Buffers on a backend's device: allocation, copies to and from the host, and the memory counters.
/// Every op family builds on it.
pub trait Buffers: Send + Sync {
    /// A float tensor (f32 semantics).
    type Buf: Send + Sync;
    /// An i32 tensor (token ids, targets, offsets, flags).
    type Ids: Send + Sync;

    /// Human-readable name, e.g. "cpu (2 threads)" or "cuda:0 NVIDIA H100 (bf16)".
    fn name(&self) -> String;

    // ---- memory ------------------------------------------------------------------------------
    /// A new buffer of `len` zeros.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Uploads a tensor that no optimizer will ever update (a frozen reference model's weights): a
    /// backend with master copies may keep only the storage-precision values. `download` of such a
    /// buffer returns those values.
    fn upload_frozen(&self, data: &[f32]) -> Result<Self::Buf> {
        self.upload(data)
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Whether `buf` carries an fp32 master copy beside its storage (the CUDA backend's bf16
    /// parameters; never on the CPU). Collectives check that every rank's buffers agree.
    fn has_master(&self, _buf: &Self::Buf) -> bool {
        false
    }
    /// Frees `buf`'s master copy, if it has one; its values stay (ZeRO-1 keeps a parameter's master
    /// on its owner rank only).
    fn drop_master(&self, _buf: &mut Self::Buf) {}
    /// Stores `buf` in f32 from now on, its values converted: the ops that accumulate into it then
    /// add in f32 (a trainer's gradients beside bf16 parameters, `train.grad_dtype`). Nothing to do
    /// where every float is f32 already (the CPU).
    fn store_in_f32(&self, _buf: &mut Self::Buf) -> Result<()> {
        Ok(())
    }
    /// `*buf = upload(data)`, except that a buffer stored in f32 stays so (`store_in_f32`): how a
    /// collective writes a sum back.
    fn replace(&self, buf: &mut Self::Buf, data: &[f32]) -> Result<()> {
        *buf = self.upload(data)?;
        Ok(())
    }
    fn upload_ids(&self, ids: &[i32]) -> Result<Self::Ids>;
    fn download_ids(&self, ids: &Self::Ids) -> Result<Vec<i32>>;
    /// Number of elements.
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()>;
    /// Sets `buf`'s length to `len`, reusing its storage when it is large enough (so a model whose
    /// batches change shape every step does not reallocate). Contents are unspecified afterwards.
    fn resize(&self, buf: &mut Self::Buf, len: usize) -> Result<()>;
    /// `dst = src` (same length).
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// Waits for all queued work (no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
    /// Bytes this backend's buffers hold on its device, now and at the peak; `None` where the
    /// backend does not count them (the CPU: its buffers are the process's heap).
    fn memory_stats(&self) -> Option<MemoryStats> {
        None
    }
    /// Restarts the peak of `memory_stats` from the current allocation.
    fn reset_peak_memory(&self) {}
}
