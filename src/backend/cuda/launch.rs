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

/// The launch plan of a deterministic per-channel sum over rows (a norm's weight and bias
/// gradients): per-chunk partials on a `[channel blocks, chunks]` grid, then one ordered sum per
/// channel over the chunks. The chunk size depends only on `n` (more rows per chunk only when the
/// grid would exceed its y limit), so the order of the sum, and its bits, do too.
pub(super) struct ChannelSums {
    pub(super) rows_per_chunk: usize,
    pub(super) chunks: usize,
    threads: u32,
    channel_blocks: u32,
}

impl ChannelSums {
    pub(super) fn new(n: usize, c: usize, min_rows_per_chunk: usize, what: &str) -> Result<Self> {
        let rows_per_chunk = min_rows_per_chunk.max(n.div_ceil(MAX_GRID_Y));
        let threads = row_threads(c);
        let channel_blocks = grid_dim(c.div_ceil(threads as usize), &format!("{what} channel blocks"))?;
        Ok(Self { rows_per_chunk, chunks: n.div_ceil(rows_per_chunk), threads, channel_blocks })
    }

    /// The partial sums' launch: one block row per chunk.
    pub(super) fn partial_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid: (self.channel_blocks, self.chunks as u32, 1),
            block: (self.threads, 1, 1),
            shared_bytes: 0,
        }
    }

    /// The final, ordered sum over the chunks.
    pub(super) fn reduce_config(&self) -> LaunchConfig {
        LaunchConfig::grid_1d(self.channel_blocks, self.threads)
    }
}
