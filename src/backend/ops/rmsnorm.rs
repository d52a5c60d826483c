//! RMSNorm (HF `LlamaRMSNorm`), forward and backward, and the residual add fused with the next
//! RMSNorm (kernels/rmsnorm.cu, CPU twin in cpu/rmsnorm.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;
use crate::backend::PointwiseOps;

pub trait RmsNormOps: Buffers + PointwiseOps {
    /// `out = inp · rstd · weight` per row, `rstd = 1 / √(mean(inp²) + eps)` (HF `LlamaRMSNorm`: no
    /// centring, no bias; computed in f32 whatever the storage type); saves `rstd [n]`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// Accumulates into `dinp` and `dweight` (`dweight` summed over rows in an order fixed by `n`).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;

    /// The residual add fused with the next RMSNorm: `residual = a + b`, then `out` and `rstd` as
    /// `rmsnorm_forward` of `residual`. One read of `a` and `b` instead of a write and a re-read of
    /// the residual stream.
    #[allow(clippy::too_many_arguments)]
    fn residual_rmsnorm_forward(
        &self,
        residual: &mut Self::Buf,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        self.residual_forward(residual, a, b)?;
        self.rmsnorm_forward(out, rstd, residual, weight, n, c, eps)
    }
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    use anyhow::{ensure, Result};

    use crate::backend::checks::check_len;

    pub(crate) fn rmsnorm_forward(
        out: usize,
        rstd: usize,
        inp: usize,
        weight: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_forward";
        ensure!(c > 0, "{OP}: channels must be positive");
        check_len(OP, "out", out, n * c)?;
        check_len(OP, "inp", inp, n * c)?;
        check_len(OP, "rstd", rstd, n)?;
        check_len(OP, "weight", weight, c)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn residual_rmsnorm_forward(
        residual: usize,
        out: usize,
        rstd: usize,
        a: usize,
        b: usize,
        weight: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "residual_rmsnorm_forward";
        ensure!(c > 0, "{OP}: channels must be positive");
        check_len(OP, "residual", residual, n * c)?;
        check_len(OP, "out", out, n * c)?;
        check_len(OP, "a", a, n * c)?;
        check_len(OP, "b", b, n * c)?;
        check_len(OP, "rstd", rstd, n)?;
        check_len(OP, "weight", weight, c)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm_backward(
        dinp: usize,
        dweight: usize,
        dout: usize,
        inp: usize,
        weight: usize,
        rstd: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_backward";
        ensure!(c > 0, "{OP}: channels must be positive");
        check_len(OP, "dinp", dinp, n * c)?;
        check_len(OP, "dout", dout, n * c)?;
        check_len(OP, "inp", inp, n * c)?;
        check_len(OP, "rstd", rstd, n)?;
        check_len(OP, "weight", weight, c)?;
        check_len(OP, "dweight", dweight, c)
    }
}
