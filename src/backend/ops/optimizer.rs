//! Parameter updates: AdamW (fp32 moments, bias-corrected, decoupled decay) and plain SGD
//! (kernels/optimizer.cu, CPU twin in cpu/optimizer.rs), on one tensor or on a list of tensors at
//! once (one launch on a device, whatever the number of tensors).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::AdamWParams;
use crate::backend::Buffers;

/// One tensor of a multi-tensor AdamW update: the parameter, its gradient, its fp32 moments and
/// whether weight decay applies to it.
pub struct AdamWTensor<'a, Buf> {
    pub param: &'a mut Buf,
    pub grad: &'a Buf,
    pub m: &'a mut Buf,
    pub v: &'a mut Buf,
    /// Whether `AdamWParams::weight_decay` applies (else the tensor is updated with decay 0).
    pub decay: bool,
}

/// One tensor of a multi-tensor SGD update.
pub struct SgdTensor<'a, Buf> {
    pub param: &'a mut Buf,
    pub grad: &'a Buf,
}

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
    /// One AdamW step on every tensor of the list, each exactly as `adamw` would update it with
    /// `p` (its `weight_decay` where the tensor's `decay` says, 0 elsewhere): the same bits, in one
    /// launch on a device.
    fn adamw_tensors(&self, tensors: &mut [AdamWTensor<'_, Self::Buf>], p: &AdamWParams) -> Result<()>;
    /// `param −= lr · grad_scale · grad`.
    fn sgd(&self, param: &mut Self::Buf, grad: &Self::Buf, lr: f32, grad_scale: f32) -> Result<()>;
    /// `sgd` on every tensor of the list (the same bits), in one launch on a device.
    fn sgd_tensors(&self, tensors: &mut [SgdTensor<'_, Self::Buf>], lr: f32, grad_scale: f32) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    #[allow(unused_imports)]
    use anyhow::{bail, ensure, Context, Result};

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

    /// Each tensor's `(param, grad, m, v)` lengths, as `adamw` checks them; an error names the
    /// tensor's position in the list.
    pub(crate) fn adamw_tensors(lens: impl IntoIterator<Item = [usize; 4]>, step: u32) -> Result<()> {
        ensure!(step >= 1, "adamw: step is 1-based, got 0");
        for (t, [param, grad, m, v]) in lens.into_iter().enumerate() {
            adamw(param, grad, m, v, step).with_context(|| format!("tensor {t} of the list"))?;
        }
        Ok(())
    }

    pub(crate) fn sgd(param: usize, grad: usize) -> Result<()> {
        check_len("sgd", "grad", grad, param)
    }

    /// Each tensor's `(param, grad)` lengths, as `sgd` checks them.
    pub(crate) fn sgd_tensors(lens: impl IntoIterator<Item = [usize; 2]>) -> Result<()> {
        for (t, [param, grad]) in lens.into_iter().enumerate() {
            sgd(param, grad).with_context(|| format!("tensor {t} of the list"))?;
        }
        Ok(())
    }
}
