//! Causal attention over a packed batch, multi-head or grouped-query, on the CUDA backend: the launch
//! plan ([`AttentionPlan`]: which kernels, their tile, the grids) and the forward and backward launches.
//! bf16 at head dims 64 and 128 runs on tensor cores (kernels/attention_mma.cu); f32, other head dims,
//! tensors whose rows are not 16-byte aligned, and a backend set to [`AttentionKernels::Portable`]
//! run the portable kernels (kernels/attention.cu).

use anyhow::{ensure, Context, Result};

use crate::backend::cuda::backend::{check_device_cu_seqlens, AttentionKernels, CudaBackend, CudaBuf};
use crate::backend::cuda::kernels::constants::attention::{
    ATTN_DIMS_PER_LANE, ATTN_HD_MAX_LARGE, ATTN_HD_MAX_SMALL, ATTN_THREADS,
};
use crate::backend::cuda::kernels::constants::attention_mma::{ATTN_MMA_ROWS, ATTN_MMA_THREADS};
use crate::backend::cuda::launch::{grid_dim, i32_arg, suffix, MAX_GRID_Y};
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, AttentionOps, Packing, QkvLayout, Window};

/// The head-dim bounds the attention kernels are instantiated for (`attention_<op>_hd<bound>_<dtype>`).
const HEAD_DIM_BOUNDS: [usize; 2] = [ATTN_HD_MAX_SMALL as usize, ATTN_HD_MAX_LARGE as usize];

/// The head dims the tensor-core kernels are instantiated for (`attention_mma_<op>_hd<hd>_bf16`).
const TENSOR_CORE_HEAD_DIMS: [usize; 2] = [64, 128];

/// Which kernels a launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernels {
    /// kernels/attention.cu, instantiated for the smallest head-dim bound that holds the head dim.
    Portable { head_dim_bound: usize },
    /// kernels/attention_mma.cu (bf16 only), for exactly this head dim.
    TensorCores { head_dim: usize },
}

/// Launch plan of the tiled attention kernels: which ones ([`Kernels`]), their block and tile
/// (portable: `ATTN_THREADS` threads of `ATTN_DIMS_PER_LANE` channels each, so `256·16 / bound`
/// rows; tensor cores: `ATTN_MMA_THREADS` threads, `ATTN_MMA_ROWS` rows), and the grids (heads,
/// sequences, tiles of the longest sequence): one block per query head for the forward and dq, per
/// key/value head for dk and dv.
struct AttentionPlan {
    kernels: Kernels,
    threads: u32,
    query_grid: (u32, u32, u32),
    kv_grid: (u32, u32, u32),
}

impl AttentionPlan {
    /// Refuses a head dim above the portable kernels' largest bound (the CPU backend takes any).
    /// `tensor_cores`: every tensor the kernels read or write starts on 16 bytes (the tensor-core
    /// kernels move rows in 16-byte pieces; their rows are then aligned, as hd·2 bytes is) and the
    /// backend allows them ([`AttentionKernels`]).
    fn new(
        op: &str,
        packing: &Packing<CudaBackend>,
        layout: QkvLayout,
        dtype: Dtype,
        tensor_cores: bool,
    ) -> Result<Self> {
        let hd = layout.head_dim;
        let head_dim_bound = HEAD_DIM_BOUNDS.into_iter().find(|&b| hd <= b).with_context(|| {
            format!("{op}: head_dim = {hd} exceeds the CUDA attention kernels' maximum {ATTN_HD_MAX_LARGE}")
        })?;
        let (kernels, threads, tile) = if dtype == Dtype::Bf16 && tensor_cores && TENSOR_CORE_HEAD_DIMS.contains(&hd) {
            (Kernels::TensorCores { head_dim: hd }, ATTN_MMA_THREADS, ATTN_MMA_ROWS as usize)
        } else {
            let tile = (ATTN_THREADS * ATTN_DIMS_PER_LANE) as usize / head_dim_bound;
            (Kernels::Portable { head_dim_bound }, ATTN_THREADS, tile)
        };
        let tiles = packing.max_seqlen.div_ceil(tile);
        let (seqs, max_y) = (packing.num_seqs(), MAX_GRID_Y);
        ensure!(seqs <= max_y, "{op}: {seqs} sequences exceed the grid limit {max_y}");
        ensure!(tiles <= max_y, "{op}: {tiles} tiles of {tile} tokens exceed the grid limit {max_y}");
        let (seqs, tiles) = (seqs as u32, tiles as u32);
        Ok(Self {
            kernels,
            threads: threads as u32,
            query_grid: (grid_dim(layout.n_head, "n_head")?, seqs, tiles),
            kv_grid: (grid_dim(layout.n_kv_head, "n_kv_head")?, seqs, tiles),
        })
    }

    fn kernel(&self, op: &str, dtype: Dtype) -> String {
        match self.kernels {
            Kernels::Portable { head_dim_bound } => format!("attention_{op}_hd{head_dim_bound}_{}", suffix(dtype)),
            Kernels::TensorCores { head_dim } => format!("attention_mma_{op}_hd{head_dim}_{}", suffix(dtype)),
        }
    }

