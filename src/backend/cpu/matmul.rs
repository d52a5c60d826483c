//! Matrix products with a weight, `out = inp · W (+ bias)`, and their backward (contract:
//! `backend/ops/matmul.rs`; on the device, cuBLASLt). Products through `cpu::gemm`.

use anyhow::Result;
use rayon::prelude::*;

use super::gemm::{accumulate_weight_grad, gemm_f32, Mat};
use super::{CpuBackend, REDUCE_ROWS};
use crate::backend::{checks, MatmulOps, WeightLayout};

/// The specification, in f64: plain loops that the fast version below and the CUDA backend are
/// held to. The backward is specified by finite differences of the forward; [`weight_grad`](spec::weight_grad) is
/// its weight part in closed form, for shapes too large to perturb.
pub mod spec {
    use crate::backend::WeightLayout;

    /// `out[t, o] = bias[o] + Σ_i inp[t, i] · W(i, o)`, `[n, oc]`, with `W` stored as `layout` says.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        inp: &[f64],
        weight: &[f64],
        bias: Option<&[f64]>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Vec<f64> {
        let mut out = vec![0.0; n * oc];
        for t in 0..n {
            for o in 0..oc {
                let mut acc = bias.map_or(0.0, |b| b[o]);
                for i in 0..ic {
                    let wv = match layout {
                        WeightLayout::InOut => weight[i * oc + o],
                        WeightLayout::OutIn => weight[o * ic + i],
                    };
                    acc += inp[t * ic + i] * wv;
                }
                out[t * oc + o] = acc;
            }
        }
        out
    }

    /// The weight gradient of `out = inp · W` summed over `n` tokens, in `layout`: `inpᵀ · dout`.
    pub fn weight_grad(inp: &[f64], dout: &[f64], n: usize, ic: usize, oc: usize, layout: WeightLayout) -> Vec<f64> {
        let mut dw = vec![0.0; ic * oc];
        for t in 0..n {
            for i in 0..ic {
                for o in 0..oc {
                    let at = match layout {
                        WeightLayout::InOut => i * oc + o,
                        WeightLayout::OutIn => o * ic + i,
                    };
                    dw[at] += inp[t * ic + i] * dout[t * oc + o];
                }
            }
        }
        dw
    }
}

impl MatmulOps for CpuBackend {
    fn matmul_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        checks::matmul_forward(out.len(), inp.len(), weight.len(), bias.map(Vec::len), n, ic, oc)?;
        if let Some(b) = bias {
            if oc > 0 {
                out.par_chunks_mut(oc).with_min_len(64).for_each(|row| row.copy_from_slice(b));
            }
        }
        // W as a [ic, oc] matrix: element (i, o).
        let w = match layout {
            WeightLayout::InOut => Mat::new(weight.as_ptr(), oc, 1),
            WeightLayout::OutIn => Mat::new(weight.as_ptr(), 1, ic),
        };
        // SAFETY: shapes checked above; `out` is a distinct allocation.
        unsafe {
            gemm_f32(n, oc, ic, out.as_mut_ptr(), oc, bias.is_some(), Mat::new(inp.as_ptr(), ic, 1), w, 1.0, true);
        }
        Ok(())
    }

    // `matmul_bias_gelu_forward` keeps the trait's unfused default. A fusion over row blocks (gemm
    // on 128–2048-row blocks, then the GELU row kernel on each block while it is in L2) gave the
    // same bits but measured no faster (0.90 vs 0.89 ms at 2048 × 128 → 512): the GELU is bound by
    // its arithmetic, not by memory, and each block repacks the weight. (On bits: gemm 0.19's
    // per-row sums do depend on the rows in a call on its one-output-column gemv path, seen in a
    // test, and for k > 512 on its small-matrix blocking of k, by its source; not on its blocked
    // path, where the fusion was bit-identical on odd shapes.)

    /// `dinp`, `dweight` and `dbias` are independent and computed side by side (`rayon::join`), so
    /// that one fills the others' idle moments at gemm's internal barriers; no bits change.
    fn matmul_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        let dbias_len = dbias.as_ref().map(|db| db.len());
        checks::matmul_backward(dinp.len(), dweight.len(), dbias_len, dout.len(), inp.len(), weight.len(), n, ic, oc)?;
        let dout_m = Mat::new(dout.as_ptr(), oc, 1);
        let inp_m = Mat::new(inp.as_ptr(), ic, 1);
        // dinp[n, ic] = dout[n, oc] · Wᵀ, Wᵀ element (o, i) = W(i, o).
        let wt = match layout {
            WeightLayout::InOut => Mat::new(weight.as_ptr(), 1, oc),
            WeightLayout::OutIn => Mat::new(weight.as_ptr(), ic, 1),
        };
        // dW[ic, oc] += inpᵀ · dout (InOut), or dW[oc, ic] += doutᵀ · inp (OutIn).
        let (w_rows, w_cols, w_lhs, w_rhs) = match layout {
            WeightLayout::InOut => (ic, oc, Mat::new(inp.as_ptr(), 1, ic), dout_m),
            WeightLayout::OutIn => (oc, ic, Mat::new(dout.as_ptr(), 1, oc), inp_m),
        };
        // SAFETY (both products): shapes checked above; destinations are distinct allocations from
        // the sources.
        let dinp_task = || unsafe { gemm_f32(n, ic, oc, dinp.as_mut_ptr(), ic, false, dout_m, wt, 1.0, true) };
        let dweight_task =
            || unsafe { accumulate_weight_grad(w_rows, w_cols, n, dweight.as_mut_ptr(), w_cols, w_lhs, w_rhs) };
        let dbias_task = || {
            if let (Some(db), true) = (dbias, oc > 0) {
                accumulate_column_sums(db, dout, oc);
            }
        };
        rayon::join(dinp_task, || rayon::join(dweight_task, dbias_task));
        Ok(())
    }
}

/// `acc[j] += Σ_rows rows[r, j]` over a row-major `[rows, width]` matrix, deterministically.
fn accumulate_column_sums(acc: &mut [f32], rows: &[f32], width: usize) {
    let partials: Vec<Vec<f32>> = rows
        .par_chunks(REDUCE_ROWS * width)
        .map(|chunk| {
            let mut part = vec![0.0f32; width];
            for row in chunk.chunks_exact(width) {
                part.iter_mut().zip(row).for_each(|(p, &x)| *p += x);
            }
            part
        })
        .collect();
    for part in &partials {
        acc.iter_mut().zip(part).for_each(|(a, &p)| *a += p);
    }
}
