//! Causal multi-head self-attention over a packed batch, forward and backward (contract:
//! `backend/ops/attention.rs`, kernels: `kernels/attention.cu`). One task per (sequence, head);
//! scores, softmax and the product with V in blocks of query rows.
//!
//! The forward saves the softmax probabilities for the backward: sequence by sequence, head by
//! head, one row-major `[T_s, T_s]` block `P[i, j]` (query i, key j, zeros above the diagonal) at
//! offset `n_head · Σ_{s'<s} T_{s'}² + h · T_s²` (see `head_tasks`).

use anyhow::Result;
use rayon::prelude::*;

use super::gemm::{gemm_f32, Mat, SyncPtr};
use super::simd::{exp_f32, lane_dot, lane_max, lane_sum, simd_kernel};
use super::CpuBackend;
use crate::backend::{checks, AttentionOps, Packing};

/// The specification, in f64: plain loops that the fast version below and the CUDA kernels are
/// held to. The backward is specified by finite differences of the forward.
pub mod spec {
    /// Causal attention over the sequences of lengths `lens` packed end to end; `qkv` is
    /// `[n, 3c]` (q, k, v of each token side by side), heads of `c / n_head` channels. Returns
    /// `(out [n, c], probabilities)`, the probabilities in the CPU backend's saved layout (module
    /// doc).
    pub fn forward(qkv: &[f64], lens: &[usize], n_head: usize, c: usize) -> (Vec<f64>, Vec<f64>) {
        let n: usize = lens.iter().sum();
        let hd = c / n_head;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0.0; n * c];
        let mut probs = Vec::new();
        let mut start = 0;
        for &t in lens {
            for h in 0..n_head {
                let q = |i: usize, d: usize| qkv[(start + i) * 3 * c + h * hd + d];
                let k = |j: usize, d: usize| qkv[(start + j) * 3 * c + c + h * hd + d];
                let v = |j: usize, d: usize| qkv[(start + j) * 3 * c + 2 * c + h * hd + d];
                for i in 0..t {
                    let scores: Vec<f64> =
                        (0..=i).map(|j| (0..hd).map(|d| q(i, d) * k(j, d)).sum::<f64>() * scale).collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    let p: Vec<f64> = scores.iter().map(|s| (s - max).exp() / z).collect();
                    for d in 0..hd {
                        out[(start + i) * c + h * hd + d] = (0..=i).map(|j| p[j] * v(j, d)).sum();
                    }
                    probs.extend_from_slice(&p);
                    probs.extend(std::iter::repeat_n(0.0, t - i - 1));
                }
            }
            start += t;
        }
        (out, probs)
    }
}

/// Query rows per block in attention: scores are computed for whole blocks, so the wasted work
/// above the causal diagonal is at most one block per row block.
const ATTN_BLOCK: usize = 32;

simd_kernel! {
    /// Softmax in place over the causal part of a score row; zeros the masked rest.
    fn causal_softmax_row(live: &mut [f32], masked: &mut [f32]) {
        let max = lane_max(live);
        live.iter_mut().for_each(|x| *x = exp_f32(*x - max));
        let inv = 1.0 / lane_sum(live, |x| x);
        live.iter_mut().for_each(|x| *x *= inv);
        masked.fill(0.0);
    }
}

simd_kernel! {
    /// Softmax backward for one row, in place over `dp`: `dS = P ⊙ (dP − Σ_j P dP)`.
    fn softmax_backward_row(dp: &mut [f32], p: &[f32]) {
        let dot = lane_dot(p, dp);
        for (d, &pp) in dp.iter_mut().zip(p) {
            *d = pp * (*d - dot);
        }
    }
}

/// One (sequence, head) unit of attention work.
#[derive(Clone, Copy)]
struct HeadTask {
    /// First token of the sequence.
    start: usize,
    /// Sequence length.
    len: usize,
    head: usize,
    /// Offset of this head's `[len, len]` probability block in the saved buffer.
    saved_offset: usize,
}

