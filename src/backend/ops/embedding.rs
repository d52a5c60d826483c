//! The encoder: token embeddings, plus learned position embeddings where the model has them
//! (GPT-2; the Llama family's positions are RoPE, inside attention), and their deterministic
//! backward (kernels/embedding.cu, CPU twin in cpu/embedding.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;

pub trait EmbeddingOps: Buffers {
    /// `out[t, :] = wte[tokens[t], :] + wpe[positions[t], :]`, or `wte[tokens[t], :]` without
    /// `wpe`; out `[n, c]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        tokens: &Self::Ids,
        positions: &Self::Ids,
        wte: &Self::Buf,
        wpe: Option<&Self::Buf>,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// Accumulates `dwte[tokens[t]] += dout[t]` and, with `dwpe`, `dwpe[positions[t]] += dout[t]`,
    /// deterministically.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dwte: &mut Self::Buf,
        dwpe: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        tokens: &Self::Ids,
        positions: &Self::Ids,
        n: usize,
        c: usize,
    ) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    #[allow(unused_imports)]
    use anyhow::{bail, ensure, Result};

    #[allow(unused_imports)]
    use crate::backend::checks::{check_ids, check_len, sequences, Sequences};

    pub(crate) fn embedding_forward(
        out: usize,
        tokens: &[i32],
        positions: &[i32],
        wte: usize,
        wpe: Option<usize>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        tables("embedding_forward", out, "out", tokens, positions, wte, wpe, n, c)
    }

    /// The checks both directions share: `[n, c]` activations, `n` ids each, tables `[rows, c]`
    /// that every id indexes.
    #[allow(clippy::too_many_arguments)]
    fn tables(
        op: &str,
        act: usize,
        act_name: &str,
        tokens: &[i32],
        positions: &[i32],
        wte: usize,
        wpe: Option<usize>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        ensure!(c > 0, "{op}: channels must be positive");
        check_len(op, act_name, act, n * c)?;
        check_len(op, "tokens", tokens.len(), n)?;
        check_len(op, "positions", positions.len(), n)?;
        ensure!(wte.is_multiple_of(c), "{op}: the token table's length must be a multiple of c = {c}");
        check_ids(op, "tokens", tokens, wte / c, false)?;
        if let Some(wpe) = wpe {
            ensure!(wpe.is_multiple_of(c), "{op}: the position table's length must be a multiple of c = {c}");
            check_ids(op, "positions", positions, wpe / c, false)?;
        }
        Ok(())
    }

    pub(crate) fn embedding_backward(
        dwte: usize,
        dwpe: Option<usize>,
        dout: usize,
        tokens: &[i32],
        positions: &[i32],
        n: usize,
        c: usize,
    ) -> Result<()> {
        tables("embedding_backward", dout, "dout", tokens, positions, dwte, dwpe, n, c)
    }
}
