//! Elementwise ops: GELU (tanh form) forward and backward, residual add, in-place add, scale
//! (kernels/pointwise.cu, CPU twin in cpu/pointwise.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;

pub trait PointwiseOps: Buffers {
    /// GELU, tanh form (HF `gelu_new`). Overwrites `out`.
    fn gelu_forward(&self, out: &mut Self::Buf, inp: &Self::Buf) -> Result<()>;
    /// Overwrites `dinp = dout · gelu'(inp)`.
    fn gelu_backward(&self, dinp: &mut Self::Buf, inp: &Self::Buf, dout: &Self::Buf) -> Result<()>;
    /// `out = a + b`.
    fn residual_forward(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()>;
    /// `dst += src`.
    fn add_inplace(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// `buf *= s`.
    fn scale(&self, buf: &mut Self::Buf, s: f32) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    #[allow(unused_imports)]
    use anyhow::{bail, ensure, Result};

    #[allow(unused_imports)]
    use crate::backend::checks::{check_ids, check_len, sequences, Sequences};

    pub(crate) fn gelu_forward(out: usize, inp: usize) -> Result<()> {
        check_len("gelu_forward", "out", out, inp)
    }

    pub(crate) fn gelu_backward(dinp: usize, inp: usize, dout: usize) -> Result<()> {
        check_len("gelu_backward", "dinp", dinp, inp)?;
        check_len("gelu_backward", "dout", dout, inp)
    }

    pub(crate) fn residual_forward(out: usize, a: usize, b: usize) -> Result<()> {
        check_len("residual_forward", "a", a, out)?;
        check_len("residual_forward", "b", b, out)
    }

    pub(crate) fn add_inplace(dst: usize, src: usize) -> Result<()> {
        check_len("add_inplace", "src", src, dst)
    }
}
