//! What a collective library (NCCL, `dist::nccl`) needs of the CUDA backend and its buffers: the
//! device memory of a [`CudaBuf`] to reduce or broadcast in place, the GPU and its stream, and the
//! storage rewritten from a reduced fp32 master copy.

use std::sync::Arc;

use anyhow::Result;

use super::gpu::Gpu;
use super::launch::grid_stride_config;
use super::{CudaBackend, CudaBuf, Dtype, KernelArg};
use crate::backend::cuda::backend::Storage;

/// A buffer's device memory: its values (`len` elements of `dtype` at `storage`) and its fp32
/// master copy, when it has one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawParts {
    pub(crate) len: usize,
    pub(crate) storage: u64,
    pub(crate) dtype: Dtype,
    pub(crate) master: Option<u64>,
}

impl CudaBuf {
    /// The device memory a collective works on in place.
    pub(crate) fn raw_parts(&self) -> RawParts {
        RawParts {
            len: self.len,
            storage: self.storage.ptr(),
            dtype: self.storage.dtype(),
            master: self.master.as_ref().map(|m| m.device_ptr()),
        }
    }
}

impl CudaBackend {
    /// The GPU this backend runs on; `None` on the emulated device.
    pub(crate) fn gpu(&self) -> Option<&Arc<Gpu>> {
        self.device.as_gpu()
    }

    /// After a collective changed `buf`'s master copy: its values rewritten from the master (rounded
    /// to bf16, as the optimizer writes a parameter from its master).
    pub(crate) fn storage_from_master(&self, buf: &mut CudaBuf) -> Result<()> {
        let n = buf.len;
        let (Some(master), Storage::Bf16(values)) = (&buf.master, &mut buf.storage) else {
            return match (&buf.master, &mut buf.storage) {
                (Some(master), Storage::F32(values)) => self.device.copy(values.slice_mut(..n), master.slice(..n)),
                _ => Ok(()),
            };
        };
        if n == 0 {
            return Ok(());
        }
        self.launch(
            "convert_f32_to_bf16",
            grid_stride_config(n),
            &[KernelArg::Ptr(values.device_ptr()), KernelArg::Ptr(master.device_ptr()), KernelArg::I64(n as i64)],
        )
    }
}
