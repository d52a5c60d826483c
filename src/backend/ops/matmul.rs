//! Matrix products with an optional bias, and the MLP's product fused with bias + GELU (cuBLASLt on a
//! device, the `gemm` crate on the CPU: cpu/matmul.rs).
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;
use crate::backend::PointwiseOps;
use crate::backend::WeightLayout;

pub trait MatmulOps: Buffers + PointwiseOps {
    /// `out[n, oc] = inp[n, ic] · W (+ bias[oc])`, W laid out as `layout` says. Overwrites `out`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()>;
    /// `out[n, oc] = inp[n, ic] · W` (no bias), `out` kept in f32 whatever the backend's storage
    /// precision: a bf16 backend multiplies its bf16 operands into an f32 output, with no rounding
    /// of the f32 accumulator (the LM head's logits, whose bf16 step is a fraction of a nat at the
    /// logits' size). A backend that stores everything in f32 has nothing to change.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward_f32_out(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        self.matmul_forward(out, inp, weight, None, n, ic, oc, layout)
    }
    /// `pre = inp · W + bias` (InOut layout) and `out = gelu(pre)` (tanh form), as `matmul_forward`
    /// then `gelu_forward`; a backend may fuse the GELU into the product's epilogue (cuBLASLt
    /// `GELU_AUX_BIAS`), computing it from the f32 accumulator before `pre` is rounded to storage.
    #[allow(clippy::too_many_arguments)]
    fn matmul_bias_gelu_forward(
        &self,
        pre: &mut Self::Buf,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        self.matmul_forward(pre, inp, weight, Some(bias), n, ic, oc, WeightLayout::InOut)?;
        self.gelu_forward(out, pre)
    }
    /// Overwrites `dinp [n, ic]`; accumulates into `dweight` (same layout as `weight`) and `dbias`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    #[allow(unused_imports)]
    use anyhow::{bail, ensure, Result};

    #[allow(unused_imports)]
    use crate::backend::checks::{check_ids, check_len, sequences, Sequences};

    pub(crate) fn matmul_forward(
        out: usize,
        inp: usize,
        weight: usize,
        bias: Option<usize>,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "matmul_forward";
        check_len(OP, "out", out, n * oc)?;
        check_len(OP, "inp", inp, n * ic)?;
        check_len(OP, "weight", weight, ic * oc)?;
        if let Some(bias) = bias {
            check_len(OP, "bias", bias, oc)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_backward(
        dinp: usize,
        dweight: usize,
        dbias: Option<usize>,
        dout: usize,
        inp: usize,
        weight: usize,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "matmul_backward";
        check_len(OP, "dinp", dinp, n * ic)?;
        check_len(OP, "dout", dout, n * oc)?;
        check_len(OP, "inp", inp, n * ic)?;
        check_len(OP, "weight", weight, ic * oc)?;
        check_len(OP, "dweight", dweight, ic * oc)?;
        if let Some(dbias) = dbias {
            check_len(OP, "dbias", dbias, oc)?;
        }
        Ok(())
    }
}
