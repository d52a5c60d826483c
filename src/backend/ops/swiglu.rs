//! SwiGLU, the gated activation of the Llama MLP, forward and backward (kernels/swiglu.cu, CPU twin
//! in cpu/swiglu.rs).
//!
//! Layout: the MLP computes its gate and up projections as one product with the concatenated weight
//! `[gate_proj; up_proj]` (`[2f, c]`), so each token's row of that product holds the gate and the up
//! activation side by side: `inp [n, 2f]`, row `t` = `[gate_t (f) | up_t (f)]`. The backward writes
//! its gradient in the same layout, which is what that product's backward takes.
//!
//! The trait is the contract every backend implements; `check` holds the argument checks every
//! backend runs first, so that the same mistake gives the same error everywhere.

use anyhow::Result;

use crate::backend::Buffers;

pub trait SwiGluOps: Buffers {
    /// `out[t, j] = silu(gate[t, j]) · up[t, j]` with `silu(g) = g · σ(g)` (HF
    /// `act_fn(gate_proj(x)) * up_proj(x)`, `hidden_act = "silu"`); `inp [n, 2f]` as in the module
    /// doc, `out [n, f]`. Overwrites `out`.
    fn swiglu_forward(&self, out: &mut Self::Buf, inp: &Self::Buf, n: usize, f: usize) -> Result<()>;
    /// Overwrites `dinp [n, 2f]` (gate and up gradients side by side):
    /// `dgate = dout · up · σ(g) · (1 + g · (1 − σ(g)))`, `dup = dout · silu(g)`.
    fn swiglu_backward(
        &self,
        dinp: &mut Self::Buf,
        inp: &Self::Buf,
        dout: &Self::Buf,
        n: usize,
        f: usize,
    ) -> Result<()>;
}

/// Argument checks, one per method, with its name and argument order (see `crate::backend::checks`).
pub(crate) mod check {
    use anyhow::Result;

    use crate::backend::checks::check_len;

    pub(crate) fn swiglu_forward(out: usize, inp: usize, n: usize, f: usize) -> Result<()> {
        const OP: &str = "swiglu_forward";
        check_len(OP, "out", out, n * f)?;
        check_len(OP, "inp", inp, n * 2 * f)
    }

    pub(crate) fn swiglu_backward(dinp: usize, inp: usize, dout: usize, n: usize, f: usize) -> Result<()> {
        const OP: &str = "swiglu_backward";
        check_len(OP, "dinp", dinp, n * 2 * f)?;
        check_len(OP, "inp", inp, n * 2 * f)?;
        check_len(OP, "dout", dout, n * f)
    }
}
