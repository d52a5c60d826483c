//! Causal self-attention over a packed batch, multi-head or grouped-query, forward and backward
//! (contract: `backend/ops/attention.rs`, kernels: `kernels/attention.cu`). The forward runs one
//! task per (sequence, query head), the backward one per (sequence, key/value head), which sums the
//! gradients of its query heads in order; scores, softmax and the product with V in blocks of query
//! rows.
//!
//! The forward saves the softmax probabilities for the backward: sequence by sequence, head by
//! head, one row-major `[T_s, T_s]` block `P[i, j]` (query i, key j, zeros above the diagonal and,
//! under a sliding window, below the window) at offset `n_head · Σ_{s'<s} T_{s'}² + h · T_s²` (see
//! `head_tasks`). Under a window each row block's products start at the first key its rows see.

use anyhow::Result;
use rayon::prelude::*;

use super::gemm::{gemm_f32, Mat, SyncPtr};
use super::simd::{exp_f32, lane_dot, lane_max, lane_sum, simd_kernel};
use super::CpuBackend;
use crate::backend::{checks, window_start, AttentionOps, Packing, QkvLayout, Window};

/// The specification, in f64: plain loops that the fast version below and the CUDA kernels are
/// held to. The backward is specified by finite differences of the forward.
pub mod spec {
    use crate::backend::{window_start, QkvLayout, Window};

