//! Parameter updates on the CUDA backend (kernels/optimizer.cu): AdamW and SGD on one tensor (one
//! grid-stride launch each) or on a list of tensors (one launch per pair of parameter and gradient
//! storage types in the list, over a device-side table of the tensors, kept between steps:
//! `tensor_table.rs`); a bf16 parameter is updated through its fp32 master copy, from a gradient
//! stored in bf16 or in f32 (`adamw_bf16_f32`, read as stored: no conversion pass).

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf, Operand, Storage};
use crate::backend::cuda::kernels::constants::optimizer::{
    MULTI_TENSOR_CHUNK, MULTI_TENSOR_SLOT_WORDS, MULTI_TENSOR_THREADS,
};
use crate::backend::cuda::launch::{grad_dtype, grad_kernel, grid_dim, grid_stride_config, i32_arg};
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, AdamWParams, AdamWTensor, OptimizerOps, SgdTensor};

/// AdamW's bias corrections `1 − β1ᵗ`, `1 − β2ᵗ`, in f64 (as PyTorch computes them in Python floats),
/// rounded once to f32.
fn bias_corrections(p: &AdamWParams) -> [f32; 2] {
    [p.beta1, p.beta2].map(|beta| (1.0 - (beta as f64).powi(p.step as i32)) as f32)
}

/// The arguments after AdamW's tensors: `lr, beta1, beta2, eps, weight_decay, bias_correction1,
/// bias_correction2, grad_scale` (both kernel forms).
fn adamw_hyper_args(p: &AdamWParams) -> [KernelArg; 8] {
    let [bc1, bc2] = bias_corrections(p);
    [p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, bc1, bc2, p.grad_scale].map(KernelArg::F32)
}

/// The (parameter, gradient) storage types of the update kernels: one multi-tensor launch each. A
/// bf16 parameter's gradient may be stored in f32 (`train.grad_dtype`); the kernel then reads it as
/// it is.
const UPDATE_TYPES: [(Dtype, Dtype); 3] =
    [(Dtype::F32, Dtype::F32), (Dtype::Bf16, Dtype::Bf16), (Dtype::Bf16, Dtype::F32)];

/// The (parameter, gradient) types an update of `param` by `grad` runs with (one of `UPDATE_TYPES`).
fn update_types(param: &CudaBuf, grad: &CudaBuf) -> (Dtype, Dtype) {
    (param.dtype(), grad_dtype(param.dtype(), grad.dtype()))
}

/// One tensor of a multi-tensor update, as `MultiTensorSlot` (kernels/optimizer.cu) lays it out.
struct Slot {
    param: u64,
    master: u64,
    grad: u64,
    m: u64,
    v: u64,
    len: usize,
    decay: bool,
}

