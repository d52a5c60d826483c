//! Launch helpers shared by several op families: kernel names by storage type (and by gradient type), the elementwise
//! (grid-stride) launch, plain and in 128-bit packs, the block size of row kernels, the norms' fused
//! backward, grid limits, and sizes as kernel arguments.
//! The shapes come from `kernels/common.cuh` ([`constants::common`](super::kernels::constants::common)).

use anyhow::{Context, Result};

use super::kernels::constants::common::{
    GRID_STRIDE_MAX_BLOCKS, GRID_STRIDE_THREADS, NORM_BWD_MAX_BLOCKS, NORM_BWD_MAX_WARPS, NORM_BWD_MIN_ROWS_PER_BLOCK,
    NORM_BWD_SHARED_MAX, NORM_BWD_SHARED_TARGET, ROW_MAX_THREADS,
};
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

/// The storage type a kernel writes a parameter gradient in: f32 when the gradient is stored in f32
/// (an f32 accumulator beside bf16 activations: `train.grad_dtype`), else the activations' type `act`.
pub(super) fn grad_dtype(act: Dtype, grad: Dtype) -> Dtype {
    if grad == Dtype::F32 {
        Dtype::F32
    } else {
        act
    }
}

/// The kernel `<stem>_<act>` when the gradients are of the activations' type, else
/// `<stem>_<act>_<grad>` (`layernorm_backward_bf16_f32`: bf16 activations, f32 gradients).
pub(super) fn grad_kernel(stem: &str, act: Dtype, grad: Dtype) -> String {
    if act == grad {
        format!("{stem}_{}", suffix(act))
    } else {
        format!("{stem}_{}_{}", suffix(act), suffix(grad))
    }
}

/// A grid-stride launch over `n` elements: `GRID_STRIDE_THREADS`-thread blocks, enough for one
/// thread per element up to `GRID_STRIDE_MAX_BLOCKS` blocks.
pub(super) fn grid_stride_config(n: usize) -> LaunchConfig {
    let threads = GRID_STRIDE_THREADS as usize;
    let blocks = n.div_ceil(threads).clamp(1, GRID_STRIDE_MAX_BLOCKS as usize) as u32;
    LaunchConfig::grid_1d(blocks, threads as u32)
}

/// A grid-stride launch over `n` elements of `dtype` moved in 128-bit packs (`grid_stride_packed`,
/// kernels/common.cuh): one thread per pack of `16 / size` elements.
pub(super) fn packed_grid_stride_config(n: usize, dtype: Dtype) -> LaunchConfig {
    grid_stride_config(n.div_ceil(vec_width(dtype)))
}

/// Elements of `dtype` in one 128-bit access (`vec_width<T>`, kernels/common.cuh).
pub(super) fn vec_width(dtype: Dtype) -> usize {
    16 / dtype.size()
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

/// The launch plan of a norm's fused backward (kernels/layernorm.cu, kernels/rmsnorm.cu): blocks of
/// contiguous rows, each warp keeping `gradients` f32 partial sums of c channels in shared memory, and a
/// scratch row per block for the last block's ordered sum. Every number depends only on `n` and `c`,
/// so the order of the parameter-gradient sum, and its bits, do too.
pub(super) struct NormBackwardPlan {
    pub(super) rows_per_block: usize,
    blocks: usize,
    warps: usize,
    /// Partial sums per channel: 2 (LayerNorm's dweight and dbias) or 1 (RMSNorm's dweight).
    gradients: usize,
    c: usize,
}

impl NormBackwardPlan {
    pub(super) fn new(n: usize, c: usize, gradients: usize, what: &str) -> Result<Self> {
        let warp_bytes = gradients * c * std::mem::size_of::<f32>();
        anyhow::ensure!(
            warp_bytes <= NORM_BWD_SHARED_MAX as usize,
            "{what} backward: {c} channels need {warp_bytes} bytes of shared memory per warp, more than \
             {NORM_BWD_SHARED_MAX}"
        );
        let mut warps = NORM_BWD_MAX_WARPS as usize;
        while warps > 1 && warps * warp_bytes > NORM_BWD_SHARED_TARGET as usize {
            warps /= 2;
        }
        let rows_per_block = (NORM_BWD_MIN_ROWS_PER_BLOCK as usize).max(n.div_ceil(NORM_BWD_MAX_BLOCKS as usize));
        Ok(Self { rows_per_block, blocks: n.div_ceil(rows_per_block), warps, gradients, c })
    }

    /// Floats of the scratch rows: one row of `gradients · c` per block.
    pub(super) fn scratch_len(&self) -> usize {
        self.blocks * self.gradients * self.c
    }

    pub(super) fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid: (self.blocks as u32, 1, 1),
            block: (32 * self.warps as u32, 1, 1),
            shared_bytes: (self.warps * self.gradients * self.c * std::mem::size_of::<f32>()) as u32,
        }
    }
}
