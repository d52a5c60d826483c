//! Causal attention over a packed batch on the CUDA backend (kernels/attention.cu): the launch plan
//! ([`AttentionPlan`]: head-dim bound, tile, grid) and the forward and backward launches.

use anyhow::{ensure, Context, Result};

use crate::backend::cuda::backend::{check_device_cu_seqlens, CudaBackend, CudaBuf};
use crate::backend::cuda::kernels::constants::attention::{
    ATTN_DIMS_PER_LANE, ATTN_HD_MAX_LARGE, ATTN_HD_MAX_SMALL, ATTN_THREADS,
};
use crate::backend::cuda::launch::{grid_dim, i32_arg, suffix, MAX_GRID_Y};
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, AttentionOps, Packing};

/// The head-dim bounds the attention kernels are instantiated for (`attention_<op>_hd<bound>_<dtype>`).
const HEAD_DIM_BOUNDS: [usize; 2] = [ATTN_HD_MAX_SMALL as usize, ATTN_HD_MAX_LARGE as usize];

/// Launch plan of the tiled attention kernels (see kernels/attention.cu): the smallest head-dim
/// bound that holds `hd`, its tile (`ATTN_THREADS` threads of `ATTN_DIMS_PER_LANE` channels each, so
/// `256·16 / bound` rows), and the grid (n_head, sequences, tiles of the longest sequence).
struct AttentionPlan {
    head_dim_bound: usize,
    grid: (u32, u32, u32),
}

impl AttentionPlan {
    fn new(op: &str, packing: &Packing<CudaBackend>, n_head: usize, c: usize) -> Result<Self> {
        let hd = c / n_head;
        let head_dim_bound = HEAD_DIM_BOUNDS.into_iter().find(|&b| hd <= b).with_context(|| {
            format!("{op}: head dim {hd} (c = {c}, n_head = {n_head}) exceeds the kernels' maximum {ATTN_HD_MAX_LARGE}")
        })?;
        let tile = (ATTN_THREADS * ATTN_DIMS_PER_LANE) as usize / head_dim_bound;
        let tiles = packing.max_seqlen.div_ceil(tile);
        let (seqs, max_y) = (packing.num_seqs(), MAX_GRID_Y);
        ensure!(seqs <= max_y, "{op}: {seqs} sequences exceed the grid limit {max_y}");
        ensure!(tiles <= max_y, "{op}: {tiles} tiles of {tile} tokens exceed the grid limit {max_y}");
        Ok(Self { head_dim_bound, grid: (grid_dim(n_head, "n_head")?, seqs as u32, tiles as u32) })
    }

    fn kernel(&self, op: &str, dtype: Dtype) -> String {
        format!("attention_{op}_hd{}_{}", self.head_dim_bound, suffix(dtype))
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig { grid: self.grid, block: (ATTN_THREADS as u32, 1, 1), shared_bytes: 0 }
    }
}

impl AttentionOps for CudaBackend {
    /// The forward keeps the log-sum-exp of every (token, head) row of scores: `n_head · n` f32.
    fn attention_saved_len(&self, packing: &Packing<Self>, n_head: usize) -> usize {
        n_head * packing.num_tokens()
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        saved: &mut CudaBuf,
        qkv: &CudaBuf,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        let saved_len = self.attention_saved_len(packing, n_head);
        let cu = &packing.host_cu_seqlens;
        checks::attention_forward(out.len(), saved.len(), qkv.len(), cu, n_head, c, saved_len)?;
        check_device_cu_seqlens(OP, packing)?;
        if packing.num_tokens() == 0 {
            return Ok(());
        }
        let plan = AttentionPlan::new(OP, packing, n_head, c)?;
        let dt = self.act();
        let qkv = self.input(qkv, dt)?;
        let lse = self.output(saved, Dtype::F32, false)?.arg();
        let out = self.output(out, dt, false)?;
        self.launch(
            &plan.kernel("forward", dt),
            plan.config(),
            &[out.arg(), lse, qkv.arg(), packing.cu_seqlens.arg(), i32_arg(n_head, "n_head")?, i32_arg(c, "c")?],
        )
    }

    fn attention_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        saved: &CudaBuf,
        packing: &Packing<Self>,
        n_head: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let saved_len = self.attention_saved_len(packing, n_head);
        let cu = &packing.host_cu_seqlens;
        checks::attention_backward(
            dqkv.len(),
            dout.len(),
            qkv.len(),
            out.len(),
            saved.len(),
            cu,
            n_head,
            c,
            saved_len,
        )?;
        check_device_cu_seqlens(OP, packing)?;
        let n = packing.num_tokens();
        if n == 0 {
            return Ok(());
        }
        let plan = AttentionPlan::new(OP, packing, n_head, c)?;
        let dt = self.act();
        let (dout, qkv, out) = (self.input(dout, dt)?, self.input(qkv, dt)?, self.input(out, dt)?);
        let lse = self.input(saved, Dtype::F32)?;
        // D_t = dout_t·out_t per (token, head): written by the dq kernel, read by the dk/dv kernel.
        let delta = self.device.alloc::<f32>(n * n_head)?;
        let dqkv = self.output(dqkv, dt, false)?;
        let tail = [packing.cu_seqlens.arg(), i32_arg(n_head, "n_head")?, i32_arg(c, "c")?];
        let mut args =
            vec![dqkv.arg(), KernelArg::Ptr(delta.device_ptr()), dout.arg(), qkv.arg(), out.arg(), lse.arg()];
        args.extend(tail);
        self.launch(&plan.kernel("backward_dq", dt), plan.config(), &args)?;
        let mut args = vec![dqkv.arg(), dout.arg(), qkv.arg(), lse.arg(), KernelArg::Ptr(delta.device_ptr())];
        args.extend(tail);
        self.launch(&plan.kernel("backward_dkdv", dt), plan.config(), &args)
    }
}
