//! Matrix products on the CUDA backend: [`Device::gemm`] (cuBLASLt on a GPU, a reference GEMM on the
//! emulated device), with the bias and GELU epilogues where the device fuses them. No kernel file of
//! its own; the bias gradient is a product with a vector of ones, so its sum has a fixed order.

use anyhow::{bail, ensure, Context, Result};
use half::bf16;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf, Held, Operand, Storage};
use crate::backend::cuda::launch::grad_dtype;
use crate::backend::cuda::{Device, DeviceBuffer, DeviceScalar, Dtype, Gemm};
use crate::backend::{checks, MatmulOps, PointwiseOps, WeightLayout};

impl CudaBackend {
    /// A vector of at least `n` ones of `dtype`, for the bias-gradient products.
    fn with_ones<R>(&self, dtype: Dtype, n: usize, f: impl FnOnce(Operand<'_>) -> Result<R>) -> Result<R> {
        fn grown<T: DeviceScalar>(device: &Device, slot: &mut Option<DeviceBuffer<T>>, n: usize, one: T) -> Result<()> {
            if slot.as_ref().is_none_or(|b| b.len() < n) {
                let mut ones = device.alloc::<T>(n.next_power_of_two())?;
                device.fill(&mut ones, one)?;
                *slot = Some(ones);
            }
            Ok(())
        }
        match dtype {
            Dtype::Bf16 => {
                let mut slot = self.ones_bf16.lock().unwrap();
                grown(&self.device, &mut slot, n, bf16::ONE)?;
                f(Operand::Bf16(Held::Borrowed(slot.as_ref().unwrap())))
            }
            _ => {
                let mut slot = self.ones_f32.lock().unwrap();
                grown(&self.device, &mut slot, n, 1.0f32)?;
                f(Operand::F32(Held::Borrowed(slot.as_ref().unwrap())))
            }
        }
    }

    /// `D = alpha·op(A)·op(B) + beta·D (+ bias)` on operands of one type (or bf16 operands into f32), `a` and `b` the first
    /// `a_len` / `b_len` elements of their buffers.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        spec: &Gemm,
        a: &Operand<'_>,
        a_len: usize,
        b: &Operand<'_>,
        d: &mut Storage,
        bias: Option<&Operand<'_>>,
    ) -> Result<()> {
        let b_len = spec.k * spec.n;
        let n = spec.n;
        // The bias is in the output's type.
        let mismatch = || anyhow::anyhow!("gemm: bias type differs from the output's");
        let f32_bias = || match bias {
            Some(Operand::F32(x)) => Ok(Some(x.slice(..n))),
            Some(_) => Err(mismatch()),
            None => Ok(None),
        };
        let bf16_bias = || match bias {
            Some(Operand::Bf16(x)) => Ok(Some(x.slice(..n))),
            Some(_) => Err(mismatch()),
            None => Ok(None),
        };
        match (a, b, d) {
            (Operand::F32(a), Operand::F32(b), Storage::F32(d)) => {
                self.device.gemm(spec, a.slice(..a_len), b.slice(..b_len), d.slice_mut(..spec.m * n), f32_bias()?)
            }
            (Operand::Bf16(a), Operand::Bf16(b), Storage::Bf16(d)) => {
                self.device.gemm(spec, a.slice(..a_len), b.slice(..b_len), d.slice_mut(..spec.m * n), bf16_bias()?)
            }
            // bf16 operands into an f32 output (f32 logits, f32 gradient accumulators): cuBLASLt's
            // bf16 inputs with f32 C/D.
            (Operand::Bf16(a), Operand::Bf16(b), Storage::F32(d)) => {
                self.device.gemm(spec, a.slice(..a_len), b.slice(..b_len), d.slice_mut(..spec.m * n), f32_bias()?)
            }
            _ => bail!("gemm: operands of mixed storage types (supported: f32/f32, bf16/bf16, bf16 into f32)"),
        }
    }

    /// `matmul_forward` with the operands in the activation type and `out` stored as `out_dtype`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward_as(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
        out_dtype: Dtype,
    ) -> Result<()> {
        checks::matmul_forward(out.len(), inp.len(), weight.len(), bias.map(CudaBuf::len), n, ic, oc)?;
        if n == 0 || oc == 0 {
            return Ok(());
        }
        ensure!(ic > 0, "matmul_forward: an inner dimension of 0 is not supported on the CUDA backend");
        let dt = self.act();
        let (inp, weight) = (self.input(inp, dt)?, self.input(weight, dt)?);
        // The bias, added to the output, in the output's type.
        let bias = bias.map(|b| self.input(b, out_dtype)).transpose()?;
        let out = self.output(out, out_dtype, false)?;
        // out[n, oc] = inp[n, ic] · W; W stored [ic, oc] (InOut) or [oc, ic] (OutIn, transposed).
        let spec = Gemm::new(n, oc, ic).trans_b(layout == WeightLayout::OutIn);
        self.gemm(&spec, &inp, n * ic, &weight, out, bias.as_ref())
    }
}

impl MatmulOps for CudaBackend {
    fn matmul_forward(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        self.matmul_forward_as(out, inp, weight, bias, n, ic, oc, layout, self.act())
    }

    /// In Bf16 mode, bf16 operands into f32 storage (cuBLASLt's bf16 inputs with an f32 D): the
    /// accumulator is stored as it is. In F32 mode the same product as `matmul_forward`.
    fn matmul_forward_f32_out(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        self.matmul_forward_as(out, inp, weight, None, n, ic, oc, layout, Dtype::F32)
    }

