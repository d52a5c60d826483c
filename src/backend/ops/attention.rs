//! Causal multi-head self-attention inside each sequence of a packed batch (kernels/attention.cu, CPU
//! twin in cpu/attention.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;
use crate::backend::Packing;

pub trait AttentionOps: Buffers {
    /// Length of the buffer `attention_forward` saves for the backward (backend-specific: the CPU
    /// keeps the probabilities, `n_head · Σ T_s²`; a flash-style kernel keeps only `n_head · n` lse).
    fn attention_saved_len(&self, packing: &Packing<Self>, n_head: usize) -> usize;
    /// Causal multi-head self-attention inside each sequence. `qkv [n, 3c]` holds q, k, v side by
    /// side (HF `c_attn` output); writes `out [n, c]` (heads concatenated) and `saved`.
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        saved: &mut Self::Buf,
        qkv: &Self::Buf,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()>;
    /// Overwrites `dqkv [n, 3c]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        saved: &Self::Buf,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    #[allow(unused_imports)]
    use anyhow::{bail, ensure, Result};

    #[allow(unused_imports)]
    use crate::backend::checks::{check_ids, check_len, sequences, Sequences};

    /// `n_head` divides `c`, and `cu_seqlens` is valid; returns the sequences and the token count.
    fn attention_shape(op: &str, cu_seqlens: &[i32], n_head: usize, c: usize) -> Result<(Sequences, usize)> {
        ensure!(
            n_head > 0 && c.is_multiple_of(n_head),
            "{op}: c = {c} is not a positive multiple of n_head = {n_head}"
        );
        let n = cu_seqlens.last().map_or(0, |&last| last as usize);
        Ok((sequences(op, cu_seqlens, n)?, n))
    }

    /// `saved_len` is the backend's `attention_saved_len` for this packing.
    pub(crate) fn attention_forward(
        out: usize,
        saved: usize,
        qkv: usize,
        cu_seqlens: &[i32],
        n_head: usize,
        c: usize,
        saved_len: usize,
    ) -> Result<Sequences> {
        const OP: &str = "attention_forward";
        let (seqs, n) = attention_shape(OP, cu_seqlens, n_head, c)?;
        check_len(OP, "out", out, n * c)?;
        check_len(OP, "qkv", qkv, n * 3 * c)?;
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
        n_head: usize,
        c: usize,
        saved_len: usize,
    ) -> Result<Sequences> {
        const OP: &str = "attention_backward";
        let (seqs, n) = attention_shape(OP, cu_seqlens, n_head, c)?;
        check_len(OP, "dqkv", dqkv, n * 3 * c)?;
        check_len(OP, "dout", dout, n * c)?;
        check_len(OP, "qkv", qkv, n * 3 * c)?;
        check_len(OP, "out", out, n * c)?;
        check_len(OP, "saved", saved, saved_len)?;
        Ok(seqs)
    }
}
