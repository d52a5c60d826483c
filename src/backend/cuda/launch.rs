//! Launch helpers shared by several op families: kernel names by storage type, the elementwise
//! (grid-stride) launch, the block size of row kernels, grid limits, and sizes as kernel arguments.
//! The shapes come from `kernels/common.cuh` ([`constants::common`](super::kernels::constants::common)).

use anyhow::{Context, Result};

use super::kernels::constants::common::{GRID_STRIDE_MAX_BLOCKS, GRID_STRIDE_THREADS, ROW_MAX_THREADS};
use super::types::{Dtype, KernelArg, LaunchConfig};

/// CUDA's limit on the y and z dimensions of a grid.
pub(super) const MAX_GRID_Y: usize = 65535;

/// The kernel-name suffix of a storage type (`<op>_f32`, `<op>_bf16`).
pub(super) fn suffix(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bf16 => "bf16",
        _ => "f32",
    }
}

/// A grid-stride launch over `n` elements: `GRID_STRIDE_THREADS`-thread blocks, enough for one
/// thread per element up to `GRID_STRIDE_MAX_BLOCKS` blocks.
pub(super) fn grid_stride_config(n: usize) -> LaunchConfig {
    let threads = GRID_STRIDE_THREADS as usize;
    let blocks = n.div_ceil(threads).clamp(1, GRID_STRIDE_MAX_BLOCKS as usize) as u32;
    LaunchConfig::grid_1d(blocks, threads as u32)
}

/// Threads for a block that loops over `width` items: a multiple of 32, at most `ROW_MAX_THREADS`.
pub(super) fn row_threads(width: usize) -> u32 {
    width.next_multiple_of(32).clamp(32, ROW_MAX_THREADS as usize) as u32
}

/// `value` as a grid dimension (at most `i32::MAX`).
pub(super) fn grid_dim(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value)
        .ok()
        .filter(|&v| v <= i32::MAX as u32)
        .with_context(|| format!("{what} = {value} is too large for one launch"))
}

/// `value` as an `int` kernel argument.
pub(super) fn i32_arg(value: usize, what: &str) -> Result<KernelArg> {
    Ok(KernelArg::I32(i32::try_from(value).with_context(|| format!("{what} = {value} does not fit a 32-bit int"))?))
}