/// The tasks of a packed batch, in the saved buffer's order: sequence-major, then head. The saved
/// buffer holds, for sequence s and head h, the causal softmax probabilities `P[i, j]` (query i,
/// key j, zero for j > i) as a row-major `[T_s, T_s]` block at `n_head · Σ_{s'<s} T_{s'}² + h · T_s²`.
fn head_tasks(seqs: &[(usize, usize)], n_head: usize) -> Vec<HeadTask> {
    let mut tasks = Vec::with_capacity(seqs.len() * n_head);
    let mut offset = 0;
    for &(start, len) in seqs {
        for head in 0..n_head {
            tasks.push(HeadTask { start, len, head, saved_offset: offset });
            offset += len * len;
        }
    }
    tasks
}

impl AttentionOps for CpuBackend {
    fn attention_saved_len(&self, packing: &Packing<Self>, n_head: usize) -> usize {
        n_head * packing.host_cu_seqlens.windows(2).map(|w| ((w[1] - w[0]).max(0) as usize).pow(2)).sum::<usize>()
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        saved: &mut Vec<f32>,
        qkv: &Vec<f32>,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()> {
        let saved_len = self.attention_saved_len(packing, n_head);
        let seqs = checks::attention_forward(
            out.len(),
            saved.len(),
            qkv.len(),
            &packing.host_cu_seqlens,
            n_head,
            c,
            saved_len,
        )?;
        let hd = c / n_head;
        let scale = 1.0 / (hd as f32).sqrt();
        let (out_ptr, saved_ptr) = (SyncPtr(out.as_mut_ptr()), SyncPtr(saved.as_mut_ptr()));
        head_tasks(&seqs, n_head).into_par_iter().for_each(|task| {
            let HeadTask { start, len: t, head, saved_offset } = task;
            // SAFETY: each task writes only its own probability block and the columns of its head
            // in the rows of its sequence; all offsets are in bounds by the length checks above.
            unsafe {
                let q = qkv.as_ptr().add(start * 3 * c + head * hd);
                let k = q.add(c);
                let v = q.add(2 * c);
                let p = saved_ptr.get().add(saved_offset);
                let o = out_ptr.get().add(start * c + head * hd);
                for i0 in (0..t).step_by(ATTN_BLOCK) {
                    let i1 = (i0 + ATTN_BLOCK).min(t);
                    // Scores S[i0..i1, 0..i1] = scale · Q Kᵀ (Kᵀ element (d, j) = K[j, d]).
                    gemm_f32(
                        i1 - i0,
                        i1,
                        hd,
                        p.add(i0 * t),
                        t,
                        false,
                        Mat::new(q.add(i0 * 3 * c), 3 * c, 1),
                        Mat::new(k, 1, 3 * c),
                        scale,
                        false,
                    );
                    for i in i0..i1 {
                        let row = std::slice::from_raw_parts_mut(p.add(i * t), t);
                        let (live, masked) = row.split_at_mut(i + 1);
                        causal_softmax_row(live, masked);
                    }
                    // out[i0..i1] = P[i0..i1, 0..i1] · V[0..i1]
                    gemm_f32(
                        i1 - i0,
                        hd,
                        i1,
                        o.add(i0 * c),
                        c,
                        false,
                        Mat::new(p.add(i0 * t), t, 1),
                        Mat::new(v, 3 * c, 1),
                        1.0,
                        false,
                    );
                }
            }
        });
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        qkv: &Vec<f32>,
        out: &Vec<f32>,
        saved: &Vec<f32>,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()> {
        let saved_len = self.attention_saved_len(packing, n_head);
        let seqs = checks::attention_backward(
            dqkv.len(),
            dout.len(),
            qkv.len(),
            out.len(),
            saved.len(),
            &packing.host_cu_seqlens,
            n_head,
            c,
            saved_len,
        )?;
        let hd = c / n_head;
        let scale = 1.0 / (hd as f32).sqrt();
        let dqkv_ptr = SyncPtr(dqkv.as_mut_ptr());
        head_tasks(&seqs, n_head).into_par_iter().for_each_init(Vec::<f32>::new, |ds_buf, task| {
            let HeadTask { start, len: t, head, saved_offset } = task;
            if t == 0 {
                return;
            }
            ds_buf.resize(t * t, 0.0);
            let ds = ds_buf.as_mut_ptr();
            // SAFETY: each task writes only the q, k and v columns of its head in the rows of its
            // sequence (and its own scratch); offsets are in bounds by the length checks above.
            unsafe {
                let q = qkv.as_ptr().add(start * 3 * c + head * hd);
                let k = q.add(c);
                let v = q.add(2 * c);
                let dq = dqkv_ptr.get().add(start * 3 * c + head * hd);
                let dk = dq.add(c);
                let dv = dq.add(2 * c);
                let p = saved.as_ptr().add(saved_offset);
                let dy = dout.as_ptr().add(start * c + head * hd);
                // Row blocks last to first: the last block's dK, dV products cover every key, so
                // they overwrite, and the earlier (shorter) blocks accumulate onto them.
                let blocks: Vec<usize> = (0..t).step_by(ATTN_BLOCK).collect();
                for (nth, &i0) in blocks.iter().rev().enumerate() {
                    let i1 = (i0 + ATTN_BLOCK).min(t);
                    let rows = i1 - i0;
                    let first = nth == 0;
                    // dP[i0..i1, 0..i1] = dY Vᵀ
                    gemm_f32(
                        rows,
                        i1,
                        hd,
                        ds.add(i0 * t),
                        t,
                        false,
                        Mat::new(dy.add(i0 * c), c, 1),
                        Mat::new(v, 1, 3 * c),
                        1.0,
                        false,
                    );
                    // dS = P ⊙ (dP − Σ_j P dP), causal part only (the rest of the block row is 0).
                    for i in i0..i1 {
                        let prow = std::slice::from_raw_parts(p.add(i * t), i1);
                        let drow = std::slice::from_raw_parts_mut(ds.add(i * t), i1);
                        softmax_backward_row(&mut drow[..=i], &prow[..=i]);
                        drow[i + 1..].fill(0.0);
                    }
                    let ds_block = ds.add(i0 * t);
                    // dQ[i0..i1] = scale · dS K
                    gemm_f32(
                        rows,
                        hd,
                        i1,
                        dq.add(i0 * 3 * c),
                        3 * c,
                        false,
                        Mat::new(ds_block, t, 1),
                        Mat::new(k, 3 * c, 1),
                        scale,
                        false,
                    );
                    // dK[0..i1] (+)= scale · dSᵀ Q[i0..i1]
                    gemm_f32(
                        i1,
                        hd,
                        rows,
                        dk,
                        3 * c,
                        !first,
                        Mat::new(ds_block, 1, t),
                        Mat::new(q.add(i0 * 3 * c), 3 * c, 1),
                        scale,
                        false,
                    );
                    // dV[0..i1] (+)= Pᵀ dY[i0..i1]
                    gemm_f32(
                        i1,
                        hd,
                        rows,
                        dv,
                        3 * c,
                        !first,
                        Mat::new(p.add(i0 * t), 1, t),
                        Mat::new(dy.add(i0 * c), c, 1),
                        1.0,
                        false,
                    );
                }
            }
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
        let [x, y, _, _] = kernel_inputs();
        let (p, d) = both_paths(|| {
            let (mut live, mut masked) = (x[..700].to_vec(), vec![1.0; 5]);
            causal_softmax_row(&mut live, &mut masked);
            let mut dp = y[..700].to_vec();
            softmax_backward_row(&mut dp, &live);
            [live, masked, dp].concat()
        });
        assert_same_bits("softmaxes", &p, &d);
    }
}
