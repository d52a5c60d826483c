//! The encoder on the CUDA backend (kernels/embedding.cu): the forward is one grid-stride launch;
//! the backward buckets the tokens by id on the host ([`bucket_by_id`]), so that each table row is
//! summed by one thread in token order, without atomics, into a gradient of the activations' type
//! or an f32 one (`embedding_backward_bf16_f32`).

use anyhow::{ensure, Result};

use crate::backend::cuda::backend::{CudaBackend, CudaBuf, CudaIds, Operand, Storage};
use crate::backend::cuda::launch::{
    grad_dtype, grad_kernel, grid_dim, i32_arg, packed_grid_stride_config, row_threads, suffix, vec_width, MAX_GRID_Y,
};
use crate::backend::cuda::{Dtype, KernelArg, LaunchConfig};
use crate::backend::{checks, EmbeddingOps};

/// Token indices grouped by id for the embedding backward: `order` (grouped, token order inside a
/// group), `starts` (group g is `order[starts[g]..starts[g+1]]`) and `rows` (the id of group g).
fn bucket_by_id(ids: &[i32]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..ids.len() as i32).collect();
    order.sort_by_key(|&t| ids[t as usize]); // stable: token order inside each group
    let (mut starts, mut rows) = (Vec::new(), Vec::new());
    for (k, &t) in order.iter().enumerate() {
        let id = ids[t as usize];
        if rows.last() != Some(&id) {
            starts.push(k as i32);
            rows.push(id);
        }
    }
    starts.push(order.len() as i32);
    (order, starts, rows)
}

impl CudaBackend {
    /// Adds `dout` summed over tokens by id into the rows of `dtable` (see kernels/embedding.cu).
    /// `dout` is of type `dt`; `dtable` of `dt` or f32 beside bf16 `dout` (an f32 gradient
    /// accumulator): a thread then owns one 128-bit pack of `dout`'s channels, two of the table's.
    fn embedding_scatter(&self, dtable: &Storage, dout: &Operand<'_>, dt: Dtype, ids: &[i32], c: usize) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let (order, starts, rows) = bucket_by_id(ids);
        let buckets = rows.len();
        let mut plan = order;
        plan.extend_from_slice(&starts);
        plan.extend_from_slice(&rows);
        let plan = self.device.upload(&plan)?;
        let n = ids.len();
        // A thread per 128-bit pack of channels of a bucket's row.
        let groups = c.div_ceil(vec_width(dt));
        let threads = row_threads(groups);
        let config = LaunchConfig {
            grid: (grid_dim(buckets, "embedding buckets")?, groups.div_ceil(threads as usize) as u32, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        };
        ensure!(config.grid.1 as usize <= MAX_GRID_Y, "embedding_backward: c = {c} is too wide");
        self.launch(
            &grad_kernel("embedding_backward", dt, dtable.dtype()),
            config,
            &[
                dtable.arg(),
                dout.arg(),
                KernelArg::Ptr(plan.slice(..n).device_ptr()),
                KernelArg::Ptr(plan.slice(n..n + buckets + 1).device_ptr()),
                KernelArg::Ptr(plan.slice(n + buckets + 1..).device_ptr()),
                i32_arg(c, "c")?,
            ],
        )
    }
}

impl EmbeddingOps for CudaBackend {
    fn embedding_forward(
        &self,
        out: &mut CudaBuf,
        tokens: &CudaIds,
        positions: &CudaIds,
        wte: &CudaBuf,
        wpe: Option<&CudaBuf>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::embedding_forward(out.len(), &tokens.host, &positions.host, wte.len(), wpe.map(CudaBuf::len), n, c)?;
        if n == 0 {
            return Ok(());
        }
        let dt = self.act();
        let wte = self.input(wte, dt)?;
        let wpe = wpe.map(|wpe| self.input(wpe, dt)).transpose()?;
        // Without a position table the kernel gets a null pointer and copies the token rows.
        let wpe_arg = wpe.as_ref().map_or(KernelArg::NULL, |wpe| wpe.arg());
        let out = self.output(out, dt, false)?;
        self.launch(
            &format!("embedding_forward_{}", suffix(dt)),
            packed_grid_stride_config(n * c, dt),
            &[out.arg(), tokens.arg(), positions.arg(), wte.arg(), wpe_arg, i32_arg(n, "n")?, i32_arg(c, "c")?],
        )
    }

    fn embedding_backward(
        &self,
        dwte: &mut CudaBuf,
        dwpe: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        tokens: &CudaIds,
        positions: &CudaIds,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let dwpe_len = dwpe.as_ref().map(|d| d.len());
        checks::embedding_backward(dwte.len(), dwpe_len, dout.len(), &tokens.host, &positions.host, n, c)?;
        let dt = self.act();
        let dout = self.input(dout, dt)?;
        // Each table's gradient in its own storage type (f32 accumulators beside bf16 activations).
        let dwte = self.output(dwte, grad_dtype(dt, dwte.dtype()), true)?;
        self.embedding_scatter(dwte, &dout, dt, &tokens.host, c)?;
        match dwpe {
            Some(dwpe) => {
                let dwpe = self.output(dwpe, grad_dtype(dt, dwpe.dtype()), true)?;
                self.embedding_scatter(dwpe, &dout, dt, &positions.host, c)
            }
            None => Ok(()),
        }
    }
}
