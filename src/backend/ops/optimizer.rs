//! Parameter updates: AdamW (fp32 moments, bias-corrected, decoupled decay) and plain SGD
//! (kernels/optimizer.cu, CPU twin in cpu/optimizer.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::AdamWParams;
use crate::backend::Buffers;

pub trait OptimizerOps: Buffers {
    /// One AdamW step on one tensor; `m`, `v` are fp32 state of the same length.
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        p: &AdamWParams,
    ) -> Result<()>;
    /// `param −= lr · grad_scale · grad`.
    fn sgd(&self, param: &mut Self::Buf, grad: &Self::Buf, lr: f32, grad_scale: f32) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    #[allow(unused_imports)]
    use anyhow::{bail, ensure, Result};

    #[allow(unused_imports)]
    use crate::backend::checks::{check_ids, check_len, sequences, Sequences};

    pub(crate) fn adamw(param: usize, grad: usize, m: usize, v: usize, step: u32) -> Result<()> {
        const OP: &str = "adamw";
        check_len(OP, "grad", grad, param)?;
        check_len(OP, "m", m, param)?;
        check_len(OP, "v", v, param)?;
        ensure!(step >= 1, "{OP}: step is 1-based, got 0");
        Ok(())
    }

    pub(crate) fn sgd(param: usize, grad: usize) -> Result<()> {
        check_len("sgd", "grad", grad, param)
    }
}
