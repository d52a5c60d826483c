//! RMSNorm forward and backward, and the residual add fused with the RMSNorm that follows it
//! (contract: `backend/ops/rmsnorm.rs`, kernels: `kernels/rmsnorm.cu`).

use anyhow::Result;
use rayon::prelude::*;

use super::simd::{combine_lanes, lane_sum, simd_kernel, LANES};
use super::{CpuBackend, REDUCE_ROWS};
use crate::backend::{checks, RmsNormOps};

/// The specification, in f64: plain loops that the fast version below and the CUDA kernels are
/// held to. The backward is specified by finite differences of the forward, and the fused
/// residual RMSNorm by the residual add followed by this forward.
pub mod spec {
    /// RMSNorm of the rows of `inp` `[n, c]` (HF `LlamaRMSNorm`): `(out [n, c], rstd [n])` with
    /// `rstd = 1 / √(mean(x²) + eps)` and `out = x · rstd · weight`.
    pub fn forward(inp: &[f64], weight: &[f64], n: usize, c: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        for t in 0..n {
            let x = &inp[t * c..(t + 1) * c];
            let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps).sqrt();
            for j in 0..c {
                out[t * c + j] = x[j] * r * weight[j];
            }
            rstd[t] = r;
        }
        (out, rstd)
    }
}

/// The RMSNorm of one row `x` (already in memory): the mean square, then `out`; returns `rstd`.
/// Shared by [`rmsnorm_row`] and [`residual_rmsnorm_row`] and inlined into both, so it is compiled
/// at their SIMD level.
#[inline(always)]
fn rmsnorm_row_of(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) -> f32 {
    let rstd = 1.0 / (lane_sum(x, |v| v * v) / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * rstd * w;
    }
    rstd
}

simd_kernel! {
    /// One RMSNorm row: writes `out` and returns `rstd`.
    fn rmsnorm_row(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) -> f32 {
        rmsnorm_row_of(out, x, weight, eps)
    }
}

simd_kernel! {
    /// One row of the residual add fused with RMSNorm: `residual = a + b`, then the RMSNorm of the
    /// row while it is in L1; returns `rstd`. Bit-identical to the add followed by [`rmsnorm_row`].
    fn residual_rmsnorm_row(residual: &mut [f32], out: &mut [f32], a: &[f32], b: &[f32], weight: &[f32], eps: f32) -> f32 {
        residual.iter_mut().zip(a.iter().zip(b)).for_each(|(r, (&a, &b))| *r = a + b);
        rmsnorm_row_of(out, residual, weight, eps)
    }
}

simd_kernel! {
    /// One RMSNorm backward row: `dx += rstd · (dy·w − x̂ · mean(dy·w·x̂))` with `x̂ = x · rstd`;
    /// adds the row's `x̂·dy` to `dweight_part`.
    fn rmsnorm_backward_row(dx: &mut [f32], dy: &[f32], x: &[f32], weight: &[f32], rstd: f32, dweight_part: &mut [f32]) {
        let c = x.len();
        let mut acc = [0.0f32; LANES];
        let full = c - c % LANES;
        let (xs, ws) = (x[..full].chunks_exact(LANES), weight[..full].chunks_exact(LANES));
        for ((xs, ws), dys) in xs.zip(ws).zip(dy[..full].chunks_exact(LANES)) {
            for l in 0..LANES {
                acc[l] += ws[l] * dys[l] * (xs[l] * rstd);
            }
        }
        for (l, j) in (full..c).enumerate() {
            acc[l] += weight[j] * dy[j] * (x[j] * rstd);
        }
        let dnorm_norm_mean = combine_lanes(acc) / c as f32;
        for j in 0..c {
            let norm = x[j] * rstd;
            dweight_part[j] += norm * dy[j];
            dx[j] += (weight[j] * dy[j] - norm * dnorm_norm_mean) * rstd;
        }
    }
}

impl RmsNormOps for CpuBackend {
    fn rmsnorm_forward(
        &self,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::rmsnorm_forward(out.len(), rstd.len(), inp.len(), weight.len(), n, c)?;
        out.par_chunks_mut(c)
            .zip(inp.par_chunks(c))
            .zip(rstd.par_iter_mut())
            .with_min_len(16)
            .for_each(|((o, x), rs)| *rs = rmsnorm_row(o, x, weight, eps));
        Ok(())
    }

    fn residual_rmsnorm_forward(
        &self,
        residual: &mut Vec<f32>,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        weight: &Vec<f32>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::residual_rmsnorm_forward(residual.len(), out.len(), rstd.len(), a.len(), b.len(), weight.len(), n, c)?;
        // One task per row: the add and the norm touch the row while it is in cache.
        residual
            .par_chunks_mut(c)
            .zip(out.par_chunks_mut(c))
            .zip(a.par_chunks(c).zip(b.par_chunks(c)))
            .zip(rstd.par_iter_mut())
            .with_min_len(16)
            .for_each(|(((r, o), (a, b)), rs)| *rs = residual_rmsnorm_row(r, o, a, b, weight, eps));
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::rmsnorm_backward(dinp.len(), dweight.len(), dout.len(), inp.len(), weight.len(), rstd.len(), n, c)?;
        let chunk = REDUCE_ROWS * c;
        // Per chunk of rows: dinp in place, and the chunk's partial dweight, added in chunk order.
        let partials: Vec<Vec<f32>> = dinp
            .par_chunks_mut(chunk)
            .zip(dout.par_chunks(chunk))
            .zip(inp.par_chunks(chunk))
            .zip(rstd.par_chunks(REDUCE_ROWS))
            .map(|(((dx, dy), x), rs)| {
                let mut part = vec![0.0f32; c];
                for (r, &rs) in rs.iter().enumerate() {
                    let rows = (&mut dx[r * c..][..c], &dy[r * c..][..c], &x[r * c..][..c]);
                    rmsnorm_backward_row(rows.0, rows.1, rows.2, weight, rs, &mut part);
                }
                part
            })
            .collect();
        for part in &partials {
            dweight.iter_mut().zip(part).for_each(|(a, &p)| *a += p);
        }
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
            let rstd = rmsnorm_row(&mut out, &x, &w, 1e-5);
            let (mut dx, mut dw) = (y.clone(), vec![0.0; len]);
            rmsnorm_backward_row(&mut dx, &y, &x, &w, rstd, &mut dw);
            let (mut residual, mut fused) = (vec![0.0; len], vec![0.0; len]);
            let fused_rstd = residual_rmsnorm_row(&mut residual, &mut fused, &x, &y, &w, 1e-5);
            [out, dx, dw, residual, fused, vec![rstd, fused_rstd]].concat()
        });
        assert_same_bits("rmsnorm", &p, &d);
    }
}
