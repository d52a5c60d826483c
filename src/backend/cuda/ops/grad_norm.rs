//! The squared global gradient norm on the CUDA backend (kernels/grad_norm.cu): partial sums whose
//! partition depends only on the lengths, all tensors in one launch over a device-side table of
//! them (kept between steps: `tensor_table.rs`), then one f64 sum of the partials. The partials are
//! the ones a launch per tensor writes (`sum_squares_per_tensor`, kept as the reference), so the
//! norm has the same bits either way.

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf};
use crate::backend::cuda::device::DeviceBuffer;
use crate::backend::cuda::kernels::constants::grad_norm::{
    SUM_SQUARES_BF16, SUM_SQUARES_ELEMENTS_PER_THREAD, SUM_SQUARES_F32, SUM_SQUARES_MAX_BLOCKS, SUM_SQUARES_SLOT_WORDS,
    SUM_SQUARES_THREADS,
};
use crate::backend::cuda::launch::{grid_dim, i32_arg, suffix};
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::GradNormOps;

/// The fewest elements per partial-sum block.
const ELEMENTS_PER_BLOCK: usize = (SUM_SQUARES_THREADS * SUM_SQUARES_ELEMENTS_PER_THREAD) as usize;

/// Partial-sum blocks of a tensor of `len` elements (a function of the length alone).
fn partial_blocks(len: usize) -> usize {
    len.div_ceil(ELEMENTS_PER_BLOCK).min(SUM_SQUARES_MAX_BLOCKS as usize)
}

impl GradNormOps for CudaBackend {
    fn sum_squares(&self, bufs: &[&CudaBuf]) -> Result<f64> {
        let tensors: Vec<&CudaBuf> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
        let mut words = Vec::with_capacity(tensors.len() * SUM_SQUARES_SLOT_WORDS as usize);
        let mut total = 0;
        for buf in &tensors {
            let dtype = if buf.dtype() == Dtype::Bf16 { SUM_SQUARES_BF16 } else { SUM_SQUARES_F32 };
            words.extend([buf.storage.ptr(), buf.len() as u64, total as u64, dtype as u64]);
            total += partial_blocks(buf.len());
        }
        if total == 0 {
            return Ok(0.0);
        }
        let partials = self.device.alloc::<f32>(total)?;
        let table = self.tensor_tables.get(&self.device, words)?;
        self.launch(
            "sum_squares_partial_multi",
            LaunchConfig::grid_1d(grid_dim(total, "partial-sum blocks")?, SUM_SQUARES_THREADS as u32),
            &[
                KernelArg::Ptr(partials.device_ptr()),
                KernelArg::Ptr(table.device_ptr()),
                i32_arg(tensors.len(), "tensors")?,
            ],
        )?;
        self.sum_partials(&partials)
    }
}

impl CudaBackend {
    /// `sum_squares` with one partial-sum launch per tensor: the path the one-launch form replaced,
    /// kept as the reference it is held to bit for bit.
    pub fn sum_squares_per_tensor(&self, bufs: &[&CudaBuf]) -> Result<f64> {
        let blocks: Vec<usize> = bufs.iter().map(|b| partial_blocks(b.len())).collect();
        let total: usize = blocks.iter().sum();
        if total == 0 {
            return Ok(0.0);
        }
        let mut partials = self.device.alloc::<f32>(total)?;
        let mut offset = 0;
        for (buf, &count) in bufs.iter().zip(&blocks) {
            if count == 0 {
                continue;
            }
            let slot = partials.slice_mut(offset..offset + count).device_ptr();
            self.launch(
                &format!("sum_squares_partial_{}", suffix(buf.dtype())),
                LaunchConfig::grid_1d(count as u32, SUM_SQUARES_THREADS as u32),
                &[KernelArg::Ptr(slot), buf.storage.arg(), KernelArg::I64(buf.len() as i64)],
            )?;
            offset += count;
        }
        self.sum_partials(&partials)
    }

    /// The f64 sum of the partials, in the fixed order of `sum_squares_final`.
    fn sum_partials(&self, partials: &DeviceBuffer<f32>) -> Result<f64> {
        // The f64 total comes back as its bit pattern (device buffers hold no f64 type).
        let out = self.device.alloc::<u64>(1)?;
        self.launch(
            "sum_squares_final",
            LaunchConfig::grid_1d(1, SUM_SQUARES_THREADS as u32),
            &[
                KernelArg::Ptr(out.device_ptr()),
                KernelArg::Ptr(partials.device_ptr()),
                i32_arg(partials.len(), "partials")?,
            ],
        )?;
        Ok(f64::from_bits(self.device.download(&out)?[0]))
    }
}
