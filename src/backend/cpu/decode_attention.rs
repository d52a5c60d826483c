//! Decode attention (contract: `backend/ops/decode_attention.rs`, kernels:
//! `kernels/decode_attention.cu`): one task per (query, head), each a plain softmax over its span in
//! f32.

use anyhow::Result;
use rayon::prelude::*;

use super::CpuBackend;
use crate::backend::{checks, windowed_span, DecodeAttentionOps, DecodeSpans, QkvLayout, Window};

/// The specification, in f64, that the fast version below and the CUDA kernels are held to.
pub mod spec {
    use crate::backend::{windowed_span, QkvLayout, Window};

    /// `out [M, q_width]`: for query `i` (row `i` of `qkv`) and head `h`, the softmax-weighted sum of
    /// the values of cache rows `starts[i] .. starts[i] + lens[i]` (zeros for an empty span), of
    /// its last `window` rows only under a window.
    pub fn forward(
        qkv: &[f64],
        cache: &[f64],
        starts: &[i32],
        lens: &[i32],
        layout: QkvLayout,
        window: Window,
    ) -> Vec<f64> {
        let (width, hd) = (layout.width(), layout.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0.0; lens.len() * layout.q_width()];
        for (i, (&start, &len)) in starts.iter().zip(lens).enumerate() {
            let (skipped, read) = windowed_span(len as usize, window);
            let rows: Vec<usize> = (skipped..skipped + read).map(|j| start as usize + j).collect();
            for h in 0..layout.n_head {
                let g = layout.kv_head_of(h);
                let q = &qkv[i * width + h * hd..][..hd];
                let key = |r: usize| &cache[r * width + layout.k_offset() + g * hd..][..hd];
                let value = |r: usize| &cache[r * width + layout.v_offset() + g * hd..][..hd];
                let scores: Vec<f64> =
                    rows.iter().map(|&r| scale * q.iter().zip(key(r)).map(|(a, b)| a * b).sum::<f64>()).collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[(i * layout.n_head + h) * hd..][..hd];
                for (&r, w) in rows.iter().zip(&weights) {
                    for (o, v) in o.iter_mut().zip(value(r)) {
                        *o += w / total * v;
                    }
                }
            }
        }
        out
    }
}

/// One (query, head): `o = Σ_j softmax_j(scale · q·k_j) v_j` over the span's rows, in f32.
fn attend(o: &mut [f32], q: &[f32], cache: &[f32], start: usize, len: usize, layout: QkvLayout, g: usize) {
    let (width, hd) = (layout.width(), layout.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    o.fill(0.0);
    if len == 0 {
        return;
    }
    let row = |j: usize| &cache[(start + j) * width..][..width];
    let (k_col, v_col) = (layout.k_offset() + g * hd, layout.v_offset() + g * hd);
    let scores: Vec<f32> =
        (0..len).map(|j| scale * q.iter().zip(&row(j)[k_col..k_col + hd]).map(|(a, b)| a * b).sum::<f32>()).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    for (j, s) in scores.iter().enumerate() {
        let w = (s - max).exp();
        total += w;
        for (o, v) in o.iter_mut().zip(&row(j)[v_col..v_col + hd]) {
            *o += w * v;
        }
    }
    o.iter_mut().for_each(|o| *o /= total);
}

impl DecodeAttentionOps for CpuBackend {
    fn decode_attention_forward(
        &self,
        out: &mut Vec<f32>,
        qkv: &Vec<f32>,
        cache: &Vec<f32>,
        spans: &DecodeSpans<Self>,
        layout: QkvLayout,
        window: Window,
    ) -> Result<()> {
        let (starts, lens) = (&spans.host_starts, &spans.host_lens);
        checks::decode_attention_forward(out.len(), qkv.len(), cache.len(), starts, lens, layout, window)?;
        let (hd, nh, width) = (layout.head_dim, layout.n_head, layout.width());
        out.par_chunks_mut(hd).enumerate().for_each(|(k, o)| {
            let (i, h) = (k / nh, k % nh);
            let q = &qkv[i * width + h * hd..][..hd];
            let (skipped, read) = windowed_span(lens[i] as usize, window);
            attend(o, q, cache, starts[i] as usize + skipped, read, layout, layout.kv_head_of(h));
        });
        Ok(())
    }
}
