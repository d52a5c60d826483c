//! The encoder: token plus position embeddings, and their deterministic backward (kernels/embedding.cu,
//! CPU twin in cpu/embedding.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;

pub trait EmbeddingOps: Buffers {
    /// `out[t, :] = wte[tokens[t], :] + wpe[positions[t], :]`; out `[n, c]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        tokens: &Self::Ids,
        positions: &Self::Ids,
        wte: &Self::Buf,
        wpe: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// Accumulates `dwte[tokens[t]] += dout[t]`, `dwpe[positions[t]] += dout[t]`, deterministically.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dwte: &mut Self::Buf,
        dwpe: &mut Self::Buf,
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
        wpe: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_forward";
        ensure!(c > 0, "{OP}: channels must be positive");
        check_len(OP, "out", out, n * c)?;
        check_len(OP, "tokens", tokens.len(), n)?;
        check_len(OP, "positions", positions.len(), n)?;
        ensure!(wte.is_multiple_of(c) && wpe.is_multiple_of(c), "{OP}: wte/wpe lengths must be multiples of c = {c}");
        check_ids(OP, "tokens", tokens, wte / c, false)?;
        check_ids(OP, "positions", positions, wpe / c, false)
    }

    pub(crate) fn embedding_backward(
        dwte: usize,
        dwpe: usize,
        dout: usize,
        tokens: &[i32],
        positions: &[i32],
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        ensure!(c > 0, "{OP}: channels must be positive");
        check_len(OP, "dout", dout, n * c)?;
        check_len(OP, "tokens", tokens.len(), n)?;
        check_len(OP, "positions", positions.len(), n)?;
        ensure!(
            dwte.is_multiple_of(c) && dwpe.is_multiple_of(c),
            "{OP}: dwte/dwpe lengths must be multiples of c = {c}"
        );
        check_ids(OP, "tokens", tokens, dwte / c, false)?;
        check_ids(OP, "positions", positions, dwpe / c, false)
    }
}