    fn config(&self, grid: (u32, u32, u32)) -> LaunchConfig {
        LaunchConfig { grid, block: (self.threads, 1, 1), shared_bytes: 0 }
    }
}

/// Whether every pointer argument starts on a 16-byte boundary.
fn aligned_16(args: &[KernelArg]) -> bool {
    args.iter().all(|arg| !matches!(arg, KernelArg::Ptr(p) if p % 16 != 0))
}

/// The arguments every attention kernel ends with: `n_head, n_kv_head, head_dim, window`.
fn layout_args(layout: QkvLayout, window: Window) -> Result<[KernelArg; 4]> {
    Ok([
        i32_arg(layout.n_head, "n_head")?,
        i32_arg(layout.n_kv_head, "n_kv_head")?,
        i32_arg(layout.head_dim, "head_dim")?,
        window_arg(window),
    ])
}

/// A sliding window as the kernels take it: `INT_MAX` for none (a window past `i32::MAX` keys is
/// no window for any sequence a launch can hold).
pub(super) fn window_arg(window: Window) -> KernelArg {
    KernelArg::I32(window.map_or(i32::MAX, |w| w.min(i32::MAX as usize) as i32))
}

impl AttentionOps for CudaBackend {
    /// The forward keeps the log-sum-exp of every (token, query head) row of scores: `n_head · n` f32.
    fn attention_saved_len(&self, packing: &Packing<Self>, n_head: usize) -> usize {
        n_head * packing.num_tokens()
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        saved: &mut CudaBuf,
        qkv: &CudaBuf,
        packing: &Packing<Self>,
        layout: QkvLayout,
        window: Window,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        let saved_len = self.attention_saved_len(packing, layout.n_head);
        let cu = &packing.host_cu_seqlens;
        checks::attention_forward(out.len(), saved.len(), qkv.len(), cu, layout, window, saved_len)?;
        check_device_cu_seqlens(OP, packing)?;
        let dt = self.act();
        // Refuses a head dim too large before anything else (an empty batch included).
        AttentionPlan::new(OP, packing, layout, dt, false)?;
        if packing.num_tokens() == 0 {
            return Ok(());
        }
        let qkv = self.input(qkv, dt)?;
        let lse = self.output(saved, Dtype::F32, false)?.arg();
        let out = self.output(out, dt, false)?;
        let mut args = vec![out.arg(), lse, qkv.arg(), packing.cu_seqlens.arg()];
        let tensor_cores = self.attention_kernels() == AttentionKernels::Auto && aligned_16(&args[..3]);
        let plan = AttentionPlan::new(OP, packing, layout, dt, tensor_cores)?;
        args.extend(layout_args(layout, window)?);
        self.launch(&plan.kernel("forward", dt), plan.config(plan.query_grid), &args)
    }

    fn attention_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        saved: &CudaBuf,
        packing: &Packing<Self>,
        layout: QkvLayout,
        window: Window,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let saved_len = self.attention_saved_len(packing, layout.n_head);
        let cu = &packing.host_cu_seqlens;
        checks::attention_backward(
            dqkv.len(),
            dout.len(),
            qkv.len(),
            out.len(),
            saved.len(),
            cu,
            layout,
            window,
            saved_len,
        )?;
        check_device_cu_seqlens(OP, packing)?;
        let dt = self.act();
        AttentionPlan::new(OP, packing, layout, dt, false)?;
        let n = packing.num_tokens();
        if n == 0 {
            return Ok(());
        }
        let (dout, qkv, out) = (self.input(dout, dt)?, self.input(qkv, dt)?, self.input(out, dt)?);
        let lse = self.input(saved, Dtype::F32)?;
        // D_t = dout_t·out_t per (token, query head): written by the dq kernel, read by the dk/dv kernel.
        let delta = self.device.alloc::<f32>(n * layout.n_head)?;
        let dqkv = self.output(dqkv, dt, false)?;
        let tail = [&[packing.cu_seqlens.arg()][..], &layout_args(layout, window)?].concat();
        let mut args =
            vec![dqkv.arg(), KernelArg::Ptr(delta.device_ptr()), dout.arg(), qkv.arg(), out.arg(), lse.arg()];
        let tensor_cores = self.attention_kernels() == AttentionKernels::Auto && aligned_16(&args);
        let plan = AttentionPlan::new(OP, packing, layout, dt, tensor_cores)?;
        args.extend_from_slice(&tail);
        self.launch(&plan.kernel("backward_dq", dt), plan.config(plan.query_grid), &args)?;
        let mut args = vec![dqkv.arg(), dout.arg(), qkv.arg(), lse.arg(), KernelArg::Ptr(delta.device_ptr())];
        args.extend(tail);
        // Each block sums the dk, dv of its key/value head over the group's query heads, in order.
        self.launch(&plan.kernel("backward_dkdv", dt), plan.config(plan.kv_grid), &args)
    }
}
