//! LayerNorm on the CUDA backend (kernels/layernorm.cu): one warp per row for the forward and the
//! input gradient; the parameter gradients as per-chunk partial sums, then one ordered sum per
//! channel (no atomics).

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf};
use crate::backend::cuda::kernels::constants::layernorm::{LN_MIN_ROWS_PER_CHUNK, LN_WARPS_PER_BLOCK};
use crate::backend::cuda::launch::{grid_dim, i32_arg, suffix, ChannelSums};
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, LayerNormOps};

impl LayerNormOps for CudaBackend {
    fn layernorm_forward(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::layernorm_forward(out.len(), mean.len(), rstd.len(), inp.len(), weight.len(), bias.len(), n, c)?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (inp, weight, bias) = (self.input(inp, dt)?, self.input(weight, dt)?, self.input(bias, dt)?);
        let mean = self.output(mean, Dtype::F32, false)?.arg();
        let rstd = self.output(rstd, Dtype::F32, false)?.arg();
        let out = self.output(out, dt, false)?;
        let blocks = grid_dim(n.div_ceil(LN_WARPS_PER_BLOCK as usize), "layernorm blocks")?;
        self.launch(
            &format!("layernorm_forward_{}", suffix(dt)),
            LaunchConfig::grid_1d(blocks, 32 * LN_WARPS_PER_BLOCK as u32),
            &[
                out.arg(),
                mean,
                rstd,
                inp.arg(),
                weight.arg(),
                bias.arg(),
                i32_arg(n, "n")?,
                i32_arg(c, "c")?,
                KernelArg::F32(eps),
            ],
        )
    }

    fn residual_layernorm_forward(
        &self,
        residual: &mut CudaBuf,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        checks::residual_layernorm_forward(
            residual.len(),
            out.len(),
            mean.len(),
            rstd.len(),
            a.len(),
            b.len(),
            weight.len(),
            bias.len(),
            n,
            c,
        )?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (a, b) = (self.input(a, dt)?, self.input(b, dt)?);
        let (weight, bias) = (self.input(weight, dt)?, self.input(bias, dt)?);
        let mean = self.output(mean, Dtype::F32, false)?.arg();
        let rstd = self.output(rstd, Dtype::F32, false)?.arg();
        let residual = self.output(residual, dt, false)?.arg();
        let out = self.output(out, dt, false)?;
        let blocks = grid_dim(n.div_ceil(LN_WARPS_PER_BLOCK as usize), "layernorm blocks")?;
        self.launch(
            &format!("residual_layernorm_forward_{}", suffix(dt)),
            LaunchConfig::grid_1d(blocks, 32 * LN_WARPS_PER_BLOCK as u32),
            &[
                residual,
                out.arg(),
                mean,
                rstd,
                a.arg(),
                b.arg(),
                weight.arg(),
                bias.arg(),
                i32_arg(n, "n")?,
                i32_arg(c, "c")?,
                KernelArg::F32(eps),
            ],
        )
    }

    fn layernorm_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: &mut CudaBuf,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::layernorm_backward(
            dinp.len(),
            dweight.len(),
            dbias.len(),
            dout.len(),
            inp.len(),
            weight.len(),
            mean.len(),
            rstd.len(),
            n,
            c,
        )?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (dout, inp, weight) = (self.input(dout, dt)?, self.input(inp, dt)?, self.input(weight, dt)?);
        let (mean, rstd) = (self.input(mean, Dtype::F32)?, self.input(rstd, Dtype::F32)?);
        let (n_arg, c_arg) = (i32_arg(n, "n")?, i32_arg(c, "c")?);

        let dinp = self.output(dinp, dt, true)?;
        let blocks = grid_dim(n.div_ceil(LN_WARPS_PER_BLOCK as usize), "layernorm blocks")?;
        self.launch(
            &format!("layernorm_backward_dinp_{}", suffix(dt)),
            LaunchConfig::grid_1d(blocks, 32 * LN_WARPS_PER_BLOCK as u32),
            &[dinp.arg(), dout.arg(), inp.arg(), weight.arg(), mean.arg(), rstd.arg(), n_arg, c_arg],
        )?;

        // Parameter gradients: per-chunk partials, then one ordered sum per channel. The chunk size
        // depends only on n (more rows per chunk only when the grid would exceed its y limit).
        let sums = ChannelSums::new(n, c, LN_MIN_ROWS_PER_CHUNK as usize, "layernorm")?;
        let (rows_per_chunk, chunks) = (sums.rows_per_chunk, sums.chunks);
        let partial = self.device.alloc::<f32>(chunks * 2 * c)?;
        self.launch(
            &format!("layernorm_backward_params_partial_{}", suffix(dt)),
            sums.partial_config(),
            &[
                KernelArg::Ptr(partial.device_ptr()),
                dout.arg(),
                inp.arg(),
                mean.arg(),
                rstd.arg(),
                n_arg,
                c_arg,
                i32_arg(rows_per_chunk, "rows per chunk")?,
            ],
        )?;
        let dweight = self.output(dweight, dt, true)?.arg();
        let dbias = self.output(dbias, dt, true)?.arg();
        self.launch(
            &format!("layernorm_backward_params_reduce_{}", suffix(dt)),
            sums.reduce_config(),
            &[dweight, dbias, KernelArg::Ptr(partial.device_ptr()), i32_arg(chunks, "chunks")?, c_arg],
        )
    }
}
