//! Parameter updates on the CUDA backend (kernels/optimizer.cu): AdamW and SGD, one grid-stride
//! launch each; a bf16 parameter is updated through its fp32 master copy.

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf, Storage};
use crate::backend::cuda::launch::{grid_stride_config, suffix};
use crate::backend::cuda::{Dtype, KernelArg};
use crate::backend::{checks, AdamWParams, OptimizerOps};

impl OptimizerOps for CudaBackend {
    fn adamw(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        p: &AdamWParams,
    ) -> Result<()> {
        let n = param.len();
        checks::adamw(n, grad.len(), m.len(), v.len(), p.step)?;
        if n == 0 {
            return Ok(());
        }
        // Bias corrections in f64 (as PyTorch computes them in Python floats).
        let bc1 = (1.0 - (p.beta1 as f64).powi(p.step as i32)) as f32;
        let bc2 = (1.0 - (p.beta2 as f64).powi(p.step as i32)) as f32;
        let m = self.output(m, Dtype::F32, true)?.arg();
        let v = self.output(v, Dtype::F32, true)?.arg();
        let hyper = [
            KernelArg::I64(n as i64),
            KernelArg::F32(p.lr),
            KernelArg::F32(p.beta1),
            KernelArg::F32(p.beta2),
            KernelArg::F32(p.eps),
            KernelArg::F32(p.weight_decay),
            KernelArg::F32(bc1),
            KernelArg::F32(bc2),
            KernelArg::F32(p.grad_scale),
        ];
        let dt = param.dtype();
        let grad = self.input(grad, dt)?;
        let mut args = vec![param.storage.arg()];
        match dt {
            Dtype::Bf16 => {
                let master = self.ensure_master(param)?;
                args.push(KernelArg::Ptr(master));
            }
            _ => param.master = None,
        }
        args.extend([grad.arg(), m, v]);
        args.extend(hyper);
        self.launch(&format!("adamw_{}", suffix(dt)), grid_stride_config(n), &args)
    }

    fn sgd(&self, param: &mut CudaBuf, grad: &CudaBuf, lr: f32, grad_scale: f32) -> Result<()> {
        checks::sgd(param.len(), grad.len())?;
        let dt = param.dtype();
        let grad = self.input(grad, dt)?;
        let master = match dt {
            Dtype::Bf16 => KernelArg::Ptr(self.ensure_master(param)?),
            _ => {
                param.master = None;
                KernelArg::NULL
            }
        };
        let n = param.len();
        if n == 0 {
            return Ok(());
        }
        self.launch(
            &format!("sgd_{}", suffix(dt)),
            grid_stride_config(n),
            &[param.storage.arg(), master, grad.arg(), KernelArg::I64(n as i64), KernelArg::F32(lr * grad_scale)],
        )
    }
}

impl CudaBackend {
    /// The fp32 master copy of a bf16 parameter, created from its values when absent.
    fn ensure_master(&self, param: &mut CudaBuf) -> Result<u64> {
        if param.master.is_none() {
            let Storage::F32(master) = self.convert(&param.storage, param.len, Dtype::F32)? else {
                unreachable!("convert to f32 gives f32 storage")
            };
            param.master = Some(master);
        }
        Ok(param.master.as_ref().unwrap().device_ptr())
    }
}