/// The table of a multi-tensor launch and its chunk count (the grid).
fn slot_table(slots: &[Slot]) -> (Vec<u64>, usize) {
    let chunk = MULTI_TENSOR_CHUNK as usize;
    let mut words = Vec::with_capacity(slots.len() * MULTI_TENSOR_SLOT_WORDS as usize);
    let mut chunks = 0;
    for s in slots {
        words.extend([s.param, s.master, s.grad, s.m, s.v, s.len as u64, chunks as u64, s.decay as u64]);
        chunks += s.len.div_ceil(chunk);
    }
    (words, chunks)
}

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
        let m = self.output(m, Dtype::F32, true)?.arg();
        let v = self.output(v, Dtype::F32, true)?.arg();
        let dt = param.dtype();
        let gt = grad_dtype(dt, grad.dtype());
        let grad = self.input(grad, gt)?;
        let mut args = vec![param.storage.arg()];
        match dt {
            Dtype::Bf16 => {
                let master = self.ensure_master(param)?;
                args.push(KernelArg::Ptr(master));
            }
            _ => param.master = None,
        }
        args.extend([grad.arg(), m, v, KernelArg::I64(n as i64)]);
        args.extend(adamw_hyper_args(p));
        self.launch(&grad_kernel("adamw", dt, gt), grid_stride_config(n), &args)
    }

    fn adamw_tensors(&self, tensors: &mut [AdamWTensor<'_, CudaBuf>], p: &AdamWParams) -> Result<()> {
        checks::adamw_tensors(tensors.iter().map(|t| [t.param.len(), t.grad.len(), t.m.len(), t.v.len()]), p.step)?;
        for (dt, gt) in UPDATE_TYPES {
            let (mut slots, mut grads) = (Vec::new(), Vec::new());
            for t in tensors.iter_mut().filter(|t| update_types(t.param, t.grad) == (dt, gt) && !t.param.is_empty()) {
                let m = self.output(t.m, Dtype::F32, true)?.ptr();
                let v = self.output(t.v, Dtype::F32, true)?.ptr();
                let (master, grad) = self.update_operands(t.param, t.grad)?;
                slots.push(Slot {
                    param: t.param.storage.ptr(),
                    master,
                    grad: grad.ptr(),
                    m,
                    v,
                    len: t.param.len(),
                    decay: t.decay,
                });
                grads.push(grad);
            }
            self.launch_multi(&grad_kernel("adamw_multi", dt, gt), &slots, &adamw_hyper_args(p))?;
        }
        Ok(())
    }

    fn sgd(&self, param: &mut CudaBuf, grad: &CudaBuf, lr: f32, grad_scale: f32) -> Result<()> {
        checks::sgd(param.len(), grad.len())?;
        let dt = param.dtype();
        let gt = grad_dtype(dt, grad.dtype());
        let grad = self.input(grad, gt)?;
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
            &grad_kernel("sgd", dt, gt),
            grid_stride_config(n),
            &[param.storage.arg(), master, grad.arg(), KernelArg::I64(n as i64), KernelArg::F32(lr * grad_scale)],
        )
    }

    fn sgd_tensors(&self, tensors: &mut [SgdTensor<'_, CudaBuf>], lr: f32, grad_scale: f32) -> Result<()> {
        checks::sgd_tensors(tensors.iter().map(|t| [t.param.len(), t.grad.len()]))?;
        for (dt, gt) in UPDATE_TYPES {
            let (mut slots, mut grads) = (Vec::new(), Vec::new());
            for t in tensors.iter_mut().filter(|t| update_types(t.param, t.grad) == (dt, gt) && !t.param.is_empty()) {
                let (master, grad) = self.update_operands(t.param, t.grad)?;
                let param = t.param.storage.ptr();
                slots.push(Slot { param, master, grad: grad.ptr(), m: 0, v: 0, len: t.param.len(), decay: false });
                grads.push(grad);
            }
            self.launch_multi(&grad_kernel("sgd_multi", dt, gt), &slots, &[KernelArg::F32(lr * grad_scale)])?;
        }
        Ok(())
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

    /// What an update of `param` reads besides it, as the one-tensor launches prepare it: its master
    /// copy (bf16; an f32 parameter drops any, null) and the gradient in the type `update_types` says.
    fn update_operands<'g>(&self, param: &mut CudaBuf, grad: &'g CudaBuf) -> Result<(u64, Operand<'g>)> {
        let dt = param.dtype();
        let master = match dt {
            Dtype::Bf16 => self.ensure_master(param)?,
            _ => {
                param.master = None;
                0
            }
        };
        Ok((master, self.input(grad, grad_dtype(dt, grad.dtype()))?))
    }

    /// One launch of `kernel` over the table of `slots` (nothing when it is empty), with `args` after
    /// the table and its length.
    fn launch_multi(&self, kernel: &str, slots: &[Slot], args: &[KernelArg]) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let (words, chunks) = slot_table(slots);
        // Held until the launch is queued; the device orders its eventual free after it.
        let table = self.tensor_tables.get(&self.device, words)?;
        let mut all = vec![KernelArg::Ptr(table.device_ptr()), i32_arg(slots.len(), "tensors")?];
        all.extend_from_slice(args);
        let config = LaunchConfig::grid_1d(grid_dim(chunks, "chunks")?, MULTI_TENSOR_THREADS as u32);
        self.launch(kernel, config, &all)
    }

    /// Descriptor tables uploaded by the multi-tensor launches so far (optimizer and grad norm): a
    /// table is uploaded when its tensors are first seen and again only when they change.
    pub fn tensor_table_uploads(&self) -> u64 {
        self.tensor_tables.uploads()
    }
}
