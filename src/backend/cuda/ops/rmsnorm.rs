//! RMSNorm on the CUDA backend (kernels/rmsnorm.cu): one warp per row for the forward and the input
//! gradient; the weight gradient as per-chunk partial sums, then one ordered sum per channel (no
//! atomics).

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf};
use crate::backend::cuda::kernels::constants::rmsnorm::{RMS_MIN_ROWS_PER_CHUNK, RMS_WARPS_PER_BLOCK};
use crate::backend::cuda::launch::{grid_dim, i32_arg, suffix, ChannelSums};
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, RmsNormOps};

/// The row kernels' launch: `RMS_WARPS_PER_BLOCK` rows (one warp each) per block.
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
        let (n_arg, c_arg) = (i32_arg(n, "n")?, i32_arg(c, "c")?);

        let dinp = self.output(dinp, dt, true)?;
        self.launch(
            &format!("rmsnorm_backward_dinp_{}", suffix(dt)),
            row_config(n)?,
            &[dinp.arg(), dout.arg(), inp.arg(), weight.arg(), rstd.arg(), n_arg, c_arg],
        )?;

        // The weight gradient: per-chunk partials, then one ordered sum per channel. The chunk size
        // depends only on n (more rows per chunk only when the grid would exceed its y limit).
        let sums = ChannelSums::new(n, c, RMS_MIN_ROWS_PER_CHUNK as usize, "rmsnorm")?;
        let (rows_per_chunk, chunks) = (sums.rows_per_chunk, sums.chunks);
        let partial = self.device.alloc::<f32>(chunks * c)?;
        self.launch(
            &format!("rmsnorm_backward_dweight_partial_{}", suffix(dt)),
            sums.partial_config(),
            &[
                KernelArg::Ptr(partial.device_ptr()),
                dout.arg(),
                inp.arg(),
                rstd.arg(),
                n_arg,
                c_arg,
                i32_arg(rows_per_chunk, "rows per chunk")?,
            ],
        )?;
        let dweight = self.output(dweight, dt, true)?.arg();
        self.launch(
            &format!("rmsnorm_backward_dweight_reduce_{}", suffix(dt)),
            sums.reduce_config(),
            &[dweight, KernelArg::Ptr(partial.device_ptr()), i32_arg(chunks, "chunks")?, c_arg],
        )
    }
}
