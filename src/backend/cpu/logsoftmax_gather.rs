//! The fused log-softmax-gather: each token's log-probability of its target under the softmax of
//! its logits row, without materialising the softmax (and, on request, the log of the softmax's
//! squared mass), summed per sequence; and its backward, in place over the logits (contract: `backend/ops/logsoftmax_gather.rs`, kernels:
//! `kernels/logsoftmax_gather.cu`).

use anyhow::Result;
use rayon::prelude::*;

use super::simd::{exp_f32, lane_max, lane_sum, simd_kernel};
use super::CpuBackend;
use crate::backend::{checks, LogSoftmaxGatherOps, Packing};

/// The specification, in f64: plain loops that the fast version below and the CUDA kernels are
/// held to. The backward is specified by finite differences of the forward composed with
/// [`sequence_sums`](spec::sequence_sums).
pub mod spec {
    /// `(token_logp [n], lse [n])` for logits `[n, v]`: `lse[t] = ln Σ_j exp(logits[t, j])`, and
    /// `token_logp[t] = logits[t, targets[t]] − lse[t]`, or 0 where `targets[t] = −1`.
    pub fn forward(logits: &[f64], targets: &[i32], v: usize) -> (Vec<f64>, Vec<f64>) {
        let n = targets.len();
        let (mut lp, mut lse) = (vec![0.0; n], vec![0.0; n]);
        for t in 0..n {
            let row = &logits[t * v..(t + 1) * v];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            lse[t] = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            lp[t] = if targets[t] >= 0 { row[targets[t] as usize] - lse[t] } else { 0.0 };
        }
        (lp, lse)
    }

    /// [`forward`] and `log_sum_sq [n]`: `log Σ_j p_{t,j}²` of each row's softmax `p`, every row's
    /// (`logsoftmax_gather_forward_sq`).
    pub fn forward_sq(logits: &[f64], targets: &[i32], v: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (lp, lse) = forward(logits, targets, v);
        let log_sum_sq = lse
            .iter()
            .enumerate()
            .map(|(t, &l)| logits[t * v..(t + 1) * v].iter().map(|x| (2.0 * (x - l)).exp()).sum::<f64>().ln())
            .collect();
        (lp, lse, log_sum_sq)
    }

    /// Per-token values summed per sequence, for sequences of lengths `lens` packed end to end
    /// (`sequence_logp_sum`).
    pub fn sequence_sums(token_values: &[f64], lens: &[usize]) -> Vec<f64> {
        let mut start = 0;
        lens.iter()
            .map(|&l| {
                let s = token_values[start..start + l].iter().sum();
                start += l;
                s
            })
            .collect()
    }
}

/// `(max, ln Σ_j exp(row[j] − max))`, reading the row once: chunks of 64 values give a running
/// maximum, and the running sum is rescaled only when a chunk raises it. The log-sum-exp is the sum
/// of the two; keeping them apart lets `x − lse` be formed as `(x − max) − ln Σ` without rounding
/// `lse` first (large logits keep their precision). With `SQUARES`, the third value is
/// `ln Σ_j p_j²` (`p` the softmax) from a second running sum of the squared exponentials, rescaled
/// with the first (by the square of its factor); without, it is 0 and the first two are computed
/// exactly as with it.
#[inline(always)]
fn row_logsumexp<const SQUARES: bool>(row: &[f32]) -> (f32, f32, f32) {
    let mut max = f32::NEG_INFINITY;
    let (mut sum, mut sum_sq) = (0.0f32, 0.0f32);
    for chunk in row.chunks(64) {
        let chunk_max = lane_max(chunk);
        if chunk_max > max {
            if sum != 0.0 {
                let rescale = exp_f32(max - chunk_max);
                sum *= rescale;
                if SQUARES {
                    sum_sq *= rescale * rescale;
                }
            }
            max = chunk_max;
        }
        // Exponentials into a small buffer first, then the laned sum: both loops vectorise.
        let mut exps = [0.0f32; 64];
        for (e, &x) in exps.iter_mut().zip(chunk) {
            *e = exp_f32(x - max);
        }
        sum += lane_sum(&exps[..chunk.len()], |e| e);
        if SQUARES {
            sum_sq += lane_sum(&exps[..chunk.len()], |e| e * e);
        }
    }
    let log_sum = sum.ln();
    (max, log_sum, if SQUARES { sum_sq.ln() - 2.0 * log_sum } else { 0.0 })
}

simd_kernel! {
    /// One row of the fused log-softmax-gather forward: returns `(lse, token log-prob)`.
    fn logsoftmax_gather_row(row: &[f32], target: i32) -> (f32, f32) {
        let (max, log_sum, _) = row_logsumexp::<false>(row);
        let logp = if target >= 0 { (row[target as usize] - max) - log_sum } else { 0.0 };
        (max + log_sum, logp)
    }
}

