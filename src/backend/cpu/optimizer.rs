//! Parameter updates, AdamW and SGD (contract: `backend/ops/optimizer.rs`, kernels:
//! `kernels/optimizer.cu`). The list forms loop over the tensors with the one-tensor code.

use anyhow::Result;
use rayon::prelude::*;

use super::simd::simd_kernel;
use super::{CpuBackend, POINTWISE_CHUNK};
use crate::backend::{checks, AdamWParams, AdamWTensor, OptimizerOps, SgdTensor};

/// The specification, in f64: plain loops that the fast version below and the CUDA kernels are
/// held to.
pub mod spec {
    use crate::backend::AdamWParams;

    /// One AdamW step in place (PyTorch's formula: decoupled weight decay, then the bias-corrected
    /// moments), with the gradient multiplied by `p.grad_scale` first.
    pub fn adamw(param: &mut [f64], grad: &[f64], m: &mut [f64], v: &mut [f64], p: &AdamWParams) {
        let (lr, b1, b2, eps, wd) = (p.lr as f64, p.beta1 as f64, p.beta2 as f64, p.eps as f64, p.weight_decay as f64);
        for i in 0..param.len() {
            let g = grad[i] * p.grad_scale as f64;
            param[i] -= lr * wd * param[i];
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let mhat = m[i] / (1.0 - b1.powi(p.step as i32));
            let vhat = v[i] / (1.0 - b2.powi(p.step as i32));
            param[i] -= lr * mhat / (vhat.sqrt() + eps);
        }
    }

    /// One SGD step in place: `param −= lr · grad_scale · grad`.
    pub fn sgd(param: &mut [f64], grad: &[f64], lr: f64, grad_scale: f64) {
        param.iter_mut().zip(grad).for_each(|(w, &g)| *w -= lr * grad_scale * g);
    }
}

/// AdamW's per-step constants.
#[derive(Clone, Copy)]
struct AdamWStep {
    beta1: f32,
    beta2: f32,
    eps: f32,
    grad_scale: f32,
    /// `lr · weight_decay`
    decay: f32,
    /// `lr / (1 − β1ᵗ)`
    step_size: f32,
    /// `1 / √(1 − β2ᵗ)`
    inv_sqrt_bc2: f32,
}

simd_kernel! {
    /// AdamW over one chunk (PyTorch semantics; see `Backend::adamw`).
    fn adamw_kernel(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], k: AdamWStep) {
        for (((w, &g), m), v) in param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * k.grad_scale;
            *w -= k.decay * *w;
            *m = k.beta1 * *m + (1.0 - k.beta1) * g;
            *v = k.beta2 * *v + (1.0 - k.beta2) * g * g;
            *w -= k.step_size * *m / (v.sqrt() * k.inv_sqrt_bc2 + k.eps);
        }
    }
}

impl OptimizerOps for CpuBackend {
    fn adamw(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        p: &AdamWParams,
    ) -> Result<()> {
        checks::adamw(param.len(), grad.len(), m.len(), v.len(), p.step)?;
        // Bias corrections in f64 (as PyTorch computes them in Python floats).
        let bc1 = 1.0 - (p.beta1 as f64).powi(p.step as i32);
        let bc2 = 1.0 - (p.beta2 as f64).powi(p.step as i32);
        let k = AdamWStep {
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            grad_scale: p.grad_scale,
            decay: p.lr * p.weight_decay,
            step_size: (p.lr as f64 / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        };
        param
            .par_chunks_mut(POINTWISE_CHUNK)
            .zip(grad.par_chunks(POINTWISE_CHUNK))
            .zip(m.par_chunks_mut(POINTWISE_CHUNK).zip(v.par_chunks_mut(POINTWISE_CHUNK)))
            .for_each(|((w, g), (m, v))| adamw_kernel(w, g, m, v, k));
        Ok(())
    }

    fn adamw_tensors(&self, tensors: &mut [AdamWTensor<'_, Vec<f32>>], p: &AdamWParams) -> Result<()> {
        checks::adamw_tensors(tensors.iter().map(|t| [t.param.len(), t.grad.len(), t.m.len(), t.v.len()]), p.step)?;
        for t in tensors {
            let p = AdamWParams { weight_decay: if t.decay { p.weight_decay } else { 0.0 }, ..*p };
            self.adamw(t.param, t.grad, t.m, t.v, &p)?;
        }
        Ok(())
    }

    fn sgd_tensors(&self, tensors: &mut [SgdTensor<'_, Vec<f32>>], lr: f32, grad_scale: f32) -> Result<()> {
        checks::sgd_tensors(tensors.iter().map(|t| [t.param.len(), t.grad.len()]))?;
        for t in tensors {
            self.sgd(t.param, t.grad, lr, grad_scale)?;
        }
        Ok(())
    }

    fn sgd(&self, param: &mut Vec<f32>, grad: &Vec<f32>, lr: f32, grad_scale: f32) -> Result<()> {
        checks::sgd(param.len(), grad.len())?;
        let step = lr * grad_scale;
        param
            .par_chunks_mut(POINTWISE_CHUNK)
            .zip(grad.par_chunks(POINTWISE_CHUNK))
            .for_each(|(w, g)| w.iter_mut().zip(g).for_each(|(w, &g)| *w -= step * g));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd::testing::{assert_same_bits, both_paths, kernel_inputs};

    #[test]
    fn simd_kernels_are_bit_identical_to_portable_ones() {
        let [x, y, w, b] = kernel_inputs();
        let (p, d) = both_paths(|| {
            let (mut param, mut m, mut v) = (x.clone(), y.clone(), w.iter().map(|a| a * a).collect::<Vec<_>>());
            let k = AdamWStep {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                grad_scale: 0.5,
                decay: 1e-4,
                step_size: 1e-3,
                inv_sqrt_bc2: 1.3,
            };
            adamw_kernel(&mut param, &b, &mut m, &mut v, k);
            [param, m, v].concat()
        });
        assert_same_bits("adamw", &p, &d);
    }
}
