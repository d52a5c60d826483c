//! Rotary position embeddings on the q and k heads of the packed `qkv` tensor, forward and backward
//! (contract: `backend/ops/rope.rs`, kernels: `kernels/rope.cu`). One task per token: its cos and
//! sin once, then every q and k head of its row.

use anyhow::Result;
use rayon::prelude::*;

use super::CpuBackend;
use crate::backend::{checks, QkvLayout, RopeOps};

/// The specification, in f64: plain loops that the fast version below and the CUDA kernels are
/// held to. The backward is specified by finite differences of the forward.
pub mod spec {
    use crate::backend::QkvLayout;

    /// The rotation angle of channel pair `i` at `position`: `position · inv_freq[i]`, rounded to
    /// f32 as HF forms it (its `inv_freq @ position_ids` in f32), so that long positions agree to
    /// the last bit of the angle.
    pub fn angle(position: i32, inv_freq: f32) -> f64 {
        (position as f32 * inv_freq) as f64
    }

    /// `qkv [n, layout.width()]` with every q and k head of token `t` rotated by the angles of
    /// `positions[t]` (HF `q · cos + rotate_half(q) · sin`); v unchanged.
    pub fn forward(qkv: &[f64], positions: &[i32], inv_freq: &[f32], layout: QkvLayout) -> Vec<f64> {
        let (width, hd) = (layout.width(), layout.head_dim);
        let half = hd / 2;
        let mut out = qkv.to_vec();
        for (t, &p) in positions.iter().enumerate() {
            for head in 0..layout.n_head + layout.n_kv_head {
                let base = t * width + head * hd;
                for i in 0..half {
                    let (sin, cos) = angle(p, inv_freq[i]).sin_cos();
                    let (x1, x2) = (qkv[base + i], qkv[base + half + i]);
                    out[base + i] = x1 * cos - x2 * sin;
                    out[base + half + i] = x2 * cos + x1 * sin;
                }
            }
        }
        out
    }
}

/// Rotates the q and k heads of every row of `qkv` by the angles of its token's position, by −θ
/// when `inverse` (the backward).
fn rotate(qkv: &mut [f32], positions: &[i32], inv_freq: &[f32], layout: QkvLayout, inverse: bool) {
    let (width, hd) = (layout.width(), layout.head_dim);
    let rotated = layout.rotated_heads() * hd;
    let sin_sign = if inverse { -1.0f32 } else { 1.0 };
    qkv.par_chunks_mut(width).zip(positions.par_iter()).with_min_len(16).for_each_init(
        || vec![(0.0f32, 0.0f32); hd / 2],
        |cos_sin, (row, &p)| {
            for ((cos, sin), &f) in cos_sin.iter_mut().zip(inv_freq) {
                let (s, c) = (p as f32 * f).sin_cos();
                (*cos, *sin) = (c, sin_sign * s);
            }
            for head in row[..rotated].chunks_exact_mut(hd) {
                let (x1, x2) = head.split_at_mut(hd / 2);
                for ((a, b), &(cos, sin)) in x1.iter_mut().zip(x2.iter_mut()).zip(cos_sin.iter()) {
                    let (u, v) = (*a, *b);
                    *a = u * cos - v * sin;
                    *b = v * cos + u * sin;
                }
            }
        },
    );
}

impl RopeOps for CpuBackend {
    fn rope_forward(
        &self,
        qkv: &mut Vec<f32>,
        positions: &Vec<i32>,
        inv_freq: &Vec<f32>,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()> {
        checks::rope_forward(qkv.len(), positions, inv_freq.len(), n, layout)?;
        rotate(qkv, positions, inv_freq, layout, false);
        Ok(())
    }

    fn rope_backward(
        &self,
        dqkv: &mut Vec<f32>,
        positions: &Vec<i32>,
        inv_freq: &Vec<f32>,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()> {
        checks::rope_backward(dqkv.len(), positions, inv_freq.len(), n, layout)?;
        rotate(dqkv, positions, inv_freq, layout, true);
        Ok(())
    }
}
