//! Row selection: the LM head runs only on rows that carry a target; `gather_rows` picks them and
//! `scatter_rows` puts their gradient back (kernels/rows.cu, CPU twin in cpu/rows.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;

pub trait RowOps: Buffers {
    // The LM head runs only on the rows that carry a target: the model gathers those rows of the
    // final LayerNorm's output before the head and scatters their gradient back after it.

    /// `out[i, :] = inp[rows[i], :]` for `i < m`: `out [m, c]`, `inp [n, c]`, `rows [m]`. Overwrites
    /// `out` with an exact copy of the selected rows (no rounding: `out` takes `inp`'s storage
    /// precision). `rows` are distinct and increasing, each in `0..n` (checked on the host).
    fn gather_rows(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        rows: &Self::Ids,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// The backward of `gather_rows`: overwrites `dinp [n, c]` with zeros, except
    /// `dinp[rows[i], :] = dout[i, :]` for `i < m` (an exact copy, in `dout`'s storage precision);
    /// `dout [m, c]`. `rows` as for `gather_rows` (distinct, so no two rows land on one: no
    /// accumulation, deterministic). `m = 0` zeroes `dinp`.
    fn scatter_rows(
        &self,
        dinp: &mut Self::Buf,
        dout: &Self::Buf,
        rows: &Self::Ids,
        m: usize,
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

    /// Shapes of `gather_rows` / `scatter_rows`: `selected [m, c]`, `full [n, c]`, and `rows` of length
    /// `m`, strictly increasing, in `0..n`.
    #[allow(clippy::too_many_arguments)]
    fn row_selection(
        op: &str,
        selected_name: &str,
        selected: usize,
        full_name: &str,
        full: usize,
        rows: &[i32],
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        ensure!(c > 0, "{op}: channels must be positive");
        check_len(op, selected_name, selected, m * c)?;
        check_len(op, full_name, full, n * c)?;
        check_len(op, "rows", rows.len(), m)?;
        check_ids(op, "rows", rows, n, false)?;
        if let Some(i) = rows.windows(2).position(|w| w[1] <= w[0]) {
            let (a, b) = (rows[i], rows[i + 1]);
            bail!("{op}: `rows` must be strictly increasing, but rows[{i}] = {a} and rows[{}] = {b}", i + 1);
        }
        Ok(())
    }

    pub(crate) fn gather_rows(out: usize, inp: usize, rows: &[i32], m: usize, n: usize, c: usize) -> Result<()> {
        row_selection("gather_rows", "out", out, "inp", inp, rows, m, n, c)
    }

    pub(crate) fn scatter_rows(dinp: usize, dout: usize, rows: &[i32], m: usize, n: usize, c: usize) -> Result<()> {
        row_selection("scatter_rows", "dout", dout, "dinp", dinp, rows, m, n, c)
    }
}
