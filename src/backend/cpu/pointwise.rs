//! Elementwise ops: GELU forward and backward, the residual add, in-place add and scale (contract:
//! `backend/ops/pointwise.rs`, kernels: `kernels/pointwise.cu`).

use anyhow::Result;
use rayon::prelude::*;

use super::simd::{exp_f32, simd_kernel};
use super::{CpuBackend, POINTWISE_CHUNK};
// The GELU constants are the kernels' (`kernels/pointwise.cu`), so both backends round alike.
use crate::backend::cuda::kernels::constants::pointwise::{GELU_CUBIC, GELU_SCALE};
use crate::backend::{checks, PointwiseOps};

/// The specification, in f64, that the fast version below and the CUDA kernels are held to. GELU's
/// backward is specified by finite differences of [`gelu`](spec::gelu); the adds and the scale are
/// exact in f32 and specified by themselves.
pub mod spec {
    /// HF `gelu_new`: `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`.
    pub fn gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    }
}

/// HF `gelu_new`, `½x(1 + tanh u)` with `u = √(2/π)(x + 0.044715x³)`, evaluated as the identical
/// `x·σ(2u)` (since `1 + tanh u = 2σ(2u)`): one exponential, and no cancellation for negative x.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    x / (1.0 + exp_f32(-2.0 * u))
}

/// `d gelu/dx = ½(1 + tanh u) + ½x(1 − tanh²u)·u'`, i.e. with `s = σ(2u)`:
/// `s + 2x·s(1 − s)·u'`, `u' = √(2/π)(1 + 3·0.044715x²)`.
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    let s = 1.0 / (1.0 + exp_f32(-2.0 * u));
    let du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x);
    s + 2.0 * x * s * (1.0 - s) * du
}

simd_kernel! {
    /// `out = gelu(inp)` over one chunk.
    fn gelu_forward_kernel(out: &mut [f32], inp: &[f32]) {
        out.iter_mut().zip(inp).for_each(|(o, &x)| *o = gelu(x));
    }
}

simd_kernel! {
    /// `dinp = dout · gelu'(inp)` over one chunk.
    fn gelu_backward_kernel(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        dinp.iter_mut().zip(inp.iter().zip(dout)).for_each(|(dx, (&x, &dy))| *dx = dy * gelu_grad(x));
    }
}

impl PointwiseOps for CpuBackend {
    fn gelu_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>) -> Result<()> {
        checks::gelu_forward(out.len(), inp.len())?;
        out.par_chunks_mut(POINTWISE_CHUNK).zip(inp.par_chunks(POINTWISE_CHUNK)).for_each(|(o, x)| {
            gelu_forward_kernel(o, x);
        });
        Ok(())
    }

    fn gelu_backward(&self, dinp: &mut Vec<f32>, inp: &Vec<f32>, dout: &Vec<f32>) -> Result<()> {
        checks::gelu_backward(dinp.len(), inp.len(), dout.len())?;
        dinp.par_chunks_mut(POINTWISE_CHUNK)
            .zip(inp.par_chunks(POINTWISE_CHUNK).zip(dout.par_chunks(POINTWISE_CHUNK)))
            .for_each(|(dx, (x, dy))| gelu_backward_kernel(dx, x, dy));
        Ok(())
    }

    fn residual_forward(&self, out: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>) -> Result<()> {
        checks::residual_forward(out.len(), a.len(), b.len())?;
        out.par_chunks_mut(POINTWISE_CHUNK)
            .zip(a.par_chunks(POINTWISE_CHUNK).zip(b.par_chunks(POINTWISE_CHUNK)))
            .for_each(|(o, (a, b))| o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = a + b));
        Ok(())
    }

    fn add_inplace(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        checks::add_inplace(dst.len(), src.len())?;
        dst.par_chunks_mut(POINTWISE_CHUNK)
            .zip(src.par_chunks(POINTWISE_CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s));
        Ok(())
    }

    fn scale(&self, buf: &mut Vec<f32>, s: f32) -> Result<()> {
        buf.par_chunks_mut(POINTWISE_CHUNK).for_each(|b| b.iter_mut().for_each(|x| *x *= s));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd::testing::{assert_same_bits, both_paths, kernel_inputs};

    #[test]
    fn simd_kernels_are_bit_identical_to_portable_ones() {
        let [x, y, _, _] = kernel_inputs();
        let len = x.len();
        let (p, d) = both_paths(|| {
            let mut out = vec![0.0; len];
            gelu_forward_kernel(&mut out, &x);
            let mut dx = vec![0.0; len];
            gelu_backward_kernel(&mut dx, &x, &y);
            [out, dx].concat()
        });
        assert_same_bits("gelu", &p, &d);
    }
}
