//! The sum of squares behind the global gradient norm (contract: `backend/ops/grad_norm.rs`, kernel:
//! `kernels/grad_norm.cu`).

use anyhow::Result;
use rayon::prelude::*;

use super::{CpuBackend, POINTWISE_CHUNK};
use crate::backend::GradNormOps;

/// The specification, in f64: a plain loop that the fast version below and the CUDA kernels are
/// held to.
pub mod spec {
    /// `Σ x²` over every element of every buffer.
    pub fn sum_squares(bufs: &[&[f32]]) -> f64 {
        bufs.iter().flat_map(|b| b.iter()).map(|&x| (x as f64).powi(2)).sum()
    }
}

impl GradNormOps for CpuBackend {
    fn sum_squares(&self, bufs: &[&Vec<f32>]) -> Result<f64> {
        // Fixed chunks, each summed in f64, partials added in order: deterministic.
        let mut total = 0.0f64;
        for buf in bufs {
            let partials: Vec<f64> = buf
                .par_chunks(POINTWISE_CHUNK)
                .map(|chunk| chunk.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            total += partials.iter().sum::<f64>();
        }
        Ok(total)
    }
}
