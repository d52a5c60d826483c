//! LayerNorm, forward and backward, and the residual add fused with the next LayerNorm
//! (kernels/layernorm.cu, CPU twin in cpu/layernorm.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;
use crate::backend::PointwiseOps;

pub trait LayerNormOps: Buffers + PointwiseOps {
    /// `out = (inp − mean) · rstd · weight + bias` per row; saves `mean [n]` and `rstd [n]`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// Accumulates into `dinp`, `dweight`, `dbias`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dbias: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;

    /// The residual add fused with the next LayerNorm: `residual = a + b`, then `out`, `mean`, `rstd`
    /// as `layernorm_forward` of `residual`. One read of `a` and `b` instead of a write and a re-read
    /// of the residual stream.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        residual: &mut Self::Buf,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        self.residual_forward(residual, a, b)?;
        self.layernorm_forward(out, mean, rstd, residual, weight, bias, n, c, eps)
    }
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    #[allow(unused_imports)]
    use anyhow::{bail, ensure, Result};

    #[allow(unused_imports)]
    use crate::backend::checks::{check_ids, check_len, sequences, Sequences};

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layernorm_forward(
        out: usize,
        mean: usize,
        rstd: usize,
        inp: usize,
        weight: usize,
        bias: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "layernorm_forward";
        ensure!(c > 0, "{OP}: channels must be positive");
        check_len(OP, "out", out, n * c)?;
        check_len(OP, "inp", inp, n * c)?;
        check_len(OP, "mean", mean, n)?;
        check_len(OP, "rstd", rstd, n)?;
        check_len(OP, "weight", weight, c)?;
        check_len(OP, "bias", bias, c)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn residual_layernorm_forward(
        residual: usize,
        out: usize,
        mean: usize,
        rstd: usize,
        a: usize,
        b: usize,
        weight: usize,
        bias: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "residual_layernorm_forward";
        ensure!(c > 0, "{OP}: channels must be positive");
        check_len(OP, "residual", residual, n * c)?;
        check_len(OP, "out", out, n * c)?;
        check_len(OP, "a", a, n * c)?;
        check_len(OP, "b", b, n * c)?;
        check_len(OP, "mean", mean, n)?;
        check_len(OP, "rstd", rstd, n)?;
        check_len(OP, "weight", weight, c)?;
        check_len(OP, "bias", bias, c)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layernorm_backward(
        dinp: usize,
        dweight: usize,
        dbias: usize,
        dout: usize,
        inp: usize,
        weight: usize,
        mean: usize,
        rstd: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "layernorm_backward";
        ensure!(c > 0, "{OP}: channels must be positive");
        check_len(OP, "dinp", dinp, n * c)?;
        check_len(OP, "dout", dout, n * c)?;
        check_len(OP, "inp", inp, n * c)?;
        check_len(OP, "mean", mean, n)?;
        check_len(OP, "rstd", rstd, n)?;
        check_len(OP, "weight", weight, c)?;
        check_len(OP, "dweight", dweight, c)?;
        check_len(OP, "dbias", dbias, c)
    }
}
