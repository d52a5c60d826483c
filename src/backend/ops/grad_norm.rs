//! The squared global gradient norm, `Σ x²` over many tensors (for grad-norm clipping;
//! kernels/grad_norm.cu, CPU twin in cpu/grad_norm.rs).
//!
//! The trait is the contract every backend implements. It takes any list of buffers, so it has no
//! argument checks.

use anyhow::Result;

use crate::backend::Buffers;

pub trait GradNormOps: Buffers {
    /// `Σ x²` over all the buffers, accumulated in f64 on the host side of the reduction (or a
    /// deterministic two-pass tree on a device). Returns the squared global norm.
    fn sum_squares(&self, bufs: &[&Self::Buf]) -> Result<f64>;
}
