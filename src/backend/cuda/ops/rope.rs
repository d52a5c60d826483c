//! Rotary position embeddings on the CUDA backend (kernels/rope.cu): one grid-stride launch over the
//! (token, channel pair) of the q and k heads, in place, in the activation type; the frequency table
//! read in f32.

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf, CudaIds};
use crate::backend::cuda::launch::{grid_stride_config, i32_arg, suffix};
use crate::backend::cuda::{Dtype, KernelArg};
use crate::backend::{checks, QkvLayout, RopeOps};

impl CudaBackend {
    /// Launches `rope_<direction>_<dtype>` in place on `qkv` (checked by the caller).
    fn rope(
        &self,
        direction: &str,
        qkv: &mut CudaBuf,
        positions: &CudaIds,
        inv_freq: &CudaBuf,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()> {
        let pairs = n * layout.head_dim / 2;
        if pairs == 0 {
            return Ok(());
        }
        let dt = self.act();
        let inv_freq = self.input(inv_freq, Dtype::F32)?;
        let qkv = self.output(qkv, dt, true)?;
        self.launch(
            &format!("rope_{direction}_{}", suffix(dt)),
            grid_stride_config(pairs),
            &[
                qkv.arg(),
                positions.arg(),
                inv_freq.arg(),
                KernelArg::I64(n as i64),
                i32_arg(layout.rotated_heads(), "rotated heads")?,
                i32_arg(layout.head_dim, "head_dim")?,
                i32_arg(layout.width(), "qkv width")?,
            ],
        )
    }
}

impl RopeOps for CudaBackend {
    fn rope_forward(
        &self,
        qkv: &mut CudaBuf,
        positions: &CudaIds,
        inv_freq: &CudaBuf,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()> {
        checks::rope_forward(qkv.len(), positions.host(), inv_freq.len(), n, layout)?;
        self.rope("forward", qkv, positions, inv_freq, n, layout)
    }

    fn rope_backward(
        &self,
        dqkv: &mut CudaBuf,
        positions: &CudaIds,
        inv_freq: &CudaBuf,
        n: usize,
        layout: QkvLayout,
    ) -> Result<()> {
        checks::rope_backward(dqkv.len(), positions.host(), inv_freq.len(), n, layout)?;
        self.rope("backward", dqkv, positions, inv_freq, n, layout)
    }
}
