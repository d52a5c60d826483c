//! Elementwise ops on the CUDA backend (kernels/pointwise.cu): one grid-stride launch each, in the
//! output's storage type, a thread per 128-bit pack of elements.

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf};
use crate::backend::cuda::launch::{packed_grid_stride_config, suffix};
use crate::backend::cuda::{Dtype, KernelArg};
use crate::backend::{checks, PointwiseOps};

impl CudaBackend {
    /// Launches elementwise kernel `<op>_<dtype>` over `n` elements with `args` followed by `n`.
    fn pointwise(&self, op: &str, dtype: Dtype, n: usize, args: &[KernelArg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut all = args.to_vec();
        all.push(KernelArg::I64(n as i64));
        self.launch(&format!("{op}_{}", suffix(dtype)), packed_grid_stride_config(n, dtype), &all)
    }
}

impl PointwiseOps for CudaBackend {
    // Elementwise ops compute in their output's storage type (the activation type unless an op
    // made it f32), so that they never round an f32 tensor to bf16.
    fn gelu_forward(&self, out: &mut CudaBuf, inp: &CudaBuf) -> Result<()> {
        checks::gelu_forward(out.len(), inp.len())?;
        let (dt, n) = (out.dtype(), out.len());
        let inp = self.input(inp, dt)?;
        let out = self.output(out, dt, false)?;
        self.pointwise("gelu_forward", dt, n, &[out.arg(), inp.arg()])
    }

    fn gelu_backward(&self, dinp: &mut CudaBuf, inp: &CudaBuf, dout: &CudaBuf) -> Result<()> {
        checks::gelu_backward(dinp.len(), inp.len(), dout.len())?;
        let (dt, n) = (dinp.dtype(), dinp.len());
        let (inp, dout) = (self.input(inp, dt)?, self.input(dout, dt)?);
        let dinp = self.output(dinp, dt, false)?;
        self.pointwise("gelu_backward", dt, n, &[dinp.arg(), inp.arg(), dout.arg()])
    }

    fn residual_forward(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf) -> Result<()> {
        checks::residual_forward(out.len(), a.len(), b.len())?;
        let (dt, n) = (out.dtype(), out.len());
        let (a, b) = (self.input(a, dt)?, self.input(b, dt)?);
        let out = self.output(out, dt, false)?;
        self.pointwise("residual_forward", dt, n, &[out.arg(), a.arg(), b.arg()])
    }

    fn add_inplace(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        checks::add_inplace(dst.len(), src.len())?;
        let (dt, n) = (dst.dtype(), dst.len());
        let src = self.input(src, dt)?;
        let dst = self.output(dst, dt, true)?;
        self.pointwise("add_inplace", dt, n, &[dst.arg(), src.arg()])
    }

    fn scale(&self, buf: &mut CudaBuf, s: f32) -> Result<()> {
        let n = buf.len();
        self.pointwise("scale", buf.dtype(), n, &[buf.storage.arg(), KernelArg::F32(s)])?;
        if let Some(master) = &buf.master {
            self.pointwise("scale", Dtype::F32, n, &[KernelArg::Ptr(master.device_ptr()), KernelArg::F32(s)])?;
        }
        Ok(())
    }
}
