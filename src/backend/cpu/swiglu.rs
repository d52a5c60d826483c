//! SwiGLU forward and backward over the gate and up activations side by side, `[n, 2f]` (contract:
//! `backend/ops/swiglu.rs`, kernels: `kernels/swiglu.cu`). One task per block of rows.

use anyhow::Result;
use rayon::prelude::*;

use super::simd::{exp_f32, simd_kernel};
use super::{CpuBackend, POINTWISE_CHUNK};
use crate::backend::{checks, SwiGluOps};

/// The specification, in f64, that the fast version below and the CUDA kernels are held to. The
/// backward is specified by finite differences of the forward.
pub mod spec {
    /// `silu(g) = g · σ(g) = g / (1 + e⁻ᵍ)`.
    pub fn silu(g: f64) -> f64 {
        g / (1.0 + (-g).exp())
    }

    /// `out [n, f]` with `out[t, j] = silu(gate[t, j]) · up[t, j]`, `inp [n, 2f]` holding row `t` as
    /// `[gate_t | up_t]`.
    pub fn forward(inp: &[f64], n: usize, f: usize) -> Vec<f64> {
        let mut out = vec![0.0; n * f];
        for t in 0..n {
            for j in 0..f {
                out[t * f + j] = silu(inp[t * 2 * f + j]) * inp[t * 2 * f + f + j];
            }
        }
        out
    }
}

/// `σ(g)`, with the vectorisable exponential.
#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-g))
}

simd_kernel! {
    /// `out = silu(gate) · up` over one row.
    fn swiglu_forward_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

simd_kernel! {
    /// `dgate = dout · up · σ(g) · (1 + g(1 − σ(g)))`, `dup = dout · silu(g)` over one row.
    fn swiglu_backward_row(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]) {
        let grads = dgate.iter_mut().zip(dup.iter_mut());
        for (((dg, du), (&g, &u)), &dy) in grads.zip(gate.iter().zip(up)).zip(dout) {
            let s = sigmoid(g);
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
            *du = dy * (g * s);
        }
    }
}

impl SwiGluOps for CpuBackend {
    fn swiglu_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>, n: usize, f: usize) -> Result<()> {
        checks::swiglu_forward(out.len(), inp.len(), n, f)?;
        if f == 0 {
            return Ok(());
        }
        let rows = (POINTWISE_CHUNK / f).max(1);
        out.par_chunks_mut(f).zip(inp.par_chunks(2 * f)).with_min_len(rows).for_each(|(o, x)| {
            let (gate, up) = x.split_at(f);
            swiglu_forward_row(o, gate, up);
        });
        Ok(())
    }

    fn swiglu_backward(&self, dinp: &mut Vec<f32>, inp: &Vec<f32>, dout: &Vec<f32>, n: usize, f: usize) -> Result<()> {
        checks::swiglu_backward(dinp.len(), inp.len(), dout.len(), n, f)?;
        if f == 0 {
            return Ok(());
        }
        let rows = (POINTWISE_CHUNK / f).max(1);
        dinp.par_chunks_mut(2 * f).zip(inp.par_chunks(2 * f)).zip(dout.par_chunks(f)).with_min_len(rows).for_each(
            |((dx, x), dy)| {
                let ((dgate, dup), (gate, up)) = (dx.split_at_mut(f), x.split_at(f));
                swiglu_backward_row(dgate, dup, gate, up, dy);
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd::testing::{assert_same_bits, both_paths, kernel_inputs};

    #[test]
    fn simd_kernels_are_bit_identical_to_portable_ones() {
        let [x, y, w, _] = kernel_inputs();
        let len = x.len();
        let (p, d) = both_paths(|| {
            let mut out = vec![0.0; len];
            swiglu_forward_row(&mut out, &x, &y);
            let (mut dgate, mut dup) = (vec![0.0; len], vec![0.0; len]);
            swiglu_backward_row(&mut dgate, &mut dup, &x, &y, &w);
            [out, dgate, dup].concat()
        });
        assert_same_bits("swiglu", &p, &d);
    }
}
