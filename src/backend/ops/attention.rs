//! Causal self-attention inside each sequence of a packed batch, multi-head or grouped-query
//! (kernels/attention.cu, CPU twin in cpu/attention.rs), and the layout of the `qkv` tensor it
//! reads ([`QkvLayout`]; RoPE rotates the same tensor in place first).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;
use crate::backend::Packing;

/// The packed `qkv [n, width]` tensor the attention reads, with `n_kv_head` key/value heads shared
/// by groups of `n_head / n_kv_head` query heads (grouped-query attention). Each token's row is
///
/// ```text
/// [ q: n_head · head_dim | k: n_kv_head · head_dim | v: n_kv_head · head_dim ]
/// ```
///
/// head `h` of q at column `h · head_dim`, head `g` of k at `k_offset() + g · head_dim`, of v at
/// `v_offset() + g · head_dim`; query head `h` attends with key/value head
/// `h / (n_head / n_kv_head)` (HF `repeat_kv`). It is the output of one product with the
/// concatenated weight `[q_proj; k_proj; v_proj]`. With `n_kv_head = n_head` and
/// `head_dim = c / n_head` it is GPT-2's `c_attn` output `[n, 3c]` ([`QkvLayout::mha`]). The q
/// and k heads, the ones RoPE rotates, are the first `n_head + n_kv_head` heads of the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvLayout {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl QkvLayout {
    /// Multi-head attention over `c` channels: every query head has its own key/value head.
    pub fn mha(n_head: usize, c: usize) -> Self {
        Self { n_head, n_kv_head: n_head, head_dim: c / n_head.max(1) }
    }
    /// Columns of q (also the width of the attention's output).
    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// Columns of k, and of v.
    pub fn kv_width(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
    /// Columns of a row: `q_width + 2 · kv_width`.
    pub fn width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
    /// First column of k.
    pub fn k_offset(&self) -> usize {
        self.q_width()
    }
    /// First column of v.
    pub fn v_offset(&self) -> usize {
        self.q_width() + self.kv_width()
    }
    /// The heads RoPE rotates: the q heads, then the k heads (contiguous, from column 0).
    pub fn rotated_heads(&self) -> usize {
        self.n_head + self.n_kv_head
    }
    /// The key/value head query head `h` attends with.
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / (self.n_head / self.n_kv_head)
    }
}

/// A sliding attention window (HF `sliding_window`): `Some(w)` lets a query see the `w` latest
/// keys of its sequence, itself included (key `j` of query `t` when `0 ≤ t − j < w`, the mask of
/// `transformers`' `sliding_window_causal_mask_function`); `None` is full causal attention.
pub type Window = Option<usize>;

/// The first key (position in the sequence) query `query` sees under `window`.
pub fn window_start(query: usize, window: Window) -> usize {
    window.map_or(0, |w| (query + 1).saturating_sub(w))
}

pub trait AttentionOps: Buffers {
    /// Length of the buffer `attention_forward` saves for the backward, for `n_head` query heads
    /// (backend-specific: the CPU keeps the probabilities, `n_head · Σ T_s²`; a flash-style kernel
    /// keeps only `n_head · n` lse).
    fn attention_saved_len(&self, packing: &Packing<Self>, n_head: usize) -> usize;
    /// Causal self-attention inside each sequence, one query head at a time. `qkv [n, layout.width()]`
    /// holds each token's q, k and v heads side by side ([`QkvLayout`]); query head `h` of token
    /// `t` attends to the tokens `j ≤ t` of its own sequence (positions counted from the sequence's
    /// start) with `t − j < window` when a sliding `window` is given ([`Window`]), through
    /// key/value head `g = layout.kv_head_of(h)`, with `scale = 1 / √head_dim`:
    ///
    /// ```text
    /// P_tj = softmax_j(scale · q_t,h · k_j,g)        out_t,h = Σ_j P_tj v_j,g
    /// ```
    ///
    /// Writes `out [n, layout.q_width()]` (heads concatenated) and `saved` (`attention_saved_len`
    /// with `layout.n_head`).
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        saved: &mut Self::Buf,
        qkv: &Self::Buf,
        packing: &Packing<Self>,
        layout: QkvLayout,
        window: Window,
    ) -> Result<()>;
    /// Overwrites `dqkv [n, layout.width()]`. The gradient of a key/value head shared by a group
    /// of query heads is the sum over the group, formed in a fixed order (the same bits every run).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        saved: &Self::Buf,
        packing: &Packing<Self>,
        layout: QkvLayout,
        window: Window,
    ) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    use anyhow::{ensure, Result};

    use super::{QkvLayout, Window};
    use crate::backend::checks::{check_len, sequences, Sequences};

    /// The heads and `head_dim` are positive, and `n_kv_head` divides `n_head`.
    pub(crate) fn qkv_layout(op: &str, layout: QkvLayout) -> Result<()> {
        let QkvLayout { n_head, n_kv_head, head_dim } = layout;
        ensure!(
            n_kv_head > 0 && n_head.is_multiple_of(n_kv_head) && n_head > 0,
            "{op}: n_head = {n_head} is not a positive multiple of n_kv_head = {n_kv_head}"
        );
        ensure!(head_dim > 0, "{op}: head_dim = {head_dim} must be positive");
        Ok(())
    }

    /// A window, when given, holds at least one key (the query's own).
    pub(crate) fn window(op: &str, window: Window) -> Result<()> {
        ensure!(window != Some(0), "{op}: a sliding window of 0 keys attends to nothing (the smallest is 1)");
        Ok(())
    }

    /// A valid layout and window, and `cu_seqlens` is valid; returns the sequences and the token count.
    fn attention_shape(op: &str, cu_seqlens: &[i32], layout: QkvLayout, window: Window) -> Result<(Sequences, usize)> {
        qkv_layout(op, layout)?;
        self::window(op, window)?;
        let n = cu_seqlens.last().map_or(0, |&last| last as usize);
        Ok((sequences(op, cu_seqlens, n)?, n))
    }

    /// `saved_len` is the backend's `attention_saved_len` for this packing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_forward(
        out: usize,
        saved: usize,
        qkv: usize,
        cu_seqlens: &[i32],
        layout: QkvLayout,
        window: Window,
        saved_len: usize,
    ) -> Result<Sequences> {
        const OP: &str = "attention_forward";
        let (seqs, n) = attention_shape(OP, cu_seqlens, layout, window)?;
        check_len(OP, "out", out, n * layout.q_width())?;
        check_len(OP, "qkv", qkv, n * layout.width())?;
        check_len(OP, "saved", saved, saved_len)?;
        Ok(seqs)
    }

    /// `saved_len` is the backend's `attention_saved_len` for this packing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_backward(
        dqkv: usize,
        dout: usize,
        qkv: usize,
        out: usize,
        saved: usize,
        cu_seqlens: &[i32],
        layout: QkvLayout,
        window: Window,
        saved_len: usize,
    ) -> Result<Sequences> {
        const OP: &str = "attention_backward";
        let (seqs, n) = attention_shape(OP, cu_seqlens, layout, window)?;
        check_len(OP, "dqkv", dqkv, n * layout.width())?;
        check_len(OP, "dout", dout, n * layout.q_width())?;
        check_len(OP, "qkv", qkv, n * layout.width())?;
        check_len(OP, "out", out, n * layout.q_width())?;
        check_len(OP, "saved", saved, saved_len)?;
        Ok(seqs)
    }
}
