//! The squared global gradient norm on the CUDA backend (kernels/grad_norm.cu): per-tensor partial
//! sums whose partition depends only on the lengths, then one f64 sum of the partials.

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf};
use crate::backend::cuda::kernels::constants::grad_norm::{
    SUM_SQUARES_ELEMENTS_PER_THREAD, SUM_SQUARES_MAX_BLOCKS, SUM_SQUARES_THREADS,
};
use crate::backend::cuda::launch::{i32_arg, suffix};
use crate::backend::cuda::{KernelArg, LaunchConfig};
use crate::backend::GradNormOps;

/// The fewest elements per partial-sum block.
const ELEMENTS_PER_BLOCK: usize = (SUM_SQUARES_THREADS * SUM_SQUARES_ELEMENTS_PER_THREAD) as usize;

impl GradNormOps for CudaBackend {
    fn sum_squares(&self, bufs: &[&CudaBuf]) -> Result<f64> {
        let blocks: Vec<usize> = bufs
            .iter()
            .map(|b| {
                if b.is_empty() {
                    0
                } else {
                    b.len().div_ceil(ELEMENTS_PER_BLOCK).min(SUM_SQUARES_MAX_BLOCKS as usize)
                }
            })
            .collect();
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
        // The f64 total comes back as its bit pattern (device buffers hold no f64 type).
        let out = self.device.alloc::<u64>(1)?;
        self.launch(
            "sum_squares_final",
            LaunchConfig::grid_1d(1, SUM_SQUARES_THREADS as u32),
            &[KernelArg::Ptr(out.device_ptr()), KernelArg::Ptr(partials.device_ptr()), i32_arg(total, "partials")?],
        )?;
        Ok(f64::from_bits(self.device.download(&out)?[0]))
    }
}