    /// Causal attention over the sequences of lengths `lens` packed end to end; `qkv` is
    /// `[n, layout.width()]` (q, k, v heads of each token side by side), query head `h` attending
    /// through key/value head `layout.kv_head_of(h)`, query `i` to the keys `j ≤ i` with
    /// `i − j < window` when a window is given. Returns `(out [n, layout.q_width()],
    /// probabilities)`, the probabilities in the CPU backend's saved layout (module doc).
    pub fn forward(qkv: &[f64], lens: &[usize], layout: QkvLayout, window: Window) -> (Vec<f64>, Vec<f64>) {
        let n: usize = lens.iter().sum();
        let (hd, width, q_width) = (layout.head_dim, layout.width(), layout.q_width());
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0.0; n * q_width];
        let mut probs = Vec::new();
        let mut start = 0;
        for &t in lens {
            for h in 0..layout.n_head {
                let g = layout.kv_head_of(h);
                let q = |i: usize, d: usize| qkv[(start + i) * width + h * hd + d];
                let k = |j: usize, d: usize| qkv[(start + j) * width + layout.k_offset() + g * hd + d];
                let v = |j: usize, d: usize| qkv[(start + j) * width + layout.v_offset() + g * hd + d];
                for i in 0..t {
                    let first = window_start(i, window);
                    let scores: Vec<f64> =
                        (first..=i).map(|j| (0..hd).map(|d| q(i, d) * k(j, d)).sum::<f64>() * scale).collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    let p: Vec<f64> = scores.iter().map(|s| (s - max).exp() / z).collect();
                    for d in 0..hd {
                        out[(start + i) * q_width + h * hd + d] = (first..=i).map(|j| p[j - first] * v(j, d)).sum();
                    }
                    probs.extend(std::iter::repeat_n(0.0, first));
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

/// One (sequence, query head) unit of attention work.
#[derive(Clone, Copy)]
struct HeadTask {
    /// First token of the sequence.
    start: usize,
    /// Sequence length.
    len: usize,
    /// The query head.
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
        layout: QkvLayout,
        window: Window,
    ) -> Result<()> {
        let saved_len = self.attention_saved_len(packing, layout.n_head);
        let cu = &packing.host_cu_seqlens;
        let seqs = checks::attention_forward(out.len(), saved.len(), qkv.len(), cu, layout, window, saved_len)?;
        let (hd, width, q_width) = (layout.head_dim, layout.width(), layout.q_width());
        let scale = 1.0 / (hd as f32).sqrt();
        let (out_ptr, saved_ptr) = (SyncPtr(out.as_mut_ptr()), SyncPtr(saved.as_mut_ptr()));
        head_tasks(&seqs, layout.n_head).into_par_iter().for_each(|task| {
            let HeadTask { start, len: t, head, saved_offset } = task;
            // SAFETY: each task writes only its own probability block and the columns of its query
            // head in the rows of its sequence; all offsets are in bounds by the length checks above.
            unsafe {
                let row = qkv.as_ptr().add(start * width);
                let [q, k, v] = head_columns(layout, head).map(|col| row.add(col));
                let p = saved_ptr.get().add(saved_offset);
                let o = out_ptr.get().add(start * q_width + head * hd);
                for i0 in (0..t).step_by(ATTN_BLOCK) {
                    let i1 = (i0 + ATTN_BLOCK).min(t);
                    let j0 = window_start(i0, window); // the block's first visible key
                                                       // Scores S[i0..i1, j0..i1] = scale · Q Kᵀ (Kᵀ element (d, j) = K[j, d]).
                    gemm_f32(
                        i1 - i0,
                        i1 - j0,
                        hd,
                        p.add(i0 * t + j0),
                        t,
                        false,
                        Mat::new(q.add(i0 * width), width, 1),
                        Mat::new(k.add(j0 * width), 1, width),
                        scale,
                        false,
                    );
                    for i in i0..i1 {
                        let row = std::slice::from_raw_parts_mut(p.add(i * t), t);
                        let (before, rest) = row.split_at_mut(window_start(i, window));
                        before.fill(0.0);
                        let (live, masked) = rest.split_at_mut(i + 1 - before.len());
                        causal_softmax_row(live, masked);
                    }
                    // out[i0..i1] = P[i0..i1, j0..i1] · V[j0..i1]
                    gemm_f32(
                        i1 - i0,
                        hd,
                        i1 - j0,
                        o.add(i0 * q_width),
                        q_width,
                        false,
                        Mat::new(p.add(i0 * t + j0), t, 1),
                        Mat::new(v.add(j0 * width), width, 1),
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
        layout: QkvLayout,
        window: Window,
    ) -> Result<()> {
        let saved_len = self.attention_saved_len(packing, layout.n_head);
        let seqs = checks::attention_backward(
            dqkv.len(),
            dout.len(),
            qkv.len(),
            out.len(),
            saved.len(),
            &packing.host_cu_seqlens,
            layout,
            window,
            saved_len,
        )?;
        let (hd, width, q_width) = (layout.head_dim, layout.width(), layout.q_width());
        let scale = 1.0 / (hd as f32).sqrt();
        let dqkv_ptr = SyncPtr(dqkv.as_mut_ptr());
        // The query heads of a key/value head are consecutive, so each chunk of `group` tasks is one
        // (sequence, key/value head): one task sums the group's dK and dV, head by head, in order.
        let group = layout.n_head / layout.n_kv_head;
        let tasks = head_tasks(&seqs, layout.n_head);
        tasks.par_chunks(group).for_each_init(Vec::<f32>::new, |ds_buf, group_tasks| {
            let t = group_tasks[0].len;
            if t == 0 {
                return;
            }
            ds_buf.resize(t * t, 0.0);
            let ds = ds_buf.as_mut_ptr();
            for (member, &HeadTask { start, head, saved_offset, .. }) in group_tasks.iter().enumerate() {
                // SAFETY: each task writes only the q columns of its group's query heads and the k
                // and v columns of its key/value head, in the rows of its sequence (and its own
                // scratch); offsets are in bounds by the length checks above.
                unsafe {
                    let columns = head_columns(layout, head);
                    let (row, drow) = (qkv.as_ptr().add(start * width), dqkv_ptr.get().add(start * width));
                    let [q, k, v] = columns.map(|col| row.add(col));
                    let [dq, dk, dv] = columns.map(|col| drow.add(col));
                    let p = saved.as_ptr().add(saved_offset);
                    let dy = dout.as_ptr().add(start * q_width + head * hd);
                    // Row blocks last to first: the first head's last block's dK, dV products cover
                    // every key, so they overwrite, and everything after accumulates onto them. A
                    // window shorter than the sequence leaves the first keys out of that block:
                    // then they start from zeros instead.
                    let clipped = window.is_some_and(|w| w < t);
                    if clipped && member == 0 {
                        for r in 0..t {
                            std::slice::from_raw_parts_mut(dk.add(r * width), hd).fill(0.0);
                            std::slice::from_raw_parts_mut(dv.add(r * width), hd).fill(0.0);
                        }
                    }
                    let blocks: Vec<usize> = (0..t).step_by(ATTN_BLOCK).collect();
                    for (nth, &i0) in blocks.iter().rev().enumerate() {
                        let i1 = (i0 + ATTN_BLOCK).min(t);
                        let (rows, j0) = (i1 - i0, window_start(i0, window));
                        let overwrite = member == 0 && nth == 0 && !clipped;
                        // dP[i0..i1, j0..i1] = dY Vᵀ
                        gemm_f32(
                            rows,
                            i1 - j0,
                            hd,
                            ds.add(i0 * t + j0),
                            t,
                            false,
                            Mat::new(dy.add(i0 * q_width), q_width, 1),
                            Mat::new(v.add(j0 * width), 1, width),
                            1.0,
                            false,
                        );
                        // dS = P ⊙ (dP − Σ_j P dP) over the keys a row sees (the rest of the block
                        // row is 0).
                        for i in i0..i1 {
                            let prow = std::slice::from_raw_parts(p.add(i * t + j0), i1 - j0);
                            let drow = std::slice::from_raw_parts_mut(ds.add(i * t + j0), i1 - j0);
                            let (first, own) = (window_start(i, window) - j0, i - j0);
                            softmax_backward_row(&mut drow[first..=own], &prow[first..=own]);
                            drow[..first].fill(0.0);
                            drow[own + 1..].fill(0.0);
                        }
                        let ds_block = ds.add(i0 * t + j0);
                        // dQ[i0..i1] = scale · dS K[j0..i1]
                        gemm_f32(
                            rows,
                            hd,
                            i1 - j0,
                            dq.add(i0 * width),
                            width,
                            false,
                            Mat::new(ds_block, t, 1),
                            Mat::new(k.add(j0 * width), width, 1),
                            scale,
                            false,
                        );
                        // dK[j0..i1] (+)= scale · dSᵀ Q[i0..i1]
                        gemm_f32(
                            i1 - j0,
                            hd,
                            rows,
                            dk.add(j0 * width),
                            width,
                            !overwrite,
                            Mat::new(ds_block, 1, t),
                            Mat::new(q.add(i0 * width), width, 1),
                            scale,
                            false,
                        );
                        // dV[j0..i1] (+)= Pᵀ dY[i0..i1]
                        gemm_f32(
                            i1 - j0,
                            hd,
                            rows,
                            dv.add(j0 * width),
                            width,
                            !overwrite,
                            Mat::new(p.add(i0 * t + j0), 1, t),
                            Mat::new(dy.add(i0 * q_width), q_width, 1),
                            1.0,
                            false,
                        );
                    }
                }
            }
        });
        Ok(())
    }
}

/// The first columns of query head `head` and of its key and value heads in a row of `qkv`.
fn head_columns(layout: QkvLayout, head: usize) -> [usize; 3] {
    let kv = layout.kv_head_of(head) * layout.head_dim;
    [head * layout.head_dim, layout.k_offset() + kv, layout.v_offset() + kv]
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
