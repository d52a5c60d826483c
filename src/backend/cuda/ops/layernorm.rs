//! LayerNorm on the CUDA backend (kernels/layernorm.cu): one warp per row for the forward; the whole
//! backward in one launch, whose parameter gradients are per-block partial sums that the grid's last
//! block adds up in block order (no float atomics: the same bits every run), into gradients of the
//! activations' type or f32 ones (`layernorm_backward_bf16_f32`).

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf};
use crate::backend::cuda::kernels::constants::layernorm::LN_WARPS_PER_BLOCK;
use crate::backend::cuda::launch::{grad_dtype, grad_kernel, grid_dim, i32_arg, suffix, NormBackwardPlan};
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
        let plan = NormBackwardPlan::new(n, c, 2, "layernorm")?;
        // The scratch rows are written before they are read; the counter is zero (the backend's,
        // which the kernel's last block leaves at zero: no memset).
        let scratch = self.device.alloc::<f32>(plan.scratch_len())?;
        // The parameter gradients in their own storage type (f32 accumulators beside bf16 activations).
        let gt = grad_dtype(dt, dweight.dtype());
        let dinp = self.output(dinp, dt, true)?.arg();
        let dweight = self.output(dweight, gt, true)?.arg();
        let dbias = self.output(dbias, gt, true)?.arg();
        self.with_block_counter(|counter| {
            self.launch(
                &grad_kernel("layernorm_backward", dt, gt),
                plan.config(),
                &[
                    dinp,
                    dweight,
                    dbias,
                    KernelArg::Ptr(scratch.device_ptr()),
                    counter,
                    dout.arg(),
                    inp.arg(),
                    weight.arg(),
                    mean.arg(),
                    rstd.arg(),
                    i32_arg(n, "n")?,
                    i32_arg(c, "c")?,
                    i32_arg(plan.rows_per_block, "rows per block")?,
                ],
            )
        })
    }
}