simd_kernel! {
    /// One row of the forward with the squared mass: returns `(lse, token log-prob, log Σ p²)`, the
    /// first two as `logsoftmax_gather_row`'s.
    fn logsoftmax_gather_sq_row(row: &[f32], target: i32) -> (f32, f32, f32) {
        let (max, log_sum, log_sum_sq) = row_logsumexp::<true>(row);
        let logp = if target >= 0 { (row[target as usize] - max) - log_sum } else { 0.0 };
        (max + log_sum, logp, log_sum_sq)
    }
}

simd_kernel! {
    /// One row of the fused log-softmax-gather backward, in place: `g · (onehot(target) − softmax)`.
    fn logsoftmax_gather_backward_row(row: &mut [f32], target: usize, g: f32, lse: f32) {
        for x in row.iter_mut() {
            *x = -g * exp_f32(*x - lse);
        }
        row[target] += g;
    }
}

impl LogSoftmaxGatherOps for CpuBackend {
    fn logsoftmax_gather_forward(
        &self,
        token_logp: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        logits: &Vec<f32>,
        targets: &Vec<i32>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        checks::logsoftmax_gather_forward(token_logp.len(), lse.len(), logits.len(), targets, n, v)?;
        token_logp
            .par_iter_mut()
            .zip(lse.par_iter_mut())
            .zip(logits.par_chunks(v).zip(targets.par_iter()))
            .with_min_len(8)
            .for_each(|((lp, l), (row, &target))| (*l, *lp) = logsoftmax_gather_row(row, target));
        Ok(())
    }

    fn logsoftmax_gather_forward_sq(
        &self,
        token_logp: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        log_sum_sq: &mut Vec<f32>,
        logits: &Vec<f32>,
        targets: &Vec<i32>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        checks::logsoftmax_gather_forward_sq(
            token_logp.len(),
            lse.len(),
            log_sum_sq.len(),
            logits.len(),
            targets,
            n,
            v,
        )?;
        token_logp
            .par_iter_mut()
            .zip(lse.par_iter_mut())
            .zip(log_sum_sq.par_iter_mut())
            .zip(logits.par_chunks(v).zip(targets.par_iter()))
            .with_min_len(8)
            .for_each(|(((lp, l), sq), (row, &target))| (*l, *lp, *sq) = logsoftmax_gather_sq_row(row, target));
        Ok(())
    }

    fn sequence_logp_sum(&self, seq_logp: &mut Vec<f32>, token_logp: &Vec<f32>, packing: &Packing<Self>) -> Result<()> {
        let seqs = checks::sequence_logp_sum(seq_logp.len(), token_logp.len(), &packing.host_cu_seqlens)?;
        // Summed in f64 in token order: fixed, and exact enough to be the reference. From +0 (not
        // `Sum`'s −0), so that an empty sequence gets +0, as on the device.
        for (out, &(start, len)) in seq_logp.iter_mut().zip(&seqs) {
            *out = token_logp[start..start + len].iter().fold(0.0f64, |acc, &x| acc + x as f64) as f32;
        }
        Ok(())
    }

    fn logsoftmax_gather_backward(
        &self,
        logits: &mut Vec<f32>,
        lse: &Vec<f32>,
        targets: &Vec<i32>,
        dseq: &Vec<f32>,
        packing: &Packing<Self>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        checks::logsoftmax_gather_backward(
            logits.len(),
            lse.len(),
            targets,
            dseq.len(),
            &packing.host_cu_seqlens,
            n,
            v,
        )?;
        let cu = &packing.host_cu_seqlens;
        logits.par_chunks_mut(v).enumerate().with_min_len(8).for_each(|(t, row)| {
            let target = targets[t];
            if target < 0 {
                row.fill(0.0);
                return;
            }
            // The sequence holding token t: the last s with cu[s] <= t (empty sequences skipped).
            let s = cu.partition_point(|&start| start as usize <= t) - 1;
            logsoftmax_gather_backward_row(row, target as usize, dseq[s], lse[t]);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd::testing::{assert_same_bits, both_paths, kernel_inputs};

    #[test]
    fn simd_kernels_are_bit_identical_to_portable_ones() {
        let [x, _, _, _] = kernel_inputs();
        let (p, d) = both_paths(|| {
            let (lse, logp) = logsoftmax_gather_row(&x, 17);
            let (lse_sq, logp_sq, log_sum_sq) = logsoftmax_gather_sq_row(&x, 17);
            let mut row = x.clone();
            logsoftmax_gather_backward_row(&mut row, 17, 0.7, lse);
            [row, vec![lse, logp, lse_sq, logp_sq, log_sum_sq]].concat()
        });
        assert_same_bits("softmaxes", &p, &d);
    }

    #[test]
    fn the_squared_mass_leaves_the_log_probs_bit_identical() {
        let [x, _, _, _] = kernel_inputs();
        for target in [-1, 0, 17] {
            let (lse, logp) = logsoftmax_gather_row(&x, target);
            let (lse_sq, logp_sq, _) = logsoftmax_gather_sq_row(&x, target);
            assert_same_bits("lse", &[lse], &[lse_sq]);
            assert_same_bits("token log-prob", &[logp], &[logp_sq]);
        }
    }
}
