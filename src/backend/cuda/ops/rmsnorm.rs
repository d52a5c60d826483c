//! RMSNorm on the CUDA backend (kernels/rmsnorm.cu): one warp per row for the forward; the whole
//! backward in one launch, whose weight gradient is per-block partial sums that the grid's last block
//! adds up in block order (no float atomics: the same bits every run), into a gradient of the
//! activations' type or an f32 one (`rmsnorm_backward_bf16_f32`).

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf};
use crate::backend::cuda::kernels::constants::rmsnorm::RMS_WARPS_PER_BLOCK;
use crate::backend::cuda::launch::{grad_dtype, grad_kernel, grid_dim, i32_arg, suffix, NormBackwardPlan};
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, RmsNormOps};

/// The forward kernels' launch: `RMS_WARPS_PER_BLOCK` rows (one warp each) per block.
fn row_config(n: usize) -> Result<LaunchConfig> {
    let blocks = grid_dim(n.div_ceil(RMS_WARPS_PER_BLOCK as usize), "rmsnorm blocks")?;
    Ok(LaunchConfig::grid_1d(blocks, 32 * RMS_WARPS_PER_BLOCK as u32))
}

impl RmsNormOps for CudaBackend {
    fn rmsnorm_forward(
        &self,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::rmsnorm_forward(out.len(), rstd.len(), inp.len(), weight.len(), n, c)?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (inp, weight) = (self.input(inp, dt)?, self.input(weight, dt)?);
        let rstd = self.output(rstd, Dtype::F32, false)?.arg();
        let out = self.output(out, dt, false)?;
        self.launch(
            &format!("rmsnorm_forward_{}", suffix(dt)),
            row_config(n)?,
            &[out.arg(), rstd, inp.arg(), weight.arg(), i32_arg(n, "n")?, i32_arg(c, "c")?, KernelArg::F32(eps)],
        )
    }

    fn residual_rmsnorm_forward(
        &self,
        residual: &mut CudaBuf,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::residual_rmsnorm_forward(residual.len(), out.len(), rstd.len(), a.len(), b.len(), weight.len(), n, c)?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (a, b, weight) = (self.input(a, dt)?, self.input(b, dt)?, self.input(weight, dt)?);
        let rstd = self.output(rstd, Dtype::F32, false)?.arg();
        let residual = self.output(residual, dt, false)?.arg();
        let out = self.output(out, dt, false)?;
        self.launch(
            &format!("residual_rmsnorm_forward_{}", suffix(dt)),
            row_config(n)?,
            &[
                residual,
                out.arg(),
                rstd,
                a.arg(),
                b.arg(),
                weight.arg(),
                i32_arg(n, "n")?,
                i32_arg(c, "c")?,
                KernelArg::F32(eps),
            ],
        )
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::rmsnorm_backward(dinp.len(), dweight.len(), dout.len(), inp.len(), weight.len(), rstd.len(), n, c)?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (dout, inp, weight) = (self.input(dout, dt)?, self.input(inp, dt)?, self.input(weight, dt)?);
        let rstd = self.input(rstd, Dtype::F32)?;
        let plan = NormBackwardPlan::new(n, c, 1, "rmsnorm")?;
        // The scratch rows are written before they are read; the counter is zero (the backend's,
        // which the kernel's last block leaves at zero: no memset).
        let scratch = self.device.alloc::<f32>(plan.scratch_len())?;
        // The weight gradient in its own storage type (an f32 accumulator beside bf16 activations).
        let gt = grad_dtype(dt, dweight.dtype());
        let dinp = self.output(dinp, dt, true)?.arg();
        let dweight = self.output(dweight, gt, true)?.arg();
        self.with_block_counter(|counter| {
            self.launch(
                &grad_kernel("rmsnorm_backward", dt, gt),
                plan.config(),
                &[
                    dinp,
                    dweight,
                    KernelArg::Ptr(scratch.device_ptr()),
                    counter,
                    dout.arg(),
                    inp.arg(),
                    weight.arg(),
                    rstd.arg(),
                    i32_arg(n, "n")?,
                    i32_arg(c, "c")?,
                    i32_arg(plan.rows_per_block, "rows per block")?,
                ],
            )
        })
    }
}
