//! LayerNorm forward and backward, and the residual add fused with the LayerNorm that follows it
//! (contract: `backend/ops/layernorm.rs`, kernels: `kernels/layernorm.cu`).

use anyhow::Result;
use rayon::prelude::*;

use super::simd::{add_lane_sum, combine_lanes, lane_sum, simd_kernel, LANES};
use super::{CpuBackend, REDUCE_ROWS};
use crate::backend::{checks, LayerNormOps};

/// The specification, in f64: plain loops that the fast version below and the CUDA kernels are
/// held to. The backward is specified by finite differences of the forward, and the fused
/// residual LayerNorm by the residual add followed by this forward.
pub mod spec {
    /// LayerNorm of the rows of `inp` `[n, c]`: `(out [n, c], mean [n], rstd [n])`, with the
    /// biased variance and `rstd = 1 / √(var + eps)`.
    pub fn forward(
        inp: &[f64],
        weight: &[f64],
        bias: &[f64],
        n: usize,
        c: usize,
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        for t in 0..n {
            let x = &inp[t * c..(t + 1) * c];
            let m = x.iter().sum::<f64>() / c as f64;
            let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
            let r = 1.0 / (var + eps).sqrt();
            for j in 0..c {
                out[t * c + j] = (x[j] - m) * r * weight[j] + bias[j];
            }
            mean[t] = m;
            rstd[t] = r;
        }
        (out, mean, rstd)
    }
}

/// The rest of a LayerNorm row once its sum is known: the mean, the centred variance (a second
/// pass, as llm.c: no cancellation for rows far from zero), then `out`; returns `(mean, rstd)`.
/// Shared by [`layernorm_row`] and [`residual_layernorm_row`] and inlined into both, so it is
/// compiled at their SIMD level.
#[inline(always)]
fn layernorm_row_from_sum(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32, sum: f32) -> (f32, f32) {
    let c = x.len() as f32;
    let mean = sum / c;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / c;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * rstd * w + b;
    }
    (mean, rstd)
}

