//! Causal attention over a packed batch, multi-head or grouped-query, on the CUDA backend
//! (kernels/attention.cu): the launch plan ([`AttentionPlan`]: head-dim bound, tile, grids) and the
//! forward and backward launches.

use anyhow::{ensure, Context, Result};

use crate::backend::cuda::backend::{check_device_cu_seqlens, CudaBackend, CudaBuf};
use crate::backend::cuda::kernels::constants::attention::{
    ATTN_DIMS_PER_LANE, ATTN_HD_MAX_LARGE, ATTN_HD_MAX_SMALL, ATTN_THREADS,
};
use crate::backend::cuda::launch::{grid_dim, i32_arg, suffix, MAX_GRID_Y};
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, AttentionOps, Packing, QkvLayout};

/// The head-dim bounds the attention kernels are instantiated for (`attention_<op>_hd<bound>_<dtype>`).
const HEAD_DIM_BOUNDS: [usize; 2] = [ATTN_HD_MAX_SMALL as usize, ATTN_HD_MAX_LARGE as usize];

/// Launch plan of the tiled attention kernels (see kernels/attention.cu): the smallest head-dim
/// bound that holds `head_dim`, its tile (`ATTN_THREADS` threads of `ATTN_DIMS_PER_LANE` channels
/// each, so `256·16 / bound` rows), and the grids (heads, sequences, tiles of the longest sequence):
/// one block per query head for the forward and dq, per key/value head for dk and dv.
struct AttentionPlan {
    head_dim_bound: usize,
    query_grid: (u32, u32, u32),
    kv_grid: (u32, u32, u32),
}

impl AttentionPlan {
    /// Refuses a head dim above the kernels' largest bound (the CPU backend takes any).
    fn new(op: &str, packing: &Packing<CudaBackend>, layout: QkvLayout) -> Result<Self> {
        let hd = layout.head_dim;
        let head_dim_bound = HEAD_DIM_BOUNDS.into_iter().find(|&b| hd <= b).with_context(|| {
            format!("{op}: head_dim = {hd} exceeds the CUDA attention kernels' maximum {ATTN_HD_MAX_LARGE}")
        })?;
        let tile = (ATTN_THREADS * ATTN_DIMS_PER_LANE) as usize / head_dim_bound;
        let tiles = packing.max_seqlen.div_ceil(tile);
        let (seqs, max_y) = (packing.num_seqs(), MAX_GRID_Y);
        ensure!(seqs <= max_y, "{op}: {seqs} sequences exceed the grid limit {max_y}");
        ensure!(tiles <= max_y, "{op}: {tiles} tiles of {tile} tokens exceed the grid limit {max_y}");
        let (seqs, tiles) = (seqs as u32, tiles as u32);
        Ok(Self {
            head_dim_bound,
            query_grid: (grid_dim(layout.n_head, "n_head")?, seqs, tiles),
            kv_grid: (grid_dim(layout.n_kv_head, "n_kv_head")?, seqs, tiles),
        })
    }

    fn kernel(&self, op: &str, dtype: Dtype) -> String {
        format!("attention_{op}_hd{}_{}", self.head_dim_bound, suffix(dtype))
    }

    fn config(grid: (u32, u32, u32)) -> LaunchConfig {
        LaunchConfig { grid, block: (ATTN_THREADS as u32, 1, 1), shared_bytes: 0 }
    }
}

/// The layout arguments every attention kernel ends with: `n_head, n_kv_head, head_dim`.
fn layout_args(layout: QkvLayout) -> Result<[KernelArg; 3]> {
    Ok([
        i32_arg(layout.n_head, "n_head")?,
        i32_arg(layout.n_kv_head, "n_kv_head")?,
        i32_arg(layout.head_dim, "head_dim")?,
    ])
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
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        let saved_len = self.attention_saved_len(packing, layout.n_head);
        let cu = &packing.host_cu_seqlens;
        checks::attention_forward(out.len(), saved.len(), qkv.len(), cu, layout, saved_len)?;
        check_device_cu_seqlens(OP, packing)?;
        let plan = AttentionPlan::new(OP, packing, layout)?;
        if packing.num_tokens() == 0 {
            return Ok(());
        }
        let dt = self.act();
        let qkv = self.input(qkv, dt)?;
        let lse = self.output(saved, Dtype::F32, false)?.arg();
        let out = self.output(out, dt, false)?;
        let mut args = vec![out.arg(), lse, qkv.arg(), packing.cu_seqlens.arg()];
        args.extend(layout_args(layout)?);
        self.launch(&plan.kernel("forward", dt), AttentionPlan::config(plan.query_grid), &args)
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
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let saved_len = self.attention_saved_len(packing, layout.n_head);
        let cu = &packing.host_cu_seqlens;
        checks::attention_backward(dqkv.len(), dout.len(), qkv.len(), out.len(), saved.len(), cu, layout, saved_len)?;
        check_device_cu_seqlens(OP, packing)?;
        let plan = AttentionPlan::new(OP, packing, layout)?;
        let n = packing.num_tokens();
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let (dout, qkv, out) = (self.input(dout, dt)?, self.input(qkv, dt)?, self.input(out, dt)?);
        let lse = self.input(saved, Dtype::F32)?;
        // D_t = dout_t·out_t per (token, query head): written by the dq kernel, read by the dk/dv kernel.
        let delta = self.device.alloc::<f32>(n * layout.n_head)?;
        let dqkv = self.output(dqkv, dt, false)?;
        let tail = [&[packing.cu_seqlens.arg()][..], &layout_args(layout)?].concat();
        let mut args =
            vec![dqkv.arg(), KernelArg::Ptr(delta.device_ptr()), dout.arg(), qkv.arg(), out.arg(), lse.arg()];
        args.extend_from_slice(&tail);
        self.launch(&plan.kernel("backward_dq", dt), AttentionPlan::config(plan.query_grid), &args)?;
        let mut args = vec![dqkv.arg(), dout.arg(), qkv.arg(), lse.arg(), KernelArg::Ptr(delta.device_ptr())];
        args.extend(tail);
        // Each block sums the dk, dv of its key/value head over the group's query heads, in order.
        self.launch(&plan.kernel("backward_dkdv", dt), AttentionPlan::config(plan.kv_grid), &args)
    }
}