    /// One cuBLASLt product with the `GELU_AUX_BIAS` epilogue where the device can fuse it (the
    /// emulated device always; a GPU in Bf16 mode when cuBLASLt has an algorithm, see
    /// [`Device::gemm_bias_gelu`]), else `matmul_forward` then `gelu_forward`. A GPU in F32 mode does
    /// not fuse: that mode is held to the CPU at 1e-5, and cuBLASLt does not document the precision
    /// of its GELU.
    fn matmul_bias_gelu_forward(
        &self,
        pre: &mut CudaBuf,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        const OP: &str = "matmul_bias_gelu_forward";
        checks::check_len(OP, "pre", pre.len(), n * oc)?;
        checks::check_len(OP, "out", out.len(), n * oc)?;
        checks::check_len(OP, "inp", inp.len(), n * ic)?;
        checks::check_len(OP, "weight", weight.len(), ic * oc)?;
        checks::check_len(OP, "bias", bias.len(), oc)?;
        if n == 0 || oc == 0 {
            return Ok(());
        }
        ensure!(ic > 0, "{OP}: an inner dimension of 0 is not supported on the CUDA backend");
        let dt = self.act();
        if self.device.is_emulated() || dt == Dtype::Bf16 {
            let (a, w, b) = (self.input(inp, dt)?, self.input(weight, dt)?, self.input(bias, dt)?);
            let (pre_storage, out_storage) = (self.output(pre, dt, false)?, self.output(out, dt, false)?);
            // out[n, oc] = gelu(inp[n, ic] · W[ic, oc] + bias)
            let spec = Gemm::new(n, oc, ic);
            let fused = match (&a, &w, &b, pre_storage, out_storage) {
                (Operand::F32(a), Operand::F32(w), Operand::F32(b), Storage::F32(p), Storage::F32(o)) => {
                    self.device.gemm_bias_gelu(
                        &spec,
                        a.slice(..n * ic),
                        w.slice(..ic * oc),
                        p.slice_mut(..n * oc),
                        o.slice_mut(..n * oc),
                        b.slice(..oc),
                    )
                }
                (Operand::Bf16(a), Operand::Bf16(w), Operand::Bf16(b), Storage::Bf16(p), Storage::Bf16(o)) => {
                    self.device.gemm_bias_gelu(
                        &spec,
                        a.slice(..n * ic),
                        w.slice(..ic * oc),
                        p.slice_mut(..n * oc),
                        o.slice_mut(..n * oc),
                        b.slice(..oc),
                    )
                }
                _ => bail!("{OP}: operands of mixed storage types"),
            }
            .with_context(|| format!("{OP}: n = {n}, ic = {ic}, oc = {oc}"))?;
            if fused {
                return Ok(());
            }
        }
        self.matmul_forward(pre, inp, weight, Some(bias), n, ic, oc, WeightLayout::InOut)?;
        self.gelu_forward(out, pre)
    }

    fn matmul_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: &mut CudaBuf,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        ic: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Result<()> {
        let dbias_len = dbias.as_ref().map(|db| db.len());
        checks::matmul_backward(dinp.len(), dweight.len(), dbias_len, dout.len(), inp.len(), weight.len(), n, ic, oc)?;
        let dt = self.act();
        if n == 0 {
            return Ok(());
        }
        let (dout, inp, weight) = (self.input(dout, dt)?, self.input(inp, dt)?, self.input(weight, dt)?);
        if ic > 0 {
            let dinp = self.output(dinp, dt, false)?;
            if oc == 0 {
                match dinp {
                    Storage::F32(b) => self.device.zero(b.slice_mut(..n * ic))?,
                    Storage::Bf16(b) => self.device.zero(b.slice_mut(..n * ic))?,
                }
            } else {
                // dinp[n, ic] = dout[n, oc] · Wᵀ
                let spec = Gemm::new(n, ic, oc).trans_b(layout == WeightLayout::InOut);
                self.gemm(&spec, &dout, n * oc, &weight, dinp, None)?;
            }
        }
        // The parameter gradients in their own storage type: bf16 operands into an f32 D where they
        // are f32 accumulators (`train.grad_dtype`), the product then rounded once, to f32.
        if ic > 0 && oc > 0 {
            let dweight = self.output(dweight, grad_dtype(dt, dweight.dtype()), true)?;
            match layout {
                // dW[ic, oc] += inpᵀ · dout
                WeightLayout::InOut => {
                    self.gemm(&Gemm::new(ic, oc, n).trans_a(true).beta(1.0), &inp, n * ic, &dout, dweight, None)?
                }
                // dW[oc, ic] += doutᵀ · inp
                WeightLayout::OutIn => {
                    self.gemm(&Gemm::new(oc, ic, n).trans_a(true).beta(1.0), &dout, n * oc, &inp, dweight, None)?
                }
            }
        }
        if let Some(dbias) = dbias {
            if oc > 0 {
                // dbias[oc] += ones[1, n] · dout[n, oc]: a product keeps the sum's order fixed.
                let dbias = self.output(dbias, grad_dtype(dt, dbias.dtype()), true)?;
                self.with_ones(dt, n, |ones| self.gemm(&Gemm::new(1, oc, n).beta(1.0), &ones, n, &dout, dbias, None))?;
            }
        }
        Ok(())
    }
}
