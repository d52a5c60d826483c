//! Rotary position embeddings (RoPE), applied in place to the queries and keys of the packed `qkv`
//! tensor ([`QkvLayout`], defined with the attention that reads it), forward and backward
//! (kernels/rope.cu, CPU twin in cpu/rope.rs); and the frequency table, computed on the host
//! ([`rope_inverse_frequencies`]), so that every `rope_scaling` rule is a host-side change.
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::{ensure, Result};

pub use super::attention::QkvLayout;
use crate::backend::Buffers;

/// How the inverse frequencies are derived from `rope_theta` (HF `config.rope_scaling`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// No `rope_scaling` (HF `_compute_default_rope_parameters`):
    /// `inv_freq[i] = 1 / θ^(2i / head_dim)`.
    Default,
    /// `rope_type = "linear"` (HF `_compute_linear_scaling_rope_parameters`): every default
    /// frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// `rope_type = "llama3"` (HF `_compute_llama3_parameters`, Llama 3.1 and later): with
    /// `wavelen = 2π / inv_freq` of the default frequencies, those with
    /// `wavelen < original_max_position_embeddings / high_freq_factor` are kept, those with
    /// `wavelen > original_max_position_embeddings / low_freq_factor` divided by `factor`, and those
    /// between blended: `(1 − s) · inv_freq / factor + s · inv_freq` with
    /// `s = (original_max_position_embeddings / wavelen − low_freq_factor) / (high_freq_factor − low_freq_factor)`.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// The inverse frequencies `[head_dim / 2]` of RoPE with base `theta` under `scaling`, what
/// `rope_forward` and `rope_backward` take as `inv_freq`. Computed in f64 and rounded once to f32
/// (HF computes them in f32: the two agree to an ulp or so). None of these rules rescales the
/// attention (HF's `attention_factor` is 1 for all three).
pub fn rope_inverse_frequencies(head_dim: usize, theta: f64, scaling: RopeScaling) -> Result<Vec<f32>> {
    ensure!(head_dim > 0 && head_dim.is_multiple_of(2), "rope: head_dim = {head_dim} must be positive and even");
    ensure!(theta > 0.0 && theta.is_finite(), "rope: rope_theta = {theta} must be positive");
    let default = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64));
    let inv_freq: Vec<f64> = match scaling {
        RopeScaling::Default => default.collect(),
        RopeScaling::Linear { factor } => {
            ensure!(factor > 0.0, "rope: linear scaling factor = {factor} must be positive");
            default.map(|f| f / factor).collect()
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old_context = original_max_position_embeddings;
            ensure!(
                factor > 0.0 && low_freq_factor > 0.0 && high_freq_factor > low_freq_factor && old_context > 0.0,
                "rope: llama3 scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and \
                 original_max_position_embeddings > 0 (got {factor}, {low_freq_factor}, {high_freq_factor}, \
                 {old_context})"
            );
            let (low_freq_wavelen, high_freq_wavelen) = (old_context / low_freq_factor, old_context / high_freq_factor);
            default
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let s = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - s) * f / factor + s * f
                    }
                })
                .collect()
        }
    };
    Ok(inv_freq.into_iter().map(|f| f as f32).collect())
}

pub trait RopeOps: Buffers {
    /// Rotates the q and k heads of `qkv [n, layout.width()]` in place; v is left as it is. Token
    /// `t` at position `p = positions[t]` (its position inside its sequence, as the packed batch
    /// gives it), in each q and k head `x` of `head_dim` channels, `half = head_dim / 2`, for
    /// `i < half`, with `θ = p · inv_freq[i]` rounded to f32 (as HF forms it):
    ///
    /// ```text
    /// x[i]        ← x[i] · cos θ − x[i + half] · sin θ
    /// x[i + half] ← x[i + half] · cos θ + x[i] · sin θ
    /// ```
    ///
    /// HF's `q · cos + rotate_half(q) · sin` (`rotate_half(x) = [−x₂, x₁]`), computed in f32.
    /// `inv_freq [head_dim / 2]` ([`rope_inverse_frequencies`]) is read in f32: upload it with
    /// `upload` (a backend that stores bf16 keeps the exact f32 copy).
    fn rope_forward(
        &self,
        qkv: &mut Self::Buf,
        positions: &Self::Ids,
        inv_freq: &Self::Buf,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()>;
    /// The backward of `rope_forward`, in place on `dqkv`: each rotation is orthogonal, so its
    /// gradient is the inverse rotation (θ → −θ) of the q and k gradients; v's is left as it is.
    fn rope_backward(
        &self,
        dqkv: &mut Self::Buf,
        positions: &Self::Ids,
        inv_freq: &Self::Buf,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    use anyhow::{ensure, Result};

    use super::QkvLayout;
    use crate::backend::checks::{check_len, qkv_layout};

    /// A valid layout (`qkv_layout`) whose `head_dim` is even: RoPE rotates channel pairs.
    fn rotatable_layout(op: &str, layout: QkvLayout) -> Result<()> {
        qkv_layout(op, layout)?;
        let head_dim = layout.head_dim;
        ensure!(head_dim.is_multiple_of(2), "{op}: head_dim = {head_dim} must be positive and even");
        Ok(())
    }

    /// `tensor` (`qkv` or `dqkv`) is `[n, layout.width()]`, one position per token, none negative.
    fn rope(
        op: &str,
        (tensor, len): (&str, usize),
        positions: &[i32],
        inv_freq: usize,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()> {
        rotatable_layout(op, layout)?;
        check_len(op, tensor, len, n * layout.width())?;
        check_len(op, "positions", positions.len(), n)?;
        check_len(op, "inv_freq", inv_freq, layout.head_dim / 2)?;
        if let Some(t) = positions.iter().position(|&p| p < 0) {
            anyhow::bail!("{op}: `positions[{t}]` = {} is negative", positions[t]);
        }
        Ok(())
    }

    pub(crate) fn rope_forward(
        qkv: usize,
        positions: &[i32],
        inv_freq: usize,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()> {
        rope("rope_forward", ("qkv", qkv), positions, inv_freq, n, layout)
    }

    pub(crate) fn rope_backward(
        dqkv: usize,
        positions: &[i32],
        inv_freq: usize,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()> {
        rope("rope_backward", ("dqkv", dqkv), positions, inv_freq, n, layout)
    }
}
