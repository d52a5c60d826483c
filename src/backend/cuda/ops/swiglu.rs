//! SwiGLU on the CUDA backend (kernels/swiglu.cu): one grid-stride launch over the `[n, f]` output
//! elements, in the activation type.

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf};
use crate::backend::cuda::launch::{i32_arg, packed_grid_stride_config, suffix};
use crate::backend::cuda::KernelArg;
use crate::backend::{checks, SwiGluOps};

impl SwiGluOps for CudaBackend {
    fn swiglu_forward(&self, out: &mut CudaBuf, inp: &CudaBuf, n: usize, f: usize) -> Result<()> {
        checks::swiglu_forward(out.len(), inp.len(), n, f)?;
        if n * f == 0 {
            return Ok(());
        }
        let dt = self.act();
        let inp = self.input(inp, dt)?;
        let out = self.output(out, dt, false)?;
        self.launch(
            &format!("swiglu_forward_{}", suffix(dt)),
            packed_grid_stride_config(n * f, dt),
            &[out.arg(), inp.arg(), KernelArg::I64(n as i64), i32_arg(f, "f")?],
        )
    }

    fn swiglu_backward(&self, dinp: &mut CudaBuf, inp: &CudaBuf, dout: &CudaBuf, n: usize, f: usize) -> Result<()> {
        checks::swiglu_backward(dinp.len(), inp.len(), dout.len(), n, f)?;
        if n * f == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (inp, dout) = (self.input(inp, dt)?, self.input(dout, dt)?);
        let dinp = self.output(dinp, dt, false)?;
        self.launch(
            &format!("swiglu_backward_{}", suffix(dt)),
            packed_grid_stride_config(n * f, dt),
            &[dinp.arg(), inp.arg(), dout.arg(), KernelArg::I64(n as i64), i32_arg(f, "f")?],
        )
    }
}