simd_kernel! {
    /// One LayerNorm row: writes `out` and returns `(mean, rstd)`.
    fn layernorm_row(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> (f32, f32) {
        layernorm_row_from_sum(out, x, weight, bias, eps, lane_sum(x, |v| v))
    }
}

simd_kernel! {
    /// One row of the residual add fused with LayerNorm: `residual = a + b`, summed as it is
    /// written, then the rest of the LayerNorm while the row is in L1; returns `(mean, rstd)`.
    /// Bit-identical to the add followed by [`layernorm_row`].
    fn residual_layernorm_row(
        residual: &mut [f32],
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
    ) -> (f32, f32) {
        let sum = add_lane_sum(residual, a, b);
        layernorm_row_from_sum(out, residual, weight, bias, eps, sum)
    }
}

simd_kernel! {
    /// One LayerNorm backward row (llm.c): `dx += rstd · (dy·w − mean(dy·w) − x̂ · mean(dy·w·x̂))`
    /// with `x̂ = (x − mean) · rstd`; adds the row's `x̂·dy` to `dweight_part` and `dy` to
    /// `dbias_part`.
    fn layernorm_backward_row(
        dx: &mut [f32],
        dy: &[f32],
        x: &[f32],
        weight: &[f32],
        mean: f32,
        rstd: f32,
        dweight_part: &mut [f32],
        dbias_part: &mut [f32],
    ) {
        let c = x.len();
        let (mut acc_dnorm, mut acc_dnorm_norm) = ([0.0f32; LANES], [0.0f32; LANES]);
        let full = c - c % LANES;
        let (xs, ws) = (x[..full].chunks_exact(LANES), weight[..full].chunks_exact(LANES));
        for ((xs, ws), dys) in xs.zip(ws).zip(dy[..full].chunks_exact(LANES)) {
            for l in 0..LANES {
                let dnorm = ws[l] * dys[l];
                acc_dnorm[l] += dnorm;
                acc_dnorm_norm[l] += dnorm * ((xs[l] - mean) * rstd);
            }
        }
        for (l, j) in (full..c).enumerate() {
            let dnorm = weight[j] * dy[j];
            acc_dnorm[l] += dnorm;
            acc_dnorm_norm[l] += dnorm * ((x[j] - mean) * rstd);
        }
        let dnorm_mean = combine_lanes(acc_dnorm) / c as f32;
        let dnorm_norm_mean = combine_lanes(acc_dnorm_norm) / c as f32;
        for j in 0..c {
            let norm = (x[j] - mean) * rstd;
            let dnorm = weight[j] * dy[j];
            dbias_part[j] += dy[j];
            dweight_part[j] += norm * dy[j];
            dx[j] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rstd;
        }
    }
}

impl LayerNormOps for CpuBackend {
    fn layernorm_forward(
        &self,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::layernorm_forward(out.len(), mean.len(), rstd.len(), inp.len(), weight.len(), bias.len(), n, c)?;
        out.par_chunks_mut(c)
            .zip(inp.par_chunks(c))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .with_min_len(16)
            .for_each(|((o, x), (mu, rs))| (*mu, *rs) = layernorm_row(o, x, weight, bias, eps));
        Ok(())
    }

    fn residual_layernorm_forward(
        &self,
        residual: &mut Vec<f32>,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::residual_layernorm_forward(
            residual.len(),
            out.len(),
            mean.len(),
            rstd.len(),
            a.len(),
            b.len(),
            weight.len(),
            bias.len(),
            n,
            c,
        )?;
        // One task per row: the add and both LayerNorm passes touch the row while it is in cache,
        // instead of a pass over the whole residual stream for the add and another for the norm.
        residual
            .par_chunks_mut(c)
            .zip(out.par_chunks_mut(c))
            .zip(a.par_chunks(c).zip(b.par_chunks(c)))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .with_min_len(16)
            .for_each(|(((r, o), (a, b)), (mu, rs))| {
                (*mu, *rs) = residual_layernorm_row(r, o, a, b, weight, bias, eps)
            });
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dbias: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::layernorm_backward(
            dinp.len(),
            dweight.len(),
            dbias.len(),
            dout.len(),
            inp.len(),
            weight.len(),
            mean.len(),
            rstd.len(),
            n,
            c,
        )?;
        let chunk = REDUCE_ROWS * c;
        // Per chunk of rows: dinp in place, and the chunk's partial [dweight | dbias].
        let partials: Vec<Vec<f32>> = dinp
            .par_chunks_mut(chunk)
            .zip(dout.par_chunks(chunk))
            .zip(inp.par_chunks(chunk))
            .zip(mean.par_chunks(REDUCE_ROWS).zip(rstd.par_chunks(REDUCE_ROWS)))
            .map(|(((dx, dy), x), (mu, rs))| {
                let mut part = vec![0.0f32; 2 * c];
                let (pw, pb) = part.split_at_mut(c);
                for r in 0..mu.len() {
                    let rows = (&mut dx[r * c..][..c], &dy[r * c..][..c], &x[r * c..][..c]);
                    layernorm_backward_row(rows.0, rows.1, rows.2, weight, mu[r], rs[r], pw, pb);
                }
                part
            })
            .collect();
        for part in &partials {
            dweight.iter_mut().zip(&part[..c]).for_each(|(a, &p)| *a += p);
            dbias.iter_mut().zip(&part[c..]).for_each(|(a, &p)| *a += p);
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
        let [x, y, w, b] = kernel_inputs();
        let len = x.len();
        let (p, d) = both_paths(|| {
            let mut out = vec![0.0; len];
            let (mean, rstd) = layernorm_row(&mut out, &x, &w, &b, 1e-5);
            let (mut dx, mut dw, mut db) = (y.clone(), vec![0.0; len], vec![0.0; len]);
            layernorm_backward_row(&mut dx, &y, &x, &w, mean, rstd, &mut dw, &mut db);
            [out, dx, dw, db, vec![mean, rstd]].concat()
        });
        assert_same_bits("layernorm", &p, &d);

        let (p, d) = both_paths(|| {
            let (mut residual, mut out) = (vec![0.0; len], vec![0.0; len]);
            let (mean, rstd) = residual_layernorm_row(&mut residual, &mut out, &x, &y, &w, &b, 1e-5);
            [residual, out, vec![mean, rstd]].concat()
        });
        assert_same_bits("residual layernorm", &p, &d);
    }
}
